"""Where a run's records go: append-only segments under STORAGE/NAME/records/, and TensorBoard.

Object stores cannot append, and rewriting one growing file costs time and memory that grow with
the run. So every record (metrics and stability events, in the order they happened) goes into
one stream of JSON lines, cut into segments that are each written once and never rewritten:

    records/00000001-1f2e3d4c.jsonl, records/00000002-1f2e3d4c.jsonl, records/00000003-9a8b7c6d.jsonl

The number orders the segments; it continues across relaunches (a logger lists the folder when it
starts). The suffix is the writing logger's own random id, so two loggers (two attempts) can never
write the same name, even if an attempt thought dead is still writing.

History is never edited either. Two kinds of marker line say how to read what came before:
- `{"kind": "resume", "step": S}` opens every attempt. The records read so far with step > S are
  dropped: the relaunch recomputes those steps from the checkpoint at S. A fresh start writes
  S = -1, so a crashed attempt that never checkpointed leaves nothing behind.
- `{"kind": "rollback_to", "step": S}`: a rollback abandoned the steps after S. Earlier step, epoch
  and val records past S are kept (they show the instability) and tagged `"rolled_back": true`.
`read_records` applies the markers; everything that reads a run's records goes through it.

Events are stored as `{"kind": "event", "event": <event kind>, ...}`, the form in which the old
metrics.jsonl held its copies, so the metrics `read_records` returns look like metrics.jsonl did.

A background thread writes the segments (one per `flush_seconds`); `flush()` waits until everything
logged before it is in storage. Memory holds only what is not written yet.
Only rank 0 logs; other ranks get `NullLogger` (same methods, no effect).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vits_ray.storage import StorageError

RECORDS_DIR = "records"
TENSORBOARD_DIR = "tensorboard"
LEGACY_METRICS_FILE = "metrics.jsonl"  # runs started before segments: read as the first segment
RESUME = "resume"
ROLLBACK_TO = "rollback_to"
ROLLED_BACK_KINDS = ("step", "epoch", "val")
_SEGMENT = re.compile(r"^(\d{8,})-([0-9a-f]+)\.jsonl$")


class RecordError(ValueError):
    """A stored segment cannot be read; the message names the segment and the line."""


# --- reading --------------------------------------------------------------------------------

def segment_names(store) -> list[str]:
    """The run's segments (keys relative to `store`), in the order they were written."""
    found = []
    for key in store.list(RECORDS_DIR):
        match = _SEGMENT.match(key[len(RECORDS_DIR) + 1:])
        if match:  # anything else in the folder was not written by a logger
            found.append((int(match.group(1)), key))
    return [key for _, key in sorted(found)]


def _parse(text: str, where: str) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            # Segments are written whole (an atomic rename, an S3 PUT): a bad line is damage, not a tear.
            raise RecordError(f"{where} line {lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{where} line {lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_records(store) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics, events) of the run at `store`, with the markers applied (see the module docstring).

    `metrics` holds every record in order, events included as `{"kind": "event", ...}` copies;
    `events` holds the events alone, each with its own kind. Both are empty for a run with no
    records. Raises `RecordError` for an unreadable segment, `StorageError` when storage fails.
    """
    sources = ([LEGACY_METRICS_FILE] if store.exists(LEGACY_METRICS_FILE) else []) + segment_names(store)
    kept: list[dict[str, Any]] = []
    for name in sources:
        for record in _parse(store.read_bytes(name).decode("utf-8"), store.url(name)):
            kind = record.get("kind")
            if kind == RESUME:
                kept = [r for r in kept if r.get("step", 0) <= record["step"]]
            elif kind == ROLLBACK_TO:
                for r in kept:
                    if r.get("kind") in ROLLED_BACK_KINDS and r.get("step", 0) > record["step"]:
                        r["rolled_back"] = True
            else:
                kept.append(record)
    events = [{k: (r["event"] if k == "kind" else v) for k, v in r.items() if k != "event"}
              for r in kept if r.get("kind") == "event"]
    return kept, events


# --- writing --------------------------------------------------------------------------------

@dataclass
class _Segment:
    name: str
    data: bytes
    records: int

    def write(self, store) -> None:
        store.write_bytes(self.name, self.data)


@dataclass
class _Upload:
    local_path: Path
    name: str
    records: int = 0

    def write(self, store) -> None:
        store.upload_file(self.local_path, self.name)
        self.local_path.unlink()  # uploaded once and never again: local disk stays small


class SegmentWriter:
    """Lines in, segments out, in order, on a background thread.

    A write that raises `StorageError` (the store has already retried it for minutes) stays queued
    and is tried again at the next tick under the same name with the same bytes, so a write that
    did land after all is overwritten by itself: nothing lost, nothing twice. Any other error is a
    bug; it stops the thread and the next `flush()` raises it.
    """

    def __init__(self, store, flush_seconds: float):
        self.store = store
        self.flush_seconds = flush_seconds
        self._writer_id = uuid.uuid4().hex[:8]
        existing = segment_names(store)
        # After the highest number any earlier attempt wrote, so this attempt's records come after.
        self._next_seq = int(existing[-1][len(RECORDS_DIR) + 1:].split("-")[0]) + 1 if existing else 1
        self._lines: list[str] = []
        self._jobs: deque[_Segment | _Upload] = deque()
        self._queued = self._done = self._attempt = 0
        self._failure: tuple[int, StorageError] | None = None  # (attempt, error) of the last failed attempt
        self._fatal: BaseException | None = None
        self._wake = self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="vits-ray-records", daemon=True)
        self._thread.start()

    @property
    def unwritten_records(self) -> int:
        with self._cond:
            return len(self._lines) + sum(job.records for job in self._jobs)

    def append(self, line: str) -> None:
        with self._cond:
            self._lines.append(line)

    def upload(self, local_path: Path, name: str) -> None:
        with self._cond:
            self._queue(_Upload(local_path, name))

    def flush(self) -> None:
        """Block until everything appended or queued so far is written; raise if that failed."""
        with self._cond:
            self._raise_fatal()
            self._seal()
            target, asked_at = self._queued, self._attempt
            self._wake = True
            self._cond.notify_all()
            while self._done < target:
                self._raise_fatal()
                if self._failure is not None and self._failure[0] > asked_at:
                    raise StorageError(f"run records not written (kept in memory, to retry): {self._failure[1]}")
                self._cond.wait()

    def stop(self) -> None:
        """End the thread without a last write (`flush()` first to keep everything)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            idle = self._fatal is None and not self._jobs
        if idle:
            self._thread.join()
        # Otherwise the thread may be inside a store's minutes-long retry: it is a daemon, leave it.

    def _queue(self, job) -> None:
        self._jobs.append(job)
        self._queued += 1

    def _seal(self) -> None:
        """The lines so far become the next segment (called with the lock held)."""
        if not self._lines:
            return
        name = f"{RECORDS_DIR}/{self._next_seq:08d}-{self._writer_id}.jsonl"
        self._queue(_Segment(name, "".join(self._lines).encode("utf-8"), len(self._lines)))
        self._next_seq += 1
        self._lines = []

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise RuntimeError(f"the run's record writer stopped: {self._fatal!r}") from self._fatal

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wake or self._stopping, timeout=self.flush_seconds)
                if self._stopping:
                    return
                self._wake = False
                self._seal()
                self._attempt += 1
                attempt = self._attempt
            if not self._write_queued(attempt):
                return

    def _write_queued(self, attempt: int) -> bool:
        """Write the queue in order; stop at the first failure. False: a fatal error, stop the thread."""
        while True:
            with self._cond:
                if not self._jobs:
                    return True
                job = self._jobs[0]
            try:
                job.write(self.store)
            except StorageError as err:
                sys.stderr.write(f"[vits-ray] run records not written yet, retrying in {self.flush_seconds:g} s: "
                                 f"{err}\n")
                with self._cond:
                    self._failure = (attempt, err)
                    self._cond.notify_all()
                return True
            except BaseException as err:  # noqa: BLE001 - handed to the caller of flush()
                with self._cond:
                    self._fatal = err
                    self._cond.notify_all()
                return False
            with self._cond:
                self._jobs.popleft()
                self._done += 1
                self._cond.notify_all()


def is_scalar_metric(key: str, value: Any) -> bool:
    """Whether a record's value is a curve worth a TensorBoard scalar.

    Not the axes (step, epoch), not wall-clock stamps (`time`, `timestamp`, `*_at`: a ~1.7e9 line
    says nothing; durations such as `step_time` are curves), not flags, not NaN or inf.
    """
    if key in ("step", "epoch", "time", "timestamp") or key.endswith("_at"):
        return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _TensorBoard:
    """Scalars into a local folder of event files. At each `rotate` the open file is closed and
    handed over for upload, and a new one opened: each file is uploaded once, whole, and TensorBoard
    reads every event file of a folder, in the order of their names."""

    def __init__(self, purge_step: int | None):
        self.dir = Path(tempfile.mkdtemp(prefix="vits-ray-tb-"))
        # Gone on remove(), or when a logger nobody closed is collected or the interpreter exits.
        self.remove = weakref.finalize(self, shutil.rmtree, str(self.dir), ignore_errors=True)
        self._id = uuid.uuid4().hex[:8]
        self._files = 0
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a declared dependency; keep logging if it is broken
            self._writer_class = self._writer = None
            return
        self._writer_class = SummaryWriter
        # Only the first file after a resume purges: it hides the dead attempt's steps past the checkpoint.
        self._writer = self._open(purge_step)
        self._dirty = purge_step is not None  # that purge must reach storage even if nothing follows

    def _open(self, purge_step: int | None = None):
        self._opened_at = int(time.time())
        return self._writer_class(str(self.dir), purge_step=purge_step)

    def add(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        kind = record.get("kind", "step")
        for key, value in record.items():
            if is_scalar_metric(key, value):
                self._writer.add_scalar(f"{kind}/{key}", value, record["step"])
                self._dirty = True

    def rotate(self, reopen: bool = True) -> list[tuple[Path, str]]:
        """Close the open file; return it for upload as (local path, store key) unless it is empty."""
        if self._writer is None or (reopen and not self._dirty):
            return []
        self._writer.close()
        uploads = []
        for path in sorted(self.dir.glob("events.out.tfevents.*")):
            if not self._dirty:
                path.unlink()  # only the file header: nothing to keep
                continue
            # Our own name: TensorBoard reads a folder's files in name order, and SummaryWriter's
            # names (second, host, pid, an unpadded counter) misorder files opened in one second.
            key = f"{TENSORBOARD_DIR}/events.out.tfevents.{self._opened_at:010d}.{self._id}.{self._files:06d}"
            # Renamed out of the way of the next writer's listing; deleted once uploaded.
            uploads.append((path.rename(self.dir / f"closed.{self._files:06d}"), key))
            self._files += 1
        self._writer = self._open() if reopen else None
        self._dirty = False
        return uploads


def _line(record: dict[str, Any]) -> str:
    # Serialised now: a later change to the caller's dict cannot reach the stored record.
    return json.dumps(record, ensure_ascii=False) + "\n"


class NullLogger:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def mark_rolled_back(self, restored_step: int) -> None:
        pass

    def event(self, record: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    """Rank 0's logger. `log` takes a metrics record (with `kind` and `step`), `event` a stability event."""

    def __init__(self, store, resume_step: int | None, flush_seconds: float = 60.0):
        self.store = store
        self._writer = SegmentWriter(store, flush_seconds)
        self._writer.append(_line({"kind": RESUME, "step": -1 if resume_step is None else resume_step}))
        self._tb = _TensorBoard(None if resume_step is None else resume_step + 1)
        self._closed = False

    @property
    def unwritten_records(self) -> int:
        """Records held in memory, not yet in storage."""
        return self._writer.unwritten_records

    def log(self, record: dict[str, Any]) -> None:
        assert record.get("kind") not in (RESUME, ROLLBACK_TO, "event"), record.get("kind")
        self._writer.append(_line(record))
        self._tb.add(record)

    def event(self, record: dict[str, Any]) -> None:
        """A stability event, stored in the stream as kind "event" (see the module docstring)."""
        self._writer.append(_line({**record, "kind": "event", "event": record["kind"]}))

    def mark_rolled_back(self, restored_step: int) -> None:
        """The steps after `restored_step` were abandoned; the reader tags their records."""
        self._writer.append(_line({"kind": ROLLBACK_TO, "step": restored_step}))

    def flush(self) -> None:
        """Everything logged so far, and the TensorBoard files, into storage; blocks until written."""
        for local_path, name in self._tb.rotate():
            self._writer.upload(local_path, name)
        self._writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for local_path, name in self._tb.rotate(reopen=False):
                self._writer.upload(local_path, name)
            self._writer.flush()
        finally:
            self._writer.stop()
            self._tb.remove()
