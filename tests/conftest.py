"""Shared fixtures of the core tests: small models, configs on temporary disks, fresh plugin managers."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from ckptkit.plugins import make_plugin_manager

from ckpt_helpers import small_tmpfs


@pytest.fixture
def pm():
    """A fresh plugin manager per test, so registrations never leak between tests."""
    return make_plugin_manager(autoload=False)


@pytest.fixture
def cli_columns(monkeypatch):
    """Sets how wide the command line's consoles print: rich reads COLUMNS when a console is
    made, and ckptkit.cli makes its own at import (a pytest-xdist worker starts with COLUMNS=80)."""
    from rich.console import Console

    import ckptkit.cli as cli

    def columns(width: int) -> int:
        monkeypatch.setenv("COLUMNS", str(width))
        monkeypatch.setattr(cli, "console", Console())
        monkeypatch.setattr(cli, "err_console", Console(stderr=True))
        return width

    return columns


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def third_party_dist(tmp_path, monkeypatch):
    """A separately installed backend distribution: a package plus its .dist-info on sys.path.

    Its ``memo`` backend keeps checkpoints in memory and records every hook call, so tests can
    see which roles it was called for.
    """
    site = tmp_path / "site"
    pkg = site / "ckptkit_memo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import io
        import ckptkit
        from ckptkit.checkpoint import CheckpointRef
        from ckptkit.hashing import HashingWriter
        from ckptkit.manifest import FileEntry

        CALLS = []
        STORE = {}

        class MemoBackend:
            @classmethod
            def from_config(cls, name, options):
                return cls(name, options.get("fail", False), options.get("unanswered_steps", ()))

            def __init__(self, name, fail, unanswered_steps=()):
                self.name = name
                self.fail = fail
                self.unanswered_steps = set(unanswered_steps)

            def _put(self, run_name, key, payload):
                if self.fail:
                    raise ConnectionError("memo store is down")
                files = {}
                entries = {}
                for pf in payload.files:
                    buf = io.BytesIO()
                    if pf.source:
                        buf.write(open(pf.source, "rb").read())
                        w = None
                    else:
                        w = HashingWriter(buf)
                        pf.write(w)
                    files[pf.name] = buf.getvalue()
                    entries[pf.name] = pf.expected or FileEntry(size=w.size, digest=w.digest())
                STORE[(self.name, run_name, key)] = (files, payload.manifest(entries))
                return CheckpointRef(backend=self.name, run_name=run_name, step=payload.step,
                                     path=f"{run_name}/{key}", uri=f"memo://{self.name}/{run_name}/{key}",
                                     role=payload.role)

            @ckptkit.hookimpl
            def save_resume(self, run_name, step, payload):
                CALLS.append((self.name, "save_resume", step, payload))
                return self._put(run_name, step, payload)

            @ckptkit.hookimpl
            def list_checkpoints(self, run_name):
                CALLS.append((self.name, "list_checkpoints", None, None))
                return [CheckpointRef(backend=self.name, run_name=r, step=k, path=f"{r}/{k}", uri=f"memo://{self.name}/{r}/{k}")
                        for (n, r, k) in STORE if n == self.name and r == run_name and k != "final"]

            @ckptkit.hookimpl
            def read_manifest(self, ref):
                if ref.step in self.unanswered_steps:
                    raise ConnectionError("memo store did not answer")
                return STORE[(self.name, ref.run_name, ref.step)][1]

            @ckptkit.hookimpl
            def open_file(self, ref, name):
                return io.BytesIO(STORE[(self.name, ref.run_name, ref.step)][0][name])

            @ckptkit.hookimpl
            def prune(self, run_name, keep_last, protected_steps, dry_run):
                CALLS.append((self.name, "prune", keep_last, None))
                return []

            @ckptkit.hookimpl
            def publish_final(self, run_name, payload, stored):
                CALLS.append((self.name, "publish_final", payload.step, payload, stored))
                return self._put(run_name, "final", payload)
    '''))
    dist = site / "ckptkit_memo-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ckptkit-memo\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text("[ckptkit.backends]\nmemo = ckptkit_memo:MemoBackend\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("ckptkit_memo", None)


@pytest.fixture(autouse=True)
def _mlflow_globals_put_back(monkeypatch):
    """The frameworks under test (Lightning's MLFlowLogger, the Trainer's MLflow callback) set
    MLflow's process-wide tracking and registry URIs; put them back after each test, so that a
    later test's MLflow calls reach its own store."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

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


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB filesystem that fills up for real (a tmpfs; mounting needs root)."""
    yield from small_tmpfs(tmp_path, "2m")
