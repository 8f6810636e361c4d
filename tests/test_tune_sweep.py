"""Sweeps for real: Ray Tune + Optuna + ASHA driving the tiny model's Ray Train runs on the shared
local cluster, to local storage and to the S3-protocol server on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vits_ray.tune.score import DIVERGED_SCORE
from vits_ray.tune.sweep import BEST_FILE, TRIALS_FILE, SweepJob, run_sweep

pytestmark = pytest.mark.slow

# Measured on the tiny recipe: learning rates of 0.5 and up blow the model up within a few steps
# (KL loss past 1e9, then inf: non-finite steps the guard skips); 1e-4 and 1e-3 train cleanly.
# The 0.5 trials are also made to fail outright: a sample rate the shards were not prepared at is a
# setting no restart fixes, and only the trial's worker can find out (the driver checks the base
# recipe against the data, and the space's values only for validity).
UNSTABLE_SPACE = """
[parameters."optim.lr_gen"]
values = [1e-4, 1e-3, 0.5, 0.9]

[parameters."audio.sample_rate"]
values = [16000]
when = { "optim.lr_gen" = 0.5 }
"""
CONFIG_ERROR = "prepared at 22050 Hz but audio.sample_rate is 16000"
UNSTABLE_LR = 0.5
MAX_STEPS = 8


def load_trials(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sweep_job(tmp: Path, data: str, storage: str, name: str, space_text: str, **kw) -> SweepJob:
    space = tmp / f"{name}-space.toml"
    space.write_text(space_text)
    # No retries of a failed trial's workers: the misconfigured trials fail once, not four times.
    # No long-horizon confirmation here (test_tune_continuation has it): these test the search.
    return SweepJob(recipe="tiny", overrides=("train.max_failures=0",), space_path=str(space), data_uri=data,
                    storage_uri=storage, name=name, **{"max_steps": MAX_STEPS, "grace_steps": 2, "confirm_top": 0, **kw})


@pytest.fixture(scope="module")
def unstable_sweep(prepared_demo, ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    job = sweep_job(tmp, str(prepared_demo), str(tmp / "sweeps"), "lr", UNSTABLE_SPACE, trials=6, concurrent=2)
    outcome = run_sweep(job)
    return job, outcome, tmp / "sweeps" / "lr"


def unstable(row: dict) -> bool:
    return row["status"] == "diverged" or any(float(row[k]) > 0 for k in ("spikes", "rollbacks", "nonfinite_steps",
                                                                          "blowups"))


def test_the_sweep_finds_the_stable_region(unstable_sweep):
    job, outcome, folder = unstable_sweep
    rows = load_trials(folder / TRIALS_FILE)
    assert len(rows) == job.trials
    for column in ("trial_id", "status", "score", "loss", "spikes", "rollbacks", "nonfinite_steps", "penalty",
                   "steps", "margin_ok", "margin_loss_rise", "val_noise", "cause", "start", "optim.lr_gen",
                   "audio.sample_rate"):
        assert column in rows[0], column
    scored = [r for r in rows if r["status"] != "errored"]
    assert all(math.isfinite(float(r["score"])) for r in rows)
    stable = [r for r in scored if not unstable(r)]
    shaky = [r for r in scored if unstable(r)]
    assert stable and shaky, f"the sweep should have sampled both regions: {rows}"
    # Every unstable trial ranks below every stable one, and the best trial never needed rescue.
    assert min(float(r["score"]) for r in shaky) > max(float(r["score"]) for r in stable)
    best = outcome.best
    assert best is not None and not unstable(best) and best["status"] == "completed"
    assert float(best["optim.lr_gen"]) < min(float(r["optim.lr_gen"]) for r in shaky)
    # Instability is a result: a trial the guard would have had to rescue ended as diverged, with
    # its cause and a finite score above every clean trial's; a penalty is kept apart from the loss.
    for r in shaky:
        if r["status"] == "diverged":
            assert r["cause"] and DIVERGED_SCORE <= float(r["score"]) < 2 * DIVERGED_SCORE, r
        else:
            assert float(r["penalty"]) > 0 and float(r["score"]) == pytest.approx(
                float(r["loss"]) + float(r["penalty"]), rel=1e-4)
    assert all(r["start"] == "scratch" for r in rows)


def test_asha_stops_poor_trials_early_and_says_so(unstable_sweep):
    _, _, folder = unstable_sweep
    rows = load_trials(folder / TRIALS_FILE)
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped, rows
    for r in stopped:
        assert int(r["steps"]) < MAX_STEPS
    assert all(int(r["steps"]) == MAX_STEPS for r in rows if r["status"] == "completed")


def test_a_trial_that_raises_is_recorded_and_the_sweep_goes_on(unstable_sweep):
    _, outcome, folder = unstable_sweep
    rows = load_trials(folder / TRIALS_FILE)
    errored = [r for r in rows if r["status"] == "errored"]
    assert errored and all(float(r["optim.lr_gen"]) == UNSTABLE_LR for r in errored)
    assert all(CONFIG_ERROR in r["error"] for r in errored)
    assert all(r["status"] != "errored" for r in rows if float(r["optim.lr_gen"]) != UNSTABLE_LR)


def test_best_recipe_loads_and_trains(unstable_sweep, prepared_demo, tmp_path):
    from vits_ray.cli import main
    from vits_ray.config import load_config

    _, outcome, folder = unstable_sweep
    best_toml = folder / BEST_FILE
    text = best_toml.read_text()
    assert 'extends = "tiny.toml"' in text and "[optim]" in text
    cfg = load_config(str(best_toml))
    assert cfg.optim.lr_gen == pytest.approx(float(outcome.best["optim.lr_gen"]))
    # Only the chosen keys: the recipe's other settings are the base recipe's.
    assert cfg.model == load_config("tiny").model
    shown = CliRunner().invoke(main, ["config", "show", "--config", str(best_toml)])
    assert shown.exit_code == 0, shown.output
    trained = CliRunner().invoke(main, ["train", "--config", str(best_toml), "--data", str(prepared_demo),
                                        "--storage", str(tmp_path), "--name", "best", "--max-steps", "2", "--local"])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "best" / "export").is_dir()


def test_the_sweep_report_shows_every_trial(unstable_sweep, tmp_path):
    from vits_ray.report import write_sweep_report

    _, _, folder = unstable_sweep
    path = write_sweep_report(str(folder), tmp_path / "report")
    text = path.read_text()
    for row in load_trials(folder / TRIALS_FILE):
        assert row["trial_id"] in text
    assert list((tmp_path / "report").glob("*.png"))


def test_a_bad_space_is_refused_before_any_trial(prepared_demo, tmp_path):
    from vits_ray.cli import main

    space = tmp_path / "bad.toml"
    space.write_text('[parameters."optim.lr_gen"]\ndistribution = "log_uniform_values"\nmin = 1e-5\nmax = 3.0\n')
    result = CliRunner().invoke(main, ["tune", "--config", "tiny", "--data", str(prepared_demo), "--storage",
                                       str(tmp_path), "--name", "bad", "--space", str(space)])
    assert result.exit_code != 0
    assert "optim.lr_gen" in result.output and str(space) in result.output
    assert not (tmp_path / "bad").exists()


def test_the_sweep_fails_only_when_every_trial_fails(prepared_demo, ray_local, tmp_path):
    from vits_ray.cli import main

    space = tmp_path / "rate.toml"
    space.write_text('[parameters."audio.sample_rate"]\nvalues = [16000]\n')
    result = CliRunner().invoke(main, ["tune", "--config", "tiny", "--set", "train.max_failures=0", "--data",
                                       str(prepared_demo), "--storage", str(tmp_path), "--name", "doomed",
                                       "--space", str(space), "--trials", "2", "--max-steps", "2"])
    assert result.exit_code == 1, result.output
    assert "every trial failed" in result.output and CONFIG_ERROR in result.output
    rows = load_trials(tmp_path / "doomed" / TRIALS_FILE)
    assert [r["status"] for r in rows] == ["errored", "errored"]
    assert not (tmp_path / "doomed" / BEST_FILE).exists()


# --- resume after the driver dies, on S3 ------------------------------------------------------

RESUME_SPACE = """
[parameters."optim.lr_gen"]
distribution = "log_uniform_values"
min = 1e-4
max = 1e-3
"""


def _s3_keys(s3_uri: str, prefix: str) -> list[str]:
    import boto3

    bucket, root = s3_uri[len("s3://"):].split("/", 1)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=bucket, Prefix=f"{root}/{prefix}",
                                      **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"][len(root) + 1:] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _s3_text(s3_uri: str, key: str) -> str:
    import boto3

    bucket, root = s3_uri[len("s3://"):].split("/", 1)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    return client.get_object(Bucket=bucket, Key=f"{root}/{key}")["Body"].read().decode()


def _terminated_trials(s3_uri: str, name: str) -> set[str]:
    """Trials that Tune's saved experiment state records as finished."""
    done = set()
    for key in _s3_keys(s3_uri, f"{name}/experiment_state-"):
        state = json.loads(_s3_text(s3_uri, key))
        for trial_json, _ in state.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def _resume_markers(s3_uri: str, run: str) -> int:
    from vits_ray.runlog import RESUME

    lines = [json.loads(line) for key in _s3_keys(s3_uri, f"{run}/records/")
             for line in io.StringIO(_s3_text(s3_uri, key))]
    return sum(1 for r in lines if r.get("kind") == RESUME)


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(prepared_demo, ray_local, s3_uri, tmp_path):
    import ray

    from vits_ray.config import load_config
    from vits_ray.storage import open_store

    data = f"{s3_uri}/shards"
    open_store(data, load_config("tiny").storage).upload_dir(prepared_demo, "")
    space = tmp_path / "space.toml"
    space.write_text(RESUME_SPACE)
    args = ["tune", "--config", "tiny", "--set", "train.max_failures=0", "--data", data, "--storage", s3_uri,
            "--name", "resumed", "--space", str(space), "--trials", "3", "--max-steps", "4", "--confirm-top", "0"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "vits_ray", *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _terminated_trials(s3_uri, "resumed"):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "no trial finished in 5 minutes"
            time.sleep(2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, as a lost head or a Ctrl-C'd laptop would
        driver.wait()
    finished = _terminated_trials(s3_uri, "resumed")
    assert len(finished) < 3, "interrupted too late to show anything"

    from vits_ray.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(_s3_text(s3_uri, f"resumed/{TRIALS_FILE}"))))
    assert len(rows) == 3 and {r["trial_id"] for r in rows} >= finished
    assert all(r["status"] == "completed" and float(r["score"]) < DIVERGED_SCORE for r in rows)
    runs = {key.split("/")[1] for key in _s3_keys(s3_uri, "resumed/trial_")}
    assert runs == {f"trial_{r['trial_id']}" for r in rows}  # one Train run per trial, no re-runs
    for trial_id in finished:  # a finished trial's run was started once and never resumed
        assert _resume_markers(s3_uri, f"resumed/trial_{trial_id}") == 1
    assert "resumed/best.toml" in _s3_keys(s3_uri, "resumed/best.toml")
    # Tune would copy the driver's credentials into each trial's runtime_env, which Ray logs.
    logs_dir = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    leaked = [p.name for p in logs_dir.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked, f"the S3 secret is in Ray's logs: {leaked}"



def test_a_sweep_whose_trials_cannot_fit_is_refused_up_front(prepared_demo, ray_local, tmp_path):
    """4 workers and the trial's driver need 4.01 CPUs; the local cluster has 4. Without the
    check, Ray Train waits for the workers and times out again and again (the demo's continuation
    sweep did, on 2 cores)."""
    from vits_ray.train import TrainSetupError

    job = sweep_job(tmp_path, str(prepared_demo), str(tmp_path / "sweeps"), "wide",
                    '[parameters."optim.lr_gen"]\nvalues = [1e-4]\n', trials=1, workers=4)
    with pytest.raises(TrainSetupError, match=r"a trial needs 4\.01 CPUs \(4 worker\(s\) x 1 and 0\.01 for its "
                                              r"driver\) and this local Ray cluster has 4"):
        run_sweep(job)
    assert not (tmp_path / "sweeps" / "wide" / TRIALS_FILE).exists()
