"""Exact resume for real trainers: per-rank state, one run per name, peek, keep_best."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ckptkit import CheckpointManager, ConfigError, RunConflictError, SaveError, StorageUnavailableError
from ckptkit.cli import main as cli_main
from ckptkit.checkpoint import Payload, PayloadFile
from ckptkit.local import LocalBackend
from ckptkit.manager import EXTRA_FILE, STATE_FILE
from ckptkit.plugins import make_plugin_manager

from ckpt_helpers import DownBackend, DownFS, assert_same_state, local_config, make_model, train_step


class Sampler:
    """A data loader position: the kind of state each rank keeps for itself."""

    def __init__(self, pos=0):
        self.pos = pos

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_rank_extra_comes_back_in_place_and_in_restored(tmp_path, pm, fmt):
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    train_step(model, opt)
    gen = torch.Generator().manual_seed(3)
    ck.save(step=0, model=model, optimizer=opt, extra={"shared": 1},
            rank_extra={"loader": Sampler(41), "gen": gen.get_state()})
    ck.close()

    ck2 = CheckpointManager.from_config(cfg, plugin_manager=pm)
    loader = Sampler()
    model2, opt2 = make_model(seed=1)
    restored = ck2.restore(model2, opt2, rank_extra={"loader": loader})
    assert loader.pos == 41
    assert restored.rank_extra["loader"] == {"pos": 41}
    assert torch.equal(restored.rank_extra["gen"], gen.get_state())
    assert restored.extra == {"shared": 1}
    assert restored.ranks_without_state == ()
    folder = tmp_path / "scratch/exp/step-0000000000"
    expected = {"rank_extra-00000.pt"} if fmt == "dcp" else set()
    assert expected <= set(os.listdir(folder))
    ck2.close()


def test_restore_asking_for_rank_extra_that_was_never_saved_says_so(tmp_path, pm):
    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt)
    loader = Sampler(5)
    with pytest.warns(RuntimeWarning, match=r"rank_extra: rank 0 of 1 got no saved state .*it holds none: it was "
                                            r"saved without rank_extra\); it keeps what it has"):
        restored = ck.restore(model, opt, rank_extra={"loader": loader})
    assert restored.ranks_without_state == (0,) and loader.pos == 5


def _old_run(tmp_path, pm):
    """Run 'exp' saved up to step 9 by an earlier training (keep_last 3): its config, and what
    its folder holds."""
    cfg = local_config(tmp_path, final=False, keep=3)
    old = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in range(10):
        old.save(step=step, model=model, optimizer=opt)
    old.close()
    return cfg, sorted(os.listdir(tmp_path / "scratch/exp"))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_step_below_one_this_training_saved_or_restored_is_refused(tmp_path, pm, mode):
    """A step counter that starts again each epoch, or a loop restarted in the same process: the
    lower step was committed, pruned the newest training state as the oldest of keep_last, and a
    plain restore then resumed the old branch (an outside probe: 10, 20, 30 then 5, 6, 7 left 7, 20, 30)."""
    cfg = local_config(tmp_path, keep=2)
    cfg["roles"]["resume"]["async"] = mode == "async"
    model, opt = make_model()
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    for step in (10, 20, 30):
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt)
    with pytest.raises(RunConflictError, match=r"save step 5: this training already saved or restored step 30.*"
                                                r"global step.*restore\(step=N\).*new run name") as info:
        ck.save(step=5, model=model, optimizer=opt, force=True)
    assert (info.value.run_name, info.value.newest_step) == ("exp", 30)
    with pytest.raises(RunConflictError, match="step 6"):
        ck.save_files(step=6, files=str(tmp_path))
    ck.save(step=30, model=model, optimizer=opt, force=True)  # the same step again: replaced, not refused
    ck.wait()
    assert [r.step for r in ck.list_checkpoints()] == [30, 20]
    ck.close()

    # A training that restored step 30 and then counts from 0 is refused as well, on its first save.
    again = CheckpointManager.from_config(cfg, plugin_manager=pm)
    fresh, fresh_opt = make_model(seed=3)
    assert again.restore(fresh, fresh_opt).step == 30
    with pytest.raises(RunConflictError, match="save step 0: .*step 30"):
        again.save(step=0, model=fresh, optimizer=fresh_opt)
    again.save(step=31, model=fresh, optimizer=fresh_opt)
    again.close()
    assert sorted(os.listdir(tmp_path / "scratch/exp")) == ["step-0000000030", "step-0000000031"]


def test_a_fresh_training_under_a_used_run_name_is_refused(tmp_path, pm):
    cfg, before = _old_run(tmp_path, pm)

    new = CheckpointManager.from_config(cfg, plugin_manager=pm)
    fresh, fresh_opt = make_model(seed=4)
    with pytest.raises(RunConflictError, match=r"run 'exp' already holds checkpoints up to step 9.*restore\(\).*"
                                                r"new run name.*ckptkit prune .*--all") as info:
        new.save(step=0, model=fresh, optimizer=fresh_opt)
    assert (info.value.run_name, info.value.newest_step) == ("exp", 9)
    with pytest.raises(RunConflictError):  # a trainer that catches it and saves on is refused again
        new.save(step=1, model=fresh, optimizer=fresh_opt)
    assert sorted(os.listdir(tmp_path / "scratch/exp")) == before, "nothing of the old run may be touched"
    new.close()
    # From a config file, the command to delete the old run names that file, ready to paste.
    config = tmp_path / "run config.yaml"
    config.write_text(json.dumps(cfg))
    with CheckpointManager.from_config(str(config), plugin_manager=pm) as from_file:
        with pytest.raises(RunConflictError) as info:
            from_file.save(step=0, model=fresh, optimizer=fresh_opt)
    assert f"ckptkit prune '{config}' --run-name exp --all" in str(info.value)

    # Continuing the run after restore, or saving past its newest step, is fine.
    again = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert again.restore(fresh, fresh_opt).step == 9
    assert again.save(step=10, model=fresh, optimizer=fresh_opt)
    again.close()
    later = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert later.save(step=11, model=fresh, optimizer=fresh_opt)
    later.close()


@pytest.mark.parametrize("how", ["save", "async save", "save_files"])
def test_a_used_run_name_is_checked_again_once_a_backend_that_could_not_be_listed_answers(
        tmp_path, pm, monkeypatch, how):
    """The old run's checkpoints lie on a backend that did not answer the first save's check:
    saving on once it answers would write over and behind them, and keep_last would prune them."""
    cfg, before = _old_run(tmp_path, pm)

    pm.add_backend_type("flaky", DownBackend)
    cfg["backends"]["scratch"]["type"] = "flaky"
    cfg["backends"]["spare"] = {"type": "local", "path": str(tmp_path / "spare")}
    cfg["roles"]["resume"]["backends"] = ["spare", "scratch"]
    cfg["roles"]["resume"]["async"] = how == "async save"
    monkeypatch.setattr(DownFS, "down", True)
    new = CheckpointManager.from_config(cfg, plugin_manager=pm)
    fresh, fresh_opt = make_model(seed=4)

    def save(step):
        if how == "save_files":
            folder = tmp_path / f"own-{step}"
            folder.mkdir()
            (folder / "trainer_state.json").write_text(f'{{"step": {step}}}')
            return new.save_files(step=step, files=folder)
        saved = new.save(step=step, model=fresh, optimizer=fresh_opt)
        return new.wait() if how == "async save" else saved

    save(0)
    new.wait()  # the prune after it, which lists that backend again, ran while it was down
    monkeypatch.setattr(DownFS, "down", False)
    # Step 1 is the first that backend commits once it answers; listed again after it, it holds
    # the old run's steps 7 to 9, and every later save is refused.
    assert {r.backend for r in save(1)} == {"spare", "scratch"}
    refusals = []
    for step in (2, 3):
        with pytest.raises((RunConflictError, SaveError), match=r"run 'exp' already holds checkpoints up to step 9") as info:
            save(step)
        refusals.append(info.value)
    assert refusals[0] is not refusals[1], "a new error each time: no traceback piles up the refused saves' frames"
    steps = [n for n in sorted(os.listdir(tmp_path / "scratch/exp")) if n.startswith("step-")]
    assert steps == ["step-0000000000", "step-0000000001", *before], "nothing of either training may be pruned"
    # Restoring, as the error says, continues the run: saves go on.
    assert new.restore(model=fresh, optimizer=fresh_opt).step == 9
    assert save(10)
    new.close()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_second_training_writing_the_run_at_the_same_time_is_stopped_at_its_next_save(tmp_path, pm, is_async):
    """A job started again while the first still runs: it restores the first one's newest step
    and both save on. Once the one behind sees a newer step it did not write (in the listing
    of the prune after its own save), it saves no more; once the one ahead sees a step it saved
    committed again by the other, neither does it."""
    cfg = local_config(tmp_path, final=False, keep=3)
    cfg["roles"]["resume"]["async"] = is_async
    first = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in range(4):
        train_step(model, opt)  # trainings change their state between saves
        first.save(step=step, model=model, optimizer=opt)
    first.wait()
    second = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))  # another process's
    model2, opt2 = make_model(seed=1)
    assert second.restore(model2, opt2).step == 3
    for step in (4, 5):  # the first job is ahead
        train_step(model, opt)
        first.save(step=step, model=model, optimizer=opt)
    first.wait()
    train_step(model2, opt2)
    second.save(step=4, model=model2, optimizer=opt2)
    second.wait()  # its commit, and the prune after it, which finds step 5

    def save_on(ck, step, m, o):
        train_step(m, o)
        ck.save(step=step, model=m, optimizer=o)
        ck.wait()

    def conflict_of(info):
        return info.value if isinstance(info.value, RunConflictError) else info.value.failures["(all)"]

    for _ in range(2):  # refused again, not only once
        with pytest.raises((RunConflictError, SaveError),
                           match=r"run 'exp' holds step 5, newer than any step this training saved \(the last, "
                                 r"step 4\).*another training is writing the same run at the same time") as info:
            save_on(second, 5, model2, opt2)
    assert (conflict_of(info).run_name, conflict_of(info).newest_step) == ("exp", 5)
    state = torch.load(tmp_path / "scratch/exp/step-0000000005" / STATE_FILE, weights_only=True)
    assert_same_state(state["model"], model.state_dict())  # the first job's step 5, not written over
    # The first job's step 4 now holds the second's state: the first saves step 6, and its prune
    # finds that; its checkpoints were pruned as its own meanwhile.
    save_on(first, 6, model, opt)
    assert sorted(os.listdir(tmp_path / "scratch/exp")) == [f"step-000000000{s}" for s in (4, 5, 6)]
    with pytest.raises((RunConflictError, SaveError),
                       match=r"run 'exp' holds step 4 saved again, not by this training, since this training saw "
                             r"it \(found after it saved step 6\).*another training is writing the same run"):
        save_on(first, 7, model, opt)
    first.close()
    second.close()


def test_two_trainings_saving_the_same_steps_in_turn_are_stopped_by_the_first_replaced_step(tmp_path, pm):
    """Less than a save apart, neither sees a step newer than its own: each step the later one
    saves replaces the earlier one's copy, which the earlier one's next prune lists."""
    cfg = local_config(tmp_path, final=False, keep=3)
    first = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    train_step(model, opt)
    first.save(step=0, model=model, optimizer=opt)
    second = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))
    model2, opt2 = make_model(seed=1)
    assert second.restore(model2, opt2).step == 0
    for step in (1, 2):
        # The second replaces the first one's step; the first one's next prune lists that.
        for ck, m, o in ((first, model, opt), (second, model2, opt2)):
            train_step(m, o)
            ck.save(step=step, model=m, optimizer=o)
            # The prune after the first one's save lists its own copy (one replaced sooner is
            # found at once: test_a_step_replaced_before_the_prune_after_its_own_save_...).
            first.wait()
    train_step(model, opt)
    with pytest.raises(RunConflictError, match=r"holds step 1 saved again, not by this training"):
        first.save(step=3, model=model, optimizer=opt)
    # The second one's own steps were never replaced: it saves on.
    assert second.save(step=3, model=model2, optimizer=opt2)
    first.close()
    second.close()


def test_newer_steps_on_a_backend_restore_could_not_list_are_found_once_it_answers(tmp_path, pm, monkeypatch):
    """The run went on to step 5 on a backend that did not answer the restore, which resumed
    step 2 from the other: once it answers, it is the run's newer steps, not another training
    at work, that the saves are refused for (as for a fresh training's first save)."""
    cfg = local_config(tmp_path, final=False, keep=3)
    model, opt = make_model()
    ahead = CheckpointManager.from_config(cfg, plugin_manager=pm)
    for step in range(6):
        ahead.save(step=step, model=model, optimizer=opt)
    ahead.close()
    spare = {"run_name": "exp", "backends": {"spare": {"type": "local", "path": str(tmp_path / "spare")}},
             "roles": {"resume": {"backends": ["spare"], "every_n_steps": 1, "keep_last": 3}}}
    behind = CheckpointManager.from_config(spare, plugin_manager=make_plugin_manager(autoload=False))
    for step in range(3):
        behind.save(step=step, model=model, optimizer=opt)
    behind.close()

    both = make_plugin_manager(autoload=False)
    both.add_backend_type("flaky", DownBackend)
    spare["backends"]["scratch"] = {"type": "flaky", "path": str(tmp_path / "scratch")}
    spare["roles"]["resume"]["backends"] = ["spare", "scratch"]
    monkeypatch.setattr(DownFS, "down", True)
    ck = CheckpointManager.from_config(spare, plugin_manager=both)
    assert ck.restore(model, opt).step == 2  # with a warning that scratch could not be listed
    monkeypatch.setattr(DownFS, "down", False)
    ck.save(step=3, model=model, optimizer=opt)
    ck.wait()
    with pytest.raises(RunConflictError, match=r"already holds checkpoints up to step 5, and this training did not "
                                               r"restore from it") as info:
        ck.save(step=4, model=model, optimizer=opt)
    assert "at the same time" not in str(info.value)
    steps = sorted(n for n in os.listdir(tmp_path / "scratch/exp") if n.startswith("step-"))
    assert steps == ["step-0000000003", "step-0000000004", "step-0000000005"], "nothing newer was pruned"
    ck.close()


def test_a_step_replaced_before_the_prune_after_its_own_save_is_seen_as_replaced(tmp_path):
    """The other training's copy of a step can land before this one's prune lists it (the prune
    runs behind the save): at the same size, within the same clock tick, it is still not ours."""
    def payload(step: int, byte: bytes) -> Payload:
        return Payload(run_name="exp", step=step, epoch=None, format="torch",
                       files=(PayloadFile(STATE_FILE, write=lambda f: f.write(byte * 5000)),))

    first, second = (LocalBackend.from_config(name, {"path": str(tmp_path)}) for name in ("a", "b"))
    first.save_resume(run_name="exp", step=1, payload=payload(1, b"a"))
    second.save_resume(run_name="exp", step=1, payload=payload(1, b"b"))
    first.prune(run_name="exp", keep_last=3, protected_steps=frozenset(), dry_run=False, counted_steps=None)
    assert first.pruned_listing("exp") == (1, frozenset({1}))
    # Its own copy, untouched, is its own at the next prune, and the replaced one is read once.
    first.save_resume(run_name="exp", step=2, payload=payload(2, b"a"))
    first.prune(run_name="exp", keep_last=3, protected_steps=frozenset(), dry_run=False, counted_steps=None)
    assert first.pruned_listing("exp") == (2, frozenset())


def test_a_manifest_listed_with_other_times_than_written_is_still_its_own(tmp_path):
    """A store that sets times at close, or a mount whose rename copies: the listing shows this
    training's manifest otherwise than the commit saw it. Read back, it is still its own, so the
    other training that replaces the step later is found."""
    def payload(step: int, byte: bytes) -> Payload:
        return Payload(run_name="exp", step=step, epoch=None, format="torch",
                       files=(PayloadFile(STATE_FILE, write=lambda f: f.write(byte * 5000)),))

    def prune(backend: LocalBackend) -> tuple:
        backend.prune(run_name="exp", keep_last=3, protected_steps=frozenset(), dry_run=False, counted_steps=None)
        return backend.pruned_listing("exp")

    first, second = (LocalBackend.from_config(name, {"path": str(tmp_path)}) for name in ("a", "b"))
    first.save_resume(run_name="exp", step=1, payload=payload(1, b"a"))
    manifest = tmp_path / "exp" / "step-0000000001" / "manifest.json"
    os.utime(manifest, ns=(0, manifest.stat().st_mtime_ns // 10**9 * 10**9 - 10**9))
    assert prune(first) == (1, frozenset())
    second.save_resume(run_name="exp", step=1, payload=payload(1, b"b"))
    first.save_resume(run_name="exp", step=2, payload=payload(2, b"a"))
    assert prune(first) == (2, frozenset({1}))


def test_a_prune_whose_listing_failed_has_seen_nothing(tmp_path, pm, monkeypatch):
    """What an earlier prune listed must not stand in for a failed listing: after a rollback
    whose newer steps were deleted, those steps would read as another training's."""
    pm.add_backend_type("flaky", DownBackend)
    cfg = local_config(tmp_path, final=False, keep=3)
    cfg["backends"]["scratch"]["type"] = "flaky"
    monkeypatch.setattr(DownFS, "down", False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in range(3):
        train_step(model, opt)
        ck.save(step=step, model=model, optimizer=opt)
    ck.wait()
    backend = ck.router.instances["scratch"]
    assert backend.pruned_listing("exp") == (2, frozenset())
    monkeypatch.setattr(DownFS, "down", True)
    with pytest.raises(StorageUnavailableError, match="could not list"):
        backend.prune(run_name="exp", keep_last=3, protected_steps=frozenset(), dry_run=False, counted_steps=None)
    assert backend.pruned_listing("exp") == (None, frozenset())
    ck.close()


def test_a_newer_checkpoint_that_restore_skipped_as_damaged_is_no_other_training(tmp_path, pm):
    cfg = local_config(tmp_path, final=False, keep=5)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in (10, 20, 30):
        ck.save(step=step, model=model, optimizer=opt)
    ck.close()
    state = tmp_path / "scratch/exp/step-0000000030" / STATE_FILE
    state.write_bytes(b"\0" * state.stat().st_size)
    again = CheckpointManager.from_config(cfg, plugin_manager=pm)
    with pytest.warns(RuntimeWarning, match="skipped .*step-0000000030"):
        assert again.restore(model, opt).step == 20
    for step in (25, 26):  # below the damaged step 30, which the listing after each save shows
        assert again.save(step=step, model=model, optimizer=opt)
    again.close()


def test_peek_reads_step_metrics_and_extra_without_a_model(tmp_path, pm):
    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert ck.peek() is None
    model, opt = make_model()
    args = {"n_layer": 2, "n_embd": 16, "vocab": "gpt2"}
    for step in range(3):
        ck.save(step=step, epoch=step // 2, model=model, optimizer=opt, metrics={"loss": 1.0 / (step + 1)},
                extra={"model_args": args})
    info = ck.peek()
    assert (info.step, info.epoch, info.extra["model_args"]) == (2, 1, args)
    assert info.metrics == {"loss": pytest.approx(1 / 3)}
    assert sorted(info.manifest.files) == [EXTRA_FILE, STATE_FILE]
    # The state file is not read: damaging it does not change what peek says.
    state = tmp_path / "scratch/exp/step-0000000002" / STATE_FILE
    state.write_bytes(b"\0" * state.stat().st_size)
    assert ck.peek().step == 2
    extra = tmp_path / "scratch/exp/step-0000000002" / EXTRA_FILE
    extra.write_bytes(b"\0" * extra.stat().st_size)
    with pytest.warns(RuntimeWarning, match="step-0000000002"):
        assert ck.peek().step == 1


def test_a_dcp_checkpoint_saved_without_extra_holds_an_empty_extra_file(tmp_path, pm):
    """dcp always writes extra.pt (every rank reads it); an empty one is written from bytes
    serialised once per process, and each copy must be a whole, weights-only loadable file."""
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["format"] = "dcp"
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in range(2):
        ck.save(step=step, model=model, optimizer=opt)
    ck.wait()
    extras = [tmp_path / "scratch/exp" / f"step-{s:010d}" / EXTRA_FILE for s in range(2)]
    assert [torch.load(p, weights_only=True) for p in extras] == [{}, {}]
    assert extras[0].read_bytes() == extras[1].read_bytes()
    assert torch.serialization.get_crc32_options() is True
    assert ck.restore(model, opt).extra == {} and ck.peek().extra == {}
    ck.close()


def test_peek_of_a_checkpoint_saved_without_extra_reads_no_state(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path, final=False), plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=4, model=model, optimizer=opt)
    ck.wait()
    state = tmp_path / "scratch/exp/step-0000000004" / STATE_FILE
    state.write_bytes(b"\0" * state.stat().st_size)  # peek would skip it if it read it
    info = ck.peek()
    assert (info.step, info.extra, sorted(info.manifest.files)) == (4, {}, [STATE_FILE])


def test_keep_best_keeps_the_best_besides_the_last(tmp_path, pm):
    cfg = local_config(tmp_path, final=False, keep=2)
    cfg["roles"]["resume"]["keep_best"] = {"metric": "val_loss", "mode": "min", "count": 2}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    losses = [0.9, 0.3, 0.8, 0.1, 0.7, 0.6, 0.95, 0.99]
    for step, loss in enumerate(losses):
        ck.save(step=step, model=model, optimizer=opt, metrics={"val_loss": loss})
    kept = sorted(r.step for r in ck.list_checkpoints())
    assert kept == [1, 3, 6, 7]  # the best two (0.1, 0.3) and the last two
    ck.wait()
    # What the manager remembers of past steps is what is kept, not every step it ever saved.
    assert ck._counted == set(kept) and set(ck._metrics) == set(kept)
    ck.close()

    # ckptkit prune honours keep_best too.
    path = tmp_path / "ck.json"
    path.write_text(json.dumps(cfg))
    assert cli_main(["prune", str(path), "--keep-last", "1"]) == 0
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert sorted(r.step for r in ck.list_checkpoints()) == [1, 3, 7]


@pytest.mark.parametrize("bad, match", [
    ({"mode": "min"}, "keep_best.metric"),
    ({"metric": "x", "mode": "lowest"}, "keep_best.mode"),
    ({"metric": "x", "count": 0}, "keep_best.count"),
    ({"metric": "x", "top": 1}, "keep_best"),
])
def test_keep_best_config_errors_name_the_key(tmp_path, pm, bad, match):
    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["keep_best"] = bad
    with pytest.raises(ConfigError, match=match):
        CheckpointManager.from_config(cfg, plugin_manager=pm)


def test_older_checkpoints_with_extra_inside_state_still_restore(tmp_path, pm):
    """Checkpoints written before extra had a file of its own keep it in state.pt."""
    from ckptkit.manifest import FileEntry, Manifest
    from ckptkit.hashing import hash_stream

    cfg = local_config(tmp_path, final=False)
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    ck.save(step=0, model=model, optimizer=opt, extra={"e": 1})
    folder = tmp_path / "scratch/exp/step-0000000000"
    state = torch.load(folder / STATE_FILE, weights_only=True)
    state["extra"] = {"e": 7}
    torch.save(state, folder / STATE_FILE)
    os.remove(folder / EXTRA_FILE)
    manifest = Manifest.from_json((folder / "manifest.json").read_bytes())
    with open(folder / STATE_FILE, "rb") as f:
        size, digest = hash_stream(f)
    import attrs
    from ckptkit.manifest import _checksum

    data = attrs.evolve(manifest, files={STATE_FILE: FileEntry(size, digest)}).to_dict()
    del data["extra_in_state"]  # written before manifests said where extra is
    data["checksum"] = _checksum(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    model2, opt2 = make_model(seed=2)
    assert ck.restore(model2, opt2).extra == {"e": 7}
    assert ck.peek().extra == {"e": 7}
    assert_same_state(model2.state_dict(), model.state_dict())


def test_finalize_stores_params_and_extra_beside_the_model(tmp_path, pm):
    ck = CheckpointManager.from_config(local_config(tmp_path), plugin_manager=pm)
    model, _ = make_model()
    params = {"n_layer": 2, "dropout": 0.1, "bias": True, "tokenizer": "gpt2", "note": None}
    ck.finalize(model, step=3, extra={"vocab": ["a", "b"]}, params=params)
    body = torch.load(tmp_path / "published/exp/final/final_model.pt", weights_only=True)
    assert body["params"] == params and body["extra"] == {"vocab": ["a", "b"]}
    with pytest.raises(ValueError, match=r"params\['layers'\]: must be a string, number.*extra="):
        ck.finalize(model, step=3, params={"layers": [1, 2]})


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_restore_given_no_optimizer_says_the_saved_optimizer_state_is_not_restored(tmp_path, pm, fmt):
    """Saved with optimizer= and restored without it, the optimizer's state (Adam's moments and
    step counts) was left behind without a word: the ported trainer trained on from fresh moments."""
    import warnings

    cfg = local_config(tmp_path, final=False)
    cfg["roles"]["resume"]["format"] = fmt
    model, opt = make_model()
    train_step(model, opt)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        ck.save(step=1, model=model, optimizer=opt)
        ck.save(step=2, model=model)
    (tmp_path / "scratch/exp/step-0000000002").rename(tmp_path / "step-2")  # step 1 is the newest for now
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        with pytest.warns(RuntimeWarning, match=r"step-0000000001 holds the state of a torch\.optim\.adamw\.AdamW "
                                                r"optimizer, and restore was given no optimizer=: that state is not "
                                                r"restored .* Pass optimizer= to restore it"):
            assert ck.restore(model=make_model()[0]).step == 1
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh, fresh_opt = make_model()
        assert ck.restore(model=fresh, optimizer=fresh_opt).step == 1
    assert not [w for w in caught if "optimizer=" in str(w.message)], [str(w.message) for w in caught]
    (tmp_path / "step-2").rename(tmp_path / "scratch/exp/step-0000000002")  # saved without one: nothing to say
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ck.restore(model=make_model()[0]).step == 2
    assert not [w for w in caught if "optimizer=" in str(w.message)], [str(w.message) for w in caught]
