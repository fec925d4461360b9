"""SIGKILL torture: a training job killed at random moments never leaves a checkpoint that lies.

For each backend (local disk, S3 on moto, GCS on its emulator) and each mode (sync, async), a
job (``kill_worker.py``) resumes from what is stored and saves every step; after a random delay
it is killed with SIGKILL, mid-restore, mid-write, mid-commit or mid-prune. A fresh manager in
this process then restores, and:

- a *corrupt pick* is a restore whose state is not the one its step was saved with, or that
  does not verify;
- a *lost checkpoint* is a restore older than the newest step the job was told was committed;
- a *torn commit* is a committed checkpoint that restore had to skip (a kill must leave either
  the whole checkpoint or nothing that looks committed).

All three must stay at 0. Afterwards a fresh start (restore, then one save and its prune, with
``leftover_grace_s: 0``) must leave no orphans: no temporary or manifest-less step folders, no
scratch download folders, no unfinished multipart uploads.

Short form: 3 kills per backend and mode; long form (``CKPTKIT_TORTURE=long``): 50.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import attrs
import pytest
import torch

import ckptkit
from ckptkit.errors import CkptkitError, CorruptCheckpointError
from ckptkit.plugins import make_plugin_manager

from trust.common import AWS_ENV, SEED, new_bucket, trials

KILLS = int(os.environ.get("CKPTKIT_TORTURE_KILLS") or trials(3, 50))
# About 6 MB of state: more than one S3 part (5 MiB) and six GCS chunks (1 MiB), so that kills
# land between the parts of an upload as well as between files.
SHAPE = (1536, 1024)
# A kill lands this long (at most) after the job starts: long enough to span its restore and
# several saves on each backend.
MAX_DELAY_S = {"local": 0.8, "s3": 2.0, "gcs": 1.5}
WORKER = pathlib.Path(__file__).with_name("kill_worker.py")

pytestmark = pytest.mark.timeout(300 + 25 * KILLS)


class Zygote:
    """The worker process that forks one training job per trial (see kill_worker.py)."""

    def __init__(self):
        env = dict(os.environ, **AWS_ENV, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"kill worker did not start (said {line!r}, exit {self.proc.poll()})")

    def start(self, job: dict) -> int:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {pid} is still running after {timeout} s")
        time.sleep(0.01)


def read_log(path: str) -> list[str]:
    try:
        return pathlib.Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


@attrs.define
class Torture:
    backend: str
    mode: str
    config: dict
    run_name: str
    zygote: Zygote
    workdir: pathlib.Path
    kills: int = 0
    during: dict = attrs.field(factory=dict)  # what the job had last logged when it was killed
    corrupt_picks: list = attrs.field(factory=list)
    lost: list = attrs.field(factory=list)
    torn: list = attrs.field(factory=list)
    errors: list = attrs.field(factory=list)
    newest_acked: int | None = None
    trial: int = 0

    def job(self, steps: int | None = None) -> dict:
        self.trial += 1
        log = str(self.workdir / f"trial-{self.trial:03d}.log")
        return {"config": self.config, "run_name": self.run_name, "shape": SHAPE, "log": log,
                "tmpdir": str(self.workdir / "tmp"), "steps": steps}

    def manager(self) -> ckptkit.CheckpointManager:
        return ckptkit.CheckpointManager.from_config(self.config, run_name=self.run_name,
                                                     plugin_manager=make_plugin_manager())

    def kill_once(self, rng: random.Random) -> None:
        job = self.job()
        pid = self.zygote.start(job)
        try:
            deadline = time.monotonic() + 60
            while not read_log(job["log"]):
                if gone(pid) or time.monotonic() > deadline:
                    raise AssertionError(f"job {pid} never started: {read_log(job['log'] + '.stderr')}")
                time.sleep(0.005)
            time.sleep(rng.uniform(0, MAX_DELAY_S[self.backend]))
        finally:
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 30)
        self.kills += 1
        lines = read_log(job["log"])
        last = lines[-1].split()[0] if lines else "nothing"
        self.during[last] = self.during.get(last, 0) + 1
        self.errors += [f"trial {self.trial}: {line}" for line in lines if line.startswith("error")]
        for line in lines:
            if line.startswith("acked "):
                self.newest_acked = max(int(line.split()[1]), self.newest_acked or 0)
        self.check_restore(f"trial {self.trial} (killed after {lines[-1] if lines else 'nothing'!r})")

    def check_restore(self, where: str) -> None:
        model = torch.nn.Linear(*SHAPE)
        with torch.no_grad():
            model.weight.fill_(-1.0)
            model.bias.fill_(1.0)
        ck = self.manager()
        try:
            restored = ck.restore(model=model)
            if restored is None:
                if self.newest_acked is not None:
                    self.lost.append(f"{where}: nothing restored, step {self.newest_acked} was committed")
                return
            step = restored.step
            if restored.skipped:
                self.torn.append(f"{where}: {restored.skipped}")
            if self.newest_acked is not None and step < self.newest_acked:
                self.lost.append(f"{where}: restored step {step}, step {self.newest_acked} was committed")
            wrong = (not torch.equal(model.weight, torch.full_like(model.weight, float(step)))
                     or not torch.equal(model.bias, torch.full_like(model.bias, -float(step)))
                     or restored.extra.get("step") != step)
            if wrong:
                self.corrupt_picks.append(f"{where}: step {step} restored other state")
            try:
                ck.verify(restored.ref)
            except CkptkitError as exc:
                self.corrupt_picks.append(f"{where}: restored step {step} does not verify: {exc}")
        except CorruptCheckpointError as exc:
            self.torn.append(f"{where}: {exc}")
        except Exception as exc:
            self.errors.append(f"{where}: restore raised {type(exc).__name__}: {exc}")
        finally:
            ck.close()

    def summary(self) -> str:
        return (f"{self.backend}/{self.mode}: {self.kills} kills (seed {SEED}), killed after {self.during}; "
                f"corrupt picks {len(self.corrupt_picks)}, lost {len(self.lost)}, torn {len(self.torn)}, "
                f"errors {len(self.errors)}; newest committed step {self.newest_acked}")


def backend_options(request, kind: str, root: pathlib.Path) -> dict:
    if kind == "local":
        return {"type": "local", "path": str(root / "store"), "leftover_grace_s": 0}
    retry = {"attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.2}
    if kind == "s3":
        port = request.getfixturevalue("moto_port")
        return {"type": "s3", "path": f"s3://{new_bucket('s3', port)}/ckpts", "leftover_grace_s": 0,
                "storage_options": {"endpoint_url": f"http://127.0.0.1:{port}"}, "part_size_mb": 5,
                "retry": retry}
    port = request.getfixturevalue("gcs_port")
    return {"type": "gcs", "path": f"gs://{new_bucket('gcs', port)}/ckpts", "leftover_grace_s": 0,
            "storage_options": {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon"},
            "part_size_mb": 1, "retry": retry}


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


CASES = [(b, m) for b in ("local", "s3", "gcs") for m in ("sync", "async")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{m}" for b, m in CASES])
def torture(request, zygote, tmp_path_factory):
    kind, mode = request.param
    workdir = tmp_path_factory.mktemp(f"torture-{kind}-{mode}")
    (workdir / "tmp").mkdir()
    config = {"backends": {"store": backend_options(request, kind, workdir)},
              "roles": {"resume": {"backends": ["store"], "every_n_steps": 1, "keep_last": 2,
                                   "async": mode == "async"}}}
    t = Torture(kind, mode, config, "run", zygote, workdir)
    rng = random.Random(f"{SEED}:{kind}:{mode}")
    for _ in range(KILLS):
        t.kill_once(rng)
    print(f"\n[torture] {t.summary()}")
    return t


def test_kills_never_pick_a_corrupt_checkpoint_nor_lose_one(torture):
    assert torture.kills == KILLS
    assert not torture.errors, torture.errors
    assert not torture.corrupt_picks, torture.corrupt_picks
    assert not torture.lost, torture.lost
    assert not torture.torn, torture.torn


def leftovers(t: Torture) -> list[tuple[str, str]]:
    """``(kind, what)`` for everything of the run that is not a committed checkpoint's file."""
    ck = t.manager()
    try:
        backend = ck.router.instances["store"]
        run = backend.run_path(t.run_name)
        found = []
        if t.backend == "local":
            for name in sorted(os.listdir(run)) if os.path.isdir(run) else []:
                path = os.path.join(run, name)
                inside = sorted(os.listdir(path)) if os.path.isdir(path) else None
                if inside == []:
                    found.append(("empty folder", name))
                elif not name.startswith("step-") or inside is None or "manifest.json" not in inside:
                    found.append(("files", f"{name} holds {inside}"))
        else:
            backend.fs.invalidate_cache()
            files = backend.fs.find(run) if backend.fs.exists(run) else []
            folders: dict[str, list[str]] = {}
            for path in files:
                rel = path[len(run):].strip("/").split("/")
                folders.setdefault(rel[0], []).append("/".join(rel[1:]))
            for name, names in folders.items():
                if not name.startswith("step-") or "manifest.json" not in names:
                    found.append(("files", f"{name} holds {sorted(names)}"))
        if t.backend == "s3":
            bucket = backend.root.split("/")[0]
            uploads = backend.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
            found += [("multipart upload", u["Key"]) for u in uploads]
        found += [("scratch folder", p.name) for p in (t.workdir / "tmp").iterdir() if p.name.startswith("ckptkit-")]
        return found
    finally:
        ck.close()


def test_a_fresh_start_cleans_what_the_kills_left(torture):
    before = leftovers(torture)
    print(f"\n[torture] {torture.backend}/{torture.mode}: {len(before)} orphans after the kills: {before}")
    job = torture.job(steps=1)
    pid = torture.zygote.start(job)
    wait_gone(pid, 120)
    lines = read_log(job["log"])
    assert lines and lines[-1] == "done", (lines, read_log(job["log"] + ".stderr"))
    assert leftovers(torture) == []
