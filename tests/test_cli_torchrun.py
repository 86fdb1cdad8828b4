"""``torchrun -m softsae train --parallel data|dictionary`` end to end (2 gloo processes on CPU) against
the one-process CLI run with the same settings, and the error without a torchrun launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from softsae.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data: Path, out: Path, arch: str) -> list[str]:
    return ["train", "--data", str(data), "--arch", arch, "--dict-size", "32", "--k", "3", "--steps", "6",
            "--batch-size", "32", "--out", str(out), "--backend", "reference", "--device", "cpu",
            "--log-every", "1", "--eval-rows", "200", "--no-progress"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, make_synthetic(n_samples=600, d=12, n_true=24, k_min=1, k_max=5, seed=3).x)
    return path


@pytest.mark.parametrize(("arch", "parallel"), [("softsae", "data"), ("batchtopk", "data"),
                                                ("softsae", "dictionary")])
def test_torchrun_equals_one_process(tmp_path, acts, arch, parallel):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "softsae", *_train_args(acts, one, arch)], capture_output=True,
                        text=True, env=_env(), timeout=300, cwd=REPO)
    assert r1.returncode == 0, r1.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), "-m", "softsae", *_train_args(acts, two, arch),
              "--parallel", parallel]
    r2 = subprocess.run(launch, capture_output=True, text=True, env=_env(), timeout=300, cwd=REPO)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert r2.stdout.count("FVU") == 1  # rank 0 alone reports
    assert (two / "eval.json").exists() and (two / "metrics.jsonl").exists()
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 6
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=2e-5, msg=f"{arch}: {name}")


@pytest.mark.parametrize("parallel", ["data", "dictionary"])
def test_parallel_needs_torchrun(tmp_path, acts, parallel):
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "softsae", *_train_args(acts, tmp_path / "x", "topk"),
                        "--parallel", parallel], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 2
    assert f"--parallel {parallel} needs a torchrun launch" in r.stderr
    assert not (tmp_path / "x").exists()
