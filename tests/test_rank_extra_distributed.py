"""rank_extra under torchrun (gloo, CPU): each rank gets its own state back, on any world size."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "rank_extra_worker.py")

pytestmark = pytest.mark.distributed


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, scenario: str, workdir, fmt: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_port()}",
           WORKER, scenario, str(workdir), fmt]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = []
    for rank in range(nproc):
        with open(os.path.join(workdir, f"result-{scenario}-{rank}.json")) as f:
            out.append(json.load(f))
    return out


@pytest.mark.parametrize("fmt, restore_on", [("torch", (2, 1)), ("dcp", (2, 3))])
def test_each_rank_gets_its_own_state_back(tmp_path, fmt, restore_on):
    saved = run(2, "save", tmp_path, fmt)
    assert saved[0]["next_draw"] != saved[1]["next_draw"], "the ranks' generators must differ"
    for nproc in restore_on:
        got = run(nproc, "restore", tmp_path, fmt)
        for rank, r in enumerate(got):
            assert r["step"] == 1 and r["extra"] == {"shared": "rank 0 only"}
            if rank < 2:
                assert r["pos"] == 100 * rank + 1, "rank r resumes where saved rank r was"
                assert r["next_draw"] == saved[rank]["next_draw"], "and draws what it would have drawn"
                assert r["missing"] == list(range(2, nproc))
            else:
                assert r["pos"] == -1 and r["missing"] == [2]
        if nproc > 2:
            assert "ranks 2 of 3 got no saved state" in " ".join(got[0]["warnings"])
        if nproc < 2:  # what saved rank 1 held is not carried on, and the trainer is told
            assert "the state that ranks 1 saved in" in " ".join(got[0]["warnings"])
            assert "is restored by no rank, as this job has 1" in " ".join(got[0]["warnings"])
