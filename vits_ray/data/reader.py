"""Per-rank streaming reader over `prepare`'s Parquet shards, with length bucketing.

Each epoch the shards are permuted by (seed, epoch) and dealt round-robin to the ranks, so a
worker reads only its share and sees different shards across epochs. Inside a shard, rows are
bucketed by length (shuffled, then sorted by a coarse length key) and packed greedily into
batches bounded by a batch size and a padded-samples budget; the batch order is shuffled.

Every rank must yield the same number of batches (unequal counts hang collective ops). Each rank
can compute every rank's plan from the `num_samples` column alone (a cheap column read), so the
count is agreed without communication: every rank stops at the minimum.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vits_ray.data.batch import VitsBatch, collate

# Rows whose lengths fall in the same quarter second are interchangeable for bucketing.
BUCKET_SECONDS = 0.25


@dataclass(frozen=True)
class PlannedBatch:
    shard: int  # index into the split's shard list
    rows: tuple[int, ...]


def pack_batches(lengths: np.ndarray, rng: np.random.Generator, batch_size: int, max_batch_samples: int,
                 bucket_samples: int) -> list[tuple[int, ...]]:
    """Group row indices into batches of similar length; padded size (n * longest) stays in budget."""
    if len(lengths) == 0:
        return []
    jitter = rng.random(len(lengths))
    order = np.lexsort((jitter, lengths // max(bucket_samples, 1)))
    batches: list[tuple[int, ...]] = []
    current: list[int] = []
    longest = 0
    for row in order:
        length = int(lengths[row])
        new_longest = max(longest, length)
        if current and (len(current) == batch_size or new_longest * (len(current) + 1) > max_batch_samples):
            batches.append(tuple(current))
            current, new_longest = [], length
        current.append(int(row))
        longest = new_longest
    if current:
        batches.append(tuple(current))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def plan_epoch(shard_lengths: list[np.ndarray], rank: int, world_size: int, seed: int, epoch: int,
               batch_size: int, max_batch_samples: int, bucket_samples: int) -> list[PlannedBatch]:
    """The batches `rank` yields in `epoch`; the same length on every rank."""
    if len(shard_lengths) < world_size:
        raise ValueError(f"the data has {len(shard_lengths)} train shard(s) but {world_size} workers: "
                         "run `vits-ray prepare` again with a smaller data.rows_per_shard")
    rng = np.random.default_rng([seed, epoch])
    shard_order = rng.permutation(len(shard_lengths))
    # One generator per shard, keyed by (seed, epoch, shard), so a rank's plan for a shard does not
    # depend on which other shards it got.
    per_rank: list[list[PlannedBatch]] = []
    for r in range(world_size):
        plan: list[PlannedBatch] = []
        for shard in shard_order[r::world_size]:
            shard_rng = np.random.default_rng([seed, epoch, int(shard)])
            plan += [PlannedBatch(int(shard), rows) for rows in
                     pack_batches(shard_lengths[shard], shard_rng, batch_size, max_batch_samples, bucket_samples)]
        per_rank.append(plan)
    count = min(len(p) for p in per_rank)
    return per_rank[rank][:count]


class ShardSource:
    """Fetches shards from a store, verifies their checksums, keeps a local cache for remote stores."""

    def __init__(self, store, shard_entries: list[dict], cache_dir: str = ""):
        self.store = store
        self.entries = shard_entries
        self.remote = store.uri.startswith("s3://")
        # Local shards are read in place; only remote ones are cached (by checksum, so two readers
        # of the same data share a cache folder safely).
        self.cache_dir = ""
        if self.remote:
            self.cache_dir = cache_dir or tempfile.mkdtemp(prefix="vits-ray-shards-")
            os.makedirs(self.cache_dir, exist_ok=True)

    def _verified(self, data: bytes, entry: dict) -> bytes:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(f"{self.store.url(entry['path'])}: checksum {digest[:12]}… does not match the "
                             f"manifest's {entry['sha256'][:12]}…; the shard is corrupt or was rewritten")
        return data

    def read(self, index: int) -> pa.Table:
        entry = self.entries[index]
        if not self.remote:
            data = self._verified(self.store.read_bytes(entry["path"]), entry)
            return pq.read_table(pa.BufferReader(data))
        cached = os.path.join(self.cache_dir, entry["sha256"] + ".parquet")
        if not os.path.exists(cached):
            data = self._verified(self.store.read_bytes(entry["path"]), entry)
            tmp = f"{cached}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, cached)
        return pq.read_table(cached)

    def lengths(self, index: int) -> np.ndarray:
        entry = self.entries[index]
        if "row_num_samples" in entry:
            return np.asarray(entry["row_num_samples"], dtype=np.int64)
        fs, base = self.store.arrow_filesystem()
        path = f"{base.rstrip('/')}/{entry['path']}" if base else entry["path"]
        try:
            table = pq.read_table(path, columns=["num_samples"], filesystem=fs)
        except (pa.ArrowException, OSError):
            # This column read skips the checksum; a damaged footer would otherwise surface as a bare
            # Arrow error that names no shard. Fetch the whole shard to say which one and why.
            self._verified(self.store.read_bytes(entry["path"]), entry)
            raise
        return table.column("num_samples").to_numpy().astype(np.int64)


class _DecodedShard:
    def __init__(self, table: pa.Table):
        self.ids = table.column("id").to_pylist()
        self.speakers = table.column("speaker").to_pylist()
        self.texts = table.column("normalized_text").to_pylist()
        self.token_ids = [np.asarray(t, dtype=np.int64) for t in table.column("token_ids").to_pylist()]
        self.audio = table.column("audio_pcm16").to_pylist()

    def pcm(self, row: int) -> np.ndarray:
        return np.frombuffer(self.audio[row], dtype="<i2")


class ShardReader:
    """Yields `VitsBatch`es of one split for one rank; resumable at any batch of an epoch."""

    def __init__(self, store, manifest: dict, split: str, rank: int, world_size: int, *, seed: int,
                 batch_size: int, max_batch_seconds: float, pad_id: int, cache_dir: str = "",
                 prefetch: int = 2):
        entries = [s for s in manifest["shards"] if s["split"] == split]
        if not entries:
            raise ValueError(f"{store.url('manifest.json')}: no {split!r} shards")
        sample_rate = int(manifest["sample_rate"])
        self.source = ShardSource(store, entries, cache_dir)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size = batch_size
        self.max_batch_samples = int(max_batch_seconds * sample_rate)
        self.bucket_samples = int(BUCKET_SECONDS * sample_rate)
        self.pad_id = pad_id
        self.prefetch = prefetch
        self.shard_lengths = [self.source.lengths(i) for i in range(len(entries))]
        longest = max(int(lengths.max()) for lengths in self.shard_lengths if len(lengths))
        if longest > self.max_batch_samples:
            raise ValueError(f"train.max_batch_seconds ({max_batch_seconds}) is shorter than the longest "
                             f"utterance ({longest / sample_rate:.2f} s)")
        self.loader_time = 0.0  # seconds spent waiting for the last batch

    def plan(self, epoch: int) -> list[PlannedBatch]:
        return plan_epoch(self.shard_lengths, self.rank, self.world_size, self.seed, epoch,
                          self.batch_size, self.max_batch_samples, self.bucket_samples)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self.plan(epoch))

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[VitsBatch]:
        """Batches `start`, `start + 1`, ... of `epoch`; shards before `start` are never read."""
        plan = self.plan(epoch)[start:]
        shard_sequence = list(dict.fromkeys(b.shard for b in plan))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        try:
            pending: dict[int, Future] = {}
            requested = 0  # shards of shard_sequence submitted so far

            def request(upto: int) -> None:
                nonlocal requested
                for shard in shard_sequence[requested: upto + 1]:
                    pending[shard] = pool.submit(lambda s=shard: _DecodedShard(self.source.read(s)))
                requested = max(requested, min(upto + 1, len(shard_sequence)))

            for planned in plan:
                started = time.perf_counter()
                position = shard_sequence.index(planned.shard)
                request(position + self.prefetch)
                shard = pending[planned.shard].result()
                for done in shard_sequence[:position]:  # earlier shards are finished with
                    pending.pop(done, None)
                rows = planned.rows
                batch = collate([shard.ids[r] for r in rows], [shard.speakers[r] for r in rows],
                                [shard.texts[r] for r in rows], [shard.token_ids[r] for r in rows],
                                [shard.pcm(r) for r in rows], self.pad_id)
                self.loader_time = time.perf_counter() - started
                yield batch
        finally:
            # A consumer that stops early (max_steps, val_batches) must not wait for shards it will
            # never use: drop the queued prefetches, wait only for the one in flight.
            pool.shutdown(wait=True, cancel_futures=True)
