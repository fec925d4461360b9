"""Retrying transient storage errors (5xx, throttling, dropped connections) with a bound."""

from __future__ import annotations

import logging
import random
import socket
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import attrs

from .config import check_number, check_options
from .errors import CheckpointError, ConfigError
from .redact import describe, scrub

log = logging.getLogger(__name__)
T = TypeVar("T")
# The jitter's own generator: a draw from the global ``random`` would shift the trainer's stream
# (data order, augmentation) whenever a store failed once, and from a writer thread at no fixed
# point, so a resumed training could not go on as the uninterrupted one did.
_jitter = random.Random()


TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "ServiceUnavailableException", "BandwidthLimitExceeded", "rateLimitExceeded", "backendError",
    "XAmzContentSHA256Mismatch",  # a body damaged on its way: sending it again mends it
})
# Matched by class name so that no client library has to be imported here.
_TRANSIENT_TYPES = frozenset({
    "ServerDisconnectedError", "ClientConnectionError", "ClientConnectorError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "ConnectionClosedError", "EndpointConnectionError",
    "ReadTimeoutError", "ConnectTimeoutError", "ProxyError", "ChunkedEncodingError", "IncompleteRead",
    "ResponseParserError", "FSTimeoutError", "RemoteDisconnected", "HTTPClientError",
})
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError, CheckpointError, ConfigError)


class RetriesExhausted(Exception):
    """A transient error that persisted through every attempt the retry policy allows."""

    def __init__(self, what: str, attempts: int, last: BaseException, secrets: Iterable[str] = ()):
        self.what = what
        self.attempts = attempts
        self.last = last
        slow = ("; no answer came in time: if the store is only slow, raise the backend's timeout_s (or "
                "request_retries, retry.attempts; docs/config.md)" if _timed_out(last) else "")
        super().__init__(f"{what}: gave up after {attempts} attempt{'s' if attempts != 1 else ''}: "
                         f"{describe(last, secrets)}{slow}")


def _timed_out(exc: BaseException) -> bool:
    return any(isinstance(e, (TimeoutError, socket.timeout)) or "Timeout" in type(e).__name__ for e in _chain(exc))


# The errors of a request that got no answer at all (as opposed to an answer saying no, or 503).
_NO_ANSWER_TYPES = frozenset({
    "ServerDisconnectedError", "ClientConnectionError", "ClientConnectorError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "ConnectionClosedError", "EndpointConnectionError",
    "ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError", "RemoteDisconnected", "IncompleteRead",
})


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def gave_up(exc: BaseException) -> bool:
    """Did a retry policy give up on ``exc`` (or a cause of it) because the store stopped
    answering: its last attempt timed out or lost its connection? A store that answers with an
    error (503, a permission, a missing file) has not."""
    exhausted = next((e for e in _chain(exc) if isinstance(e, RetriesExhausted)), None)
    if exhausted is None:
        return False
    return any(isinstance(e, (ConnectionError, TimeoutError, socket.timeout))
               or {c.__name__ for c in type(e).__mro__} & _NO_ANSWER_TYPES for e in _chain(exhausted.last))


def exhausted(exc: BaseException) -> bool:
    """Did ``exc`` (or a cause of it) persist through every attempt a retry policy allows: a store
    that stopped answering (``gave_up``) or kept answering with transient errors (503)?"""
    return any(isinstance(e, RetriesExhausted) for e in _chain(exc))


def denied(exc: BaseException) -> bool:
    """Did the storage refuse this process (``exc`` or a cause of it): a file's owner or mode, an
    object store's access policy? Not damage: what it would not let this process read may be intact."""
    return any(isinstance(e, PermissionError) for e in _chain(exc))


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for attr in ("status", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        code = response.get("Error", {}).get("Code")
        if isinstance(code, str):
            return code
    return None


def _marked(exc: BaseException, marks: Iterable[Any]) -> bool:
    return any(isinstance(exc, m) if isinstance(m, type) else bool(m(exc)) for m in marks)


def is_transient(exc: BaseException, also: Iterable[Any] = ()) -> bool:
    """Is this worth trying again: a 5xx, a throttle, a timeout or a dropped connection?

    The exception and its causes are searched. ``also`` adds exception types, or predicates
    taking an exception, that count as transient too (checked before the built-in rules, so
    they win over them); an exception that already exhausted its retries never is.
    """
    also = tuple(also)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RetriesExhausted):
            return False
        if also and _marked(current, also):
            return True
        if isinstance(current, _PERMANENT):
            return False
        if isinstance(current, (ConnectionError, TimeoutError, socket.timeout)):
            return True
        if {c.__name__ for c in type(current).__mro__} & _TRANSIENT_TYPES:
            return True
        if type(current).__name__ == "FlexibleChecksumError" and str(current).startswith("Expected checksum"):
            return True  # botocore: an answer damaged on its way (not an algorithm it lacks); read it again
        if _http_status(current) in TRANSIENT_STATUS or _error_code(current) in _TRANSIENT_CODES:
            return True
        if any(f"{code}" in str(current) for code in ("SlowDown", "reduce your request rate")):
            return True
        current = current.__cause__ or current.__context__
    return False



@attrs.frozen
class RetryPolicy:
    """How often and how patiently a transient error is retried.

    ``attempts`` counts the first try. Between attempts the wait doubles from ``backoff_s`` up
    to ``max_backoff_s``, with jitter, so one operation waits at most about
    ``attempts * max_backoff_s`` seconds before its error is raised.

    ``from_config(key, value)`` reads a backend's ``retry:`` mapping (``attempts``,
    ``backoff_s``, ``max_backoff_s``; None gives the defaults). What counts as transient is
    ``is_transient``: connection errors and timeouts, HTTP 408/425/429/5xx, throttling codes
    and the usual client library's connection errors. ``transient`` adds a client's own: a
    tuple of exception types, or of predicates taking an exception and returning a bool
    (``with_transient`` returns a copy with more of them).
    """

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    transient: tuple[Any, ...] = attrs.field(default=(), converter=tuple)

    KEYS = ("attempts", "backoff_s", "max_backoff_s")

    @classmethod
    def from_config(cls, key: str, value: Any) -> RetryPolicy:
        """The policy a config's ``retry:`` mapping describes; ``key`` (``backends.<name>.retry``)
        names it in a ``ConfigError``."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a mapping with keys {', '.join(cls.KEYS)}, got {value!r}")
        check_options(key, value, cls.KEYS)
        default = cls()
        return cls(
            attempts=check_number(f"{key}.attempts", value.get("attempts", default.attempts), 1, integer=True),
            backoff_s=float(check_number(f"{key}.backoff_s", value.get("backoff_s", default.backoff_s), 0)),
            max_backoff_s=float(check_number(f"{key}.max_backoff_s", value.get("max_backoff_s", default.max_backoff_s), 0)),
        )

    def with_transient(self, *marks: Any) -> RetryPolicy:
        """A copy that also retries ``marks``: exception types, or predicates taking an exception."""
        return attrs.evolve(self, transient=self.transient + marks)

    def delay(self, attempt: int) -> float:
        """The wait in seconds after failed attempt number ``attempt`` (1 for the first), with jitter."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + _jitter.random() / 2)

    def call(self, what: str, fn: Callable[..., T], *args: Any, secrets: Iterable[str] = (),
             **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried on transient errors; ``what`` names it in messages."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc, self.transient):
                    scrub(exc, secrets)  # it may become the cause of ckptkit's own error, printed with it
                    raise
                if attempt >= self.attempts:
                    raise RetriesExhausted(what, attempt, exc, secrets) from None
                wait = self.delay(attempt)
                log.warning("%s failed (%s); retry %d of %d in %.1f s", what, describe(exc, secrets),
                            attempt, self.attempts - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")
