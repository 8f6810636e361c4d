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


def test_a_continuation_runs_its_schedule_from_where_it_starts():
    """`optim.schedule_start_step/epoch`: warmup and cosine count steps, exponential decay counts
    epochs, from the continuation's start (before it: the schedule's first value)."""
    warm = load_config("tiny", ["optim.lr_schedule=warmup_exponential", "optim.warmup_steps=10",
                                "optim.lr_gamma=0.5", "optim.schedule_start_step=1000",
                                "optim.schedule_start_epoch=40"]).optim
    assert math.isclose(learning_rates(warm, 1000, 40)[1], 2e-4 / 10)  # the first step of the continuation
    assert math.isclose(learning_rates(warm, 1009, 40)[1], 2e-4)
    assert math.isclose(learning_rates(warm, 1020, 42)[1], 2e-4 * 0.25)  # two of its own epochs
    unshifted = load_config("tiny", ["optim.lr_schedule=warmup_exponential", "optim.warmup_steps=10",
                                     "optim.lr_gamma=0.5"]).optim
    assert math.isclose(learning_rates(unshifted, 1000, 40)[1], 2e-4 * 0.5 ** 40)
