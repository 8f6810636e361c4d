"""The fault-injection suite: real training runs (tiny model, CPU, real Ray, a real S3-protocol
server on 127.0.0.1) with a fault injected for real, checked against an uninterrupted twin where
that is meaningful. bench/faults.py runs the same drills (tests/drills.py) and prints figures.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import uuid
from pathlib import Path

import pytest

from drills import (SAVE_STEP, STEPS, Background, drill_job, has_checkpoint, history, kill_training_worker,
                    model_weights, same_weights, wait_for)
from vits_ray.run_checkpoints import RunCheckpoints
from vits_ray.storage import open_store
from vits_ray.train import Drill, run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def twin(prepared_demo, tmp_path_factory) -> dict:
    """The uninterrupted run every drill is compared with (local mode: the same weights as on Ray)."""
    root = tmp_path_factory.mktemp("twin")
    run_training(drill_job(prepared_demo, root, "twin"), local=True)
    return model_weights(root / "twin")


def test_killed_worker_restarts_from_its_checkpoint_and_matches_the_twin(prepared_demo, ray_local, tmp_path, twin,
                                                                         capfd):
    run_store = open_store(str(tmp_path)).child("killed")
    run = Background(drill_job(prepared_demo, tmp_path, "killed"))
    wait_for(lambda: has_checkpoint(run_store, 2 * SAVE_STEP), 120, "the second checkpoint", run)
    kill_training_worker()
    outcome = run.result()

    assert outcome.step == STEPS
    assert not same_weights(model_weights(tmp_path / "killed"), twin), "final weights differ from the twin's"
    steps = history(run_store, STEPS)
    assert not steps.duplicated and not steps.missing, (steps.duplicated, steps.missing)
    assert steps.recomputed <= SAVE_STEP  # what ran after the last checkpoint runs twice, no more
    assert f"resuming at step {2 * SAVE_STEP}" in capfd.readouterr().out


def test_corrupt_latest_checkpoint_is_skipped_for_the_previous_one(prepared_demo, ray_local, tmp_path, twin, capfd):
    run_store = open_store(str(tmp_path)).child("corrupt")
    run_training(drill_job(prepared_demo, tmp_path, "corrupt", max_steps=2 * SAVE_STEP), local=True)
    state = tmp_path / "corrupt" / f"checkpoint_{2 * SAVE_STEP:08d}" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk

    outcome = run_training(drill_job(prepared_demo, tmp_path, "corrupt"))

    assert outcome.step == STEPS
    assert f"checkpoint_{2 * SAVE_STEP:08d}" in capfd.readouterr().out  # the run says what it skipped
    skipped = [e for e in history(run_store, STEPS).events if e["kind"] == "checkpoint_skipped"]
    assert len(skipped) == 1 and skipped[0]["detail"]["resumed_step"] == SAVE_STEP
    assert "truncated" in skipped[0]["detail"]["skipped"][0]
    assert not same_weights(model_weights(tmp_path / "corrupt"), twin)
    steps = history(run_store, STEPS)
    assert not steps.duplicated and not steps.missing


def test_blowups_in_validation_and_in_a_step_roll_back_instead_of_crashing(prepared_demo, tmp_path):
    # blowup@6: step 6's update explodes and validation at step 6 raises inside Coqui's forward;
    # blowup@9: step 10's forward raises. Each rolls back to the checkpoint before it.
    job = drill_job(prepared_demo, tmp_path, "blowup", drills=(Drill("blowup", 6), Drill("blowup", 9)),
                    overrides=["train.val_step=6"])
    outcome = run_training(job, local=True)

    assert outcome.step == STEPS
    events = history(open_store(str(tmp_path)).child("blowup"), STEPS).events
    blowups = [(e["step"], e["detail"]["where"]) for e in events if e["kind"] == "blowup"]
    assert blowups == [(6, "validation"), (10, "training step")], blowups
    restored = [e["detail"]["restored_step"] for e in events if e["kind"] == "lr_backoff"]
    assert restored == [4, 8]


def test_rollback_to_an_epochs_last_step_writes_that_epochs_record_once(prepared_demo, tmp_path):
    from vits_ray.runlog import read_records

    # 11 steps an epoch here: the checkpoint at 11 is epoch 0's last step, saved before its end
    job = drill_job(prepared_demo, tmp_path, "edge", drills=(Drill("blowup", 12),), overrides=["train.save_step=11"])
    run_training(job, local=True)
    metrics, events = read_records(open_store(str(tmp_path)).child("edge"))
    assert [e["detail"]["restored_step"] for e in events if e["kind"] == "lr_backoff"] == [11]
    epochs = [(r["epoch"], r["steps"]) for r in metrics if r["kind"] == "epoch" and not r.get("rolled_back")]
    assert [e for e, _ in epochs] == [0], epochs  # not a second, empty record of epoch 0


def test_an_error_that_is_not_a_blowup_still_fails_loudly(prepared_demo, tmp_path, monkeypatch):
    from vits_ray import trainer

    def broken_step(*args, **kwargs):
        raise KeyError("a bug in the loop")

    monkeypatch.setattr(trainer, "eval_step", broken_step)
    with pytest.raises(KeyError, match="a bug in the loop"):
        run_training(drill_job(prepared_demo, tmp_path, "bug", max_steps=2, overrides=["train.val_step=2"]),
                     local=True)


class _RunsCode:
    """Unpickling this runs a command: what a malicious state.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_retries(prepared_demo, ray_local, tmp_path):
    import torch

    from vits_ray import checkpoint as ckpt_io
    from vits_ray.recovery import RunAbortedError

    run_training(drill_job(prepared_demo, tmp_path, "evil", max_steps=SAVE_STEP), local=True)
    folder = tmp_path / "evil" / f"checkpoint_{SAVE_STEP:08d}"
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    state = torch.load(folder / "state.pt", weights_only=True)
    state["progress"]["payload"] = _RunsCode(marker)
    torch.save(state, folder / "state.pt")
    # Whoever can write the prefix can also rewrite the digest: it proves integrity, not trust.
    digest = json.loads((folder / ckpt_io.DIGEST_FILE).read_text())
    digest["files"]["state.pt"] = ckpt_io._file_entry(folder / "state.pt")
    (folder / ckpt_io.DIGEST_FILE).write_text(json.dumps(digest))

    with pytest.raises(RunAbortedError, match="UnsafeCheckpointError"):
        run_training(drill_job(prepared_demo, tmp_path, "evil", max_steps=2 * SAVE_STEP))
    assert not marker.exists(), "unpickling the checkpoint ran code"


def test_unpicklable_payload_really_runs_code(tmp_path):
    """The payload above is live: plain unpickling does run it (so the refusal is what stops it)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


def test_storage_outage_delays_the_run_and_loses_nothing(prepared_demo, ray_local, s3_uri, twin):
    from s3_fixtures import s3_outage

    from drills import OUTAGE_SECONDS, sleep_outage

    storage = open_store(s3_uri)
    storage.upload_dir(prepared_demo, "data")  # shards on S3 too, as in production
    run_store = storage.child("runs").child("outage")
    run = Background(drill_job(storage.url("data"), storage.url("runs"), "outage"))
    wait_for(lambda: has_checkpoint(run_store, SAVE_STEP), 120, "the first checkpoint", run)
    with s3_outage():  # spans the next checkpoint and the metrics flush before it
        sleep_outage(run)
    outcome = run.result()

    assert outcome.step == STEPS
    steps = history(run_store, STEPS)
    assert not steps.duplicated and not steps.missing, (steps.duplicated, steps.missing)
    assert steps.recomputed == 0  # ridden out by retries: no restart was needed
    saved = [name for name, complete in RunCheckpoints(run_store, keep_last=3).folders().items() if complete]
    assert saved[-1] == f"checkpoint_{STEPS:08d}"
    with tempfile.TemporaryDirectory() as tmp:
        run_store.download_dir(saved[-1], Path(tmp) / saved[-1])
        assert not same_weights(model_weights(Path(tmp)), twin)
    assert OUTAGE_SECONDS >= 30


def test_no_secret_in_anything_shipped_to_ray_stored_or_logged(prepared_demo, ray_local, s3_uri, capfd):
    import ray

    from vits_ray.train import build_trainer

    secret, token = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_SESSION_TOKEN"]
    assert len(secret) >= 20 and len(token) >= 20  # distinctive: a match can only be a leak
    job = drill_job(prepared_demo, s3_uri, "secrets", max_steps=SAVE_STEP)
    shipped = {"trainer": ray.cloudpickle.dumps(build_trainer(job)), "job": pickle.dumps(job.to_dict())}
    run_training(job)

    import boto3

    s3 = boto3.client("s3")
    bucket = s3_uri.split("/")[2]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]  # the whole bucket, Ray's files too
    stored = {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}
    assert any(key.endswith("state.pt") for key in stored) and any("records/" in key for key in stored)
    logs_dir = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    logged = {str(p): p.read_bytes() for p in logs_dir.rglob("*") if p.is_file()}
    out = capfd.readouterr()
    logged["driver output"] = (out.out + out.err).encode()
    for name, blob in {**shipped, **stored, **logged}.items():
        assert secret.encode() not in blob and token.encode() not in blob, f"a credential leaked into {name}"


@pytest.mark.timeout(420)
def test_lost_node_the_run_moves_to_the_remaining_one(prepared_demo, tmp_path, twin):
    import subprocess
    import sys

    from drills import local_cluster, node_of, stop_node, training_workers

    with local_cluster(tmp_path / "cluster", workers=2) as (info, env, cluster_procs):
        cmd = [sys.executable, "-m", "vits_ray", "train", "--config", "tiny", "--data", str(prepared_demo),
               "--storage", str(tmp_path / "runs"), "--name", "node", "--max-steps", str(STEPS),
               "--set", "train.batch_size=2", "--set", f"train.save_step={SAVE_STEP}",
               "--set", "train.val_step=1000", "--set", "train.max_failures=2"]
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        run_store = open_store(str(tmp_path / "runs")).child("node")
        try:
            wait_for(lambda: has_checkpoint(run_store, SAVE_STEP) or driver.poll() is not None, 180,
                     "the first checkpoint")
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            ours = {p.pid for p in cluster_procs()}
            worker = next(p for p in training_workers() if p.pid in ours)
            stop_node(node_of(worker))
            assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    output = (tmp_path / "driver.log").read_text()
    assert f"(step {STEPS})" in output
    steps = history(run_store, STEPS)
    assert not steps.duplicated and not steps.missing
    assert not same_weights(model_weights(tmp_path / "runs" / "node"), twin)
