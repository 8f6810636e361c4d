"""Riding out storage outages: retry transient failures with backoff for a bounded time window.

An S3 endpoint that restarts, a throttling burst or a network mount that hangs for a minute should
cost a training run a pause, not a crash and a relaunch. So storage operations retry for a window
(`storage.retry_seconds`, minutes by default) with exponential backoff and jitter, then give up
with an error naming the URI, how long it retried and the last error.

Only transient failures are retried: an outage or throttling may clear by itself, a missing key
or a denied permission will not, and retrying those would only delay a clear error by minutes.
"""

from __future__ import annotations

import errno
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry for `seconds` in all (0: never), waiting about `initial_seconds`, doubling up to a cap."""

    seconds: float = 300.0
    initial_seconds: float = 0.5
    max_backoff_seconds: float = 10.0

    @classmethod
    def from_config(cls, cfg) -> "RetryPolicy":
        """The policy of a `StorageConfig`."""
        return cls(cfg.retry_seconds, cfg.retry_initial_seconds, cfg.retry_max_backoff_seconds)

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row (1, 2, ...)."""
        backoff = min(self.max_backoff_seconds, self.initial_seconds * 2 ** (failures - 1))
        # Jitter spreads the retries of many workers hit by the same outage, so they do not come
        # back in lockstep; keeping at least half the backoff keeps the growth exponential.
        return backoff * random.uniform(0.5, 1.0)


class RetriesExhausted(Exception):
    """A transient failure outlasted the retry window; `last_error` is the final attempt's error."""

    def __init__(self, message: str, last_error: BaseException, attempts: int, elapsed: float):
        super().__init__(message)
        self.last_error, self.attempts, self.elapsed = last_error, attempts, elapsed


def with_retries(fn: Callable[[], T], *, what: str, url: str, policy: RetryPolicy,
                 transient: Callable[[BaseException], bool] | None = None) -> T:
    """`fn()`, retried while it fails transiently and the window lasts.

    A permanent error is raised unchanged on its first occurrence; a transient one that outlasts
    the window raises `RetriesExhausted`. `fn` must be safe to run again after a failure (an S3 PUT
    of the same bytes, a write to a fresh temporary file that is renamed into place at the end).
    One line on stderr marks the start of a failure episode and one its recovery, not one per attempt.
    """
    transient = transient or is_transient
    start = time.monotonic()
    failures = 0
    while True:
        try:
            result = fn()
        except Exception as err:
            if not transient(err):
                raise
            failures += 1
            elapsed = time.monotonic() - start
            remaining = policy.seconds - elapsed
            if remaining <= 0:
                tried = (f"after retrying for {elapsed:.0f} s ({failures} attempts)" if failures > 1
                         else "(no retries: storage.retry_seconds is 0)" if policy.seconds <= 0
                         else "after 1 attempt")
                raise RetriesExhausted(f"{url}: {what} failed {tried}; last error: {describe(err)}",
                                       err, failures, elapsed) from err
            if failures == 1:
                _say(f"storage {url}: {what} failed ({describe(err)}); retrying for up to "
                     f"{policy.seconds:.0f} s")
            time.sleep(min(policy.delay(failures), remaining))
        else:
            if failures:
                _say(f"storage {url}: {what} succeeded after {failures + 1} attempts "
                     f"({time.monotonic() - start:.1f} s)")
            return result


def describe(err: BaseException) -> str:
    """`Type: message`, cut short; botocore, pyarrow and OS messages carry no credentials."""
    text = str(err)
    return f"{type(err).__name__}: {text[:300]}{'…' if len(text) > 300 else ''}"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- which errors are transient -----------------------------------------------------------

# S3 error codes that mean "try again later". S3 sends RequestTimeout as a 400 (the client was
# too slow to send the body), so the status alone does not tell.
_S3_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestThrottled", "ServiceUnavailable", "InternalError", "RequestTimeout", "OperationAborted",
})

# Local (or network-mounted: NFS, EFS, Lustre, FUSE) filesystem errors that an outage of the
# mount produces and that clear when it comes back. Everything else (not found, permission,
# not a folder, read-only, and also ENOSPC/EDQUOT) is permanent: a full disk rarely empties
# itself within minutes, so retrying would only delay the error that tells the operator.
_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "ESTALE", "ETIMEDOUT", "EAGAIN", "EBUSY", "EINTR", "ENOLCK", "EREMOTEIO", "ECOMM",
    "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ENOTCONN", "EPIPE", "EHOSTUNREACH", "ENETUNREACH",
    "ENETDOWN", "ENETRESET", "EHOSTDOWN",
) if hasattr(errno, name))

# pyarrow's S3 filesystem raises a plain OSError whose message carries the AWS SDK's error type,
# e.g. "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, ...".
_ARROW_TRANSIENT = re.compile(
    r"AWS Error (NETWORK_CONNECTION|INTERNAL_FAILURE|SERVICE_UNAVAILABLE|THROTTLING|SLOW_DOWN|"
    r"REQUEST_TIMEOUT|REQUEST_LIMIT_EXCEEDED)|HTTP status 5\d\d")


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and what it wraps: boto3's transfer errors wrap the botocore error that matters."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__


def is_transient(err: BaseException) -> bool:
    """Whether `err` (from boto3/botocore, pyarrow's S3 filesystem or the OS) may clear by itself."""
    try:
        import botocore.exceptions as boto_errors
    except ImportError:  # pragma: no cover - boto3 is a dependency; keep local stores usable without it
        boto_errors = None
    for cause in _causes(err):
        if boto_errors is not None:
            if isinstance(cause, boto_errors.ClientError):
                code = cause.response.get("Error", {}).get("Code", "")
                status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                return code in _S3_TRANSIENT_CODES or status >= 500 or status == 429
            # Endpoint unreachable, connection reset or closed, connect/read timeouts, a body cut off.
            if isinstance(cause, (boto_errors.ConnectionError, boto_errors.HTTPClientError,
                                  boto_errors.IncompleteReadError)):
                return True
            if isinstance(cause, boto_errors.BotoCoreError):
                return False  # no credentials, bad parameters, ...: retrying changes nothing
        if isinstance(cause, OSError):
            # Decisive: a local "not found" raised while handling an earlier error is still permanent.
            return cause.errno in _TRANSIENT_ERRNOS or bool(_ARROW_TRANSIENT.search(str(cause)))
    return False


__all__ = ["RetryPolicy", "RetriesExhausted", "with_retries", "is_transient", "describe"]
