"""`ray job submit` on a real multi-node Ray cluster: the stages run as jobs, as the README shows.

The cluster is cluster/local.py's: a head and two worker nodes on 127.0.0.1, token auth with a token
of its own, every port a free one, so it runs beside the session's own Ray (if that is up) without
touching it, and it is stopped even when the test fails. Jobs go through the real `ray job submit`
CLI with the repo as their working dir (what the README and the RayJobs under k8s/ do; the job's
driver then imports the uploaded copy of vits_ray, not the installed one); the test follows them and
reads their logs with the Job SDK, and asks Ray's State API where the training workers ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
RUN_LOCAL = [sys.executable, str(ROOT / "cluster" / "local.py")]


@dataclass
class Cluster:
    info: dict  # cluster.json
    env: dict  # what a client of this cluster needs: its token file, token auth on

    @property
    def url(self) -> str:
        return self.info["dashboard_url"]

    @property
    def headers(self) -> dict:
        # Explicit, not from the process's environment: this process may hold the session's own
        # Ray, whose token is another one.
        token = Path(self.info["token_path"]).read_text().strip()
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers=self.headers)

    def submit(self, submission_id: str, *entrypoint: str) -> None:
        """`ray job submit --no-wait`, as an operator types it (the CLI finds the token itself)."""
        done = subprocess.run([RAY, "job", "submit", "--address", self.url, "--working-dir", str(ROOT),
                               "--submission-id", submission_id, "--no-wait", "--", *entrypoint],
                              env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def wait(self, submission_id: str, timeout_s: float):
        from ray.job_submission import JobStatus

        client = self.client()
        deadline = time.monotonic() + timeout_s
        while (status := client.get_job_status(submission_id)) not in (
                JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                raise AssertionError(f"job {submission_id} still {status} after {timeout_s:.0f}s:\n"
                                     + client.get_job_logs(submission_id)[-3000:])
            time.sleep(1)
        return status


@pytest.fixture
def cluster(tmp_path):
    """A head with no CPUs (as in k8s/ and cluster/aws.yaml: it hosts drivers, never training) and
    two nodes of one CPU each, so two one-CPU Train workers can only be placed one per node."""
    tmp = tmp_path / "tmp"  # this test's CLIs; the nodes have their own under the cluster's temp dir
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_enable_metrics_collection="0", TMPDIR=str(tmp))
    state = tmp_path / "cluster"
    try:
        started = subprocess.run([*RUN_LOCAL, "start", "--dir", str(state), "--workers", "2", "--head-cpus", "0"],
                                 env=env, capture_output=True, text=True, timeout=120)
        log = state / "ray-start.log"
        assert started.returncode == 0, started.stderr + (log.read_text()[-3000:] if log.exists() else "")
        info = json.loads((state / "cluster.json").read_text())
        yield Cluster(info, {**env, "RAY_AUTH_TOKEN_PATH": info["token_path"]})
    finally:
        subprocess.run([*RUN_LOCAL, "stop", "--dir", str(state)], env=env, capture_output=True, timeout=60)
    # Nothing left behind: no cluster, and the temp dir (logs, the nodes' TMPDIR, the uploaded
    # working dir) gone with it.
    assert not (state / "cluster.json").exists() and not Path(info["temp_dir"]).exists()


def _placement(cluster: Cluster, job_id: str) -> tuple[list[str], dict[str, str]]:
    """The node of each RayTrainWorker actor of Ray job `job_id` (dead ones too: the GCS keeps
    them), and node id -> its `node_w<i>` resource (or "head")."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    state = StateApiClient(address=cluster.url, headers=cluster.headers)
    workers = state.list(StateResource.ACTORS, raise_on_missing_output=False, options=ListApiOptions(
        filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)], detail=True))
    nodes = state.list(StateResource.NODES, raise_on_missing_output=False, options=ListApiOptions(detail=True))
    names = {}
    for node in nodes:
        tags = [r for r in node.resources_total if r.startswith("node_w")]
        names[node.node_id] = tags[0] if tags else "head"
    return [w.node_id for w in workers], names


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stages_run_as_ray_jobs_with_workers_on_two_nodes(cluster, tmp_path):
    from click.testing import CliRunner
    from ray.job_submission import JobStatus

    from vits_ray.cli import main
    from vits_ray.demo.corpus import write_demo_corpus

    corpus = write_demo_corpus(tmp_path / "corpus", n=16, seed=0)
    shards, runs, report = tmp_path / "shards", tmp_path / "runs", tmp_path / "report"
    client = cluster.client()

    # A mistyped key: the job fails at once, with the message the CLI gives (it runs while
    # `prepare` does; the cluster takes jobs side by side).
    bad_args = ["--config", "tiny", "--data", str(shards), "--storage", str(runs), "--name", "bad",
                "--set", "train.save_stpe=2"]
    cluster.submit("bad-args", "python", "jobs/train.py", *bad_args)
    cluster.submit("prepare", "python", "jobs/prepare.py", "--input", str(corpus), "--format", "ljspeech",
                   "--output", str(shards), "--config", "tiny", "--quiet")

    assert cluster.wait("bad-args", 90) == JobStatus.FAILED
    cli = CliRunner().invoke(main, ["train", *bad_args])
    message = cli.output.strip().splitlines()[-1]
    assert cli.exit_code == 2 and message.startswith("Error: bad configuration: train.save_stpe: unknown key")
    assert message in client.get_job_logs("bad-args")
    assert "exit code 2" in client.get_job_info("bad-args").message
    assert not (runs / "bad").exists()

    assert cluster.wait("prepare", 120) == JobStatus.SUCCEEDED, client.get_job_logs("prepare")
    assert json.loads((shards / "manifest.json").read_text())["num_utterances"] == 16

    cluster.submit("train", "python", "jobs/train.py", "--config", "tiny", "--data", str(shards),
                   "--storage", str(runs), "--name", "two-nodes", "--workers", "2", "--max-steps", "2",
                   "--set", "train.save_step=2")
    status = cluster.wait("train", 180)
    logs = client.get_job_logs("train")
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert "starting on 2 worker(s)" in logs and "(step 2)" in logs
    run = runs / "two-nodes"
    for name in ("state.pt", "digest.json", "config.toml", "vocab.json"):
        assert (run / "checkpoint_00000002" / name).is_file(), name
    assert (run / "export" / "model.pth").stat().st_size > 0 and (run / "export" / "config.json").is_file()
    assert list((run / "records").glob("*.jsonl"))

    # Where the two workers ran: one on each worker node (the head has no CPU to offer).
    on, names = _placement(cluster, client.get_job_info("train").job_id)
    assert sorted(names.values()) == ["head", "node_w1", "node_w2"]
    assert sorted(names[node] for node in on) == ["node_w1", "node_w2"], (on, names)

    cluster.submit("report", "python", "jobs/report.py", str(run), "--out", str(report))
    assert cluster.wait("report", 120) == JobStatus.SUCCEEDED, client.get_job_logs("report")
    text = (report / "report.md").read_text()
    assert "Steps 1 to 2" in text and "Records: 2 step" in text
    assert (report / "report.html").is_file()
