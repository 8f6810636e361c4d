"""Where a rollback goes and when the run must stop: the rollback ledger's rules."""

import json

import pytest

from vits_ray.errors import non_retryable_cause
from vits_ray.rollbacks import (START, CheckpointInfo, NoCleanCheckpointError, RollbackEntry, RollbackLedger,
                                TooManyRollbacksError, merge_health)


def ledger(**kw) -> RollbackLedger:
    return RollbackLedger(**{"max_rollbacks": 3, "window_steps": 5000, "lr_backoff": 0.5, **kw})


def ckpt(step: int, generation: int = 0, verdict: str = "clean") -> CheckpointInfo:
    return CheckpointInfo(f"checkpoint_{step:08d}", step, generation, verdict)


def roll(book: RollbackLedger, decided_at: int, first_anomalous: int, candidates) -> CheckpointInfo:
    plan = book.plan(first_anomalous, candidates)
    book.check_budget(decided_at, plan)
    book.record(RollbackEntry(decided_at, first_anomalous, plan.target.step, ("spike:loss_1",), 2e-4, 2e-4))
    return plan.target


def test_goes_to_the_newest_checkpoint_strictly_before_the_trouble():
    book = ledger()
    plan = book.plan(8, [ckpt(4), ckpt(6), ckpt(8), ckpt(10)])
    assert plan.target == ckpt(6)
    assert plan.poisoned == [ckpt(10), ckpt(8)]  # at or after step 8: never a target
    assert book.plan(7, [ckpt(4), ckpt(6)]).target == ckpt(6)
    assert book.plan(6, [ckpt(4), ckpt(6)]).target == ckpt(4)


def test_suspect_and_abandoned_checkpoints_are_never_targets():
    book = ledger()
    assert book.plan(20, [ckpt(4), ckpt(6, verdict="suspect")]).target == ckpt(4)
    # A rollback decided at 11 restored 4 in generation 0: checkpoint 6 of that timeline is abandoned,
    # checkpoint 6 written afterwards (generation 1) is not.
    roll(book, 11, 8, [ckpt(4), ckpt(6), ckpt(6, verdict="suspect")][:1])
    assert "abandoned by the rollback at step 11" in book.why_unusable(ckpt(6, generation=0))
    assert book.why_unusable(ckpt(6, generation=1)) is None
    assert book.why_unusable(ckpt(4, generation=0)) is None
    assert "unstable" in book.why_unusable(ckpt(6, generation=1, verdict="suspect"))
    assert book.plan(30, [ckpt(4), ckpt(6, generation=0)]).target == ckpt(4)
    assert book.plan(30, [ckpt(4), ckpt(6, generation=1)]).target == ckpt(6, generation=1)


def test_two_rollbacks_to_the_same_checkpoint_escalate_and_the_backoff_compounds():
    book = ledger(max_rollbacks=10)
    candidates = [CheckpointInfo(START, 0, 0, "start"), ckpt(2), ckpt(4), ckpt(6)]
    targets = [roll(book, 11, 8, candidates).step for _ in range(4)]
    assert targets == [6, 6, 4, 4]  # the third goes one checkpoint further back
    assert [e.multiplier for e in book.entries] == [0.5, 0.25, 0.125, 0.0625]
    assert book.multiplier == 0.0625 and book.restores_to(6) == 2
    assert "abandoned" in book.why_unusable(ckpt(6))  # the rollbacks to 4 left its timeline
    plan = book.plan(8, candidates)
    assert plan.target.step == 2 and plan.passed_over == [ckpt(4)]
    # With nothing further back the target stays (the backoff still compounds).
    assert ledger().plan(8, [ckpt(6)]).target == ckpt(6)


def test_the_run_start_is_a_target_when_no_checkpoint_is_old_enough():
    book = ledger()
    start = CheckpointInfo(START, 0, 0, "start")
    assert book.plan(3, [start, ckpt(4)]).target == start
    with pytest.raises(NoCleanCheckpointError, match="began at step 3 and no checkpoint from before it") as err:
        book.plan(3, [ckpt(4)])
    assert non_retryable_cause(err.value) is err.value


def test_the_spent_budget_names_steps_checkpoints_and_learning_rates():
    book = ledger(max_rollbacks=2, window_steps=1000)
    candidates = [ckpt(4), ckpt(6)]
    roll(book, 11, 8, candidates)
    roll(book, 13, 9, candidates)
    plan = book.plan(8, candidates)
    with pytest.raises(TooManyRollbacksError) as err:
        book.check_budget(15, plan)
    message = str(err.value)
    assert non_retryable_cause(err.value) is err.value  # Ray Train does not restart it
    assert "3 rollbacks within 1000 steps" in message and "at most 2" in message
    assert "step 11 (trouble from step 8, lr_gen 2.00e-04 / lr_disc 2.00e-04) back to step 6" in message
    assert "x0.5" in message and "x0.25" in message
    assert "then step 15 (trouble from step 8) would have gone back to checkpoint 4" in message
    with pytest.raises(TooManyRollbacksError):  # recording checks the same budget
        book.record(RollbackEntry(15, 8, 4))
    assert book.total == 2


def test_rollbacks_spread_beyond_the_window_are_fine():
    book = ledger(max_rollbacks=2, window_steps=1000)
    for step in range(1000, 10_000, 600):  # never more than 2 within any 1000 steps
        book.record(RollbackEntry(step, step, step - 100))
    assert book.total == 15 and book.multiplier == 0.5 ** 15


def test_the_ledger_round_trips_through_strict_json():
    book = ledger()
    book.record(RollbackEntry(11, 8, 6, ("spike:loss_1", "blowup"), 2e-4, 1e-4))
    book.record(RollbackEntry(20, 19, 16))  # learning rates unknown: NaN, stored as null
    book.health = {"rollbacks": 2, "spikes": 1}
    again = ledger()
    again.load_state_dict(json.loads(json.dumps(book.state_dict(), allow_nan=False)))
    assert again.state_dict() == book.state_dict()
    assert again.entries[0].reasons == ("spike:loss_1", "blowup") and again.last_restored == 16
    assert merge_health({"rollbacks": 1, "spikes": 3}, again.health) == {"rollbacks": 2, "spikes": 3}
