"""examples/train.py as a user runs it: killed, resumed, compared bit for bit with an uninterrupted run.

Each run is a real process (python, or torchrun with 2 gloo ranks and FSDP2). The trainer
writes every rank's losses and the final weights under ``--out``.
"""

from __future__ import annotations

import json
import os
import socket
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train.py")
LIMIT_S = 180
STEPS, EVERY, DIE_AFTER = 8, 2, 5  # killed after step 5: step 4 is the newest checkpoint, step 5 is redone


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_config(tmp_path, fmt: str = "torch") -> str:
    cfg = {"model": {"dim": 8, "hidden": 16, "classes": 3, "dropout": 0.2},
           "train": {"steps": STEPS, "batch_size": 8, "lr": 0.05, "seed": 3, "dataset_size": 256},
           "ckptkit": {"backends": {"scratch": {"type": "local", "path": str(tmp_path / "ckpts")},
                                    "published": {"type": "local", "path": str(tmp_path / "final")}},
                       "roles": {"resume": {"backends": ["scratch"], "every_n_steps": EVERY, "keep_last": 2,
                                            "format": fmt},
                                 "final": {"backends": ["published"]}}}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train(cwd, *args: str, nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, TRAIN, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_port()}", TRAIN, *args]
    # Only the built-in local backend is used: loading every installed plugin costs seconds a run.
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CKPTKIT_DISABLE_PLUGIN_AUTOLOAD="1")
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=LIMIT_S, env=full_env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(out, rank: int) -> dict[int, float]:
    with open(os.path.join(out, f"losses-rank{rank}.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def weights(out) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "final_weights.pt"), weights_only=True)


def kill_and_resume(tmp_path, nproc: int, fmt: str, resume: str = "auto") -> str:
    """An uninterrupted run, then a run killed after step DIE_AFTER and resumed; all must agree."""
    config = trainer_config(tmp_path, fmt)
    ok(train(tmp_path, "--config", config, "--run-name", "whole", "--out", str(tmp_path / "whole"), nproc=nproc))
    killed = train(tmp_path, "--config", config, "--run-name", "cut", "--out", str(tmp_path / "before"),
                   "--die-after-step", str(DIE_AFTER), nproc=nproc)
    assert killed.returncode != 0, "the run was to be killed"
    assert not os.path.exists(tmp_path / "before" / "final_weights.pt")
    resumed = ok(train(tmp_path, "--config", config, "--run-name", "cut", "--out", str(tmp_path / "after"),
                       "--resume", resume, nproc=nproc))
    assert f"resumed run 'cut' from step {DIE_AFTER - 1}" in resumed.stdout

    for rank in range(nproc):
        whole = losses(tmp_path / "whole", rank)
        before, after = losses(tmp_path / "before", rank), losses(tmp_path / "after", rank)
        assert sorted(whole) == list(range(STEPS))
        assert sorted(before) == list(range(DIE_AFTER + 1))
        assert sorted(after) == list(range(DIE_AFTER, STEPS)), "training goes on after the newest checkpoint"
        assert {**before, **after} == whole, f"rank {rank}: losses differ from the uninterrupted run"
        assert after[DIE_AFTER] == before[DIE_AFTER], "the redone step draws the same batch, noise and dropout"
    if nproc > 1:
        assert losses(tmp_path / "whole", 0) != losses(tmp_path / "whole", 1), "each rank trains on its own data"
    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "after")
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    # The final model was published from the resumed run.
    assert (tmp_path / "final" / "cut").is_dir()
    return config


def test_single_process_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    # --resume STEP names the newest checkpoint here; the torchrun case takes auto.
    config = kill_and_resume(tmp_path, nproc=1, fmt="torch", resume=str(DIE_AFTER - 1))

    # A fresh start under a run name that holds checkpoints is refused, and they stay.
    before = sorted(os.listdir(tmp_path / "ckpts" / "whole"))
    again = train(tmp_path, "--config", config, "--run-name", "whole", "--resume", "none")
    assert again.returncode == 1
    assert "RunConflictError" in again.stderr and "run 'whole' already holds checkpoints up to step 7" in again.stderr
    assert sorted(os.listdir(tmp_path / "ckpts" / "whole")) == before
    # --resume STEP takes only the newest checkpoint, and says so for another step.
    older = train(tmp_path, "--config", config, "--run-name", "whole", "--resume", "6")
    assert older.returncode == 1 and "newest checkpoint is step 7" in older.stderr
    # Killed after its last save, before the final model was published: started again, it
    # trains nothing and publishes it (the run was skipped as finished, and had no final model).
    shutil.rmtree(tmp_path / "final" / "whole")
    last = ok(train(tmp_path, "--config", config, "--run-name", "whole", "--out", str(tmp_path / "again")))
    assert "already trained to step 7; nothing to train, publishing the final model" in last.stdout
    published = torch.load(tmp_path / "final" / "whole" / "final" / "final_model.pt", weights_only=True)
    assert published["step"] == 7 and published["metrics"] == {"loss": losses(tmp_path / "whole", 0)[7]}, published
    assert all(torch.equal(published["model"][k], v) for k, v in weights(tmp_path / "whole").items())


@pytest.mark.distributed
def test_torchrun_fsdp2_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    kill_and_resume(tmp_path, nproc=2, fmt="dcp")


# An audit hook sees every file opened for writing, folder made or removed, and socket used,
# in this process and whatever it imports.
WATCH = """
import sys, runpy
WRITES = ("w", "a", "x", "+")
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0] != "/dev/null" and (
            any(c in str(args[1] or "") for c in WRITES) or (args[2] or 0) & 0o3):
        sys.stderr.write(f"TOUCHED open {args[0]} {args[1]}\\n")
    elif event == "socket.bind" and args[1][1] == 0:
        pass  # urllib3 binds ::1 port 0 at import to learn whether IPv6 works: no traffic
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "socket.connect",
                   "socket.bind", "socket.getaddrinfo"):
        sys.stderr.write(f"TOUCHED {event} {args[:2]}\\n")
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_dry_run_touches_nothing(tmp_path):
    ckptkit_cfg = {"backends": {"scratch": {"type": "local", "path": str(tmp_path / "ckpts")},
                                # Unreachable on purpose: a dry run must not try.
                                "archive": {"type": "s3", "path": "s3://no-such-bucket/x",
                                            "storage_options": {"endpoint_url": f"http://127.0.0.1:{_port()}"}},
                                "registry": {"type": "mlflow", "tracking_uri": f"http://127.0.0.1:{_port()}"}},
                   "roles": {"resume": {"backends": ["scratch", "archive"], "every_n_steps": 2},
                             "final": {"backends": ["archive", "registry"]}}}
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "ckptkit.yaml").write_text(yaml.safe_dump(ckptkit_cfg))
    (conf / "train.yaml").write_text(yaml.safe_dump({"train": {"steps": 4}, "ckptkit": "ckptkit.yaml"}))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", WATCH, TRAIN, "--config", str(conf / "train.yaml"),
                           "--run-name", "dry", "--dry-run"],
                          cwd=work, capture_output=True, text=True, timeout=LIMIT_S,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1", RANK="0", WORLD_SIZE="2",
                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port())))
    ok(proc)
    assert "config OK: run 'dry', 4 steps on 2 rank(s) with FSDP2" in proc.stdout
    assert "resume: scratch (local" in proc.stdout and "archive (s3" in proc.stdout
    assert "final: archive (s3" in proc.stdout and "registry (mlflow" in proc.stdout
    touched = [line for line in proc.stderr.splitlines() if line.startswith("TOUCHED")]
    assert touched == []
    assert os.listdir(work) == [] and sorted(os.listdir(tmp_path)) == ["conf", "work"]


def test_a_bad_config_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model": {"hiden": 3}, "ckptkit": {"backends": {}, "roles": {}}}))
    proc = train(tmp_path, "--config", str(path), "--dry-run")
    assert proc.returncode == 1 and "model.hiden: unknown key" in proc.stderr
    assert os.listdir(tmp_path) == ["train.yaml"]
