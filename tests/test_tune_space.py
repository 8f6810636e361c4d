"""The sweep's search space and its instability-aware score (no Ray needed)."""

from __future__ import annotations

import math

import optuna
import pytest

from vits_ray.config import RECIPE_DIR, load_config, replace
from vits_ray.tune.score import DIVERGED_SCORE, score_metrics
from vits_ray.tune.space import SpaceError, as_overrides, load_space


@pytest.fixture
def base():
    return load_config("tiny")


def write(tmp_path, text: str):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_bundled_space_loads_and_every_suggestion_makes_a_valid_config(base):
    space = load_space(RECIPE_DIR / "tune_lr.toml", base)
    assert {"optim.lr_gen", "optim.lr_disc", "optim.lr_schedule", "optim.warmup_steps"} <= set(space.keys)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    schedules = set()
    for _ in range(30):
        trial = study.ask()
        settings = space.suggest(trial)
        cfg = replace(base, **as_overrides(settings))  # raises if a suggestion were invalid
        schedules.add(cfg.optim.lr_schedule)
        # conditional keys only under their condition
        assert ("optim.warmup_steps" in settings) == (settings["optim.lr_schedule"] == "warmup_exponential")
        assert ("optim.lr_gamma" in settings) == (settings["optim.lr_schedule"] == "exponential")
        assert 5e-5 <= settings["optim.lr_gen"] <= 8e-4
        study.tell(trial, settings["optim.lr_gen"])
    assert len(schedules) >= 3


@pytest.mark.parametrize("text, message", [
    ('[parameters."optim.lr_gne"]\nmin = 1e-5\nmax = 1e-3\n', "optim.lr_gne"),
    ('[parameters."optim.lr_gen"]\nmin = 1e-5\nmax = 2.0\n', "optim.lr_gen = 2.0"),
    ('[parameters."optim.lr_schedule"]\nvalues = ["exponential", "linear"]\n', "optim.lr_schedule = 'linear'"),
    ('[parameters."optim.lr_gen"]\ndistribution = "normal"\nmin = 1e-5\nmax = 1e-3\n', "distribution 'normal'"),
    ('[parameters."optim.lr_gen"]\ndistribution = "log_uniform_values"\nmin = 0\nmax = 1e-3\n', "min > 0"),
    ('[parameters."optim.warmup_steps"]\ndistribution = "int_uniform"\nmin = 0\nmax = 10\n'
     'when = { "optim.lr_schedule" = "warmup_exponential" }\n', "not searched before it"),
    ('[parameters."lr_gen"]\nmin = 1e-5\nmax = 1e-3\n', "section.key"),
    ("", "no [parameters"),
])
def test_bad_space_is_refused_naming_the_key(tmp_path, base, text, message):
    with pytest.raises(SpaceError, match=None) as err:
        load_space(write(tmp_path, text), base)
    assert message in str(err.value) and str(tmp_path / "space.toml") in str(err.value)


def test_score_ranks_a_rescued_run_below_a_clean_one_with_the_same_loss():
    clean = score_metrics({"step": 100, "val_loss_mel": 30.0, "spikes": 0, "rollbacks": 0})
    rescued = score_metrics({"step": 100, "val_loss_mel": 30.0, "spikes": 1, "rollbacks": 1})
    assert clean.score == 30.0 and clean.penalty == 0 and not clean.diverged
    assert rescued.score > clean.score and rescued.loss == 30.0 and rescued.penalty > 0
    # a somewhat better loss does not buy back a rollback
    assert score_metrics({"val_loss_mel": 27.0, "rollbacks": 1}).score > clean.score


def test_score_without_validation_uses_recent_training_loss_and_diverged_is_finite():
    assert score_metrics({"val_loss_mel": float("nan"), "loss_mel_recent": 40.0}).loss == 40.0
    diverged = score_metrics({"val_loss_mel": float("nan"), "loss_mel_recent": float("nan"), "nonfinite_steps": 9})
    assert diverged.diverged and DIVERGED_SCORE <= diverged.score <= 2 * DIVERGED_SCORE and math.isfinite(diverged.score)
