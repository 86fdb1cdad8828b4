"""Reference sparse encoder backward: densify the (dvals, idx) pairs into dpre, then two GEMMs.

The encoder pre-activations are ``pre = x @ W.T + b`` (B, n). When their gradient ``dpre`` is
non-zero only at the pairs ``(b, idx[b, j])`` with values ``dvals[b, j]`` (padded layout, idx -1 =
padding), ``dx = dpre @ W``, ``dW = dpre.T @ x`` and ``db = dpre.sum(0)`` (docs/math.md, section
"Sparse encoder backward"). This builds the dense (B, n) dpre on purpose: it is the
computation every sparse backend must equal. Half types are accumulated in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softsae.ops.sparse_decode_ref import _acc_dtype, densify


def sparse_encoder_bwd_ref(
    dvals: Tensor, idx: Tensor, x: Tensor, W: Tensor, need_x: bool, need_W: bool, need_b: bool,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """dx (B, d) in x.dtype, dW (n, d) and db (n,) in W.dtype; a grad not needed is empty.

    ``deterministic`` is accepted for signature parity (the dense reference always is).
    """
    del deterministic
    acc = _acc_dtype(W.dtype)
    g = densify(dvals, idx, W.shape[0], acc)
    dx = (g @ W.to(acc)).to(x.dtype) if need_x else x.new_empty(0)
    dW = (g.T @ x.to(acc)).to(W.dtype) if need_W else W.new_empty(0)
    db = g.sum(0).to(W.dtype) if need_b else W.new_empty(0)
    return dx, dW, db


def compact_nonzero_ref(grad: Tensor, pre: Tensor | None, max_width: int = -1) -> tuple[Tensor, Tensor, int]:
    """(vals, idx, K): padded (B, K) non-zeros of ``grad * (pre > 0)`` (of ``grad`` when pre is
    None), per row in increasing index order; K = the largest row count; padding (0, -1).
    When ``max_width >= 0`` and K > max_width, vals and idx are empty (0, 0) (K is still returned)."""
    g = grad if pre is None else torch.where(pre > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    nz = g != 0
    B, n = g.shape
    counts = nz.sum(1)
    K = int(counts.max()) if g.numel() else 0
    if 0 <= max_width < K:
        return g.new_empty(0, 0), torch.empty(0, 0, dtype=torch.int64, device=g.device), K
    rows, cols = nz.nonzero(as_tuple=True)  # row-major: rows ascending, cols ascending per row
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=g.device) - starts[rows]
    vals = g.new_zeros(B, K)
    idx = torch.full((B, K), -1, dtype=torch.int64, device=g.device)
    vals[rows, pos] = g[rows, cols]
    idx[rows, pos] = cols
    return vals, idx, K
