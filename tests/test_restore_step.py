"""restore(step=N): that step and no other, from whichever backend holds an intact copy, and no
save behind newer steps afterwards."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ckptkit import (
    CheckpointManager,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RunConflictError,
    StorageUnavailableError,
)
from ckptkit.cli import main as cli_main
from ckptkit.manager import STATE_FILE
from ckptkit.plugins import make_plugin_manager

from ckpt_helpers import DownBackend, assert_same_state, local_config, make_model, train_step


def snapshot(model, opt):
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": [{n: t.clone() for n, t in opt.state[p].items()} for p in model.parameters() if p in opt.state]}


def two_backends(tmp_path, keep=10):
    cfg = local_config(tmp_path, final=False, keep=keep)
    cfg["backends"]["other"] = {"type": "local", "path": str(tmp_path / "other")}
    cfg["roles"]["resume"]["backends"] = ["scratch", "other"]
    return cfg


def save_steps(cfg, pm, steps):
    """Train and save ``steps``; each step's model and optimizer state as saved."""
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    states = {}
    for step in steps:
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt, force=True, extra={"at": step})
        states[step] = snapshot(model, opt)
    ck.close()
    return states


def flip_a_byte(root, step):
    path = root / "exp" / f"step-{step:010d}" / STATE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum can tell
    path.write_bytes(bytes(data))


def test_an_older_step_is_restored_and_peeked_not_the_newest(tmp_path, pm):
    cfg = local_config(tmp_path, final=False, keep=10)
    states = save_steps(cfg, pm, range(6))
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert ck.peek(step=2).step == 2 and ck.peek(step=2).extra == {"at": 2}
    model, opt = make_model(seed=7)
    restored = ck.restore(model, opt, step=2)
    assert (restored.step, restored.extra) == (2, {"at": 2})
    assert_same_state(snapshot(model, opt), states[2])
    ck.close()


def test_a_damaged_copy_of_the_step_gives_way_to_another_backends_copy_not_another_step(tmp_path, pm):
    cfg = two_backends(tmp_path)
    states = save_steps(cfg, pm, [1, 2, 3])
    flip_a_byte(tmp_path / "scratch", 2)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model(seed=7)
    with pytest.warns(RuntimeWarning, match=r"skipped file://.*scratch/exp/step-0000000002.*checksum"):
        restored = ck.restore(model, opt, step=2)
    assert (restored.step, restored.ref.backend) == (2, "other")
    assert len(restored.skipped) == 1
    assert_same_state(snapshot(model, opt), states[2])
    ck.close()


def test_every_copy_of_the_step_damaged_loads_nothing_and_tries_no_other_step(tmp_path, pm):
    cfg = two_backends(tmp_path)
    save_steps(cfg, pm, [1, 2, 3])
    flip_a_byte(tmp_path / "scratch", 2)
    flip_a_byte(tmp_path / "other", 2)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model(seed=7)
    train_step(model, opt)
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="checksum") as warned, \
            pytest.raises(CorruptCheckpointError, match=r"run 'exp': every copy of step 2 is damaged.*"
                                                        r"scratch/exp/step-0000000002.*other/exp/step-0000000002"):
        ck.restore(model, opt, step=2)
    assert sum("step-0000000002" in str(w.message) for w in warned) == 2
    assert not any("step-0000000001" in str(w.message) or "step-0000000003" in str(w.message) for w in warned)
    assert_same_state(snapshot(model, opt), before)
    ck.close()


def test_a_step_not_committed_is_named_with_the_steps_there_are(tmp_path, pm):
    cfg = local_config(tmp_path, final=False, keep=10)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model(seed=7)
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint of step 3 .*holds no committed"):
        ck.restore(model, opt, step=3)
    ck.close()

    save_steps(cfg, pm, range(0, 80, 10))
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    before = snapshot(model, opt)
    with pytest.raises(CheckpointNotFoundError) as info:
        ck.restore(model, opt, step=15)
    assert str(info.value) == ("run 'exp' has no committed checkpoint of step 15 (committed steps, newest first: "
                               "70, 60, 50, 40, 30, ... (8 in all); nearest to 15: 10, 20)")
    assert (info.value.run_name, info.value.step, info.value.available) == ("exp", 15, (70, 60, 50, 40, 30, 20, 10, 0))
    assert isinstance(info.value, LookupError)
    assert_same_state(snapshot(model, opt), before)
    with pytest.raises(CheckpointNotFoundError, match="step 15"):
        ck.peek(step=15)
    with pytest.raises(CheckpointNotFoundError, match="step 15"):
        ck.export(tmp_path / "out.pt", step=15)
    with pytest.raises(ValueError, match="non-negative integer"):
        ck.restore(model, opt, step=-1)
    ck.close()


def test_cli_verify_and_export_name_the_steps_there_are(tmp_path, pm, capsys):
    cfg = local_config(tmp_path, final=False, keep=10)
    save_steps(cfg, pm, [4, 8])
    config = tmp_path / "ck.json"
    config.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert cli_main(["verify", str(config), "--step", "5"]) == 1
    assert "no committed checkpoint of step 5 (committed steps, newest first: 8, 4)" in capsys.readouterr().err
    assert cli_main(["export", str(config), "--out", str(tmp_path / "m.pt"), "--step", "5"]) == 1
    assert "no committed checkpoint of step 5" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_a_step_missing_where_a_backend_did_not_answer_is_unavailable_not_not_found(tmp_path, pm, caplog):
    states = save_steps(local_config(tmp_path, final=False, keep=10), pm, [1, 2])
    pm.add_backend_type("down", DownBackend)
    cfg = local_config(tmp_path, final=False, keep=10)
    cfg["backends"]["archive"] = {"type": "down", "path": str(tmp_path / "archive")}
    cfg["roles"]["resume"]["backends"] = ["scratch", "archive"]
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model(seed=7)
    with pytest.raises(StorageUnavailableError, match=r"backend 'archive'.*step 9 is not among .*newest first: 2, 1\).*"
                                                      r"could not be listed.*Connection refused") as info:
        ck.restore(model, opt, step=9)
    assert not isinstance(info.value, CheckpointNotFoundError)
    with pytest.raises(StorageUnavailableError, match="step 9"):
        ck.peek(step=9)
    # A step that the reachable backend holds is restored, with a warning about the other.
    with pytest.warns(RuntimeWarning, match="could not list"):
        assert ck.restore(model, opt, step=1).step == 1
    assert_same_state(snapshot(model, opt), states[1])
    ck.close()


def test_saving_after_restoring_an_older_step_is_refused_until_the_newer_steps_are_gone(tmp_path, pm):
    cfg = local_config(tmp_path, final=False, keep=3)
    save_steps(cfg, pm, range(6))
    run = tmp_path / "scratch" / "exp"
    before = sorted(os.listdir(run))
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model(seed=7)
    # Told at once, not only at the first save that is due (every_n_steps away).
    with pytest.warns(RuntimeWarning, match=r"run 'exp' holds checkpoints newer than the restored step 3 \(up to "
                                            r"step 5\): every save to it is refused with RunConflictError"):
        assert ck.restore(model, opt, step=3).step == 3
    for _ in range(2):  # refused again, not only once
        with pytest.raises(RunConflictError, match=r"run 'exp': step 3 was restored, but the run holds newer "
                                                   r"checkpoints up to step 5.*keep_last.*new run name.*"
                                                   r"ckptkit ls CONFIG --run-name exp") as info:
            ck.save(step=4, model=model, optimizer=opt)
        assert (info.value.run_name, info.value.newest_step) == ("exp", 5)
    assert sorted(os.listdir(run)) == before, "nothing of the run may be touched"

    # The way out the error names: another run name, starting from the restored state.
    branch = CheckpointManager.from_config(cfg, run_name="exp-from-3", plugin_manager=make_plugin_manager(autoload=False))
    assert branch.save(step=4, model=model, optimizer=opt)
    branch.close()
    # Or the newer steps removed by hand: then saving goes on from step 3.
    for step in (4, 5):
        shutil.rmtree(run / f"step-{step:010d}")
    assert ck.save(step=4, model=model, optimizer=opt)
    ck.close()


def test_saving_after_restoring_the_newest_step_or_the_newest_is_allowed(tmp_path, pm):
    cfg = local_config(tmp_path, final=False, keep=3)
    save_steps(cfg, pm, range(4))
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model(seed=7)
    assert ck.restore(model, opt, step=3).step == 3
    assert ck.save(step=4, model=model, optimizer=opt)
    # A plain restore after an older step's restore resumes the newest, and saving goes on.
    assert ck.restore(model, opt, step=2).step == 2
    assert ck.restore(model, opt).step == 4
    assert ck.save(step=5, model=model, optimizer=opt)
    ck.close()
