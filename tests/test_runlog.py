"""The run's records: append-only segments written in the background, read back with their markers.

Against a real local store (and the moto S3 server once); faults are injected by a store wrapper
whose writes really fail, not by mocking a client.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vits_ray.runlog import RECORDS_DIR, RecordError, RunLogger, read_records, segment_names
from vits_ray.storage import StorageError, open_store

QUIET = 3600.0  # a flush_seconds that never fires during a test: only flush() writes


class FaultyStore:
    """A real store whose writes fail (or stall) as told: an outage, or a PUT that landed but whose
    answer was lost. Everything else goes to the wrapped store."""

    def __init__(self, inner, fail_writes: int = 0, landed_but_failed: int = 0, delay: float = 0.0,
                 error: type[BaseException] = StorageError):
        self.inner, self.fail_writes, self.landed_but_failed = inner, fail_writes, landed_but_failed
        self.delay, self.error = delay, error
        self.write_calls = 0
        self.uploads: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.write_calls += 1
        time.sleep(self.delay)
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise self.error(f"{self.inner.url(rel)}: write failed (injected outage)")
        self.inner.write_bytes(rel, data)
        if self.landed_but_failed > 0:
            self.landed_but_failed -= 1
            raise StorageError(f"{self.inner.url(rel)}: connection reset after the PUT (injected)")

    def upload_file(self, local_path, rel: str) -> None:
        self.uploads.append(rel)
        self.inner.upload_file(local_path, rel)


def step(n: int, **extra) -> dict:
    return {"kind": "step", "step": n, "epoch": 0, "loss_1": 30.0 - n, "step_time": 0.5, "loader_time": 0.01,
            "time": 1.7e9 + n, **extra}


def steps_of(store) -> list[int]:
    return [r["step"] for r in read_records(store)[0] if r["kind"] == "step"]


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "run"))


def test_segments_are_appended_and_never_rewritten(store):
    logger = RunLogger(store, None, flush_seconds=QUIET)
    for n in range(1, 4):
        logger.log(step(n))
    logger.flush()
    first = {name: (store.read_bytes(name), Path(store.url(name)).stat().st_ino) for name in segment_names(store)}
    assert len(first) == 1
    for n in range(4, 7):
        logger.log(step(n))
    logger.flush()
    logger.event({"step": 6, "kind": "spike", "series": "loss_1", "value": 42.0, "detail": {}})
    logger.flush()
    logger.flush()  # nothing new: no empty segment
    logger.close()
    names = segment_names(store)
    assert len(names) == 3 and names[0] in first
    for name, (data, inode) in first.items():  # same bytes, same file: never rewritten
        assert store.read_bytes(name) == data and Path(store.url(name)).stat().st_ino == inode
    metrics, events = read_records(store)
    assert [r["step"] for r in metrics if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert not [r for r in metrics if r["kind"] in ("resume", "rollback_to")]  # markers are applied, not returned
    assert events == [{"step": 6, "kind": "spike", "series": "loss_1", "value": 42.0, "detail": {}}]
    assert [r for r in metrics if r["kind"] == "event"][0]["event"] == "spike"  # the copy, as metrics.jsonl had


def test_resume_drops_the_abandoned_steps_exactly_once(store):
    # Attempt 1 checkpoints at 4, goes on to 7 (with an event at 6), writes it all and is killed.
    first = RunLogger(store, None, flush_seconds=QUIET)
    for n in range(1, 5):
        first.log(step(n))
    first.log({"kind": "checkpoint", "step": 4, "epoch": 0, "path": "checkpoint_00000004"})
    first.flush()
    for n in range(5, 8):
        first.log(step(n))
    first.event({"step": 6, "kind": "nonfinite", "detail": {}})
    first.flush()
    first._writer.stop()  # killed: no close()
    written_by_first = segment_names(store)
    # Attempt 2 resumes from the checkpoint at 4 and recomputes 5..9.
    second = RunLogger(store, 4, flush_seconds=QUIET)
    for n in range(5, 10):
        second.log(step(n, attempt=2))
    second.close()
    metrics, events = read_records(store)
    steps = [r for r in metrics if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 10))
    assert all(r.get("attempt") == 2 for r in steps if r["step"] > 4)
    assert [r["step"] for r in metrics if r["kind"] == "checkpoint"] == [4]
    assert events == []  # the event at 6 belonged to the dropped timeline; the relaunch re-observes it
    # the relaunch's segments come after every segment the dead attempt wrote, under names of its own
    names = segment_names(store)
    assert names[:len(written_by_first)] == written_by_first and len(names) > len(written_by_first)
    assert {n.split("-")[1] for n in names[len(written_by_first):]}.isdisjoint(
        {n.split("-")[1] for n in written_by_first})


def test_fresh_start_after_a_crash_before_any_checkpoint_supersedes_everything(store):
    first = RunLogger(store, None, flush_seconds=QUIET)
    for n in range(1, 4):
        first.log(step(n))
    first.event({"step": 2, "kind": "spike", "detail": {}})
    first.flush()
    first._writer.stop()
    second = RunLogger(store, None, flush_seconds=QUIET)
    for n in range(1, 3):
        second.log(step(n))
    second.close()
    metrics, events = read_records(store)
    assert [r["step"] for r in metrics] == [1, 2] and events == []


def test_rollback_marker_tags_the_abandoned_timeline(store):
    logger = RunLogger(store, None, flush_seconds=QUIET)
    for n in range(1, 6):
        logger.log(step(n))
    logger.log({"kind": "val", "step": 5, "epoch": 0, "val_loss_mel": 17.0})
    logger.event({"step": 5, "kind": "rollback", "detail": {"restored_step": 3}})
    logger.flush()
    logger.mark_rolled_back(3)
    for n in range(4, 7):
        logger.log(step(n))
    logger.close()
    metrics, events = read_records(store)
    tagged = [(r["kind"], r["step"]) for r in metrics if r.get("rolled_back")]
    assert tagged == [("step", 4), ("step", 5), ("val", 5)]
    assert [r["step"] for r in metrics if r["kind"] == "step"] == [1, 2, 3, 4, 5, 4, 5, 6]
    assert [e["kind"] for e in events] == ["rollback"] and "rolled_back" not in events[0]
    # A relaunch from a checkpoint at 5 (after the rollback) keeps the tagged timeline and drops 6.
    RunLogger(store, 5, flush_seconds=QUIET).close()
    assert steps_of(store) == [1, 2, 3, 4, 5, 4, 5]


def test_flush_blocks_until_written_and_memory_keeps_only_the_unwritten(store):
    slow = FaultyStore(store, delay=0.3)
    logger = RunLogger(slow, None, flush_seconds=QUIET)
    for n in range(1, 6):
        logger.log(step(n))
    assert logger.unwritten_records == 6  # the resume marker and five steps
    started = time.monotonic()
    logger.flush()
    assert time.monotonic() - started >= 0.3  # it waited for the (slow) write
    assert logger.unwritten_records == 0 and steps_of(store) == [1, 2, 3, 4, 5]
    logger.close()


def test_background_thread_writes_without_a_flush(store):
    logger = RunLogger(store, None, flush_seconds=0.05)
    logger.log(step(1))
    wait_until(lambda: logger.unwritten_records == 0)
    assert steps_of(store) == [1]
    logger.log(step(2))
    wait_until(lambda: logger.unwritten_records == 0)
    assert steps_of(store) == [1, 2] and len(segment_names(store)) == 2
    logger.close()


def test_failed_background_writes_lose_nothing_and_duplicate_nothing(store):
    faulty = FaultyStore(store, fail_writes=2)
    logger = RunLogger(faulty, None, flush_seconds=0.05)
    for n in range(1, 4):
        logger.log(step(n))
    wait_until(lambda: faulty.write_calls >= 3 and logger.unwritten_records == 0)  # two failures, then written
    for n in range(4, 7):
        logger.log(step(n))
    logger.close()
    assert steps_of(store) == [1, 2, 3, 4, 5, 6]


def test_a_failed_flush_raises_keeps_the_records_and_the_next_flush_writes_them(store):
    faulty = FaultyStore(store, fail_writes=1)
    logger = RunLogger(faulty, None, flush_seconds=QUIET)
    for n in range(1, 4):
        logger.log(step(n))
    with pytest.raises(StorageError, match="run records not written .*injected outage"):
        logger.flush()
    assert logger.unwritten_records == 4 and segment_names(store) == []
    logger.log(step(4))
    logger.flush()
    logger.close()
    assert steps_of(store) == [1, 2, 3, 4]


def test_a_write_that_landed_but_reported_failure_is_not_duplicated(store):
    # The retry goes to the same name with the same bytes: the landed copy is overwritten by itself.
    faulty = FaultyStore(store, landed_but_failed=1)
    logger = RunLogger(faulty, None, flush_seconds=QUIET)
    for n in range(1, 4):
        logger.log(step(n))
    with pytest.raises(StorageError):
        logger.flush()
    logger.log(step(4))
    logger.close()
    assert steps_of(store) == [1, 2, 3, 4] and len(segment_names(store)) == 2


def test_a_permanent_writer_error_is_raised_by_the_next_flush_and_close(store):
    broken = FaultyStore(store, fail_writes=1, error=TypeError)
    logger = RunLogger(broken, None, flush_seconds=QUIET)
    logger.log(step(1))
    with pytest.raises(RuntimeError, match="record writer stopped.*TypeError"):
        logger.flush()
    with pytest.raises(RuntimeError, match="record writer stopped"):
        logger.close()
    assert not logger._writer._thread.is_alive()


def test_damaged_segment_is_a_clear_error_naming_segment_and_line(store):
    logger = RunLogger(store, None, flush_seconds=QUIET)
    logger.log(step(1))
    logger.close()
    (name,) = segment_names(store)
    store.write_bytes(name, store.read_bytes(name) + b'{"kind": "step", "st\n')
    with pytest.raises(RecordError, match=f"{name} line 3: not valid JSON"):
        read_records(store)


def test_runs_written_before_segments_are_continued(store):
    # An old run (metrics.jsonl rewritten whole) resumed by the new logger: its file is the first segment.
    store.write_bytes("metrics.jsonl", "".join(json.dumps(step(n)) + "\n" for n in range(1, 6)).encode())
    logger = RunLogger(store, 3, flush_seconds=QUIET)
    logger.log(step(4))
    logger.close()
    assert steps_of(store) == [1, 2, 3, 4]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_files_are_uploaded_once_each_without_clock_scalars(store, tmp_path):
    counting = FaultyStore(store)
    logger = RunLogger(counting, None, flush_seconds=QUIET)
    local_dir = logger._tb.dir
    logger.log(step(1, created_at=1.7e9, timestamp=1.7e9, finite=True, loss_kl=float("nan")))
    logger.flush()
    logger.log(step(2))
    logger.flush()
    logger.flush()  # nothing new since: no new file
    logger.log(step(3))
    logger.close()
    assert len(counting.uploads) == 3 and len(set(counting.uploads)) == 3  # each file once
    assert all(key.startswith("tensorboard/events.out.tfevents.") for key in counting.uploads)
    assert not local_dir.exists()
    scalars = _scalars(Path(store.url("tensorboard")))
    assert set(scalars) == {"step/loss_1", "step/step_time", "step/loader_time"}
    assert [s for s, _ in scalars["step/loss_1"]] == [1, 2, 3]


def test_tensorboard_after_a_resume_replaces_the_dead_attempts_steps(store):
    first = RunLogger(store, None, flush_seconds=QUIET)
    for n in range(1, 8):
        first.log(step(n))
    first.close()
    time.sleep(1.1)  # event files are ordered by the second they were opened in
    second = RunLogger(store, 4, flush_seconds=QUIET)
    for n in range(5, 10):
        second.log({**step(n), "loss_1": 100.0 + n})
    second.close()
    curve = _scalars(Path(store.url("tensorboard")))["step/loss_1"]
    assert [s for s, _ in curve] == list(range(1, 10))
    assert [v for s, v in curve if s > 4] == [100.0 + n for n in range(5, 10)]


def test_on_s3_a_resumed_run_reads_back_once(s3_uri):
    store = open_store(s3_uri).child("run")
    first = RunLogger(store, None, flush_seconds=QUIET)
    for n in range(1, 5):
        first.log(step(n))
    first.flush()
    for n in range(5, 7):
        first.log(step(n))
    first.flush()
    first._writer.stop()
    second = RunLogger(store, 4, flush_seconds=QUIET)
    for n in range(5, 8):
        second.log(step(n))
    second.close()
    assert steps_of(store) == [1, 2, 3, 4, 5, 6, 7]
    assert len(segment_names(store)) == 3 and all(n.startswith(RECORDS_DIR + "/") for n in segment_names(store))
    assert [k for k in store.list("tensorboard") if "tfevents" in k]
    from vits_ray.report import load_run

    run = load_run(f"{s3_uri}/run")
    assert [r["step"] for r in run.steps] == [1, 2, 3, 4, 5, 6, 7] and run.events == []
