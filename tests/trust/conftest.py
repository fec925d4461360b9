"""Fixtures of the trust suite: real S3 and GCS servers, the fault proxy, a seeded random source."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from trust.common import AWS_ENV, GCS_SERVE, LONG, SEED, FaultProxy, free_port, wait_for_port


def pytest_report_header(config):
    return f"ckptkit trust suite: {'long' if LONG else 'short'} form, CKPTKIT_TORTURE_SEED={SEED}"


@pytest.fixture
def rng(request) -> random.Random:
    """A random source per test, reproducible from the session seed and the test's id."""
    return random.Random(f"{SEED}:{request.node.nodeid}")


@pytest.fixture(scope="session", autouse=True)
def aws_env():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="session")
def servers():
    """Start server processes on free ports; each is stopped at the end of the session."""
    procs = []

    def spawn(argv_for_port) -> int:
        port = free_port()
        proc = subprocess.Popen(argv_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_for_port(port, 60, proc)
        return port

    yield spawn
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def moto_port(servers):
    pytest.importorskip("ckptkit_s3", reason="ckptkit-s3 is not installed")
    return servers(lambda p: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)])


@pytest.fixture(scope="session")
def gcs_port(servers):
    pytest.importorskip("ckptkit_gcs", reason="ckptkit-gcs is not installed")
    return servers(lambda p: [sys.executable, "-c", GCS_SERVE, str(p)])


@pytest.fixture
def make_fault_proxy():
    """A ``FaultProxy`` in front of a server port; closed after the test."""
    proxies = []

    def make(upstream_port: int) -> FaultProxy:
        p = FaultProxy(upstream_port)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()
