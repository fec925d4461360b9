"""Reading checkpoints back: listing, verifying, fetching and loading, with typed failures.

Every failure gets a type that says what restore may do about it:

- ``CorruptCheckpointError``: this checkpoint is damaged; an older one may be tried.
- ``StorageUnavailableError``: the storage did not answer (retries included); an older one may be
  tried, but "no checkpoint at all" must not be concluded from it.
- ``UnsafeCheckpointError`` and ``IncompatibleCheckpointError``: never skipped, raised.

Anything else is a bug and propagates as it is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator, TypeVar

from . import safeload
from .checkpoint import CheckpointRef
from .errors import (
    BackendError,
    CheckpointError,
    CkptkitError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageUnavailableError,
    UnsafeCheckpointError,
)
from .hashing import algorithm_of, copy_hashed, hash_stream
from .manifest import FileEntry, Manifest
from .retry import RetriesExhausted, RetryPolicy
from .roles import Role
from .routing import Router

T = TypeVar("T")

SCRATCH_PREFIX = "ckptkit-scratch-"

# Worth trying an older checkpoint after these; everything else is raised.
SKIPPABLE = (CorruptCheckpointError, StorageUnavailableError)


def storage_failure(backend: str, what: str, exc: BaseException) -> CkptkitError:
    """The typed error for ``exc`` raised while ``what`` on ``backend``, keeping it as the cause."""
    if isinstance(exc, (UnsafeCheckpointError, IncompatibleCheckpointError, CorruptCheckpointError,
                        StorageUnavailableError)):
        return exc
    if isinstance(exc, FileNotFoundError):
        error: CkptkitError = CorruptCheckpointError(f"{what}: a file is missing ({exc})")
    elif isinstance(exc, CheckpointError):
        error = CorruptCheckpointError(str(exc))
    elif isinstance(exc, BackendError):
        error = StorageUnavailableError(exc.backend, exc.detail)
    elif isinstance(exc, (OSError, RetriesExhausted, TimeoutError)):
        error = StorageUnavailableError(backend, f"{what}: {exc}")
    else:
        return exc  # a bug: not ours to reinterpret
    error.__cause__ = exc
    return error


class Reader:
    """Reads one run's resume checkpoints from the backends a router holds."""

    def __init__(self, router: Router, run_name: str):
        self.router = router
        self.run_name = run_name

    def list_all(self) -> tuple[list[CheckpointRef], dict[str, CkptkitError]]:
        """Committed checkpoints across all resume backends, newest first, and the backends
        that could not be listed (name to ``StorageUnavailableError``)."""
        refs: list[CheckpointRef] = []
        unreachable: dict[str, CkptkitError] = {}
        order = self.router.backends(Role.RESUME)
        for name in order:
            try:
                refs.extend(self.router.call(name, "list_checkpoints", run_name=self.run_name) or [])
            except Exception as exc:
                failure = storage_failure(name, f"listing run {self.run_name!r}", exc)
                if not isinstance(failure, CkptkitError):
                    raise
                if not isinstance(failure, StorageUnavailableError):
                    failure = StorageUnavailableError(name, str(failure))
                    failure.__cause__ = exc
                unreachable[name] = failure
        rank = {n: i for i, n in enumerate(order)}
        return sorted(refs, key=lambda r: (-r.step, rank[r.backend])), unreachable

    def manifest(self, ref: CheckpointRef) -> Manifest:
        """The checkpoint's manifest, intact (its own checksum) and lying where it says it belongs."""
        try:
            manifest = self.router.call(ref.backend, "read_manifest", ref=ref)
        except Exception as exc:
            raise storage_failure(ref.backend, f"reading the manifest of {ref.uri}", exc) from exc
        if not isinstance(manifest, Manifest):
            raise CorruptCheckpointError(f"{ref.uri}: backend {ref.backend!r} returned {type(manifest).__name__} "
                                         "for its manifest")
        try:
            manifest.check_location(ref.run_name, ref.step if ref.role == "resume" else None,
                                    f"the manifest of {ref.uri}")
        except ValueError as exc:
            raise CorruptCheckpointError(str(exc)) from None
        return manifest

    def verify(self, ref: CheckpointRef) -> Manifest:
        """Check every file of a checkpoint against its manifest; return the manifest."""
        manifest = self.manifest(ref)
        self.check_files(ref, manifest, manifest.files)
        return manifest

    def check_files(self, ref: CheckpointRef, manifest: Manifest, names: Iterable[str]) -> None:
        for name in names:
            entry = manifest.files[name]

            def read(name: str = name, entry: FileEntry = entry) -> tuple[int, str]:
                with self.router.call(ref.backend, "open_file", ref=ref, name=name) as f:
                    return hash_stream(f, algorithm_of(entry.digest))

            size, digest = self.reading(ref, name, read)
            _compare(ref, name, entry, size, digest)

    def fetch(self, ref: CheckpointRef, manifest: Manifest, workdir: str) -> str:
        """A local folder holding the checkpoint's verified files."""
        if ref.local_dir:
            self.check_files(ref, manifest, manifest.files)
            return ref.local_dir
        for name, entry in manifest.files.items():
            def copy(name: str = name, entry: FileEntry = entry) -> tuple[int, str]:
                with self.router.call(ref.backend, "open_file", ref=ref, name=name) as src, \
                        open(os.path.join(workdir, name), "wb") as dst:
                    return copy_hashed(src, dst, algorithm_of(entry.digest))

            size, digest = self.reading(ref, name, copy)
            _compare(ref, name, entry, size, digest)
        return workdir

    def reading(self, ref: CheckpointRef, name: str, read: Callable[[], T]) -> T:
        """``read()`` of one file, retried whole by the backend's policy on transient errors.

        ``open_file`` retries only the open; the reads after it (one request per block on an
        object store) fail through to here.
        """
        backend = self.router.instances.get(ref.backend)
        policy = getattr(backend, "retry", None)
        try:
            if not isinstance(policy, RetryPolicy):
                return read()
            return policy.call(f"reading {ref.uri}/{name}", read, secrets=getattr(backend, "secrets", ()))
        except Exception as exc:
            raise storage_failure(ref.backend, f"reading {ref.uri}/{name}", exc) from exc


def _compare(ref: CheckpointRef, name: str, entry: FileEntry, size: int, digest: str) -> None:
    if size != entry.size:
        raise CorruptCheckpointError(f"{ref.uri}: {name} has {size} bytes, the manifest says {entry.size}")
    if digest != entry.digest:
        raise CorruptCheckpointError(f"{ref.uri}: {name} does not match its checksum")


def load(path: str, ref: CheckpointRef, safe_globals: Iterable[Any] = ()) -> Any:
    """A verified file of ``ref``, loaded weights-only, with the checkpoint named in any error.

    Not memory-mapped: optimizers keep loaded tensors as they are, and a tensor that points into
    the file would keep the whole file mapped (and, once pruned, its disk space taken) for the
    rest of training.
    """
    try:
        return safeload.load(path, safe_globals)
    except CheckpointError as exc:
        raise type(exc)(f"{ref.uri}: {exc}") from exc


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[str]:
    """A private temporary folder for downloads, removed afterwards.

    Its name carries this process's id, so that a later call can remove the folders of
    processes that were killed before they could clean up (see ``sweep_scratch``).
    """
    sweep_scratch()
    path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-{os.getpid()}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_scratch(tmpdir: str | None = None) -> list[str]:
    """Remove the scratch folders of processes that no longer run; return what was removed."""
    root = tmpdir or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for entry in names:
        if not entry.startswith(SCRATCH_PREFIX):
            continue
        parts = entry[len(SCRATCH_PREFIX):].split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _alive(pid):
            continue
        path = os.path.join(root, entry)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
