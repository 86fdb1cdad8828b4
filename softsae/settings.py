"""Range checks of training settings (a leaf module: the trainer and the config-file reader both use it).

``check_ranges(values, source)`` raises ValueError naming the setting (its flag on the command line)
for a non-finite number, a value out of range, an unknown choice or an unusable device.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

MAX_BATCH_SIZE = 1 << 24  # rows per step; far above any useful batch, far below an out-of-memory crash
# TrainConfig fields whose command-line flag is not --field-name
_FLAGS = {"hard_topk_steps": "--hard-steps", "dead_feature_threshold": "--dead-threshold"}
# field -> smallest allowed value (ints); every number must also be finite
_MIN_INT = {"dict_size": 1, "steps": 1, "batch_size": 1, "log_every": 1, "checkpoint_every": 0, "warmup_steps": 0,
            "decay_start": 0, "k_hidden": 1, "k_aux": 1, "dead_feature_threshold": 1, "geometric_median_iters": 0,
            "seed": 0, "k_anneal_steps": 0, "alpha_anneal_steps": 0, "hard_topk_steps": 0, "st_steps": 0}
_CHOICES = {"arch": ("softsae", "topk", "batchtopk"), "normalize": ("none", "scale", "center_scale"),
            "amp": ("auto", "bf16", "off"), "parallel": ("none", "data", "dictionary"),
            "alpha_schedule": ("linear", "log"), "st_mode": ("soft", "k"), "k_round": ("floor", "round"),
            "log": ("jsonl", "tensorboard", "wandb"), "decode_mode": ("auto", "sparse", "dense"),
            "recipe": ("default", "paper")}
_POSITIVE = ("k", "k_max", "lr", "alpha", "alpha_start", "k_loss_beta")
_NON_NEGATIVE = ("w_k", "auxk_alpha", "grad_clip")


def setting_name(key: str, source: str) -> str:
    """How the user wrote setting ``key``: its flag on the command line, else the field name."""
    return _FLAGS.get(key, "--" + key.replace("_", "-")) if source == "command line" else key


def check_device(device: str, what: str = "--device") -> None:
    """``device`` is auto, cpu, cuda or cuda:N and exists here (ValueError naming ``what`` otherwise)."""
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what} {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} {device!r}: softsae runs on cpu or cuda devices")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device!r}: CUDA is not available here (no GPU visible, or a CPU-only torch "
                             f"build: torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_ranges(values: dict[str, Any], source: str = "config") -> None:
    """Every number finite and in range (``batch_size`` in [1, 2^24], ``log_every`` >= 1, ``k`` > 0 ...)
    and the device usable; ValueError naming the setting (its flag for ``source="command line"``)."""
    for key, v in values.items():
        if key in _CHOICES and isinstance(v, str) and v not in _CHOICES[key]:
            raise ValueError(f"{source}: {setting_name(key, source)} must be one of {_CHOICES[key]}, got {v!r}")
        if v is None or isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        name = setting_name(key, source)
        if not math.isfinite(v):
            raise ValueError(f"{source}: {name} must be a finite number, got {v!r}")
        if key in _MIN_INT and v < _MIN_INT[key]:
            raise ValueError(f"{source}: {name} must be >= {_MIN_INT[key]}, got {v!r}")
        if key in _POSITIVE and not v > 0:
            raise ValueError(f"{source}: {name} must be > 0, got {v!r}")
        if key in _NON_NEGATIVE and v < 0:
            raise ValueError(f"{source}: {name} must be >= 0, got {v!r}")
    batch = values.get("batch_size")
    if isinstance(batch, numbers.Real) and batch > MAX_BATCH_SIZE:
        raise ValueError(f"{source}: {setting_name('batch_size', source)} must be at most {MAX_BATCH_SIZE} rows, "
                         f"got {batch}")
    if isinstance(values.get("device"), str):
        check_device(values["device"], f"{source}: {setting_name('device', source)}")
