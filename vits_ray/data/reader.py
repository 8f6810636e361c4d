"""Per-rank streaming reader over `prepare`'s Parquet shards, with length bucketing.

The epoch plan is global and deterministic, so every rank computes the same one from the seed, the
epoch and the per-shard `num_samples` columns (a cheap column read) without communicating:

1. The shards are permuted by (seed, epoch).
2. The permuted shards are grouped into windows of `shuffle_shards` consecutive shards. Within a
   window the rows of all its shards are pooled, bucketed by length (shuffled, then sorted by a
   coarse length key), packed greedily into batches bounded by a batch size and a padded-samples
   budget, and the window's batches are shuffled: consecutive batches mix rows of several shards.
3. The windows' batches, concatenated, are the epoch's global batch list (B batches). Every train
   utterance is in exactly one of them.
4. Rank r gets the contiguous range [r * n, (r + 1) * n) of that list, n = ceil(B / world). Every
   rank must yield the same number of batches (unequal counts hang collective ops), so a range
   that runs past the end wraps to the start of the list; those fill-in batches (fewer than
   `world` per epoch) are repeats, marked `wrapped`. Nothing is dropped at any world size.

Contiguous ranges keep a rank on its own windows, so it reads about 1/world of the shards (plus
the windows it shares with its neighbours at the ends of its range).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vits_ray.data.batch import VitsBatch, collate

# Rows whose lengths fall in the same quarter second are interchangeable for bucketing.
BUCKET_SECONDS = 0.25


@dataclass(frozen=True)
class PlannedBatch:
    rows: tuple[tuple[int, int], ...]  # (shard index into the split's shard list, row in that shard)
    wrapped: bool = False  # a repeat from the start of the epoch, filling a short rank's range

    @property
    def shards(self) -> tuple[int, ...]:
        """The shards this batch reads, in order of first use."""
        return tuple(dict.fromkeys(shard for shard, _ in self.rows))

    def num_samples(self, shard_lengths: Sequence[np.ndarray]) -> int:
        return sum(int(shard_lengths[shard][row]) for shard, row in self.rows)


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


def shard_windows(num_shards: int, seed: int, epoch: int, shuffle_shards: int) -> list[list[int]]:
    """The epoch's shard permutation, cut into windows of `shuffle_shards` consecutive shards."""
    if shuffle_shards < 1:
        raise ValueError(f"shuffle_shards must be at least 1, got {shuffle_shards}")
    order = [int(s) for s in np.random.default_rng([seed, epoch]).permutation(num_shards)]
    return [order[i: i + shuffle_shards] for i in range(0, num_shards, shuffle_shards)]


def plan_global_epoch(shard_lengths: Sequence[np.ndarray], seed: int, epoch: int, batch_size: int,
                      max_batch_samples: int, bucket_samples: int, shuffle_shards: int = 4) -> list[PlannedBatch]:
    """All batches of `epoch` before they are dealt to ranks; each row is in exactly one."""
    plan: list[PlannedBatch] = []
    for window_index, window in enumerate(shard_windows(len(shard_lengths), seed, epoch, shuffle_shards)):
        pooled_rows = [(shard, row) for shard in window for row in range(len(shard_lengths[shard]))]
        pooled_lengths = np.concatenate([np.asarray(shard_lengths[s], dtype=np.int64) for s in window])
        # Keyed by the window, so a window's batches do not depend on how many rows came before it.
        rng = np.random.default_rng([seed, epoch, window_index])
        for batch in pack_batches(pooled_lengths, rng, batch_size, max_batch_samples, bucket_samples):
            plan.append(PlannedBatch(tuple(pooled_rows[i] for i in batch)))
    return plan


def rank_share(global_plan: list[PlannedBatch], rank: int, world_size: int, *, split: str = "train",
               allow_fewer_batches_than_ranks: bool = False) -> list[PlannedBatch]:
    """Rank `rank`'s contiguous range of the global plan, wrapped to the start to a common length.

    With `allow_fewer_batches_than_ranks` (validation, where nothing is all-reduced per batch)
    ranges are not filled: a short range stays short and an empty one yields nothing.
    """
    total = len(global_plan)
    if total < world_size and not allow_fewer_batches_than_ranks:
        raise ValueError(f"the {split} split packs into {total} batch(es) per epoch, fewer than the "
                         f"{world_size} workers: every worker needs at least one batch; use fewer "
                         "workers, a smaller train.batch_size, or more data")
    per_rank = math.ceil(total / world_size)
    begin, end = rank * per_rank, (rank + 1) * per_rank
    if allow_fewer_batches_than_ranks:
        return global_plan[begin:min(end, total)]
    # total >= world_size, so the fill (per_rank * world_size - total < world_size) never wraps twice.
    return [global_plan[p] if p < total else PlannedBatch(global_plan[p - total].rows, wrapped=True)
            for p in range(begin, end)]


def plan_epoch(shard_lengths: Sequence[np.ndarray], rank: int, world_size: int, seed: int, epoch: int,
               batch_size: int, max_batch_samples: int, bucket_samples: int, shuffle_shards: int = 4, *,
               split: str = "train", allow_fewer_batches_than_ranks: bool = False) -> list[PlannedBatch]:
    """The batches `rank` yields in `epoch`; the same length on every rank (see the module docstring)."""
    global_plan = plan_global_epoch(shard_lengths, seed, epoch, batch_size, max_batch_samples, bucket_samples,
                                    shuffle_shards)
    return rank_share(global_plan, rank, world_size, split=split,
                      allow_fewer_batches_than_ranks=allow_fewer_batches_than_ranks)


@dataclass
class ShardRead:
    """One read of a shard for a plan: decoded before batch `first`, released after batch `last`."""
    shard: int
    first: int
    last: int


def shard_reads(plan: list[PlannedBatch]) -> list[ShardRead]:
    """Each shard is read once for the rank's own batches and once more if wrapped fill-ins need it.

    The fill-ins come at the end of the plan; keeping their shards decoded from the start of the
    epoch would hold far more than a window in memory, so they are read again.
    """
    reads: list[ShardRead] = []
    open_reads: dict[tuple[bool, int], ShardRead] = {}
    for index, batch in enumerate(plan):
        for shard in batch.shards:
            read = open_reads.get((batch.wrapped, shard))
            if read is None:
                read = open_reads[(batch.wrapped, shard)] = ShardRead(shard, index, index)
                reads.append(read)
            read.last = index
    return reads


# The shard cache's default bound (data.cache_max_gb); the reader's disk must hold this much.
DEFAULT_CACHE_MAX_BYTES = 20 << 30
# A temporary cache file this old is the leftover of a killed writer (writing a shard takes seconds).
STALE_TMP_SECONDS = 3600
_CACHED_NAME = re.compile(r"[0-9a-f]{64}\.parquet(\.\d+\.\d+\.tmp)?")

# Cached files that some ShardSource of this process is reading now; eviction leaves them alone.
_reading: collections.Counter[str] = collections.Counter()
_reading_lock = threading.Lock()


class ShardSource:
    """Fetches shards from a store, verifies their checksums, keeps a bounded local cache for remote stores.

    Cached shards are named by checksum, so readers of the same data (workers on one machine, a
    relaunch) may share a cache folder. When a new shard would take the folder past
    `cache_max_bytes`, the least recently used shards are evicted first (recency is the file's
    mtime, so it is shared between processes). Eviction by one reader only costs the others a
    re-fetch: a file already open stays readable after it is unlinked (POSIX), and a reader that
    finds its cached file gone fetches it again.
    """

    def __init__(self, store, shard_entries: list[dict], cache_dir: str = "",
                 cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES):
        if cache_max_bytes <= 0:
            raise ValueError(f"cache_max_bytes must be positive, got {cache_max_bytes}")
        self.store = store
        self.entries = shard_entries
        self.remote = store.uri.startswith("s3://")
        self.cache_max_bytes = int(cache_max_bytes)
        self._arrow_fs = None
        self._remove_cache = None
        # Local shards are read in place; only remote ones are cached.
        self.cache_dir = ""
        if self.remote and cache_dir:
            self.cache_dir = cache_dir
            os.makedirs(self.cache_dir, exist_ok=True)
        elif self.remote:
            self.cache_dir = tempfile.mkdtemp(prefix="vits-ray-shards-")
            # Nobody else knows this folder, so it goes with its source: on close(), when the source
            # is garbage collected, or at interpreter exit, whichever comes first.
            self._remove_cache = weakref.finalize(self, shutil.rmtree, self.cache_dir, ignore_errors=True)

    def close(self) -> None:
        """Remove the cache folder if this source created it; a given cache_dir is kept for reuse.

        Reads after close still work, uncached.
        """
        if self._remove_cache is not None:
            self._remove_cache()

    def _verified(self, data: bytes, entry: dict) -> bytes:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(f"{self.store.url(entry['path'])}: checksum {digest[:12]}… does not match the "
                             f"manifest's {entry['sha256'][:12]}…; the shard is corrupt or was rewritten")
        return data

    def _fetch(self, entry: dict) -> bytes:
        # store.read_bytes rides out outages (storage.retry_seconds) and names the URI when it gives up.
        return self._verified(self.store.read_bytes(entry["path"]), entry)

    def read(self, index: int) -> pa.Table:
        entry = self.entries[index]
        if not self.remote:
            return pq.read_table(pa.BufferReader(self._fetch(entry)))
        cached = os.path.join(self.cache_dir, entry["sha256"] + ".parquet")
        with _reading_lock:
            _reading[cached] += 1
        try:
            try:
                with pa.OSFile(cached) as f:
                    with contextlib.suppress(OSError):
                        os.utime(cached)  # most recently used now
                    return pq.read_table(f)
            except FileNotFoundError:
                pass  # not cached yet, or evicted by another reader of the folder
            data = self._fetch(entry)
            self._add_to_cache(cached, data)
            return pq.read_table(pa.BufferReader(data))
        finally:
            with _reading_lock:
                _reading[cached] -= 1
                if not _reading[cached]:
                    del _reading[cached]

    def _add_to_cache(self, cached: str, data: bytes) -> None:
        if len(data) > self.cache_max_bytes:
            return  # it alone would break the bound; this read is served from memory
        tmp = f"{cached}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self._evict(room_for=len(data))
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, cached)
        except OSError:
            # The cache only saves downloads; a full disk, or a folder close() removed, must not fail
            # a read whose bytes are already in memory.
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _evict(self, room_for: int) -> None:
        """Delete least recently used cached shards until `room_for` more bytes fit under the bound.

        Several processes sharing the folder may each add a shard after checking, so the bound can
        be passed by a few shards for a moment; the next eviction brings it back.
        """
        now = time.time()
        files: list[tuple[float, str, int]] = []  # (last use, path, size) of finished shards
        total = 0
        with os.scandir(self.cache_dir) as scan:
            for item in scan:
                if not _CACHED_NAME.fullmatch(item.name):
                    continue  # not ours: a shared folder may hold other things, never delete them
                try:
                    info = item.stat()
                except FileNotFoundError:
                    continue
                if item.name.endswith(".tmp"):
                    if now - info.st_mtime > STALE_TMP_SECONDS:
                        with contextlib.suppress(OSError):
                            os.unlink(item.path)
                        continue
                else:
                    files.append((info.st_mtime, item.path, info.st_size))
                total += info.st_size  # another writer's shard in progress counts too
        with _reading_lock:
            busy = set(_reading)
        for _, path, size in sorted(files):
            if total + room_for <= self.cache_max_bytes:
                break
            if path in busy:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # another reader of the folder evicted it first
            except OSError:
                continue
            total -= size

    def lengths(self, index: int) -> np.ndarray:
        entry = self.entries[index]
        if "row_num_samples" in entry:
            return np.asarray(entry["row_num_samples"], dtype=np.int64)
        if self._arrow_fs is None:
            self._arrow_fs = self.store.arrow_filesystem()
        fs, base = self._arrow_fs
        path = f"{base.rstrip('/')}/{entry['path']}" if base else entry["path"]
        try:
            # This read bypasses the store's methods, so it gets the store's retries explicitly; an
            # outage that outlasts them raises StorageError, which the fallback below lets through.
            table = self.store.retry(lambda: pq.read_table(path, columns=["num_samples"], filesystem=fs),
                                     "read num_samples", entry["path"])
        except (pa.ArrowException, OSError):
            # This column read skips the checksum; a damaged footer would otherwise surface as a bare
            # Arrow error that names no shard. Fetch the whole shard to say which one and why.
            self._fetch(entry)
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
                 cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES, prefetch: int = 2, shuffle_shards: int = 4,
                 pin_memory: bool = False, allow_fewer_batches_than_ranks: bool = False):
        entries = [s for s in manifest["shards"] if s["split"] == split]
        if not entries:
            raise ValueError(f"{store.url('manifest.json')}: no {split!r} shards")
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards must be at least 1, got {shuffle_shards}")
        sample_rate = int(manifest["sample_rate"])
        self.source = ShardSource(store, entries, cache_dir, cache_max_bytes)
        self.split = split
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size = batch_size
        self.max_batch_samples = int(max_batch_seconds * sample_rate)
        self.bucket_samples = int(BUCKET_SECONDS * sample_rate)
        self.pad_id = pad_id
        self.prefetch = prefetch
        self.shuffle_shards = shuffle_shards
        self.allow_fewer_batches_than_ranks = allow_fewer_batches_than_ranks
        # Pinning needs CUDA; like torch's DataLoader, asking for it without CUDA does nothing.
        self.pin_memory = pin_memory and _cuda_available()
        self.shard_lengths = [self.source.lengths(i) for i in range(len(entries))]
        longest = max(int(lengths.max()) for lengths in self.shard_lengths if len(lengths))
        if longest > self.max_batch_samples:
            raise ValueError(f"train.max_batch_seconds ({max_batch_seconds}) is shorter than the longest "
                             f"utterance ({longest / sample_rate:.2f} s)")
        self.loader_time = 0.0  # seconds spent waiting for the last batch
        self._cached_plan: tuple[int, list[PlannedBatch]] | None = None

    def close(self) -> None:
        """Remove the shard cache if the reader made a temporary one (see ShardSource.close).

        Call it once no iter_epoch is running; the prefetch threads end with their epoch already.
        """
        self.source.close()

    def plan(self, epoch: int) -> list[PlannedBatch]:
        # batches_per_epoch and iter_epoch both ask for the same epoch; packing ~20k rows takes ~0.1 s.
        if self._cached_plan is None or self._cached_plan[0] != epoch:
            plan = plan_epoch(self.shard_lengths, self.rank, self.world_size, self.seed, epoch, self.batch_size,
                              self.max_batch_samples, self.bucket_samples, self.shuffle_shards, split=self.split,
                              allow_fewer_batches_than_ranks=self.allow_fewer_batches_than_ranks)
            self._cached_plan = (epoch, plan)
        return list(self._cached_plan[1])

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self.plan(epoch))

    def utterances_per_epoch(self) -> int:
        """Distinct rows of the split: what all ranks together see once per epoch (fill-ins aside)."""
        return sum(len(lengths) for lengths in self.shard_lengths)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[VitsBatch]:
        """Batches `start`, `start + 1`, ... of `epoch`; shards only batches before `start` need are never read."""
        plan = self.plan(epoch)[start:]
        reads = shard_reads(plan)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        try:
            queued: dict[int, Future] = {}  # position in `reads` -> decoded shard, submitted ahead of need
            in_use: dict[int, tuple[ShardRead, Future]] = {}  # shard -> the read batches take rows from now
            submitted = reached = 0
            for index, planned in enumerate(plan):
                started = time.perf_counter()
                first_new = reached
                while reached < len(reads) and reads[reached].first == index:
                    reached += 1
                # Reads are in order of first need, so the worker decodes the shards this batch needs
                # first, then up to `prefetch` shards beyond them while the step runs.
                while submitted < min(len(reads), reached + self.prefetch):
                    queued[submitted] = pool.submit(self._decode, reads[submitted].shard)
                    submitted += 1
                for position in range(first_new, reached):
                    in_use[reads[position].shard] = (reads[position], queued.pop(position))
                decoded = {shard: in_use[shard][1].result() for shard in planned.shards}
                batch = self._collate(planned, decoded)
                del decoded
                for shard, (read, _) in list(in_use.items()):
                    if read.last == index:  # the rest of the plan needs this read no more
                        del in_use[shard]
                self.loader_time = time.perf_counter() - started
                yield batch
        finally:
            # A consumer that stops early (max_steps, val_batches) must not wait for shards it will
            # never use: drop the queued prefetches, wait only for the one in flight.
            pool.shutdown(wait=True, cancel_futures=True)

    def _decode(self, shard: int) -> _DecodedShard:
        return _DecodedShard(self.source.read(shard))

    def _collate(self, planned: PlannedBatch, decoded: dict[int, _DecodedShard]) -> VitsBatch:
        rows = [(decoded[shard], row) for shard, row in planned.rows]
        batch = collate([d.ids[r] for d, r in rows], [d.speakers[r] for d, r in rows],
                        [d.texts[r] for d, r in rows], [d.token_ids[r] for d, r in rows],
                        [d.pcm(r) for d, r in rows], self.pad_id)
        batch.wrapped = planned.wrapped
        return batch.pin_memory() if self.pin_memory else batch


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
