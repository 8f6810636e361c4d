"""Fault drills, measured: does a run survive each fault, what does it cost, is any record lost?

    .venv/bin/python bench/faults.py [--only kill,node,outage,corrupt,blowup,malicious]

Runs the drills of tests/test_faults.py (tests/drills.py: a tiny 14-step CPU run with a checkpoint
every 4 steps, real Ray, a real S3-protocol server on 127.0.0.1) and prints one row per fault:

- survived: the run reached its last step (or, for a malicious checkpoint, was refused without
  running the payload);
- steps recomputed: steps that ran more than once, counted from the workers' own progress lines
  in Ray's log files (a rollback recomputes by design; a restart should recompute at most one
  save interval);
- records lost / duplicated: steps missing from, or twice in, the run's final history (`read_records`);
- time to recover: from the fault to the run going on (the workers' "resuming" line after a kill
  or a lost node; the first checkpoint written after the storage came back from a 30 s outage);
- extra wall time: the run's wall time minus the uninterrupted twin's (local mode, same config).

It prints figures and asserts nothing; times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # drills.py, s3_fixtures.py

from drills import (OUTAGE_SECONDS, SAVE_STEP, STEPS, Background, drill_job, has_checkpoint,  # noqa: E402
                    history, kill_training_worker, local_cluster, node_of, stop_node, training_workers,
                    wait_for)

STEP_LINE = re.compile(r"^step +(\d+) epoch", re.M)


@dataclass
class Row:
    fault: str
    survived: str
    recomputed: int | str = "-"
    lost: int | str = "-"
    duplicated: int | str = "-"
    recover_s: float | str = "-"
    extra_s: float | str = "-"


class LogTail:
    """What Ray's worker logs (`worker-*.out`) gained since this was made."""

    def __init__(self, logs_dir: Path):
        self.logs_dir = logs_dir
        self.sizes = {p: p.stat().st_size for p in logs_dir.glob("worker-*.out")}

    def text(self) -> str:
        out = []
        for path in sorted(self.logs_dir.glob("worker-*.out")):
            with open(path, "rb") as f:
                f.seek(self.sizes.get(path, 0))
                out.append(f.read().decode("utf-8", "replace"))
        return "".join(out)

    def last_step(self) -> int:
        return max(map(int, STEP_LINE.findall(self.text())), default=0)

    def recomputed(self) -> int:
        counts = collections.Counter(int(s) for s in STEP_LINE.findall(self.text()))
        return sum(c - 1 for c in counts.values())


def _ray_logs() -> Path:
    import ray

    return Path(ray._private.worker.global_worker.node.get_logs_dir_path())


def _records(run_store) -> tuple[int, int]:
    h = history(run_store, STEPS)
    return len(h.missing), len(h.duplicated)


def drill_kill(shards, root: Path, twin_s: float) -> Row:
    from vits_ray.storage import open_store

    run_store = open_store(str(root)).child("kill")
    tail = LogTail(_ray_logs())
    run = Background(drill_job(shards, root, "kill"))
    wait_for(lambda: has_checkpoint(run_store, 2 * SAVE_STEP), 300, "the second checkpoint", run)
    # mid-interval, as a real fault lands: a step or two after the checkpoint
    wait_for(lambda: tail.last_step() > 2 * SAVE_STEP + 1, 300, "two steps past the checkpoint", run)
    killed = time.monotonic()
    kill_training_worker()
    wait_for(lambda: "resuming at step" in tail.text(), 300, "the restart", run)
    recovered = time.monotonic() - killed
    run.result()
    return Row("worker killed (SIGKILL)", "yes", tail.recomputed(), *_records(run_store), recovered,
               run.finished_at - run.started - twin_s)


def drill_node(shards, root: Path, twin_s: float) -> Row:
    import subprocess

    from vits_ray.storage import open_store

    with local_cluster(root / "cluster", workers=2) as (info, env, cluster_procs):
        tail = LogTail(Path(info["temp_dir"]) / "session_latest" / "logs")
        cmd = [sys.executable, "-m", "vits_ray", "train", "--config", "tiny", "--data", str(shards),
               "--storage", str(root / "runs"), "--name", "node", "--max-steps", str(STEPS),
               "--set", "train.batch_size=2", "--set", f"train.save_step={SAVE_STEP}",
               "--set", "train.val_step=1000", "--set", "train.max_failures=2"]
        started = time.monotonic()
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_store = open_store(str(root / "runs")).child("node")
        wait_for(lambda: has_checkpoint(run_store, SAVE_STEP), 300, "the first checkpoint")
        wait_for(lambda: tail.last_step() > SAVE_STEP + 1, 300, "two steps past the checkpoint")
        ours = {p.pid for p in cluster_procs()}
        stop_node(node_of(next(p for p in training_workers() if p.pid in ours)))
        stopped = time.monotonic()
        wait_for(lambda: "resuming at step" in tail.text(), 300, "the restart on the other node")
        recovered = time.monotonic() - stopped
        code = driver.wait(timeout=600)
        wall = time.monotonic() - started
    return Row("node lost (raylet and its workers killed)", "yes" if code == 0 else f"no (exit {code})",
               tail.recomputed(), *_records(run_store), recovered, wall - twin_s)


def drill_outage(shards, root: Path, server, twin_s: float) -> Row:
    from vits_ray.storage import open_store

    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    import boto3

    boto3.client("s3").create_bucket(Bucket=bucket)
    storage = open_store(f"s3://{bucket}/bench")
    storage.upload_dir(shards, "data")
    run_store = storage.child("runs").child("outage")
    tail = LogTail(_ray_logs())
    run = Background(drill_job(storage.url("data"), storage.url("runs"), "outage"))
    wait_for(lambda: has_checkpoint(run_store, SAVE_STEP), 300, "the first checkpoint", run)
    server.stop()
    time.sleep(OUTAGE_SECONDS)
    server.start()
    back = time.monotonic()
    wait_for(lambda: has_checkpoint(run_store, 2 * SAVE_STEP), 300, "the checkpoint after the outage", run)
    recovered = time.monotonic() - back
    run.result()
    return Row(f"storage outage ({OUTAGE_SECONDS:.0f} s, S3 server stopped)", "yes", tail.recomputed(),
               *_records(run_store), recovered, run.finished_at - run.started - twin_s)


def drill_corrupt(shards, root: Path, twin_s: float) -> Row:
    from vits_ray.storage import open_store
    from vits_ray.train import run_training

    run_training(drill_job(shards, root, "corrupt", max_steps=2 * SAVE_STEP), local=True)
    state = root / "corrupt" / f"checkpoint_{2 * SAVE_STEP:08d}" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    started = time.monotonic()
    run_training(drill_job(shards, root, "corrupt"))
    run_store = open_store(str(root)).child("corrupt")
    skipped = [e for e in history(run_store, STEPS).events if e["kind"] == "checkpoint_skipped"]
    resumed = skipped[0]["detail"]["resumed_step"] if skipped else "?"
    return Row(f"latest checkpoint truncated (resumed from step {resumed})", "yes",
               2 * SAVE_STEP - resumed if skipped else "?", *_records(run_store), "-",
               time.monotonic() - started - twin_s * (STEPS - resumed) / STEPS if skipped else "-")


def drill_blowup(shards, root: Path, twin_s: float) -> Row:
    from vits_ray.storage import open_store
    from vits_ray.train import Drill, run_training

    started = time.monotonic()
    run_training(drill_job(shards, root, "blowup", drills=(Drill("blowup", 6), Drill("blowup", 9)),
                           overrides=["train.val_step=6"]), local=True)
    wall = time.monotonic() - started
    run_store = open_store(str(root)).child("blowup")
    events = history(run_store, STEPS).events
    where = [e["detail"]["where"] for e in events if e["kind"] == "blowup"]
    rollbacks = [e for e in events if e["kind"] == "lr_backoff"]
    recomputed = sum(e["step"] - e["detail"]["restored_step"] for e in rollbacks)
    return Row(f"blow-ups raising in {' and '.join(where)} (rolled back)", "yes" if len(rollbacks) == 2 else "no",
               recomputed, *_records(run_store), "-", wall - twin_s)


def drill_malicious(shards, root: Path) -> Row:
    import json

    import torch

    from vits_ray import checkpoint as ckpt_io
    from vits_ray.recovery import RunAbortedError
    from vits_ray.train import run_training

    run_training(drill_job(shards, root, "evil", max_steps=SAVE_STEP), local=True)
    folder = root / "evil" / f"checkpoint_{SAVE_STEP:08d}"
    marker = root / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(folder / "state.pt", weights_only=True)
    state["progress"]["payload"] = RunsCode()
    torch.save(state, folder / "state.pt")
    digest = json.loads((folder / ckpt_io.DIGEST_FILE).read_text())
    digest["files"]["state.pt"] = ckpt_io._file_entry(folder / "state.pt")
    (folder / ckpt_io.DIGEST_FILE).write_text(json.dumps(digest))
    started = time.monotonic()
    try:
        run_training(drill_job(shards, root, "evil", max_steps=2 * SAVE_STEP))
        outcome = "no: it was loaded"
    except RunAbortedError:
        outcome = "refused at once" if not marker.exists() else "no: the payload ran"
    return Row("malicious state.pt (code in the pickle)", outcome, recover_s=time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="kill,node,outage,corrupt,blowup,malicious")
    args = parser.parse_args()
    only = set(args.only.split(","))

    import ray
    from s3_fixtures import MotoServer

    from vits_ray.config import load_config
    from vits_ray.data.ingest import prepare_corpus
    from vits_ray.demo.corpus import write_demo_corpus
    from vits_ray.train import run_training

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    root = Path(tempfile.mkdtemp(prefix="vits-ray-faults-"))
    server = MotoServer()
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=server.endpoint)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        os.environ.pop(name, None)
    corpus = write_demo_corpus(root / "corpus", n=24, seed=0)
    shards = root / "shards"
    prepare_corpus(corpus, "ljspeech", str(shards), load_config("tiny", ["data.rows_per_shard=8"]), progress=False)
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)

    started = time.monotonic()
    run_training(drill_job(shards, root, "twin"), local=True)
    twin_s = time.monotonic() - started
    rows = []
    drills = {"kill": lambda: drill_kill(shards, root, twin_s), "node": lambda: drill_node(shards, root, twin_s),
              "outage": lambda: drill_outage(shards, root, server, twin_s),
              "corrupt": lambda: drill_corrupt(shards, root, twin_s),
              "blowup": lambda: drill_blowup(shards, root, twin_s), "malicious": lambda: drill_malicious(shards, root)}
    for name, drill in drills.items():
        if name in only:
            try:
                rows.append(drill())
            except Exception as err:  # a drill that fails is a finding, not the end of the bench
                rows.append(Row(name, f"no: {type(err).__name__}: {str(err)[:120]}"))
    ray.shutdown()

    print(f"\nTwin (uninterrupted, local mode): {STEPS} steps in {twin_s:.1f} s; checkpoint every {SAVE_STEP} steps.\n")
    print("| fault | survived | steps recomputed | records lost | records duplicated | time to recover (s) "
          "| extra wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r.fault, r.survived, r.recomputed, r.lost, r.duplicated, r.recover_s, r.extra_s]
        print("| " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
