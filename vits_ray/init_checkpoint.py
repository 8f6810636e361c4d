"""Where a warm start's Coqui checkpoint is (local or S3), and a local copy of it for the workers."""

from __future__ import annotations

import tempfile
from pathlib import Path


def init_checkpoint_location(uri: str, storage_cfg):
    """(store of the folder, checkpoint file name) for a Coqui checkpoint folder or .pth file."""
    from vits_ray.storage import open_store

    if uri.endswith(".pth"):
        folder, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
    else:
        folder, name = uri, "model.pth"
    return open_store(folder, storage_cfg), name


def fetch_init_checkpoint(uri: str, storage_cfg) -> tuple[Path, Path | None]:
    """A local copy of a Coqui checkpoint (model.pth, or the named .pth) and its config.json."""
    store, name = init_checkpoint_location(uri, storage_cfg)
    local = Path(tempfile.mkdtemp(prefix="vits-ray-init-"))
    store.download_file(name, local / "model.pth")
    config_path = None
    if store.exists("config.json"):
        store.download_file("config.json", local / "config.json")
        config_path = local / "config.json"
    return local / "model.pth", config_path
