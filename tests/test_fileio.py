"""softsae.fileio: durable atomic writes, the umask read once, writes without mmap, stale temporaries."""

from __future__ import annotations

import ast
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from softsae import fileio

REPO = Path(__file__).resolve().parents[1]


def test_fileio_is_a_leaf_module():
    """It imports nothing from softsae (checked on its syntax tree) and works loaded on its own."""
    src = (REPO / "softsae" / "fileio.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if node.level == 0 else "<relative>")
    assert imported <= {"__future__", "errno", "json", "os", "re", "tempfile", "collections", "pathlib", "typing",
                        "numpy", "torch", "safetensors"}, imported
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('lone_fileio', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.atomic_write_json(sys.argv[2], [1]); "
            "print(sorted(k for k in sys.modules if k.startswith('softsae')))")
    out = REPO / "softsae" / "fileio.py"
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-P", "-c", code, str(out), f"{tmp}/x.json"], capture_output=True,
                           text=True, timeout=120, check=True, cwd=tmp)
        assert r.stdout.strip() == "[]" and json.loads(Path(tmp, "x.json").read_text()) == [1]


def test_checkpoint_reexports_the_writers():
    from softsae import checkpoint

    for name in ("atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save"):
        assert getattr(checkpoint, name) is getattr(fileio, name)


@pytest.mark.parametrize("kind", ["json", "torch", "safetensors", "npy", "npy_rows"])
def test_every_writer_fsyncs_file_and_directory_and_never_sets_the_umask(tmp_path, monkeypatch, kind):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def umask(_mask):
        raise AssertionError("os.umask must not be called while writing")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "umask", umask)
    target = tmp_path / f"out.{kind}"
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)
    {"json": lambda: fileio.atomic_write_json(target, {"a": 1}),
     "torch": lambda: fileio.atomic_torch_save({"w": torch.ones(2)}, target),
     "safetensors": lambda: fileio.atomic_save_safetensors({"w": torch.ones(2)}, target),
     "npy": lambda: fileio.atomic_save_npy(target, arr),
     "npy_rows": lambda: fileio.write_npy_rows(target, (4, 3), np.float32, lambda: iter([arr[:3], arr[3:]])),
     }[kind]()
    assert any(Path(p).name.startswith(f".{target.name}.") for p in synced), synced  # the file, before the rename
    assert str(tmp_path) in synced  # then the directory, after it
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~fileio.UMASK
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    if kind.startswith("npy"):
        assert np.array_equal(np.load(target), arr)


def test_umask_is_read_correctly():
    mask = os.umask(0o027)
    try:
        assert fileio._read_umask() == 0o027
    finally:
        os.umask(mask)


def test_full_disk_while_writing_npy_is_an_error_naming_the_file_and_a_rerun_works(tmp_path, monkeypatch):
    target = tmp_path / "acts.npy"
    arr = np.ones((1000, 8), np.float32)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="acts.npy.*No space left.*run the same command again") as info:
        fileio.write_npy_rows(target, arr.shape, np.float32, lambda: iter([arr]))
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no hidden temporary left to block (or fill) the rerun
    monkeypatch.undo()

    def chunks():  # the disk fills in the middle of the writes (no fallocate support)
        yield arr[:500]
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="acts.npy"):
        fileio.write_npy_rows(target, arr.shape, np.float32, chunks)
    assert list(tmp_path.iterdir()) == []
    fileio.write_npy_rows(target, arr.shape, np.float32, lambda: iter([arr[:500], arr[500:]]))
    assert np.array_equal(np.load(target), arr)


def test_write_npy_rows_refuses_a_wrong_row_count(tmp_path):
    with pytest.raises(ValueError, match="wrote 2 rows, expected 3"):
        fileio.write_npy_rows(tmp_path / "a.npy", (3, 2), np.float32, lambda: iter([np.zeros((2, 2))]))
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_temps_removes_only_its_own_names(tmp_path):
    own = [fileio.temp_path(tmp_path / "model.safetensors"), fileio.temp_path(tmp_path / "acts.npy", ".raw"),
           fileio.temp_path(tmp_path / "shard_00012.npy")]
    keep = [tmp_path / ".model.safetensors.tmp", tmp_path / "model.safetensors",  # not mkstemp names
            tmp_path / ".other.json.abcdefgh.tmp", tmp_path / ".model.safetensors.abcdefgh.bak",
            tmp_path / "notes.tmp"]
    for k in keep:
        k.write_text("user's")
    removed = fileio.remove_stale_temps(tmp_path, ["model.safetensors", "acts.npy"], name_pattern=r"shard_\d{5}\.npy")
    assert sorted(map(str, removed)) == sorted(own)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(k.name for k in keep)
    assert fileio.remove_stale_temps(tmp_path / "missing", ["x"]) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "c.json"
    fileio.atomic_write_json(target, {"v": 1})

    def failing(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(target, failing)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_full_disk_under_torch_save_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(fileio, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="trainer_state.pt.*No space left") as info:
        fileio.atomic_torch_save({"w": torch.ones(1000)}, tmp_path / "trainer_state.pt")
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_a_writer_error_on_a_full_filesystem_is_reported_as_enospc(tmp_path, monkeypatch):
    class Full:
        f_bavail, f_frsize = 0, 4096

    def failing(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("Error while serializing: I/O error")

    monkeypatch.setattr(os, "statvfs", lambda _p: Full())
    with pytest.raises(OSError, match="model.safetensors") as info:
        fileio.atomic_write(tmp_path / "model.safetensors", failing)
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="I/O error"):  # with free space it stays what it was
        fileio.atomic_write(tmp_path / "model.safetensors", failing)
