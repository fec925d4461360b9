"""What a killed save or restore leaves behind is cleaned by the next start, and only that.

Each test lays down exactly what a SIGKILL at one moment leaves (the random kills of
``test_kill_torture.py`` reach these states by chance), then starts fresh: a new manager
restores and saves once, which prunes with ``leftover_grace_s: 0``. Afterwards no orphan of
this run remains, and another run's files in the same root are untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import ckptkit
from ckptkit import reading
from ckptkit.plugins import make_plugin_manager

from trust.common import new_bucket

pytestmark = pytest.mark.timeout(120)

def model_at(step: int) -> torch.nn.Module:
    m = torch.nn.Linear(64, 16)
    with torch.no_grad():
        m.weight.fill_(float(step))
    return m


def fresh_start(cfg: dict, run_name: str = "run") -> int:
    """Restore and save the next step in a new manager; the restored step."""
    with ckptkit.CheckpointManager.from_config(cfg, run_name=run_name, plugin_manager=make_plugin_manager()) as ck:
        m = model_at(-1)
        restored = ck.restore(model=m)
        assert restored is not None
        ck.save(step=restored.step + 1, model=model_at(restored.step + 1))
    return restored.step


def local_cfg(root) -> dict:
    return {"backends": {"store": {"type": "local", "path": str(root), "leftover_grace_s": 0}},
            "roles": {"resume": {"backends": ["store"], "every_n_steps": 1, "keep_last": 2}}}


def save_steps(cfg: dict, steps, run_name: str = "run") -> None:
    with ckptkit.CheckpointManager.from_config(cfg, run_name=run_name, plugin_manager=make_plugin_manager()) as ck:
        for s in steps:
            ck.save(step=s, model=model_at(s))


def tree(path) -> dict[str, bytes]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        out[os.path.relpath(dirpath, path) + "/"] = b""
        for n in filenames:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, n), path)] = f.read()
    return out


def test_local_partial_folders_of_a_killed_save_or_prune_are_removed(tmp_path):
    root = tmp_path / "store"
    cfg = local_cfg(root)
    save_steps(cfg, [1, 2])
    save_steps(cfg, [1], run_name="other")
    run = root / "run"
    # A save killed while writing state.pt; a prune killed after deleting the manifest.
    (run / ".tmp-step-0000000003-0123456789ab").mkdir()
    (run / ".tmp-step-0000000003-0123456789ab" / "state.pt").write_bytes(b"partial")
    (run / "step-0000000001" / "manifest.json").unlink()
    other = tree(root / "other")

    assert fresh_start(cfg) == 2
    assert sorted(os.listdir(run)) == ["step-0000000002", "step-0000000003"]
    assert tree(root / "other") == other


@pytest.mark.parametrize("left", [".tmp-step-0000000003-0123456789ab", ".trash-step-0000000002-0123456789ab",
                                  "step-0000000000"])
def test_local_empty_folders_of_a_killed_save_or_prune_are_removed(tmp_path, left):
    root = tmp_path / "store"
    cfg = local_cfg(root)
    save_steps(cfg, [1, 2])
    # Killed right after making the folder, or between emptying one and removing it.
    (root / "run" / left).mkdir()
    assert fresh_start(cfg) == 2
    assert sorted(os.listdir(root / "run")) == ["step-0000000002", "step-0000000003"]


def s3_cfg(port: int, bucket: str) -> dict:
    return {"backends": {"store": {"type": "s3", "path": f"s3://{bucket}/ckpts", "leftover_grace_s": 0,
                                   "storage_options": {"endpoint_url": f"http://127.0.0.1:{port}"}}},
            "roles": {"resume": {"backends": ["store"], "every_n_steps": 1, "keep_last": 2}}}


def test_s3_unfinished_multipart_upload_of_a_killed_save_is_aborted(moto_port):
    import s3fs

    bucket = new_bucket("s3", moto_port)
    cfg = s3_cfg(moto_port, bucket)
    save_steps(cfg, [1])
    fs = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{moto_port}", skip_instance_cache=True)
    # A save killed between the parts of state.pt; and another run's upload, which stays.
    for key in ("ckpts/run/step-0000000002/state.pt", "ckpts/other/step-0000000005/state.pt"):
        upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 5 * 2**20)
    time.sleep(1.1)  # idle past the grace period (0) by the store's clock, whose Date is in whole seconds

    assert fresh_start(cfg) == 1
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["ckpts/other/step-0000000005/state.pt"]


def test_scratch_folders_of_a_killed_restore_are_removed(tmp_path, monkeypatch, gcs_port):
    bucket = new_bucket("gcs", gcs_port)
    cfg = {"backends": {"store": {"type": "gcs", "path": f"gs://{bucket}/ckpts", "leftover_grace_s": 0,
                                  "storage_options": {"endpoint_url": f"http://127.0.0.1:{gcs_port}",
                                                      "token": "anon"}}},
           "roles": {"resume": {"backends": ["store"], "every_n_steps": 1, "keep_last": 2}}}
    save_steps(cfg, [1])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    # A restore killed while downloading; and the folder of a process that still runs (this one).
    here = reading.machine()
    (tmp / f"ckptkit-scratch-restore-{dead}-{here}-abcd1234").mkdir()
    (tmp / f"ckptkit-scratch-restore-{dead}-{here}-abcd1234" / "state.pt").write_bytes(b"partial")
    alive = tmp / f"ckptkit-scratch-restore-{os.getppid()}-{here}-abcd1234"
    alive.mkdir()

    assert fresh_start(cfg) == 1
    assert sorted(p.name for p in tmp.iterdir()) == [alive.name]
