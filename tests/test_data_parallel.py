"""Data-parallel training (``TrainConfig(parallel="data")``) on 2 gloo CPU processes vs one process.

Two ranks train on the same global batch (``batch_size`` is global) with the same seed; after the
run every parameter and buffer must equal the single-process ``train()`` to float32 tolerance, for
softsae (soft and hard phases, k-loss), topk and batchtopk (global selection and threshold), with
dead latents and aux-k active. Adam is nearly invariant to the gradient scale, so the gradient
convention (SUM of per-rank shares) is checked directly: one ``train_step`` with plain SGD and no
clipping on an uneven split (16 + 15 rows) must give the single-process gradients, both through the
trainer's DistributedDataParallel engine (summing comm hook) and as the ranks' shares summed by hand.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_spawn import grad_model

from softsae.distributed.placement import ShardedRows
from softsae.distributed.process import shard_range, shutdown
from softsae.losses import DeadLatentTracker
from softsae.parallel import DataParallel, _sum_hook
from softsae.trainer import TrainConfig, TrainForward, train, train_step

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SPAWN_LIMIT_S = 240.0
ARCHS = ("softsae", "topk", "batchtopk")
TOL = 2e-5


def _cfg(arch: str, **kw) -> TrainConfig:
    base = dict(arch=arch, dict_size=64, k=4, steps=8, batch_size=32, lr=1e-3, warmup_steps=2, decay_start=6,
                hard_frac=0.25, dead_feature_threshold=64, w_k=1.0, device="cpu", progress=False, log_every=1,
                checkpoint_every=0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _data(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32) * np.linspace(0.5, 2.0, 16, dtype=np.float32)
    path = tmp / "acts.npy"
    np.save(path, x)
    return path


def _grad_batch() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((31, 16)).astype(np.float32))


def _grad_step(arch: str, x: torch.Tensor, mode: str | None = None) -> dict[str, torch.Tensor]:
    """One train_step (SGD, no clipping, k-loss active, everything dead for aux-k); the gradients.
    ``mode``: None one process; "ddp" this rank's rows through the trainer's DDP engine; "shares" this
    rank's rows without DDP, the ranks' gradient shares then summed with one all-reduce each."""
    model, c = grad_model(arch, x, _cfg)
    engine = None
    if mode == "ddp":
        engine = DataParallel().place(model, TrainForward(model, c))
    elif mode == "shares":
        model.latents = ShardedRows(None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tracker = DeadLatentTracker(model.n, 1)
    tracker.tokens_since_fired[::2] = 5  # half the latents dead: aux-k selects among them
    lo, hi = shard_range(x.shape[0], dist.get_rank(), dist.get_world_size()) if mode else (0, x.shape[0])
    terms = train_step(model, opt, tracker, x[lo:hi], 0, c, engine)
    if mode == "shares":
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
    out = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out.update({f"term.{k}": v.detach().clone() for k, v in terms.items()})
    out["tracker"] = tracker.tokens_since_fired.clone()
    return out


def _ddp_sums(rank: int) -> bool:
    """The trainer's DDP comm hook sums the ranks' gradients (DDP's own default averages them)."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.ReLU(), torch.nn.Linear(512, 16))
    x = torch.randn(8, 16) * (rank + 1)
    want = list(torch.autograd.grad(lin(x).pow(2).sum(), list(lin.parameters())))
    for g in want:
        dist.all_reduce(g)  # the sum the hook must produce
    ddp = torch.nn.parallel.DistributedDataParallel(lin)
    ddp.register_comm_hook(None, _sum_hook)
    ddp(x).pow(2).sum().backward()
    return all(torch.allclose(p.grad, g, rtol=1e-5, atol=1e-6) for p, g in zip(lin.parameters(), want, strict=True))


def _rank_main(rank: int, world: int, store: str, data: str, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for arch in ARCHS:
            out_dir = Path(tmp) / f"run_{arch}"
            res = train(data, _cfg(arch, parallel="data"), out_dir=out_dir)
            results[arch] = {"state": res.model.state_dict(), "last": res.last}
            results[f"grad_{arch}"] = _grad_step(arch, _grad_batch(), "ddp")
            results[f"grad_shares_{arch}"] = _grad_step(arch, _grad_batch(), "shares")
        results["ddp_sums"] = _ddp_sums(rank)
        try:
            train(data, _cfg("topk", parallel="data", batch_size=1))
        except ValueError as e:
            results["small_batch_error"] = str(e)
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        shutdown()


def _spawn(world: int, data: Path, tmp: Path) -> None:
    ctx = mp.start_processes(_rank_main, args=(world, str(tmp / "store"), str(data), str(tmp)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_LIMIT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"data-parallel ranks did not finish within {SPAWN_LIMIT_S} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    data = _data(tmp)
    _spawn(2, data, tmp)
    return tmp, data, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= TOL * max(1.0, float(want.abs().max()) if want.numel() else 1.0), f"{what}: max err {err:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_match_one_process(two_ranks, arch, tmp_path):
    tmp, data, ranks = two_ranks
    torch.set_num_threads(1)
    ref = train(str(data), _cfg(arch), out_dir=tmp_path / "ref")
    want = ref.model.state_dict()
    for r, res in enumerate(ranks):
        got = res[arch]["state"]
        assert set(got) == set(want)
        for name in want:
            _assert_close(got[name], want[name], f"{arch} rank {r} {name}")
        for key in ("loss", "recon", "l0", "fvu", "dead", "auxk") + (("mean_k", "k_loss") if arch == "softsae"
                                                                      else ()):
            if key in ref.last:
                assert res[arch]["last"][key] == pytest.approx(ref.last[key], rel=1e-4, abs=1e-6), (arch, r, key)
    if arch == "softsae":
        assert ref.last["hard"]  # the run reached the hard phase
    if arch == "batchtopk":
        assert float(want["threshold"]) > 0
    assert ref.last["dead"] > 0 or arch == "softsae" or ref.last.get("auxk", 0) != 0
    written = tmp / f"run_{arch}"  # rank 0 wrote the run: the same metrics lines as the one-process run
    assert (written / "model.safetensors").exists()
    lines = (written / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == (tmp_path / "ref" / "metrics.jsonl").read_text().count("\n") == 8


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_are_the_global_gradients(two_ranks, arch):
    _, _, ranks = two_ranks
    want = _grad_step(arch, _grad_batch())
    assert any(k.startswith("grad.") for k in want)
    if arch == "softsae":
        assert float(want["term.k_loss"]) > 0 and float(want["grad.k_estimator.2.weight"].abs().max()) > 0
    assert float(want["term.auxk"]) > 0
    for r, res in enumerate(ranks):
        got = res[f"grad_{arch}"]
        assert set(got) == set(want), (arch, r)
        for name in want:
            _assert_close(got[name], want[name], f"{arch} rank {r} {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_shares_sum_to_the_global_gradients(two_ranks, arch):
    _, _, ranks = two_ranks
    want = _grad_step(arch, _grad_batch())
    for r, res in enumerate(ranks):
        got = res[f"grad_shares_{arch}"]
        assert set(got) == set(want), (arch, r)
        for name in want:
            _assert_close(got[name], want[name], f"{arch} summed shares rank {r} {name}")


def test_ddp_comm_hook_sums_gradients(two_ranks):
    assert all(res["ddp_sums"] for res in two_ranks[2])


def test_batch_smaller_than_world_is_refused(two_ranks):
    for res in two_ranks[2]:
        assert "batch_size (1)" in res["small_batch_error"]


def test_parallel_setting_is_checked():
    with pytest.raises(ValueError, match="parallel"):
        _cfg("topk", parallel="model").resolved(16)
