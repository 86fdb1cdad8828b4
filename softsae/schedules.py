"""Schedules of a training run and its optimizer: a leaf module (torch and math only).

Every function takes the resolved ``softsae.trainer.TrainConfig`` ``c`` (any object with its fields)
and a step index; the recipe is described in ``softsae.trainer``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["alpha_at", "apply_schedule", "is_hard_phase", "is_st_phase", "k_target_at", "lr_at", "make_optimizer"]


def lr_at(step: int, c) -> float:
    """Linear warmup over ``warmup_steps``, constant, then linear decay to 0 from ``decay_start``."""
    warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps > 0 else 1.0
    if step < c.decay_start:
        return c.lr * warm
    return c.lr * warm * max(0.0, (c.steps - step) / max(1, c.steps - c.decay_start))


def k_target_at(step: int, c, d: int) -> float:
    """Budget target (SoftSAE k-loss target; TopK's K): linear from max(d, K) to K over ``k_anneal_steps``."""
    if c.k_anneal_steps <= 0:
        return float(c.k)
    frac = min(1.0, step / c.k_anneal_steps)
    return float(c.k) + (max(d, c.k) - float(c.k)) * (1.0 - frac)


def alpha_at(step: int, c) -> float:
    """Soft top-k scale: ``alpha_start`` -> ``alpha`` over ``alpha_anneal_steps``, linearly or log-linearly."""
    if c.alpha_anneal_steps <= 0:
        return c.alpha
    frac = min(1.0, step / c.alpha_anneal_steps)
    if c.alpha_schedule == "linear":
        return c.alpha_start + (c.alpha - c.alpha_start) * frac
    return math.exp(math.log(c.alpha_start) + (math.log(c.alpha) - math.log(c.alpha_start)) * frac)


def is_hard_phase(step: int, c) -> bool:
    """SoftSAE's final hard top-k phase (the last ``hard_topk_steps`` steps)."""
    return c.arch == "softsae" and step >= c.steps - c.hard_topk_steps


def is_st_phase(step: int, c) -> bool:
    """SoftSAE's straight-through phase: the ``st_steps`` steps just before the hard phase."""
    return c.arch == "softsae" and c.steps - c.hard_topk_steps - c.st_steps <= step < c.steps - c.hard_topk_steps



def apply_schedule(model, opt: torch.optim.Optimizer, step: int, c) -> bool:
    """Set step ``step``'s learning rate and the model's phase flags (hard phase; SoftSAE's alpha and
    straight-through settings; the baselines' annealed K). Returns whether the step is hard."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, c)
    hard = is_hard_phase(step, c)
    model.hard = hard
    if model.arch == "softsae":
        model.alpha = alpha_at(step, c)
        model.straight_through = is_st_phase(step, c)
        model.st_mode = c.st_mode
        model.hard_encoder_grad = c.hard_encoder_grad
    else:
        model.k_train = int(round(k_target_at(step, c, model.d))) if c.k_anneal_steps > 0 else None
    return hard


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam (betas 0.9, 0.999) over ``params``: torch's fused single-pass implementation when every
    parameter is a CPU or CUDA float tensor (on CPU about 10x faster than the default multi-pass
    update at 16384 x 768), else the default. The state dict is the same either way."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True if fused else None)
