"""Real MLflow for the tests: a tracking server on loopback, and the embedded sqlite store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` in its own process group; ``stop`` and ``start`` keep port and store."""

    def __init__(self, root, port: int):
        self.root = root
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(root, "server.log"), "ab")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> str:
        return os.path.join(self.root, "artifacts")

    def start(self, timeout: float = 90.0) -> None:
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root}/db.sqlite",
                "--artifacts-destination", self.artifacts, "--workers", "1"]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server did not answer /health within {timeout} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    time.sleep(0.1)
            except OSError:
                return


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(str(tmp_path_factory.mktemp("mlflow-server")), _free_port())
    server.start()
    yield server
    server.stop()
    server.log.close()


@pytest.fixture(scope="session")
def embedded_uri(tmp_path_factory):
    """One sqlite store for the session: its tables are created once (that takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow-embedded")
    uri = f"sqlite:///{root}/mlflow.db"
    from mlflow.tracking import MlflowClient

    # Made in its own folder: MLflow puts the Default experiment's artifacts under ./mlruns of
    # the folder a store is made in, which was the checkout that every test worker shares.
    here = os.getcwd()
    os.chdir(root)
    try:
        MlflowClient(uri).search_experiments()
    finally:
        os.chdir(here)
    return uri


@pytest.fixture(autouse=True)
def _no_active_run(tmp_path, monkeypatch):
    """Each test in its own folder (fallbacks land there), no MLflow run left open, and MLflow's
    global tracking and registry URIs (set_tracking_uri also exports them) put back."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        # delenv of an unset variable records nothing to undo, so one that set_registry_uri
        # exports during the test would stay set for every later test: set it first, so that
        # the undo removes it again.
        value = os.environ.get(var)
        monkeypatch.setenv(var, "" if value is None else value)
        if value is None:
            monkeypatch.delenv(var)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
