"""Writers that stream a file to an object store while it is being serialised."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol

from .hashing import WriteOnly
from .redact import describe

log = logging.getLogger(__name__)


class Multipart(Protocol):
    """One object uploaded in numbered parts (S3 multipart upload and the like).

    ``FileBackend.multipart`` returns one; ``PartWriter`` drives it. Each method is one request
    and may be retried, so each must be safe to repeat.
    """

    def put_whole(self, data: bytes) -> None:
        """Store the whole object in one request; used when it fits in one part."""

    def begin(self) -> Any:
        """Start a multipart upload; return its handle (S3: the upload id)."""

    def put_part(self, upload: Any, number: int, data: bytearray) -> Any:
        """Upload part ``number`` (from 1) of ``upload``; return what ``complete`` needs of it (S3: the ETag)."""

    def complete(self, upload: Any, parts: list[tuple[int, Any]]) -> None:
        """Publish the object from ``parts``, ``(number, put_part's result)`` in order."""

    def abort(self, upload: Any) -> None:
        """Drop an unfinished upload, so that nothing of it is published or billed."""


class PartWriter(WriteOnly):
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
        self._error: BaseException | None = None
        self._number = 0
        self._done = False

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

    @property
    def error(self) -> BaseException | None:
        """The failure of the upload's start or of the first part that failed, if any (a writer
        through which it was raised, such as torch's serialiser, may report it only as a failed
        write)."""
        return self._error

    def _finished(self, future: Future) -> None:
        # The failure is recorded before the slot is freed, so that a part waiting for the slot
        # sees it (``_check``) before it starts; one look per part, not one at every part.
        if self._error is None and not future.cancelled() and future.exception() is not None:
            self._error = future.exception()
        self._slots.release()

    def _check(self) -> None:
        if (error := self.error) is not None:
            raise error

    def _send(self) -> None:
        if self._upload is None:
            try:
                self._upload = self.retry(f"starting the upload of {self.what}", self.target.begin)
            except BaseException as exc:
                # Kept, as a failed part is: torch's serialiser turns it into "unexpected pos".
                if self._error is None:
                    self._error = exc
                raise
        self._check()
        self._slots.acquire()
        try:
            self._check()  # a part may have failed while this one waited for a slot
        except BaseException:
            self._slots.release()
            raise
        data = self._buf if self._fill == len(self._buf) else self._buf[:self._fill]
        self._number += 1
        try:
            future = self._pool.submit(self._put, self._number, data)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._finished)
        self._futures.append(future)
        if self._number % self.GROW_EVERY == 0:
            # Keep very large objects under the stores' part-count limits (S3: 10,000).
            self.part_size *= 2
        self._buf = bytearray(self.part_size)
        self._fill = 0

    def _put(self, number: int, data: bytearray) -> tuple[int, Any]:
        return number, self.retry(f"part {number} of {self.what}", self.target.put_part, self._upload, number, data)

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

    def abort(self, patient: bool = True) -> None:
        """Drop the upload: stop sending parts and ask the store to forget those it holds, with
        the retry policy if ``patient``, else in one try (the prune of a resume backend aborts
        what is left once it is older than its grace period)."""
        if self._done:
            return
        self._done = True
        for fut in self._futures:
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._buf = bytearray()
        if self._upload is not None:
            try:
                if patient:
                    self.retry(f"aborting the upload of {self.what}", self.target.abort, self._upload)
                else:
                    self.target.abort(self._upload)
            except Exception as exc:
                # S3 keeps the parts (billed, and listed by no object listing) until they are
                # aborted: the next prune of this run does it once past leftover_grace_s.
                log.warning("could not abort the upload of %s (%s); its parts stay in the store until the next prune "
                            "of this run aborts it, once older than leftover_grace_s, or a lifecycle rule with "
                            "AbortIncompleteMultipartUpload does", self.what, describe(exc))


class StreamWriter(WriteOnly):
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

    def flush(self) -> None:
        pass

    @property
    def error(self) -> BaseException | None:
        """The upload's failure, if it failed (a writer through which it was raised, such as
        torch's serialiser, may report it only as a failed write)."""
        return self._error

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

    def abort(self, patient: bool = True) -> None:
        """Discard what was sent (``patient`` is for the writers that retry their clean-up)."""
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
        finally:
            # An fsspec buffered file closes itself when garbage-collected, publishing what it
            # holds; gcsfs's discard leaves a file that never started an upload open.
            try:
                f.closed = True
            except AttributeError:
                pass
