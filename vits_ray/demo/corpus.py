"""A small Bangla speech corpus in LJSpeech layout, spoken by espeak-ng's Bengali voice.

It lets the whole pipeline (ingest, training, export) run end to end without a real data set.
The audio is robotic; the point is real Bangla text with aligned, deterministic audio.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import tempfile
import wave
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from importlib import resources
from pathlib import Path

from vits_ray.text import normalize_text

SAMPLE_RATE = 22050
_VOICE = b"bn"
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
_ESPEAK_CHARS_UTF8 = 1
# a sentence-final pause, as a recording would have; without it "না।" lasts under 0.3 s
_ESPEAK_ENDPAUSE = 0x1000
_POS_CHARACTER = 1


class _Espeak:
    """Just enough of espeak-ng's C API to turn one UTF-8 string into 16-bit mono PCM."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(),
                                     _ESPEAK_INITIALIZE_DONT_EXIT)
        if rate != SAMPLE_RATE:
            raise RuntimeError(f"espeak-ng initialised at {rate} Hz, expected {SAMPLE_RATE}")
        self._chunks: list[bytes] = []
        # keep a reference: ctypes frees the trampoline when the Python object dies
        self._callback = self._CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        if lib.espeak_SetVoiceByName(_VOICE) != 0:
            raise RuntimeError(f"espeak-ng has no voice {_VOICE.decode()!r}")
        self._lib = lib

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(ctypes.string_at(wav, num_samples * 2))
        return 0  # 0 = keep going

    def synthesize(self, text: str) -> bytes:
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8 | _ESPEAK_ENDPAUSE,
                                        None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
        return b"".join(self._chunks)


@lru_cache(maxsize=1)
def _espeak() -> _Espeak:
    return _Espeak()


def _synthesize_all(texts: list[str]) -> list[bytes]:
    return [_espeak().synthesize(t) for t in texts]


def synthesize(texts: list[str]) -> list[bytes]:
    """Little-endian int16 PCM at 22,050 Hz for each text, in a fresh process.

    espeak-ng keeps synthesis state between utterances (even across Terminate/Initialize),
    so the same text sounds slightly different depending on what was spoken before in the
    process. A fresh process per corpus makes the output depend on the arguments alone.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_synthesize_all, list(texts)).result()


def load_sentences() -> list[str]:
    raw = resources.files("vits_ray.demo").joinpath("sentences.txt").read_text(encoding="utf-8")
    sentences = [line.strip() for line in raw.splitlines()]
    sentences = [s for s in sentences if s and not s.startswith("#")]
    bad = [s for s in sentences if "|" in s]
    assert not bad, f"'|' would break metadata.csv: {bad}"
    return sentences


def choose_sentences(n: int, seed: int) -> list[str]:
    sentences = load_sentences()
    if not 1 <= n <= len(sentences):
        raise ValueError(f"the demo corpus has {len(sentences)} sentences; n must be 1..{len(sentences)}, got {n}")
    # a private Random: the global one may be seeded (or not) by whoever imported us
    return random.Random(seed).sample(sentences, n)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _wav_bytes(pcm: bytes) -> bytes:
    import io

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm)
    return buf.getvalue()


def write_demo_corpus(out_dir: Path, n: int = 40, seed: int = 0) -> Path:
    """Write `n` utterances to `out_dir` (metadata.csv + wavs/) and return `out_dir`.

    Same arguments, same bytes. metadata.csv (`id|text|normalized_text`) is written last and
    atomically, and any old one is removed first, so it never lists a missing or stale wav.
    """
    out_dir = Path(out_dir)
    raw = choose_sentences(n, seed)
    normalized = [normalize_text(s) for s in raw]
    wav_dir = out_dir / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    metadata = out_dir / "metadata.csv"
    metadata.unlink(missing_ok=True)

    rows = []
    for i, (text, norm, pcm) in enumerate(zip(raw, normalized, synthesize(normalized), strict=True), start=1):
        if not pcm:
            raise RuntimeError(f"espeak-ng produced no audio for {norm!r}")
        utt_id = f"bn_demo_{i:04d}"
        _write_atomically(wav_dir / f"{utt_id}.wav", _wav_bytes(pcm))
        rows.append(f"{utt_id}|{text}|{norm}\n")
    _write_atomically(metadata, "".join(rows).encode("utf-8"))
    return out_dir
