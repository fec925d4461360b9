"""Tells, in the log, of a backend hook call that runs long: whatever waits for it (a save, the
next save after an async one, a restore, ``close``) stands still, and the log says on what. Reads
from an open file and DCP's shard transfers are not hook calls, and are not watched.

One daemon thread, started with the first call watched, looks at the calls in flight a few
times a minute. A call is first told of after ``FIRST_S`` seconds, then each time its time
doubles; it is not stopped (the backend's own timeouts bound it, a third-party plugin's may
not), and its end is told once it was told of.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from typing import Iterator

log = logging.getLogger(__name__)

FIRST_S = 120.0
TICK_S = 5.0

_lock = threading.Lock()
_calls: dict[int, list] = {}  # id -> [what, started, when to tell next, told]
_ids = itertools.count()
_thread: threading.Thread | None = None
_wake = threading.Event()


@contextlib.contextmanager
def watching(what: str) -> Iterator[None]:
    """Watch the call made inside: ``what`` names it in the log ("save_resume of backend 's3'")."""
    global _thread
    key = next(_ids)
    started = time.monotonic()
    with _lock:
        _calls[key] = [what, started, started + FIRST_S, False]
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_watch, name="ckptkit-watchdog", daemon=True)
            _thread.start()
    try:
        yield
    finally:
        with _lock:
            entry = _calls.pop(key, None)  # gone in a child forked inside this call
        if entry is not None and entry[3]:
            log.warning("%s returned after %.0f s", what, time.monotonic() - started)


def _forked() -> None:
    """A forked child runs none of its parent's calls, nor its thread, and may have been forked
    while another thread held the lock."""
    global _lock, _thread
    _lock = threading.Lock()
    _calls.clear()
    _thread = None


os.register_at_fork(after_in_child=_forked)


def _watch() -> None:
    while True:
        _wake.wait(min(TICK_S, FIRST_S))
        now = time.monotonic()
        with _lock:
            due = [entry for entry in _calls.values() if now >= entry[2]]
            for entry in due:
                entry[2] = entry[1] + 2 * (now - entry[1])
                entry[3] = True
        for what, started, _, _ in due:
            log.warning("%s has run for %.0f s and not returned yet; a save, restore or close() that needs it "
                        "(the next save, after an async one) waits until it does. It is not stopped: ckptkit's "
                        "s3 and gcs backends give up on a store that does not answer after their timeouts and "
                        "retries (timeout_s)", what, now - started)
