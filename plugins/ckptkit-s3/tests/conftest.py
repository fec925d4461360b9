"""A real S3 endpoint for the tests: moto's server in its own process, on a free port."""

from __future__ import annotations

import sys
import uuid

import pytest

from ckptkit.plugins import make_plugin_manager


@pytest.fixture(scope="session", autouse=True)
def aws_env():
    """Dummy credentials for moto; distinctive values so tests can look for leaks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="session")
def moto_port(spawn_server):
    return spawn_server(lambda p: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)])


@pytest.fixture(scope="session")
def s3_endpoint(moto_port):
    return f"http://127.0.0.1:{moto_port}"


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket for one test."""
    import s3fs

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir(name)
    return name


@pytest.fixture(scope="session")
def pm():
    """Builds plugin managers with the local type and the installed ckptkit-s3 dist only."""
    def make():
        manager = make_plugin_manager(autoload=False)
        manager.load_backend_entrypoints(only_dist="ckptkit-s3")
        return manager

    return make


@pytest.fixture
def s3_backend_options(s3_endpoint, bucket):
    def options(prefix: str = "ckpts", endpoint: str | None = None, **extra):
        storage = {"endpoint_url": endpoint or s3_endpoint}
        storage.update(extra.pop("storage_options", {}))
        return {"type": "s3", "path": f"s3://{bucket}/{prefix}", "storage_options": storage,
                "retry": {"attempts": 3, "backoff_s": 0.01, "max_backoff_s": 0.05}, **extra}

    return options
