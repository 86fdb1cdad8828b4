"""One full SAE training step, softsae against the libraries people train SAEs with: tokens/s and memory.

    python benchmarks/bench_train_step.py                                    # d=768, n=16384, K=32, B=1024
    python benchmarks/bench_train_step.py --d 384 --n 4096 --threads 1 2 --rows benchmarks/results/rows/train_step.jsonl
    python benchmarks/bench_train_step.py --profile --models topk softsae-soft     # where softsae's step spends time

A step is what each library's trainer does per batch: forward, losses (reconstruction + auxk on the
10% of latents marked dead before every step), backward, decoder-gradient projection, optimizer
step (Adam), decoder renormalisation, dead-latent bookkeeping. Every framework gets the same batch
``x`` (B, d), float32 N(0, 1), on the same device, at the same thread count. What is timed:

* ``softsae`` / ``reference``: ``softsae.trainer.train_step`` (through
  ``bench_train_throughput.make_train_step``) with the fastest compiled ops backend, resp. the
  pure-PyTorch reference backend. Adds global grad-norm clipping (the recipe's).
* ``dictionary_learning`` (package ``dictionary-learning``): ``TopKTrainer.update`` /
  ``BatchTopKTrainer.update`` as its training loop calls them (step > threshold_start_step, so the
  threshold EMA runs; includes its ``loss.item()``).
* ``sparsify`` (package ``eai-sparsify``): its ``Trainer.fit`` cannot be stepped without a
  transformers model and a tokenised dataset, so this times the per-batch body of ``fit`` for one
  SAE with ``loss_fn="fvu"``, ``optimizer="adam"``, ``auxk_alpha=1/32``: ``set_decoder_norm_to_unit_norm``,
  ``SparseCoder.forward(x, y=x, dead_mask, total_variance)`` (its fused encoder, sparse decoder),
  the did_fire bookkeeping, ``(fvu + auxk_alpha * auxk_loss).backward()``,
  ``remove_gradient_parallel_to_decoder_directions``, ``torch.optim.Adam.step`` (its fallback when
  bitsandbytes is absent), ``zero_grad``, the dead-latent counters. Not timed: the LR scheduler
  (a scalar) and the model forward that produces activations. No grad clipping (it has none).

Models (``--models``): topk, batchtopk, softsae-soft (the trainer's default step before the hard
phase: the hard codes' sparse decode plus the k head's straight-through term), softsae-soft-sparse
(decode_mode "sparse"), softsae-hard, softsae-soft-kh4 (softsae-soft with a k head of width n/4
instead of the paper's n: ``k_hidden``, whose cost in FVU benchmarks/science/k_head_width.py measures).
A framework whose package is missing is skipped with the reason (printed and in the JSON rows).

Memory on CPU: the peak RSS during one step over the RSS just before it (Linux: the high-water mark
is reset through /proc/self/clear_refs), i.e. the step's transient extra memory; on CUDA
``max_memory_allocated`` over what was allocated before.

The full grid for a bigger machine (GPU: add ``--device cuda``)::

    python benchmarks/bench_train_step.py --d 384 768 2304 --n 4096 16384 65536 --k 32 128 \
        --batch-size 4096 --threads 1 2 4 8 --rows benchmarks/results/rows/train_step.jsonl
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _timing import add_rows_args, environment, markdown_table, peak_memory, percentiles_ms, write_rows
from bench_train_throughput import make_train_step

import softsae
from softsae.cpu_memory import keep_freed_memory

FRAMEWORKS = ("softsae", "reference", "dictionary_learning", "sparsify")
MODELS = ("topk", "batchtopk", "softsae-soft", "softsae-soft-sparse", "softsae-hard", "softsae-soft-kh4")
SOFTSAE_MODELS = {  # model -> (arch, hard phase, decode_mode, k head width as a divisor of n), as in
    "topk": ("topk", False, "auto", 1),  # bench_train_throughput.VARIANTS
    "batchtopk": ("batchtopk", False, "auto", 1),
    "softsae-soft": ("softsae", False, "auto", 1),
    "softsae-soft-sparse": ("softsae", False, "sparse", 1),
    "softsae-hard": ("softsae", True, "auto", 1),
    "softsae-soft-kh4": ("softsae", False, "auto", 4),  # k_hidden = n / 4 (benchmarks/science/k_head_width.py)
}
PACKAGES = {"softsae": "softsae", "reference": "softsae", "dictionary_learning": "dictionary-learning",
            "sparsify": "eai-sparsify"}
AUXK_ALPHA = 1 / 32  # every framework's auxk weight (sparsify's default is 0: set to the others')


class Unavailable(Exception):
    """A framework or model that cannot run here; the message says why."""


class Missing(Unavailable):
    """The framework's package is not installed."""


@dataclass
class Shape:
    d: int
    n: int
    k: int
    B: int


def package_version(framework: str) -> str | None:
    try:
        return importlib.metadata.version(PACKAGES[framework])
    except importlib.metadata.PackageNotFoundError:
        return None


def fast_backend(device: torch.device) -> str:
    """softsae's fastest compiled backend on ``device`` (reference when none is built)."""
    avail = softsae.available_backends(device)
    order = ("triton", "cuda", "cpu") if device.type == "cuda" else ("cpu",)
    return next((b for b in order if b in avail), "reference")


# ----------------------------------------------------------------------------- one step per framework


def softsae_step(backend: str, model: str, s: Shape, x: torch.Tensor, alpha: float, dead_frac: float) -> Callable:
    arch, hard, mode, div = SOFTSAE_MODELS[model]
    return make_train_step(x.device, backend, arch, hard, mode, s.d, s.n, s.B, s.k, alpha, x=x, dead_frac=dead_frac,
                           k_hidden=None if div == 1 else max(1, s.n // div))


def dictionary_learning_step(model: str, s: Shape, x: torch.Tensor, dead_frac: float) -> Callable:
    if model not in ("topk", "batchtopk"):
        raise Unavailable(f"dictionary_learning has no {model} trainer")
    try:
        from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
        from dictionary_learning.trainers.top_k import TopKTrainer
    except ImportError as e:
        raise Missing(f"dictionary-learning is not installed ({e})") from e
    classes = {"topk": TopKTrainer, "batchtopk": BatchTopKTrainer}
    torch.manual_seed(0)
    steps = 10**6
    tr = classes[model](steps=steps, activation_dim=s.d, dict_size=s.n, k=s.k, layer=0, lm_name="bench",
                        auxk_alpha=AUXK_ALPHA, warmup_steps=0, seed=0, device=str(x.device))
    tr.dead_feature_threshold = s.B * 1000
    n_dead = int(s.n * dead_frac)
    step_no = [tr.threshold_start_step + 1]  # steady state: the threshold EMA runs, no init on step 0

    def step():
        tr.num_tokens_since_fired[:n_dead] = tr.dead_feature_threshold
        tr.update(step_no[0], x)
        step_no[0] += 1

    step.module = tr.ae  # for tests
    return step


def sparsify_step(model: str, s: Shape, x: torch.Tensor, dead_frac: float) -> Callable:
    if model != "topk":
        raise Unavailable(f"sparsify trains TopK SAEs only (asked for {model})")
    if x.device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder is CUDA-only
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        raise Missing(f"eai-sparsify is not installed ({e})") from e
    torch.manual_seed(0)
    sc = SparseCoder(s.d, SparseCoderConfig(num_latents=s.n, k=s.k), device=x.device)
    opt = torch.optim.Adam(sc.parameters(), lr=2e-4 / (s.n / 2**14) ** 0.5)  # its "adam" default lr
    threshold = s.B * 1000
    counts = torch.zeros(s.n, dtype=torch.long, device=x.device)
    n_dead = int(s.n * dead_frac)

    def step():  # the per-batch body of sparsify.Trainer.fit (loss_fn="fvu", one SAE, no DDP)
        counts[:n_dead] = threshold + 1
        sc.set_decoder_norm_to_unit_norm()
        dead_mask = counts > threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sc(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire = torch.zeros(s.n, dtype=torch.bool, device=x.device)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            counts.add_(x.shape[0])
            counts[did_fire] = 0

    step.module = sc  # for tests
    return step


def make_step(framework: str, model: str, s: Shape, x: torch.Tensor, alpha: float, dead_frac: float
              ) -> tuple[Callable, str]:
    """(step closure, ops backend label); raises Unavailable with the reason."""
    if framework in ("softsae", "reference"):
        if model not in SOFTSAE_MODELS:
            raise Unavailable(f"unknown model {model}")
        backend = "reference" if framework == "reference" else fast_backend(x.device)
        return softsae_step(backend, model, s, x, alpha, dead_frac), backend
    if framework == "dictionary_learning":
        return dictionary_learning_step(model, s, x, dead_frac), "torch"
    if framework == "sparsify":
        return sparsify_step(model, s, x, dead_frac), "torch"
    raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


# ----------------------------------------------------------------------------- measurement


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def step_memory(step: Callable, device: torch.device) -> dict:
    """Memory of one ``step()``: CUDA allocator peak, or on Linux CPU the RSS high-water mark of the
    step (reset first) over the RSS before it; elsewhere the max-RSS growth of _timing.peak_memory."""
    if device.type == "cuda":
        return peak_memory(step, device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (Linux >= 4.0)
        base = _status_kib("VmRSS")
    except OSError:
        return peak_memory(step, device)
    step()
    peak = _status_kib("VmHWM")
    return {"peak_mem_bytes": None, "extra_mem_bytes": None, "cpu_maxrss_bytes": peak * 1024,
            "cpu_maxrss_growth_bytes": (peak - base) * 1024, "mem_kind": "cpu_step_rss_high_water_over_start"}


def mem_mib(rec: dict) -> float:
    """The step's extra memory in MiB (CUDA allocator, else CPU RSS high-water growth; 0 if unknown)."""
    return (rec.get("extra_mem_bytes") or rec.get("cpu_maxrss_growth_bytes") or 0) / 2**20


def measure(step: Callable, device: torch.device, repeat: int) -> dict:
    """One warm-up step, one step for memory, then ``repeat`` timed steps (p20/p50/p80, least CPU time)."""
    step()
    mem = step_memory(step, device)
    return {**percentiles_ms(step, device, warmup=0, repeat=repeat, cpu_time=device.type != "cuda"), **mem}


def profile_step(step: Callable, label: str, top: int = 14) -> None:
    """Print where one step spends its time (torch.profiler, CPU): by phase (backward = the autograd
    engine's node evaluations, optimizer = ``Optimizer.step``, the rest = forward, losses, decoder
    projection/renormalisation, bookkeeping), by kind of op (self time), and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    bwd = sum(e.cpu_time_total for e in ev if e.key.startswith("autograd::engine::evaluate_function"))
    opt = sum(e.cpu_time_total for e in ev if e.key.startswith("Optimizer.step#"))
    phases = [("backward", bwd), ("optimizer step (Adam)", opt),
              ("forward, losses, grad projection/clip, renorm, bookkeeping", total - bwd - opt)]
    kinds: dict[str, float] = {}
    for e in ev:
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            kind = "GEMM (aten::mm/addmm)"
        elif "softsae" in e.key or "sparse_decode" in e.key or "soft_topk" in e.key:
            kind = "softsae ops (and their autograd wrappers)"
        elif e.key in ("aten::topk", "aten::sort"):
            kind = "torch.topk / sort"
        else:
            kind = "other (elementwise, copies, reductions, Adam's per-tensor ops)"
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total
    share = lambda t: f"{100 * t / total:.0f}%"  # noqa: E731
    print(f"\nprofile: {label}, one step, {total / 1e3:.0f} ms CPU (profiler wall clock per op)")
    print(markdown_table(["phase", "ms", "share"], [[g, t / 1e3, share(t)] for g, t in phases]))
    print(markdown_table(["kind of op (self time)", "ms", "share"],
                         [[g, t / 1e3, share(t)] for g, t in sorted(kinds.items(), key=lambda kv: -kv[1])]))
    rows = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:top]
    print(markdown_table(["op", "calls", "self ms", "share"],
                         [[e.key, e.count, e.self_cpu_time_total / 1e3, share(e.self_cpu_time_total)] for e in rows]))


# ----------------------------------------------------------------------------- table


def ratio_rows(records: list[dict]) -> list[list[object]]:
    """The targets of issue #11 as ratios at each (shape, threads) with both sides measured: of the p50
    wall times and (CPU) of the least CPU times of one step, less disturbed on a shared machine."""
    out = []
    key = lambda r: (r["d"], r["n"], r["k"], r["B"], r["threads"])  # noqa: E731
    by = {(key(r), r["framework"], r["model"]): r for r in records if "p50_ms" in r}
    checks = [("softsae TopK speed-up over dictionary_learning TopK", ("dictionary_learning", "topk"),
               ("softsae", "topk"), ">= 2"),
              ("softsae TopK speed-up over sparsify TopK", ("sparsify", "topk"), ("softsae", "topk"), ">= 1"),
              ("SoftSAE soft step / softsae TopK step", ("softsae", "softsae-soft"), ("softsae", "topk"), "<= 1.5"),
              ("SoftSAE soft (sparse gate+decode) / softsae TopK", ("softsae", "softsae-soft-sparse"),
               ("softsae", "topk"), "<= 1.5"),
              ("SoftSAE soft step, k head n/4 / softsae TopK step", ("softsae", "softsae-soft-kh4"),
               ("softsae", "topk"), "<= 1.5")]
    for k in sorted({key(r) for r in by.values()}):
        for label, num, den, target in checks:
            a, b = by.get((k, *num)), by.get((k, *den))
            if a and b:
                cpu = a["cpu_min_ms"] / b["cpu_min_ms"] if a.get("cpu_min_ms") and b.get("cpu_min_ms") else ""
                out.append([f"d={k[0]} n={k[1]} K={k[2]} B={k[3]} t={k[4]}", label, a["p50_ms"] / b["p50_ms"], cpu,
                            target])
    return out


def render(records: list[dict]) -> str:
    """Markdown: the measurements table, the target ratios and the skipped frameworks of ``records``."""
    measured = [r for r in records if "p50_ms" in r]
    table = markdown_table(
        ["threads", "d", "n", "K", "B", "framework", "version", "model", "backend", "p50 ms", "p20–p80 ms",
         "least CPU ms", "tok/s (p50)", "step mem MiB"],
        [[r["threads"], r["d"], r["n"], r["k"], r["B"], r["framework"], r["version"], r["model"], r["backend"],
          r["p50_ms"], f"{r['p20_ms']:.0f}–{r['p80_ms']:.0f}", r.get("cpu_min_ms", ""), r["tokens_per_s"],
          mem_mib(r)] for r in measured])
    ratios = markdown_table(["shape", "ratio", "of p50s", "of least CPU times", "target"], ratio_rows(measured))
    skipped = "".join(f"\nskipped {r['framework']} {r['model']}: {r['skipped']}" for r in records if "skipped" in r)
    return f"{table}\n\n{ratios}\n{skipped}"


def render_rows_file(path: Path) -> str:
    """Every run stored in the rows file ``path``, one section each (its stamp, then :func:`render`)."""
    runs: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            runs.setdefault(r["run"], []).append(r)
    parts = []
    for rs in runs.values():
        r0 = rs[0]
        note = f" ({r0['note']})" if r0.get("note") else ""
        device = re.sub(r", \d+ threads?\)", ")", r0["device_name"])  # threads: per row (the stamp has the last)
        parts.append(f"### {r0['date']}: {device}, torch {r0['torch']}{note}\n\n"
                     f"`{r0['command']}`\n\n{render(rs)}")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", type=int, nargs="+", default=[768])
    ap.add_argument("--n", type=int, nargs="+", default=[16384])
    ap.add_argument("--k", type=int, nargs="+", default=[32])
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--reference-models", nargs="+", default=None, choices=MODELS,
                    help="models run with the reference backend (default: all --models)")
    ap.add_argument("--alpha", type=float, default=3e-3, help="SoftSAE soft top-k scale (trainer default)")
    ap.add_argument("--dead-frac", type=float, default=0.1, help="latents marked dead before each step (auxk on)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="profile one softsae step per model instead of timing")
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep",
                    help="CPU: keep freed memory in the process for every framework (what softsae's trainer "
                         "does, softsae/cpu_memory.py) or glibc's default (large blocks mmapped per step)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the table (and ratios) to this file")
    add_rows_args(ap)
    ap.add_argument("--render", type=Path, default=None, metavar="ROWS.jsonl",
                    help="print every run stored in this rows file as markdown (measures nothing)")
    a = ap.parse_args(argv)
    if a.render:
        print(render_rows_file(a.render), end="")
        return []
    device = torch.device(a.device)
    malloc = "n/a"
    if device.type == "cpu":
        malloc = "keep" if a.malloc == "keep" and keep_freed_memory() else "default"
    threads = a.threads or [torch.get_num_threads()]
    versions = {f: package_version(f) for f in FRAMEWORKS}
    records: list[dict] = []
    for t in threads:
        if device.type == "cpu":
            torch.set_num_threads(t)
        for d in a.d:
            for n in a.n:
                for k in a.k:
                    s = Shape(d, n, k, a.batch_size)
                    torch.manual_seed(1234)
                    x = torch.randn(s.B, s.d, device=device)  # the same batch for every framework
                    for fw in (["softsae"] if a.profile else a.frameworks):
                        models = a.reference_models if fw == "reference" and a.reference_models else a.models
                        for model in models:
                            rec = {"op": "train_step", "framework": fw, "model": model, "d": d, "n": n, "k": k,
                                   "B": s.B, "threads": torch.get_num_threads(), "dtype": "float32",
                                   "alpha": a.alpha if model.startswith("softsae") else None,
                                   "dead_frac": a.dead_frac, "version": versions[fw], "repeat": a.repeat,
                                   "softsae_version": versions["softsae"], "malloc": malloc}
                            try:
                                step, backend = make_step(fw, model, s, x, a.alpha, a.dead_frac)
                            except Missing as e:
                                print(f"skip {fw} {model}: {e}", flush=True)
                                records.append({**rec, "skipped": str(e)})
                                continue
                            except Unavailable:  # e.g. sparsify has no BatchTopK: not a row
                                continue
                            if a.profile:
                                profile_step(step, f"softsae {model} (backend {backend}) d={d} n={n} K={k} "
                                                   f"B={s.B}, {torch.get_num_threads()} thread(s)")
                                continue
                            stats = measure(step, device, a.repeat)
                            rec.update(backend=backend, tokens_per_s=s.B / stats["p50_ms"] * 1e3, **stats)
                            records.append(rec)
                            print(f"t={rec['threads']} d={d} n={n} K={k} B={s.B} {fw:>19} {model:<20} "
                                  f"p50 {stats['p50_ms']:9.1f} ms  {rec['tokens_per_s']:9.0f} tok/s  "
                                  f"cpu_min {stats.get('cpu_min_ms', float('nan')):9.1f} ms  "
                                  f"mem {mem_mib(stats):7.0f} MiB",
                                  flush=True)
    if a.profile:
        return records
    text = (f"{render(records)}\n{environment(device)}; float32; {int(100 * a.dead_frac)}% dead latents (auxk on); "
            f"allocator: {malloc} (every framework in this process)")
    print("\n" + text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    if a.rows:
        write_rows(a.rows, records, device, note=a.note)
    return records


if __name__ == "__main__":
    main()
