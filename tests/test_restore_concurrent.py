"""A restore beside a training process that saves and prunes the same run.

A listing is no snapshot: the trainer may commit a step after it and prune those it showed,
before or while they are read. Each interleaving is forced at one point of the reader (a
hook on the reader's own calls, the trainer's saves real), where the random race hit it
about once in a hundred restores.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from ckpt_helpers import local_config

from ckptkit import CheckpointManager, CkptkitError, reading


def _managers(tmp_path, pm, keep):
    cfg = local_config(tmp_path, final=False, keep=keep)
    trainer = CheckpointManager.from_config(cfg, plugin_manager=pm)
    from ckptkit.plugins import make_plugin_manager

    reader = CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False))
    return trainer, reader


def _save(ck, model, *steps):
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(step)
        ck.save(step=step, model=model, extra={"step": step})
    ck.wait()


def _restored(ck, step_expected, kind):
    model = torch.nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ck.restore(model=model, extra={}) if kind == "restore" else ck.peek()
    assert got is not None, "the run held a committed checkpoint throughout"
    assert got.step == step_expected
    if kind == "restore":
        assert torch.all(model.weight == step_expected)


@pytest.mark.parametrize("kind", ["restore", "peek"])
def test_a_commit_and_prune_during_the_listing_never_reads_as_an_empty_run(tmp_path, pm, monkeypatch, kind):
    trainer, reader = _managers(tmp_path, pm, keep=1)
    model = torch.nn.Linear(4, 4)
    _save(trainer, model, 0)
    run = str(tmp_path / "scratch/exp")
    real, armed = os.scandir, [True]

    def scandir(path="."):
        entries = real(path)
        if armed[0] and os.fspath(path) == run:
            armed[0] = False
            entries = list(entries)  # the reader has seen step 0 only
            _save(trainer, model, 1)  # step 1 committed, step 0 pruned, its manifest first
            return iter(entries)
        return entries

    monkeypatch.setattr(os, "scandir", scandir)
    _restored(reader, 1, kind)


@pytest.mark.parametrize("kind", ["restore", "peek"])
def test_checkpoints_pruned_after_the_listing_give_way_to_the_newer_ones(tmp_path, pm, monkeypatch, kind):
    trainer, reader = _managers(tmp_path, pm, keep=2)
    model = torch.nn.Linear(4, 4)
    _save(trainer, model, 0, 1)
    real, armed = reading.Reader.list_all, [True]

    def list_all(self):
        found = real(self)
        if armed[0]:
            armed[0] = False
            _save(trainer, model, 2, 3)  # training goes on: 2 and 3 committed, 0 and 1 pruned
        return found

    monkeypatch.setattr(reading.Reader, "list_all", list_all)
    _restored(reader, 3, kind)


@pytest.mark.parametrize("kind", ["restore", "peek"])
def test_a_trainer_that_outpaces_several_listings_is_caught_up_with(tmp_path, pm, monkeypatch, kind):
    """An evaluation loop beside a trainer that saves and prunes faster than a restore reads:
    each listing's steps are gone by the time they are read, twice over, and the restore lists
    again while new steps appear instead of calling the run damaged."""
    trainer, reader = _managers(tmp_path, pm, keep=2)
    model = torch.nn.Linear(4, 4)
    _save(trainer, model, 0, 1)
    real, calls = reading.Reader.list_all, [0]

    def list_all(self):
        found = real(self)
        calls[0] += 1
        if calls[0] <= 2:  # the first two listings are outdated before any of their steps is read
            last = max(r.step for r in found[0])
            _save(trainer, model, last + 1, last + 2)
        return found

    monkeypatch.setattr(reading.Reader, "list_all", list_all)
    _restored(reader, 5, kind)


def test_a_file_pruned_between_its_check_and_its_load_skips_the_checkpoint_typed(tmp_path, pm, monkeypatch):
    trainer, reader = _managers(tmp_path, pm, keep=1)
    model = torch.nn.Linear(4, 4)
    _save(trainer, model, 0)
    real, armed = reading.Reader._check, [True]

    def check(self, ref, manifest, name):
        real(self, ref, manifest, name)
        if armed[0] and name == "state.pt":  # verified; the load by path comes next
            armed[0] = False
            _save(trainer, model, 1)

    monkeypatch.setattr(reading.Reader, "_check", check)
    try:
        _restored(reader, 1, "restore")
    except Exception as exc:  # never a bare FileNotFoundError out of torch.load
        assert isinstance(exc, CkptkitError), repr(exc)
        raise


def test_a_backend_that_could_not_be_listed_is_not_listed_again(tmp_path, monkeypatch):
    """Listing once more is for a run that changed under the restore; with a backend down, it
    would only wait through that backend's retries a second time."""
    from ckpt_helpers import DownBackend

    from ckptkit.plugins import make_plugin_manager

    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("down", DownBackend)
    cfg = local_config(tmp_path, final=False)
    cfg["backends"]["far"] = {"type": "down", "path": str(tmp_path / "far")}
    cfg["roles"]["resume"]["backends"].append("far")
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    calls = []
    real = reading.Reader.list_all
    monkeypatch.setattr(reading.Reader, "list_all", lambda self: calls.append(1) or real(self))
    with pytest.raises(CkptkitError, match="could not be listed"):
        ck.restore(model=torch.nn.Linear(4, 4))
    assert len(calls) == 1


def test_restore_files_also_lists_again_when_what_it_listed_was_pruned(tmp_path, pm, monkeypatch):
    trainer, reader = _managers(tmp_path, pm, keep=2)
    src = tmp_path / "trainer_out"
    src.mkdir()

    def save_files(*steps):
        for step in steps:
            (src / "weights.bin").write_bytes(bytes([step]) * 8)
            trainer.save_files(step=step, files=src)
        trainer.wait()

    save_files(0, 1)
    real, armed = reading.Reader.list_all, [True]

    def list_all(self):
        found = real(self)
        if armed[0]:
            armed[0] = False
            save_files(2, 3)  # 2 and 3 committed, 0 and 1 pruned
        return found

    monkeypatch.setattr(reading.Reader, "list_all", list_all)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = reader.restore_files(tmp_path / "out-{step}")
    assert got is not None and got.step == 3
    assert (tmp_path / "out-3" / "weights.bin").read_bytes() == bytes([3]) * 8
