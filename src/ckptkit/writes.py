"""Writing the files of one checkpoint, several at a time where the backend allows it.

A backend hands ``write_files`` its own ``put`` (store one file, hashed, uncommitted) and gets
every file's size and checksum back, or the first failure. With more than one file in flight,
a failure stops the others at their next write, and ``write_files`` returns only once every
thread is done: the caller then discards the whole folder, and nothing is left writing into it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, BinaryIO, Callable, Sequence

from .checkpoint import PayloadFile
from .hashing import WriteOnly
from .manifest import FileEntry

# put(file, stop): store one file; its writes should go through ``stoppable(raw, stop)``.
Put = Callable[[PayloadFile, "threading.Event | None"], FileEntry]


class WriteCancelled(Exception):
    """Raised into a file's write because another file of the same checkpoint failed."""


class _Stoppable(WriteOnly):
    def __init__(self, raw: BinaryIO, stop: threading.Event):
        self.raw = raw
        self.stop = stop

    def write(self, data: Any) -> int:
        if self.stop.is_set():
            raise WriteCancelled("another file of this checkpoint failed")
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def stoppable(raw: Any, stop: threading.Event | None) -> Any:
    """``raw``, whose writes raise ``WriteCancelled`` once ``stop`` is set (``raw`` itself without one)."""
    return raw if stop is None else _Stoppable(raw, stop)


def write_files(files: Sequence[PayloadFile], put: Put, concurrency: int) -> dict[str, FileEntry]:
    """``put`` each file, up to ``concurrency`` at once; their entries, in the order of ``files``.

    Raises the first failure (in time: the ones it stopped come after it), once no file is
    being written any more.
    """
    if concurrency <= 1 or len(files) <= 1:
        return {pf.name: put(pf, None) for pf in files}
    stop = threading.Event()
    lock = threading.Lock()
    failures: list[BaseException] = []

    def run(pf: PayloadFile) -> FileEntry:
        try:
            return put(pf, stop)
        except BaseException as exc:
            with lock:
                failures.append(exc)
            stop.set()
            raise

    with ThreadPoolExecutor(min(concurrency, len(files)), thread_name_prefix="ckptkit-write") as pool:
        futures = [pool.submit(run, pf) for pf in files]
        try:
            wait(futures)
        except BaseException:  # interrupted while waiting: stop the writes, wait for them, go on
            stop.set()
            raise
    if failures:
        raise failures[0]
    return {pf.name: fut.result() for pf, fut in zip(files, futures)}
