"""Run configs (--config JSON/YAML, flag precedence), metric loggers and the SOFTSAE_BACKEND override."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softsae import _backends
from softsae.cli import build_parser, main, train_settings
from softsae.config import load_config
from softsae.logger import JsonlLogger, LoggerUnavailable, open_logger, require
from softsae.synthetic import make_synthetic
from softsae.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TINY = {"arch": "topk", "dict_size": 16, "k": 2, "steps": 6, "batch_size": 64, "backend": "reference",
        "log_every": 2, "progress": False}


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, make_synthetic(n_samples=400, d=8, n_true=16, k_min=1, k_max=3, seed=1).x)
    return path


def _settings(*argv: str) -> dict:
    return train_settings(build_parser().parse_args(["train", "--data", "x.npy", "--out", "o", *argv]))


# ----------------------------------------------------------------------------- config files


def test_json_config_loads_and_flags_override(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"dict_size": 32, "k": 4, "steps": 50, "lr": 1e-3, "amp": "off", "log": "jsonl"}))
    assert load_config(cfg) == {"dict_size": 32, "k": 4, "steps": 50, "lr": 1e-3, "amp": "off", "log": "jsonl"}
    # config values survive when the flag is absent (argparse defaults must not clobber them) ...
    s = _settings("--config", str(cfg))
    assert s["lr"] == 1e-3 and s["amp"] == "off" and "batch_size" not in s and "progress" not in s
    # ... and explicit flags win over the file
    s = _settings("--config", str(cfg), "--lr", "5e-4", "--steps", "7", "--amp", "bf16", "--no-progress",
                  "--hard-steps", "2")
    assert (s["lr"], s["steps"], s["amp"], s["progress"], s["hard_topk_steps"]) == (5e-4, 7, "bf16", False, 2)
    assert s["dict_size"] == 32 and s["k"] == 4


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml", reason="PyYAML not installed")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("arch: batchtopk\ndict_size: 24\nk: 3\nsteps: 9\nalpha_relative: true\nk_max: null\n")
    assert load_config(cfg) == {"arch": "batchtopk", "dict_size": 24, "k": 3, "steps": 9, "alpha_relative": True,
                                "k_max": None}
    assert _settings("--config", str(cfg), "--arch", "topk")["arch"] == "topk"


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dict_size": 8, "learning_rate": 1e-3, "kk": 2}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kk', 'learning_rate'\]"):
        load_config(bad)
    bad.write_text(json.dumps({"steps": "100"}))
    with pytest.raises(ValueError, match="steps must be int"):
        load_config(bad)
    bad.write_text(json.dumps({"progress": 1}))
    with pytest.raises(ValueError, match="progress must be bool"):
        load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_config(bad)
    (tmp_path / "run.toml").write_text("k = 1")
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        load_config(tmp_path / "run.toml")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"--dict-size \(or dict_size in --config\)"):
        _settings("--k", "2", "--steps", "3")


def test_yaml_without_pyyaml_names_the_package(tmp_path, monkeypatch):
    cfg = tmp_path / "run.yml"
    cfg.write_text("k: 2\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    with pytest.raises(ValueError, match="pip install pyyaml"):
        load_config(cfg)


def test_cli_config_run_saves_resolved_config(tmp_path, acts, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({**TINY, "steps": 4, "seed": 3, "lr": 1e-3}))
    out = tmp_path / "run"
    code = main(["train", "--config", str(cfg), "--data", str(acts), "--out", str(out), "--steps", "6",
                 "--amp", "off", "--eval-rows", "100"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["steps"], saved["seed"], saved["lr"], saved["amp"], saved["arch"]) == (6, 3, 1e-3, "off", "topk")
    assert saved["warmup_steps"] == 0 and saved["dead_feature_threshold"] == 64  # resolved defaults filled in
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 5]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY, "dict_sise": 16}))
    code = main(["train", "--config", str(bad), "--data", str(acts), "--out", str(tmp_path / "r2")])
    assert code == 2 and "dict_sise" in capsys.readouterr().err and not (tmp_path / "r2").exists()


# ----------------------------------------------------------------------------- loggers


def test_jsonl_logger_and_unknown_logger(tmp_path):
    lg = JsonlLogger(tmp_path / "m.jsonl")
    lg.log({"step": 0, "loss": 1.5}, 0)
    lg.log({"step": 1, "loss": 0.5}, 1)
    lg.close()
    assert [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        {"step": 0, "loss": 1.5}, {"step": 1, "loss": 0.5}]
    with pytest.raises(ValueError, match="log must be one of"):
        require("csv")
    with pytest.raises(ValueError, match="log must be one of"):
        TrainConfig(log="csv").resolved(8)
    with pytest.raises(ValueError, match="needs an out_dir"):
        train(np.zeros((64, 8), np.float32) + 1, TrainConfig(**{**TINY, "log": "tensorboard"}))


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_missing_logger_package_is_a_clear_error(kind, tmp_path, acts, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    with pytest.raises(LoggerUnavailable, match=f"pip install {kind}"):
        open_logger(kind, tmp_path)
    code = main(["train", "--data", str(acts), "--out", str(tmp_path / "r"), "--dict-size", "16", "--k", "2",
                 "--steps", "2", "--log", kind])
    assert code == 2 and f"pip install {kind}" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_tensorboard_logger(tmp_path, acts):
    pytest.importorskip("tensorboard")
    train(acts, TrainConfig(**{**TINY, "log": "tensorboard"}), out_dir=tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_wandb_offline_logger(tmp_path, acts, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(acts, TrainConfig(**{**TINY, "log": "wandb"}), out_dir=tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


# ----------------------------------------------------------------------------- SOFTSAE_BACKEND


def test_env_backend_overrides_auto_only(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(_backends, "_ENV_BACKEND", "reference")
    assert _backends.resolve("auto", cpu) == "reference"
    if _backends.supports("cpu", cpu):
        assert _backends.resolve("cpu", cpu) == "cpu"  # an explicit choice wins
    monkeypatch.setattr(_backends, "_ENV_BACKEND", "auto")
    assert _backends.resolve("auto", cpu) in ("cpu", "reference")
    monkeypatch.setattr(_backends, "_ENV_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"SOFTSAE_BACKEND='cuda' \(replacing --backend='auto'\) is not available"):
        _backends.resolve("auto", cpu, arg="--backend")
    monkeypatch.setattr(_backends, "_ENV_BACKEND", "fast")
    with pytest.raises(ValueError, match="SOFTSAE_BACKEND must be one of"):
        _backends.resolve("auto", cpu)


def _py(code: str, backend_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SOFTSAE_BACKEND": backend_env,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO)


def test_env_backend_is_read_from_the_environment(acts, tmp_path):
    r = _py("import torch; from softsae import _backends; print(_backends.resolve('auto', torch.device('cpu')))",
            "reference")
    assert r.returncode == 0 and r.stdout.strip() == "reference", r.stderr
    unavailable = "cuda" if not torch.cuda.is_available() else "triton"
    r = _py(f"from softsae.cli import main; raise SystemExit(main(['train', '--data', {str(acts)!r}, '--out', "
            f"{str(tmp_path / 'r')!r}, '--dict-size', '16', '--k', '2', '--steps', '2', '--device', 'cpu']))",
            unavailable)
    assert r.returncode == 2 and f"SOFTSAE_BACKEND={unavailable!r}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()
