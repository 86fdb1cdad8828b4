"""Dictionary-sharded (tensor-parallel over latents) Soft Top-K, hard top-k, BatchTopK and decode.

Layout: the latent axis of every ``(B, n)`` matrix is split over the ranks of a process group in
rank order, rank r holding columns ``[off_r, off_r + n_r)`` (uneven splits allowed, see
:func:`softsae.distributed.shard_range`). Everything that is not split (the rows, ``k``, ``alpha``,
``b_dec``, the reconstruction) is *replicated*: the same value on every rank.

    p_r   = sharded_soft_topk(x_r, k, alpha)      # rank r's columns of soft_topk(x, k, alpha)
    z_r   = sharded_soft_topk_gate(x_r, k, alpha)
    vals, idx = sharded_topk_per_row(z_r, k)       # rank r's entries of the global per-row top-k (LOCAL idx)
    vals, idx, thr = sharded_batch_topk(z_r, k)    # rank r's entries of the global top k*B of the batch
    x_hat = sharded_decode(vals, idx, W_dec_r, b_dec)   # sum over ranks of the partial decodes (+ b_dec)

Gradient convention (as Megatron-style tensor parallelism): the loss is replicated (computed
identically on every rank from replicated tensors; combine sharded partial terms with
:func:`reduce_from_shards`). A sharded tensor receives its own gradient; a *replicated input*
(``k``, ``alpha``, ``b_dec``) receives its FULL gradient on every rank: the ops all-reduce what
they need internally (``dk = A/S`` and ``dalpha`` use global sums). So the k-head's gradient is
replicated across the tensor-parallel group and must NOT be all-reduced over that group again
(that would count it N times); a data-parallel gradient all-reduce runs over the data-parallel
group only, as usual. A replicated tensor that enters sharded computation elsewhere (e.g. the
encoder input ``x_n - b_dec``) must pass through :func:`copy_to_shards`, whose backward sums the
shards' contributions.

Collectives per call (W ranks, R rows): every op first all-gathers a (W, 8) float64 metadata
table (shapes, a checksum of k and alpha, a NaN flag), so that mismatched or bad inputs raise the
same :class:`DistributedInputError` on every rank instead of hanging. Soft Top-K forward: one
all-reduce MAX of (R, 3) (bracket and finiteness), one all-reduce SUM of (R, 3P + 4) per search
iteration (P = 7 trial points; the bracket shrinks 8x per iteration until no entry of any shard
lies strictly inside it: typically 3-15 iterations, at most 100), one all-gather of (R, 3) for the
closed form (docs/math.md 1.5). Backward: one all-gather of (R, 6) (docs/math.md 1.2-1.3).

The per-shard work is plain PyTorch in float64, not yet the fused kernels of a single device:
one sort (or top-(2 max k + 18) selection) of the shard, P Laplace CDFs per iteration over the
window of entries within 40 s of the bracket (the whole shard at large alpha), two log-sum-exp
passes and the output pass. Measured on 2 CPU ranks it is several times slower than the
one-process C++ kernel on the full row (see ``benchmarks/bench_sharded_soft_topk.py``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from softsae.distributed._comm import DistributedInputError, all_gather_stack, all_reduce_, raise_everywhere
from softsae.distributed.process import group_rank_world
from softsae.ops.soft_gate_dk import DK_CUT, dk_terms
from softsae.ops.soft_topk import K_EPS, S_MIN
from softsae.ops.sparse_decode import sparse_decode
from softsae.ops.topk_per_row import topk_per_row

__all__ = [
    "DistributedInputError",
    "copy_to_shards",
    "reduce_from_shards",
    "sharded_gate_k_direction",
    "sharded_batch_topk",
    "sharded_decode",
    "sharded_soft_topk",
    "sharded_soft_topk_gate",
    "sharded_topk_per_row",
]

N_TRIAL = 7  # trial points per search iteration
MAX_ITERS = 100
NEGLIGIBLE_U = 40.0  # entries with |u| > 40 change g by < e^-40 / 2 each (docs/math.md 1.4)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- autograd collectives


class _ReduceFromShards(torch.autograd.Function):
    """Forward: all-reduce SUM of the shards' partial results. Backward: identity.

    The sum feeds a replicated loss, so every rank's upstream gradient already is dL/d(sum), which
    is also dL/d(partial_r): the gradient must not be summed again.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return all_reduce_(x.clone(), group=group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: all-reduce SUM of the shards' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce_(grad.contiguous().clone(), group=ctx.group), None


def reduce_from_shards(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of ``x`` over the ranks (same shape everywhere); backward is the identity (see module doc)."""
    return _ReduceFromShards.apply(x, group)


def copy_to_shards(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``x`` unchanged (a replicated tensor entering sharded computation); backward sums the
    gradients of all ranks, so ``x`` (and what produced it) gets its full gradient on every rank."""
    return _CopyToShards.apply(x, group)


# ----------------------------------------------------------------------------- metadata check


def _check_2d(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a 2-D float tensor (rows, local latents), got shape "
                         f"{tuple(x.shape)} and dtype {x.dtype}")


def _rows_k(k, rows: int, device: torch.device, name: str = "k") -> Tensor:
    """k as a (rows,) float64 tensor (autograd kept). Numbers, 1-element, (rows,) or (rows, 1) tensors."""
    if isinstance(k, Tensor):
        if not (k.is_floating_point() or k.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                      torch.uint8)):
            raise TypeError(f"{name} must be a real tensor or a number, got dtype {k.dtype}")
        kk = k.to(device=device, dtype=torch.float64)
        if kk.numel() == 1:
            return kk.reshape(1).expand(rows)
        if tuple(kk.shape) in ((rows,), (rows, 1)):
            return kk.reshape(rows)
        raise ValueError(f"{name} must be a number or have shape ({rows},) (one per row), got {tuple(k.shape)}")
    if isinstance(k, (int, float)) and not isinstance(k, bool):
        return torch.full((rows,), float(k), dtype=torch.float64, device=device)
    raise TypeError(f"{name} must be a number or a tensor, got {type(k).__name__}")


_DTYPE_CODE = {dt: i for i, dt in enumerate(_FLOAT_DTYPES)}


def _gather_meta(x: Tensor, k: Tensor | None, alpha: Tensor | None, group, what: str, check_nan: bool) -> Tensor:
    """All-gather (W, 8) float64 [rows, local n, dtype, sum k, sum k*i, alpha, #NaN, #inf] and
    raise the same error on every rank if the ranks disagree or hold NaN (``check_nan``).

    Returns the per-rank local sizes n_r as a (W,) int64 CPU tensor.
    """
    rows = x.shape[0]
    dev = x.device
    meta = torch.zeros(8, dtype=torch.float64, device=dev)
    meta[0], meta[1], meta[2] = rows, x.shape[1], _DTYPE_CODE[x.dtype]
    if k is not None:
        kd = k.detach()
        meta[3] = kd.sum()
        meta[4] = (kd * torch.arange(1, rows + 1, dtype=torch.float64, device=dev)).sum()
    if alpha is not None:
        meta[5] = alpha.detach().reshape(())
    xd = x.detach()
    meta[6] = torch.isnan(xd).sum()
    meta[7] = torch.isinf(xd).sum()
    table = all_gather_stack(meta, group).cpu()
    msgs = []
    ref = table[0]
    for r in range(1, table.shape[0]):
        if table[r, 0] != ref[0]:
            msgs.append(f"rank {r} has {int(table[r, 0])} rows, rank 0 has {int(ref[0])}")
        if table[r, 2] != ref[2]:
            msgs.append(f"rank {r} has dtype {_FLOAT_DTYPES[int(table[r, 2])]}, rank 0 has "
                        f"{_FLOAT_DTYPES[int(ref[2])]}")
        # k and alpha are replicated: they must be bitwise identical (NaN != NaN is caught too).
        if k is not None and not (torch.equal(table[r, 3:5], ref[3:5])):
            msgs.append(f"k differs between rank {r} and rank 0 (k must be identical on every rank)")
        if alpha is not None and not torch.equal(table[r, 5], ref[5]):
            msgs.append(f"alpha differs between rank {r} and rank 0 ({float(table[r, 5])} vs {float(ref[5])})")
    if check_nan:
        msgs += [f"rank {r} has {int(table[r, 6])} NaN values" for r in range(table.shape[0]) if table[r, 6] > 0]
    raise_everywhere(msgs, what)
    return table[:, 1].to(torch.int64)


# ----------------------------------------------------------------------------- soft top-k


def _laplace_cdf(u: Tensor) -> Tensor:
    e = 0.5 * torch.exp(-u.abs())
    return torch.where(u < 0, e, 1.0 - e)


def _masked_logsumexp(v: Tensor, mask: Tensor) -> Tensor:
    """Row-wise log sum exp of v over mask (R, m) -> (R,); -inf for an empty mask."""
    if v.shape[1] == 0:
        return v.new_full((v.shape[0],), -math.inf)
    return torch.logsumexp(torch.where(mask, v, -math.inf), dim=-1)


def _root(c: Tensor, la: Tensor, lb: Tensor) -> Tensor:
    """t / s of the closed form (docs/math.md 1.5) on a segment: c = k - #above, la = log sum_above
    e^{-y/s}, lb = log sum_below e^{y/s}; the root of A w^2 / 2 + c w - B / 2 = 0 (w = e^{t/s}) in logs."""
    log_abs_c = torch.log(c.abs())
    l2 = torch.logaddexp(2.0 * log_abs_c, la + lb)
    q = 0.5 * l2 + torch.log1p(torch.exp(log_abs_c - 0.5 * l2))
    return torch.where(c >= 0, lb - q, q - la)


def _global_threshold(y: Tensor, k: Tensor, s: Tensor, n: int, group) -> Tensor:
    """Per-row t with sum over ALL shards of F((y - t)/s) = k (docs/math.md 1.1, 1.5, 1.7).

    y (R, n_r) float64 (this shard), k (R,) float64 in (0, n), s 0-d float64 > 0, n the global row
    length. Rows with a non-finite entry on any shard get t = NaN. Returns (R,) float64, identical
    on every rank: every decision is taken on all-gathered data.

    One all-gather: each shard sends its M = min(n, 2 floor(max k) + 16) largest entries, the largest
    entry it leaves out and log sum e^{y/s} over those it leaves out. Counting every left-out entry as
    below t gives g_hat >= g (e^u / 2 >= 1 - e^-u / 2), equal for t >= c, the largest left-out entry
    of any shard. A shard with left-out entries has M + 1 entries >= c, each with F >= 1/2, so
    g(c) > k and t > c: the root of g_hat, solved on the sorted candidates (1.5), IS t, for every s.
    Rows where rounding breaks t >= c fall back to :func:`_search_threshold`.
    """
    R, n_r = y.shape
    m = min(n, 2 * int(k.max().floor()) + 16) if R else 0
    loc = torch.full((R, m + 3), -math.inf, dtype=torch.float64, device=y.device)
    loc[:, m + 2] = 0.0
    if n_r:
        bad = ~(torch.isfinite(y.amax(dim=-1)) & torch.isfinite(y.amin(dim=-1)))  # NaN propagates
        loc[:, m + 2] = bad.to(torch.float64)
        ys = (y / s).masked_fill_(bad[:, None], 0.0)
        top = torch.topk(ys, min(m + 1, n_r), dim=-1)
        loc[:, :min(m, n_r)] = top.values[:, :m]
        if n_r > m:  # c and the log-sum-exp of the left-out entries: their max is c, whose term is 1, so the
            c = top.values[:, m:]  # clamp (e^-200 per entry, no slow subnormal exp) is invisible in the sum
            rest = ys.sub_(c).clamp_min_(-200.0).scatter_(1, top.indices[:, :m], -math.inf).exp_().sum(dim=-1)
            loc[:, m], loc[:, m + 1] = c.squeeze(1) + rest.log(), c.squeeze(1)
    tab = all_gather_stack(loc, group)  # (W, R, m + 3)
    bad = tab[:, :, m + 2].amax(dim=0) > 0
    cs = torch.sort(tab[:, :, :m].permute(1, 0, 2).reshape(R, -1), dim=-1, descending=True).values
    cs = torch.where(bad[:, None], 0.0, cs)  # -inf pads the shards' lists (and a short shard) at the end
    inf_col = torch.full_like(cs[:, :1], -math.inf)
    log_a = torch.cat([inf_col, torch.logcumsumexp(-cs, dim=-1)], dim=-1)  # +inf at the pads
    log_b = torch.logaddexp(torch.cat([torch.logcumsumexp(cs.flip(-1), dim=-1).flip(-1), inf_col], dim=-1),
                            torch.logsumexp(tab[:, :, m], dim=0)[:, None])
    j = torch.arange(1, cs.shape[1] + 1, dtype=torch.float64, device=y.device)
    g = j - 0.5 * torch.exp(cs + log_a[:, 1:]) + 0.5 * torch.exp(log_b[:, 1:] - cs)  # g_hat at t = cs_j; NaN at pads
    above = (g <= k[:, None]).sum(dim=-1, keepdim=True)
    t = _root(k - above.squeeze(1), log_a.gather(1, above).squeeze(1), log_b.gather(1, above).squeeze(1))
    redo = ~bad & ~(t >= tab[:, :, m + 1].amax(dim=0))
    t = torch.where(bad, math.nan, t * s)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        t[rows] = _search_threshold(y[rows], k[rows], s, n, group)
    return t


def _search_threshold(y: Tensor, k: Tensor, s: Tensor, n: int, group) -> Tensor:
    """:func:`_global_threshold` (same arguments and result) by a bracket search (docs/math.md 1.4, 1.7):
    the fallback for rows where rounding defeats its one-gather solve, and the path it is tested against.

    Each shard is sorted. The bracket starts from the global max/min tightened by the rank bound
    (L = the largest local (floor(k) + 2)-th largest entry, one all-reduce MAX). Each iteration
    evaluates g at P trial points on the sorted entries within [lo - 40 s, hi + 40 s] (those above
    count 1, those below 0: an error < n e^-40) and counts the entries above each point by binary
    search; one all-reduce SUM combines the shards. It stops when no entry of any shard lies strictly
    inside the bracket; t is then the closed form of that segment over ALL entries (one all-gather).
    """
    R, n_r = y.shape
    dev = y.device
    finite = torch.isfinite(y).all(dim=-1) if n_r else torch.ones(R, dtype=torch.bool, device=dev)
    yz = torch.where(finite[:, None], y, 0.0)
    m0 = k.floor() + 2.0  # rank bound: m0 > k entries >= L
    ya = torch.sort(yz, dim=-1).values
    ext = torch.full((R, 4), -math.inf, dtype=torch.float64, device=dev)
    if n_r:
        ext[:, 0], ext[:, 1] = ya[:, -1], -ya[:, 0]
        pos = (n_r - m0).to(torch.int64)
        ext[:, 3] = torch.where(pos >= 0, ya.gather(1, pos.clamp(min=0)[:, None]).squeeze(1), -math.inf)
    ext[:, 2] = (~finite).to(torch.float64)
    all_reduce_(ext, dist.ReduceOp.MAX, group)
    bad = ext[:, 2] > 0
    ya = torch.where(bad[:, None], 0.0, ya)
    ymax, ymin = torch.where(bad, 0.0, ext[:, 0]), torch.where(bad, 0.0, -ext[:, 1])
    # Bracket (1.4): g(hi) <= k <= g(lo).
    hi = ymax + s * torch.log(n / (2.0 * k)).clamp_min(0.0)
    lo = ymin - s * torch.log(n / (2.0 * (n - k))).clamp_min(0.0)
    q = k / m0
    finv = torch.where(q < 0.5, torch.log(2.0 * q), -torch.log(2.0 * (1.0 - q)))
    lo = torch.where(torch.isfinite(ext[:, 3]) & ~bad, torch.maximum(lo, ext[:, 3] - s * finv), lo)
    frac = torch.arange(1, N_TRIAL + 1, dtype=torch.float64, device=dev) / (N_TRIAL + 1)
    done = torch.zeros(R, dtype=torch.bool, device=dev)
    for _ in range(MAX_ITERS):
        pts = torch.cat([lo[:, None], lo[:, None] + (hi - lo)[:, None] * frac, hi[:, None]], dim=1)  # (R, P+2)
        buf = torch.zeros(R, 3 * N_TRIAL + 4, dtype=torch.float64, device=dev)
        if n_r:
            w_lo = torch.searchsorted(ya, (lo - NEGLIGIBLE_U * s)[:, None])
            w_hi = torch.searchsorted(ya, (hi + NEGLIGIBLE_U * s)[:, None], right=True)
            width = int(torch.where(done[:, None], 0, w_hi - w_lo).max())
            cols = w_lo + torch.arange(width, device=dev)
            win = ya.gather(1, cols.clamp(max=n_r - 1))
            inwin = cols < w_hi
            for j in range(N_TRIAL):
                cdf = torch.where(inwin, _laplace_cdf((win - pts[:, j + 1, None]) / s), 0.0)
                buf[:, j] = (n_r - w_hi[:, 0]) + cdf.sum(dim=-1)
            buf[:, N_TRIAL:2 * N_TRIAL + 2] = n_r - torch.searchsorted(ya, pts, right=True)  # #{y > pt}
            buf[:, 2 * N_TRIAL + 2:] = n_r - torch.searchsorted(ya, pts)  # #{y >= pt}
        all_reduce_(buf, group=group)
        g, gt, ge = buf[:, :N_TRIAL], buf[:, N_TRIAL:2 * N_TRIAL + 2], buf[:, 2 * N_TRIAL + 2:]
        c = (g > k[:, None]).sum(dim=-1, keepdim=True)  # t lies in [pts[c], pts[c + 1]]
        new_lo, new_hi = pts.gather(1, c).squeeze(1), pts.gather(1, c + 1).squeeze(1)
        inside = gt.gather(1, c).squeeze(1) - ge.gather(1, c + 1).squeeze(1)
        # g == k exactly at pts[c + 1] (a plateau at tiny s): its segment is t's, not the plateau's end
        hit = (c.squeeze(1) < N_TRIAL) & (g.gather(1, c.clamp(max=N_TRIAL - 1)).squeeze(1) == k)
        new_lo = torch.where(hit, new_hi, new_lo)
        stalled = (new_lo == lo) & (new_hi == hi)  # the bracket is at float64 resolution
        lo, hi = torch.where(done, lo, new_lo), torch.where(done, hi, new_hi)
        done = done | (inside <= 0) | stalled | hit
        if bool(done.all()):  # computed from all-reduced data: the same decision on every rank
            break
    # Segment: entries >= hi are above t, entries <= lo below (an entry left inside the bracket
    # after MAX_ITERS / a stall sits at t within rounding: split at the midpoint).
    yz = torch.where(bad[:, None], 0.0, yz)
    above = yz >= (0.5 * (lo + hi))[:, None]
    ys = yz / s
    loc = torch.stack([above.sum(dim=-1).to(torch.float64), _masked_logsumexp(-ys, above),
                       _masked_logsumexp(ys, ~above)], dim=-1)
    tab = all_gather_stack(loc, group)  # (W, R, 3)
    m = tab[:, :, 0].sum(dim=0)
    la, lb = torch.logsumexp(tab[:, :, 1], dim=0), torch.logsumexp(tab[:, :, 2], dim=0)
    return torch.where(bad, math.nan, _root(k - m, la, lb) * s)


def _scale(alpha: Tensor) -> Tensor:
    return alpha.detach().to(torch.float64).abs().clamp_min(S_MIN).reshape(())


class _ShardedSoftTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor, alpha: Tensor, largest: bool, gate: bool, n: int, group) -> Tensor:
        s = _scale(alpha)
        sign = 1.0 if largest else -1.0
        x64 = x.detach().to(torch.float64)
        t = _global_threshold(sign * x64, k.detach(), s, n, group)
        p = _laplace_cdf((sign * x64 - t[:, None]) / s)
        ctx.save_for_backward(x, t, alpha)
        ctx.largest, ctx.gate, ctx.group = largest, gate, group
        return (x64 * p if gate else p).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, t, alpha = ctx.saved_tensors
        s = _scale(alpha)
        sign = 1.0 if ctx.largest else -1.0
        x64, go = x.to(torch.float64), grad.to(torch.float64)
        u = (sign * x64 - t[:, None]) / s
        au = u.abs()
        f = 0.5 * torch.exp(-au)
        g = go * x64 if ctx.gate else go
        R, n_r = x.shape
        # Local rescaled sums (1.3) with this shard's min |u|; E, G for ds without cancellation (1.2).
        loc = torch.zeros(R, 6, dtype=torch.float64, device=x.device)
        loc[:, 0] = math.inf
        if n_r:
            m_r = au.amin(dim=-1)
            fr = torch.exp(m_r[:, None] - au)
            s_r, c_r = fr.sum(dim=-1), (fr * u).sum(dim=-1)
            cbar = c_r / s_r
            loc[:, 0], loc[:, 1], loc[:, 2], loc[:, 3] = m_r, s_r, (fr * g).sum(dim=-1), c_r
            loc[:, 4] = (g * f * (cbar[:, None] - u)).sum(dim=-1)
            loc[:, 5] = (g * f).sum(dim=-1)
        tab = all_gather_stack(loc, ctx.group)  # (W, R, 6)
        m = tab[:, :, 0].amin(dim=0)
        w = torch.where(torch.isinf(tab[:, :, 0]), 0.0, torch.exp(m - tab[:, :, 0]))  # empty shards: 0
        S, A, C = (w * tab[:, :, 1]).sum(0), (w * tab[:, :, 2]).sum(0), (w * tab[:, :, 3]).sum(0)
        a_over_s, c_over_s = A / S, C / S
        cbar_r = torch.where(tab[:, :, 1] > 0, tab[:, :, 3] / tab[:, :, 1], 0.0)
        ds = (tab[:, :, 4] + (c_over_s - cbar_r) * tab[:, :, 5]).sum(0) / s
        dx = sign * (f / s) * (g - a_over_s[:, None])
        if ctx.gate:
            dx = dx + go * _laplace_cdf(u)
        dalpha = torch.sign(alpha.detach()) * ds.sum().to(alpha.dtype) if ctx.needs_input_grad[2] else None
        dk = a_over_s if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dk, dalpha, None, None, None, None


def _alpha_tensor(alpha, device: torch.device) -> Tensor:
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1 or not alpha.is_floating_point():
            raise ValueError(f"alpha must be a float or a 1-element float tensor, got shape {tuple(alpha.shape)} "
                             f"and dtype {alpha.dtype}")
        a = alpha.reshape(()).to(device=device, dtype=torch.float64)
        if alpha.device.type == "cpu":
            _check_alpha(float(alpha.detach()))
        return a
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        _check_alpha(float(alpha))
        return torch.full((), float(alpha), dtype=torch.float64, device=device)
    raise TypeError(f"alpha must be a float or a 1-element tensor, got {type(alpha).__name__}")


def _check_alpha(a: float) -> None:
    if a == 0.0 or not math.isfinite(a):
        raise ValueError(f"alpha must be finite and non-zero, got {a}")


def sharded_soft_topk(x: Tensor, k, alpha, group: dist.ProcessGroup | None = None, largest: bool = True,
                      gate: bool = False) -> Tensor:
    """This rank's columns of ``softsae.soft_topk(x_full, k, alpha)`` for a latent-sharded ``x``.

    Args:
        x: (R, n_r) float tensor, this rank's latents (n_r may differ between ranks, even be 0).
        k: per-row budget over the WHOLE row of n = sum n_r latents: a number or an (R,) tensor,
            identical on every rank; clamped into [1e-6, n - 1e-6]. Differentiable (full gradient
            on every rank).
        alpha: the scale (float or 1-element tensor, identical on every rank), differentiable.
        group: the tensor-parallel process group (None: the default group).
        largest: weight the largest (True) or the smallest entries.
        gate: return ``x * p`` instead of ``p``.

    Returns (R, n_r) in x.dtype; ``sum`` over all ranks' columns equals ``k`` per row. Rows with a
    non-finite entry on any rank are NaN on every rank. Computed in float64.
    """
    _check_2d(x, "x")
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__}")
    group_rank_world(group)
    alpha_t = _alpha_tensor(alpha, x.device)
    kk = _rows_k(k, x.shape[0], x.device)
    sizes = _gather_meta(x, kk, alpha_t, group, "sharded_soft_topk", check_nan=False)
    n = int(sizes.sum())
    if x.shape[0] == 0 or n == 0:
        return x * 0 + kk.sum().to(x.dtype) * 0
    kk = kk.clamp(K_EPS, n - K_EPS) if n > 1 else kk.clamp(K_EPS, 1 - K_EPS)
    return _ShardedSoftTopK.apply(x, kk, alpha_t, largest, gate, n, group)


def sharded_soft_topk_gate(x: Tensor, k, alpha, group: dist.ProcessGroup | None = None,
                           largest: bool = True) -> Tensor:
    """Fused gate ``x * p`` of :func:`sharded_soft_topk` (rank r's columns)."""
    return sharded_soft_topk(x, k, alpha, group, largest=largest, gate=True)


@torch.no_grad()
def sharded_gate_k_direction(x: Tensor, k, alpha, W_dec: Tensor, group: dist.ProcessGroup | None = None,
                             backend: str = "auto") -> Tensor:
    """v (R, d), replicated: sum over the WHOLE dictionary of (dz_i/dk) W_dec[i] for the sharded gate
    z = x * soft_topk(x, k, alpha), x (R, n_r) and W_dec (n_r, d) this rank's latents.

    The straight-through "k" step adds ``(k_hat - sg(k_hat)) v`` to the reconstruction (docs/math.md
    section 3; ``softsae.models.SoftSAE.k_direction`` in one process): the global threshold (the
    sharded search of ``sharded_soft_topk``), each shard's kept terms x_i f_i near it (relative to the
    global min |u|, one all-reduce MIN) decoded by ``sparse_decode``, then one all-reduce SUM of the
    (R, d + 1) partial decodes and density sums. No soft top-k output and no backward pass.
    """
    _check_2d(x, "x")
    group_rank_world(group)
    alpha_t = _alpha_tensor(alpha, x.device)
    kk = _rows_k(k, x.shape[0], x.device)
    sizes = _gather_meta(x, kk, alpha_t, group, "sharded_gate_k_direction", check_nan=False)
    n = int(sizes.sum())
    R, d = x.shape[0], W_dec.shape[1]
    if R == 0 or n == 0:
        return W_dec.new_zeros(R, d)
    kk = kk.clamp(K_EPS, n - K_EPS) if n > 1 else kk.clamp(K_EPS, 1 - K_EPS)
    s = _scale(alpha_t)
    xw = x.detach() if x.dtype in (torch.float32, torch.float64) else x.detach().float()
    x64 = xw.to(torch.float64)
    t = _global_threshold(x64, kk, s, n, group)
    m = torch.full((R,), math.inf, dtype=torch.float64, device=x.device)
    if x.shape[1]:
        m = (x64 - t[:, None]).abs_().amin(dim=-1) / s
    all_reduce_(m, dist.ReduceOp.MIN, group)
    buf = torch.zeros(R, d + 1, dtype=torch.float64, device=x.device)
    if x.shape[1]:
        vals, idx, f_sum = dk_terms(xw, t, s, m, DK_CUT)
        buf[:, :d] = sparse_decode(vals.to(W_dec.dtype), idx, W_dec.detach(), None, backend=backend).double()
        buf[:, d] = f_sum
    all_reduce_(buf, group=group)
    return (buf[:, :d] / buf[:, d:]).to(W_dec.dtype)


# ----------------------------------------------------------------------------- hard top-k


def _offsets(sizes: Tensor, rank: int) -> int:
    return int(sizes[:rank].sum())


def _top_m_mask(values: Tensor, m: int) -> Tensor:
    """Bool mask of the ``m`` best entries of the 1-D ``values`` ordered by (value desc, position asc)."""
    n = values.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=values.device)
    m = min(m, n)
    if m <= 0:
        return mask
    v = torch.topk(values, m, sorted=True).values[-1]
    above = values > v
    tie = values == v
    need = m - above.sum()
    return above | (tie & (tie.cumsum(0) <= need))


def _select_ordered(keep: Tensor, z: Tensor, width: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Padded (vals, idx) of the kept entries of each row of z (B, n): values descending, ties by index.

    ``idx`` are local column indices plus ``offset``, -1 for padding; ``vals`` differentiable in z.
    Every row keeps at most ``width`` entries. The kept entries are first compacted in index order
    (a cumsum and a scatter, no sort of the n columns), then only the (B, width) block is sorted
    (stable, so equal values stay in index order).
    """
    B, n = z.shape
    if width == 0 or n == 0:
        return z.new_zeros(B, 0), torch.zeros(B, 0, dtype=torch.int64, device=z.device)
    count = keep.sum(dim=-1, keepdim=True)
    slot = torch.where(keep, keep.cumsum(dim=-1) - 1, width).clamp(max=width)  # width: a discarded column
    cols = torch.arange(n, device=z.device).expand(B, n)
    compact = torch.zeros(B, width + 1, dtype=torch.int64, device=z.device).scatter_(1, slot, cols)[:, :width]
    valid = torch.arange(width, device=z.device)[None, :] < count
    v = torch.where(valid, z.detach().gather(1, compact), -math.inf)
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices  # padding (after the kept) stays last
    compact, valid = compact.gather(1, order), valid.gather(1, order)
    vals = torch.where(valid, z.gather(1, compact), 0)
    return vals, torch.where(valid, compact + offset, -1)


def sharded_topk_per_row(z: Tensor, k, group: dist.ProcessGroup | None = None,
                         global_index: bool = False) -> tuple[Tensor, Tensor]:
    """This rank's entries of the global per-row top-k of a latent-sharded ``z`` (B, n_r).

    The global selection is the one of ``softsae.topk_per_row(z_full, k)``: per row the ``k`` largest
    entries of the whole row, ties to the lower GLOBAL index. ``k``: an int or a (B,) tensor,
    identical on every rank (floored, clamped to [0, n]). Raises on every rank if any rank's z
    holds NaN.

    Returns ``vals, idx`` of shape (B, min(max k, n_r)): values descending (ties by index), padded
    with ``idx = -1``, ``vals = 0``; ``idx`` are LOCAL column indices (ready for this rank's W_dec
    shard) unless ``global_index`` (then local + this rank's offset). ``vals`` is differentiable in z.
    Collectives: the metadata all-gather and one all-gather of (B, max k) candidates (value, index).
    """
    _check_2d(z, "z")
    rank, _ = group_rank_world(group)
    B, n_r = z.shape
    kk = _rows_k(k, B, z.device).floor()
    sizes = _gather_meta(z, kk, None, group, "sharded_topk_per_row", check_nan=True)
    n, off = int(sizes.sum()), _offsets(sizes, rank)
    kk = kk.clamp(0, n).to(torch.int64)
    k_max = int(kk.max()) if B else 0
    width = min(k_max, n_r)
    if k_max == 0:
        return _select_ordered(torch.zeros_like(z, dtype=torch.bool), z, 0)
    # Local candidates: the local top-min(k, n_r) (ties -> lower index), padded to k_max.
    cv, ci = topk_per_row(z.detach(), kk.clamp(max=n_r), k_max=width, check_nan=False)
    cand_v = torch.full((B, k_max), -math.inf, dtype=torch.float64, device=z.device)
    cand_i = torch.full((B, k_max), n, dtype=torch.int64, device=z.device)  # padding sorts last
    cand_v[:, :width] = torch.where(ci >= 0, cv.to(torch.float64), -math.inf)
    cand_i[:, :width] = torch.where(ci >= 0, ci + off, n)
    all_v = all_gather_stack(cand_v, group).permute(1, 0, 2).reshape(B, -1)  # rank order = index order
    all_i = all_gather_stack(cand_i, group).permute(1, 0, 2).reshape(B, -1)
    order = torch.sort(all_i, dim=-1, stable=True).indices
    all_v, all_i = all_v.gather(1, order), all_i.gather(1, order)
    order = torch.sort(all_v, dim=-1, descending=True, stable=True).indices
    sel_i = all_i.gather(1, order)
    pos = torch.arange(sel_i.shape[1], device=z.device)
    chosen = torch.where(pos[None, :] < kk[:, None], sel_i, n)  # global indices of the top k, best first
    mine = (chosen >= off) & (chosen < off + n_r)
    # this rank's picks moved to the front, their order (value descending, ties by index) kept: (B, k) work
    front = torch.sort((~mine).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    local = torch.where(mine, chosen - off, -1).gather(1, front)
    vals = torch.where(local >= 0, z.gather(1, local.clamp(min=0)), 0)
    return vals, torch.where(local >= 0, local + (off if global_index else 0), -1)


def sharded_batch_topk(z: Tensor, k: int, group: dist.ProcessGroup | None = None, split: str = "latents",
                       positive_only: bool = False, global_index: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK selection over the whole batch and dictionary, when either axis is split over ranks.

    Keeps the ``M = k * B_total`` largest entries of the global (B_total, n) matrix, ties to the
    lower flat index ``row * n + col`` (global row and column), then, with ``positive_only``, drops
    the kept entries <= 0 (as ``BatchTopKSAE`` does).

    Args:
        z: (B, n_r) this rank's columns (``split="latents"``: dictionary-sharded, rows replicated)
            or (B_r, n) this rank's rows (``split="rows"``: data parallel, full dictionary).
        k: mean budget per row (int >= 0).

    Returns ``vals, idx, threshold``: this rank's kept entries per row as padded codes
    (values descending; ``idx`` LOCAL columns unless ``global_index``; width = the largest per-row
    count, read back to the host) and ``threshold``, the smallest kept value over all ranks
    (a 0-d float64 tensor, identical on every rank; NaN when nothing is kept), for the EMA
    threshold of BatchTopK. Collectives: the metadata all-gather, one all-reduce MAX (candidate
    count), two all-gathers of min(M, largest local size) candidates (values, flat indices): the
    merge holds W * M candidates per rank.
    """
    _check_2d(z, "z")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if split not in ("latents", "rows"):
        raise ValueError(f"split must be 'latents' or 'rows', got {split!r}")
    rank, world = group_rank_world(group)
    B, n_r = z.shape
    if split == "latents":
        sizes = _gather_meta(z, None, None, group, "sharded_batch_topk", check_nan=True)
        n, b_total, row_off, col_off = int(sizes.sum()), B, 0, _offsets(sizes, rank)
    else:
        row_sizes, n = _gather_rows_meta(z, group)
        b_total, row_off, col_off = int(row_sizes.sum()), _offsets(row_sizes, rank), 0
    m_total = k * b_total
    flat = z.detach().reshape(-1).to(torch.float64)
    cand = _top_m_mask(flat, m_total).nonzero().squeeze(1)  # positions in local flat order
    c_pad = min(m_total, max_local_size(z, group))
    cand_v = torch.full((c_pad,), -math.inf, dtype=torch.float64, device=z.device)
    sentinel = b_total * n  # beyond every real flat index: padding loses every tie
    cand_k = torch.full((c_pad,), sentinel, dtype=torch.int64, device=z.device)
    cand_v[:cand.numel()] = flat[cand]
    if n_r:
        cand_k[:cand.numel()] = (row_off + cand // n_r) * n + col_off + cand % n_r
    all_v, all_k = all_gather_stack(cand_v, group), all_gather_stack(cand_k, group)  # (W, c_pad)
    order = torch.argsort(all_k.reshape(-1))
    chosen = torch.zeros(world * c_pad, dtype=torch.bool, device=z.device)
    chosen[order] = _top_m_mask(all_v.reshape(-1)[order], m_total)
    chosen &= all_k.reshape(-1) < sentinel
    if positive_only:
        chosen &= all_v.reshape(-1) > 0
    thr = torch.where(chosen, all_v.reshape(-1), math.inf).amin() if chosen.numel() else torch.tensor(math.inf)
    threshold = torch.where(torch.isinf(thr), math.nan, thr).to(torch.float64)
    mine = chosen.reshape(world, c_pad)[rank, :cand.numel()]
    keep = torch.zeros(B * n_r, dtype=torch.bool, device=z.device)
    keep[cand[mine]] = True
    keep = keep.reshape(B, n_r)
    width = int(keep.sum(dim=-1).max()) if B else 0
    vals, idx = _select_ordered(keep, z, width, col_off if global_index else 0)
    return vals, idx, threshold


def max_local_size(z: Tensor, group) -> int:
    """Largest ``z.numel()`` over the ranks (one all-reduce MAX)."""
    t = torch.tensor([float(z.numel())], dtype=torch.float64, device=z.device)
    return int(all_reduce_(t, dist.ReduceOp.MAX, group).item())


def _gather_rows_meta(z: Tensor, group) -> tuple[Tensor, int]:
    """Row-split metadata: (W,) rows per rank and the common n; same error on every rank on mismatch."""
    meta = torch.tensor([z.shape[0], z.shape[1], float(torch.isnan(z.detach()).sum())], dtype=torch.float64,
                        device=z.device)
    table = all_gather_stack(meta, group).cpu()
    msgs = [f"rank {r} has {int(table[r, 1])} latents, rank 0 has {int(table[0, 1])}"
            for r in range(1, table.shape[0]) if table[r, 1] != table[0, 1]]
    msgs += [f"rank {r} has {int(table[r, 2])} NaN values" for r in range(table.shape[0]) if table[r, 2] > 0]
    raise_everywhere(msgs, "sharded_batch_topk")
    return table[:, 0].to(torch.int64), int(table[0, 1])


# ----------------------------------------------------------------------------- decode


def sharded_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None = None,
                   group: dist.ProcessGroup | None = None, backend: str = "auto") -> Tensor:
    """``x_hat = z @ W_dec_full + b_dec`` with the dictionary sharded over latents.

    vals, idx (B, K): this rank's codes with LOCAL indices into its shard ``W_dec`` (n_r, d)
    (``softsae.sparse_decode`` layout, -1 = padding); b_dec (d,) replicated or None.
    Each rank decodes its latents with ``softsae.sparse_decode`` and the (B, d) partial results
    are summed by one all-reduce (backward: identity, see :func:`reduce_from_shards`). Returns the
    replicated (B, d) reconstruction; dW_dec and dvals are this rank's shard, db_dec is full.
    """
    group_rank_world(group)
    partial = sparse_decode(vals, idx, W_dec, None, backend=backend)
    out = reduce_from_shards(partial, group)
    return out if b_dec is None else out + b_dec
