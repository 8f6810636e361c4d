"""A run's checkpoint folders in storage (STORAGE/NAME/checkpoint_XXXXXXXX/): find the newest one
that verifies, upload a new one so that it counts only once complete, and keep the last few.

Both ways of running share it: Ray Train's sessions upload through it (`checkpoint_upload_fn`, so
uploads get the store's retries) and a local run uses it directly. Resuming lists the folders
itself instead of taking the one Ray Train registered last, because that one may be the truncated
or corrupt one; the newest folder whose digest verifies wins, and what was skipped is reported.

A folder is complete when its `digest.json` exists: it is uploaded last, after every file it
names. Incomplete folders (an upload interrupted by a crash or an outage) and corrupt ones newer
than the checkpoint resumed from belong to a timeline the resumed run recomputes; they are
removed (by rank 0, at its next save: by then no rank can still be reading them), so that a
later save of the same step starts from an empty folder.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vits_ray import checkpoint as ckpt_io

PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


@dataclass
class Found:
    """The checkpoint to resume from (None: start fresh), and what was passed over on the way."""

    directory: Path | None
    skipped: list[str] = field(default_factory=list)  # "checkpoint_...: why", newest first


class RunCheckpoints:
    def __init__(self, run_store, keep_last: int):
        self.run_store, self.keep_last = run_store, keep_last
        self.superseded: list[str] = []  # folders passed over when resuming; removed by `prune`
        self._just_uploaded: set[str] = set()

    def folders(self) -> dict[str, bool]:
        """Every checkpoint folder, oldest first -> whether it is complete (has its digest)."""
        keys = [k for k in self.run_store.list() if k.startswith(PREFIX) and k.count("/") == 1]
        complete = set(ckpt_io.complete_folders(keys))
        return {name: name in complete for name in sorted({k.split("/")[0] for k in keys})}

    @contextmanager
    def newest_valid(self) -> Iterator[Found]:
        """Download the newest checkpoint that verifies; yield it while the local copy exists.
        The incomplete and corrupt folders newer than it are left for `prune` to remove."""
        skipped: list[str] = []
        with tempfile.TemporaryDirectory(prefix="vits-ray-resume-") as tmp:
            for name, complete in reversed(list(self.folders().items())):
                if not complete:
                    skipped.append(f"{name}: incomplete (no {ckpt_io.DIGEST_FILE}; an interrupted upload)")
                    continue
                local = Path(tmp) / name
                self.run_store.download_dir(name, local)
                try:
                    ckpt_io.verify(local)
                except ckpt_io.CorruptCheckpointError as err:
                    skipped.append(f"{name}: {str(err).replace(f'{local}: ', '')}")
                    continue
                self.superseded = [note.split(":", 1)[0] for note in skipped]
                yield Found(local, skipped)
                return
            self.superseded = [note.split(":", 1)[0] for note in skipped]
            yield Found(None, skipped)

    def upload(self, local_dir: Path, name: str) -> None:
        """Every file, then the digest: the folder counts as a checkpoint only once all arrived.
        A folder of the same name (a step saved again after resuming from an earlier one) is
        cleared first, so no file of the old one survives into the new."""
        if self.run_store.list(name):
            self.run_store.delete_prefix(name)
        self._just_uploaded = {name}
        files = sorted(p.name for p in local_dir.iterdir() if p.is_file() and p.name != ckpt_io.DIGEST_FILE)
        for file in files + [ckpt_io.DIGEST_FILE]:
            self.run_store.upload_file(local_dir / file, f"{name}/{file}")

    def prune(self) -> None:
        """After a save (one rank): the folders superseded on resuming go, and of the rest the
        newest `keep_last` complete checkpoints stay; older folders go, complete or not."""
        for name in self.superseded:
            if name not in self._just_uploaded:  # a step saved again: the new one is in its place
                self.run_store.delete_prefix(name)
        self.superseded = []
        folders = self.folders()
        complete = [name for name, ok in folders.items() if ok]
        if len(complete) <= self.keep_last:
            return
        oldest_kept = complete[-self.keep_last]
        for name in folders:
            if name < oldest_kept:
                self.run_store.delete_prefix(name)
