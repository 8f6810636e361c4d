"""Decode, downmix, resample, trim and measure one utterance's audio. Pure functions, no storage.

Runs in worker processes, so it imports only numpy, soundfile and soxr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# librosa.effects.trim's defaults, in samples at the target rate.
TRIM_FRAME = 2048
TRIM_HOP = 512


@dataclass(frozen=True)
class CleanAudio:
    pcm16: bytes  # little-endian int16 mono at the target rate
    num_samples: int
    clipped_fraction: float


@dataclass(frozen=True)
class AudioProblem:
    reason: str
    detail: str


@dataclass(frozen=True)
class AudioLimits:
    sample_rate: int
    min_seconds: float
    max_seconds: float
    trim_top_db: float
    clip_threshold: float
    max_clipped_fraction: float


def trim_bounds(y: np.ndarray, top_db: float, frame: int = TRIM_FRAME, hop: int = TRIM_HOP) -> tuple[int, int]:
    """[start, end) of the non-silent part of mono `y`, as librosa.effects.trim computes it.

    A frame is silent when its RMS is more than `top_db` below the loudest frame's.
    """
    if y.size == 0:
        return 0, 0
    assert frame % hop == 0, "frames are summed from whole hops"
    # Centre-padded frames (librosa's center=True, zero padding) start at multiples of `hop`, so
    # each frame's energy is the sum of frame // hop consecutive hop-sized blocks.
    blocks_per_frame = frame // hop
    padded = np.zeros(frame // 2 + y.size + frame, np.float32)
    padded[frame // 2:frame // 2 + y.size] = y
    n_blocks = padded.size // hop
    block_energy = np.square(padded[:n_blocks * hop]).reshape(n_blocks, hop).sum(axis=1, dtype=np.float64)
    n_frames = 1 + y.size // hop
    power = sum(block_energy[k:k + n_frames] for k in range(blocks_per_frame)) / frame
    peak = power.max()
    if peak <= 0:
        return 0, 0
    # power ratio in dB = 10*log10(p / peak); non-silent when > -top_db
    loud = np.flatnonzero(power > peak * 10.0 ** (-top_db / 10.0))
    start = int(loud[0] * hop)
    end = min(y.size, int((loud[-1] + 1) * hop))
    return start, end


def to_pcm16(y: np.ndarray) -> np.ndarray:
    """float in [-1, 1) -> int16; exact for audio that was 16-bit to begin with (x/32768)."""
    return np.clip(np.rint(y * 32768.0), -32768, 32767).astype("<i2")


def clean_audio(path: Path, limits: AudioLimits) -> CleanAudio | AudioProblem:
    try:
        frames, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile reports every decode failure as a plain RuntimeError
        return AudioProblem("undecodable_audio", f"{path.name}: {str(err).strip() or type(err).__name__}")
    if frames.shape[0] and not np.isfinite(frames).all():
        return AudioProblem("undecodable_audio", f"{path.name}: contains NaN or infinite samples")

    # A time step is clipped when any channel is at full scale, so measure before downmixing.
    clipped = (np.abs(frames) >= limits.clip_threshold).any(axis=1)
    mono = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
    if rate != limits.sample_rate and mono.size:
        mono = soxr.resample(mono, rate, limits.sample_rate, quality="VHQ")

    start, end = trim_bounds(mono, limits.trim_top_db)
    seconds = (end - start) / limits.sample_rate
    if seconds < limits.min_seconds:
        note = " (silent)" if end == start else ""
        return AudioProblem("too_short", f"{seconds:.2f} s{note} < min {limits.min_seconds:g} s")
    if seconds > limits.max_seconds:
        return AudioProblem("too_long", f"{seconds:.2f} s > max {limits.max_seconds:g} s")

    scale = rate / limits.sample_rate
    lo, hi = int(start * scale), max(int(start * scale) + 1, min(clipped.size, int(round(end * scale))))
    clipped_fraction = float(clipped[lo:hi].mean())
    if clipped_fraction > limits.max_clipped_fraction:
        return AudioProblem("clipped", f"{clipped_fraction:.2%} of samples at |x| >= {limits.clip_threshold:g} "
                                       f"> max {limits.max_clipped_fraction:.2%}")
    pcm = to_pcm16(mono[start:end])
    return CleanAudio(pcm.tobytes(), int(pcm.size), clipped_fraction)
