"""Durable, atomic file writes (a leaf module: it imports nothing from softsae).

Every writer here creates a temporary sibling ``.NAME.XXXXXXXX.tmp`` (``mkstemp``), writes it, flushes
and fsyncs it, gives it the usual permissions (0666 minus the umask, read once at import), renames it
over ``NAME`` with ``os.replace`` and fsyncs the directory. After a crash or a power loss ``NAME`` is
either the old file or the complete new one, never empty or torn. A process killed with ``kill -9``
can leave its temporary files behind; :func:`remove_stale_temps` removes the ones of named targets
(a run calls it for its own outputs when it starts).

Large arrays are written with :func:`write_npy_rows`: the space is reserved first
(``os.posix_fallocate``) and rows are written with ``write()``, never through a memory map, so a full
disk raises ``OSError(ENOSPC)`` naming the file instead of killing the process with SIGBUS.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

TEMP_SUFFIXES = (".tmp", ".raw")


def _read_umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restored once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # once, at import, before any thread of this library writes
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK


def temp_path(path: str | Path, suffix: str = ".tmp") -> str:
    """Create (empty, mode 0600) and return a temporary sibling of ``path``: ``.NAME.XXXXXXXX<suffix>``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return tmp


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or unlink in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _named(err: OSError, path: Path) -> OSError:
    """The same OSError, its message naming the target ``path`` (a full disk says which file)."""
    text = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (free some space, then run the same command again)"
    if err.errno is None:
        return OSError(f"writing {path}: {err}")
    return type(err)(err.errno, f"writing {path}: {text}")


_FULL_DISK_MARKERS = ("no space left", "storagefull", "os error 28", "errno 28", "disk quota")
_FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk was full


def _full_disk(err: BaseException, directory: Path) -> bool:
    """Whether a non-OSError from a writer (torch.save raises RuntimeError, safetensors its own error)
    came from a full disk: its message says so, or the filesystem has (almost) no space left."""
    if not isinstance(err, Exception):
        return False
    if any(m in str(err).lower() for m in _FULL_DISK_MARKERS):
        return True
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < _FULL_DISK_BYTES


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, fsync it, rename it into place and
    fsync the directory. On any failure the temporary file is removed and ``path`` is unchanged;
    an ``OSError`` is re-raised with ``path`` in its message, and a writer's own error that came from
    a full disk becomes ``OSError(ENOSPC)`` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        full = not isinstance(err, OSError) and _full_disk(err, path.parent)  # before the temporary is freed
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise _named(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path) from err
        if isinstance(err, OSError) and str(path) not in str(err):
            raise _named(err, path) from err
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class _Writer:
    """A binary file for ``torch.save`` that keeps the OSError of a failed write: torch reports it as a
    RuntimeError without the cause (e.g. "unexpected pos"), this re-raises the real one."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path``, atomically and durably; a full disk is OSError(ENOSPC) naming it."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            w = _Writer(f)
            try:
                torch.save(obj, w)
            except RuntimeError:
                if w.error is not None:
                    raise w.error from None
                raise

    atomic_write(path, write)


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to ``path``, atomically and durably."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_save_npy(path: str | Path, arr: np.ndarray) -> None:
    """``np.save`` (no pickles) to ``path``, atomically and durably."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a bare name
            np.save(f, arr, allow_pickle=False)

    atomic_write(path, write)


def reserve(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for the file ``fd`` (``posix_fallocate``; ENOSPC now, not SIGBUS later).
    Filesystems without fallocate support are let through: the writes still raise ENOSPC."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return
        raise


def write_npy_rows(path: str | Path, shape: tuple[int, int], dtype: np.dtype | str,
                   chunks: Callable[[], Iterable[np.ndarray]]) -> None:
    """Write the (N, d) ``.npy`` ``path`` atomically from ``chunks()`` (row blocks, in order, N rows in all)
    with plain writes after reserving the space: a full disk raises OSError(ENOSPC) naming ``path``."""
    dtype = np.dtype(dtype)
    n, d = (int(s) for s in shape)

    def write(tmp: str) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, d)}
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.flush()
            reserve(f.fileno(), f.tell() + n * d * dtype.itemsize)
            rows = 0
            for block in chunks():
                block = np.ascontiguousarray(block, dtype=dtype)
                if block.ndim != 2 or block.shape[1] != d:
                    raise ValueError(f"{path}: a block of shape {block.shape} does not fit rows of width {d}")
                f.write(block.tobytes())
                rows += block.shape[0]
            if rows != n:
                raise ValueError(f"{path}: wrote {rows} rows, expected {n}")

    atomic_write(path, write)


def iter_row_blocks(arr: np.ndarray, rows: int = 65536) -> Iterator[np.ndarray]:
    """Consecutive blocks of at most ``rows`` rows of ``arr`` (a view each)."""
    for s in range(0, arr.shape[0], rows):
        yield arr[s:s + rows]


def _temp_pattern(names: Iterable[str], name_pattern: str | None) -> re.Pattern:
    alts = [re.escape(n) for n in names] + ([name_pattern] if name_pattern else [])
    sufs = "|".join(re.escape(s) for s in TEMP_SUFFIXES)
    return re.compile(rf"^\.(?:{'|'.join(alts)})\.[A-Za-z0-9_]{{8}}(?:{sufs})$")


def remove_stale_temps(directory: str | Path, names: Iterable[str] = (), name_pattern: str | None = None
                       ) -> list[Path]:
    """Remove the temporary files this module (``temp_path``) made for targets in ``directory`` that a
    killed process left behind: ``.NAME.XXXXXXXX.tmp`` / ``.raw`` where NAME is one of ``names`` or
    matches the regex ``name_pattern``; nothing else. Returns what it removed. Call it only where no
    other process is writing the same targets."""
    directory = Path(directory)
    names = list(names)
    if (not names and not name_pattern) or not directory.is_dir():
        return []
    pattern = _temp_pattern(names, name_pattern)
    removed = []
    for entry in directory.iterdir():
        if pattern.match(entry.name) and entry.is_file() and not entry.is_symlink():
            try:
                entry.unlink()
                removed.append(entry)
            except FileNotFoundError:
                pass
    if removed:
        fsync_dir(directory)
    return removed


__all__ = ["FILE_MODE", "TEMP_SUFFIXES", "UMASK", "atomic_save_npy", "atomic_save_safetensors", "atomic_torch_save",
           "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_file",
           "iter_row_blocks", "remove_stale_temps", "reserve", "temp_path", "write_npy_rows"]
