"""Keep freed CPU memory inside the process, so that a training step's large temporaries are not
page-faulted in again on every step.

glibc serves every allocation above its mmap threshold (at most 32 MiB on 64-bit) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so each (B, n) float32 temporary of a large
step (1024 x 16384 is 64 MiB) is zero-filled page by page by the kernel on first touch, on every
step: about 60 ms per such tensor on the 2-core CI machine, against 5 ms to write it once mapped.
A step creates about twenty of them. ``keep_freed_memory()`` turns glibc's mmap path off
(``M_MMAP_MAX = 0``) and its heap trimming off (``M_TRIM_THRESHOLD``), so freed blocks stay in the
heap and the next step reuses them without faults. The price: the process keeps its high-water
mark of heap memory until it exits (it is not handed back to the OS between steps).

The trainer calls it for CPU runs unless ``SOFTSAE_CPU_MALLOC=default``. It changes a
process-wide setting and only for glibc (Linux); elsewhere it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
ENV = "SOFTSAE_CPU_MALLOC"
_state = {"applied": False}


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Apply the setting (once per process); True when it is in effect.

    Does nothing (False) when ``SOFTSAE_CPU_MALLOC=default`` or the C library is not glibc.
    """
    if _state["applied"]:
        return True
    mode = os.environ.get(ENV, "keep")
    if mode not in ("keep", "default"):
        raise ValueError(f"{ENV} must be 'keep' or 'default', got {mode!r}")
    libc = None if mode == "default" else _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success; both or neither (a half-applied setting would still fault)
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1  # -1: never trim
    _state["applied"] = bool(ok)
    return _state["applied"]


def is_applied() -> bool:
    """Whether this process runs with freed memory kept (see ``keep_freed_memory``)."""
    return _state["applied"]
