"""The s3 backend through the conformance suite, against moto's S3 server; the
listing's requests are counted by a proxy in front of it.

One bucket and one S3 client serve every test (a fresh prefix each): a new client's
first request costs seconds here, which per test would dominate the suite.
"""

from __future__ import annotations

import importlib.util
import pathlib
import uuid

import pytest
import s3fs

from ckptkit.testing import ResumeBackendTests
from ckptkit_s3 import S3Backend

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"

# The fault proxy of plugins/conftest.py, which is not importable by name.
_spec = importlib.util.spec_from_file_location("ckptkit_plugin_fixtures",
                                               pathlib.Path(__file__).parents[2] / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)


@pytest.fixture(scope="module")
def counting_proxy(moto_port):
    proxy = _fixtures.FaultProxy(moto_port)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def shared_bucket(s3_endpoint):
    name = f"conformance-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(name)
    return name


class TestS3Backend(ResumeBackendTests):
    # One object in a single request, and one cut into 5 MiB parts (a multipart upload).
    failing_write_sizes = (1000, 6 * 2**20)

    @pytest.fixture
    def backend(self, shared_bucket, s3_endpoint):
        return self.build(s3_endpoint, f"s3://{shared_bucket}/{uuid.uuid4().hex[:12]}")

    @staticmethod
    def build(endpoint, path):
        return S3Backend.from_config("archive", {
            "path": path,
            # With the instance cache on, every test's backend shares one connected client.
            "storage_options": {"endpoint_url": endpoint, "key": KEY_ID, "secret": SECRET,
                                "skip_instance_cache": False},
            "part_size_mb": 5,
            "retry": {"attempts": 3, "backoff_s": 0.01, "max_backoff_s": 0.05}})

    @pytest.fixture
    def store_requests(self, backend, counting_proxy):
        # Only the test that counts goes through the proxy, which costs every request a hop.
        backend.fs = self.build(counting_proxy.url, f"s3://{backend.root}").fs
        return lambda: len(counting_proxy.requests)

    @pytest.fixture
    def secrets(self):
        return (SECRET, KEY_ID)

    def unfinished_uploads(self, backend):
        bucket, prefix = backend.root.split("/", 1)
        out = backend.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        return [u["Key"] for u in out.get("Uploads", [])]
