"""The instability-aware objective of a sweep: lower is better, always finite.

A trial's loss is its last validation mel loss, or, without a validation split, the median mel
loss of its last steps. The stability guard can rescue a bad schedule (roll back, back off), so a
run that needed rescue must rank below one that did not: the loss is inflated by a penalty for
each confirmed spike, rollback, blow-up and non-finite step. A trial with no finite loss at all
diverged and gets DIVERGED_SCORE: finite, because Optuna refuses a NaN result (and leaves the
trial running) and ASHA never stops a trial whose score is NaN.
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
    steps: int
    diverged: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def score_metrics(metrics: Mapping[str, Any]) -> TrialScore:
    """Score one report of a trial (`Trainer.health_metrics` plus whatever else it carried)."""
    counts = {k: int(metrics.get(k, 0) or 0) for k in HEALTH_COUNTS}
    loss = _finite(metrics.get("val_loss_mel"))
    if loss is None:
        loss = _finite(metrics.get("loss_mel_recent"))
    steps = int(metrics.get("step", 0) or 0)
    if loss is None:
        return TrialScore(DIVERGED_SCORE, float("nan"), float("nan"), counts["spikes"], counts["rollbacks"],
                          counts["nonfinite_steps"], counts["blowups"], steps, True)
    factor = sum(PENALTIES[k] * counts[k] for k in HEALTH_COUNTS)
    score = min(loss * (1.0 + factor), DIVERGED_SCORE)
    return TrialScore(score, loss, loss * factor, counts["spikes"], counts["rollbacks"], counts["nonfinite_steps"],
                      counts["blowups"], steps, False)
