"""Checkpoints as folders of files under a root on any fsspec filesystem.

``FileBackend`` implements the storage contract once for every file-like backend: a checkpoint
is the folder ``<root>/<run_name>/step-<step>/``, committed when its ``manifest.json`` is
written, which happens last. On object stores, where rename is not atomic, the manifest is the
commit; ``LocalBackend`` adds a temporary folder and an atomic rename on top. Deleting goes the
other way: the manifest first, so a half-deleted checkpoint never looks committed.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import posixpath
import queue
import random
import re
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, Protocol, TypeVar

import attrs
import fsspec

from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import check_options, check_run_name
from .errors import BackendError, CheckpointError, ConfigError
from .hashing import HashingWriter, copy_hashed
from .hookspecs import hookimpl
from .manifest import MANIFEST_NAME, FileEntry, Manifest

STEP_PREFIX = "step-"
STEP_DIGITS = 10
FINAL_DIR = "final"
DEFAULT_GRACE_S = 3600.0

log = logging.getLogger(__name__)
T = TypeVar("T")


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step(dirname: str) -> int | None:
    if not dirname.startswith(STEP_PREFIX):
        return None
    digits = dirname[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, _dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _check_file_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"file name {name!r} in a manifest points outside its checkpoint")
    return name


# -- keeping secrets out of messages ------------------------------------------------------

_QUERY_RE = re.compile(r"((?:https?|s3|gs|gcs)://[^\s?'\"<>]+)\?[^\s'\"<>]*")
_SECRET_FIELD_RE = re.compile(
    r"(?i)\b(authorization|x-amz-security-token|x-amz-credential|x-amz-signature|x-goog-signature|"
    r"x-goog-credential|signature|access_token|refresh_token|id_token|client_secret|"
    r"aws_secret_access_key|aws_session_token|secret_access_key|session_token|secret|password|"
    r"token|upload_id|uploadid)(['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+|aws4-hmac-sha256\s+)?[^\s,'\"}&;]+"
)
_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_SECRET_OPTION_NAMES = ("key", "secret", "token", "password", "session_token", "client_secret",
                        "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                        "access_token", "refresh_token", "private_key", "private_key_id")
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "GOOGLE_OAUTH_ACCESS_TOKEN", "GCS_OAUTH_TOKEN")


def secret_values(options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Credential strings that must never be shown: from storage options and the environment."""
    found: list[str] = []

    def walk(value: Any, name: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k).lower())
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, name)
        elif isinstance(value, str) and name in _SECRET_OPTION_NAMES and len(value) >= 4:
            found.append(value)

    walk(dict(options or {}))
    found.extend(v for e in _SECRET_ENV if len(v := os.environ.get(e, "")) >= 4)
    return tuple(sorted(set(found), key=len, reverse=True))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without credentials, signatures, tokens or URL query strings."""
    for value in secrets:
        if value:
            text = text.replace(value, "<redacted>")
    text = _QUERY_RE.sub(r"\1?<redacted>", text)
    text = _SECRET_FIELD_RE.sub(r"\1\2<redacted>", text)
    return _KEY_ID_RE.sub("<redacted-key-id>", text)


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A one-line description of an exception, safe to log."""
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    if not detail and exc.__cause__ is not None:
        return describe(exc.__cause__, secrets)
    return redact(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__, secrets)


# -- transient errors and retries ---------------------------------------------------------

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "ServiceUnavailableException", "BandwidthLimitExceeded", "rateLimitExceeded", "backendError",
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
        super().__init__(f"{what}: gave up after {attempts} attempt{'s' if attempts != 1 else ''}: "
                         f"{describe(last, secrets)}")


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


def is_transient(exc: BaseException) -> bool:
    """Is this worth trying again: a 5xx, a throttle, a timeout or a dropped connection?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RetriesExhausted) or isinstance(current, _PERMANENT):
            return False
        if isinstance(current, (ConnectionError, TimeoutError, socket.timeout)):
            return True
        if {c.__name__ for c in type(current).__mro__} & _TRANSIENT_TYPES:
            return True
        if _http_status(current) in TRANSIENT_STATUS or _error_code(current) in _TRANSIENT_CODES:
            return True
        if any(f"{code}" in str(current) for code in ("SlowDown", "reduce your request rate")):
            return True
        current = current.__cause__ or current.__context__
    return False


def _number(key: str, value: Any, minimum: float, integer: bool = False) -> Any:
    bad = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if bad or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}: must be {kind} >= {minimum:g}, got {value!r}")
    return value


@attrs.frozen
class RetryPolicy:
    """How often and how patiently a transient error is retried.

    ``attempts`` counts the first try. Between attempts the wait doubles from ``backoff_s`` up
    to ``max_backoff_s``, with jitter, so one operation waits at most about
    ``attempts * max_backoff_s`` seconds before its error is raised.
    """

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    KEYS = ("attempts", "backoff_s", "max_backoff_s")

    @classmethod
    def from_config(cls, key: str, value: Any) -> RetryPolicy:
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a mapping with keys {', '.join(cls.KEYS)}, got {value!r}")
        check_options(key, value, cls.KEYS)
        default = cls()
        return cls(
            attempts=_number(f"{key}.attempts", value.get("attempts", default.attempts), 1, integer=True),
            backoff_s=float(_number(f"{key}.backoff_s", value.get("backoff_s", default.backoff_s), 0)),
            max_backoff_s=float(_number(f"{key}.max_backoff_s", value.get("max_backoff_s", default.max_backoff_s), 0)),
        )

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)

    def call(self, what: str, fn: Callable[..., T], *args: Any, secrets: Iterable[str] = (),
             **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried on transient errors; ``what`` names it in messages."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt >= self.attempts:
                    raise RetriesExhausted(what, attempt, exc, secrets) from None
                wait = self.delay(attempt)
                log.warning("%s failed (%s); retry %d of %d in %.1f s", what, describe(exc, secrets),
                            attempt, self.attempts - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


# -- streaming writers ---------------------------------------------------------------------


class Multipart(Protocol):
    """One object uploaded in numbered parts (S3 multipart upload and the like).

    ``FileBackend._multipart`` returns one; ``PartWriter`` drives it. Each method is one request
    and may be retried, so each must be safe to repeat.
    """

    def put_whole(self, data: bytes) -> None: ...
    def begin(self) -> Any: ...
    def put_part(self, upload: Any, number: int, data: bytearray) -> Any: ...
    def complete(self, upload: Any, parts: list[tuple[int, Any]]) -> None: ...
    def abort(self, upload: Any) -> None: ...


class PartWriter:
    """A write-only file that cuts what it is given into parts and uploads them in parallel.

    At most ``concurrency`` parts are in flight and one more is being filled, so memory stays
    at ``(concurrency + 1) * part_size`` (plus the client's copy of each part in flight)
    however large the object grows. The part size doubles after every ``GROW_EVERY`` parts, so
    that an object of any size fits in a few thousand parts. Nothing is visible until
    ``commit``; ``abort`` drops the upload.
    """

    GROW_EVERY = 2000

    def __init__(self, target: Multipart, what: str, part_size: int, concurrency: int,
                 retry: Callable[..., Any]):
        self.target = target
        self.what = what
        self.part_size = part_size
        self.retry = retry
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="ckptkit-part")
        self._slots = threading.BoundedSemaphore(max(1, concurrency))
        self._buf = bytearray(part_size)
        self._fill = 0
        self._upload: Any = None
        self._futures: list[Future] = []
        self._number = 0
        self._done = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        while view.nbytes:
            take = min(self.part_size - self._fill, view.nbytes)
            self._buf[self._fill:self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == self.part_size:
                self._send()
        return n

    def _check(self) -> None:
        for fut in self._futures:
            if fut.done() and fut.exception() is not None:
                raise fut.exception()

    def _send(self) -> None:
        if self._upload is None:
            self._upload = self.retry(f"starting the upload of {self.what}", self.target.begin)
        self._check()
        self._slots.acquire()
        data = self._buf if self._fill == len(self._buf) else self._buf[:self._fill]
        self._number += 1
        try:
            self._futures.append(self._pool.submit(self._put, self._number, data))
        except BaseException:
            self._slots.release()
            raise
        if self._number % self.GROW_EVERY == 0:
            # Keep very large objects under the stores' part-count limits (S3: 10,000).
            self.part_size *= 2
        self._buf = bytearray(self.part_size)
        self._fill = 0

    def _put(self, number: int, data: bytearray) -> tuple[int, Any]:
        try:
            return number, self.retry(f"part {number} of {self.what}", self.target.put_part,
                                      self._upload, number, data)
        finally:
            self._slots.release()

    def commit(self) -> None:
        """Upload what is left and publish the object; on failure, ``abort`` cleans up."""
        if self._upload is None:
            data = bytes(memoryview(self._buf)[:self._fill])
            self._buf = bytearray()
            self.retry(f"upload of {self.what}", self.target.put_whole, data)
        else:
            if self._fill:
                self._send()
            self._buf = bytearray()
            parts = sorted(f.result() for f in self._futures)
            self.retry(f"completing the upload of {self.what}", self.target.complete,
                       self._upload, parts)
        self._done = True
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Drop the upload: stop sending parts and ask the store to forget those it holds."""
        if self._done:
            return
        self._done = True
        for fut in self._futures:
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._buf = bytearray()
        if self._upload is not None:
            try:
                self.retry(f"aborting the upload of {self.what}", self.target.abort, self._upload)
            except Exception as exc:
                log.warning("could not abort the upload of %s (the store drops it later): %s",
                            self.what, describe(exc))


class StreamWriter:
    """A write-only file that hands what it is given to ``fs.open(path, "wb")`` on a thread.

    Serialising and uploading overlap; the queue between them holds at most
    ``depth * chunk`` bytes. Closing an fsspec file publishes it, so ``abort`` discards it
    instead.
    """

    _END = object()

    def __init__(self, open_file: Callable[[], Any], chunk: int = 8 * 2**20, depth: int = 4):
        self.chunk = chunk
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._file: Any = None
        self._aborted = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(open_file,), daemon=True,
                                        name="ckptkit-stream")
        self._thread.start()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def _run(self, open_file: Callable[[], Any]) -> None:
        try:
            self._file = open_file()
            while True:
                item = self._queue.get()
                if item is self._END or self._aborted.is_set():
                    return
                self._file.write(item)
        except BaseException as exc:
            self._error = exc

    def _put(self, item: Any) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise self._error or OSError("the upload thread stopped") from None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, self.chunk):
            self._put(bytes(view[start:start + self.chunk]))
        return view.nbytes

    def commit(self) -> None:
        self._put(self._END)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._file.close()

    def abort(self) -> None:
        self._aborted.set()
        try:
            self._queue.put_nowait(self._END)
        except queue.Full:
            pass
        self._thread.join()
        f = self._file
        if f is None:
            return
        discard = getattr(f, "discard", None)
        try:
            if discard is not None:
                discard()
            else:
                f.close()
        except Exception as exc:
            log.debug("discarding an unfinished upload failed: %s", describe(exc))


# -- options shared by the object-store backends ------------------------------------------

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def parse_bucket_uri(key: str, value: Any, scheme: str) -> tuple[str, str]:
    """``(bucket, prefix)`` from ``<scheme>://bucket/prefix``; a ConfigError names ``key``."""
    example = f"{scheme}://my-bucket/checkpoints"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a {scheme}:// URI like {example}, got {value!r}")
    if "://" not in value:
        raise ConfigError(f"{key}: {value!r} is not a {scheme}:// URI; write it like {example}")
    given, rest = value.split("://", 1)
    if given.lower() != scheme:
        hint = f"; use type: {given} for it" if given in ("s3", "gs", "file") else ""
        raise ConfigError(f"{key}: {value!r} has scheme {given}://, this backend takes {scheme}:// "
                          f"(like {example}){hint}")
    if "?" in rest or "#" in rest:
        raise ConfigError(f"{key}: {scheme}:// URIs take no query or fragment; put client settings "
                          "under storage_options")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{key}: {value!r} names no bucket; write it like {example}")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(f"{key}: {bucket!r} is not a valid bucket name (3 to 222 lowercase "
                          "letters, digits, '.', '-', '_', starting and ending with a letter or digit)")
    segments = [s for s in prefix.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ConfigError(f"{key}: the prefix {prefix!r} may not contain '.' or '..' segments")
    return bucket, "/".join(segments)


@attrs.frozen
class RemoteOptions:
    """The options every object-store backend reads from its config."""

    bucket: str
    prefix: str
    storage_options: dict[str, Any]
    leftover_grace_s: float
    retry: RetryPolicy
    part_size: int
    concurrency: int

    KEYS = ("path", "storage_options", "leftover_grace_s", "retry", "part_size_mb", "upload_concurrency")

    @property
    def root(self) -> str:
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any], scheme: str,
                    part_size_mb: int = 32, min_part_size_mb: int = 5,
                    concurrency: int = 4) -> RemoteOptions:
        key = f"backends.{name}"
        check_options(key, options, cls.KEYS, required=("path",))
        bucket, prefix = parse_bucket_uri(f"{key}.path", options["path"], scheme)
        storage_options = options.get("storage_options") or {}
        if not isinstance(storage_options, Mapping):
            raise ConfigError(f"{key}.storage_options: must be a mapping of fsspec options, "
                              f"got {type(storage_options).__name__}")
        grace = _number(f"{key}.leftover_grace_s", options.get("leftover_grace_s", DEFAULT_GRACE_S), 0)
        mb = _number(f"{key}.part_size_mb", options.get("part_size_mb", part_size_mb), min_part_size_mb,
                     integer=True)
        conc = _number(f"{key}.upload_concurrency", options.get("upload_concurrency", concurrency), 1,
                       integer=True)
        return cls(bucket=bucket, prefix=prefix, storage_options=dict(storage_options),
                   leftover_grace_s=float(grace), retry=RetryPolicy.from_config(f"{key}.retry", options.get("retry")),
                   part_size=mb * 2**20, concurrency=conc)


class FileBackend:
    """Resume checkpoints and the final model as folders of files on an fsspec filesystem.

    Subclasses provide ``from_config`` (building ``fs`` and ``root`` from the options) and may
    override the write path; the listing, reading and pruning here hold for all of them.
    Object stores return a ``Multipart`` from ``_multipart`` to upload large files in parallel
    parts; other filesystems get a streaming writer on a thread. Every request goes through
    ``retry`` and every message through ``redact``.
    """

    def __init__(self, name: str, fs: fsspec.AbstractFileSystem, root: str,
                 leftover_grace_s: float = DEFAULT_GRACE_S, retry: RetryPolicy | None = None,
                 secrets: Iterable[str] = ()):
        self.name = name
        self.fs = fs
        self.root = root.rstrip("/")
        self.leftover_grace_s = leftover_grace_s
        self.retry = retry or RetryPolicy(attempts=1)
        self.secrets = tuple(secrets)
        self.part_size = 32 * 2**20
        self.upload_concurrency = 4
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} at {self.uri(self.root)}>"

    # -- layout ---------------------------------------------------------------------------

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def run_path(self, run_name: str) -> str:
        return posixpath.join(self.root, check_run_name(run_name))

    def _ref(self, run_name: str, step: int, path: str, role: str = "resume",
             sizes: dict[str, int] | None = None, mtime: float | None = None) -> CheckpointRef:
        return CheckpointRef(backend=self.name, run_name=run_name, step=step, path=path,
                             uri=self.uri(path), role=role, sizes=sizes, mtime=mtime)

    # -- requests -------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def describe(self, exc: BaseException) -> str:
        return describe(exc, self.secrets)

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One request to the store, retried on transient errors by the backend's policy."""
        return self.retry.call(what, fn, *args, secrets=self.secrets, **kwargs)

    def _fail(self, message: str, exc: BaseException) -> BackendError:
        """A BackendError naming what failed, its cause described without secrets."""
        return BackendError(self.name, f"{message}: {self.describe(exc)}")

    # -- hooks: writing -------------------------------------------------------------------

    @hookimpl
    def save_resume(self, run_name: str, step: int, payload: Payload) -> CheckpointRef:
        return self._store(run_name, step_dirname(step), payload)

    @hookimpl
    def publish_final(self, run_name: str, payload: Payload) -> CheckpointRef:
        return self._store(run_name, FINAL_DIR, payload)

    def _store(self, run_name: str, dirname: str, payload: Payload) -> CheckpointRef:
        target = posixpath.join(self.run_path(run_name), dirname)
        manifest_path = posixpath.join(target, MANIFEST_NAME)
        current = manifest_path
        with self._lock:
            self._in_flight.add(target)
        try:
            # Saving a step again: un-commit the old copy before overwriting its files.
            if self._call(f"checking {self.uri(manifest_path)}", self.fs.exists, manifest_path):
                self._call(f"deleting {self.uri(manifest_path)}", self.fs.rm_file, manifest_path)
            entries = {}
            for pf in payload.files:
                current = posixpath.join(target, _check_file_name(pf.name))
                entries[pf.name] = self._put(pf, current)
            manifest = payload.manifest(entries)
            current = manifest_path
            self._call(f"writing {self.uri(manifest_path)}", self.fs.pipe_file, manifest_path,
                       manifest.to_json())
        except Exception as exc:
            self._discard(target)
            raise self._fail(f"could not store {self.uri(target)} (writing {self.uri(current)} failed; "
                             "nothing of it was committed)", exc) from None
        finally:
            with self._lock:
                self._in_flight.discard(target)
        self.fs.invalidate_cache(posixpath.dirname(target))
        return self._ref(run_name, payload.step, target, role=payload.role,
                         sizes={k: e.size for k, e in entries.items()})

    def _multipart(self, path: str) -> Multipart | None:
        """The parallel-part upload of one object, for stores that have one."""
        return None

    def _writer(self, path: str) -> PartWriter | StreamWriter:
        target = self._multipart(path)
        if target is not None:
            return PartWriter(target, self.uri(path), self.part_size, self.upload_concurrency,
                              self._call)
        return StreamWriter(lambda: self.fs.open(path, "wb", block_size=self.part_size))

    def _put(self, pf: PayloadFile, path: str) -> FileEntry:
        """Stream one payload file to ``path``; an aborted write publishes nothing.

        A transient failure that the per-request retries did not absorb restarts the file
        from its beginning (serialising again, or rereading the source), within the policy.
        """
        entry = self._call(f"uploading {self.uri(path)}", self._put_once, pf, path)
        if pf.expected is not None and pf.expected != entry:
            raise CheckpointError(f"{pf.source} changed while it was copied to {self.uri(path)}")
        return entry

    def _put_once(self, pf: PayloadFile, path: str) -> FileEntry:
        out = self._writer(path)
        try:
            with ThreadPoolExecutor(1) as pool:
                writer = HashingWriter(out, pool)
                if pf.source is not None:
                    with open(pf.source, "rb") as src:
                        while chunk := src.read(8 * 2**20):
                            writer.write(chunk)
                else:
                    pf.write(writer)
                size, digest = writer.size, writer.hexdigest()
            out.commit()
        except BaseException:
            out.abort()
            raise
        return FileEntry(size=size, sha256=digest)

    def _discard(self, path: str) -> None:
        """Remove what a failed save wrote: the manifest first, so nothing looks committed."""
        try:
            manifest = posixpath.join(path, MANIFEST_NAME)
            if self._call(f"checking {self.uri(manifest)}", self.fs.exists, manifest):
                self._call(f"deleting {self.uri(manifest)}", self.fs.rm_file, manifest)
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception as exc:
            # What is left has no manifest; prune removes it after the grace period.
            log.warning("backend %r: could not clean up %s: %s", self.name, self.uri(path),
                        self.describe(exc))

    @hookimpl
    def stage_sharded(self, run_name: str, step: int) -> str:
        target = posixpath.join(self.run_path(run_name), step_dirname(step))
        # Saving a step again: the shards may be named differently this time, so clear it all.
        self._discard(target)
        with self._lock:
            self._in_flight.add(target)
        return target

    @hookimpl
    def commit_sharded(self, run_name: str, step: int, path: str, payload: Payload,
                       files: dict[str, FileEntry]) -> CheckpointRef:
        manifest_path = posixpath.join(path, MANIFEST_NAME)
        try:
            self._call(f"writing {self.uri(manifest_path)}", self.fs.pipe_file, manifest_path,
                       payload.manifest(files).to_json())
        except Exception as exc:
            raise self._fail(f"could not commit {self.uri(path)}", exc) from None
        finally:
            with self._lock:
                self._in_flight.discard(path)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self._ref(run_name, step, path, sizes={k: e.size for k, e in files.items()})

    @hookimpl
    def discard_sharded(self, path: str) -> None:
        self._discard(path)
        with self._lock:
            self._in_flight.discard(path)

    # -- hooks: reading -------------------------------------------------------------------

    def _find(self, path: str) -> dict[str, dict[str, Any]]:
        # No maxdepth: some stores (s3fs) walk folder by folder when given one, while a plain
        # recursive find is one paginated listing of the prefix.
        return self.fs.find(path, withdirs=False, detail=True)

    def _listing(self, run_name: str) -> dict[str, dict[str, dict[str, Any]]]:
        """One listing of a run: folder name -> file name -> info."""
        run = self.run_path(run_name)
        self.fs.invalidate_cache(run)
        try:
            found = self._call(f"listing {self.uri(run)}", self._find, run)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self._fail(f"could not list {self.uri(run)}", exc) from None
        folders: dict[str, dict[str, dict[str, Any]]] = {}
        prefix = self.fs._strip_protocol(run).rstrip("/") + "/"
        for path, info in found.items():
            rel = self.fs._strip_protocol(path)
            if not rel.startswith(prefix):
                continue
            parts = rel[len(prefix):].split("/")
            if len(parts) == 2 and parts[1]:
                folders.setdefault(parts[0], {})[parts[1]] = info
        return folders

    def _committed(self, run_name: str, listing: dict[str, dict[str, dict[str, Any]]]) -> list[CheckpointRef]:
        run = self.run_path(run_name)
        refs = []
        for dirname, files in listing.items():
            step = parse_step(dirname)
            if step is None or MANIFEST_NAME not in files:
                continue
            sizes = {n: int(i.get("size") or 0) for n, i in files.items() if n != MANIFEST_NAME}
            mtimes = [m for i in files.values() if (m := _mtime(i)) is not None]
            refs.append(self._ref(run_name, step, posixpath.join(run, dirname), sizes=sizes,
                                  mtime=max(mtimes) if mtimes else None))
        return refs

    @hookimpl
    def list_checkpoints(self, run_name: str) -> list[CheckpointRef]:
        return self._committed(run_name, self._listing(run_name))

    def final_ref(self, run_name: str) -> CheckpointRef | None:
        """The committed final model of a run, if this backend holds one."""
        files = self._listing(run_name).get(FINAL_DIR)
        if not files or MANIFEST_NAME not in files:
            return None
        path = posixpath.join(self.run_path(run_name), FINAL_DIR)
        ref = self._ref(run_name, -1, path, role="final",
                        sizes={n: int(i.get("size") or 0) for n, i in files.items() if n != MANIFEST_NAME})
        return attrs.evolve(ref, step=self.read_manifest(ref).step)

    @hookimpl
    def read_manifest(self, ref: CheckpointRef) -> Manifest:
        path = posixpath.join(ref.path, MANIFEST_NAME)
        try:
            data = self._call(f"reading {self.uri(path)}", self.fs.cat_file, path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.uri(path)} is missing: the checkpoint is not committed") from None
        except RetriesExhausted as exc:
            raise CheckpointError(f"backend {self.name!r}: {exc}") from None
        try:
            return Manifest.from_json(data)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.uri(path)} is not a readable manifest: {exc}") from None

    @hookimpl
    def open_file(self, ref: CheckpointRef, name: str):
        path = posixpath.join(ref.path, _check_file_name(name))
        return self._call(f"opening {self.uri(path)}", self.fs.open, path, "rb")

    # -- hooks: pruning -------------------------------------------------------------------

    def _consistent(self, ref: CheckpointRef) -> bool:
        """Do the sizes the listing saw agree with the manifest? (No bytes are read.)"""
        try:
            manifest = self.read_manifest(ref)
        except CheckpointError:
            return False
        if ref.sizes is None:
            return True
        return all(ref.sizes.get(n) == e.size for n, e in manifest.files.items())

    def _delete(self, path: str) -> None:
        manifest = posixpath.join(path, MANIFEST_NAME)
        if self._call(f"checking {self.uri(manifest)}", self.fs.exists, manifest):
            self._call(f"deleting {self.uri(manifest)}", self.fs.rm_file, manifest)
        self._call(f"deleting {self.uri(path)}", self.fs.rm, path, recursive=True)

    def _leftovers(self, run_name: str, listing: dict[str, dict[str, dict[str, Any]]] | None = None
                   ) -> list[tuple[str, float | None]]:
        """Folders of a run that hold no committed checkpoint: (path, newest mtime)."""
        run = self.run_path(run_name)
        out = []
        for dirname, files in (self._listing(run_name) if listing is None else listing).items():
            if dirname == FINAL_DIR or (parse_step(dirname) is not None and MANIFEST_NAME in files):
                continue
            mtimes = [m for i in files.values() if (m := _mtime(i)) is not None]
            out.append((posixpath.join(run, dirname), max(mtimes) if mtimes else None))
        return out

    @hookimpl
    def prune(self, run_name: str, keep_last: int, protected_steps: frozenset[int] = frozenset(),
              dry_run: bool = False) -> list[CheckpointRef]:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        with self._lock:
            in_flight = set(self._in_flight)
        now = time.time()
        kept = 0
        doomed = []
        listing = self._listing(run_name)
        for ref in sorted(self._committed(run_name, listing), key=lambda r: r.step, reverse=True):
            if kept < keep_last and self._consistent(ref):
                kept += 1
            elif ref.step in protected_steps or ref.path in in_flight:
                continue
            elif kept >= keep_last:
                doomed.append(ref)
            elif ref.mtime is not None and now - ref.mtime > self.leftover_grace_s:
                # Committed but disagreeing with its manifest: not a checkpoint, a leftover.
                doomed.append(ref)
        for path, mtime in self._leftovers(run_name, listing):
            if path in in_flight or (mtime is not None and now - mtime <= self.leftover_grace_s):
                continue
            doomed.append(self._ref(run_name, -1, path, role="leftover"))
        if not dry_run:
            for ref in doomed:
                try:
                    self._delete(ref.path)
                except FileNotFoundError:
                    pass
                except Exception as exc:
                    raise self._fail(f"could not delete {ref.uri}", exc) from None
            self.fs.invalidate_cache(self.run_path(run_name))
        return doomed

    @hookimpl
    def probe(self) -> dict[str, Any]:
        path = posixpath.join(self.root, f".ckptkit-probe-{uuid.uuid4().hex[:12]}")
        data = b"ckptkit probe"

        def read() -> None:
            if self.fs.cat_file(path) != data:
                raise OSError("read back other bytes than were written")

        def list_root() -> None:
            self.fs.invalidate_cache(self.root)
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
            if posixpath.basename(path) not in names:
                raise OSError(f"the probe object {self.uri(path)} did not show up in a listing")

        results: dict[str, Any] = {}
        def write() -> None:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(path, data)

        for op, action in (("write", write), ("list", list_root),
                           ("read", read), ("delete", lambda: self.fs.rm_file(path))):
            try:
                self._call(f"probe {op} at {self.uri(path)}", action)
                results[op] = "ok"
            except Exception as exc:
                results[op] = self.describe(exc)
        return results
