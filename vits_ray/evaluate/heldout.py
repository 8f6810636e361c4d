"""Held-out utterances (text and recording) from a prepared dataset's split, in a fixed order.

The order is by utterance id over the whole split, so "the first N" is the same subset for every
checkpoint, every evaluation and every world size: figures over training compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class HeldOut:
    id: str
    text: str  # as prepared (normalised) for training
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int


def split_entries(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard entries of `split`; ValueError naming the splits that exist when empty."""
    entries = [s for s in manifest["shards"] if s["split"] == split]
    if not entries:
        have = sorted({s["split"] for s in manifest["shards"]})
        raise ValueError(f"the dataset has no {split!r} split (it has: {', '.join(have) or 'none'}); "
                         "prepare it with data.val_fraction > 0, or pass another --split")
    return entries


def read_held_out(store, manifest: dict, split: str = "val", limit: int = 0) -> list[HeldOut]:
    """The first `limit` utterances of `split` by id (all with 0), shards checked against the manifest.

    `prepare` writes a split's utterances sorted by id into shards in order, so only the shards that
    hold the first `limit` are read: at the reference scale every worker of a run reads these at
    start, and the whole val split would be hundreds of MB from S3 each."""
    from vits_ray.data.shards import read_shard

    rows = []
    for entry in split_entries(manifest, split):
        if limit and len(rows) >= limit:
            break
        table = read_shard(store, entry)
        for uid, text, pcm in zip(table.column("id").to_pylist(), table.column("normalized_text").to_pylist(),
                                  table.column("audio_pcm16").to_pylist()):
            rows.append((uid, text, pcm))
    rows.sort(key=lambda r: r[0])
    if limit:
        rows = rows[:limit]
    rate = int(manifest["sample_rate"])
    return [HeldOut(uid, text, np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, rate)
            for uid, text, pcm in rows]
