"""The example third-party distribution, examples/ckptkit-webdav, as a user gets it.

It is installed for real (a wheel built by pip into a folder put on sys.path), found through its
``ckptkit.backends`` entry point, and run against a real WebDAV server (wsgidav on loopback, with
a password): through a CheckpointManager, the command line, and ckptkit's conformance suite.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
from cheroot import wsgi
from wsgidav.wsgidav_app import WsgiDAVApp

import ckptkit
from ckptkit import BackendError, CheckpointManager
from ckptkit.cli import main as cli_main
from ckptkit.plugin import Payload, PayloadFile
from ckptkit.plugins import make_plugin_manager
from ckptkit.retry import RetryPolicy
from ckptkit.storage import FileBackend
from ckptkit.testing import ResumeBackendTests

from ckpt_helpers import assert_same_state, make_model, train_step

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ckptkit-webdav"
USER = "trainer"
PASSWORD = "dav-Pw-" + uuid.uuid4().hex[:12]
PASSWORD_ENV = "CKPTKIT_TEST_WEBDAV_PASSWORD"


@pytest.fixture(scope="module")
def webdav_dist(tmp_path_factory):
    """ckptkit-webdav installed from its pyproject: the copy in the environment where one is
    (tox can install it with the plugins), else a wheel built by pip into a folder on sys.path,
    taken off it after this module so that later tests see only their own distributions."""
    try:
        installed = importlib.metadata.distribution("ckptkit-webdav")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None:
        yield Path(str(installed.locate_file("")))
        return
    site = tmp_path_factory.mktemp("webdav-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--target", str(site), str(EXAMPLE)], check=True, capture_output=True, timeout=300)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    importlib.invalidate_caches()
    for name in [m for m in sys.modules if m == "ckptkit_webdav" or m.startswith("ckptkit_webdav.")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def webdav_server(tmp_path_factory):
    """A wsgidav server on a free loopback port that asks for a user and password: its URL."""
    root = tmp_path_factory.mktemp("webdav-root")
    app = WsgiDAVApp({
        "provider_mapping": {"/": str(root)},
        "simple_dc": {"user_mapping": {"*": {USER: {"password": PASSWORD}}}},
        "http_authenticator": {"accept_basic": True, "accept_digest": False, "default_to_digest": False},
        "verbose": 0,
        "logging": {"enable_loggers": []},
    })
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = wsgi.Server(("127.0.0.1", port), app, numthreads=8)
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True, name="wsgidav")
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    thread.join(timeout=10)


@pytest.fixture
def password(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    return PASSWORD


@pytest.fixture
def pm(webdav_dist):
    """A plugin manager that knows ckptkit's own types and, through its entry point, ckptkit-webdav's."""
    pm = make_plugin_manager(autoload=False)
    pm.load_backend_entrypoints(only_dist="ckptkit-webdav")
    assert "webdav" in pm.backend_types, pm.broken
    return pm


def options(server: str, **more) -> dict:
    return {"path": f"{server}/ckpts-{uuid.uuid4().hex[:10]}", "username": USER, "password_env": PASSWORD_ENV,
            **more}


def small_payload(step: int) -> Payload:
    return Payload(run_name="r", step=step, epoch=None, format="torch",
                   files=(PayloadFile("state.pt", write=lambda f: f.write(b"s" * 5000)),))


def test_the_installed_distribution_declares_its_entry_point(webdav_dist, pm):
    dist = importlib.metadata.distribution("ckptkit-webdav")
    assert Path(str(dist.locate_file(""))).resolve() == webdav_dist.resolve(), "the installed copy, not the source"
    eps = [(ep.name, ep.value) for ep in dist.entry_points if ep.group == "ckptkit.backends"]
    assert eps == [("webdav", "ckptkit_webdav:WebdavBackend")]
    btype = pm.backend_types["webdav"]
    assert btype.dist == "ckptkit-webdav 0.1.0"
    assert sorted(r.value for r in btype.roles) == ["final", "resume"]
    assert Path(sys.modules[btype.cls.__module__].__file__).is_relative_to(webdav_dist)


def test_save_restore_and_prune_through_a_checkpoint_manager(pm, webdav_server, password):
    cfg = {"run_name": "exp",
           "backends": {"dav": {"type": "webdav", **options(webdav_server)}},
           "roles": {"resume": {"backends": ["dav"], "every_n_steps": 1, "keep_last": 2},
                     "final": {"backends": ["dav"]}}}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    model, opt = make_model()
    for step in range(4):  # the first save makes every folder on the way: no 409 Conflict
        train_step(model, opt)
        ck.save(step=step, epoch=0, model=model, optimizer=opt, metrics={"loss": 1.0 / (step + 1)})
    assert [r.step for r in ck.list_checkpoints()] == [3, 2], "keep_last 2: the others were pruned"
    refs = ck.finalize(model, step=3, epoch=0)
    ck.close()
    assert refs[0].uri.startswith(f"{webdav_server}/ckpts-") and refs[0].uri.endswith("/exp/final")

    again = CheckpointManager.from_config(cfg, plugin_manager=pm)
    fresh, fresh_opt = make_model(seed=7)
    restored = again.restore(model=fresh, optimizer=fresh_opt)
    again.close()
    assert restored.step == 3 and restored.metrics == {"loss": 0.25}
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_a_root_holding_brackets_is_pruned_whole(pm, webdav_server, password):
    """webdav4 deletes a folder by its name, but fsspec's rm would take '[' for a pattern: refused
    there, every pruned step lost its manifest and kept its state.pt for good."""
    cfg = {"run_name": "exp",
           "backends": {"dav": {"type": "webdav", **options(webdav_server),
                                "path": f"{webdav_server}/team%5B1%5D-{uuid.uuid4().hex[:8]}"}},
           "roles": {"resume": {"backends": ["dav"], "every_n_steps": 1, "keep_last": 2}}}
    model, opt = make_model()
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        for step in range(4):
            ck.save(step=step, model=model, optimizer=opt)
        ck.wait()
        backend = ck.router.instances["dav"]
        assert "[" in backend.root
        run = backend.run_path("exp")
        backend.fs.invalidate_cache()
        left = sorted(p[len(run) + 1:] for p in backend.fs.find(run))
    assert left == [f"step-000000000{s}/{n}" for s in (2, 3) for n in ("manifest.json", "state.pt")]


def test_a_dcp_step_saved_again_on_a_store_whose_copy_will_not_replace_a_file(pm, webdav_server, password):
    """WebDAV's COPY refuses to overwrite: the shards staged beside the committed step are then
    copied in after its files go, and the step holds the new weights; nothing is marked damaged
    for a later prune to take."""
    cfg = {"run_name": "exp", "backends": {"dav": {"type": "webdav", **options(webdav_server)}},
           "roles": {"resume": {"backends": ["dav"], "every_n_steps": 1, "keep_last": 2, "format": "dcp"}}}
    model, opt = make_model()
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as ck:
        for step in (1, 2):
            train_step(model, opt)
            ck.save(step=step, model=model, optimizer=opt)
        train_step(model, opt)
        ck.save(step=2, model=model, optimizer=opt, force=True)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        train_step(model, opt)
        ck.save(step=3, model=model, optimizer=opt)
        assert [r.step for r in ck.list_checkpoints()] == [3, 2]
    fresh, fresh_opt = make_model(seed=7)
    with CheckpointManager.from_config(cfg, plugin_manager=pm) as again:
        assert again.restore(model=fresh, optimizer=fresh_opt, step=2).step == 2
    assert_same_state(fresh.state_dict(), expected)


def test_the_command_line_finds_the_type_and_shows_the_host(webdav_dist, webdav_server, password, tmp_path,
                                                            capsys, monkeypatch):
    monkeypatch.delenv("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert cli_main(["backends", "--json"]) == 0
    types = {row["type"]: row for row in json.loads(capsys.readouterr().out)}
    assert types["webdav"]["distribution"].startswith("ckptkit-webdav"), types["webdav"]

    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps({"run_name": "exp", "backends": {"dav": {"type": "webdav", **options(webdav_server)}},
                               "roles": {"resume": {"backends": ["dav"]}}}))
    assert cli_main(["check", str(cfg), "--probe", "--json"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out)["routes"][0]
    assert row["location"].startswith(f"{webdav_server}/ckpts-"), row
    assert set(row["probe"].values()) == {"ok"}, row
    assert PASSWORD not in out


def test_plain_filebackend_on_webdav_fails_its_first_save_with_409_which_the_example_avoids(webdav_server, password):
    # Why the example declares needs_folders: webdav4 does not make a file's folder.
    from webdav4.fsspec import WebdavFileSystem

    fs = WebdavFileSystem(webdav_server, auth=(USER, PASSWORD), skip_instance_cache=True)
    plain = FileBackend("plain", fs, f"ckpts-{uuid.uuid4().hex[:10]}")
    with pytest.raises(BackendError, match="409"):
        plain.save_resume(run_name="r", step=1, payload=small_payload(1))


def test_bad_options_name_the_key(pm, webdav_server, password, monkeypatch):
    cls = pm.backend_types["webdav"].cls
    with pytest.raises(ckptkit.ConfigError, match=r"backends\.dav\.path: credentials do not belong"):
        cls.from_config("dav", {"path": f"http://{USER}:{PASSWORD}@127.0.0.1/x"})
    with pytest.raises(ckptkit.ConfigError, match=r"backends\.dav\.path: .* names no folder"):
        cls.from_config("dav", {"path": webdav_server})
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(ckptkit.ConfigError, match=rf"backends\.dav\.password_env: .*{PASSWORD_ENV} is not set"):
        cls.from_config("dav", options(webdav_server))


class TestWebdavConformance(ResumeBackendTests):
    """ckptkit's storage contract, proved for the example against the real server."""

    @pytest.fixture
    def backend(self, pm, webdav_server, password):
        cls = pm.backend_types["webdav"].cls
        backend = cls.from_config("dav", options(webdav_server, retry={"attempts": 3, "backoff_s": 0.01}))
        assert isinstance(backend.retry, RetryPolicy) and backend.retry.attempts == 3
        return backend


class CuttingProxy:
    """A TCP proxy in front of the server. Once ``cut`` is set, the first PUT whose path contains
    it is forwarded with half its body, then the connection drops and every later connection is
    refused until ``down`` is cleared: a network lost in the middle of an upload, for good."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.cut: str | None = None
        self.down = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                method, path = head.split(b"\r\n", 1)[0].split(b" ")[:2]
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buf) < length:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                if method == b"PUT" and self.cut and self.cut.encode() in path:
                    self.down = True
                    upstream.sendall(head + b"\r\n\r\n" + body[: length // 2])
                    return
                upstream.sendall(head + b"\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self._closing = True
        self.listener.close()


def test_a_manifest_upload_cut_off_by_the_network_leaves_a_leftover_not_a_truncated_manifest(
        pm, webdav_server, password):
    cls = pm.backend_types["webdav"].cls
    proxy = CuttingProxy(int(webdav_server.rsplit(":", 1)[1]))
    try:
        folder = f"ckpts-{uuid.uuid4().hex[:10]}"
        opts = {"username": USER, "password_env": PASSWORD_ENV, "retry": {"attempts": 2, "backoff_s": 0.01}}
        training = cls.from_config("dav", {"path": f"http://127.0.0.1:{proxy.port}/{folder}", **opts})
        for step in (1, 2):  # made beforehand, so that only the commit differs between stores
            training.fs.makedirs(f"{folder}/r/step-000000000{step}", exist_ok=True)
        training.save_resume(run_name="r", step=1, payload=small_payload(1))
        proxy.cut = "manifest.json"
        with pytest.raises(BackendError, match="step-0000000002"):
            training.save_resume(run_name="r", step=2, payload=small_payload(2))
        assert proxy.down, "the manifest's upload was cut off"
    finally:
        proxy.close()

    # The next process, once the server is reachable again.
    after = cls.from_config("dav", {"path": f"{webdav_server}/{folder}", **opts})
    names = after.fs.ls(f"{folder}/r/step-0000000002", detail=False)
    assert "manifest.json" not in [n.rsplit("/", 1)[-1] for n in names], names
    assert [r.step for r in after.list_checkpoints(run_name="r")] == [1]
    after.leftover_grace_s = 0
    would = after.prune(run_name="r", keep_last=1, protected_steps=frozenset(), dry_run=True, counted_steps=None)
    assert [(r.role, r.path.rsplit("/", 1)[-1]) for r in would] == [("leftover", "step-0000000002")]
