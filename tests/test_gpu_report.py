"""benchmarks/gpu_report.py on CPU numbers: real (tiny) benchmark runs with --json, then the merge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gpu_report  # benchmarks/ (pytest's pythonpath, pyproject.toml)
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_jsons(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    st, sd = out / "soft_topk.json", out / "sparse_decode.json"
    run = [sys.executable, str(ROOT / "benchmarks" / "bench_soft_topk.py"), "--B", "8", "--n", "64",
           "--backends", "reference", "--repeat", "3", "--quick", "--dtypes", "float32", "bfloat16", "--json", str(st)]
    subprocess.run(run, check=True, capture_output=True, timeout=300)
    run = [sys.executable, str(ROOT / "benchmarks" / "bench_sparse_decode.py"), "--B", "8", "--backends", "reference",
           "--repeat", "3", "--quick", "--json", str(sd)]
    subprocess.run(run, check=True, capture_output=True, timeout=300)
    return out, st, sd


def test_benchmark_json_records(bench_jsons):
    _, st, sd = bench_jsons
    doc = json.loads(st.read_text())
    assert doc["op"] == "soft_topk" and doc["env"]["device"] == "cpu" and doc["env"]["torch"]
    recs = doc["records"]
    assert {(r["dtype"], r["pass"]) for r in recs} == {(d, p) for d in ("float32", "bfloat16")
                                                       for p in ("fwd", "bwd", "fwd+bwd")}
    for r in recs:
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        e = 4 if r["dtype"] == "float32" else 2
        assert r["bytes"] == {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[r["pass"]] * 8 * 64 * e
        assert r["peak_mem_bytes"] is None  # CPU: no CUDA memory statistics
    sdoc = json.loads(sd.read_text())
    assert len(sdoc["records"]) == 4  # n=16384, d=512, mean k in {32, 64, 128, 220}
    for r in sdoc["records"]:
        assert r["bytes"] == (3 * r["nnz"] * r["d"] + 2 * r["B"] * r["d"]) * 4 + 12 * r["nnz"]


def test_report_merges_and_computes_bandwidth(bench_jsons, tmp_path):
    _, st, sd = bench_jsons
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="2" '
                     'time="3.5"><testcase classname="tests.test_gpu" name="test_a"><failure message="x"/>'
                     '</testcase><testcase classname="tests.test_gpu" name="test_b"/></testsuite></testsuites>')
    stages = tmp_path / "stages.tsv"
    stages.write_text("build\t61.2\tok\ntests\t120.0\tfailed\n")
    out = tmp_path / "report"
    assert gpu_report.main([str(st), str(sd), "--out", str(out), "--junit", str(junit), "--stages", str(stages)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["records"]) == 6 + 4
    for r in rep["records"]:
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["p50_ms"] * 1e-3) / 1e9)
        assert r["pct_hbm_peak"] is None  # a CPU: no known HBM peak
    assert rep["tests"]["failures"] == 1 and rep["tests"]["failed_tests"] == ["tests.test_gpu::test_a"]
    md = (out / "report.md").read_text()
    assert "## soft_topk" in md and "## sparse_decode" in md and "FAIL" in md and "| build | 61.2 | ok |" in md
    assert "unknown GPU" in md


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H200", 4800.0), ("NVIDIA H100 80GB HBM3", 3350.0),
                                            ("NVIDIA A100-SXM4-80GB", 2000.0), ("NVIDIA H100 PCIe", None),
                                            ("NVIDIA GeForce RTX 4090", None), (None, None)])
def test_hbm_peak_table(name, peak):
    assert gpu_report.hbm_peak(name)[0] == peak


def test_percent_of_peak_for_a_known_gpu():
    rec = {"op": "soft_topk", "bytes": 4.8e9, "p50_ms": 2000.0}  # 2.4 GB/s
    got = gpu_report.enrich(rec, 4800.0)
    assert got["gbps"] == pytest.approx(2.4) and got["pct_hbm_peak"] == pytest.approx(0.05)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be present: the script would run")
def test_gpu_check_exits_3_at_once_without_a_gpu(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "no NVIDIA GPU" in res.stderr
    assert not (tmp_path / "out").exists()
