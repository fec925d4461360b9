"""Checksums: a local file hashed through a mapping gives what reading it gives, without reading it."""

from __future__ import annotations

import io
import os

import pytest

from ckptkit.hashing import hash_stream


class _Unreadable(io.FileIO):
    """A local file whose reads fail: only its descriptor can be hashed."""

    def read(self, *args):
        raise AssertionError("read through read()")

    def readinto(self, *args):
        raise AssertionError("read through readinto()")


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
@pytest.mark.parametrize("size", [1, 4096, 256 * 1024 + 7, 3 * 1024 * 1024])
def test_a_mapped_file_hashes_as_it_reads_and_is_not_read(tmp_path, algorithm, size):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(size))
    with open(path, "rb") as f:
        expected = hash_stream(f, algorithm, 64 * 1024)
    assert expected[0] == size
    with _Unreadable(path) as f:
        assert hash_stream(f, algorithm, 64 * 1024, mapped=True) == expected


def test_what_cannot_be_mapped_is_read(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with open(empty, "rb") as f:
        assert hash_stream(f, mapped=True) == hash_stream(io.BytesIO(b""))
    data = os.urandom(100_000)
    assert hash_stream(io.BytesIO(data), mapped=True) == hash_stream(io.BytesIO(data), chunk=4096)
    with _Unreadable(empty) as f, pytest.raises(AssertionError, match="read through"):
        hash_stream(f)  # not asked to map: it reads


def test_a_copy_with_a_limit_stops_one_byte_past_it():
    """A remote file is downloaded before its size is compared with the manifest's: an object
    far larger than listed filled the scratch disk it was copied to."""
    import io

    from ckptkit.hashing import copy_hashed

    src, dst = io.BytesIO(b"x" * (3 * 2**20)), io.BytesIO()
    size, _ = copy_hashed(src, dst, limit=100)
    assert size == 101 and len(dst.getvalue()) == 101
    src, dst = io.BytesIO(b"abc"), io.BytesIO()
    assert copy_hashed(src, dst, limit=3)[0] == 3 and dst.getvalue() == b"abc"
    assert copy_hashed(io.BytesIO(b"abc"), io.BytesIO())[0] == 3
