"""Links planted in a local run: never followed, by the prune or by a restore."""

from __future__ import annotations

import os
import time

import pytest
import torch

from ckptkit import CheckpointManager, CorruptCheckpointError
from ckptkit.cli import main as cli_main
from ckptkit.plugins import make_plugin_manager

from ckpt_helpers import local_config, make_model, rewrite_manifest


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
