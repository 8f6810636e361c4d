"""Corpus ingest (formats, validation, resampling) and the Parquet shard format.

Submodules are imported on use so that worker processes that only need `vits_ray.data.audio`
do not pay for pyarrow and the storage clients.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prepare_corpus": "vits_ray.data.ingest",
    "PrepareSummary": "vits_ray.data.ingest",
    "assign_splits": "vits_ray.data.ingest",
    "FORMATS": "vits_ray.data.formats",
    "SHARD_SCHEMA": "vits_ray.data.shards",
    "read_manifest": "vits_ray.data.shards",
    "read_shard": "vits_ray.data.shards",
    "verify_shard": "vits_ray.data.shards",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vits_ray.data' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
