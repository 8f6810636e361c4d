"""A run's checkpoint folders in storage (STORAGE/NAME/checkpoint_XXXXXXXX/): find the newest one
that verifies and may be resumed from, upload a new one so that it counts only once complete, and
keep the last few.

Both ways of running share it: Ray Train's sessions upload through it (`checkpoint_upload_fn`, so
uploads get the store's retries) and a local run uses it directly. Resuming lists the folders
itself instead of taking the one Ray Train registered last, because that one may be the truncated
or corrupt one; the newest folder whose digest verifies wins, and what was skipped is reported.

A folder is complete when its `digest.json` exists: it is uploaded last, after every file it
names. Incomplete folders (an upload interrupted by a crash or an outage) and corrupt ones newer
than the checkpoint resumed from belong to a timeline the resumed run recomputes; they are
removed (by rank 0, at its next save: by then no rank can still be reading them), so that a
later save of the same step starts from an empty folder. So are the folders that the rollback
rules refuse (`rollbacks.RollbackLedger.why_unusable`: abandoned by a rollback, or written while
training was unstable): whoever resumes says which, from each folder's small `meta.json`, before
anything large is downloaded.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from vits_ray import checkpoint as ckpt_io
from vits_ray.rollbacks import CheckpointInfo

PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(name: str) -> int:
    return int(name[len(PREFIX):])


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

    def info(self, name: str) -> CheckpointInfo:
        """What a complete folder's `meta.json` says (read before verifying: it only decides what to
        skip; the folder chosen is verified whole). A folder from before meta.json is `unjudged`."""
        rel = f"{name}/{ckpt_io.META_FILE}"
        data = self.run_store.read_bytes(rel) if self.run_store.exists(rel) else None
        meta = ckpt_io.parse_meta(data, self.run_store.url(name))
        return CheckpointInfo.from_meta(name, meta) if meta else CheckpointInfo(name, step_of(name))

    def infos(self) -> list[CheckpointInfo]:
        """Every complete checkpoint folder, oldest first."""
        return [self.info(name) for name, complete in self.folders().items() if complete]

    @contextmanager
    def newest_valid(self, why_unusable: Callable[[CheckpointInfo], str | None] = lambda info: None
                     ) -> Iterator[Found]:
        """Download the newest checkpoint that verifies and that `why_unusable` does not refuse;
        yield it while the local copy exists. The folders newer than it are left for `prune`."""
        skipped: list[str] = []
        with tempfile.TemporaryDirectory(prefix="vits-ray-resume-") as tmp:
            for name, complete in reversed(list(self.folders().items())):
                if not complete:
                    skipped.append(f"{name}: incomplete (no {ckpt_io.DIGEST_FILE}; an interrupted upload)")
                    continue
                try:
                    refused = why_unusable(self.info(name))
                except ckpt_io.CorruptCheckpointError as err:
                    refused = str(err)
                if refused:
                    skipped.append(f"{name}: {refused}")
                    continue
                local = Path(tmp) / name
                try:
                    self._download_verified(name, local)
                except ckpt_io.CorruptCheckpointError as err:
                    skipped.append(f"{name}: {str(err).replace(f'{local}: ', '')}")
                    continue
                self.superseded = [note.split(":", 1)[0] for note in skipped]
                yield Found(local, skipped)
                return
            self.superseded = [note.split(":", 1)[0] for note in skipped]
            yield Found(None, skipped)

    @contextmanager
    def verified(self, name: str) -> Iterator[Path]:
        """One checkpoint folder, downloaded and verified, while the local copy exists."""
        with tempfile.TemporaryDirectory(prefix="vits-ray-rollback-") as tmp:
            local = Path(tmp) / name
            self._download_verified(name, local)
            yield local

    def _download_verified(self, name: str, local: Path) -> None:
        self.run_store.download_dir(name, local)
        ckpt_io.verify(local)

    def supersede(self, names: Iterable[str]) -> None:
        """Folders of a timeline a rollback abandoned: removed by the next `prune`."""
        self.superseded += [n for n in names if n not in self.superseded]

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

    def prune(self, keep: Iterable[str] = ()) -> None:
        """After a save (one rank): the folders superseded on resuming go, and of the rest the
        newest `keep_last` complete checkpoints stay, and those in `keep` (the newest one known to
        be clean: a rollback may need to go back past the newer ones); older folders go."""
        keep = set(keep)
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
            if name < oldest_kept and name not in keep:
                self.run_store.delete_prefix(name)
