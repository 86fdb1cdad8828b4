"""The global soft top-k threshold of a latent-sharded row (``softsae.distributed.sharded_ops``) on 2 and 3
gloo ranks: the one-gather solve (``_global_threshold``) against the bracket search it falls back to
(``_search_threshold``) and the one-process float64 oracle, on uneven and empty shards, k near 0 and n,
alpha from 1e-30 (every weight near t underflows) to 100 (every entry matters), ties across shards and
at the cut, non-finite rows; the fallback forced on some rows of a batch; the same t on every rank.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from dist_spawn import join, spawn

from softsae.distributed import sharded_ops as so
from softsae.distributed._comm import all_gather_stack
from softsae.distributed.process import shard_sizes, shutdown
from softsae.ops.soft_topk_ref import _solve_threshold

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ALPHAS = (1e-30, 1e-4, 3e-3, 0.1, 1.0, 100.0)


def _cases(world: int):
    """(name, y (R, n), k (R,), sizes per rank): the same on every rank."""
    g = torch.Generator().manual_seed(world)
    n = 37
    k = torch.tensor([1e-6, 0.5, 3.0, 17.3, 36.0, n - 1e-6], dtype=torch.float64)
    yield "randn n=37", torch.randn(6, n, generator=g, dtype=torch.float64), k, shard_sizes(n, world)
    # Long shards and small k: every shard leaves entries out of its candidates (m = 2 floor(max k) + 16 = 56).
    n, k = 300, torch.tensor([1.0, 2.5, 7.0, 20.0], dtype=torch.float64)
    yield "long", torch.randn(4, n, generator=g, dtype=torch.float64) * 2, k, shard_sizes(n, world)
    ties = (torch.randn(4, n, generator=g, dtype=torch.float64) * 2).relu().mul(2).round().div(2)
    yield "relu ties", ties, k, shard_sizes(n, world)  # exact zeros, ties across shards and at the cut
    gaps = (torch.arange(n, dtype=torch.float64) * 3.0).repeat(4, 1)  # t in a gap of 3: weights underflow
    yield "gaps", gaps, torch.tensor([3.0, 1.0, 150.0, 299.0], dtype=torch.float64), shard_sizes(n, world)
    # Uneven and empty shards: one rank leaves entries out, another holds few, one (3 ranks) none.
    sizes = [250, 50] if world == 2 else [0, 260, 40]
    yield "uneven", torch.randn(4, n, generator=g, dtype=torch.float64), k, sizes
    yield "empty shard", torch.randn(4, n, generator=g, dtype=torch.float64), k, [n] + [0] * (world - 1)
    bad = torch.randn(4, n, generator=g, dtype=torch.float64)
    bad[1, -1], bad[2, 0] = math.nan, math.inf  # the last rank's NaN, rank 0's inf
    yield "non-finite", bad, k, shard_sizes(n, world)


def _shard(y: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    lo = sum(sizes[:rank])
    return y[:, lo:lo + sizes[rank]].contiguous()


def _check(t: torch.Tensor, want: torch.Tensor, y: torch.Tensor, s: float, what: str) -> None:
    finite = torch.isfinite(y).all(dim=-1)
    assert torch.isnan(t[~finite]).all() and torch.isfinite(t[finite]).all(), f"{what}: NaN rows {t}"
    scale = y[finite].abs().amax(dim=-1) + s + want[finite].abs()
    err = ((t[finite] - want[finite]).abs() / scale).max().item()
    assert err <= 1e-12, f"{what}: error {err:.2e} (relative to max |y| + s + |t|)"


def _same_everywhere(t: torch.Tensor, what: str) -> None:
    tab = all_gather_stack(t)
    for r in range(1, tab.shape[0]):
        assert torch.isclose(tab[r], tab[0], rtol=0, atol=0, equal_nan=True).all(), f"{what}: ranks differ"


def _worker(rank: int, world: int, store: str) -> None:
    join(rank, world, store)
    search, root = so._search_threshold, so._root
    fallback_rows: list[int] = []
    collectives = {"gather": 0, "reduce": 0}
    orig_gather, orig_reduce = so.all_gather_stack, so.all_reduce_

    def counting_search(y, k, s, n, group):
        fallback_rows.append(y.shape[0])
        return search(y, k, s, n, group)

    def counting_gather(t, group=None):
        collectives["gather"] += 1
        return orig_gather(t, group)

    def counting_reduce(t, op=dist.ReduceOp.SUM, group=None):
        collectives["reduce"] += 1
        return orig_reduce(t, op, group)

    so._search_threshold, so.all_gather_stack, so.all_reduce_ = counting_search, counting_gather, counting_reduce
    try:
        for name, y, k, sizes in _cases(world):
            n, ys = y.shape[1], _shard(y, sizes, rank)
            finite = torch.isfinite(y).all(dim=-1)
            for alpha in ALPHAS:
                what = f"{name} alpha={alpha} rank={rank}"
                s = torch.tensor(alpha, dtype=torch.float64)
                ref = torch.full_like(k, math.nan)
                ref[finite] = _solve_threshold(y[finite], k[finite], s)
                collectives.update(gather=0, reduce=0)
                t = so._global_threshold(ys, k, s, n, None)
                assert not fallback_rows, f"{what}: the fast path fell back on {fallback_rows} rows"
                assert collectives == {"gather": 1, "reduce": 0}, f"{what}: collectives {collectives}"
                _check(t, ref, y, alpha, f"{what}: one-gather solve vs the one-process oracle")
                _same_everywhere(t, what)
                old = torch.full_like(k, math.nan)
                old[finite] = search(ys[finite], k[finite], s, n, None)  # the search takes rows finite everywhere
                _check(t, old, y, alpha, f"{what}: one-gather solve vs the bracket search")
                # Rounding defeats the fast path on some rows (forced here): only those take the search.
                force = torch.arange(k.shape[0]) % 2 == (alpha < 1e-3)
                calls = [0]

                def flaky(c, la, lb, force=force, calls=calls):
                    calls[0] += 1
                    out = root(c, la, lb)
                    return torch.where(force, math.nan, out) if calls[0] == 1 else out

                so._root = flaky
                try:
                    mixed = so._global_threshold(ys, k, s, n, None)
                finally:
                    so._root = root
                assert fallback_rows == [int((force & finite).sum())], f"{what}: fallback rows {fallback_rows}"
                fallback_rows.clear()
                want = torch.where(force, old, t)
                assert torch.isclose(mixed, want, rtol=0, atol=0, equal_nan=True).all(), \
                    f"{what}: the forced rows must be the search's, the others unchanged"
                _same_everywhere(mixed, f"{what} (mixed)")
    finally:
        so._search_threshold, so.all_gather_stack, so.all_reduce_ = search, orig_gather, orig_reduce
        shutdown()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_threshold_fast_path_and_fallback(world, tmp_path):
    failures = spawn(_worker, world, tmp_path)
    assert not failures, failures
