"""A fault at each stage of save, commit, prune and publish loses nothing and says where it struck.

Each case saves step 1, makes one operation of the next save (or prune, or publish) fail, and
checks that nothing new is committed, that a fresh manager still restores step 1 bit for bit, and
that the error names the backend, the file and the stage. The faults come from the backends in
``faults.py``: ckptkit's generic ``FileBackend`` (the object-store write path) over a local
filesystem wrapped as fsspec protocol ``faultyfile``, and the local backend with faults at its
own stages.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

import ckptkit
from ckptkit import cli
from ckptkit.errors import BackendError, PublishError, SaveError, StorageFullError, StorageUnavailableError
from ckptkit.plugins import make_plugin_manager

from trust.faults import FaultyFileBackend, FaultyLocalBackend

pytestmark = pytest.mark.timeout(120)

TYPES = {"faultyfs": FaultyFileBackend, "faultylocal": FaultyLocalBackend}


def model_at(step: int) -> torch.nn.Module:
    m = torch.nn.Linear(256, 64)
    with torch.no_grad():
        m.weight.fill_(float(step))
        m.bias.fill_(-float(step))
    return m


def assert_holds_step(m: torch.nn.Module, step: int) -> None:
    assert torch.equal(m.weight, torch.full_like(m.weight, float(step)))
    assert torch.equal(m.bias, torch.full_like(m.bias, -float(step)))


def plugin_manager():
    pm = make_plugin_manager(autoload=False)
    for name, cls in TYPES.items():
        pm.add_backend_type(name, cls)
    return pm


def config(resume: dict, final: dict | None = None, keep_last: int = 2) -> dict:
    backends = dict(resume)
    roles = {"resume": {"backends": list(resume), "every_n_steps": 1, "keep_last": keep_last}}
    if final:
        backends.update(final)
        roles["final"] = {"backends": list(final)}
    return {"run_name": "run", "backends": backends, "roles": roles}


def manager(cfg: dict) -> ckptkit.CheckpointManager:
    return ckptkit.CheckpointManager.from_config(cfg, plugin_manager=plugin_manager())


def restored_step(cfg: dict) -> int | None:
    m = model_at(-7)
    with manager(cfg) as ck:
        restored = ck.restore(model=m)
    if restored is None:
        return None
    assert_holds_step(m, restored.step)
    return restored.step


def folders(root) -> list[str]:
    run = os.path.join(root, "run")
    return sorted(os.listdir(run)) if os.path.isdir(run) else []


# -- save and commit ------------------------------------------------------------------------

SAVE_STAGES = [
    # (backend type, fault, what the error must name)
    ("faultyfs", {"op": "open", "path": "step-0000000002/state.pt"}, "step-0000000002/state.pt"),
    ("faultyfs", {"op": "write", "path": "step-0000000002/state.pt", "nth": 3}, "step-0000000002/state.pt"),
    ("faultyfs", {"op": "write", "path": "step-0000000002/state.pt", "nth": 3, "error": "ENOSPC"},
     "step-0000000002/state.pt"),
    ("faultyfs", {"op": "close", "path": "step-0000000002/state.pt"}, "step-0000000002/state.pt"),
    ("faultyfs", {"op": "pipe_file", "path": "step-0000000002/manifest.json"}, "step-0000000002/manifest.json"),
    ("faultylocal", {"op": "full", "path": "state.pt", "error": "ENOSPC"}, "step-0000000002"),
    ("faultylocal", {"op": "commit", "path": "step-0000000002"}, "manifest.json"),
]


@pytest.mark.parametrize("btype, fault, names", SAVE_STAGES,
                         ids=[f"{t}-{f['op']}-{f.get('error', 'EIO')}" for t, f, _ in SAVE_STAGES])
def test_a_failed_save_commits_nothing_and_the_previous_checkpoint_loads(tmp_path, btype, fault, names):
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": btype, "path": str(root), "leftover_grace_s": 0}})
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.wait()  # the prune after it runs on a thread of its own: done before a fault is armed
    armed = ck.router.instances["flaky"].faults.add(**fault)

    with pytest.raises(SaveError) as err:
        ck.save(step=2, model=model_at(2))

    assert armed.fired == 1, ck.router.instances["flaky"].faults.calls
    failure = err.value.failures["flaky"]
    assert list(err.value.failures) == ["flaky"] and err.value.saved == []
    assert isinstance(failure, BackendError) and failure.backend == "flaky"
    text = str(err.value)
    assert "flaky" in text and "backend 'flaky'" in str(failure) and names in str(failure), text
    assert "step 2" in text
    if fault.get("error") == "ENOSPC":
        assert "no space left" in str(failure).lower()
        if btype == "faultylocal":
            assert isinstance(failure, StorageFullError), repr(failure)
    # Nothing of step 2 is committed, and nothing of it is left over either.
    assert [r.step for r in ck.list_checkpoints()] == [1]
    assert folders(root) == ["step-0000000001"]
    ck.close()
    assert restored_step(cfg) == 1


def test_a_failed_check_before_saving_a_stored_step_again_is_named(tmp_path):
    """A new step is not asked for (no listing showed it); a stored one is, before it is
    un-committed, and a failure there fails the save naming the manifest. (What becomes of the
    stored copy then is the known gap of the test below.)"""
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": "faultyfs", "path": str(root), "leftover_grace_s": 0}})
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.wait()  # the prune after it runs on a thread of its own: done before a fault is armed
    armed = ck.router.instances["flaky"].faults.add(op="exists", path="step-0000000001/manifest.json")
    with pytest.raises(SaveError) as err:
        ck.save(step=1, model=model_at(10), force=True)
    assert armed.fired == 1
    failure = err.value.failures["flaky"]
    assert isinstance(failure, BackendError) and "step-0000000001/manifest.json" in str(failure), str(err.value)
    ck.close()


@pytest.mark.parametrize("btype", ["faultyfs", "faultylocal"])
def test_a_failed_save_of_a_stored_step_keeps_the_stored_copy(tmp_path, btype):
    """Saving a step again (``force=True``, or after a restore fell back) and failing half-way
    must leave the committed copy of that step as it was."""
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": btype, "path": str(root), "leftover_grace_s": 0}})
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.save(step=2, model=model_at(2))
    ck.wait()  # the prune after it runs on a thread of its own: done before a fault is armed
    ck.router.instances["flaky"].faults.add(op="write", path="state.pt", nth=3)
    with pytest.raises(SaveError):
        ck.save(step=2, model=model_at(20), force=True)
    ck.close()
    assert restored_step(cfg) == 2


@pytest.mark.parametrize("btype", ["faultyfs", "faultylocal"])
def test_a_stored_step_saved_again_is_replaced_whole(tmp_path, btype):
    """The new copy of a step holds the new state and only its own files (none of the old
    copy's parts), and nothing is left beside it."""
    root = tmp_path / "store"
    cfg = config({"store": {"type": btype, "path": str(root)}})
    split = copy.deepcopy(cfg)
    split["roles"]["resume"]["write_threads"] = 2
    step_dir = root / "run" / "step-0000000001"
    with manager(split) as ck:
        ck.save(step=1, model=model_at(1), extra={"seen": 1})
    assert sorted(os.listdir(step_dir)) == ["extra.pt", "manifest.json", "state-00-of-02.pt", "state-01-of-02.pt"]
    with manager(cfg) as ck:
        ck.restore(model=model_at(-7))
        ck.save(step=1, model=model_at(10), force=True)
    assert sorted(os.listdir(step_dir)) == ["manifest.json", "state.pt"]  # saved without extra
    assert folders(root) == ["step-0000000001"]
    m = model_at(-7)
    with manager(cfg) as ck:
        assert ck.restore(model=m).step == 1
    assert_holds_step(m, 10)


def _steps_1_and_2_stored(tmp_path):
    """A generic ``FileBackend`` (the object-store write path) holding steps 1 and 2, its prune settled."""
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": "faultyfs", "path": str(root), "leftover_grace_s": 0}})
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.save(step=2, model=model_at(2))
    ck.wait()
    return root, cfg, ck


def test_a_copy_the_store_refuses_is_written_again_and_commits(tmp_path, caplog):
    """A step saved again on an object store is un-committed once its new files are stored,
    and filled by copies the store makes; where the store refuses a copy, the files are written
    into place again and the step commits all the same."""
    root, cfg, ck = _steps_1_and_2_stored(tmp_path)
    fault = ck.router.instances["flaky"].faults.add(op="copy", path="step-0000000002/state.pt")
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        ck.save(step=2, model=model_at(20), force=True)
    assert fault.fired == 1 and "writing the files again" in caplog.text
    ck.close()
    m = model_at(-7)
    with manager(cfg) as again:
        assert again.restore(model=m).step == 2
    assert_holds_step(m, 20)
    assert [f for f in folders(root) if f.startswith(".tmp-")] == []


def test_a_failed_copy_and_rewrite_into_a_stored_step_leave_nothing_half_committed(tmp_path):
    """When writing the files into place fails too, there is nothing to go back to (the old
    files are being replaced): the step is left un-committed, the one before it is restored,
    and the error says the old copy is gone."""
    root, cfg, ck = _steps_1_and_2_stored(tmp_path)
    faults = ck.router.instances["flaky"].faults
    faults.add(op="copy", path="step-0000000002/state.pt")
    faults.add(op="write", path="/step-0000000002/state.pt")
    with pytest.raises(SaveError) as err:
        ck.save(step=2, model=model_at(20), force=True)
    assert "(writing " in str(err.value) and "/step-0000000002/state.pt failed" in str(err.value)
    assert "committed before was un-committed to be replaced and is gone" in str(err.value)
    ck.close()
    assert restored_step(cfg) == 1
    assert [f for f in folders(root) if f.startswith(".tmp-")] == []


def test_a_transient_fault_is_retried_and_the_save_commits_intact(tmp_path):
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": "faultyfs", "path": str(root),
                                      "retry": {"attempts": 3, "backoff_s": 0.01, "max_backoff_s": 0.02}}})
    ck = manager(cfg)
    faults = ck.router.instances["flaky"].faults
    armed = [faults.add(op="write", path="state.pt", nth=2, error="ConnectionError"),
             faults.add(op="pipe_file", path="manifest.json", error="ConnectionError")]
    [ref] = ck.save(step=1, model=model_at(1))
    assert [f.fired for f in armed] == [1, 1]
    ck.verify(ref)
    ck.close()
    assert restored_step(cfg) == 1


def test_cleanup_that_fails_too_leaves_nothing_committed_and_the_next_prune_removes_it(tmp_path):
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": "faultyfs", "path": str(root), "leftover_grace_s": 0}})
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.wait()  # the prune after it runs on a thread of its own: done before a fault is armed
    faults = ck.router.instances["flaky"].faults
    faults.add(op="write", path="step-0000000002/state.pt", nth=2)
    faults.add(op="rm", path="step-0000000002")
    with pytest.raises(SaveError):
        ck.save(step=2, model=model_at(2))
    assert folders(root) == ["step-0000000001", "step-0000000002"]
    assert [r.step for r in ck.list_checkpoints()] == [1]
    assert restored_step(cfg) == 1
    ck.save(step=3, model=model_at(3))
    ck.wait()  # the prune after a save runs on a thread of its own
    assert folders(root) == ["step-0000000001", "step-0000000003"]
    ck.close()
    assert restored_step(cfg) == 3


def test_one_failing_backend_does_not_stop_the_other(tmp_path):
    cfg = config({"scratch": {"type": "local", "path": str(tmp_path / "scratch")},
                            "flaky": {"type": "faultyfs", "path": str(tmp_path / "flaky")}})
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.wait()  # the prune after it runs on a thread of its own: done before a fault is armed
    ck.router.instances["flaky"].faults.add(op="pipe_file", path="manifest.json")
    with pytest.raises(SaveError) as err:
        ck.save(step=2, model=model_at(2))
    assert list(err.value.failures) == ["flaky"]
    assert [r.backend for r in err.value.saved] == ["scratch"]
    assert "manifest.json" in str(err.value.failures["flaky"])
    assert sorted((r.backend, r.step) for r in ck.list_checkpoints()) == [("flaky", 1), ("scratch", 1), ("scratch", 2)]
    ck.close()
    assert restored_step(cfg) == 2


# -- prune ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [{"op": "rm_file", "path": "step-0000000001/manifest.json"},
                                   {"op": "rm", "path": "step-0000000001"},
                                   {"op": "find", "path": "run"}],
                         ids=["manifest", "folder", "listing"])
def test_a_failed_prune_after_a_save_keeps_the_save_and_says_so(tmp_path, caplog, fault):
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": "faultyfs", "path": str(root), "leftover_grace_s": 0}}, keep_last=1)
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.wait()  # the prune after it runs on a thread of its own: done before a fault is armed
    armed = ck.router.instances["flaky"].faults.add(**fault)
    with caplog.at_level(logging.WARNING):
        [ref] = ck.save(step=2, model=model_at(2))
        ck.wait()  # the prune runs on a thread of its own; its failure is logged there
    assert armed.fired == 1
    assert ref.step == 2
    ck.verify(ref)
    warned = [r.getMessage() for r in caplog.records if "prun" in r.getMessage()]
    assert warned and "'flaky'" in warned[0], caplog.text
    if fault["op"] != "find":
        assert "step-0000000001" in warned[0], warned
    assert restored_step(cfg) == 2
    # The next prune finishes the job.
    ck.save(step=3, model=model_at(3))
    ck.wait()
    assert folders(root) == ["step-0000000003"]
    ck.close()


@pytest.fixture
def faulty_dist(tmp_path, monkeypatch):
    """The faulty backend types as an installed distribution, so the ``ckptkit`` CLI finds them."""
    site = tmp_path / "site"
    dist = site / "ckptkit_trust_faults-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ckptkit-trust-faults\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [ckptkit.backends]
        faultyfs = trust.faults:FaultyFileBackend
        faultylocal = trust.faults:FaultyLocalBackend
    """))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_ckptkit_prune_that_fails_exits_1_naming_backend_and_path_and_loses_nothing(tmp_path, faulty_dist, capsys):
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": "faultyfs", "path": str(root)}}, keep_last=5)
    with manager(cfg) as ck:
        for step in (1, 2, 3):
            ck.save(step=step, model=model_at(step))
    cfg["backends"]["flaky"]["faults"] = [{"op": "rm", "path": "step-0000000002"}]
    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))

    code = cli.main(["prune", str(path), "--keep-last", "1"])

    err = capsys.readouterr().err
    assert code == 1
    assert "'flaky'" in err and "step-0000000002" in err and "delete" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "step-0000000003" in folders(root)
    assert restored_step(config({"flaky": {"type": "faultyfs", "path": str(root)}})) == 3


# -- publish --------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [{"op": "open", "path": "final/final_model.pt"},
                                   {"op": "write", "path": "final/final_model.pt", "nth": 2},
                                   {"op": "pipe_file", "path": "final/manifest.json"},
                                   {"op": "write", "path": "final/final_model.pt", "nth": 2, "error": "ENOSPC"}],
                         ids=["open", "write", "manifest", "full"])
def test_a_failed_publish_keeps_the_final_model_and_the_resume_checkpoints(tmp_path, fault):
    cfg = config({"scratch": {"type": "local", "path": str(tmp_path / "scratch")}},
                 final={"pub": {"type": "faultyfs", "path": str(tmp_path / "pub")}})
    fallback = tmp_path / "fallback"
    ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=plugin_manager(), fallback_dir=fallback)
    ck.save(step=1, model=model_at(1))
    ck.wait()  # the prune after it runs on a thread of its own: done before a fault is armed
    armed = ck.router.instances["pub"].faults.add(**fault)
    with pytest.raises(PublishError) as err:
        ck.finalize(model=model_at(1), step=1)
    assert armed.fired == 1
    assert list(err.value.failures) == ["pub"]
    failure = err.value.failures["pub"]
    assert isinstance(failure, BackendError) and failure.backend == "pub"
    assert fault["path"] in str(failure)
    if fault.get("error") == "ENOSPC":  # the final role has no keep_last to lower
        assert isinstance(failure, StorageFullError) and "Free space, or use a larger disk" in str(failure)
        assert "keep_last" not in str(failure)
    text = str(err.value)
    assert "ckptkit publish" in text and str(fallback) in text, text
    # The model waits in the fallback folder; the final backend holds nothing committed.
    assert os.path.exists(fallback / "run" / "final" / "manifest.json")
    assert not os.path.exists(tmp_path / "pub" / "run" / "final" / "manifest.json")
    saved = torch.load(fallback / "run" / "final" / "final_model.pt", weights_only=True)
    assert saved["step"] == 1 and torch.equal(saved["model"]["weight"], model_at(1).weight)
    ck.close()
    assert restored_step(cfg) == 1


def test_a_save_whose_manifest_write_went_unanswered_does_not_say_the_store_is_as_it_was(tmp_path):
    """A store that took the manifest without answering holds the step committed: the save's
    error said so for that backend, and then that what the failing backends held was as it was."""
    cfg = config({"flaky": {"type": "faultyfs", "path": str(tmp_path / "flaky"), "retry": {"attempts": 1}},
                  "scratch": {"type": "local", "path": str(tmp_path / "scratch")}})
    with manager(cfg) as ck:
        ck.save(step=1, model=model_at(1))
        ck.wait()
        ck.router.instances["flaky"].faults.add(op="pipe_file", path="step-0000000002/manifest.json",
                                                error="ConnectionError")
        with pytest.raises(SaveError) as err:
            ck.save(step=2, model=model_at(2))
        text = str(err.value)
        assert "may have taken it" in text
        assert "What 'flaky' held may have changed, as its message says; the next save tries" in text, text
        assert "held is as it was" not in text
        ck.router.instances["flaky"].faults.add(op="open", path="step-0000000003/state.pt")
        with pytest.raises(SaveError) as err:  # refused before anything was written: as it was
            ck.save(step=3, model=model_at(3))
        assert "What the failing backends held is as it was" in str(err.value), str(err.value)


def test_a_full_store_that_cost_a_step_saved_again_its_committed_copy_says_so(tmp_path):
    """Saving a committed step again: the store refused the copy over the committed one and then
    the rewrite (no space), and the committed copy was gone; the error said that what the
    failing backend held was as it was."""
    cfg = config({"flaky": {"type": "faultyfs", "path": str(tmp_path / "flaky")}}, keep_last=5)
    with manager(cfg) as ck:
        ck.save(step=1, model=model_at(1))
        ck.save(step=2, model=model_at(2))
    with manager(cfg) as ck:
        ck.restore(model=model_at(0))
        faults = ck.router.instances["flaky"].faults
        faults.add(op="copy", path="step-0000000002/state.pt", error="ENOSPC")
        faults.add(op="open", path="step-0000000002/state.pt", error="ENOSPC")
        with pytest.raises(SaveError) as err:
            ck.save(step=2, model=model_at(22))
    failure = err.value.failures["flaky"]
    assert isinstance(failure, StorageFullError) and not failure.held_as_it_was
    assert "What 'flaky' held may have changed" in str(err.value) and "held is as it was" not in str(err.value)
    assert "step-0000000002" not in folders(tmp_path / "flaky")


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_commit_that_failed_after_its_rename_says_the_store_changed(tmp_path, monkeypatch, fmt):
    """The local backend renames a save into place, then syncs the run folder: a failure of the
    sync leaves the step committed, and the error said the backend held what it held before."""
    import errno

    from ckptkit import local

    cfg = config({"scratch": {"type": "local", "path": str(tmp_path / "scratch")}}, keep_last=5)
    cfg["roles"]["resume"]["format"] = fmt
    synced = local._fsync_dir

    def failing(path):
        if os.path.basename(path) == "run":
            raise OSError(errno.EIO, "I/O error (injected)")
        return synced(path)

    with manager(cfg) as ck:
        monkeypatch.setattr(local, "_fsync_dir", failing)
        with pytest.raises(SaveError) as err:
            ck.save(step=1, model=model_at(1))
        monkeypatch.setattr(local, "_fsync_dir", synced)
        assert not err.value.failures["scratch"].held_as_it_was
        assert "What 'scratch' held may have changed" in str(err.value)
        assert [r.step for r in ck.list_checkpoints()] == [1]


def test_a_sharded_step_saved_again_in_place_whose_commit_fails_says_its_copy_is_gone(tmp_path):
    """A store that cannot copy clears a committed step for the shards of its new save: when the
    commit then failed, the error said the backend held what it held before."""
    cfg = config({"flaky": {"type": "faultyfs", "path": str(tmp_path / "flaky")}}, keep_last=5)
    cfg["roles"]["resume"]["format"] = "dcp"
    with manager(cfg) as ck:
        ck.save(step=1, model=model_at(1))
        ck.save(step=2, model=model_at(2))
    with manager(cfg) as ck:
        ck.restore(model=model_at(0))
        store = ck.router.instances["flaky"]
        store.fs.copies_files = False
        store.faults.add(op="open", path="step-0000000002/manifest.json", times=None)
        with pytest.raises(SaveError) as err:
            ck.save(step=2, model=model_at(22))
        assert not err.value.failures["flaky"].held_as_it_was
        assert "What 'flaky' held may have changed" in str(err.value)


def test_a_publish_whose_look_after_its_mark_fails_takes_the_mark_back(tmp_path):
    cfg = config({"scratch": {"type": "local", "path": str(tmp_path / "scratch")}},
                 final={"pub": {"type": "faultyfs", "path": str(tmp_path / "pub")}})
    fallback = tmp_path / "fallback"
    ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=plugin_manager(), fallback_dir=fallback)
    ck.router.instances["pub"].faults.add(op="find", path="run/final")
    with pytest.raises(PublishError) as err:
        ck.finalize(model=model_at(1), step=1)
    ck.close()
    assert "marking" in str(err.value.failures["pub"]), str(err.value)
    assert not os.path.exists(tmp_path / "pub" / "run" / "final") or not os.listdir(tmp_path / "pub" / "run" / "final")


def test_a_step_saved_again_in_place_is_no_leftover_to_another_processs_prune(tmp_path):
    """A store that cannot copy a file itself rewrites a committed step in place, its manifest
    deleted first: its files are old then, and only the folder's own time (set by that deletion)
    tells that a save is under way. Aged by its files, the folder was deleted by a prune of
    another process, and the save then committed a manifest over a folder without its file."""
    import threading
    import time

    cfg = config({"flaky": {"type": "faultyfs", "path": str(tmp_path / "flaky")}}, keep_last=5)
    with manager(cfg) as ck:
        ck.save(step=1, model=model_at(1))
        ck.save(step=2, model=model_at(2))
    run = tmp_path / "flaky" / "run"
    old = time.time() - 7200
    for path in [*run.glob("*/*"), *run.glob("*")]:
        os.utime(path, (old, old))
    saving, pruning = manager(cfg), manager(cfg)
    saving.restore(model=model_at(0))
    store = saving.router.instances["flaky"]
    store.fs.copies_files = False
    reached, release = store.faults.pause("open", "step-0000000002/state.pt")
    failure = []
    writer = threading.Thread(target=lambda: saving.save(step=2, model=model_at(22)) or saving.wait())
    writer.start()
    try:
        assert reached.wait(30)
        assert os.listdir(run / "step-0000000002") == ["state.pt"]  # its manifest deleted, its file old
        assert pruning.router.instances["flaky"].prune(run_name="run", keep_last=5, protected_steps=frozenset(),
                                                dry_run=False, counted_steps=None) == [], "a save in flight"
    finally:
        release.set()
        writer.join(60)
    assert sorted(os.listdir(run / "step-0000000002")) == ["manifest.json", "state.pt"]
    saving.close()
    pruning.close()
    m = model_at(-7)
    with manager(cfg) as ck:
        assert ck.restore(model=m).step == 2
    assert_holds_step(m, 22)  # what the save in flight wrote, whole


@pytest.mark.parametrize("held", ["upload", "mark"])
def test_two_publishes_of_a_run_to_an_object_store_at_once_keep_both_models(tmp_path, held):
    """An object store lists no upload in flight: a publish that started while another uploaded
    its model chose the same version, wrote its file over the other's and then its manifest,
    and both reported the model published. Held at ``upload``, the first publish has marked its
    version and is uploading when the second lists the run; held at ``mark``, both listed the
    run before either marked a version, and the second commits first."""
    import threading

    def cfg_of(name):
        return config({"scratch": {"type": "local", "path": str(tmp_path / name)}},
                      final={"pub": {"type": "faultyfs", "path": str(tmp_path / "pub")}})

    first, second = manager(cfg_of("a")), manager(cfg_of("b"))
    faults = first.router.instances["pub"].faults
    reached, release = faults.pause("open" if held == "upload" else "pipe_file",
                                    "final/final_model.pt" if held == "upload" else "/.claim-")
    outcome = {}
    publisher = threading.Thread(target=lambda: outcome.update(first=first.finalize(model=model_at(11), step=11)))
    publisher.start()
    assert reached.wait(30)
    try:
        told = second.finalize(model=model_at(12), step=12)
    finally:
        release.set()
        publisher.join(60)
    assert not publisher.is_alive()
    by_step = {}
    for version in sorted(os.listdir(tmp_path / "pub" / "run")):
        folder = tmp_path / "pub" / "run" / version
        manifest = json.loads((folder / "manifest.json").read_text())
        saved = torch.load(folder / "final_model.pt", weights_only=True)
        assert torch.equal(saved["model"]["weight"], model_at(manifest["step"]).weight), version
        assert not [n for n in os.listdir(folder) if n.startswith(".claim-")], "the marks are removed"
        by_step[manifest["step"]] = version
    assert sorted(by_step) == [11, 12], by_step
    # Each was told of its own folder.
    assert [r.uri.rstrip("/").rsplit("/", 1)[-1] for r in outcome["first"]] == [by_step[11]]
    assert [r.uri.rstrip("/").rsplit("/", 1)[-1] for r in told] == [by_step[12]]
    first.close()
    second.close()


@pytest.mark.parametrize("path", [".distcp", ".metadata", "extra.pt"])
def test_a_sharded_save_that_runs_out_of_space_says_so_and_what_to_do(tmp_path, path):
    """DCP wraps each rank's failure in its CheckpointException, out of the cause's chain: a full
    disk there was a BackendError without advice (DCP's own "unexpected pos" at times)."""
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": "faultyfs", "path": str(root), "leftover_grace_s": 0}})
    cfg["roles"]["resume"]["format"] = "dcp"
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.wait()
    armed = ck.router.instances["flaky"].faults.add(op="write", path=path, error="ENOSPC")
    with pytest.raises(SaveError) as err:
        ck.save(step=2, model=model_at(2))
    assert armed.fired == 1, ck.router.instances["flaky"].faults.calls
    failure = err.value.failures["flaky"]
    assert isinstance(failure, StorageFullError), repr(failure)
    text = str(failure)
    assert f"no space left on {ck.router.instances['flaky'].location}" in text and "step 2 of run 'run'" in text
    assert "No space left on device" in text and "Free space, lower keep_last, or use a larger disk" in text
    assert [r.step for r in ck.list_checkpoints()] == [1]
    ck.close()
    assert restored_step(cfg) == 1


@pytest.mark.parametrize("fault", [{"op": "cat_file", "path": "step-0000000002/manifest.json"},
                                   {"op": "open_read", "path": "step-0000000002/state.pt"}],
                         ids=["manifest", "state"])
def test_a_newer_checkpoint_this_process_may_not_read_is_not_restored_past(tmp_path, fault):
    """A file whose permissions keep this process out (a restart under another user, files
    written under umask 077) was skipped as if damaged, and the step before it restored, from the
    same backend or another one: training then ran again what the newer one holds and saved over it."""
    both = config({"flaky": {"type": "faultyfs", "path": str(tmp_path / "flaky")},
                   "other": {"type": "local", "path": str(tmp_path / "other")}}, keep_last=3)
    with manager(both) as ck:
        ck.save(step=1, model=model_at(1))
    with manager(config({"flaky": both["backends"]["flaky"]}, keep_last=3)) as ck:
        ck.save(step=2, model=model_at(2))  # on flaky alone
    ck = manager(both)
    armed = ck.router.instances["flaky"].faults.add(**fault, error="EACCES", times=None)
    with pytest.raises(StorageUnavailableError) as err:
        ck.restore(model=model_at(-7))
    assert armed.fired == 1
    text = str(err.value)
    assert "step-0000000002" in text and "does not let this process read it" in text, text
    assert "check the permissions on it, or the credentials this process uses" in text, text
    assert "flaky/run/step-0000000001 was not read" in text and "other/run/step-0000000001 was not read" in text
    assert "Nothing was loaded; retry once it answers and lets this process read them" in text, text
    if fault["op"] == "cat_file":
        with pytest.raises(StorageUnavailableError):  # peek says the same, not "none is intact"
            ck.peek()
    else:
        assert ck.peek().step == 2  # which reads no state file
    with pytest.raises(StorageUnavailableError, match="nothing was exported from any step"):
        ck.export(tmp_path / "model.pt")  # not step 1's model, as if it were the newest
    assert not (tmp_path / "model.pt").exists()
    ck.close()
    assert restored_step(both) == 2  # once it may be read, nothing of it was lost


# Restores a faultyfs run in a process that may write no file past 16 KiB (RLIMIT_FSIZE, with
# SIGXFSZ ignored so that the write fails with EFBIG instead of killing it): the disk this
# machine downloads to is full, the checkpoint's storage is not.
_SMALL_DISK = textwrap.dedent("""
    import contextlib, io, json, sys, torch, ckptkit
    from ckptkit.cli import main
    from ckptkit.plugins import make_plugin_manager
    from trust.faults import FaultyFileBackend
    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("faultyfs", FaultyFileBackend)
    cfg_file, dest = sys.argv[1], sys.argv[2]
    out = {}
    with ckptkit.CheckpointManager.from_config(cfg_file, plugin_manager=pm) as ck:
        for what, call in (("restore", lambda: ck.restore(model=torch.nn.Linear(256, 64))),
                           ("restore_files", lambda: ck.restore_files(dest))):
            try:
                call()
                out[what] = None
            except ckptkit.CkptkitError as exc:
                out[what] = [type(exc).__name__, str(exc), repr(exc.__cause__)]
    shown, told = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(told):
        code = main(["verify", cfg_file, "--json"])
    out["verify"] = [code, shown.getvalue(), told.getvalue()]
    print(json.dumps(out))
""")


def _small_disk() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept through exec: ignored dispositions are


def test_a_full_disk_on_this_machine_is_not_blamed_on_the_storage_nor_restored_past(tmp_path, faulty_dist):
    """Downloading a remote checkpoint into a scratch folder on a full disk was told as the
    storage not answering or refusing this process ("check the permissions on it, or the
    credentials"), after every step had been tried: the user looked at the bucket, not at TMPDIR."""
    cfg = config({"remote": {"type": "faultyfs", "path": str(tmp_path / "remote")}}, keep_last=3)
    with manager(cfg) as ck:
        for step in (1, 2):
            ck.save(step=step, model=model_at(step))
    scratch, dest, cfg_file = tmp_path / "scratch", tmp_path / "restored", tmp_path / "ckptkit.yaml"
    scratch.mkdir()
    cfg_file.write_text(yaml.safe_dump(cfg))
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TMPDIR": str(scratch),
           "PYTHONPATH": os.pathsep.join([str(faulty_dist), tests, *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-c", _SMALL_DISK, str(cfg_file), str(dest)], env=env,
                         preexec_fn=_small_disk, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    kind, text, cause = out["restore"]
    assert kind == "LocalWriteError", text
    assert str(scratch) in text and "File too large" in text, text
    assert "(a copy of faultyfile://" in text and "step-0000000002/state.pt) on this machine" in text, text
    assert "The checkpoint is not at fault" in text, text
    assert "point TMPDIR at a folder with room" in text, text
    assert "step-0000000001" not in text, text  # no older step tried
    assert "permissions" not in text and "credentials" not in text, text
    assert cause.startswith("OSError(27, "), cause  # the disk's own error (EFBIG), kept as the cause
    assert "did not answer" not in run.stderr, run.stderr  # nor warned of as the storage's skip
    kind, text, _ = out["restore_files"]
    assert kind == "LocalWriteError", text
    assert str(tmp_path) in text and "restore_files copies the checkpoint's files" in text, text
    assert set(os.listdir(tmp_path)) == {"remote", "scratch", "site", "ckptkit.yaml"}  # nothing half-filled
    code, shown, told = out["verify"]  # not "CORRUPT", which users delete
    assert code == 1 and json.loads(shown)["error"]["type"] == "LocalWriteError", shown
    assert told.startswith("ckptkit: error: could not write") and "CORRUPT" not in shown + told, told
    assert os.listdir(scratch) == []  # the scratch folders went
    assert restored_step(cfg) == 2  # nothing of the checkpoints was touched


def test_a_read_error_without_retries_is_damage_and_the_step_before_is_restored(tmp_path):
    """A bad sector under the newest state file (EIO, which no retry policy retries): that copy
    is damaged, not held back by a store that may deliver it later, so the step before restores."""
    import errno

    from ckptkit.plugin import hookimpl

    class BadSector(FaultyFileBackend):
        @hookimpl
        def open_file(self, ref, name):
            if ref.step == 2 and name == "state.pt":
                raise OSError(errno.EIO, "Input/output error")
            return super().open_file(ref, name)

    with _two_steps_read_through(tmp_path, BadSector) as ck:
        with pytest.warns(RuntimeWarning, match="skipped .*step-0000000002: .*Input/output error"):
            assert ck.restore(model=model_at(-7)).step == 1


def _two_steps_read_through(tmp_path, backend_type) -> ckptkit.CheckpointManager:
    """Steps 1 and 2 saved to a ``faultyfs`` backend, and a manager reading them through
    ``backend_type`` (a subclass of it that fails some reads)."""
    cfg = config({"remote": {"type": "faultyfs", "path": str(tmp_path / "remote")}}, keep_last=3)
    with manager(cfg) as ck:
        for step in (1, 2):
            ck.save(step=step, model=model_at(step))
    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("faultyfs", backend_type)
    return ckptkit.CheckpointManager.from_config(cfg, plugin_manager=pm)


def test_a_refusal_a_plugin_raises_typed_itself_is_not_restored_past(tmp_path):
    """A backend plugin may raise ckptkit's own StorageUnavailableError (from a PermissionError)
    when its store refuses a read; passed on as it was, it no longer kept restore from going on to
    the step before, as the same refusal raised untyped does."""
    import errno

    from ckptkit.plugin import hookimpl

    class Refusing(FaultyFileBackend):
        @hookimpl
        def open_file(self, ref, name):
            if ref.step == 2:
                try:
                    raise PermissionError(errno.EACCES, "AccessDenied")
                except PermissionError as exc:
                    raise StorageUnavailableError(self.name, f"403 reading {ref.uri}/{name}") from exc
            return super().open_file(ref, name)

    cfg = config({"remote": {"type": "faultyfs", "path": str(tmp_path / "remote")}}, keep_last=3)
    with _two_steps_read_through(tmp_path, Refusing) as ck:
        with pytest.raises(StorageUnavailableError, match="refused this process a file of .*step-0000000002, "
                                                          "which may be intact, and no older step is restored"):
            ck.restore(model=model_at(-7))
    assert restored_step(cfg) == 2


def test_a_publish_whose_fallback_fails_too_names_both_failures_and_says_where_the_model_is(tmp_path):
    """The fallback folder's failure replaced the final backend's: the only one named was the one
    that had not been asked for, and nothing said that the model was stored nowhere."""
    cfg = config({"scratch": {"type": "local", "path": str(tmp_path / "scratch")}},
                 final={"pub": {"type": "faultyfs", "path": str(tmp_path / "pub")}})
    blocker = tmp_path / "fallback"
    blocker.write_text("a file where the fallback folder would go")
    ck = ckptkit.CheckpointManager.from_config(cfg, plugin_manager=plugin_manager(), fallback_dir=blocker)
    ck.save(step=1, model=model_at(1))
    ck.wait()
    ck.router.instances["pub"].faults.add(op="write", path="final/final_model.pt", error="ENOSPC")
    with pytest.raises(PublishError) as err:
        ck.finalize(model=model_at(1), step=1)
    assert sorted(err.value.failures) == ["(fallback folder)", "pub"]
    assert isinstance(err.value.failures["pub"], StorageFullError)
    text = str(err.value)
    assert "pub: " in text and "no space left" in text and f"nor the fallback folder {blocker}" in text, text
    assert "it is stored nowhere" in text and "call finalize again" in text, text
    ck.close()
    assert restored_step(cfg) == 1


@pytest.mark.parametrize("error, advice", [
    ("EACCES", "This process may not write there: check the folder's owner and mode"),
    ("EROFS", "The filesystem is mounted read-only: point the backend at a folder on one this process may write"),
])
def test_a_save_the_system_refuses_says_what_to_check(tmp_path, error, advice):
    root = tmp_path / "flaky"
    cfg = config({"flaky": {"type": "faultylocal", "path": str(root), "leftover_grace_s": 0}})
    ck = manager(cfg)
    ck.save(step=1, model=model_at(1))
    ck.wait()
    ck.router.instances["flaky"].faults.add(op="write", path="state.pt", error=error)
    with pytest.raises(SaveError) as err:
        ck.save(step=2, model=model_at(2))
    failure = str(err.value.failures["flaky"])
    assert "could not store step-0000000002 of run 'run'" in failure and advice in failure, failure
    ck.close()
    assert restored_step(cfg) == 1


def test_a_run_this_process_may_not_list_is_not_taken_for_an_empty_one_and_the_advice_fits(tmp_path):
    """A step folder the system refused to open made the listing fail, and the advice was to leave
    the backend out of roles.resume.backends: what it holds would be thrown away."""
    cfg = config({"flaky": {"type": "faultyfs", "path": str(tmp_path / "flaky")}})
    with manager(cfg) as ck:
        ck.save(step=1, model=model_at(1))
    ck = manager(cfg)
    ck.router.instances["flaky"].faults.add(op="find", error="EACCES", times=None)
    with pytest.raises(StorageUnavailableError) as err:
        ck.restore(model=model_at(-7))
    text = str(err.value)
    assert "could not be listed" in text and "give this process access to it (permissions, or credentials)" in text
    assert "remove the backend" not in text, text
    ck.close()
    assert restored_step(cfg) == 1
