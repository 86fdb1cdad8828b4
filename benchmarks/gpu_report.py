"""Merge benchmark JSON (bench_soft_topk.py / bench_sparse_decode.py --json), the GPU test
junit XML and the stage timings of gpu_check.sh into OUTDIR/report.md and OUTDIR/report.json.

    python benchmarks/gpu_report.py --out OUTDIR OUTDIR/soft_topk.json OUTDIR/sparse_decode.json \\
        [--junit OUTDIR/test_gpu.xml] [--stages OUTDIR/stages.tsv]

Per record: GB/s = bytes / p50 (the byte model each benchmark states: soft_topk fwd 2 B n e,
bwd 3 B n e, fwd+bwd 5 B n e; sparse_decode (3 nnz d + 2 B d) e + 12 nnz) and, for a GPU of
known HBM bandwidth, % of that peak. Works on CPU numbers too (peak columns left blank).
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

# HBM peak in GB/s (1e9 B/s), by a substring test on torch.cuda.get_device_name(); first match wins.
HBM_PEAK_GBPS: list[tuple[tuple[str, ...], float, str]] = [
    (("H200",), 4800.0, "H200 (4.8 TB/s)"),
    (("H100", "HBM3"), 3350.0, "H100 SXM (3.35 TB/s)"),
    (("H100", "SXM"), 3350.0, "H100 SXM (3.35 TB/s)"),
    (("A100", "80GB"), 2000.0, "A100 80GB (2.0 TB/s)"),
]


def hbm_peak(gpu_name: str | None) -> tuple[float | None, str]:
    """(peak GB/s, label) for a known GPU name, else (None, "")."""
    if not gpu_name:
        return None, ""
    for needles, peak, label in HBM_PEAK_GBPS:
        if all(nd in gpu_name for nd in needles):
            return peak, label
    return None, ""


def enrich(record: dict, peak: float | None) -> dict:
    """A record with gbps (bytes / p50) and pct_hbm_peak added."""
    out = dict(record)
    p50 = record.get("p50_ms")
    gbps = record["bytes"] / (p50 * 1e-3) / 1e9 if p50 else None
    out["gbps"] = gbps
    out["pct_hbm_peak"] = 100.0 * gbps / peak if (gbps is not None and peak) else None
    return out


def read_junit(path: Path) -> dict:
    """Totals of a pytest junit XML: tests, failures, errors, skipped, time (s)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            tot[key] += int(s.get(key, 0))
        tot["time"] += float(s.get("time", 0.0))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    tot["failed_tests"] = failed
    return tot


def read_stages(path: Path) -> list[dict]:
    """Lines ``stage<TAB>seconds<TAB>status`` written by gpu_check.sh."""
    stages = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0]:
            stages.append({"stage": parts[0], "seconds": float(parts[1]),
                           "status": parts[2] if len(parts) > 2 else ""})
    return stages


def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def _shape(r: dict) -> str:
    if r["op"] == "soft_topk":
        return f"B={r['B']} n={r['n']}"
    return f"B={r['B']} n={r['n']} d={r['d']} k~{r['k_mean']}"


def build(bench_docs: list[dict], junit: dict | None = None, stages: list[dict] | None = None) -> dict:
    """The report as a dict: env, peak, tests, stages, records (with gbps / pct_hbm_peak)."""
    env = next((d["env"] for d in bench_docs if d.get("env")), {})
    peak, label = hbm_peak(env.get("gpu"))
    records = [enrich(r, peak) for d in bench_docs for r in d["records"]]
    byte_models = {d["op"]: d.get("meta", {}).get("byte_model", "") for d in bench_docs}
    return {"env": env, "hbm_peak_gbps": peak, "hbm_peak_label": label, "tests": junit, "stages": stages or [],
            "byte_models": byte_models, "records": records}


def to_markdown(rep: dict) -> str:
    env = rep["env"]
    lines = ["# softsae GPU check", ""]
    lines.append(f"- device: {env.get('gpu') or env.get('device', '?')}"
                 + (f" (sm {env['capability']})" if env.get("capability") else ""))
    lines.append(f"- driver: {env.get('driver') or 'n/a'}; torch {env.get('torch')}; triton {env.get('triton')}; "
                 f"CUDA {env.get('cuda')}; Python {env.get('python')}")
    lines.append(f"- HBM peak used for %: {rep['hbm_peak_label'] or 'unknown GPU (left blank)'}")
    t = rep.get("tests")
    if t:
        ok = t["failures"] == 0 and t["errors"] == 0
        lines.append(f"- tests/test_gpu.py: {t['tests']} tests, {t['failures']} failures, {t['errors']} errors, "
                     f"{t['skipped']} skipped, {t['time']:.0f} s — {'PASS' if ok else 'FAIL'}")
        for name in t.get("failed_tests", [])[:30]:
            lines.append(f"  - failed: `{name}`")
    if rep["stages"]:
        lines += ["", "| stage | seconds | status |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {s['seconds']:.1f} | {s['status']} |" for s in rep["stages"]]
    for op in dict.fromkeys(r["op"] for r in rep["records"]):
        rows = [r for r in rep["records"] if r["op"] == op]
        lines += ["", f"## {op}", "", f"Byte model: {rep['byte_models'].get(op, '')}", "",
                  "| shape | dtype | backend | pass | p20 ms | p50 ms | p80 ms | GB/s | % HBM peak | peak MiB | "
                  "extra MiB |", "|" + "---|" * 11]
        for r in rows:
            lines.append("| " + " | ".join([
                _shape(r), r.get("dtype", ""), r["backend"], r["pass"], _fmt(r["p20_ms"]), _fmt(r["p50_ms"]),
                _fmt(r["p80_ms"]), _fmt(r["gbps"]), _fmt(r["pct_hbm_peak"], 2), _mib(r.get("peak_mem_bytes")),
                _mib(r.get("extra_mem_bytes"))]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", nargs="*", type=Path, help="files written by the benchmarks' --json")
    ap.add_argument("--out", type=Path, required=True, help="directory for report.md and report.json")
    ap.add_argument("--junit", type=Path, default=None)
    ap.add_argument("--stages", type=Path, default=None)
    args = ap.parse_args(argv)
    docs = [json.loads(p.read_text()) for p in args.bench_json if p.exists()]
    junit = read_junit(args.junit) if args.junit and args.junit.exists() else None
    stages = read_stages(args.stages) if args.stages and args.stages.exists() else None
    rep = build(docs, junit, stages)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(rep, indent=1))
    (args.out / "report.md").write_text(to_markdown(rep))
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.json'} ({len(rep['records'])} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
