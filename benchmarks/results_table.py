"""Render RESULTS.md's benchmark tables from JSON rows (benchmarks/results/rows/NAME.jsonl).

    python benchmarks/results_table.py soft_topk                        # print the table of NAME
    python benchmarks/results_table.py --update benchmarks/RESULTS.md   # regenerate every marker block
    python benchmarks/results_table.py --check benchmarks/RESULTS.md    # exit 1 if a block is stale

A block ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->`` in a markdown file is replaced by
the table of the latest run (the last ``run`` stamp) in ``ROWS_DIR/NAME.jsonl``, followed by one
line naming where the rows came from (date, command, device, versions, note, source). Rows are
appended by the benchmark scripts' ``--rows`` (``_timing.write_rows``); the table layout is chosen
by the rows' ``op`` (soft_topk, sparse_decode, train_step or gpu_static). Ratios and GB/s are computed from the p50s.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from _timing import markdown_table, row_mem_bytes

ROWS_DIR = Path(__file__).parent / "results" / "rows"
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def load_rows(path: Path) -> list[dict]:
    """Every JSON row of a .jsonl file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the last run appended (same ``run`` stamp as the final row)."""
    if not rows:
        return []
    run = rows[-1].get("run")
    return [r for r in rows if r.get("run") == run]


def _p50(r: dict | None) -> float | None:
    return r.get("p50_ms") if r else None


def _ratio(num: float | None, den: float | None) -> float | str:
    return num / den if num and den else ""


def _spread(r: dict | None) -> str:
    if not r or r.get("p20_ms") is None or r.get("p80_ms") is None:
        return ""
    def fmt(v: float) -> str:  # as markdown_table prints a float
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"

    return f"{fmt(r['p20_ms'])}–{fmt(r['p80_ms'])}"


def _mib(r: dict | None) -> float | str:
    b = row_mem_bytes(r) if r else None
    return b / 2**20 if b is not None else ""


def _ms(v: float | None) -> float | str:
    return v if v is not None else ""


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def soft_topk_table(rows: list[dict]) -> str:
    """n, dtype, implementation, p50 fwd/bwd/fwd+bwd ms, fwd+bwd p20–p80, GB/s, ratios, memory."""
    headers = ["n", "dtype", "implementation", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd p20–p80 ms",
               "fwd+bwd GB/s", "topk-fwd / this", "sort-based / this", "fwd+bwd extra MiB"]
    table = []
    for (n, dtype), group in _groups(rows, ("n", "dtype")).items():
        by = {(r["backend"], r["pass"]): r for r in group}
        topk, sort = by.get(("torch.topk(x, 220)", "fwd")), by.get(("sort-based PyTorch", "fwd+bwd"))
        if topk:
            table.append([n, dtype, "torch.topk(x, 220) fwd", _ms(_p50(topk)), "", "", _spread(topk), "", 1.0, "",
                          _mib(topk)])
        if sort:
            table.append([n, dtype, "sort-based PyTorch", "", "", _ms(_p50(sort)), _spread(sort), "",
                          _ratio(_p50(topk), _p50(sort)), 1.0, ""])
        for backend in dict.fromkeys(r["backend"] for r in group):
            both = by.get((backend, "fwd+bwd"))
            if backend in ("torch.topk(x, 220)", "sort-based PyTorch") or both is None:
                continue
            ms = _p50(both)
            gbps = both["bytes"] / (ms * 1e-3) / 1e9 if both.get("bytes") and ms else ""
            table.append([n, dtype, backend, _ms(_p50(by.get((backend, "fwd")))), _ms(_p50(by.get((backend, "bwd")))),
                          _ms(ms), _spread(both), gbps, _ratio(_p50(topk), ms), _ratio(_p50(sort), ms), _mib(both)])
    return markdown_table(headers, table)


def sparse_decode_table(rows: list[dict]) -> str:
    """n, d, mean k, implementation, p50 and p20–p80 ms, effective GB/s, ratios, memory."""
    headers = ["n", "d", "mean k", "implementation", "fwd+bwd ms", "p20–p80 ms", "eff. GB/s", "dense / this",
               "emb_bag / this", "extra MiB"]
    table = []
    for (n, d, k), group in _groups(rows, ("n", "d", "k_mean")).items():
        by = {r["backend"]: r for r in group}
        dense_ms, bag_ms = _p50(by.get("dense z @ W")), _p50(by.get("F.embedding_bag"))
        for r in group:
            ms, name = _p50(r), r["backend"]
            label = name if name in ("dense z @ W", "F.embedding_bag") else f"softsae {name}"
            gbps = r["bytes"] / ms / 1e6 if r.get("bytes") and ms and name != "dense z @ W" else ""
            bag_ratio = _ratio(bag_ms, ms) if name != "dense z @ W" else ""
            table.append([n, d, k, label, _ms(ms), _spread(r), gbps, _ratio(dense_ms, ms), bag_ratio, _mib(r)])
    return markdown_table(headers, table)


def train_step_table(rows: list[dict]) -> str:
    """n, variant, p50 ms per step and tokens/s per backend, the fastest non-reference backend's
    p20–p80, and its speed-up over the reference."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fast = [b for b in backends if b != "reference"]
    headers = (["n", "variant"] + [f"{b} ms" for b in backends] + [f"{b} tok/s" for b in backends]
               + (["fastest p20–p80 ms", "best fast / reference"] if fast and "reference" in backends else []))
    table = []
    for (n, variant), group in _groups(rows, ("n", "variant")).items():
        by = {r["backend"]: r for r in group}
        line = [n, variant] + [_ms(_p50(by.get(b))) for b in backends]
        line += [by[b]["tokens_per_s"] if b in by else "" for b in backends]
        if fast and "reference" in backends:
            best = min((by[b] for b in fast if b in by), key=lambda r: r["p50_ms"], default=None)
            ratio = _ratio(_p50(by.get("reference")), _p50(best))
            line += [_spread(best), f"{ratio:.2f}x" if ratio != "" else ""]
        table.append(line)
    return markdown_table(headers, table)


def gpu_static_table(rows: list[dict]) -> str:
    """The compile gate of benchmarks/gpu_static.py: grid, targets, compiles, errors, spills, time."""
    headers = ["grid", "targets", "Triton compiles", "compile errors", "specialisations that spill",
               "hot ones that spill", "CUDA kernels (nvcc)", "CUDA kernels that spill", "time s"]
    table = [[r["grid"], r["targets"], r["compiles"], r["errors"], r["spilling"], r["hot_spilling"],
              r["cuda_kernels"], ", ".join(f"`{k}`" for k in r["cuda_spilling"]) or "none", r["seconds"]]
             for r in rows]
    return markdown_table(headers, table)


RENDERERS = {"soft_topk": soft_topk_table, "sparse_decode": sparse_decode_table, "train_step": train_step_table,
             "gpu_static": gpu_static_table}


def provenance(rows: list[dict]) -> str:
    """One line: where the rows of a run came from."""
    r = rows[0]
    parts = [f"source: {r.get('source') or 'unknown'}", f"date {r.get('date') or 'not recorded'}",
             f"`{r['command']}`" if r.get("command") else "command not recorded",
             r.get("device_name") or "device not recorded",
             f"torch {r.get('torch') or '?'}", f"triton {r.get('triton') or '?'}"]
    if r.get("note"):
        parts.append(r["note"])
    kinds = {x.get("mem_kind") for x in rows} - {None}
    if kinds:
        parts.append("memory: " + ", ".join(sorted(kinds)) + " (CPU: growth of the process max RSS, a lower bound)"
                     if "cpu_process_max_rss" in kinds else "memory: " + ", ".join(sorted(kinds)))
    return "Rows: " + "; ".join(parts) + "."


def render(name: str, rows_dir: Path = ROWS_DIR) -> str:
    """The table (and provenance line) of the latest run in ``rows_dir/NAME.jsonl``."""
    rows = latest_run(load_rows(rows_dir / f"{name}.jsonl"))
    if not rows:
        raise ValueError(f"no rows in {rows_dir / f'{name}.jsonl'}")
    op = rows[0]["op"]
    if op not in RENDERERS:
        raise ValueError(f"no table layout for op {op!r}")
    return RENDERERS[op](rows) + "\n\n" + provenance(rows)


def update_text(text: str, rows_dir: Path = ROWS_DIR) -> str:
    """``text`` with every ``<!-- table:NAME -->`` block regenerated."""
    return BLOCK.sub(lambda m: f"{m.group(1)}{render(m.group('name'), rows_dir)}\n{m.group(4)}", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="print the table of ROWS_DIR/NAME.jsonl")
    ap.add_argument("--update", type=Path, default=None, help="regenerate the marker blocks of this file in place")
    ap.add_argument("--check", type=Path, default=None, help="exit 1 if this file's blocks are not up to date")
    ap.add_argument("--rows-dir", type=Path, default=ROWS_DIR)
    a = ap.parse_args(argv)
    for name in a.names:
        print(render(name, a.rows_dir))
    for path, write in ((a.update, True), (a.check, False)):
        if path is None:
            continue
        old = path.read_text()
        new = update_text(old, a.rows_dir)
        if write:
            path.write_text(new)
            print(f"{path}: {len(BLOCK.findall(old))} table(s) regenerated")
        elif new != old:
            print(f"{path}: tables differ from the rows; run --update", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
