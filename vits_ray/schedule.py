"""Learning-rate schedules as pure functions of (step, epoch), so a sweep can choose among them.

"exponential" is Coqui's default: `ExponentialLR` stepped once per epoch, lr = base * gamma**epoch.
"""

from __future__ import annotations

import math

from vits_ray.config import OptimConfig


def lr_factor(cfg: OptimConfig, step: int, epoch: int) -> float:
    """The multiplier on the base learning rate at global `step` inside `epoch`, on the schedule's
    own clock (which starts at `schedule_start_step`/`schedule_start_epoch`)."""
    step = max(0, step - cfg.schedule_start_step)
    epoch = max(0, epoch - cfg.schedule_start_epoch)
    warmup = 1.0
    if cfg.lr_schedule in ("warmup_exponential", "cosine") and cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        warmup = (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule in ("exponential", "warmup_exponential"):
        return warmup * cfg.lr_gamma ** epoch
    # cosine: from 1 after warmup down to min_lr_ratio at cosine_total_steps, then flat.
    progress = min(1.0, max(0, step - cfg.warmup_steps) / max(1, cfg.cosine_total_steps - cfg.warmup_steps))
    cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return warmup * cosine


def learning_rates(cfg: OptimConfig, step: int, epoch: int, multiplier: float = 1.0) -> tuple[float, float]:
    """(discriminator lr, generator lr), Coqui's optimizer order; `multiplier` is the stability backoff."""
    factor = lr_factor(cfg, step, epoch) * multiplier
    return cfg.lr_disc * factor, cfg.lr_gen * factor
