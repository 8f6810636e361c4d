"""The objective of a sweep: lower is better, always finite.

A trial's loss is the mean validation mel loss of its last `tune.score_validations` validations
(every validation sees the same utterances, segments and noise: `Trainer.validate`), or, without a
validation split, the median mel loss of its last steps. Inflating it:
- a penalty for each spike, rollback, blow-up and non-finite step the guard recorded;
- `tune.margin_penalty` when a stability margin probe failed (`Trainer.probe_margin`): the
  schedule held, but would not have with a little less room.

A trial that diverged (the guard's first confirmed instability ends a trial: `stop_on_instability`)
or has no finite loss scores DIVERGED_SCORE x (2 - the share of its steps it reached): finite and
worse than every trial that did not diverge, so Optuna is told a value (not a failure) and learns
where the edge is, and one that diverged sooner ranks lower still. Finite also because Optuna
refuses a NaN result and ASHA never stops a trial whose score is NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from vits_ray.checkpoint import HEALTH_COUNTS

DIVERGED_SCORE = 1e6
# Relative penalties, one per HEALTH_COUNTS key: a spike costs a quarter of the loss, a rollback
# half (it is a confirmed spike that also cost a restore and an LR backoff), a blow-up half, a
# non-finite step a twentieth.
PENALTIES = {"spikes": 0.25, "rollbacks": 0.5, "blowups": 0.5, "nonfinite_steps": 0.05}


@dataclass(frozen=True)
class TrialScore:
    score: float
    loss: float
    penalty: float
    spikes: int
    rollbacks: int
    nonfinite_steps: int
    blowups: int
    steps: int  # the trial's own steps (from where it started)
    diverged: bool
    cause: str = ""  # why it diverged
    margin_ok: int = 1  # 1: every stability margin probe held (or none ran)
    margin_loss_rise: float = math.nan  # the latest probe's relative mel loss rise at the higher rate
    margin_cause: str = ""
    val_noise: float = math.nan  # the standard deviation of the final validation over seeds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def clean(self) -> bool:
        """Nothing the guard flagged, and it did not diverge."""
        return not self.diverged and not any(getattr(self, k) for k in HEALTH_COUNTS)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def trial_loss(metrics: Mapping[str, Any]) -> float | None:
    """The smoothed validation mel loss, else the last validation's, else the recent steps' median."""
    for key in ("val_loss_mel_mean", "val_loss_mel", "loss_mel_recent"):
        loss = _finite(metrics.get(key))
        if loss is not None:
            return loss
    return None


def score_metrics(metrics: Mapping[str, Any], horizon: int = 0, margin_penalty: float = 0.0) -> TrialScore:
    """Score one report of a trial (`Trainer.health_metrics`, plus `trial_step` in a sweep).
    `horizon`: the trial's steps when it is not stopped early (ranks the diverged)."""
    counts = {k: int(metrics.get(k, 0) or 0) for k in HEALTH_COUNTS}
    steps = int(metrics.get("trial_step", metrics.get("step", 0)) or 0)
    loss = trial_loss(metrics)
    margin_ok = int(not int(metrics.get("margin_failures", 0) or 0))
    rise = _finite(metrics.get("margin_loss_rise"))
    noise = _finite(metrics.get("val_noise"))
    common = dict(margin_ok=margin_ok, margin_loss_rise=math.nan if rise is None else rise,
                  margin_cause=str(metrics.get("margin_cause") or ""), val_noise=math.nan if noise is None else noise)
    if loss is None or metrics.get("diverged"):
        cause = str(metrics.get("cause") or "") or "no finite loss"
        reached = min(1.0, steps / horizon) if horizon else 0.0
        return TrialScore(DIVERGED_SCORE * (2.0 - reached), math.nan if loss is None else loss, math.nan,
                          counts["spikes"], counts["rollbacks"], counts["nonfinite_steps"], counts["blowups"], steps,
                          True, cause, **common)
    factor = sum(PENALTIES[k] * counts[k] for k in HEALTH_COUNTS) + (0.0 if margin_ok else margin_penalty)
    score = min(loss * (1.0 + factor), DIVERGED_SCORE - 1.0)
    return TrialScore(score, loss, loss * factor, counts["spikes"], counts["rollbacks"], counts["nonfinite_steps"],
                      counts["blowups"], steps, False, **common)
