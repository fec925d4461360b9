"""Links planted in a local run: never followed, by the prune or by a restore."""

from __future__ import annotations

import os
import time

import pytest
import torch
from ckpt_helpers import local_config, make_model, rewrite_manifest

from ckptkit import BackendError, CheckpointManager, CorruptCheckpointError, SaveError
from ckptkit.cli import main as cli_main
from ckptkit.plugins import make_plugin_manager


def _aged(path):
    an_hour_ago = time.time() - 3600
    for name in os.listdir(path):
        os.utime(path / name, (an_hour_ago, an_hour_ago))
    os.utime(path, (an_hour_ago, an_hour_ago))


@pytest.mark.parametrize("leftover", ["step-0000000099", ".tmp-step-0000000099-abcdef012345"])
def test_a_link_named_like_a_leftover_folder_is_never_followed_by_the_prune(tmp_path, pm, leftover):
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "precious.txt").write_text("the user's own")
    (victim / "manifest.json").write_text("{}")
    _aged(victim)
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["scratch"]["leftover_grace_s"] = 60
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    link = tmp_path / "scratch/exp" / leftover
    link.symlink_to(victim, target_is_directory=True)
    ck.save(step=1, model=model, optimizer=opt)
    ck.wait()  # the prune after a save runs on a thread of its own
    config = tmp_path / "ck.yaml"
    import yaml
    config.write_text(yaml.safe_dump(cfg))
    assert cli_main(["prune", str(config)]) == 0
    assert sorted(os.listdir(victim)) == ["manifest.json", "precious.txt"]
    assert link.is_symlink()


def test_deleting_a_folder_that_became_a_link_removes_the_link_alone(tmp_path, pm):
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "manifest.json").write_text("{}")
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    backend = ck.router.instances["scratch"]
    link = tmp_path / "link"
    link.symlink_to(victim, target_is_directory=True)
    backend._delete(str(link))
    assert not link.exists() and not link.is_symlink()
    assert os.listdir(victim) == ["manifest.json"]


def _outside_file(tmp_path, value):
    path = tmp_path / "outside.pt"
    torch.save({"secret": value}, path)
    return path


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
@pytest.mark.parametrize("target", ["file outside the root", "device"])
def test_a_checkpoint_file_that_is_a_link_is_never_read(tmp_path, pm, fmt, target):
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=1, model=model, optimizer=opt, extra={"mine": 1})
    folder = tmp_path / "scratch/exp/step-0000000001"
    pointed = _outside_file(tmp_path, 42) if target != "device" else "/dev/zero"
    os.remove(folder / "extra.pt")
    os.symlink(pointed, folder / "extra.pt")
    if target != "device":
        rewrite_manifest(folder)  # the digest of what the link points at: only the link gives it away
    ck.close()
    ck2 = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))
    model2, opt2 = make_model(seed=1)
    with pytest.raises(CorruptCheckpointError, match="extra.pt is not a regular file|symbolic link"):
        ck2.restore(model=model2, optimizer=opt2)


def _in_thread(fn):
    """``fn()``'s outcome, run where a hang shows as a thread still alive."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "it waits on the pipe for good"
    return out


@pytest.mark.parametrize("where", ["extra.pt", "manifest.json"])
def test_a_named_pipe_in_a_checkpoint_is_never_waited_on(tmp_path, pm, where):
    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in (1, 2):
        ck.save(step=step, model=model, optimizer=opt, extra={"step": step})
    ck.wait()
    folder = tmp_path / "scratch/exp/step-0000000002"
    os.remove(folder / where)
    os.mkfifo(folder / where)
    model2, opt2 = make_model(seed=1)
    got = _in_thread(lambda: ck.restore(model=model2, optimizer=opt2, extra={}))
    assert "error" not in got, got.get("error")
    assert got["value"].step == 1  # the one with the pipe skipped
    ref = [r for r in ck.list_checkpoints() if r.step == 2]
    if ref:  # a pipe for a manifest: not a committed checkpoint at all
        assert isinstance(_in_thread(lambda: ck.verify(ref[0])).get("error"), CorruptCheckpointError)


def test_a_link_in_place_of_a_step_folder_is_replaced_and_what_it_points_at_is_left_alone(tmp_path, pm):
    """A run "forked" by linking another run's step folder: the save of that step replaces the
    link with a folder of its own, and the other run's checkpoint keeps every file."""
    cfg = local_config(tmp_path, final=False)
    model, opt = make_model()
    first = CheckpointManager.from_config(cfg, run_name="first", plugin_manager=pm)
    first.save(step=5, model=model, optimizer=opt)
    first.close()
    theirs = tmp_path / "scratch/first/step-0000000005"
    before = sorted(os.listdir(theirs))
    (tmp_path / "scratch/fork").mkdir()
    (tmp_path / "scratch/fork/step-0000000005").symlink_to(theirs, target_is_directory=True)

    fork = CheckpointManager.from_config(cfg, run_name="fork", plugin_manager=pm)
    assert fork.restore(model=model, optimizer=opt) is None  # the link is no checkpoint of this run
    fork.save(step=5, model=model, optimizer=opt)
    fork.close()
    ours = tmp_path / "scratch/fork/step-0000000005"
    assert not ours.is_symlink() and (ours / "manifest.json").is_file()
    assert sorted(os.listdir(theirs)) == before
    again = CheckpointManager.from_config(cfg, run_name="first", plugin_manager=pm)
    assert again.restore(model=model, optimizer=opt).step == 5
    again.close()


def test_a_run_folder_that_is_a_link_is_neither_written_nor_pruned_nor_restored_through(tmp_path, pm):
    """A link planted in the root in place of a run's folder would take the run's saves, and the
    prune after each, outside the root: into a folder whose old step-looking folders it deletes."""
    victim = tmp_path / "outside"
    for name in ("step-0000000007", ".tmp-step-0000000009-abcdef012345"):
        (victim / name).mkdir(parents=True)
        (victim / name / "precious.txt").write_text("the user's own")
        _aged(victim / name)
    _aged(victim)
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["scratch"]["leftover_grace_s"] = 60
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch/exp").symlink_to(victim, target_is_directory=True)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    with pytest.raises(BackendError, match="exp is a link to .*outside.*nothing was written or deleted"):
        ck.restore(model=model, optimizer=opt)  # not "nothing to resume": training would start over
    with pytest.raises(SaveError, match="exp is a link to"):
        ck.save(step=10, model=model, optimizer=opt)
    ck.close()
    assert sorted(os.listdir(victim)) == [".tmp-step-0000000009-abcdef012345", "step-0000000007"]
    assert all((victim / n / "precious.txt").is_file() for n in os.listdir(victim))
