"""Metric loggers for training runs: ``jsonl`` (always), plus ``tensorboard`` or ``wandb``.

``metrics.jsonl`` in the run directory is always written (resume relies on it); ``tensorboard``
adds event files under ``RUN/tensorboard`` and ``wandb`` an offline run under ``RUN/wandb``
(``mode="offline"``: no network; upload later with ``wandb sync``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOGGERS = ("jsonl", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"


class LoggerUnavailable(ImportError, ValueError):
    """The package a logger needs is not installed (also a ValueError: a bad user choice)."""


class MetricsLogger:
    """Receives one dict of metrics per logged step; ``close()`` at the end."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlLogger(MetricsLogger):
    """Appends one JSON object per logged step to ``path`` (flushed every line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._f.write(json.dumps(metrics) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoardLogger(MetricsLogger):
    """Scalars via ``torch.utils.tensorboard.SummaryWriter`` into ``log_dir``."""

    def __init__(self, log_dir: str | Path) -> None:
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(f"train/{key}", value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricsLogger):
    """An offline Weights & Biases run (no network) stored under ``run_dir/wandb``."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None) -> None:
        require("wandb")
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        self.run = wandb.init(mode="offline", dir=str(run_dir), config=config or {},
                              name=Path(run_dir).resolve().name)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in _scalars(metrics).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MultiLogger(MetricsLogger):
    """Forwards every call to each of ``loggers`` (closes all, even if one fails)."""

    def __init__(self, loggers: list[MetricsLogger]) -> None:
        self.loggers = loggers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def close(self) -> None:
        errors = []
        for lg in self.loggers:
            try:
                lg.close()
            except Exception as err:  # noqa: BLE001 - close the rest, then re-raise the first
                errors.append(err)
        if errors:
            raise errors[0]


def require(kind: str) -> None:
    """Raise ``LoggerUnavailable`` naming the pip package if logger ``kind`` cannot run here."""
    if kind not in LOGGERS:
        raise ValueError(f"log must be one of {LOGGERS}, got {kind!r}")
    if kind == "jsonl":
        return
    import importlib.util

    if importlib.util.find_spec(kind) is None:
        raise LoggerUnavailable(f"log={kind!r} needs the {kind} package, which is not installed: pip install {kind}")


def open_logger(kind: str, run_dir: str | Path, config: dict[str, Any] | None = None) -> MetricsLogger:
    """``metrics.jsonl`` in ``run_dir`` plus the ``kind`` backend (``"jsonl"``: that file only)."""
    require(kind)
    run_dir = Path(run_dir)
    loggers: list[MetricsLogger] = [JsonlLogger(run_dir / METRICS_FILE)]
    try:
        if kind == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
        elif kind == "wandb":
            loggers.append(WandbLogger(run_dir, config))
    except BaseException:
        loggers[0].close()
        raise
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)
