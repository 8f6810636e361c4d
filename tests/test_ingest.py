"""`prepare`: every kind of bad utterance rejected with its reason, every good one kept, to a local
folder and to S3 (moto on 127.0.0.1); deterministic bytes; safe overwrite; manifest checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from vits_ray.config import Config, replace
from vits_ray.data.audio import trim_bounds
from vits_ray.data.formats import FORMATS
from vits_ray.data.ingest import assign_splits, prepare_corpus
from vits_ray.data.shards import SHARD_SCHEMA, read_manifest, read_shard, verify_shard
from vits_ray.storage import StorageError, open_store
from vits_ray.text import Vocabulary, normalize_text

SR = 22050
SENTENCES = [
    "আমার সোনার বাংলা, আমি তোমায় ভালোবাসি।",
    "চিরদিন তোমার আকাশ, তোমার বাতাস।",
    "ঢাকা বাংলাদেশের রাজধানী।",
    "আজ আকাশে মেঘ করেছে।",
    "বই পড়তে আমার খুব ভালো লাগে।",
    "নদীর পাড়ে একটি ছোট গ্রাম।",
]


def _config(**data) -> Config:
    # Short limits keep the synthetic audio, and so the test, small.
    return replace(Config(), data={"min_seconds": 0.3, "max_seconds": 2.0, "rows_per_shard": 4,
                                   "val_fraction": 0.2, **data})


def _tone(seconds: float, sr: int = SR, freq: float = 220.0, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (amp * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def _write(path: Path, y: np.ndarray, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), y, sr, subtype="PCM_16")


def _pcm16(path: Path) -> np.ndarray:
    return sf.read(str(path), dtype="int16")[0]


# id -> expected rejection reason, for the corpus built by _bad_and_good_entries.
EXPECTED_REJECTIONS = {
    "missing": "missing_audio",
    "undecodable": "undecodable_audio",
    "short": "too_short",
    "silent": "too_short",
    "long": "too_long",
    "empty": "empty_text",
    "latin": "unsupported_characters",
    "clipped": "clipped",
    "good_00": "duplicate_id",  # the second line with this id
}


def _bad_and_good_entries(wavs: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Write audio under `wavs`; return (id, text) transcript entries and the ids to be accepted."""
    entries, good = [], []
    for i in range(12):
        uid = f"good_{i:02d}"
        silence = np.zeros(int(0.25 * SR), np.float32)
        loud = i in (3, 7)  # near full scale (but not clipped), so lossless storage is really tested
        tone = _tone(0.5 + 0.1 * i, seed=i, amp=0.95 if loud else 0.3)
        _write(wavs / f"{uid}.wav", np.concatenate([silence, tone, silence]))
        entries.append((uid, SENTENCES[i % len(SENTENCES)]))
        good.append(uid)
    stereo = np.stack([_tone(0.8, freq=200), _tone(0.8, freq=330, seed=1)], axis=1)
    _write(wavs / "stereo.wav", stereo)
    _write(wavs / "rate16k.wav", _tone(0.9, sr=16000), sr=16000)
    _write(wavs / "rate44k.wav", _tone(0.7, sr=44100), sr=44100)
    entries += [("stereo", SENTENCES[0]), ("rate16k", SENTENCES[1]), ("rate44k", SENTENCES[2])]
    good += ["stereo", "rate16k", "rate44k"]

    (wavs / "undecodable.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    _write(wavs / "short.wav", _tone(0.1))
    _write(wavs / "silent.wav", np.zeros(SR, np.float32))
    _write(wavs / "long.wav", _tone(2.5))
    _write(wavs / "empty.wav", _tone(0.6))
    _write(wavs / "latin.wav", _tone(0.6))
    square = np.sign(np.sin(2 * np.pi * 100 * np.arange(int(0.6 * SR)) / SR)).astype(np.float32)
    _write(wavs / "clipped.wav", square)
    entries += [("missing", SENTENCES[3]), ("undecodable", SENTENCES[3]), ("short", SENTENCES[4]),
                ("silent", SENTENCES[4]), ("long", SENTENCES[5]), ("empty", "   "),
                ("latin", "আমি ABC বলি"), ("clipped", SENTENCES[0]), ("good_00", SENTENCES[1])]
    return entries, sorted(good)


@pytest.fixture(scope="module")
def ljspeech_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("ljs") / "my_corpus"
    entries, good = _bad_and_good_entries(root / "wavs")
    lines = [f"{uid}|{text}|ignored normalized column" for uid, text in entries]
    lines.insert(3, "no_separator_at_all")
    lines.insert(7, "a|b|c|d")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return root, good


@pytest.fixture(scope="module")
def slr37_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("slr") / "slr37"
    lines, good = [], []
    for i in range(6):
        uid = f"bnb{i % 2}_{i:05d}_{i * 7919:08d}"
        _write(root / "wavs" / f"{uid}.wav", _tone(0.5 + 0.05 * i, seed=i))
        lines.append(f"{uid}\t{SENTENCES[i]}")
        good.append(uid)
    _write(root / "wavs" / "bnb9_short.wav", _tone(0.05))
    lines += ["bnb9_short\t" + SENTENCES[0], "tab_missing " + SENTENCES[1], "bnb9_missing\t" + SENTENCES[2]]
    (root / "line_index.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, sorted(good)


def _read_all(store) -> tuple[dict, dict[str, dict]]:
    manifest = read_manifest(store)
    rows = {}
    for entry in manifest["shards"]:
        table = read_shard(store, entry)
        assert table.schema.equals(SHARD_SCHEMA)
        assert table.num_rows == entry["rows"] <= manifest["data"]["rows_per_shard"]
        ids = table.column("id").to_pylist()
        assert ids == sorted(ids)
        assert entry["num_samples_min"] == min(table.column("num_samples").to_pylist())
        assert entry["num_samples_max"] == max(table.column("num_samples").to_pylist())
        for row in table.to_pylist():
            assert row["id"] not in rows
            rows[row["id"]] = {**row, "split": entry["split"]}
    return manifest, rows


def _check_ljspeech_output(store, corpus: Path, good: list[str], config: Config) -> dict:
    manifest, rows = _read_all(store)
    got = {r["id"]: r["reason"] for r in manifest["rejected"]}
    assert got == {**EXPECTED_REJECTIONS, "metadata.csv:4": "malformed_line", "a": "malformed_line"}
    assert sorted(rows) == good  # every good utterance kept
    assert manifest["num_utterances"] == len(good)
    assert manifest["num_rejected"] == len(manifest["rejected"]) == 11
    assert manifest["rejected_by_reason"] == {"clipped": 1, "duplicate_id": 1, "empty_text": 1,
                                              "malformed_line": 2, "missing_audio": 1, "too_long": 1,
                                              "too_short": 2, "undecodable_audio": 1,
                                              "unsupported_characters": 1}
    details = {r["id"]: r["detail"] for r in manifest["rejected"]}
    assert "U+0041 LATIN CAPITAL LETTER A" in details["latin"]
    assert "< min 0.3 s" in details["short"] and "> max 2 s" in details["long"]
    assert "line 4" in details["metadata.csv:4"] and "line 8" in details["a"]
    assert manifest["speakers"] == ["ljspeech"]
    assert manifest["sample_rate"] == SR
    assert manifest["source"] == {"format": "ljspeech", "input_dir": "my_corpus"}

    vocab = Vocabulary.from_dict(manifest["vocab"])
    for uid, row in rows.items():
        assert row["text"] in SENTENCES
        assert row["normalized_text"] == normalize_text(row["text"])
        assert row["token_ids"] == vocab.encode(row["normalized_text"])
        assert len(row["audio_pcm16"]) == 2 * row["num_samples"]
    # 16-bit mono input at the target rate is stored losslessly, silence trimmed.
    for uid in ("good_03", "good_07"):
        original = _pcm16(corpus / "wavs" / f"{uid}.wav")
        start, end = trim_bounds(original.astype(np.float32) / 32768, config.data.trim_top_db)
        assert end - start < original.size  # silence was trimmed
        stored = np.frombuffer(rows[uid]["audio_pcm16"], "<i2")
        np.testing.assert_array_equal(stored, original[start:end])
    # Other rates and stereo come out mono at 22,050 Hz with their duration.
    for uid, seconds in (("stereo", 0.8), ("rate16k", 0.9), ("rate44k", 0.7)):
        assert abs(rows[uid]["num_samples"] / SR - seconds) < 0.03, uid

    splits = manifest["splits"]
    assert splits["train"]["utterances"] + splits["val"]["utterances"] == len(good)
    assert splits["val"]["utterances"] >= 1 and splits["train"]["utterances"] >= 1
    expected = assign_splits(good, config.data.val_fraction)
    assert {uid: row["split"] for uid, row in rows.items()} == expected
    assert abs(manifest["total_seconds"] - sum(r["num_samples"] for r in rows.values()) / SR) < 1e-3
    return manifest


def _files(store) -> dict[str, bytes]:
    return {key: store.read_bytes(key) for key in store.list()}


def test_formats_registry():
    assert set(FORMATS) >= {"ljspeech", "slr37"}
    with pytest.raises(ValueError, match="unknown corpus format 'nope'"):
        prepare_corpus(Path("."), "nope", "/tmp/unused", _config(), progress=False)


def test_ljspeech_local_rejects_each_bad_entry_and_is_deterministic(ljspeech_corpus, tmp_path, capsys):
    corpus, good = ljspeech_corpus
    config = _config()
    out = tmp_path / "out"
    summary = prepare_corpus(corpus, "ljspeech", str(out), config, progress=False)
    store = open_store(str(out))
    manifest = _check_ljspeech_output(store, corpus, good, config)
    assert summary.accepted == len(good) and summary.rejected == 11
    assert summary.rejected_by_reason == manifest["rejected_by_reason"]
    text = summary.format_text()
    assert f"accepted  {len(good)} utterances" in text and "unsupported_characters" in text
    assert capsys.readouterr().err == ""  # progress=False: no progress bar

    for entry in manifest["shards"]:
        data = store.read_bytes(entry["path"])
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    first = _files(store)
    assert "vocab.json" in first and json.loads(first["vocab.json"]) == manifest["vocab"]
    assert first["manifest.json"] == (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False)
                                      + "\n").encode()
    # Running again gives byte-identical output.
    prepare_corpus(corpus, "ljspeech", str(out), config, progress=False)
    assert _files(store) == first


def test_ljspeech_to_s3_matches_local_bytes(ljspeech_corpus, s3_uri, tmp_path):
    corpus, good = ljspeech_corpus
    config = _config()
    prepare_corpus(corpus, "ljspeech", str(tmp_path / "local"), config, progress=False)
    prepare_corpus(corpus, "ljspeech", s3_uri, config, progress=True)
    s3 = open_store(s3_uri)
    _check_ljspeech_output(s3, corpus, good, config)
    assert _files(s3) == _files(open_store(str(tmp_path / "local")))


def test_slr37_to_s3(slr37_corpus, s3_uri):
    corpus, good = slr37_corpus
    summary = prepare_corpus(corpus, "slr37", s3_uri, _config(), progress=False)
    manifest, rows = _read_all(open_store(s3_uri))
    assert sorted(rows) == good
    assert {r["id"]: r["reason"] for r in manifest["rejected"]} == {
        "bnb9_short": "too_short", "line_index.tsv:8": "malformed_line", "bnb9_missing": "missing_audio"}
    assert manifest["speakers"] == ["bnb0", "bnb1"]
    assert {r["speaker"] for r in rows.values()} == {"bnb0", "bnb1"}
    assert rows[good[0]]["speaker"] == good[0].split("_")[0]
    assert summary.num_speakers == 2 and manifest["source"]["format"] == "slr37"


def test_overwrite_removes_stale_shards_and_keeps_manifest_consistent(slr37_corpus, tmp_path):
    corpus, good = slr37_corpus
    out = str(tmp_path / "out")
    store = open_store(out)
    prepare_corpus(corpus, "slr37", out, _config(rows_per_shard=1), progress=False)
    assert len(read_manifest(store)["shards"]) == len(good)
    store.write_bytes("shards/train-00099.parquet", b"left over from somewhere")
    prepare_corpus(corpus, "slr37", out, _config(rows_per_shard=100), progress=False)
    manifest = read_manifest(store)
    assert sorted(e["path"] for e in manifest["shards"]) == store.list("shards")
    assert [e["path"] for e in manifest["shards"]] == ["shards/train-00000.parquet", "shards/val-00000.parquet"]
    for entry in manifest["shards"]:
        verify_shard(store, entry, store.read_bytes(entry["path"]))


def test_failed_prepare_leaves_previous_output(slr37_corpus, tmp_path):
    corpus, _ = slr37_corpus
    out = str(tmp_path / "out")
    prepare_corpus(corpus, "slr37", out, _config(), progress=False)
    before = _files(open_store(out))
    # Every utterance too short: nothing to write, and the old dataset must survive.
    with pytest.raises(ValueError, match="no utterance passed validation"):
        prepare_corpus(corpus, "slr37", out, _config(min_seconds=1.9), progress=False)
    assert _files(open_store(out)) == before


def test_half_written_output_is_detected(slr37_corpus, s3_uri):
    corpus, _ = slr37_corpus
    store = open_store(s3_uri)
    with pytest.raises(StorageError, match=r"manifest.json not found: run `vits-ray prepare` first"):
        read_manifest(store)
    prepare_corpus(corpus, "slr37", s3_uri, _config(), progress=False)
    store.delete("manifest.json")  # as if prepare died between the shards and the manifest
    with pytest.raises(StorageError, match=r"unfinished prepare\): run `vits-ray prepare` first") as info:
        read_manifest(store)
    assert s3_uri + "/manifest.json" in str(info.value)
    store.write_bytes("manifest.json", b'{"format_version": 99}')
    with pytest.raises(ValueError, match="format_version 99"):
        read_manifest(store)


def test_verify_shard_catches_corruption(slr37_corpus, tmp_path):
    corpus, _ = slr37_corpus
    out = str(tmp_path / "out")
    prepare_corpus(corpus, "slr37", out, _config(), progress=False)
    store = open_store(out)
    entry = read_manifest(store)["shards"][0]
    data = bytearray(store.read_bytes(entry["path"]))
    verify_shard(store, entry, bytes(data))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="sha256"):
        verify_shard(store, entry, bytes(data))
    with pytest.raises(ValueError, match="truncated"):
        verify_shard(store, entry, bytes(data[:-1]))
    pq.read_table(pa.BufferReader(store.read_bytes(entry["path"])))  # the intact shard still reads


def test_assign_splits_rule():
    ids = [f"utt_{i:04d}" for i in range(2000)]
    split = assign_splits(ids, 0.1)
    assert split == assign_splits(list(reversed(ids)), 0.1)
    assert 150 < sum(s == "val" for s in split.values()) < 250
    # An id's split does not depend on the rest of the corpus (away from the tiny-corpus nudge).
    assert {i: split[i] for i in ids[:100]} == assign_splits(ids[:100], 0.1)
    assert set(assign_splits(ids, 0.0).values()) == {"train"}
    for n in (2, 3, 5):
        assert set(assign_splits(ids[:n], 0.01).values()) == {"train", "val"}
        assert set(assign_splits(ids[:n], 0.99).values()) == {"train", "val"}
    assert assign_splits(["only"], 0.5) in ({"only": "train"}, {"only": "val"})


def test_process_pool_gives_the_same_bytes(ljspeech_corpus, tmp_path, monkeypatch):
    import vits_ray.data.ingest as ingest

    corpus, _ = ljspeech_corpus
    prepare_corpus(corpus, "ljspeech", str(tmp_path / "serial"), _config(), progress=False)
    monkeypatch.setattr(ingest, "POOL_MIN_BYTES", 0)  # force the pool on this small corpus
    prepare_corpus(corpus, "ljspeech", str(tmp_path / "pool"), _config(), progress=False)
    assert _files(open_store(str(tmp_path / "pool"))) == _files(open_store(str(tmp_path / "serial")))


def test_trim_matches_librosa():
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    for _ in range(30):
        n1, n2, n3 = rng.integers(1, 20000, 3)
        y = np.concatenate([rng.normal(0, 1e-4, n1), 0.5 * np.sin(np.arange(n2) * 0.05),
                            rng.normal(0, 10 ** -rng.uniform(1, 5), n3)]).astype(np.float32)
        top_db = float(rng.uniform(10, 60))
        _, (start, end) = librosa.effects.trim(y, top_db=top_db)
        assert trim_bounds(y, top_db) == (int(start), int(end))


def test_demo_corpus_is_accepted_whole(demo_corpus_dir, tmp_path):
    summary = prepare_corpus(demo_corpus_dir, "ljspeech", str(tmp_path / "out"), Config(), progress=False)
    manifest, rows = _read_all(open_store(str(tmp_path / "out")))
    assert manifest["rejected"] == [] and summary.rejected == 0
    assert summary.accepted == len(rows) == 24
    assert manifest["splits"]["val"]["utterances"] >= 1
