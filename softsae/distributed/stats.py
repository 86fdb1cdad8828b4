"""Global batch statistics for data-parallel training on torch.distributed.

Each rank holds different rows (tokens) of the batch; every statistic here is over ALL ranks'
rows and comes back identical on every rank:

    shift, scale = normalization_stats(x_r)           # scale = sqrt(E ||x - shift||^2) over all rows
    b_dec0 = geometric_median(x_r)                    # Weiszfeld with all-reduced sums
    mean_k = global_mean(k_hat_r)                     # differentiable (see the gradient convention)
    fired, tokens = merge_fired(fired_r, n_tokens_r)  # dead-latent counters
    check_batch(x_r, d)                               # bad data on any rank -> the same error on every rank

Gradient convention of :func:`global_mean` (DDP's): the gradient of each parameter is averaged
over the data-parallel ranks after backward. ``global_mean``'s backward all-reduces (sums) the
upstream gradients, so rank r's local gradient is W times the exact partial derivative of the
global mean w.r.t. its rows, and the DDP average over the W ranks gives exactly the gradient of
the global loss.

BatchTopK's global selection and threshold for data-parallel rows is
``softsae.distributed.sharded_batch_topk(z_r, k, split="rows")``. Aux-k's selection needs no
collective once the dead mask is global: each row picks from the same (merged) dead set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from softsae.distributed._comm import all_gather_stack, all_reduce_, comm_device, raise_everywhere
from softsae.distributed.process import group_rank_world

__all__ = ["check_batch", "geometric_median", "global_mean", "merge_fired", "normalization_stats"]


def _check_rows(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D float tensor (rows, d), got {shape}")


def normalization_stats(x: Tensor, mode: str = "scale", group: dist.ProcessGroup | None = None
                        ) -> tuple[Tensor | None, float]:
    """(shift (d,) float32 or None, scale) for ``x_n = (x - shift) / scale`` over all ranks' rows.

    Modes as ``softsae.data.normalization_stats``: ``"none"``, ``"scale"`` (E ||x_n||^2 = 1 over the
    global rows), ``"center_scale"`` (shift = global mean first). x: (B_r, d), B_r may differ
    per rank. Sums in float64; one all-reduce of (d + 2,) (plus one of (2,) for center_scale).
    """
    if mode not in ("none", "scale", "center_scale"):
        raise ValueError(f"mode must be 'none', 'scale' or 'center_scale', got {mode!r}")
    _check_rows(x)
    group_rank_world(group)
    if mode == "none":
        return None, 1.0
    xd = x.detach().to(torch.float64)
    d = xd.shape[1]
    buf = torch.zeros(d + 2, dtype=torch.float64, device=x.device)
    buf[:d] = xd.sum(0)
    buf[d] = xd.pow(2).sum()
    buf[d + 1] = xd.shape[0]
    all_reduce_(buf, group=group)
    rows = buf[d + 1]
    if rows == 0:
        raise ValueError("normalization_stats: no rows on any rank")
    shift = None
    if mode == "center_scale":
        shift = buf[:d] / rows
        sq = torch.stack([(xd - shift).pow(2).sum(), xd.new_zeros(())])
        ssq = all_reduce_(sq, group=group)[0]
    else:
        ssq = buf[d]
    scale = float((ssq / rows).sqrt())
    if not scale > 0:
        raise ValueError("normalization_stats: activations are all zero on every rank; cannot normalise")
    return (shift.float() if shift is not None else None), scale


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 10, eps: float = 1e-8,
                     group: dist.ProcessGroup | None = None) -> Tensor:
    """Geometric median of all ranks' rows by Weiszfeld's iteration, from the global mean.

    x (B_r, d) -> (d,) in x.dtype, identical on every rank. Each step is one all-reduce of (d + 1,)
    float64: sum_i w_i x_i and sum_i w_i with w_i = 1 / max(||x_i - y||, eps). Equals
    ``softsae.trainer.geometric_median`` on the concatenated rows up to summation order.
    """
    _check_rows(x)
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    group_rank_world(group)
    xd = x.to(torch.float64)
    d = xd.shape[1]
    buf = torch.cat([xd.sum(0), xd.new_tensor([xd.shape[0]])])
    all_reduce_(buf, group=group)
    if buf[d] == 0:
        raise ValueError("geometric_median: no rows on any rank")
    y = buf[:d] / buf[d]
    for _ in range(iters):
        w = 1.0 / (xd - y).norm(dim=1).clamp_min(eps)
        buf = torch.cat([(w[:, None] * xd).sum(0), w.sum().reshape(1)])
        all_reduce_(buf, group=group)
        y = buf[:d] / buf[d]
    return y.to(x.dtype)


class _GlobalMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        buf = torch.stack([x.detach().to(torch.float64).sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                             device=x.device)])
        all_reduce_(buf, group=group)
        ctx.group, ctx.count, ctx.shape = group, buf[1], x.shape
        return (buf[0] / buf[1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = all_reduce_(grad.detach().to(torch.float64).reshape(1).clone(), group=ctx.group)
        return (g / ctx.count).to(grad.dtype).expand(ctx.shape), None


def global_mean(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean of ``x``'s elements over all ranks (0-d, identical everywhere), differentiable.

    Backward all-reduces the upstream gradient (DDP convention, see the module doc): after DDP's
    average over ranks, parameters get the exact gradient of a loss of the global mean, e.g. the
    k-loss ``softplus(mean(k_hat) - K)``. Ranks may hold different numbers of elements.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    group_rank_world(group)
    return _GlobalMean.apply(x, group)


def merge_fired(fired: Tensor, n_tokens: int, group: dist.ProcessGroup | None = None) -> tuple[Tensor, int]:
    """Merge dead-latent bookkeeping of data-parallel ranks (full dictionary on every rank).

    fired: (n,) bool, latents non-zero for some of this rank's ``n_tokens`` rows. Returns
    (fired on ANY rank (n,) bool, total tokens over all ranks): feed them to
    ``DeadLatentTracker.update`` on every rank and the trackers stay identical. One all-reduce of
    (n + 1,). With a dictionary-sharded model each rank tracks its own latents: only the token
    count (identical rows) is needed, no merge.
    """
    if not isinstance(fired, Tensor) or fired.dim() != 1 or fired.dtype != torch.bool:
        raise ValueError(f"fired must be a 1-D bool tensor, got {fired!r:.60}")
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    group_rank_world(group)
    buf = torch.cat([fired.to(torch.float64), fired.new_tensor([n_tokens], dtype=torch.float64)])
    table = all_gather_stack(torch.tensor(float(fired.numel()), dtype=torch.float64, device=fired.device), group)
    raise_everywhere([f"rank {r} tracks {int(v)} latents, rank 0 {int(table[0])}"
                      for r, v in enumerate(table.tolist()) if v != table[0]], "merge_fired")
    all_reduce_(buf, group=group)
    return buf[:-1] > 0, int(buf[-1])


def check_batch(x, d: int | None = None, group: dist.ProcessGroup | None = None, what: str = "batch") -> None:
    """Collective sanity check of every rank's batch; raises the same error on every rank.

    A rank whose ``x`` is not a 2-D float tensor, has ``x.shape[1] != d`` (when ``d`` is given, else
    differs from rank 0's width), or holds NaN/inf makes EVERY rank raise
    :class:`~softsae.distributed.DistributedInputError` naming the rank(s), the problem and the
    first bad row, instead of one rank failing while the others hang in the next collective.
    Cost: one all-gather of (W, 5) float64 (and an isfinite pass over x).
    """
    group_rank_world(group)
    dev = x.device if isinstance(x, Tensor) and dist.get_backend(group) != "nccl" else comm_device(group)
    # [kind (0 ok, 1 not 2-D float), rows, cols, non-finite count, first bad row]
    meta = torch.tensor([0.0, -1.0, -1.0, 0.0, -1.0], dtype=torch.float64)
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        meta[0] = 1
        if isinstance(x, Tensor):
            meta[1] = x.shape[0] if x.dim() else -1
            meta[2] = x.shape[-1] if x.dim() else -1
    else:
        meta[1], meta[2] = x.shape
        bad_rows = (~torch.isfinite(x.detach())).any(dim=1) if x.numel() else torch.zeros(0, dtype=torch.bool)
        meta[3] = float((~torch.isfinite(x.detach())).sum()) if x.numel() else 0.0
        if meta[3] > 0:
            meta[4] = float(bad_rows.nonzero()[0, 0])
    table = all_gather_stack(meta.to(dev), group).cpu()
    want = d if d is not None else None
    if want is None:
        ok_cols = [int(r[2]) for r in table if r[0] == 0]
        want = ok_cols[0] if ok_cols else None
    msgs = []
    for r, (kind, rows, cols, nonfinite, first) in enumerate(table.tolist()):
        if kind == 1:
            shape = "" if rows < 0 and cols < 0 else f" (shape (..., {int(cols)}))"
            msgs.append(f"rank {r} got no 2-D float tensor{shape}")
        elif want is not None and int(cols) != want:
            msgs.append(f"rank {r} has {int(cols)} columns, expected {want}")
        if nonfinite > 0:
            msgs.append(f"rank {r} has {int(nonfinite)} NaN/inf values (first in row {int(first)})")
    raise_everywhere(msgs, f"bad {what}")
