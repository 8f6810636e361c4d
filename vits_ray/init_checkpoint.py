"""Where a warm start's Coqui checkpoint is (local or S3), and a local copy of it for the workers."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


def init_checkpoint_location(uri: str, storage_cfg):
    """(store of the folder, checkpoint file name) for a Coqui checkpoint folder or .pth file."""
    from vits_ray.storage import open_store

    if uri.endswith(".pth"):
        folder, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
    else:
        folder, name = uri, "model.pth"
    return open_store(folder, storage_cfg), name


@contextlib.contextmanager
def fetch_init_checkpoint(uri: str, storage_cfg) -> Iterator[tuple[Path, Path | None]]:
    """A local copy of a Coqui checkpoint (model.pth, or the named .pth) and its config.json,
    removed when the block ends: at the reference scale it is a 1 GB file per worker."""
    store, name = init_checkpoint_location(uri, storage_cfg)
    with tempfile.TemporaryDirectory(prefix="vits-ray-init-") as tmp:
        local = Path(tmp)
        store.download_file(name, local / "model.pth")
        config_path = None
        if store.exists("config.json"):
            store.download_file("config.json", local / "config.json")
            config_path = local / "config.json"
        yield local / "model.pth", config_path
