"""Activations streamed from a language model through a shuffling buffer: train without an .npy file.

    source = open_stream(layer="encoder.layer.3", texts=my_texts, buffer_tokens=262_144, seed=0)
    result = softsae.train(source, cfg, out_dir="runs/sae")     # CLI: softsae train --layer L --text FILE ...

The scheme is that of dictionary_learning's ActivationBuffer:

* ``WindowStream`` cuts texts into windows of ``seq_len`` tokens (``softsae.lm.LanguageModel.windows``:
  a long text continues in further windows), runs the model up to ``layer`` (``softsae.lm.run_lm_windows``)
  and yields the per-token rows in text order. At the end of the texts it starts
  again (the next epoch) unless ``cycle=False``.
* ``ActivationBuffer`` holds ``capacity`` rows (float32). Its rows are served in a uniformly random
  order without replacement (a fresh permutation after every fill); when fewer than capacity / 2
  unread rows remain, the read rows are dropped and the model is run on more text to fill their
  slots. So no row is served twice (until the texts cycle), and the memory is the buffer, the
  windows of one model run (``windows_per_run``) and at most one window of carried-over rows.
* Normalisation statistics (``softsae.data.normalization_stats``) come from the first buffer:
  ``peek`` returns (an evenly spaced subset of) its rows without consuming them.
* Resumable: ``state_dict()`` holds the settings, the position in the texts (epoch, text, window),
  the unread rows with their slots and serving order, the carried-over rows and the RNG state. The
  trainer stores it in ``trainer_state.pt`` and restores it on resume, so a resumed run draws the
  same batches as an uninterrupted one; a checkpoint grows by up to capacity x d x 4 bytes.

The buffer is a source in the sense of ``softsae.data`` (``d``, ``n_rows=None``, ``sample``,
``iter_batches``, ``peek``), so ``train``, ``evaluate`` and ``normalization_stats`` take it as is.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from softsae.data import DataError, check_finite_batch
from softsae.hf import find_module
from softsae.lm import Window, run_lm_windows

DEFAULT_BUFFER_TOKENS = 262_144  # 400 MB at d = 384 (MiniLM); 64 batches of 4096


class RowProducer(Protocol):
    """What ``ActivationBuffer`` fills itself from."""

    d: int

    def take(self, n_rows: int) -> Iterator[np.ndarray]:
        """Chunks (rows, d) of the next rows, at least ``n_rows`` in all unless the data ends."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 over the texts (order-sensitive): a resumed stream must read the same texts."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()


class WindowStream:
    """Layer activations of successive windows of ``texts``, in order (a ``RowProducer``).

    ``lm`` is a ``softsae.lm.LanguageModel`` (windows as ``lm.windows``: for a causal LM BOS-led windows of
    each text, BOS and special tokens not kept); ``batch_size`` windows go through the model per forward
    pass (which stops at ``layer``), at most ``windows_per_run`` windows per model run.
    """

    def __init__(self, lm, layer: str, texts: Sequence[str], seq_len: int = 128, batch_size: int = 32,
                 keep_special: bool = False, cycle: bool = True, texts_per_chunk: int = 64,
                 windows_per_run: int | None = None) -> None:
        if not texts:
            raise ValueError("texts: no text to stream activations from")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lm, self.layer, self.texts = lm, layer, texts
        self.seq_len, self.batch_size = seq_len, batch_size
        self.keep_special, self.cycle, self.texts_per_chunk = keep_special, cycle, texts_per_chunk
        self.windows_per_run = windows_per_run or 8 * batch_size
        self.epoch = 0
        self._next_text = 0  # the next text to tokenise
        self._skip: tuple[int, int] | None = None  # (text, windows) already consumed, after a restore
        self._queue: deque[tuple[int, int, Window]] = deque()  # (text, window in the text, window)
        self._epoch_rows = 0
        probe = lm.windows(["probe text"], seq_len)
        self.d = int(run_lm_windows(lm, probe, 1, layer, keep_special=True)[0].shape[1])

    def _rows_of(self, window: Window) -> int:
        return len(window.ids) if self.keep_special else sum(window.keep)

    def _fill_queue(self) -> bool:
        """Tokenise the next texts into the (empty) queue; False when the texts ended (``cycle=False``)."""
        while not self._queue:
            if self._next_text >= len(self.texts):
                if not self.cycle:
                    return False
                if self._epoch_rows == 0:
                    raise ValueError("texts: a whole pass over the texts gave no token activations")
                self.epoch, self._next_text, self._epoch_rows = self.epoch + 1, 0, 0
            start = self._next_text
            chunk = self.texts[start:start + self.texts_per_chunk]
            windows = self.lm.windows(chunk, self.seq_len)
            self._next_text = start + len(chunk)
            seen: dict[int, int] = {}
            for win in windows:
                s = win.doc
                w = seen.get(s, 0)
                seen[s] = w + 1
                if self._skip is not None and start + s == self._skip[0] and w < self._skip[1]:
                    continue
                self._queue.append((start + s, w, win))
            self._skip = None
        return True

    def take(self, n_rows: int) -> Iterator[np.ndarray]:
        """float32 chunks (rows, d) of the next windows, in order, until at least ``n_rows`` rows (the last
        window may overshoot by fewer than ``seq_len`` rows); fewer when the texts end (``cycle=False``)."""
        got = 0
        while got < n_rows:
            group = []
            while got < n_rows and len(group) < self.windows_per_run and (self._queue or self._fill_queue()):
                _, _, win = self._queue.popleft()
                group.append(win)
                got += self._rows_of(win)
            if not group:
                return
            rows = run_lm_windows(self.lm, group, self.batch_size, self.layer, self.keep_special)
            out = np.concatenate(rows) if rows else np.zeros((0, self.d), np.float32)
            self._epoch_rows += len(out)
            yield out

    def position(self) -> tuple[int, int, int]:
        """(epoch, text, window in that text) of the next window to be read."""
        if self._queue:
            text, window, _ = self._queue[0]
            return self.epoch, text, window
        if self._skip is not None:
            return self.epoch, *self._skip
        return self.epoch, self._next_text, 0

    def state_dict(self) -> dict[str, Any]:
        epoch, text, window = self.position()
        return {"epoch": epoch, "text": text, "window": window, "epoch_rows": self._epoch_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._queue.clear()
        self.epoch, self._epoch_rows = int(state["epoch"]), int(state["epoch_rows"])
        self._next_text, self._skip = int(state["text"]), (int(state["text"]), int(state["window"]))


class ActivationBuffer:
    """A shuffling buffer of ``capacity`` rows over a ``RowProducer``; a training source (see module doc).

    ``settings`` (JSON-able) identify the stream: ``load_state_dict`` refuses a state with other ones.
    """

    def __init__(self, producer: RowProducer, capacity: int, seed: int = 0, name: str = "stream",
                 settings: dict[str, Any] | None = None) -> None:
        if capacity < 2:
            raise ValueError(f"capacity (buffer_tokens) must be >= 2, got {capacity}")
        self.producer, self.capacity, self.name = producer, int(capacity), name
        self.d, self.n_rows = int(producer.d), None
        self.settings = dict(settings or {}, capacity=self.capacity, seed=int(seed))
        self._rng = np.random.default_rng(seed)
        self._buf: Tensor | None = None  # (capacity, d) float32, allocated at the first fill
        self._order = torch.zeros(0, dtype=torch.long)  # slots of the rows held, in serving order
        self._cursor = 0  # rows of _order already served
        self._pending = torch.zeros(0, self.d)  # rows produced beyond the capacity, used first at the next fill
        self._ended = False  # the producer has no more rows (cycle=False)
        self.refills = 0
        self.rows_served = 0

    @property
    def unread(self) -> int:
        """Rows held and not yet served."""
        return len(self._order) - self._cursor

    def _refill(self) -> None:
        """Keep the unread rows, fill every other slot with new rows, draw a new serving order."""
        if self._buf is None:
            self._buf = torch.zeros(self.capacity, self.d)
        keep = self._order[self._cursor:]
        free_mask = torch.ones(self.capacity, dtype=torch.bool)
        free_mask[keep] = False
        free = free_mask.nonzero().squeeze(1)  # ascending
        at = 0
        chunks = [self._pending] if len(self._pending) else []
        self._pending = torch.zeros(0, self.d)
        need = len(free) - sum(len(c) for c in chunks)
        if need > 0 and not self._ended:
            produced = 0
            for arr in self.producer.take(need):
                produced += len(arr)
                chunks.append(torch.from_numpy(arr))
                at = self._place(chunks, free, at)
                chunks = [c for c in chunks if len(c)]
            self._ended = produced < need
        at = self._place(chunks, free, at)
        self._pending = torch.cat([c for c in chunks if len(c)]) if any(len(c) for c in chunks) \
            else torch.zeros(0, self.d)
        held = torch.cat([keep, free[:at]])
        self._order = held[torch.from_numpy(self._rng.permutation(len(held)))]
        self._cursor = 0
        self.refills += 1

    def _place(self, chunks: list[Tensor], free: Tensor, at: int) -> int:
        """Copy rows from the front of ``chunks`` into ``free[at:]`` (consuming them in place); new ``at``."""
        for i, c in enumerate(chunks):
            m = min(len(c), len(free) - at)
            if m <= 0:
                break
            check_finite_batch(c[:m], self.name)
            self._buf[free[at:at + m]] = c[:m].to(torch.float32)
            chunks[i] = c[m:]
            at += m
        return at

    def _serve(self, n: int) -> Tensor:
        """Up to ``n`` rows (fewer only when the data ended), refilling first when half empty."""
        if self._buf is None or (self.unread < self.capacity // 2 and not self._ended):
            self._refill()
        idx = self._order[self._cursor:self._cursor + n]
        self._cursor += len(idx)
        self.rows_served += len(idx)
        return self._buf[idx]

    def peek(self, n_rows: int) -> Tensor:
        """Up to ``n_rows`` unread rows (evenly spaced over the buffer), left in it; fills the first buffer."""
        if self._buf is None:
            self._refill()
        slots = self._order[self._cursor:].sort().values
        if len(slots) == 0:
            raise DataError(f"{self.name}: the stream holds no activations")
        if len(slots) > n_rows:
            slots = slots[torch.linspace(0, len(slots) - 1, n_rows).round().long()]
        return self._buf[slots].clone()

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> Tensor:
        """``batch_size`` random rows (B, d) float32, none served before; ``rng`` is unused (the buffer has its own)."""
        if batch_size > self.capacity // 2:
            raise ValueError(f"batch size {batch_size} needs a buffer of at least 2 x {batch_size} rows "
                             f"(buffer_tokens={self.capacity})")
        out = self._serve(batch_size)
        if len(out) < batch_size:
            raise DataError(f"{self.name}: the stream ran out of activations")
        return out

    def iter_batches(self, batch_size: int, max_rows: int | None = None) -> Iterator[Tensor]:
        """Random rows in batches of at most ``min(batch_size, capacity // 2)`` until ``max_rows`` or the end."""
        b = max(1, min(batch_size, self.capacity // 2))
        seen = 0
        while max_rows is None or seen < max_rows:
            out = self._serve(b if max_rows is None else min(b, max_rows - seen))
            if len(out) == 0:
                return
            seen += len(out)
            yield out

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed stream needs (tensors, ints, strings; ``torch.load(weights_only=True)`` reads it)."""
        unread = self._order[self._cursor:]
        return {"settings": self.settings, "producer": self.producer.state_dict(), "order": self._order.clone(),
                "cursor": self._cursor, "rows": self._buf[unread].clone() if self._buf is not None else None,
                "pending": self._pending.clone(), "rng": self._rng.bit_generator.state, "ended": self._ended,
                "refills": self.refills, "rows_served": self.rows_served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["settings"] != self.settings:
            diff = {k: (state["settings"].get(k), v) for k, v in self.settings.items()
                    if state["settings"].get(k) != v}
            raise ValueError(f"{self.name}: the saved stream had other settings (saved vs now: {diff}); "
                             "resume with the same model, layer, texts, buffer size and seed")
        self.producer.load_state_dict(state["producer"])
        self._order, self._cursor = state["order"].clone(), int(state["cursor"])
        self._buf = None
        if state["rows"] is not None:
            self._buf = torch.zeros(self.capacity, self.d)
            self._buf[self._order[self._cursor:]] = state["rows"]
        self._pending = state["pending"].clone()
        self._rng.bit_generator.state = state["rng"]
        self._ended, self.refills, self.rows_served = bool(state["ended"]), int(state["refills"]), \
            int(state["rows_served"])


def open_stream(model_path: str | Path | None = None, layer: str | None = None, texts: Sequence[str] | None = None,
                buffer_tokens: int = DEFAULT_BUFFER_TOKENS, seq_len: int = 128, batch_size: int = 32,
                device: str = "cpu", keep_special: bool = False, seed: int = 0, cycle: bool = True
                ) -> ActivationBuffer:
    """A shuffling buffer of ``buffer_tokens`` rows of ``layer`` outputs (default: the model's documented
    layer) of a model ``softsae.lm.resolve_model`` names (default: the packaged all-MiniLM-L6-v2; also
    ``smollm2``, an HF directory, a .gguf file) over ``texts`` (default: ``softsae.corpus.python_docs_corpus()``,
    paragraph by paragraph for MiniLM, one text per document for a causal LM); ``batch_size`` windows per
    forward pass on ``device``."""
    from softsae.lm import lm_texts, load_lm, model_key, resolve_model

    if buffer_tokens < 2:
        raise ValueError(f"buffer_tokens must be >= 2, got {buffer_tokens}")
    spec = resolve_model(model_path)
    layer = layer or spec.default_layer
    if texts is None:
        from softsae.corpus import python_docs_corpus

        docs = python_docs_corpus()
        texts = lm_texts(docs, spec.causal)
    texts = list(texts)
    lm = load_lm(spec, device)
    find_module(lm.model, layer)
    producer = WindowStream(lm, layer, texts, seq_len=seq_len, batch_size=batch_size, keep_special=keep_special,
                            cycle=cycle)
    settings = {"model": model_key(spec), "layer": layer, "seq_len": seq_len, "keep_special": keep_special,
                "n_texts": len(texts), "texts_sha256": texts_fingerprint(texts), "cycle": cycle}
    return ActivationBuffer(producer, buffer_tokens, seed=seed, name=f"stream {spec.name}:{layer}",
                            settings=settings)
