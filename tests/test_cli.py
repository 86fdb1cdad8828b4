"""The command line, end to end on tiny data (subprocess ``python -m softsae``) and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from softsae.cli import main
from softsae.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "softsae", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, make_synthetic(n_samples=2000, d=16, n_true=32, k_min=1, k_max=6, seed=2).x)
    return path


def test_train_then_eval_end_to_end(tmp_path, acts):
    out = tmp_path / "run"
    r = _run("train", "--data", str(acts), "--arch", "softsae", "--dict-size", "48", "--k", "3", "--steps", "40",
             "--batch-size", "128", "--out", str(out), "--backend", "reference", "--alpha", "0.02",
             "--log-every", "5", "--eval-rows", "1000")
    assert r.returncode == 0, r.stderr
    assert "train softsae" in r.stderr and "fvu=" in r.stderr and "dead=" in r.stderr  # tqdm bar
    assert "FVU" in r.stdout and "k_hat mean" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "eval.json", "metrics.jsonl", "model.safetensors", "train_config.json"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 9 and json.loads(lines[-1])["step"] == 39

    r = _run("eval", "--model", str(out), "--data", str(acts), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["arch"] == "softsae" and 0 <= rep["fvu"] < 1 and rep["n_rows"] == 2000
    assert {"mse", "cosine", "l0", "dead_fraction", "k_hat"} <= set(rep)
    assert {"mean", "p05", "p50", "p95"} <= set(rep["l0"])


def test_bad_data_file_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "cube.npy"
    np.save(bad, np.zeros((10, 4, 3), np.float32))
    out = tmp_path / "run"
    r = _run("train", "--data", str(bad), "--dict-size", "16", "--k", "2", "--steps", "5", "--out", str(out))
    assert r.returncode == 2
    assert "2-D" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("case", ["nan", "int", "dict_lt_k", "missing_data", "bad_backend"])
def test_bad_training_inputs(tmp_path, capsys, acts, case):
    data, extra = str(acts), []
    if case == "nan":
        x = np.ones((100, 8), np.float32)
        x[37, 1] = np.nan
        np.save(tmp_path / "nan.npy", x)
        data, msg = str(tmp_path / "nan.npy"), "NaN"
    elif case == "int":
        np.save(tmp_path / "int.npy", np.ones((100, 8), np.int32))
        data, msg = str(tmp_path / "int.npy"), "floating point"
    elif case == "dict_lt_k":
        extra, msg = ["--k", "64"], "smaller than k"
    elif case == "missing_data":
        data, msg = str(tmp_path / "none.npy"), "no such file"
    else:
        extra, msg = ["--backend", "warp"], "backend"
    out = tmp_path / "run"
    code, _, err = _main(capsys, "train", "--data", data, "--dict-size", "16", "--k", "2", "--steps", "3",
                         "--batch-size", "32", "--out", str(out), "--no-progress", *extra)
    assert code == 2 and msg in err and err.startswith("softsae train: error:")
    assert not out.exists()


def test_eval_errors(tmp_path, capsys, acts):
    code, _, err = _main(capsys, "eval", "--model", str(tmp_path / "missing"), "--data", str(acts))
    assert code == 2 and "no such model" in err


def test_refuses_non_empty_out_and_resumes(tmp_path, capsys, acts):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["train", "--data", str(acts), "--arch", "topk", "--dict-size", "16", "--k", "2", "--steps", "4",
            "--batch-size", "32", "--out", str(out), "--no-progress", "--backend", "reference"]
    code, _, err = _main(capsys, *args)
    assert code == 2 and "--resume" in err
    code, out_text, _ = _main(capsys, *args, "--overwrite")
    assert code == 0 and "FVU" in out_text and (out / "keep.txt").read_text() == "mine"


def test_demo_tiny(tmp_path, capsys):
    code, out, _ = _main(capsys, "demo", "--out", str(tmp_path / "demo"), "--steps", "30", "--samples", "3000",
                         "--no-progress", "--backend", "reference")
    assert code == 0
    assert "| SoftSAE |" in out and "TopK K=" in out and "Spearman" in out
    for name in ("l0_histograms.png", "k_vs_true_count.png", "results.json"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    assert (tmp_path / "demo" / "softsae" / "model.safetensors").exists()


def test_recipe_flags_reach_the_config_and_eval_diagnostics(tmp_path, capsys, acts):
    out = tmp_path / "run"
    code, _, err = _main(capsys, "train", "--data", str(acts), "--dict-size", "48", "--k", "3", "--steps", "40",
                         "--batch-size", "64", "--out", str(out), "--no-progress", "--backend", "reference",
                         "--alpha", "0.02", "--alpha-anneal-frac", "0.5", "--alpha-schedule", "linear",
                         "--k-anneal-frac", "0.25", "--hard-frac", "0.1", "--st-frac", "0.2",
                         "--no-hard-encoder-grad", "--k-round", "round", "--alpha-relative")
    assert code == 0, err
    cfg = json.loads((out / "train_config.json").read_text())
    assert (cfg["alpha_anneal_steps"], cfg["k_anneal_steps"], cfg["hard_topk_steps"], cfg["st_steps"]) == (20, 10, 4, 8)
    assert cfg["alpha_schedule"] == "linear" and cfg["k_round"] == "round" and cfg["alpha_relative"]
    assert cfg["hard_encoder_grad"] is False
    counts = tmp_path / "counts.npy"
    np.save(counts, make_synthetic(n_samples=2000, d=16, n_true=32, k_min=1, k_max=6, seed=2).counts)
    code, text, err = _main(capsys, "eval", "--model", str(out), "--data", str(acts), "--diagnostics",
                            "--counts", str(counts))
    assert code == 0, err
    for label in ("(a) soft gate", "(b) top floor", "(c) top round", "(d) uniform top-K", "(e) one threshold",
                  "difficulty", "true counts", "L0 histogram"):
        assert label in text
    code, text, err = _main(capsys, "eval", "--model", str(out), "--data", str(acts), "--diagnostics", "--json")
    rep = json.loads(text)["diagnostics"]
    assert rep["floor"]["fvu"] > 0 and "truth" not in rep
    code, _, err = _main(capsys, "train", "--data", str(acts), "--dict-size", "48", "--k", "3", "--steps", "10",
                         "--out", str(tmp_path / "bad"), "--hard-frac", "2")
    assert code == 2 and "hard_frac" in err


def test_eval_diagnostics_refuses_topk(tmp_path, capsys, acts):
    out = tmp_path / "run"
    code, _, err = _main(capsys, "train", "--data", str(acts), "--arch", "topk", "--dict-size", "16", "--k", "2",
                         "--steps", "4", "--batch-size", "32", "--out", str(out), "--no-progress",
                         "--backend", "reference")
    assert code == 0, err
    code, _, err = _main(capsys, "eval", "--model", str(out), "--data", str(acts), "--diagnostics")
    assert code == 2 and "needs a SoftSAE" in err
