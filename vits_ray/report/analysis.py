"""The analysis of a run, as numbers: pure functions of the records, no I/O and no plotting.

Definitions (each number in the report comes from one of these):
- *series*: one metric over time. Per-epoch metrics come from epoch records (`avg_*`); when a run has
  no epoch records yet they fall back to the step records (and the report says so).
- *summary*: first, last, min, max of the finite values, each with where it occurs (first
  occurrence), and the change first -> last in percent of the first value.
- *plateau level*: the median of the second half of the series.
- *band*: max(BAND_MADS * 1.4826 * MAD of the second half, BAND_RELATIVE * |plateau level|).
- *descent*: from the start until the centred rolling median (ROLLING points) first lies within the
  band around the plateau level; only called a descent when the curve starts above the band.
- *spikes*: `vits_ray.stability.find_spikes`, the same robust detector the training guard runs
  (per-epoch settings from `per_epoch_config` for per-epoch series); recovery = back within the
  detector's pre-spike band.
- *settled*: after a spike, the first point whose rolling median is back within the plateau band.
- *plateaus*: the stretches after the descent outside any spike (start to recovery).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from vits_ray.config import StabilityConfig
from vits_ray.report.load import RunData, finite
from vits_ray.report.quality import Evaluation, QualityTrend, evaluation_json, quality_trend
from vits_ray.stability import find_spikes, per_epoch_config

MAD_TO_SIGMA = 1.4826
BAND_MADS = 3.0
BAND_RELATIVE = 0.05
ROLLING = 5

# (display name, epoch key, step key); the epoch key is used when epoch records carry it.
KEY_METRICS: tuple[tuple[str, str, str], ...] = (
    ("avg_loss_1", "avg_loss_1", "loss_1"),
    ("avg_loss_0", "avg_loss_0", "loss_0"),
    ("loss_mel", "avg_loss_mel", "loss_mel"),
    ("loss_kl", "avg_loss_kl", "loss_kl"),
    ("loss_feat", "avg_loss_feat", "loss_feat"),
    ("loss_duration", "avg_loss_duration", "loss_duration"),
    ("grad_norm_0", "avg_grad_norm_0", "grad_norm_0"),
    ("grad_norm_1", "avg_grad_norm_1", "grad_norm_1"),
    ("step_time", "avg_step_time", "step_time"),
    ("loader_time", "avg_loader_time", "loader_time"),
)
PHASE_METRICS = ("avg_loss_1", "avg_loss_0")


@dataclass
class Series:
    name: str
    key: str  # the record key it was read from
    per: str  # "epoch" or "step"
    xs: list[int]  # epoch numbers or step numbers
    values: list[float]
    steps: list[Optional[int]]  # None where a record has no step (a table of epochs, say)
    epochs: list[Optional[int]]


@dataclass
class Point:
    value: float
    index: int
    epoch: Optional[int]
    step: Optional[int]


@dataclass
class Summary:
    name: str
    key: str
    per: str
    count: int
    nonfinite: int
    first: Optional[Point]
    last: Optional[Point]
    min: Optional[Point]
    max: Optional[Point]
    change_pct: Optional[float]


@dataclass
class SpikeInfo:
    start_index: int
    peak_index: int
    peak_x: int  # epoch or step of the peak
    start_x: int
    peak_value: float
    baseline: float
    threshold: float
    size: float
    size_pct: float  # size in percent of the baseline
    recovery_index: Optional[int]
    recovery_x: Optional[int]
    recovery_length: Optional[int]  # recovery_x - peak_x, in epochs or steps
    # First x after the peak where the rolling median is back within the plateau band (stricter).
    settle_x: Optional[int] = None


@dataclass
class Phase:
    kind: str  # "descent", "plateau", "spike"
    start_x: int
    end_x: int  # inclusive
    first: float
    last: float
    median: float
    min: float
    max: float


@dataclass
class PhaseAnalysis:
    name: str
    per: str
    plateau_level: Optional[float]
    band: Optional[float]
    descent_end_x: Optional[int]  # first x within the band; None if the curve never descends into it
    spikes: list[SpikeInfo] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    note: str = ""


# --- series ------------------------------------------------------------------------------

def _int_or_none(x: Any) -> Optional[int]:
    return int(x) if finite(x) else None


def _series_from(records: list[dict[str, Any]], name: str, key: str, per: str) -> Optional[Series]:
    rows = [r for r in records if key in r and isinstance(r[key], (int, float))]
    if not rows:
        return None
    return Series(name=name, key=key, per=per,
                  xs=[int(r.get(per, i)) for i, r in enumerate(rows)],
                  values=[float(r[key]) for r in rows],
                  steps=[_int_or_none(r.get("step")) for r in rows],
                  epochs=[_int_or_none(r.get("epoch")) for r in rows])


def metric_series(run: RunData, name: str) -> Optional[Series]:
    """The series behind one key metric: epoch averages when present, else step records."""
    for display, epoch_key, step_key in KEY_METRICS:
        if display == name:
            return (_series_from(run.epochs, name, epoch_key, "epoch")
                    or _series_from(run.steps, name, step_key, "step"))
    return _series_from(run.steps, name, name, "step") or _series_from(run.epochs, name, "avg_" + name, "epoch")


def step_series(run: RunData, key: str) -> Optional[Series]:
    return _series_from(run.steps, key, key, "step")


def summarize(series: Series) -> Summary:
    idx = [i for i, v in enumerate(series.values) if math.isfinite(v)]

    def point(i: int) -> Point:
        return Point(value=series.values[i], index=i, epoch=series.epochs[i], step=series.steps[i])

    if not idx:
        return Summary(series.name, series.key, series.per, len(series.values), len(series.values),
                       None, None, None, None, None)
    first, last = point(idx[0]), point(idx[-1])
    lo = min(idx, key=lambda i: series.values[i])
    hi = max(idx, key=lambda i: series.values[i])
    change = (last.value - first.value) / abs(first.value) * 100 if first.value != 0 else None
    return Summary(series.name, series.key, series.per, len(series.values), len(series.values) - len(idx),
                   first, last, point(lo), point(hi), change)


def summary_table(run: RunData) -> list[Summary]:
    out = []
    for name, _, _ in KEY_METRICS:
        series = metric_series(run, name)
        if series is not None:
            out.append(summarize(series))
    return out


# --- phases ------------------------------------------------------------------------------

def rolling_median(values: Sequence[float], width: int = ROLLING) -> list[float]:
    half = width // 2
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - half): i + half + 1] if math.isfinite(v)]
        out.append(statistics.median(window) if window else math.nan)
    return out


def plateau_band(values: Sequence[float]) -> Optional[tuple[float, float]]:
    later = [v for v in values[len(values) // 2:] if math.isfinite(v)]
    if len(later) < 2:
        return None
    level = statistics.median(later)
    mad = statistics.median(abs(v - level) for v in later)
    return level, max(BAND_MADS * MAD_TO_SIGMA * mad, BAND_RELATIVE * abs(level))


def spike_config(per: str, cfg: Optional[StabilityConfig] = None) -> StabilityConfig:
    return per_epoch_config(cfg) if per == "epoch" else (cfg or StabilityConfig())


def _phase(kind: str, series: Series, start: int, end: int) -> Optional[Phase]:
    vals = [v for v in series.values[start:end + 1] if math.isfinite(v)]
    if not vals:
        return None
    return Phase(kind=kind, start_x=series.xs[start], end_x=series.xs[end], first=vals[0], last=vals[-1],
                 median=statistics.median(vals), min=min(vals), max=max(vals))


def analyse_phases(series: Series, cfg: Optional[StabilityConfig] = None) -> PhaseAnalysis:
    values = series.values
    n = len(values)
    scfg = spike_config(series.per, cfg)
    result = PhaseAnalysis(series.name, series.per, None, None, None)
    if n < 2 * ROLLING:
        result.note = (f"{n} points are too few to separate phases (at least {2 * ROLLING} needed); "
                       "only the summary applies")
        return result
    band = plateau_band(values)
    assert band is not None
    level, width = band
    result.plateau_level, result.band = level, width
    rolled = rolling_median(values)
    descent_end: Optional[int] = None
    if math.isfinite(rolled[0]) and rolled[0] > level + width:
        descent_end = next((i for i, v in enumerate(rolled) if math.isfinite(v) and abs(v - level) <= width), None)
        if descent_end is not None:
            result.descent_end_x = series.xs[descent_end]
    for s in find_spikes(values, scfg):
        rec_x = series.xs[s.recovery_index] if s.recovery_index is not None else None
        result.spikes.append(SpikeInfo(
            start_index=s.start_index, peak_index=s.peak_index, peak_x=series.xs[s.peak_index],
            start_x=series.xs[s.start_index], peak_value=s.peak_value, baseline=s.baseline,
            threshold=s.threshold, size=s.size, size_pct=100 * s.size / abs(s.baseline) if s.baseline else math.nan,
            recovery_index=s.recovery_index, recovery_x=rec_x,
            recovery_length=rec_x - series.xs[s.peak_index] if rec_x is not None else None,
            settle_x=next((series.xs[i] for i in range(s.peak_index + 1, n)
                           if math.isfinite(rolled[i]) and abs(rolled[i] - level) <= width), None)))
    if n < scfg.min_history + scfg.confirm_steps:
        result.note = (f"spike detection needs {scfg.min_history} points of history and {scfg.confirm_steps} "
                       f"in a row above the band; this series has {n}")
    # Phases in order: descent, then plateaus cut by spikes.
    cursor = 0
    if descent_end is not None and descent_end > 0:
        phase = _phase("descent", series, 0, descent_end - 1)
        if phase:
            result.phases.append(phase)
        cursor = descent_end
    elif descent_end is None and rolled[0] > level + width:
        phase = _phase("descent", series, 0, n - 1)
        result.note = "the curve is still above the band around its later level: the whole run is descent"
        if phase:
            result.phases.append(phase)
        return result
    for s in result.spikes:
        if s.start_index > cursor:
            phase = _phase("plateau", series, cursor, s.start_index - 1)
            if phase:
                result.phases.append(phase)
        end = (s.recovery_index - 1) if s.recovery_index is not None else n - 1
        phase = _phase("spike", series, max(s.start_index, cursor), end)
        if phase:
            result.phases.append(phase)
        cursor = end + 1
    if cursor < n:
        phase = _phase("plateau", series, cursor, n - 1)
        if phase:
            result.phases.append(phase)
    return result


# --- balance, oscillation, timing -------------------------------------------------------

@dataclass
class Stats:
    count: int
    mean: float
    median: float
    p10: float
    p90: float
    min: float
    max: float
    std: float


def stats(values: Sequence[float]) -> Optional[Stats]:
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return None

    def q(p: float) -> float:
        pos = p * (len(vals) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(vals) - 1)
        return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)

    return Stats(count=len(vals), mean=statistics.fmean(vals), median=q(0.5), p10=q(0.1), p90=q(0.9),
                 min=vals[0], max=vals[-1], std=statistics.pstdev(vals) if len(vals) > 1 else 0.0)


@dataclass
class Oscillation:
    turning_points: int  # local maxima + minima (sign changes of the first difference)
    mean_abs_change: float  # mean |x[i+1] - x[i]|
    mean_peak_distance: Optional[float]  # mean distance between successive local maxima, in x units


def oscillation(series: Series) -> Optional[Oscillation]:
    pts = [(x, v) for x, v in zip(series.xs, series.values) if math.isfinite(v)]
    if len(pts) < 3:
        return None
    diffs = [b[1] - a[1] for a, b in zip(pts, pts[1:])]
    turns, maxima = 0, []
    for i in range(1, len(diffs)):
        if diffs[i - 1] * diffs[i] < 0:
            turns += 1
            if diffs[i - 1] > 0:
                maxima.append(pts[i][0])
    gaps = [b - a for a, b in zip(maxima, maxima[1:])]
    return Oscillation(turning_points=turns, mean_abs_change=statistics.fmean(abs(d) for d in diffs),
                       mean_peak_distance=statistics.fmean(gaps) if gaps else None)


@dataclass
class Balance:
    per: str
    ratio: Optional[Stats]  # generator / discriminator total loss
    ratio_first: Optional[float]
    ratio_last: Optional[float]
    ratio_xs: list[int]
    ratio_values: list[float]
    discriminator: Optional[Stats]
    discriminator_oscillation: Optional[Oscillation]


def balance(run: RunData) -> Optional[Balance]:
    gen, disc = metric_series(run, "avg_loss_1"), metric_series(run, "avg_loss_0")
    if gen is None or disc is None or gen.per != disc.per:
        return None
    by_x = dict(zip(disc.xs, disc.values))
    xs, ratios = [], []
    for x, g in zip(gen.xs, gen.values):
        d = by_x.get(x)
        if d is not None and math.isfinite(g) and math.isfinite(d) and d != 0:
            xs.append(x)
            ratios.append(g / d)
    return Balance(per=gen.per, ratio=stats(ratios), ratio_first=ratios[0] if ratios else None,
                   ratio_last=ratios[-1] if ratios else None, ratio_xs=xs, ratio_values=ratios,
                   discriminator=stats(disc.values), discriminator_oscillation=oscillation(disc))


@dataclass
class Timing:
    per: str
    step_time: Optional[Stats]
    loader_time: Optional[Stats]
    loader_share_pct: Optional[float]  # total loading time / total wall time of the steps
    step_time_includes_loader: bool
    total_wall_seconds: Optional[float]
    audio_seconds: Optional[float]
    audio_seconds_per_second: Optional[float]


def timing(run: RunData) -> Optional[Timing]:
    if run.steps:
        rows, st_key, lt_key, per = run.steps, "step_time", "loader_time", "step"
    else:
        rows, st_key, lt_key, per = run.epochs, "avg_step_time", "avg_loader_time", "epoch"
    pairs = [(float(r[st_key]), float(r[lt_key])) for r in rows
             if finite(r.get(st_key)) and finite(r.get(lt_key))]
    if not pairs:
        return None
    wall = sum(s if run.step_time_includes_loader else s + l for s, l in pairs)
    share = 100 * sum(l for _, l in pairs) / wall if wall > 0 else None
    audio = [float(r["audio_seconds"]) for r in run.steps if finite(r.get("audio_seconds"))]
    total_wall = wall if per == "step" else None
    audio_total = sum(audio) if audio else None
    return Timing(per=per, step_time=stats([s for s, _ in pairs]), loader_time=stats([l for _, l in pairs]),
                  loader_share_pct=share, step_time_includes_loader=run.step_time_includes_loader,
                  total_wall_seconds=total_wall, audio_seconds=audio_total,
                  audio_seconds_per_second=audio_total / total_wall if audio_total and total_wall else None)


@dataclass
class AmpScale:
    first: float
    last: float
    min: float
    max: float
    decreases: int  # each is an overflow the GradScaler answered by halving the scale
    increases: int
    skipped_0: int
    skipped_1: int
    # A fresh GradScaler's calibration, from each `amp_calibrated` event: its first overflows
    # (skipped steps, counted) until the scale fitted the gradients.
    calibrations: list[dict[str, Any]] = field(default_factory=list)


def amp_scale(run: RunData) -> Optional[AmpScale]:
    vals = [float(r["amp_scale"]) for r in run.steps if finite(r.get("amp_scale"))]
    if not vals:
        return None
    pairs = list(zip(vals, vals[1:]))
    return AmpScale(first=vals[0], last=vals[-1], min=min(vals), max=max(vals),
                    decreases=sum(b < a for a, b in pairs), increases=sum(b > a for a, b in pairs),
                    skipped_0=sum(int(r.get("skipped_0", 0) or 0) for r in run.steps),
                    skipped_1=sum(int(r.get("skipped_1", 0) or 0) for r in run.steps),
                    calibrations=[{"step": e.get("step"), **(e.get("detail") or {})} for e in run.events or []
                                  if e.get("kind") == "amp_calibrated"])


def epoch_of_step(run: RunData, step: int) -> Optional[int]:
    """The epoch a step belongs to, from the step records (else the epoch records' end steps)."""
    for r in run.steps:
        if r.get("step") == step:
            return int(r.get("epoch", 0))
    for r in run.epochs:
        if step <= int(r.get("step", -1)):
            return int(r["epoch"])
    return None


def checkpoints_agree(run: RunData) -> tuple[int, int]:
    """(checkpoints whose per-rank parameter checksums all match, checkpoints with checksums)."""
    with_sums = [c for c in run.checkpoints if c.get("param_checksums")]
    agree = sum(len(set(map(str, c["param_checksums"]))) == 1 for c in with_sums)
    return agree, len(with_sums)


def coqui_epoch_averages(run: RunData, key: str = "loss_1") -> list[tuple[int, float, float, float]]:
    """(epoch, printed avg, mean of all steps, mean without the epoch's first step) for each epoch
    whose every step is in the log. Coqui's `KeepAverage` starts its count at 0, so its printed
    averages leave out the first step of each epoch; this shows by how much."""
    out = []
    for e in run.epochs:
        rows = [r for r in run.steps if r.get("epoch") == e["epoch"] and finite(r.get(key))]
        if len(rows) < 2 or not finite(e.get("avg_" + key)) or rows[0].get("steps_in_epoch") != len(rows):
            continue
        values = [float(r[key]) for r in rows]
        out.append((int(e["epoch"]), float(e["avg_" + key]), statistics.fmean(values), statistics.fmean(values[1:])))
    return out


@dataclass
class Analysis:
    run: RunData
    summaries: list[Summary]
    phases: list[PhaseAnalysis]
    balance: Optional[Balance]
    timing: Optional[Timing]
    amp: Optional[AmpScale]
    per_epoch: bool  # the key losses come from epoch records
    quality: Optional[QualityTrend] = None  # from the run's quality records
    evaluation: Optional[Evaluation] = None  # from an eval.json beside the run

    def to_json(self) -> dict[str, Any]:
        r = self.run
        return {
            "source": r.source, "origin": r.origin, "per_epoch": self.per_epoch,
            "records": {"step": len(r.steps), "epoch": len(r.epochs), "val": len(r.vals),
                        "checkpoint": len(r.checkpoints), "quality": len(r.quality),
                        "events": None if r.events is None else len(r.events)},
            "summary": {s.name: asdict(s) for s in self.summaries},
            "phases": {p.name: asdict(p) for p in self.phases},
            "balance": asdict(self.balance) if self.balance else None,
            "timing": asdict(self.timing) if self.timing else None,
            "amp_scale": asdict(self.amp) if self.amp else None,
            "events": r.events, "events_origin": r.events_origin,
            "vals": r.vals, "warnings": r.warnings,
            "quality": {"records": r.quality,
                        "trend": None if self.quality is None else {
                            "x": self.quality.x_key, "metrics": self.quality.metrics, "first": self.quality.first,
                            "last": self.quality.last, "best": self.quality.best},
                        "evaluation": None if self.evaluation is None else evaluation_json(self.evaluation)},
        }


def analyse(run: RunData, cfg: Optional[StabilityConfig] = None, evaluation: Optional[Evaluation] = None) -> Analysis:
    phases = []
    for name in PHASE_METRICS:
        series = metric_series(run, name)
        if series is not None:
            phases.append(analyse_phases(series, cfg))
    return Analysis(run=run, summaries=summary_table(run), phases=phases, balance=balance(run),
                    timing=timing(run), amp=amp_scale(run), per_epoch=bool(run.epochs),
                    quality=quality_trend(run.quality), evaluation=evaluation)
