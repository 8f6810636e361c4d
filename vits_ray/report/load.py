"""Read a run's records: our segments under `records/` (see `vits_ray.runlog`), the `metrics.jsonl` /
`events.jsonl` of runs written before segments (local or s3://), or a Coqui trainer log.

All become one `RunData` holding plain record dicts with the key names our trainer writes, so
the analysis never needs to know where the numbers came from.

Decisions worth knowing:
- A torn *last* line (a crash mid-write; object stores rewrite whole files, local appends can tear)
  is skipped with a warning that the report prints, provided every line before it parses. Any
  other unparsable line is a `ReportError` naming the file and line: a damaged middle means the
  file cannot be trusted.
- A file with no step and no epoch records is a `ReportError`: there is nothing to analyse.
- A record without `kind` (an exported table) is sorted by its fields (see `kinds`); one that matches
  no record shape, or several, is left out and named with its file and line in the warnings.
- The old `RunLogger.event` also copied each event into metrics.jsonl as `{"kind": "event", "event":
  <kind>}`; events.jsonl, when present, is the authoritative list and those copies are not counted twice.
- A run with segments is read by `runlog.read_records`, which applies its resume and rollback
  markers; its events are the event records of the stream. Segments are written whole, so any bad
  line there is a `ReportError`, torn or not.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vits_ray.report.kinds import as_epoch_record, describe_keys, shapes_of

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
RECORD_KINDS = ("step", "epoch", "val", "checkpoint", "quality")
EVENT_KINDS = ("nonfinite", "spike", "amp_collapse", "blowup", "rollback", "lr_backoff", "cadence_unstable",
               "cadence_calm", "warm_start", "checkpoint_skipped", "event")


class ReportError(ValueError):
    """The run's records cannot be analysed; the message names the file (and line)."""


@dataclass
class RunData:
    source: str
    origin: str  # "vits-ray" or "coqui"
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    vals: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    quality: list[dict[str, Any]] = field(default_factory=list)
    # None: no events file was found (and no event copies in metrics.jsonl); []: a file with none.
    events: Optional[list[dict[str, Any]]] = None
    events_origin: str = ""  # where `events` came from, in words
    warnings: list[str] = field(default_factory=list)
    # Our step_time spans the whole iteration, data wait included; Coqui's excludes loader_time.
    step_time_includes_loader: bool = True


# --- JSON lines --------------------------------------------------------------------------

def parse_jsonl(text: str, name: str, warnings: list[str]) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; see the module docstring for torn and bad lines."""
    return [record for _, record in parse_jsonl_numbered(text, name, warnings)]


def parse_jsonl_numbered(text: str, name: str, warnings: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSON-lines file, so later complaints can name the line."""
    lines = text.splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ReportError(f"{name} is empty: no records to report on")
    records = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            last = pos == len(numbered) - 1
            if last and records:
                warnings.append(f"{name} line {lineno} is cut off mid-record ({err.msg}); it was skipped. "
                                f"The {len(records)} lines before it parse.")
                break
            where = "its only record" if last else "a record before the end of the file"
            raise ReportError(f"{name} line {lineno}: not valid JSON ({err.msg}); {where} is damaged, "
                              f"so the file cannot be trusted") from None
        if not isinstance(record, dict):
            raise ReportError(f"{name} line {lineno}: expected a JSON object, got {type(record).__name__}")
        records.append((lineno, record))
    return records


def _float(x: Any) -> Any:
    # events.jsonl writes non-finite floats as strings ("nan", "inf") to stay strict JSON.
    if isinstance(x, str) and x.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(x)
    return x


def _split_records(records: list[dict[str, Any]], name: str, run: RunData,
                   line_numbers: Optional[list[int]] = None) -> list[dict[str, Any]]:
    """Sort records by kind into `run`; returns the event copies found in the metrics file.

    `line_numbers` (one per record) name the lines of records that cannot be sorted; without them
    (a stream of segments) they are named by their position in the stream."""
    event_copies = []
    rolled_back = 0
    unknown: dict[str, int] = {}
    inferred: dict[str, int] = {}
    renamed = 0  # kind-less epoch rows whose plain loss_* fields were read as avg_loss_*
    unsorted: list[str] = []  # kind-less records matching no shape, or several
    for i, record in enumerate(records):
        kind = record.get("kind")
        if kind is None and not record.get("rolled_back"):
            where = f"line {line_numbers[i]}" if line_numbers else f"record {i + 1}"
            original = record
            kind, record = _infer_kind(record, where, unsorted)
            if kind is None:
                continue
            inferred[kind] = inferred.get(kind, 0) + 1
            renamed += kind == "epoch" and bool(set(record) - set(original) - {"kind"})
        if record.get("rolled_back"):
            rolled_back += 1  # a timeline abandoned by a rollback: the events tell its story
        elif kind == "step":
            run.steps.append(record)
        elif kind == "epoch":
            run.epochs.append(record)
        elif kind == "val":
            run.vals.append(record)
        elif kind == "checkpoint":
            run.checkpoints.append(record)
        elif kind == "quality":
            run.quality.append(record)
        elif kind == "event":
            copy = {k: _float(v) for k, v in record.items() if k != "event"}
            event_copies.append({**copy, "kind": record.get("event", "event")})
        elif kind in EVENT_KINDS:
            event_copies.append({k: _float(v) for k, v in record.items()})
        else:
            unknown[str(kind)] = unknown.get(str(kind), 0) + 1
    if rolled_back:
        run.warnings.append(f"{name}: {rolled_back} records from timelines abandoned by rollbacks are left "
                            "out of the tables and curves (see the stability events)")
    if unknown:
        run.warnings.append(f"{name}: ignored records of unknown kind: "
                            + ", ".join(f"{k} ({n})" for k, n in sorted(unknown.items())))
    if inferred:
        run.warnings.append(f"{name}: {sum(inferred.values())} record(s) carry no `kind`; read by their fields as "
                            + ", ".join(f"{k} ({n})" for k, n in sorted(inferred.items()))
                            + (f"; {renamed} epoch row(s) name their averages plainly (loss_1, ...), read as "
                               "avg_loss_1, ..." if renamed else ""))
    if unsorted:
        shown = unsorted[:UNSORTED_SHOWN]
        more = len(unsorted) - len(shown)
        run.warnings.append(f"{name}: {len(unsorted)} record(s) without `kind` left out, their fields matching no "
                            "record shape or several: " + "; ".join(shown) + (f"; and {more} more" if more else ""))
    if not run.steps and not run.epochs:
        hint = f"; {len(unsorted)} without `kind` match no record shape ({unsorted[0]})" if unsorted else ""
        raise ReportError(f"{name} has no step or epoch records ({len(records)} records of other kinds{hint}); "
                          "nothing to analyse")
    return event_copies


UNSORTED_SHOWN = 5  # kind-less records named one by one in the warning; the rest are counted


def _infer_kind(record: dict[str, Any], where: str, unsorted: list[str]) -> tuple[Optional[str], dict[str, Any]]:
    """The kind of a record without one, from its fields (see `kinds`); None (and a note in
    `unsorted`) when they match no shape or more than one."""
    shapes = shapes_of(record)
    if len(shapes) == 1:
        kind = shapes[0]
        return kind, as_epoch_record(record) if kind == "epoch" else {**record, "kind": kind}
    if shapes:
        unsorted.append(f"{where} has the fields of {' and '.join(shapes)} records ({describe_keys(record)}); "
                        "add a `kind` to say which")
    else:
        unsorted.append(f"{where} ({describe_keys(record)})")
    return None, record


def _events_from(text: str, name: str, run: RunData) -> list[dict[str, Any]]:
    if not text.strip():
        return []
    return [{k: _float(v) for k, v in r.items()} for r in parse_jsonl(text, name, run.warnings)]


def load_jsonl_run(metrics_text: str, metrics_name: str, events_text: Optional[str],
                   events_name: str) -> RunData:
    run = RunData(source=metrics_name, origin="vits-ray")
    numbered = parse_jsonl_numbered(metrics_text, metrics_name, run.warnings)
    copies = _split_records([r for _, r in numbered], metrics_name, run, [n for n, _ in numbered])
    if events_text is not None:
        run.events = _events_from(events_text, events_name, run)
        run.events_origin = events_name
    elif copies:
        run.events = copies
        run.events_origin = f"{metrics_name} (event records; there is no {EVENTS_FILE})"
    return run


def load_segments_run(store) -> RunData:
    """A run written as segments (`records/` under `store`)."""
    from vits_ray.runlog import RECORDS_DIR, RecordError, read_records
    from vits_ray.storage import StorageError

    name = store.url(RECORDS_DIR)
    try:
        metrics, events = read_records(store)
    except (RecordError, StorageError) as err:
        raise ReportError(f"{name}: cannot read the run's records: {err}") from err
    run = RunData(source=name, origin="vits-ray")
    _split_records(metrics, name, run)  # the event copies it returns are `events` again
    run.events = [{k: _float(v) for k, v in e.items()} for e in events]
    run.events_origin = name
    return run


def _has_segments(store) -> bool:
    from vits_ray.runlog import segment_names

    return bool(segment_names(store))


# --- sources -----------------------------------------------------------------------------

def _read_s3(uri: str) -> RunData:
    from vits_ray.storage import StorageError, open_store

    named_file = uri.rstrip("/").endswith(".jsonl")
    if named_file:
        folder, name = uri.rstrip("/").rsplit("/", 1)
    else:
        folder, name = uri.rstrip("/"), METRICS_FILE
    try:
        store = open_store(folder)
        if not named_file and _has_segments(store):
            return load_segments_run(store)
        if not store.exists(name):
            raise ReportError(f"{store.url(name)} not found, nor any records/ segments: not a vits-ray run folder")
        metrics = store.read_bytes(name).decode("utf-8")
        events = store.read_bytes(EVENTS_FILE).decode("utf-8") if store.exists(EVENTS_FILE) else None
    except StorageError as err:
        raise ReportError(f"{uri}: cannot read the run: {err}") from err
    return load_jsonl_run(metrics, store.url(name), events, store.url(EVENTS_FILE))


def _coqui_log_in(folder: Path) -> Optional[Path]:
    logs = sorted(folder.glob("trainer_*_log.txt")) or sorted(folder.glob("*/trainer_*_log.txt"))
    if len(logs) > 1 and (folder / "trainer_0_log.txt").exists():
        return folder / "trainer_0_log.txt"
    return logs[-1] if logs else None  # one level down: the newest Coqui run folder (timestamped)


def load_run(source: str) -> RunData:
    """A run directory (local or s3://), a metrics.jsonl, a Coqui trainer log or Coqui run folder."""
    if source.startswith("s3://"):
        return _read_s3(source)
    path = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
    if path.is_dir():
        from vits_ray.storage import open_store

        store = open_store(str(path))
        if _has_segments(store):
            return load_segments_run(store)
        if (path / METRICS_FILE).exists():
            path = path / METRICS_FILE
        else:
            log = _coqui_log_in(path)
            if log is None:
                raise ReportError(f"{path}: neither records/ segments, {METRICS_FILE} nor a Coqui trainer_0_log.txt "
                                  "in it")
            path = log
    if not path.exists():
        raise ReportError(f"{path} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".txt" or (text.lstrip() and not text.lstrip().startswith("{")):
        return parse_coqui_log(text, str(path))
    events_path = path.parent / EVENTS_FILE
    events = events_path.read_text(encoding="utf-8") if events_path.exists() else None
    return load_jsonl_run(text, str(path), events, str(events_path))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- Coqui trainer log (trainer_0_log.txt, coqui-tts-trainer 0.4) -------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EPOCH = re.compile(r"^\s*> EPOCH: (\d+)/(\d+)")
_TRAIN_STEP = re.compile(r"--> TIME: (.+?) -- STEP: (\d+)/(\d+) -- GLOBAL_STEP: (\d+)")
_EVAL_STEP = re.compile(r"^\s*--> STEP: (\d+)\s*$")
_VALUE = re.compile(r"^\s*\| > ([\w\-]+):\s*(\S+)(?:\s+\((\S+?)\))?\s*$")
_NUMBER = re.compile(r"^(?:tensor\()?([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf))",
                     re.IGNORECASE)
# Coqui's names -> ours.
_RENAME = {"current_lr_0": "lr_0", "current_lr_1": "lr_1", "current_lr": "lr_1", "amp_scaler": "amp_scale"}


def _number(text: str) -> Optional[float]:
    m = _NUMBER.match(text.strip())
    return float(m.group(1)) if m else None


def _rename(key: str) -> str:
    return _RENAME.get(key, key)


def parse_coqui_log(text: str, name: str) -> RunData:
    """Coqui trainer log -> the same records as metrics.jsonl.

    - each `--> TIME: ... -- STEP: s/N -- GLOBAL_STEP: g` block is a step record with `step` = g as
      printed (Coqui counts from 0) and the current values (`current_lr_i` -> `lr_i`,
      `amp_scaler` -> `amp_scale`); the running averages in parentheses are kept per epoch;
    - `--> EVAL PERFORMANCE` holds Coqui's eval averages when the epoch ran an evaluation: those
      become a `val` record (`avg_loss_1` -> `val_loss_1`), and the epoch record is the training
      running averages of the epoch's last printed step. Without an evaluation the block holds the
      training averages of the whole epoch, which become the epoch record directly.
    """
    parser = _CoquiLogParser(name)
    for lineno, line in enumerate(_ANSI.sub("", text).splitlines(), 1):
        parser.feed(lineno, line)
    return parser.finish()


class _CoquiLogParser:
    """Line by line: a line either opens a block (epoch, train step, eval step, eval performance)
    or adds a value to the open one; closing a block turns it into records."""

    def __init__(self, name: str):
        self.name = name
        self.run = RunData(source=name, origin="coqui", step_time_includes_loader=False)
        self.run.events_origin = "Coqui's trainer has no stability guard"
        self.epoch = 0
        self.block: Optional[str] = None  # "train", "eval_step", "eval_perf", None
        self.current: dict[str, Any] = {}
        self.train_avgs: dict[str, float] = {}
        self.last_step_in_epoch = -1
        self.eval_ran = False
        self.eval_perf: dict[str, float] = {}
        self.last_global = -1

    def feed(self, lineno: int, line: str) -> None:
        m = _EPOCH.match(line)
        if m:
            self.close_block()
            if self.train_avgs:
                self.close_epoch(None)
            self.epoch = int(m.group(1))
            return
        m = _TRAIN_STEP.search(line)
        if m:
            self.open_train_step(lineno, m)
            return
        if "> EVALUATION" in line:
            self.close_block()
            self.eval_ran = True
            return
        if _EVAL_STEP.match(line):
            self.close_block()
            self.block = "eval_step"
            return
        if "--> EVAL PERFORMANCE" in line:
            self.close_block()
            self.block = "eval_perf"
            return
        if "> TRAINING (" in line:
            self.close_block()
            return
        self.add_value(line, _VALUE.match(line))

    def open_train_step(self, lineno: int, m: re.Match) -> None:
        self.close_block()
        self.block = "train"
        global_step = int(m.group(4))
        if global_step < self.last_global:
            self.run.warnings.append(f"{self.name} line {lineno}: GLOBAL_STEP went back from {self.last_global} "
                                     f"to {global_step} (the log holds more than one run; all are shown)")
        self.last_global = global_step
        self.last_step_in_epoch = int(m.group(2))
        self.current = {"kind": "step", "step": global_step, "epoch": self.epoch, "step_in_epoch": int(m.group(2)),
                        "steps_in_epoch": int(m.group(3)) + 1, "time_text": m.group(1)}

    def add_value(self, line: str, m: Optional[re.Match]) -> None:
        if m and self.block == "train":
            value = _number(m.group(2))
            if value is not None:
                self.current[_rename(m.group(1))] = value
            if m.group(3) is not None:
                avg = _number(m.group(3))
                if avg is not None:
                    self.train_avgs["avg_" + m.group(1)] = avg
        elif m and self.block == "eval_perf" and m.group(1).startswith("avg_"):
            value = _number(m.group(2))
            if value is not None:
                self.eval_perf[m.group(1)] = value
        elif self.block == "eval_perf" and line.strip() and not m:
            self.close_block()

    def close_block(self) -> None:
        if self.block == "train" and self.current:
            self.run.steps.append(self.current)
        elif self.block == "eval_perf" and self.eval_perf:
            self.close_epoch(self.eval_perf)
        self.block, self.current, self.eval_perf = None, {}, {}

    def close_epoch(self, perf: Optional[dict[str, float]]) -> None:
        run = self.run
        step = run.steps[-1]["step"] if run.steps else 0
        if perf is not None and not self.eval_ran:
            avgs = perf
        else:
            avgs = self.train_avgs
            if perf is not None:
                run.vals.append({"kind": "val", "step": step, "epoch": self.epoch,
                                 **{"val_" + k[len("avg_"):]: v for k, v in perf.items() if k.startswith("avg_")}})
        if avgs:
            run.epochs.append({"kind": "epoch", "epoch": self.epoch, "step": step,
                               "steps": self.last_step_in_epoch + 1,
                               **{"avg_" + _rename(k[len("avg_"):]): v for k, v in avgs.items()
                                  if k.startswith("avg_")}})
        self.train_avgs, self.eval_ran, self.last_step_in_epoch = {}, False, -1

    def finish(self) -> RunData:
        self.close_block()
        if self.train_avgs:
            self.close_epoch(None)  # an epoch cut short: its running averages so far
        if not self.run.steps and not self.run.epochs:
            raise ReportError(f"{self.name}: no Coqui training step blocks (`--> TIME: ... -- STEP:`) or epoch "
                              "averages found; is this a Coqui trainer log?")
        return self.run
