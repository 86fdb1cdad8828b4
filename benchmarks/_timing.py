"""Timing helpers shared by the benchmark scripts: medians, CUDA-aware, plus a table printer."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def percentiles_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2,
                   repeat: int = 10) -> dict[str, float]:
    """p20 / p50 / p80 wall time of ``fn()`` in ms (CUDA synchronised around each call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()

    def q(p: float) -> float:  # linear interpolation between order statistics
        pos = p * (len(times) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(times) - 1)
        return times[lo] + (times[hi] - times[lo]) * (pos - lo)

    return {"p20_ms": q(0.2), "p50_ms": q(0.5), "p80_ms": q(0.8)}


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, int | None]:
    """Peak CUDA memory of one ``fn()`` call: absolute and above what was allocated before
    (``torch.cuda.max_memory_allocated``); None on CPU."""
    if device.type != "cuda":
        return {"peak_mem_bytes": None, "extra_mem_bytes": None}
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_bytes": int(peak), "extra_mem_bytes": int(peak - base)}


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


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """--device, --B, --backends, --repeat, --markdown, --json, --quick: every table script's options."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write records (p20/p50/p80, bytes, peak memory)")
    ap.add_argument("--quick", action="store_true",
                    help="timed backends only (no sort-based / torch.topk / embedding_bag baselines)")


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
