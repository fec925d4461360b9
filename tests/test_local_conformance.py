"""The conformance suite (``ckptkit.testing``) run against the built-in backends.

``local`` commits by renaming a folder; the plain ``FileBackend`` commits by its manifest, over an
in-memory filesystem (folders exist only as names, without modification times) and over a local one
that streams every write through fsspec, as third-party stores do, and over one that needs its
folders made and commits the manifest by a move, as WebDAV does.
"""

from __future__ import annotations

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from ckptkit.local import LocalBackend
from ckptkit.plugin import FileBackend, RetryPolicy
from ckptkit.testing import ResumeBackendTests

FAST = RetryPolicy(attempts=3, backoff_s=0.0, max_backoff_s=0.0)


class TestLocalBackend(ResumeBackendTests):
    @pytest.fixture
    def backend(self, tmp_path):
        built = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
        # Local disk has no transient errors of its own, but its listing and reads go through
        # the same retried requests as any store's.
        built.retry = FAST
        return built


class TestFileBackendOnAStreamingFilesystem(ResumeBackendTests):
    @pytest.fixture
    def backend(self, tmp_path):
        return FileBackend("plain", LocalFileSystem(auto_mkdir=True, skip_instance_cache=True),
                           str(tmp_path / "root"), retry=FAST)


class _FoldersAndMoves(FileBackend):
    # What a WebDAV or SFTP store is like: writes need their folder, a move is atomic.
    needs_folders = True
    atomic_move = True


class TestFileBackendThatMakesFoldersAndMovesItsManifest(ResumeBackendTests):
    @pytest.fixture
    def backend(self, tmp_path):
        return _FoldersAndMoves("dav", LocalFileSystem(auto_mkdir=False, skip_instance_cache=True),
                                str(tmp_path / "root"), retry=FAST)


class TestFileBackendInMemory(ResumeBackendTests):
    @pytest.fixture
    def backend(self, tmp_path):
        fs = fsspec.filesystem("memory", skip_instance_cache=True)
        return FileBackend("mem", fs, f"/bucket-{tmp_path.name}", retry=FAST)


def test_ckptkit_itself_never_imports_pytest():
    import subprocess
    import sys

    code = ("import sys, ckptkit, ckptkit.plugin, ckptkit.cli; "
            "assert 'pytest' not in sys.modules, 'importing ckptkit imported pytest'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
