"""Where a rollback goes, and the run's record of every rollback: pure logic, no torch, Ray or I/O.

A rollback must never return to a checkpoint that holds the trouble it escapes, and a run that
keeps diverging must stop instead of looping (one that did rolled back to the same poisoned
checkpoint 55 times in 16 minutes). Two things make that hold:

- Every checkpoint says what it is (`CheckpointInfo`): its step, its *generation* (how many
  rollbacks the run had made when it was written) and the stability guard's verdict when it was
  written: `clean`, `unjudged` (before the detectors had a baseline), or `suspect` (a save that
  could not wait for the detectors, such as the last one of a run). A rollback goes to the newest
  trusted checkpoint strictly before the first anomalous step, never to one at or after it.
- `RollbackLedger` records every rollback. It lives beside the checkpoints (`rollbacks.json` in
  the run), never inside one, so restoring an older checkpoint (a rollback, a worker restart, a
  relaunch) cannot restore an older budget: the budget, the count of rollbacks to each step and
  the learning-rate backoff only ever grow.

Rules, one place each:
- Abandoned: a rollback that restored step t abandons every checkpoint after t written before it
  (in its generation or an earlier one): that timeline was rolled back past them.
- Escalation: after `escalate_after` rollbacks to the same step, the next goes one checkpoint
  further back, when there is one.
- Budget: at most `max_rollbacks` rollbacks decided within `rollback_window_steps` steps. Steps go
  back after a rollback, so rollbacks decided at later steps of an abandoned timeline still count.
- Backoff: the learning rates are multiplied by `lr_backoff ** (rollbacks so far)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping, Optional

from vits_ray.errors import NonRetryable

# The run's initial state, held in memory until a checkpoint is known to be clean.
START = "start"
ESCALATE_AFTER = 2


class TooManyRollbacksError(NonRetryable, RuntimeError):
    """Training keeps diverging after rollbacks; continuing would only burn compute."""


class NoCleanCheckpointError(NonRetryable, RuntimeError):
    """A rollback is needed, but no checkpoint from before the trouble is left to go back to."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as the rollback rules see it (its folder's `meta.json`)."""

    name: str  # the folder, checkpoint_XXXXXXXX, or START
    step: int
    generation: int = 0
    verdict: str = "unjudged"
    reason: str = ""

    @property
    def trusted(self) -> bool:
        return self.verdict != "suspect"

    def label(self) -> str:
        return "the run's start" if self.name == START else f"checkpoint {self.step}"

    @staticmethod
    def from_meta(name: str, meta: Mapping[str, Any]) -> "CheckpointInfo":
        return CheckpointInfo(name=name, step=int(meta["step"]), generation=int(meta.get("generation", 0)),
                              verdict=str(meta.get("verdict", "unjudged")), reason=str(meta.get("reason", "")))


@dataclass(frozen=True)
class RollbackEntry:
    """One rollback: decided at `decided_at`, the trouble began at `first_anomalous`, it restored
    `restored`; the learning rates in force when it was decided, and the multiplier after it."""

    decided_at: int
    first_anomalous: int
    restored: int
    reasons: tuple[str, ...] = ()
    lr_disc: float = math.nan
    lr_gen: float = math.nan
    multiplier: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        for key in ("lr_disc", "lr_gen"):  # strict JSON has no NaN
            out[key] = out[key] if math.isfinite(out[key]) else None
        return out

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "RollbackEntry":
        return RollbackEntry(decided_at=int(d["decided_at"]), first_anomalous=int(d["first_anomalous"]),
                             restored=int(d["restored"]), reasons=tuple(d.get("reasons", ())),
                             lr_disc=math.nan if d.get("lr_disc") is None else float(d["lr_disc"]),
                             lr_gen=math.nan if d.get("lr_gen") is None else float(d["lr_gen"]),
                             multiplier=float(d.get("multiplier", 1.0)))

    def describe(self) -> str:
        lrs = (f", lr_gen {self.lr_gen:.2e} / lr_disc {self.lr_disc:.2e}"
               if math.isfinite(self.lr_gen) and math.isfinite(self.lr_disc) else "")
        return (f"step {self.decided_at} (trouble from step {self.first_anomalous}{lrs}) back to step "
                f"{self.restored}, learning rates then x{self.multiplier:g}")


@dataclass(frozen=True)
class RollbackPlan:
    target: CheckpointInfo
    first_anomalous: int
    poisoned: list[CheckpointInfo] = field(default_factory=list)  # at or after the first anomalous step
    passed_over: list[CheckpointInfo] = field(default_factory=list)  # trusted, but rolled back to too often


class RollbackLedger:
    """Every rollback of a run, and what follows from them (see the module docstring)."""

    def __init__(self, *, max_rollbacks: int, window_steps: int, lr_backoff: float,
                 escalate_after: int = ESCALATE_AFTER) -> None:
        self.max_rollbacks = max_rollbacks
        self.window_steps = window_steps
        self.lr_backoff = lr_backoff
        self.escalate_after = escalate_after
        self.entries: list[RollbackEntry] = []
        # How unstable the run has been (spikes, rollbacks, ...), kept here too so that a restart
        # from an older checkpoint cannot lower the counts.
        self.health: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg) -> "RollbackLedger":
        return cls(max_rollbacks=cfg.max_rollbacks, window_steps=cfg.rollback_window_steps,
                   lr_backoff=cfg.lr_backoff)

    # --- what the entries say -----------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self.entries)

    @property
    def generation(self) -> int:
        """The generation of a checkpoint written now: the number of rollbacks so far."""
        return len(self.entries)

    @property
    def multiplier(self) -> float:
        """`lr_backoff ** rollbacks`: compounds with every rollback, whatever was restored."""
        return self.lr_backoff ** len(self.entries)

    @property
    def last_restored(self) -> Optional[int]:
        return self.entries[-1].restored if self.entries else None

    def restores_to(self, step: int) -> int:
        return sum(1 for e in self.entries if e.restored == step)

    def abandoned_by(self, info: CheckpointInfo) -> Optional[RollbackEntry]:
        """The rollback that abandoned the timeline `info` belongs to, if one did."""
        if info.name == START:
            return None
        for entry in self.entries[info.generation:]:
            if entry.restored < info.step:
                return entry
        return None

    def why_unusable(self, info: CheckpointInfo) -> Optional[str]:
        """Why a restart must not resume from `info` (None: it may)."""
        entry = self.abandoned_by(info)
        if entry is not None:
            return f"abandoned by the rollback at step {entry.decided_at} (back to step {entry.restored})"
        if not info.trusted:
            return f"written while training was unstable ({info.reason or 'suspect'})"
        return None

    # --- a new rollback -----------------------------------------------------------------------

    def plan(self, first_anomalous: int, candidates: Iterable[CheckpointInfo]) -> RollbackPlan:
        """The checkpoint to go back to: the newest usable one strictly before `first_anomalous`,
        one further back for each time the rolls back to it reached `escalate_after`.
        NoCleanCheckpointError when there is none."""
        usable = sorted((c for c in candidates if self.why_unusable(c) is None), key=lambda c: c.step, reverse=True)
        poisoned = [c for c in usable if c.step >= first_anomalous]
        before = [c for c in usable if c.step < first_anomalous]
        if not before:
            kept = ", ".join(c.label() for c in sorted(usable, key=lambda c: c.step)) or "none"
            raise NoCleanCheckpointError(
                f"the trouble began at step {first_anomalous} and no checkpoint from before it is left to roll back "
                f"to (usable checkpoints: {kept}). Keep more checkpoints (train.keep_last) or lower the learning rate.")
        index = 0
        while self.restores_to(before[index].step) >= self.escalate_after and index + 1 < len(before):
            index += 1
        return RollbackPlan(target=before[index], first_anomalous=first_anomalous, poisoned=poisoned,
                            passed_over=before[:index])

    def check_budget(self, decided_at: int, plan: Optional[RollbackPlan] = None) -> None:
        """TooManyRollbacksError if one more rollback at `decided_at` exceeds the budget; its
        message names every rollback in the window: where, from when, to which checkpoint, at
        which learning rates."""
        recent = [e for e in self.entries if e.decided_at > decided_at - self.window_steps]
        if len(recent) + 1 <= self.max_rollbacks:
            return
        attempt = (f"step {decided_at} (trouble from step {plan.first_anomalous}) would have gone back to "
                   f"{plan.target.label()}" if plan is not None else f"step {decided_at}")
        raise TooManyRollbacksError(
            f"{len(recent) + 1} rollbacks within {self.window_steps} steps; at most {self.max_rollbacks} are allowed "
            f"(stability.max_rollbacks / stability.rollback_window_steps). Rollbacks: "
            + "; ".join(e.describe() for e in recent) + f"; then {attempt}. Training keeps diverging at these "
            "learning rates: lower them, or inspect the batches near those steps.")

    def record(self, entry: RollbackEntry) -> RollbackEntry:
        """Append a rollback (after `check_budget`); the entry's multiplier is the new backoff."""
        self.check_budget(entry.decided_at)
        entry = replace(entry, reasons=tuple(entry.reasons), multiplier=self.lr_backoff ** (len(self.entries) + 1))
        self.entries.append(entry)
        return entry

    # --- persistence --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "entries": [e.to_dict() for e in self.entries], "health": dict(self.health)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert state.get("version") == 1, f"unknown rollback ledger version {state.get('version')!r}"
        self.entries = [RollbackEntry.from_dict(e) for e in state["entries"]]
        self.health = {str(k): int(v) for k, v in state.get("health", {}).items()}


def merge_health(*counts: Mapping[str, int]) -> dict[str, int]:
    """Per key, the largest count: what a checkpoint says, raised to what the ledger says."""
    out: dict[str, int] = {}
    for mapping in counts:
        for key, value in mapping.items():
            out[key] = max(out.get(key, 0), int(value))
    return out
