"""Ray Tune + Optuna sweeps over the training config (learning-rate schedules first).

`space`: the search space file (W&B-sweep-shaped TOML) checked against the config, and Optuna's
define-by-run suggestions from it. `score`: the instability-aware objective. `sweep`: the Tuner
that drives one Ray Train run per trial, and the sweep's results (trials.csv, best.toml).
"""
