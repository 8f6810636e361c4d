"""LR schedules are pure functions of (step, epoch)."""

import math

from vits_ray.config import load_config
from vits_ray.schedule import learning_rates


def test_exponential_is_coqui_per_epoch_decay():
    cfg = load_config("bn_bd_vits").optim
    assert learning_rates(cfg, 0, 0) == (2e-4, 2e-4)
    d, g = learning_rates(cfg, 999, 10)
    assert math.isclose(g, 2e-4 * 0.999875 ** 10)
    assert learning_rates(cfg, 5, 3) == learning_rates(cfg, 500, 3)  # constant inside an epoch


def test_warmup_then_cosine_to_floor():
    cfg = load_config("tiny", ["optim.lr_schedule=cosine", "optim.warmup_steps=10",
                               "optim.cosine_total_steps=110", "optim.min_lr_ratio=0.1"]).optim
    assert math.isclose(learning_rates(cfg, 0, 0)[1], 2e-4 / 10)
    assert math.isclose(learning_rates(cfg, 9, 0)[1], 2e-4)
    assert math.isclose(learning_rates(cfg, 60, 0)[1], 2e-4 * (0.1 + 0.9 * 0.5))
    assert math.isclose(learning_rates(cfg, 500, 0)[1], 2e-4 * 0.1)


def test_multiplier_scales_both():
    cfg = load_config("tiny").optim
    assert learning_rates(cfg, 0, 0, 0.5) == (1e-4, 1e-4)
