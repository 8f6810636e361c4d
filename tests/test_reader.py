"""The shard reader: per-rank shares, determinism, resume, padding, S3, checksums, and a real GAN step."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vits_ray.config import load_config
from vits_ray.data.ingest import prepare_corpus
from vits_ray.data.reader import ShardReader
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
                cache_dir="", prefetch=2) -> ShardReader:
    store = open_store(str(uri))
    manifest = read_manifest(store)
    pad_id = _pad_id(manifest)
    return ShardReader(store, manifest, split, rank, world_size, seed=seed, batch_size=batch_size,
                       max_batch_seconds=max_batch_seconds, pad_id=pad_id, cache_dir=cache_dir, prefetch=prefetch)


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


def shard_rows(uri) -> dict[str, dict]:
    """id -> {token_ids, pcm, num_samples} read straight from the train shards with pyarrow."""
    rows = {}
    for path in sorted(Path(uri, "shards").glob("train-*.parquet")):
        table = pq.read_table(path).to_pylist()
        for row in table:
            rows[row["id"]] = {"token_ids": row["token_ids"], "num_samples": row["num_samples"],
                               "pcm": np.frombuffer(row["audio_pcm16"], dtype="<i2")}
    return rows


# --- sharing between ranks ------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_disjoint_shares_and_equal_batch_counts(many_shards, world_size):
    all_ids = set(shard_rows(many_shards))
    for epoch in (0, 1):
        seen: dict[str, int] = {}
        counts = []
        for rank in range(world_size):
            reader = make_reader(many_shards, rank, world_size)
            batches = ids_per_batch(reader, epoch)
            assert len(batches) == reader.batches_per_epoch(epoch) > 0
            counts.append(len(batches))
            for ids in batches:
                for uid in ids:
                    assert uid not in seen, f"{uid} on rank {seen[uid]} and rank {rank} in epoch {epoch}"
                    seen[uid] = rank
        assert len(set(counts)) == 1, counts
        assert set(seen) <= all_ids
        if world_size == 1:  # a single worker sees the whole split every epoch
            assert set(seen) == all_ids


def test_too_few_shards_for_the_world_size_is_a_clear_error(prepared_demo):
    manifest = read_manifest(open_store(str(prepared_demo)))
    train_shards = sum(1 for s in manifest["shards"] if s["split"] == "train")
    reader = make_reader(prepared_demo, 0, train_shards + 1)
    with pytest.raises(ValueError, match=rf"{train_shards} train shard\(s\) but {train_shards + 1} workers"):
        reader.batches_per_epoch(0)
    with pytest.raises(ValueError, match="rows_per_shard"):
        next(reader.iter_epoch(0))


# --- order --------------------------------------------------------------------------------

def test_same_seed_and_epoch_give_the_same_order_and_other_epochs_differ(many_shards):
    first = make_reader(many_shards, 1, 2)
    again = make_reader(many_shards, 1, 2)
    assert ids_per_batch(first, 0) == ids_per_batch(again, 0)
    assert ids_per_batch(first, 3) == ids_per_batch(again, 3)
    assert ids_per_batch(first, 0) != ids_per_batch(first, 1)
    assert ids_per_batch(first, 0) != ids_per_batch(make_reader(many_shards, 1, 2, seed=SEED + 1), 0)


@pytest.mark.parametrize("start", [1, 3, 6])
def test_resume_inside_an_epoch_yields_the_rest_of_the_epoch(many_shards, start):
    reader = make_reader(many_shards, 0, 1, batch_size=2)
    full = list(reader.iter_epoch(2))
    assert len(full) > start
    resumed_reader = make_reader(many_shards, 0, 1, batch_size=2)
    read = []
    original = resumed_reader.source.read
    resumed_reader.source.read = lambda index: (read.append(index), original(index))[1]
    resumed = list(resumed_reader.iter_epoch(2, start=start))
    assert_same_batches(resumed, full[start:])
    # Shards that only held batches before `start` are never fetched.
    plan = resumed_reader.plan(2)
    assert set(read) == {b.shard for b in plan[start:]}


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
    # The first shard was used, the second was in flight; the two queued behind it never start.
    assert len(read) <= 2, read


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
    assert all(math.isfinite(v) for v in result.losses.values()), result.losses
    assert not result.skipped_0 and not result.skipped_1
