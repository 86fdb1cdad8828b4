"""benchmarks/bench_train_step.py runs at a tiny shape: softsae's rows, the skip of a missing framework, --profile.

The real dictionary_learning / sparsify steps are exercised in tests/interop/test_bench_train_step_frameworks.py
(their packages live in the interop venv only)."""

from __future__ import annotations

import json
import sys

import ab_train_step_levers
import bench_train_step
import pytest

TINY = ["--d", "16", "--n", "64", "--k", "4", "--batch-size", "32", "--repeat", "2", "--threads", "1"]


def test_softsae_rows_at_tiny_shape(tmp_path):
    rows_file, md = tmp_path / "rows.jsonl", tmp_path / "t.md"
    records = bench_train_step.main([*TINY, "--frameworks", "softsae", "reference", "--models", "topk",
                                     "softsae-soft", "--rows", str(rows_file), "--markdown", str(md)])
    assert {(r["framework"], r["model"]) for r in records} == {
        (f, m) for f in ("softsae", "reference") for m in ("topk", "softsae-soft")}
    for r in records:
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["tokens_per_s"] == pytest.approx(32 / r["p50_ms"] * 1e3)
        assert r["threads"] == 1 and r["version"] and r["dtype"] == "float32"
    assert next(r for r in records if r["framework"] == "reference")["backend"] == "reference"
    lines = [json.loads(s) for s in rows_file.read_text().splitlines()]
    assert len(lines) == 4 and all(s["device_name"] and s["torch"] for s in lines)
    text = md.read_text()
    assert "SoftSAE soft step / softsae TopK step" in text and "| softsae |" in text
    rendered = bench_train_step.render_rows_file(rows_file)  # --render: the same table from the stored rows
    assert rendered.count("### ") == 1 and "| reference |" in rendered and "least CPU ms" in rendered


def test_missing_framework_is_skipped_with_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "dictionary_learning", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "sparsify", None)
    records = bench_train_step.main([*TINY, "--frameworks", "dictionary_learning", "sparsify",
                                     "--models", "topk", "batchtopk", "softsae-soft"])
    skipped = {(r["framework"], r["model"]): r["skipped"] for r in records}
    assert set(skipped) == {("dictionary_learning", "topk"), ("dictionary_learning", "batchtopk"),
                            ("sparsify", "topk")}  # no row for models a library does not train
    assert "dictionary-learning is not installed" in skipped["dictionary_learning", "topk"]
    assert "eai-sparsify is not installed" in skipped["sparsify", "topk"]
    assert not any("p50_ms" in r for r in records)


def test_ratio_rows_pair_the_right_measurements():
    base = {"d": 8, "n": 16, "k": 2, "B": 4, "threads": 1}
    recs = [{**base, "framework": "softsae", "model": "topk", "p50_ms": 2.0},
            {**base, "framework": "dictionary_learning", "model": "topk", "p50_ms": 5.0},
            {**base, "framework": "softsae", "model": "softsae-soft", "p50_ms": 3.0},
            {**base, "threads": 2, "framework": "sparsify", "model": "topk", "p50_ms": 1.0}]
    got = {row[1]: row[2] for row in bench_train_step.ratio_rows(recs)}
    assert got == {"softsae TopK speed-up over dictionary_learning TopK": 2.5,
                   "SoftSAE soft step / softsae TopK step": 1.5}  # sparsify: other thread count, no pair


def test_profile_prints_a_breakdown(capsys):
    bench_train_step.main([*TINY, "--models", "topk", "--profile"])
    out = capsys.readouterr().out
    assert "profile: softsae topk" in out and "GEMM (aten::mm/addmm)" in out and "| backward |" in out


def test_topk_fast_path_prototype_equals_topk_per_row():
    """The prototype measured in train_step.md gives topk_per_row's exact result (ties included)."""
    ab_train_step_levers.check_fast_topk(60)
