"""Hard top-k with a per-row k, in the padded (B, K_max) layout the sparse decoder reads.

    vals, idx = topk_per_row(z, k)

Row b keeps its ``k[b]`` largest entries. Exact, with a fixed tie rule: among equal values the
lower index wins. Output order per row: values descending, ties by increasing index; then
padding (``idx = -1``, ``vals = 0``) up to ``K_max = max(k)``. ``vals`` is differentiable
w.r.t. z (a gather).

Host-device syncs on CUDA: ``max(k)`` of a tensor k must be read back to size the output,
unless a static ``k_max`` is given (then K_max = k_max and nothing is read back). The NaN
check reads back too, so on CUDA it runs only when ``check_nan=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_per_row(z: Tensor, k, k_max: int | None = None, check_nan: bool | None = None) -> tuple[Tensor, Tensor]:
    """z (B, n) float; k an int or a (B,) tensor (floored, clamped to [0, n]).

    Args:
        k_max: static output width (clipped to n); rows asking for more keep their k_max
            largest. None: max(k) (a host read-back when k is a tensor on CUDA).
        check_nan: raise on NaN in z. None: only for CPU tensors (a read-back on CUDA).

    Returns vals (B, K_max) in z.dtype and idx (B, K_max) int64.
    """
    if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"z must be a 2-D float tensor (B, n), got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    B, n = z.shape
    if isinstance(k, Tensor):
        if k.numel() != B and k.numel() != 1:
            raise ValueError(f"k must have one value per row ({B}), got shape {tuple(k.shape)}")
        kk = k.reshape(-1).to(z.device).floor().to(torch.int64).expand(B)
    elif isinstance(k, (int, float)) and not isinstance(k, bool):
        kk = torch.full((B,), int(k), dtype=torch.int64, device=z.device)
    else:
        raise TypeError(f"k must be an int or a tensor, got {type(k).__name__}")
    if k_max is not None:
        if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 0:
            raise ValueError(f"k_max must be an int >= 0 or None, got {k_max!r}")
        k_max = min(k_max, n)
        kk = kk.clamp(0, k_max)
    else:
        kk = kk.clamp(0, n)
        if not isinstance(k, Tensor):
            k_max = min(max(int(k), 0), n) if B else 0  # static, no read-back
        else:
            k_max = int(kk.max()) if B else 0
    if check_nan is None:
        check_nan = z.device.type == "cpu" and not torch.compiler.is_compiling()
    fast_cpu = z.device.type == "cpu" and not torch.compiler.is_compiling() and k_max > 0
    if check_nan and not fast_cpu and torch.isnan(z).any():  # (the CPU path checks its own top-1)
        raise ValueError("z contains NaN; top-k of a NaN row is undefined")
    if k_max == 0:
        return z.new_zeros(B, 0), torch.zeros(B, 0, dtype=torch.int64, device=z.device)

    if fast_cpu:
        return _topk_cpu(z, kk, k_max, check_nan)
    return _topk_exact(z, kk, k_max)


def _topk_exact(z: Tensor, kk: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """The tie rule applied on the whole (B, n) row: several dense passes, no data-dependent shapes
    (no host sync on CUDA)."""
    B, n = z.shape
    # The k-th largest value v of each row; keep everything > v, then the lowest-index ties.
    top = torch.topk(z.detach(), k_max, dim=-1, sorted=True).values
    v = top.gather(1, (kk - 1).clamp(min=0)[:, None])
    above = z > v
    tie = z == v
    need = kk[:, None] - above.sum(dim=-1, keepdim=True)
    keep = (above | (tie & (tie.cumsum(dim=-1) <= need))) & (kk[:, None] > 0)

    # Compact kept positions (increasing index), then order by value, stable keeps index order.
    key = torch.where(keep, n - torch.arange(n, device=z.device), 0)
    keys, idx = torch.topk(key, k_max, dim=-1, sorted=True)
    valid = keys > 0
    vals_sel = z.gather(1, idx)
    sort_key = torch.where(valid, vals_sel.detach(), float("-inf"))
    order = torch.sort(sort_key, dim=-1, descending=True, stable=True).indices
    idx, valid = idx.gather(1, order), valid.gather(1, order)
    vals = torch.where(valid, z.gather(1, idx), 0)
    return vals, torch.where(valid, idx, -1)


def _topk_cpu(z: Tensor, kk: Tensor, k_max: int, check_nan: bool = True) -> tuple[Tensor, Tensor]:
    """Same result as ``_topk_exact`` from one ``torch.topk`` of width k_max + 1 and (B, k_max) work.

    A row's kept set is ambiguous only when its k-th and (k+1)-th largest values are equal (a tie
    at the boundary); such rows (rare for real-valued data) go through ``_topk_exact``. Elsewhere
    the k_max + 1 largest are re-ordered by (value descending, index ascending), which is the tie
    rule inside the kept set. Reads ``any()`` of the tie mask back: CPU only. ``check_nan``: a row
    holding NaN has it first in its sorted top-k (topk orders NaN above every number), so checking
    the (B,) top-1 values finds it without a pass over (B, n).
    """
    B, n = z.shape
    width = min(k_max + 1, n)
    zd = z.detach()
    tv, ti = torch.topk(zd, width, dim=-1, sorted=True)
    if check_nan and bool(torch.isnan(tv[:, 0]).any()):
        raise ValueError("z contains NaN; top-k of a NaN row is undefined")
    tied = (kk > 0) & (kk < n) & (tv.gather(1, (kk - 1).clamp(min=0)[:, None]) ==
                                  tv.gather(1, kk.clamp(max=width - 1)[:, None])).squeeze(1)
    idx = ti[:, :k_max].sort(dim=-1).values  # index ascending, then a stable sort by value
    order = torch.sort(zd.gather(1, idx), dim=-1, descending=True, stable=True).indices
    idx = idx.gather(1, order)
    valid = torch.arange(k_max, device=z.device)[None, :] < kk[:, None]
    vals = torch.where(valid, z.gather(1, idx), 0)
    idx = torch.where(valid, idx, -1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        v_t, i_t = _topk_exact(z[rows], kk[rows], k_max)
        vals = vals.index_put((rows,), v_t)
        idx = idx.index_put((rows,), i_t)
    return vals, idx
