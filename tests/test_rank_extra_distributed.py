"""rank_extra under torchrun (gloo, CPU): each rank gets its own state back, on any world size."""

from __future__ import annotations

import os

import pytest

from ckpt_helpers import torchrun_results

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "rank_extra_worker.py")

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("fmt, restore_on", [("torch", (2, 1)), ("dcp", (2, 3))])
def test_each_rank_gets_its_own_state_back(tmp_path, fmt, restore_on):
    saved = torchrun_results(WORKER, 2, "save", tmp_path, fmt)
    assert saved[0]["next_draw"] != saved[1]["next_draw"], "the ranks' generators must differ"
    for nproc in restore_on:
        got = torchrun_results(WORKER, nproc, "restore", tmp_path, fmt)
        for rank, r in enumerate(got):
            assert r["step"] == 1 and r["extra"] == {"shared": "rank 0 only"}
            if rank < 2:
                assert r["pos"] == 100 * rank + 1, "rank r resumes where saved rank r was"
                assert r["next_draw"] == saved[rank]["next_draw"], "and draws what it would have drawn"
                assert r["missing"] == list(range(2, nproc))
            else:
                assert r["pos"] == -1 and r["missing"] == [2]
        if nproc > 2:
            assert "rank 2 of 3 got no saved state" in " ".join(got[0]["warnings"])
        if nproc < 2:  # what saved rank 1 held is not carried on, and the trainer is told
            assert "the state that ranks 1 saved in" in " ".join(got[0]["warnings"])
            assert "is restored by no rank, as this job has 1" in " ".join(got[0]["warnings"])
