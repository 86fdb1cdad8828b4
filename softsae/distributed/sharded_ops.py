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

Gradient convention (Megatron-style tensor parallelism): the loss is replicated (computed identically
on every rank; sharded partial terms are combined with :func:`reduce_from_shards`). A sharded tensor
gets its own gradient; a *replicated input* (``k``, ``alpha``, ``b_dec``) gets its FULL gradient on
every rank (the ops all-reduce what they need: ``dk = A/S`` and ``dalpha`` use global sums), so it must
NOT be all-reduced over the tensor-parallel group again (data-parallel all-reduces are unaffected).
A replicated tensor entering sharded computation (e.g. the encoder input ``x_n - b_dec``) passes
through :func:`copy_to_shards`, whose backward sums the shards' contributions.

Collectives per call (W ranks, R rows): every op first all-gathers a (W, 7) float64 metadata
table (shapes, a checksum of k and alpha, a NaN flag), so that mismatched or bad inputs raise the
same :class:`DistributedInputError` on every rank instead of hanging. Soft Top-K forward: one
all-gather of (R, 2 floor(max k) + 19) for the threshold (docs/math.md 1.7). Backward: one
all-gather of (R, 6) (docs/math.md 1.2-1.3). The per-shard work is PyTorch in float64: a top-k
selection and one exp pass for the threshold, then the output pass.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from softsae.distributed._comm import DistributedInputError, all_gather_stack, all_reduce_, raise_everywhere
from softsae.distributed.process import group_rank_world
from softsae.ops.soft_gate_dk import DK_CUT, dk_terms
from softsae.ops.soft_topk import K_EPS, alpha_tensor, scale_of
from softsae.ops.soft_topk_ref import laplace_cdf
from softsae.ops.sparse_decode import sparse_decode
from softsae.ops.topk_per_row import topk_per_row
from softsae.placement import decode_terms

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
    """Forward: all-reduce SUM of the shards' partial results. Backward: identity (the sum feeds a
    replicated loss, so each rank's dL/d(sum) already is dL/d(partial_r): not summed again)."""

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
        if k.dtype == torch.bool or k.is_complex():
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


def _gather_meta(x: Tensor, k: Tensor | None, alpha: Tensor | None, group, what: str, check_nan: bool,
                 split: int = 1) -> Tensor:
    """All-gather (W, 7) float64 [rows, cols, dtype, sum k, sum k*i, alpha, #NaN] and raise the same
    error on every rank if the ranks disagree (on the axis not ``split`` over the ranks, the dtype, k,
    alpha) or hold NaN (``check_nan``). Returns the per-rank sizes of axis ``split``, (W,) int64 CPU.
    """
    rows = x.shape[0]
    dev = x.device
    meta = torch.zeros(7, dtype=torch.float64, device=dev)
    meta[0], meta[1], meta[2] = rows, x.shape[1], _DTYPE_CODE[x.dtype]
    if k is not None:
        kd = k.detach()
        meta[3] = kd.sum()
        meta[4] = (kd * torch.arange(1, rows + 1, dtype=torch.float64, device=dev)).sum()
    if alpha is not None:
        meta[5] = alpha.detach().reshape(())
    meta[6] = torch.isnan(x.detach()).sum()
    table = all_gather_stack(meta, group).cpu()
    msgs = []
    ref, same = table[0], 1 - split
    for r in range(1, table.shape[0]):
        if table[r, same] != ref[same]:
            msgs.append(f"rank {r} has {int(table[r, same])} {('rows', 'latents')[same]}, rank 0 has {int(ref[same])}")
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
    return table[:, split].to(torch.int64)


# ----------------------------------------------------------------------------- soft top-k


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

    One all-gather of each shard's M = min(n, 2 floor(max k) + 16) largest entries, the largest entry c_r
    it leaves out and log sum e^{y/s} over those; the root of g_hat (the left-out entries counted as if
    below t) on the sorted candidates is t exactly when t >= c = max_r c_r, which always holds (1.7).
    Rows where rounding breaks t >= c fall back to :func:`_search_threshold`.
    """
    R, n_r = y.shape
    m = min(n, 2 * int(k.max().floor()) + 16) if R else 0
    loc = torch.full((R, m + 3), -math.inf, dtype=torch.float64, device=y.device)
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
    inf_col = torch.full_like(cs[:, :1], -math.inf)
    log_a = torch.cat([inf_col, torch.logcumsumexp(-cs, dim=-1)], dim=-1)  # +inf at the -inf pads (last)
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
    """:func:`_global_threshold` of rows finite on every shard by a bracket search (docs/math.md 1.4, 1.7):
    the fallback for rows where rounding defeats the one-gather solve, and the path it is tested against.

    The bracket starts at the global max/min (one all-reduce MAX). Each iteration evaluates g at P trial
    points on each sorted shard's entries within 40 s of the bracket (an error < n e^-40) and counts the
    entries above them; one all-reduce SUM combines the shards. When no entry lies strictly inside the
    bracket (or g == k at a trial point), t is the closed form of that segment over ALL entries.
    """
    R, n_r = y.shape
    dev = y.device
    ya = torch.sort(y, dim=-1).values
    ext = torch.full((R, 2), -math.inf, dtype=torch.float64, device=dev)
    if n_r:
        ext[:, 0], ext[:, 1] = ya[:, -1], -ya[:, 0]
    all_reduce_(ext, dist.ReduceOp.MAX, group)
    # Bracket (1.4): g(hi) <= k <= g(lo).
    hi = ext[:, 0] + s * torch.log(n / (2.0 * k)).clamp_min(0.0)
    lo = -ext[:, 1] - s * torch.log(n / (2.0 * (n - k))).clamp_min(0.0)
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
                cdf = torch.where(inwin, laplace_cdf((win - pts[:, j + 1, None]) / s), 0.0)
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
    above = y >= (0.5 * (lo + hi))[:, None]
    ys = y / s
    loc = torch.stack([above.sum(dim=-1).to(torch.float64), torch.where(above, -ys, -math.inf).logsumexp(-1),
                       torch.where(above, -math.inf, ys).logsumexp(-1)], dim=-1)  # -inf for an empty shard
    tab = all_gather_stack(loc, group)  # (W, R, 3)
    m = tab[:, :, 0].sum(dim=0)
    la, lb = torch.logsumexp(tab[:, :, 1], dim=0), torch.logsumexp(tab[:, :, 2], dim=0)
    return _root(k - m, la, lb) * s


class _ShardedSoftTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor, alpha: Tensor, largest: bool, gate: bool, n: int, group) -> Tensor:
        s = scale_of(alpha)[0]
        sign = 1.0 if largest else -1.0
        x64 = x.detach().to(torch.float64)
        t = _global_threshold(sign * x64, k.detach(), s, n, group)
        p = laplace_cdf((sign * x64 - t[:, None]) / s)
        ctx.save_for_backward(x, t, alpha)
        ctx.largest, ctx.gate, ctx.group = largest, gate, group
        return (x64 * p if gate else p).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, t, alpha = ctx.saved_tensors
        s = scale_of(alpha)[0]
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
            dx = dx + go * laplace_cdf(u)
        dalpha = torch.sign(alpha.detach()) * ds.sum().to(alpha.dtype) if ctx.needs_input_grad[2] else None
        dk = a_over_s if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dk, dalpha, None, None, None, None


def _soft_inputs(x: Tensor, k, alpha, group, what: str) -> tuple[Tensor, Tensor, int]:
    """alpha (0-d float64), k (R,) float64 clamped into [K_EPS, n - K_EPS] and n, the global row length,
    after the checks of x, alpha, k and the metadata all-gather (the ranks must agree)."""
    _check_2d(x, "x")
    group_rank_world(group)
    alpha_t, kk = alpha_tensor(alpha, x.device), _rows_k(k, x.shape[0], x.device)
    n = int(_gather_meta(x, kk, alpha_t, group, what, check_nan=False).sum())
    return alpha_t, kk.clamp(K_EPS, max(n, 1) - K_EPS), n


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
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__}")
    alpha_t, kk, n = _soft_inputs(x, k, alpha, group, "sharded_soft_topk")
    if x.shape[0] == 0 or n == 0:
        return x * 0 + kk.sum().to(x.dtype) * 0
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
    section 3; ``SoftSAE.k_direction`` in one process): the global threshold, each shard's terms x_i f_i
    near it (relative to the global min |u|, one all-reduce MIN) decoded as in one process
    (``placement.decode_terms``), then one all-reduce SUM of the (R, d + 1) partial decodes and density sums.
    """
    alpha_t, kk, n = _soft_inputs(x, k, alpha, group, "sharded_gate_k_direction")
    R, d = x.shape[0], W_dec.shape[1]
    if R == 0 or n == 0:
        return W_dec.new_zeros(R, d)
    s = scale_of(alpha_t)[0]
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
        buf[:, :d] = decode_terms(vals, idx, W_dec.detach(), backend).double()
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

    ``idx`` are local column indices plus ``offset``, -1 for padding; ``vals`` differentiable in z;
    at most ``width`` per row. The kept entries are compacted in index order (a cumsum and a scatter),
    then only that (B, width) block is sorted (stable: equal values stay in index order).
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

    Returns ``vals, idx`` (B, min(max k, n_r)): values descending (ties by index), padded with
    ``idx = -1``, ``vals = 0``; ``idx`` LOCAL columns unless ``global_index``; ``vals`` differentiable
    in z. Collectives: the metadata all-gather and one all-gather of (B, max k) (value, index) pairs.
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

    Returns ``vals, idx, threshold``: this rank's kept entries as padded codes (values descending;
    ``idx`` LOCAL columns unless ``global_index``; width read back to the host) and the smallest kept
    value over all ranks (0-d float64, identical everywhere; NaN when nothing is kept), for BatchTopK's
    EMA threshold. Collectives: the metadata all-gather, one all-reduce MAX, two all-gathers of
    min(M, largest local size) candidates (values, flat indices).
    """
    _check_2d(z, "z")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if split not in ("latents", "rows"):
        raise ValueError(f"split must be 'latents' or 'rows', got {split!r}")
    rank, world = group_rank_world(group)
    B, n_r = z.shape
    sizes = _gather_meta(z, None, None, group, "sharded_batch_topk", check_nan=True, split=int(split == "latents"))
    if split == "latents":
        n, b_total, row_off, col_off = int(sizes.sum()), B, 0, _offsets(sizes, rank)
    else:
        n, b_total, row_off, col_off = n_r, int(sizes.sum()), _offsets(sizes, rank), 0
    m_total = k * b_total
    flat = z.detach().reshape(-1).to(torch.float64)
    cand = _top_m_mask(flat, m_total).nonzero().squeeze(1)  # positions in local flat order
    size = torch.tensor([float(z.numel())], dtype=torch.float64, device=z.device)
    c_pad = min(m_total, int(all_reduce_(size, dist.ReduceOp.MAX, group).item()))  # the largest local size
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


# ----------------------------------------------------------------------------- decode


def sharded_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None = None,
                   group: dist.ProcessGroup | None = None, backend: str = "auto") -> Tensor:
    """``x_hat = z @ W_dec_full + b_dec`` with the dictionary sharded over latents: vals, idx (B, K) this
    rank's codes with LOCAL indices into its shard ``W_dec`` (n_r, d), b_dec (d,) replicated or None.
    The ranks' ``sparse_decode`` partial results are summed by one all-reduce (backward: identity, see
    :func:`reduce_from_shards`): dW_dec and dvals are this rank's shard, db_dec is full.
    """
    group_rank_world(group)
    partial = sparse_decode(vals, idx, W_dec, None, backend=backend)
    out = reduce_from_shards(partial, group)
    return out if b_dec is None else out + b_dec
