"""Rollbacks that cannot loop, drilled for real: a spike on a checkpoint step with a validation
right after it, a learning rate that keeps every new timeline diverging, and a worker killed
between two rollbacks (tiny model, CPU, real Ray where a restart is part of the drill)."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from drills import Background, drill_job, model_weights, wait_for
from vits_ray.runlog import read_records, segment_names
from vits_ray.storage import open_store
from vits_ray.train import Drill, run_training

pytestmark = pytest.mark.slow


def segment_lines(run_store) -> list[dict]:
    return [json.loads(line) for name in segment_names(run_store)
            for line in run_store.read_bytes(name).decode().splitlines()]


def starts(run_store) -> list[int]:
    """The step each start of the training loop resumed at (-1: a fresh start), in order."""
    return [r["step"] for r in segment_lines(run_store) if r["kind"] == "resume"]


def ledger(run_store) -> dict:
    return json.loads(run_store.read_bytes("rollbacks.json"))


def test_a_spike_on_a_checkpoint_step_rolls_back_past_it_once_and_the_run_finishes(prepared_demo, tmp_path):
    # The run that looped: checkpoints every 2 steps, validation every 10, the learning rate x300 on
    # steps 8-10. Step 8's losses jump before the detector has a baseline to call them a spike.
    job = drill_job(prepared_demo, tmp_path, "spike8", max_steps=20, drills=(Drill("spike", 8),),
                    overrides=["train.save_step=2", "train.val_step=10"])
    outcome = run_training(job, local=True)

    assert outcome.step == 20
    run = open_store(str(tmp_path)).child("spike8")
    metrics, events = read_records(run)
    backoffs = [e for e in events if e["kind"] == "lr_backoff"]
    assert 1 <= len(backoffs) <= 2, backoffs
    assert all(e["detail"]["first_anomalous"] == 8 and e["detail"]["restored_step"] < 8 for e in backoffs)
    # The step-8 save waited for the guard, and no checkpoint holds the spiked weights.
    postponed = [e for e in events if e["kind"] == "checkpoint_postponed"]
    assert postponed and postponed[0]["step"] == 8 and "loss_1" in postponed[0]["detail"]["reason"]
    verdicts = [e["detail"] for e in events if e["kind"] == "checkpoint_verdict"]
    assert {v["verdict"] for v in verdicts} <= {"clean", "unjudged"}
    assert not any(v["checkpoint"] == "checkpoint_00000008" and v["generation"] == 0 for v in verdicts)
    entries = ledger(run)["entries"]
    assert [(e["first_anomalous"], e["restored"]) for e in entries] == [(8, b["detail"]["restored_step"])
                                                                        for b in backoffs]

    weights = model_weights(tmp_path / "spike8")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    spike = next(e for e in events if e["kind"] == "spike" and e["series"] == "loss_1")
    final = [r["loss_1"] for r in metrics if r["kind"] == "step" and not r.get("rolled_back")][-4:]
    assert np.median(final) < spike["threshold"]  # back under the band the spike broke out of

    # The report shows each checkpoint's verdict.
    from vits_ray.report import write_report

    text = write_report(run.uri, tmp_path / "report").read_text()
    assert "Checkpoint verdicts" in text and "postponed" in text


def test_a_run_that_keeps_diverging_stops_within_its_budget_even_across_a_killed_worker(
        prepared_demo, ray_local, tmp_path):
    # From step 8 on the learning rate is 300x, whatever the rollbacks restore: every new timeline
    # diverges. The worker is killed after the first rollback; Ray Train restarts it, the count
    # goes on from the ledger, and the spent budget ends the run without another restart.
    job = drill_job(prepared_demo, tmp_path, "diverge", max_steps=60, drills=(Drill("diverge", 8),),
                    overrides=["train.save_step=2", "train.val_step=1000", "train.max_failures=2",
                               "stability.max_rollbacks=3"])
    run = open_store(str(tmp_path)).child("diverge")
    background = Background(job)
    wait_for(lambda: run.exists("rollbacks.json") and len(ledger(run)["entries"]) == 1, 300,
             "the first rollback", background)
    from drills import kill_training_worker

    kill_training_worker()
    with pytest.raises(Exception) as err:
        background.result(600)

    message = str(err.value)
    assert "4 rollbacks within 5000 steps" in message and "at most 3" in message, message
    assert "not retried" in message
    entries = ledger(run)["entries"]
    assert len(entries) == 3
    assert [e["multiplier"] for e in entries] == [0.5, 0.25, 0.125]  # compounding, across the restart
    assert all(e["restored"] < 8 <= e["first_anomalous"] for e in entries)
    for e in entries:  # the message names each rollback: where, from when, to where, at which rates
        assert f"step {e['decided_at']} (trouble from step {e['first_anomalous']}" in message
        assert f"back to step {e['restored']}" in message
    assert "lr_gen 6.00e-02" in message  # 2e-4 x 300 when the first rollback was decided
    # One restart (the kill), and none after the run stopped on its budget.
    resumed = starts(run)
    assert len(resumed) == 2 and resumed[0] == -1 and 0 <= resumed[1] < 8, resumed
    # After the restart the backoff carried on from the ledger, not from the checkpoint (written
    # before any rollback): the steps before the drill ran at a fraction of the recipe's rate.
    lines = segment_lines(run)
    last_start = max(i for i, r in enumerate(lines) if r["kind"] == "resume")
    calm = [r["lr_1"] for r in lines[last_start:] if r["kind"] == "step" and r["step"] < 8]
    assert calm and max(calm) <= 2e-4 * 0.5 * (1 + 1e-6), calm
