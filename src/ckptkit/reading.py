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
import ctypes
import errno
import functools
import io
import logging
import mmap
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from concurrent import futures
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

from . import safeload, split
from .checkpoint import CheckpointRef
from .errors import (
    BackendError,
    CheckpointError,
    CkptkitError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    LocalWriteError,
    StorageUnavailableError,
    UnsafeCheckpointError,
)
from .hashing import CHUNK, WriteOnly, algorithm_of, copy_hashed, hash_pool, hash_stream, new_hasher, usable_cpus
from .local import mappable
from .manifest import FileEntry, Manifest
from .processes import machine, writer_gone, writer_mark
from .retry import RetriesExhausted, RetryPolicy, denied, exhausted, gave_up
from .roles import Role
from .routing import Router

T = TypeVar("T")
log = logging.getLogger(__name__)

SCRATCH_PREFIX = "ckptkit-scratch-"

# Worth trying an older checkpoint after these; everything else is raised.
SKIPPABLE = (CorruptCheckpointError, StorageUnavailableError)
# Below this size a local file is hashed before it is loaded; above it, on a second thread while it loads.
_THREAD_MIN = 1024 * 1024
# A state file at least this large is loaded through a memory mapping where it may be; a smaller
# one loads the plain way. From a fresh process, mapping saved 0.5 ms of a 2 MB restore and 1.5 ms
# of a 4 MB one, and cost 0.15 to 0.25 ms of a 1 MB one: the mapping's own calls, the checks
# that the file did not change, and copying the optimizer's share out of it cost more there than
# the model's share read once saves.
_MAP_MIN = 1024 * 1024
# A local file not hashed through a mapping is hashed in reads of this size: a buffer that stays
# in the CPU's cache and is cheap to allocate. Each file gets a fresh one, and from a fresh process 1 MiB
# of new memory cost more page faults than hashing the file: 0.94 ms against 0.20 ms for a 1 MB
# file read in 256 KiB (2.5 against 3.5 ms at 10 MB, 59 against 62 ms at 256 MB).
_READ_CHUNK = 256 * 1024


def storage_failure(backend: str, what: str, exc: BaseException) -> CkptkitError:
    """The typed error for ``exc`` raised while ``what`` on ``backend``, keeping it as the cause."""
    if isinstance(exc, (UnsafeCheckpointError, IncompatibleCheckpointError, CorruptCheckpointError,
                        StorageUnavailableError, LocalWriteError)):
        return exc
    if isinstance(exc, FileNotFoundError):
        error: CkptkitError = CorruptCheckpointError(f"{what}: a file is missing ({exc})")
    elif isinstance(exc, CheckpointError):
        error = CorruptCheckpointError(str(exc))
    elif isinstance(exc, BackendError):
        error = StorageUnavailableError(exc.backend, exc.detail)
    elif isinstance(exc, (OSError, RetriesExhausted, TimeoutError)):
        refused = (". The storage does not let this process read it, which does not make it damaged: check the "
                   "permissions on it, or the credentials this process uses" if denied(exc) else "")
        error = StorageUnavailableError(backend, f"{what}: {exc}{refused}")
    else:
        return exc  # a bug: not ours to reinterpret
    error.__cause__ = exc
    return error


def refusal(failure: BaseException) -> bool:
    """Is ``failure`` (a typed error) the storage refusing this process a read, not damage?"""
    return isinstance(failure, StorageUnavailableError) and denied(failure)


class Reader:
    """Reads one run's resume checkpoints from the backends a router holds."""

    def __init__(self, router: Router, run_name: str):
        self.router = router
        self.run_name = run_name
        # A pass belongs to the thread that makes it: the prune thread reads manifests too
        # (keep_best), maybe while a peek's pass is open, and neither may stop the other's reads.
        self._pass = threading.local()

    @property
    def silent(self) -> set[str] | None:
        """In a pass over a run's checkpoints (``one_pass``): the backends whose store stopped
        answering the read of a manifest (retries used up on timeouts or lost connections), or
        did not deliver a file of a checkpoint through every retry (``note_skipped``). Their
        other checkpoints' manifests are not asked for until a listing shows that they answer
        again, as each would wait through all of its retries again, and an older step is no
        stand-in for one that may be intact."""
        return getattr(self._pass, "silent", None)

    @property
    def refused(self) -> tuple[int, str] | None:
        """In such a pass: the newest step of which the storage refused this process a file (its
        permissions, or the credentials used), with that checkpoint's address. It may be intact,
        so no older step is restored past it, from any backend: training would run again what it
        holds, then save over it."""
        return getattr(self._pass, "refused", None)

    @contextlib.contextmanager
    def one_pass(self) -> Iterator[None]:
        """A restore's (peek's, export's) pass over the candidates of a listing, on this thread;
        see ``silent`` and ``refused``."""
        self._pass.silent, self._pass.refused = set(), None
        try:
            yield
        finally:
            self._pass.silent, self._pass.refused = None, None

    def list_all(self) -> tuple[list[CheckpointRef], dict[str, CkptkitError]]:
        """Committed checkpoints across all resume backends, newest first, and the backends
        that could not be listed (name to ``StorageUnavailableError``)."""
        refs: list[CheckpointRef] = []
        unreachable: dict[str, CkptkitError] = {}
        order = self.router.backends(Role.RESUME)
        for name in order:
            try:
                got = self.router.call(name, "list_checkpoints", run_name=self.run_name)
                if self.silent:
                    self.silent.discard(name)  # it answers again
            except Exception as exc:
                failure = storage_failure(name, f"listing run {self.run_name!r}", exc)
                if not isinstance(failure, CkptkitError):
                    # A bug in the backend's type, not an unreachable store: raised, never taken
                    # for an empty run, and named, so that its author can be told.
                    btype = self.router.types[name]
                    raise BackendError(name, f"listing run {self.run_name!r} raised {type(exc).__name__}: {exc} "
                                             f"(type {btype.name!r}, from {btype.dist})") from exc
                if not isinstance(failure, StorageUnavailableError):
                    failure = StorageUnavailableError(name, str(failure))
                    failure.__cause__ = exc
                unreachable[name] = failure
                continue
            refs.extend(self.router.checked_refs(name, "list_checkpoints", got, self.run_name))
        rank = {n: i for i, n in enumerate(order)}
        return sorted(refs, key=lambda r: (-r.step, rank[r.backend])), unreachable

    def manifest(self, ref: CheckpointRef) -> Manifest:
        """The checkpoint's manifest, intact (its own checksum) and lying where it says it belongs."""
        if self.silent and ref.backend in self.silent:
            raise StorageUnavailableError(ref.backend, f"{ref.uri} was not read: the store did not deliver a newer "
                                                       "checkpoint through every retry, and that one may be intact")
        if self.refused is not None and ref.step < self.refused[0]:
            raise StorageUnavailableError(ref.backend, f"{ref.uri} was not read: the storage refused this process "
                                                       f"{self.refused[1]}, which may be intact, and no older step "
                                                       "is restored past it")
        try:
            manifest = self.router.call(ref.backend, "read_manifest", ref=ref)
        except Exception as exc:
            if self.silent is not None and gave_up(exc):
                self.silent.add(ref.backend)
            failure = storage_failure(ref.backend, f"reading the manifest of {ref.uri}", exc)
            if not isinstance(failure, CkptkitError):  # the plugin's bug: named, and never skipped as damage
                raise self.router.blame(ref.backend, "read_manifest", exc) from exc
            if refusal(failure):
                self.refused_by_storage(ref)
            raise failure from exc
        if not isinstance(manifest, Manifest):
            # The plugin's fault, not the checkpoint's: called damaged, it would be skipped for an
            # older step, or the run given up for lost.
            raise self.router.faulty(ref.backend, "read_manifest", f"{type(manifest).__name__} for {ref.uri}",
                                     "a Manifest")
        try:
            manifest.check_location(ref.run_name, ref.step if ref.role == "resume" else None,
                                    f"the manifest of {ref.uri}")
        except ValueError as exc:
            raise CorruptCheckpointError(str(exc)) from None
        return manifest

    def note_skipped(self, ref: CheckpointRef, problem: BaseException) -> None:
        """Note, in a pass, that ``ref`` was skipped for ``problem``. Where the storage did not
        deliver a file of it through every retry (it stopped answering, or kept answering with
        transient errors), not damage, no older checkpoint of that backend is read (``silent``):
        it may be intact, and training resumed from an older one would save over it. (A refusal
        stops every older step already: ``refused``.)"""
        if (self.silent is not None and isinstance(problem, StorageUnavailableError) and exhausted(problem)
                and not refusal(problem)):
            self.silent.add(ref.backend)

    def refused_by_storage(self, ref: CheckpointRef) -> None:
        """Note, in a pass, that the storage refused this process a file of ``ref`` (``refused``)."""
        if self.silent is not None and (self.refused is None or ref.step > self.refused[0]):
            self._pass.refused = (ref.step, f"a file of {ref.uri}")

    def verify(self, ref: CheckpointRef) -> Manifest:
        """Check every file of a checkpoint against its manifest; return the manifest."""
        manifest = self.manifest(ref)
        self.check_files(ref, manifest, manifest.files)
        return manifest

    def check_files(self, ref: CheckpointRef, manifest: Manifest, names: Iterable[str]) -> None:
        for name in names:
            entry = manifest.files[name]
            read = functools.partial(self._hash, ref, name, algorithm_of(entry.digest), CHUNK, False, entry.size)
            _compare(ref, name, entry, *self._read_whole(ref, name, entry, read))

    def _read_whole(self, ref: CheckpointRef, name: str, entry: FileEntry,
                    read: Callable[[], tuple[int, str]]) -> tuple[int, str]:
        """``read()`` of a file of ``ref`` (its size and digest), made again once where a remote
        file of the manifest's size disagrees with its checksum: damaged on its way here (a
        proxy, a NIC, plain HTTP to a store) or where it is kept, which only a second read tells,
        and a checkpoint called damaged is passed over for an older one (which the next save
        writes over) or deleted by hand."""
        got = self.reading(ref, name, read)
        if not ref.local_dir and got[0] == entry.size and got[1] != entry.digest:
            log.warning("%s/%s did not match its checksum as read; reading it again", ref.uri, name)
            got = self.reading(ref, name, read)
        return got

    def fetch(self, ref: CheckpointRef, manifest: Manifest, workdir: str) -> str:
        """A local folder holding the checkpoint's verified files."""
        if ref.local_dir:
            self.check_files(ref, manifest, manifest.files)
            return ref.local_dir
        for name in manifest.files:
            self.download(ref, manifest, name, workdir)
        return workdir

    def load_files(self, ref: CheckpointRef, manifest: Manifest, names: Sequence[str],
                   safe_globals: Iterable[Any] = (), mapped: Collection[str] = (),
                   keep: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Files ``names`` of ``ref``, each checked against ``manifest`` and loaded weights-only.

        Returns only once every one of them matched its size and checksum, so a caller may apply
        what it gets; raises ``CorruptCheckpointError`` for a file that does not match (whatever
        loading it gave), else the load's own error, naming the checkpoint. Every byte is read
        from storage once: a local file loaded through a mapping (``mapped``) is hashed through
        that mapping before anything is copied out of it; another of 1 MiB or more on a second
        thread while the caller's thread loads it (both read it from the page cache), a smaller
        one before it loads; a remote one is downloaded into a scratch folder while it is hashed, and loaded
        from there (mapped as below, as a local file is). The parts of a split state are
        downloaded, and loaded, several at a time.

        ``mapped``: state files whose model tensors may stay in the file, memory-mapped, for a
        caller that copies them into the model and drops them (see ``load``). Where the local
        filesystem allows mapping, such a file is refused before it is mapped if its size is not
        the manifest's. Any local file that changed (inode, size or times) by the time it was
        loaded and hashed is refused as corrupt. ``keep``: of a mapped file, only these top-level
        keys are returned, the others dropped without being copied out of the mapping.
        """
        safe_globals = list(safe_globals)
        big = [n for n in names if manifest.files[n].size >= _THREAD_MIN]
        if not ref.local_dir:
            # Several downloads at a time only through a client made for use from several threads.
            threaded = getattr(self.router.instances.get(ref.backend), "concurrent_writes", False)
            with scratch("load") as workdir:
                _each(names, big if threaded else (), lambda name: self.download(ref, manifest, name, workdir))
                # Verified as they came; the model's share is read from the scratch copy straight
                # into the model, not held a second time beside it (the mapping outlives removal).
                local = mapped if mapped and mappable(workdir) else ()
                return _each(names, big, lambda name: load(os.path.join(workdir, name), ref, safe_globals,
                                                           model_mapped=name in local, keep=keep))
        mapped = mapped if mapped and mappable(ref.local_dir) else ()
        paths = {name: os.path.join(ref.local_dir, name) for name in names}
        before = {name: identity(paths[name], ref) for name in names}
        for name in names:
            # A file of another size than the manifest's is refused before any of it is read:
            # reading past the end of a mapping kills the process (SIGBUS), and a file too large
            # is never worth reading.
            if before[name][1] != manifest.files[name].size:
                _compare(ref, name, manifest.files[name], before[name][1], "")
        hashes: dict[str, Any] = {}
        for name in sorted(names, key=lambda n: manifest.files[n].size):
            if name in mapped:
                continue  # hashed through the load's own mapping (below)
            if manifest.files[name].size >= _THREAD_MIN:
                hashes[name] = hash_pool().submit(self._digest, ref, manifest, name)
            else:  # hashing it costs less than handing it to a thread: verified before it is loaded
                self._check(ref, manifest, name)
        # A mapped file is hashed through the mapping its tensors point into, before any of them
        # is copied out: its pages are read from the page cache once, for the hash, and the
        # copies into the optimizer and the model then find them mapped (a hash of its own, by
        # reads or another mapping, read every byte twice: 100 MB restored in 1.2 to 1.6 times
        # torch.load's time on tmpfs). No more exposed to a failing read (SIGBUS) than the load.
        digests: dict[str, tuple[int, str] | None] = {}

        def loading(name: str) -> Any:
            if name not in mapped:
                return load(paths[name], ref, safe_globals, keep=keep)
            entry = manifest.files[name]

            def hashed(raw: Any) -> None:
                # The file the load mapped is the one measured before it (no write, no other
                # file put in its place since, which ctime would show), so the mapping holds
                # the manifest's size in bytes, and reading them stays inside it.
                if identity(paths[name], ref) == before[name]:
                    digests[name] = digest_through_mapping(raw, paths[name], entry.size, algorithm_of(entry.digest))

            return load(paths[name], ref, safe_globals, model_mapped=True, keep=keep, on_mapped=hashed)

        loaded: dict[str, Any] = {}
        failure: Exception | None = None
        try:
            # The weights-only unpickler runs on bytes not yet verified. That is safe because it
            # runs nothing stored in them, and nothing loaded is returned, let alone applied to a
            # model or optimizer, before the digests below matched.
            loaded = _each(names, big, loading)
        except Exception as exc:
            failure = exc
        finally:
            # Every hash finished before any check can raise: none goes on reading a skipped
            # checkpoint (and holding its file open) while the caller moves on. The checks come
            # after this block, so that an interrupt (Ctrl-C) is never replaced by a checksum error.
            futures.wait(hashes.values())
        for name in mapped:
            # One whose load failed, or that loaded the plain way, is hashed on its own: a file
            # that does not match is called damaged, whatever its load gave.
            got = digests.get(name) or self._digest(ref, manifest, name, mapped=True)
            _compare(ref, name, manifest.files[name], *got)
        for name, pending in hashes.items():
            _compare(ref, name, manifest.files[name], *pending.result())
        if failure is not None:
            raise failure
        # What was loaded must be what was hashed, and a mapping reads the file when its pages
        # are touched, later still: a file written meanwhile would reach the model unverified.
        for name in names:
            if changed(paths[name], ref, before[name], manifest.files[name]):
                raise CorruptCheckpointError(f"{ref.uri}: {name} changed while it was being restored, so what "
                                             "was loaded is not what was verified; nothing of it was applied. "
                                             "Keep other programs from writing into checkpoint folders")
        return loaded

    def load_state(self, ref: CheckpointRef, manifest: Manifest, safe_globals: Iterable[Any] = (),
                   keep: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The whole state of a ``torch`` checkpoint: ``state.pt``, or every part of a split state
        merged into one dict, each file verified and loaded by ``load_files``. ``keep`` keeps only
        those top-level keys (``export`` needs the model alone): its tensors then stay in the
        files, mapped, and nothing else is copied out of them."""
        return _merged(ref, manifest, lambda names: self.load_files(
            ref, manifest, names, safe_globals, mapped=worth_mapping(manifest, names) if keep else (), keep=keep), keep)

    def _digest(self, ref: CheckpointRef, manifest: Manifest, name: str, mapped: bool = False) -> tuple[int, str]:
        """The size and digest of file ``name`` of a local checkpoint, read in pieces that stay in
        the CPU's cache, or with ``mapped`` through a mapping (``hash_stream``)."""
        entry = manifest.files[name]
        read = functools.partial(self._hash, ref, name, algorithm_of(entry.digest), min(_READ_CHUNK, entry.size + 1),
                                 mapped, entry.size)
        return self.reading(ref, name, read)

    def _check(self, ref: CheckpointRef, manifest: Manifest, name: str) -> None:
        _compare(ref, name, manifest.files[name], *self._digest(ref, manifest, name))

    def _hash(self, ref: CheckpointRef, name: str, algorithm: str, chunk: int = CHUNK,
              mapped: bool = False, size: int | None = None) -> tuple[int, str]:
        """The size and digest of file ``name``; a local file of another ``size`` is not read."""
        with self.router.call(ref.backend, "open_file", ref=ref, name=name) as f:
            if size is not None and ref.local_dir:
                try:
                    found = os.fstat(f.fileno()).st_size
                except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                    found = size
                if found != size:
                    return found, ""
            return hash_stream(f, algorithm, chunk, mapped)

    def download(self, ref: CheckpointRef, manifest: Manifest, name: str, workdir: str) -> str:
        """Copy file ``name`` of ``ref`` into ``workdir``, checked against ``manifest``; return its path."""
        entry = manifest.files[name]
        path = os.path.join(workdir, name)

        def copy() -> tuple[int, str]:
            with self.router.call(ref.backend, "open_file", ref=ref, name=name) as src, \
                    LocalCopy(path, f"a copy of {ref.uri}/{name}", SCRATCH_ADVICE) as dst:
                return copy_hashed(src, dst, algorithm_of(entry.digest), limit=entry.size)

        _compare(ref, name, entry, *self._read_whole(ref, name, entry, copy))
        return path

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
            failure = storage_failure(ref.backend, f"reading {ref.uri}/{name}", exc)
            if refusal(failure):  # also one a plugin raised typed itself
                self.refused_by_storage(ref)
            if failure is exc and isinstance(exc, CkptkitError):
                raise  # already says what failed, with its own cause
            if not isinstance(failure, CkptkitError):
                raise self.router.blame(ref.backend, f"open_file (or reading {name} through it)", exc) from exc
            raise failure from exc


def _each(names: Sequence[str], big: Sequence[str], work: Callable[[str], T]) -> dict[str, T]:
    """``work(name)`` for every name: the ``big`` ones (the parts of a split state) on threads of
    their own, several at a time, the rest on this thread. Loading a part spends most of its time
    reading into and faulting in fresh memory, which releases the GIL: from a fresh process, a
    1 GiB state in two parts loaded in 0.68 of the time of one file. Every call has finished
    before this returns or raises the first error."""
    if len(big) < 2:
        return {name: work(name) for name in names}
    done: dict[str, T] = {}
    with futures.ThreadPoolExecutor(min(len(big), usable_cpus()), thread_name_prefix="ckptkit-load") as pool:
        pending = {name: pool.submit(work, name) for name in big}
        try:
            for name in names:
                if name not in pending:
                    done[name] = work(name)
        except BaseException:
            for f in pending.values():  # parts not started yet are not worth loading
                f.cancel()
            raise
        finally:
            futures.wait(pending.values())
        for name in big:
            done[name] = pending[name].result()
    return {name: done[name] for name in names}


SCRATCH_ADVICE = ("ckptkit writes what it downloads from remote storage, and the final model publish makes, into "
                  "a scratch folder in the temporary folder first: free space there, or point TMPDIR at a folder "
                  "with room for the checkpoint")


class LocalCopy(WriteOnly):
    """A file on this machine that what a checkpoint holds is written to (``what`` it is: the
    copy a download makes, the final model publish makes). Its failures (a full or read-only
    disk) are this machine's, not the storage's: they are raised as ``LocalWriteError`` naming
    the file and saying what to do (``advice``), so that they are neither retried as the
    storage's nor taken for a damaged checkpoint or one the storage refuses this process. A
    writer in between that reports the failure as its own (``torch.save``: "unexpected pos")
    has its error replaced on leaving the block."""

    def __init__(self, path: str, what: str, advice: str):
        self.path = path
        self.what = what
        self.advice = advice
        self.failed: LocalWriteError | None = None
        self._file: Any = None

    def _failure(self, exc: OSError) -> LocalWriteError:
        self.failed = LocalWriteError(f"could not write {self.path} ({self.what}) on this machine: {exc}. The "
                                      f"checkpoint is not at fault. {self.advice}")
        return self.failed

    def __enter__(self) -> LocalCopy:
        try:
            self._file = open(self.path, "wb")
        except OSError as exc:
            raise self._failure(exc) from exc
        return self

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            raise self._failure(exc) from exc

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            raise self._failure(exc) from exc

    def __exit__(self, kind: Any, value: Any, _: Any) -> None:
        try:
            self._file.close()  # writes what is still buffered
        except OSError as exc:
            if kind is None:
                raise self._failure(exc) from exc
        over = value is None or isinstance(value, Exception)  # never over an interrupt
        if self.failed is not None and over and value is not self.failed:
            raise self.failed


def identity(path: str, ref: CheckpointRef) -> tuple[int, ...]:
    """What changes when a file is replaced or written: its inode, size and times. A link or
    anything else but a regular file is refused: ckptkit writes none, and loading one would
    read whatever it points at."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise storage_failure(ref.backend, f"reading {path}", exc) from exc
    if not stat.S_ISREG(st.st_mode):
        raise CorruptCheckpointError(f"{ref.uri}: {os.path.basename(path)} is not a regular file (a link or "
                                     "device, which ckptkit never writes); it was not read")
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def changed(path: str, ref: CheckpointRef, before: tuple[int, ...], entry: FileEntry) -> bool:
    """Whether the file at ``path`` is no longer the one whose ``identity`` was ``before`` and
    whose bytes were ``entry``'s. Only its change time moved (a chmod, a hard link a backup made,
    or a write that set the modification time back): its bytes are read again to tell."""
    now = identity(path, ref)
    if now == before:
        return False
    if now[:3] == before[:3]:
        try:
            with open(path, "rb") as f:
                return hash_stream(f, algorithm_of(entry.digest)) != (entry.size, entry.digest)
        except OSError:
            return True
    return True


@contextlib.contextmanager
def unchanged(ref: CheckpointRef, files: Mapping[str, FileEntry]) -> Iterator[Callable[[], None]]:
    """The ``files`` of a local checkpoint (its manifest's entries), which the block hashes and
    then reads by name, are the files it hashed: their identity is taken on entering, and the
    function this gives raises ``CorruptCheckpointError`` for a file replaced or written since
    whose bytes are no longer the manifest's (one written again with the same bytes, as a
    publish to the source's own backend does, passes). The block calls it once it has read
    them. Links and other non-regular files are refused on entering. A remote checkpoint is read
    from the copies its download checked, so there is nothing to compare."""
    if not ref.local_dir:
        yield lambda: None
        return
    paths = {name: os.path.join(ref.local_dir, name) for name in files}
    before = {name: identity(path, ref) for name, path in paths.items()}

    def same_bytes(name: str) -> bool:
        try:
            with open(paths[name], "rb") as f:
                return hash_stream(f, algorithm_of(files[name].digest)) == (files[name].size, files[name].digest)
        except OSError:
            return False

    def check() -> None:
        changed = sorted(name for name, path in paths.items()
                         if identity(path, ref) != before[name] and not same_bytes(name))
        if changed:
            raise CorruptCheckpointError(
                f"{ref.uri}: {', '.join(changed[:5])} changed while it was being read, so what was read is not "
                "what was verified. Keep other programs from writing into checkpoint folders")

    yield check


def _compare(ref: CheckpointRef, name: str, entry: FileEntry, size: int, digest: str) -> None:
    if size != entry.size:
        raise CorruptCheckpointError(f"{ref.uri}: {name} has {size} bytes, the manifest says {entry.size}")
    if digest != entry.digest:
        raise CorruptCheckpointError(f"{ref.uri}: {name} does not match its checksum")


def load(path: str, ref: CheckpointRef, safe_globals: Iterable[Any] = (), model_mapped: bool = False,
         keep: tuple[str, ...] | None = None, on_mapped: Callable[[Any], None] | None = None) -> Any:
    """A verified file of ``ref``, loaded weights-only, with the checkpoint named in any error.

    ``model_mapped``: the file is memory-mapped, and the tensors of its top-level ``model`` dict
    stay in the mapping, for a caller that copies them into the model's own tensors and then
    drops them (``load_state_dict`` copies), and with ``keep`` only those top-level keys are
    returned (the others are dropped uncopied). Every other tensor is copied out of the mapping into
    memory of its own, as a plain load gives it: optimizers keep loaded tensors as they are, and
    one that pointed into the file would keep the whole file mapped (and, once pruned, its disk
    space taken) for the rest of training. The model's share is then read once, straight into the
    model, and the rest is copied out of the page cache, which is faster than ``torch.load``'s own
    reads (docs/performance.md). A file holding anything not walked here is loaded the plain way.
    ``on_mapped`` is called with what the mapped load gave, before anything is copied out of it.
    """
    try:
        if model_mapped and torch.serialization.get_default_mmap_options() == mmap.MAP_PRIVATE:
            # (MAP_SHARED, which torch lets a process choose, would let a write reach the file.)
            try:
                raw = safeload.load(path, safe_globals, mapped=True)
                if on_mapped is not None:
                    on_mapped(raw)
                return _model_mapped(raw, keep)
            except _Opaque:
                pass
        return safeload.load(path, safe_globals)
    except CheckpointError as exc:
        raise type(exc)(f"{ref.uri}: {exc}") from exc
    except MemoryError as exc:  # this machine's, never the checkpoint's: not skipped for an older one
        raise MemoryError(f"{ref.uri}: {exc}") from exc
    except RuntimeError as exc:
        if not safeload.out_of_memory(exc):
            raise
        raise MemoryError(f"{ref.uri}: this machine ran out of memory copying the state out of {path} "
                          f"({str(exc).splitlines()[0]}); nothing of it was applied. Free memory, or restore where "
                          "there is more, and try again") from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ESTALE):
            raise
        # Deleted since it was hashed: another process's prune (over NFS, a stale handle).
        raise storage_failure(ref.backend, f"reading {path}", exc) from exc


def digest_through_mapping(raw: Any, path: str, size: int, algorithm: str) -> tuple[int, str] | None:
    """The size and digest of the file at ``path`` (``size`` bytes by its manifest), read through
    the mapping that the tensors of ``raw`` (its load with ``mapped``) point into, up to the end
    of the last of them, and the rest (the zip's directory) by a read; None where that mapping
    cannot be told for sure, for the caller to hash the file on its own.

    torch maps the whole file and points each storage at its record's offset in it, so the
    mapping starts at any storage's address less its record's offset. That is taken as known
    only where the storages' addresses, less that start, are the offsets of the file's data
    records, one for one: anything else (a record no tensor uses, a tensor not from the file, a
    sparse one) leaves the hash to a read of its own. So is a file whose tensors torch swapped
    in the mapping to this machine's byte order, or whose offsets it computed rather than read.
    Only what lies inside the storages torch made of the mapping is read through it.
    """
    from torch.utils.serialization import config

    if getattr(config.load, "calculate_storage_offsets", False):
        return None
    ends: dict[int, int] = {}
    seen: set[int] = set()  # each container once: a tuple nested in itself has 2**depth paths
    stack = [raw]
    while stack:
        obj = stack.pop()
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor or obj.device.type != "cpu" or obj.layout != torch.strided:
                return None
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return None
            ends[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif not isinstance(obj, _ATOMS):
            return None
    try:
        reader = torch._C.PyTorchFileReader(path)
        names = reader.get_all_records()
        if "byteorder" not in names or reader.get_record("byteorder") != sys.byteorder.encode():
            return None  # (torch swaps the bytes of each storage in the mapping)
        offsets = sorted(reader.get_record_offset(n) for n in names if n.startswith("data/"))
    except (AttributeError, RuntimeError, OSError, ValueError):
        return None
    found = sorted(ends)
    if not found or len(found) != len(offsets):
        return None
    start = found[0] - offsets[0]
    mapped = max(ends.values()) - start
    if start <= 0 or [a - start for a in found] != offsets or mapped > size:
        return None
    h = new_hasher(algorithm)
    h.update(memoryview((ctypes.c_char * mapped).from_address(start)))
    with open(path, "rb") as f:
        f.seek(mapped)
        rest, digest = hash_stream(f, algorithm, _READ_CHUNK, hasher=h)
    return mapped + rest, digest


class _Opaque(Exception):
    """A loaded object that ``_owned`` cannot see into."""


# What a state holds besides tensors and the containers walked: values that point into no file.
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout, torch.Size)


def _model_mapped(state: Any, keep: tuple[str, ...] | None = None) -> Any:
    """``state`` with every tensor in memory of its own but the plain ones of its ``model`` dict;
    with ``keep``, only those of its top-level keys."""
    memo: dict[Any, Any] = {}
    if not isinstance(state, dict):
        return _owned(state, memo)
    if keep is not None:
        for key in [k for k in state if k not in keep]:
            del state[key]
    for key, value in state.items():
        if key != "model" or not isinstance(value, dict):
            state[key] = _owned(value, memo)
            continue
        for name, tensor in value.items():
            # Extra state is whatever a module's set_extra_state keeps, not copied into the model.
            if not _plain(tensor) or name.endswith("_extra_state"):
                value[name] = _owned(tensor, memo)
    return state


def _plain(obj: Any) -> bool:
    """A tensor that is its storage's bytes and nothing more: on the CPU, dense, not quantized,
    with no conjugate or negative bit and no autograd flag, which a copy of the storage would lose."""
    return (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided
            and not (obj.is_quantized or obj.is_conj() or obj.is_neg() or obj.requires_grad))


def _owned(obj: Any, memo: dict[int, Any]) -> Any:
    """``obj`` with each tensor copied out of the mapping; tensors that shared storage still share
    it (``memo``: the copy of each storage, by its address, and what each container became, by
    its id). Containers are changed in place. A container met again is not walked again: a few
    hundred bytes of pickle can nest one tuple in itself forty levels deep, 2**40 paths."""
    if isinstance(obj, (dict, list, tuple)):
        # Keyed by id, holding the container itself: freed, its id could name another one.
        key = ("container", id(obj))
        if key in memo:
            return memo[key][1]
        memo[key] = (obj, obj)  # a container inside itself (a list can be) ends there
        done = _owned_container(obj, memo)
        memo[key] = (obj, done)
        return done
    if _plain(obj):
        storage = obj.untyped_storage()
        own = memo.get(storage.data_ptr())
        if own is None:
            # One memmove without the interpreter lock: storage.clone() starts a parallel region,
            # whose threads waited for each other on two cores (336 MiB: 310-360 ms against 40-50 ms).
            own = memo[storage.data_ptr()] = torch.UntypedStorage(storage.nbytes())
            if storage.nbytes():
                ctypes.memmove(own.data_ptr(), storage.data_ptr(), storage.nbytes())
        return torch.empty(0, dtype=obj.dtype).set_(own, obj.storage_offset(), obj.size(), obj.stride())
    if isinstance(obj, torch.Tensor):
        raise _Opaque(f"a {type(obj).__name__} that is more than its storage's bytes")
    if isinstance(obj, _ATOMS):
        return obj
    raise _Opaque(type(obj).__name__)


def _owned_container(obj: dict | list | tuple, memo: dict[Any, Any]) -> Any:
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _owned(value, memo)
        return obj
    if isinstance(obj, list):
        obj[:] = [_owned(value, memo) for value in obj]
        return obj
    if type(obj) is tuple:
        return tuple(_owned(value, memo) for value in obj)
    raise _Opaque(type(obj).__name__)


def worth_mapping(manifest: Manifest, names: Iterable[str]) -> list[str]:
    """Those of the state files ``names`` large enough to gain from loading through a mapping."""
    return [n for n in names if manifest.files[n].size >= _MAP_MIN]


def state_files(ref: CheckpointRef, manifest: Manifest) -> list[str]:
    """The files holding a ``torch`` checkpoint's state: ``state.pt``, or every part of a split
    state (``roles.resume.write_threads``) in order; ``CorruptCheckpointError`` for any other set."""
    return split.state_files(manifest.files, f"the manifest of {ref.uri}")


def load_state(folder: str, ref: CheckpointRef, manifest: Manifest, safe_globals: Iterable[Any] = (),
               keep: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The whole state of a ``torch`` checkpoint whose files lie in ``folder``, verified already,
    merged from its parts; ``keep`` as for ``Reader.load_state``."""
    mapped = worth_mapping(manifest, manifest.files) if keep and mappable(folder) else ()
    return _merged(ref, manifest, lambda names: {n: load(os.path.join(folder, n), ref, safe_globals,
                                                         model_mapped=n in mapped, keep=keep)
                                                 for n in names}, keep)


def _merged(ref: CheckpointRef, manifest: Manifest, load_all: Callable[[list[str]], dict[str, Any]],
            keep: tuple[str, ...] | None) -> dict[str, Any]:
    names = state_files(ref, manifest)
    loaded = load_all(names)
    parts = [loaded.pop(n) for n in names]
    if keep is not None:
        parts = [{k: v for k, v in p.items() if k in keep} if isinstance(p, dict) else p for p in parts]
    state = split.merge(parts, ref.uri)
    if len(parts) > 1:  # each part was measured alone as it loaded, within its own allowance
        safeload.refuse_inflated(state, ref.uri)
    return state


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[str]:
    """A private temporary folder for downloads, or copies a backend makes to send, removed
    afterwards; ``kind`` goes into its name.

    Its name carries this process's id, so that a later call can remove the folders of
    processes that were killed before they could clean up (see ``sweep_scratch``).
    """
    sweep_scratch()
    kind = re.sub(r"[^A-Za-z0-9_]", "_", kind)  # the sweep reads the process id after the first dash
    try:
        path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-{os.getpid()}-{machine()}-")
    except OSError as exc:
        raise LocalWriteError(f"could not make a scratch folder in {tempfile.gettempdir()} ({exc}). "
                              f"{SCRATCH_ADVICE}") from exc
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# A scratch folder of another machine or container, which no process id here can tell alive, is
# left this long after anything in it last changed.
SCRATCH_IDLE_S = 24 * 3600.0


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
        path = os.path.join(root, entry)
        if len(parts) >= 4 and parts[2] == machine() and writer_mark() != "0.0":  # a machine told apart
            if not writer_gone(f"{parts[1]}.{parts[2]}"):
                continue
        elif not _idle(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _idle(path: str) -> bool:
    """Whether nothing in the folder ``path`` changed for ``SCRATCH_IDLE_S``."""
    try:
        times = [os.lstat(path).st_mtime]
        with os.scandir(path) as entries:
            times += [e.stat(follow_symlinks=False).st_mtime for e in entries]
    except OSError:
        return False
    return time.time() - max(times) > SCRATCH_IDLE_S
