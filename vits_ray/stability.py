"""Detect training instability and decide what to do about it: pure logic, no torch, Ray or I/O.

Coqui only logs a diverging GAN; this module turns the per-step metrics into decisions. Every
rank of the training loop feeds `StabilityGuard.observe` the same all-reduced metrics, one dict per
optimiser step, so every rank reaches the same decision without a broadcast; the events in each
decision are what rank 0 appends to `events.jsonl`.

Pieces, one job each:
- `SpikeDetector`: robust online detector of upward jumps in one series (median + MADs).
- `SeriesMonitor`: one detector per named series (`loss_1`, `loss_mel`, `loss_kl`).
- `AmpScaleMonitor`: the AMP GradScaler's scale collapsing (the prelude to all-NaN losses).
- `CheckpointCadence`: save more often while training is unstable.
- `StabilityGuard`: composes them with the run's `rollbacks.RollbackLedger` (budget, backoff, where
  a rollback goes); `find_spikes` runs the same detector offline for the report.

Semantics worth knowing (the "why" behind the numbers):
- A value is *suspicious* when it exceeds both median + threshold_mads * 1.4826 * MAD of the window
  and median + |median| * min_relative_jump. Only upward jumps count, so the fast descent at the
  start of fine-tuning is never flagged.
- A spike is *confirmed* on the `confirm_steps`-th consecutive suspicious value, and stays confirmed
  for every further consecutive suspicious value. A normal value ends the run; the suspicious
  values of a run never enter the window, so neither one noisy GAN step nor a long spike shifts
  what counts as normal. Non-finite values are ignored by detectors (neither normal nor suspicious).
- A value above the midpoint of the band (median + PROBATION_FRACTION * (threshold - median)) but
  not above the threshold is held on probation: it joins the window only when `min_history` such
  values come in a row (a new level that never crossed the band) and is dropped as soon as a normal
  or suspicious value follows. Without this a noisy per-step window follows a climb of a few dozen
  steps up to the peak and the spike is never flagged; dropping the far upper tail of ordinary
  noise (beyond ~4 sigma with the default 8 MADs) biases the median by a negligible amount.
- After a rollback the LR multiplier is `lr_backoff ** n_rollbacks` (all rollbacks of the run). With
  `warmup_steps_after_rollback = W > 0` it ramps linearly from `WARMUP_START_FRACTION` (0.1) times
  that multiplier at the restored step up to the full multiplier W steps later.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

from vits_ray.config import StabilityConfig
from vits_ray.rollbacks import RollbackEntry, RollbackLedger, TooManyRollbacksError  # noqa: F401 (raised through the guard)

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
# The generator total loss and the two parts that blow up first in VITS.
SPIKE_SERIES = ("loss_1", "loss_mel", "loss_kl")
# Every reported number that must be finite for a step to count as a normal step.
FINITE_SERIES = ("loss_1", "loss_mel", "loss_kl", "loss_0", "grad_norm_0", "grad_norm_1")
SKIP_FLAGS = ("skipped_0", "skipped_1")
WARMUP_START_FRACTION = 0.1
PROBATION_FRACTION = 0.5
# Per-epoch averages are already smoothed over hundreds of steps and there are only ~100s of them:
# a shorter window fills sooner, and two epochs in a row above the band are strong evidence.
PER_EPOCH_OVERRIDES: dict[str, Any] = {"window": 30, "min_history": 10, "confirm_steps": 2}

EventKind = Literal["nonfinite", "spike", "amp_collapse", "amp_calibrated", "blowup", "rollback", "lr_backoff",
                    "cadence_unstable", "cadence_calm", "checkpoint_verdict"]


def per_epoch_config(cfg: StabilityConfig | None = None) -> StabilityConfig:
    """The detector settings recommended for one value per epoch (e.g. `avg_loss_1`)."""
    return dataclasses.replace(cfg or StabilityConfig(), **PER_EPOCH_OVERRIDES)


# --- records ------------------------------------------------------------------------------

def _json_float(x: Optional[float]) -> Any:
    # events.jsonl must stay strict JSON, which has no NaN or Infinity.
    if x is None or math.isfinite(x):
        return x
    return str(x)  # "nan", "inf", "-inf"


def _from_json_float(x: Any) -> Optional[float]:
    return None if x is None else float(x)


@dataclass(frozen=True)
class SpikeVerdict:
    """A suspicious value and the statistics it was judged against."""

    value: float
    median: float
    mad: float
    threshold: float
    run: int  # consecutive suspicious values so far, this one included
    confirmed: bool


@dataclass(frozen=True)
class Event:
    step: int
    kind: EventKind
    series: Optional[str] = None
    value: Optional[float] = None
    median: Optional[float] = None
    threshold: Optional[float] = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "series": self.series,
                "value": _json_float(self.value), "median": _json_float(self.median),
                "threshold": _json_float(self.threshold), "detail": dict(self.detail)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Event":
        return cls(step=int(d["step"]), kind=d["kind"], series=d.get("series"),
                   value=_from_json_float(d.get("value")), median=_from_json_float(d.get("median")),
                   threshold=_from_json_float(d.get("threshold")), detail=dict(d.get("detail", {})))


@dataclass(frozen=True)
class Decision:
    action: Literal["continue", "rollback"]
    events: list[Event] = field(default_factory=list)
    # With a rollback: the first step of the trouble; checkpoints at or after it are not trusted.
    first_anomalous: Optional[int] = None

    @property
    def rollback(self) -> bool:
        return self.action == "rollback"


@dataclass(frozen=True)
class Spike:
    """One confirmed spike in a recorded curve (indices into the values given to `find_spikes`)."""

    start_index: int  # first suspicious value of the run that got confirmed
    peak_index: int
    peak_value: float
    baseline: float  # median of the window before the spike
    threshold: float  # upper edge of the normal band before the spike
    size: float  # peak_value - baseline
    recovery_index: Optional[int]  # first index after the peak back within the band, None if never


# --- detectors ----------------------------------------------------------------------------

class SpikeDetector:
    """Robust online detector of upward jumps in one series; see the module docstring."""

    def __init__(self, *, window: int, min_history: int, threshold_mads: float,
                 min_relative_jump: float, confirm_steps: int) -> None:
        assert 2 <= min_history <= window and confirm_steps >= 1
        self.threshold_mads = threshold_mads
        self.min_relative_jump = min_relative_jump
        self.min_history = min_history
        self.confirm_steps = confirm_steps
        self._history: deque[float] = deque(maxlen=window)
        self._probation: list[float] = []
        self._run = 0

    @classmethod
    def from_config(cls, cfg: StabilityConfig) -> "SpikeDetector":
        return cls(window=cfg.window, min_history=cfg.min_history, threshold_mads=cfg.threshold_mads,
                   min_relative_jump=cfg.min_relative_jump, confirm_steps=cfg.confirm_steps)

    @property
    def suspicious_run(self) -> int:
        return self._run

    def band(self) -> Optional[tuple[float, float, float]]:
        """(median, mad, threshold) of the current window, or None before `min_history` values."""
        if len(self._history) < self.min_history:
            return None
        median = statistics.median(self._history)
        mad = statistics.median(abs(x - median) for x in self._history)
        threshold = max(median + self.threshold_mads * MAD_TO_SIGMA * mad,
                        median + abs(median) * self.min_relative_jump)
        return median, mad, threshold

    def update(self, value: float) -> Optional[SpikeVerdict]:
        """None for a normal value (which joins the window); a verdict for a suspicious one."""
        if not math.isfinite(value):
            return None
        band = self.band()
        if band is None or value <= band[2]:
            self._run = 0
            if band is not None and value > band[0] + PROBATION_FRACTION * (band[2] - band[0]):
                self._probation.append(value)
                if len(self._probation) >= self.min_history:
                    self._accept_probation()
            else:
                self._probation.clear()
                self._history.append(value)
            return None
        median, mad, threshold = band
        self._probation.clear()  # the climb that led up to the spike
        self._run += 1
        return SpikeVerdict(value=value, median=median, mad=mad, threshold=threshold,
                            run=self._run, confirmed=self._run >= self.confirm_steps)

    def _accept_probation(self) -> None:
        self._history.extend(self._probation)
        self._probation.clear()

    def reset_run(self) -> None:
        """Forget the current suspicious run, keep the window of good values."""
        self._run = 0

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._history), "probation": list(self._probation), "run": self._run}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history.clear()
        self._history.extend(float(x) for x in state["history"])
        self._probation = [float(x) for x in state["probation"]]
        self._run = int(state["run"])


class SeriesMonitor:
    """One `SpikeDetector` per named series; a confirmed spike in any of them is a spike."""

    def __init__(self, names: Iterable[str], cfg: StabilityConfig) -> None:
        self.detectors = {name: SpikeDetector.from_config(cfg) for name in names}

    def update(self, metrics: Mapping[str, float]) -> list[tuple[str, SpikeVerdict]]:
        """Feed every monitored series present in `metrics`; returns the suspicious ones."""
        out = []
        for name, detector in self.detectors.items():
            if name in metrics:
                verdict = detector.update(float(metrics[name]))
                if verdict is not None:
                    out.append((name, verdict))
        return out

    @property
    def suspicious(self) -> bool:
        return any(d.suspicious_run > 0 for d in self.detectors.values())

    def reset_runs(self) -> None:
        for detector in self.detectors.values():
            detector.reset_run()

    def state_dict(self) -> dict[str, Any]:
        return {name: d.state_dict() for name, d in self.detectors.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, detector in self.detectors.items():
            if name in state:
                detector.load_state_dict(state[name])


class AmpScaleMonitor:
    """Flags the GradScaler's scale collapsing: below `min_scale`, or `max_halvings` decreases
    without any growth in between, all within `window_steps` steps.

    A fresh GradScaler starts far above what the model's gradients allow (65536 by default; the
    tiny recipe takes 32 on CPU) and halves at every overflowing step until the scaled gradients
    fit in fp16. That calibration is expected, not a collapse: from `start_calibration` until the
    first step that neither optimizer skipped, overflows are counted (`calibration_skips`) and
    decreases are not; only the floor `min_scale` still applies, so a scaler that never finds a
    level is caught all the same.
    """

    def __init__(self, *, min_scale: float, max_halvings: int, window_steps: int) -> None:
        self.min_scale = min_scale
        self.max_halvings = max_halvings
        self.window_steps = window_steps
        self._last: Optional[float] = None
        self._halvings: list[int] = []  # steps of the decreases since the last growth
        self.calibrating = False
        self.calibration_skips = 0
        self._calibration_from: Optional[float] = None

    @classmethod
    def from_config(cls, cfg: StabilityConfig) -> "AmpScaleMonitor":
        return cls(min_scale=cfg.min_amp_scale, max_halvings=cfg.amp_max_halvings,
                   window_steps=cfg.amp_halving_window_steps)

    def start_calibration(self) -> None:
        """A fresh GradScaler: its first overflows are calibration (see the class docstring)."""
        self.calibrating = True
        self.calibration_skips = 0
        self._calibration_from = None

    def update(self, step: int, scale: float) -> Optional[dict[str, Any]]:
        """None while healthy; otherwise the detail of the collapse."""
        if not math.isfinite(scale) or scale < self.min_scale:
            return {"reason": "below_min", "scale": _json_float(scale), "min_amp_scale": self.min_scale,
                    "calibrating": self.calibrating}
        if self.calibrating:
            if self._calibration_from is None:
                self._calibration_from = scale
            self._last = scale
            return None
        if self._last is not None:
            if scale < self._last:
                self._halvings.append(step)
            elif scale > self._last:
                self._halvings.clear()
        self._last = scale
        # Steps may go back after a rollback; keep only decreases within the window of this step.
        self._halvings = [s for s in self._halvings if abs(step - s) < self.window_steps]
        if len(self._halvings) >= self.max_halvings:
            return {"reason": "repeated_halving", "scale": scale, "halvings": len(self._halvings),
                    "halving_steps": list(self._halvings), "window_steps": self.window_steps}
        return None

    def count_calibration_skip(self) -> None:
        self.calibration_skips += 1

    def end_calibration(self, scale: float) -> dict[str, Any]:
        """The first step without an overflow: calibration is over. Its detail, for the event."""
        self.calibrating = False
        return {"skipped_steps": self.calibration_skips, "initial_scale": _json_float(self._calibration_from or scale),
                "scale": scale}

    def reset(self) -> None:
        self._last = None
        self._halvings.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"last": self._last, "halvings": list(self._halvings), "calibrating": self.calibrating,
                "calibration_skips": self.calibration_skips, "calibration_from": self._calibration_from}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._last = None if state["last"] is None else float(state["last"])
        self._halvings = [int(s) for s in state["halvings"]]
        self.calibrating = bool(state.get("calibrating", False))
        self.calibration_skips = int(state.get("calibration_skips", 0))
        start = state.get("calibration_from")
        self._calibration_from = None if start is None else float(start)


class CheckpointCadence:
    """Save every `save_step` steps; every `unstable_save_step` from an event until `calm_steps`
    steps have passed without one."""

    def __init__(self, *, save_step: int, unstable_save_step: int, calm_steps: int) -> None:
        self.save_step = save_step
        self.unstable_save_step = unstable_save_step
        self.calm_steps = calm_steps
        self._last_event: Optional[int] = None
        self._step = 0

    def unstable_at(self, step: int) -> bool:
        # After a rollback the step is before the last event: still unstable.
        return self._last_event is not None and step - self._last_event < self.calm_steps

    @property
    def unstable(self) -> bool:
        return self.unstable_at(self._step)

    @property
    def interval(self) -> int:
        """The interval in force at the latest step seen."""
        return self.unstable_save_step if self.unstable else self.save_step

    def mark_unstable(self, step: int) -> bool:
        """Record an event at `step`; True when this switches the cadence to unstable."""
        was = self.unstable_at(step)
        self._last_event = step
        self._step = step
        return not was

    def advance(self, step: int) -> bool:
        """Move to `step`; True when this step ends an unstable period."""
        was = self.unstable
        self._step = step
        return was and not self.unstable

    def should_save(self, step: int) -> bool:
        self._step = step
        return step > 0 and step % self.interval == 0

    def state_dict(self) -> dict[str, Any]:
        return {"last_event": self._last_event, "step": self._step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._last_event = None if state["last_event"] is None else int(state["last_event"])
        self._step = int(state["step"])


# --- the guard ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointVerdict:
    """What the guard says of the weights at the step just observed, for a checkpoint of them.

    `clean`: every series has a baseline and the newest values are within it. `unjudged`: a
    series has too little history to judge (the first `min_history` steps). `suspect`: a
    suspicious run awaits confirmation, the newest value is elevated, or steps are non-finite; a
    scheduled save waits for the guard's decision instead of writing these weights."""

    kind: Literal["clean", "unjudged", "suspect"]
    reason: str = ""

    @property
    def trusted(self) -> bool:
        return self.kind != "suspect"


class StabilityGuard:
    """Turns per-step metrics into continue/rollback decisions (on every rank, from identical inputs).

    - Non-finite step (any of FINITE_SERIES NaN/inf, or a skipped_* flag set): a `nonfinite`
      event; the step feeds no detector. `max_consecutive_nonfinite` in a row -> rollback.
    - Confirmed spike in loss_1, loss_mel or loss_kl: a `spike` event per series -> rollback.
    - AMP scale collapse: an `amp_collapse` event -> rollback. A fresh GradScaler's calibration
      (its first overflows, finite losses) is neither a collapse nor non-finite steps: it ends
      with one `amp_calibrated` event that counts the skipped steps (see `AmpScaleMonitor`).
    - A step whose forward or backward raised with evidence of a blow-up behind it (`failed`
      ranks, see `blowup`): a `blowup` event -> rollback, like a confirmed spike.
    - A rollback decision carries a `rollback` event naming its reasons and `first_anomalous`,
      the first step of the trouble (`first_anomalous`): no checkpoint at or after it is trusted.
    - Cadence turns unstable on spike, amp_collapse, rollback and on non-finite *losses*; a
      non-finite grad norm alone is the GradScaler's routine overflow and does not.
    - `checkpoint_verdict` says whether the weights may be saved now (see `CheckpointVerdict`).
    - The rollbacks themselves are in `ledger` (`rollbacks.RollbackLedger`), which is not part of
      `state_dict`: restoring a checkpoint must not restore an older budget or backoff.
    - Events raised by `after_rollback` (`lr_backoff`, `cadence_unstable`) arrive with the next
      decision.
    - Disabled (`enabled = false`): always continue; `nonfinite` events are still reported because
      they are facts the NaN post-mortem needs, but they never escalate; saving follows `save_step`.

    A value is *elevated* when it lies above the midpoint of its series' normal band (the
    probation line, see the module docstring): the first step of the trouble is found by walking
    back from where it was confirmed over the contiguous steps that are elevated or non-finite,
    judged against the band as it is then. That catches what no online test can: a value taken
    into the window while the detector was still filling it, or the climb that led to a spike.
    """

    def __init__(self, cfg: StabilityConfig, save_step: int) -> None:
        self.cfg = cfg
        self.monitor = SeriesMonitor(SPIKE_SERIES, cfg)
        self.amp = AmpScaleMonitor.from_config(cfg)
        self.ledger = RollbackLedger.from_config(cfg)
        self.cadence = CheckpointCadence(save_step=save_step, unstable_save_step=cfg.unstable_save_step,
                                         calm_steps=cfg.calm_steps)
        self._nonfinite_run = 0
        self._pending: list[Event] = []
        # (step, the spike series' values, losses finite) of the latest steps, for the walk back.
        self._recent: deque[tuple[int, dict[str, float], bool]] = deque(maxlen=cfg.window)
        self._clean_through = -1  # the latest step every series judged within its band

    # --- per step -----------------------------------------------------------------------------

    def observe(self, step: int, metrics: Mapping[str, float]) -> Decision:
        events, self._pending = self._pending, []
        bad = [n for n in FINITE_SERIES if n in metrics and not math.isfinite(float(metrics[n]))]
        bad += [n for n in SKIP_FLAGS if metrics.get(n)]
        nonfinite = None
        losses_finite = not any(n.startswith("loss_") for n in bad) and not metrics.get("failed")
        overflowed = bool(bad)
        if bad and losses_finite and self.amp.calibrating and metrics.get("amp_scale") is not None:
            # A fresh GradScaler overflowing while it looks for its level: counted, not trouble.
            self.amp.count_calibration_skip()
            bad = []
        if bad:
            self._nonfinite_run += 1
            nonfinite = Event(step, "nonfinite", series=bad[0], value=_metric(metrics, bad[0]), detail={
                "series": bad, "consecutive": self._nonfinite_run, "losses_finite": losses_finite})
            events.append(nonfinite)
        else:
            self._nonfinite_run = 0
        self._recent.append((step, {n: float(metrics[n]) for n in SPIKE_SERIES if n in metrics}, losses_finite))
        if not self.cfg.enabled:
            return Decision("continue", events)

        reasons: list[str] = []
        starts: list[int] = []  # where each reason says the trouble began, at the latest
        if metrics.get("failed"):
            events.append(Event(step, "blowup", detail={"where": "training step", "ranks": int(metrics["failed"])}))
            reasons.append("blowup")
            starts.append(step - 1)  # the weights that raised came out of the step before
        if nonfinite is not None and self._nonfinite_run >= self.cfg.max_consecutive_nonfinite:
            reasons.append("nonfinite")
            starts.append(step - self._nonfinite_run + 1)
        if nonfinite is None:
            for series, v in self.monitor.update(metrics):
                if v.confirmed:
                    events.append(Event(step, "spike", series=series, value=v.value, median=v.median,
                                        threshold=v.threshold, detail={"mad": v.mad, "run": v.run}))
                    reasons.append(f"spike:{series}")
                    starts.append(step)
        if metrics.get("amp_scale") is not None:
            collapse = self.amp.update(step, float(metrics["amp_scale"]))
            if collapse is not None:
                events.append(Event(step, "amp_collapse", series="amp_scale",
                                    value=float(metrics["amp_scale"]), detail=collapse))
                reasons.append("amp_collapse")
                starts.append(min(collapse.get("halving_steps") or [step]))
            elif self.amp.calibrating and not overflowed:
                events.append(Event(step, "amp_calibrated", series="amp_scale", value=float(metrics["amp_scale"]),
                                    detail=self.amp.end_calibration(float(metrics["amp_scale"]))))
        if nonfinite is None and not reasons and self._judged_within_band():
            self._clean_through = step
        first_anomalous = self.first_anomalous(min(starts)) if reasons else None
        if reasons:
            events.append(Event(step, "rollback", detail={
                "reasons": reasons, "first_anomalous": first_anomalous, "rollbacks_so_far": self.ledger.total}))

        destabilising = reasons or (nonfinite is not None and not nonfinite.detail["losses_finite"])
        if destabilising:
            if self.cadence.mark_unstable(step):
                events.append(Event(step, "cadence_unstable"))
        elif self.cadence.advance(step):
            events.append(Event(step, "cadence_calm"))
        return Decision("rollback" if reasons else "continue", events, first_anomalous)

    def blowup(self, step: int, where: str, ranks: int) -> Decision:
        """A forward pass raised on `ranks` rank(s) with a blow-up behind it, outside a training
        step (e.g. in validation, after step `step`'s update): handled as a confirmed spike."""
        events, self._pending = self._pending, []
        first_anomalous = self.first_anomalous(step)
        events.append(Event(step, "blowup", detail={"where": where, "ranks": ranks}))
        events.append(Event(step, "rollback", detail={"reasons": ["blowup"], "first_anomalous": first_anomalous,
                                                      "rollbacks_so_far": self.ledger.total}))
        if self.cadence.mark_unstable(step):
            events.append(Event(step, "cadence_unstable"))
        return Decision("rollback", events, first_anomalous)

    # --- judging steps and checkpoints --------------------------------------------------------

    def elevated(self, values: Mapping[str, float]) -> list[str]:
        """"series value > line" for each value above the midpoint of its series' current band."""
        out = []
        for name, value in values.items():
            band = self.monitor.detectors[name].band()
            if band is None or not math.isfinite(value):
                continue
            line = band[0] + PROBATION_FRACTION * (band[2] - band[0])
            if value > line:
                out.append(f"{name} {value:.4g} > {line:.4g}")
        return out

    def _judged_within_band(self) -> bool:
        values = self._recent[-1][1]
        return (all(d.band() is not None for d in self.monitor.detectors.values())
                and not self.monitor.suspicious and not self.elevated(values))

    def first_anomalous(self, start: int) -> int:
        """The first step of the trouble that shows at `start` at the latest: walking back from
        `start` over the contiguous steps whose values are elevated or whose losses are non-finite."""
        first = start
        for step, values, finite in reversed(self._recent):
            if step >= start:
                continue
            if step != first - 1 or (finite and not self.elevated(values)):
                break
            first = step
        return first

    def recent_outliers(self, steps: int) -> list[str]:
        """What was abnormal in the last `steps` observed steps ("step 9: loss_1 1.1e+06 > 161"):
        evidence that an exception from Coqui's forward is a blow-up, not a bug."""
        found = []
        for step, values, finite in list(self._recent)[-steps:]:
            problems = ([] if finite else ["non-finite losses"]) + self.elevated(values)
            if problems:
                found.append(f"step {step}: {', '.join(problems)}")
        return found

    def checkpoint_verdict(self) -> CheckpointVerdict:
        """May the weights after the latest observed step be saved? See `CheckpointVerdict`."""
        if not self.cfg.enabled:
            return CheckpointVerdict("unjudged", "the stability guard is disabled")
        if self._nonfinite_run:
            return CheckpointVerdict("suspect", f"{self._nonfinite_run} non-finite step(s) in a row")
        running = {n: d.suspicious_run for n, d in self.monitor.detectors.items() if d.suspicious_run}
        if running:
            return CheckpointVerdict("suspect", "suspicious " + ", ".join(
                f"{n} for {r} step(s)" for n, r in running.items()) + " awaiting confirmation")
        if self._recent:
            step, values, _ = self._recent[-1]
            elevated = self.elevated(values)
            if elevated:
                return CheckpointVerdict("suspect", f"step {step}: " + ", ".join(elevated))
        missing = [n for n, d in self.monitor.detectors.items() if d.band() is None]
        if missing:
            return CheckpointVerdict("unjudged", f"no baseline yet for {', '.join(missing)} "
                                                 f"(fewer than {self.cfg.min_history} steps seen)")
        return CheckpointVerdict("clean")

    def settled(self, step: int) -> bool:
        """Whether a checkpoint at `step` is out of reach of any trouble found from now on: a
        later step was judged within every band, and the walk back stops there."""
        return self._clean_through > step

    def save_due(self, step: int) -> bool:
        """Whether the checkpoint cadence asks for a save at `step` (the verdict decides whether now)."""
        if not self.cfg.enabled:
            return step > 0 and step % self.cadence.save_step == 0
        return self.cadence.should_save(step)

    # --- rollbacks ----------------------------------------------------------------------------

    def after_rollback(self, step: int, restored_step: int, *, first_anomalous: Optional[int] = None,
                       reasons: Sequence[str] = (), lrs: tuple[float, float] = (math.nan, math.nan)) -> float:
        """Record a rollback decided at `step` that restored `restored_step` in the ledger.

        Returns the backed-off LR multiplier `lr_backoff ** rollbacks`; with
        `warmup_steps_after_rollback > 0` apply `lr_multiplier(step)` at every step instead.
        Raises TooManyRollbacksError past the budget (before changing any other state).
        """
        entry = self.ledger.record(RollbackEntry(
            decided_at=step, first_anomalous=step if first_anomalous is None else first_anomalous,
            restored=restored_step, reasons=tuple(reasons), lr_disc=lrs[0], lr_gen=lrs[1]))
        self.monitor.reset_runs()
        self.amp.reset()  # the restored GradScaler starts from its checkpointed scale
        self._nonfinite_run = 0
        self._pending.append(Event(step, "lr_backoff", value=entry.multiplier, detail={
            "rollbacks": self.ledger.total, "restored_step": restored_step,
            "first_anomalous": entry.first_anomalous, "warmup_steps": self.cfg.warmup_steps_after_rollback}))
        if self.cadence.mark_unstable(restored_step):
            self._pending.append(Event(restored_step, "cadence_unstable"))
        return entry.multiplier

    def lr_backoff_multiplier(self) -> float:
        """`lr_backoff ** rollbacks`, without the warmup ramp."""
        return self.ledger.multiplier

    def lr_multiplier(self, step: int) -> float:
        """Factor for the scheduled LR at `step` (a pure function of the step and the rollbacks).

        Full backoff `lr_backoff ** n`, except within `warmup_steps_after_rollback` steps after the
        last restored step, where it ramps linearly from WARMUP_START_FRACTION of that value.
        """
        target = self.lr_backoff_multiplier()
        warmup = self.cfg.warmup_steps_after_rollback
        restored = self.ledger.last_restored
        if warmup <= 0 or restored is None:
            return target
        progress = min(max((step - restored) / warmup, 0.0), 1.0)
        return target * (WARMUP_START_FRACTION + (1.0 - WARMUP_START_FRACTION) * progress)

    # --- state (the ledger is kept apart: see the class docstring) ----------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"version": 2, "detectors": self.monitor.state_dict(), "amp": self.amp.state_dict(),
                "cadence": self.cadence.state_dict(), "nonfinite_run": self._nonfinite_run,
                "pending": [e.to_dict() for e in self._pending],
                "recent": [[s, {k: _json_float(v) for k, v in values.items()}, finite]
                           for s, values, finite in self._recent],
                "clean_through": self._clean_through}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version = state.get("version")
        assert version in (1, 2), f"unknown stability state version {version!r}"
        self.monitor.load_state_dict(state["detectors"])
        self.amp.load_state_dict(state["amp"])
        self.cadence.load_state_dict(state["cadence"])
        self._nonfinite_run = int(state["nonfinite_run"])
        self._pending = [Event.from_dict(e) for e in state["pending"]]
        # Version 1 (before the walk back) kept its rollback budget here; the ledger replaces it.
        self._recent.clear()
        self._recent.extend((int(s), {k: float(v) for k, v in values.items()}, bool(finite))
                            for s, values, finite in state.get("recent", []))
        self._clean_through = int(state.get("clean_through", -1))


def _metric(metrics: Mapping[str, float], name: str) -> Optional[float]:
    try:
        return float(metrics[name])
    except (KeyError, TypeError, ValueError):
        return None


# --- offline ------------------------------------------------------------------------------

def find_spikes(values: Sequence[float], cfg: StabilityConfig) -> list[Spike]:
    """Confirmed spikes in a recorded curve, found by the same detector as in training.

    For per-epoch curves pass `per_epoch_config(cfg)`. The normal band is the detector's: a value
    is back within it when it is no longer suspicious (<= the pre-spike threshold). Like a spike,
    a recovery needs `confirm_steps` such values in a row, so a noisy decay is one spike, not
    several; `recovery_index` is the first of them. Non-finite values are skipped.
    """
    detector = SpikeDetector.from_config(cfg)
    spikes: list[Spike] = []
    run: list[tuple[int, float]] = []  # suspicious values of the current run or open spike
    first: Optional[SpikeVerdict] = None  # verdict of the run's first value: the pre-spike band
    open_spike = False
    calm: list[int] = []  # indices of the normal values in a row while a spike is open

    def close(recovery: Optional[int]) -> None:
        assert first is not None
        peak_index, peak_value = max(run, key=lambda iv: iv[1])
        spikes.append(Spike(start_index=run[0][0], peak_index=peak_index, peak_value=peak_value,
                            baseline=first.median, threshold=first.threshold,
                            size=peak_value - first.median, recovery_index=recovery))

    for i, value in enumerate(values):
        if not math.isfinite(value):
            continue
        verdict = detector.update(value)
        if verdict is None:
            if not open_spike:
                run, first = [], None
                continue
            calm.append(i)
            if len(calm) >= cfg.confirm_steps:
                close(calm[0])
                run, first, open_spike, calm = [], None, False, []
            continue
        calm = []
        if first is None:
            first = verdict
        run.append((i, value))
        open_spike = open_spike or verdict.confirmed
    if open_spike:
        close(None)
    return spikes
