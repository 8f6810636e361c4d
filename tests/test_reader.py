"""The shard reader: the epoch plan, per-rank shares, determinism, resume, padding, S3, checksums, a GAN step."""

from __future__ import annotations

import gc
import math
import shutil
import weakref
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vits_ray.config import load_config
from vits_ray.data.ingest import prepare_corpus
from vits_ray.data.reader import PlannedBatch, ShardReader, plan_epoch, plan_global_epoch
from vits_ray.data.shards import read_manifest
from vits_ray.storage import open_store

SEED = 54321


@pytest.fixture(scope="module")
def many_shards(demo_corpus_dir, tmp_path_factory) -> Path:
    """The demo corpus with 3 rows per shard: 7 train shards, enough for 3 ranks."""
    out = tmp_path_factory.mktemp("many_shards")
    prepare_corpus(demo_corpus_dir, "ljspeech", str(out), load_config("tiny", ["data.rows_per_shard=3"]),
                   progress=False)
    return out


def make_reader(uri, rank=0, world_size=1, *, seed=SEED, batch_size=4, max_batch_seconds=30.0, split="train",
                cache_dir="", prefetch=2, **options) -> ShardReader:
    store = open_store(str(uri))
    manifest = read_manifest(store)
    pad_id = _pad_id(manifest)
    return ShardReader(store, manifest, split, rank, world_size, seed=seed, batch_size=batch_size,
                       max_batch_seconds=max_batch_seconds, pad_id=pad_id, cache_dir=cache_dir, prefetch=prefetch,
                       **options)


def _pad_id(manifest) -> int:
    from vits_ray.text import Vocabulary

    return Vocabulary.from_dict(manifest["vocab"]).pad_id


def ids_per_batch(reader: ShardReader, epoch: int) -> list[list[str]]:
    return [list(b.ids) for b in reader.iter_epoch(epoch)]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.ids == y.ids and x.speakers == y.speakers and x.texts == y.texts
        for name in ("tokens", "token_lens", "waveform", "waveform_lens"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def _row_splits(uri) -> dict[str, str]:
    """id -> split, from every shard."""
    splits = {}
    for path in sorted(Path(uri, "shards").glob("*.parquet")):
        for uid in pq.read_table(path, columns=["id"]).column("id").to_pylist():
            splits[uid] = path.name.split("-")[0]
    return splits


def shard_rows(uri) -> dict[str, dict]:
    """id -> {token_ids, pcm, num_samples} read straight from the train shards with pyarrow."""
    rows = {}
    for path in sorted(Path(uri, "shards").glob("train-*.parquet")):
        table = pq.read_table(path).to_pylist()
        for row in table:
            rows[row["id"]] = {"token_ids": row["token_ids"], "num_samples": row["num_samples"],
                               "pcm": np.frombuffer(row["audio_pcm16"], dtype="<i2")}
    return rows


# --- the epoch plan (no shard reads) --------------------------------------------------------

SR = 22050
SYNTHETIC = dict(batch_size=8, max_batch_samples=60 * SR, bucket_samples=SR // 4)


def synthetic_lengths(seed: int = 0, shards: int = 12) -> list[np.ndarray]:
    """Shards of 5..40 rows, 1-10 s at 22050 Hz: uneven shards, as the last shard of a split is."""
    rng = np.random.default_rng(seed)
    return [rng.integers(SR, 10 * SR, int(rng.integers(5, 41))) for _ in range(shards)]


def check_rank_plans(plans: list[list[PlannedBatch]], global_plan: list[PlannedBatch], all_rows: set) -> None:
    """What every epoch's plans must satisfy, whatever the world size."""
    world = len(plans)
    assert len({len(plan) for plan in plans}) == 1, [len(plan) for plan in plans]
    own = [batch for plan in plans for batch in plan if not batch.wrapped]
    # The ranks' own batches, in rank order, are the global list: contiguous ranges, nothing dropped.
    assert own == global_plan
    rows = [row for batch in own for row in batch.rows]
    assert len(rows) == len(set(rows)) and set(rows) == all_rows
    wrapped = [batch for plan in plans for batch in plan if batch.wrapped]
    assert len(wrapped) == len(plans[0]) * world - len(global_plan) < world
    # Fill-ins repeat the start of the epoch, each global batch at most once.
    assert [b.rows for b in wrapped] == [b.rows for b in global_plan[: len(wrapped)]]
    for plan in plans:  # fill-ins only ever come at the end of a rank's plan
        flags = [b.wrapped for b in plan]
        assert flags == sorted(flags)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_synthetic_plan_covers_every_row_once_with_equal_counts(world_size):
    lengths = synthetic_lengths()
    all_rows = {(s, r) for s, shard in enumerate(lengths) for r in range(len(shard))}
    orders = []
    for epoch in (0, 1):
        global_plan = plan_global_epoch(lengths, SEED, epoch, **SYNTHETIC)
        # Each rank computes its plan on its own; nothing is shared but the arguments.
        plans = [plan_epoch(lengths, rank, world_size, SEED, epoch, **SYNTHETIC) for rank in range(world_size)]
        check_rank_plans(plans, global_plan, all_rows)
        assert plans == [plan_epoch(synthetic_lengths(), rank, world_size, SEED, epoch, **SYNTHETIC)
                         for rank in range(world_size)]
        orders.append(global_plan)
    assert orders[0] != orders[1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_real_shards_plan_covers_every_utterance_once_on_every_rank_count(many_shards, world_size):
    all_rows = None
    plans_by_epoch = []
    for epoch in (0, 1):
        readers = [make_reader(many_shards, rank, world_size, batch_size=2) for rank in range(world_size)]
        lengths = readers[0].shard_lengths
        all_rows = {(s, r) for s, shard in enumerate(lengths) for r in range(len(shard))}
        assert readers[0].utterances_per_epoch() == len(all_rows) == len(shard_rows(many_shards))
        global_plan = plan_global_epoch(lengths, SEED, epoch, 2, readers[0].max_batch_samples,
                                        readers[0].bucket_samples)
        plans = [reader.plan(epoch) for reader in readers]
        check_rank_plans(plans, global_plan, all_rows)
        assert all(reader.batches_per_epoch(epoch) == len(plans[0]) for reader in readers)
        plans_by_epoch.append(global_plan)
    assert plans_by_epoch[0] != plans_by_epoch[1]


def test_batches_mix_rows_and_neighbours_from_several_shards():
    lengths = synthetic_lengths(1, shards=16)

    def same_single_shard_neighbours(shuffle_shards: int) -> float:
        plan = plan_epoch(lengths, 0, 2, SEED, 0, **SYNTHETIC, shuffle_shards=shuffle_shards)
        pairs = list(zip(plan, plan[1:]))
        return sum(len(a.shards) == 1 and a.shards == b.shards for a, b in pairs) / len(pairs)

    plan = plan_epoch(lengths, 0, 2, SEED, 0, **SYNTHETIC)
    assert sum(len(b.shards) > 1 for b in plan) > len(plan) / 2
    assert same_single_shard_neighbours(4) < 0.1
    # The measure is not trivially low: one-shard windows make runs from a single shard.
    assert same_single_shard_neighbours(1) > 0.5


def test_each_rank_reads_about_its_share_of_the_shards():
    shards, world, shuffle_shards = 40, 8, 4
    lengths = [np.random.default_rng(s).integers(SR, 10 * SR, 32) for s in range(shards)]
    for rank in range(world):
        plan = plan_epoch(lengths, rank, world, SEED, 0, **SYNTHETIC, shuffle_shards=shuffle_shards)
        touched = {shard for batch in plan if not batch.wrapped for shard in batch.shards}
        # Its own windows, plus the windows it shares with its neighbours at both ends of its range.
        assert len(touched) <= shards / world + 2 * shuffle_shards, (rank, sorted(touched))


def test_fewer_batches_than_workers_is_a_clear_error(prepared_demo):
    batches = make_reader(prepared_demo).batches_per_epoch(0)
    reader = make_reader(prepared_demo, 0, batches + 1)
    message = rf"the train split packs into {batches} batch\(es\) per epoch, fewer than the {batches + 1} workers"
    with pytest.raises(ValueError, match=message):
        reader.batches_per_epoch(0)
    with pytest.raises(ValueError, match=message):
        next(reader.iter_epoch(0))


def test_validation_may_leave_ranks_without_batches(prepared_demo):
    val_ids = {uid for uid, split in _row_splits(prepared_demo).items() if split == "val"}
    world = 8
    with pytest.raises(ValueError, match="the val split packs into"):
        make_reader(prepared_demo, 0, world, split="val").batches_per_epoch(0)
    seen = []
    counts = []
    for rank in range(world):
        reader = make_reader(prepared_demo, rank, world, split="val", allow_fewer_batches_than_ranks=True)
        batches = list(reader.iter_epoch(0))
        counts.append(len(batches))
        assert not any(b.wrapped for b in batches)
        seen += [uid for b in batches for uid in b.ids]
    assert sorted(seen) == sorted(val_ids)
    assert 0 in counts  # more ranks than batches: the last ones get nothing, not repeats


# --- sharing between ranks, read for real -----------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_disjoint_shares_and_mark_the_fill_ins(many_shards, world_size):
    all_ids = set(shard_rows(many_shards))
    for epoch in (0, 1):
        seen: dict[str, int] = {}
        counts, wrapped = [], []
        for rank in range(world_size):
            reader = make_reader(many_shards, rank, world_size, batch_size=2)
            batches = list(reader.iter_epoch(epoch))
            assert len(batches) == reader.batches_per_epoch(epoch) > 0
            assert [b.wrapped for b in batches] == [p.wrapped for p in reader.plan(epoch)]
            counts.append(len(batches))
            wrapped += [b for b in batches if b.wrapped]
            for batch in (b for b in batches if not b.wrapped):
                for uid in batch.ids:
                    assert uid not in seen, f"{uid} on rank {seen[uid]} and rank {rank} in epoch {epoch}"
                    seen[uid] = rank
        assert len(set(counts)) == 1, counts
        assert set(seen) == all_ids
        assert len(wrapped) < world_size and all(uid in all_ids for b in wrapped for uid in b.ids)


def test_each_shard_is_read_once_and_released_after_its_window(many_shards):
    reader = make_reader(many_shards, batch_size=2, prefetch=1, shuffle_shards=2)
    reads, alive = [], []
    decode = reader._decode

    def tracked_decode(shard):
        decoded = decode(shard)
        reads.append(shard)
        alive.append(weakref.ref(decoded))
        return decoded

    reader._decode = tracked_decode
    for _ in reader.iter_epoch(0):
        gc.collect()
        # The shards of the current window (2) and one prefetched shard, at most.
        assert sum(ref() is not None for ref in alive) <= 3
    assert sorted(reads) == list(range(len(reader.source.entries)))


# --- order --------------------------------------------------------------------------------

def test_same_seed_and_epoch_give_the_same_order_and_other_epochs_differ(many_shards):
    first = make_reader(many_shards, 1, 2)
    again = make_reader(many_shards, 1, 2)
    assert ids_per_batch(first, 0) == ids_per_batch(again, 0)
    assert ids_per_batch(first, 3) == ids_per_batch(again, 3)
    assert ids_per_batch(first, 0) != ids_per_batch(first, 1)
    assert ids_per_batch(first, 0) != ids_per_batch(make_reader(many_shards, 1, 2, seed=SEED + 1), 0)


@pytest.mark.parametrize("rank,world_size,start", [(0, 1, 1), (0, 1, 6), (0, 1, 10), (2, 3, 1), (2, 3, 3)])
def test_resume_inside_an_epoch_yields_the_rest_of_the_epoch(many_shards, rank, world_size, start):
    reader = make_reader(many_shards, rank, world_size, batch_size=2)
    full = list(reader.iter_epoch(2))
    assert len(full) > start
    resumed_reader = make_reader(many_shards, rank, world_size, batch_size=2)
    read = []
    original = resumed_reader.source.read
    resumed_reader.source.read = lambda index: (read.append(index), original(index))[1]
    resumed = list(resumed_reader.iter_epoch(2, start=start))
    assert_same_batches(resumed, full[start:])
    assert [b.wrapped for b in resumed] == [b.wrapped for b in full[start:]]
    # Shards that only held batches before `start` are never fetched.
    plan = resumed_reader.plan(2)
    assert set(read) == {shard for b in plan[start:] for shard in b.shards}


# --- batch contents -------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size,max_batch_seconds", [(2, 100.0), (8, 7.0), (8, 12.0)])
def test_batches_respect_limits_and_are_padded_correctly(prepared_demo, batch_size, max_batch_seconds):
    manifest = read_manifest(open_store(str(prepared_demo)))
    pad_id, sr = _pad_id(manifest), manifest["sample_rate"]
    rows = shard_rows(prepared_demo)
    reader = make_reader(prepared_demo, batch_size=batch_size, max_batch_seconds=max_batch_seconds)
    batches = list(reader.iter_epoch(0))
    assert sorted(uid for b in batches for uid in b.ids) == sorted(rows)
    for batch in batches:
        n, max_len = len(batch), batch.waveform.shape[-1]
        assert 1 <= n <= batch_size
        assert n * max_len <= max_batch_seconds * sr
        assert batch.tokens.dtype == torch.long and batch.waveform.dtype == torch.float32
        assert batch.waveform.shape == (n, 1, int(batch.waveform_lens.max()))
        assert batch.tokens.shape == (n, int(batch.token_lens.max()))
        for i, uid in enumerate(batch.ids):
            row = rows[uid]
            t_len, w_len = int(batch.token_lens[i]), int(batch.waveform_lens[i])
            assert t_len == len(row["token_ids"]) and w_len == row["num_samples"] == len(row["pcm"])
            assert batch.tokens[i, :t_len].tolist() == row["token_ids"]
            assert torch.all(batch.tokens[i, t_len:] == pad_id)
            assert torch.equal(batch.waveform[i, 0, :w_len] * 32768.0, torch.from_numpy(row["pcm"].astype(np.float32)))
            assert torch.all(batch.waveform[i, 0, w_len:] == 0)
        assert batch.num_samples == sum(rows[uid]["num_samples"] for uid in batch.ids)
        assert batch.padded_samples == n * max_len - batch.num_samples


def test_a_batch_moves_to_a_device_as_it_is_and_reports_its_audio(prepared_demo):
    sr = read_manifest(open_store(str(prepared_demo)))["sample_rate"]
    batch = next(make_reader(prepared_demo).iter_epoch(0))
    assert batch.audio_seconds(sr) == pytest.approx(int(batch.waveform_lens.sum()) / sr)
    moved = batch.to_coqui("cpu", non_blocking=True)
    assert torch.equal(moved["waveform"], batch.waveform) and torch.equal(moved["tokens"], batch.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_copy_to_the_gpu_unchanged(prepared_demo):
    plain = next(make_reader(prepared_demo).iter_epoch(0))
    pinned = next(make_reader(prepared_demo, pin_memory=True).iter_epoch(0))
    assert pinned.waveform.is_pinned() and pinned.tokens.is_pinned()
    on_gpu = pinned.to_coqui("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu["waveform"].cpu(), plain.waveform)


def test_budget_shorter_than_the_longest_utterance_is_a_clear_error(prepared_demo):
    with pytest.raises(ValueError, match="max_batch_seconds"):
        make_reader(prepared_demo, max_batch_seconds=1.0)


# --- storage ------------------------------------------------------------------------------

def test_s3_gives_the_same_batches_as_local(demo_corpus_dir, prepared_demo, s3_uri, tmp_path):
    prepare_corpus(demo_corpus_dir, "ljspeech", s3_uri, load_config("tiny", ["data.rows_per_shard=8"]),
                   progress=False)
    local = make_reader(prepared_demo)
    remote = make_reader(s3_uri, cache_dir=str(tmp_path / "cache"))
    for epoch in (0, 1):
        assert_same_batches(list(remote.iter_epoch(epoch)), list(local.iter_epoch(epoch)))
    # The second epoch came from the local cache, one file per shard.
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == len(remote.source.entries)


def _corrupt(store, rel: str, how: str) -> None:
    data = bytearray(store.read_bytes(rel))
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        # "middle" hits the audio pages (the footer and num_samples stay readable, so only the
        # checksum catches it); "footer" breaks the metadata the planner reads first.
        at = len(data) // 2 if how == "middle" else len(data) - 200
        data[at: at + 16] = bytes(b ^ 0xFF for b in data[at: at + 16])
    store.write_bytes(rel, bytes(data))


@pytest.mark.parametrize("where,how", [("local", "middle"), ("local", "footer"), ("local", "truncated"),
                                       ("s3", "middle"), ("s3", "footer")])
def test_a_corrupt_shard_is_rejected_naming_its_uri(demo_corpus_dir, prepared_demo, tmp_path, where, how, request):
    if where == "local":
        uri = str(tmp_path / "data")
        shutil.copytree(prepared_demo, uri)
    else:
        uri = request.getfixturevalue("s3_uri")
        prepare_corpus(demo_corpus_dir, "ljspeech", uri, load_config("tiny", ["data.rows_per_shard=8"]),
                       progress=False)
    store = open_store(uri)
    entry = next(s for s in read_manifest(store)["shards"] if s["split"] == "train")
    _corrupt(store, entry["path"], how)
    # Nothing corrupt lands in the cache, so the second attempt checks again rather than trusting it.
    for _ in range(2):
        with pytest.raises(ValueError, match="checksum") as err:
            list(make_reader(uri, cache_dir=str(tmp_path / "cache")).iter_epoch(0))
        assert store.url(entry["path"]) in str(err.value)


def test_stopping_early_does_not_wait_for_queued_prefetches(many_shards):
    import time

    reader = make_reader(many_shards, prefetch=3)
    read = []
    original = reader.source.read

    def slow_read(index):
        read.append(index)
        if len(read) > 1:
            time.sleep(0.3)
        return original(index)

    reader.source.read = slow_read
    batches = reader.iter_epoch(0)
    next(batches)
    batches.close()  # what a training loop that hits max_steps does, via garbage collection
    # The first batch's shards were used, one more was in flight; those queued behind it never start.
    assert len(read) <= len(reader.plan(0)[0].shards) + 1, read


# --- the model takes the batches ------------------------------------------------------------

def test_a_demo_batch_runs_through_a_gan_step_of_the_tiny_model(prepared_demo):
    from vits_ray.model import build_model
    from vits_ray.step import Precision, gan_step
    from vits_ray.text import Vocabulary

    torch.manual_seed(0)
    cfg = load_config("tiny")
    manifest = read_manifest(open_store(str(prepared_demo)))
    vocab = Vocabulary.from_dict(manifest["vocab"])
    model = build_model(cfg, vocab)
    assert model.tokenizer.characters.pad_id == vocab.pad_id
    reader = make_reader(prepared_demo, batch_size=cfg.train.batch_size, max_batch_seconds=cfg.train.max_batch_seconds)
    # The shortest multi-utterance batch keeps the step quick on a shared CPU.
    batch = min((b for b in reader.iter_epoch(0) if len(b) > 1), key=lambda b: b.waveform.numel())
    batch_dict = model.format_batch_on_device(model.format_batch(batch.to_coqui("cpu")))
    result = gan_step(model, model.get_criterion(), model.get_optimizer(), None, batch_dict,
                      Precision.resolve("no", "cpu"), (1000.0, 1000.0))
    values = result.as_dict()
    assert all(math.isfinite(v) for v in values.values()), values
    assert not values["skipped_0"] and not values["skipped_1"]
