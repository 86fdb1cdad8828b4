"""Where a model's (B, n) activation matrix lives: the one-process placement, called by the models.

Every selection, decode and batch statistic of ``softsae.models`` goes through the model's
``latents`` placement. :class:`Local` (the default; all rows and all n latents in this process)
calls the ops directly and adds nothing. ``softsae.distributed.placement`` has the same methods over
a process group: ``ShardedLatents`` (dictionary mode: each rank holds n/W latents, rows
replicated; global soft top-k threshold, global top-k / BatchTopK, all-reduced partial decodes,
the copy-to/reduce-from autograd pair) and ``ShardedRows`` (data mode: each rank holds its rows of
the global batch; global BatchTopK, global batch means). So the one model class runs every fast
path on each shard, and a speed change is made once.

Shapes: ``pre`` (B, n_local) post-ReLU activations, ``k`` per-row budgets (B,) or a number, ``W``
(n_local, d) decoder rows, ``vals``/``idx`` (B, K) padded codes with LOCAL indices (-1 = padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softsae.ops.soft_gate_dk import soft_gate_dk
from softsae.ops.soft_topk import nonzero_per_row, soft_topk, soft_topk_gate
from softsae.ops.sparse_decode import sparse_decode
from softsae.ops.topk_per_row import topk_per_row

__all__ = ["LOCAL", "Local", "decode_terms", "padded_to_dense"]


def padded_to_dense(vals: Tensor, idx: Tensor, n: int) -> Tensor:
    """The dense (B, n) matrix of padded codes (differentiable w.r.t. vals)."""
    full = vals.new_zeros(vals.shape[0], n + 1)
    return full.scatter(1, torch.where(idx >= 0, idx, n), vals)[:, :n]


def decode_terms(vals: Tensor, idx: Tensor, W: Tensor, backend: str) -> Tensor:
    """(B, d) = padded terms (vals, idx) @ W (n, d) in W's dtype: ``sparse_decode``, or one dense GEMM
    when the terms are wide (more than n / 8 per row, e.g. the k direction at large alpha)."""
    if idx.shape[1] * 8 <= W.shape[0]:
        return sparse_decode(vals.to(W.dtype), idx, W, None, backend=backend)
    return padded_to_dense(vals, idx, W.shape[0]).to(W.dtype) @ W


class Local:
    """All rows and all latents in this process: every method is the plain op (or the identity)."""

    sharded_latents = False  # True: the latent axis is split over ranks (parameters are shards)

    # ------------------------------------------------------------------ autograd pair (Megatron's f / g)
    def replicate(self, x: Tensor) -> Tensor:
        """A replicated tensor entering per-shard computation (sharded: backward sums the ranks)."""
        return x

    def partial_sum(self, x: Tensor) -> Tensor:
        """Sum of the shards' partial results (sharded: all-reduce, backward identity)."""
        return x

    def count(self, t: Tensor) -> Tensor:
        """A non-differentiable per-shard count or sum, summed over the latent shards."""
        return t

    # ------------------------------------------------------------------ selections
    def topk_per_row(self, pre: Tensor, k: Tensor | int, width: int | None = None) -> tuple[Tensor, Tensor]:
        """Per-row top-k of the whole row; ``width`` a static output width (no host read-back)."""
        return topk_per_row(pre, k, k_max=width)

    def soft_gate(self, pre: Tensor, k: Tensor, alpha: float, backend: str) -> Tensor:
        """Dense soft top-k gate ``pre * p`` (B, n_local), threshold over the whole row."""
        return soft_topk_gate(pre, k, alpha, backend=backend)

    def soft_gate_sparse(self, pre: Tensor, k: Tensor, alpha: float, backend: str) -> tuple[Tensor, Tensor]:
        """The non-zeros of the soft gate as padded (vals, idx) (the fused sparse gate)."""
        return soft_topk_gate(pre, k, alpha, backend=backend, sparse=True)

    def soft_topk(self, y: Tensor, k: Tensor, alpha: float, backend: str) -> Tensor:
        return soft_topk(y, k, alpha, backend=backend)

    def row_max(self, y: Tensor) -> Tensor:
        """(B, 1) largest entry of each whole row."""
        return y.amax(-1, keepdim=True)

    @torch.no_grad()
    def gate_k_direction(self, y: Tensor, k: Tensor, alpha: float, W: Tensor, backend: str) -> Tensor:
        """v (B, d) = sum_i (dz_i/dk) W[i] of the soft gate z = y * soft_topk(y, k, alpha) (docs/math.md 3):
        a sparse decode of the terms near each row's threshold on CPU, one (B, n) x (n, d) GEMM elsewhere
        (or when those terms are not sparse)."""
        if y.device.type == "cpu":
            return decode_terms(*soft_gate_dk(y, k, alpha, backend=backend), W, backend)
        return soft_gate_dk(y, k, alpha, backend=backend, sparse=False).to(W.dtype) @ W

    @torch.no_grad()
    def batch_topk(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """BatchTopK over the whole batch: (keep (B, n_local) bool of the k*B largest positive entries,
        the smallest kept value (0-d), whether anything was kept (0-d bool)); no host sync."""
        flat = pre.reshape(-1)
        top = torch.topk(flat, min(k * pre.shape[0], flat.numel()), sorted=False)
        keep = top.values > 0
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=pre.device).scatter_(0, top.indices, keep)
        return mask.view_as(pre), torch.where(keep, top.values, float("inf")).min(), keep.any()

    def dead_topk(self, pre: Tensor, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor] | None:
        """Aux-k's selection: per row the top ``k_aux`` dead latents as padded (vals, idx); None when no
        latent is dead (read on CPU only: on CUDA a static width and padding, no host sync)."""
        if dead.is_cuda:
            kk = min(int(k_aux), dead.shape[0])
            vals, idx = torch.topk(pre.masked_fill(~dead[None, :], float("-inf")), kk, dim=-1, sorted=False)
            valid = dead[idx]
            return torch.where(valid, vals, 0.0), torch.where(valid, idx, -1)
        if not bool(dead.any()):
            return None
        cols = dead.nonzero().squeeze(1)  # the dead columns only: a top-k over (B, n_dead)
        vals, j = torch.topk(pre.index_select(1, cols), min(int(k_aux), cols.numel()), dim=-1, sorted=False)
        return vals, cols[j]

    # ------------------------------------------------------------------ decode
    def decode(self, vals: Tensor, idx: Tensor, W: Tensor, b: Tensor | None, backend: str) -> Tensor:
        """(B, d) = codes @ W (+ b) over the whole dictionary."""
        return sparse_decode(vals, idx, W, b, backend=backend)

    def decode_dense(self, z: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(z, W.t(), b)

    def nonzero(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return nonzero_per_row(z)

    # ------------------------------------------------------------------ batch statistics
    def total_rows(self, rows: int) -> int:
        """Rows of the global batch (data mode: summed over the ranks)."""
        return rows

    def sum_rows(self, t: Tensor) -> Tensor:
        """A non-differentiable per-rank sum over rows, summed over the row shards."""
        return t

    def mean_rows(self, t: Tensor) -> Tensor:
        """Differentiable mean over the global batch's rows (data mode: each rank's rows get 1/B_total)."""
        return t.mean()

    def aux_terms(self, e: Tensor, e_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Aux-k's (numerator, denominator): batch means of ||e - e_hat||^2 and ||e - mean(e)||^2."""
        return (e - e_hat).pow(2).sum(-1).mean(), (e - e.mean(0)).pow(2).sum(-1).mean()

    def merge_fired(self, fired: Tensor, rows: int) -> tuple[Tensor, int]:
        """Dead-latent bookkeeping: (fired latents of this placement's latents, tokens seen)."""
        return fired, rows

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip every gradient by the global norm of the whole model's gradient."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


LOCAL = Local()
