"""Which backends exist in this install, and which one serves a given tensor.

Backends: ``reference`` (pure PyTorch, always), ``cpu`` (compiled ``softsae._C``),
``cuda`` (compiled ``softsae._C_cuda``, CUDA tensors) and ``triton`` (``softsae.kernels``,
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). ``auto`` picks the fastest one
available for the tensor's device. The environment variable ``SOFTSAE_BACKEND`` (one of the
backend names) replaces ``auto`` process-wide; it is read once, at import, and an explicit
backend argument still wins.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _load(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        # A missing module is a normal install without that backend; a module that exists but
        # fails to load (ABI mismatch, missing symbol) deserves a word.
        if "No module named" not in str(err):
            warnings.warn(f"softsae: {module} is present but failed to load: {err}", stacklevel=2)
        return None


# Resolved once at import, so that torch.compile reads constants instead of tracing imports.
_CPU_EXT = _load("softsae._C")
_CUDA_EXT = _load("softsae._C_cuda")
_HAS_TRITON = importlib.util.find_spec("triton") is not None
ENV_VAR = "SOFTSAE_BACKEND"
# Also read once at import (not per call): resolve() may run inside a torch.compile'd region.
_ENV_BACKEND = os.environ.get(ENV_VAR, "").strip() or None


def cpu_ext() -> ModuleType | None:
    """The compiled CPU extension, or None."""
    return _CPU_EXT


def cuda_ext() -> ModuleType | None:
    """The compiled CUDA extension, or None (it imports fine without a GPU)."""
    return _CUDA_EXT


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return _HAS_TRITON


def supports(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run on tensors of ``device`` in this process."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and cpu_ext() is not None
    if backend == "cuda":
        return device.type == "cuda" and cuda_ext() is not None
    if backend == "triton":
        if not _triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return False


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable here: for ``device`` if given, else for any device of this machine."""
    if device is not None:
        dev = torch.device(device)
        return [b for b in BACKENDS if supports(b, dev)]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(supports(b, d) for d in devices)]


# Fastest first, per device type. On CUDA, Triton leads until the CUDA kernels have been
# measured to beat it (see benchmarks/RESULTS.md).
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def resolve(backend: str, device: torch.device, arg: str = "backend") -> str:
    """Map ``backend`` (a name or ``"auto"``) to a concrete backend for ``device``, or raise."""
    if not isinstance(backend, str) or backend not in (*BACKENDS, "auto"):
        raise ValueError(f"{arg} must be one of {('auto', *BACKENDS)}, got {backend!r}")
    if backend == "auto" and _ENV_BACKEND not in (None, "auto"):
        env = _ENV_BACKEND
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {('auto', *BACKENDS)}, got {env!r}")
        if not supports(env, device):
            raise ValueError(f"{ENV_VAR}={env!r} (replacing {arg}='auto') is not available for {device.type} "
                             f"tensors here; available: {available_backends(device)}; unset {ENV_VAR} or change it")
        return env
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if supports(name, device):
                return name
        return "reference"
    if not supports(backend, device):
        raise ValueError(
            f"{arg}={backend!r} is not available for {device.type} tensors here; "
            f"available: {available_backends(device)}"
        )
    return backend
