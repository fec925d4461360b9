"""A ported trainer under torchrun (2 ranks, gloo): killed and resumed, it trains exactly as an
uninterrupted run, for every wrapping, format and optimizer; ranks that disagree fail fast."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

TRAINER = os.path.join(os.path.dirname(__file__), "distributed", "trainer.py")

pytestmark = pytest.mark.distributed


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, workdir, opts: dict | None = None, ok: bool = True, timeout: int = 180) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_port()}",
           TRAINER, scenario, str(workdir), json.dumps(opts or {})]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if not ok:
        assert proc.returncode != 0, "the trainer was to die"
        return []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = []
    for rank in range(2):
        with open(os.path.join(workdir, f"result-{scenario}-{rank}.json")) as f:
            out.append(json.load(f))
    return out


def load_trainer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ckptkit_test_trainer", TRAINER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAINER_MODULE = load_trainer()
NAMES = [TRAINER_MODULE.name_of(c) for c in TRAINER_MODULE.CASES]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, launch("uninterrupted", workdir)


def final_weights(workdir, name: str) -> dict:
    return torch.load(os.path.join(workdir, f"final-{name}.pt"), weights_only=True)


def assert_same_training(expected_dir, expected: list[dict], got_dir, got: list[dict], name: str,
                         start: int | tuple[int, ...]) -> None:
    starts = start if isinstance(start, tuple) else (start,)
    start = got[0][name]["start"]
    for rank in range(2):
        run = got[rank][name]
        assert run["start"] in starts and run["start"] == start, f"{name}: rank {rank} resumed from step {run['start']}"
        want = {k: v for k, v in expected[rank][name]["losses"].items() if int(k) > start}
        assert run["losses"] == want, f"{name}: rank {rank} trained on other data or other weights after resuming"
    a, b = final_weights(expected_dir, name), final_weights(got_dir, name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: final weights differ"


def test_the_ranks_train_on_different_data(uninterrupted):
    _, runs = uninterrupted
    for name in NAMES:
        assert runs[0][name]["losses"] != runs[1][name]["losses"], name


def test_a_killed_training_resumes_bit_for_bit(uninterrupted, tmp_path):
    expected_dir, expected = uninterrupted
    for case in TRAINER_MODULE.CASES:
        # Killed (SIGKILL, every rank) one step after the step-6 save.
        launch("killed", tmp_path, {"cases": [case], "die_after": 6}, ok=False)
    resumed = launch("resumed", tmp_path)
    for case, name in zip(TRAINER_MODULE.CASES, NAMES):
        # An asynchronous save may still have been writing step 6 when the kill came.
        assert_same_training(expected_dir, expected, tmp_path, resumed, name, start=(3, 6) if case[3] else 6)


def test_a_failure_inside_save_on_one_rank_is_raised_on_every_rank(uninterrupted, tmp_path):
    """The loop catches it on both ranks and goes on: no hang, and training is unchanged."""
    expected_dir, expected = uninterrupted
    cases = [c for c in TRAINER_MODULE.CASES if c[0] == "fsdp2" and c[1] == "dcp"][:1] + TRAINER_MODULE.CASES[:1]
    got = launch("caught", tmp_path, {"cases": cases, "fail_at": 6})
    for case in cases:
        name = TRAINER_MODULE.name_of(case)
        for rank in range(2):
            errors = got[rank][name]["errors"]
            assert [e[0] for e in errors] == [6], f"{name} rank {rank}: {errors}"
            assert "the data loader's worker died" in errors[0][2]
        assert_same_training(expected_dir, expected, tmp_path, got, name, start=0)


def test_ranks_with_different_configs_are_refused_at_start_up(tmp_path):
    got = launch("configs_differ", tmp_path)
    for r in got:
        kind, message = r["raised"]
        assert kind == "RanksDisagreeError"
        assert "roles.resume.every_n_steps" in message and "ranks 1 of 2" in message
        assert str(tmp_path) not in message, "values are never shown, only keys"


def test_ranks_at_different_steps_fail_at_once_and_stay_failed(tmp_path):
    got = launch("steps_differ", tmp_path)
    for r in got:
        kind, message = r["raised"]
        assert kind == "RanksDisagreeError" and "save step 3" in message and "save step 4" in message
        assert r["later"][0] == "RanksDisagreeError" and "restart" in r["later"][1]
        assert r["group_destroyed_by_close"], "close releases ckptkit's own process group"
        assert r["freed"] == [True, True], "the error kept the model or the manager alive"


def test_a_forked_worker_closing_its_copy_of_the_manager_leaves_the_parents_alone(tmp_path):
    got = launch("forked_close", tmp_path, timeout=120)
    assert got[0]["forked_close_returned"], "close in a forked child blocked on the parent's save or group"
    assert [r["steps"] for r in got] == [[3], [3]], "the parent's async save was not committed"


def test_a_frozen_rank_fails_the_others_within_the_configured_bound(tmp_path):
    # The bound holds for the manager's start-up too (both ranks compare configs under it, before
    # rank 1 freezes): 10 s, so that a rank a loaded machine starts late is not taken for frozen.
    got = launch("frozen", tmp_path, {"timeout_s": 10}, timeout=120)
    rank0 = got[0]
    assert rank0["raised"][0] == "CollectiveTimeoutError"
    assert "distributed.timeout_s" in rank0["raised"][1] and "within 10 s" in rank0["raised"][1]


def test_a_refusal_in_finalize_on_one_rank_is_raised_on_every_rank(tmp_path):
    got = launch("finalize_refused", tmp_path)
    for r in got:
        assert r["raised"][0] == "UnstorableStateError" and "extra['f']" in r["raised"][1]
        assert len(r["published"]) == 1, "the next finalize goes through on every rank"
        assert r["wait_after_close"] == []
        assert r["group_after_close"] and "was closed" in r["group_after_close"]
        assert r["groups_made_after_close"] == 0
