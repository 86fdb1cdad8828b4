"""Dictionary-sharded training: ``softsae.trainer.train(..., TrainConfig(parallel="dictionary"))``.

Every rank draws the same global batch (one shared sampling stream, as one process would) and holds
n/W latents of the model (:class:`~softsae.distributed.sharded_model.ShardedSAE`): its encoder rows,
decoder rows and k-head rows. The forward is the global one (sharded soft top-k threshold, global
per-row top-k / BatchTopK, partial reconstructions summed), the loss is replicated, the backward
exact, Adam runs on each shard (it is elementwise), and the gradient norm for clipping is global.
Dead-latent counters are per shard (each rank tracks its latents; the rows are the same).

Checkpoints are FULL, in the one-process format: every ``checkpoint_every`` steps the shards of the
weights, of Adam's moments and of the dead-latent counters are gathered on rank 0, which writes
``trainer_state.pt`` atomically (temporary file + rename), so the last checkpoint survives a rank
killed mid-run and loads in one process. Resuming slices it for the new world size: a run resumes
with any number of ranks, in any mode (``parallel="none"``, ``"data"`` or ``"dictionary"``). The
final model (``model.safetensors``) is gathered and written the same way. Cost: rank 0 holds one full
copy of the model and its Adam moments on the host while it writes.

Errors: loading or dimension problems on any rank and every batch's shape and finiteness are checked
collectively, so a rank with bad data makes EVERY rank raise the same
:class:`~softsae.distributed.DistributedInputError` instead of hanging (collective timeouts,
``SOFTSAE_DIST_TIMEOUT``, bound what remains, e.g. a killed peer).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from softsae.checkpoint import atomic_torch_save, save_sae
from softsae.cpu_memory import keep_freed_memory
from softsae.data import normalization_stats
from softsae.distributed._comm import all_reduce_
from softsae.distributed.agreement import agree_on_run
from softsae.distributed.launch import join_and_load
from softsae.distributed.process import group_rank_world
from softsae.distributed.sharded_model import (
    ShardedSAE,
    clip_grad_norm_,
    gather_full,
    shard_full,
    sharded_auxk_loss,
)
from softsae.distributed.stats import check_batch
from softsae.logger import METRICS_FILE
from softsae.losses import DeadLatentTracker, k_loss, reconstruction_loss
from softsae.models import SparseAutoencoder

__all__ = ["dictionary_train_step", "load_sharded_state", "save_full_state", "train_dictionary"]


# ----------------------------------------------------------------------------- one step


def dictionary_train_step(model: ShardedSAE, opt: torch.optim.Optimizer, tracker: DeadLatentTracker, x: Tensor,
                          step: int, c) -> dict[str, Tensor]:
    """``softsae.trainer.train_step`` for a dictionary-sharded model: x (B, d) is the whole batch (the same on
    every rank), ``tracker`` counts this rank's latents. Returns the replicated loss terms."""
    from softsae.trainer import apply_schedule, forward_train_amp, k_target_at

    hard = apply_schedule(model, opt, step, c)
    x_n = model.normalize(x)
    out = forward_train_amp(model, x_n, c)
    x_hat = out.x_hat.float()
    recon = reconstruction_loss(x_n, x_hat)
    loss = recon
    terms: dict[str, Tensor] = {"recon": recon.detach()}
    if out.k_hat is not None:
        terms["mean_k"] = out.k_hat.detach().mean()
        if not hard and c.w_k > 0:
            kl = k_loss(out.k_hat.float(), k_target_at(step, c, model.d), beta=c.k_loss_beta)
            loss = loss + c.w_k * kl
            terms["k_loss"] = kl.detach()
    if c.auxk_alpha > 0:
        aux = sharded_auxk_loss(out.pre.float(), x_n - x_hat, tracker.dead_mask(), model.W_dec, c.k_aux, model.n,
                                model.backend, model.group)
        loss = loss + c.auxk_alpha * aux
        terms["auxk"] = aux.detach()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    model.project_decoder_grad()
    if c.grad_clip > 0:
        clip_grad_norm_(model, c.grad_clip)
    opt.step()
    model.normalize_decoder()
    tracker.update(out.codes.fired(), x.shape[0])
    terms["loss"] = loss.detach()
    terms["l0"] = model.global_l0(out.codes).float().mean()
    terms["fvu"] = (recon * x.shape[0] / (x_n - x_n.mean(0)).pow(2).sum().clamp_min(1e-30)).detach()
    return terms


# ----------------------------------------------------------------------------- full checkpoints


def _flat_optimizer(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, Tensor]:
    flat = {}
    for i, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            flat[f"{names[i]}/{key}"] = v
    return flat


def _unflat_optimizer(flat: dict[str, Tensor], names: list[str], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in flat.items():
        pname, field = key.split("/", 1)
        state.setdefault(names.index(pname), {})[field] = v
    return {"state": state, "param_groups": param_groups}


def save_full_state(path: Path | None, model: ShardedSAE, opt: torch.optim.Optimizer, tracker: DeadLatentTracker,
                    step: int, rng: np.random.Generator, c) -> None:
    """Gather the model, Adam and the dead-latent counters on rank 0, which writes ``path`` atomically in
    the one-process ``trainer_state.pt`` format. Collective: every rank must call it (path may be None
    off rank 0)."""
    names = [name for name, _ in model.named_parameters()]
    weights = model.full_state_dict()
    moments = gather_full(_flat_optimizer(opt, names), model.n, model.group)
    counters = gather_full({"tracker": tracker.tokens_since_fired}, model.n, model.group)
    if weights is None or path is None:
        return
    atomic_torch_save({
        "step": step, "model_config": model.full_config, "model": weights,
        "optimizer": _unflat_optimizer(moments, names, opt.state_dict()["param_groups"]),
        "tracker": {"threshold": tracker.threshold, "tokens_since_fired": counters["tracker"]},
        "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
        "train_config": dataclasses.asdict(c),
    }, path)


def load_sharded_state(state: dict, model: ShardedSAE, opt: torch.optim.Optimizer, tracker: DeadLatentTracker
                       ) -> None:
    """Load this rank's slice of a full (one-process format) trainer state's optimizer and counters
    (the weights are sharded when the ShardedSAE is built from the full model)."""
    names = [name for name, _ in model.named_parameters()]
    full_opt = state["optimizer"]
    flat = {}
    for i, st in full_opt["state"].items():
        for key, v in st.items():
            flat[f"{names[int(i)]}/{key}"] = v
    local = shard_full(flat, model.rank, model.world, model.n)
    opt.load_state_dict(_unflat_optimizer(local, names, full_opt["param_groups"]))
    counters = shard_full({"tracker": state["tracker"]["tokens_since_fired"]}, model.rank, model.world, model.n)
    tracker.load_state_dict({"threshold": state["tracker"]["threshold"], "tokens_since_fired": counters["tracker"]})


# ----------------------------------------------------------------------------- the loop


def train_dictionary(data, config, out_dir: str | Path | None = None, resume: bool = False,
                     model: SparseAutoencoder | None = None):
    """``softsae.trainer.train`` with the dictionary sharded over the ranks of a torchrun launch (see the
    module doc). Returns a ``TrainResult`` whose ``model`` is the full, gathered model on rank 0 and
    None on the other ranks; rank 0 alone writes files."""
    from softsae import trainer as T

    source, c = join_and_load(data, config)
    device = torch.device(c.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the one-process trainer (softsae/cpu_memory.py)
    main = group_rank_world(None)[0] == 0
    d = source.d
    out = Path(out_dir) if out_dir is not None else None
    state_path = out / T.STATE_FILE if out is not None else None
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)

    found = state_path if resume and state_path is not None and state_path.exists() else None
    # every rank reads it (shared filesystem): the same settings and checkpoint everywhere, or one error
    state = agree_on_run(c, found, "parallel='dictionary' training")
    if state is not None:
        full = T.model_from_state(state, state_path, c)
    else:
        full = model if model is not None else T.new_model(c, d)
    if full.d != d:
        raise ValueError(f"model expects d={full.d} but the activations have d={d}")
    full = full.cpu()
    if state is None:  # the same global statistics as one process: every rank sees the same rows
        shift, scale = normalization_stats(source, c.normalize)
        full.set_normalization(shift, scale)
        first = source.sample(min(c.batch_size, 8192), rng)
        check_batch(first, d, what="activations (first batch)")
        with torch.no_grad():
            full.b_dec.copy_(T.geometric_median(full.normalize(first), c.geometric_median_iters))
        if out is not None and main and (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()
    sm = ShardedSAE(full, None).to(device).train()
    del full
    opt = T.make_optimizer(sm.parameters(), c.lr)
    tracker = DeadLatentTracker(sm.n_local, c.dead_feature_threshold, device)
    start = 0
    if state is not None:
        load_sharded_state(state, sm, opt, tracker)
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        if out is not None and main:
            T._trim_metrics(out / METRICS_FILE, start - 1)
        del state

    logger, bar = T.open_run_outputs(c, out, main, start, f"train {c.arch} (dictionary-sharded)")
    # Checkpoints are collective (a gather): every rank takes part when any rank has an out_dir.
    flag = torch.tensor([float(out is not None)], device=device)
    checkpointing = c.checkpoint_every > 0 and bool(all_reduce_(flag, dist.ReduceOp.MAX, sm.group).item())
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for step in range(start, c.steps):
            x = source.sample(c.batch_size, rng)
            check_batch(x, d, what=f"activations (step {step})")  # bad data on any rank: the same error on every rank
            terms = dictionary_train_step(sm, opt, tracker, x.to(device, non_blocking=True), step, c)
            if step % c.log_every == 0 or step == c.steps - 1:
                dead = int(all_reduce_(tracker.dead_mask().sum().reshape(1), group=sm.group).item())
                last = {k: float(v) for k, v in terms.items()}
                last.update(step=step, lr=T.lr_at(step, c), dead=dead, hard=T.is_hard_phase(step, c),
                            elapsed_s=round(time.perf_counter() - t0, 3))
                if c.arch == "softsae":
                    last.update(alpha=sm.alpha, k_target=T.k_target_at(step, c, d))
                if not all(math.isfinite(v) for v in (last["loss"], last["recon"])):
                    raise FloatingPointError(f"training diverged at step {step}: loss={last['loss']}")
                if logger is not None:
                    logger.log(last, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4g}", fvu=f"{last['fvu']:.4f}",
                                    k=f"{last.get('mean_k', last['l0']):.2f}", dead=dead, refresh=False)
            if bar is not None:
                bar.update(1)
            if checkpointing and (step + 1) % c.checkpoint_every == 0 and step + 1 < c.steps:
                save_full_state(state_path if main else None, sm, opt, tracker, step + 1, rng, c)
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
    sm.train(False)
    full = sm.full_model()
    if full is not None:
        full.eval()
        if out is not None:
            save_sae(full, out, extra={"train_config": dataclasses.asdict(c)})
            if state_path.exists():
                os.unlink(state_path)
    return T.TrainResult(model=full, config=c, last=last, out_dir=out)
