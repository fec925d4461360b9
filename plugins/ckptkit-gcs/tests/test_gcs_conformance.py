"""The gcs backend through the conformance suite, against the GCS emulator; the
listing's requests are counted by a proxy in front of it.

One bucket and one GCS client serve every test (a fresh prefix each), so that the
suite does not pay for a new client and bucket per test.
"""

from __future__ import annotations

import importlib.util
import pathlib
import uuid

import pytest

from ckptkit.testing import PLANTED_SECRET, ResumeBackendTests
from ckptkit_gcs import GCSBackend

# The fault proxy of plugins/conftest.py, which is not importable by name.
_spec = importlib.util.spec_from_file_location("ckptkit_plugin_fixtures",
                                               pathlib.Path(__file__).parents[2] / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)


@pytest.fixture(scope="module")
def counting_proxy(gcs_port):
    proxy = _fixtures.FaultProxy(gcs_port)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def shared_bucket(gcs_endpoint):
    name = f"conformance-{uuid.uuid4().hex[:12]}"
    import gcsfs

    gcsfs.GCSFileSystem(endpoint_url=gcs_endpoint, token="anon", skip_instance_cache=True).mkdir(name)
    return name


class TestGCSBackend(ResumeBackendTests):
    # One object in a single request, and one uploaded in several 1 MiB resumable chunks.
    failing_write_sizes = (1000, 3 * 2**20)

    @pytest.fixture
    def backend(self, shared_bucket, gcs_endpoint):
        return self.build(gcs_endpoint, f"gs://{shared_bucket}/{uuid.uuid4().hex[:12]}")

    @staticmethod
    def build(endpoint, path):
        return GCSBackend.from_config("archive", {
            "path": path,
            # With the instance cache on, every test's backend shares one connected client.
            "storage_options": {"endpoint_url": endpoint, "token": "anon", "skip_instance_cache": False},
            "part_size_mb": 1,
            "retry": {"attempts": 3, "backoff_s": 0.01, "max_backoff_s": 0.05}})

    @pytest.fixture
    def store_requests(self, backend, counting_proxy):
        # Only the test that counts goes through the proxy, which costs every request a hop.
        backend.fs = self.build(counting_proxy.url, f"gs://{backend.root}").fs
        return lambda: len(counting_proxy.requests)

    @pytest.fixture
    def secrets(self, backend):
        # The emulator takes no credentials; a planted one stands for a real token.
        backend.secrets = (*backend.secrets, PLANTED_SECRET)
        return (PLANTED_SECRET,)
