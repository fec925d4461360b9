"""Checkpoints as folders of files under a root on any fsspec filesystem.

``FileBackend`` implements the storage contract once for every file-like backend: a checkpoint
is the folder ``<root>/<run_name>/step-<step>/``, committed when its ``manifest.json`` is
written, which happens last. On object stores, where rename is not atomic, the manifest is the
commit; ``LocalBackend`` adds a temporary folder and an atomic rename on top. Deleting goes the
other way: the manifest first, so a half-deleted checkpoint never looks committed.

What a store can and cannot do is said by ``FileBackend``'s capability attributes
(``needs_folders``, ``atomic_move``) and overridable steps (``create_folder``, ``move_file``,
``uri``), so that a store without implicit folders or atomic uploads (WebDAV, SFTP) keeps the
same contract.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import logging
import math
import os
import posixpath
import threading
import time
import uuid
from typing import Any, Callable, Hashable, Iterable, TypeVar

import attrs
import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.asyn import AsyncFileSystem

from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import check_run_name
from .errors import (BackendError, CheckpointError, IncompatibleCheckpointError, StorageFullError,
                     StorageUnavailableError)
from .hashing import HashingWriter, algorithm_of, hash_pool, hash_stream
from .hookspecs import hookimpl
from .manifest import MANIFEST_NAME, FileEntry, Manifest, NewerManifestError, counts_for
from .processes import writer_gone
from .redact import describe, redact
from .retry import RetriesExhausted, RetryPolicy, gave_up
from .uploads import Multipart, PartWriter, StreamWriter
from .writes import stoppable, write_files

STEP_PREFIX = "step-"
STEP_DIGITS = 10
FINAL_DIR = "final"
# The temporary and trash folders of the local commit protocol (``LocalBackend``).
# The folder a prune writes a file into to read the store's clock (``FileBackend._store_now``).
CLOCK_PREFIX = ".tmp-clock-"
LEFTOVER_PREFIXES = (".tmp-step-", ".tmp-final-", ".trash-step-", ".trash-final-", CLOCK_PREFIX)
DEFAULT_GRACE_S = 3600.0
# No manifest ckptkit writes comes near this; a larger one is refused before it is read whole.
MANIFEST_MAX = 16 * 2**20

log = logging.getLogger(__name__)
T = TypeVar("T")


def _final_folder(name: str) -> bool:
    """Whether a run's folder ``name`` is a final model's, or one a publish stages it in or
    sets it aside in."""
    return parse_final(name) is not None or name.startswith((".tmp-final-", ".trash-final-"))


# What a publish writes into a final model's folder: a folder of that name holding anything
# else (a trainer's own final-2024/) is not ckptkit's, and no prune deletes it.
_FINAL_WRITES = ("final_model.pt",)
# The mark a publish leaves in a final model's folder of an object store before writing into it
# (``FileBackend._claim``).
CLAIM_PREFIX = ".claim-"


def _final_leftover(folder: _Folder) -> bool:
    """Whether a final model's folder without a manifest holds only what a publish writes (the
    file, a manifest on its way in), and no folder: what a killed one left."""
    return not folder.nested and all(n in _FINAL_WRITES or n.startswith((f".{MANIFEST_NAME}.tmp-", CLAIM_PREFIX))
                                     for n in folder.files)


def _staged_version(dirname: str) -> int | None:
    """The version of a final model that a ``.tmp-final…-<id>`` folder stages (a publish in
    flight on local disk), or None."""
    if not dirname.startswith(".tmp-final"):
        return None
    return parse_final(dirname[len(".tmp-"):].rsplit("-", 1)[0])


_VERSION_TRIES = 8


class _VersionTaken(Exception):
    """The folder chosen for a final model holds one already: another publish of the run took
    it meanwhile. The next version is tried; a final model is never replaced."""


def final_dirname(version: int) -> str:
    """The folder of a run's ``version``-th final model: ``final``, then ``final-2``, ``final-3``...
    A final model is kept as it was published (a registry may point at its bytes), so a later
    one goes beside it."""
    return FINAL_DIR if version == 1 else f"{FINAL_DIR}-{version}"


def parse_final(dirname: str) -> int | None:
    """The version a ``final_dirname`` folder name holds, or None for any other name."""
    if dirname == FINAL_DIR:
        return 1
    digits = dirname[len(FINAL_DIR) + 1:] if dirname.startswith(FINAL_DIR + "-") else ""
    if not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits) if final_dirname(int(digits)) == dirname and int(digits) > 1 else None


def step_dirname(step: int) -> str:
    """The folder name of a resume checkpoint in the standard layout: ``step-`` and the step, zero-padded."""
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step(dirname: str) -> int | None:
    """The step a ``step_dirname`` folder name holds, or None for any other name."""
    if not dirname.startswith(STEP_PREFIX):
        return None
    digits = dirname[len(STEP_PREFIX):]
    if not (digits.isascii() and digits.isdigit()):
        return None
    # Only the names step_dirname gives: a trainer's own step-1000 folder is not ckptkit's to prune.
    return int(digits) if step_dirname(int(digits)) == dirname else None


def written_by_ckptkit(dirname: str) -> bool:
    """Whether a run's folder ``dirname`` is one ckptkit writes: a step, the final model, or a
    temporary or set-aside copy of either."""
    return parse_step(dirname) is not None or parse_final(dirname) is not None or dirname.startswith(LEFTOVER_PREFIXES)


def set_aside_for(dirname: str) -> str | None:
    """The folder (``step-N`` or ``final``, ``final-N``) whose committed copy ``.trash-<folder>-<id>`` holds,
    set aside by a local commit that replaces it; None for any other name."""
    if not dirname.startswith(".trash-"):
        return None
    target = dirname[len(".trash-"):].rsplit("-", 1)[0]
    return target if parse_step(target) is not None or parse_final(target) is not None else None


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
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


def no_space(exc: BaseException) -> OSError | None:
    """The "no space left" (or quota) error behind ``exc``, if that is what it comes from.

    torch.save reports a failed write as its own RuntimeError ("unexpected pos ..."), with the
    OSError that says why only in the exception's context, so the whole chain is searched; DCP's
    CheckpointException holds each rank's failure outside it, in ``failures``.
    """
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        if isinstance(current, RetriesExhausted):
            pending.append(getattr(current, "last", None))
        else:
            pending += [current.__context__, current.__cause__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            # Each rank's failure is an (exception, traceback frames) pair, or an object holding one.
            pending += [f[0] if isinstance(f, tuple) else getattr(f, "exception", f) for f in failures.values()]
    return None


def storage_full(backend: str, where: str, what: str, cause: OSError | str, final: bool = False) -> StorageFullError:
    """The error for a write that ran out of space (``cause``: the error, or what it said),
    saying what to do about it: ``final``, a final model's, which no keep_last makes room for."""
    why = cause if isinstance(cause, str) else os.strerror(cause.errno)
    return StorageFullError(backend, f"no space left on {where} while writing {what} ({why}); nothing of it was "
                                     f"kept. Free space, {'' if final else 'lower keep_last, '}or use a larger disk")


@attrs.define
class _Folder:
    """What one listing of a run saw of a folder directly under it."""

    files: dict[str, dict[str, Any]] = attrs.Factory(dict)  # the files directly inside: name -> info
    nested: bool = False  # whether anything lies deeper: a folder inside, or files in one
    # The newest modification time of the folder itself or of any file under it; None when the
    # store tells neither (object stores have no folders of their own).
    mtime: float | None = None
    # The newest of its files' alone: deleting a file sets the folder's time (``aged``).
    files_mtime: float | None = None

    def touched(self, info: dict[str, Any]) -> None:
        mtime = _mtime(info)
        if mtime is not None and (self.mtime is None or mtime > self.mtime):
            self.mtime = mtime


# What a listing tells of a file that changes whenever the file is written again.
_IDENTITY_KEYS = ("size", "mtime", "ino", "ETag", "LastModified", "last_modified", "etag", "generation", "updated")
_CHANGE_KEYS = ("mtime", "ETag", "LastModified", "last_modified", "etag", "generation", "updated")


def _identity(info: dict[str, Any] | None) -> tuple | None:
    """The listing's identity of a file, or None where the store shows no time, etag or generation."""
    if not info or not any(info.get(k) is not None for k in _CHANGE_KEYS):
        return None
    return tuple(info.get(k) for k in _IDENTITY_KEYS)


def _digests(manifest: Manifest) -> dict[str, str]:
    return {name: entry.digest for name, entry in manifest.files.items()}


def _check_file_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"file name {name!r} in a manifest points outside its checkpoint")
    return name


def _copies_files(fs: Any) -> bool:
    """Whether the store behind ``fs`` copies a file itself (``cp_file``): fsspec's base classes
    only raise ``NotImplementedError`` there. A wrapper of a filesystem (the testing kit's) says
    so for what it wraps with ``copies_files``."""
    told = getattr(fs, "copies_files", None)
    if isinstance(told, bool):
        return told
    cls = type(fs)
    return (getattr(cls, "cp_file", None) not in (None, fsspec.AbstractFileSystem.cp_file)
            or getattr(cls, "_cp_file", None) not in (None, AsyncFileSystem._cp_file))


def _left_by_the_gone(dirname: str) -> bool:
    """Whether ``dirname`` is a temporary folder named with the process that made it (``.tmp-…-
    <id>.<pid>.<machine>``, the local backend's) and that process, of this machine, is gone."""
    if not dirname.startswith(LEFTOVER_PREFIXES):
        return False
    _, _, mark = dirname.rpartition("-")[2].partition(".")
    return writer_gone(mark)


# What a probe's failure says to do, by the OSError's errno, beyond checking the address.
_PROBE_HINTS = {
    errno.ENOSPC: " (the filesystem is full: free space there)",
    errno.EDQUOT: " (a disk quota is reached: free space or raise the quota)",
    errno.EROFS: " (the filesystem is mounted read-only: point the backend at one this process may write)",
    errno.EACCES: " (this process may not write there: check the folder's permissions)",
}


class FileBackend:
    """Resume checkpoints and the final model as folders of files on an fsspec filesystem.

    Subclasses provide ``from_config`` (building ``fs`` and ``root`` from the options) and may
    override the write path; the listing, reading and pruning here hold for all of them.
    Object stores return a ``Multipart`` from ``multipart`` to upload large files in parallel
    parts; other filesystems get a streaming writer on a thread. Every request goes through
    ``retry`` and every message through ``redact``.

    What the store can do, set by a subclass for its filesystem:

    - ``needs_folders``: a file can only be written into a folder that exists (WebDAV answers
      409 Conflict, SFTP and plain disks fail). ``create_folder`` then makes each checkpoint's
      folder, and the probe makes the root, before anything is written into them. Object
      stores keep the default, False: they have no folders, and making one could create a bucket.
    - ``atomic_move``: ``move_file`` replaces its target in one step, while an upload that is
      cut off may leave a partial file under its name (WebDAV, SFTP). The manifest is then
      written under a temporary name and moved into place, so that an interrupted commit never
      leaves a truncated ``manifest.json``. Keep the default, False, where one write of a small
      object is all or nothing (S3, GCS): the manifest is written straight to its name.
    - ``concurrent_writes``: the filesystem client may write several files from several threads
      at once (s3fs, gcsfs and local files may; a client holding one connection may not). A
      payload split for parallel writing (``Payload.concurrency``) is then written that many
      files at a time; with the default, False, one after the other.
    - ``uri(path)``: the full address of a path, shown in every message, ref and ``location``;
      override it where ``fs.unstrip_protocol`` leaves out the host (WebDAV, HTTP). It must
      never include credentials.

    A leftover folder whose store reports no modification time (an empty folder on a store
    that gives folders no time) is aged from when this instance's ``prune`` first saw it: it
    goes once it is still there ``leftover_grace_s`` after that first sighting. That sighting
    is never earlier than the folder was made, so another process's save in flight gets at
    least the grace period it would get by its own time. A one-shot ``ckptkit prune`` thus
    never removes such a folder; the pruning after each save of a training run does. A folder
    whose age is the store's own time is also checked against the store's clock (see
    ``_aged_out``), which may write a file into the run to read it.
    """

    # Whether the temporary folders it stages carry their writer's process and machine (the local
    # backend's do), so that a prune can tell one a killed process left at once.
    marks_writers = False
    # Whether every save writes into a temporary folder that is then renamed into place, never
    # into a step's own folder (the local backend's): there, a step folder's age is its files'.
    stages_writes = False

    needs_folders = False
    atomic_move = False
    concurrent_writes = False

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
        # Leftovers without a modification time: path -> when this instance first listed them.
        self._first_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        # Manifests that prune has read, by folder: (the listing's identity of the file, manifest).
        self._manifests: dict[str, tuple[tuple, Manifest]] = {}
        # Manifests this instance committed and no listing has shown yet, by folder: (their size
        # in bytes, manifest, the store's identity of the file as written, None where finding it
        # would take a request). The prune after a save takes its own commit from here instead
        # of reading it back (a request on object stores).
        self._committed_here: dict[str, tuple[int, Manifest, tuple | None]] = {}
        # Step folders a failed save of a committed step left under the old manifest with some
        # of the new files (the store stopped answering): sizes may match, but a prune must not
        # count them as intact. A later save of the step that commits clears it.
        self._damaged: set[str] = set()
        # Step folders whose committed copy a sharded save cleared to write its shards in place.
        self._cleared: set[str] = set()
        # What this instance's last prune of each run listed: its newest committed step, and the
        # steps whose manifest someone else replaced since this instance last saw it.
        self._pruned_saw: dict[str, tuple[int | None, frozenset[int]]] = {}
        # Folders whose cached manifest (``_manifests``) is one this instance committed, and
        # folders it tried to commit a manifest to since its last prune (a failed commit may
        # still have changed the manifest there).
        self._own_manifests: set[str] = set()
        self._attempted: set[str] = set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} at {self.location}>"

    # -- layout ---------------------------------------------------------------------------

    def place(self) -> Hashable:
        """What tells this backend's root from another's: two resume backends with equal places
        are refused (they would hold one copy of what is written to both). By default the
        filesystem's protocol, the arguments it was made with (another host or endpoint is
        another store) and the root, so any difference in how their filesystems were made tells
        them apart; a folder on this machine is told as the built-in local backend tells it
        (``file``, its real path), whichever backend reaches it. Override it where options
        spelled two ways name one store."""
        if isinstance(self.fs, LocalFileSystem):  # one folder by any path: a symlink, "..", a trailing slash
            return ("file", os.path.realpath(self.root))
        try:
            made = repr((getattr(self.fs, "storage_args", ()), sorted(self.fs.storage_options.items())))
        except TypeError:  # options that cannot be ordered: told apart by the instance
            made = str(id(self.fs))
        return (self.fs.protocol, made, self.root)

    def uri(self, path: str) -> str:
        """``path`` on ``fs`` as people see it, with the filesystem's protocol (``s3://...``).

        Override it where that leaves out the host (webdav4 gives ``webdav://path``); never
        include credentials."""
        return self.fs.unstrip_protocol(path)

    @property
    def location(self) -> str:
        """Where this backend keeps its runs, as ``ckptkit check`` shows it."""
        return self.uri(self.root)

    def run_path(self, run_name: str) -> str:
        """The folder of a run under ``root``; a run name that is not one plain path segment is refused."""
        return posixpath.join(self.root, check_run_name(run_name))

    def _ref(self, run_name: str, step: int, path: str, role: str = "resume",
             sizes: dict[str, int] | None = None, mtime: float | None = None) -> CheckpointRef:
        return CheckpointRef(backend=self.name, run_name=run_name, step=step, path=path,
                             uri=self.uri(path), role=role, sizes=sizes, mtime=mtime,
                             local_dir=self.local_dir(path))

    def local_dir(self, path: str) -> str | None:
        """The folder on this machine's disk that ``path`` on ``fs`` is, where readers may open
        its files directly (restore then hashes and loads them in place, without a download);
        None for a store that is not this machine's disk. Override it for a filesystem whose
        paths are files of this machine under another name."""
        return None

    # -- requests -------------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """``text`` with this backend's ``secrets`` and any credentials in URLs scrubbed."""
        return redact(text, self.secrets)

    def describe(self, exc: BaseException) -> str:
        """A one-line ``Type: message`` of ``exc`` for an error or log line, secrets scrubbed."""
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
        # Beside every final model the run holds, never over one: past ckptkit's own versions
        # (committed, being written, left by a killed publish), and past any other folder of
        # such a name too, which is not written into. The same bytes as the newest one (a
        # finished job started again) are not kept twice.
        listing = self._listing(run_name)
        self._sweep_killed_publishes(run_name, listing)
        taken = [v for d, f in listing.items()
                 if (v := parse_final(d)) and (MANIFEST_NAME in f.files or _final_leftover(f))]
        taken += [v for d in listing if (v := _staged_version(d))]
        newest = None
        ref = self._newest_final(run_name, listing)
        if ref is not None:
            try:
                manifest = self.read_manifest(ref)
                # Another training's model of the same bytes (a deterministic run again) is not
                # this one's: handed back, it would leave this training's final model unpublished.
                if manifest.training_id == payload.training_id:
                    newest = (attrs.evolve(ref, step=manifest.step), manifest)
            except Exception:
                # Damaged, a newer ckptkit's, or not read (a store that did not answer, which
                # the write then meets on its own): this one goes beside it, as any new one.
                pass
        if (newest is not None and {pf.name: pf.expected for pf in payload.files} == newest[1].files
                and self._holds_whole(*newest)):
            return newest[0]
        version = max(taken, default=0) + 1
        for _ in range(_VERSION_TRIES):
            while final_dirname(version) in listing:
                version += 1
            try:
                return self._store(run_name, final_dirname(version), payload, same_as=newest, replace=False)
            except _VersionTaken:
                version += 1  # another publish of the run committed it meanwhile
        raise BackendError(self.name, f"could not store the final model of run {run_name!r}: {_VERSION_TRIES} "
                                      "final model folders in a row were taken by other publishes of the run "
                                      "meanwhile; publish again once they are done")

    def _sweep_killed_publishes(self, run_name: str, listing: dict[str, _Folder]) -> None:
        """Remove from ``listing``, and the store, the folders that publishes killed part way on
        this machine staged a final model in (named with their process, which is gone): each
        held a whole model, and a backend that serves the final role alone is visited by no
        prune, so they piled up at every publish killed, each taking a version number. A failure
        here is logged: the publish goes on."""
        gone = [d for d in listing if d.startswith(".tmp-final") and _left_by_the_gone(d)]
        if not gone:
            return
        run = self.run_path(run_name)
        try:
            self._remove(run_name, [self._ref(run_name, -1, posixpath.join(run, d), role="leftover") for d in gone],
                         [], dry_run=False)
        except Exception as exc:  # noqa: BLE001
            log.warning("backend %r: could not remove what killed publishes left in run %r: %s", self.name,
                        run_name, self.describe(exc))
            return
        for d in gone:
            del listing[d]

    def _claim(self, target: str) -> str:
        """Mark ``target``, a final model's folder, as this publish's before anything is written
        into it; raise ``_VersionTaken`` where another publish marked or committed it first.

        An object store lists a file once it is written, but not one still uploading (minutes for
        a large model): two publishes that listed the run together both chose this version, and
        the later one's files went over the model the earlier one had committed and reported
        published. Each writes a mark of its own and then looks: one that finds another's mark, or
        a manifest, goes on to the next version. Of two marks the later one's writer sees the
        earlier, so two never both go on (both may step aside, and take the next versions). A
        store that lists a write late would need more than this."""
        self._make_folder(target)
        claim = posixpath.join(target, f"{CLAIM_PREFIX}{uuid.uuid4().hex[:12]}")
        self._call(f"writing {self.uri(claim)}", self.fs.pipe_file, claim, b"")
        self.fs.invalidate_cache(target)
        try:
            found = {posixpath.basename(p) for p in self._call(f"listing {self.uri(target)}", self.fs.find, target)}
        except BaseException:
            self._unclaim(claim)
            raise
        if MANIFEST_NAME in found or any(n.startswith(CLAIM_PREFIX) for n in found - {posixpath.basename(claim)}):
            self._unclaim(claim)
            raise _VersionTaken(posixpath.basename(target))
        return claim

    def _unclaim(self, claim: str) -> None:
        """Remove the mark ``_claim`` left (a publish committed, or gone to the next version); one
        that stays costs nothing but a file, which readers, going by the manifest, pass over."""
        try:
            self._call(f"deleting {self.uri(claim)}", self.fs.rm_file, claim)
        except Exception as exc:  # noqa: BLE001
            log.debug("backend %r: could not remove %s: %s", self.name, self.uri(claim), self.describe(exc))

    def _holds_whole(self, ref: CheckpointRef, manifest: Manifest) -> bool:
        """Whether every file at ``ref`` still matches ``manifest`` (read back and hashed): a final
        model whose bytes changed since (a disk's damage, a hand's) is not the same as a new one
        of equal digest, which is then stored beside it as the next version."""
        for name, entry in manifest.files.items():
            try:
                with self.open_file(ref=ref, name=name) as f:
                    found = hash_stream(f, algorithm_of(entry.digest))
            except Exception:  # noqa: BLE001 - unreadable is not whole; the write that follows says why
                return False
            if found != (entry.size, entry.digest):
                return False
        return True

    @hookimpl
    def final_step(self, run_name: str, algorithm: str | None, training_id: str | None) -> int | None:
        """The highest step among the run's committed final models (a ``ckptkit publish --step``
        of an older step is the newest folder, not the furthest model) of training
        ``training_id``, or naming none; unreadable ones are passed over."""
        listing = self._listing(run_name)
        steps = []
        for dirname, folder in listing.items():
            if parse_final(dirname) is None or MANIFEST_NAME not in folder.files:
                continue
            ref = self._ref(run_name, -1, posixpath.join(self.run_path(run_name), dirname), role="final")
            try:
                manifest = self.read_manifest(ref)
            except CheckpointError:
                continue
            if counts_for(manifest.training_id, training_id):
                steps.append(manifest.step)
        return max(steps, default=None)

    def _newest_final(self, run_name: str, listing: dict[str, _Folder]) -> CheckpointRef | None:
        """The folder of the run's newest committed final model in ``listing`` (its step not read)."""
        committed = {parse_final(d): f.files for d, f in listing.items() if MANIFEST_NAME in f.files}
        committed.pop(None, None)
        if not committed:
            return None
        version = max(committed)
        return self._ref(run_name, -1, posixpath.join(self.run_path(run_name), final_dirname(version)), role="final",
                         sizes={n: int(i.get("size") or 0) for n, i in committed[version].items() if n != MANIFEST_NAME})

    def _store(self, run_name: str, dirname: str, payload: Payload,
               same_as: tuple[CheckpointRef, Manifest] | None = None, replace: bool = True) -> CheckpointRef:
        """Write ``payload``'s files into ``dirname`` of the run, then its manifest. ``same_as``: a
        committed checkpoint whose ref is returned instead, and this copy discarded uncommitted,
        when the files written turn out to be its own. ``replace=False`` (a final model): a
        committed copy found there raises ``_VersionTaken``, before anything is written."""
        target = posixpath.join(self.run_path(run_name), dirname)
        manifest_path = posixpath.join(target, MANIFEST_NAME)
        current = manifest_path
        run = self.run_path(run_name)
        with self._lock:
            self._in_flight.add(target)
        staging = None  # where the files of a step saved again go first
        claim = None
        # Whether what lies at target may be removed when this fails: not before the store said
        # that nothing committed lies there (a check that failed, a store that stopped answering,
        # must not let the clean-up delete the committed copy).
        uncommitted = False
        replaced_in_place = False  # a store that cannot copy: the committed copy is un-committed first
        manifest_sent = False
        doing = "checking"
        try:
            # Asked at every save, though this process may think the step new: another training
            # of the run (a requeued job's predecessor, still saving) may have committed it since
            # this one last listed, and it is then saved beside, not written over.
            stored = self._call(f"checking {self.uri(manifest_path)}", self.file_exists, manifest_path)
            if stored and not replace:
                raise _VersionTaken(dirname)
            if not replace:
                doing, current = "marking", target
                claim = self._claim(target)
                current = manifest_path
            doing = "writing"
            uncommitted = not stored
            if stored and _copies_files(self.fs):
                # Saving a committed step again: its files are written beside it, and the old copy
                # is un-committed only once all of them are stored, so a failed upload keeps it.
                staging = posixpath.join(run, f".tmp-{dirname}-{uuid.uuid4().hex[:12]}")
                uncommitted = False
                with self._lock:
                    self._in_flight.add(staging)
            elif stored:
                # A store that cannot copy a file itself: the old copy is un-committed and its
                # files are overwritten, so a failure half-way loses it.
                self._call(f"deleting {self.uri(manifest_path)}", self.fs.rm_file, manifest_path)
                uncommitted = replaced_in_place = True
            current = folder = staging or target
            self._make_folder(folder)
            failed: list[str] = []

            def put(pf: PayloadFile, stop: threading.Event | None) -> FileEntry:
                path = posixpath.join(folder, _check_file_name(pf.name))
                try:
                    return self._put(pf, path, stop)
                except BaseException:
                    failed.append(path)
                    raise

            try:
                entries = write_files(payload.files, put, self.write_concurrency(payload))
            except BaseException:
                current = failed[0] if failed else current
                raise
            if staging is not None:
                # The old copy's manifest stays until the new one replaces it in one write: a
                # reader in between finds files that do not match it (a damaged step, skipped
                # with a warning), and a store that stops answering half-way leaves the step
                # damaged, never gone without a word (a restore would start from step 0).
                uncommitted = True
                try:
                    # The store copies the new files in itself: no byte goes through this machine again.
                    for name in entries:
                        src, current = posixpath.join(staging, name), posixpath.join(target, name)
                        self._call(f"copying {self.uri(src)} to {self.uri(current)}", self.fs.cp_file, src, current)
                except Exception as exc:
                    if gave_up(exc):  # a store that stopped answering: writing again would wait as long
                        raise
                    # A store whose copy refuses (WebDAV's will not replace a file): the files are
                    # written into place as they were beside it, rather than the step lost.
                    log.warning("backend %r: the store could not copy %s (%s); writing the files again",
                                self.name, self.uri(current), self.describe(exc))
                    folder = target
                    try:
                        entries = write_files(payload.files, put, self.write_concurrency(payload))
                    except BaseException:
                        current = failed[0] if failed else current
                        raise
            if (same_as is not None and staging is None and uncommitted and entries == same_as[1].files
                    and self._holds_whole(*same_as)):
                meanwhile = self._committed_meanwhile(manifest_path)
                if meanwhile is False:
                    self._discard(target)
                    return same_as[0]
                if meanwhile:
                    raise _VersionTaken(dirname)  # taken by another publish meanwhile: left as it is
                raise OSError(f"whether {self.uri(manifest_path)} was committed meanwhile could not be asked")
            manifest = payload.manifest(entries)
            current = manifest_path
            data = manifest.to_json()
            manifest_sent = True
            self._commit_manifest(manifest_path, data)
            self._remember(target, data, manifest)
            self._damaged.discard(target)
            if staging is not None:
                self._tidy_replaced(target, staging, entries)
            if claim is not None:
                self._unclaim(claim)
        except _VersionTaken:
            if claim is not None:
                self._unclaim(claim)
            raise
        except Exception as exc:
            silent = gave_up(exc)
            maybe_taken = manifest_sent and silent
            theirs: bool | None = False
            if silent:
                # The store stopped answering: a clean-up would wait through all of its retries
                # again, and could delete the files of a manifest the store took without
                # answering, or the manifest of a step being replaced (then gone without a word,
                # where left it reads as damaged). What has no manifest is removed by a later
                # prune once older than the grace period.
                log.warning("backend %r: the store stopped answering; nothing the failed save of %s wrote "
                            "is removed now", self.name, self.uri(target))
            else:
                if staging is not None:
                    self._discard(staging)
                if uncommitted and staging is None and not replaced_in_place:
                    theirs = self._committed_meanwhile(manifest_path)
                if uncommitted and theirs is False:
                    self._discard(target)
            kept = False  # whether what the store held is as it was
            if maybe_taken:
                outcome = ("the store did not answer the manifest's write, so it may have taken it: then the "
                           "checkpoint is committed whole, which a restore checks")
                if staging is not None:
                    self._damaged.add(target)
                    outcome += "; else the copy of this step committed before may read as damaged"
            elif theirs:
                outcome = ("nothing of it was committed, and a copy of this step that another training of the run "
                           "committed meanwhile is left as it is (damaged, where this save's files went over its own)")
            elif theirs is None:
                outcome = ("nothing of it was committed; whether another training of the run committed this step "
                           "meanwhile could not be asked, so what lies there is left as it is")
            elif staging is None and not replaced_in_place:
                outcome, kept = "nothing of it was committed", True
            elif uncommitted and silent:
                self._damaged.add(target)
                outcome = ("nothing of it was committed, and the store stopped answering while the copy of this "
                           "step committed before was being replaced: it may be damaged, which a restore checks")
            elif uncommitted:
                outcome = ("nothing of it was committed, and the copy of this step committed before was "
                           "un-committed to be replaced and is gone")
            else:
                outcome, kept = "nothing of it was committed; the copy of this step committed before is kept", True
            full = no_space(exc)
            if full is not None:
                failure = storage_full(self.name, self.uri(self.root), self.uri(current), full,
                                       final=parse_final(dirname) is not None)
                failure.held_as_it_was = kept
                raise failure from full
            failure = self._fail(f"could not store {self.uri(target)} ({doing} {self.uri(current)} failed; {outcome})",
                                 exc)
            failure.held_as_it_was = kept
            raise failure from None
        finally:
            with self._lock:
                self._in_flight.discard(target)
                self._in_flight.discard(staging)
        self.fs.invalidate_cache(posixpath.dirname(target))
        return self._ref(run_name, payload.step, target, role=payload.role,
                         sizes={k: e.size for k, e in entries.items()})

    def _tidy_replaced(self, target: str, staging: str, entries: dict[str, FileEntry]) -> None:
        """After a step saved again is committed: remove the files beside it and the files of
        its old copy that the new one does not have (a split state's other parts). Readers go by
        the manifest, so what a failure here leaves costs space only: it is logged."""
        self._discard(staging)
        try:
            self.fs.invalidate_cache(target)
            for path in self._call(f"listing {self.uri(target)}", self.fs.find, target):
                if posixpath.basename(path) not in entries and posixpath.basename(path) != MANIFEST_NAME:
                    self._call(f"deleting {self.uri(path)}", self.fs.rm_file, path)
        except Exception as exc:
            log.warning("backend %r: could not remove the old files of %s: %s", self.name, self.uri(target),
                        self.describe(exc))

    def store_exists(self) -> bool:
        """Whether the store holding ``root`` exists (for an object store, its bucket); asked
        only when listing a run raised ``FileNotFoundError``, which then means an empty run if
        True. Override it where a missing bucket lists as missing (``s3``, ``gcs``)."""
        return True

    def create_folder(self, path: str) -> None:
        """Make the folder ``path`` and any missing parents; called only when ``needs_folders``."""
        self.fs.makedirs(path, exist_ok=True)

    def move_file(self, src: str, dst: str) -> None:
        """Move the file ``src`` onto ``dst``, replacing it, in one atomic step; called only when
        ``atomic_move``. Override it where ``fs.mv`` is a copy and a delete (webdav4's is)."""
        self.fs.mv(src, dst)

    def _make_folder(self, path: str) -> None:
        if self.needs_folders:
            self._call(f"creating {self.uri(path)}", self.create_folder, path)

    def _commit_manifest(self, path: str, data: bytes) -> None:
        """Publish the manifest at ``path``: the step that commits a checkpoint."""
        with self._lock:
            self._attempted.add(posixpath.dirname(path))
            self._committed_here.pop(posixpath.dirname(path), None)  # what an earlier commit wrote may be gone
        if not self.atomic_move:
            self._call(f"writing {self.uri(path)}", self.fs.pipe_file, path, data)
            return
        # A cut-off upload can leave part of a file under its name: the temporary one holds
        # it, and is no manifest, so the checkpoint stays uncommitted until the move.
        tmp = posixpath.join(posixpath.dirname(path), f".{MANIFEST_NAME}.tmp-{uuid.uuid4().hex[:12]}")
        self._call(f"writing {self.uri(tmp)}", self.fs.pipe_file, tmp, data)
        try:
            self._call(f"moving {self.uri(tmp)} to {self.uri(path)}", self.move_file, tmp, path)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except Exception as exc:  # the folder is a leftover; prune removes it after the grace period
                log.debug("could not remove %s: %s", self.uri(tmp), self.describe(exc))
            raise

    def multipart(self, path: str) -> Multipart | None:
        """The parallel-part upload of the object at ``path``, or None to stream it through ``fs.open``.

        Override it for a store with a native multipart upload (``ckptkit-s3`` does): return a
        new ``Multipart`` for each call. Its parts are ``part_size`` bytes (doubling as the object
        grows), at most ``upload_concurrency`` in flight, each request retried by ``retry``.
        """
        return None

    def _writer(self, path: str) -> PartWriter | StreamWriter:
        target = self.multipart(path)
        if target is not None:
            return PartWriter(target, self.uri(path), self.part_size, self.upload_concurrency,
                              self._call)
        return StreamWriter(lambda: self.fs.open(path, "wb", block_size=self.part_size))

    def write_concurrency(self, payload: Payload) -> int:
        """How many files of ``payload`` to write at once: its ``concurrency`` where this store's
        client may be used from several threads (``concurrent_writes``), else one."""
        return max(1, payload.concurrency) if self.concurrent_writes else 1

    def _put(self, pf: PayloadFile, path: str, stop: threading.Event | None = None) -> FileEntry:
        """Stream one payload file to ``path``; an aborted write publishes nothing.

        A transient failure that the per-request retries did not absorb restarts the file
        from its beginning (serialising again, or rereading the source), within the policy.
        ``stop`` (set when another file of the checkpoint failed) ends the write early.
        """
        entry = self._call(f"uploading {self.uri(path)}", self._put_once, pf, path, stop)
        if pf.source is not None and pf.expected is not None and pf.expected != entry:
            raise CheckpointError(f"{pf.source} changed while it was copied to {self.uri(path)}")
        return entry

    def _put_once(self, pf: PayloadFile, path: str, stop: threading.Event | None = None) -> FileEntry:
        out = self._writer(path)
        try:
            writer = HashingWriter(stoppable(out, stop), hash_pool(), pf.algorithm)
            pf.write_to(writer)
            size, digest = writer.size, writer.digest()
            out.commit()
        except BaseException as exc:
            failed = getattr(out, "error", None)
            # A store that stopped answering gets one try to drop the upload, not all of them.
            out.abort(patient=not gave_up(failed or exc))
            if isinstance(exc, Exception) and failed is not None and failed is not exc:
                # torch's serialiser reports an exception from a write as "unexpected pos"
                raise failed  # noqa: B904 (the upload's failure keeps its own cause)
            raise
        return FileEntry(size=size, digest=digest)

    def _discard(self, path: str) -> None:
        """Remove what a failed save wrote: the manifest first, so nothing looks committed."""
        try:
            manifest = posixpath.join(path, MANIFEST_NAME)
            if self._call(f"checking {self.uri(manifest)}", self.fs.exists, manifest):
                self._call(f"deleting {self.uri(manifest)}", self.fs.rm_file, manifest)
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                self._remove_tree(path)
        except Exception as exc:
            # What is left has no manifest; prune removes it after the grace period.
            log.warning("backend %r: could not clean up %s: %s", self.name, self.uri(path),
                        self.describe(exc))

    def file_exists(self, path: str) -> bool:
        """Whether the file ``path`` is stored, asked before every save of a step. ``fs.exists``
        answers for a folder too, which on an object store costs a listing after a missing key's
        HEAD: a backend whose store tells a file in one request overrides this (``s3``)."""
        return self.fs.exists(path)

    def _committed_meanwhile(self, manifest_path: str) -> bool | None:
        """Whether a manifest lies at ``manifest_path``, where a failed save found none and wrote
        none: another training of the run committed the step while this one wrote. Its folder is
        then left as it is (read as damaged, where this save's files went over its own), not
        deleted. None for a store that could not be asked, which is left alone as well."""
        try:
            self.fs.invalidate_cache(posixpath.dirname(manifest_path))
            return bool(self._call(f"checking {self.uri(manifest_path)}", self.file_exists, manifest_path))
        except Exception:
            return None

    @hookimpl
    def stage_sharded(self, run_name: str, step: int) -> str:
        run = self.run_path(run_name)
        target = posixpath.join(run, step_dirname(step))
        manifest_path = posixpath.join(target, MANIFEST_NAME)
        try:
            committed = self._call(f"checking {self.uri(manifest_path)}", self.file_exists, manifest_path)
        except Exception as exc:
            raise self._fail(f"could not check {self.uri(manifest_path)}", exc) from None
        if committed and _copies_files(self.fs):
            # Saving a committed step again: the shards go beside it, and commit_sharded copies
            # them into place, so a save that fails before then keeps the committed copy.
            folder = posixpath.join(run, f".tmp-{step_dirname(step)}-{uuid.uuid4().hex[:12]}")
        else:
            # A store that cannot copy a file itself, or what a failed save left: cleared, as
            # the shards may be named differently this time (not what another training of the
            # run committed since the check).
            folder = target
            if committed or self._committed_meanwhile(manifest_path) is False:
                self._discard(target)
            if committed:
                with self._lock:
                    self._cleared.add(target)  # a failed commit says the copy committed before is gone
        with self._lock:
            self._in_flight.add(folder)
        try:
            self._make_folder(folder)
        except Exception as exc:
            with self._lock:
                self._in_flight.discard(folder)
            raise self._fail(f"could not create {self.uri(folder)}", exc) from None
        return folder

    @hookimpl
    def commit_sharded(self, run_name: str, step: int, path: str, payload: Payload,
                       files: dict[str, FileEntry]) -> CheckpointRef:
        target = posixpath.join(self.run_path(run_name), step_dirname(step))
        manifest_path = posixpath.join(target, MANIFEST_NAME)
        current = target
        try:
            if path != target:
                # Staged beside a committed copy (stage_sharded): the store copies the shards
                # into place. The old manifest stays until the new one replaces it in one write;
                # a reader in between finds files that do not match it, a damaged step skipped
                # with a warning, never a step gone without a word.
                try:
                    for name in files:
                        src, current = posixpath.join(path, name), posixpath.join(target, name)
                        self._call(f"copying {self.uri(src)} to {self.uri(current)}", self.fs.cp_file, src, current)
                except Exception as exc:
                    if gave_up(exc):  # a store that stopped answering: the same again would wait as long
                        raise
                    # A store whose copy will not replace a file (WebDAV's): the old copy is
                    # un-committed, its files removed, and the shards copied in again.
                    log.warning("backend %r: the store could not copy %s (%s); replacing the step's files",
                                self.name, self.uri(current), self.describe(exc))
                    self._discard(target)
                    self._make_folder(target)
                    for name in files:
                        src, current = posixpath.join(path, name), posixpath.join(target, name)
                        self._call(f"copying {self.uri(src)} to {self.uri(current)}", self.fs.cp_file, src, current)
            manifest = payload.manifest(files)
            data = manifest.to_json()
            current = manifest_path
            self._commit_manifest(manifest_path, data)
            self._remember(target, data, manifest)
            self._damaged.discard(target)
        except Exception as exc:
            if current != target and gave_up(exc):
                self._damaged.add(target)  # its files may be part old, part new: checked, not trusted
            failure = self._fail(f"could not commit {self.uri(target)} (at {self.uri(current)})", exc)
            # Files copied over a committed copy, a committed copy cleared for the shards to go in
            # its place, or a manifest the store may have taken unanswered.
            with self._lock:
                cleared = target in self._cleared
            failure.held_as_it_was = path == target and not cleared and not (
                current == manifest_path and gave_up(exc))
            raise failure from None
        finally:
            with self._lock:
                self._in_flight.discard(path)
                self._cleared.discard(target)
        if path != target:
            self._tidy_replaced(target, path, files)
        self.fs.invalidate_cache(posixpath.dirname(target))
        return self._ref(run_name, step, target, sizes={k: e.size for k, e in files.items()})

    @hookimpl
    def discard_sharded(self, path: str) -> None:
        self._discard(path)
        with self._lock:
            self._in_flight.discard(path)
            self._cleared.discard(path)

    # -- hooks: reading -------------------------------------------------------------------

    def _strip(self, path: str) -> str:
        """A path as ``_find`` gives it, without the filesystem's protocol."""
        return self.fs._strip_protocol(path)

    def _find(self, path: str) -> dict[str, dict[str, Any]]:
        # No maxdepth: some stores (s3fs) walk folder by folder when given one, while a plain
        # recursive find is one paginated listing of the prefix. Folders are asked for too: a
        # save killed right after creating its folder leaves one with no file in it.
        return self.fs.find(path, withdirs=True, detail=True)

    def _forget_listings(self, path: str) -> None:
        """Drop the filesystem's cached listings of ``path``, its parents and every folder under
        it. fsspec's ``invalidate_cache`` forgets a folder and its parents only, and s3fs answers
        for a file from a cached listing of its folder: a step folder listed while a save was
        writing it (files, no manifest yet) stayed without its manifest for the life of the
        process, and every step listed stayed cached."""
        self.fs.invalidate_cache(path)
        cache = getattr(self.fs, "dircache", None)
        if cache:
            prefix = self._strip(path).rstrip("/") + "/"
            for key in [k for k in list(cache) if k.startswith(prefix)]:
                try:  # s3fs's own invalidation, on its IO thread, may have taken it meanwhile
                    del cache[key]
                except KeyError:
                    pass

    def _listing(self, run_name: str) -> dict[str, _Folder]:
        """One listing of a run: folder name -> what is in it."""
        run = self.run_path(run_name)
        self._forget_listings(run)
        try:
            found = self._call(f"listing {self.uri(run)}", self._find, run)
        except FileNotFoundError as exc:
            # A run folder not made yet is an empty run; a store that is not there holds runs
            # nobody can see, and restore must not answer "nothing saved" for them.
            if not self._call(f"looking for the store of {self.uri(run)}", self.store_exists):
                raise StorageUnavailableError(
                    self.name, f"could not list {self.uri(run)}: its store (bucket) does not exist or cannot be "
                    f"seen with these credentials ({self.describe(exc)}); create it, or correct the path") from exc
            found = {}
        except Exception as exc:
            raise StorageUnavailableError(self.name, f"could not list {self.uri(run)}: {self.describe(exc)}") from exc
        folders: dict[str, _Folder] = {}
        prefix = self._strip(run).rstrip("/") + "/"
        for path, info in found.items():
            rel = self._strip(path).rstrip("/")
            if not rel.startswith(prefix):
                continue
            parts = rel[len(prefix):].split("/")
            is_dir = info.get("type") == "directory"
            if not parts[0] or len(parts) == 1 and not is_dir:
                continue
            folder = folders.setdefault(parts[0], _Folder())
            if len(parts) == 1 or not is_dir:
                # ckptkit's saves write files, never nested folders: a save in flight shows
                # in the folder's own time or its files', so a nested folder's is left out.
                folder.touched(info)
            if len(parts) > 1 and not is_dir:
                mtime = _mtime(info)
                if mtime is not None and (folder.files_mtime is None or mtime > folder.files_mtime):
                    folder.files_mtime = mtime
            if len(parts) == 2 and not is_dir:
                folder.files[parts[1]] = info
            elif len(parts) >= 2:
                folder.nested = True
        return folders

    def _committed(self, run_name: str, listing: dict[str, _Folder]) -> list[CheckpointRef]:
        run = self.run_path(run_name)
        refs = []
        for dirname, folder in listing.items():
            step = parse_step(dirname)
            if step is None or MANIFEST_NAME not in folder.files:
                continue
            sizes = {n: int(i.get("size") or 0) for n, i in folder.files.items() if n != MANIFEST_NAME}
            refs.append(self._ref(run_name, step, posixpath.join(run, dirname), sizes=sizes, mtime=folder.mtime))
        return refs

    @hookimpl
    def list_checkpoints(self, run_name: str) -> list[CheckpointRef]:
        return self._committed(run_name, self._listing(run_name))

    @hookimpl
    def final_ref(self, run_name: str) -> CheckpointRef | None:
        """The run's newest committed final model, if this backend holds one."""
        ref = self._newest_final(run_name, self._listing(run_name))
        return None if ref is None else attrs.evolve(ref, step=self.read_manifest(ref).step)

    @hookimpl
    def read_manifest(self, ref: CheckpointRef) -> Manifest:
        path = posixpath.join(ref.path, MANIFEST_NAME)
        try:
            data = self._call(f"reading {self.uri(path)}", self._manifest_bytes, path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.uri(path)} is missing: the checkpoint is not committed") from None
        except RetriesExhausted as exc:
            # The store did not answer: says nothing about the checkpoint itself.
            raise StorageUnavailableError(self.name, str(exc)) from exc
        try:
            return Manifest.from_json(data)
        except NewerManifestError as exc:
            raise IncompatibleCheckpointError(
                f"{self.uri(path)} was written by a newer ckptkit: {exc}. Upgrade ckptkit to restore it (to go "
                "on from an older step with this one, restore(step=N) it and save under a new run name); "
                "ckptkit deletes none of it") from None
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.uri(path)} is not a readable manifest: {exc}") from None

    def _manifest_bytes(self, path: str) -> bytes:
        """The bytes of the manifest at ``path``, of which at most ``MANIFEST_MAX`` (and one) are
        fetched: parsed, a 100 MB file planted there took ten times its size in memory."""
        try:
            data = self.fs.cat_file(path, start=0, end=MANIFEST_MAX + 1)
        except FileNotFoundError:
            raise
        except OSError:
            # A range of an empty object is "not satisfiable" to S3 and GCS.
            if self.fs.size(path) == 0:
                return b""
            raise
        if len(data) > MANIFEST_MAX:
            raise CheckpointError(f"{self.uri(path)} is larger than any manifest ckptkit writes ({MANIFEST_MAX} "
                                  "bytes); it was not read")
        return data

    @hookimpl
    def open_file(self, ref: CheckpointRef, name: str):
        path = posixpath.join(ref.path, _check_file_name(name))
        return self._call(f"opening {self.uri(path)}", self.fs.open, path, "rb")

    # -- hooks: pruning -------------------------------------------------------------------

    def _remember(self, folder: str, data: bytes, manifest: Manifest, written: dict[str, Any] | None = None
                  ) -> None:
        """Keep the resume manifest just committed at ``folder`` for the prune's first look at it.
        ``written``: the file's details as a listing shows them, where the store gave them at no
        request (local disk): a copy another training commits before that prune is then told
        from this one, as it is at any later prune."""
        if manifest.role != "resume":
            return
        with self._lock:
            self._committed_here[folder] = (len(data), manifest, _identity(written))

    def _consistent(self, ref: CheckpointRef, listed: dict[str, Any] | None = None) -> bool | None:
        """Do the sizes the listing saw agree with the manifest? (No bytes are read.) None for a
        checkpoint of a newer ckptkit, which is neither counted nor deleted.

        ``listed`` is the listing's entry for the manifest file: a manifest read before, whose
        entry still shows the same size, time and inode or etag, is not read again (the prune
        after every save would otherwise read each kept one each time, a request apiece on an
        object store). A manifest replaced or rewritten shows another entry and is read. One
        that this instance committed itself is not read back either, when the listing shows it
        at the size it was written.
        """
        if ref.path in self._damaged:
            return False
        key = _identity(listed)
        cached = self._manifests.get(ref.path)
        with self._lock:
            own = self._committed_here.pop(ref.path, None)
        # What this instance just committed comes first: a step saved again within the second a
        # store's times resolve (WebDAV) lists as the copy it replaced did, at the same size.
        if key is not None and own is not None and (key == own[2] if own[2] is not None
                                                    else listed.get("size") == own[0]):
            manifest = own[1]
            self._manifests[ref.path] = (key, manifest)
            self._own_manifests.add(ref.path)
        elif key is not None and cached is not None and cached[0] == key:
            manifest = cached[1]
        else:
            try:
                manifest = self.read_manifest(ref)
            except IncompatibleCheckpointError:
                return None
            except CheckpointError:
                return False
            if key is not None:
                self._manifests[ref.path] = (key, manifest)
                # The file as listed is not as written (a store that sets times at close, a
                # mount whose rename copies), yet it may still be this instance's own manifest.
                if own is not None and _digests(manifest) == _digests(own[1]):
                    self._own_manifests.add(ref.path)
                else:
                    self._own_manifests.discard(ref.path)
        if ref.sizes is None:
            return True
        return all(ref.sizes.get(n) == e.size for n, e in manifest.files.items())

    def _delete(self, path: str, names: Iterable[str] | None = None) -> None:
        """Delete the checkpoint folder ``path``, its manifest first. ``names``: the other files
        the listing showed in it, for a store that can delete them without listing again."""
        manifest = posixpath.join(path, MANIFEST_NAME)
        if self._call(f"checking {self.uri(manifest)}", self.fs.exists, manifest):
            self._call(f"deleting {self.uri(manifest)}", self.fs.rm_file, manifest)
        self._call(f"deleting {self.uri(path)}", self._remove_tree, path)

    def _remove_tree(self, path: str) -> None:
        """Delete the folder ``path`` and all in it."""
        if not any(c in path for c in "*?["):
            self.fs.rm(path, recursive=True)
            return
        # fsspec's rm takes such a path for a pattern, which can match other runs' folders: what
        # a listing finds under it goes by its exact name instead, deepest first.
        found = self.fs.find(path, withdirs=True, detail=True)
        for name, info in sorted(found.items(), key=lambda item: -item[0].count("/")):
            if info.get("type") == "directory":
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rmdir(name)
            else:
                self.fs.rm_file(name)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rmdir(path)

    def _leftovers(self, run_name: str, listing: dict[str, _Folder] | None = None
                   ) -> list[tuple[str, float | None]]:
        """Folders of a run, empty ones included, that hold no committed checkpoint:
        (path, newest mtime)."""
        run = self.run_path(run_name)
        out = []
        folders = self._listing(run_name) if listing is None else listing
        for dirname, folder in folders.items():
            # Only what ckptkit itself writes: a step or final folder without manifest, or a
            # temporary or trash folder of the local commit protocol. Anything else is not ours.
            final = parse_final(dirname) is not None
            checkpoint = parse_step(dirname) is not None or final
            if not written_by_ckptkit(dirname) or MANIFEST_NAME in folder.files and checkpoint:
                continue
            if final and MANIFEST_NAME not in folder.files and not _final_leftover(folder):
                continue  # a trainer's own final-2024/, say
            aside_for = set_aside_for(dirname)
            if aside_for is not None and MANIFEST_NAME in folder.files and aside_for not in folders:
                continue  # a committed copy a killed save left aside: put back, never deleted (local)
            out.append((posixpath.join(run, dirname), folder.mtime))
        return out

    @hookimpl
    def prune(self, run_name: str, keep_last: int, protected_steps: frozenset[int],
              dry_run: bool, counted_steps: frozenset[int] | None) -> list[CheckpointRef]:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        with self._lock:
            in_flight = set(self._in_flight)
        now = time.time()
        kept = 0
        doomed = []
        with self._lock:
            self._pruned_saw.pop(run_name, None)  # nothing seen, should the listing fail
        listing = self._listing(run_name)
        aged = self._aged(run_name, listing, now)
        old = self._aged_out(run_name, listing, aged, now, dry_run)
        committed = self._committed(run_name, listing)
        with self._lock:
            for known in (self._manifests, self._committed_here):
                for path in [p for p in known if posixpath.dirname(p) == self.run_path(run_name)]:
                    if posixpath.basename(path) not in listing:
                        del known[path]
                        self._own_manifests.discard(path)
            attempted = set(self._attempted)  # forgotten once this prune has looked at them all
        replaced = set()
        for ref in sorted(committed, key=lambda r: r.step, reverse=True):
            entry = listing[posixpath.basename(ref.path)].files.get(MANIFEST_NAME)
            with self._lock:
                own = self._committed_here.get(ref.path)
                ours = own is not None or ref.path in attempted
            if own is not None and own[2] is not None:
                # Committed here as a file the store described: any other one is not ours.
                before, ours = (own[2], own[1]), False
            else:
                before = self._manifests.get(ref.path) if ref.path in self._own_manifests else None
            consistent = self._consistent(ref, entry)
            if consistent is None:
                continue
            after = self._manifests.get(ref.path)
            if before is not None and not ours and after is not None and after[0] != before[0] and (
                    _digests(after[1]) != _digests(before[1])):
                # A manifest this instance committed, replaced since by an intact one for other
                # bytes that it did not write (a damaged one is no longer read as a manifest).
                replaced.add(ref.step)
            if kept < keep_last and consistent and (counted_steps is None or ref.step in counted_steps):
                kept += 1
            elif ref.step in protected_steps or ref.path in in_flight:
                continue
            elif kept >= keep_last:
                doomed.append(ref)
            elif not consistent and old(ref.path):
                # Committed but disagreeing with its manifest: not a checkpoint, a leftover.
                doomed.append(ref)
            # Otherwise: not (yet) known to be intact, and newer than what is kept: it stays.
        with self._lock:
            self._pruned_saw[run_name] = (max((r.step for r in committed), default=None), frozenset(replaced))
            self._attempted -= attempted
        for path, _ in self._leftovers(run_name, listing):
            if path in in_flight or not old(path):
                continue
            doomed.append(self._ref(run_name, -1, path, role="leftover"))
        return self._remove(run_name, doomed, self.stale_uploads(run_name, in_flight, now), dry_run)

    def sweep_final_leftovers(self, run_name: str, dry_run: bool) -> list[CheckpointRef]:
        """Remove what a killed or failed ``publish_final`` left in the run (its temporary folder,
        or a ``final/``, ``final-N/`` without a manifest, past the grace period); nothing else. For a backend
        that serves the final role alone, which no resume prune visits."""
        with self._lock:
            in_flight = set(self._in_flight)
        now = time.time()
        listing = self._listing(run_name)
        old = self._aged_out(run_name, listing, self._aged(run_name, listing, now), now, dry_run)
        doomed = [self._ref(run_name, -1, path, role="leftover") for path, _ in self._leftovers(run_name, listing)
                  if (_final_folder(posixpath.basename(path)) or posixpath.basename(path).startswith(CLOCK_PREFIX))
                  and path not in in_flight and old(path)]
        # A publish killed mid-upload, or one whose abort failed, leaves an unfinished upload
        # that no listing shows and that the store bills until it is aborted.
        run = self.run_path(run_name)
        stale = [(ref, abort) for ref, abort in self.stale_uploads(run_name, in_flight, now)
                 if _final_folder(posixpath.relpath(ref.path, run).split("/", 1)[0])]
        return self._remove(run_name, doomed, stale, dry_run)

    def _aged(self, run_name: str, listing: dict[str, _Folder], now: float) -> dict[str, float]:
        """The time each folder of a listing counts as written: its own, or for a folder whose
        store tells none, when this instance first saw it (``now`` if that is this listing)."""
        run = self.run_path(run_name)
        times = {}
        with self._lock:
            seen = self._first_seen
            for path in [p for p in seen if posixpath.dirname(p) == run]:
                if posixpath.basename(path) not in listing or listing[posixpath.basename(path)].mtime is not None:
                    del seen[path]  # gone, or it shows a time of its own now
            for dirname, folder in listing.items():
                path = posixpath.join(run, dirname)
                times[path] = folder.mtime if folder.mtime is not None else seen.setdefault(path, now)
                if self.stages_writes and folder.files_mtime is not None and parse_step(dirname) is not None:
                    # No save writes into a step's folder here: one without a manifest is what a
                    # prune killed part way left, whose deletions set the folder's time, and it
                    # looked young at every restart. Its files tell its age.
                    times[path] = folder.files_mtime
        return times

    def _aged_out(self, run_name: str, listing: dict[str, _Folder], aged: dict[str, float], now: float,
                  dry_run: bool) -> Callable[[str], bool]:
        """Whether a folder of ``listing`` is past the grace period by this machine's clock and,
        where its age is the store's own time, by the store's clock as well. A machine whose
        clock runs ahead of the store's by more than the grace period (a VM without NTP) would
        otherwise take another process's save in flight for a leftover and delete files the
        save then commits a manifest for.

        The newest time in the listing is a time the store's clock has passed, so a folder older
        than the grace period by that needs no more; only where it is not (a leftover that is the
        newest thing in the run) is the store's clock read, by writing a file (``_store_now``). A
        dry run writes nothing, and so reports such a folder as kept."""
        grace = self.leftover_grace_s
        newest = max((f.mtime for f in listing.values() if f.mtime is not None), default=-math.inf)
        store_now: list[float] = []

        def old(path: str) -> bool:
            if _left_by_the_gone(posixpath.basename(path)):
                return True
            if now - aged[path] <= grace:
                return False
            if grace == 0 or listing[posixpath.basename(path)].mtime is None:
                return True  # no grace to keep, or an age by this machine's own first sighting
            if newest - aged[path] > grace:
                return True
            if dry_run:
                return False
            if not store_now:
                store_now.append(self._store_now(run_name, now))
            return store_now[0] - aged[path] > grace

        return old

    def killed_writes(self, run_name: str) -> bool:
        """Whether the run holds a temporary folder that a process of this machine made and that
        process no longer runs (a save killed part way), which a prune removes at once. Names
        alone: on local disk a listing of them is a few microseconds, asked at every restore."""
        folder = self.local_dir(self.run_path(run_name))
        try:
            names = os.listdir(folder) if folder is not None else list(self._listing(run_name))
        except FileNotFoundError:
            return False
        return any(_left_by_the_gone(name) for name in names)

    def _store_now(self, run_name: str, now: float) -> float:
        """The store's clock, read as the time it gives a file written for the purpose, at most
        ``now``; minus infinity, so that nothing counts as old, when it cannot be told. The file
        lies in a ``.tmp-clock-`` folder of the run, a leftover that a later prune removes should
        this one be killed before it deletes it."""
        folder = posixpath.join(self.run_path(run_name), f"{CLOCK_PREFIX}{uuid.uuid4().hex[:12]}")
        probe = posixpath.join(folder, "clock")
        try:
            self._make_folder(folder)
            self._call(f"writing {self.uri(probe)}", self.fs.pipe_file, probe, b"")
            written = _mtime(self._call(f"reading the time of {self.uri(probe)}", self.fs.info, probe))
        except Exception as exc:
            log.warning("backend %r: could not read the store's clock (%s); leftovers are kept until it can be "
                        "read", self.name, self.describe(exc))
            written = -math.inf
        try:
            self._call(f"deleting {self.uri(folder)}", self._remove_tree, folder)
        except FileNotFoundError:
            pass
        except Exception as exc:  # a later prune removes it, as the leftover it then is
            log.warning("backend %r: could not delete %s (%s)", self.name, self.uri(folder), self.describe(exc))
        return now if written is None else min(now, written)

    def _remove(self, run_name: str, doomed: list[CheckpointRef],
                stale: list[tuple[CheckpointRef, Callable[[], None]]], dry_run: bool) -> list[CheckpointRef]:
        """Delete ``doomed`` and abort ``stale`` uploads (unless ``dry_run``); return all of them."""
        if not dry_run:
            doomed = [ref for ref in doomed if self._delete_or_fail(ref)]
            for ref in doomed:
                with self._lock:
                    # A folder of that name made later is a new one, aged from scratch.
                    self._first_seen.pop(ref.path, None)
            for ref, abort in stale:
                self._abort_or_fail(ref, abort)
            self.fs.invalidate_cache(self.run_path(run_name))
        return doomed + [ref for ref, _ in stale]

    def _abort_or_fail(self, ref: CheckpointRef, abort: Callable[[], None]) -> None:
        try:
            abort()
        except Exception as exc:
            raise self._fail(f"could not abort the unfinished upload {ref.uri}", exc) from None

    def _delete_or_fail(self, ref: CheckpointRef) -> bool:
        """Delete what ``ref`` names; False for a leftover step folder committed since the listing."""
        try:
            name = posixpath.basename(ref.path)
            if ref.role == "leftover" and (parse_step(name) is not None or parse_final(name) is not None):
                # A save still going on when the run was listed (another process's, or one whose
                # store's clock runs behind) may have committed it since: not a leftover then.
                manifest = posixpath.join(ref.path, MANIFEST_NAME)
                self.fs.invalidate_cache(ref.path)
                if self._call(f"checking {self.uri(manifest)}", self.fs.exists, manifest):
                    log.info("backend %r: %s was committed after the prune listed it; kept", self.name, ref.uri)
                    return False
            self._delete(ref.path, None if ref.sizes is None else list(ref.sizes))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail(f"could not delete {ref.uri}", exc) from None
        return True

    def pruned_listing(self, run_name: str) -> tuple[int | None, frozenset[int]]:
        """What the last ``prune`` of ``run_name`` listed: the newest committed step (None before
        any prune, or when it listed none), and the steps whose manifest was committed again,
        not by this instance, since this instance last listed them. The manager tells from them,
        at no further request, whether another training writes the same run."""
        with self._lock:
            return self._pruned_saw.get(run_name, (None, frozenset()))

    def stale_uploads(self, run_name: str, in_flight: set[str], now: float
                      ) -> list[tuple[CheckpointRef, Callable[[], None]]]:
        """Uploads of this run that a crashed save started and never finished, older than the
        grace period, each with the call that aborts it. Stores without such uploads have none.

        Override it for a store whose unfinished uploads are invisible in listings (S3 multipart
        uploads): ``prune`` (with ``now`` the current time) and ``delete_run`` (with ``now``
        infinite, so every one counts as old) abort what it returns. ``in_flight`` holds the
        checkpoint folders this process is writing, whose uploads must be left alone.
        """
        return []

    @hookimpl
    def delete_run(self, run_name: str, dry_run: bool) -> list[CheckpointRef]:
        with self._lock:
            in_flight = set(self._in_flight)
        listing = self._listing(run_name)
        doomed = sorted(self._committed(run_name, listing), key=lambda r: r.step, reverse=True)
        folder = self.local_dir(self.run_path(run_name))
        if folder is not None and os.path.islink(folder):
            # latest -> exp-42: what it deletes would be that run's checkpoints.
            raise BackendError(self.name, f"{self.uri(self.run_path(run_name))} is a link to "
                                          f"{os.path.realpath(folder)}: nothing was deleted. Delete the link "
                                          "itself, or the run it leads to by that run's own name")
        doomed += [self._ref(run_name, -1, path, role="leftover")
                   for path, _ in self._leftovers(run_name, listing) if path not in in_flight]
        return self._remove(run_name, doomed, self.stale_uploads(run_name, in_flight, float("inf")), dry_run)

    def _prepare_root(self) -> None:
        """Make the root writable where that takes a step; object stores have no folders to make,
        and a probe must never create a bucket."""
        self._make_folder(self.root)

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
            self._prepare_root()
            self.fs.pipe_file(path, data)

        for op, action in (("write", write), ("list", list_root),
                           ("read", read), ("delete", lambda: self.fs.rm_file(path))):
            if op != "write" and results["write"] != "ok":
                # Nothing was written to list, read or delete: asking would only repeat the
                # write's failure, retries and timeouts included.
                results[op] = "not tried (the write failed)"
                continue
            try:
                self._call(f"probe {op} at {self.uri(path)}", action)
                results[op] = "ok"
            except Exception as exc:
                results[op] = self.describe(exc) + _PROBE_HINTS.get(getattr(exc, "errno", None), "")
                if op == "write":
                    # A write that failed part way (a full disk) may have left the file: "leaves nothing".
                    with contextlib.suppress(Exception):
                        self.fs.rm_file(path)
        return results
