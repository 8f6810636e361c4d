"""The shard format: Parquet schema, deterministic writer, and the manifest that makes output final.

Layout under the output URI:

    shards/train-00000.parquet, shards/train-00001.parquet, ..., shards/val-00000.parquet, ...
    vocab.json      the Vocabulary (also inside the manifest)
    manifest.json   written last; its presence means every shard it lists is complete

Each shard holds at most `data.rows_per_shard` rows sorted by id, in row groups of
`ROW_GROUP_ROWS`. Writes are byte-deterministic (fixed codec and level, no timestamps), so
preparing the same corpus twice gives identical files and identical sha256 sums.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vits_ray.storage import Store, StorageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
SHARD_DIR = "shards"
ROW_GROUP_ROWS = 64

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("speaker", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("normalized_text", pa.string(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("num_samples", pa.int64(), nullable=False),
    # Little-endian int16 mono PCM at the manifest's sample_rate.
    pa.field("audio_pcm16", pa.binary(), nullable=False),
    pa.field("clipped_fraction", pa.float32(), nullable=False),
])


def shard_path(split: str, index: int) -> str:
    return f"{SHARD_DIR}/{split}-{index:05d}.parquet"


def encode_shard(rows: dict[str, list]) -> bytes:
    """Parquet bytes for one shard; `rows` maps each SHARD_SCHEMA column to its values."""
    table = pa.Table.from_pydict(rows, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(
        table, buf,
        compression="zstd", compression_level=3,
        use_dictionary=["speaker"],
        # Statistics on the audio column would only be truncated blobs.
        write_statistics=["id", "speaker", "num_samples", "clipped_fraction"],
        row_group_size=ROW_GROUP_ROWS,
        version="2.6",
    )
    return buf.getvalue()


def write_shard(store: Store, split: str, index: int, rows: dict[str, list]) -> dict[str, Any]:
    """Write one shard and return its manifest entry."""
    data = encode_shard(rows)
    path = shard_path(split, index)
    store.write_bytes(path, data)
    return {
        "path": path,
        "split": split,
        "rows": len(rows["id"]),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "num_samples_min": min(rows["num_samples"]),
        "num_samples_max": max(rows["num_samples"]),
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def sample_rate_mismatch(manifest: dict[str, Any], sample_rate: int, data_uri: str) -> str | None:
    """Why shards prepared at the manifest's rate cannot train a recipe at `sample_rate`, or None."""
    if manifest.get("sample_rate") == sample_rate:
        return None
    return f"{data_uri}: prepared at {manifest.get('sample_rate')} Hz but audio.sample_rate is {sample_rate}"


def read_manifest(store: Store) -> dict[str, Any]:
    """The manifest of a prepared dataset; StorageError if there is none, ValueError if it is bad."""
    if not store.exists(MANIFEST):
        leftovers = store.list(SHARD_DIR)
        note = f" ({len(leftovers)} shard file(s) there are from an unfinished prepare)" if leftovers else ""
        raise StorageError(f"{store.url(MANIFEST)} not found{note}: run `vits-ray prepare` first")
    raw = store.read_bytes(MANIFEST)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{store.url(MANIFEST)} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{store.url(MANIFEST)}: format_version {found!r} is not supported "
                         f"(expected {FORMAT_VERSION}); run `vits-ray prepare` again")
    for key in ("sample_rate", "vocab", "shards", "splits"):
        if key not in manifest:
            raise ValueError(f"{store.url(MANIFEST)}: missing key {key!r}")
    return manifest


def verify_shard(store: Store, entry: dict[str, Any], data: bytes) -> None:
    """Raise ValueError naming the shard's URI if `data` is not the shard the manifest describes."""
    url = store.url(entry["path"])
    if len(data) != entry["bytes"]:
        raise ValueError(f"{url}: {len(data)} bytes, manifest says {entry['bytes']} (stale or truncated shard)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(f"{url}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}... "
                         "(corrupt or stale shard)")


def read_shard(store: Store, entry: dict[str, Any], verify: bool = True) -> pa.Table:
    """Fetch one shard, check it against its manifest entry, and return it as a Table."""
    data = store.read_bytes(entry["path"])
    if verify:
        verify_shard(store, entry, data)
    return pq.read_table(pa.BufferReader(data), schema=SHARD_SCHEMA)
