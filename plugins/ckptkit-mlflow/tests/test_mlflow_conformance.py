"""The conformance suite of final backends (``ckptkit.testing.FinalBackendTests``) run against the
``mlflow`` backend and a real tracking server on loopback: each test registers its own model."""

from __future__ import annotations

import uuid

import pytest

from ckptkit.testing import FinalBackendTests
from ckptkit_mlflow import MlflowBackend


class TestMlflowRegistry(FinalBackendTests):
    @pytest.fixture
    def backend(self, mlflow_server):
        uid = uuid.uuid4().hex[:8]
        built = MlflowBackend.from_config("registry", {
            "tracking_uri": mlflow_server.url, "experiment": f"conformance-{uid}",
            "registered_model_name": f"conformance_{uid}_{{algorithm}}"})
        yield built
        built.close()
