"""Checksums computed while bytes stream to storage, so nothing is read twice to hash it.

A digest is written ``"<algorithm>:<hex>"`` so that each one says how to check it. New files get
xxh3-128: a checksum against corruption, not a signature, and at over 10 GB/s per core it costs a
save almost nothing, where sha256 took more CPU than torch.save itself. Manifests that carry
sha256 digests still verify.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import xxhash

ALGORITHM = "xxh3_128"
CHUNK = 8 * 1024 * 1024
# Below this size a write is hashed inline; above it, hashing runs on a helper thread while the
# write goes to the file (hashlib and file writes both release the GIL for large buffers).
_OVERLAP_MIN = 1024 * 1024


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a job scheduler may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def hash_pool() -> ThreadPoolExecutor:
    """The threads that overlap a save's waits (hashing while a write goes on, fsyncs issued
    together) and share an async save's copy (``staging.copy_flat``), shared by every writer of
    this process.

    Started once rather than per file, which cost each save a thread start and join; a task
    never waits on another, so writers sharing the pool cannot hold each other up for long. A
    forked child gets a pool of its own (the parent's threads do not exist there).
    """
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(max(4, min(8, usable_cpus())),
                                                     thread_name_prefix="ckptkit-hash"))
        return _pool[1]


class WriteOnly:
    """What a file object says about itself when it can only be written front to back."""

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


class HashingWriter(WriteOnly):
    """A write-only file object that hashes and counts what passes through to ``raw``."""

    def __init__(self, raw: BinaryIO, executor: ThreadPoolExecutor | None = None,
                 algorithm: str = ALGORITHM):
        self.raw = raw
        self.size = 0
        self.algorithm = algorithm
        self._hash = new_hasher(algorithm)
        self._executor = executor

    def write(self, data) -> int:
        """Hash ``data``, write it to ``raw``, and return its length."""
        view = memoryview(data).cast("B")
        n = view.nbytes
        if self._executor is not None and n >= _OVERLAP_MIN:
            pending = self._executor.submit(self._hash.update, view)
            try:
                self.raw.write(view)
            finally:
                # The caller may free or reuse ``data`` once we return or raise.
                pending.result()
        else:
            self._hash.update(view)
            self.raw.write(view)
        self.size += n
        return n

    def flush(self) -> None:
        """Flush ``raw``."""
        self.raw.flush()

    def digest(self) -> str:
        """The digest of everything written, ``"<algorithm>:<hex>"`` as a ``FileEntry`` holds it."""
        return f"{self.algorithm}:{self._hash.hexdigest()}"


def copy_hashed(src: BinaryIO, dst: BinaryIO, algorithm: str = ALGORITHM,
                limit: int | None = None) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` in chunks; return the size and digest of what was copied.

    ``limit``: the size expected; the copy stops one byte past it, so an object larger than its
    manifest says is told apart (by its size) without filling the disk it is copied to."""
    writer = HashingWriter(dst, hash_pool(), algorithm)
    while limit is None or writer.size <= limit:
        chunk = src.read(CHUNK if limit is None else min(CHUNK, limit + 1 - writer.size))
        if not chunk:
            break
        writer.write(chunk)
    return writer.size, writer.digest()


def new_hasher(algorithm: str) -> Any:
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def algorithm_of(digest: str) -> str:
    return digest.split(":", 1)[0]


def hash_stream(src: BinaryIO, algorithm: str = ALGORITHM, chunk: int = CHUNK,
                mapped: bool = False, hasher: Any = None) -> tuple[int, str]:
    """Read ``src`` to its end in reads of ``chunk`` bytes; return its size and digest.
    ``hasher``: one of ``algorithm`` that hashed what comes before ``src``'s bytes (the size
    returned is of the bytes read here).

    Reads go into one reused buffer where ``src`` can ``readinto``: a fresh ``bytes`` per read
    costs page faults on new memory each time, and a buffer small enough to stay in the CPU's
    cache is hashed straight after it was filled. The reads and xxhash's updates of more
    than 64 KiB release the GIL, so this can run on a second thread beside other work.

    ``mapped``: a local file (one with a ``fileno``) is hashed in one update over a read-only
    mapping instead, which releases the GIL for the whole file. Reads take the GIL back for each
    chunk, and beside a thread running Python (a load) wait up to the interpreter's switch
    interval (5 ms) each time: a 10 MB restore on tmpfs took 12 ms with its hash read in chunks
    beside the load, 8 ms mapped. Mapped is faster alone too, with no copy out of the page cache
    (1.4 against 1.8 ms for 10 MB). But a read that fails under a mapping (a disk error, a file
    truncated meanwhile) kills the process (SIGBUS) where a ``read`` raises: only for a file the
    caller maps anyway.
    """
    if mapped and hasher is None:
        try:
            mapping = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
        except (AttributeError, OSError, ValueError):  # no descriptor, an empty file, or no mmap there
            pass
        else:
            with mapping:
                h = new_hasher(algorithm)
                h.update(mapping)
                return len(mapping), f"{algorithm}:{h.hexdigest()}"
    h = new_hasher(algorithm) if hasher is None else hasher
    size = 0
    readinto = getattr(src, "readinto", None)
    if readinto is None:
        while data := src.read(chunk):
            h.update(data)
            size += len(data)
        return size, f"{algorithm}:{h.hexdigest()}"
    buf = bytearray(chunk)
    view = memoryview(buf)
    while n := readinto(buf):
        h.update(view[:n])
        size += n
    return size, f"{algorithm}:{h.hexdigest()}"
