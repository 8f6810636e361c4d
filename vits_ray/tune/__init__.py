"""Sweeps over the training config (learning-rate schedules first), for Ray Tune + Optuna.

`space`: the search space file (W&B-sweep-shaped TOML) checked against the config, and Optuna's
define-by-run suggestions from it. `score`: the instability-aware objective, computed from what
every report of a training run carries (`Trainer.health_metrics`). The Tuner that drives one Ray
Train run per trial is not here yet (issue 11).
"""
