"""`vits-ray evaluate`: objective quality of a model's speech against held-out recordings, or of any
folder of WAVs against a folder of references.

What it writes (a local folder or s3://): `eval.csv`, a row per utterance (a failed one keeps its
row with the error); `samples/`, the first few synthesised WAVs beside their references; and
`eval.json`, the aggregates (mean, median, 95% CI, n of every metric), the method and what was
evaluated. eval.json is written last, so a folder without it is an evaluation that did not finish.

Real-time factors are seconds of synthesis per second of audio, timed after one untimed warm-up
per runtime, with the thread count stated: PyTorch always (when the model is one), ONNX Runtime on
a copy exported (and parity-checked) for the purpose, unless turned off.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vits_ray.evaluate import EVAL_CSV, EVAL_JSON, SAMPLES_DIR
from vits_ray.evaluate.metrics import DEFAULT_SETTINGS, MetricSettings, analyse, compare, summarize

METRICS = ("mcd_dtw_db", "f0_rmse_cents", "vuv_error", "duration_ratio")
RTFS = ("rtf_torch", "rtf_onnx")
UNITS = {"mcd_dtw_db": "dB", "f0_rmse_cents": "cents", "vuv_error": "fraction of frames",
         "duration_ratio": "synthesised / reference", "rtf_torch": "s per s of audio", "rtf_onnx": "s per s of audio"}


class EvaluationError(ValueError):
    """Nothing could be evaluated (no data, no matching files); the message says why."""


@dataclass
class EvalRow:
    id: str
    text: str = ""
    reference_seconds: float = math.nan
    synthesized_seconds: float = math.nan
    mcd_dtw_db: float = math.nan
    f0_rmse_cents: float = math.nan
    vuv_error: float = math.nan
    duration_ratio: float = math.nan
    voiced_both: int = 0
    rtf_torch: float = math.nan
    rtf_onnx: float = math.nan
    error: str = ""


@dataclass
class Evaluation:
    rows: list[EvalRow]
    about: dict[str, Any]  # what was evaluated, how (model, data, split, scales, threads, method)
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(bool(r.error) for r in self.rows)

    def summary(self) -> dict[str, Any]:
        """eval.json: every metric as {mean, median, ci95, n}; an RTF only where it was measured."""
        out: dict[str, Any] = {**self.about, "utterances": len(self.rows) - self.failed, "failed": self.failed}
        for key in METRICS:
            out[key] = summarize([getattr(r, key) for r in self.rows if not r.error])
        for key in RTFS:
            values = [getattr(r, key) for r in self.rows if not r.error]
            if any(math.isfinite(v) for v in values):
                out[key] = summarize(values)
        out["units"] = {k: v for k, v in UNITS.items() if k in out}
        out["errors"] = [{"id": r.id, "error": r.error} for r in self.rows if r.error]
        out["samples"] = self.samples
        return out

    def format_text(self) -> str:
        summary = self.summary()
        lines = [f"evaluated {summary['utterances']} utterance(s), {summary['failed']} failed"]
        for key in (*METRICS, *RTFS):
            stats = summary.get(key)
            if not stats or stats["mean"] is None:
                continue
            ci = f" (95% CI {stats['ci95'][0]:.3g}..{stats['ci95'][1]:.3g})" if stats["ci95"] else ""
            lines.append(f"  {key:<15} mean {stats['mean']:.4g}, median {stats['median']:.4g}{ci}, n {stats['n']} "
                         f"[{UNITS[key]}]")
        if "rtf_threads" in summary:
            lines.append(f"  real-time factors after a warm-up, {summary['rtf_threads']} thread(s)")
        lines += [f"  failed {e['id']}: {e['error']}" for e in summary["errors"][:10]]
        return "\n".join(lines)


# --- scoring ------------------------------------------------------------------------------

def score_row(row: EvalRow, reference: np.ndarray, synthesized: np.ndarray, sample_rate: int,
              settings: MetricSettings) -> None:
    """Fill `row`'s metrics; an utterance that cannot be analysed keeps its row, with the error."""
    row.reference_seconds = len(reference) / sample_rate
    row.synthesized_seconds = len(synthesized) / sample_rate
    try:
        scores = compare(analyse(reference, sample_rate, settings, name=f"{row.id} reference"),
                         analyse(synthesized, sample_rate, settings, name=f"{row.id} synthesized"))
    except ValueError as err:
        row.error = str(err)
        return
    for key in METRICS:
        setattr(row, key, getattr(scores, key))
    row.voiced_both = scores.voiced_both


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    audio = fn()
    return audio, time.perf_counter() - started


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    import soxr

    return audio if rate == target else soxr.resample(audio, rate, target, quality="VHQ").astype(np.float32)


def at_common_rate(reference: np.ndarray, reference_rate: int, candidate: np.ndarray,
                   candidate_rate: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Both signals at the lower of their two rates: a band one of them cannot carry would otherwise
    be scored as distortion (an empty band's log amplitude dominates the cepstral distance)."""
    rate = min(reference_rate, candidate_rate)
    return resample(reference, reference_rate, rate), resample(candidate, candidate_rate, rate), rate


# --- a model against held-out recordings -------------------------------------------------

def evaluate_model(model: str, data: str, out: str, split: str = "val", max_utterances: int = 50,
                   onnx: bool = True, threads: int = 0, samples: int = 3, seed: int = 0,
                   settings: MetricSettings = DEFAULT_SETTINGS, storage_cfg=None,
                   progress: Callable[[str], None] = lambda line: None) -> Evaluation:
    """Synthesise every held-out utterance's text with `model` and score it against its recording."""
    import torch

    from vits_ray.data.shards import read_manifest
    from vits_ray.evaluate.heldout import read_held_out
    from vits_ray.storage import StorageError, open_store
    from vits_ray.voice import Scales, TorchVoice, VoiceError, load_voice

    if threads:
        torch.set_num_threads(threads)
    voice = load_voice(model, threads=threads or None, storage_cfg=storage_cfg)
    try:
        store = open_store(data, storage_cfg)
        utterances = read_held_out(store, read_manifest(store), split, max_utterances)
    except (StorageError, ValueError) as err:
        raise EvaluationError(f"--data {data}: {err}") from None
    runtimes = [voice]  # the first speaks what is scored; an ONNX copy of a torch model is only timed
    if onnx and isinstance(voice, TorchVoice):
        from vits_ray.onnx_export import as_onnx_voice

        runtimes.append(as_onnx_voice(voice))
    scales = Scales()
    rows, audio_of = [], {}
    warmed = set()
    for index, utterance in enumerate(utterances):
        row = EvalRow(id=utterance.id, text=utterance.text)
        rows.append(row)
        try:
            tokens = voice.prepare(utterance.text, where=f"{utterance.id}: ").token_ids
        except VoiceError as err:
            row.error = str(err)
            continue
        for runtime in runtimes:
            if runtime.backend not in warmed:  # the first call pays for allocations: not timed
                runtime.synthesize(tokens, scales)
                warmed.add(runtime.backend)
            torch.manual_seed(seed + index)
            audio, seconds = timed(lambda: runtime.synthesize(tokens, scales))
            setattr(row, f"rtf_{runtime.backend}", seconds / max(len(audio) / voice.sample_rate, 1e-9))
            if runtime is voice:
                synthesized = audio
        reference, synthesized, rate = at_common_rate(utterance.audio, utterance.sample_rate, synthesized,
                                                      voice.sample_rate)
        score_row(row, reference, synthesized, rate, settings)
        if not row.error and len(audio_of) < samples:
            audio_of[row.id] = (reference, synthesized, rate)
        progress(f"[evaluate] {index + 1}/{len(utterances)} {row.id}: "
                 + (f"failed: {row.error}" if row.error else f"MCD {row.mcd_dtw_db:.2f} dB, F0 {row.f0_rmse_cents:.0f} cents"))
    about = {"model": voice.source, "model_step": voice.step, "backend": voice.backend, "data": data, "split": split,
             "scales": asdict(scales), "seed": seed, "rtf_threads": voice.threads, "method": settings.describe(),
             "sample_rate": min(voice.sample_rate, utterances[0].sample_rate) if utterances else voice.sample_rate}
    evaluation = Evaluation(rows, about)
    write_evaluation(evaluation, out, audio_of, storage_cfg)
    return evaluation


# --- two folders of WAVs -------------------------------------------------------------------

def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise ValueError(f"{path}: not a readable audio file ({err})") from None
    return audio.mean(axis=1), int(rate)


def evaluate_folders(reference_dir: Path, synthesized_dir: Path, out: str, samples: int = 3,
                     settings: MetricSettings = DEFAULT_SETTINGS, storage_cfg=None) -> Evaluation:
    """Score every WAV of `synthesized_dir` against the WAV of the same name in `reference_dir`
    (resampled to the reference's rate). Files without a partner are listed in eval.json."""
    references = {p.name: p for p in sorted(Path(reference_dir).glob("*.wav"))}
    synthesized = {p.name: p for p in sorted(Path(synthesized_dir).glob("*.wav"))}
    matched = sorted(set(references) & set(synthesized))
    if not matched:
        raise EvaluationError(f"no WAV file name is in both {reference_dir} ({len(references)} WAVs) and "
                              f"{synthesized_dir} ({len(synthesized)} WAVs)")
    rows, audio_of = [], {}
    for name in matched:
        row = EvalRow(id=Path(name).stem)
        rows.append(row)
        try:
            reference, rate = read_wav(references[name])
            candidate, candidate_rate = read_wav(synthesized[name])
        except ValueError as err:
            row.error = str(err)
            continue
        reference, candidate, rate = at_common_rate(reference, rate, candidate, candidate_rate)
        score_row(row, reference, candidate, rate, settings)
        if not row.error and len(audio_of) < samples:
            audio_of[row.id] = (reference, candidate, rate)
    about = {"reference": str(reference_dir), "synthesized": str(synthesized_dir), "method": settings.describe(),
             "rates": "each pair compared at the lower of its two sample rates",
             "unmatched_reference": sorted(set(references) - set(synthesized)),
             "unmatched_synthesized": sorted(set(synthesized) - set(references))}
    evaluation = Evaluation(rows, about)
    write_evaluation(evaluation, out, audio_of, storage_cfg)
    return evaluation


# --- output --------------------------------------------------------------------------------

def _csv_value(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def write_evaluation(evaluation: Evaluation, out: str, audio_of: dict[str, tuple[np.ndarray, np.ndarray, int]],
                     storage_cfg=None) -> None:
    """eval.csv, samples/ and, last, eval.json under `out` (local folder or s3://)."""
    import soundfile as sf

    from vits_ray.storage import open_store
    from vits_ray.data.audio import to_pcm16

    store = open_store(out, storage_cfg)
    with tempfile.TemporaryDirectory(prefix="vits-ray-eval-") as tmp:
        folder = Path(tmp)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=[f.name for f in EvalRow.__dataclass_fields__.values()],
                                lineterminator="\n")
        writer.writeheader()
        for row in evaluation.rows:
            writer.writerow({k: _csv_value(v) for k, v in asdict(row).items()})
        (folder / EVAL_CSV).write_text(text.getvalue(), encoding="utf-8")
        texts = {r.id: r.text for r in evaluation.rows}
        for uid, (reference, synthesized, sample_rate) in audio_of.items():
            (folder / SAMPLES_DIR).mkdir(exist_ok=True)
            for suffix, audio in (("ref", reference), ("syn", synthesized)):
                sf.write(folder / SAMPLES_DIR / f"{uid}.{suffix}.wav", to_pcm16(audio), sample_rate, subtype="PCM_16")
            evaluation.samples.append({"id": uid, "text": texts.get(uid, ""),
                                       "reference": f"{SAMPLES_DIR}/{uid}.ref.wav",
                                       "synthesized": f"{SAMPLES_DIR}/{uid}.syn.wav"})
        store.upload_dir(folder, "")
        store.write_bytes(EVAL_JSON, (json.dumps(evaluation.summary(), indent=2, ensure_ascii=False, allow_nan=False)
                                      + "\n").encode("utf-8"))
