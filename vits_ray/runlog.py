"""Where a run's records go: metrics.jsonl, events.jsonl and TensorBoard, under STORAGE/NAME.

Object stores cannot append, so the logger keeps the records in memory and rewrites each file
atomically on `flush()`. On resume it reads the existing files back and drops records newer than
the restored checkpoint, so a file never holds two histories of the same steps.
Only rank 0 logs; other ranks get `NullLogger` (same two methods, no effect).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"


def _read_jsonl(store, name: str, keep_until_step: int) -> list[dict]:
    if not store.exists(name):
        return []
    records = []
    for line in store.read_bytes(name).decode("utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line from a crash; everything before it is intact
        if record.get("step", 0) <= keep_until_step:
            records.append(record)
    return records


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

    def __init__(self, store, resume_step: int | None, flush_seconds: float = 10.0):
        self.store = store
        keep = resume_step if resume_step is not None else -1
        self.metrics = _read_jsonl(store, METRICS_FILE, keep)
        self.events = _read_jsonl(store, EVENTS_FILE, keep)
        self.flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._tb_dir = tempfile.mkdtemp(prefix="vits-ray-tb-")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir, purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a declared dependency; keep logging if it is broken
            self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if self._tb is not None:
            kind = record.get("kind", "step")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    if math.isfinite(value):
                        self._tb.add_scalar(f"{kind}/{key}", value, record["step"])
        if time.monotonic() - self._last_flush > self.flush_seconds:
            self._write_records()

    def event(self, record: dict[str, Any]) -> None:
        """A stability event: kept in events.jsonl, and copied into the metrics as kind "event"."""
        self.events.append(record)
        self.metrics.append({**record, "kind": "event", "event": record["kind"]})

    def mark_rolled_back(self, restored_step: int) -> None:
        """Tag the records of the timeline a rollback abandoned (kept: they show the instability)."""
        for record in self.metrics:
            if record.get("kind") in ("step", "epoch", "val") and record["step"] > restored_step:
                record["rolled_back"] = True

    def _write_records(self) -> None:
        self.store.write_bytes(METRICS_FILE, _jsonl(self.metrics))
        # Written even when empty: "no events file" and "no events" say different things.
        self.store.write_bytes(EVENTS_FILE, _jsonl(self.events))
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        """Records and TensorBoard files to storage (at checkpoints and at the end; the timer
        rewrites only the small record files, not the whole TensorBoard folder)."""
        self._write_records()
        if self._tb is not None:
            self._tb.flush()
            self.store.upload_dir(self._tb_dir, "tensorboard")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self.flush()


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
