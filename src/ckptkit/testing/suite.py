"""The storage contract as tests that any resume backend inherits.

A backend author subclasses ``ResumeBackendTests`` in a test module, provides the ``backend``
fixture (a fresh instance over an empty root, built with a retry policy of at least two attempts
and a short backoff), and pytest collects every test below for that backend. The hooks are
called the way ckptkit calls them: keyword arguments only, and only those the implementation
takes. Faults go through a ``WrappedFileSystem`` put in front of the backend's ``fs``.

What a store cannot do is described by overridable attributes and methods, not assumed: how to
wrap the filesystem, how to plant what a crash leaves, whether folders exist without files, what
an unfinished upload is, and the file sizes a failing write is tried with.
"""

from __future__ import annotations

import gc
import inspect
import io
import logging
import posixpath
import re
import time
from typing import Any, Callable, Iterable

import attrs
import pytest

from ..plugin import (MANIFEST_NAME, BackendError, CheckpointRef, FileEntry, IncompatibleCheckpointError, Manifest,
                      Payload, PayloadFile, StorageUnavailableError, final_dirname, hash_stream, step_dirname)
from .faults import MOVES, WrappedFileSystem, permanent, transient

# A credential-looking string for backends built without credentials of their own.
PLANTED_SECRET = "ckptkit-conformance-Zq8vN2pLw7"


def call_hook(backend: Any, hook: str, **kwargs: Any) -> Any:
    """Call a hook implementation as pluggy does: keyword arguments, only those it takes."""
    impl = getattr(backend, hook)
    wanted = inspect.signature(impl).parameters
    return impl(**{k: v for k, v in kwargs.items() if k in wanted})


def payload(run_name: str, step: int, files: dict[str, bytes | Callable[[Any], None]] | None = None,
            role: str = "resume", format: str = "torch", concurrency: int = 1) -> Payload:
    """A payload of plain bytes (or writer callables), by default one small ``state.pt``;
    ``concurrency`` files may be written at once."""
    files = files if files is not None else {"state.pt": f"state of step {step}".encode() * 20}

    def writer(content: bytes | Callable[[Any], None]) -> Callable[[Any], None]:
        return content if callable(content) else (lambda f: f.write(content))

    return Payload(run_name=run_name, step=step, epoch=step // 10, format=format, role=role,
                   metrics={"loss": 1.0 / (step + 1)}, concurrency=concurrency,
                   files=tuple(PayloadFile(name, write=writer(c)) for name, c in files.items()))


class ResumeBackendTests:
    """The storage contract of a ``resume`` backend. Subclass it and provide ``backend``.

    Attributes a subclass may change:

    - ``run_name``: the run the tests write (a fresh root per test keeps runs apart).
    - ``failing_write_sizes``: sizes, in bytes, of a file whose serialiser fails half-way; add
      one larger than an upload part so that a failed multipart or chunked upload is tried too.
    - ``listing_requests``: how many store requests one ``list_checkpoints`` may make, whatever
      the number of checkpoints.
    """

    run_name = "run"
    failing_write_sizes: tuple[int, ...] = (1000,)
    listing_requests = 1

    # -- what the subclass provides -------------------------------------------------------

    @pytest.fixture
    def backend(self) -> Any:
        """A fresh backend instance over an empty root, with a fast retry policy of at least
        two attempts (``RetryPolicy(attempts=3, backoff_s=0.01)``)."""
        raise NotImplementedError("subclasses of ResumeBackendTests provide the 'backend' fixture")

    @pytest.fixture
    def secrets(self, backend: Any) -> tuple[str, ...]:
        """Credential strings the backend holds, which must never be shown. By default the
        backend's ``secrets`` (a ``FileBackend`` scrubs them), else a planted one it is given."""
        held = tuple(s for s in getattr(backend, "secrets", ()) if len(s) >= 4)
        if held:
            return held
        backend.secrets = (PLANTED_SECRET,)
        return (PLANTED_SECRET,)

    @pytest.fixture
    def store_requests(self) -> Callable[[], int] | None:
        """None, or a callable returning how many requests the store itself has answered so
        far (a proxy's count), to check a listing below the filesystem layer too."""
        return None

    def wrap_filesystem(self, backend: Any) -> WrappedFileSystem:
        """Put a ``WrappedFileSystem`` between the backend and its store; return it."""
        fs = getattr(backend, "fs", None)
        if fs is None:
            pytest.skip(f"{type(backend).__name__} has no 'fs' attribute; override wrap_filesystem "
                        "to put a WrappedFileSystem in front of its store")
        if isinstance(fs, WrappedFileSystem):
            return fs
        wrapped = WrappedFileSystem(fs)
        backend.fs = wrapped
        return wrapped

    @staticmethod
    def _files_of(backend: Any, helper: str) -> Any:
        """The backend's fsspec filesystem, which the storage-level helpers reach the store
        through; a backend without one (its hooks written for a registry or a database) skips the
        test, naming the helper to override for it."""
        fs = getattr(backend, "fs", None)
        if fs is None or not callable(getattr(backend, "run_path", None)):
            pytest.skip(f"{type(backend).__name__} has no 'fs' attribute and run_path(); override {helper} "
                        "to reach its store directly")
        return fs

    def run_folder(self, backend: Any, run_name: str | None = None) -> str:
        self._files_of(backend, "run_folder")
        return backend.run_path(run_name or self.run_name)

    def write_leftover(self, backend: Any, folder: str, name: str, data: bytes) -> None:
        """Write a file the way a save killed before its manifest leaves it (``folder`` is
        relative to the run)."""
        fs = self._files_of(backend, "write_leftover")
        path = posixpath.join(self.run_folder(backend), folder)
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(posixpath.join(path, name), data)

    def make_empty_folder(self, backend: Any, folder: str) -> bool:
        """Make an empty folder in the run, as a save killed right after creating it leaves;
        False when the store has no folders without files (object stores)."""
        fs = self._files_of(backend, "make_empty_folder")
        path = posixpath.join(self.run_folder(backend), folder)
        fs.makedirs(path, exist_ok=True)
        fs.invalidate_cache()
        return bool(fs.isdir(path))

    def overwrite(self, backend: Any, ref: CheckpointRef, name: str, data: bytes) -> None:
        """Replace one file of a committed checkpoint, as damage after the commit would."""
        self._files_of(backend, "overwrite").pipe_file(posixpath.join(ref.path, name), data)

    def stored_files(self, backend: Any) -> list[str]:
        """Every file under the backend's root, relative to it."""
        fs = self._files_of(backend, "stored_files")
        fs.invalidate_cache()
        root = fs._strip_protocol(backend.root).rstrip("/")
        try:
            found = fs.find(root)
        except FileNotFoundError:
            return []
        return sorted(fs._strip_protocol(p)[len(root) + 1:] for p in found)

    def unfinished_uploads(self, backend: Any) -> list[str]:
        """Uploads begun and never completed or aborted (S3 multipart uploads, say)."""
        return []

    # -- helpers --------------------------------------------------------------------------

    def save(self, backend: Any, step: int, run_name: str | None = None, **kwargs: Any) -> CheckpointRef:
        run_name = run_name or self.run_name
        ref = call_hook(backend, "save_resume", run_name=run_name, step=step,
                        payload=payload(run_name, step, **kwargs))
        assert isinstance(ref, CheckpointRef), f"save_resume returned {type(ref).__name__}, not a CheckpointRef"
        # ckptkit refuses any other ref (and a backend keeping files locally is copied from by
        # the next one): this backend's, of the run, the step and the resume role.
        name = getattr(backend, "name", ref.backend)
        assert (ref.backend, ref.run_name, ref.step) == (name, run_name, step), \
            f"save_resume of step {step} of run {run_name!r} on backend {name!r} returned {ref}"
        manifest = call_hook(backend, "read_manifest", ref=ref)
        assert (manifest.run_name, manifest.step) == (run_name, step), \
            f"read_manifest of {ref.uri} gave run {manifest.run_name!r}, step {manifest.step}"
        return ref

    def steps(self, backend: Any, run_name: str | None = None) -> list[int]:
        run_name = run_name or self.run_name
        refs = call_hook(backend, "list_checkpoints", run_name=run_name)
        name = getattr(backend, "name", None)
        stray = [r for r in refs if r.run_name != run_name or name is not None and r.backend != name]
        assert not stray, f"list_checkpoints of run {run_name!r} on backend {name!r} listed {stray}"
        return sorted(r.step for r in refs)

    def prune(self, backend: Any, keep_last: int = 1, protected: Iterable[int] = (), dry_run: bool = False,
              counted: Iterable[int] | None = None) -> list[CheckpointRef]:
        return call_hook(backend, "prune", run_name=self.run_name, keep_last=keep_last,
                         protected_steps=frozenset(protected), dry_run=dry_run,
                         counted_steps=None if counted is None else frozenset(counted))

    @staticmethod
    def read(backend: Any, ref: CheckpointRef, name: str) -> bytes:
        with call_hook(backend, "open_file", ref=ref, name=name) as f:
            return f.read()

    @staticmethod
    def past_grace(backend: Any) -> None:
        """Make every leftover written so far older than the backend's grace period."""
        backend.leftover_grace_s = 0.0
        time.sleep(0.05)

    # -- commit ---------------------------------------------------------------------------

    def test_a_committed_checkpoint_round_trips(self, backend):
        data = bytes(range(256)) * 40
        ref = self.save(backend, 7, files={"state.pt": data, "extra.pt": b"extra"})
        assert ref.step == 7 and ref.run_name == self.run_name and ref.path.rstrip("/").endswith(step_dirname(7))
        listed = call_hook(backend, "list_checkpoints", run_name=self.run_name)
        assert [(r.step, r.path) for r in listed] == [(7, ref.path)]
        manifest = call_hook(backend, "read_manifest", ref=listed[0])
        assert isinstance(manifest, Manifest) and manifest.step == 7 and manifest.run_name == self.run_name
        assert set(manifest.files) == {"state.pt", "extra.pt"}
        assert manifest.files["state.pt"].size == len(data)
        assert self.read(backend, listed[0], "state.pt") == data
        assert manifest.files["state.pt"].digest == hash_stream(io.BytesIO(data), manifest.files["state.pt"].digest.split(":")[0])[1]

    def test_nothing_is_listed_until_the_manifest_is_written_last(self, backend):
        self.save(backend, 1)
        fs = self.wrap_filesystem(backend)
        seen: list[list[int]] = []

        def last_file(f):
            f.write(b"the last file of step 2")
            seen.append(self.steps(backend))

        ref = self.save(backend, 2, files={"state.pt": b"state", "extra.pt": last_file})
        assert seen == [[1]], (f"while step 2's last file was written the listing showed {seen[0]}: it must show "
                               "step 1, committed, and not step 2, whose manifest comes last")
        assert self.steps(backend) == [1, 2]
        target = ref.path.rstrip("/") + "/"
        writes = [c for c in fs.requests("write") if fs.wrapped._strip_protocol(c.path).startswith(
            fs.wrapped._strip_protocol(target))]
        # A backend that commits by renaming a folder writes nothing into the final one itself.
        if writes:
            assert writes[-1].path.endswith(MANIFEST_NAME), \
                f"the manifest must be the last thing written into {target}; the last write was {writes[-1]}"
        if getattr(backend, "atomic_move", False):
            # A cut-off upload may leave part of a file under its name: the manifest only ever
            # arrives by a move.
            onto = [c for c in writes if c.path.endswith("/" + MANIFEST_NAME)]
            assert onto and all(c.method in MOVES for c in onto), f"with atomic_move, {onto} must be moves"

    def test_a_failed_write_leaves_nothing_committed_and_says_where(self, backend):
        self.save(backend, 1)
        for size in self.failing_write_sizes:
            def half_then_fail(f, size=size):
                f.write(b"x" * size)
                raise RuntimeError("serialisation failed")

            with pytest.raises(BackendError) as info:
                self.save(backend, 2, files={"state.pt": b"state", "extra.pt": half_then_fail})
            assert info.value.backend == backend.name
            assert "serialisation failed" in str(info.value) and step_dirname(2) in str(info.value)
            assert self.steps(backend) == [1]
            # An fsspec file left open publishes what it holds when it is garbage-collected, so
            # the failed save's frames (kept alive by the exception) go first.
            del info
            gc.collect()
            assert not [p for p in self.stored_files(backend) if step_dirname(2) in p], \
                f"a failed save of {size} bytes left files behind"
            assert self.unfinished_uploads(backend) == []

    def test_a_copied_file_that_is_not_what_the_manifest_expects_is_never_committed(self, backend, tmp_path):
        """A file given by ``source`` (the bytes another backend committed) comes with
        ``expected``: a copy whose size or digest differs is refused, and nothing is listed."""
        good = bytes(range(256)) * 40
        source = tmp_path / "state.pt"
        source.write_bytes(good)
        size, digest = hash_stream(io.BytesIO(good), "xxh3_128")
        self.save(backend, 1)
        for content, expected in ((good, FileEntry(size, "xxh3_128:" + "0" * 32)),  # a bit flipped on the way
                                  (good[:-1], FileEntry(size, digest))):  # a file cut short
            source.write_bytes(content)
            copied = attrs.evolve(payload(self.run_name, 2), files=(
                PayloadFile("state.pt", source=str(source), expected=expected),))
            with pytest.raises(Exception):  # noqa: B017 - the contract asks for a refusal, of no one type
                call_hook(backend, "save_resume", run_name=self.run_name, step=2, payload=copied)
            assert self.steps(backend) == [1], f"a copy that does not match {expected} was committed"

    def test_a_split_state_written_at_once_round_trips(self, backend):
        parts = {f"state-{i:02d}-of-04.pt": bytes([i]) * (5000 + i) for i in range(4)}
        ref = self.save(backend, 4, files={**parts, "extra.pt": b"extra"}, concurrency=4)
        manifest = call_hook(backend, "read_manifest", ref=ref)
        assert set(manifest.files) == {*parts, "extra.pt"}
        for name, data in parts.items():
            assert manifest.files[name].size == len(data)
            assert self.read(backend, ref, name) == data

    def test_one_failed_file_among_concurrent_writes_leaves_nothing_committed(self, backend):
        """With ``Payload.concurrency`` above 1 a backend may write files at the same time; one that
        fails must still leave no committed checkpoint and nothing behind, the others included."""
        self.save(backend, 1)
        stopped: list[BaseException] = []

        def good(f):
            try:
                for _ in range(100):
                    f.write(b"y" * 10_000)
                    time.sleep(0.002)
            except BaseException as exc:  # stopped because another file failed: fine
                stopped.append(exc)
                raise

        def bad(f):
            f.write(b"x" * 10_000)
            time.sleep(0.02)
            raise RuntimeError("part 2 failed")

        files = {f"state-{i:02d}-of-04.pt": good for i in range(4)}
        files["state-02-of-04.pt"] = bad
        with pytest.raises(BackendError) as info:
            self.save(backend, 2, files={**files, "extra.pt": b"extra"}, concurrency=4)
        assert info.value.backend == backend.name and "part 2 failed" in str(info.value)
        assert self.steps(backend) == [1]
        del info
        gc.collect()
        time.sleep(0.3)  # a write still going on after save_resume returned would show up now
        assert not [p for p in self.stored_files(backend) if step_dirname(2) in p], \
            "a failed save of a split state left files behind"
        assert self.unfinished_uploads(backend) == []

    def test_saving_a_step_again_replaces_it(self, backend):
        self.save(backend, 3, files={"state.pt": b"old", "extra.pt": b"old extra"})
        ref = self.save(backend, 3, files={"state.pt": b"new!", "extra.pt": b"new extra"})
        assert self.read(backend, ref, "state.pt") == b"new!" and self.read(backend, ref, "extra.pt") == b"new extra"
        assert call_hook(backend, "read_manifest", ref=ref).files["state.pt"].size == 4
        assert self.steps(backend) == [3]
        assert sorted(p.rsplit("/", 1)[-1] for p in self.stored_files(backend)) == \
            sorted([MANIFEST_NAME, "state.pt", "extra.pt"]), "something was left beside the step saved again"

    def test_a_step_saved_again_keeps_no_file_of_its_old_copy(self, backend):
        self.save(backend, 3, files={"state-00-of-02.pt": b"old", "state-01-of-02.pt": b"old"})
        ref = self.save(backend, 3, files={"state.pt": b"new!"})
        assert self.read(backend, ref, "state.pt") == b"new!"
        assert sorted(p.rsplit("/", 1)[-1] for p in self.stored_files(backend)) == [MANIFEST_NAME, "state.pt"], \
            "the step saved again keeps files of its old copy, or something was left beside it"

    def test_a_failed_save_of_a_stored_step_keeps_the_stored_copy(self, backend):
        ref = self.save(backend, 3, files={"state.pt": b"old"})

        def half_then_fail(f):
            f.write(b"x" * 10)
            raise RuntimeError("serialisation failed")

        with pytest.raises(BackendError) as info:
            self.save(backend, 3, files={"state.pt": b"new!", "extra.pt": half_then_fail})
        assert info.value.backend == backend.name and "serialisation failed" in str(info.value)
        del info
        gc.collect()
        assert self.steps(backend) == [3]
        assert self.read(backend, ref, "state.pt") == b"old"
        assert call_hook(backend, "read_manifest", ref=ref).files["state.pt"].size == 3
        assert sorted(p.rsplit("/", 1)[-1] for p in self.stored_files(backend)) == [MANIFEST_NAME, "state.pt"]
        assert self.unfinished_uploads(backend) == []

    @pytest.mark.parametrize("role", ["resume", "final"])
    def test_a_save_whose_check_for_a_stored_copy_fails_keeps_that_copy(self, backend, role):
        """Saving a step (or the final model) again asks the store whether a copy is committed:
        a store that does not answer that must not have the clean-up of the failed save delete
        the committed copy."""
        if role == "final" and not hasattr(backend, "publish_final"):
            pytest.skip(f"{type(backend).__name__} does not serve the final role")

        def save() -> CheckpointRef:
            # The hooks themselves: the helper's own reads would meet the fault injected below.
            if role == "resume":
                return call_hook(backend, "save_resume", run_name=self.run_name, step=3,
                                 payload=payload(self.run_name, 3, files={"state.pt": b"old"}))
            return call_hook(backend, "publish_final", run_name=self.run_name,
                             payload=payload(self.run_name, 3, {"final_model.pt": b"old"}, role="final"),
                             stored=[], algorithm=None, model=None)

        ref = save()
        fs = self.wrap_filesystem(backend)
        # The store misses that one question, then answers again (as the clean-up asks).
        fs.add("read", permanent("injected: the store did not answer"), path=MANIFEST_NAME, times=1)
        try:
            save()  # a backend that need not ask (a local disk swaps folders) may succeed
        except BackendError:
            pass
        fs.clear()
        name = "state.pt" if role == "resume" else "final_model.pt"
        assert self.read(backend, ref, name) == b"old"
        assert call_hook(backend, "read_manifest", ref=ref).files[name].size == 3

    # -- leftovers ------------------------------------------------------------------------

    def test_what_a_crash_leaves_is_not_listed_and_goes_after_the_grace_period(self, backend):
        self.save(backend, 1)
        self.write_leftover(backend, step_dirname(5), "state.pt", b"half a checkpoint")
        assert self.steps(backend) == [1]
        assert self.prune(backend) == [], "inside the grace period a leftover may be a save in flight"
        assert any(step_dirname(5) in p for p in self.stored_files(backend))
        self.past_grace(backend)
        would = self.prune(backend, dry_run=True)
        assert [(r.role, r.path.rstrip("/").rsplit("/", 1)[-1]) for r in would] == [("leftover", step_dirname(5))]
        assert any(step_dirname(5) in p for p in self.stored_files(backend)), "a dry run deletes nothing"
        assert [r.role for r in self.prune(backend)] == ["leftover"]
        assert not any(step_dirname(5) in p for p in self.stored_files(backend))
        assert self.steps(backend) == [1]

    def test_an_empty_leftover_folder_goes_after_the_grace_period(self, backend):
        self.save(backend, 1)
        if not self.make_empty_folder(backend, step_dirname(6)):
            # An object store has no folder without a file: nothing to see, nothing to clean.
            assert self.steps(backend) == [1] and self.prune(backend) == []
            return
        assert self.steps(backend) == [1]
        assert self.prune(backend) == [], "a young folder may be a save in flight"
        self.past_grace(backend)
        assert [r.role for r in self.prune(backend)] == ["leftover"]
        backend.fs.invalidate_cache()
        assert not backend.fs.exists(posixpath.join(self.run_folder(backend), step_dirname(6)))

    def test_prune_leaves_what_it_did_not_write(self, backend):
        self.save(backend, 1)
        self.write_leftover(backend, "tensorboard", "events.out", b"not a checkpoint")
        self.save(backend, 4, run_name="other-run")
        self.past_grace(backend)
        self.save(backend, 2)
        self.prune(backend, keep_last=1)
        assert f"{self.run_name}/tensorboard/events.out" in self.stored_files(backend)
        assert self.steps(backend) == [2]
        assert self.steps(backend, "other-run") == [4], "another run is not this run's to prune"

    def test_a_run_whose_name_begins_with_this_ones_is_another_run(self, backend):
        """A listing by prefix takes ``run-2/...`` for part of run ``run``: the prune after a save
        of one run then deletes the other's checkpoints. Each run lists, reads, prunes and
        deletes its own alone."""
        other = f"{self.run_name}-2"
        for s in (1, 2, 3):
            self.save(backend, s, run_name=other)
        self.save(backend, 2)
        assert self.steps(backend) == [2], "another run's checkpoints were listed as this run's"
        for ref in call_hook(backend, "list_checkpoints", run_name=self.run_name):
            manifest = call_hook(backend, "read_manifest", ref=ref)
            assert manifest.run_name == self.run_name, f"read_manifest of {ref.uri} gave run {manifest.run_name!r}"
        self.save(backend, 5)
        self.prune(backend, keep_last=1)
        assert self.steps(backend) == [5]
        assert self.steps(backend, other) == [1, 2, 3], "the prune of one run deleted another's checkpoints"
        if hasattr(backend, "delete_run"):
            call_hook(backend, "delete_run", run_name=self.run_name, dry_run=False)
            assert self.steps(backend) == []
            assert self.steps(backend, other) == [1, 2, 3], "delete_run of one run deleted another's checkpoints"

    # -- prune ----------------------------------------------------------------------------

    def test_prune_keeps_the_newest_and_protected_steps_and_a_dry_run_deletes_nothing(self, backend):
        # Across a digit boundary: steps ordered as text (from folder names) put 9 after 12.
        for s in range(7, 13):
            self.save(backend, s)
        would = self.prune(backend, keep_last=2, protected={8}, dry_run=True)
        assert sorted(r.step for r in would) == [7, 9, 10]
        assert self.steps(backend) == [7, 8, 9, 10, 11, 12], "a dry run deletes nothing"
        gone = self.prune(backend, keep_last=2, protected={8})
        assert sorted(r.step for r in gone) == [7, 9, 10]
        assert self.steps(backend) == [8, 11, 12]

    def test_prune_refuses_keep_last_below_one(self, backend):
        self.save(backend, 0)
        with pytest.raises(ValueError):
            self.prune(backend, keep_last=0)
        assert self.steps(backend) == [0]

    def test_only_counted_steps_count_toward_keep_last(self, backend):
        for s in range(5):
            self.save(backend, s)
        # 3 and 4 are newer than the newest counted one that is kept: never deleted.
        assert sorted(r.step for r in self.prune(backend, keep_last=1, counted={1, 2})) == [0, 1]
        assert self.steps(backend) == [2, 3, 4]
        # Fewer counted checkpoints than keep_last: nothing is deleted.
        assert self.prune(backend, keep_last=3, counted={4}) == []
        assert self.steps(backend) == [2, 3, 4]

    def test_a_checkpoint_damaged_after_its_commit_does_not_count(self, backend):
        refs = [self.save(backend, s) for s in range(3)]
        self.overwrite(backend, refs[2], "state.pt", b"truncated")
        self.prune(backend, keep_last=1)
        # Step 2 disagrees with its manifest, so step 1 is the newest real checkpoint and stays.
        assert self.steps(backend) == [1, 2]

    def test_a_checkpoint_of_a_newer_ckptkit_is_refused_and_never_pruned(self, backend):
        refs = [self.save(backend, s) for s in range(3)]
        self.prune(backend, keep_last=3)  # what a later prune knows of these, as after any save
        # Of another size, as a later version's would be: a store whose times resolve to the
        # second shows a same-sized file rewritten within it as the one it read before.
        newer = re.sub(rb'"ckptkit_version": "[^"]*"', b'"ckptkit_version": "99.0.0"',
                       self.read(backend, refs[2], MANIFEST_NAME)).replace(b'"version": 2', b'"version": 3, "new": 1')
        self.overwrite(backend, refs[2], MANIFEST_NAME, newer)
        with pytest.raises(IncompatibleCheckpointError):
            call_hook(backend, "read_manifest", ref=refs[2])
        self.past_grace(backend)
        self.prune(backend, keep_last=1)
        # Neither counted (step 1 is the one kept) nor taken for a leftover.
        assert self.steps(backend) == [1, 2]
        assert self.read(backend, refs[2], MANIFEST_NAME) == newer

    def test_prune_never_deletes_a_save_in_flight(self, backend):
        self.save(backend, 1)
        self.past_grace(backend)
        pruned: list[list[CheckpointRef]] = []

        def prune_meanwhile(f):
            f.write(b"the first half")
            pruned.append(self.prune(backend, keep_last=1))
            f.write(b"the second half")

        self.save(backend, 2, files={"state.pt": prune_meanwhile})
        assert pruned == [[]]
        assert self.steps(backend) == [1, 2]

    def test_delete_run_removes_every_checkpoint_and_leftover_but_not_the_final_model(self, backend):
        if not hasattr(backend, "delete_run"):
            pytest.skip(f"{type(backend).__name__} does not implement the optional delete_run hook")
        for s in range(3):
            self.save(backend, s)
        self.write_leftover(backend, step_dirname(9), "state.pt", b"half")
        has_final = hasattr(backend, "publish_final")
        if has_final:
            call_hook(backend, "publish_final", run_name=self.run_name,
                      payload=payload(self.run_name, 2, {"final_model.pt": b"model"}, role="final"),
                      stored=[], algorithm=None, model=None)
        would = call_hook(backend, "delete_run", run_name=self.run_name, dry_run=True)
        assert sorted(r.step for r in would if r.role != "leftover") == [0, 1, 2]
        assert self.steps(backend) == [0, 1, 2]
        call_hook(backend, "delete_run", run_name=self.run_name, dry_run=False)
        assert self.steps(backend) == []
        left = self.stored_files(backend)
        assert not [p for p in left if "step-" in p]
        if has_final and hasattr(backend, "final_ref"):
            assert call_hook(backend, "final_ref", run_name=self.run_name) is not None

    # -- requests -------------------------------------------------------------------------

    def test_listing_is_one_request_whatever_the_number_of_checkpoints(self, backend, store_requests):
        for s in range(8):
            self.save(backend, s)
        fs = self.wrap_filesystem(backend)
        fs.clear()
        before = store_requests() if store_requests is not None else None
        assert self.steps(backend) == list(range(8))
        asked = fs.requests()
        assert len(asked) <= self.listing_requests, f"one listing made {len(asked)} requests: {asked}"
        if store_requests is not None:
            answered = store_requests() - before
            # At least one: a listing must show what other processes committed since the last.
            assert 1 <= answered <= self.listing_requests, f"the store answered {answered} requests for one listing"

    def test_transient_errors_are_retried(self, backend):
        fs = self.wrap_filesystem(backend)  # skips a backend without a filesystem to put faults in front of
        attempts = getattr(getattr(backend, "retry", None), "attempts", 0)
        assert attempts >= 2, "build the backend with a RetryPolicy of at least 2 attempts for this suite"
        listing = fs.add("list", transient())
        fs.add("write", transient(), path="state.pt")
        fs.add("write", transient(), path=MANIFEST_NAME)
        ref = self.save(backend, 1)
        assert self.steps(backend) == [1]
        # Planted only now, so that no request of the save can use it up: read_manifest's own.
        reading = fs.add("read", transient(), path=MANIFEST_NAME)
        assert call_hook(backend, "read_manifest", ref=ref).step == 1
        assert listing.fired == 1 and reading.fired == 1
        assert self.read(backend, ref, "state.pt").startswith(b"state of step 1")

    def test_a_store_that_keeps_failing_is_unavailable_not_empty(self, backend):
        ref = self.save(backend, 1)
        fs = self.wrap_filesystem(backend)
        down = fs.add("list", transient(), times=None)
        with pytest.raises(StorageUnavailableError) as info:
            self.steps(backend)
        assert info.value.backend == backend.name
        assert down.fired == backend.retry.attempts, "each attempt of the retry policy, then no more"
        fs.clear()
        fs.add("read", transient(), path=MANIFEST_NAME, times=None)
        with pytest.raises(StorageUnavailableError) as info:
            call_hook(backend, "read_manifest", ref=ref)
        assert info.value.backend == backend.name and MANIFEST_NAME in str(info.value)
        fs.clear()
        denied = fs.add("list", permanent(), times=None)
        with pytest.raises(StorageUnavailableError):
            self.steps(backend)
        assert denied.fired == 1, "a refusal is not retried"

    # -- secrets --------------------------------------------------------------------------

    def test_secrets_never_appear_in_errors_logs_or_locations(self, backend, secrets, caplog):
        # ckptkit's and the backend's own logs; a client library's debug log of its requests
        # (botocore's shows the key id) is outside what a backend can scrub.
        for logger in {"ckptkit", type(backend).__module__.split(".")[0]}:
            caplog.set_level(logging.DEBUG, logger=logger)
        ref = self.save(backend, 1)
        leaked = " and ".join(secrets)
        shown: list[str] = [repr(backend), ref.uri]

        def echo(f):
            raise RuntimeError(f"the client echoed its credentials: {leaked}")

        with pytest.raises(Exception) as info:
            self.save(backend, 2, files={"state.pt": echo})
        shown.append(str(info.value))
        fs = self.wrap_filesystem(backend)
        fs.add("list", lambda what: ConnectionResetError(f"reset ({leaked})"), times=None)
        with pytest.raises(StorageUnavailableError) as info:
            self.steps(backend)
        shown.append(str(info.value))
        fs.clear()
        fs.add("any", lambda what: PermissionError(f"denied for {leaked}"), times=None)
        if hasattr(backend, "probe"):
            shown.append(repr(call_hook(backend, "probe")))
        shown.append(caplog.text)
        for secret in secrets:
            for text in shown:
                assert secret not in text, f"a credential was shown: {text}"
        assert "<redacted>" in " ".join(shown), "the failures above should have named the echoed credential, scrubbed"

    # -- probe ----------------------------------------------------------------------------

    def test_probe_reports_each_operation_and_cleans_up(self, backend):
        if not hasattr(backend, "probe"):
            pytest.skip(f"{type(backend).__name__} does not implement the optional probe hook")
        before = self.stored_files(backend)
        result = call_hook(backend, "probe")
        assert result and set(result.values()) == {"ok"}, result
        assert self.stored_files(backend) == before, "the probe must remove what it wrote"

    def test_probe_reports_a_refused_write_without_raising(self, backend):
        if not hasattr(backend, "probe"):
            pytest.skip(f"{type(backend).__name__} does not implement the optional probe hook")
        fs = self.wrap_filesystem(backend)
        fs.add("write", permanent(), times=None)
        result = call_hook(backend, "probe")
        assert result["write"] != "ok" and "PermissionError" in result["write"], result
        assert any(v != "ok" for k, v in result.items() if k != "write"), "the probe object never appeared"

    # -- the final model and sharded checkpoints --------------------------------------------

    def test_the_final_model_is_not_a_resume_checkpoint(self, backend):
        if not hasattr(backend, "publish_final"):
            pytest.skip(f"{type(backend).__name__} does not serve the final role")
        self.save(backend, 1)
        ref = call_hook(backend, "publish_final", run_name=self.run_name,
                        payload=payload(self.run_name, 1, {"final_model.pt": b"the model"}, role="final"),
                        stored=[], algorithm=None, model=None)
        assert isinstance(ref, CheckpointRef) and ref.role == "final"
        assert (ref.backend, ref.run_name) == (getattr(backend, "name", ref.backend), self.run_name), ref
        assert self.steps(backend) == [1]
        if hasattr(backend, "final_ref"):
            found = call_hook(backend, "final_ref", run_name=self.run_name)
            assert found is not None and found.step == 1 and found.path == ref.path
            assert self.read(backend, found, "final_model.pt") == b"the model"
        self.past_grace(backend)
        assert self.prune(backend, keep_last=1) == []

    def test_a_later_final_model_is_stored_beside_the_earlier_one_never_over_it(self, backend):
        """A registry may point at a published final model's bytes (MLflow records an object
        store's URI instead of uploading a copy): a later one of the run (finalize again, ``ckptkit
        publish --step``) goes beside it, unless it is the newest one's bytes again. What a killed
        publish left is passed over, never written into, and goes after the grace period; the
        finals stay."""
        if not hasattr(backend, "publish_final"):
            pytest.skip(f"{type(backend).__name__} does not serve the final role")

        def publish(step: int, data: bytes) -> CheckpointRef:
            return call_hook(backend, "publish_final", run_name=self.run_name,
                             payload=payload(self.run_name, step, {"final_model.pt": data}, role="final"),
                             stored=[], algorithm=None, model=None)

        first = publish(5, b"the first model")
        self.write_leftover(backend, final_dirname(2), "final_model.pt", b"half a model")
        second = publish(9, b"the second model")
        assert first.path != second.path, f"both final models were stored at {first.uri}"
        assert posixpath.basename(second.path.rstrip("/")) == final_dirname(3), second.path
        assert self.read(backend, first, "final_model.pt") == b"the first model"
        assert self.read(backend, second, "final_model.pt") == b"the second model"
        if hasattr(backend, "final_ref"):
            newest = call_hook(backend, "final_ref", run_name=self.run_name)
            assert newest is not None and (newest.path, newest.step) == (second.path, 9), newest
        # The newest one's bytes again (a finished job started again): named, not kept twice.
        held = self.stored_files(backend)
        assert publish(9, b"the second model").path == second.path
        assert self.stored_files(backend) == held
        # Unless the newest one's bytes changed since (its size and manifest as they were): the
        # model goes beside it again, read back whole.
        self.write_leftover(backend, final_dirname(3), "final_model.pt", b"the secOnd model")
        third = publish(9, b"the second model")
        assert posixpath.basename(third.path.rstrip("/")) == final_dirname(4), third.path
        assert self.read(backend, third, "final_model.pt") == b"the second model"
        self.past_grace(backend)
        assert [posixpath.basename(r.path.rstrip("/")) for r in self.prune(backend)] == [final_dirname(2)]
        assert self.read(backend, first, "final_model.pt") == b"the first model"
        assert self.read(backend, third, "final_model.pt") == b"the second model"
        if hasattr(backend, "final_step"):
            # An older step published last is the newest folder, not the furthest model.
            publish(3, b"an older step's model")
            assert call_hook(backend, "final_step", run_name=self.run_name, algorithm=None, training_id=None) == 9

    def test_a_sharded_checkpoint_is_committed_by_its_manifest(self, backend):
        if not hasattr(backend, "stage_sharded"):
            pytest.skip(f"{type(backend).__name__} does not serve format: dcp")
        self.save(backend, 1)
        path = call_hook(backend, "stage_sharded", run_name=self.run_name, step=2)
        shard = b"shard bytes" * 100
        backend.fs.makedirs(path, exist_ok=True)
        with backend.fs.open(posixpath.join(path, "__0_0.distcp"), "wb") as f:
            f.write(shard)
        assert self.steps(backend) == [1], "staged shards are not a checkpoint"
        size, digest = hash_stream(io.BytesIO(shard))
        ref = call_hook(backend, "commit_sharded", run_name=self.run_name, step=2, path=path,
                        payload=payload(self.run_name, 2, {}, format="dcp"),
                        files={"__0_0.distcp": FileEntry(size=size, digest=digest)})
        assert self.steps(backend) == [1, 2]
        assert call_hook(backend, "read_manifest", ref=ref).files["__0_0.distcp"].size == size
        doomed = call_hook(backend, "stage_sharded", run_name=self.run_name, step=3)
        call_hook(backend, "discard_sharded", path=doomed)
        assert self.steps(backend) == [1, 2]
        assert not [p for p in self.stored_files(backend) if step_dirname(3) in p]


class FinalBackendTests:
    """The contract of a ``final`` backend that keeps no resume checkpoints and no files that
    ``ckptkit publish`` reads back (a model registry). Subclass it and provide ``backend``.

    A backend that serves the resume role too (a ``FileBackend``) is checked by
    ``ResumeBackendTests``, whose final-model test covers its ``publish_final``.

    Attributes a subclass may change: ``run_name``, the run the tests publish (a fresh
    ``backend`` per test keeps runs apart, or give each subclass its own), and ``algorithm``,
    the tag passed to the hooks.
    """

    run_name = "run"
    algorithm: str | None = "sft"

    @pytest.fixture
    def backend(self) -> Any:
        """A fresh backend instance with a ``name`` (the one its ``from_config`` was given),
        over a store where the run holds no model yet."""
        raise NotImplementedError("subclasses of FinalBackendTests provide the 'backend' fixture")

    def publish(self, backend: Any, step: int, data: bytes | None = None,
                stored: Iterable[CheckpointRef] = (), known: bool = False,
                training_id: str | None = None) -> tuple[CheckpointRef, str]:
        """``publish_final`` of a final model of ``step`` (``data``: its file's bytes) as ckptkit
        calls it; the ref it returned and the file's digest. The file comes as ``finalize``
        gives it to the first backend that stores it, to be serialised, its size and checksum
        unknown; ``known``: as ``ckptkit publish`` gives it, with them (``expected``);
        ``training_id``: the training that made it."""
        data = data if data is not None else f"the final model of step {step}".encode() * 50
        size, digest = hash_stream(io.BytesIO(data))
        files = (PayloadFile("final_model.pt", write=lambda f: f.write(data),
                             expected=FileEntry(size, digest) if known else None),)
        final = Payload(run_name=self.run_name, step=step, epoch=step // 10, format="torch", role="final",
                        metrics={"loss": 1.0 / (step + 1)}, files=files, training_id=training_id)
        ref = call_hook(backend, "publish_final", run_name=self.run_name, payload=final, stored=list(stored),
                        algorithm=self.algorithm, model=None, state={})
        return ref, digest

    def find(self, backend: Any, digest: str) -> CheckpointRef | None:
        if not hasattr(backend, "find_published"):
            pytest.skip(f"{type(backend).__name__} does not implement the optional find_published hook")
        return call_hook(backend, "find_published", run_name=self.run_name, digest=digest, algorithm=self.algorithm)

    def test_a_published_model_is_named_by_a_ref_of_this_backend_and_run(self, backend):
        ref, _ = self.publish(backend, 5)
        assert isinstance(ref, CheckpointRef), f"publish_final returned {type(ref).__name__}, not a CheckpointRef"
        assert (ref.backend, ref.run_name) == (backend.name, self.run_name), ref
        assert ref.uri and PLANTED_SECRET not in ref.uri

    def test_the_ref_is_this_backends_own_though_another_backend_holds_the_model(self, backend):
        """``stored`` names the copies earlier final backends made: a registry may record one's
        URI instead of uploading the file, but the ref it returns is its own."""
        elsewhere = CheckpointRef(backend="archive", run_name=self.run_name, step=5, path="bucket/run/final",
                                  uri="s3://bucket/run/final", role="final")
        ref, _ = self.publish(backend, 5, stored=[elsewhere])
        assert isinstance(ref, CheckpointRef) and (ref.backend, ref.run_name) == (backend.name, self.run_name), ref

    @pytest.mark.parametrize("known", [False, True], ids=["from finalize", "from publish"])
    def test_find_published_finds_a_model_by_its_checksum_and_nothing_else(self, backend, known):
        assert self.find(backend, "xxh3-128:" + "0" * 32) is None, "nothing was published with that checksum"
        ref, digest = self.publish(backend, 5, known=known)
        found = self.find(backend, digest)
        assert found is not None, "find_published did not find the model just published by its checksum"
        assert (found.backend, found.run_name, found.uri) == (backend.name, self.run_name, ref.uri), (found, ref)
        assert self.find(backend, "xxh3-128:" + "0" * 32) is None

    def test_a_later_model_leaves_what_an_earlier_one_is_published_as(self, backend):
        """A published version is kept as it was: a second model of the run (a later finalize,
        ``ckptkit publish --step``) is published beside it, never over it."""
        first, first_digest = self.publish(backend, 5)
        second, second_digest = self.publish(backend, 9, data=b"another model" * 100)
        assert first.uri != second.uri, f"both models were published as {first.uri}"
        found_first, found_second = self.find(backend, first_digest), self.find(backend, second_digest)
        assert found_first is not None and found_first.uri == first.uri, (found_first, first)
        assert found_second is not None and found_second.uri == second.uri, (found_second, second)

    def test_final_step_names_the_newest_step_of_the_run_published(self, backend):
        """What a training restarted finished asks, to publish what a job stopped inside
        ``finalize`` left unpublished (answering None for a run holding one would publish it
        again at every restart; answering a step for a run holding none, never)."""
        if not hasattr(backend, "final_step"):
            pytest.skip(f"{type(backend).__name__} does not implement the optional final_step hook")
        assert call_hook(backend, "final_step", run_name=self.run_name, algorithm=self.algorithm, training_id=None) is None
        self.publish(backend, 5)
        self.publish(backend, 9, data=b"another model" * 100)
        assert call_hook(backend, "final_step", run_name=self.run_name, algorithm=self.algorithm, training_id=None) == 9

    def test_final_step_counts_the_final_models_of_the_training_asking(self, backend):
        """A final model of the same run name from another training (another experiment's, the
        name used again after ``ckptkit prune --all``) is not the asking one's: counted, it kept
        a restarted training's own from being published. One that names no training (written
        before they did) counts for every training."""
        if "training_id" not in inspect.signature(getattr(backend, "final_step", lambda: None)).parameters:
            pytest.skip(f"{type(backend).__name__}'s final_step does not take training_id (optional)")

        def newest(training_id: str | None) -> int | None:
            return call_hook(backend, "final_step", run_name=self.run_name, algorithm=self.algorithm,
                             training_id=training_id)

        self.publish(backend, 9, training_id="training-a")
        assert newest("training-b") is None, "another training's final model was counted"
        assert (newest("training-a"), newest(None)) == (9, 9)
        self.publish(backend, 12, data=b"a model of no named training" * 50)
        assert (newest("training-b"), newest("training-a")) == (12, 12)

    def test_check_final_answers_a_list_of_lines(self, backend):
        if not hasattr(backend, "check_final"):
            pytest.skip(f"{type(backend).__name__} does not implement the optional check_final hook")
        problems = call_hook(backend, "check_final", run_name=self.run_name, algorithm=self.algorithm)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems), problems
