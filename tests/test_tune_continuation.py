"""Continuation sweeps for real (issue 18): every trial starts from one run's checkpoint state, a
trial that blows up is scored (and Optuna is told its value), the stability margin probe leaves a
trial bit-identical, the long-horizon confirmation picks the trial that stays clean, and a
relaunched sweep re-runs nothing. The tiny model on the shared local Ray cluster."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from vits_ray.tune.confirm import CONFIRMATIONS_FILE
from vits_ray.tune.score import DIVERGED_SCORE
from vits_ray.tune.sweep import BEST_FILE, SWEEP_FILE, TRIALS_FILE, SweepJob, run_sweep

pytestmark = pytest.mark.slow

# A constant schedule: the base run, a trial and a resumed run take the same learning rate at the
# continuation's first step whatever the schedule's clock.
BASE_OVERRIDES = ("optim.lr_schedule=constant", "train.max_failures=0", "tune.margin_steps=2",
                  "tune.noise_seeds=2")
BASE_STEPS = 10  # the tiny recipe saves every 10 steps: the base run's checkpoint_00000010
RECIPE_LR, SAFE_LR, BLOWUP_LR = 2e-4, 1e-4, 0.9
SPACE = f"""
[parameters."optim.lr_gen"]
values = [{RECIPE_LR}, {SAFE_LR}, {BLOWUP_LR}]
"""
MAX_STEPS, CONFIRM_STEPS = 4, 8


def records(run: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((run / "records").glob("*.jsonl")) for line in path.open()]


def step_record(run: Path, step: int) -> dict:
    return next(r for r in records(run) if r.get("kind") == "step" and r["step"] == step)


def events(run: Path, kind: str) -> list[dict]:
    return [r for r in records(run) if r.get("kind") == "event" and r.get("event") == kind]


def load_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / TRIALS_FILE, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def base_run(prepared_demo, tmp_path_factory) -> Path:
    from vits_ray.config import load_config
    from vits_ray.train import TrainJob, run_local

    storage = tmp_path_factory.mktemp("continuation")
    cfg = load_config("tiny", list(BASE_OVERRIDES))
    run_local(TrainJob(config=cfg.to_dict(), data_uri=str(prepared_demo), storage_uri=str(storage), name="base",
                       max_steps=BASE_STEPS))
    assert (storage / "base" / f"checkpoint_{BASE_STEPS:08d}").is_dir()
    return storage / "base"


def sweep_job(prepared_demo, base_run: Path, storage: Path, space: Path) -> SweepJob:
    return SweepJob(recipe="tiny", overrides=BASE_OVERRIDES, space_path=str(space), data_uri=str(prepared_demo),
                    # No rung before the end: nothing stops a clean trial early, so two reach the confirmation.
                    storage_uri=str(storage), name="cont", trials=3, max_steps=MAX_STEPS, grace_steps=MAX_STEPS,
                    from_run=str(base_run), confirm_top=2, confirm_steps=CONFIRM_STEPS, confirm_drill="spike@2",
                    first_points=({"optim.lr_gen": RECIPE_LR}, {"optim.lr_gen": SAFE_LR},
                                  {"optim.lr_gen": BLOWUP_LR}))


@pytest.fixture(scope="module")
def continuation_sweep(prepared_demo, base_run, ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cont-sweep")
    space = tmp / "space.toml"
    space.write_text(SPACE)
    job = sweep_job(prepared_demo, base_run, tmp / "sweeps", space)
    outcome = run_sweep(job)
    return job, outcome, tmp / "sweeps" / "cont"


def start_label(folder: Path) -> str:
    """Where the trials started, as the sweep resolved it (RUN@STEP)."""
    label = json.loads((folder / SWEEP_FILE).read_text())["start_label"]
    assert label.endswith(f"base@{BASE_STEPS}")
    return label


def trial_of(rows, lr: float) -> dict:
    return next(r for r in rows if math.isclose(float(r["optim.lr_gen"]), lr))


def test_every_trial_starts_from_the_same_state(continuation_sweep, base_run):
    from vits_ray import checkpoint as ckpt_io

    _, _, folder = continuation_sweep
    source = ckpt_io.training_state_digest(ckpt_io.read(base_run / f"checkpoint_{BASE_STEPS:08d}"))
    started = {}
    for row in load_rows(folder):
        [event] = events(folder / f"trial_{row['trial_id']}", "continued")
        assert event["step"] == BASE_STEPS and event["detail"]["from"].endswith(f"base@{BASE_STEPS}")
        started[row["trial_id"]] = event["detail"]["state_digest"]
    assert set(started.values()) == {source}, started
    recorded = json.loads((folder / SWEEP_FILE).read_text())
    assert recorded["start"]["step"] == BASE_STEPS and recorded["start"]["checkpoint"] == f"checkpoint_{BASE_STEPS:08d}"
    assert all(r["start"].endswith(f"base@{BASE_STEPS}") for r in load_rows(folder))


def test_a_trials_first_step_is_the_step_a_resumed_train_takes(continuation_sweep, base_run, prepared_demo, tmp_path):
    from vits_ray.config import load_config
    from vits_ray.train import TrainJob, run_local

    _, _, folder = continuation_sweep
    recipe_trial = trial_of(load_rows(folder), RECIPE_LR)
    # The base run relaunched with its own settings (a copy, so the base run stays as it is).
    shutil.copytree(base_run, tmp_path / "base")
    cfg = load_config("tiny", list(BASE_OVERRIDES))
    run_local(TrainJob(config=cfg.to_dict(), data_uri=str(prepared_demo), storage_uri=str(tmp_path), name="base",
                       max_steps=BASE_STEPS + 1))
    resumed = step_record(tmp_path / "base", BASE_STEPS + 1)
    trial = step_record(folder / f"trial_{recipe_trial['trial_id']}", BASE_STEPS + 1)
    for key in ("loss_0", "loss_1", "loss_mel", "loss_kl", "grad_norm_0", "grad_norm_1", "lr_1"):
        assert trial[key] == resumed[key], key


def test_a_trial_that_blows_up_is_scored_last_and_optuna_learns_its_value(continuation_sweep):
    import optuna

    _, outcome, folder = continuation_sweep
    rows = load_rows(folder)
    blown = trial_of(rows, BLOWUP_LR)
    assert blown["status"] == "diverged" and blown["cause"], blown
    assert not blown["error"]
    assert DIVERGED_SCORE <= float(blown["score"]) < 2 * DIVERGED_SCORE
    assert float(blown["score"]) > max(float(r["score"]) for r in rows if r is not blown)
    assert rows[-1]["trial_id"] == blown["trial_id"]  # trials.csv is by score
    assert [event["detail"]["cause"] for event in events(folder / f"trial_{blown['trial_id']}", "trial_diverged")]
    # The sampler was told a value for every trial, the blown-up one included (not a failure).
    trials = outcome.study.trials
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    told = {round(t.params["optim.lr_gen"], 6): t.value for t in trials}
    assert told[BLOWUP_LR] == pytest.approx(float(blown["score"]), rel=1e-5)


def test_margin_probes_and_score_noise_are_recorded(continuation_sweep):
    job, _, folder = continuation_sweep
    for row in load_rows(folder):
        if row["status"] != "completed":
            continue
        assert row["margin_ok"] in ("0", "1") and math.isfinite(float(row["margin_loss_rise"]))
        assert float(row["val_noise"]) > 0  # the same weights, other seeds: the score's own spread
        probes = events(folder / f"trial_{row['trial_id']}", "margin_probe")
        assert [p["step"] for p in probes] == [BASE_STEPS + r for r in job.rungs()] == [BASE_STEPS + MAX_STEPS]


def test_a_confirmation_that_spikes_loses_to_a_cleaner_trial(continuation_sweep):
    job, outcome, folder = continuation_sweep
    rows = load_rows(folder)
    confirmations = json.loads((folder / CONFIRMATIONS_FILE).read_text())
    assert len(confirmations) == 2
    drilled, other = confirmations  # search-best first: the drill went to it
    assert drilled["drill"] == "spike@2" and float(drilled["search_score"]) <= float(other["search_score"])
    assert not drilled["clean"] and (drilled["spikes"] or drilled["rollbacks"]), drilled
    assert other["clean"] and other["steps"] == CONFIRM_STEPS, other
    assert outcome.best["trial_id"] == other["trial_id"]
    text = (folder / BEST_FILE).read_text()
    assert other["trial_id"] in text and "did not stay clean" in text
    assert f"--from-run {start_label(folder)}" in text
    assert {c["trial_id"] for c in confirmations} <= {r["trial_id"] for r in rows if r["status"] == "completed"}


def test_the_sweep_report_shows_the_start_the_noise_and_the_confirmation(continuation_sweep, tmp_path):
    from vits_ray.report import write_sweep_report

    _, outcome, folder = continuation_sweep
    md = write_sweep_report(str(folder), tmp_path / "report").read_text()
    assert f"`{start_label(folder)}`" in md
    confirmation = md.split("## Long-horizon confirmation\n", 1)[1].split("\n## ", 1)[0]
    assert "| spike@2 |" in confirmation and f"Winner: trial {outcome.best['trial_id']}" in confirmation
    assert "## Score noise" in md and ("within the noise" in md or "beyond the noise" in md)
    assert "| diverged |" in md


def test_a_relaunched_sweep_reruns_no_trial_and_no_confirmation(continuation_sweep, prepared_demo, base_run):
    job, _, folder = continuation_sweep
    before = {p: p.stat().st_mtime_ns for p in folder.glob("trial_*/records/*.jsonl")}
    confirmations = (folder / CONFIRMATIONS_FILE).read_text()
    outcome = run_sweep(job)
    after = {p: p.stat().st_mtime_ns for p in folder.glob("trial_*/records/*.jsonl")}
    assert after == before  # no trial's Train run wrote a record: nothing re-ran
    assert (folder / CONFIRMATIONS_FILE).read_text() == confirmations
    assert outcome.best is not None and (folder / BEST_FILE).exists()


def test_the_margin_probe_leaves_the_trial_bit_identical(base_run, prepared_demo, tmp_path):
    from vits_ray import checkpoint as ckpt_io
    from vits_ray.config import load_config, replace
    from vits_ray.continuation import resolve
    from vits_ray.train import TrainJob, run_local

    cfg = load_config("tiny", list(BASE_OVERRIDES))
    point = resolve(str(base_run), cfg.storage)
    cfg = replace(cfg, **point.schedule_overrides())
    end = BASE_STEPS + 4
    digests = {}
    for name, probes in (("probed", (BASE_STEPS + 2, end)), ("plain", ())):
        run_local(TrainJob(config=cfg.to_dict(), data_uri=str(prepared_demo), storage_uri=str(tmp_path), name=name,
                           max_steps=end, from_run=point.as_dict(), margin_probes=probes))
        digests[name] = ckpt_io.training_state_digest(ckpt_io.read(tmp_path / name / f"checkpoint_{end:08d}"))
    assert len(events(tmp_path / "probed", "margin_probe")) == 2 and not events(tmp_path / "plain", "margin_probe")
    assert digests["probed"] == digests["plain"]
