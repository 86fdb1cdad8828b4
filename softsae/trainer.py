"""Training loop for SoftSAE and the TopK / BatchTopK baselines (one recipe for all three).

    cfg = TrainConfig(arch="softsae", dict_size=4096, k=32, steps=10_000, batch_size=4096)
    result = train("acts.npy", cfg, out_dir="runs/sae")      # result.model, result.last

Recipe (docs/math.md, section 3): Adam(0.9, 0.999), lr default 2e-4 / sqrt(n / 2^14), linear warmup,
linear decay to 0 from ``decay_start``; decoder gradient projected orthogonal to the unit rows before
the step, rows renormalised after it; global grad norm clipped at 1; b_dec initialised at the
geometric median of the first batch; auxk loss on dead latents. Schedules are fractions of
``steps`` (absolute ``*_steps`` overrides win):

    K target    fixed at K by default; optional max(d, K) -> K linearly over the first k_anneal_frac
                (the authors use 1%; TopK/BatchTopK then follow the same schedule, so comparisons
                stay fair). Off by default: neutral at 2.5k steps (A16 ratio 0.835 vs 0.836). A target
                starting above k_max (d=64 > 2K) pushes the k head towards saturation; the 10k-step
                saturation below happened with and without it, though.
    alpha       fixed at 3e-3 by default; optional alpha_start -> alpha over alpha_anneal_frac
                (linear as the authors, or log-linear)
    SoftSAE     straight-through phase (st_frac; default None = every step before the hard phase):
                hard top-floor(k_hat) forward; st_mode "k" (default): the encoder gets the hard
                codes' own gradient (as TopK), the k head dL/dk through the soft gate; "soft": both
                through the soft gate | hard top-floor(k_hat) phase, the last hard_frac = 20%,
                encoder trainable (hard_encoder_grad), k-loss off. st_frac=0 gives the soft-gate
                forward of the previous default (see "Straight-through default" below).

alpha units: the authors' alpha (1e-4) acts on the ReLU'd pre-activations of inputs normalised
exactly as ``normalize="scale"`` here (x / sqrt(E||x||^2); CLIP: centred first), so their 1e-4
and ours are in the same units; the value is not "tied to another activation scale". It is the
run length and recipe that differ: the authors anneal alpha linearly 1 -> 1e-4 over 2.5k of 244k
steps. On 2.5k-step runs a final alpha of 1e-4 trains worse here, whatever the anneal (not
measured at the authors' length). Evidence (benchmarks/science/recipe_ablation.py, held-in synthetic
A16: d=64, n=512, K=16, 2500 steps x 256; FVU held out, ratio = FVU / TopK's FVU at the same
mean L0, TopK trained with the same schedules; benchmarks/science/results/recipe_ablation.jsonl, science_synthetic.md):

    config                                                                                FVU  ratio
    authors' schedules (alpha 1 -> 1e-4 linear over 1%, K anneal 1%, hard 4% w/o enc. grad)  0.325  0.99
    same, alpha anneal over 10%                                                           0.374  1.17
      + encoder grad in hard phase / + straight-through 20% / k_max 4K                 0.372 / 0.372 / 0.377
    same, final alpha 3e-3                                                                0.291  0.90
    old default (alpha 3e-3 fixed, hard 20% with enc. grad)                               0.268  0.84
      + K anneal 1% / + log alpha anneal 10% and K anneal / hard 5% / hard 40%    0.270 / 0.264 / 0.266 / 0.275
      + straight-through 20% before the hard phase / round(k_hat)                  0.263 (0.83) / 0.263 (0.84)
      + hard phase w/o encoder grad                                                       0.258  0.87 (L0 16.0)
      alpha 1e-2                                                                          0.236  0.80
    alpha log 1 -> 1e-2 over 10%, K anneal 1%, hard 20% w/ enc. grad                     0.238  0.80
      + round(k_hat) / relative alpha 2.5e-2 x row max                             0.233 (0.80) / 0.244 (0.79)

Straight-through default (measured after the table above; the rows are in recipe_ablation.jsonl):
with the soft-gate forward SoftSAE's dictionary trailed TopK's on MiniLM (same dictionary with a
uniform top-K: 0.193 vs TopK's 0.158 at K=16), so allocation could not win. Training the encoder and
decoder on the hard codes (st_mode "k") and the k head through the soft gate closed it: MiniLM
validation split (last 20k train rows, 1000 steps x 512, n=1536), ratio to TopK at equal L0,
K=16: 1.109 -> 0.943, K=8: 1.078 -> 0.960; synthetic A16 0.836 -> 0.740, U32d256 1.08 -> 0.837.
The straight-through with the soft gate's encoder gradient (st_mode "soft") was worse (K=16: 1.224);
so were alpha 1e-3 (1.183) and 1e-2 (1.151), hard 50% (1.151), no grad clipping (1.143) and the
authors' schedules (1.270, their TopK with K annealing at 0.178 vs 0.157 without).

Long runs (10k steps, A21: d=64, n=512, K=21, k_max=42) overturn the 2.5k-step ranking of alpha:
alpha 3e-3 fixed (the default): FVU 0.095 vs TopK 0.229 at L0 18.9, Spearman(L0, truth) 0.97;
alpha log 1 -> 1e-2 over 10% (with or without K annealing): the k head saturates, every row gets
L0 = 41 = k_max - 1 (Spearman -0.01), FVU 0.038 vs TopK-at-41 0.036. Mechanism (inferred, not
isolated): alpha 1e-2 already settles mean k_hat above K at 2.5k steps (L0 16.1 for K=16 vs 14.2
at 3e-3), and once k_max * sigmoid(.) saturates neither loss moves it back. Hence the default
stays alpha = 3e-3 fixed.

So, at 2.5k steps: the final alpha matters most (1e-4 << 3e-3 < 1e-2); annealing alpha and K,
the hard-phase length (5-40%), a straight-through phase and round vs floor are within noise (+-0.01) at this
budget; k_max 4K hurts the L0/truth correlation (0.80 vs 0.90). The hard phase keeps the encoder
trainable (selecting without gradient, the authors' choice, raised the ratio 0.84 -> 0.87).
floor(k_hat) stays the inference rule (the paper's); ``k_round="round"`` gives +0.5 mean L0 at the
same ratio. ``alpha_relative`` (Laplace scale = alpha x the row's largest pre-activation) is
available; it was as good as the absolute default on A16 but is untested on LLM activations.

With ``out_dir`` the run writes ``metrics.jsonl`` (one JSON object per logged step; ``log="tensorboard"``
or ``"wandb"`` also log there, see softsae.logger), a resumable
``trainer_state.pt`` every ``checkpoint_every`` steps, and at the end the model (``save_sae``)
and ``train_config.json``. All files are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from softsae.checkpoint import (
    WEIGHTS,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_resume_state,
    load_checked,
    save_sae,
)
from softsae.cpu_memory import keep_freed_memory
from softsae.data import normalization_stats
from softsae.fileio import remove_stale_temps
from softsae.logger import LOGGERS, METRICS_FILE, MetricsLogger, open_logger
from softsae.losses import DeadLatentTracker, auxk_loss, k_loss, reconstruction_loss
from softsae.models import ARCHS, BatchTopKSAE, Codes, SoftSAE, SparseAutoencoder, TopKSAE
from softsae.parallel import SingleProcess, strategy_for
from softsae.schedules import (  # noqa: F401  (re-exported: the trainer's public schedule functions)
    alpha_at,
    apply_schedule,
    is_hard_phase,
    is_st_phase,
    k_target_at,
    lr_at,
    make_optimizer,
)
from softsae.settings import check_ranges

STATE_FILE = "trainer_state.pt"
# the files a run writes into its out_dir; a new run removes their stale temporaries (softsae.fileio)
RUN_FILES = (STATE_FILE, WEIGHTS, "config.json", "train_config.json", "metrics.jsonl", "eval.json", "stream.json")


def _doc(default, help: str):
    """A TrainConfig field and its documentation (``softsae train``'s flags and --help are generated from it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` fields get the defaults in ``resolved()``; each
    field's documentation is its ``metadata["help"]``."""

    arch: str = _doc("softsae", "model: softsae | topk | batchtopk")
    recipe: str = _doc("default", "preset of the schedules (softsae.recipes), applied before --config and the other "
                       "settings: default (TrainConfig's) | paper (the SoftSAE authors': soft-gate forward, alpha "
                       "1 -> 1e-4 over 2500 steps, K annealed over 1%, last 4% hard without encoder gradient, lr "
                       "3e-4 at n=16k)")
    dict_size: int = _doc(4096, "number of latents n (required on the command line, here or in --config)")
    k: float = _doc(32, "K: latents per input (TopK/BatchTopK); SoftSAE: the target mean budget (required on the "
                    "command line)")
    k_max: float | None = _doc(None, "SoftSAE k-head range; default 2k")
    k_hidden: int | None = _doc(None, "SoftSAE k-head width; default dict_size (the paper's; a narrower head makes "
                                "the training step cheaper)")
    steps: int = _doc(10_000, "optimisation steps (required on the command line, here or in --config)")
    batch_size: int = _doc(4096, "rows per step (the GLOBAL batch when parallel)")
    lr: float | None = _doc(None, "learning rate; default 2e-4 / sqrt(dict_size / 2^14)")
    warmup_steps: int | None = _doc(None, "linear warmup steps; default min(1000, steps // 10)")
    decay_start: int | None = _doc(None, "step where the linear decay to 0 starts; default int(0.8 * steps)")
    k_anneal_frac: float = _doc(0.0, "fraction of the steps over which K goes max(d, K) -> K (all archs)")
    k_anneal_steps: int | None = _doc(None, "absolute override of k_anneal_frac (0: off)")
    alpha: float = _doc(3e-3, "final soft top-k scale, in normalised units (softsae.trainer: default and evidence)")
    alpha_start: float = _doc(1.0, "alpha at step 0 when annealing")
    alpha_anneal_frac: float = _doc(0.0, "fraction of the steps to anneal alpha_start -> alpha over (0: alpha fixed)")
    alpha_anneal_steps: int | None = _doc(None, "absolute override of alpha_anneal_frac")
    alpha_schedule: str = _doc("log", "shape of the alpha anneal: linear (the authors') | log (log-linear)")
    alpha_relative: bool = _doc(False, "Laplace scale = alpha x the row's largest pre-activation")
    hard_frac: float = _doc(0.2, "SoftSAE: the final hard top-k phase, as a fraction of the steps")
    hard_topk_steps: int | None = _doc(None, "absolute override of hard_frac")
    hard_encoder_grad: bool = _doc(True, "SoftSAE: train the encoder in the hard phase (off: the hard phase selects "
                                   "without gradient, the authors' choice)")
    st_frac: float | None = _doc(None, "SoftSAE: straight-through phase (hard forward) just before the hard phase, "
                                 "as a fraction of the steps; default all steps before the hard phase, 0: a "
                                 "soft-gate forward instead")
    st_steps: int | None = _doc(None, "absolute override of st_frac")
    st_mode: str = _doc("k", "SoftSAE straight-through gradient: k (encoder through the hard codes, as TopK; the k "
                        "head through the soft gate's dk) | soft (encoder and k head through the soft gate)")
    k_round: str = _doc("floor", "SoftSAE hard budget: floor | round of k_hat")
    w_k: float = _doc(1.0, "weight of the k-loss")
    k_loss_beta: float = _doc(5.0, "softplus sharpness of the k-loss")
    auxk_alpha: float = _doc(1 / 32, "weight of the aux-k loss on dead latents")
    k_aux: int | None = _doc(None, "aux-k latents per row; default d // 2")
    dead_feature_threshold: int | None = _doc(None, "tokens without firing to count as dead; default "
                                              "min(10M, steps * batch_size // 10)")
    threshold_beta: float = _doc(0.99, "BatchTopK: per-step EMA factor of the inference threshold")
    normalize: str = _doc("scale", "input normalisation: none | scale | center_scale")
    geometric_median_iters: int = _doc(10, "Weiszfeld iterations of b_dec's initialisation")
    grad_clip: float = _doc(1.0, "global gradient-norm clip (0: off)")
    seed: int = _doc(0, "random seed (model init and batch sampling)")
    device: str = _doc("auto", "auto | cpu | cuda | cuda:N")
    backend: str = _doc("auto", "ops backend: auto | reference | cpu | triton | cuda (the SOFTSAE_BACKEND "
                        "environment variable replaces auto)")
    decode_mode: str = _doc("auto", "decoder: auto (sparse in the hard phase) | sparse | dense")
    amp: str = _doc("auto", "bf16 autocast: auto (on CUDA only) | bf16 (always) | off")
    log_every: int = _doc(10, "steps between logged metrics")
    log: str = _doc("jsonl", "metrics logger: jsonl (OUT/metrics.jsonl; always written) | tensorboard (+ "
                    "OUT/tensorboard) | wandb (+ an offline run in OUT/wandb)")
    checkpoint_every: int = _doc(1000, "steps between resumable checkpoints (0: only at the end)")
    progress: bool = _doc(True, "progress bar")
    parallel: str = _doc("none", "none: one process | data: rows of the global batch over the processes of a "
                         "torchrun launch | dictionary: the dictionary sharded over them (rank 0 writes the run)")

    def resolved(self, d: int) -> TrainConfig:
        """A copy with every default filled in and checked against activation dim ``d``."""
        c = dataclasses.replace(self)
        check_ranges(dataclasses.asdict(c), source="TrainConfig")  # finite numbers, log_every >= 1, device ...
        if c.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {c.arch!r}")
        if c.recipe not in ("default", "paper"):
            raise ValueError(f"recipe must be 'default' or 'paper', got {c.recipe!r}")
        if c.dict_size < 1 or c.steps < 1 or c.batch_size < 1:
            raise ValueError("dict_size, steps and batch_size must be positive")
        if not 0 < c.k <= c.dict_size:
            raise ValueError(f"k={c.k} must lie in (0, dict_size={c.dict_size}]: the dictionary is smaller than k")
        if c.arch != "softsae" and int(c.k) != c.k:
            raise ValueError(f"{c.arch} needs an integer k, got {c.k}")
        if c.normalize not in ("none", "scale", "center_scale"):
            raise ValueError(f"normalize must be 'none', 'scale' or 'center_scale', got {c.normalize!r}")
        if c.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {c.amp!r}")
        if c.parallel not in ("none", "data", "dictionary"):
            raise ValueError(f"parallel must be 'none', 'data' or 'dictionary', got {c.parallel!r}")
        if c.log not in LOGGERS:
            raise ValueError(f"log must be one of {LOGGERS}, got {c.log!r}")
        c.lr = c.lr if c.lr is not None else 2e-4 / math.sqrt(c.dict_size / 2**14)
        if not c.lr > 0:
            raise ValueError(f"lr must be > 0, got {c.lr}")
        c.warmup_steps = c.warmup_steps if c.warmup_steps is not None else min(1000, c.steps // 10)
        c.decay_start = c.decay_start if c.decay_start is not None else int(0.8 * c.steps)
        for name in ("k_anneal_frac", "alpha_anneal_frac", "hard_frac", "st_frac"):
            v = getattr(c, name)
            if v is None and name == "st_frac":
                continue
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if c.alpha_schedule not in ("linear", "log"):
            raise ValueError(f"alpha_schedule must be 'linear' or 'log', got {c.alpha_schedule!r}")
        if c.st_mode not in ("soft", "k"):
            raise ValueError(f"st_mode must be 'soft' or 'k', got {c.st_mode!r}")
        if c.k_round not in ("floor", "round"):
            raise ValueError(f"k_round must be 'floor' or 'round', got {c.k_round!r}")
        if not (c.alpha > 0 and c.alpha_start > 0):
            raise ValueError(f"alpha and alpha_start must be > 0, got {c.alpha}, {c.alpha_start}")

        def steps_of(override: int | None, frac: float, name: str) -> int:
            n = int(round(frac * c.steps)) if override is None else int(override)
            if not 0 <= n <= c.steps:
                raise ValueError(f"{name} must lie in [0, steps={c.steps}], got {n}")
            return n

        c.k_anneal_steps = steps_of(c.k_anneal_steps, c.k_anneal_frac, "k_anneal_steps")
        c.alpha_anneal_steps = steps_of(c.alpha_anneal_steps, c.alpha_anneal_frac, "alpha_anneal_steps")
        soft = c.arch == "softsae"
        c.hard_topk_steps = steps_of(c.hard_topk_steps, c.hard_frac, "hard_topk_steps") if soft else 0
        if soft and c.st_steps is None and c.st_frac is None:  # the whole soft phase
            c.st_steps = c.steps - c.hard_topk_steps
        c.st_steps = steps_of(c.st_steps, c.st_frac or 0.0, "st_steps") if soft else 0
        if c.hard_topk_steps + c.st_steps > c.steps:
            raise ValueError(f"hard_topk_steps ({c.hard_topk_steps}) + st_steps ({c.st_steps}) "
                             f"exceed steps ({c.steps})")
        c.k_aux = c.k_aux if c.k_aux is not None else max(1, d // 2)
        if c.dead_feature_threshold is None:
            c.dead_feature_threshold = min(10_000_000, max(c.batch_size, c.steps * c.batch_size // 10))
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        return c


@dataclass
class TrainResult:
    model: SparseAutoencoder | None  # None on ranks > 0 of a dictionary-sharded run (rank 0 holds the model)
    config: TrainConfig
    last: dict[str, float] = field(default_factory=dict)  # metrics of the last logged step
    out_dir: Path | None = None


# ----------------------------------------------------------------------------- init helpers


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 10, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations for the geometric median of the rows of x (B, d), from the mean."""
    xd = x.double()
    y = xd.mean(0)
    for _ in range(iters):
        w = 1.0 / (xd - y).norm(dim=1).clamp_min(eps)
        y = (w[:, None] * xd).sum(0) / w.sum()
    return y.to(x.dtype)


def new_model(c: TrainConfig, d: int) -> SparseAutoencoder:
    """A freshly initialised SAE for resolved config ``c``."""
    if c.arch == "softsae":
        return SoftSAE(d, c.dict_size, c.k, k_max=c.k_max, alpha=c.alpha, backend=c.backend,
                       decode_mode=c.decode_mode, k_round=c.k_round, alpha_relative=c.alpha_relative,
                       k_hidden=c.k_hidden)
    if c.arch == "topk":
        return TopKSAE(d, c.dict_size, int(c.k), backend=c.backend, decode_mode=c.decode_mode)
    return BatchTopKSAE(d, c.dict_size, int(c.k), threshold_beta=c.threshold_beta, backend=c.backend,
                        decode_mode=c.decode_mode)


# ----------------------------------------------------------------------------- one step


def forward_train_amp(model, x_n: Tensor, c: TrainConfig):
    """``model.forward_train(x_n)`` under bf16 autocast when ``c.amp`` asks for it ("auto": CUDA only)."""
    use_amp = c.amp == "bf16" or (c.amp == "auto" and x_n.device.type == "cuda")
    with torch.autocast(x_n.device.type, dtype=torch.bfloat16, enabled=use_amp):
        return model.forward_train(x_n)



def train_loss(model: SparseAutoencoder, x_n: Tensor, step: int, c: TrainConfig, dead: Tensor
               ) -> tuple[Tensor, dict[str, Tensor], Codes]:
    """The step's forward and loss on normalised x_n (B, d) (the schedule already applied).

    Returns (loss, the terms to log, the detached codes). With the rows sharded (data mode) every
    per-row term is this rank's share of the global one (its rows over the global row count) and the
    logged terms are summed over the ranks by ``_global_terms``; the k-loss is on the global mean.
    """
    lat = model.latents
    out = forward_train_amp(model, x_n, c)
    x_hat = out.x_hat.float()
    rows = x_n.shape[0]
    recon = reconstruction_loss(x_n, x_hat) * (rows / lat.total_rows(rows))  # share of the global mean
    loss = recon
    terms: dict[str, Tensor] = {"recon": recon.detach()}
    if out.k_hat is not None:
        terms["k_sum"] = out.k_hat.detach().double().sum()
        if not model.hard and c.w_k > 0:
            kl = k_loss(out.k_hat.float(), k_target_at(step, c, model.d), beta=c.k_loss_beta, latents=lat)
            loss = loss + c.w_k * kl
            terms["k_loss"] = kl.detach()
    if c.auxk_alpha > 0:
        aux = auxk_loss(out.pre.float(), x_n - x_hat, dead, model.W_dec, c.k_aux, model.backend, latents=lat)
        loss = loss + c.auxk_alpha * aux
        terms["auxk"] = aux.detach()
    codes = out.codes
    detached = Codes(codes.n, *(None if t is None else t.detach() for t in
                                (codes.dense, codes.vals, codes.idx, codes.soft_pre)))
    return loss, terms, detached


class TrainForward(nn.Module):
    """``train_loss`` as a module's forward: the unit that data mode wraps in DistributedDataParallel
    (its outputs hold no tensor of the graph but the loss, so DDP finds exactly the used parameters)."""

    def __init__(self, model: SparseAutoencoder, c: TrainConfig) -> None:
        super().__init__()
        self.sae, self.c = model, c

    def forward(self, x_n: Tensor, step: int, dead: Tensor) -> tuple[Tensor, dict[str, Tensor], Codes]:
        return train_loss(self.sae, x_n, step, self.c, dead)


def train_step(model: SparseAutoencoder, opt: torch.optim.Optimizer, tracker: DeadLatentTracker, x: Tensor,
               step: int, c: TrainConfig, engine: nn.Module | None = None) -> dict[str, Tensor]:
    """One optimisation step on a raw batch x (B, d); returns the loss terms (tensors, no sync).

    ``engine``: the module whose forward is ``train_loss`` (data mode: the DDP-wrapped
    :class:`TrainForward`); None calls ``train_loss`` directly. The model's placement
    (``model.latents``) makes every batch statistic global when the rows or the dictionary are
    sharded; the returned terms are then the global values, identical on every rank.
    """
    apply_schedule(model, opt, step, c)
    x_n = model.normalize(x)
    dead = tracker.dead_mask()
    opt.zero_grad(set_to_none=True)
    loss, terms, codes = (engine(x_n, step, dead) if engine is not None else train_loss(model, x_n, step, c, dead))
    loss.backward()
    model.project_decoder_grad()
    if c.grad_clip > 0:
        model.latents.clip_grad_norm_(model, c.grad_clip)
    opt.step()
    model.normalize_decoder()
    tracker.update(*model.latents.merge_fired(codes.fired(), x.shape[0]))
    return _global_terms(model, terms, codes, x_n, c)


def _global_terms(model: SparseAutoencoder, terms: dict[str, Tensor], codes: Codes, x_n: Tensor,
                  c: TrainConfig) -> dict[str, Tensor]:
    """The logged terms over the global batch: shares summed over the row shards, L0 over the latent
    shards (one process: the local values; data mode: two small all-reduces)."""
    lat = model.latents
    shares = [s for s in ("recon", "auxk") if s in terms]
    l0 = lat.count(codes.l0().double()) if lat.sharded_latents else codes.l0().double()
    xs = x_n.detach()
    parts = [terms[s].double().reshape(1) for s in shares] + [l0.sum().reshape(1), xs.sum(0, dtype=torch.float64),
                                                              l0.new_tensor([len(xs)])]
    if "k_sum" in terms:
        parts.append(terms["k_sum"].reshape(1))
    buf = lat.sum_rows(torch.cat(parts))
    m, d = len(shares), xs.shape[1]
    rows = buf[m + 1 + d]
    mu = (buf[m + 1:m + 1 + d] / rows).to(xs.dtype)
    var = lat.sum_rows((xs - mu).pow(2).sum(dtype=torch.float64).reshape(1))[0]
    res = {s: buf[i].float() for i, s in enumerate(shares)}
    loss = res["recon"]
    if "k_loss" in terms:
        res["k_loss"] = terms["k_loss"]
        loss = loss + c.w_k * terms["k_loss"]
    if "auxk" in res:
        loss = loss + c.auxk_alpha * res["auxk"]
    res.update(loss=loss, l0=(buf[m] / rows).float(), fvu=(buf[0] * rows / var.clamp_min(1e-30)).float())
    if "k_sum" in terms:
        res["mean_k"] = (buf[-1] / rows).float()
    return res


# ----------------------------------------------------------------------------- the loop


def model_from_state(state: dict, state_path: Path, c: TrainConfig) -> SparseAutoencoder:
    """The model saved in a training state (``trainer_state.pt``); refuses a state written by a run
    with other arch, dict_size, k, steps or batch_size than ``c``."""
    saved = state["train_config"]
    clash = {f: (saved[f], getattr(c, f)) for f in ("arch", "dict_size", "k", "steps", "batch_size")
             if saved[f] != getattr(c, f)}
    if clash:
        raise ValueError(f"{state_path} was written by a run with different settings "
                         f"(saved vs requested: {clash}); resume with the same settings or start afresh")
    model = load_checked(state["model_config"], state["model"], state_path)  # sizes checked before allocating
    check_resume_state(state, model, state_path)
    return model


def open_run_outputs(c: TrainConfig, out: Path | None, main: bool, start: int, desc: str):
    """(metrics logger or None, progress bar or None) of a run; rank ``main`` writes
    ``out/train_config.json`` and owns both. A logger other than jsonl needs ``out``."""
    if out is None and c.log != "jsonl":
        raise ValueError(f"log={c.log!r} needs an out_dir to write into")
    logger: MetricsLogger | None = None
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out, RUN_FILES)  # what a killed run left (only its own temporary names)
        atomic_write_json(out / "train_config.json", dataclasses.asdict(c))
        logger = open_logger(c.log, out, dataclasses.asdict(c))
    bar = None
    if c.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=start, desc=desc, dynamic_ncols=True)
    return logger, bar


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _trim_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of metrics.jsonl with step <= last_step (drops a torn last line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError, IndexError):  # a torn or foreign line
            continue
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def _save_state(path: Path, model, opt, tracker, step, rng, c: TrainConfig, source, strategy: SingleProcess
                ) -> None:
    """Write ``trainer_state.pt`` in the one-process format on the main rank (collective: every rank calls)."""
    full = strategy.full_state(model, opt, tracker)
    if full is None or path is None:
        return
    weights, opt_state, tracker_state = full
    atomic_torch_save({
        "step": step, "model_config": model.config(), "model": weights, "optimizer": opt_state,
        "tracker": tracker_state, "rng": _rng_state(rng), "torch_rng": torch.get_rng_state(),
        "train_config": dataclasses.asdict(c),
        "source": source.state_dict() if hasattr(source, "state_dict") else None,  # a stream's position
    }, path)


def train(data, config: TrainConfig, out_dir: str | Path | None = None, resume: bool = False,
          model: SparseAutoencoder | None = None) -> TrainResult:
    """Train an SAE on ``data`` (anything ``load_activations`` accepts) with ``config``.

    ``resume=True`` continues from ``out_dir/trainer_state.pt`` when it exists. ``model`` may
    supply an already built SAE (its normalisation is recomputed unless ``normalize="none"``).

    ``parallel="data"`` or ``"dictionary"`` (launch with torchrun; joins the existing process group or
    ``softsae.distributed.init_from_env``): ``batch_size`` is the GLOBAL batch and every rank draws the
    same global batch from one shared sampling stream. Data mode splits its rows over the ranks (the
    training forward under DistributedDataParallel), dictionary mode the latents; every batch
    statistic is global, so the run matches the one-process run with the same settings (see
    ``softsae.parallel``). Only rank 0 writes files; checkpoints are full and resume at any world size
    in any mode. Data mode returns the model on every rank, dictionary mode the gathered model on rank
    0 and ``model=None`` elsewhere.
    """
    strategy = strategy_for(config.parallel)
    source, c = strategy.start(data, config)
    device = torch.device(c.device)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on the step's large temporaries (softsae/cpu_memory.py)
    main = strategy.is_main
    out = Path(out_dir) if out_dir is not None else None
    state_path = out / STATE_FILE if out is not None else None
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)

    found = state_path if resume and state_path is not None and state_path.exists() else None
    state = strategy.read_state(c, found)  # distributed: the same settings and checkpoint on every rank
    if state is not None:
        model = model_from_state(state, state_path, c)
    elif model is None:
        model = new_model(c, source.d)
    if model.d != source.d:
        raise ValueError(f"model expects d={model.d} but the activations have d={source.d}")
    model = model.to(device).train()
    if state is None:  # the same global statistics in every mode: every rank sees the same rows
        shift, scale = normalization_stats(source, c.normalize)
        model.set_normalization(shift, scale)
        model.to(device)
        first = source.sample(min(c.batch_size, 8192), rng)
        strategy.check_first(first, source)
        with torch.no_grad():
            model.b_dec.copy_(geometric_median(model.normalize(first.to(device)), c.geometric_median_iters))
        if out is not None and main and (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()
    engine = strategy.place(model, TrainForward(model, c))
    opt = make_optimizer(model.parameters(), c.lr)
    tracker = DeadLatentTracker(model.n_local, c.dead_feature_threshold, device)
    start = 0
    if state is not None:
        strategy.load_state(state, model, opt, tracker)
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if hasattr(source, "load_state_dict") and state.get("source") is not None:
            source.load_state_dict(state["source"])  # a stream resumes where the checkpoint left it
        start = int(state["step"])
        if out is not None and main:
            _trim_metrics(out / METRICS_FILE, start - 1)
        del state

    logger, bar = open_run_outputs(c, out, main, start, f"train {c.arch}")
    checkpointing = c.checkpoint_every > 0 and strategy.any_rank(out is not None)  # collective when sharded
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for step in range(start, c.steps):
            x = strategy.batch(source.sample(c.batch_size, rng), source, step, device, c.log_every)
            terms = train_step(model, opt, tracker, x, step, c, engine)
            if step % c.log_every == 0 or step == c.steps - 1:
                dead = int(model.latents.count(tracker.dead_mask().sum().reshape(1)).item())
                last = {k: float(v) for k, v in terms.items()}
                last.update(step=step, lr=lr_at(step, c), dead=dead, hard=is_hard_phase(step, c),
                            elapsed_s=round(time.perf_counter() - t0, 3))
                if isinstance(model, SoftSAE):
                    last.update(alpha=model.alpha, k_target=k_target_at(step, c, model.d))
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
                _save_state(state_path if main else None, model, opt, tracker, step + 1, rng, c, source, strategy)
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        strategy.close()
    model.hard = False
    if isinstance(model, SoftSAE):
        model.straight_through, model.hard_encoder_grad = False, True
    elif isinstance(model, (TopKSAE, BatchTopKSAE)):
        model.k_train = None
    model.eval()
    model = strategy.finish(model)
    if model is not None and out is not None and main:
        save_sae(model, out, extra={"train_config": dataclasses.asdict(c)})
        if state_path.exists():
            os.unlink(state_path)
    return TrainResult(model=model, config=c, last=last, out_dir=out)
