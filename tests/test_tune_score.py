"""The sweep's objective: smoothed validation loss, penalties, the margin, and diverged trials
scored (finite, worse than every other, worse still the sooner they diverged)."""

import math

import pytest

from vits_ray.tune.score import DIVERGED_SCORE, score_metrics


def test_the_smoothed_validation_loss_is_the_loss():
    scored = score_metrics({"val_loss_mel_mean": 60.0, "val_loss_mel": 80.0, "loss_mel_recent": 90.0, "step": 12})
    assert scored.loss == 60.0 and scored.score == 60.0 and scored.clean
    assert score_metrics({"val_loss_mel": 80.0, "loss_mel_recent": 90.0}).loss == 80.0
    assert score_metrics({"val_loss_mel": float("nan"), "loss_mel_recent": 90.0}).loss == 90.0


def test_a_failed_margin_probe_costs_the_set_penalty():
    held = score_metrics({"val_loss_mel_mean": 60.0, "margin_failures": 0, "margin_probes": 2}, margin_penalty=1.0)
    failed = score_metrics({"val_loss_mel_mean": 50.0, "margin_failures": 1, "margin_probes": 2,
                            "margin_cause": "step 4: spike at x2"}, margin_penalty=1.0)
    assert held.margin_ok == 1 and failed.margin_ok == 0 and failed.margin_cause == "step 4: spike at x2"
    assert failed.score == pytest.approx(100.0) and held.score < failed.score


def test_diverged_trials_rank_below_every_other_and_sooner_is_worse():
    worst_clean = score_metrics({"val_loss_mel_mean": 1e5, "spikes": 9, "rollbacks": 9})
    late = score_metrics({"val_loss_mel_mean": 40.0, "diverged": 1, "cause": "spike at step 9", "trial_step": 9},
                         horizon=12)
    early = score_metrics({"loss_mel_recent": float("nan"), "diverged": 1, "trial_step": 2}, horizon=12)
    assert late.diverged and late.cause == "spike at step 9" and not late.clean
    assert worst_clean.score < DIVERGED_SCORE <= late.score < early.score < 2 * DIVERGED_SCORE
    assert math.isfinite(early.score) and early.cause == "no finite loss"


def test_the_margin_is_probed_at_each_asha_rung_and_at_the_end():
    from vits_ray.tune.sweep import SweepJob

    job = SweepJob(recipe="tiny", overrides=(), space_path="", data_uri="", storage_uri="", name="s", max_steps=12,
                   grace_steps=3)
    assert job.rungs() == [3, 6, 12]
    assert SweepJob(**{**job.__dict__, "grace_steps": 0}).rungs() == [3, 6, 12]  # a quarter of max_steps
    assert SweepJob(**{**job.__dict__, "grace_steps": 12}).rungs() == [12]
    assert job.horizon_steps == 120 and SweepJob(**{**job.__dict__, "confirm_steps": 50}).horizon_steps == 50


def test_asha_stops_trials_only_at_the_rungs_before_the_last_step():
    """A rung at max_steps would let ASHA stop a trial at its last report, losing its last
    checkpoint, score noise and export (and its confirmation would start over)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    from vits_ray.tune.sweep import SweepJob, early_stopping

    job = SweepJob(recipe="tiny", overrides=(), space_path="", data_uri="", storage_uri="", name="s", max_steps=48,
                   grace_steps=6)
    asha = early_stopping(job)
    assert isinstance(asha, AsyncHyperBandScheduler)
    assert sorted(milestone for milestone, _ in asha._brackets[0]._rungs) == [6, 12, 24] == job.rungs()[:-1]
    assert not asha._stop_last_trials
    assert isinstance(early_stopping(SweepJob(**{**job.__dict__, "grace_steps": 48})), FIFOScheduler)


def test_a_confirmation_that_raised_is_told_by_the_workers_exception():
    from vits_ray.tune.confirm import worker_error_line

    # How Ray Train 2.60 words a worker's failure (as a confirmation at lr 0.0115 met it in bench_search).
    message = (
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "/work/main/vits_ray/train.py", line 200, in train_worker\n    trainer.run()\n'
        "... (Output truncated. See individual worker logs for full details) ...\n"
        '  File ".../TTS/tts/layers/vits/transforms.py", line 111, in rational_quadratic_spline\n'
        "    if torch.min(inputs) < left or torch.max(inputs) > right:\n"
        "RuntimeError: min(): Expected reduction dim to be specified for input.numel() == 0.\n")
    assert worker_error_line(RuntimeError(message)) == (
        "RuntimeError: min(): Expected reduction dim to be specified for input.numel() == 0.")
    assert worker_error_line(ValueError("no traceback here")) == "no traceback here"
    assert worker_error_line(KeyError()) == "KeyError"
