"""Pruning never leaves a run without a checkpoint that verifies, and cleans what crashes leave."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from ckptkit import BackendError, CheckpointManager, StorageFullError, reading
from ckptkit.cli import main as cli_main
from ckptkit.hookspecs import hookimpl
from ckptkit.local import LocalBackend, _in_memory
from ckptkit.plugins import make_plugin_manager

from ckpt_helpers import assert_same_state, local_config, make_model, saved_run, train_step


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only reading every byte can tell
    path.write_bytes(bytes(data))


def _steps(root, run="exp"):
    d = root / "scratch" / run
    return sorted(int(n.split("-")[1]) for n in os.listdir(d) if n.startswith("step-"))


def _config_file(tmp_path, cfg):
    path = tmp_path / "ck.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_cli_prune_keeps_the_newest_checkpoint_that_verifies(tmp_path, pm, capsys):
    cfg = local_config(tmp_path, final=False, keep=5)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    states = {}
    for step in range(4):
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt)
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    ck.close()
    _corrupt(tmp_path / "scratch/exp/step-0000000003/state.pt")

    assert cli_main(["prune", _config_file(tmp_path, cfg), "--keep-last", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["step"] for d in out["damaged"]] == [3]
    assert sorted(r["step"] for r in out["deleted"]) == [0, 1]
    assert _steps(tmp_path) == [2, 3], "the newest verified step stays; the damaged newer one is not counted"

    model2, opt2 = make_model(seed=9)
    with pytest.warns(RuntimeWarning, match="step-0000000003"):
        assert CheckpointManager.from_config(cfg, plugin_manager=pm).restore(model2, opt2).step == 2
    assert_same_state(model2.state_dict(), states[2])


def test_the_prune_after_a_save_counts_only_what_this_manager_knows_is_intact(tmp_path, pm):
    """Checkpoints of an earlier process newer than the one this process restored (and verified)
    do not count toward keep_last."""
    cfg = local_config(tmp_path, final=False, keep=2)
    first = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in range(3):
        first.save(step=step, model=model, optimizer=opt)
    first.close()
    # The newest is damaged on disk after it was committed; a later process restores past it.
    _corrupt(tmp_path / "scratch/exp/step-0000000002/state.pt")
    second = CheckpointManager.from_config(cfg, plugin_manager=pm)
    with pytest.warns(RuntimeWarning):
        assert second.restore(model, opt).step == 1
    second.save(step=3, model=model, optimizer=opt)
    # Intact and known: 3 (written) and 1 (restored). The damaged 2 lies between them and is
    # not counted; 0 is older than both kept ones.
    second.wait()  # the prune after a save runs on a thread of its own
    assert _steps(tmp_path) == [1, 2, 3]
    second.save(step=4, model=model, optimizer=opt)
    second.wait()
    assert _steps(tmp_path) == [3, 4]


def test_a_training_restarted_at_every_save_still_keeps_only_keep_last(tmp_path, pm):
    """Preempted after each save: every process restores the newest step and saves one more.
    Counting only the steps each process wrote or restored, no prune ever deleted anything."""
    cfg = local_config(tmp_path, final=False, keep=3)
    model, opt = make_model()
    for step in range(7):
        ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
        restored = ck.restore(model, opt)
        assert (restored.step if restored else -1) == step - 1
        ck.save(step=step, model=model, optimizer=opt)
        ck.close()
    assert _steps(tmp_path) == [4, 5, 6]


class _LateLister(LocalBackend):
    """Local disk whose first listing misses the newest step, as one made just before a trainer
    committed it does."""

    listings = 0

    @hookimpl
    def list_checkpoints(self, run_name):
        _LateLister.listings += 1
        refs = super().list_checkpoints(run_name=run_name)
        return [r for r in refs if r.step < 3] if _LateLister.listings == 1 else refs


def test_steps_a_restore_skipped_do_not_count_though_older_than_the_one_restored(tmp_path, pm):
    """Steps 1 and 2 were skipped as damaged, then a new listing gave step 3: the two lie below
    the restored step, yet are known damaged, and must not count toward keep_last."""
    cfg = local_config(tmp_path, final=False, keep=3)
    ck, model, opt = saved_run(cfg, pm, (1, 2, 3), train=False)
    ck.close()
    for step in (1, 2):
        _corrupt(tmp_path / f"scratch/exp/step-000000000{step}/state.pt")
    late = make_plugin_manager(autoload=False)
    late.add_backend_type("late", _LateLister)
    cfg["backends"]["scratch"]["type"] = "late"
    ck = CheckpointManager.from_config(cfg, plugin_manager=late)
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert ck.restore(model, opt).step == 3
    ck.save(step=4, model=model, optimizer=opt)
    ck.close()
    assert _LateLister.listings >= 2
    # Counted: 3 (restored) and 4 (written), fewer than keep_last: the damaged ones stay.
    assert _steps(tmp_path) == [1, 2, 3, 4]


def test_folders_named_like_steps_but_not_as_ckptkit_names_them_are_left_alone(tmp_path, pm):
    """A trainer's own step-1000/ in the run folder was deleted as a leftover, and a step-²/
    (a digit to str.isdigit, not to int) made every listing of the run fail."""
    cfg = local_config(tmp_path, final=False, keep=1)
    cfg["backends"]["scratch"]["leftover_grace_s"] = 60
    run = tmp_path / "scratch/exp"
    for name in ("step-1000", "step-\u00b2", "step-00000000001"):
        (run / name).mkdir(parents=True)
        (run / name / "model.pt").write_bytes(b"the trainer's own")
        for path in (run / name, run / name / "model.pt"):
            os.utime(path, (time.time() - 7200, time.time() - 7200))
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        model, opt = make_model()
        assert ck.restore(model, opt) is None
        for step in (1, 2):
            ck.save(step=step, model=model, optimizer=opt)
        ck.wait()
        assert [r.step for r in ck.list_checkpoints()] == [2]
    assert sorted(os.listdir(run)) == sorted(["step-0000000002", "step-00000000001", "step-1000", "step-\u00b2"])


def test_empty_folders_left_by_a_kill_are_removed_after_the_grace_period(tmp_path, pm):
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["scratch"]["leftover_grace_s"] = 60
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    run = tmp_path / "scratch/exp"
    old = [run / "step-0000000007", run / ".tmp-step-0000000008-abcdef012345", run / ".tmp-final-0123456789ab"]
    young = run / ".tmp-step-0000000009-abcdef012345"
    mine = run / "notes"
    for folder in [*old, young, mine]:
        folder.mkdir()
    (old[1] / "nested").mkdir()
    an_hour_ago = time.time() - 3600
    for folder in old:
        os.utime(folder, (an_hour_ago, an_hour_ago))
    os.utime(mine, (an_hour_ago, an_hour_ago))
    ck.save(step=1, model=model, optimizer=opt)
    ck.wait()  # the prune after a save runs on a thread of its own
    assert not any(f.exists() for f in old)
    assert young.exists() and mine.exists(), "a young folder may be a save in flight; others are not ours"
    assert _steps(tmp_path) == [0, 1]


def test_a_checkpoint_a_killed_prune_half_deleted_goes_by_the_age_of_its_files(tmp_path, pm):
    """A prune deletes a checkpoint's manifest, then its files: killed in between, it left old
    files in a folder whose own time the deletions had just set, so each restart's prune took it
    for a save in flight and kept it another hour (the grace period)."""
    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in range(3):
        ck.save(step=step, model=model, optimizer=opt)
    ck.wait()
    half = tmp_path / "scratch" / "exp" / "step-0000000000"
    two_hours_ago = time.time() - 7200
    for path in half.iterdir():
        os.utime(path, (two_hours_ago, two_hours_ago))
    (half / "manifest.json").unlink()  # what the killed prune did first; the folder's time is now
    ck.save(step=3, model=model, optimizer=opt)
    ck.wait()
    assert not half.exists()
    assert _steps(tmp_path) == [1, 2, 3]
    ck.close()


def test_a_copy_restore_found_damaged_does_not_count_toward_keep_last_on_its_backend(tmp_path, pm):
    """Restore passed over one backend's damaged copy of the newest step for another's; the
    prune after the next save counted the damaged copy toward keep_last there, and deleted
    that backend's intact older step."""
    cfg = local_config(tmp_path, keep=2, final=False)
    cfg["backends"]["mirror"] = {"type": "local", "path": str(tmp_path / "mirror")}
    cfg["roles"]["resume"]["backends"] = ["scratch", "mirror"]
    model, opt = make_model()
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        for step in range(4):
            ck.save(step=step, model=model, optimizer=opt)
    state = tmp_path / "scratch" / "exp" / "step-0000000003" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.chmod(0o644)
    state.write_bytes(bytes(data))
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.warns(RuntimeWarning, match="does not match its checksum"):
            restored = ck.restore(model, opt)
        assert (restored.step, restored.ref.backend) == (3, "mirror")
        ck.save(step=4, model=model, optimizer=opt)
    assert _steps(tmp_path) == [2, 3, 4], "two intact steps, and the damaged one between them"
    assert sorted(os.listdir(tmp_path / "mirror" / "exp")) == ["step-0000000003", "step-0000000004"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_a_save_killed_on_this_machine_left_goes_at_once_and_nothing_else_young(tmp_path, pm):
    """The local backend names its temporary folders with the process and machine that made
    them: one whose process is gone is removed by the next prune, however young, where it held
    a checkpoint's space for the grace period (an hour)."""
    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    staged = []
    backend = ck.router.instances["scratch"]
    real_stage = backend._stage
    backend._stage = lambda run_name, dirname: staged.append(real_stage(run_name, dirname)) or staged[-1]
    ck.save(step=0, model=model, optimizer=opt)
    assert staged and staged[0].endswith(f".{os.getpid()}.{reading.machine()}"), staged
    run = tmp_path / "scratch" / "exp"
    killed = run / f".tmp-step-0000000001-abcdef012345.{_dead_pid()}.{reading.machine()}"
    running = run / f".tmp-step-0000000001-abcdef012346.{os.getppid()}.{reading.machine()}"
    elsewhere = run / f".tmp-step-0000000001-abcdef012347.{_dead_pid()}.0badf00d"
    for folder in (killed, running, elsewhere):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"part of a checkpoint")
    ck.save(step=2, model=model, optimizer=opt)
    ck.wait()
    assert not killed.exists()
    assert running.exists() and elsewhere.exists(), "a process that runs, or one of another machine, may be saving"
    assert _steps(tmp_path) == [0, 2]
    ck.close()


def test_a_folder_made_where_the_machine_cannot_be_told_apart_waits_for_the_grace_period(tmp_path, pm, monkeypatch):
    """No boot id or process-id namespace to read (no /proc): a hostname alone could be another
    machine's, whose save in flight this prune would delete. Such names carry no process."""
    from ckptkit import processes

    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    ck.wait()
    monkeypatch.setattr(processes, "_boot_and_namespace", lambda: ())
    assert processes.writer_mark() == "0.0"
    run = tmp_path / "scratch" / "exp"
    other = run / f".tmp-step-0000000001-abcdef012345.{_dead_pid()}.{reading.machine()}"
    other.mkdir()
    ck.save(step=2, model=model, optimizer=opt)
    ck.wait()
    assert other.exists(), "a process that cannot be told gone may be saving"
    ck.close()


def test_a_restart_on_a_full_disk_removes_what_its_killed_save_left_before_saving(tmp_path, pm, tiny_disk):
    """Killed part way through a save, a training leaves a partial checkpoint. On a disk with
    room for keep_last checkpoints and the one being written, the restarted training's saves
    failed for want of space for an hour, and then still, as only a save that commits prunes."""
    import torch

    cfg = local_config(tmp_path, final=False, keep=2)
    cfg["backends"]["scratch"]["path"] = str(tiny_disk)
    model = torch.nn.Linear(384, 384)  # 577 KiB a checkpoint: three fit in 2 MiB, not four
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    for step in range(2):
        ck.save(step=step, model=model)
    ck.close()
    killed = tiny_disk / "exp" / f".tmp-step-0000000002-abcdef012345.{_dead_pid()}.{reading.machine()}"
    killed.mkdir()
    shutil.copy(tiny_disk / "exp" / "step-0000000001" / "state.pt", killed / "state.pt")
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert ck.restore(model).step == 1
    ck.save(step=2, model=model)
    ck.close()
    assert sorted(os.listdir(tiny_disk / "exp")) == ["step-0000000001", "step-0000000002"]


def test_prune_all_through_a_link_to_another_runs_folder_deletes_nothing(tmp_path, pm, capsys):
    """latest -> exp: prune --all --run-name latest emptied exp."""
    cfg = local_config(tmp_path, final=False)
    saved_run(cfg, pm, range(2), train=False)[0].close()
    os.symlink(tmp_path / "scratch/exp", tmp_path / "scratch/latest")
    path = _config_file(tmp_path, cfg)
    assert cli_main(["prune", path, "--all", "--run-name", "latest"]) == 1
    assert "latest is a link to" in capsys.readouterr().err
    assert _steps(tmp_path) == [0, 1]
    # A run's folder moved to another name is its own, though its manifests name the old one.
    os.unlink(tmp_path / "scratch/latest")
    os.rename(tmp_path / "scratch/exp", tmp_path / "scratch/exp-old")
    assert cli_main(["prune", path, "--all", "--run-name", "exp-old"]) == 0
    assert not [n for n in os.listdir(tmp_path / "scratch/exp-old") if n.startswith("step-")]


def test_prune_all_frees_the_run_name(tmp_path, pm, capsys):
    cfg = local_config(tmp_path, final=True)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in range(3):
        ck.save(step=step, model=model, optimizer=opt)
    ck.finalize(model, step=2)
    ck.close()
    path = _config_file(tmp_path, cfg)
    assert cli_main(["prune", path, "--all", "--dry-run", "--json"]) == 0
    assert sorted(r["step"] for r in json.loads(capsys.readouterr().out)["deleted"]) == [0, 1, 2]
    assert _steps(tmp_path) == [0, 1, 2]
    assert cli_main(["prune", path, "--all"]) == 0
    assert _steps(tmp_path) == []
    assert (tmp_path / "published/exp/final/final_model.pt").exists(), "the final model is not a resume checkpoint"
    fresh = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert fresh.save(step=0, model=model, optimizer=opt), "a new training may use the name again"


def test_a_full_disk_is_named_and_leaves_nothing(tmp_path, pm, tiny_disk):
    import torch

    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["scratch"]["path"] = str(tiny_disk)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    small = torch.nn.Linear(4, 4)
    assert ck.save(step=0, model=small)
    big = torch.nn.Linear(1024, 1024)  # 4 MiB of weights
    with pytest.raises(Exception) as info:
        ck.save(step=1, model=big)
    failure = info.value.failures["scratch"]
    assert isinstance(failure, StorageFullError)
    assert f"no space left on {tiny_disk}" in str(failure) and "step-0000000001" in str(failure)
    assert isinstance(failure.__cause__, OSError) and "unexpected pos" not in str(failure)
    assert sorted(os.listdir(tiny_disk / "exp")) == ["step-0000000000"], "nothing of the failed save is left"
    assert ck.restore(small).step == 0


def test_a_restart_on_a_disk_with_room_for_keep_last_and_one_more_removes_the_step_a_kill_left_over(
        tmp_path, pm, tiny_disk):
    """Killed between a commit and the prune after it, a training leaves one step more than
    keep_last. The disk holds keep_last checkpoints and the one being written, not one more: the
    restarted training's saves all failed for want of space, and only a save that commits
    prunes. The first save after the restore now prunes what that prune would have, first."""
    import torch

    cfg = local_config(tmp_path, final=False, keep=3)
    cfg["backends"]["scratch"]["path"] = str(tiny_disk)
    model = torch.nn.Linear(384, 384)  # 577 KiB a checkpoint: three fit in 2 MiB, four do not
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    for step in range(3):  # what keep_last 2 and a kill before the third save's prune leave
        ck.save(step=step, model=model)
    ck.close()
    cfg["roles"]["resume"]["keep_last"] = 2
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert ck.restore(model).step == 2
    ck.save(step=3, model=model)
    ck.close()
    assert sorted(os.listdir(tiny_disk / "exp")) == ["step-0000000002", "step-0000000003"]


def test_a_restore_deletes_nothing_and_the_first_save_after_it_prunes_first(tmp_path, pm):
    """An evaluation job restores beside the training with a config of its own (keep_last 2
    where the training keeps 4): its restore deletes nothing. A training that restores and saves
    prunes what lies beyond its keep_last before it writes; a rollback deletes nothing."""
    cfg = local_config(tmp_path, final=False, keep=4)
    ck, model, opt = saved_run(cfg, pm, (1, 2, 3, 4), train=False)
    ck.close()
    cfg["roles"]["resume"]["keep_last"] = 2
    evaluation = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert evaluation.restore(model, opt).step == 4
    evaluation.close()
    back = CheckpointManager.from_config(cfg, plugin_manager=pm)
    with pytest.warns(RuntimeWarning, match="newer than the restored step 2"):
        assert back.restore(model, opt, step=2).step == 2
    back.close()
    assert _steps(tmp_path) == [1, 2, 3, 4]
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert ck.restore(model, opt).step == 4
    ck.save(step=5, model=model, optimizer=opt)
    ck.wait()
    assert _steps(tmp_path) == [4, 5]
    ck.close()


# -- the prune after a save, off the caller's thread ------------------------------------------


class _HeldPrune(LocalBackend):
    """The local backend, its prune held until the test lets it go; it notes the thread it ran on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []

    @hookimpl
    def prune(self, run_name, keep_last, protected_steps, dry_run, counted_steps):
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(60), "the test never let the prune go"
        return super().prune(run_name=run_name, keep_last=keep_last, protected_steps=protected_steps,
                             dry_run=dry_run, counted_steps=counted_steps)


def _held_prune_manager(tmp_path, every: int = 1, keep_best: dict | None = None, **options):
    """A manager saving to a ``_HeldPrune`` backend, keep_last 1: (config, plugin manager,
    manager, backend)."""
    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("heldprune", _HeldPrune)
    cfg = local_config(tmp_path, final=False, keep=1, every=every)
    cfg["backends"]["scratch"] = {"type": "heldprune", "path": str(tmp_path / "scratch"), **options}
    if keep_best is not None:
        cfg["roles"]["resume"]["keep_best"] = keep_best
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    return cfg, pm, ck, ck.router.instances["scratch"]


def _in_thread(fn, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["result"] = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_save_returns_before_its_prune_and_the_next_write_waits_for_it(tmp_path):
    cfg, pm, ck, backend = _held_prune_manager(tmp_path, leftover_grace_s=0)
    model, opt = make_model()
    backend.release.set()
    ck.save(step=1, model=model, optimizer=opt)
    ck.wait()
    backend.release.clear()
    backend.entered.clear()

    saver, out = _in_thread(ck.save, step=2, model=model, optimizer=opt)
    saver.join(20)
    assert not saver.is_alive(), "save waited for its prune"
    assert [r.step for r in out["result"]] == [2]
    assert backend.entered.wait(20) and backend.threads[-1].startswith("ckptkit-prune"), backend.threads
    assert _steps(tmp_path) == [1, 2], "committed before the prune, which has not run yet"

    # The next save waits for that prune before it writes: with no grace period, a prune that
    # ran beside it would take its temporary folder for a leftover.
    nxt, out = _in_thread(ck.save, step=3, model=model, optimizer=opt)
    nxt.join(0.5)
    run = tmp_path / "scratch/exp"
    assert nxt.is_alive() and not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    backend.release.set()
    nxt.join(20)
    assert not nxt.is_alive() and [r.step for r in out["result"]] == [3], out
    ck.close()  # waits for the last prune
    assert _steps(tmp_path) == [3]
    assert CheckpointManager.from_config(cfg, plugin_manager=pm).list_checkpoints()[0].step == 3


def test_a_save_of_a_step_that_is_not_due_does_not_wait_for_the_prune(tmp_path):
    """Training calls save at every step: one that is not due writes nothing, and waited for the
    prune after the last due save all the same, which on a store that stopped answering held a
    training step for minutes (8 of them with the default retries), async saves included."""
    _, _, ck, backend = _held_prune_manager(tmp_path, every=2)
    model, opt = make_model()
    try:
        ck.save(step=2, model=model, optimizer=opt)
        assert backend.entered.wait(20), "the prune after the save of step 2 runs, and is held"
        step, out = _in_thread(ck.save, step=3, model=model, optimizer=opt)
        step.join(20)
        assert not step.is_alive(), "a step that is not due waited for the prune"
        assert out["result"] == []
    finally:
        backend.release.set()
        ck.close()
    assert _steps(tmp_path) == [2]


def test_best_steps_waits_for_the_prune_that_reads_and_fills_the_same_metrics(tmp_path):
    """best_steps and the prune after a save both read and fill the manager's metrics by step
    (the prune calls it on its thread): a call of it while that prune runs waits for it, as
    every other call of the manager does, instead of racing it on the same dict."""
    _, _, ck, backend = _held_prune_manager(tmp_path, keep_best={"metric": "loss", "mode": "min"})
    model, opt = make_model()
    ck.save(step=1, model=model, optimizer=opt, metrics={"loss": 1.0})
    assert backend.entered.wait(20), "the prune after the save started"
    asker, out = _in_thread(ck.best_steps, backend="scratch")
    try:
        asker.join(0.5)
        assert asker.is_alive(), "best_steps ran beside the prune that uses the same metrics"
    finally:
        backend.release.set()
    asker.join(20)
    assert not asker.is_alive() and out.get("result") == frozenset({1}), out
    ck.close()


def test_a_forked_child_does_not_wait_for_the_prune_its_parent_was_running(tmp_path):
    """A process forked while the prune after a save runs has no such thread: its calls of the
    inherited manager go on instead of waiting forever for a prune that cannot finish there."""
    _, _, ck, backend = _held_prune_manager(tmp_path)
    model, opt = make_model()
    try:
        ck.save(step=1, model=model, optimizer=opt)
        assert backend.entered.wait(20), "the prune after the save started"
        pid = os.fork()
        if pid == 0:  # the child: one call of the manager, then out without running any cleanup
            code = 1
            try:
                code = 0 if [r.step for r in ck.list_checkpoints()] == [1] else 2
            finally:
                os._exit(code)
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child waited for its parent's prune")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        backend.release.set()
    ck.close()


def test_the_prune_reads_no_manifest_back_and_each_save_asks_once_whether_its_step_is_stored(tmp_path):
    """The prune after a save knows the manifest it just committed: reading it back costs no
    request. Whether the step is stored is asked once per save, though this process may think it
    new (another training of the run may have committed it since the last listing), and saving
    a stored step again still goes through that answer."""
    from trust.faults import FaultyFileBackend

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("faultyfs", FaultyFileBackend)
    cfg = local_config(tmp_path, final=False, keep=2)
    cfg["backends"]["scratch"] = {"type": "faultyfs", "path": str(tmp_path / "scratch")}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    calls = ck.router.instances["scratch"].faults.calls
    model, opt = make_model()
    for step in range(1, 5):
        ck.save(step=step, model=model, optimizer=opt)
    ck.wait()
    kept = ("step-0000000003/", "step-0000000004/")
    assert [(op, p) for op, p in calls if op == "cat_file" and any(k in p for k in kept)] == []
    for step in kept:
        assert calls.count(("exists", str(tmp_path / "scratch/exp" / step / "manifest.json"))) == 1, calls
    assert _steps(tmp_path) == [3, 4]
    del calls[:]
    ck.save(step=4, model=model, optimizer=opt, force=True)
    ck.wait()
    assert ("exists", str(tmp_path / "scratch/exp/step-0000000004/manifest.json")) in calls, calls
    ck.close()
    assert CheckpointManager.from_config(cfg, plugin_manager=pm).restore(model, opt).step == 4


def test_tmpfs_is_told_from_disk(tmp_path):
    """fsyncs on tmpfs run inline (nothing to wait for); elsewhere they are issued together."""
    mounts = [line.split()[1:3] for line in open("/proc/self/mounts")]

    def fstype(path):
        path = os.path.realpath(path)
        point, kind = max(((p, k) for p, k in mounts if path == p or path.startswith(p.rstrip("/") + "/")),
                          key=lambda m: len(m[0]))
        return kind

    for path in (str(tmp_path), "/dev/shm"):
        if os.path.isdir(path):
            assert _in_memory(path) == (fstype(path) in ("tmpfs", "ramfs")), (path, fstype(path))


def test_a_committed_copy_left_aside_by_a_save_killed_while_replacing_it_is_put_back(tmp_path, pm, monkeypatch):
    """Where a filesystem cannot swap two folders, saving step N again renames the committed
    step-N aside, then the new copy into place. The state a kill between the two leaves: the old
    copy aside, the new one, complete, in its temporary folder, and no step-N."""
    import shutil

    import ckptkit.local

    monkeypatch.setattr(ckptkit.local, "_SWAP_GRACE_S", 0.0)  # the kill was long ago
    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in (1, 2):
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt)
    ck.wait()
    committed = {k: v.clone() for k, v in model.state_dict().items()}
    run = tmp_path / "scratch/exp"
    shutil.copytree(run / "step-0000000002", run / ".tmp-step-0000000002-0123456789ab")  # the new copy
    (run / "step-0000000002").rename(run / ".trash-step-0000000002-ba9876543210")
    ck.close()

    ck2 = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))
    model2, opt2 = make_model(seed=1)
    assert ck2.restore(model=model2, optimizer=opt2).step == 2
    assert_same_state(model2.state_dict(), committed)
    ck2.prune()
    assert _steps(tmp_path) == [1, 2]
    assert not (run / ".trash-step-0000000002-ba9876543210").exists()


def test_ckptkit_prune_removes_what_a_killed_finalize_left_in_a_final_only_store(tmp_path, pm, capsys):
    """No resume prune visits a store that only takes final models; its leftovers go by hand."""
    cfg = local_config(tmp_path)  # "published": a local store of the final role alone
    cfg["backends"]["published"]["leftover_grace_s"] = 60
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=1, model=model, optimizer=opt)
    ck.finalize(model=model, step=1)
    ck.close()
    run = tmp_path / "published/exp"
    old, young = run / ".tmp-final-0123456789ab", run / ".tmp-final-ba9876543210"
    for folder in (old, young):
        folder.mkdir()
        (folder / "final_model.pt").write_bytes(b"half a model")
    an_hour_ago = time.time() - 3600
    for path in (old / "final_model.pt", old):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert cli_main(["prune", _config_file(tmp_path, cfg)]) == 0
    assert not old.exists() and young.exists(), "a young one may be a finalize in flight"
    assert (run / "final" / "manifest.json").exists()
    # A config of the final role alone: it was refused ("no resume backends are declared").
    os.utime(young, (an_hour_ago, an_hour_ago))
    os.utime(young / "final_model.pt", (an_hour_ago, an_hour_ago))
    del cfg["roles"]["resume"]
    assert cli_main(["prune", _config_file(tmp_path, cfg)]) == 0
    assert not young.exists() and (run / "final" / "manifest.json").exists()


def test_what_a_publish_killed_on_this_machine_left_goes_at_the_next_publish(tmp_path, pm):
    """A store of the final role alone is visited by no prune: each publish killed part way left a
    whole model in a temporary folder until someone ran ckptkit prune, and took a version number."""
    cfg = local_config(tmp_path)  # "published": a local store of the final role alone
    model, opt = make_model()
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.save(step=1, model=model, optimizer=opt)
        ck.finalize(model=model, step=1)
    run = tmp_path / "published/exp"
    killed = [run / f".tmp-final-{v}-0123456789a{v}.{_dead_pid()}.{reading.machine()}" for v in (2, 3)]
    running = run / f".tmp-final-4-0123456789ab.{os.getppid()}.{reading.machine()}"
    elsewhere = run / f".tmp-final-5-0123456789ab.{_dead_pid()}.0badf00d"
    for folder in (*killed, running, elsewhere):
        folder.mkdir()
        (folder / "final_model.pt").write_bytes(b"a whole model")
    train_step(model, opt)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        [ref] = ck.finalize(model=model, step=2)
    assert not any(folder.exists() for folder in killed)
    assert running.exists() and elsewhere.exists(), "a process that runs, or one of another machine, may be publishing"
    assert ref.uri.rstrip("/").endswith("/final-6") and (run / "final-6" / "manifest.json").exists()


def test_a_final_model_left_aside_by_a_killed_publish_is_put_back(tmp_path, pm, monkeypatch):
    """The same two renames replace a published final model; the sweep of final-only stores
    must never delete the copy left aside."""
    import shutil

    import ckptkit.local

    monkeypatch.setattr(ckptkit.local, "_SWAP_GRACE_S", 0.0)
    cfg = local_config(tmp_path)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, _ = make_model()
    ck.finalize(model=model, step=3)
    ck.close()
    run = tmp_path / "published/exp"
    shutil.copytree(run / "final", run / ".tmp-final-0123456789ab")
    (run / "final").rename(run / ".trash-final-ba9876543210")
    assert cli_main(["prune", _config_file(tmp_path, cfg)]) == 0
    assert (run / "final" / "manifest.json").exists()
    assert not (run / ".trash-final-ba9876543210").exists()


def test_a_prune_right_after_such_a_kill_puts_the_copy_aside_back_and_never_sweeps_it(tmp_path, pm):
    """Within the minute a commit in flight looks the same: the prune gives it a moment to make
    its second rename, then puts the committed copy back; its old files never make it a leftover."""
    import shutil

    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["scratch"]["leftover_grace_s"] = 0
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in (1, 2):
        ck.save(step=step, model=model, optimizer=opt)
    ck.wait()
    run = tmp_path / "scratch/exp"
    shutil.copytree(run / "step-0000000002", run / ".tmp-step-0000000002-0123456789ab")
    (run / "step-0000000002").rename(run / ".trash-step-0000000002-ba9876543210")
    an_hour_ago = time.time() - 3600
    for path in (run / ".trash-step-0000000002-ba9876543210").iterdir():
        os.utime(path, (an_hour_ago, an_hour_ago))
    ck.prune()
    assert _steps(tmp_path) == [1, 2] and not (run / ".trash-step-0000000002-ba9876543210").exists()
    assert (run / "step-0000000002" / "manifest.json").exists()


class _Greedy(LocalBackend):
    """A plugin whose prune also deletes the newest step, and says so."""

    @hookimpl
    def prune(self, run_name, keep_last, protected_steps, dry_run, counted_steps):
        deleted = super().prune(run_name=run_name, keep_last=keep_last, protected_steps=frozenset(),
                                dry_run=dry_run, counted_steps=counted_steps)
        newest = max(self.list_checkpoints(run_name=run_name), key=lambda r: r.step, default=None)
        if newest is not None and not dry_run:
            shutil.rmtree(newest.local_dir)
        return [*deleted, *([newest] if newest is not None else [])]


def test_a_plugin_prune_that_deletes_the_step_just_saved_is_named_not_passed_over(tmp_path, caplog):
    """A plugin's prune deleted the checkpoint just committed and returned it: nothing was said,
    and the next process restored nothing and trained from step 0. A prune that raised was
    logged as having lost nothing, which ckptkit cannot know of a plugin."""
    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("greedy", _Greedy)
    cfg = local_config(tmp_path, final=False, keep=2)
    cfg["backends"]["scratch"]["type"] = "greedy"
    model, opt = make_model()
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck, caplog.at_level(logging.ERROR):
        ck.save(step=1, model=model, optimizer=opt)
        ck.wait()
    told = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("pruning backend 'scratch' failed" in t and "prune (type 'greedy'" in t
               and "returned step 1 among those it deleted" in t and "plugin is faulty" in t for t in told), told
    assert "nothing committed was lost" not in caplog.text
    with CheckpointManager.from_config(local_config(tmp_path, final=False, keep=2)) as ck:  # the plain local backend
        ck.save(step=2, model=model, optimizer=opt)
        ck.save(step=3, model=model, optimizer=opt)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(BackendError, match=r"prune \(type 'greedy'.*returned step 3 among those it deleted"):
            ck.prune(keep_last=1)



class _Sloppy(LocalBackend):
    """A plugin whose prune keeps the newest step only, whatever keep_last says."""

    @hookimpl
    def prune(self, run_name, keep_last, protected_steps, dry_run, counted_steps):
        return super().prune(run_name=run_name, keep_last=1, protected_steps=protected_steps,
                             dry_run=dry_run, counted_steps=counted_steps)


def test_a_plugin_prune_by_hand_that_keeps_fewer_than_keep_last_is_named(tmp_path):
    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("sloppy", _Sloppy)
    cfg = local_config(tmp_path, final=False, keep=2)
    model, opt = make_model()
    with CheckpointManager.from_config(cfg) as ck:  # the plain local backend
        for step in (1, 2):
            ck.save(step=step, model=model, optimizer=opt)
    cfg["backends"]["scratch"]["type"] = "sloppy"
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.raises(BackendError, match=r"prune \(type 'sloppy'.*returned step 1 among those it deleted"):
            ck.prune(keep_last=2)


def test_a_leftover_of_the_step_just_saved_is_pruned_without_blaming_the_backend(tmp_path, caplog):
    """A save of step 2 killed midway left its temporary folder; the run restarted, saved step 2
    again, and the prune after it removed that leftover: no fault of the backend's."""
    cfg = local_config(tmp_path, final=False, keep=2)
    cfg["backends"]["scratch"]["leftover_grace_s"] = 0
    model, opt = make_model()
    leftover = tmp_path / "scratch" / "exp" / ".tmp-step-0000000002-killed"
    leftover.mkdir(parents=True)
    (leftover / "state.pt").write_bytes(b"half")
    with CheckpointManager.from_config(cfg) as ck, caplog.at_level(logging.WARNING):
        ck.save(step=2, model=model, optimizer=opt)
        ck.wait()
    assert not leftover.exists(), "the leftover is the prune's to remove"
    assert "pruning backend" not in caplog.text, caplog.text
