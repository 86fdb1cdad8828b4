"""Timing helpers shared by every benchmark script: p20/p50/p80 (CUDA-aware), peak memory,
environment, JSON rows (:func:`write_rows`, rendered into RESULTS.md by results_table.py) and a table printer."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds (the p50 of :func:`percentiles_ms`)."""
    return percentiles_ms(fn, device, warmup=warmup, repeat=repeat)["p50_ms"]


def percentiles_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 10,
                   cpu_time: bool = False) -> dict[str, float]:
    """p20 / p50 / p80 wall time of ``fn()`` in ms (CUDA synchronised around each call); with
    ``cpu_time`` also ``cpu_min_ms``, the least process CPU time of one call (less disturbed by
    other jobs on a shared machine than wall time)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, cpu = [], []
    for _ in range(repeat):
        c0 = time.process_time()
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    times.sort()

    def q(p: float) -> float:  # linear interpolation between order statistics
        pos = p * (len(times) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(times) - 1)
        return times[lo] + (times[hi] - times[lo]) * (pos - lo)

    out = {"p20_ms": q(0.2), "p50_ms": q(0.5), "p80_ms": q(0.8)}
    if cpu_time:
        out["cpu_min_ms"] = min(cpu)
    return out


def _max_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage``; KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, int | str | None]:
    """Peak memory of one ``fn()`` call.

    CUDA: ``peak_mem_bytes`` = ``torch.cuda.max_memory_allocated`` during the call and
    ``extra_mem_bytes`` = that minus what was allocated before. CPU (no allocator statistics):
    those two are None; ``cpu_maxrss_bytes`` is the process's peak RSS after the call (interpreter,
    torch and every earlier allocation included) and ``cpu_maxrss_growth_bytes`` how far the call
    pushed that peak up: a lower bound on the call's extra memory (0 when it stays under an
    earlier high-water mark). ``mem_kind`` names which one was measured."""
    if device.type != "cuda":
        before = _max_rss_bytes()
        fn()
        after = _max_rss_bytes()
        return {"peak_mem_bytes": None, "extra_mem_bytes": None, "cpu_maxrss_bytes": after,
                "cpu_maxrss_growth_bytes": after - before, "mem_kind": "cpu_process_max_rss"}
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_bytes": int(peak), "extra_mem_bytes": int(peak - base), "mem_kind": "cuda_max_memory_allocated"}


def row_mem_bytes(rec: dict) -> int | None:
    """The memory figure a results table shows: CUDA extra bytes, else the CPU max-RSS growth."""
    if rec.get("extra_mem_bytes") is not None:
        return rec["extra_mem_bytes"]
    return rec.get("cpu_maxrss_growth_bytes")


def environment_dict(device: torch.device) -> dict[str, object]:
    """Machine and versions as a dict (GPU name, driver, torch/triton/CUDA), for JSON output."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    env: dict[str, object] = {"device": str(device), "torch": torch.__version__, "triton": tv,
                              "cuda": torch.version.cuda, "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(device))
        env["driver"] = _driver_version()
    else:
        env["gpu"] = None
        env["cpu_threads"] = torch.get_num_threads()
    return env


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def write_json(path: os.PathLike | str, op: str, device: torch.device, records: list[dict], **meta) -> None:
    """Write ``{"op", "env", "meta", "records"}``; each record carries ``bytes`` (the op's byte
    model) and p20/p50/p80 ms, from which benchmarks/gpu_report.py derives GB/s."""
    doc = {"op": op, "env": environment_dict(device), "meta": meta, "records": records}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def write_rows(path: os.PathLike | str, rows: list[dict], device: torch.device, note: str | None = None,
               command: str | None = None) -> None:
    """Append ``rows`` (one measurement each: op, shape, dtype, backend, pass, p20/p50/p80 ms,
    memory) to the JSON-lines file ``path``, each with the same run stamp: ISO date, command
    line, device name, versions and ``note`` (e.g. "loaded 2-core machine")."""
    env = environment_dict(device)
    stamp = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "command": command if command is not None else shlex.join(["python", *sys.argv]),
             "device_name": env["gpu"] or f"CPU ({platform.processor() or platform.machine()}, "
                                          f"{torch.get_num_threads()} threads)",
             "torch": env["torch"], "triton": env["triton"], "cuda": env["cuda"], "python": env["python"],
             "note": note, "source": "measured"}
    stamp["run"] = stamp["date"] + " " + stamp["command"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, **stamp}) + "\n")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """--device, --B, --backends, --repeat, --markdown, --json, --rows, --note, --quick."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write records (p20/p50/p80, bytes, peak memory)")
    add_rows_args(ap)
    ap.add_argument("--quick", action="store_true",
                    help="timed backends only (no sort-based / torch.topk / embedding_bag baselines)")


def add_rows_args(ap: argparse.ArgumentParser, flag: str = "--rows") -> None:
    """``flag`` FILE.jsonl (append one JSON row per measurement) and --note (machine label for them)."""
    ap.add_argument(flag, type=Path, default=None,
                    help="append one JSON row per measurement (benchmarks/results/rows/*.jsonl)")
    ap.add_argument("--note", default=None, help='machine label stored in the rows, e.g. "loaded 2-core machine"')


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of an op benchmark (bench_soft_topk.py, bench_sparse_decode.py): ``doc`` as its
    help text and the common arguments (:func:`add_common_args`)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    return ap


def device_and_backends(args: argparse.Namespace) -> tuple[torch.device, list[str]]:
    """``args.device`` and the backends to time: ``args.backends``, else every backend softsae has there."""
    import softsae

    device = torch.device(args.device)
    return device, args.backends or softsae.available_backends(device)


def write_outputs(args: argparse.Namespace, op: str, device: torch.device, title: str, headers: list[str],
                  rows: list[list[object]], records: list[dict], baselines: list[dict], byte_model: str,
                  **meta) -> None:
    """Everything an op benchmark writes: the table (printed, and to ``--markdown``), the backends'
    ``records`` to ``--json`` (with ``meta`` and the ``byte_model``) and ``baselines + records`` to
    ``--rows`` (stamped by :func:`write_rows` with ``--note``)."""
    report(title, headers, rows, args.markdown)
    if args.json:
        write_json(args.json, op, device, records, **meta, byte_model=byte_model)
    if args.rows:
        write_rows(args.rows, baselines + records, device, note=args.note)


def report(title: str, headers: list[str], rows: list[list[object]], markdown=None) -> None:
    """Print the title and table; also write them to ``markdown`` (a Path) when given."""
    table = markdown_table(headers, rows)
    print(title)
    print(table)
    if markdown:
        markdown.write_text(f"{title}\n\n{table}\n")


def environment(device: torch.device) -> str:
    """One line naming the machine and versions, for RESULTS.md."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"{where}; torch {torch.__version__}; triton {tv}"
