"""Checksums computed while bytes stream to storage, so nothing is read twice to hash it."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

ALGORITHM = "sha256"
CHUNK = 8 * 1024 * 1024
# Below this size a write is hashed inline; above it, hashing runs on a helper thread while the
# write goes to the file (hashlib and file writes both release the GIL for large buffers).
_OVERLAP_MIN = 1024 * 1024


class HashingWriter:
    """A write-only file object that hashes and counts what passes through to ``raw``."""

    def __init__(self, raw: BinaryIO, executor: ThreadPoolExecutor | None = None):
        self.raw = raw
        self.size = 0
        self._hash = hashlib.new(ALGORITHM)
        self._executor = executor

    def write(self, data) -> int:
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
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def copy_hashed(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` in chunks; return the size and checksum of what was copied."""
    with ThreadPoolExecutor(1) as pool:
        writer = HashingWriter(dst, pool)
        while chunk := src.read(CHUNK):
            writer.write(chunk)
        return writer.size, writer.hexdigest()


def hash_stream(src: BinaryIO) -> tuple[int, str]:
    """Read ``src`` to its end; return its size and checksum."""
    h = hashlib.new(ALGORITHM)
    size = 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()
