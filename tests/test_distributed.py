"""softsae.distributed on real gloo process groups (2 and 3 CPU processes spawned from pytest).

Every rank builds the same full tensors from one seed, takes its shard (uneven splits: n = 10 over
3 ranks) and compares the sharded result, values and gradients, with the unsharded computation
on the full tensors (the float64 reference backend). Process groups use a FileStore in the test's
tmp dir and the loopback interface only; every collective has a 30 s timeout and every spawn a
wall-clock limit, after which the processes are killed and the test fails.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import softsae
from softsae import distributed as sd
from softsae.distributed.placement import ShardedRows

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TOL = 1e-9  # float64, absolute after scaling by max(1, |reference|)
SPAWN_LIMIT_S = 120.0


# ----------------------------------------------------------------------------- spawning


def _entry(rank: int, world: int, fn_name: str, store_path: str, port: int | None) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if port is None:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    else:  # the torchrun path: environment variables, TCPStore on 127.0.0.1
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), SOFTSAE_DIST_TIMEOUT="30")
        ctx = sd.init_from_env(device="cpu")
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (rank, world, "gloo", rank == 0), ctx
    try:
        globals()[fn_name](rank, world)
    finally:
        sd.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn_name: str, world: int, tmp_path, env_init: bool = False) -> None:
    """Run ``fn_name(rank, world)`` on ``world`` gloo ranks; a failure on any rank fails the test.

    ``env_init``: join through ``softsae.distributed.init_from_env`` (torchrun variables, TCPStore on
    127.0.0.1) instead of a FileStore."""
    port = _free_port() if env_init else None
    ctx = mp.start_processes(_entry, args=(world, fn_name, str(tmp_path / f"store_{fn_name}_{world}"), port),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_LIMIT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn_name} on {world} ranks did not finish within {SPAWN_LIMIT_S} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = TOL) -> None:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = ((got - want).abs() / want.abs().clamp_min(1.0)).max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.0e}"


def _full_data(R: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (R, n) with a tied pair and a wide-gap row, real k in (0.5, n - 0.5), weights w (R, n)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, n, generator=g, dtype=torch.float64)
    x[0, 1] = x[0, n - 1]  # a tie across shards
    x[1] = torch.arange(n, dtype=torch.float64) * 3.0  # gaps of 3: every weight near t underflows at alpha 1e-4
    k = torch.rand(R, generator=g, dtype=torch.float64) * (n - 1) + 0.5
    w = torch.randn(R, n, generator=g, dtype=torch.float64)
    return x, k, w


# ----------------------------------------------------------------------------- workers (run on every rank)


def _soft_topk_worker(rank: int, world: int) -> None:
    for n in (10, 11):
        lo, hi = sd.shard_range(n, rank, world)
        x, k_real, w = _full_data(6, n, seed=n)
        for gate in (False, True):
            for k_kind in ("int", "real"):
                for alpha in (1e-4, 1.0, -0.3):
                    k_full = torch.full_like(k_real, 3.0) if k_kind == "int" else k_real
                    largest = alpha != -0.3
                    case = f"n={n} gate={gate} k={k_kind} alpha={alpha} largest={largest}"
                    # unsharded reference
                    xf = x.clone().requires_grad_()
                    kf = k_full.clone().requires_grad_()
                    af = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
                    op = softsae.soft_topk_gate if gate else softsae.soft_topk
                    pf = op(xf, kf, af, largest=largest, backend="reference")
                    (w * pf).sum().backward()
                    # sharded
                    xs = x[:, lo:hi].clone().requires_grad_()
                    ks = k_full.clone().requires_grad_()
                    a_s = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
                    ps = sd.sharded_soft_topk(xs, ks, a_s, largest=largest, gate=gate)
                    sd.reduce_from_shards((w[:, lo:hi] * ps).sum()).backward()
                    _close(ps, pf[:, lo:hi], f"p {case}")
                    if not gate:
                        _close(sd.reduce_from_shards(ps.detach().sum(-1)), k_full, f"sum p {case}")
                    _close(xs.grad, xf.grad[:, lo:hi], f"dx {case}")
                    _close(ks.grad, kf.grad, f"dk {case}")
                    _close(a_s.grad, af.grad, f"dalpha {case}")
    # Long shards, small k: each shard sends only its 2 max(k) + 16 largest entries, its largest
    # left-out entry and the log-sum-exp of the others (exact at every alpha, docs/math.md 1.7).
    n = 100
    lo, hi = sd.shard_range(n, rank, world)
    x, _, w = _full_data(4, n, seed=5)
    k_small = torch.tensor([1.0, 2.5, 3.0, 4.75], dtype=torch.float64)
    for alpha in (1e-4, 1e-2, 1.0):
        xf, kf = x.clone().requires_grad_(), k_small.clone().requires_grad_()
        pf = softsae.soft_topk(xf, kf, alpha, backend="reference")
        (w * pf).sum().backward()
        xs, ks = x[:, lo:hi].clone().requires_grad_(), k_small.clone().requires_grad_()
        ps = sd.sharded_soft_topk(xs, ks, alpha)
        sd.reduce_from_shards((w[:, lo:hi] * ps).sum()).backward()
        _close(ps, pf[:, lo:hi], f"p n=100 alpha={alpha}")
        _close(xs.grad, xf.grad[:, lo:hi], f"dx n=100 alpha={alpha}")
        _close(ks.grad, kf.grad, f"dk n=100 alpha={alpha}")
    # float32 input, scalar k, and a row with NaN on one rank: NaN on every rank for that row only.
    x, _, _ = _full_data(4, 10, seed=1)
    lo, hi = sd.shard_range(10, rank, world)
    xs = x[:, lo:hi].float()
    if rank == world - 1:
        xs[2, 0] = float("nan")
    p = sd.sharded_soft_topk(xs, 4, 0.05)
    x[2, lo] = float("nan")
    ref = softsae.soft_topk(x.float(), 4, 0.05, backend="reference")
    assert p.dtype == torch.float32
    assert torch.isnan(p[2]).all(), "a NaN row on one rank must be NaN on every rank"
    keep = torch.tensor([0, 1, 3])
    assert (p[keep] - ref[keep, lo:hi]).abs().max() < 1e-6


def _k_direction_worker(rank: int, world: int) -> None:
    """sharded_gate_k_direction equals sum_i (dz_i/dk) W_dec[i] of the unsharded gate (autograd's dk
    for each column of W_dec as the upstream gradient), for post-ReLU rows (exact zeros) and alphas
    from 1e-4 (a few kept latents) to 1 (all of them); a shard may be empty (n = 2 on 3 ranks)."""
    for n, alpha in ((40, 1e-4), (40, 0.05), (41, 1.0), (2, 0.3)):
        lo, hi = sd.shard_range(n, rank, world)
        x, k, _ = _full_data(5, n, seed=n)
        x = x.relu()
        W = torch.randn(n, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        kf = k.clamp(0.5, n - 0.5).clone().requires_grad_()
        z = softsae.soft_topk_gate(x, kf, alpha, backend="reference")
        want = torch.stack([torch.autograd.grad((z * W[:, j]).sum(), kf, retain_graph=True)[0]
                            for j in range(W.shape[1])], dim=1)  # (R, d): dk of sum_i z_i W[i, j]
        got = sd.sharded_gate_k_direction(x[:, lo:hi], kf.detach(), alpha, W[lo:hi])
        _close(got, want, f"k direction n={n} alpha={alpha}")


def _hard_topk_worker(rank: int, world: int) -> None:
    n, B = 10, 7
    lo, hi = sd.shard_range(n, rank, world)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B, n, generator=g, dtype=torch.float64).relu()  # many exact ties at 0 across shards
    z[0, 2] = z[0, 8] = z[0, 5] = 2.5  # ties at the top across shards
    k = torch.tensor([3, 0, 1, 10, 5, 2, 7])
    vf, if_ = softsae.topk_per_row(z, k)
    zs = z[:, lo:hi].clone().requires_grad_()
    vals, idx = sd.sharded_topk_per_row(zs, k, global_index=True)
    vals = vals.detach()
    # This rank's part of the unsharded selection, in the same order.
    for b in range(B):
        sel = [(float(v), int(i)) for v, i in zip(vf[b], if_[b], strict=True) if lo <= i < hi]
        got = [(float(v), int(i)) for v, i in zip(vals[b], idx[b], strict=True) if i >= 0]
        assert got == sel, f"row {b}: rank {rank} kept {got}, unsharded {sel}"
    vl, il = sd.sharded_topk_per_row(zs, k)
    assert torch.equal(il, torch.where(idx >= 0, idx - lo, -1)), "local indices = global - offset"
    # gradients flow to the local pre-activations: d(sum vals * c)/dz = c at the kept entries
    (vl * 2.0).sum().backward()
    want = torch.zeros(B, n, dtype=torch.float64)
    want.scatter_add_(1, if_.clamp(min=0), (if_ >= 0).double() * 2.0)
    _close(zs.grad, want[:, lo:hi], "topk grad")
    # BatchTopK, latents split: the k*B largest of the (B, n) matrix, ties to the lower flat index.
    for kb, positive in ((2, False), (2, True), (9, True)):
        vals, idx, thr = sd.sharded_batch_topk(zs, kb, positive_only=positive, global_index=True)
        vals = vals.detach()
        flat = z.reshape(-1)
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:kb * B]
        if positive:
            order = [i for i in order if flat[i] > 0]
        want_set = {(i // n, i % n) for i in order if lo <= i % n < hi}
        got_set = {(b, int(i)) for b in range(B) for i in idx[b] if i >= 0}
        assert got_set == want_set, f"batch top-k k={kb} positive={positive}: rank {rank}"
        want_thr = min(float(flat[i]) for i in order)
        assert float(thr) == want_thr, f"threshold {float(thr)} vs {want_thr}"
        for b in range(B):  # order within a row: values descending, ties by index
            row = [(float(v), int(i)) for v, i in zip(vals[b], idx[b], strict=True) if i >= 0]
            assert row == sorted(row, key=lambda t: (-t[0], t[1]))
    # BatchTopK, rows split (data parallel): each rank holds some rows of the full dictionary.
    r_lo, r_hi = sd.shard_range(B, rank, world)
    vals, idx, thr = sd.sharded_batch_topk(z[r_lo:r_hi], 2, split="rows")
    flat = z.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:2 * B]
    want_set = {(i // n - r_lo, i % n) for i in order if r_lo <= i // n < r_hi}
    got_set = {(b, int(i)) for b in range(r_hi - r_lo) for i in idx[b] if i >= 0}
    assert got_set == want_set, f"rows-split batch top-k: rank {rank}"
    assert float(thr) == min(float(flat[i]) for i in order)


def _decode_worker(rank: int, world: int) -> None:
    """SoftSAE-like chain: sharded encoder + k-head -> sharded gate -> hard top-k codes -> sharded decode."""
    n, d, B = 10, 4, 5
    lo, hi = sd.shard_range(n, rank, world)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W_enc = torch.randn(n, d, generator=g, dtype=torch.float64)
    W_h = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3
    w_out = torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    W_dec = torch.randn(n, d, generator=g, dtype=torch.float64)
    b_dec = torch.randn(d, generator=g, dtype=torch.float64) * 0.1

    def loss_of(x_in, b, enc, h, wo, dec, kh_reduce, gate_fn, decode_fn, shard_in):
        xc = shard_in(x_in - b)
        pre = torch.relu(xc @ enc.T)
        k_hat = 1.0 + 4.0 * torch.sigmoid(kh_reduce(torch.relu(xc @ h.T) @ wo))
        zz = gate_fn(pre, k_hat, 0.1)
        x_hat = decode_fn(zz, dec, b)
        return ((x_in - x_hat) ** 2).sum() + k_hat.sum()

    def dense_decode(zz, dec, b):
        nz = zz != 0
        idx = torch.where(nz, torch.arange(zz.shape[1]), -1)
        return softsae.sparse_decode(torch.where(nz, zz, 0), idx, dec, b, backend="reference")

    full = [t.clone().requires_grad_() for t in (b_dec, W_enc, W_h, w_out, W_dec)]
    lf = loss_of(x, *full, lambda t: t, lambda p, k, a: softsae.soft_topk_gate(p, k, a, backend="reference"),
                 dense_decode, lambda t: t)
    lf.backward()
    shard = [b_dec.clone().requires_grad_()] + [t[lo:hi].clone().requires_grad_() for t in (W_enc, W_h, w_out, W_dec)]

    def sharded_decode_fn(zz, dec, b):
        nz = zz != 0
        idx = torch.where(nz, torch.arange(zz.shape[1]), -1)
        return sd.sharded_decode(torch.where(nz, zz, 0), idx, dec, b, backend="reference")

    ls = loss_of(x, *shard, sd.reduce_from_shards, sd.sharded_soft_topk_gate, sharded_decode_fn, sd.copy_to_shards)
    _close(ls, lf, "loss")
    ls.backward()
    _close(shard[0].grad, full[0].grad, "db_dec (replicated, full on every rank)")
    for name, a, b in zip(("W_enc", "W_h", "w_out", "W_dec"), shard[1:], full[1:], strict=True):
        _close(a.grad, b.grad[lo:hi], f"d{name}")
    # Hard codes from the sharded top-k decode to the same reconstruction.
    pre = torch.relu(x @ W_enc.T)
    vf, if_ = softsae.topk_per_row(pre, 3)
    xf = softsae.sparse_decode(vf, if_, W_dec, b_dec, backend="reference")
    vals, idx = sd.sharded_topk_per_row(pre[:, lo:hi], 3)
    _close(sd.sharded_decode(vals, idx, W_dec[lo:hi], b_dec, backend="reference"), xf, "hard decode")


def _stats_worker(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(13, 6, generator=g, dtype=torch.float64) * 3 + 1
    lo, hi = sd.shard_range(13, rank, world)  # uneven rows per rank
    xr = x[lo:hi]
    # k-loss through the data-mode global mean (ShardedRows.mean_rows): the ranks' gradients SUMMED (the
    # trainer's DDP comm hook) equal the single-process gradient; no collective in the backward
    theta = torch.randn(6, generator=g, dtype=torch.float64)
    tf = theta.clone().requires_grad_()
    torch.nn.functional.softplus(torch.sigmoid(x @ tf).mean() - 0.3, beta=5).backward()
    tr = theta.clone().requires_grad_()
    mean_k = ShardedRows(None).mean_rows(torch.sigmoid(xr @ tr))
    _close(mean_k, torch.sigmoid(x @ theta).mean(), "global mean")
    torch.nn.functional.softplus(mean_k - 0.3, beta=5).backward()
    grad = tr.grad.clone()
    dist.all_reduce(grad)
    _close(grad, tf.grad, "k-loss gradient summed over the ranks")
    # dead-latent merge
    fired = torch.zeros(5, dtype=torch.bool)
    fired[rank] = True
    any_fired, tokens = sd.merge_fired(fired, 10 + rank)
    assert any_fired.tolist() == [i < world for i in range(5)]
    assert tokens == sum(10 + r for r in range(world))
    sd.check_batch(xr, 6)  # good data passes everywhere


def _bad_data_worker(rank: int, world: int) -> None:
    """Rank 1 sees NaN, the last rank a wrong width: every rank raises the same error, fast."""
    x = torch.randn(4, 6)
    if rank == 1:
        x[2, 3] = float("nan")
    if rank == world - 1 and world > 2:
        x = torch.randn(4, 5)
    t0 = time.monotonic()
    try:
        sd.check_batch(x, 6)
    except sd.DistributedInputError as e:
        msg = str(e)
    else:
        raise AssertionError("check_batch did not raise")
    assert "rank 1 has 1 NaN/inf values (first in row 2)" in msg, msg
    if world > 2:
        assert f"rank {world - 1} has 5 columns, expected 6" in msg, msg
    # Every rank holds the identical message.
    msgs = [None] * world
    dist.all_gather_object(msgs, msg)
    assert len(set(msgs)) == 1, msgs
    # The sharded ops refuse inconsistent or NaN inputs on every rank too.
    try:
        sd.sharded_soft_topk(torch.randn(4, 3), torch.full((4,), 2.0 + rank), 0.1)
    except sd.DistributedInputError as e:
        assert "k differs between rank 1 and rank 0" in str(e), str(e)
    else:
        raise AssertionError("different k per rank was accepted")
    z = torch.randn(3 + (rank == 0), 4)
    try:
        sd.sharded_topk_per_row(z, 2)
    except sd.DistributedInputError as e:
        assert "rows, rank 0 has 4" in str(e), str(e)
    else:
        raise AssertionError("different row counts were accepted")
    assert time.monotonic() - t0 < 20, "errors must come well before the collective timeout"


def _timeout_worker(rank: int, world: int) -> None:
    """The backstop: a rank that stops calling collectives makes the others fail after the timeout."""
    group = dist.new_group(timeout=timedelta(seconds=2))
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
        except RuntimeError as e:  # torch.distributed.DistBackendError
            assert time.monotonic() - t0 < 15, f"timed out only after {time.monotonic() - t0:.1f} s"
            assert "timeout" in str(e).lower() or "timed out" in str(e).lower(), str(e)
        else:
            raise AssertionError("a collective with a missing rank returned")
    else:
        time.sleep(5)  # never joins the collective
    dist.barrier()


# ----------------------------------------------------------------------------- tests
# One spawn per world size runs every worker in turn (a spawn costs seconds of imports per rank).

_COMMON = ["_soft_topk_worker", "_k_direction_worker", "_hard_topk_worker", "_decode_worker", "_stats_worker"]
WORKERS = {2: _COMMON + ["_timeout_worker"], 3: _COMMON + ["_bad_data_worker"]}


def _all_workers(rank: int, world: int) -> None:
    for name in WORKERS[world]:
        globals()[name](rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_ops_and_statistics(world, tmp_path):
    """Sharded soft top-k / gate (values, dx, dk, dalpha), hard and batch top-k, an SAE chain's
    gradients through the sharded decode, global statistics, the collective timeout (2 ranks) and
    bad data on some ranks (3 ranks)."""
    _spawn("_all_workers", world, tmp_path, env_init=world == 2)


def test_shard_sizes():
    assert sd.shard_sizes(10, 3) == [4, 3, 3]
    assert sd.shard_range(10, 2, 3) == (7, 10)
    assert sd.shard_sizes(2, 3) == [1, 1, 0]
    with pytest.raises(ValueError, match="world_size"):
        sd.shard_sizes(4, 0)
    with pytest.raises(ValueError, match="rank"):
        sd.shard_range(4, 3, 3)


def test_not_initialised_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not initialised"):
        sd.sharded_soft_topk(torch.randn(2, 3), 1, 0.1)


def test_init_from_env_requires_torchrun_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        sd.init_from_env()
