"""A wrapper around a backend's fsspec filesystem that records each request and fails on demand.

The conformance suite puts it between a backend and its real store: it counts the requests of a
listing, injects transient or permanent errors at chosen operations, and so exercises retries and
clean-up through the backend's own code, with the real store behind. It needs nothing from pytest.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import attrs

# fsspec methods by what they ask of the store. Anything else (``_strip_protocol``,
# ``invalidate_cache``, ``split_path``...) is local bookkeeping and passes through unrecorded.
LIST = frozenset({"find", "ls", "glob", "walk", "listdir", "du", "expand_path"})
READ = frozenset({"cat_file", "cat", "info", "exists", "isfile", "isdir", "size", "sizes", "modified",
                  "created", "get_file", "get", "head", "tail", "read_bytes", "read_text", "checksum"})
WRITE = frozenset({"pipe_file", "pipe", "put_file", "put", "mkdir", "makedirs", "mkdirs", "touch", "mv",
                   "move", "rename", "copy", "cp_file", "cp", "write_bytes", "write_text", "setxattrs"})
DELETE = frozenset({"rm", "rm_file", "rmdir", "delete", "unlink"})
# Writes whose path is the destination (the second argument).
MOVES = frozenset({"mv", "move", "rename", "copy", "cp_file", "cp"})
KINDS = ("list", "read", "write", "delete")


def _kind_of_s3_call(operation: str) -> str:
    if operation.startswith("list_"):
        return "list"
    if operation.startswith(("get_", "head_")):
        return "read"
    if operation.startswith(("delete_", "abort_")):
        return "delete"
    return "write"


@attrs.frozen
class Call:
    """One request a backend made of its store: what kind, which method, which path."""

    kind: str
    method: str
    path: str


@attrs.define
class Fault:
    """Fail the requests of ``kind`` (one of ``list``, ``read``, ``write``, ``delete``, or
    ``any``) whose path contains ``path``, ``times`` of them (None: all), with ``error(what)``."""

    kind: str
    error: Callable[[str], BaseException]
    path: str = ""
    times: int | None = 1
    fired: int = 0

    def strikes(self, call: Call) -> bool:
        if self.kind not in ("any", call.kind) or self.path not in call.path:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


def transient(message: str = "injected: connection reset by peer") -> Callable[[str], BaseException]:
    """A dropped connection: every retry policy counts it as worth another try."""
    return lambda what: ConnectionResetError(f"{message} ({what})")


def permanent(message: str = "injected: access denied") -> Callable[[str], BaseException]:
    """A refusal that no retry can cure."""
    return lambda what: PermissionError(f"{message} ({what})")


class _RecordedFile:
    """A file opened for writing whose writes and close are requests of kind ``write``."""

    def __init__(self, f: Any, path: str, fs: WrappedFileSystem):
        self._f, self._path, self._fs = f, path, fs

    def write(self, data: Any) -> int:
        self._fs._request(Call("write", "file.write", self._path))
        return self._f.write(data)

    def close(self) -> None:
        if not getattr(self._f, "closed", False):
            try:
                self._fs._request(Call("write", "file.close", self._path))
            except BaseException:
                # The upload must not publish what was written so far.
                discard = getattr(self._f, "discard", None)
                if discard is not None:
                    discard()
                raise
        self._f.close()

    def __enter__(self) -> _RecordedFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class WrappedFileSystem:
    """Stands in for an fsspec filesystem: each request to the store is recorded in ``calls``
    and may be failed by one of ``faults``; everything else is the wrapped filesystem's own."""

    def __init__(self, fs: Any):
        self.wrapped = fs
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, kind: str, error: Callable[[str], BaseException], path: str = "",
            times: int | None = 1) -> Fault:
        if kind not in (*KINDS, "any"):
            raise ValueError(f"fault kind must be one of {', '.join(KINDS)} or any, got {kind!r}")
        fault = Fault(kind=kind, error=error, path=path, times=times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.calls.clear()

    @property
    def copies_files(self) -> bool:
        """Whether the wrapped store copies files itself: a backend replaces a stored step by
        copying where it can, and a wrapper must not make it take the path for stores that cannot."""
        from ..storage import _copies_files

        return _copies_files(self.wrapped)

    def requests(self, *kinds: str) -> list[Call]:
        """The recorded requests, of the given kinds only when some are named."""
        with self._lock:
            return [c for c in self.calls if not kinds or c.kind in kinds]

    def _request(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)
            fault = next((f for f in self.faults if f.strikes(call)), None)
        if fault is not None:
            raise fault.error(f"{call.method} {call.path}")

    @staticmethod
    def _classify(name: str, args: tuple, kwargs: dict) -> Call | None:
        if name == "open":
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "rb")
            kind = "write" if any(m in mode for m in "wax") else "read"
            return Call(kind, name, str(args[0] if args else kwargs.get("path", "")))
        if name == "call_s3":
            operation = str(args[0] if args else kwargs.get("method", ""))
            where = "/".join(str(kwargs[k]) for k in ("Bucket", "Key", "Prefix") if k in kwargs)
            return Call(_kind_of_s3_call(operation), f"call_s3:{operation}", where)
        for kind, names in (("list", LIST), ("read", READ), ("write", WRITE), ("delete", DELETE)):
            if name in names:
                # A move or copy is a write to its destination.
                target = args[1] if name in MOVES and len(args) > 1 else (args[0] if args else kwargs.get("path", ""))
                return Call(kind, name, ",".join(map(str, target)) if isinstance(target, (list, tuple)) else str(target))
        return None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.wrapped, name)
        if not callable(attr) or name.startswith("__"):
            return attr

        def request(*args: Any, **kwargs: Any) -> Any:
            call = self._classify(name, args, kwargs)
            if call is None:
                return attr(*args, **kwargs)
            self._request(call)
            out = attr(*args, **kwargs)
            if name == "open" and call.kind == "write":
                return _RecordedFile(out, call.path, self)
            return out

        return request

    def __repr__(self) -> str:
        return f"<WrappedFileSystem around {self.wrapped!r}>"
