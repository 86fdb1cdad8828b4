"""Activation sources for training and evaluation, with validation and normalisation statistics.

``load_activations(obj)`` accepts a path (``.npy``, ``.safetensors``, ``.pt``/``.pth``), a numpy
array, a torch tensor, an iterable of (b, d) batches, or a source object such as a stream of a
model's activations (``softsae.stream``), and returns a source with

    d, n_rows                                   (n_rows is None for iterators)
    sample(batch_size, rng) -> (B, d) float32   random rows (with replacement)
    iter_batches(batch_size, max_rows) -> ...   sequential (B, d) float32 batches

Files are memory-mapped (``.npy`` with ``mmap_mode="r"``, ``.safetensors`` by its header,
``.pt`` with ``torch.load(mmap=True)``): a batch reads only its rows, so a file larger than RAM
works. Every problem with the input raises ``DataError`` with a message saying what is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """The activation data cannot be used (wrong file, shape, dtype, or non-finite values)."""


_NP_FLOATS = (np.float16, np.float32, np.float64)
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_CHECK_CHUNK = 1 << 22  # elements per chunk when scanning for non-finite values


def _check_2d_float(shape: tuple, dtype, what: str) -> None:
    if len(shape) != 2:
        raise DataError(f"{what}: activations must be a 2-D array (n_rows, d), got shape {tuple(shape)}"
                        + (" (flatten the leading dims first, e.g. x.reshape(-1, d))" if len(shape) > 2 else ""))
    if shape[0] < 1 or shape[1] < 1:
        raise DataError(f"{what}: activations are empty, shape {tuple(shape)}")
    ok = dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) if isinstance(dtype, torch.dtype) \
        else np.dtype(dtype).type in _NP_FLOATS
    if not ok:
        raise DataError(f"{what}: activations must be floating point (float16/bfloat16/float32/float64), got {dtype}")


def _to_float32(batch) -> Tensor:
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(np.array(batch, dtype=np.float32))  # a writable float32 copy
    return batch.to(torch.float32)


def check_finite_batch(x: Tensor, what: str = "data", row_offset: int | None = None) -> None:
    """Raise DataError if x holds NaN or inf (naming the first bad row when it can)."""
    bad = ~torch.isfinite(x)
    if bad.any():
        row = int(bad.any(-1).nonzero()[0, 0])
        where = f"row {row + row_offset}" if row_offset is not None else "a sampled batch"
        kind = "NaN" if torch.isnan(x).any() else "inf"
        raise DataError(f"{what}: activations contain {kind} values (first at {where}); "
                        "clean or drop those rows before training")


class ArraySource:
    """Rows of an in-memory or memory-mapped (n_rows, d) array (numpy or torch)."""

    def __init__(self, data: np.ndarray | Tensor, name: str = "data", check_finite: bool = True) -> None:
        _check_2d_float(tuple(data.shape), data.dtype, name)
        self.data, self.name = data, name
        self.n_rows, self.d = int(data.shape[0]), int(data.shape[1])
        if check_finite:
            self.check_finite()

    def _rows(self, idx: np.ndarray) -> Tensor:
        if isinstance(self.data, Tensor):
            return self.data[torch.from_numpy(idx).to(self.data.device)].to(torch.float32)
        return _to_float32(self.data[idx])

    def check_finite(self) -> None:
        """Scan every row in chunks (reads the file once without holding it in memory)."""
        step = max(1, _CHECK_CHUNK // self.d)
        for start in range(0, self.n_rows, step):
            chunk = self.data[start:start + step]
            chunk = chunk.float() if isinstance(chunk, Tensor) else _to_float32(chunk)
            check_finite_batch(chunk, self.name, start)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Tensor:
        idx = np.sort(rng.integers(0, self.n_rows, size=batch_size))
        return self._rows(idx)

    def iter_batches(self, batch_size: int, max_rows: int | None = None) -> Iterator[Tensor]:
        stop = self.n_rows if max_rows is None else min(self.n_rows, max_rows)
        for start in range(0, stop, batch_size):
            chunk = self.data[start:min(stop, start + batch_size)]
            yield chunk.to(torch.float32) if isinstance(chunk, Tensor) else _to_float32(chunk)


class IteratorSource:
    """Batches drawn in order from an iterable of (b, d) arrays/tensors (re-chunked to B rows)."""

    def __init__(self, batches: Iterable, name: str = "iterator") -> None:
        self._it, self.name = iter(batches), name
        self._buf: list[Tensor] = []
        self._buffered = 0
        first = self._next_chunk()
        if first is None:
            raise DataError(f"{name}: the iterator yielded no activations")
        self.d, self.n_rows = int(first.shape[1]), None
        self._push(first)

    def _next_chunk(self) -> Tensor | None:
        try:
            chunk = next(self._it)
        except StopIteration:
            return None
        if not isinstance(chunk, (np.ndarray, Tensor)):
            raise DataError(f"{self.name}: iterator items must be arrays or tensors, got {type(chunk).__name__}")
        _check_2d_float(tuple(chunk.shape), chunk.dtype, self.name)
        if hasattr(self, "d") and chunk.shape[1] != self.d:
            raise DataError(f"{self.name}: batch has d={chunk.shape[1]}, earlier batches had d={self.d}")
        t = _to_float32(chunk)
        check_finite_batch(t, self.name)
        return t

    def _push(self, t: Tensor) -> None:
        self._buf.append(t)
        self._buffered += t.shape[0]

    def _take(self, batch_size: int) -> Tensor | None:
        while self._buffered < batch_size:
            nxt = self._next_chunk()
            if nxt is None:
                break
            self._push(nxt)
        if self._buffered == 0:
            return None
        allx = torch.cat(self._buf)
        out, rest = allx[:batch_size], allx[batch_size:]
        self._buf, self._buffered = ([rest] if len(rest) else []), len(rest)
        return out

    def peek(self, n_rows: int) -> Tensor:
        """Up to ``n_rows`` upcoming rows, left in the stream."""
        out = self._take(n_rows)
        if out is None:
            raise DataError(f"{self.name}: the iterator ran out of activations")
        self._buf.insert(0, out)
        self._buffered += out.shape[0]
        return out

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> Tensor:
        out = self._take(batch_size)
        if out is None or out.shape[0] < batch_size:
            raise DataError(f"{self.name}: the iterator ran out of activations")
        return out

    def iter_batches(self, batch_size: int, max_rows: int | None = None) -> Iterator[Tensor]:
        seen = 0
        while max_rows is None or seen < max_rows:
            want = batch_size if max_rows is None else min(batch_size, max_rows - seen)
            out = self._take(want)
            if out is None:
                return
            seen += out.shape[0]
            yield out


_MAX_HEADER = 100 << 20  # bytes of JSON header the safetensors library itself accepts at most


def _read_safetensors_header(path: Path) -> tuple[dict, int, int]:
    """(header, header length, file size) of a .safetensors file, checked as the safetensors library
    checks it: the length fits the file, the header is a JSON object of tensors whose dtype, shape and
    data_offsets agree, lie inside the file and do not overlap. DataError naming the file otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DataError(f"{path}: not a safetensors file (too short)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(_MAX_HEADER, size - 8):
            raise DataError(f"{path}: not a safetensors file (header length {hlen} exceeds the file's "
                            f"{size} bytes or the 100 MB limit)")
        try:
            header = json.loads(f.read(hlen))
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: not a safetensors file (the header is not a JSON object)")
    data_size = size - 8 - hlen
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise DataError(f"{path}: tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
            raise DataError(f"{path}: tensor {name!r}: missing or unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise DataError(f"{path}: tensor {name!r}: shape must be a list of ints >= 0, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise DataError(f"{path}: tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise DataError(f"{path}: tensor {name!r}: data_offsets {offsets} do not hold its {nbytes} bytes "
                            f"({dtype} {shape}) inside the file's {data_size} data bytes (truncated or corrupt file)")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise DataError(f"{path}: tensors {n0!r} and {n1!r} overlap (corrupt file)")
    return header, hlen, size


def _open_safetensors(path: Path, key: str | None) -> np.ndarray | Tensor:
    """Memory-map one tensor of a .safetensors file (by its checked JSON header); bf16 is loaded eagerly."""
    header, hlen, _ = _read_safetensors_header(path)
    names = [k for k in header if k != "__metadata__"]
    if key is None:
        if len(names) != 1:
            raise DataError(f"{path}: holds tensors {names}; name one as PATH:KEY")
        key = names[0]
    if key not in names:
        raise DataError(f"{path}: no tensor named {key!r} (has {names})")
    info = header[key]
    shape = tuple(info["shape"])
    if info["dtype"] not in _ST_DTYPES and info["dtype"] != "BF16":
        raise DataError(f"{path}:{key}: activations must be floating point, got dtype {info['dtype']}")
    _check_2d_float(shape, _ST_DTYPES.get(info["dtype"], np.float32), f"{path}:{key}")
    if info["dtype"] == "BF16":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as err:  # noqa: BLE001 - a corrupt file of any kind
            raise DataError(f"{path}: cannot read {key!r} ({type(err).__name__}: {err})") from None
    begin, _ = info["data_offsets"]
    return np.memmap(path, dtype=_ST_DTYPES[info["dtype"]], mode="r", offset=8 + hlen + begin, shape=shape)


def _open_pt(path: Path, key: str | None) -> Tensor:
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a data problem here
        raise DataError(f"{path}: cannot read as a torch file ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if key is None and len(tensors) == 1:
            key = next(iter(tensors))
        if key not in tensors:
            raise DataError(f"{path}: a dict with tensors {list(tensors)}; name one as PATH:KEY")
        obj = tensors[key]
    if not isinstance(obj, Tensor):
        raise DataError(f"{path}: expected a tensor (or a dict of tensors), got {type(obj).__name__}")
    return obj


def _split_key(path: str | Path) -> tuple[Path, str | None]:
    s = str(path)
    if not Path(s).exists() and ":" in s:
        head, key = s.rsplit(":", 1)
        if Path(head).exists():
            return Path(head), key
    return Path(s), None


def _is_source(obj) -> bool:
    """A source built elsewhere (e.g. ``softsae.stream.ActivationBuffer``): it has ``d``, ``sample`` and
    ``iter_batches`` (and ``peek`` when its normalisation statistics must not consume rows)."""
    return all(hasattr(obj, a) for a in ("d", "n_rows", "sample", "iter_batches"))


def load_activations(obj, check_finite: bool = True) -> ArraySource | IteratorSource:
    """Wrap ``obj`` (path, array, tensor or iterable of batches) as a validated activation source."""
    if isinstance(obj, (ArraySource, IteratorSource)) or _is_source(obj):
        return obj
    if isinstance(obj, (np.ndarray, Tensor)):
        return ArraySource(obj, "array", check_finite)
    if isinstance(obj, (str, Path)):
        path, key = _split_key(obj)
        if not path.exists():
            raise DataError(f"{path}: no such file")
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected an activation file (.npy, .safetensors, .pt)")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                raise DataError(f"{path}: cannot read as .npy ({type(err).__name__}: {err or 'empty file'})") from None
            if not isinstance(arr, np.ndarray):  # np.load opens an .npz whatever its name
                if hasattr(arr, "close"):
                    arr.close()
                raise DataError(f"{path}: not a .npy array (an .npz archive?); save one array with np.save")
            return ArraySource(arr, str(path), check_finite)
        if suffix == ".safetensors":
            return ArraySource(_open_safetensors(path, key), str(path), check_finite)
        if suffix in (".pt", ".pth"):
            return ArraySource(_open_pt(path, key), str(path), check_finite)
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .npy, .safetensors or .pt")
    if isinstance(obj, Iterable):
        return IteratorSource(obj)
    raise DataError(f"cannot use {type(obj).__name__} as activations")


def normalization_stats(source, mode: str = "scale", max_rows: int = 65536,
                        batch_size: int = 8192) -> tuple[Tensor | None, float]:
    """(shift (d,) or None, scale) for ``x_n = (x - shift) / scale`` from up to ``max_rows`` rows.

    Modes: ``"none"`` (no change), ``"scale"`` (E||x_n||^2 = 1, no shift: the dictionary_learning
    convention), ``"center_scale"`` (shift = mean, then E||x_n||^2 = 1).
    """
    if mode not in ("none", "scale", "center_scale"):
        raise ValueError(f"normalize must be 'none', 'scale' or 'center_scale', got {mode!r}")
    if mode == "none":
        return None, 1.0
    if hasattr(source, "peek"):  # a stream: the statistics come from the rows it holds, left in it
        batches = [source.peek(max_rows)]
    else:
        batches = list(source.iter_batches(batch_size, max_rows))
    x = torch.cat(batches).double()
    shift = x.mean(0) if mode == "center_scale" else None
    xc = x - shift if shift is not None else x
    scale = float(xc.pow(2).sum(-1).mean().sqrt())
    if not scale > 0:
        raise DataError("activations are all zero; cannot normalise (use normalize='none')")
    return (shift.float() if shift is not None else None), scale
