"""Distributed training under torchrun (gloo, 2 CPU processes), driven from pytest.

Each test launches ``distributed/worker.py`` with a scenario and reads back one JSON result per
rank. Launches get a wall-clock limit so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

import ckptkit
from ckptkit.cli import main as cli

from ckpt_helpers import deflated_torch_file, rewrite_manifest

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "worker.py")
LIMIT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, scenario: str, workdir, options: dict, timeout: float = LIMIT_S,
           group: bool | None = None) -> list[dict]:
    """Run a scenario on ``nproc`` ranks; one rank runs as a plain process without a process
    group unless ``group`` asks for torchrun anyway."""
    args = [WORKER, scenario, str(workdir), json.dumps(options)]
    if not (nproc > 1 if group is None else group):
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = []
    for rank in range(nproc):
        with open(os.path.join(workdir, f"result-{scenario}-{rank}.json")) as f:
            results.append(json.load(f))
    return results


def config(tmp_path, fmt: str, resume=("local",), s3=None) -> dict:
    """Local resume and final roots under ``tmp_path``; an S3 prefix of its own when ``s3`` is given."""
    backends = {"local": {"type": "local", "path": str(tmp_path / "ckpts")},
                "published": {"type": "local", "path": str(tmp_path / "final")}}
    if s3 is not None:
        backends["archive"] = {"type": "s3", "path": f"s3://{s3['bucket']}/{tmp_path.name}",
                               "storage_options": {"endpoint_url": s3["endpoint"]}}
    return {"run_name": "dist", "backends": backends,
            "roles": {"resume": {"backends": list(resume), "every_n_steps": 1, "keep_last": 2, "format": fmt},
                      "final": {"backends": ["published"]}}}


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint (moto server) on loopback, shared by the ranks' own s3fs clients."""
    pytest.importorskip("ckptkit_s3", reason="the S3 cases need the ckptkit-s3 plugin (tox installs it)")
    from moto.server import ThreadedMotoServer

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    import boto3

    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="dist-ckpts")
    yield {"endpoint": endpoint, "bucket": "dist-ckpts"}
    server.stop()


def s3_objects(s3, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"])
    listing = client.list_objects_v2(Bucket=s3["bucket"], Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for o in listing.get("Contents", []))


def check_cycle(results: list[dict], tmp_path, fmt: str, backends: int = 1) -> None:
    for r in results:
        assert r["restored_step"] == 3
        assert r["diffs"] == [], f"rank {r['rank']} restored other values: {r['diffs']}"
        assert r["extra"] == {"rank0_note": "saved at 3"}
        assert r["final"] == [f"file://{tmp_path}/final/dist/final"]
        assert r["mapped"] == [], f"rank {r['rank']} still maps a checkpoint's file after restore"
    assert results[0]["kept"] == [3] * backends + [2] * backends
    expected = torch.load(tmp_path / "expected_full.pt", weights_only=True)
    final = torch.load(tmp_path / "final/dist/final/final_model.pt", weights_only=True)
    assert final["model"].keys() == expected.keys()
    assert all(torch.equal(final["model"][k], expected[k]) for k in expected), "finalize wrote other weights"
    manifest = json.loads((tmp_path / "ckpts/dist/step-0000000003/manifest.json").read_text())
    assert manifest["format"] == fmt and manifest["world_size"] == 2
    if fmt == "dcp":
        assert {".metadata", "__0_0.distcp", "__1_0.distcp", "extra.pt"} <= set(manifest["files"])
    else:
        assert set(manifest["files"]) == {"state.pt", "extra.pt"}


def test_ddp_full_mode_on_local_disk(tmp_path):
    results = launch(2, "cycle", tmp_path, {"config": config(tmp_path, "torch"), "wrap": "ddp"})
    check_cycle(results, tmp_path, "torch")


def test_a_model_built_on_the_meta_device_restores_and_keeps_nothing_mapped(tmp_path):
    results = launch(2, "restore_meta", tmp_path, {"config": config(tmp_path, "torch")})
    for r in results:
        assert r["equal"], f"rank {r['rank']} restored other values"
        assert r["mapped"] == [], f"rank {r['rank']} still maps {r['mapped']}"


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_full_mode_async(tmp_path, wrap):
    """DDP's state aliases the live parameters and is copied; FSDP2's is gathered into new
    tensors on rank 0, which staging passes through. Both must restore what was saved."""
    cfg = config(tmp_path, "torch")
    cfg["roles"]["resume"]["async"] = True
    results = launch(2, "cycle", tmp_path, {"config": cfg, "wrap": wrap})
    check_cycle(results, tmp_path, "torch")
    # Buffers are made ahead only where the state is staged, rank 0: for DDP's 6 live parameters
    # and AdamW's 2 moments of each from restore on (18), then at the first step what else its
    # state holds (the 6 step counters); for FSDP2 only the plain step counters, not the sharded
    # parameters and moments (what is saved of those is gathered into new tensors).
    assert {r["rank"]: r["prepared"] for r in results} == {0: [18, 6] if wrap == "ddp" else [6], 1: []}


def test_fsdp2_full_mode_on_local_and_s3(tmp_path, s3):
    cfg = config(tmp_path, "torch", resume=("local", "archive"), s3=s3)
    results = launch(2, "cycle", tmp_path, {"config": cfg, "wrap": "fsdp2"})
    check_cycle(results, tmp_path, "torch", backends=2)
    keys = s3_objects(s3, tmp_path.name)
    assert "dist/step-0000000003/state.pt" in keys and "dist/step-0000000002/manifest.json" in keys
    assert not [k for k in keys if "step-0000000001" in k], "S3 was pruned to keep_last=2 as well"


def test_fsdp2_sharded_mode_on_local_and_s3_then_export_and_verify(tmp_path, s3, capsys):
    cfg = config(tmp_path, "dcp", resume=("local", "archive"), s3=s3)
    results = launch(2, "cycle", tmp_path, {"config": cfg, "wrap": "fsdp2"})
    check_cycle(results, tmp_path, "dcp", backends=2)
    local_files = sorted(os.listdir(tmp_path / "ckpts/dist/step-0000000003"))
    s3_files = sorted(k.rsplit("/", 1)[1] for k in s3_objects(s3, tmp_path.name) if "step-0000000003" in k)
    assert s3_files == local_files, "every rank's shards were copied to S3 as well"

    path = tmp_path / "ckptkit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["verify", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["backend"], r["step"], r["ok"]) for r in rows) == [
        ("archive", 2, True), ("archive", 3, True), ("local", 2, True), ("local", 3, True)]
    assert cli(["ls", str(path), "--json"]) == 0
    assert {r["format"] for r in json.loads(capsys.readouterr().out)} == {"dcp"}
    out = tmp_path / "exported.pt"
    assert cli(["export", str(path), "--out", str(out), "--dtype", "bfloat16"]) == 0
    exported = torch.load(out, weights_only=True)
    expected = torch.load(tmp_path / "expected_full.pt", weights_only=True)
    assert exported["step"] == 3
    assert all(torch.equal(exported["model"][k], expected[k].to(torch.bfloat16)) for k in expected)


def test_ddp_sharded_mode_on_s3_only(tmp_path, s3):
    cfg = config(tmp_path, "dcp", resume=("archive",), s3=s3)
    results = launch(2, "cycle", tmp_path, {"config": cfg, "wrap": "ddp"})
    for r in results:
        assert r["restored_step"] == 3 and r["diffs"] == []
    keys = s3_objects(s3, tmp_path.name)
    assert {k.rsplit("/", 1)[1] for k in keys if "step-0000000003" in k} >= {".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json"}
    assert not os.path.exists(tmp_path / "ckpts"), "nothing went to local disk"


@functools.cache
def load_worker():
    """The worker's own code, for checks that run in this (plain, single) process."""
    spec = importlib.util.spec_from_file_location("ckptkit_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved_on_two_ranks(tmp_path_factory):
    """Every wrapping (DDP, FSDP2), format and optimizer, with an LR scheduler in ``extra``,
    saved on 2 ranks at step 3, then restored on 2 ranks into fresh models."""
    workdir = tmp_path_factory.mktemp("matrix")
    cfg = config(workdir, "torch")
    return workdir, cfg, launch(2, "matrix", workdir, {"config": cfg})


def check_restored(results: list[dict]) -> None:
    for name in load_worker().MATRIX:
        for r in results:
            assert (r[name]["step"], r[name]["sched_epoch"]) == (3, 3), f"{name} on rank {r['rank']}"
        assert results[0][name]["diffs"] == [], f"{name}: restored other values"


def test_every_wrapping_and_optimizer_resumes_bit_identical(saved_on_two_ranks):
    _, _, results = saved_on_two_ranks
    check_restored(results)
    for name in load_worker().MATRIX:
        assert all(r[name]["losses_equal"] for r in results), f"{name}: training went on differently"
        assert results[0][name]["final_diffs"] == [], f"{name}: training went on differently"


@pytest.mark.parametrize("nproc", [1, 3])
def test_every_wrapping_and_optimizer_restores_on_another_world_size(saved_on_two_ranks, nproc):
    """One rank still runs DDP and FSDP2 (a process group of one); there, it saves again."""
    workdir, cfg, _ = saved_on_two_ranks
    results = launch(nproc, "matrix_restore", workdir, {"config": cfg}, group=True)
    check_restored(results)
    worker = load_worker()
    assert all(r[name]["trained"] for r in results for name in worker.MATRIX)
    if nproc == 1:
        for name in worker.MATRIX:
            report, _ = worker.matrix_restore(name, cfg, str(workdir), as_plain=True, run=f"{name}-resaved")
            assert report == {"step": 3, "sched_epoch": 3, "diffs": []}, f"{name} saved on one rank"


def test_what_ranks_saved_restores_into_a_plain_model_in_one_process(saved_on_two_ranks):
    workdir, cfg, _ = saved_on_two_ranks
    worker = load_worker()
    for name in worker.MATRIX:
        report, _ = worker.matrix_restore(name, cfg, str(workdir), as_plain=True)
        assert report == {"step": 3, "sched_epoch": 3, "diffs": []}, name


@pytest.mark.parametrize("where", ["local", "archive"])
def test_reshard_one_process_to_two_ranks(tmp_path, where, request):
    """From S3, each rank downloads the files its part of the state needs, checked, and loads those."""
    cfg = config(tmp_path, "dcp", resume=(where,), s3=request.getfixturevalue("s3") if where == "archive" else None)
    launch(1, "save", tmp_path, {"config": cfg, "wrap": "plain"})
    results = launch(2, "restore", tmp_path, {"config": cfg, "wrap": "fsdp2"})
    assert [r["restored_step"] for r in results] == [1, 1]
    assert results[0]["keys"] > 0 and results[0]["diffs"] == []


def test_restore_of_an_older_sharded_step_then_a_refused_save_on_every_rank(tmp_path):
    cfg = config(tmp_path, "dcp")
    cfg["roles"]["resume"]["keep_last"] = 5
    results = launch(2, "restore_step", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=90)
    for r in results:
        assert r["restored_step"] == 1 and r["diffs"] == [], r
        assert r["save"].startswith("RunConflictError: run 'dist': step 1 was restored, but the run holds newer "
                                    "checkpoints up to step 3"), r
        assert r["missing"].startswith("CheckpointNotFoundError: run 'dist' has no committed checkpoint of step 9 "
                                       "(committed steps, newest first: 3, 2, 1, 0)"), r


def test_an_optimizer_misfit_is_refused_on_every_rank_though_one_rank_could_not_read_the_groups(tmp_path):
    """The param groups are checked before the shards load; a rank that could not read them
    must not go on into DCP's load alone (it would wait there for distributed.timeout_s)."""
    cfg = config(tmp_path, "dcp")
    results = launch(2, "groups_unread_on_one_rank", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=90)
    for r in results:
        assert r["raised"][0] == "IncompatibleCheckpointError", r
        assert "no parameter named 0.bias, 0.weight" in r["raised"][1], r


def test_a_rank_that_leaves_during_the_shard_load_is_reported_as_such(tmp_path):
    cfg = config(tmp_path, "dcp")
    cfg["distributed"] = {"timeout_s": 30}
    rank0 = launch(2, "rank_leaves_during_shard_load", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=120)[0]
    assert rank0["raised"][0] == "CollectiveTimeoutError", rank0
    assert "restore step 0: load shards" in rank0["raised"][1], rank0
    assert rank0["later"][0] == "CollectiveTimeoutError" and "restart it" in rank0["later"][1], rank0


def test_a_rank_restoring_without_optimizer_beside_one_with_it_meets_the_others(tmp_path):
    cfg = config(tmp_path, "dcp")
    cfg["distributed"] = {"timeout_s": 20}
    results = launch(2, "optimizer_on_rank0_only", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=120)
    assert [r["restored_step"] for r in results] == [0, 0]
    assert all(r["same_model"] for r in results)
    assert [r["optimizer_state"] for r in results] == [6, 0]


def test_a_save_with_an_optimizer_on_some_ranks_only_is_refused_on_every_rank_at_once(tmp_path):
    """FSDP2, format torch: rank 1 without optimizer timed out in ckptkit's next meeting while
    rank 0 waited in torch's gather of the optimizer's state for 30 minutes."""
    cfg = config(tmp_path, "torch")
    cfg["distributed"] = {"timeout_s": 60}
    results = launch(2, "save_optimizer_on_rank0_only", tmp_path, {"config": cfg, "wrap": "fsdp2"}, timeout=120)
    for r in results:
        assert r["raised"][0] == "RanksDisagreeError", r
        assert "ranks [0] passed optimizer= and ranks [1] did not" in r["raised"][1], r
        assert r["listed"] == [], r


def test_a_restore_given_extra_on_some_ranks_only_is_refused_on_every_rank(tmp_path):
    """A scheduler passed to restore on rank 0 only was left fresh on rank 1, without a word: the
    ranks then trained with different learning rates."""
    results = launch(2, "restore_extra_on_rank0_only", tmp_path, {"config": config(tmp_path, "torch"), "wrap": "ddp"},
                     timeout=120)
    for r in results:
        assert r["raised"][0] == "RanksDisagreeError", r
        assert "different extra= names (rank 0: scheduler; rank 1: none)" in r["raised"][1], r
        assert (r["restored"], r["epoch"]) == (1, 1), r


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_a_model_that_does_not_fit_a_full_state_is_refused_on_every_rank(tmp_path, wrap):
    """Torch's broadcast of rank 0's state found some misfits on some ranks only, the others
    waiting in its next collective: FSDP2 a head of another shape (a bare RuntimeError on rank 0),
    DDP a layer more (rank 0 alone), both a saved extra state the model no longer has (rank 0
    alone, after the broadcast, the other ranks keeping the optimizer state they had loaded) and
    a param group without parameters (rank 0 alone); a layer fewer was a bare KeyError."""
    cfg = config(tmp_path, "torch")
    cfg["distributed"] = {"timeout_s": 20}
    results = launch(2, "model_misfit_full", tmp_path, {"config": cfg, "wrap": wrap}, timeout=120)
    for r in results:
        for case in ("shape", "missing", "unknown", "extra_state"):
            assert r[case][0] == "IncompatibleCheckpointError", (case, r)
            assert "the model given to restore does not fit the weights saved there" in r[case][1], (case, r)
        assert "4.weight" in r["shape"][1] and "9, 64" in r["shape"][1], r  # torch's words for DDP
        assert "5.bias" in r["missing"][1] and "5.weight" in r["missing"][1], r
        assert "(weights the model lacks: 4.bias, 4.weight)" in r["unknown"][1], r
        assert "0._extra_state" in r["extra_state"][1], r
        assert r["optimizer_after"] == 0, r
        assert "rank 0 cannot take this extra state" in r["picky"][1], r  # rank 0's own error, on every rank
        assert r["empty_group"][0] == "IncompatibleCheckpointError", r
        assert "has a param group without parameters (group 1), and none of the saved optimizer's groups is " \
               "without" in r["empty_group"][1], r
        assert r["fits"] is None and r["same_model"], r
        assert r["renamed"] is None, r


def test_a_load_target_that_fails_on_one_rank_fails_every_rank_with_its_reason(tmp_path):
    cfg = config(tmp_path, "dcp")
    cfg["distributed"] = {"timeout_s": 20}
    results = launch(2, "load_target_fails_on_one_rank", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=120)
    for r in results:
        assert "out of memory while making the optimizer's state" in r["raised"][1], r


def test_rank0s_warning_of_a_damaged_step_under_w_error_keeps_no_rank_waiting(tmp_path):
    """Rank 0 alone reads a full checkpoint and warns that it skipped a damaged step. With
    warnings as errors, a warning given at once raised on rank 0 mid-restore, while rank 1
    waited for it at the next step's try until timeout_s and failed."""
    cfg = config(tmp_path, "torch")
    cfg["distributed"] = {"timeout_s": 20}
    results = launch(2, "skip_warning_as_error", tmp_path, {"config": cfg, "wrap": "ddp"})
    assert results[1] == {**results[1], "restored_step": 0} and "raised" not in results[1], results[1]
    assert results[0]["raised"][0] == "RuntimeWarning", results[0]
    assert "skipped" in results[0]["raised"][1] and "step-0000000001" in results[0]["raised"][1], results[0]


def test_a_file_of_the_newest_step_that_one_rank_may_not_read_stops_every_rank_restoring_an_older_one(tmp_path):
    """Each rank checks its own share of a sharded checkpoint's files: a refusal on rank 1 alone
    skipped the step, and rank 0, which had seen none, restored the step before it."""
    cfg = {"run_name": "dist", "backends": {"flaky": {"type": "faultyfs", "path": str(tmp_path / "ckpts")}},
           "roles": {"resume": {"backends": ["flaky"], "every_n_steps": 1, "keep_last": 3, "format": "dcp"}},
           "distributed": {"timeout_s": 20}}
    results = launch(2, "refused_on_one_rank", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=120)
    assert results[1]["fired"] >= 1
    for r in results:
        assert r["raised"] and r["raised"][0] == "StorageUnavailableError", r
        assert "step-0000000000 was not read" in r["raised"][1] and "does not let this process read" in r["raised"][1]


def test_a_compressed_item_in_another_ranks_share_is_refused_by_every_rank(tmp_path):
    """Each rank checks a share of a sharded checkpoint's items before any is loaded; one that
    rank 1 alone refuses makes every rank restore the step before, nothing of the refused one
    loaded (an item nobody checked would have been unpacked whole by DCP's own load)."""
    import dataclasses
    import pickle

    cfg = config(tmp_path, "dcp")
    cfg["distributed"] = {"timeout_s": 20}
    launch(2, "save", tmp_path, {"config": cfg, "wrap": "ddp"})
    folder = tmp_path / "ckpts" / "dist" / "step-0000000001"
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    storage = metadata.storage_data
    ordered = sorted(storage, key=lambda i: (storage[i].relative_path, storage[i].offset))
    index = next(i for i in ordered[1::2] if i.fqn.startswith("model."))  # in rank 1's share
    shard = folder / storage[index].relative_path
    bomb = deflated_torch_file(8 * 2**20)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(bomb)
    storage[index] = dataclasses.replace(storage[index], offset=offset, length=len(bomb))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    rewrite_manifest(folder)
    results = launch(2, "restore", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=120)
    assert [r["restored_step"] for r in results] == [0, 0]


def test_a_scratch_folder_one_rank_cannot_make_fails_every_rank_at_once(tmp_path):
    """A sharded restore from remote storage makes a scratch folder on each rank: one rank's
    failure to make it raised there alone, and the others waited in the next collective until
    distributed.timeout_s."""
    cfg = {"run_name": "dist", "backends": {"remote": {"type": "faultyfs", "path": str(tmp_path / "ckpts")}},
           "roles": {"resume": {"backends": ["remote"], "every_n_steps": 1, "format": "dcp"}},
           "distributed": {"timeout_s": 60}}  # else rank 0 raised CollectiveTimeoutError after it
    results = launch(2, "scratch_fails_on_one_rank", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=150)
    for r in results:
        assert r["raised"] and r["raised"][0] == "LocalWriteError", r
        assert "could not make a scratch folder in" in r["raised"][1] and "not-a-folder" in r["raised"][1], r


def test_a_rank_extra_object_that_fails_on_one_rank_fails_every_rank(tmp_path):
    """Rank 1's own data loader refused its saved position: rank 1 raised while rank 0's restore
    returned and trained on, alone."""
    cfg = config(tmp_path, "torch")
    cfg["distributed"] = {"timeout_s": 20}
    results = launch(2, "extra_target_fails_on_one_rank", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=120)
    for r in results:
        assert r["raised"] and "cannot go back to that position" in r["raised"][1], r
    assert "on rank 1" in results[0]["raised"][1]


def test_only_a_collective_that_lost_its_peer_breaks_the_collectives():
    """DCP raises its collectives' errors as they are and wraps each rank's own failures: a
    missing key named like "timeout_head" is a misfit of the checkpoint, not a lost rank."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from ckptkit import ranks

    coll = ranks.Collectives(30, {})
    missing = RuntimeError("Missing key in checkpoint state_dict: model.timeout_head.weight.")
    assert coll.lost("load", CheckpointException("load failed", {0: (missing, traceback.StackSummary())})) is None
    assert coll.lost("load", OSError("connection reset by the disk")) is None
    assert coll._broken is None
    gone = coll.lost("load", RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:4567"))
    assert isinstance(gone, ckptkit.CollectiveTimeoutError) and "'load'" in str(gone)
    with pytest.raises(ckptkit.CollectiveTimeoutError, match="restart it"):
        coll._usable()  # what every later collective of that manager checks first


def test_rank0_failing_mid_save_raises_on_every_rank_without_a_hang(tmp_path):
    cfg = config(tmp_path, "torch")
    results = launch(2, "rank0_fails", tmp_path, {"config": cfg, "wrap": "ddp"}, timeout=90)
    for r in results:
        assert r["refused"] and "extra['bad'] is a function" in r["refused"]
        # The rank that refused is named where the refusal reaches another rank.
        assert ("on rank 0" in r["refused"]) == (r["rank"] != 0), r["refused"]
        assert r["raised"] and "step 1 was not saved" in r["raised"] and "local" in r["raised"]
        assert r["listed"] == [], f"rank {r['rank']} sees a committed checkpoint that failed"
    leftovers = os.listdir(tmp_path / "ckpts/dist") if (tmp_path / "ckpts/dist").exists() else []
    assert leftovers == [], "the failed save left files behind"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FSDP1 needs a non-CPU accelerator device; benchmarks/gpu_checks.py runs it on a GPU")
def test_fsdp1_full_and_sharded(tmp_path):
    for fmt in ("torch", "dcp"):
        (tmp_path / fmt).mkdir()
        results = launch(min(torch.cuda.device_count(), 2), "cycle", tmp_path / fmt,
                         {"config": config(tmp_path / fmt, fmt), "wrap": "fsdp1", "cuda": True}, group=True)
        assert all(r["diffs"] == [] for r in results)
