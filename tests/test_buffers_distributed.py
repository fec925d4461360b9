"""Buffers that each rank keeps for itself (FSDP, DDP without broadcast_buffers) come back to
the rank that saved them, rank 0's under DDP broadcasting them, and the model's own copy of them
is rank 0's (torchrun, gloo, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

import ckptkit

from ckpt_helpers import torchrun_results

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "buffers_worker.py")

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("fmt, wrap, restore_on", [
    ("torch", "fsdp2", (2,)),
    ("dcp", "fsdp2", (2, 3)),
    ("torch", "ddp-own-buffers", (2,)),
    ("dcp", "ddp-own-buffers", (2,)),
    ("dcp", "ddp", (2,)),
])
def test_each_rank_gets_its_own_buffers_back(tmp_path, fmt, wrap, restore_on):
    saved = torchrun_results(WORKER, 2, "save", tmp_path, fmt, wrap)
    assert saved[0]["running_mean"] != saved[1]["running_mean"], "the ranks' statistics must differ"
    if fmt == "dcp":  # what every rank holds is still written by both, not by rank 0 alone
        folder = tmp_path / "ckpts/buffers/step-0000000001"
        sizes = sorted((folder / n).stat().st_size for n in os.listdir(folder) if n.endswith(".distcp"))
        assert len(sizes) == 2 and sizes[0] > sizes[1] / 4, sizes
    for nproc in restore_on:
        got = torchrun_results(WORKER, nproc, "restore", tmp_path, fmt, wrap)
        for rank, r in enumerate(got):
            # DDP broadcasting buffers makes rank 0's every rank's before the next forward pass:
            # they are the state, where DCP keeps one copy of whichever rank it picks.
            owner = 0 if wrap == "ddp" or rank >= 2 else rank
            assert r["running_mean"] == saved[owner]["running_mean"], rank
    # The model's state, as export and publish take it, holds rank 0's: the rank-0 model of a
    # training that went on without a restore.
    cfg = {"run_name": "buffers", "backends": {"local": {"type": "local", "path": str(tmp_path / "ckpts")}},
           "roles": {"resume": {"backends": ["local"], "format": fmt}}}
    ckptkit.CheckpointManager.from_config(cfg).export(tmp_path / "model.pt")
    exported = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert exported["1.running_mean"].tolist() == saved[0]["running_mean"]
