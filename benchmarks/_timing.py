"""Timing helpers shared by the benchmark scripts: medians, CUDA-aware, plus a table printer."""

from __future__ import annotations

import argparse
import statistics
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


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """--device, --B, --backends, --repeat, --markdown: the options every table script takes."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", type=Path, default=None)


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
