import numpy as np
import pytest
import soundfile as sf

from vits_ray.demo.corpus import SAMPLE_RATE, load_sentences, write_demo_corpus
from vits_ray.text import Vocabulary, normalize_text


def read_metadata(corpus_dir):
    lines = (corpus_dir / "metadata.csv").read_text(encoding="utf-8").splitlines()
    return [line.split("|") for line in lines]


def test_layout_and_audio(demo_corpus_dir):
    rows = read_metadata(demo_corpus_dir)
    assert len(rows) == 24
    assert [r[0] for r in rows] == [f"bn_demo_{i:04d}" for i in range(1, 25)]
    assert len({r[1] for r in rows}) == 24  # distinct sentences
    wavs = sorted((demo_corpus_dir / "wavs").iterdir())
    assert [w.stem for w in wavs] == [r[0] for r in rows]
    for utt_id, text, normalized in rows:
        assert normalized == normalize_text(text)
        info = sf.info(demo_corpus_dir / "wavs" / f"{utt_id}.wav")
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLE_RATE, 1, "PCM_16", "WAV")
        assert 0.3 <= info.duration <= 15, (utt_id, info.duration)
        audio, _ = sf.read(demo_corpus_dir / "wavs" / f"{utt_id}.wav", dtype="int16")
        assert audio.ndim == 1 and np.abs(audio).max() > 1000  # speech, not silence


def test_normalized_texts_round_trip_through_a_corpus_vocabulary(demo_corpus_dir):
    texts = [r[2] for r in read_metadata(demo_corpus_dir)]
    vocab = Vocabulary.build(texts)
    for text in texts:
        assert vocab.decode(vocab.encode(text)) == text
    assert any(c in "০১২৩৪৫৬৭৮৯" for r in read_metadata(demo_corpus_dir) for c in r[1])  # numbers were exercised


def test_same_arguments_give_identical_bytes(demo_corpus_dir, tmp_path):
    again = write_demo_corpus(tmp_path / "again", n=24, seed=0)
    first = sorted(p.relative_to(demo_corpus_dir) for p in demo_corpus_dir.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (demo_corpus_dir / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_seed_changes_the_selection(tmp_path):
    a = read_metadata(write_demo_corpus(tmp_path / "a", n=5, seed=1))
    b = read_metadata(write_demo_corpus(tmp_path / "b", n=5, seed=2))
    assert [r[1] for r in a] != [r[1] for r in b]


def test_too_many_utterances_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        write_demo_corpus(tmp_path, n=len(load_sentences()) + 1)
    assert not (tmp_path / "metadata.csv").exists()


def test_sentences_cover_the_brief():
    sentences = load_sentences()
    assert len(sentences) >= 80
    assert any(c in "0123456789" for s in sentences for c in s)
    assert any(len(s.split()) <= 2 for s in sentences) and any(len(s.split()) >= 20 for s in sentences)
    assert any(s.endswith("?") for s in sentences) and any(s.endswith("!") for s in sentences)
