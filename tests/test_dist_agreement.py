"""Every rank agrees on the run before training (softsae.distributed.agreement): a rank with another
``--seed`` or ``--dict-size``, a checkpoint that only rank 0 sees, or a corrupt checkpoint on one rank makes
EVERY rank raise the same DistributedInputError (a ValueError: exit 2 on the command line), in data- and
dictionary-parallel mode, instead of a gloo abort or a silent run on different batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from dist_spawn import FaultySource, Interrupted, acts, cfg, join, spawn

from softsae.distributed import DistributedInputError
from softsae.distributed.agreement import config_digest
from softsae.distributed.process import shutdown
from softsae.trainer import STATE_FILE, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

MODES = ("data", "dictionary")
CASES = ("seed", "dict_size", "checkpoint_on_rank0_only", "corrupt_checkpoint_on_rank1", "same")


def _run_cfg(**kw):
    return cfg("softsae", **{"steps": 8, "checkpoint_every": 3, **kw})


def _rank_main(rank: int, world: int, store: str, tmp: str) -> None:
    join(rank, world, store, timeout_s=30.0)
    try:  # one group for every case: after an agreed error the ranks are in step for the next one
        for parallel in MODES:
            for case in CASES:
                kw: dict = {"parallel": parallel}
                if rank == 1 and case == "seed":
                    kw["seed"] = 4
                if rank == 1 and case == "dict_size":
                    kw["dict_size"] = 52
                out, resume = None, False
                if case == "checkpoint_on_rank0_only":
                    out, resume = Path(tmp, "ckpt" if rank == 0 else f"elsewhere_{parallel}"), True
                elif case == "corrupt_checkpoint_on_rank1":
                    out, resume = Path(tmp, "ckpt" if rank == 0 else "corrupt"), True
                try:
                    train(acts(), _run_cfg(**kw, checkpoint_every=0 if out is None else 3), out_dir=out,
                          resume=resume)
                    message = "no error"
                except DistributedInputError as e:
                    assert isinstance(e, ValueError)
                    message = str(e)
                Path(tmp, f"{parallel}_{case}_rank{rank}.txt").write_text(message)
    finally:
        shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("agree")
    with pytest.raises(Interrupted):  # a checkpoint of step 3 that only rank 0 reads
        train(FaultySource(acts(), at=6, fault="raise"), _run_cfg(), out_dir=tmp / "ckpt")
    assert (tmp / "ckpt" / STATE_FILE).exists()
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / STATE_FILE).write_bytes((tmp / "ckpt" / STATE_FILE).read_bytes()[:100])
    failures = spawn(_rank_main, 2, tmp, str(tmp), limit_s=240.0)
    assert not failures, failures  # no rank aborted or hung: each returned from train() with the error
    return tmp


@pytest.mark.parametrize("parallel", MODES)
@pytest.mark.parametrize("case", CASES)
def test_every_rank_fails_with_one_message(runs, parallel, case):
    messages = [Path(runs, f"{parallel}_{case}_rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    want = {"seed": "rank 1 runs with other settings than rank 0 (rank 0 vs rank 1: {'seed': (3, 4)})",
            "dict_size": "'dict_size': (50, 52)",
            "checkpoint_on_rank0_only": "read different checkpoints from trainer_state.pt (step by rank, None = no "
                                        "file: [3, None]",
            "corrupt_checkpoint_on_rank1": f"rank 1: ValueError: {Path(runs, 'corrupt', STATE_FILE)}: cannot read "
                                           "the training state",
            "same": "no error"}[case]
    assert want in messages[0], messages[0]
    if case != "same":
        assert messages[0].startswith(f"parallel='{parallel}' training cannot start")


def test_config_digest_ignores_per_rank_fields():
    a, b = cfg("topk", device="cpu"), cfg("topk", device="cuda:1", progress=True)
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) != config_digest(cfg("topk", seed=4))
