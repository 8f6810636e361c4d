"""Objective TTS quality metrics: a synthesised rendering against a recording of the same text.

Each waveform is trimmed of leading and trailing silence and analysed with WORLD (pyworld):
Harvest gives F0 on a fixed frame grid, CheapTrick the spectral envelope on the same grid, and a
mel-cepstrum is taken from that envelope. One DTW path over the mel-cepstra then pairs the frames
for every frame-level metric, so spectrum, pitch and voicing are judged on the same alignment.

    ref = analyse(reference_wave, 22050, name="bn_0001")   # once per reference
    scores = compare(ref, analyse(synth_wave, 22050, name="bn_0001 (synth)"))
    summarize([s.mcd_dtw_db for s in all_scores])         # mean, median, 95% CI

Nothing here touches the filesystem, torch or Ray: it is numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import librosa
import numpy as np
import pyworld
import scipy.fft
import scipy.stats

# Harvest and CheapTrick need a few frames to say anything; fewer is a clip, not an utterance.
MIN_FRAMES = 3
# Floor on mel-band amplitude before the log: digital silence in a band would otherwise be -inf.
_AMPLITUDE_FLOOR = 1e-10
# Kubichek's MCD constant: turns a natural-log cepstral distance into decibels.
_DB_PER_NEPER = 10.0 / math.log(10.0)


@dataclass(frozen=True)
class MetricSettings:
    frame_period_ms: float = 5.0
    cepstrum_order: int = 24  # c1..c24 compared; c0 excluded
    num_mel_bands: int = 40
    f0_floor_hz: float = 60.0
    f0_ceil_hz: float = 600.0
    trim_top_db: float = 40.0

    def __post_init__(self) -> None:
        if not self.frame_period_ms > 0:
            raise ValueError(f"frame_period_ms must be > 0, got {self.frame_period_ms}")
        if not 1 <= self.cepstrum_order < self.num_mel_bands:
            # the DCT of N mel bands has N coefficients, c0..c_{N-1}
            raise ValueError(f"cepstrum_order must be in 1..num_mel_bands - 1 ({self.num_mel_bands - 1}), "
                             f"got {self.cepstrum_order}")
        if not 0 < self.f0_floor_hz < self.f0_ceil_hz:
            raise ValueError(f"need 0 < f0_floor_hz < f0_ceil_hz, got {self.f0_floor_hz} and {self.f0_ceil_hz}")
        if not self.trim_top_db > 0:
            raise ValueError(f"trim_top_db must be > 0, got {self.trim_top_db}")

    def describe(self) -> dict:
        """The method in plain words plus every setting, to store beside the numbers it produced."""
        return {
            **asdict(self),
            "trim": f"leading and trailing silence removed with librosa.effects.trim (top_db={self.trim_top_db}) "
                    "before any analysis",
            "mcd": "MCD-DTW in dB, Kubichek's convention: mean over the DTW path of "
                   f"(10 / ln 10) * sqrt(2 * sum_(k=1..{self.cepstrum_order}) (c_k - c'_k)^2); c0 (energy) excluded. "
                   "Cepstrum: WORLD CheapTrick spectral envelope on Harvest's frames "
                   f"({self.frame_period_ms} ms), through a {self.num_mel_bands}-band mel filterbank (librosa, 0 Hz "
                   "to Nyquist), natural log of band amplitude, DCT-II scaled as a true cepstrum "
                   f"(c_k = DCT[k] / (2 * {self.num_mel_bands})). Frames paired by librosa.sequence.dtw "
                   "(Euclidean distance on c1..c_order).",
            "f0": "log-F0 RMSE in cents: sqrt(mean((1200 * log2(f0_synth / f0_ref))^2)) over the frame pairs of "
                  "the MCD's DTW path that are voiced in both; F0 from WORLD Harvest "
                  f"({self.f0_floor_hz}-{self.f0_ceil_hz} Hz). NaN when no pair is voiced in both.",
            "vuv": "voicing decision error: fraction of the DTW path's frame pairs whose voiced/unvoiced "
                   "decisions (Harvest F0 > 0) differ.",
            "duration_ratio": "synthesised length / reference length, in samples after the silence trim.",
        }


DEFAULT_SETTINGS = MetricSettings()


# eq=False: the fields are arrays, and a generated __eq__ would raise on them
@dataclass(frozen=True, eq=False)
class Analysis:
    """One waveform's features; a reference is analysed once and compared many times."""

    sample_rate: int
    num_samples: int  # after the trim
    mcep: np.ndarray  # [frames, order + 1], c0..c_order
    f0: np.ndarray  # [frames] Hz, 0 where unvoiced
    # how it was analysed, so compare() can refuse features that are not comparable
    settings: MetricSettings = DEFAULT_SETTINGS


@dataclass(frozen=True)
class UtteranceScores:
    mcd_dtw_db: float
    f0_rmse_cents: float  # nan when no frame is voiced in both
    vuv_error: float
    duration_ratio: float
    frames_reference: int
    frames_synthesized: int
    voiced_both: int

    def to_dict(self) -> dict:
        return asdict(self)


def analyse(wave: np.ndarray, sample_rate: int, settings: MetricSettings = DEFAULT_SETTINGS, *,
            name: str = "") -> Analysis:
    """Trim, then WORLD-analyse one mono waveform in [-1, 1]. `name` prefixes error messages."""
    prefix = f"{name}: " if name else ""
    wave = _checked_wave(wave, sample_rate, prefix)
    # librosa measures silence against the clip's own peak, so it would hand all-zero audio back whole
    trimmed = librosa.effects.trim(wave, top_db=settings.trim_top_db)[0] if np.any(wave) else wave[:0]
    min_samples = math.ceil((MIN_FRAMES - 1) * settings.frame_period_ms * sample_rate / 1000)
    if trimmed.size == 0:
        raise ValueError(f"{prefix}silent after trimming at {settings.trim_top_db:g} dB")
    if trimmed.size < min_samples:
        raise ValueError(f"{prefix}too short after trimming at {settings.trim_top_db:g} dB: {trimmed.size} samples "
                         f"({1000 * trimmed.size / sample_rate:.1f} ms), need at least {min_samples} "
                         f"({MIN_FRAMES} frames of {settings.frame_period_ms:g} ms)")
    # pyworld's C code reads the buffer directly: it must be float64 and contiguous
    x = np.ascontiguousarray(trimmed, dtype=np.float64)
    f0, times = pyworld.harvest(x, sample_rate, f0_floor=settings.f0_floor_hz, f0_ceil=settings.f0_ceil_hz,
                                frame_period=settings.frame_period_ms)
    envelope = pyworld.cheaptrick(x, f0, times, sample_rate, f0_floor=settings.f0_floor_hz)
    mcep = _mel_cepstrum(envelope, sample_rate, settings)
    f0.setflags(write=False)
    mcep.setflags(write=False)
    return Analysis(sample_rate=sample_rate, num_samples=int(trimmed.size), mcep=mcep, f0=f0, settings=settings)


def compare(reference: Analysis, synthesized: Analysis) -> UtteranceScores:
    """Score `synthesized` against `reference` on one DTW alignment of their mel-cepstra."""
    if reference.sample_rate != synthesized.sample_rate:
        raise ValueError(f"sample rates differ: reference {reference.sample_rate} Hz, "
                         f"synthesized {synthesized.sample_rate} Hz; resample one first")
    if reference.settings != synthesized.settings:
        raise ValueError(f"analysed with different settings: reference {reference.settings}, "
                         f"synthesized {synthesized.settings}")
    ref_cep, syn_cep = reference.mcep[:, 1:], synthesized.mcep[:, 1:]  # c0 is loudness, not quality
    _, path = librosa.sequence.dtw(X=ref_cep.T, Y=syn_cep.T, metric="euclidean")
    i, j = path[::-1, 0], path[::-1, 1]  # librosa returns the path end-first

    distance = np.sqrt(2.0 * np.sum((ref_cep[i] - syn_cep[j]) ** 2, axis=1))
    mcd = _DB_PER_NEPER * float(np.mean(distance))

    f0_ref, f0_syn = reference.f0[i], synthesized.f0[j]
    voiced_ref, voiced_syn = f0_ref > 0, f0_syn > 0
    both = voiced_ref & voiced_syn
    if both.any():
        cents = 1200.0 * np.log2(f0_syn[both] / f0_ref[both])
        f0_rmse = float(np.sqrt(np.mean(cents ** 2)))
    else:
        f0_rmse = math.nan
    return UtteranceScores(
        mcd_dtw_db=mcd,
        f0_rmse_cents=f0_rmse,
        vuv_error=float(np.mean(voiced_ref != voiced_syn)),
        duration_ratio=synthesized.num_samples / reference.num_samples,
        frames_reference=int(reference.f0.size),
        frames_synthesized=int(synthesized.f0.size),
        voiced_both=int(both.sum()),
    )


def score(reference: np.ndarray, synthesized: np.ndarray, sample_rate: int,
          settings: MetricSettings = DEFAULT_SETTINGS) -> UtteranceScores:
    """`compare` on two waveforms; analyse references once with `analyse` when they are reused."""
    return compare(analyse(reference, sample_rate, settings, name="reference"),
                   analyse(synthesized, sample_rate, settings, name="synthesized"))


def summarize(values: Sequence[float]) -> dict:
    """Mean, median and the t-distribution 95% interval of the mean over the finite `values`.

    JSON-able: plain floats, None where undefined (no finite value: all None; one: no interval).
    """
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    if n == 0:
        return {"mean": None, "median": None, "ci95": None, "n": 0}
    mean = float(np.mean(finite))
    ci95 = None
    if n > 1:
        # t.interval with scale 0 (all values equal) gives NaN; the interval is then just the mean
        half_width = scipy.stats.t.ppf(0.975, df=n - 1) * np.std(finite, ddof=1) / math.sqrt(n)
        ci95 = [float(mean - half_width), float(mean + half_width)]
    return {"mean": mean, "median": float(np.median(finite)), "ci95": ci95, "n": n}


def _checked_wave(wave: np.ndarray, sample_rate: int, prefix: str) -> np.ndarray:
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"{prefix}sample_rate must be a positive integer, got {sample_rate!r}")
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"{prefix}expected a 1-D mono waveform, got shape {wave.shape}")
    if wave.size == 0:
        raise ValueError(f"{prefix}empty waveform")
    if not np.issubdtype(wave.dtype, np.floating):
        # int16 samples read as-is would be 32768 times too loud and fool the amplitude floor
        raise ValueError(f"{prefix}expected float samples in [-1, 1], got dtype {wave.dtype}")
    if not np.all(np.isfinite(wave)):
        bad = int(np.sum(~np.isfinite(wave)))
        raise ValueError(f"{prefix}waveform has {bad} non-finite samples (NaN or inf)")
    return wave


@lru_cache(maxsize=8)
def _mel_filterbank(sample_rate: int, fft_size: int, num_mel_bands: int) -> np.ndarray:
    return librosa.filters.mel(sr=sample_rate, n_fft=fft_size, n_mels=num_mel_bands, fmin=0.0,
                               fmax=sample_rate / 2)


def _mel_cepstrum(envelope: np.ndarray, sample_rate: int, settings: MetricSettings) -> np.ndarray:
    """c0..c_order from a CheapTrick power envelope [frames, fft_size // 2 + 1]."""
    fft_size = 2 * (envelope.shape[1] - 1)
    mel_power = envelope @ _mel_filterbank(sample_rate, fft_size, settings.num_mel_bands).T
    log_amplitude = 0.5 * np.log(np.maximum(mel_power, _AMPLITUDE_FLOOR ** 2))
    # /(2N) makes DCT-II a true cepstrum: ln|X(w)| ~ c0 + 2 sum c_k cos(k w), the scale MCD assumes
    cepstrum = scipy.fft.dct(log_amplitude, type=2, norm=None, axis=1) / (2 * settings.num_mel_bands)
    return np.ascontiguousarray(cepstrum[:, : settings.cepstrum_order + 1])
