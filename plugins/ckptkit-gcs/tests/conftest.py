"""A real GCS JSON API for the tests: gcp-storage-emulator in its own process, on a free port."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from ckptkit.plugins import make_plugin_manager

# Without it gcsfs probes each new bucket's type over gRPC and waits 60 s for an answer.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

_SERVE = ("import sys, time\n"
          "from gcp_storage_emulator.server import create_server\n"
          "create_server('127.0.0.1', int(sys.argv[1]), in_memory=True).start()\n"
          "while True: time.sleep(3600)\n")


@pytest.fixture(scope="session")
def gcs_port(spawn_server):
    return spawn_server(lambda p: [sys.executable, "-c", _SERVE, str(p)])


@pytest.fixture(scope="session")
def gcs_endpoint(gcs_port):
    return f"http://127.0.0.1:{gcs_port}"


def gcs(endpoint: str):
    import gcsfs

    return gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon", skip_instance_cache=True)


@pytest.fixture
def bucket(gcs_endpoint):
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    gcs(gcs_endpoint).mkdir(name)
    return name


@pytest.fixture(scope="session")
def pm():
    """Builds plugin managers with the local type and the installed ckptkit-gcs dist only."""
    def make():
        manager = make_plugin_manager(autoload=False)
        manager.load_backend_entrypoints(only_dist="ckptkit-gcs")
        return manager

    return make


@pytest.fixture
def gcs_backend_options(gcs_endpoint, bucket):
    def options(prefix: str = "ckpts", endpoint: str | None = None, **extra):
        return {"type": "gcs", "path": f"gs://{bucket}/{prefix}",
                "storage_options": {"endpoint_url": endpoint or gcs_endpoint, "token": "anon"},
                "retry": {"attempts": 3, "backoff_s": 0.01, "max_backoff_s": 0.05}, **extra}

    return options
