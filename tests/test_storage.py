"""The storage layer beyond the contract that every backend proves through ``ckptkit.testing``
(see ``tests/test_local_conformance.py``): local commits by rename, full disks, stores without
implicit folders or with an atomic move, killed saves."""

import errno
import os
import posixpath
import signal
import subprocess
import sys
import time

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

import ckptkit
from ckptkit import BackendError, CheckpointManager, StorageFullError, StorageUnavailableError, storage
from ckptkit.checkpoint import Payload, PayloadFile
from ckptkit.local import LocalBackend
from fsspec.implementations.local import LocalFileSystem
from ckptkit.manifest import FileEntry
from ckptkit.retry import RetryPolicy
from ckptkit.storage import FileBackend, step_dirname

from ckpt_helpers import assert_same_state, local_config, make_model, small_tmpfs, train_step


def payload(step, data=b"x" * 100, fail=False):
    def write(f):
        f.write(data[: len(data) // 2])
        if fail:
            raise OSError("disk full")
        f.write(data[len(data) // 2:])

    return Payload(run_name="r", step=step, epoch=None, format="torch", files=(PayloadFile("state.pt", write=write),))


def steps(backend):
    return sorted(r.step for r in backend.list_checkpoints(run_name="r"))


def test_probe_reports_failure_for_unwritable_root(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = LocalBackend.from_config("bad", {"path": str(blocker / "root")}).probe()
    assert result["write"].startswith(("NotADirectoryError", "FileExistsError")), result


def test_run_name_cannot_escape_root(tmp_path):
    b = LocalBackend.from_config("d", {"path": str(tmp_path)})
    with pytest.raises(ckptkit.ConfigError):
        b.run_path("../outside")


KILLED_SAVE = """
import os, signal, sys, torch, ckptkit
from ckptkit.checkpoint import Payload
sys.path.insert(0, {tests!r})
from ckpt_helpers import local_config, make_model, train_step
import pathlib
ck = ckptkit.CheckpointManager.from_config(local_config(pathlib.Path({root!r}), keep=5, final=False))
model, opt = make_model()
for step in range(2):
    train_step(model, opt)
    ck.save(step=step, model=model, optimizer=opt)
torch.save(model.state_dict(), {expected!r})
train_step(model, opt)
# The process dies after the files of step 2 are written and before its manifest.
Payload.manifest = lambda self, files: os.kill(os.getpid(), signal.SIGKILL)
ck.save(step=2, model=model, optimizer=opt)
"""


def test_save_killed_before_its_manifest_is_not_restored(tmp_path, pm):
    script = KILLED_SAVE.format(tests=os.path.dirname(__file__), root=str(tmp_path), expected=str(tmp_path / "s1.pt"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "scratch/exp"
    leftovers = [n for n in os.listdir(run) if n.startswith(".tmp-step-0000000002")]
    assert leftovers and (run / leftovers[0] / "state.pt").stat().st_size > 0, "the files were written"
    assert not (run / leftovers[0] / "manifest.json").exists()

    cfg = local_config(tmp_path, keep=5, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert [r.step for r in ck.list_checkpoints()] == [1, 0]
    model, opt = make_model(seed=4)
    restored = ck.restore(model, opt)
    assert restored.step == 1 and not restored.skipped
    import torch
    assert_same_state(model.state_dict(), torch.load(tmp_path / "s1.pt", weights_only=True))

    # The restore deletes nothing; the first save after it removes what the killed save left (its
    # folder names that process, which is gone), before the grace period.
    assert leftovers[0] in os.listdir(run)
    train_step(model, opt)
    ck.save(step=2, model=model, optimizer=opt)
    ck.wait()
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    assert [r.step for r in ck.list_checkpoints()] == [2, 1, 0]


def test_local_save_interrupted_by_keyboard_interrupt_leaves_no_temp_folder(tmp_path):
    local = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    local.save_resume(run_name="r", step=1, payload=payload(1))

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    broken = Payload(run_name="r", step=2, epoch=None, format="torch",
                     files=(PayloadFile("state.pt", write=interrupted),))
    with pytest.raises(KeyboardInterrupt):
        local.save_resume(run_name="r", step=2, payload=broken)
    assert sorted(os.listdir(tmp_path / "root" / "r")) == [step_dirname(1)]
    assert [r.step for r in local.list_checkpoints(run_name="r")] == [1]


class _InterruptedFile:
    """A file whose third write is where a Ctrl-C lands."""

    def __init__(self, f):
        self._f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return self._f.write(data)

    def flush(self):
        self._f.flush()


def test_a_keyboard_interrupt_inside_torch_save_stays_an_interrupt(tmp_path):
    """torch.save turns what its file's write raised into a RuntimeError ("unexpected pos"): a
    Ctrl-C there came out of save() as a SaveError blaming the disk, and with on_error="warn"
    training went on."""
    import torch

    from ckptkit.fanout import torch_writer

    local = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    local.save_resume(run_name="r", step=1, payload=payload(1))
    write = torch_writer({"model": {f"w{i}": torch.zeros(64) for i in range(8)}})
    interrupted = Payload(run_name="r", step=2, epoch=None, format="torch",
                          files=(PayloadFile("state.pt", write=lambda f: write(_InterruptedFile(f))),))
    with pytest.raises(KeyboardInterrupt):
        local.save_resume(run_name="r", step=2, payload=interrupted)
    assert [r.step for r in local.list_checkpoints(run_name="r")] == [1]
    assert sorted(os.listdir(tmp_path / "root" / "r")) == [step_dirname(1)]

    # Any other failure of a write is still the storage's, also in a handler that saves at a
    # Ctrl-C (where the interrupt being handled is the failure's context).
    write_failing = Payload(run_name="r", step=2, epoch=None, format="torch",
                            files=(PayloadFile("state.pt", write=lambda f: write(_Failing(f))),))
    with pytest.raises(BackendError, match="could not store"):
        local.save_resume(run_name="r", step=2, payload=write_failing)
    with pytest.raises(BackendError, match="could not store"):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            local.save_resume(run_name="r", step=2, payload=write_failing)


class _ShardWriteInterruptedFS(LocalFileSystem):
    """Local files where, once ``on``, the first write into a DCP shard is where a Ctrl-C lands."""

    on = False

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if _ShardWriteInterruptedFS.on and "w" in mode and str(path).endswith(".distcp"):
            def interrupted(data):
                raise KeyboardInterrupt

            f.write = interrupted
        return f


class _ShardWriteInterruptedBackend(LocalBackend):
    @classmethod
    def from_config(cls, name, options):
        backend = super().from_config(name, options)
        backend.fs = _ShardWriteInterruptedFS()
        return backend


def test_a_keyboard_interrupt_inside_dcps_write_stays_an_interrupt(tmp_path, pm, monkeypatch):
    """DCP wraps whatever a rank raised into its CheckpointException: a Ctrl-C while a shard was
    written came out of save() as a failing backend, and with on_error="warn" training went on."""
    import torch

    pm.add_backend_type("interrupting", _ShardWriteInterruptedBackend)
    cfg = {"run_name": "r", "backends": {"disk": {"type": "interrupting", "path": str(tmp_path / "root")}},
           "roles": {"resume": {"backends": ["disk"], "format": "dcp", "keep_last": 2, "every_n_steps": 1}}}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm, on_error="warn")
    model = torch.nn.Linear(4, 4)
    ck.save(step=1, model=model)
    monkeypatch.setattr(_ShardWriteInterruptedFS, "on", True)
    with pytest.raises(KeyboardInterrupt):
        ck.save(step=2, model=model)
    monkeypatch.setattr(_ShardWriteInterruptedFS, "on", False)
    assert [r.step for r in ck.list_checkpoints()] == [1]
    ck.close()


class _Failing(_InterruptedFile):
    """A file whose third write fails as a disk does: inside torch's own writer, as a Ctrl-C would."""

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise OSError(5, "Input/output error")
        return self._f.write(data)


@pytest.mark.skipif(__import__("ckptkit.local").local._renameat2 is None,
                    reason="renameat2 needs Linux with glibc 2.28 or later")
def test_replacing_a_local_checkpoint_is_one_atomic_swap(tmp_path, monkeypatch):
    import ckptkit.local

    backend = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    backend.save_resume(run_name="r", step=3, payload=payload(3, b"old"))
    # Were the old copy moved aside and the new one moved in by two renames, a crash in between
    # would leave step 3 with no copy at all; the swap moves nothing aside.
    real_rename, moved = os.rename, []

    def only_refused(src, dst):
        real_rename(src, dst)  # refused (ENOTEMPTY) onto the committed copy: nothing moved
        moved.append((src, dst))

    monkeypatch.setattr(ckptkit.local.os, "rename", only_refused)
    ref = backend.save_resume(run_name="r", step=3, payload=payload(3, b"new!"))
    assert moved == [], "the old copy was moved aside: a crash there would lose step 3"
    with backend.open_file(ref=ref, name="state.pt") as f:
        assert f.read() == b"new!"
    assert sorted(os.listdir(tmp_path / "root/r")) == ["step-0000000003"]


def test_a_step_another_process_commits_while_this_one_commits_it_is_replaced_not_an_error(tmp_path, monkeypatch):
    """Two trainings writing one run (a job started again while the first still runs) may commit
    the same step at the same moment: the second rename finds the folder there and swaps, as a
    step saved again does, rather than failing with a bare "Directory not empty"."""
    import ckptkit.local

    ours = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    theirs = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    real_rename, raced = os.rename, []

    def commit_theirs_first(src, dst):
        if not raced and os.path.basename(dst) == step_dirname(5):
            raced.append(dst)  # their whole save, between our last look and our rename
            theirs.save_resume(run_name="r", step=5, payload=payload(5, b"theirs"))
        real_rename(src, dst)

    monkeypatch.setattr(ckptkit.local.os, "rename", commit_theirs_first)
    ref = ours.save_resume(run_name="r", step=5, payload=payload(5, b"ours!"))
    assert raced
    with ours.open_file(ref=ref, name="state.pt") as f:
        assert f.read() == b"ours!"
    assert sorted(os.listdir(tmp_path / "root/r")) == [step_dirname(5)]
    (listed,) = ours.list_checkpoints(run_name="r")
    assert ours.read_manifest(ref=listed).files["state.pt"].size == len(b"ours!")


class _FullDiskFile(LocalFileOpener):
    """A real local file on a disk that holds ``fs.budget`` more bytes, then fails like a full one."""

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.fs.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.fs.budget -= n
        return super().write(data)


class _FullDiskFS(LocalFileSystem):
    """Local disk behind a filesystem whose free space runs out after ``budget`` bytes."""

    def __init__(self, budget, **kwargs):
        super().__init__(auto_mkdir=True, skip_instance_cache=True, **kwargs)
        self.budget = budget

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        path = self._strip_protocol(path)
        if "w" in mode:
            self.makedirs(self._parent(path), exist_ok=True)
            return _FullDiskFile(path, mode, fs=self, **kwargs)
        return super()._open(path, mode, block_size=block_size, **kwargs)


def test_a_full_disk_behind_a_streaming_backend_is_named_not_torchs_unexpected_pos(tmp_path):
    fs = _FullDiskFS(budget=64 * 1024)
    backend = FileBackend("nfs", fs, str(tmp_path / "root"))
    backend.save_resume(run_name="r", step=1, payload=payload(1))
    big = Payload(run_name="r", step=2, epoch=None, format="torch", files=(
        PayloadFile("state.pt", write=lambda f: torch.save({"w": torch.zeros(256 * 1024)}, f)),))
    with pytest.raises(StorageFullError) as info:
        backend.save_resume(run_name="r", step=2, payload=big)
    message = str(info.value)
    assert info.value.backend == "nfs" and message.startswith("backend 'nfs': no space left on ")
    assert f"{tmp_path}/root" in message and "step-0000000002" in message and "keep_last" in message
    assert "unexpected pos" not in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert steps(backend) == [1]
    assert not [p for p in fs.find(str(tmp_path / "root")) if "0000000002" in p], "nothing of the failed save is left"


@pytest.mark.parametrize("kind", ["local", "plain-fs"])
def test_empty_leftover_folders_go_after_the_grace_period(tmp_path, kind):
    """A save killed right after creating its folder leaves one with no file in it, which a
    listing of files never shows; any backend whose storage has folders must see and remove it."""
    root = tmp_path / "root"
    if kind == "local":
        backend = LocalBackend.from_config("disk", {"path": str(root), "leftover_grace_s": 60})
    else:
        backend = FileBackend("plain", LocalFileSystem(auto_mkdir=True, skip_instance_cache=True), str(root),
                              leftover_grace_s=60)
    backend.save_resume(run_name="r", step=1, payload=payload(1))
    run = root / "r"
    old = [run / "step-0000000007", run / ".tmp-step-0000000008-abcdef012345", run / ".trash-final-0123456789ab"]
    young = run / ".tmp-step-0000000009-abcdef012345"
    foreign = run / "notes"
    for folder in [*old, young, foreign]:
        folder.mkdir()
    (old[1] / "nested").mkdir()
    an_hour_ago = time.time() - 3600
    for folder in [*old, foreign]:
        os.utime(folder, (an_hour_ago, an_hour_ago))
    would = backend.prune(run_name="r", keep_last=1, protected_steps=frozenset(), dry_run=True, counted_steps=None)
    assert sorted(os.path.basename(r.path) for r in would) == sorted(f.name for f in old)
    assert {r.role for r in would} == {"leftover"} and all(f.exists() for f in old), "a dry run deletes nothing"
    backend.prune(run_name="r", keep_last=1, protected_steps=frozenset(), dry_run=False, counted_steps=None)
    assert not any(f.exists() for f in old)
    assert young.exists(), "a young folder may be a save in flight"
    assert foreign.exists(), "a folder ckptkit does not write is not its to delete"
    assert steps(backend) == [1]


class _DroppingFS(LocalFileSystem):
    """A store that, once ``down``, fails every listing and read the way a dropped network does."""

    down = False

    def _refuse(self, path):
        if self.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"connection refused for {path}")

    def find(self, path, *args, **kwargs):
        self._refuse(path)
        return super().find(path, *args, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        self._refuse(path)
        return super().cat_file(path, *args, **kwargs)


def test_a_store_that_keeps_failing_is_storage_unavailable_with_its_cause_not_a_corrupt_checkpoint(tmp_path):
    fs = _DroppingFS(auto_mkdir=True, skip_instance_cache=True)
    backend = FileBackend("nas", fs, str(tmp_path / "root"), retry=RetryPolicy(attempts=2, backoff_s=0, max_backoff_s=0))
    ref = backend.save_resume(run_name="r", step=1, payload=payload(1))
    fs.down = True
    with pytest.raises(StorageUnavailableError) as info:
        backend.list_checkpoints(run_name="r")
    assert info.value.backend == "nas"
    assert f"could not list file://{tmp_path}/root/r" in str(info.value) and "gave up after 2 attempts" in str(info.value)
    assert isinstance(info.value.__cause__.last, ConnectionRefusedError)
    with pytest.raises(StorageUnavailableError) as info:
        backend.read_manifest(ref=ref)
    assert info.value.backend == "nas" and f"{ref.uri}/manifest.json" in str(info.value)
    assert isinstance(info.value.__cause__.last, ConnectionRefusedError)


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MiB filesystem (a tmpfs; mounting needs root), filled up to its last byte."""
    yield from small_tmpfs(tmp_path, "1m")


def test_a_full_disk_at_the_commit_of_a_sharded_checkpoint_is_named(full_disk):
    backend = LocalBackend.from_config("disk", {"path": str(full_disk)})
    staged = backend.stage_sharded(run_name="r", step=3)
    with open(os.path.join(staged, "__0_0.distcp"), "wb") as f:
        f.write(b"s")
    with open(full_disk / "ballast", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:  # the shards took the rest of the disk
            f.write(b"\0" * 65536)
    empty = Payload(run_name="r", step=3, epoch=None, format="dcp", files=())
    with pytest.raises(StorageFullError) as info:
        backend.commit_sharded(run_name="r", step=3, path=staged, payload=empty, files={"__0_0.distcp": FileEntry(1, "x:0")})
    assert str(info.value).startswith(f"backend 'disk': no space left on {full_disk} while writing the manifest of {staged}")
    assert info.value.__cause__.errno == errno.ENOSPC
    assert backend.list_checkpoints(run_name="r") == []


def test_a_sharded_commit_naming_a_file_the_folder_does_not_hold_whole_is_refused(tmp_path):
    """The ranks wrote onto disks of their own (tests/test_distributed.py makes that for real):
    the manifest would name files that no restore finds."""
    backend = LocalBackend.from_config("disk", {"path": str(tmp_path)})
    staged = backend.stage_sharded(run_name="r", step=1)
    with open(os.path.join(staged, "__0_0.distcp"), "wb") as f:
        f.write(b"abc")
    with open(os.path.join(staged, "__1_0.distcp"), "wb") as f:
        f.write(b"ab")
    empty = Payload(run_name="r", step=1, epoch=None, format="dcp", files=())
    files = {"__0_0.distcp": FileEntry(3, "x:0"), "__1_0.distcp": FileEntry(3, "x:0"), "__2_0.distcp": FileEntry(3, "x:0")}
    with pytest.raises(BackendError, match=r"could not commit .*: __1_0.distcp, __2_0.distcp, written by the ranks, "
                                           r"are not there \(or not whole\) as rank 0 sees that folder"):
        backend.commit_sharded(run_name="r", step=1, path=staged, payload=empty, files=files)
    assert backend.list_checkpoints(run_name="r") == []
    backend.commit_sharded(run_name="r", step=1, path=staged, payload=empty, files={"__0_0.distcp": FileEntry(3, "x:0")})
    assert steps(backend) == [1]


class _NoImplicitFoldersFS(LocalFileSystem):
    """A real disk that, like WebDAV (409 Conflict) or SFTP, writes a file only into a folder that exists."""

    def __init__(self, **kwargs):
        super().__init__(auto_mkdir=False, skip_instance_cache=True, **kwargs)


class _FolderStore(FileBackend):
    needs_folders = True


def test_a_store_without_implicit_folders_gets_each_folder_made_before_it_is_written(tmp_path):
    fs = _NoImplicitFoldersFS()
    plain = FileBackend("dav", fs, str(tmp_path / "plain"))
    with pytest.raises(BackendError, match="step-0000000001"):
        plain.save_resume(run_name="r", step=1, payload=payload(1))  # the store refuses, as WebDAV does

    backend = _FolderStore("dav", fs, str(tmp_path / "root"))
    assert backend.probe() == {"write": "ok", "list": "ok", "read": "ok", "delete": "ok"}, "the probe makes the root"
    ref = backend.save_resume(run_name="r", step=1, payload=payload(1, b"abc" * 100))
    with backend.open_file(ref=ref, name="state.pt") as f:
        assert f.read() == b"abc" * 100
    staged = backend.stage_sharded(run_name="r", step=2)
    assert fs.isdir(staged), "every rank writes its shards into the staged folder"
    fs.pipe_file(f"{staged}/__0_0.distcp", b"shard")
    empty = Payload(run_name="r", step=2, epoch=None, format="dcp", files=())
    backend.commit_sharded(run_name="r", step=2, path=staged, payload=empty,
                           files={"__0_0.distcp": FileEntry(5, "x:0")})
    assert steps(backend) == [1, 2]


class _NoFolderMakingMemoryFS(MemoryFileSystem):
    """An object store: making a "folder" there could create a bucket, so it must never be asked to."""

    def makedirs(self, path, exist_ok=False):
        raise AssertionError(f"an object store was asked to make the folder {path}")

    mkdir = makedirs


def test_an_object_store_is_never_asked_to_make_a_folder():
    fs = _NoFolderMakingMemoryFS(skip_instance_cache=True)
    backend = FileBackend("s3ish", fs, f"/bucket-{os.getpid()}-{time.monotonic_ns()}")
    backend.save_resume(run_name="r", step=1, payload=payload(1))
    assert backend.probe()["write"] == "ok"
    assert steps(backend) == [1]


class _NoCopyMemoryFS(MemoryFileSystem):
    """A store that cannot copy a file itself: fsspec's stub, which raises NotImplementedError."""

    cp_file = fsspec.AbstractFileSystem.cp_file


@pytest.mark.parametrize("fs_type, copies", [(MemoryFileSystem, True), (_NoCopyMemoryFS, False)])
def test_a_step_saved_again_is_copied_into_place_only_where_the_store_copies(fs_type, copies):
    fs = fs_type(skip_instance_cache=True)
    assert storage._copies_files(fs) is copies
    root = f"/again-{os.getpid()}-{time.monotonic_ns()}"
    backend = FileBackend("store", fs, root)
    backend.save_resume(run_name="r", step=1, payload=payload(1, b"old" * 40))
    again = FileBackend("store", fs, root)  # knows nothing of step 1: it asks the store
    ref = again.save_resume(run_name="r", step=1, payload=payload(1, b"new!" * 30))
    with again.open_file(ref=ref, name="state.pt") as f:
        assert f.read() == b"new!" * 30
    assert steps(again) == [1]
    assert not [p for p in fs.find(root) if ".tmp-" in p]
    fs.rm(root, recursive=True)


class _NoReplacingCopyMemoryFS(MemoryFileSystem):
    """A store whose copy will not replace a file (WebDAV's COPY without Overwrite)."""

    def cp_file(self, path1, path2, **kwargs):
        if self.exists(path2):
            raise FileExistsError(path2)
        return super().cp_file(path1, path2, **kwargs)


@pytest.mark.parametrize("fs_type, names", [
    (MemoryFileSystem, ["a[1].bin", "b*.bin", "c?.bin"]),  # what fsspec's copy() would take as patterns
    (_NoReplacingCopyMemoryFS, ["state.pt"]),
])
def test_a_step_saved_again_holds_the_new_bytes_whatever_its_names_and_the_stores_copy(fs_type, names):
    fs = fs_type(skip_instance_cache=True)
    root = f"/names-{os.getpid()}-{time.monotonic_ns()}"

    def files(data):
        return tuple(PayloadFile(n, write=lambda f, d=data: f.write(d)) for n in names)

    FileBackend("store", fs, root).save_resume(
        run_name="r", step=1, payload=Payload(run_name="r", step=1, epoch=None, format="files", files=files(b"old")))
    again = FileBackend("store", fs, root)
    ref = again.save_resume(
        run_name="r", step=1, payload=Payload(run_name="r", step=1, epoch=None, format="files", files=files(b"new!")))
    for name in names:
        with again.open_file(ref=ref, name=name) as f:
            assert f.read() == b"new!", name
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(root)) == sorted(["manifest.json", *names])
    fs.rm(root, recursive=True)


class _CutOffFS(LocalFileSystem):
    """A WebDAV-like store: an upload streams into the file's final name, so a connection that
    drops half-way through ``cut_off`` leaves a truncated file there, and the store then stays
    unreachable (so nothing can be cleaned up) until ``down`` is reset."""

    def __init__(self, cut_off, **kwargs):
        super().__init__(auto_mkdir=True, skip_instance_cache=True, **kwargs)
        self.cut_off = cut_off
        self.down = False
        self.moves = []

    def _refuse(self):
        if self.down:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")

    def pipe_file(self, path, value, *args, **kwargs):
        self._refuse()
        if self.cut_off(path):
            super().pipe_file(path, value[: len(value) // 2])
            self.down = True
            self._refuse()
        return super().pipe_file(path, value, *args, **kwargs)

    def mv(self, path1, path2, *args, **kwargs):
        self._refuse()
        self.moves.append((os.path.basename(path1), os.path.basename(path2)))
        return super().mv(path1, path2, *args, **kwargs)

    def rm(self, *args, **kwargs):
        self._refuse()
        return super().rm(*args, **kwargs)

    def rm_file(self, *args, **kwargs):
        self._refuse()
        return super().rm_file(*args, **kwargs)

    def exists(self, *args, **kwargs):
        self._refuse()
        return super().exists(*args, **kwargs)


class _AtomicMoveStore(FileBackend):
    atomic_move = True


def test_a_cut_off_manifest_upload_on_a_store_with_atomic_move_leaves_an_uncommitted_leftover(tmp_path):
    fs = _CutOffFS(cut_off=lambda path: "manifest.json" in os.path.basename(path) and "0000000002" in path)
    backend = _AtomicMoveStore("dav", fs, str(tmp_path / "root"), leftover_grace_s=0)
    backend.save_resume(run_name="r", step=1, payload=payload(1))
    with pytest.raises(BackendError, match="step-0000000002"):
        backend.save_resume(run_name="r", step=2, payload=payload(2))
    fs.down = False
    folder = tmp_path / "root/r/step-0000000002"
    assert not (folder / "manifest.json").exists(), "a truncated manifest would read as a damaged checkpoint"
    assert steps(backend) == [1]
    ck = backend.list_checkpoints(run_name="r")
    assert [backend.read_manifest(ref=r).step for r in ck] == [1]
    time.sleep(0.01)
    would = backend.prune(run_name="r", keep_last=5, protected_steps=frozenset(), dry_run=True, counted_steps=None)
    assert [(r.role, os.path.basename(r.path)) for r in would] == [("leftover", "step-0000000002")]
    backend.prune(run_name="r", keep_last=5, protected_steps=frozenset(), dry_run=False, counted_steps=None)
    assert not folder.exists() and steps(backend) == [1]
    assert [m for m in fs.moves if m[1] == "manifest.json"], "step 1's manifest was moved into place"


def test_a_sharded_commit_on_a_store_with_atomic_move_goes_through_the_move_too(tmp_path):
    fs = _CutOffFS(cut_off=lambda path: False)
    backend = _AtomicMoveStore("dav", fs, str(tmp_path / "root"))
    staged = backend.stage_sharded(run_name="r", step=4)
    fs.pipe_file(f"{staged}/__0_0.distcp", b"shard")
    empty = Payload(run_name="r", step=4, epoch=None, format="dcp", files=())
    backend.commit_sharded(run_name="r", step=4, path=staged, payload=empty, files={"__0_0.distcp": FileEntry(5, "x:0")})
    assert [m[1] for m in fs.moves] == ["manifest.json"]
    assert sorted(os.listdir(staged)) == ["__0_0.distcp", "manifest.json"], "no temporary manifest is left"
    assert steps(backend) == [4]


def test_an_object_store_writes_its_manifest_in_one_put_without_a_move(tmp_path):
    # S3 and GCS publish a single PUT whole or not at all; a copy and delete would only add requests.
    fs = _CutOffFS(cut_off=lambda path: False)
    backend = FileBackend("s3ish", fs, str(tmp_path / "root"))
    backend.save_resume(run_name="r", step=1, payload=payload(1))
    assert fs.moves == [] and sorted(os.listdir(tmp_path / "root/r/step-0000000001")) == ["manifest.json", "state.pt"]


class _HostedStore(FileBackend):
    """A store whose paths are relative to a server, as webdav4's are."""

    def uri(self, path):
        return f"https://dav.example.org:8443/remote.php/{path.lstrip('/')}"


def test_the_location_and_every_address_include_the_host():
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    backend = _HostedStore("dav", fs, "/ckpts")
    assert backend.location == "https://dav.example.org:8443/remote.php/ckpts"
    assert "https://dav.example.org:8443/remote.php/ckpts" in repr(backend)
    ref = backend.save_resume(run_name="r", step=1, payload=payload(1))
    assert ref.uri == "https://dav.example.org:8443/remote.php/ckpts/r/step-0000000001"
    with pytest.raises(BackendError, match=r"https://dav\.example\.org:8443/remote\.php/ckpts/r/step-0000000002"):
        backend.save_resume(run_name="r", step=2, payload=payload(2, fail=True))
    plain = FileBackend("mem", fs, "/ckpts")
    assert plain.location == "memory:///ckpts"


class _Clock:
    def __init__(self, now):
        self.now = now

    def time(self):
        return self.now


def test_a_leftover_without_modification_time_goes_once_it_was_seen_a_grace_period_ago(monkeypatch):
    """An empty folder on a store that gives folders no time: its age counts from the first
    listing that showed it, so it is removed in the end, and never before a save with a time of
    its own would be."""
    import ckptkit.storage

    clock = _Clock(1_000_000.0)
    monkeypatch.setattr(ckptkit.storage, "time", clock)
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    root = f"/bucket-{os.getpid()}-{time.monotonic_ns()}"
    backend = FileBackend("mem", fs, root, leftover_grace_s=60)
    backend.save_resume(run_name="r", step=1, payload=payload(1))
    empty = f"{root}/r/{step_dirname(5)}"
    fs.makedirs(empty, exist_ok=True)
    assert "created" not in fs.info(empty) and "mtime" not in fs.info(empty), "the store tells no time"

    def prune(b, dry_run=False):
        return [r.path for r in b.prune(run_name="r", keep_last=1, protected_steps=frozenset(),
                                         dry_run=dry_run, counted_steps=None)]

    assert prune(backend) == [], "first seen now: it may be a save that just began"
    clock.now += 60
    assert prune(backend) == [], "seen no longer ago than the grace period"
    clock.now += 1
    other = FileBackend("mem", fs, root, leftover_grace_s=60)
    assert prune(other) == [], "another instance (a one-shot ckptkit prune) has not seen it before"
    assert prune(backend, dry_run=True) == [empty] and fs.isdir(empty)
    assert prune(backend) == [empty]
    assert not fs.exists(empty) and steps(backend) == [1]

    # Seen again after it was gone: a new folder of that name, aged from scratch.
    fs.makedirs(empty, exist_ok=True)
    clock.now += 1
    assert prune(backend) == []
    clock.now += 30
    assert prune(backend) == []


def test_a_final_folder_without_manifest_is_swept_once_past_the_grace_period():
    """A publish that failed as its store stopped answering removes nothing (it could delete a
    final model the store took without answering): what it left without a manifest is swept
    like any leftover, and a committed final model never."""
    from ckptkit.testing.suite import payload as suite_payload

    fs = MemoryFileSystem(skip_instance_cache=True)
    root = f"/final-{os.getpid()}-{time.monotonic_ns()}"
    backend = FileBackend("store", fs, root, leftover_grace_s=0)
    fs.pipe(f"{root}/left/final/final_model.pt", b"half a model")
    backend.publish_final(run_name="kept", payload=suite_payload("kept", 3, {"final_model.pt": b"model"}, role="final"))
    time.sleep(0.01)
    swept = backend.sweep_final_leftovers(run_name="left", dry_run=False)
    assert [r.uri.rsplit("/", 1)[-1] for r in swept] == ["final"]
    assert not fs.exists(f"{root}/left/final")
    assert backend.sweep_final_leftovers(run_name="kept", dry_run=False) == []
    assert backend.final_ref(run_name="kept").step == 3
    fs.rm(root, recursive=True)


def test_a_step_another_training_committed_since_this_one_listed_is_neither_written_over_nor_deleted():
    """A requeued job (``b``) lists the run; its predecessor (``a``), still alive, commits step 2;
    then ``b`` saves step 2 and fails. ``b`` wrote into ``a``'s folder, thinking the step new, and
    its clean-up deleted it: the run lost its newest step (with ``keep_last: 1``, every step)."""
    fs = MemoryFileSystem(skip_instance_cache=True)
    root = f"/two-{os.getpid()}-{time.monotonic_ns()}"
    a, b = FileBackend("store", fs, root), FileBackend("store", fs, root)
    a.save_resume(run_name="r", step=1, payload=payload(1, b"a's step 1"))
    assert steps(b) == [1]
    a.save_resume(run_name="r", step=2, payload=payload(2, b"a's step 2"))
    with pytest.raises(BackendError, match="nothing of it was committed"):
        b.save_resume(run_name="r", step=2, payload=payload(2, b"b's step 2", fail=True))
    (ref,) = [r for r in a.list_checkpoints(run_name="r") if r.step == 2]
    with a.open_file(ref=ref, name="state.pt") as f:
        assert f.read() == b"a's step 2"
    assert a.read_manifest(ref=ref).files["state.pt"].size == len(b"a's step 2")
    # The shards of a dcp save of that step go beside it, likewise.
    assert posixpath.basename(b.stage_sharded(run_name="r", step=2)).startswith(".tmp-")
    fs.rm(root, recursive=True)


def test_a_step_another_training_commits_while_this_save_writes_it_is_not_deleted_by_its_failure():
    """The same two trainings at the same moment: ``b``'s failed save leaves ``a``'s manifest where
    it is (a step that reads as damaged if ``b``'s files went over ``a``'s, never one gone
    without a word) and says so."""
    fs = MemoryFileSystem(skip_instance_cache=True)
    root = f"/two-{os.getpid()}-{time.monotonic_ns()}"
    a, b = FileBackend("store", fs, root), FileBackend("store", fs, root)
    a.save_resume(run_name="r", step=1, payload=payload(1, b"a's step 1"))

    def write(f):
        f.write(b"b's half")
        a.save_resume(run_name="r", step=2, payload=payload(2, b"a's step 2"))
        raise OSError("disk full")

    failing = Payload(run_name="r", step=2, epoch=None, format="torch", files=(PayloadFile("state.pt", write=write),))
    with pytest.raises(BackendError, match="another training of the run committed meanwhile is left as it is"):
        b.save_resume(run_name="r", step=2, payload=failing)
    assert fs.exists(f"{root}/r/{step_dirname(2)}/manifest.json")
    fs.rm(root, recursive=True)


def test_a_sharded_save_of_a_committed_step_where_the_store_cannot_copy_clears_the_old_copy_first():
    """There the shards go into the step's own folder: the old manifest and shards are removed
    first, or the new shards lay under the old manifest, with old shards of other names left."""
    fs, root = _NoCopyMemoryFS(skip_instance_cache=True), f"/dcp-{os.getpid()}-{time.monotonic_ns()}"
    backend = FileBackend("kv", fs, root)
    backend.save_resume(run_name="r", step=3, payload=payload(3))
    folder = backend.stage_sharded(run_name="r", step=3)
    assert folder.endswith(step_dirname(3))
    assert not [p for p in fs.find(folder)], fs.find(folder)


def _final_payload(data):
    return Payload(run_name="r", step=9, epoch=None, format="torch", role="final",
                   files=(PayloadFile("final_model.pt", write=lambda f: f.write(data)),))


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_two_publishes_that_pick_the_same_version_keep_both_final_models(tmp_path, kind):
    """Each publish picks the version past those its listing shows: one that listed before the
    other committed took the same folder, and replaced (local disk) or wrote over (an object
    store) a final model a registry may point at."""
    base = LocalBackend if kind == "local" else FileBackend

    class ListsEarly(base):
        meanwhile = None

        def _listing(self, run_name):
            listing = super()._listing(run_name)
            if self.meanwhile is not None:
                self.meanwhile, meanwhile = None, self.meanwhile
                meanwhile()
            return listing

    if kind == "local":
        a, b = (LocalBackend.from_config("disk", {"path": str(tmp_path / "root")}),
                ListsEarly("disk", LocalFileSystem(), str(tmp_path / "root")))
    else:
        fs, root = MemoryFileSystem(skip_instance_cache=True), f"/pub-{os.getpid()}-{time.monotonic_ns()}"
        a, b = FileBackend("store", fs, root), ListsEarly("store", fs, root)
    a.publish_final(run_name="r", payload=_final_payload(b"first"))
    theirs = []
    b.meanwhile = lambda: theirs.append(a.publish_final(run_name="r", payload=_final_payload(b"theirs")))
    ours = b.publish_final(run_name="r", payload=_final_payload(b"ours"))
    assert posixpath.basename(theirs[0].path) == "final-2" and posixpath.basename(ours.path) == "final-3"
    for ref, data in ((theirs[0], b"theirs"), (ours, b"ours")):
        with a.open_file(ref=ref, name="final_model.pt") as f:
            assert f.read() == data
    assert a.final_ref(run_name="r").path == ours.path


def test_a_final_model_whose_checksum_is_the_newest_ones_is_named_without_a_byte_written(tmp_path):
    """``ckptkit publish --force`` of the model a backend holds: its size and checksum are known
    before anything is written (``expected``), so nothing is."""
    import io

    from ckptkit.hashing import hash_stream

    backend = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    first = backend.publish_final(run_name="r", payload=_final_payload(b"model"))
    size, digest = hash_stream(io.BytesIO(b"model"))

    def unwritten(f):
        raise AssertionError("written again")

    known = Payload(run_name="r", step=9, epoch=None, format="torch", role="final",
                    files=(PayloadFile("final_model.pt", write=unwritten, expected=FileEntry(size, digest)),))
    assert backend.publish_final(run_name="r", payload=known).path == first.path
    assert sorted(os.listdir(tmp_path / "root/r")) == ["final"]


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_a_folder_named_like_a_later_final_model_that_ckptkit_did_not_write_is_left_alone(tmp_path, kind):
    """A trainer's own final-2024/ in the run (files of its own, or only a folder) is no final
    model of ckptkit's: the prune took it for a killed publish's leftover and deleted it, and on an
    object store a publish wrote into it."""
    if kind == "local":
        backend = LocalBackend.from_config("disk", {"path": str(tmp_path / "root"), "leftover_grace_s": 0})
        fs, root = backend.fs, str(tmp_path / "root")
    else:
        fs, root = MemoryFileSystem(skip_instance_cache=True), f"/own-{os.getpid()}-{time.monotonic_ns()}"
        backend = FileBackend("store", fs, root, leftover_grace_s=0)
    backend.save_resume(run_name="r", step=1, payload=payload(1))
    for path, data in (("final-2/model.safetensors", b"the trainer's own"),
                       ("final-2024/tokenizer/vocab.json", b"its vocabulary")):
        fs.makedirs(posixpath.dirname(f"{root}/r/{path}"), exist_ok=True)
        fs.pipe(f"{root}/r/{path}", data)
    time.sleep(0.01)
    assert backend.prune(run_name="r", keep_last=1, protected_steps=frozenset(), dry_run=False,
                         counted_steps=None) == []
    first = backend.publish_final(run_name="r", payload=_final_payload(b"model"))
    assert first.path.endswith("/r/final")
    assert backend.publish_final(run_name="r", payload=_final_payload(b"later")).path.endswith("/r/final-3")
    assert fs.cat(f"{root}/r/final-2/model.safetensors") == b"the trainer's own"
    assert fs.cat(f"{root}/r/final-2024/tokenizer/vocab.json") == b"its vocabulary"
    assert not fs.exists(f"{root}/r/final-2/{'manifest.json'}")


def test_a_commit_killed_between_its_two_renames_is_put_back_for_a_process_restarted_at_once(tmp_path, caplog):
    """Where the filesystem cannot swap folders, saving step N again renames the committed copy
    aside, then the new one in. A process restarted right after a kill in between (torchrun,
    Kubernetes: seconds) finds step N again, not an empty run that trains from step 0."""
    backend = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    backend.save_resume(run_name="r", step=5, payload=payload(5, b"committed"))
    run = tmp_path / "root/r"
    os.rename(run / step_dirname(5), run / f".trash-{step_dirname(5)}-0123456789ab")  # the kill's leftover

    restarted = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    (ref,) = restarted.list_checkpoints(run_name="r")
    assert ref.step == 5
    with restarted.open_file(ref=ref, name="state.pt") as f:
        assert f.read() == b"committed"
    assert sorted(os.listdir(run)) == [step_dirname(5)]
    assert "put back" in caplog.text


def test_running_out_of_inodes_on_the_first_folder_is_a_full_store_that_names_the_step(tmp_path, monkeypatch):
    """An inode quota (common on clusters) fails the first mkdir of a save, before any byte."""
    import ckptkit.local

    backend = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    backend.save_resume(run_name="r", step=1, payload=payload(1))

    def no_inodes(path, *args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), path)

    monkeypatch.setattr(ckptkit.local.os, "makedirs", no_inodes)
    with pytest.raises(StorageFullError) as err:
        backend.save_resume(run_name="r", step=2, payload=payload(2))
    assert "step-0000000002 of run 'r'" in str(err.value) and err.value.backend == "disk"
    monkeypatch.undo()
    assert steps(backend) == [1]
    assert not [n for n in os.listdir(tmp_path / "root/r") if n.startswith(".tmp-")]


def test_a_folder_of_the_run_that_ckptkit_did_not_write_is_not_walked(tmp_path, monkeypatch):
    """A trainer's own folder inside the run (logs, say), unreadable or holding many files, is
    not ckptkit's to look into: the checkpoints beside it list and prune as before."""
    import ckptkit.local

    backend = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    for step in (1, 2, 3):
        backend.save_resume(run_name="r", step=step, payload=payload(step))
    logs = tmp_path / "root/r/tensorboard"
    (logs / "deep").mkdir(parents=True)
    real_scandir = os.scandir

    def unreadable_logs(path=".", *args):
        if str(path).startswith(str(logs)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(ckptkit.local.os, "scandir", unreadable_logs)
    assert steps(backend) == [1, 2, 3]
    backend.prune(run_name="r", keep_last=1, protected_steps=frozenset(), dry_run=False, counted_steps=None)
    assert steps(backend) == [3]
    assert logs.is_dir() and (logs / "deep").is_dir()


def test_a_store_that_refuses_a_rename_onto_a_folder_with_another_errno_still_replaces_the_step(
        tmp_path, monkeypatch):
    """sshfs reports a rename onto a folder that holds files as EPERM, not ENOTEMPTY, and cannot
    swap two folders: saving a committed step again still takes the two-rename way."""
    import ckptkit.local

    backend = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    backend.save_resume(run_name="r", step=3, payload=payload(3, b"old"))
    real_rename = os.rename

    def sshfs_rename(src, dst):
        if os.path.isdir(dst) and os.listdir(dst):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), dst)
        real_rename(src, dst)

    monkeypatch.setattr(ckptkit.local, "_renameat2", None)
    monkeypatch.setattr(ckptkit.local.os, "rename", sshfs_rename)
    ref = backend.save_resume(run_name="r", step=3, payload=payload(3, b"new!"))
    with backend.open_file(ref=ref, name="state.pt") as f:
        assert f.read() == b"new!"
    assert sorted(os.listdir(tmp_path / "root/r")) == [step_dirname(3)]


def test_a_reader_that_cannot_put_a_copy_back_waits_for_its_commit_once(tmp_path, monkeypatch, caplog):
    """A read-only reader (an eval job) cannot rename the copy a killed commit set aside: it gives
    the commit its moment once, not at every listing for the minute the copy stays young."""
    import ckptkit.local

    backend = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    backend.save_resume(run_name="r", step=5, payload=payload(5))
    run = tmp_path / "root/r"
    os.rename(run / step_dirname(5), run / f".trash-{step_dirname(5)}-0123456789ab")
    waits = []
    real_wait, real_rename = ckptkit.local._finished_meanwhile, os.rename

    def counted(target):
        waits.append(target)
        return real_wait(target)

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dst)

    monkeypatch.setattr(ckptkit.local, "_finished_meanwhile", counted)
    monkeypatch.setattr(ckptkit.local, "_SWAP_WAIT_S", 0.1)
    monkeypatch.setattr(ckptkit.local.os, "rename", read_only)
    reader = LocalBackend.from_config("disk", {"path": str(tmp_path / "root")})
    for _ in range(3):
        assert reader.list_checkpoints(run_name="r") == []
    assert len(waits) == 1
    monkeypatch.setattr(ckptkit.local.os, "rename", real_rename)
    assert [r.step for r in reader.list_checkpoints(run_name="r")] == [5]  # put back once it may


def test_a_root_that_reads_as_a_pattern_deletes_nothing_of_other_roots():
    """fsspec's rm takes a path holding '[' for a pattern: a prune under /runs[12] deleted the
    checkpoints of /runs1 (found against a real S3 server, whose prefixes are now refused), and
    left its own."""
    fs = MemoryFileSystem()  # one store for the whole process: these roots are removed at the end
    other, patterned = FileBackend("other", fs, "/runs1"), FileBackend("patterned", fs, "/runs[12]")

    def payload(step: int) -> Payload:
        return Payload(run_name="exp", step=step, epoch=None, format="torch",
                       files=(PayloadFile("state.pt", write=lambda f: f.write(b"x" * 100)),))

    try:
        for step in (1, 2):
            other.save_resume(run_name="exp", step=step, payload=payload(step))
            patterned.save_resume(run_name="exp", step=step, payload=payload(step))
        deleted = patterned.prune(run_name="exp", keep_last=1, protected_steps=frozenset(), dry_run=False,
                                  counted_steps=None)
        assert [r.step for r in deleted] == [1]
        assert sorted(fs.find("/runs[12]")) == ["/runs[12]/exp/step-0000000002/manifest.json",
                                                "/runs[12]/exp/step-0000000002/state.pt"]
        assert sorted(fs.find("/runs1")) == [f"/runs1/exp/{step_dirname(s)}/{n}" for s in (1, 2)
                                             for n in ("manifest.json", "state.pt")]
    finally:
        for key in [k for k in fs.store if k.startswith(("/runs1", "/runs[12]"))]:
            del fs.store[key]
        fs.pseudo_dirs[:] = [d for d in fs.pseudo_dirs if not d.startswith(("/runs1", "/runs[12]"))]


def test_a_root_that_is_a_file_is_no_empty_run(tmp_path, pm):
    """A file where the root folder should be listed as a run with nothing in it: restore returned
    None and training started from step 0, until the first save failed."""
    (tmp_path / "ckpts").write_text("not a folder")
    cfg = {"run_name": "exp", "backends": {"disk": {"type": "local", "path": str(tmp_path / "ckpts")}},
           "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "keep_last": 2}}}
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(StorageUnavailableError, match=r"ckpts/exp: NotADirectoryError: .*a file stands where a "
                                                          r"folder of this path should be"):
            ck.restore(torch.nn.Linear(2, 2))


def test_a_step_committed_after_the_prune_listed_it_as_a_leftover_is_kept():
    """Another process's save still going on when the run was listed (or a store whose clock runs
    behind this one, past the grace period): its folder had files and no manifest yet. Deleting it
    as a leftover removed the manifest it committed meanwhile, and the save reported success."""
    fs = MemoryFileSystem()
    root = f"/late-commit-{os.getpid()}"
    saver, pruner = FileBackend("saver", fs, root), FileBackend("pruner", fs, root)
    pruner.leftover_grace_s = 0.0
    ref = saver.save_resume(run_name="exp", step=1, payload=Payload(
        run_name="exp", step=1, epoch=None, format="torch",
        files=(PayloadFile("state.pt", write=lambda f: f.write(b"x" * 100)),)))
    manifest = fs.cat_file(f"{ref.path}/manifest.json")
    fs.rm_file(f"{ref.path}/manifest.json")  # as the run was listed: files there, no manifest yet
    listed_as_leftovers = pruner._leftovers

    def commit_after_listing(run_name, listing=None):
        found = listed_as_leftovers(run_name, listing)
        fs.pipe_file(f"{ref.path}/manifest.json", manifest)  # the save commits now
        return found

    pruner._leftovers = commit_after_listing
    try:
        time.sleep(0.01)
        deleted = pruner.prune(run_name="exp", keep_last=1, protected_steps=frozenset(), dry_run=False,
                               counted_steps=None)
        assert deleted == []
        assert sorted(fs.ls(ref.path, detail=False)) == [f"{ref.path}/manifest.json", f"{ref.path}/state.pt"]
    finally:
        fs.rm(root, recursive=True)


class _BehindFS(LocalFileSystem):
    """Local files as a store whose clock runs two hours behind this machine's: every time it
    reports is two hours earlier than this machine's clock says it was."""

    cachable = False
    lag = 2 * 3600.0

    def info(self, path, **kwargs):
        info = dict(super().info(path, **kwargs))
        info["mtime"] -= self.lag
        return info


def _leftover(folder, when=None):
    """A step folder as a killed save leaves it: a file, no manifest; dated ``when`` by this machine."""
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"z" * 100)
    if when is not None:
        os.utime(folder / "state.pt", (when, when))
        os.utime(folder, (when, when))


def _prune(backend, run="exp", dry_run=False):
    return backend.prune(run_name=run, keep_last=1, protected_steps=frozenset(), dry_run=dry_run, counted_steps=None)


def test_a_prune_on_a_machine_whose_clock_runs_ahead_of_the_store_keeps_a_save_in_flight(tmp_path):
    """``ckptkit prune`` from a machine whose clock is ahead of the store's by more than the
    grace period saw another process's save in flight (files, no manifest yet) as a leftover
    hours old and deleted its files; the save then committed a manifest for files that were gone.
    Ages are checked against the store's clock too before anything is deleted for them, and a
    dry run, which cannot read that clock, reports such a folder as kept."""
    fs = _BehindFS(auto_mkdir=True)
    root = str(tmp_path / "ckpts")
    saver, pruner = FileBackend("saver", fs, root), FileBackend("pruner", fs, root, leftover_grace_s=600.0)
    _leftover(tmp_path / "ckpts" / "exp" / step_dirname(4), time.time() - 3600)  # killed an hour ago
    for step in (1, 2):
        saver.save_resume(run_name="exp", step=step, payload=payload(step))
    in_flight = tmp_path / "ckpts" / "exp" / step_dirname(3)
    _leftover(in_flight)  # a save of step 3 is writing now, no manifest yet
    expected = [(1, "resume", f"{root}/exp/{step_dirname(1)}"), (-1, "leftover", f"{root}/exp/{step_dirname(4)}")]

    assert sorted((r.step, r.role, r.path) for r in _prune(pruner, dry_run=True)) == sorted(expected)
    assert sorted((r.step, r.role, r.path) for r in _prune(pruner)) == sorted(expected)
    assert (in_flight / "state.pt").read_bytes() == b"z" * 100
    assert sorted(os.listdir(tmp_path / "ckpts" / "exp")) == [step_dirname(2), step_dirname(3)]


def test_where_the_store_clock_cannot_be_read_only_what_the_listing_proves_old_is_deleted(tmp_path, caplog):
    """A pruner allowed to list and delete but not to write (a clean-up role) still removes a
    leftover that a later save, by more than the grace period, shows to be old by the store's own
    clock; one it cannot tell about (the newest thing in its run) is kept, and says why."""
    fs = LocalFileSystem(auto_mkdir=True, skip_instance_cache=True)  # patched below
    root = str(tmp_path / "ckpts")
    saver, pruner = FileBackend("saver", fs, root), FileBackend("pruner", fs, root, leftover_grace_s=600.0)
    _leftover(tmp_path / "ckpts" / "exp" / step_dirname(4), time.time() - 3600)
    saver.save_resume(run_name="exp", step=1, payload=payload(1))
    _leftover(tmp_path / "ckpts" / "solo" / step_dirname(5), time.time() - 3600)

    def refused(*args, **kwargs):
        raise PermissionError("this role may not write")

    pruner.fs.pipe_file = refused
    assert [(r.role, r.path) for r in _prune(pruner)] == [("leftover", f"{root}/exp/{step_dirname(4)}")]
    assert "could not read the store's clock" not in caplog.text  # the listing alone proved it old
    assert _prune(pruner, run="solo") == []
    assert (tmp_path / "ckpts" / "solo" / step_dirname(5) / "state.pt").exists()
    assert "could not read the store's clock" in caplog.text
    del pruner.fs.pipe_file
    assert [r.path for r in _prune(pruner, run="solo")] == [f"{root}/solo/{step_dirname(5)}"]
    assert os.listdir(tmp_path / "ckpts" / "solo") == []  # the clock's own file is gone too


def test_what_a_prune_killed_while_reading_the_store_clock_left_goes_as_a_leftover(tmp_path):
    root = tmp_path / "ckpts"
    backend = FileBackend("store", LocalFileSystem(auto_mkdir=True, skip_instance_cache=True), str(root),
                          leftover_grace_s=600.0)
    backend.save_resume(run_name="exp", step=1, payload=payload(1))
    left = root / "exp" / f"{storage.CLOCK_PREFIX}0123456789ab"
    left.mkdir()
    (left / "clock").write_bytes(b"")
    assert _prune(backend) == []  # young: another prune may be reading the clock right now
    hour_ago = time.time() - 3600
    os.utime(left / "clock", (hour_ago, hour_ago))
    os.utime(left, (hour_ago, hour_ago))
    assert [r.path for r in _prune(backend)] == [str(left)]
    assert os.listdir(root / "exp") == [step_dirname(1)]


class _NoCopyFS(LocalFileSystem):
    """Local files as a store that cannot copy a file itself (fsspec's base cp_file)."""

    cachable = False
    cp_file = fsspec.AbstractFileSystem.cp_file


def test_a_failed_save_again_on_a_store_that_cannot_copy_says_the_stored_copy_is_gone(tmp_path):
    """Such a store un-commits the stored copy before it writes the new one: a failure half-way
    loses it, and the error said "nothing of it was committed" as if the old copy were kept."""
    backend = FileBackend("kv", _NoCopyFS(auto_mkdir=True), str(tmp_path / "root"))
    backend.save_resume(run_name="r", step=3, payload=payload(3))
    with pytest.raises(BackendError, match=r"the copy of this step committed before was un-committed to be "
                                           r"replaced and is gone"):
        backend.save_resume(run_name="r", step=3, payload=payload(3, fail=True))
    assert steps(backend) == []


def test_the_testing_kits_wrapper_keeps_a_stores_copying(tmp_path):
    """A backend replaces a stored step by copying where the store can; wrapped for fault
    injection, a store that can copy looked like one that cannot, and tests of it took the
    other path (a failed save again then lost the stored copy)."""
    from ckptkit.testing.faults import WrappedFileSystem

    wrapped = WrappedFileSystem(LocalFileSystem(auto_mkdir=True))
    backend = FileBackend("wrapped", wrapped, str(tmp_path / "root"))
    assert storage._copies_files(wrapped) and not storage._copies_files(WrappedFileSystem(_NoCopyFS()))
    backend.save_resume(run_name="r", step=3, payload=payload(3))
    with pytest.raises(BackendError, match="the copy of this step committed before is kept"):
        backend.save_resume(run_name="r", step=3, payload=payload(3, fail=True))
    assert steps(backend) == [3]


def test_a_time_under_any_key_stores_use_is_read():
    """adlfs and others tell a file's time as last_modified: it was read as no time at all, and
    every leftover aged from the pruning process's first sight of it."""
    import datetime

    when = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.timezone.utc)
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        assert storage._mtime({key: when}) == when.timestamp(), key


@pytest.mark.parametrize("size", ["at the limit", "past the limit"])
def test_a_local_manifest_is_read_whole_up_to_its_limit_and_refused_past_it(tmp_path, size):
    """A manifest is read to its end, at most MANIFEST_MAX bytes and one: a larger one is refused
    unread as any other backend refuses it."""
    from ckptkit import local
    from ckptkit.storage import MANIFEST_MAX

    path = tmp_path / "manifest.json"
    with open(path, "wb") as f:
        f.truncate(MANIFEST_MAX + (size == "past the limit"))
        f.seek(0)
        f.write(b"{")
    if size == "at the limit":
        data = local.manifest_bytes(str(path))
        assert len(data) == MANIFEST_MAX and data[:1] == b"{"
    else:
        with pytest.raises(ckptkit.CheckpointError, match="larger than any manifest ckptkit writes"):
            local.manifest_bytes(str(path))
