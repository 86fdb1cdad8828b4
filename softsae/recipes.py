"""Training recipes: named presets of ``TrainConfig`` fields (``softsae train --recipe default|paper``).

    cfg = recipe_config("paper", arch="softsae", dict_size=4608, k=32, steps=20_000)

Precedence: TrainConfig's defaults < the recipe's preset < ``--config`` file < command-line flags (or
the keyword arguments of ``recipe_config``). The preset depends on ``steps`` and ``dict_size`` only.
The run's ``train_config.json`` holds the recipe's name and every resolved field.

* ``default``: TrainConfig's own defaults (softsae.trainer module doc, with the measurements that
  chose them): hard top-floor(k_hat) forward throughout; for SoftSAE the encoder is trained through
  the hard codes (as TopK) and the soft top-k gate only gives the k head its gradient
  (straight-through, ``st_mode="k"``) for the first 80% of the steps, then a hard phase of 20% with the
  encoder trained; alpha 3e-3 fixed; no K annealing; lr 2e-4 / sqrt(n / 2^14).
* ``paper``: the choices the SoftSAE authors publish, as issue 17 and softsae.trainer's module doc
  record them (not re-checked against the paper here): the forward goes
  through the soft gate (``st_frac=0``); alpha linear from 1 to 1e-4 over the first 2500 steps
  (``min(2500, steps)`` for shorter runs); the K target annealed from max(d, K) to K over the first 1%
  of the steps, for every architecture; the last 4% of the steps hard, selecting without encoder
  gradient (``hard_encoder_grad=False``); k_max 2K; lr 3e-4 at n = 16384, scaled by 1 / sqrt(n / 2^14)
  as the default is.
"""

from __future__ import annotations

import math
from typing import Any

RECIPES = ("default", "paper")
PAPER_ALPHA_STEPS = 2500


def recipe_preset(name: str, steps: int, dict_size: int) -> dict[str, Any]:
    """The TrainConfig fields recipe ``name`` sets, for a run of ``steps`` steps with ``dict_size`` latents."""
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {RECIPES}, got {name!r}")
    if name == "default":
        return {"recipe": "default"}
    if steps < 1 or dict_size < 1:
        raise ValueError(f"steps and dict_size must be positive, got {steps} and {dict_size}")
    return {"recipe": "paper", "st_frac": 0.0, "st_mode": "soft", "alpha_start": 1.0, "alpha": 1e-4,
            "alpha_schedule": "linear", "alpha_anneal_steps": min(PAPER_ALPHA_STEPS, steps), "k_anneal_frac": 0.01,
            "hard_frac": 0.04, "hard_encoder_grad": False, "k_max": None,
            "lr": 3e-4 / math.sqrt(dict_size / 2**14)}


def apply_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields: the preset of ``values["recipe"]`` (default "default") overridden by ``values``."""
    from softsae.trainer import TrainConfig

    name = values.get("recipe", "default")
    steps = values.get("steps", TrainConfig.steps)
    dict_size = values.get("dict_size", TrainConfig.dict_size)
    return {**recipe_preset(name, steps, dict_size), **values}


def recipe_config(recipe: str = "default", **fields: Any):
    """A ``TrainConfig`` of recipe ``recipe`` with ``fields`` overriding its preset."""
    from softsae.trainer import TrainConfig

    return TrainConfig(**apply_recipe({**fields, "recipe": recipe}))
