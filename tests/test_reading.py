"""Reading back: manifests that must prove themselves, typed outcomes, and no silent restart."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager, CorruptCheckpointError, SaveError, StorageUnavailableError, reading
from ckptkit.cli import main as cli_main
from ckptkit.local import LocalBackend
from ckptkit.manifest import Manifest
from ckptkit.reading import SCRATCH_PREFIX, sweep_scratch

from ckpt_helpers import DownBackend, assert_same_state, local_config, make_model, train_step


def _save_steps(tmp_path, pm, steps, **cfg):
    ck = CheckpointManager.from_config(local_config(tmp_path, **cfg), plugin_manager=pm)
    model, opt = make_model()
    states = {}
    for step in steps:
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt, extra={"step_seen": step})
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return ck, states


def _manifest_path(tmp_path, step, run="exp"):
    return tmp_path / "scratch" / run / f"step-{step:010d}" / "manifest.json"


def _reseal(path, **changes):
    """Change a manifest and seal it again, as an attacker who knows the format would."""
    data = json.loads(path.read_text())
    data.pop("checksum")
    data.update(changes)
    manifest = Manifest.from_dict(data)
    path.write_bytes(manifest.to_json())


def test_a_bit_flip_in_a_manifest_is_caught_by_restore_and_verify(tmp_path, pm, capsys):
    ck, states = _save_steps(tmp_path, pm, [0, 1])
    path = _manifest_path(tmp_path, 1)
    text = path.read_text()
    assert '"step": 1' in text
    path.write_text(text.replace('"step": 1', '"step": 9'))  # one bit: "1" is 0x31, "9" is 0x39

    model, opt = make_model(seed=5)
    with pytest.warns(RuntimeWarning, match=r"step-0000000001.*checksum does not match"):
        restored = ck.restore(model, opt)
    assert restored.step == 0
    assert_same_state(model.state_dict(), states[0])
    ref = next(r for r in ck.list_checkpoints() if r.step == 1)
    with pytest.raises(CorruptCheckpointError, match="checksum does not match"):
        ck.verify(ref)
    config = tmp_path / "ck.json"
    config.write_text(json.dumps(local_config(tmp_path)))
    capsys.readouterr()
    assert cli_main(["verify", str(config), "--json"]) == 1
    rows = {row["step"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[0]["ok"] and not rows[1]["ok"]
    assert "checksum does not match" in rows[1]["detail"]


def test_a_resealed_manifest_must_still_agree_with_its_folder_and_run(tmp_path, pm):
    ck, states = _save_steps(tmp_path, pm, [0, 1])
    _reseal(_manifest_path(tmp_path, 1), step=9)
    model, opt = make_model(seed=5)
    with pytest.warns(RuntimeWarning, match="says step 9, but it lies in the folder of step 1"):
        assert ck.restore(model, opt).step == 0

    _reseal(_manifest_path(tmp_path, 0), run_name="other")
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptCheckpointError, match="belongs to run 'other'"):
        ck.restore(model, opt)


@pytest.mark.parametrize("files", [{}, {"../state.pt": {"size": 1, "digest": "xxh3_128:00"}},
                                   {"/etc/passwd": {"size": 1, "digest": "xxh3_128:00"}}])
def test_a_manifest_listing_no_files_or_files_elsewhere_is_not_a_checkpoint(tmp_path, pm, files):
    ck, _ = _save_steps(tmp_path, pm, [0, 1])
    _reseal(_manifest_path(tmp_path, 1), files=files)
    model, opt = make_model(seed=5)
    with pytest.warns(RuntimeWarning, match="lists no files|outside its folder"):
        assert ck.restore(model, opt).step == 0


def test_restore_raises_when_checkpoints_exist_but_none_is_intact(tmp_path, pm):
    ck, _ = _save_steps(tmp_path, pm, [0])
    state = _manifest_path(tmp_path, 0).parent / "state.pt"
    data = bytearray(state.read_bytes())
    data[100] ^= 1
    state.write_bytes(bytes(data))
    model, opt = make_model()
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptCheckpointError, match="none could be restored"):
        ck.restore(model, opt)


def _config_with(tmp_path, backends):
    cfg = local_config(tmp_path, final=False)
    for name in backends:
        if name != "scratch":
            cfg["backends"][name] = {"type": "down", "path": str(tmp_path / name)}
    cfg["roles"]["resume"]["backends"] = list(backends)
    return cfg


def test_an_unreachable_only_backend_is_not_nothing_to_resume(tmp_path, pm):
    pm.add_backend_type("down", DownBackend)
    ck = CheckpointManager.from_config(_config_with(tmp_path, ["archive"]), plugin_manager=pm)
    model, opt = make_model()
    with pytest.raises(StorageUnavailableError, match=r"backend 'archive'.*no checkpoint was found.*"
                                                      r"could not be listed.*Connection refused") as info:
        ck.restore(model, opt)
    assert info.value.backend == "archive"
    assert isinstance(info.value.__cause__, StorageUnavailableError)
    with pytest.raises(StorageUnavailableError):
        ck.list_checkpoints()


def test_a_reachable_backend_with_a_checkpoint_lets_restore_go_on(tmp_path, pm, caplog):
    pm.add_backend_type("down", DownBackend)
    first, states = _save_steps(tmp_path, pm, [0, 1], final=False)
    first.close()
    ck = CheckpointManager.from_config(_config_with(tmp_path, ["scratch", "archive"]), plugin_manager=pm)
    model, opt = make_model(seed=3)
    with pytest.warns(RuntimeWarning, match="could not list: archive"):
        restored = ck.restore(model, opt)
    assert restored.step == 1
    assert_same_state(model.state_dict(), states[1])


class _BuggyBackend(LocalBackend):
    """A backend whose reading code has a bug: restore must not mistake it for a bad checkpoint."""

    def open_file(self, ref, name):
        raise TypeError("a bug in the backend")


def test_a_bug_while_restoring_propagates_instead_of_skipping(tmp_path, pm):
    _save_steps(tmp_path, pm, [0, 1])[0].close()
    ckptkit.hookimpl(_BuggyBackend.open_file)
    pm.add_backend_type("buggy", _BuggyBackend)
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["scratch"]["type"] = "buggy"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    # Raised, never skipped for an older step; named as the plugin's, its own error kept as the cause.
    with pytest.raises(ckptkit.BackendError, match=r"open_file \(or reading .*\) \(type 'buggy', from "
                                                    r".*\) raised TypeError: a bug in the backend") as info:
        ck.restore(model, opt)
    assert isinstance(info.value.__cause__, TypeError)


def test_save_error_failures_keep_the_exceptions(tmp_path, pm):
    pm.add_backend_type("down", DownBackend)
    cfg = _config_with(tmp_path, ["scratch"])
    cfg["backends"]["ro"] = {"type": "local", "path": "/proc/ckptkit-cannot-write-here"}
    cfg["roles"]["resume"]["backends"] = ["scratch", "ro"]
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    with pytest.raises(SaveError) as info:
        ck.save(step=0, model=model, optimizer=opt)
    failure = info.value.failures["ro"]
    assert isinstance(failure, ckptkit.BackendError) and failure.backend == "ro"
    assert isinstance(failure.__cause__, OSError)
    assert str(failure).count("backend 'ro'") == 1
    assert [r.backend for r in info.value.saved] == ["scratch"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_scratch_folders_of_killed_processes_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    here = reading.machine()
    dead = tmp_path / f"{SCRATCH_PREFIX}restore-{_dead_pid()}-{here}-abc"
    dead.mkdir()
    (dead / "state.pt").write_bytes(b"x" * 1000)
    alive = tmp_path / f"{SCRATCH_PREFIX}restore-{os.getpid()}-{here}-def"
    alive.mkdir()
    unrelated = tmp_path / "ckptkit-something-else"
    unrelated.mkdir()
    assert sweep_scratch() == [str(dead)]
    assert not dead.exists() and alive.exists() and unrelated.exists()


def test_a_scratch_folder_of_a_kind_with_a_dash_is_swept_once_its_process_is_gone(tmp_path, monkeypatch):
    """A plugin's scratch("my-store"): the sweep read "store" as the process id, and the folder of
    a killed process stayed for good (review)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = ("import os, sys; from ckptkit.plugin import scratch\n"
            "with scratch('my-store') as folder:\n"
            "    open(os.path.join(folder, 'copy'), 'wb').write(b'x' * 1000); os._exit(9)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 9
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(SCRATCH_PREFIX)]
    assert sweep_scratch() == [str(left)] and not left.exists()


def test_a_scratch_folder_this_machine_cannot_make_is_its_failure_not_the_storages(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "tmp"
    not_a_folder.write_text("a file where the temporary folder should be")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    with pytest.raises(ckptkit.LocalWriteError, match="point TMPDIR at a folder with room") as err:
        with reading.scratch("restore"):
            pass
    assert f"could not make a scratch folder in {not_a_folder}" in str(err.value)
    assert isinstance(err.value.__cause__, NotADirectoryError)


def test_scratch_folders_of_another_machine_are_swept_only_once_idle_for_a_day(tmp_path, monkeypatch):
    """A TMPDIR shared by nodes or containers: a process id there means nothing here, and a
    restore running on another node lost its download (it then resumed the step before)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    busy, idle = (tmp_path / f"{SCRATCH_PREFIX}restore-{_dead_pid()}-0badf00d-{n}" for n in ("busy", "idle"))
    legacy = tmp_path / f"{SCRATCH_PREFIX}restore-{_dead_pid()}-abcd1234"  # an earlier version's name
    for folder in (busy, idle, legacy):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"partial")
    day_ago = time.time() - reading.SCRATCH_IDLE_S - 60
    for path in (idle, idle / "state.pt"):
        os.utime(path, (day_ago, day_ago))
    assert sweep_scratch() == [str(idle)]
    assert busy.exists() and legacy.exists()


def test_the_first_prune_sweeps_what_a_killed_restore_left(tmp_path, pm, monkeypatch):
    """Off the training thread: on the pruning thread after the first save, not in restore, where
    listing the temporary folder cost a small resume a fifth of its restore."""
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    leftover = scratch_root / f"{SCRATCH_PREFIX}restore-{_dead_pid()}-{reading.machine()}-xyz"
    leftover.mkdir()
    sweeping = []
    monkeypatch.setattr(reading, "sweep_scratch",
                        lambda: sweeping.append(threading.current_thread().name) or sweep_scratch())
    ck, _ = _save_steps(tmp_path, pm, [0])
    ck.wait()
    assert not leftover.exists() and not [n for n in os.listdir(scratch_root) if n.startswith(SCRATCH_PREFIX)]
    assert len(sweeping) == 1 and sweeping[0].startswith("ckptkit-prune"), sweeping
    leftover.mkdir()
    model, opt = make_model()
    assert ck.restore(model, opt).step == 0
    ck.save(step=1, model=model, optimizer=opt)
    ck.wait()
    assert len(sweeping) == 1 and leftover.exists()  # once per manager
    ck.close()


def test_typed_errors_survive_the_trip_to_other_ranks():
    from ckptkit import ranks

    original = StorageUnavailableError("s3", "listing failed")
    original.__cause__ = ConnectionError("refused")
    shared = ranks.portable({"s3": original, "other": KeyError("bug")})
    assert type(shared["s3"]) is StorageUnavailableError and shared["s3"].backend == "s3"
    assert str(shared["s3"]) == str(original)
    assert type(shared["other"]) is ckptkit.CkptkitError and "KeyError" in str(shared["other"])
    error = SaveError("step 1 failed", {"s3": original}, [])
    again = ranks.portable(error)
    assert type(again) is SaveError and type(again.failures["s3"]) is StorageUnavailableError
    assert torch.equal(ranks.portable(torch.ones(2)), torch.ones(2))


def _split_model(seed=0):
    """A model whose AdamW state splits into parts of over 1 MiB each, the size from which the
    parts of a split state are loaded on threads of their own."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.Linear(512, 512, bias=False))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    return model, opt


def _in_flight_together(monkeypatch, parties):
    """Make ``reading.load`` of every part wait until ``parties`` loads are in flight at once:
    loads one after the other break the barrier (its timeout) and the restore fails."""
    from ckptkit import reading

    barrier = threading.Barrier(parties, timeout=20)
    threads = set()
    original = reading.load

    def load(path, ref, safe_globals=(), **options):
        if os.path.basename(path).startswith("state-"):
            threads.add(threading.current_thread().name)
            barrier.wait()
        return original(path, ref, safe_globals, **options)

    monkeypatch.setattr(reading, "load", load)
    return threads


def _saved_in_two_parts(tmp_path, pm):
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["write_threads"] = 2
    model, opt = _split_model()
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    ck.save(step=1, model=model, optimizer=opt)
    return ck, model, opt


def test_the_parts_of_a_split_state_load_at_the_same_time(tmp_path, pm, monkeypatch):
    ck, model, opt = _saved_in_two_parts(tmp_path, pm)
    sizes = [p.stat().st_size for p in (tmp_path / "scratch/exp/step-0000000001").glob("state-*")]
    assert len(sizes) == 2 and min(sizes) > 1024 * 1024
    threads = _in_flight_together(monkeypatch, 2)
    fresh, fresh_opt = _split_model(seed=3)
    assert ck.restore(fresh, fresh_opt).step == 1
    assert len(threads) == 2 and all(t.startswith("ckptkit-load") for t in threads)
    assert not any(_mapped(p) for p in (tmp_path / "scratch/exp/step-0000000001").glob("state-*")), \
        "the optimizer's share of each part was copied out of its mapping"
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert_same_state(fresh_opt.state_dict(), opt.state_dict())


@pytest.mark.parametrize("mapped", [True, False], ids=["local-disk", "network-fs"])
def test_a_damaged_part_is_refused_and_nothing_applied(tmp_path, pm, monkeypatch, mapped):
    """The parts load beside their hashes, through mappings on a local disk and read where files
    cannot be mapped (a network filesystem), and are applied only once all of them matched."""
    ck, _, _ = _saved_in_two_parts(tmp_path, pm)
    part = tmp_path / "scratch/exp/step-0000000001/state-01-of-02.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor's bytes: it still loads, only the checksum can tell
    part.write_bytes(bytes(data))
    if not mapped:
        monkeypatch.setattr(reading, "mappable", lambda path: False)
    threads = _in_flight_together(monkeypatch, 2)
    fresh, fresh_opt = _split_model(seed=3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    before_opt = copy.deepcopy(fresh_opt.state_dict())
    with pytest.raises(CorruptCheckpointError, match="state-01-of-02.pt does not match its checksum"), \
            pytest.warns(RuntimeWarning, match="skipped"):
        ck.restore(fresh, fresh_opt)
    assert len(threads) == 2
    assert_same_state(fresh.state_dict(), before)
    assert_same_state(fresh_opt.state_dict(), before_opt)


@pytest.mark.parametrize("concurrent", [False, True])
def test_parts_download_at_the_same_time_only_through_a_client_made_for_it(tmp_path, pm, monkeypatch, concurrent):
    from fsspec.implementations.memory import MemoryFileSystem

    from ckptkit import reading
    from ckptkit.plugin import FileBackend

    fs = MemoryFileSystem(skip_instance_cache=True)
    root = f"/parts-{tmp_path.name}"

    class Remote(FileBackend):
        concurrent_writes = concurrent

        @classmethod
        def from_config(cls, name, options):
            return cls(name, fs, root)

    pm.add_backend_type("remote", Remote)
    cfg = {"run_name": "exp", "backends": {"remote": {"type": "remote"}},
           "roles": {"resume": {"backends": ["remote"], "every_n_steps": 1, "write_threads": 2}}}
    model, opt = _split_model()
    try:
        ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
        ck.save(step=1, model=model, optimizer=opt)
        lock, now, most = threading.Lock(), [0], [0]
        barrier = threading.Barrier(2, timeout=20)
        original = reading.Reader.download

        def download(self, ref, manifest, name, workdir):
            if not name.startswith("state-"):
                return original(self, ref, manifest, name, workdir)
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            try:
                if concurrent:
                    barrier.wait()  # both parts in flight at once, or this breaks
                return original(self, ref, manifest, name, workdir)
            finally:
                with lock:
                    now[0] -= 1

        monkeypatch.setattr(reading.Reader, "download", download)
        fresh, fresh_opt = _split_model(seed=3)
        assert ck.restore(fresh, fresh_opt).step == 1
        assert most[0] == (2 if concurrent else 1)
        assert_same_state(fresh.state_dict(), model.state_dict())
        assert_same_state(fresh_opt.state_dict(), opt.state_dict())
        ck.close()
    finally:
        fs.rm(root, recursive=True)  # the memory filesystem is one store for the whole process


# -- loading through a memory mapping ------------------------------------------------------------

def _mapped(path) -> bool:
    """Whether this process has ``path`` memory-mapped (Linux)."""
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


def _in_mapping(tensor, path) -> bool:
    """Whether ``tensor``'s bytes lie in this process's mapping of ``path``."""
    ptr = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if start <= ptr < end:
                    return True
    return False


class _WithExtraState(torch.nn.Module):
    """A module whose extra state, a tensor, is kept as it is given (``set_extra_state``)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(512, 512)
        self.scale = torch.ones(4)

    def forward(self, x):
        return self.lin(x)

    def get_extra_state(self):
        return {"scale": self.scale}

    def set_extra_state(self, state):
        self.scale = state["scale"]


def test_a_restore_maps_the_state_file_and_keeps_nothing_in_the_mapping(tmp_path, pm, monkeypatch):
    """From a local disk the state file is loaded memory-mapped, the model's tensors copied from
    the mapping into the model; what the optimizer, the module's extra state and the per-rank
    state keep is copied out of it first, so no mapping of the checkpoint is left afterwards."""
    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    torch.manual_seed(0)
    model = _WithExtraState()
    model.scale = torch.full((4,), 3.0)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    ck.save(step=1, model=model, optimizer=opt)
    ck.close()
    state_file = tmp_path / "scratch/exp/step-0000000001/state.pt"
    seen = []
    original = reading._model_mapped

    def spy(state, keep=None):
        seen.append(_mapped(state_file))
        return original(state, keep)

    monkeypatch.setattr(reading, "_model_mapped", spy)
    fresh = _WithExtraState()  # as a resuming process holds it: an optimizer that has not stepped
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert ck.restore(fresh, fresh_opt).step == 1
    assert seen == [True], "the state file was loaded through a mapping"
    assert not _mapped(state_file)
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert_same_state(fresh_opt.state_dict(), opt.state_dict())
    assert torch.equal(fresh.scale, torch.full((4,), 3.0))


def test_a_remote_restore_maps_the_downloaded_state_file_and_keeps_nothing_in_the_mapping(tmp_path, pm, monkeypatch):
    """A restore from an object store loaded its verified scratch copy the plain way: the whole
    state in memory beside the model's own weights (1.2 times the state at 256 MiB from S3,
    0.1 from a local disk)."""
    from fsspec.implementations.memory import MemoryFileSystem

    from ckptkit.plugin import FileBackend

    fs = MemoryFileSystem(skip_instance_cache=True)
    root = f"/mapped-{tmp_path.name}"

    class Remote(FileBackend):
        @classmethod
        def from_config(cls, name, options):
            return cls(name, fs, root)

    pm.add_backend_type("remote", Remote)
    cfg = {"run_name": "exp", "backends": {"remote": {"type": "remote"}},
           "roles": {"resume": {"backends": ["remote"], "every_n_steps": 1}}}
    model, opt = _split_model()
    seen = []
    original = reading._model_mapped

    def spy(state, keep=None):
        weight = state["model"]["0.weight"]
        with open("/proc/self/maps") as f:
            seen.append(any(reading.SCRATCH_PREFIX in line and _in_mapping(weight, line.split()[-1]) for line in f))
        return original(state, keep)

    monkeypatch.setattr(reading, "_model_mapped", spy)
    try:
        ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
        ck.save(step=1, model=model, optimizer=opt)
        ck.close()
        fresh, fresh_opt = _split_model(seed=3)
        fresh_opt = torch.optim.AdamW(fresh.parameters())  # as a resuming process holds it
        ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
        assert ck.restore(fresh, fresh_opt).step == 1
        ck.close()
    finally:
        fs.rm(root, recursive=True)  # the memory filesystem is one store for the whole process
    assert seen == [True], "the downloaded state file was loaded through a mapping"
    with open("/proc/self/maps") as f:
        assert not any(reading.SCRATCH_PREFIX in line for line in f), "nothing is left in the mapping"
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert_same_state(fresh_opt.state_dict(), opt.state_dict())


def test_export_reads_the_model_through_the_mapping_and_never_copies_the_optimizers_state(tmp_path, pm, monkeypatch):
    """export (and publish of a resume step) loaded the whole state, the optimizer's moments
    (two thirds of an AdamW state) included, to keep the model alone."""
    cfg = local_config(tmp_path)
    model, opt = _split_model()
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    ck.save(step=1, model=model, optimizer=opt)
    state_file = tmp_path / "scratch/exp/step-0000000001/state.pt"
    returned, owned = [], []
    original_mapped, original_owned = reading._model_mapped, reading._owned

    def spy(state, keep=None):
        out = original_mapped(state, keep)
        returned.append((sorted(out), all(_in_mapping(t, state_file) for t in out["model"].values())))
        return out

    monkeypatch.setattr(reading, "_model_mapped", spy)
    monkeypatch.setattr(reading, "_owned", lambda obj, memo: (owned.append(obj), original_owned(obj, memo))[1])
    assert ck.export(tmp_path / "model.pt").step == 1
    ck.close()
    assert returned == [(["model"], True)] and not any(isinstance(o, torch.Tensor) for o in owned)
    exported = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert_same_state(exported, model.state_dict())


def test_the_model_tensors_stay_mapped_and_everything_else_gets_memory_of_its_own(tmp_path):
    from ckptkit import safeload

    moment = torch.arange(8.0)
    path = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.ones(1024), "m._extra_state": torch.zeros(3)},
                "optimizer": {"state": {0: {"exp_avg": moment, "view": moment[2:]}}},
                "rank_extra": [torch.ones(2), (torch.ones(3), 7)]}, path)
    state = reading._model_mapped(safeload.load(str(path), mapped=True))
    assert _in_mapping(state["model"]["w"], path)
    assert not _in_mapping(state["model"]["m._extra_state"], path)
    saved = state["optimizer"]["state"][0]
    assert not _in_mapping(saved["exp_avg"], path)
    assert saved["view"].untyped_storage().data_ptr() == saved["exp_avg"].untyped_storage().data_ptr(), \
        "tensors that shared storage in the file still share it"
    assert torch.equal(saved["view"], torch.arange(2.0, 8.0))
    assert not any(_in_mapping(t, path) for t in (state["rank_extra"][0], state["rank_extra"][1][0]))
    assert state["rank_extra"][1][1] == 7


def test_a_file_holding_what_cannot_be_walked_loads_the_plain_way(tmp_path):
    from ckptkit.checkpoint import CheckpointRef

    path = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.ones(4)}, "optimizer": {"odd": {1, 2}, "m": torch.ones(1024)}}, path)
    ref = CheckpointRef(backend="disk", run_name="r", step=1, path=str(tmp_path), uri="disk://r/1",
                        local_dir=str(tmp_path))
    state = reading.load(str(path), ref, model_mapped=True)
    assert state["optimizer"]["odd"] == {1, 2}
    assert not _mapped(path), "a set is not walked: the file was loaded without a mapping"
    assert torch.equal(state["model"]["w"], torch.ones(4))


def test_files_are_mapped_only_on_a_local_disk_or_in_memory(tmp_path):
    from ckptkit.local import mappable

    assert mappable(str(tmp_path))
    assert mappable("/dev/shm")
    assert not mappable("/proc"), "procfs stands here for any filesystem not known to be local"


def test_a_model_on_the_meta_device_is_not_loaded_by_copy():
    from ckptkit import gather

    assert gather.copies_on_load(torch.nn.Linear(2, 2))
    assert not gather.copies_on_load(torch.nn.Linear(2, 2, device="meta"))


def test_tensors_that_are_more_than_their_bytes_come_back_as_a_plain_load_gives_them(tmp_path):
    """A copy of a storage would lose a conjugate or negative bit, the autograd flag or a
    quantizer: such tensors are loaded the plain way, never rebuilt from their bytes."""
    from ckptkit import safeload
    from ckptkit.checkpoint import CheckpointRef

    z, other = torch.tensor([1 + 2j, 3 - 4j]), torch.tensor([5 + 6j])
    state = {"model": {"w": torch.ones(4), "conj": other.conj()},
             "optimizer": {"conj": z.conj(), "neg": z.conj().imag, "grad": torch.ones(3).requires_grad_(),
                           "q": torch.quantize_per_tensor(torch.tensor([0.5, -1.0]), 0.5, 0, torch.qint8)}}
    ref = CheckpointRef(backend="disk", run_name="r", step=1, path=str(tmp_path), uri="disk://r/1",
                        local_dir=str(tmp_path))
    for key in state["optimizer"]:
        path = tmp_path / f"{key}.pt"
        torch.save({"model": state["model"], "optimizer": {key: state["optimizer"][key]}}, path)
        plain = safeload.load(str(path))["optimizer"][key]
        got = reading.load(str(path), ref, model_mapped=True)
        mine = got["optimizer"][key]
        if key == "q":
            assert torch.equal(mine.dequantize(), plain.dequantize())
        else:
            assert torch.equal(mine.resolve_conj().resolve_neg(), plain.resolve_conj().resolve_neg()), key
        assert mine.requires_grad == plain.requires_grad, key
        assert torch.equal(got["model"]["conj"].resolve_conj(), other.conj().resolve_conj())
        assert not _mapped(path), key


def _adopting_model():
    """A module whose load pre-hook keeps the tensor it is given as its buffer, as a resizable
    buffer does."""
    model = torch.nn.Linear(512, 512)
    model.register_buffer("codebook", torch.zeros(1))

    def adopt(module, state_dict, prefix, *args):
        module.codebook = state_dict[prefix + "codebook"]

    model._register_load_state_dict_pre_hook(adopt, with_module=True)
    return model


@pytest.mark.parametrize("why", ["load pre-hook", "MAP_SHARED"])
def test_the_state_file_is_not_mapped_where_a_tensor_could_stay_in_or_write_to_it(tmp_path, pm, monkeypatch, why):
    import mmap

    cfg = local_config(tmp_path, final=False)
    model = _adopting_model() if why == "load pre-hook" else torch.nn.Linear(512, 512)
    if why == "load pre-hook":
        model.codebook = torch.arange(8.0)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    ck.save(step=1, model=model)
    ck.close()
    state_file = tmp_path / "scratch/exp/step-0000000001/state.pt"
    before = state_file.read_bytes()
    seen = []
    original = reading._model_mapped
    monkeypatch.setattr(reading, "_model_mapped", lambda state, keep=None: seen.append(1) or original(state, keep))
    fresh = _adopting_model() if why == "load pre-hook" else torch.nn.Linear(512, 512)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    if why == "MAP_SHARED":
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            assert ck.restore(fresh).step == 1
    else:
        assert ck.restore(fresh).step == 1
    assert seen == []
    assert not _mapped(state_file)
    assert state_file.read_bytes() == before
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_code_from_outside_torch_that_sees_the_loaded_tensors_turns_the_mapping_off():
    from ckptkit import gather

    class OwnLoad(torch.nn.Linear):
        def _load_from_state_dict(self, *args, **kwargs):
            return super()._load_from_state_dict(*args, **kwargs)

    assert gather.copies_on_load(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    assert not gather.copies_on_load(torch.nn.Sequential(OwnLoad(2, 2)))
    assert not gather.copies_on_load(_adopting_model())


def test_a_state_file_written_between_its_check_and_its_load_is_refused(tmp_path, pm, monkeypatch):
    """A mapping reads the file when the model's tensors are copied, after the hash: a file
    written in place meanwhile is refused as corrupt, and the older checkpoint restored."""
    ck, states = _save_steps(tmp_path, pm, [1, 2])
    ck.close()
    monkeypatch.setattr(reading, "_MAP_MIN", 0)  # this small state through a mapping too
    state_file = tmp_path / "scratch/exp/step-0000000002/state.pt"
    original = reading._model_mapped

    def written_meanwhile(state, keep=None):
        if state_file.exists():
            os.utime(state_file, ns=(1, 1))
        return original(state, keep)

    monkeypatch.setattr(reading, "_model_mapped", written_meanwhile)
    model, opt = make_model()
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    with pytest.warns(RuntimeWarning, match="state.pt changed while it was being restored"):
        assert ck.restore(model, opt).step == 1
    assert_same_state(model.state_dict(), states[1])


def test_a_state_file_of_another_size_than_its_manifest_says_is_never_mapped(tmp_path, pm, monkeypatch):
    """Reading a mapping past the end of its file kills the process (SIGBUS), which no check after
    the load could turn into a skipped checkpoint. A state file large enough to be mapped is
    hashed beside its load, so its size is checked before: one that is not the manifest's is
    refused before it is loaded at all."""
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model = torch.nn.Linear(600, 600)
    for step in (1, 2):
        ck.save(step=step, model=model)
    ck.close()
    state_file = tmp_path / "scratch/exp/step-0000000002/state.pt"
    assert state_file.stat().st_size >= max(reading._MAP_MIN, reading._THREAD_MIN)
    with open(state_file, "r+b") as f:
        f.truncate(state_file.stat().st_size - 1)
    loaded = []
    original = reading.load
    monkeypatch.setattr(reading, "load", lambda path, *a, **kw: loaded.append((path, kw)) or original(path, *a, **kw))
    fresh = torch.nn.Linear(600, 600)
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    with pytest.warns(RuntimeWarning, match=r"step-0000000002: state.pt has \d+ bytes, the manifest says"):
        assert ck.restore(fresh).step == 1
    assert [os.path.basename(os.path.dirname(p)) for p, kw in loaded if kw.get("model_mapped")] == ["step-0000000001"]
    assert_same_state(fresh.state_dict(), model.state_dict())


class _CountedReads(LocalBackend):
    """The local backend; counts the reads of each file it opens (a mapping reads none)."""

    reads: dict

    @ckptkit.hookimpl
    def open_file(self, ref, name):
        f = super().open_file(ref=ref, name=name)
        reads = self.reads

        class Counted:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def fileno(self):
                return f.fileno()

            def readinto(self, buf):
                reads[name] = reads.get(name, 0) + 1
                return f.readinto(buf)

        return Counted()


def test_a_state_file_the_restore_maps_is_hashed_through_a_mapping_and_verify_reads_every_file(tmp_path, pm):
    """A mapping frees the hash of the GIL beside the load, but a failing read under it kills the
    process (SIGBUS) instead of raising: only a file the load maps anyway is hashed that way.
    ``verify``, which is run on suspect disks, reads every file."""
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model = torch.nn.Linear(600, 600)
    ck.save(step=1, model=model, extra={"seen": 1})
    ck.close()
    assert (tmp_path / "scratch/exp/step-0000000001/state.pt").stat().st_size >= reading._MAP_MIN
    pm.add_backend_type("counted", _CountedReads)
    cfg = local_config(tmp_path)
    cfg["backends"]["scratch"]["type"] = "counted"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    backend = ck.router.instances["scratch"]
    backend.reads = {}
    fresh = torch.nn.Linear(600, 600)
    assert ck.restore(fresh).step == 1
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert "state.pt" not in backend.reads and backend.reads.get("extra.pt", 0) > 0
    backend.reads = {}
    ck.verify(ck.list_checkpoints()[0])
    assert backend.reads.get("state.pt", 0) > 0
    ck.close()


@pytest.mark.parametrize("victim", ["state.pt", "extra.pt"])
def test_any_file_rewritten_between_its_check_and_its_load_is_refused(tmp_path, pm, monkeypatch, victim):
    """A small file is hashed before it loads, so another program may replace it in between:
    what loaded is not what was checked. Refused by its stat, mapped or not."""
    ck, states = _save_steps(tmp_path, pm, [1, 2])
    ck.close()
    folder = tmp_path / "scratch/exp/step-0000000002"
    assert (folder / "state.pt").stat().st_size < reading._MAP_MIN
    original = reading.load

    def rewritten_first(path, *args, **kwargs):
        if path == str(folder / victim):
            data = torch.load(path, weights_only=True)
            torch.save(data, path)  # the same content even: only its stat can tell
        return original(path, *args, **kwargs)

    monkeypatch.setattr(reading, "load", rewritten_first)
    model, opt = make_model()
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    with pytest.warns(RuntimeWarning, match=f"step-0000000002: {victim} changed while it was being restored"):
        assert ck.restore(model, opt).step == 1
    assert_same_state(model.state_dict(), states[1])


def test_a_small_state_file_loads_without_a_mapping_and_a_large_one_through_one(tmp_path, pm, monkeypatch):
    """Below ``_MAP_MIN`` the mapping's own costs outweigh what it saves: the state loads the
    plain way, still verified before any of it is applied."""
    ck, states = _save_steps(tmp_path, pm, [1])
    ck.close()
    state_file = tmp_path / "scratch/exp/step-0000000001/state.pt"
    assert state_file.stat().st_size < reading._MAP_MIN
    seen = []
    original = reading._model_mapped
    monkeypatch.setattr(reading, "_model_mapped", lambda state, keep=None: seen.append(1) or original(state, keep))
    for map_min, mapped in ((reading._MAP_MIN, []), (state_file.stat().st_size, [1])):
        monkeypatch.setattr(reading, "_MAP_MIN", map_min)
        seen.clear()
        model, opt = make_model(seed=5)
        ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
        assert ck.restore(model, opt).step == 1
        ck.close()
        assert seen == mapped
        assert_same_state(model.state_dict(), states[1])


def test_a_refused_read_is_unavailable_not_damaged_and_a_bug_beside_a_refusal_stays_a_bug():
    from ckptkit.errors import StorageUnavailableError
    from ckptkit.reading import refusal, storage_failure

    refused = storage_failure("nas", "reading x", PermissionError(13, "Permission denied"))
    assert isinstance(refused, StorageUnavailableError) and refusal(refused)
    assert "check the permissions on it, or the credentials this process uses" in str(refused)
    plain = storage_failure("nas", "reading x", OSError(5, "Input/output error"))
    assert isinstance(plain, StorageUnavailableError) and not refusal(plain) and "permissions" not in str(plain)
    try:  # a plugin's own handler failing while it handles a refusal: its bug, named as such by the caller
        try:
            raise PermissionError(13, "Permission denied")
        except PermissionError:
            raise TypeError("bad handler")  # noqa: B904
    except TypeError as exc:
        bug = exc
    assert storage_failure("nas", "reading x", bug) is bug


def test_a_pass_over_the_checkpoints_belongs_to_the_thread_that_made_it(tmp_path, pm):
    """The prune thread reads manifests (keep_best) while a peek's pass may be open: a refusal or
    a silent store in one must not stop the other's reads."""
    from ckptkit.reading import Reader

    cfg = local_config(tmp_path, final=False)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        model, opt = make_model()
        for step in (1, 2):
            ck.save(step=step, model=model, optimizer=opt)
        older, newer = sorted(ck.list_checkpoints(), key=lambda r: r.step)
        reader: Reader = ck.reader
        got = []
        with reader.one_pass():
            reader.refused_by_storage(newer)
            with pytest.raises(StorageUnavailableError, match="no older step is restored past it"):
                reader.manifest(older)
            other = threading.Thread(target=lambda: got.append(reader.manifest(older).step))
            other.start()
            other.join()
        assert got == [1]
        assert reader.manifest(older).step == 1  # and none of it outlives the pass


def test_a_local_copy_that_failed_names_its_file_over_a_writers_own_error_but_not_over_an_interrupt():
    """torch.save reports its writer's failure as "unexpected pos"; the disk's error is the one to
    see. An interrupt that comes after is still an interrupt."""
    with pytest.raises(ckptkit.LocalWriteError, match=r"could not write /dev/full \(a test copy\) on this machine: "
                                                      r"\[Errno 28\] No space left on device"):
        with reading.LocalCopy("/dev/full", "a test copy", "Free space.") as f:
            try:
                f.write(b"x" * 2**20)
            except ckptkit.LocalWriteError:
                raise RuntimeError("unexpected pos 896 vs 790") from None
    with pytest.raises(KeyboardInterrupt):
        with reading.LocalCopy("/dev/full", "a test copy", "Free space.") as f:
            try:
                f.write(b"x" * 2**20)
            except ckptkit.LocalWriteError:
                raise KeyboardInterrupt from None


class _CountedOpens(LocalBackend):
    """The local backend; counts the files it is asked to open."""

    opened: list

    @ckptkit.hookimpl
    def open_file(self, ref, name):
        self.opened.append(name)
        return super().open_file(ref=ref, name=name)


@pytest.mark.parametrize("parts", [1, 2])
def test_a_mapped_state_file_is_hashed_through_the_mapping_its_tensors_point_into(tmp_path, pm, parts):
    """A state file hashed on its own (reads, or a mapping of its own) had every byte read from the
    page cache twice, once for the hash and once as the load copied it out: 100 MB restored in
    1.2 to 1.3 times torch.load's time on tmpfs. It is hashed through the load's mapping, and
    never opened for a hash of its own."""
    cfg = local_config(tmp_path)
    cfg["roles"]["resume"]["write_threads"] = parts
    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 600))
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.save(step=1, model=model, optimizer=opt)
    folder = tmp_path / "scratch/exp/step-0000000001"
    states = sorted(p.name for p in folder.glob("state*.pt"))
    assert len(states) == parts and all((folder / n).stat().st_size >= reading._MAP_MIN for n in states)
    pm.add_backend_type("opens", _CountedOpens)
    cfg["backends"]["scratch"]["type"] = "opens"
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.router.instances["scratch"].opened = opened = []
        fresh = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 600))
        fresh_opt = torch.optim.AdamW(fresh.parameters())
        assert ck.restore(fresh, fresh_opt).step == 1
        assert not set(states) & set(opened), opened
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert_same_state(fresh_opt.state_dict(), opt.state_dict())
    # A byte changed in the mapped file is still caught, and nothing of it applied.
    path = folder / states[-1]
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    path.write_bytes(bytes(data))
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.router.instances["scratch"].opened = []
        with pytest.raises(CorruptCheckpointError, match=f"{states[-1]} does not match its checksum"):
            ck.restore(torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 600)))


def test_a_hash_through_the_mapping_is_the_files_and_is_not_taken_where_the_mapping_is_not_known(tmp_path):
    from ckptkit import safeload
    from ckptkit.hashing import hash_stream

    path = str(tmp_path / "state.pt")
    shared = torch.arange(1000, dtype=torch.float32)
    torch.save({"model": {"w": torch.randn(300, 300), "v": shared[:10]}, "optimizer": {"m": shared[500:], "n": 3}}, path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        expected = hash_stream(f, "xxh3_128")
    raw = safeload.load(path, mapped=True)
    assert reading.digest_through_mapping(raw, path, size, "xxh3_128") == expected
    # A storage the file holds that no tensor given points into, or a tensor not from the file:
    # where the mapping starts is not known for sure, and the caller hashes the file itself.
    assert reading.digest_through_mapping({"model": {"v": raw["model"]["v"]}}, path, size, "xxh3_128") is None
    assert reading.digest_through_mapping({**raw, "x": torch.zeros(3)}, path, size, "xxh3_128") is None
    assert reading.digest_through_mapping(torch.load(path, weights_only=True), path, size, "xxh3_128") is None
    nested: tuple = (raw,)
    for _ in range(60):  # a tuple nested in itself many times over is walked once
        nested = (nested, nested)
    assert reading.digest_through_mapping(nested, path, size, "xxh3_128") == expected


def test_a_mapped_state_holding_a_sparse_tensor_restores(tmp_path, pm):
    """The hash through the mapping asked a sparse buffer for its storage, which it has none of:
    restore raised NotImplementedError instead of loading the file the plain way (review)."""

    class WithSparse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(600, 600)
            self.register_buffer("adj", torch.eye(50).to_sparse())

    model = WithSparse()
    with CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm) as ck:
        ck.save(step=1, model=model)
    assert (tmp_path / "scratch/exp/step-0000000001/state.pt").stat().st_size >= reading._MAP_MIN
    fresh = WithSparse()
    with CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm) as ck:
        assert ck.restore(fresh).step == 1
    assert torch.equal(fresh.lin.weight, model.lin.weight) and torch.equal(fresh.adj.to_dense(), torch.eye(50))


def test_a_file_torch_swaps_in_the_mapping_or_places_by_computed_offsets_is_hashed_on_its_own(tmp_path, monkeypatch):
    """torch.load(mmap=True) swaps a big-endian file's tensors to this machine's byte order inside
    the mapping: hashed there, an intact file failed its check, and one whose tensors were swapped
    beforehand passed it while loading other values (review)."""
    import sys

    from torch.utils.serialization import config

    from ckptkit import safeload
    from ckptkit.hashing import hash_stream

    other = "big" if sys.byteorder == "little" else "little"
    path = str(tmp_path / "state.pt")
    monkeypatch.setattr(sys, "byteorder", other)  # as torch.save writes it on such a machine
    torch.save({"model": {"w": torch.arange(90000, dtype=torch.float32)}}, path)
    monkeypatch.undo()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        expected = hash_stream(f, "xxh3_128")
    raw = safeload.load(path, mapped=True)
    assert raw["model"]["w"][1].item() != 1.0, "swapped to this machine's order as it loaded"
    assert reading.digest_through_mapping(raw, path, size, "xxh3_128") is None
    # A file of this machine's order, with storage offsets that torch computes instead of reading.
    native = str(tmp_path / "native.pt")
    torch.save({"model": {"w": torch.arange(90000, dtype=torch.float32)}}, native)
    raw = safeload.load(native, mapped=True)
    with open(native, "rb") as f:
        assert reading.digest_through_mapping(raw, native, os.path.getsize(native), "xxh3_128") == \
            hash_stream(f, "xxh3_128")
    with config.patch({"load.calculate_storage_offsets": True}):  # (monkeypatch would delete the setting)
        assert reading.digest_through_mapping(raw, native, os.path.getsize(native), "xxh3_128") is None
    assert not config.load.calculate_storage_offsets


OUT_OF_MEMORY_RESTORE = """
import json, resource, sys, threading, warnings, torch, ckptkit
from ckptkit.plugins import make_plugin_manager
folder = sys.argv[1]
config = {"backends": {"disk": {"type": "local", "path": folder}},
          "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "keep_last": 3}}}
torch.manual_seed(0)
model = torch.nn.Linear(2048, 2048)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(2, 2048)).sum().backward()
opt.step()
with ckptkit.CheckpointManager.from_config(config, run_name="exp", plugin_manager=make_plugin_manager(autoload=False)) as ck:
    ck.save(step=1, model=model, optimizer=opt)
    ck.save(step=2, model=model, optimizer=opt)
ck = ckptkit.CheckpointManager.from_config(config, run_name="exp", plugin_manager=make_plugin_manager(autoload=False))
threading.stack_size(1 << 18)
size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
told = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    resource.setrlimit(resource.RLIMIT_AS, (size + 24 * 2**20, resource.RLIM_INFINITY))
    try:
        ck.restore(model, opt)
        told["limited"] = "restored"
    except BaseException as exc:
        told["limited"] = f"{type(exc).__name__}: {exc}"
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
told["skipped"] = [str(w.message) for w in caught if "skipped" in str(w.message)]
told["then"] = ck.restore(model, opt).step
ck.close()
print(json.dumps(told))
"""


def test_a_restore_that_runs_out_of_memory_says_so_and_skips_nothing(tmp_path):
    """The mapping of the state file failed for want of memory (memory-tight probe): restore
    took both checkpoints for damaged, skipping them; had memory freed up between the tries, it
    would have resumed an older step. Now a MemoryError naming the checkpoint, at once."""
    proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_RESTORE, str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    told = json.loads(proc.stdout.strip().splitlines()[-1])
    assert told["limited"].startswith(f"MemoryError: file://{tmp_path}/exp/step-0000000002: this machine ran out "
                                      "of memory loading state.pt"), told
    assert told["skipped"] == [] and told["then"] == 2
