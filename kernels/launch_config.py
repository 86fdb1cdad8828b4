"""Launch configurations of the Triton kernels: pure functions of the problem shape.

The launchers in soft_topk.py / sparse_decode.py take every tuning choice (block sizes,
num_warps, program counts) from here, so the choices live in one place. The compile gate
(kernels/aot.py) does not read these functions: it runs the launchers themselves with the
launch intercepted, so what it compiles cannot drift from what the launchers do.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from triton import next_power_of_2

__all__ = [
    "SoftTopkConfig",
    "SparseDecodeConfig",
    "SparseEncoderDbConfig",
    "program_count",
    "soft_topk_config",
    "sparse_decode_config",
    "sparse_encoder_db_config",
]

COMPACT_MIN = 2048  # soft top-k rows longer than this get the candidate compaction
CAP = 2048  # candidate scratch per program (entries of the compute dtype)
NP = 8  # thresholds evaluated per search iteration
MAX_ITERS = 64  # search iterations; the bracket shrinks >= 7x per iteration (typically 2-6 run)
INTERPRETER_SMS = 2  # "SM count" used for CPU tensors (Triton interpreter): small, so rows loop


@dataclasses.dataclass(frozen=True)
class SoftTopkConfig:
    """block: chunk of the row passes; mb: width M is folded to; cb: search chunk (NP x cb
    tiles); compact: candidate compaction on; cap: scratch entries per program; num_warps."""

    block: int
    mb: int
    cb: int
    compact: bool
    cap: int
    num_warps: int


def soft_topk_config(n: int, dtype: torch.dtype, *, block: int | None = None, compact: bool | None = None,
                     cap: int | None = None) -> SoftTopkConfig:
    """Tuning of soft top-k fwd/bwd for rows of length n >= 1; the keywords override (tests)."""
    wide = dtype == torch.float64
    if block is None:
        block = min(next_power_of_2(n), 2048 if wide else 4096)
    if compact is None:
        compact = n > COMPACT_MIN
    cb = min(block, 256 if wide else 512)
    # 4096 fp32 with 16 warps: 8 elements (two 16-byte loads) per thread per chunk.
    warps = 4 if block <= 512 else (8 if block <= 2048 else 16)
    return SoftTopkConfig(block=block, mb=min(block, 1024), cb=cb, compact=bool(compact),
                          cap=CAP if cap is None else int(cap), num_warps=warps)


def program_count(rows: int, device: torch.device, num_warps: int) -> int:
    """Programs of a persistent launch over ``rows`` rows: at most as many as can be resident
    (64 warps per SM) on ``device``, so per-program scratch stays bounded by the GPU size."""
    sms = _sm_count(device.index) if device.type == "cuda" else INTERPRETER_SMS
    return max(1, min(rows, sms * max(1, 64 // num_warps)))


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


@dataclasses.dataclass(frozen=True)
class SparseDecodeConfig:
    """bk: pairs per tile; bd: columns per program; num_warps."""

    bk: int
    bd: int
    num_warps: int


def sparse_decode_config(d: int, dtype: torch.dtype) -> SparseDecodeConfig:
    """Tiles of the sparse decode kernels for rows of width d >= 1 and values of ``dtype``.

    A (bk, bd) tile holds bk * bd / (32 num_warps) accumulator-dtype values per thread; float64
    gets half the columns so that 16 x 256 float64 tiles do not spill (ptxas, sm_90).
    """
    top = 128 if dtype == torch.float64 else 256
    bd = max(16, min(top, next_power_of_2(d)))
    return SparseDecodeConfig(bk=16, bd=bd, num_warps=4)


@dataclasses.dataclass(frozen=True)
class SparseEncoderDbConfig:
    """bl: latents per program of the sparse encoder's db kernel; num_warps."""

    bl: int
    num_warps: int


def sparse_encoder_db_config() -> SparseEncoderDbConfig:
    """db of the sparse encoder backward: one lane per latent, 128 latents per 4-warp program (its
    dx and dW run the sparse decode kernels with ``sparse_decode_config``)."""
    return SparseEncoderDbConfig(bl=128, num_warps=4)
