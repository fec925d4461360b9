"""The conformance suite (``ckptkit.testing``) run against the built-in backends.

``local`` commits by renaming a folder; the plain ``FileBackend`` commits by its manifest, over an
in-memory filesystem (folders exist only as names, without modification times) and over a local one
that streams every write through fsspec, as third-party stores do, and over one that needs its
folders made and commits the manifest by a move, as WebDAV does.
"""

from __future__ import annotations

import attrs
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


class _PruneByName(LocalBackend):
    """A prune that orders checkpoints by their folder names' digits as text, a plugin's easy mistake."""

    from ckptkit import hookimpl as _hookimpl

    @_hookimpl
    def prune(self, run_name, keep_last, protected_steps, dry_run, counted_steps):
        refs = sorted(self.list_checkpoints(run_name=run_name), key=lambda r: str(r.step), reverse=True)
        doomed = [r for r in refs[keep_last:] if r.step not in protected_steps]
        if not dry_run:
            for ref in doomed:
                self.fs.rm(ref.path, recursive=True)
        return doomed


def test_the_suite_fails_a_prune_that_orders_steps_as_text(tmp_path):
    """With steps 0 to 5 the suite passed such a prune, which deletes the newest once steps reach 10."""
    suite = ResumeBackendTests()
    broken = _PruneByName.from_config("disk", {"path": str(tmp_path / "broken")})
    with pytest.raises(AssertionError):
        suite.test_prune_keeps_the_newest_and_protected_steps_and_a_dry_run_deletes_nothing(broken)
    suite.test_prune_keeps_the_newest_and_protected_steps_and_a_dry_run_deletes_nothing(
        LocalBackend.from_config("disk", {"path": str(tmp_path / "good")}))


class _StrayRefs(LocalBackend):
    """A save that answers with the ref of the step before, and a listing that names another
    backend: both refused by ckptkit at run time, so the suite must fail them before."""

    from ckptkit import hookimpl as _hookimpl

    mode = ""

    @_hookimpl
    def save_resume(self, run_name, step, payload):
        ref = super().save_resume(run_name=run_name, step=step, payload=payload)
        return ref if self.mode != "save" or step == 0 else attrs.evolve(ref, step=step - 1)

    @_hookimpl
    def list_checkpoints(self, run_name):
        refs = super().list_checkpoints(run_name=run_name)
        return [attrs.evolve(r, backend="scratch") for r in refs] if self.mode == "list" else refs


@pytest.mark.parametrize("mode", ["save", "list"])
def test_the_suite_fails_a_save_or_listing_that_answers_with_refs_of_another_step_or_backend(tmp_path, mode):
    suite = ResumeBackendTests()
    broken = _StrayRefs.from_config("disk", {"path": str(tmp_path / "broken")})
    broken.mode = mode
    with pytest.raises(AssertionError, match="returned|listed"):
        suite.test_prune_keeps_the_newest_and_protected_steps_and_a_dry_run_deletes_nothing(broken)
    good = _StrayRefs.from_config("disk", {"path": str(tmp_path / "good")})
    suite.test_prune_keeps_the_newest_and_protected_steps_and_a_dry_run_deletes_nothing(good)


@pytest.mark.parametrize("helper", ["run_folder", "stored_files", "write_leftover", "make_empty_folder", "overwrite"])
def test_the_suites_storage_helpers_skip_a_backend_without_a_filesystem_naming_what_to_override(helper):
    """A backend whose hooks reach a registry or a database, as docs/plugins.md offers, made the
    suite's tests fail with an AttributeError on ``fs`` from the suite's own code."""
    from ckptkit.checkpoint import CheckpointRef

    class Registry:
        name, root = "registry", "registry://models"

    args = {"run_folder": (), "stored_files": (), "write_leftover": ("step-1", "f", b""),
            "make_empty_folder": ("step-1",),
            "overwrite": (CheckpointRef(backend="registry", run_name="r", step=1, path="r/1", uri="registry://r/1"),
                          "state.pt", b"")}[helper]
    with pytest.raises(pytest.skip.Exception, match=f"Registry has no 'fs' attribute and run_path\\(\\); override "
                                                    f"{helper} to reach its store directly"):
        getattr(ResumeBackendTests(), helper)(Registry(), *args)
