"""The writers that stream a file to an object store in parts while it is serialised."""

from __future__ import annotations

import threading

import pytest

from ckptkit.uploads import PartWriter


class Parts:
    """A multipart target held in memory whose first part fails once ``fail`` is set."""

    def __init__(self):
        self.started: list[int] = []
        self.aborted = False
        self.fail = threading.Event()

    def put_whole(self, data: bytes) -> None:
        raise AssertionError("the object is larger than one part")

    def begin(self) -> str:
        return "upload"

    def put_part(self, upload: str, number: int, data: bytearray) -> str:
        self.started.append(number)
        if number == 1:
            self.fail.wait(30)
            raise ConnectionError("part 1 refused")
        return f"etag-{number}"

    def complete(self, upload: str, parts: list) -> None:
        raise AssertionError("an upload with a failed part is never completed")

    def abort(self, upload: str) -> None:
        self.aborted = True


def test_no_part_is_started_after_one_failed_while_it_waited_for_a_slot():
    """With every slot taken, the next part waits; if a part in flight fails meanwhile, that
    failure ends the file there: no more parts go to a store that is failing."""
    target = Parts()
    writer = PartWriter(target, "s3://b/state.pt", part_size=4, concurrency=1,
                        retry=lambda what, fn, *args: fn(*args))
    writer.write(b"aaaa")  # part 1, in flight until it fails
    threading.Timer(0.2, target.fail.set).start()
    with pytest.raises(ConnectionError, match="part 1 refused"):
        writer.write(b"bbbb")  # part 2 waits for part 1's slot
    assert target.started == [1]
    assert isinstance(writer.error, ConnectionError)
    writer.abort()
    assert target.aborted
