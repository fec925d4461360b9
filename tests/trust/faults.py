"""Backends that fail on purpose at a chosen operation, in the manner of DCP's faulty storage writer.

A fault is plain data (so that it can sit in a YAML config that ``ckptkit`` reads too)::

    {"op": "write", "path": "state.pt", "nth": 2, "times": 1, "error": "OSError"}

``op`` is the operation (below), ``path`` a substring of the path it touches, ``nth`` which
matching call fails first (from 1), ``times`` how many matching calls fail from there (None:
all), ``error`` the exception raised: ``OSError`` (EIO), ``ENOSPC``, ``ConnectionError``,
``EACCES`` (a PermissionError), ``EROFS``, ``MemoryError``, ``KeyboardInterrupt`` (a Ctrl-C).

- ``faultyfs``: ckptkit's generic ``FileBackend`` (the write path of S3, GCS and third-party
  stores) over ``FaultyFS``, the local filesystem wrapped as fsspec protocol ``faultyfile``.
  Operations: ``open`` (for writing), ``open_read``, ``write`` (one write call on a file opened
  for writing), ``close`` (closing such a file, which publishes it), ``pipe_file``, ``cat_file``, ``exists``,
  ``find``, ``rm_file``, ``rm`` and ``copy`` (a copy the store makes itself; ``path`` matches
  where it copies to).
- ``faultylocal``: the built-in ``LocalBackend`` with faults at its own stages: ``write`` (one
  write call of the serialiser into a payload file), ``commit`` (writing the manifest and renaming
  into place) and ``full`` (the payload file is opened on ``/dev/full``, so the kernel itself
  answers its writes with ENOSPC, wherever the backend writes them from).

Every call is recorded in ``calls`` as ``(op, path)``, so a test can see how far a save got.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import attrs
import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckptkit.config import check_options
from ckptkit.local import LocalBackend, local_root
from ckptkit.retry import RetryPolicy
from ckptkit.storage import FileBackend

ERRORS = {
    "OSError": lambda what: OSError(errno.EIO, f"injected fault: {what}"),
    "ENOSPC": lambda what: OSError(errno.ENOSPC, f"No space left on device (injected: {what})"),
    "ConnectionError": lambda what: ConnectionError(f"injected fault: {what}"),
    "EACCES": lambda what: PermissionError(errno.EACCES, f"Permission denied (injected: {what})"),
    "EROFS": lambda what: OSError(errno.EROFS, f"Read-only file system (injected: {what})"),
    "MemoryError": lambda what: MemoryError(f"injected: {what}"),
    "KeyboardInterrupt": lambda what: KeyboardInterrupt(),
}


@attrs.define
class Fault:
    op: str
    path: str = ""
    nth: int = 1
    times: int | None = 1
    error: str = "OSError"
    seen: int = 0
    fired: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        unknown = set(data) - {"op", "path", "nth", "times", "error"}
        if unknown or data.get("error", "OSError") not in ERRORS:
            raise ValueError(f"bad fault {data!r}")
        return cls(**data)

    def hit(self, op: str, path: str) -> bool:
        if op != self.op or self.path not in path:
            return False
        self.seen += 1
        if self.seen < self.nth or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


class Faults:
    """A fault plan and a record of every operation it was asked about."""

    def __init__(self, plan: list[dict[str, Any]] | None = None):
        self.lock = threading.Lock()
        self.plan = [Fault.from_dict(f) for f in plan or ()]
        self.calls: list[tuple[str, str]] = []
        self.pauses: list[tuple[str, str, threading.Event, threading.Event]] = []

    def pause(self, op: str, path: str) -> tuple[threading.Event, threading.Event]:
        """Hold the next operation ``op`` on a path holding ``path`` until the second event
        returned is set; the first is set once it waits (a race made to happen)."""
        reached, release = threading.Event(), threading.Event()
        with self.lock:
            self.pauses.append((op, path, reached, release))
        return reached, release

    def add(self, **fault: Any) -> Fault:
        f = Fault.from_dict(fault)
        with self.lock:
            self.plan.append(f)
        return f

    def clear(self) -> None:
        with self.lock:
            self.plan.clear()
            self.calls.clear()

    def take(self, op: str, path: str) -> Fault | None:
        """Record the operation; the fault that strikes it, if any."""
        with self.lock:
            self.calls.append((op, str(path)))
            return next((f for f in self.plan if f.hit(op, str(path))), None)

    def check(self, op: str, path: str) -> None:
        with self.lock:
            held = next((p for p in self.pauses if p[0] == op and p[1] in str(path)), None)
            if held is not None:
                self.pauses.remove(held)
        if held is not None:
            held[2].set()
            held[3].wait(60)
        fault = self.take(op, path)
        if fault is not None:
            raise ERRORS[fault.error](f"{op} {path}")

    @property
    def fired(self) -> int:
        return sum(f.fired for f in self.plan)


class _FaultyFile:
    """A file opened for writing whose writes and close go through the fault plan."""

    def __init__(self, f: Any, path: str, faults: Faults):
        self._f = f
        self._path = path
        self._faults = faults

    def write(self, data) -> int:
        self._faults.check("write", self._path)
        return self._f.write(data)

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._faults.check("close", self._path)
            except BaseException:
                self._f.close()
                raise
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class FaultyFS(LocalFileSystem):
    """The local filesystem as fsspec protocol ``faultyfile``, failing where ``faults`` says."""

    protocol = "faultyfile"
    cachable = False

    def __init__(self, faults: Faults | None = None, **kwargs: Any):
        super().__init__(auto_mkdir=True, **kwargs)
        self.faults = faults or Faults()

    def unstrip_protocol(self, name):
        # fsspec before 2026.4 gives every subclass of its local filesystem file:// paths.
        return f"{self.protocol}://{self._strip_protocol(name)}"

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode or "a" in mode:
            self.faults.check("open", path)
            return _FaultyFile(super()._open(path, mode, **kwargs), path, self.faults)
        self.faults.check("open_read", path)
        return super()._open(path, mode, **kwargs)

    # No explicit mode: fsspec before 2024.12 has none and passes kwargs on to open("wb").
    def pipe_file(self, path, value, **kwargs):
        self.faults.check("pipe_file", path)
        return super().pipe_file(path, value, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.faults.check("cat_file", path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def exists(self, path, **kwargs):
        self.faults.check("exists", path)
        return super().exists(path, **kwargs)

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        self.faults.check("find", path)
        return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)

    def rm_file(self, path):
        self.faults.check("rm_file", path)
        return super().rm_file(path)

    def cp_file(self, path1, path2, **kwargs):
        self.faults.check("copy", path2)
        return super().cp_file(path1, path2, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        self.faults.check("rm", path if isinstance(path, str) else ",".join(path))
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


fsspec.register_implementation(FaultyFS.protocol, FaultyFS, clobber=True)


class FaultyFileBackend(FileBackend):
    """Options: ``path`` (a local folder), ``faults`` (a list of faults), ``leftover_grace_s``, ``retry``."""

    OPTIONS = ("path", "faults", "leftover_grace_s", "retry")

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> FaultyFileBackend:
        key = f"backends.{name}"
        check_options(key, options, cls.OPTIONS, required=("path",))
        fs = FaultyFS(Faults(options.get("faults")))
        return cls(name, fs, local_root(options["path"], f"{key}.path"),
                   leftover_grace_s=float(options.get("leftover_grace_s", 3600)),
                   retry=RetryPolicy.from_config(f"{key}.retry", options.get("retry", {"attempts": 1})))

    @property
    def faults(self) -> Faults:
        return self.fs.faults


class _FaultyStream:
    def __init__(self, f: Any, path: str, faults: Faults):
        self._f, self._path, self._faults = f, path, faults

    def write(self, data) -> int:
        self._faults.check("write", self._path)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class FaultyLocalBackend(LocalBackend):
    """The local backend, failing where ``faults`` says. Options: those of ``local`` and ``faults``."""

    OPTIONS = (*LocalBackend.OPTIONS, "faults")

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> FaultyLocalBackend:
        options = dict(options)
        plan = options.pop("faults", None)
        backend = super().from_config(name, options)
        backend.faults = Faults(plan)
        return backend

    def _write(self, pf, path, stop=None):
        if self.faults.take("full", path) is not None:
            os.symlink("/dev/full", path)
        faults = self.faults
        faulty = attrs.evolve(pf, source=None, write=lambda f: pf.write_to(_FaultyStream(f, path, faults)))
        return super()._write(faulty, path, stop)

    def _commit(self, tmp, dirname, manifest, replace=True):
        self.faults.check("commit", f"{tmp}/manifest.json")
        return super()._commit(tmp, dirname, manifest, replace)
