"""Automatic recovery on Ray Train: retry what a restart can fix, stop at once on what it cannot.

`train.max_failures` becomes Ray Train's `FailureConfig`: after a worker error (a killed worker, a
lost node, an outage longer than the storage retries) the worker group restarts and resumes from
the latest checkpoint, exactly as a relaunch by hand would. Ray's failure policy counts every
worker error as retryable, so a `NonRetryable` one (see `errors`) is stopped here, on the
controller: raising from `after_exception` makes the controller fail with our error, which
Ray's policy never retries.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from vits_ray.errors import NonRetryable, non_retryable_cause


class RunAbortedError(NonRetryable, RuntimeError):
    """A worker raised an error that a restart cannot fix; the message is that worker's."""


class StopOnNonRetryable(UserCallback):
    """Runs on Ray Train's controller after workers raised: ends the run on a NonRetryable error."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            cause = non_retryable_cause(error)
            if cause is not None:
                raise RunAbortedError(f"rank {rank}: {type(cause).__name__}: {cause} "
                                      "(not retried: a restart from the checkpoint would fail the same way)")


def failure_config(max_failures: int):
    import ray.train

    return ray.train.FailureConfig(max_failures=max_failures)


def fit(trainer):
    """`trainer.fit()`; when it fails, our own error if the controller stopped the run on one
    (`RunAbortedError`, the worker's message), else Ray's (which lists every worker's error)."""
    try:
        return trainer.fit()
    except Exception as err:  # Ray's TrainingFailedError family
        failure = getattr(err, "controller_failure", None)
        if isinstance(failure, RunAbortedError):
            raise failure from None
        raise
