"""Run the real `Trainer` in N processes joined by a real gloo process group, without Ray.

The tests that need to reach inside the loop (break its gradient sync, record the device of every
collective, feed one rank a bad batch) run it here: the same Trainer, Coqui model, shards and
collectives as a Ray worker, with checkpoints kept in a local folder by `DirectorySession` in place
of Ray Train's persistence.
"""

from __future__ import annotations

import os
import shutil
import socket
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DirectorySession:
    """Checkpoints as folders under `root`; the latest one is handed back on construction."""

    def __init__(self, root: Path, rank: int):
        self.root, self.rank = Path(root), rank
        self.reports: list[dict[str, Any]] = []
        self.skipped: list[str] = []

    @contextmanager
    def latest_checkpoint(self, why_unusable=None) -> Iterator[Path | None]:
        found = sorted(self.root.glob("checkpoint_*"))
        yield found[-1] if found else None

    def _checkpoints(self):
        from vits_ray.run_checkpoints import RunCheckpoints
        from vits_ray.storage import open_store

        return RunCheckpoints(open_store(str(self.root)), keep_last=1_000_000)

    def list_checkpoints(self):
        return self._checkpoints().infos()

    def checkpoint(self, name: str):
        return self._checkpoints().verified(name)

    def supersede(self, names) -> None:
        pass  # every folder is kept, for the test to read

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None,
               keep: tuple[str, ...] = ()) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.root / name, dirs_exist_ok=True)
        if dist.is_initialized():
            dist.barrier()  # like ray.train.report: every rank reports before any goes on


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, errors, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args, backend: str = "gloo") -> list[tuple[int, str]]:
    """Run `fn(rank, world, *args)` in `world` processes joined by `backend`; returns the (rank,
    traceback) of failures."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errors, backend)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        if p.is_alive():
            p.kill()
    out = []
    while not errors.empty():
        out.append(errors.get())
    if not out and any(p.exitcode != 0 for p in procs):
        out.append((-1, f"exit codes {[p.exitcode for p in procs]}"))
    return out
