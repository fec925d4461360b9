"""Every config in docs/quickstart.md passes `ckptkit check`, offline, so the docs cannot drift
from what the config loader and the backends accept."""

import json
import re
import socket
from pathlib import Path

import pytest
import yaml

from ckptkit.cli import main

pytest.importorskip("ckptkit_s3", reason="the quickstart configs need the s3 plugin (tox installs it)")
pytest.importorskip("ckptkit_gcs", reason="the quickstart configs need the gcs plugin (tox installs it)")
pytest.importorskip("ckptkit_mlflow", reason="the quickstart configs need the mlflow plugin (tox installs it)")

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(QUICKSTART.read_text(encoding="utf-8")) if kind == lang]


CONFIGS = blocks("yaml")


def test_the_quickstart_covers_every_setup():
    # Guards the extraction as much as the page: a renamed fence would otherwise test nothing.
    text = "\n".join(CONFIGS)
    assert len(CONFIGS) >= 6
    for needle in ("type: s3", "endpoint_url: http", "type: gcs", "token: anon", "type: mlflow",
                   "tracking_uri: https://", "format: dcp"):
        assert needle in text, needle


def test_python_snippets_compile():
    snippets = blocks("python")
    assert len(snippets) >= 2
    for i, code in enumerate(snippets):
        compile(code, f"quickstart.md python block {i}", "exec")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Credentials present the usual way, no network: any connection off loopback fails the test."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    adc = tmp_path.parent / f"{tmp_path.name}-adc.json"  # outside the folder the test watches
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "c", "client_secret": "s",
                               "refresh_token": "r"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)

    real_connect = socket.socket.connect
    tried = []

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError(f"the quickstart test is offline: connect to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert tried == [], "ckptkit check reached for the network"


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_quickstart_config_passes_check(index, offline, capsys):
    text = CONFIGS[index]
    config = yaml.safe_load(text)
    (offline / "ckptkit.yaml").write_text(text)
    rc = main(["check", "ckptkit.yaml", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, f"quickstart.md yaml block {index}:\n{text}\n{err}"
    routes = {(r["role"], r["backend"]) for r in json.loads(out)["routes"]}
    declared = {(role, name) for role, spec in config["roles"].items() for name in spec["backends"]}
    assert routes == declared
    assert sorted(p.name for p in offline.iterdir()) == ["ckptkit.yaml"]  # check alone creates nothing
