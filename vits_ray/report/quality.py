"""Objective quality measurements of a run, as numbers: pure functions, no I/O.

Two sources (their producers are `vits_ray.evaluate`):
- `quality` records in the run's records: means over a few fixed validation utterances, measured
  during training every `eval.every_steps` steps;
- an `eval.json` written by `vits-ray evaluate` (found and read by `report.evaluation`): mean,
  median, 95% interval and count of each metric over an evaluation set, the method in words, and
  sample recordings.

Both measure distances between synthesised speech and recordings of the same text. They are
reported as measured; nothing here grades them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from vits_ray.report.load import finite

# (key, label, unit, what it is); the order of tables and plot panels.
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("mcd_dtw_db", "MCD-DTW", "dB",
     "mel-cepstral distortion between synthesised and reference frames paired by DTW; lower is closer to "
     "the reference"),
    ("f0_rmse_cents", "F0 RMSE", "cents",
     "root mean square pitch difference over frames voiced in both (100 cents = one semitone); lower is "
     "closer to the reference"),
    ("vuv_error", "V/UV error", "fraction",
     "fraction of paired frames whose voiced/unvoiced decisions differ; lower is closer to the reference"),
    ("duration_ratio", "duration ratio", "ratio",
     "synthesised length / reference length; 1 is the same length"),
    ("rtf_torch", "RTF (PyTorch)", "× real time",
     "seconds of synthesis per second of audio with PyTorch; below 1 is faster than real time"),
    ("rtf_onnx", "RTF (ONNX)", "× real time",
     "seconds of synthesis per second of audio with ONNX Runtime; below 1 is faster than real time"),
)
UNITS = {key: unit for key, _, unit, _ in METRICS}
LABELS = {key: label for key, label, _, _ in METRICS}
# Fields of a quality record that say where and how much was measured, not what.
RECORD_CONTEXT = ("kind", "step", "epoch", "utterances", "failed", "time")
# Published MCD figures differ on these three (and on the cepstrum itself); see `method_summary`.
MCD_CAVEAT = ("Published MCD figures differ in cepstrum order, in whether c0 (the energy term) is included and in "
              "frame period (and in how frames are aligned), so this MCD compares only with figures measured the "
              "same way.")


def _number(x: Any) -> Optional[float]:
    if isinstance(x, str) and x.lower() in ("nan", "inf", "-inf"):
        return float(x)
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


# --- quality records (during training) ---------------------------------------------------

@dataclass
class QualityTrend:
    """The quality records over training: first, last and best (lowest MCD) evaluation."""

    count: int
    x_key: str  # what the trend plot's x axis is: "step", else "epoch", else "evaluation" (the record's index)
    xs: list[float]
    metrics: list[str]  # numeric fields measured, METRICS' order first
    first: dict[str, Any]
    last: dict[str, Any]
    best: Optional[dict[str, Any]]  # the record with the lowest finite MCD; None when none has one
    best_index: Optional[int]


def _x_key(records: list[dict[str, Any]]) -> str:
    # Exported tables may carry only epochs; a plot needs the same axis for every point.
    for key in ("step", "epoch"):
        if all(finite(r.get(key)) for r in records):
            return key
    return "evaluation"


def quality_trend(records: list[dict[str, Any]]) -> Optional[QualityTrend]:
    if not records:
        return None
    x_key = _x_key(records)
    xs = [float(r[x_key]) if x_key != "evaluation" else float(i) for i, r in enumerate(records)]
    found = {k for r in records for k, v in r.items() if k not in RECORD_CONTEXT and _number(v) is not None}
    metrics = [k for k, *_ in METRICS if k in found] + sorted(found - set(UNITS))
    scored = [i for i, r in enumerate(records) if finite(r.get("mcd_dtw_db"))]
    best_index = min(scored, key=lambda i: records[i]["mcd_dtw_db"]) if scored else None
    return QualityTrend(count=len(records), x_key=x_key, xs=xs, metrics=metrics, first=records[0],
                        last=records[-1], best=records[best_index] if best_index is not None else None,
                        best_index=best_index)


def metric_values(records: list[dict[str, Any]], key: str) -> list[float]:
    """One metric per record, NaN where a record has none (a gap in the plot, not a zero)."""
    return [v if (v := _number(r.get(key))) is not None else math.nan for r in records]


# --- eval.json (vits-ray evaluate) -------------------------------------------------------

@dataclass
class MetricStats:
    key: str
    unit: str
    mean: Optional[float]
    median: Optional[float]
    ci95: Optional[tuple[float, float]]
    n: Optional[int]


@dataclass
class SampleFile:
    source: str  # the path eval.json names, relative to its folder
    copied: Optional[str] = None  # where the report put it, relative to the report's folder
    problem: str = ""  # why it is not there (missing, unreadable)


@dataclass
class Sample:
    id: str
    text: str
    reference: Optional[SampleFile]
    synthesized: Optional[SampleFile]


@dataclass
class Evaluation:
    """An eval.json as the report uses it: where it was read, what it says, the samples copied."""

    url: str
    data: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    error: str = ""  # eval.json was found but cannot be used (not JSON, not an object)
    notes: list[str] = field(default_factory=list)  # e.g. a second eval.json that was not used


def _stats(entry: Any, key: str, units: dict[str, Any]) -> MetricStats:
    entry = entry if isinstance(entry, dict) else {}
    ci = entry.get("ci95")
    ci95 = None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_number(c) is not None for c in ci):
        ci95 = (float(ci[0]), float(ci[1]))
    n = entry.get("n")
    n = int(n) if finite(n) else None
    # eval.json's own word for its unit when it gives one ("fraction of frames"), else ours.
    unit = str(units[key]) if isinstance(units.get(key), str) else UNITS.get(key, "")
    return MetricStats(key=key, unit=unit, mean=_number(entry.get("mean")),
                       median=_number(entry.get("median")), ci95=ci95,
                       n=n)


def evaluation_metrics(data: dict[str, Any]) -> list[MetricStats]:
    """Every metric eval.json holds as {mean, median, ci95, n}: METRICS' order, then any others."""
    known = [key for key, *_ in METRICS if key in data]
    units = data.get("units") if isinstance(data.get("units"), dict) else {}
    return [_stats(data[key], key, units) for key in known + _other_metrics(data)]


def _other_metrics(data: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in data.items() if k not in UNITS and isinstance(v, dict) and {"mean", "median"} <= set(v))


def c0_handling(method: dict[str, Any]) -> str:
    """Whether the MCD left out c0, as the method states it (a flag, else its words), or "not stated"."""
    for flag, excluded_when in (("c0_excluded", True), ("exclude_c0", True), ("include_c0", False),
                                ("c0_included", False)):
        if isinstance(method.get(flag), bool):
            return "excluded" if method[flag] == excluded_when else "included"
    words = str(method.get("mcd", "")).lower()
    if "c0" in words and "excluded" in words:
        return "excluded (as the method's text says)"
    if "c0" in words and "included" in words:
        return "included (as the method's text says)"
    return "not stated in eval.json"


def evaluation_json(evaluation: Evaluation) -> dict[str, Any]:
    """eval.json's summary for report.json: everything it says about what was evaluated and how, each
    metric's statistics with its unit, and the samples as copied (or why not)."""
    metrics = evaluation_metrics(evaluation.data)
    about = {k: v for k, v in evaluation.data.items() if k not in {m.key for m in metrics} | {"samples"}}
    return {"url": evaluation.url, "error": evaluation.error or None, "notes": evaluation.notes, **about,
            "metrics": {m.key: asdict(m) for m in metrics}, "samples": [asdict(s) for s in evaluation.samples]}


# eval.json fields the Quality section states in its own words; any other is listed as it is.
DESCRIBED_FIELDS = ("model", "model_step", "data", "split", "reference", "synthesized", "utterances", "failed",
                    "errors", "rtf_threads", "units", "method", "samples", "unmatched_reference",
                    "unmatched_synthesized")


def other_fields(data: dict[str, Any]) -> dict[str, Any]:
    """eval.json's fields that neither hold a metric nor are in DESCRIBED_FIELDS (backend, seed, ...)."""
    metrics = {key for key, *_ in METRICS} | set(_other_metrics(data))
    return {k: v for k, v in data.items() if k not in metrics and k not in DESCRIBED_FIELDS}
