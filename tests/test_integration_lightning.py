"""ckptkit.integrations.lightning against real PyTorch Lightning on the CPU.

Each fit runs in a process of its own, so that a kill is a real SIGKILL and DDP is Lightning's
own launcher with 2 CPU processes. The fits are forked from one process per test worker that has
imported torch and Lightning (this file run as a script with ``--serve``): importing Lightning
takes 6 to 10 s on two cores, longer than most fits. The model draws its data from the global
generator every step, so a resumed fit matches an uninterrupted one only if the weights,
optimizer, scheduler, loop state and every rank's RNG state all came back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ckptkit.errors import ConfigError, IncompatibleCheckpointError
from ckptkit.integrations.lightning import CkptkitCheckpoint

HERE = Path(__file__).resolve()
MAX_STEPS = 17
BATCHES_PER_EPOCH = 7


class Net(pl.LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x = torch.randn(4, self.hparams.width)
        y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(4, 1)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        if LOADER["kind"] == "per_rank":
            return RankStateLoader(self.trainer.global_rank, LOADER["record"])
        if LOADER["kind"] == "shuffled":
            return torch.utils.data.DataLoader(NoisyData(), batch_size=1, shuffle=True)
        return torch.utils.data.DataLoader(torch.arange(BATCHES_PER_EPOCH), batch_size=1)


class NoisyData(torch.utils.data.Dataset):
    """Items with a random augmentation, drawn from the global generator as they are fetched."""

    def __len__(self) -> int:
        return BATCHES_PER_EPOCH

    def __getitem__(self, i: int) -> torch.Tensor:
        return i + torch.rand(())


# What the validation after steps 3, 6, 10, 13 and 17 logs (val_check_interval=3 in epochs of 7 batches).
VAL_LOSS = {3: 2.0, 6: 1.0, 10: 3.0, 13: 4.0, 17: 5.0}


class ValidatedNet(Net):
    """Net with a validation loop: making its loader's iterator draws a seed from the global
    generator, between a save at that step and the next training step."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", VAL_LOSS.get(self.trainer.global_step, 9.0))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(2), batch_size=1)


class SetupLoadNet(Net):
    """Net loading weights (a pretrained backbone, say) in its ``setup``, which Lightning calls
    after the callbacks' own ``setup``, where ckptkit restores."""

    def setup(self, stage):
        pretrained = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=pretrained))


class RankStopNet(Net):
    """Net logging a metric of its own on each rank (no sync_dist), which worsens on rank 1 only:
    early stopping decides there, and Lightning then stops every rank."""

    def training_step(self, batch, batch_idx):
        step = float(self.trainer.global_step)
        self.log("m", step if self.trainer.global_rank == 1 else -step, on_step=True, on_epoch=False)
        return super().training_step(batch, batch_idx)


class EmptyValidationNet(ValidatedNet):
    """ValidatedNet whose validation loader has no batch: Lightning runs no validation hook."""

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(0), batch_size=1)


# The loader a fit uses, set from its spec: "plain", or "per_rank" recording into LOADER["record"].
LOADER = {"kind": "plain", "record": ""}


class RankStateLoader(torch.utils.data.DataLoader):
    """A loader with a state of its own on each rank, as one over a rank's shard of a data stream
    has; it writes down the state each load gives it."""

    def __init__(self, rank: int, record: str):
        super().__init__(torch.arange(BATCHES_PER_EPOCH), batch_size=1)
        self.rank, self.record, self.served = rank, record, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self):
        return {"rank": self.rank, "served": self.served}

    def load_state_dict(self, state):
        Path(self.record.format(rank=self.rank)).write_text(json.dumps(state))


def trainer(config, devices: int = 1, callbacks=(), max_steps: int = MAX_STEPS, **kwargs
            ) -> tuple[pl.Trainer, CkptkitCheckpoint]:
    ckpt = CkptkitCheckpoint(config)
    # Every rank iterates the whole loader (no DistributedSampler), so that epochs end where they
    # do in one process.
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices,
                      strategy="ddp" if devices > 1 else "auto", use_distributed_sampler=False,
                      enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[*callbacks, ckpt], **kwargs), ckpt


def main(spec_path: str) -> None:
    """One fit as the spec says; SIGKILLs itself (every rank) at the end of ``kill_after``."""
    spec = json.loads(Path(spec_path).read_text())
    LOADER.update(kind=spec.get("loader", "plain"), record=os.path.join(spec["workdir"], "loaded-{rank}.json"))

    class KillAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == spec.get("kill_after"):
                os.kill(os.getpid(), signal.SIGKILL)

    pl.seed_everything(1, verbose=False)
    model = (EmptyValidationNet() if spec.get("empty_validation") else ValidatedNet() if spec.get("validate")
             else SetupLoadNet() if spec.get("setup_load") else RankStopNet() if spec.get("rank_stop") else Net())
    from lightning.pytorch.callbacks import EarlyStopping

    stopping = [EarlyStopping(monitor="m", patience=1, check_on_train_epoch_end=True)] if spec.get("rank_stop") else []
    validation = {"val_check_interval": 3, "num_sanity_val_steps": 0} if spec.get("validate") else {}
    validation.update(spec.get("validation") or {})
    tr, ckpt = trainer(spec["config"], devices=spec.get("devices", 1), callbacks=[KillAt(), *stopping], logger=False,
                       default_root_dir=spec["workdir"], **validation)
    tr.fit(model)
    if tr.global_rank == 0:
        torch.save({"weights": model.state_dict(), "global_step": tr.global_step, "epoch": tr.current_epoch,
                    "loops": tr.fit_loop.state_dict(), "optimizer": tr.optimizers[0].state_dict(),
                    "scheduler": tr.lr_scheduler_configs[0].scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "restored_step": ckpt.restored_step},
                   os.path.join(spec["workdir"], spec["out"]))


# -- the test side ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port} within {timeout} s")


class Fit:
    """One fit in a process of its own, forked at once by the fit server; ``result()`` waits for it.

    Independent fits run side by side (a reference beside the fit killed to resume).
    """

    def __init__(self, workdir: Path, config: dict, out: str = "result.pt", kill_after: int | None = None,
                 devices: int = 1, env: dict | None = None, loader: str = "plain", validate: bool = False,
                 setup_load: bool = False, validation: dict | None = None, empty_validation: bool = False,
                 rank_stop: bool = False):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.out, self.kill_after = workdir, out, kill_after
        spec = workdir / f"spec-{out}.json"
        spec.write_text(json.dumps({"workdir": str(workdir), "config": config, "out": out,
                                    "kill_after": kill_after, "devices": devices, "loader": loader,
                                    "validate": validate, "setup_load": setup_load, "validation": validation,
                                    "empty_validation": empty_validation, "rank_stop": rank_stop}))
        self.log = workdir / f"log-{out}.txt"
        self.exit = workdir / f"exit-{out}"
        self.pid_file = workdir / f"pid-{out}"
        for old in (self.exit, self.pid_file):
            old.unlink(missing_ok=True)
        run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()),
                       **(env or {}))
        FitServer.fork({"spec": str(spec), "cwd": str(workdir), "env": run_env, "log": str(self.log),
                        "exit": str(self.exit), "pid": str(self.pid_file)})
        self.returncode: int | None = None
        self._result: dict | None = None

    def _wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.exit.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        self.returncode = int(self.exit.read_text())
        return True

    def result(self) -> dict | None:
        """What the fit saved, or None when it was killed as asked."""
        if self.returncode is None:
            ended = self._wait(300)
            if not ended:
                self.stop()
            output = self.log.read_text()[-6000:] if self.log.exists() else FitServer.output()
            assert ended, f"the fit did not end within 300 s: {output}"
            if self.kill_after is not None:
                assert self.returncode == -signal.SIGKILL, output
                assert not (self.workdir / self.out).exists()
            else:
                assert self.returncode == 0, output
                self._result = torch.load(self.workdir / self.out, weights_only=True)
        return self._result

    def stop(self) -> None:
        """Kill the fit, and the ranks it started, if it is still running (a test failed before
        waiting for it)."""
        if self.returncode is not None or self._wait(0):
            return
        deadline = time.monotonic() + 30
        while not self.pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.killpg(int(self.pid_file.read_text()), signal.SIGKILL)
        self._wait(30)


class FitServer:
    """The process the fits are forked from, one per test worker, started with the first fit."""

    proc: subprocess.Popen | None = None
    log: Path | None = None

    @classmethod
    def fork(cls, request: dict) -> None:
        if cls.proc is None or cls.proc.poll() is not None:
            fd, name = tempfile.mkstemp(prefix="ckptkit-fit-server-", suffix=".txt")
            cls.log = Path(name)
            cls.proc = subprocess.Popen([sys.executable, str(HERE), "--serve"], stdin=subprocess.PIPE, stdout=fd,
                                        stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
            os.close(fd)
        cls.proc.stdin.write(json.dumps(request) + "\n")
        cls.proc.stdin.flush()

    @classmethod
    def output(cls) -> str:
        return f"(the fit server: {cls.log.read_text()[-3000:] if cls.log else 'never started'})"

    @classmethod
    def close(cls) -> None:
        if cls.proc is not None:
            cls.proc.stdin.close()
            try:
                cls.proc.wait(30)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
                cls.proc.wait()
            cls.proc = None
        if cls.log is not None:
            cls.log.unlink(missing_ok=True)
            cls.log = None


def serve() -> None:
    """Fork a fit for each request read from stdin (JSON: the spec, its folder, environment and
    log, and the files to write the fit's pid and exit status into), until stdin closes.

    Each request forks a monitor, which forks the fit and writes its exit status once it ends
    (negative: the signal that killed it), so that this process waits for nothing. The fit
    leads a process group of its own, which a test kills whole, with the rank Lightning
    started. Nothing here has touched torch's thread pools when it forks.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the monitors
    for line in sys.stdin:
        request = json.loads(line)
        if os.fork() != 0:
            continue
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            _fitting(request)  # never returns
        with contextlib.suppress(OSError):  # in both, so that the group exists once the pid is known
            os.setpgid(pid, pid)
        pid_file = Path(request["pid"])
        pid_file.with_suffix(".tmp").write_text(str(pid))
        os.replace(pid_file.with_suffix(".tmp"), pid_file)
        status = os.waitpid(pid, 0)[1]
        exit_file = Path(request["exit"])
        exit_file.with_suffix(".tmp").write_text(str(os.waitstatus_to_exitcode(status)))
        os.replace(exit_file.with_suffix(".tmp"), exit_file)
        os._exit(0)


def _fitting(request: dict) -> None:
    """The forked fit: the process a fit started as a script would be, then ``main``."""
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # Lightning starts the other DDP ranks as this script again, with these arguments.
    sys.argv = [str(HERE), request["spec"]]
    main(request["spec"])
    sys.exit(0)  # through the interpreter's own shutdown, as a script ends


@pytest.fixture(scope="module", autouse=True)
def _fit_server():
    yield
    FitServer.close()


def fit(workdir: Path, config: dict, **kwargs) -> dict | None:
    return Fit(workdir, config, **kwargs).result()


def local_config(root: Path, every: int = 4, keep_last: int = 2, final: dict | None = None) -> dict:
    config = {"run_name": "lit", "backends": {"scratch": {"type": "local", "path": str(root / "ckpts")}},
              "roles": {"resume": {"backends": ["scratch"], "every_n_steps": every, "keep_last": keep_last}}}
    if final is not None:
        config["backends"]["registry"] = final
        config["roles"]["final"] = {"backends": ["registry"]}
    return config


def mlflow_backend(root: Path) -> dict:
    return {"type": "mlflow", "tracking_uri": f"sqlite:///{root}/mlflow.db",
            "artifact_location": str(root / "mlartifacts"), "experiment": "lit",
            "registered_model_name": "lit_model"}


def committed_steps(root: Path, run: str = "lit") -> list[int]:
    folder = root / run
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir()
                  if p.name.startswith("step-") and (p / "manifest.json").is_file())


def assert_same_training(expected: dict, got: dict, loop_exceptions: frozenset[str] = frozenset()) -> None:
    assert got["global_step"] == expected["global_step"] == MAX_STEPS
    assert got["epoch"] == expected["epoch"]
    for key, value in expected["weights"].items():
        assert torch.equal(value, got["weights"][key]), f"weight {key} differs"
    assert torch.equal(expected["rng"], got["rng"]), "the global generator ended elsewhere"
    assert_equal_state(expected["optimizer"], got["optimizer"], "optimizer")
    assert_equal_state(expected["scheduler"], got["scheduler"], "scheduler")
    differ = []
    assert_equal_state(expected["loops"], got["loops"], "loops", differ)
    assert set(differ) <= loop_exceptions, f"loop state differs at {sorted(set(differ) - loop_exceptions)}"


def assert_equal_state(a, b, path: str, differ: list | None = None) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_equal_state(a[key], b[key], f"{path}/{key}", differ)
        return
    same = torch.equal(a, b) if torch.is_tensor(a) else a == b
    if differ is not None and not same:
        differ.append(path)
    else:
        assert same, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted fit (its final model to an embedded MLflow store), run once."""
    root = tmp_path_factory.mktemp("reference")
    run = Fit(root, local_config(root, final=mlflow_backend(root)))
    yield root, run
    run.stop()


@pytest.fixture(scope="module")
def s3_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_steps(fs, prefix: str) -> list[int]:
    fs.invalidate_cache()
    return sorted(int(p.rsplit("step-", 1)[1].split("/")[0]) for p in fs.glob(f"{prefix}/step-*/manifest.json"))


def test_a_killed_fit_resumes_from_s3_bit_identical_and_keep_last_holds(tmp_path, reference, s3_server, monkeypatch):
    import s3fs

    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.mkdir("lit-ckpts")
    config = local_config(tmp_path, final=mlflow_backend(tmp_path))
    config["backends"]["archive"] = {"type": "s3", "path": "s3://lit-ckpts/runs",
                                     "storage_options": {"endpoint_url": s3_server}}
    config["roles"]["resume"]["backends"] = ["scratch", "archive"]

    # Killed after step 10, mid-epoch: steps 4 and 8 are committed on both backends.
    fit(tmp_path, config, kill_after=10, env=AWS)
    assert committed_steps(tmp_path / "ckpts") == [4, 8]
    assert s3_steps(fs, "lit-ckpts/runs/lit") == [4, 8]
    # The local disk is gone: the restart resumes from the S3 copy.
    shutil.rmtree(tmp_path / "ckpts")
    got = fit(tmp_path, config, env=AWS)

    assert got["restored_step"] == 8
    assert_same_training(reference[1].result(), got)
    # keep_last: 2 on each backend, the end of fit included.
    assert committed_steps(tmp_path / "ckpts") == [16, 17]
    assert s3_steps(fs, "lit-ckpts/runs/lit") == [16, 17]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """The uninterrupted fit on 2 DDP processes (its setup draws differently from one process)."""
    root = tmp_path_factory.mktemp("ddp-reference")
    run = Fit(root, local_config(root, every=BATCHES_PER_EPOCH), devices=2)
    yield run
    run.stop()


def test_ddp_on_two_processes_killed_after_an_epochs_last_batch_resumes_bit_identical(tmp_path, ddp_reference):
    config = local_config(tmp_path, every=BATCHES_PER_EPOCH)
    fit(tmp_path, config, kill_after=BATCHES_PER_EPOCH + 2, devices=2)
    assert committed_steps(tmp_path / "ckpts") == [BATCHES_PER_EPOCH]
    got = fit(tmp_path, config, devices=2)
    assert got["restored_step"] == BATCHES_PER_EPOCH
    assert_same_training(ddp_reference.result(), got, loop_exceptions=SKIPPED_EPOCH_START)
    assert committed_steps(tmp_path / "ckpts") == [2 * BATCHES_PER_EPOCH, MAX_STEPS]


def test_ddp_gives_each_rank_back_its_own_data_loader_state(tmp_path):
    """A loader over a rank's own shard of the data is at a position of its own on each rank:
    every rank must get back what it saved, not rank 0's."""
    config = local_config(tmp_path)
    fit(tmp_path, config, kill_after=10, devices=2, loader="per_rank")
    assert committed_steps(tmp_path / "ckpts") == [4, 8]
    assert not list(tmp_path.glob("loaded-*.json"))
    got = fit(tmp_path, config, devices=2, loader="per_rank")
    assert got["restored_step"] == 8
    loaded = {rank: json.loads((tmp_path / f"loaded-{rank}.json").read_text()) for rank in (0, 1)}
    assert {rank: state["rank"] for rank, state in loaded.items()} == {0: 0, 1: 1}
    assert loaded[0]["served"] == loaded[1]["served"] > 0


def mlflow_contents(root: Path) -> tuple[list, list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    versions = client.search_model_versions("name='lit_model'")
    files = sorted(str(p.relative_to(root / "mlartifacts")) for p in (root / "mlartifacts").rglob("*") if p.is_file())
    return versions, files


def test_the_tracking_store_holds_the_final_model_once_and_no_checkpoint(reference):
    root, first = reference[0], reference[1].result()
    versions, files = mlflow_contents(root)
    assert len(versions) == 1
    assert [f.rsplit("/", 1)[-1] for f in files] == ["final_model.pt"], files
    final = torch.load(next((root / "mlartifacts").rglob("final_model.pt")), weights_only=True)
    assert final["step"] == MAX_STEPS
    for key, value in first["weights"].items():
        assert torch.equal(final["model"][key], value)
    assert final["params"] == {"width": 8, "lr": 0.05}
    # Running the finished fit again resumes at its end and publishes nothing more.
    again = fit(root, local_config(root, final=mlflow_backend(root)), out="again.pt")
    assert again["restored_step"] == MAX_STEPS
    assert len(mlflow_contents(root)[0]) == 1
    assert committed_steps(root / "ckpts") == [16, 17]


def test_a_finished_fit_run_again_resumes_at_its_end_and_publishes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = local_config(tmp_path, every=4, final={"type": "local", "path": str(tmp_path / "final")})
    for run in range(2):
        tr, ckpt = trainer(config, max_steps=6, logger=False, default_root_dir=tmp_path)
        tr.fit(Net())
        assert tr.global_step == 6
        published = next((tmp_path / "final").rglob("final_model.pt")).stat()
        if run == 0:
            first = published
            assert ckpt.restored_step is None
    # The end of fit (step 6, not a due step) was saved; the second run restored it and published
    # nothing: the final file is the same one, never written again.
    assert ckpt.restored_step == 6
    assert (published.st_ino, published.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert committed_steps(tmp_path / "ckpts") == [4, 6]


def test_a_finished_fit_whose_final_model_no_backend_holds_publishes_it_when_run_again(tmp_path, monkeypatch, caplog):
    """A job stopped inside finalize after its last step, a due one, was saved: Lightning skips
    the restored, finished loop and its on_train_end, and the model was never published, without
    a word. A first fit without a final role leaves the run so; the restart publishes the
    restored weights of that step, once."""
    monkeypatch.chdir(tmp_path)
    tr, _ = trainer(local_config(tmp_path, every=4), max_steps=8, logger=False, default_root_dir=tmp_path)
    trained = Net()
    tr.fit(trained)
    config = local_config(tmp_path, every=4, final={"type": "local", "path": str(tmp_path / "final")})
    with caplog.at_level(logging.WARNING, logger="ckptkit.integrations.lightning"):
        tr, ckpt = trainer(config, max_steps=8, logger=False, default_root_dir=tmp_path)
        tr.fit(Net())
    assert ckpt.restored_step == 8
    assert "not every final backend holds its final model of step 8" in caplog.text
    published = torch.load(tmp_path / "final" / "lit" / "final" / "final_model.pt", weights_only=True)
    assert published["step"] == 8
    assert all(torch.equal(published["model"][k], v) for k, v in trained.state_dict().items())
    first = (tmp_path / "final" / "lit" / "final" / "manifest.json").read_bytes()
    tr, _ = trainer(config, max_steps=8, logger=False, default_root_dir=tmp_path)
    tr.fit(Net())  # published now: not again
    assert sorted(os.listdir(tmp_path / "final" / "lit")) == ["final"]
    assert (tmp_path / "final" / "lit" / "final" / "manifest.json").read_bytes() == first


def test_an_early_stopped_fit_run_again_stays_stopped_and_publishes_nothing(tmp_path, monkeypatch):
    """Lightning keeps trainer.should_stop out of its checkpoint: started again, a fit that early
    stopping had ended trained on to the next validation and published a second model."""
    from lightning.pytorch.callbacks import EarlyStopping

    monkeypatch.chdir(tmp_path)
    config = local_config(tmp_path, every=4, final={"type": "local", "path": str(tmp_path / "final")})
    for run in range(2):
        pl.seed_everything(1, verbose=False)
        tr, ckpt = trainer(config, logger=False, default_root_dir=tmp_path, val_check_interval=3,
                           num_sanity_val_steps=0, callbacks=[EarlyStopping(monitor="val_loss", patience=1)])
        tr.fit(ValidatedNet())
        assert tr.global_step == 10  # val_loss 2, 1, then 3 at step 10: no better, patience used up
        published = next((tmp_path / "final").rglob("final_model.pt")).stat()
        if run == 0:
            first = published
    assert ckpt.restored_step == 10
    assert (published.st_ino, published.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert committed_steps(tmp_path / "ckpts") == [8, 10]


def test_early_stopping_at_an_epochs_end_after_the_save_is_saved_again_and_stays_stopped(tmp_path, monkeypatch):
    """Checked at the epoch's end (validation once an epoch, EarlyStopping's default), the stop
    came after the save that followed the step's validation: that save said nothing of it, and a
    restart failed in EarlyStopping ("conditioned on metric val_loss which is not available")."""
    from lightning.pytorch.callbacks import EarlyStopping

    monkeypatch.chdir(tmp_path)
    config = local_config(tmp_path, every=7, final={"type": "local", "path": str(tmp_path / "final")})
    for run in range(2):
        pl.seed_everything(1, verbose=False)
        tr, ckpt = trainer(config, logger=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                           callbacks=[EarlyStopping(monitor="val_loss", patience=1)])
        tr.fit(ValidatedNet())
        assert tr.global_step == 14  # val_loss 9 after each epoch of 7 steps: the second is no better
        if run == 0:
            first = next((tmp_path / "final").rglob("final_model.pt")).stat()
    assert ckpt.restored_step == 14
    published = next((tmp_path / "final").rglob("final_model.pt")).stat()
    assert (published.st_ino, published.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert committed_steps(tmp_path / "ckpts") == [7, 14]


@pytest.mark.distributed
def test_early_stopping_decided_on_one_rank_saves_on_every_rank_and_stays_stopped(tmp_path):
    """Lightning stops every rank once one decides, but says why on that rank alone: that rank
    saved the stopped fit alone (the others waited in vain, then failed), and a restart read rank
    0's callback state, which did not say the fit had stopped, and trained on."""
    config = local_config(tmp_path, every=BATCHES_PER_EPOCH, keep_last=3,
                          final={"type": "local", "path": str(tmp_path / "final")})
    config["distributed"] = {"timeout_s": 30}
    first = fit(tmp_path, config, devices=2, rank_stop=True)
    stop = 2 * BATCHES_PER_EPOCH  # m worsens on rank 1 from the second epoch's end: patience 1 used up
    assert first["global_step"] == stop and committed_steps(tmp_path / "ckpts") == [BATCHES_PER_EPOCH, stop]
    published = sorted(p.parent.name for p in (tmp_path / "final").rglob("final_model.pt"))
    again = fit(tmp_path, config, devices=2, rank_stop=True, out="again.pt")
    assert again["restored_step"] == stop and again["global_step"] == stop, "the restart stays stopped"
    assert sorted(p.parent.name for p in (tmp_path / "final").rglob("final_model.pt")) == published == ["final"]


def test_a_fit_stopped_for_another_reason_trains_on_when_started_again(tmp_path, monkeypatch):
    """Only early stopping keeps a restarted fit stopped: one that stopped itself (a time budget
    before a requeue) goes on from where it stopped, as from Lightning's own checkpoint."""
    monkeypatch.chdir(tmp_path)

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.should_stop = True

    config = local_config(tmp_path, every=4)
    tr, _ = trainer(config, logger=False, default_root_dir=tmp_path, callbacks=[StopAt()])
    tr.fit(Net())
    assert tr.global_step == 5 and committed_steps(tmp_path / "ckpts") == [4, 5]
    tr, ckpt = trainer(config, logger=False, default_root_dir=tmp_path)
    tr.fit(Net())
    assert ckpt.restored_step == 5 and tr.global_step == MAX_STEPS


def test_another_optimizer_class_is_refused_before_a_step(tmp_path, monkeypatch):
    """Lightning loads the optimizers' state itself: AdamW's went into an Adam without a word,
    which then trained as AdamW (decoupled weight decay among the loaded settings)."""
    monkeypatch.chdir(tmp_path)
    config = local_config(tmp_path, every=2)
    tr, _ = trainer(config, max_steps=2, logger=False, default_root_dir=tmp_path)
    tr.fit(Net())

    class AdamNet(Net):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    tr, _ = trainer(config, max_steps=4, logger=False, default_root_dir=tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match=r"step 2 of run 'lit' holds the state of the optimizers "
                                                          r"torch\.optim\.adamw\.AdamW, and configure_optimizers "
                                                          r"now makes torch\.optim\.adam\.Adam.*new run_name"):
        tr.fit(AdamNet())
    assert committed_steps(tmp_path / "ckpts") == [2]


class LazyNet(Net):
    """Net whose layers are made in configure_model, after the callbacks' setup."""

    def __init__(self):
        super().__init__()
        del self.net

    def configure_model(self):
        if not hasattr(self, "net"):
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


class LazyHeadNet(Net):
    """Net with one more layer made in configure_model: it has parameters when restore runs."""

    def configure_model(self):
        if not hasattr(self, "head"):
            self.head = torch.nn.Linear(1, 1)


def test_layers_made_in_configure_model_are_refused_before_training_or_named_at_restore(tmp_path, monkeypatch):
    """CkptkitCheckpoint restores in setup, before configure_model: such a fit saved its steps
    and then could never resume, failing with torch's bare "Unexpected key(s) in state_dict"."""
    monkeypatch.chdir(tmp_path)
    config = local_config(tmp_path, every=2)
    tr, _ = trainer(config, max_steps=2, logger=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"LazyNet has no parameters until configure_model runs.*in __init__"):
        tr.fit(LazyNet())
    assert tr.global_step == 0 and not (tmp_path / "ckpts").exists()

    tr, _ = trainer(config, max_steps=2, logger=False, default_root_dir=tmp_path)
    tr.fit(LazyHeadNet())
    tr, _ = trainer(config, max_steps=4, logger=False, default_root_dir=tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match=r"weights the model lacks: head\.bias, head\.weight") as info:
        tr.fit(LazyHeadNet())
    assert any("before configure_model runs" in note for note in info.value.__notes__)
    assert committed_steps(tmp_path / "ckpts") == [2]


def test_a_step_that_validates_is_saved_after_its_validation_and_resumes_bit_identical(tmp_path):
    """Saved before the validation that follows its step, a checkpoint held the metrics of the
    validation before (keep_best kept the wrong step) and the random state before the validation
    loader drew its seed, so a fit resumed from it went on otherwise than the uninterrupted one."""
    def config(root):
        cfg = local_config(root, every=3, keep_last=2)
        cfg["roles"]["resume"]["keep_best"] = {"metric": "val_loss", "mode": "min", "count": 1}
        return cfg

    reference = Fit(tmp_path / "reference", config(tmp_path / "reference"), validate=True)
    try:
        fit(tmp_path, config(tmp_path), kill_after=7, validate=True)
        metrics = {step: json.loads((tmp_path / f"ckpts/lit/step-{step:010d}/manifest.json").read_text())["metrics"]
                   for step in committed_steps(tmp_path / "ckpts")}
        assert {step: m.get("val_loss") for step, m in metrics.items()} == {3: 2.0, 6: 1.0}
        got = fit(tmp_path, config(tmp_path), validate=True)
        assert got["restored_step"] == 6
        assert_same_training(reference.result(), got)
        # keep_best kept step 6, the lowest val_loss, beside the newest two.
        assert committed_steps(tmp_path / "ckpts") == [6, 15, 17]
    finally:
        reference.stop()


def test_a_module_loading_weights_in_its_setup_resumes_the_saved_weights_bit_identical(tmp_path):
    """LightningModule.setup runs after the callbacks' setup: its load of pretrained weights went
    into the very tensors Lightning then restored from, and the fit went on from the pretrained
    weights instead of the saved ones, as with Lightning's own ckpt_path it does not."""
    reference = Fit(tmp_path / "reference", local_config(tmp_path / "reference"), setup_load=True)
    try:
        fit(tmp_path, local_config(tmp_path), kill_after=10, setup_load=True)
        got = fit(tmp_path, local_config(tmp_path), setup_load=True)
        assert got["restored_step"] == 8
        assert_same_training(reference.result(), got)
    finally:
        reference.stop()


# Lightning itself counts one epoch start fewer after a restart at an epoch's end (its own
# ModelCheckpoint's files resume the same way); everything else is as uninterrupted.
SKIPPED_EPOCH_START = frozenset(f"loops/epoch_progress/{w}/{c}" for w in ("total", "current")
                                for c in ("ready", "started"))


@pytest.mark.parametrize("validation, kill_after, restored, val_loss, loops", [
    # Validation at each epoch's end: a restarted fit finishes that epoch again and makes the
    # next epoch's loader iterator a second time, which drew a seed the uninterrupted fit did not.
    ({"val_check_interval": 1.0}, 10, 7, 9.0, frozenset()),
    # Validation every other epoch, mid-epoch too: a restart fast-forwards the validation loop's
    # progress, making its loader's iterator (a draw) before the first step.
    ({"val_check_interval": 3}, 10, 7, 1.0, SKIPPED_EPOCH_START),  # (step 6's validation logged it)
    # Every other epoch: the validation loop sets up its data only at its first validation, so
    # before it the step looked as if nothing would validate and was saved before validation.
    ({"val_check_interval": 1.0, "check_val_every_n_epoch": 2}, 16, 14, 9.0, frozenset()),
    # Restarted at the end of an epoch that did not validate, before one that does: the
    # validation loop is fast-forwarded before the first batch, making its loader's iterator.
    ({"val_check_interval": 1.0, "check_val_every_n_epoch": 2}, 10, 7, None, SKIPPED_EPOCH_START),
], ids=["each-epoch-end", "every-3-batches", "every-2nd-epoch", "every-2nd-epoch-restarted-before-it"])
def test_a_save_at_an_epochs_last_batch_of_a_validating_fit_resumes_bit_identical(
        tmp_path, validation, kill_after, restored, val_loss, loops):
    config = local_config(tmp_path, every=BATCHES_PER_EPOCH)
    reference = Fit(tmp_path / "reference", local_config(tmp_path / "reference", every=BATCHES_PER_EPOCH),
                    validate=True, validation=validation)
    try:
        fit(tmp_path, config, kill_after=kill_after, validate=True, validation=validation)
        manifest = json.loads((tmp_path / f"ckpts/lit/step-{restored:010d}/manifest.json").read_text())
        assert manifest["metrics"].get("val_loss") == val_loss  # saved after its validation, where one ran
        got = fit(tmp_path, config, validate=True, validation=validation)
        assert got["restored_step"] == restored
        assert_same_training(reference.result(), got, loop_exceptions=loops)
    finally:
        reference.stop()


@pytest.mark.parametrize("validation", [None, {"val_check_interval": 3}], ids=["no-validation", "every-3-batches"])
def test_a_save_at_an_epochs_last_batch_resumes_bit_identical_with_a_shuffled_augmented_loader(tmp_path, validation):
    """The generators were set back at the first resumed batch to where they stood once the
    loader's iterator was made, taking back the draws of fetching that batch (the shuffling
    sampler's seed, the augmentation): the resumed fit trained on other random numbers."""
    config = local_config(tmp_path, every=BATCHES_PER_EPOCH)
    validate = validation is not None
    reference = Fit(tmp_path / "reference", local_config(tmp_path / "reference", every=BATCHES_PER_EPOCH),
                    loader="shuffled", validate=validate, validation=validation)
    try:
        fit(tmp_path, config, kill_after=10, loader="shuffled", validate=validate, validation=validation)
        got = fit(tmp_path, config, loader="shuffled", validate=validate, validation=validation)
        assert got["restored_step"] == BATCHES_PER_EPOCH
        assert_same_training(reference.result(), got, loop_exceptions=SKIPPED_EPOCH_START)
    finally:
        reference.stop()


def test_a_step_left_for_a_validation_that_does_not_run_is_still_saved(tmp_path):
    """A fit validating every other epoch sets its validation data up at its first validation:
    only then does it turn out to have no batch, and no validation hook runs. The step left to be
    saved after it is saved at the epoch's end instead of being lost."""
    validation = {"val_check_interval": 1.0, "check_val_every_n_epoch": 2}
    fit(tmp_path, local_config(tmp_path, every=BATCHES_PER_EPOCH), validate=True, validation=validation,
        empty_validation=True)
    assert committed_steps(tmp_path / "ckpts") == [14, 17]


def test_a_mid_epoch_step_left_for_a_validation_that_does_not_run_is_saved_and_resumes(tmp_path):
    """The same every third batch: the step is saved at the next batch's start, where Lightning
    already tells of that batch; the checkpoint says the epoch went on, as it did."""
    validation = {"val_check_interval": 3, "check_val_every_n_epoch": 2}
    config = local_config(tmp_path, every=5)
    reference = Fit(tmp_path / "reference", local_config(tmp_path / "reference", every=5), validate=True,
                    validation=validation, empty_validation=True)
    try:
        fit(tmp_path, config, kill_after=12, validate=True, validation=validation, empty_validation=True)
        assert committed_steps(tmp_path / "ckpts") == [5, 10]
        got = fit(tmp_path, config, validate=True, validation=validation, empty_validation=True)
        assert got["restored_step"] == 10
        assert_same_training(reference.result(), got, loop_exceptions=LOOP_COUNTERS_AFTER_A_LATE_SAVE)
    finally:
        reference.stop()


# Saved at the next batch's start, the loop has counted that batch as ready and the step as
# stepped: those two counters (the logger's step) differ after the restart; the training does not.
LOOP_COUNTERS_AFTER_A_LATE_SAVE = frozenset({"loops/epoch_loop.batch_progress/total/ready",
                                             "loops/epoch_loop.state_dict/_batches_that_stepped"})


def test_fit_with_a_ckpt_path_over_a_run_it_resumes_is_refused_before_any_step(tmp_path, monkeypatch):
    """Lightning loads fit(ckpt_path=...) after the callback restored: the fit went on from that
    file's older step with the run's random state, and then saved over the run's newer step."""
    monkeypatch.chdir(tmp_path)
    config = local_config(tmp_path, every=2, keep_last=5)
    tr, _ = trainer(config, max_steps=2, logger=False, default_root_dir=tmp_path)
    tr.fit(Net())
    tr.save_checkpoint(tmp_path / "step2.ckpt")  # a file of Lightning's own, as ModelCheckpoint wrote
    tr, _ = trainer(config, max_steps=4, logger=False, default_root_dir=tmp_path)
    tr.fit(Net())
    newest = (tmp_path / "ckpts/lit/step-0000000004/state.pt").read_bytes()

    tr, ckpt = trainer(config, max_steps=6, logger=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"fit\(ckpt_path=.*step2.ckpt'\) and CkptkitCheckpoint both restore.*"
                                          r"step 4.*Remove ckpt_path"):
        tr.fit(Net(), ckpt_path=tmp_path / "step2.ckpt")
    assert committed_steps(tmp_path / "ckpts") == [2, 4]
    assert (tmp_path / "ckpts/lit/step-0000000004/state.pt").read_bytes() == newest

    # A new run started from a Lightning file: nothing to restore in it, so the file is the start.
    config["run_name"] = "from-file"
    tr, ckpt = trainer(config, max_steps=4, logger=False, default_root_dir=tmp_path)
    tr.fit(Net(), ckpt_path=tmp_path / "step2.ckpt")
    assert ckpt.restored_step is None and tr.global_step == 4
    assert committed_steps(tmp_path / "ckpts", run="from-file") == [4]


def test_model_checkpoint_beside_it_is_refused_naming_the_ckptkit_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever MLflow or Lightning would write lands there
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    # log_model="all" would upload nothing with CkptkitCheckpoint: a warning says so.
    logger = MLFlowLogger(experiment_name="lit", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", log_model="all")
    tr, _ = trainer(local_config(tmp_path), logger=logger, default_root_dir=tmp_path,
                    callbacks=[ModelCheckpoint(dirpath=tmp_path / "mc", every_n_train_steps=5, save_top_k=3,
                                               monitor="train_loss")])
    with pytest.raises(ConfigError) as info, pytest.warns(UserWarning, match="uploads nothing"):
        tr.fit(Net())
    message = str(info.value)
    assert "Remove ModelCheckpoint" in message
    assert "every_n_train_steps=5 -> roles.resume.every_n_steps: 5" in message
    assert "save_top_k=3 -> roles.resume.keep_last" in message
    assert "monitor='train_loss' -> roles.resume.keep_best: {metric: train_loss" in message
    assert "every_n_epochs" not in message  # Lightning's own 0 beside every_n_train_steps, not the user's
    assert not (tmp_path / "ckpts").exists() and not (tmp_path / "mc").exists()

def test_an_async_save_leaves_sigterm_to_lightnings_own_handler(tmp_path):
    """Lightning sets its SIGTERM handler when the fit starts and calls the one it replaced:
    ckptkit's, set when the manager was built, then ended the process, cutting short Lightning's
    stop at the next step (and SLURM's requeue, which keeps the process alive)."""
    import signal as signals

    config = local_config(tmp_path, every=1)
    config["roles"]["resume"]["async"] = True
    seen = {}

    class Look(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["handler"] = signals.getsignal(signals.SIGTERM)

    before = signals.signal(signals.SIGTERM, signals.SIG_DFL)
    try:
        tr, _ = trainer(config, callbacks=[Look()], max_steps=2, logger=False, default_root_dir=tmp_path)
        tr.fit(Net())
    finally:
        signals.signal(signals.SIGTERM, before)
    handlers = getattr(seen["handler"], "signal_handlers", None)
    assert handlers, seen
    assert not [h for h in handlers if getattr(h, "__module__", "").startswith("ckptkit")], handlers
    assert committed_steps(tmp_path / "ckpts"), "the fit saved asynchronously"



@pytest.mark.parametrize("name", ["", "a/b"])
def test_a_bad_run_name_is_refused_at_construction_not_on_the_ranks(tmp_path, name):
    with pytest.raises(ConfigError, match="run_name"):
        CkptkitCheckpoint(local_config(tmp_path), run_name=name)


def test_a_config_without_resume_backends_is_refused_at_construction(tmp_path):
    config = local_config(tmp_path)
    del config["roles"]["resume"]
    config["roles"]["final"] = {"backends": ["scratch"]}
    with pytest.raises(ConfigError, match="roles.resume"):
        CkptkitCheckpoint(config)


if __name__ == "__main__":
    serve() if sys.argv[1] == "--serve" else main(sys.argv[1])
