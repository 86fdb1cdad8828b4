"""A toy causal LM for the dashboard tests: a tiny random LlamaForCausalLM (no download) behind the
members of ``softsae.lm.LanguageModel`` the dashboard uses, with a word-level toy tokenizer."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

BOS = 1


@dataclass
class ToyWindow:
    ids: list[int]
    keep: list[bool]
    doc: int


class ToyLM:
    """Words -> ids by a fixed table (unknown words share id 2); windows start with BOS (not kept)."""

    def __init__(self, d: int = 32, vocab: int = 120, layers: int = 2, causal: bool = True, seed: int = 0) -> None:
        from softsae.activations import _without_checkout_on_path

        with _without_checkout_on_path():  # the checkout's kernels/ would shadow Hugging Face's package
            from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        self.model = LlamaForCausalLM(cfg).eval()
        self.causal, self.d_model, self.vocab = causal, d, vocab
        self.spec = SimpleNamespace(name="toy", default_layer="model.layers.0")
        self.table: dict[str, int] = {}
        self.names = {0: "<pad>", BOS: "<s>", 2: "<unk>"}

    def encode(self, text: str) -> list[int]:
        out = []
        for w in re.findall(r"\S+", text):
            if w not in self.table and len(self.table) < self.vocab - 3:
                self.table[w] = 3 + len(self.table)
                self.names[self.table[w]] = " " + w
            out.append(self.table.get(w, 2))
        return out

    def windows(self, texts: Sequence[str], seq_len: int) -> list[ToyWindow]:
        wins = []
        for doc, text in enumerate(texts):
            ids = self.encode(text)
            for s in range(0, len(ids), seq_len - 1):
                part = ids[s:s + seq_len - 1]
                wins.append(ToyWindow([BOS, *part], [False] + [True] * len(part), doc))
        return wins

    def _run(self, input_ids: Tensor, attention_mask: Tensor, layer: str | None,
             edit: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, Tensor]:
        mod = dict(self.model.named_modules())[layer or self.spec.default_layer]
        got: list[Tensor] = []

        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            if edit is not None:
                h = edit(h)
            got.append(h)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = mod.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            handle.remove()
        return got[0], logits

    def residual(self, input_ids: Tensor, attention_mask: Tensor, layer: str | None = None) -> Tensor:
        return self._run(input_ids, attention_mask, layer, None)[0].float()

    def logits(self, input_ids: Tensor, attention_mask: Tensor, layer: str | None = None,
               edit: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        if not self.causal:
            raise ValueError("not causal")
        return self._run(input_ids, attention_mask, layer, edit)[1].float()

    def unembedding(self) -> Tensor | None:
        return self.model.lm_head.weight.detach().float() if self.causal else None

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.names.get(int(i), f"<{int(i)}>") for i in ids]


TEXT = """The cat sat on the mat and looked at the dog.
The dog ran after the ball, and the cat slept.

Numbers: one two three four five six seven eight nine ten.
A <b>tag</b> & an "ampersand" </script> must show as text.

Rivers flow to the sea; the sea is wide and deep and blue.
"""
