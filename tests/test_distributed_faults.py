"""Faults in distributed training (gloo CPU processes, every run bounded by a time limit).

- A rank killed (SIGKILL) mid-run of a dictionary-sharded run leaves the last full checkpoint intact;
  it loads in one process, and resuming it there (2 -> 1 ranks) reproduces the uninterrupted run's
  loss curve. A one-process run interrupted after a checkpoint resumes on 2 ranks (1 -> 2), sharded
  over the dictionary or data parallel, with the same loss curve.
- A rank that sees bad data (NaN at load, another activation dim, a NaN batch mid-run) makes every rank
  raise the same ``DistributedInputError`` naming it, in both modes, instead of hanging.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_spawn import FaultySource, Interrupted, acts, cfg, join, spawn

from softsae.distributed import DistributedInputError
from softsae.distributed.process import shutdown
from softsae.models import build_model
from softsae.trainer import STATE_FILE, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

STEPS, EVERY = 10, 3  # checkpoints after steps 3, 6 and 9


def _run_cfg(arch: str = "softsae", **kw):
    return cfg(arch, **{"steps": STEPS, "decay_start": 8, "checkpoint_every": EVERY, "hard_frac": 0.2, **kw})


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(STEPS))
    return [m["loss"] for m in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("whole") / "run"
    torch.set_num_threads(1)
    train(acts(), _run_cfg(), out_dir=out)
    return _losses(out)


def _killed_rank_main(rank: int, world: int, store: str, out: str) -> None:
    join(rank, world, store, timeout_s=30.0)
    try:  # rank 1 dies when it samples the batch of step 7 (after the checkpoint of step 6)
        source = FaultySource(acts(), at=9, fault="kill") if rank == 1 else acts()
        train(source, _run_cfg(parallel="dictionary"), out_dir=out)
    finally:
        shutdown()


def test_killed_rank_leaves_checkpoint_and_resume_on_one_process(tmp_path, uninterrupted):
    out = tmp_path / "run"
    failures = spawn(_killed_rank_main, 2, tmp_path, str(out))
    assert failures, "the killed rank should have made the run fail"
    state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)  # intact, one-process format
    assert state["step"] in (3, 6)  # 6 unless rank 0 was stopped while writing it (then the atomic write kept 3)
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    assert model.W_enc.shape == (50, 16)
    torch.set_num_threads(1)
    train(acts(), _run_cfg(), out_dir=out, resume=True)  # 2 -> 1
    assert _losses(out) == pytest.approx(uninterrupted, rel=1e-4, abs=1e-6)


def _resume_rank_main(rank: int, world: int, store: str, out: str, parallel: str) -> None:
    join(rank, world, store)
    try:
        train(acts(), _run_cfg(parallel=parallel), out_dir=out, resume=True)
    finally:
        shutdown()


@pytest.mark.parametrize("parallel", ["dictionary", "data"])
def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path, uninterrupted, parallel):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    with pytest.raises(Interrupted):  # stops while sampling step 7's batch: the checkpoint of step 6 stays
        train(FaultySource(acts(), at=9, fault="raise"), _run_cfg(), out_dir=out)
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 6
    failures = spawn(_resume_rank_main, 2, tmp_path, str(out), parallel)  # 1 -> 2
    assert not failures, failures
    assert _losses(out) == pytest.approx(uninterrupted, rel=1e-4, abs=1e-6)
    assert (out / "model.safetensors").exists() and not (out / STATE_FILE).exists()


FAULTS = ("nan_at_load", "dim", "nan_mid_run")
MODES = ("dictionary", "data")


def _bad_data_rank_main(rank: int, world: int, store: str, tmp: str) -> None:
    join(rank, world, store, timeout_s=30.0)
    try:  # one group for every case: after an agreed error the ranks are in step for the next run
        for parallel in MODES:
            for fault in FAULTS:
                data = acts()
                if rank == 1 and fault == "nan_at_load":
                    data[7, 3] = float("nan")
                elif rank == 1 and fault == "dim":
                    data = acts(d=15)
                elif rank == 1 and fault == "nan_mid_run":
                    data = FaultySource(data, at=4, fault="nan")
                try:
                    train(data, _run_cfg(parallel=parallel, checkpoint_every=0))
                    message = "no error"
                except DistributedInputError as e:
                    message = str(e)
                Path(tmp, f"{parallel}_{fault}_rank{rank}.txt").write_text(message)
        # resume where rank 1 cannot see rank 0's checkpoint (no shared filesystem)
        out = Path(tmp, "ckpt" if rank == 0 else "elsewhere")
        try:
            train(acts(), _run_cfg(parallel="dictionary"), out_dir=out, resume=True)
            message = "no error"
        except DistributedInputError as e:
            message = str(e)
        Path(tmp, f"resume_rank{rank}.txt").write_text(message)
    finally:
        shutdown()


@pytest.fixture(scope="module")
def bad_data_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    with pytest.raises(Interrupted):  # a checkpoint of step 3 that only rank 0 will see
        train(FaultySource(acts(), at=6, fault="raise"), _run_cfg(), out_dir=tmp / "ckpt")
    failures = spawn(_bad_data_rank_main, 2, tmp, str(tmp), limit_s=240.0)
    assert not failures, failures  # every rank returned from train() with the error, none hung
    return tmp


@pytest.mark.parametrize("parallel", MODES)
@pytest.mark.parametrize("fault", FAULTS)
def test_bad_data_on_one_rank_stops_every_rank(bad_data_runs, parallel, fault):
    messages = [Path(bad_data_runs, f"{parallel}_{fault}_rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    want = {"nan_at_load": "rank 1: DataError", "dim": "rank 1 has activation dim 15, rank 0 has 16",
            "nan_mid_run": "activations (step 2): rank 1 has 1 NaN/inf values (first in row 1)"}[fault]
    assert want in messages[0], messages[0]


def test_resume_needs_the_same_checkpoint_on_every_rank(bad_data_runs):
    messages = [Path(bad_data_runs, f"resume_rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "read different checkpoints" in messages[0] and "[3, None]" in messages[0], messages[0]
