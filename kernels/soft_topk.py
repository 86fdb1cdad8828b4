"""Triton Soft Top-K (LapSum) forward and backward.

Contract: docs/design.md ("Calling convention shared by all soft_topk backends"); math:
docs/math.md (section 1). ``x (R, n)`` contiguous, float16/bfloat16/float32 (computed in
float32) or float64 (computed in float64); ``k (R,)`` float64 in ``(0, n)``; ``t (R,)`` float64.

Forward: a persistent launch (launch_config.program_count programs, each looping over rows
p, p + P, ...; scratch per program, not per row); per row, [brackets] mark the passes over
the row in global memory:

1. [read] row max / min and ``M``, the elementwise max of the BLOCK-wide chunks: BLOCK
   *distinct* row entries (folded to <= 1024). NaN/inf in the row surface in max/min.
2. (on chip) ``L`` ~ the (floor(k)+2)-th largest entry of ``M``, by a 16-way bisection on
   counts. At least floor(k)+2 row entries are >= L, so t >= L - s F^-1(k/m) (design.md,
   "Threshold search"): with the top-k spread over many chunks, L sits just below the k-th
   largest value and the candidate set is about k entries.
3. [read] compaction: entries in [lower bound - 40 s, t_hi + 40 s) are appended to the program's
   scratch (order fixed by block prefix sums); entries above count as exactly 1, and those
   equal to the row minimum (post-ReLU zeros) are kept as one weighted group.
4. (scratch, L1/L2 sized) bracketed search for t (held as float64). Each iteration
   evaluates g at NP thresholds at once (sums in float32 around a pivot+offset split of t,
   rescaled by e^{min|u|}): the bracket shrinks at least (NP - 1)-fold, and for each
   threshold the quadratic in e^{t/s} that is exact while no entry crosses t gives a
   "segment step" (the sort-based closed form, without the sort). A short segment step that
   stays in its own segment is the answer. If the scratch overflowed, the iterations read the
   row instead (correct, slow: only for large k or large s).
5. [read + write] output p or x * p.

Rows with n <= launch_config.COMPACT_MIN skip 2-3 and search on the row itself (L1/L2 resident).

Backward, one program per row: [read x, grad where needed] S, A, C with the online min|u| rescaling,
then [read x, grad where needed, write dx] dx and ds. grad is loaded only where f > 0 (or
p > 0 when gated); everywhere else its coefficient is exactly 0, so at small s the backward
reads about k entries of grad.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .launch_config import MAX_ITERS, NP, program_count, soft_topk_config

__all__ = [
    "S_MIN",
    "launch_soft_topk_bwd",
    "launch_soft_topk_fwd",
    "launch_soft_topk_gate_sparse",
    "soft_topk_bwd_kernel",
    "soft_topk_fwd_kernel",
    "soft_topk_gate_sparse_kernel",
]

S_MIN = 1e-30  # s is clamped to >= S_MIN in-kernel (float64), so float32 1/s stays finite


@triton.jit
def _load_row_chunk(xrow, start, n, BLOCK: tl.constexpr, LARGEST: tl.constexpr, CDT: tl.constexpr,
                    EVICT: tl.constexpr):
    """Chunk [start, start + BLOCK) of a row: (idx, mask, x, y) with x in CDT (0 past n) and
    y = x (largest) or -x."""
    idx = start + tl.arange(0, BLOCK)
    msk = idx < n
    xv = tl.load(xrow + idx, mask=msk, other=0.0, eviction_policy=EVICT).to(CDT)
    y = xv
    if not LARGEST:
        y = -xv
    return idx, msk, xv, y


@triton.jit
def _laplace_cdf(u):
    e = 0.5 * tl.exp(-tl.abs(u))
    return tl.where(u < 0, e, 1.0 - e)


@triton.jit
def _eval_points(src_ptr, length, piv, off, inv_s, cut, hi1, ymin,
                 FROM_X: tl.constexpr, NEGATE: tl.constexpr, EXCLUDE: tl.constexpr,
                 NP: tl.constexpr, CB: tl.constexpr, CDT: tl.constexpr):
    """Statistics of g at NP thresholds t_j = piv_j + off_j (piv, off: (NP,) CDT).

    Reads ``length`` values from ``src_ptr`` (the candidate scratch, already signed, or the
    x row when FROM_X, then negated when NEGATE and, when EXCLUDE, restricted to
    ``cut <= y < hi1, y != ymin``). Returns (NP,) tensors: npos (int32, #{u >= 0}),
    mmin (min |u|), a = sum_{u>=0} e^{mmin-|u|}, b = sum_{u<0} e^{mmin-|u|}, above = min y
    with u >= 0, below = max y with u < 0.
    """
    INF: tl.constexpr = float("inf")
    offs = tl.arange(0, CB)
    npos = tl.zeros([NP], dtype=tl.int32)
    mrun = tl.full([NP], INF, CDT)
    a = tl.zeros([NP], dtype=CDT)
    b = tl.zeros([NP], dtype=CDT)
    above = tl.full([NP], INF, CDT)
    below = tl.full([NP], -INF, CDT)
    for start in range(0, length, CB):
        idx = start + offs
        msk = idx < length
        y = tl.load(src_ptr + idx, mask=msk, other=0.0).to(CDT)
        if FROM_X:
            if NEGATE:
                y = -y
            if EXCLUDE:
                msk = msk & (y >= cut) & (y < hi1) & (y != ymin)
        # y - piv is exact near t (Sterbenz): u keeps its accuracy where F is not saturated.
        u = ((y[None, :] - piv[:, None]) - off[:, None]) * inv_s
        m2 = msk[None, :]
        au = tl.where(m2, tl.abs(u), INF)
        pos = m2 & (u >= 0)
        neg = m2 & (u < 0)
        mnew = tl.minimum(mrun, tl.min(au, axis=1))
        muse = tl.where(mnew < INF, mnew, 0.0)
        e = tl.exp(muse[:, None] - au)
        r = tl.where(mrun < INF, tl.exp(muse - mrun), 0.0)
        a = a * r + tl.sum(tl.where(pos, e, 0.0), axis=1)
        b = b * r + tl.sum(tl.where(neg, e, 0.0), axis=1)
        npos += tl.sum(pos.to(tl.int32), axis=1)
        above = tl.minimum(above, tl.min(tl.where(pos, y[None, :], INF), axis=1))
        below = tl.maximum(below, tl.max(tl.where(neg, y[None, :], -INF), axis=1))
        mrun = mnew
    return npos, mrun, a, b, above, below


@triton.jit
def _add_group(npos, mrun, a, b, above, below, piv, off, inv_s, yg, cnt_g, CDT: tl.constexpr):
    """Fold cnt_g copies of the value yg into the _eval_points statistics."""
    INF: tl.constexpr = float("inf")
    has = cnt_g > 0
    u = ((yg - piv) - off) * inv_s
    au = tl.where(has, tl.abs(u), INF)
    pos = has & (u >= 0)
    neg = has & (u < 0)
    mnew = tl.minimum(mrun, au)
    muse = tl.where(mnew < INF, mnew, 0.0)
    e = cnt_g.to(CDT) * tl.exp(muse - au)
    r = tl.where(mrun < INF, tl.exp(muse - mrun), 0.0)
    a = a * r + tl.where(pos, e, 0.0)
    b = b * r + tl.where(neg, e, 0.0)
    npos += tl.where(pos, cnt_g, 0)
    above = tl.where(pos, tl.minimum(above, yg), above)
    below = tl.where(neg, tl.maximum(below, yg), below)
    return npos, mnew, a, b, above, below


@triton.jit
def _segment_step(c, la, lb, s):
    """Step dt = s ln z from t_j to the root of g within t_j's segment (float64 (NP,) each).

    There g(t_j + dt) - k = c - a z + b / z with z = e^{dt/s}, c = #{u >= 0} - k,
    a = sum_{u>=0} f = e^la, b = sum_{u<0} f = e^lb. Solved in logs so that nothing
    overflows or cancels: with r = 4ab / c^2, c > 0: z = c (1 + sqrt(1 + r)) / (2a);
    c < 0: z = 2b / (|c| (1 + sqrt(1 + r))); c = 0: z = sqrt(b / a).
    """
    LN2: tl.constexpr = 0.6931471805599453
    LN4: tl.constexpr = 1.3862943611198906
    cz = c == 0.0
    lc = tl.log(tl.where(cz, 1.0, tl.abs(c)))
    lr = LN4 + la + lb - 2.0 * lc
    lrp = tl.maximum(lr, 0.0)
    lrn = tl.minimum(lr, 0.0)
    # ln(1 + sqrt(1 + e^lr)) without overflow for large lr.
    l1q = tl.where(lr > 0.0,
                   0.5 * lrp + tl.log(tl.exp(-0.5 * lrp) + tl.sqrt(1.0 + tl.exp(-lrp))),
                   tl.log(1.0 + tl.sqrt(1.0 + tl.exp(lrn))))
    lz_pos = lc + l1q - LN2 - la
    lz_neg = LN2 + lb - lc - l1q
    lz = tl.where(c > 0.0, lz_pos, lz_neg)
    lz = tl.where(cz, 0.5 * (lb - la), lz)
    return lz * s


@triton.jit
def _safe_log(v):
    """ln v for v >= 0 (float64), -inf at 0 without evaluating log(0)."""
    pos = v > 0.0
    return tl.where(pos, tl.log(tl.where(pos, v, 1.0)), float("-inf"))


@triton.jit
def soft_topk_fwd_kernel(
    x_ptr, k_ptr, s_ptr, out_ptr, t_ptr, cand_ptr, R, n, cap,
    LARGEST: tl.constexpr, GATE: tl.constexpr, CDT: tl.constexpr,
    BLOCK: tl.constexpr, MB: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr,
    COMPACT: tl.constexpr, MAX_ITERS: tl.constexpr, S_MIN: tl.constexpr, WRITE: tl.constexpr = True,
):
    """Persistent: program p handles rows p, p + P, p + 2P, ... (P = number of programs).

    x_ptr: (R, n) fp16/bf16/fp32/fp64; k_ptr: (R,) fp64; s_ptr: (1,) float (s > 0, read
    as fp64 and clamped to >= S_MIN; NaN stays NaN); out_ptr: (R, n) dtype of x; t_ptr: (R,)
    fp64; cand_ptr: (P, cap) CDT scratch, one row per program (COMPACT).
    CDT: compute dtype (fp32, or fp64 for fp64 input). BLOCK: chunk of the row passes;
    MB: width M is folded to; CB: chunk of the search evaluations (NP x CB tiles).
    WRITE=False: t only, no pass 5 (the fused sparse gate writes its own output).
    """
    s_raw = tl.load(s_ptr).to(tl.float64)
    s = tl.where(s_raw < S_MIN, S_MIN, s_raw)
    # n may arrive as the constant 1 (launch-time specialisation): make it a tensor once.
    nf = (tl.zeros([], tl.float64) + n).to(tl.float64)
    crow = cand_ptr + tl.program_id(0).to(tl.int64) * cap
    for row in range(tl.program_id(0), R, tl.num_programs(0)):
        _soft_topk_fwd_row(x_ptr, k_ptr, out_ptr, t_ptr, crow, row, n, nf, cap, s,
                           LARGEST, GATE, CDT, BLOCK, MB, CB, NP, COMPACT, MAX_ITERS, WRITE)


# noinline: inlined into the persistent row loop, loop-invariant code motion hoisted
# BLOCK-wide values out of it and BLOCK 4096 spilled on sm_80 / sm_90 (compile gate).
@triton.jit(noinline=True)
def _soft_topk_fwd_row(
    x_ptr, k_ptr, out_ptr, t_ptr, crow, row, n, nf, cap, s,
    LARGEST: tl.constexpr, GATE: tl.constexpr, CDT: tl.constexpr,
    BLOCK: tl.constexpr, MB: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr,
    COMPACT: tl.constexpr, MAX_ITERS: tl.constexpr, WRITE: tl.constexpr,
):
    """One row of the forward; crow: this program's scratch (cap entries of CDT).

    The pieces (docs/math.md 1.4-1.6): _row_extremes (pass 1), _rank_lower_bound (on chip),
    _compact_candidates (pass 2), _search_threshold (scratch or row), _write_output (pass 3).
    """
    INF: tl.constexpr = float("inf")
    row = tl.zeros([], tl.int64) + row  # a tensor (the interpreter's loop counter is an int)
    xrow = x_ptr + row * n
    k = tl.load(k_ptr + row)
    inv_s = (1.0 / s).to(CDT)

    M, mx, mn, bad = _row_extremes(xrow, n, LARGEST, CDT, BLOCK)
    # Bracket (docs/math.md 1.4): g(t_lo) >= k >= g(t_hi).
    t_hi = mx + s * tl.maximum(tl.log(nf / (2.0 * k)), 0.0)
    t_lo = mn - s * tl.maximum(tl.log(nf / (2.0 * (nf - k))), 0.0)
    lo = t_lo
    n_one = 0
    n_min = 0
    cnt = 0
    ymin = mn.to(CDT)
    cut = tl.full([], -INF, CDT)
    hi1 = tl.full([], INF, CDT)
    if COMPACT:
        lo = _rank_lower_bound(M, k, s, t_lo, bad, CDT, BLOCK, MB)
        # Entries below lo - 40 s weigh < e^-40 / 2 in g for every t >= lo; above t_hi + 40 s,
        # they weigh 1 to within e^-40 / 2.
        cut = (lo - 40.0 * s).to(CDT)
        hi1 = (t_hi + 40.0 * s).to(CDT)
        cnt, n_one, n_min = _compact_candidates(xrow, crow, n, cap, cut, hi1, ymin, LARGEST, CDT, BLOCK)
    t_fin = _search_threshold(xrow, crow, n, cap, k, s, inv_s, lo, t_hi, bad, cut, hi1, ymin, cnt, n_one, n_min,
                              LARGEST, CDT, CB, NP, COMPACT, MAX_ITERS)
    # n = 1: p = k exactly, t = y - s F^-1(k).
    if n == 1:
        finv1 = tl.where(k < 0.5, tl.log(2.0 * k), -tl.log(2.0 * (1.0 - k)))
        t_fin = mx - s * finv1
    t_fin = tl.where(bad, float("nan"), t_fin)
    tl.store(t_ptr + row, t_fin)
    if WRITE:
        _write_output(xrow, out_ptr + row * n, n, t_fin, k, inv_s, bad, LARGEST, GATE, CDT, BLOCK)


@triton.jit
def _row_extremes(xrow, n, LARGEST: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over the row. Returns M (BLOCK,) CDT, the chunk-wise max (BLOCK distinct row
    entries), the row max and min of y as float64, and ``bad`` (the row holds NaN or +-inf).

    NaN propagates through both accumulators and +-inf reaches one of them, so the non-finite
    flag costs no accumulator of its own.
    """
    INF: tl.constexpr = float("inf")
    NANP: tl.constexpr = tl.PropagateNan.ALL
    offs = tl.arange(0, BLOCK)
    M = tl.full([BLOCK], -INF, CDT)
    mn_v = tl.full([BLOCK], INF, CDT)
    for start in range(0, n, BLOCK):
        idx, msk, _, y = _load_row_chunk(xrow, start, n, BLOCK, LARGEST, CDT, "evict_last")
        M = tl.maximum(M, tl.where(msk, y, -INF), propagate_nan=NANP)
        mn_v = tl.minimum(mn_v, tl.where(msk, y, INF), propagate_nan=NANP)
    lane_ok = offs < n
    bad = tl.sum(tl.where(lane_ok, M, 0.0) * 0.0 + tl.where(lane_ok, mn_v, 0.0) * 0.0) != 0.0
    return M, tl.max(M).to(tl.float64), tl.min(mn_v).to(tl.float64), bad


@triton.jit
def _rank_lower_bound(M, k, s, t_lo, bad, CDT: tl.constexpr, BLOCK: tl.constexpr, MB: tl.constexpr):
    """A lower end of the bracket from a rank (docs/math.md 1.4), on chip, float64 scalar.

    L ~ the m-th largest of M folded to MB groups, m = floor(k) + 2, by a 16-way bisection on
    counts; at least m row entries are >= L, so t >= L - s F^-1(k / m). Falls back to t_lo.
    """
    INF: tl.constexpr = float("inf")
    m_need = (tl.floor(k) + 2.0).to(tl.int32)
    Mr = tl.max(tl.reshape(M, (MB, BLOCK // MB)), axis=1)
    n_groups = tl.sum((Mr > -INF).to(tl.int32))
    sel_lo = tl.min(tl.where(Mr > -INF, Mr, INF))
    sel_hi = tl.max(Mr)
    top_ok = tl.sum((Mr >= sel_hi).to(tl.int32)) >= m_need
    sel_lo = tl.where(top_ok, sel_hi, sel_lo)
    s_c = s.to(CDT)
    jt = (tl.arange(0, 16) + 1).to(CDT) * (1.0 / 17.0)
    rnd = 0
    while (rnd < 8) & (sel_hi - sel_lo > s_c) & (n_groups >= m_need) & ~bad:
        th = sel_lo + (sel_hi - sel_lo) * jt
        c_th = tl.sum((Mr[None, :] >= th[:, None]).to(tl.int32), axis=1)
        ok = c_th >= m_need
        new_lo = tl.max(tl.where(ok, th, sel_lo))
        sel_hi = tl.min(tl.where(ok, sel_hi, th))
        sel_lo = new_lo
        rnd += 1
    have_L = (n_groups >= m_need) & ~bad
    # g(L - d) >= m F(d/s) >= k for d = s F^-1(k/m).
    q = k / m_need.to(tl.float64)
    finv = tl.where(q < 0.5, tl.log(2.0 * q), -tl.log(2.0 * (1.0 - q)))
    lo_L = sel_lo.to(tl.float64) - s * (tl.maximum(finv, 0.0) + 1e-3)
    return tl.where(have_L, tl.maximum(t_lo, lo_L), t_lo)


@triton.jit
def _compact_candidates(xrow, crow, n, cap, cut, hi1, ymin,
                        LARGEST: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: append the entries y in [cut, hi1), y != ymin, to the scratch ``crow`` in row
    order (block prefix sums: deterministic; at most ``cap`` stored). Returns (count of such
    entries, which may exceed cap; #{y >= hi1}, counted as exactly 1; #{y == ymin in range},
    kept as one weighted group: the post-ReLU zeros).
    """
    # The previous row's search may still be reading the scratch in other threads.
    tl.debug_barrier()
    cnt = 0
    one_v = tl.zeros([BLOCK], dtype=tl.int32)
    min_v = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        idx, msk, _, y = _load_row_chunk(xrow, start, n, BLOCK, LARGEST, CDT, "evict_last")
        inside = msk & (y >= cut) & (y < hi1)
        is_min = inside & (y == ymin)
        is_c = inside & (y != ymin)
        ic = is_c.to(tl.int32)
        pos = cnt + tl.cumsum(ic, axis=0) - 1
        tl.store(crow + pos, y, mask=is_c & (pos < cap))
        cnt += tl.sum(ic)
        one_v += (msk & (y >= hi1)).to(tl.int32)
        min_v += is_min.to(tl.int32)
    # The search reads the scratch through other threads than the ones that wrote it.
    tl.debug_barrier()
    return cnt, tl.sum(one_v), tl.sum(min_v)


@triton.jit
def _search_threshold(xrow, crow, n, cap, k, s, inv_s, lo, hi, bad, cut, hi1, ymin, cnt, n_one, n_min,
                      LARGEST: tl.constexpr, CDT: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr,
                      COMPACT: tl.constexpr, MAX_ITERS: tl.constexpr):
    """Bracketed search for t with g(t) = k on [lo, hi] (float64 scalar; docs/math.md 1.5-1.6).

    Each iteration evaluates g at NP trial points (from the scratch when the candidates fit,
    else from the row) and each point's segment step; a short step that stays in its own
    segment is the answer, else the bracket shrinks at least (NP - 1)-fold.
    """
    INF: tl.constexpr = float("inf")
    LN2: tl.constexpr = 0.6931471805599453
    # t resolution: relative to s (what p sees) plus a few float64 ulps of t itself.
    if CDT == tl.float64:
        tol = 1e-13 * s + 8.9e-16 * tl.abs(hi)
        dt_final = 1e3 * s
    else:
        tol = 2e-7 * s + 8.9e-16 * tl.abs(hi)
        dt_final = 4.0 * s
    jn = tl.arange(0, NP)
    jf = jn.to(tl.float64)
    tp = lo + (hi - lo) * (jf + 1.0) / (NP + 1.0)
    done = bad | (n == 1)
    t_fin = (lo + hi) * 0.5
    it = 0
    while (it < MAX_ITERS) & ~done:
        piv = tp.to(CDT)
        off = (tp - piv.to(tl.float64)).to(CDT)
        if COMPACT:
            if cnt <= cap:
                npos, mrun, a, b, above, below = _eval_points(
                    crow, cnt, piv, off, inv_s, cut, hi1, ymin,
                    FROM_X=False, NEGATE=False, EXCLUDE=False, NP=NP, CB=CB, CDT=CDT)
            else:
                npos, mrun, a, b, above, below = _eval_points(
                    xrow, n, piv, off, inv_s, cut, hi1, ymin,
                    FROM_X=True, NEGATE=not LARGEST, EXCLUDE=True, NP=NP, CB=CB, CDT=CDT)
            npos, mrun, a, b, above, below = _add_group(
                npos, mrun, a, b, above, below, piv, off, inv_s, ymin, n_min, CDT)
        else:
            npos, mrun, a, b, above, below = _eval_points(
                xrow, n, piv, off, inv_s, cut, hi1, ymin,
                FROM_X=True, NEGATE=not LARGEST, EXCLUDE=False, NP=NP, CB=CB, CDT=CDT)
        c = (npos + n_one).to(tl.float64) - k
        mm = mrun.to(tl.float64)
        la = _safe_log(a.to(tl.float64)) - (mm + LN2)  # ln sum_{u>=0} f
        lb = _safe_log(b.to(tl.float64)) - (mm + LN2)  # ln sum_{u<0} f
        gk = c - tl.exp(la) + tl.exp(lb)  # g(t_j) - k
        gk = tl.where((gk == 0.0) & (c == 0.0), lb - la, gk)  # tails underflowed: compare logs
        hit = gk == 0.0
        lo = tl.maximum(lo, tl.max(tl.where(gk > 0.0, tp, -INF)))
        hi = tl.minimum(hi, tl.min(tl.where(gk < 0.0, tp, INF)))
        # Segment step: exact for the true g while no entry crosses, i.e. if it stays in
        # (below_j, above_j]. Its rounding error grows with its length (u carries a relative
        # error ~eps * |u|), so only a short one is final; a long one seeds the next round.
        dt = _segment_step(c, la, lb, s)
        tn = tp + dt
        adt = tl.abs(dt)
        in_br = (tn >= lo - tol) & (tn <= hi + tol)
        in_seg = (tn > below.to(tl.float64)) & (tn <= above.to(tl.float64))
        ok = (in_br & ((in_seg & (adt <= dt_final)) | (adt <= tol))) | hit
        adt = tl.where(hit, 0.0, adt)
        tn = tl.where(hit, tp, tn)
        any_ok = tl.max(ok.to(tl.int32)) > 0
        best = tl.min(tl.where(ok, adt, INF))
        jsel = tl.min(tl.where(ok & (adt == best), jn, NP))
        t_ok = tl.sum(tl.where(jn == jsel, tn, 0.0))
        small = (hi - lo) <= tol
        done = any_ok | small
        t_fin = tl.where(any_ok, t_ok, 0.5 * (lo + hi))
        # Next thresholds: the segment steps from the points that now bound the bracket (the
        # fast path once close), and NP-2 evenly spaced interior points (guaranteed shrink).
        j_lo = tl.max(tl.where(gk > 0.0, jn, -1))
        j_hi = tl.min(tl.where(gk < 0.0, jn, NP))
        mid = 0.5 * (lo + hi)
        p_lo = tl.sum(tl.where(jn == j_lo, tn, 0.0))
        p_hi = tl.sum(tl.where(jn == j_hi, tn, 0.0))
        p_lo = tl.where((j_lo >= 0) & (p_lo > lo) & (p_lo < hi), p_lo, mid)
        p_hi = tl.where((j_hi < NP) & (p_hi > lo) & (p_hi < hi), p_hi, mid)
        lin = lo + (hi - lo) * (jf - 1.0) / (NP - 1.0)
        tp = tl.where(jn == 0, p_lo, tl.where(jn == 1, p_hi, lin))
        it += 1
    # Out of iterations (not seen in practice): t_fin is already the bracket midpoint.
    return t_fin


@triton.jit
def _write_output(xrow, orow, n, t_fin, k, inv_s, bad,
                  LARGEST: tl.constexpr, GATE: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 3: p = F((y - t) / s) (or x * p when GATE) into ``orow``; p = k when n == 1, NaN rows stay NaN."""
    piv1 = t_fin.to(CDT)
    off1 = (t_fin - piv1.to(tl.float64)).to(CDT)
    k_c = k.to(CDT)
    for start in range(0, n, BLOCK):
        idx, msk, xv, y = _load_row_chunk(xrow, start, n, BLOCK, LARGEST, CDT, "evict_first")
        p = _output_chunk(xv, y, piv1, off1, inv_s, k_c, n, bad, GATE)
        tl.store(orow + idx, p.to(orow.dtype.element_ty), mask=msk)


@triton.jit
def _output_chunk(xv, y, piv1, off1, inv_s, k_c, n, bad, GATE: tl.constexpr):
    """p = F((y - t) / s) (x * p when GATE) of one chunk, t = piv1 + off1; k when n == 1, NaN for bad rows."""
    p = _laplace_cdf(((y - piv1) - off1) * inv_s)
    p = tl.where(n == 1, k_c, p)
    if GATE:
        p = xv * p
    return tl.where(bad, float("nan"), p)


@triton.jit
def soft_topk_gate_sparse_kernel(
    x_ptr, k_ptr, s_ptr, t_ptr, vals_ptr, idx_ptr, cnt_ptr, n, width,
    LARGEST: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, S_MIN: tl.constexpr, WRITE: tl.constexpr,
):
    """One program per row: the non-zeros of the gate x * F((y - t) / s) (the values the dense
    gate writes, in x's dtype) in increasing index order into vals / idx (R, width), padded with
    0 / -1; cnt (R,) int32 gets the row's full count (which may exceed width: the lowest indices
    are kept). WRITE=False only counts. t (R,) float64 from the forward kernel.
    """
    row = tl.program_id(0).to(tl.int64)
    s_raw = tl.load(s_ptr).to(tl.float64)
    s = tl.where(s_raw < S_MIN, S_MIN, s_raw)
    inv_s = (1.0 / s).to(CDT)
    t_fin = tl.load(t_ptr + row)
    bad = t_fin != t_fin
    piv1 = t_fin.to(CDT)
    off1 = (t_fin - piv1.to(tl.float64)).to(CDT)
    k_c = tl.load(k_ptr + row).to(CDT)
    xrow = x_ptr + row * n
    vrow = vals_ptr + row * width
    irow = idx_ptr + row * width
    cnt = 0
    for start in range(0, n, BLOCK):
        idx, msk, xv, y = _load_row_chunk(xrow, start, n, BLOCK, LARGEST, CDT, "evict_first")
        g = _output_chunk(xv, y, piv1, off1, inv_s, k_c, n, bad, True).to(vals_ptr.dtype.element_ty)
        nz = msk & (g != 0)  # NaN != 0: a bad row lists every entry, as dense-then-compact does
        nzi = nz.to(tl.int32)
        if WRITE:
            pos = cnt + tl.cumsum(nzi, axis=0) - 1
            keep = nz & (pos < width)
            tl.store(vrow + pos, g, mask=keep)
            tl.store(irow + pos, idx.to(tl.int64), mask=keep)
        cnt += tl.sum(nzi)
    tl.store(cnt_ptr + row, cnt)
    if WRITE:
        for start in range(0, width, BLOCK):
            j = start + tl.arange(0, BLOCK)
            pad = (j < width) & (j >= cnt)
            tl.store(vrow + j, tl.zeros([BLOCK], dtype=vals_ptr.dtype.element_ty), mask=pad)
            tl.store(irow + j, tl.full([BLOCK], -1, tl.int64), mask=pad)


@triton.jit
def soft_topk_bwd_kernel(
    grad_ptr, x_ptr, t_ptr, s_ptr, dx_ptr, dk_ptr, ds_ptr, n,
    LARGEST: tl.constexpr, GATE: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr,
    S_MIN: tl.constexpr,
):
    """One program per row.

    grad_ptr, x_ptr: (R, n) same dtype; t_ptr: (R,) fp64; s_ptr: (1,) float (read as fp64,
    clamped to >= S_MIN); dx_ptr: (R, n) dtype of x; dk_ptr, ds_ptr: (R,) fp64.
    """
    INF: tl.constexpr = float("inf")
    row = tl.program_id(0)
    base = row.to(tl.int64) * n
    xrow = x_ptr + base
    grow = grad_ptr + base
    s_raw = tl.load(s_ptr).to(tl.float64)
    s = tl.where(s_raw < S_MIN, S_MIN, s_raw)
    t = tl.load(t_ptr + row)
    inv_s = (1.0 / s).to(CDT)
    piv = t.to(CDT)
    off = (t - piv.to(tl.float64)).to(CDT)

    # ---- pass 1: S, A, C scaled by e^{min|u|} (online, like a streaming softmax), so the
    # ratios A/S, C/S survive when every f underflows (t in a wide gap).
    mrun = tl.full([], INF, CDT)
    S = tl.zeros([], dtype=tl.float64)
    A = tl.zeros([], dtype=tl.float64)
    C = tl.zeros([], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx, msk, xv, y = _load_row_chunk(xrow, start, n, BLOCK, LARGEST, CDT, "evict_last")
        u = ((y - piv) - off) * inv_s
        au = tl.where(msk, tl.abs(u), INF)
        mnew = tl.minimum(mrun, tl.min(au))
        muse = tl.where(mnew < INF, mnew, 0.0)
        e = tl.exp(muse - au)
        # e == 0: that entry's weight in A/S underflows as well, so its grad is not needed.
        gr = tl.load(grow + idx, mask=msk & (e > 0), other=0.0).to(CDT)
        g = gr
        if GATE:
            g = gr * xv
        r = tl.where(mrun < INF, tl.exp(muse - mrun), 0.0).to(tl.float64)
        # xv * 0 is NaN exactly for non-finite x: the row's NaN flag rides on S.
        S = S * r + tl.sum(e + xv * 0.0).to(tl.float64)
        A = A * r + tl.sum(e * g).to(tl.float64)
        C = C * r + tl.sum(e * u).to(tl.float64)
        mrun = mnew
    bad = (t != t) | (S != S)
    a_over_s = A / S
    c_over_s = C / S
    NAN: tl.constexpr = float("nan")
    tl.store(dk_ptr + row, tl.where(bad, NAN, a_over_s))

    # ---- pass 2: dx = sign (f / s) (g - A/S) (+ grad p when gated), and
    # ds = sum g (f / s) (C/S - u) in that form: A C / S - D would cancel catastrophically
    # when one entry dominates f.
    aos = a_over_s.to(CDT)
    cos = c_over_s.to(CDT)
    ds = tl.zeros([], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx, msk, xv, y = _load_row_chunk(xrow, start, n, BLOCK, LARGEST, CDT, "evict_first")
        u = ((y - piv) - off) * inv_s
        f = 0.5 * tl.exp(-tl.abs(u))
        if GATE:
            p = _laplace_cdf(u)
            need = msk & ((f > 0) | (p > 0))
        else:
            need = msk & (f > 0)
        gr = tl.load(grow + idx, mask=need, other=0.0, eviction_policy="evict_first").to(CDT)
        g = gr
        if GATE:
            g = gr * xv
        fs = f * inv_s
        ds += tl.sum(tl.where(need, g * fs * (cos - u), 0.0)).to(tl.float64)
        dx = fs * (g - aos)
        if not LARGEST:
            dx = -dx
        if GATE:
            dx += gr * p
        dx = tl.where(bad, NAN, dx)
        tl.store(dx_ptr + base + idx, dx.to(dx_ptr.dtype.element_ty), mask=msk)
    tl.store(ds_ptr + row, tl.where(bad, NAN, ds))


# --------------------------------------------------------------------------------- launchers


def _compute_dtype(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def scale_tensor(s: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """s as a (1,) tensor on ``device`` for the kernels' s_ptr: a Python float is copied there; a
    0-d / (1,) floating tensor is used as is (no host sync; the kernels read it as float64)."""
    if isinstance(s, torch.Tensor):
        if s.numel() != 1 or not s.is_floating_point():
            raise ValueError(f"s: expected a float or a 1-element floating tensor, got {tuple(s.shape)} {s.dtype}")
        if s.device != device:
            raise ValueError(f"s: tensor on {s.device}, expected x's device {device}")
        return s.reshape(1)
    return torch.full((1,), float(s), dtype=torch.float64, device=device)


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's device for the launch."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def launch_soft_topk_fwd(
    x: torch.Tensor, k: torch.Tensor, s: float | torch.Tensor, largest: bool, gate: bool,
    *, block: int | None = None, compact: bool | None = None, cap: int | None = None,
    programs: int | None = None, write: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, n) contiguous fp16/bf16/fp32/fp64, k (R,) fp64 in (0, n), s > 0 (a float, or a
    0-d / (1,) floating tensor on x's device).

    Returns out (R, n) in x.dtype (p, or x * p when ``gate``) and t (R,) fp64. The keyword
    arguments override the tuning choices (tests use them to reach every code path). The
    launch is persistent: ``programs`` (default launch_config.program_count) programs loop over
    the rows, each with ``cap`` scratch entries when compacting: (programs, cap) extra memory.
    ``write=False``: t only (``out`` is then an empty (0,) placeholder, no (R, n) output).
    """
    x = x.contiguous()
    R, n = x.shape
    out = torch.empty_like(x) if write else x.new_empty(0)
    t = torch.empty(R, dtype=torch.float64, device=x.device)
    if R == 0 or n == 0:
        return out, t
    k = k.to(device=x.device, dtype=torch.float64).contiguous()
    s_t = scale_tensor(s, x.device)
    cfg = soft_topk_config(n, x.dtype, block=block, compact=compact, cap=cap)
    wide = x.dtype == torch.float64
    with _on_device(x):
        # Scratch only bounds the programs when it exists; without it, one program per row.
        P = R if not cfg.compact else (programs or program_count(R, x.device, cfg.num_warps))
        P = max(1, min(R, programs or P))
        cand = torch.empty((P, cfg.cap) if cfg.compact else (1,), dtype=torch.float64 if wide else torch.float32,
                           device=x.device)
        soft_topk_fwd_kernel[(P,)](
            x, k, s_t, out, t, cand, R, n, cfg.cap,
            LARGEST=bool(largest), GATE=bool(gate), CDT=_compute_dtype(x), BLOCK=cfg.block, MB=cfg.mb,
            CB=cfg.cb, NP=NP, COMPACT=cfg.compact, MAX_ITERS=MAX_ITERS, S_MIN=S_MIN, WRITE=bool(write),
            num_warps=cfg.num_warps,
        )
    return out, t


def launch_soft_topk_gate_sparse(
    x: torch.Tensor, k: torch.Tensor, s: float | torch.Tensor, largest: bool, max_count: int | None,
    *, block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zeros of the gate x * soft_topk(x, k, s) without a dense (R, n) output.

    x (R, n) contiguous fp16/bf16/fp32/fp64, k (R,) fp64 in (0, n). Returns vals (R, W) in x.dtype,
    idx (R, W) int64 (increasing index order, -1 = pad) and t (R,) fp64, the same numbers as the
    dense gate followed by ``nonzero_per_row``. W = ``min(max_count, n)``, or without ``max_count``
    the largest row count: one counting pass and a read-back of its maximum (a host sync). Launches:
    the forward kernel for t (WRITE=False), [the counting pass], the writing pass.
    """
    x = x.contiguous()
    R, n = x.shape
    _, t = launch_soft_topk_fwd(x, k, s, largest, True, write=False)
    blk = block or min(1024, triton.next_power_of_2(max(n, 16)))
    cnt = torch.empty(R, dtype=torch.int32, device=x.device)
    k = k.to(device=x.device, dtype=torch.float64).contiguous()
    s_t = scale_tensor(s, x.device)
    cdt = _compute_dtype(x)

    def run(vals: torch.Tensor, idx: torch.Tensor, width: int, write: bool) -> None:
        soft_topk_gate_sparse_kernel[(R,)](x, k, s_t, t, vals, idx, cnt, n, width, LARGEST=bool(largest), CDT=cdt,
                                           BLOCK=blk, S_MIN=S_MIN, WRITE=write, num_warps=4)

    with _on_device(x):
        if max_count is None:
            width = 0
            if R and n:
                run(x.new_empty(1), cnt.new_empty(1, dtype=torch.int64), 0, False)  # placeholders, not written
                width = int(cnt.max())
        else:
            width = min(int(max_count), n)
        vals = x.new_empty(R, width)
        idx = torch.empty(R, width, dtype=torch.int64, device=x.device)
        if R and n and width:
            run(vals, idx, width, True)
    return vals, idx, t


def launch_soft_topk_bwd(
    grad: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: float | torch.Tensor, largest: bool, gate: bool,
    *, block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad, x (R, n) contiguous, same dtype; t (R,) fp64 from the forward; s > 0 (a float,
    or a 0-d / (1,) floating tensor on x's device).

    Returns dx (R, n) in x.dtype, dk (R,) fp64, ds (R,) fp64 (per row, w.r.t. s).
    """
    x = x.contiguous()
    R, n = x.shape
    dx = torch.empty_like(x)
    dk = torch.empty(R, dtype=torch.float64, device=x.device)
    ds = torch.empty(R, dtype=torch.float64, device=x.device)
    if R == 0 or n == 0:
        return dx, dk, ds
    grad = grad.to(x.dtype).contiguous()
    t = t.to(device=x.device, dtype=torch.float64).contiguous()
    s_t = scale_tensor(s, x.device)
    cfg = soft_topk_config(n, x.dtype, block=block)
    with _on_device(x):
        soft_topk_bwd_kernel[(R,)](
            grad, x, t, s_t, dx, dk, ds, n,
            LARGEST=bool(largest), GATE=bool(gate), CDT=_compute_dtype(x), BLOCK=cfg.block, S_MIN=S_MIN,
            num_warps=cfg.num_warps,
        )
    return dx, dk, ds
