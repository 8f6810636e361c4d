"""What kind of failure an error is: the one question automatic recovery has to answer.

Ray Train restarts the worker group after any worker error (up to `train.max_failures`), which is
right for a killed worker, a lost node or an outage that outlasted the storage retries: the
relaunch resumes from the latest checkpoint. It is wrong for an error that the same inputs will
raise again: a bad config, a checkpoint from another world size, parameters that diverged across
ranks, a rollback budget spent, a file refused as unsafe. Those classes derive from `NonRetryable`,
and `recovery.StopOnNonRetryable` ends the run on the first one instead of burning retries.
No dependencies: every module can mark its errors.
"""

from __future__ import annotations


class NonRetryable:
    """Mixin for errors that a restart from the latest checkpoint cannot fix."""


def non_retryable_cause(error: BaseException | None) -> BaseException | None:
    """The first `NonRetryable` in `error`'s chain of causes (Ray wraps worker errors), else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, NonRetryable):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
