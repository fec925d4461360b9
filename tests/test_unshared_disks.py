"""A local backend whose folder the ranks do not share (a disk on each machine), under torchrun
(gloo, 2 CPU processes): each rank stands for a machine, and the one named gets a folder of its
own at the backend's path (a mount namespace with a tmpfs over it, which needs root).

A file of its own so that these launches run beside ``test_distributed.py``'s.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ckptkit

pytestmark = pytest.mark.distributed

UNSHARED = os.path.join(os.path.dirname(__file__), "distributed", "unshared_worker.py")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a disk of its own per rank is a mount namespace (root)")


@needs_root
def test_a_sharded_save_onto_disks_the_ranks_do_not_share_commits_nothing(tmp_path):
    from ckpt_helpers import torchrun_results

    (tmp_path / "ckpts").mkdir()
    got = torchrun_results(UNSHARED, 2, "save-dcp", tmp_path, "1")
    for r in got:
        assert r["error"] is not None and "__1_0.distcp, rank_extra-00001.pt, written by the ranks, are not there" \
            in r["error"], r
        assert "one filesystem that they all share" in r["error"]
    assert got[0]["files"] == [], "rank 0 committed nothing, and its staged folder is gone"
    assert "manifest.json" not in " ".join(got[1]["files"]), "what rank 1 wrote onto its own disk is no checkpoint"


@needs_root
def test_a_restore_where_rank_0_does_not_see_the_newest_checkpoint_is_refused_not_started_afresh(tmp_path):
    """Rank 0 runs on a machine whose disk lacks the run: restore would return None, and training
    would start over from step 0 beside the steps that the other machine holds."""
    from ckpt_helpers import torchrun_results

    config = {"run_name": "r", "backends": {"local": {"type": "local", "path": str(tmp_path / "ckpts")}},
              "roles": {"resume": {"backends": ["local"], "every_n_steps": 1, "keep_last": 2}}}
    with ckptkit.CheckpointManager.from_config(config) as ck:
        model = torch.nn.Linear(4, 2)
        ck.save(step=3, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    got = torchrun_results(UNSHARED, 2, "restore", tmp_path, "0")
    for r in got:
        assert r["error"] is not None and r["error"].startswith("ConfigError: backend 'local'"), r
        assert "rank 1 sees step 3 of run 'r' committed there, and rank 0, whose listing restore goes by, sees none" \
            in r["error"] and "Nothing was loaded" in r["error"]
    assert [f for f in got[1]["files"] if f.endswith("manifest.json")] == ["r/step-0000000003/manifest.json"]
    # Rank 0 on the machine that holds them: the others need not see them, as rank 0 reads for all.
    got = torchrun_results(UNSHARED, 2, "restore", tmp_path, "1")
    assert [(r["error"], r["step"]) for r in got] == [(None, 3), (None, 3)]
    # One shared folder, where a training beside this job commits a step between the ranks'
    # listings: rank 0 sees it too when it looks again, so the restore goes on from its listing.
    got = torchrun_results(UNSHARED, 2, "restore-meanwhile", tmp_path, "-1")
    assert [(r["error"], r["step"]) for r in got] == [(None, 3), (None, 3)]
    assert "r/step-0000000009/manifest.json" in got[0]["files"]


@needs_root
def test_a_step_rank_0_lacks_on_its_own_disk_but_sees_on_a_shared_backend_is_restored_from_there(tmp_path):
    """A disk on each machine beside a store every machine reaches (an object store), the job
    started again with rank 0 on another machine: restore goes on from the shared store's copy
    of the newest step, where the check refused the run as started from scratch."""
    from ckpt_helpers import torchrun_results

    config = {"run_name": "r", "backends": {"local": {"type": "local", "path": str(tmp_path / "ckpts")},
                                            "durable": {"type": "local", "path": str(tmp_path / "durable")}},
              "roles": {"resume": {"backends": ["local", "durable"], "every_n_steps": 1, "keep_last": 2}}}
    with ckptkit.CheckpointManager.from_config(config) as ck:
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ck.save(step=2, model=model, optimizer=opt)
        ck.save(step=3, model=model, optimizer=opt)
    got = torchrun_results(UNSHARED, 2, "restore-two", tmp_path, "0")
    assert [(r["error"], r["step"]) for r in got] == [(None, 3), (None, 3)]
    # The shared store one step behind what the other machine's disk holds: refused, naming the
    # step restore would go on from.
    shutil.rmtree(tmp_path / "durable" / "r" / "step-0000000003")
    got = torchrun_results(UNSHARED, 2, "restore-two", tmp_path, "0")
    for r in got:
        assert r["error"] is not None and "rank 1 sees step 3 of run 'r' committed there" in r["error"], r
        assert "restoring would start from step 2, throwing the newer training away" in r["error"]


def test_files_a_rank_sees_in_its_own_folder_that_rank_0_does_not_are_refused_not_left_out(tmp_path):
    """save_files with a folder on each machine's own disk (a Trainer's output_dir per node):
    rank 1's random state lay only there, and every checkpoint was committed without it."""
    from ckpt_helpers import torchrun_results

    got = torchrun_results(UNSHARED, 2, "save-files-own", tmp_path, "-1")
    for r in got:
        assert r["error"] is not None and r["error"].startswith("ConfigError: "), r
        assert "save_files step 5: rank 1 sees rng_state_1.pth in " in r["error"]
        assert "Nothing was saved" in r["error"]
    assert not [f for f in got[0]["files"] if f.endswith("manifest.json")]
    got = torchrun_results(UNSHARED, 2, "save-files-shared", tmp_path, "-1")
    assert [r["error"] for r in got] == [None, None]
    manifest = json.loads((tmp_path / "ckpts" / "r" / "step-0000000005" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model.bin", "rng_state_0.pth", "rng_state_1.pth"]



@needs_root
def test_a_rank_whose_own_disk_holds_an_older_copy_of_a_file_of_a_sharded_step_skips_that_step(tmp_path):
    """The checkpoints staged onto each machine's disk (FSDP2), rank 1's copy of its shard of
    step 2 an older one (staged before that step was saved again): each rank checked a share of
    the files on its own disk, so rank 1 loaded that shard unchecked and trained on from step 2
    with another step's weights, rank 0 with step 2's. A file that is not the one the rank whose share it is checked is checked again
    by the rank that reads it."""
    from ckpt_helpers import torchrun_results

    got = torchrun_results(UNSHARED, 2, "save-dcp-steps-fsdp", tmp_path, "-1")
    assert [r["error"] for r in got] == [None, None]
    shutil.copytree(tmp_path / "ckpts", tmp_path / "disk")  # staged onto rank 1's machine
    got = torchrun_results(UNSHARED, 2, "restore-dcp-fsdp", tmp_path, "1")
    assert [(r["error"], r["step"], r["pos"]) for r in got] == [(None, 2, 200), (None, 2, 201)]
    staged = tmp_path / "disk" / "r"
    # Rank 1's shard: in rank 0's share of the files to check, and read by rank 1 alone.
    shutil.copy2(staged / "step-0000000001" / "__1_0.distcp", staged / "step-0000000002" / "__1_0.distcp")
    got = torchrun_results(UNSHARED, 2, "restore-dcp-fsdp", tmp_path, "1")
    assert [(r["error"], r["step"], r["pos"]) for r in got] == [(None, 1, 100), (None, 1, 101)]


@needs_root
def test_a_sharded_checkpoint_on_rank_0s_disk_alone_is_said_to_be_on_a_folder_the_ranks_do_not_share(tmp_path):
    """Saved on one machine, restored on two, each with a disk of its own: rank 1 finds no shard
    in its folder. Refused, as before; the error said the checkpoints were damaged, and now says
    which rank sees what, and why a sharded checkpoint needs a folder every rank mounts."""
    from ckpt_helpers import torchrun_results

    got = torchrun_results(UNSHARED, 2, "save-dcp-steps-fsdp", tmp_path, "-1")
    assert [r["error"] for r in got] == [None, None]
    got = torchrun_results(UNSHARED, 2, "restore-dcp-fsdp", tmp_path, "1")
    for r in got:
        assert r["error"] is not None and r["error"].startswith("CorruptCheckpointError: "), r
        assert "Rank 1 sees no step in backend 'local'" in r["error"] and "rank 0 sees step 2" in r["error"]
        assert "a sharded (format: dcp) checkpoint is read by every rank from its own" in r["error"]
