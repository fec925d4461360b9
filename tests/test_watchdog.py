"""A backend call that runs long is told of in the log, and so is its end."""

import logging
import threading
import time

import torch

import ckptkit
from ckptkit import CheckpointManager, watchdog
from ckptkit.local import LocalBackend
from ckptkit.plugins import make_plugin_manager


class _Held(LocalBackend):
    """The local backend, whose save waits until the test lets it go."""

    go = threading.Event()

    @ckptkit.hookimpl
    def save_resume(self, run_name, step, payload):
        assert self.go.wait(60), "the test never let the save go"
        return super().save_resume(run_name=run_name, step=step, payload=payload)


def test_a_save_that_runs_long_is_told_of_while_it_runs_and_when_it_ends(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(watchdog, "FIRST_S", 0.3)
    monkeypatch.setattr(watchdog, "TICK_S", 0.05)
    pm = make_plugin_manager(autoload=False)
    pm.add_backend_type("held", _Held, "ckptkit-held 1.0")
    cfg = {"run_name": "r", "backends": {"slow": {"type": "held", "path": str(tmp_path / "slow")}},
           "roles": {"resume": {"backends": ["slow"], "every_n_steps": 1, "async": True}}}
    _Held.go.clear()
    with caplog.at_level(logging.WARNING, logger="ckptkit.watchdog"):
        ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
        ck.save(step=1, model=torch.nn.Linear(2, 2))  # async: the training thread goes on
        deadline = time.monotonic() + 30
        while not _saves(caplog) and time.monotonic() < deadline:
            time.sleep(0.05)
        told = _saves(caplog)
        assert told and told[0].startswith("save_resume of backend 'slow' (type 'held', from ckptkit-held 1.0) has "
                                           "run for "), told
        assert "and not returned yet; a save, restore or close() that needs it" in told[0]
        _Held.go.set()
        assert [r.step for r in ck.wait()] == [1]
        ck.close()
    told = _saves(caplog)
    assert told[-1].startswith("save_resume of backend 'slow' (type 'held', from ckptkit-held 1.0) returned after "), told
    assert not [call for call in watchdog._calls.values() if "'slow'" in call[0]]


def _saves(caplog) -> list[str]:
    """What was told of the held save (a loaded machine may make other calls long too)."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("save_resume of backend 'slow'")]


def test_a_forked_child_tells_nothing_of_its_parents_calls(tmp_path, monkeypatch):
    """A child forked inside a call (a hook that forks) neither tells of the parent's calls nor
    fails leaving the call it was forked in."""
    import os

    monkeypatch.setattr(watchdog, "FIRST_S", 30.0)
    pid = None
    try:
        with watchdog.watching("save_resume of backend 'parent'"):
            pid = os.fork()
            inherited = pid == 0 and bool(watchdog._calls)
        if pid == 0:
            os._exit(1 if inherited else 0)
    finally:
        if pid == 0:
            os._exit(2)  # the child failed leaving the call
    assert os.waitpid(pid, 0)[1] == 0, "the child inherited the parent's call in flight, or failed leaving it"
    assert not [call for call in watchdog._calls.values() if "'parent'" in call[0]]


def test_calls_that_return_in_time_are_not_told_of(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(watchdog, "FIRST_S", 30.0)
    monkeypatch.setattr(watchdog, "TICK_S", 0.05)
    cfg = {"run_name": "r", "backends": {"disk": {"type": "local", "path": str(tmp_path / "disk")}},
           "roles": {"resume": {"backends": ["disk"], "every_n_steps": 1, "keep_last": 1}}}
    with caplog.at_level(logging.WARNING, logger="ckptkit.watchdog"):
        with CheckpointManager.from_config(cfg, plugin_manager=make_plugin_manager(autoload=False)) as ck:
            for step in range(3):
                ck.save(step=step, model=torch.nn.Linear(2, 2))
        time.sleep(0.2)
    assert [r.getMessage() for r in caplog.records if "backend 'disk'" in r.getMessage()] == []
