"""Reading back: manifests that must prove themselves, typed outcomes, and no silent restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from fsspec.implementations.local import LocalFileSystem
import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager, CorruptCheckpointError, SaveError, StorageUnavailableError
from ckptkit.cli import main as cli_main
from ckptkit.local import LocalBackend
from ckptkit.manifest import Manifest
from ckptkit.reading import SCRATCH_PREFIX, sweep_scratch

from ckpt_helpers import assert_same_state, local_config, make_model, train_step


def _save_steps(tmp_path, pm, steps, **cfg):
    ck = CheckpointManager.from_config(local_config(tmp_path, **cfg), plugin_manager=pm)
    model, opt = make_model()
    states = {}
    for step in steps:
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt)
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


class _DownFS(LocalFileSystem):
    """A filesystem whose server does not answer: every listing fails as a dropped connection would."""

    def find(self, *args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")


class DownBackend(LocalBackend):
    """The local backend over storage that cannot be reached."""

    @classmethod
    def from_config(cls, name, options):
        backend = super().from_config(name, options)
        backend.fs = _DownFS()
        return backend


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
    with caplog.at_level("WARNING", logger="ckptkit"):
        restored = ck.restore(model, opt)
    assert restored.step == 1
    assert_same_state(model.state_dict(), states[1])
    assert "could not list" in caplog.text and "archive" in caplog.text


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
    with pytest.raises(TypeError, match="a bug in the backend"):
        ck.restore(model, opt)


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
    dead = tmp_path / f"{SCRATCH_PREFIX}restore-{_dead_pid()}-abc"
    dead.mkdir()
    (dead / "state.pt").write_bytes(b"x" * 1000)
    alive = tmp_path / f"{SCRATCH_PREFIX}restore-{os.getpid()}-def"
    alive.mkdir()
    unrelated = tmp_path / "ckptkit-something-else"
    unrelated.mkdir()
    assert sweep_scratch() == [str(dead)]
    assert not dead.exists() and alive.exists() and unrelated.exists()


def test_restore_sweeps_what_a_killed_restore_left(tmp_path, pm, monkeypatch):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    leftover = scratch_root / f"{SCRATCH_PREFIX}restore-{_dead_pid()}-xyz"
    leftover.mkdir()
    ck, _ = _save_steps(tmp_path, pm, [0])
    model, opt = make_model()
    assert ck.restore(model, opt).step == 0
    assert os.listdir(scratch_root) == []


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
