"""The built-in ``local`` backend: checkpoints on this machine's disk, committed by rename."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import posixpath
import re
import shutil
import stat
import sys
import threading
import time
import uuid
from typing import Any, BinaryIO, Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import check_number, check_options
from .errors import BackendError, CheckpointError, ConfigError
from .hashing import HashingWriter, hash_pool, usable_cpus
from .hookspecs import hookimpl
from .manifest import MANIFEST_NAME, FileEntry, Manifest
from .processes import writer_mark
from .retry import denied
from .storage import (
    DEFAULT_GRACE_S,
    MANIFEST_MAX,
    FileBackend,
    _check_file_name,
    _VersionTaken,
    no_space,
    parse_final,
    set_aside_for,
    step_dirname,
    storage_full,
    written_by_ckptkit,
)
from .writes import stoppable, write_files


def _refused(exc: BaseException) -> str:
    """What to do about a write the system refused this process, said after the error."""
    if denied(exc):
        return ". This process may not write there: check the folder's owner and mode"
    if any(getattr(e, "errno", None) == errno.EROFS for e in (exc, exc.__cause__, exc.__context__)):
        return ". The filesystem is mounted read-only: point the backend at a folder on one this process may write"
    return ""


log = logging.getLogger(__name__)


def _moved_into_place(folder: str, target: str) -> bool:
    """Rename ``folder`` to ``target``; False, moving nothing, where ``target`` is a folder that
    holds something (a committed copy)."""
    try:
        os.rename(folder, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        try:
            mode = os.lstat(target).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISDIR(mode):
            return False  # a folder there, refused with another errno (sshfs says EPERM)
        if not stat.S_ISLNK(mode):
            raise
        # A link planted where the folder goes is replaced, never followed: what it points at
        # may be another run's checkpoint.
        os.unlink(target)
        os.rename(folder, target)
    return True


def _finished_meanwhile(target: str) -> bool:
    """Whether a commit between its two renames puts a new copy at ``target`` within
    ``_SWAP_WAIT_S`` (milliseconds for one alive; one killed there never does)."""
    deadline = time.monotonic() + _SWAP_WAIT_S
    while not os.path.lexists(target):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _discard(folder: str) -> None:
    """Remove a checkpoint folder that is no longer committed, its manifest first; where a link
    has taken the folder's place, only the link."""
    if os.path.islink(folder):
        os.unlink(folder)
        return
    try:
        os.remove(os.path.join(folder, MANIFEST_NAME))
    except OSError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file. A checkpoint's files are ones ckptkit
    wrote: a link is never followed (it could lead out of the root), and a device or pipe never
    read (it could block or never end); opening does not wait on a pipe either."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link, which ckptkit never writes; it was not followed") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} is not a regular file, which ckptkit never writes; it was not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def manifest_bytes(path: str) -> bytes:
    """The bytes of the manifest file at ``path``: a regular file (``open_regular``), of which at
    most ``MANIFEST_MAX`` bytes and one are read."""
    with open_regular(path) as f:
        # Not read(MANIFEST_MAX + 1): that allocates 16 MiB for a file of a few hundred bytes
        # (17 of a 24 us read). A byte past the limit still tells a file too large.
        data = f.read(min(os.fstat(f.fileno()).st_size, MANIFEST_MAX) + 1)
    if len(data) > MANIFEST_MAX:
        raise CheckpointError(f"{path} is larger than any manifest ckptkit writes ({MANIFEST_MAX} bytes); "
                              "it was not read")
    return data


# Where a filesystem cannot swap two folders, saving a committed step again renames the old copy
# aside and the new one into place: a trash folder younger than this may be a commit between
# its two renames (its time is the file server's, maybe not this clock's). Such a commit is
# given this long to make its second rename before the old copy is put back: a process
# restarted at once after a kill there must not find the step gone.
_SWAP_GRACE_S = 60.0
_SWAP_WAIT_S = 2.0


def local_root(path: Any, key: str) -> str:
    """An absolute root from a plain path or a ``file://`` URI, relative ones from the cwd."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigError(f"{key}: must be a local path or a file:// URI, got {path!r}")
    text = os.fspath(path)
    if text.startswith("file://"):
        rest = text[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest or not (rest.startswith(("/", ".", "~"))):
            raise ConfigError(
                f"{key}: malformed file URI {text!r}; write file:///absolute/path, "
                "file://./relative/path or a plain path"
            )
        text = rest
    elif text.startswith("file:"):
        text = text[len("file:"):]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(
            f"{key}: {text!r} is a {scheme}:// URI, but type local takes a local path; "
            f"use type: {scheme} for it"
        )
    unexpanded = re.search(r"\$\{[^}]*\}", text) or next(
        (m for m in re.finditer(r"\$([A-Za-z_]\w*)", text) if m.group(1) in os.environ), None)
    if unexpanded:
        # Taken as it is, a folder named "${SCRATCH}" was made (under the working directory: a
        # container's, lost with it) and every check said the config was fine. A bare $name is
        # refused only where the environment has that variable: folders are named so ("$recycle").
        raise ConfigError(
            f"{key}: {text!r} holds {unexpanded.group(0)}, which ckptkit does not expand (only ~ is): the "
            "checkpoints would go to a folder of that very name. Expand it before the config reaches ckptkit "
            "(os.path.expandvars, or envsubst), or write the path out")
    return os.path.abspath(os.path.expanduser(text))


def _load_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux, or no such libc symbol
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux, or a libc older than glibc 2.28
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two folders in one atomic step where the kernel and filesystem can; False if not."""
    if _renameat2 is None:
        return False
    return _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _size_of(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


class _EarlyWriteback:
    """Passes writes to ``f`` and asks the kernel to start writing each full window to disk.

    Without it the whole file is still dirty when the closing fsync comes, and the save waits
    for all of it (0.3 s of a 1 GiB save on the development machine's disk); with it, fsync
    waits for the last window only. Only a hint: durability still comes from fsync, and errors
    are left for fsync to report.
    """

    WINDOW = 64 * 1024 * 1024

    def __init__(self, f: BinaryIO):
        self._f = f
        self._written = self._started = 0
        # torch.save turns a failed write into its own RuntimeError ("unexpected pos"); the
        # OSError that says why is kept here.
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            n = self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self._written += n
        if _sync_file_range is not None and self._written - self._started >= self.WINDOW:
            self._f.flush()
            _sync_file_range(self._f.fileno(), self._started, self._written - self._started,
                             _SYNC_FILE_RANGE_WRITE)
            self._started = self._written
        return n

    def flush(self) -> None:
        self._f.flush()

    def start_writeback(self) -> None:
        """Ask the kernel to start writing what is left, so that the commit's fsync finds less to wait for."""
        if _sync_file_range is not None and self._written > self._started:
            _sync_file_range(self._f.fileno(), self._started, self._written - self._started,
                             _SYNC_FILE_RANGE_WRITE)
            self._started = self._written


def _load_statfs():
    try:
        fn = ctypes.CDLL(None, use_errno=True).statfs
    except (OSError, AttributeError, TypeError):  # not Linux
        return None
    fn.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


_statfs = _load_statfs()
# statfs's f_type of the filesystems kept in memory only: tmpfs, ramfs.
_MEMORY_FS = (0x01021994, 0x858458F6)
# ... and of the local disk filesystems: ext2/3/4, xfs, btrfs, f2fs, zfs, and overlayfs (containers).
_DISK_FS = (0xEF53, 0x58465342, 0x9123683E, 0xF2F52010, 0x2FC12FC1, 0x794C7630)


def _fs_type(path: str) -> int | None:
    """statfs's f_type of the filesystem ``path`` lies on; None where that cannot be told."""
    if _statfs is None or not sys.platform.startswith("linux"):  # struct statfs differs elsewhere
        return None
    buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux
    if _statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value


def _in_memory(path: str) -> bool:
    """Whether ``path`` lies on a filesystem kept in memory, where fsync has nothing to wait for.

    A wrong answer costs speed only: the fsyncs are issued either way."""
    return _fs_type(path) in _MEMORY_FS


def mappable(path: str) -> bool:
    """Whether files under ``path`` may be read through a memory mapping: on a local disk or in
    memory. A read that fails under a mapping kills the process (SIGBUS) where a ``read`` raises
    an error that restore can handle; network and FUSE filesystems fail that way far more often
    than a local disk, whose failing read would also end training."""
    return _fs_type(path) in _MEMORY_FS + _DISK_FS


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_together(files: list[BinaryIO], folder: str, in_memory: bool = False) -> None:
    """fsync ``files`` (still open, so that no write error can be lost in between) and ``folder``
    at once, and return when all are durable, raising the first error.

    Nothing in the folder is visible before the rename that follows, so their order does not
    matter; issued together, the filesystem's journal commits them in one go, where one after
    the other each waited for a commit of its own (16 ms against 3 for three small files).
    ``in_memory`` (tmpfs): each fsync returns at once, so they run one after the other here,
    without the hand-offs to other threads.
    """
    if in_memory:
        for f in files:
            os.fsync(f.fileno())
        _fsync_dir(folder)
        return
    pool = hash_pool()
    pending = [pool.submit(os.fsync, f.fileno()) for f in files[1:]]
    pending.append(pool.submit(_fsync_dir, folder))
    error: BaseException | None = None
    try:
        if files:
            os.fsync(files[0].fileno())
    except BaseException as exc:
        error = exc
    for p in pending:  # every one is waited for before the files are closed
        try:
            p.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


class LocalBackend(FileBackend):
    """Checkpoints in ``<path>/<run_name>/``.

    A checkpoint is written into a hidden temporary folder beside its final place, every file
    and the folder are fsynced, and one rename publishes it, so a crash leaves either the whole
    checkpoint or a leftover that nothing reads.
    """

    marks_writers = True  # its temporary folders name their process (_stage)
    stages_writes = True  # a save writes into one of those, renamed into place (_commit)

    OPTIONS = ("path", "leftover_grace_s")
    keeps_files_locally = True
    concurrent_writes = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The files each save in flight has written into its temporary folder and not yet
        # fsynced, still open: the commit fsyncs them all at once.
        self._unsynced: dict[str, list[BinaryIO]] = {}
        self._in_memory: bool | None = None  # whether the root is on tmpfs; known at the first commit
        # Copies set aside that a listing already gave their commit time to finish: a reader that
        # cannot put one back (read-only) waits once, not at every listing.
        self._waited: set[str] = set()

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> LocalBackend:
        key = f"backends.{name}"
        check_options(key, options, cls.OPTIONS, required=("path",))
        grace = check_number(f"{key}.leftover_grace_s", options.get("leftover_grace_s", DEFAULT_GRACE_S), 0)
        root = local_root(options["path"], f"{key}.path")
        return cls(name, fsspec.filesystem("file"), root, leftover_grace_s=float(grace))

    def write_concurrency(self, payload: Payload) -> int:
        # Each file in flight keeps about two cores busy (torch serialising it, xxh3 hashing it)
        # and a local write is bound by the CPU and memory, not by waiting: more files at once
        # than half the usable cores only contend (on 2 cores, 8 at once took 2.7 times as long
        # as one file, 2 at once 1.3 times).
        return min(super().write_concurrency(payload), max(2, usable_cpus() // 2))

    def local_dir(self, path: str) -> str:
        return path

    def _refuse_linked_run(self, run_name: str) -> None:
        """Refuse a run whose folder is a link: what a save wrote and a prune deleted through it
        would lie outside the root (a link planted there, or ``latest`` pointing at another run)."""
        run = self.run_path(run_name)
        if os.path.islink(run):
            raise BackendError(self.name, f"{self.uri(run)} is a link to {os.path.realpath(run)}: ckptkit writes, "
                                          "lists and deletes no run through a link, which could reach outside "
                                          f"{self.root}; nothing was written or deleted. Remove the link, or set "
                                          f"backends.{self.name}.path to the folder the run should live in")

    def _stage(self, run_name: str, dirname: str) -> str:
        self._refuse_linked_run(run_name)
        # Named with this process and machine: once the process is gone (killed mid-save), a
        # prune on this machine removes the folder at once, not after the grace period, in which
        # it held up to a checkpoint's space on a disk that may have room for keep_last more only.
        tmp = posixpath.join(self.run_path(run_name), f".tmp-{dirname}-{uuid.uuid4().hex[:12]}.{writer_mark()}")
        with self._lock:
            self._in_flight.add(tmp)
        try:
            os.makedirs(tmp)
        except OSError as exc:
            with self._lock:
                self._in_flight.discard(tmp)
            full = no_space(exc)  # out of inodes, or over an inode quota, fails here first
            if full is not None:
                raise storage_full(self.name, self.root, f"{dirname} of run {run_name!r}", full,
                                   final=parse_final(dirname) is not None) from full
            raise BackendError(self.name, f"could not make a folder for {dirname} of run {run_name!r} under "
                                          f"{self.root}: {self.describe(exc)}{_refused(exc)}") from exc
        return tmp

    def _commit(self, tmp: str, dirname: str, manifest: Manifest, replace: bool = True) -> str:
        """Write the manifest into ``tmp``, fsync it, the files written there (still open) and the
        folder, then rename it to ``dirname``, replacing an older copy (``replace=False``, a final
        model: raising ``_VersionTaken`` instead)."""
        run = posixpath.dirname(tmp)
        target = posixpath.join(run, dirname)
        with self._lock:
            written = self._unsynced.get(tmp, [])
            self._attempted.add(target)
            self._committed_here.pop(target, None)  # what an earlier commit wrote may be gone
        data = manifest.to_json()
        if self._in_memory is None:
            self._in_memory = _in_memory(tmp)
        with open(os.path.join(tmp, MANIFEST_NAME), "wb") as f:
            f.write(data)
            f.flush()
            _fsync_together([*written, f], tmp, self._in_memory)
            st = os.fstat(f.fileno())
        if not _moved_into_place(tmp, target):
            if not replace:
                raise _VersionTaken(dirname)
            # Replacing a committed copy (also one another process committed since this save
            # began): swap atomically, so that a crash leaves one of the two in place; only where
            # the filesystem cannot swap are there two renames. The old copy loses its manifest
            # first: half deleted, it is never taken for a checkpoint.
            if _exchange(tmp, target):
                _discard(tmp)
            else:
                trash = posixpath.join(run, f".trash-{dirname}-{uuid.uuid4().hex[:12]}")
                os.rename(target, trash)
                os.rename(tmp, target)
                _discard(trash)
        try:
            _fsync_dir(run)
        except OSError as exc:
            exc.committed = True  # type: ignore[attr-defined]  (renamed into place: the step is there)
            raise
        # As the local listing describes the file. Where a rename or close changes these (a FUSE
        # mount of an object store, SMB), the prune reads the manifest back once instead.
        self._remember(target, data, manifest, {"size": st.st_size, "mtime": st.st_mtime, "ino": st.st_ino})
        return target

    def _unstage(self, tmp: str, remove: bool) -> None:
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            self._in_flight.discard(tmp)

    def _store(self, run_name: str, dirname: str, payload: Payload,
               same_as: tuple[CheckpointRef, Manifest] | None = None, replace: bool = True) -> CheckpointRef:
        tmp = self._stage(run_name, dirname)
        written: list[BinaryIO] = []
        with self._lock:
            self._unsynced[tmp] = written
        try:
            entries = {}
            try:
                # Each file into its own temporary file, several at a time when the payload allows;
                # the commit then fsyncs them all and renames the folder once.
                entries = write_files(
                    payload.files,
                    lambda pf, stop: self._write(pf, os.path.join(tmp, _check_file_name(pf.name)), stop),
                    self.write_concurrency(payload))
                same = same_as is not None and entries == same_as[1].files and self._holds_whole(*same_as)
                target = "" if same else self._commit(tmp, dirname, payload.manifest(entries), replace)
            finally:
                with self._lock:
                    del self._unsynced[tmp]
                for f in written:
                    f.close()
        except BaseException as exc:
            self._unstage(tmp, remove=True)
            if not isinstance(exc, Exception) or isinstance(exc, _VersionTaken):
                raise  # KeyboardInterrupt, SystemExit: no leftover, then go on; a version taken: the next
            full = no_space(exc)
            failure = storage_full(self.name, self.root, f"{dirname} of run {run_name!r}", full,
                                   final=parse_final(dirname) is not None) if full is not None else BackendError(
                self.name, f"could not store {dirname} of run {run_name!r} under {self.root}: "
                           f"{self.describe(exc)}{_refused(exc)}")
            failure.held_as_it_was = not getattr(exc, "committed", False)
            raise failure from (full if full is not None else exc)
        if same:
            self._unstage(tmp, remove=True)
            return same_as[0]
        self._unstage(tmp, remove=False)
        return self._ref(run_name, payload.step, target, role=payload.role,
                         sizes={k: e.size for k, e in entries.items()})

    @hookimpl
    def stage_sharded(self, run_name: str, step: int) -> str:
        return self._stage(run_name, step_dirname(step))

    @hookimpl
    def commit_sharded(self, run_name: str, step: int, path: str, payload: Payload,
                       files: dict[str, FileEntry]) -> CheckpointRef:
        # The ranks wrote these files; a manifest naming one that is not here (written to
        # another machine's disk) would commit a checkpoint that no restore can read.
        absent = [n for n, e in sorted(files.items()) if _size_of(os.path.join(path, n)) != e.size]
        if absent:
            raise BackendError(self.name, f"could not commit {path}: {', '.join(absent[:5])}"
                                          f"{f' and {len(absent) - 5} more' if len(absent) > 5 else ''}, written by "
                                          "the ranks, are not there (or not whole) as rank 0 sees that folder. Every "
                                          "rank must write into one filesystem that they all share (NFS, Lustre)")
        try:
            target = self._commit(path, step_dirname(step), payload.manifest(files))
        except Exception as exc:
            full = no_space(exc)
            failure = storage_full(self.name, self.root, f"the manifest of {path}", full) if full is not None \
                else BackendError(self.name, f"could not commit {path}: {self.describe(exc)}")
            failure.held_as_it_was = not getattr(exc, "committed", False)  # renamed into place: it is there
            raise failure from (full if full is not None else exc)
        self._unstage(path, remove=False)
        return self._ref(run_name, step, target, sizes={k: e.size for k, e in files.items()})

    @hookimpl
    def discard_sharded(self, path: str) -> None:
        self._unstage(path, remove=True)

    def _write(self, pf: PayloadFile, path: str, stop: threading.Event | None = None) -> FileEntry:
        """Write one file of a save; it stays open for the commit to fsync with the others.
        ``stop`` (set when another file of the save failed) ends the write early."""
        with self._lock:
            written = self._unsynced.get(posixpath.dirname(path))
        f = open(path, "wb")
        if written is not None:
            with self._lock:
                written.append(f)
        sink = _EarlyWriteback(f)
        writer = HashingWriter(stoppable(sink, stop), hash_pool(), pf.algorithm)
        try:
            pf.write_to(writer)
            size, digest = writer.size, writer.digest()
            f.flush()
            if written is not None:
                sink.start_writeback()
            else:  # not part of a commit that syncs it
                os.fsync(f.fileno())
        except Exception as exc:
            if sink.error is not None and exc is not sink.error:
                raise sink.error from exc
            raise
        finally:
            if written is None:
                f.close()
        entry = FileEntry(size=size, digest=digest)
        if pf.source is not None and pf.expected is not None and pf.expected != entry:
            raise OSError(f"{pf.source} changed while it was copied")
        return entry

    def _find(self, path: str) -> dict[str, dict[str, Any]]:
        # What fsspec's find gives (every folder and file under ``path``, by full path, with its
        # type, size and time), from os.scandir: the prune after every save lists the run, and
        # fsspec's walk costs that save more than half a millisecond for a few folders. Any other
        # filesystem put in front (one that injects faults, say) is asked as it is.
        if type(self.fs) is not LocalFileSystem:
            return super()._find(path)
        found: dict[str, dict[str, Any]] = {}
        pending = [path]
        while pending:
            folder = pending.pop()
            try:
                entries = list(os.scandir(folder))
            except NotADirectoryError:
                if folder == path:
                    # A file where the root or the run's folder should be: no empty run, which
                    # restore would take for nothing to resume.
                    raise NotADirectoryError(errno.ENOTDIR, "a file stands where a folder of this path should be",
                                             path) from None
                continue
            except FileNotFoundError:
                if folder == path:
                    raise
                continue  # removed while listing, as a prune or a commit's rename does
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    # ckptkit writes no links: one planted in a run is neither listed nor
                    # followed, so a prune can never delete what it points at.
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                found[entry.path] = {"name": entry.path, "type": "directory" if is_dir else "file",
                                     "size": st.st_size, "mtime": st.st_mtime, "ino": st.st_ino}
                # A folder of the run that ckptkit did not write (a trainer's logs, say) is listed
                # but not walked: nothing in it counts, it may hold many files, and one that
                # cannot be read must not make the run's checkpoints unreadable.
                if is_dir and (folder != path or written_by_ckptkit(entry.name)):
                    pending.append(entry.path)
        return found

    @hookimpl
    def open_file(self, ref: CheckpointRef, name: str):
        # A checkpoint's files are regular files that ckptkit wrote: a link is never followed
        # (it could lead out of the root, or to a device that never ends), whatever it holds.
        if type(self.fs) is not LocalFileSystem:
            return super().open_file(ref, name)
        return open_regular(posixpath.join(ref.path, _check_file_name(name)))

    def _manifest_bytes(self, path: str) -> bytes:
        if type(self.fs) is not LocalFileSystem:
            return super()._manifest_bytes(path)
        return manifest_bytes(path)

    def _listing(self, run_name: str):
        self._refuse_linked_run(run_name)
        listing = super()._listing(run_name)
        return super()._listing(run_name) if self._put_back(run_name, listing) else listing

    def _put_back(self, run_name: str, listing: dict) -> bool:
        """Put back a committed copy that a save killed between its two renames left aside.

        Without an atomic swap, saving step N (or the final model) again renames the committed
        folder aside (``.trash-step-N-*``), then the new copy into place. Killed in between, step N would be
        gone, and the prune would delete both copies as leftovers: the old one, still
        committed, is renamed back. Returns whether it put any back."""
        run = self.run_path(run_name)
        put = False
        for dirname, folder in listing.items():
            step_dir = set_aside_for(dirname)
            if step_dir is None or MANIFEST_NAME not in folder.files or step_dir in listing:
                continue
            aside, target = posixpath.join(run, dirname), posixpath.join(run, step_dir)
            try:
                if (time.time() - os.lstat(aside).st_ctime < _SWAP_GRACE_S and aside not in self._waited
                        and _finished_meanwhile(target)):
                    continue
                self._waited.add(aside)
                os.rename(aside, target)  # fails if a commit put a new copy there meanwhile
                _fsync_dir(run)
            except OSError:
                continue
            log.warning("backend %r: put back %s, which a save killed while replacing it had left aside as %s",
                        self.name, self.uri(target), dirname)
            put = True
        return put

    def _strip(self, path: str) -> str:
        # ``_find`` gives plain absolute paths (os.scandir's): nothing to strip, and fsspec's
        # normalising cost the prune after each save a few microseconds per file.
        return path if type(self.fs) is LocalFileSystem else super()._strip(path)

    def _prepare_root(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    @hookimpl
    def probe(self) -> dict[str, Any]:
        # A probe leaves no trace: the folders it made for the root go again, when still empty.
        made = []
        folder = self.root
        while not os.path.lexists(folder) and folder != os.path.dirname(folder):
            made.append(folder)
            folder = os.path.dirname(folder)
        try:
            return super().probe()
        finally:
            for folder in made:
                try:
                    os.rmdir(folder)
                except OSError:
                    break

    def _delete(self, path: str, names: Iterable[str] | None = None) -> None:
        # Through a descriptor of the folder, opened without following a link: a folder replaced
        # by a link since the listing loses only the link, never what it points at.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
                os.unlink(path)
                return
            raise
        try:
            try:
                os.unlink(MANIFEST_NAME, dir_fd=fd)  # first: a half-deleted folder is never committed
            except FileNotFoundError:
                pass
            # A checkpoint is a flat folder of files: unlinked one by one, then the folder.
            with os.scandir(fd) as entries:
                for name in [e.name for e in entries if not e.is_dir(follow_symlinks=False)]:
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            os.rmdir(path)
        except OSError:  # something else in it (a subfolder); rmtree follows no link either
            shutil.rmtree(path)
