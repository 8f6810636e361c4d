"""Continuing another run's training state in a new run: `STORAGE/RUN[@STEP]`.

A sweep's trials (`vits-ray tune --from-run`) and `vits-ray train --from-run` start from a run's
checkpoint: its weights, both optimizers' moments, the GradScaler, the global step, the data
position, every rank's random state and the stability guard's history. What changes is the
settings (a trial's searched schedule), applied on the schedule's own clock from that step on
(`optim.schedule_start_step`/`schedule_start_epoch`). Unlike `--init-from` (weights only) this is
the state a relaunch of that run would resume, so a schedule is judged where the run really is.

The driver resolves the text to one verified checkpoint (`resolve`); the workers download that
folder (`downloaded`), so every trial starts from the same bytes.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from vits_ray.errors import NonRetryable
from vits_ray.run_checkpoints import RunCheckpoints, checkpoint_name

_AT_STEP = re.compile(r"^(?P<run>.+)@(?P<step>\d+)$")


class ContinuationError(NonRetryable, ValueError):
    """`--from-run` names no usable checkpoint; the message says which and what there is."""


@dataclass(frozen=True)
class ContinuationPoint:
    run_uri: str
    checkpoint: str  # checkpoint_XXXXXXXX under run_uri
    step: int
    epoch: int

    @property
    def label(self) -> str:
        return f"{self.run_uri}@{self.step}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def schedule_overrides(self) -> dict[str, dict[str, int]]:
        """The schedule's clock starts here (what `config.replace` takes)."""
        return {"optim": {"schedule_start_step": self.step, "schedule_start_epoch": self.epoch}}


def split_run_text(text: str) -> tuple[str, int | None]:
    """"STORAGE/RUN@STEP" -> ("STORAGE/RUN", STEP); "STORAGE/RUN" -> (..., None): the newest."""
    match = _AT_STEP.match(text.strip())
    if match:
        return match["run"].rstrip("/"), int(match["step"])
    return text.strip().rstrip("/"), None


def resolve(text: str, storage_cfg) -> ContinuationPoint:
    """The checkpoint `text` names, verified whole (the driver does this once, before any trial)."""
    from vits_ray import checkpoint as ckpt_io
    from vits_ray.storage import StorageError, open_store

    run_uri, step = split_run_text(text)
    try:
        store = open_store(run_uri, storage_cfg)
        checkpoints = RunCheckpoints(store, keep_last=0)
        infos = {info.step: info for info in checkpoints.infos()}
    except (StorageError, OSError, ValueError) as err:
        raise ContinuationError(f"--from-run {text}: cannot list the checkpoints of {run_uri}: {err}") from err
    if not infos:
        raise ContinuationError(f"--from-run {text}: {run_uri} has no complete checkpoint "
                                f"(expected {checkpoint_name(0).replace('0' * 8, 'XXXXXXXX')}/ folders)")
    if step is None:
        step = max(infos)
    if step not in infos:
        raise ContinuationError(f"--from-run {text}: {run_uri} has no checkpoint at step {step}; it has steps "
                                f"{', '.join(str(s) for s in sorted(infos))}")
    name = infos[step].name
    try:
        with checkpoints.verified(name) as local:
            meta_path = local / ckpt_io.META_FILE
            meta = ckpt_io.parse_meta(meta_path.read_bytes() if meta_path.exists() else None, str(local))
            epoch = int(meta["epoch"]) if meta and "epoch" in meta else int(ckpt_io.read(local)["progress"]["epoch"])
    except ckpt_io.CorruptCheckpointError as err:
        raise ContinuationError(f"--from-run {text}: {store.url(name)} does not verify: {err}") from err
    return ContinuationPoint(store.uri, name, step, epoch)


@contextmanager
def downloaded(point: dict[str, Any] | ContinuationPoint, storage_cfg) -> Iterator[Path]:
    """A verified local copy of the continuation's checkpoint folder, while the block runs."""
    from vits_ray.storage import open_store

    if isinstance(point, dict):
        point = ContinuationPoint(**point)
    with RunCheckpoints(open_store(point.run_uri, storage_cfg), keep_last=0).verified(point.checkpoint) as local:
        yield local
