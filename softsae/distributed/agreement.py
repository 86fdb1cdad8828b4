"""Start-of-run agreement: every rank must run the same settings from the same checkpoint.

    state = agree_on_run(c, state_path, "parallel='data'")   # on every rank, once, before training

Each rank reads its checkpoint (``state_path``; None: starting afresh), hashes the file's bytes and
the resolved configuration (without the per-rank fields: ``device``, ``progress``), and one
all-gather compares them. A rank whose checkpoint cannot be read, a checkpoint missing or different
on some rank (no shared filesystem), or a setting that differs (``--seed``, ``--dict-size`` ...) makes
EVERY rank raise the same :class:`~softsae.distributed.DistributedInputError` (a ValueError: exit 2 on
the command line) naming what differs, instead of one rank aborting in a collective or the ranks
training silently on different global batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from softsae.distributed._comm import raise_everywhere
from softsae.distributed.process import group_rank_world

__all__ = ["PER_RANK_FIELDS", "agree_on_run", "config_digest", "file_digest"]

PER_RANK_FIELDS = ("device", "progress")  # may differ between ranks (cuda:0 / cuda:1; a bar on rank 0)


def _shared_settings(c: Any) -> dict:
    values = dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c)
    return {k: v for k, v in values.items() if k not in PER_RANK_FIELDS}


def config_digest(c: Any) -> str:
    """sha256 of the resolved configuration's shared fields (canonical JSON)."""
    return hashlib.sha256(json.dumps(_shared_settings(c), sort_keys=True, default=repr).encode()).hexdigest()


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def agree_on_run(c: Any, state_path: Path | None, what: str) -> dict | None:
    """Read the checkpoint ``state_path`` (None: a new run) on this rank and agree with every other rank
    on it and on ``c`` (see the module doc). Returns this rank's training state (None for a new run).
    Collective: every rank of the default group must call it."""
    from softsae.checkpoint import load_trainer_state

    state, error, digest = None, None, None
    if state_path is not None:
        try:
            digest = file_digest(state_path)
            state = load_trainer_state(state_path)
        except (OSError, ValueError) as err:
            error = f"{type(err).__name__}: {err}"
    step = None if state is None else int(state["step"])
    mine = (config_digest(c), _shared_settings(c), digest, step, error)
    _, world = group_rank_world(None)
    table: list = [None] * world
    dist.all_gather_object(table, mine)
    messages = [f"rank {r}: {e[4]}" for r, e in enumerate(table) if e[4] is not None]
    if not messages:
        ref = table[0][1]
        for r, (h, settings, *_rest) in enumerate(table):
            if h != table[0][0]:
                diff = {k: (ref.get(k), settings.get(k)) for k in sorted(set(ref) | set(settings))
                        if ref.get(k) != settings.get(k)}
                messages.append(f"rank {r} runs with other settings than rank 0 (rank 0 vs rank {r}: {diff})")
        if len({e[2] for e in table}) > 1:
            name = state_path.name if state_path is not None else "trainer_state.pt"
            steps = [e[3] for e in table]
            messages.append(f"resume: the ranks read different checkpoints from {name} (step by rank, None = no file: "
                            f"{steps}; sha256 {[None if e[2] is None else e[2][:12] for e in table]}); every rank "
                            "must see the same --out (a shared filesystem)")
    raise_everywhere(messages, f"{what} cannot start")
    return state
