"""benchmarks/results_table.py: tables rendered from synthetic JSON rows reflect those rows."""

from __future__ import annotations

import json
from pathlib import Path

import _timing  # benchmarks/ (pytest's pythonpath, pyproject.toml)
import pytest
import results_table
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.startswith("|")]


def _st(backend: str, pass_: str, p50: float, n: int = 1024, **kw) -> dict:
    return {"op": "soft_topk", "B": 8, "n": n, "dtype": "float32", "backend": backend, "pass": pass_,
            "bytes": {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[pass_] * 8 * n * 4,
            "p20_ms": p50 * 0.9, "p50_ms": p50, "p80_ms": p50 * 1.1, **kw}


def test_soft_topk_table_reflects_rows(tmp_path):
    rows = [_st("torch.topk(x, 220)", "fwd", 4.0), _st("sort-based PyTorch", "fwd+bwd", 100.0),
            _st("cpu", "fwd", 1.0), _st("cpu", "bwd", 1.5), _st("cpu", "fwd+bwd", 2.0, extra_mem_bytes=3 * 2**20)]
    path = tmp_path / "st.jsonl"
    _timing.write_rows(path, rows, torch.device("cpu"), note="synthetic", command="python bench --x")
    text = results_table.render("st", tmp_path)
    cells = _cells(text)
    assert [c[2] for c in cells] == ["torch.topk(x, 220) fwd", "sort-based PyTorch", "cpu"]
    cpu = cells[2]
    assert cpu[:6] == ["1024", "float32", "cpu", "1", "1.5", "2"]
    assert cpu[6] == "1.8–2.2"
    assert float(cpu[7]) == pytest.approx(5 * 8 * 1024 * 4 / 2e-3 / 1e9, rel=1e-2)
    assert float(cpu[8]) == pytest.approx(2.0) and float(cpu[9]) == pytest.approx(50.0) and cpu[10] == "3"
    assert float(cells[1][8]) == pytest.approx(0.04)
    assert "python bench --x" in text and "synthetic" in text and "source: measured" in text
    stamped = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["torch"] == torch.__version__ and r["date"] and r["run"] == stamped[0]["run"] for r in stamped)


def test_sparse_decode_table_and_latest_run(tmp_path):
    def sd(backend, p50, run):
        return {"op": "sparse_decode", "n": 64, "d": 16, "k_mean": 4, "backend": backend, "pass": "fwd+bwd",
                "bytes": 10**6, "p20_ms": p50, "p50_ms": p50, "p80_ms": p50, "run": run}

    old = [sd("dense z @ W", 99.0, "a"), sd("cpu", 99.0, "a")]
    new = [sd("dense z @ W", 8.0, "b"), sd("F.embedding_bag", 4.0, "b"), sd("cpu", 2.0, "b")]
    (tmp_path / "sd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old + new))
    cells = _cells(results_table.render("sd", tmp_path))
    assert [c[3] for c in cells] == ["dense z @ W", "F.embedding_bag", "softsae cpu"]  # only run "b"
    assert [c[4] for c in cells] == ["8", "4", "2"]
    assert cells[2][6] == "0.5" and cells[2][7] == "4" and cells[2][8] == "2"  # 1e6 B / 2 ms = 0.5 GB/s; 8/2; 4/2
    assert cells[0][6] == "" and cells[0][8] == ""


def test_train_step_table_reflects_rows(tmp_path):
    def ts(variant, backend, p50):
        return {"op": "train_step", "n": 64, "variant": variant, "backend": backend, "p20_ms": p50 - 1,
                "p50_ms": p50, "p80_ms": p50 + 1, "tokens_per_s": 1024 / p50 * 1e3}

    rows = [ts("TopK", "reference", 40.0), ts("TopK", "cpu", 10.0), ts("TopK", "triton", 20.0),
            ts("hard", "reference", 30.0), ts("hard", "cpu", 60.0)]
    _timing.write_rows(tmp_path / "tt.jsonl", rows, torch.device("cpu"), command="python bench_train")
    text = results_table.render("tt", tmp_path)
    assert text.splitlines()[0].split(" | ")[2:5] == ["reference ms", "cpu ms", "triton ms"]
    topk, hard = _cells(text)
    assert topk[:5] == ["64", "TopK", "40", "10", "20"] and float(topk[6]) == pytest.approx(1024 / 10 * 1e3)
    assert topk[8:] == ["9–11", "4.00x"]  # the fastest non-reference backend: cpu
    assert hard[4] == "" and hard[8:] == ["59–61", "0.50x"]  # a backend missing from a row stays empty


def test_gpu_static_table_reflects_rows(tmp_path):
    row = {"op": "gpu_static", "grid": "ci", "targets": "sm_80,sm_90", "launches": 9, "compiles": 200, "errors": 0,
           "spilling": 10, "hot_spilling": 0, "cuda_kernels": 96, "cuda_spilling": ["k<double, 2> [sm_90]"],
           "seconds": 45.25}
    _timing.write_rows(tmp_path / "gs.jsonl", [row], torch.device("cpu"), command="python benchmarks/gpu_static.py")
    (cells,) = _cells(results_table.render("gs", tmp_path))
    assert cells == ["ci", "sm_80,sm_90", "200", "0", "10", "0", "96", "`k<double, 2> [sm_90]`", "45.2"]


def test_update_replaces_only_marker_blocks(tmp_path):
    rows = [_st("cpu", p, v) for p, v in (("fwd", 1.0), ("bwd", 1.0), ("fwd+bwd", 7.0))]
    _timing.write_rows(tmp_path / "st.jsonl", rows, torch.device("cpu"))
    doc = "# Title\n\nprose\n\n<!-- table:st -->\n| stale |\n<!-- /table:st -->\n\nafter\n"
    new = results_table.update_text(doc, tmp_path)
    assert new.startswith("# Title\n\nprose\n\n<!-- table:st -->\n| n |")
    assert new.endswith("<!-- /table:st -->\n\nafter\n")
    assert "stale" not in new and "| 7 |" in new
    assert results_table.update_text(new, tmp_path) == new
    md = tmp_path / "R.md"
    md.write_text(doc)
    assert results_table.main(["--check", str(md), "--rows-dir", str(tmp_path)]) == 1
    assert results_table.main(["--update", str(md), "--rows-dir", str(tmp_path)]) == 0
    assert results_table.main(["--check", str(md), "--rows-dir", str(tmp_path)]) == 0


def test_results_md_is_up_to_date():
    assert results_table.main(["--check", str(ROOT / "benchmarks" / "RESULTS.md")]) == 0
