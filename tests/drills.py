"""Fault drills: run a real training job and break something under it for real (kill a worker
process, stop a node, stop the S3 server, damage a checkpoint), then read what the run left.

Shared by tests/test_faults.py (which asserts) and bench/faults.py (which measures).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vits_ray.config import load_config
from vits_ray.train import TrainJob, run_training

# A tiny run: 14 steps, a checkpoint every 4. At most one save interval may be recomputed.
STEPS = 14
SAVE_STEP = 4
TRAINING_WORKER = "RayTrainWorker"


def drill_job(shards, storage, name: str, *, overrides=(), **kwargs) -> TrainJob:
    cfg = load_config("tiny", ["train.batch_size=2", f"train.save_step={SAVE_STEP}", "train.val_step=1000",
                               "train.max_failures=2", *overrides])
    kwargs.setdefault("max_steps", STEPS)
    return TrainJob(config=cfg.to_dict(), data_uri=str(shards), storage_uri=str(storage), name=name, **kwargs)


class Background:
    """`run_training` in a thread, so that the caller can break things while it runs."""

    def __init__(self, job: TrainJob, local: bool = False):
        self.outcome = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(job, local), daemon=True)
        self._thread.start()

    def _run(self, job: TrainJob, local: bool) -> None:
        try:
            self.outcome = run_training(job, local=local)
        except BaseException as err:  # handed to the caller by `result()`
            self.error = err
        finally:
            self.finished_at = time.monotonic()

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 600):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the run did not finish within {timeout} s"
        if self.error is not None:
            raise self.error
        return self.outcome


def wait_for(condition: Callable[[], Any], timeout: float, what: str, run: Background | None = None):
    """Poll `condition` until it is true (returns its value); fails after `timeout` s or if the run ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None and not run.running():
            run.result(0)  # raises the run's error, if any
            raise AssertionError(f"the run ended before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def has_checkpoint(run_store, step: int) -> bool:
    return run_store.exists(f"checkpoint_{step:08d}/digest.json")


def training_workers() -> list:
    """Ray Train worker processes on this machine (their command line is `ray::RayTrainWorker...`)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::" + TRAINING_WORKER):
            found.append(proc)
    return found


def kill_training_worker() -> int:
    """SIGKILL one training worker process (no cleanup, as the OOM killer or a preemption does)."""
    workers = wait_for(training_workers, 30, "a training worker process")
    os.kill(workers[0].pid, signal.SIGKILL)
    return workers[0].pid


def node_of(proc):
    """The raylet (node manager) a worker process belongs to, and every process under it."""
    node = proc
    while node is not None and node.name() != "raylet":
        node = node.parent()
    assert node is not None, f"process {proc.pid} is not under a raylet"
    return node


def stop_node(raylet) -> None:
    """Stop a node the hard way: its raylet and everything it started, at once."""
    _cluster_script().kill([raylet] + raylet.children(recursive=True), wait_s=10)


@dataclass
class History:
    """What a run's records say about its steps."""

    steps: list[int]  # steps of the final timeline, in record order
    duplicated: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    recomputed: int = 0  # step records dropped by restarts (steps that ran twice)
    events: list[dict] = field(default_factory=list)


def history(run_store, last_step: int) -> History:
    import json

    from vits_ray.runlog import read_records, segment_names

    metrics, events = read_records(run_store)
    steps = [r["step"] for r in metrics if r["kind"] == "step" and not r.get("rolled_back")]
    seen: set[int] = set()
    duplicated = sorted({s for s in steps if s in seen or seen.add(s)})
    missing = sorted(set(range(1, last_step + 1)) - set(steps))
    written = sum(1 for name in segment_names(run_store)
                  for line in run_store.read_bytes(name).decode().splitlines() if '"kind": "step"' in line
                  and json.loads(line)["kind"] == "step")
    all_steps = [r for r in metrics if r["kind"] == "step"]
    return History(steps, duplicated, missing, written - len(all_steps), events)


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the newest checkpoint in a local run folder."""
    from vits_ray import checkpoint as ckpt_io

    latest = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "digest.json").exists())[-1]
    return ckpt_io.read(latest)["model"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ (bit for bit)."""
    return [name for name, tensor in a.items() if not torch.equal(tensor, b[name])]


OUTAGE_SECONDS = 30.0


def sleep_outage(run: Background, seconds: float = OUTAGE_SECONDS) -> None:
    """Keep the storage down for `seconds` while the run goes on (it must not end meanwhile)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert run.running(), "the run ended during the outage"
        time.sleep(0.5)


CLUSTER_SCRIPT = Path(__file__).resolve().parent.parent / "cluster" / "local.py"


def _cluster_script():
    """cluster/local.py as a module (it is a script, not part of the package)."""
    import sys

    sys.path.insert(0, str(CLUSTER_SCRIPT.parent))
    try:
        import local
    finally:
        sys.path.remove(str(CLUSTER_SCRIPT.parent))
    return local


@contextmanager
def local_cluster(state: Path, workers: int):
    """A head (no CPUs: no training worker may land on it) and `workers` one-CPU worker nodes,
    via cluster/local.py; yields (cluster info, environment for a driver, a function listing the
    cluster's processes). Stopped (and only it) on exit."""
    import json
    import subprocess
    import sys

    local = _cluster_script()
    run = [sys.executable, str(CLUSTER_SCRIPT)]
    try:
        subprocess.run([*run, "start", "--workers", str(workers), "--head-cpus", "0", "--dir", str(state)],
                       check=True, timeout=120, capture_output=True)
        info = json.loads((state / "cluster.json").read_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(RAY_ADDRESS=info["address"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=info["token_path"],
                   RAY_enable_metrics_collection="0")
        yield info, env, lambda: local._cluster_procs(info)
    finally:
        subprocess.run([*run, "stop", "--dir", str(state)], timeout=60)
