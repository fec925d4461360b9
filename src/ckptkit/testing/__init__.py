"""The conformance suite for backends: the storage contract as tests a backend inherits.

In the manner of fsspec's abstract tests, a backend author subclasses the suite in a test module
and provides a fixture that builds the backend::

    import pytest
    from ckptkit.plugin import RetryPolicy
    from ckptkit.testing import ResumeBackendTests

    class TestMyBackend(ResumeBackendTests):
        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend("mine", ..., retry=RetryPolicy(attempts=3, backoff_s=0.01))

A final backend that keeps no files (a model registry) subclasses ``FinalBackendTests`` the
same way. This package imports pytest; ckptkit itself never imports it.
"""

try:
    import pytest
except ImportError as exc:  # pragma: no cover - the extra is what brings it
    raise ImportError('ckptkit.testing is a pytest suite and needs pytest: pip install "ckptkit[testing]"') from exc

# The suite's assertions explain themselves in a failure report only when pytest rewrites them.
pytest.register_assert_rewrite("ckptkit.testing.suite")

from .faults import Call, Fault, WrappedFileSystem, permanent, transient
from .suite import PLANTED_SECRET, FinalBackendTests, ResumeBackendTests, call_hook, payload

__all__ = ["Call", "Fault", "FinalBackendTests", "PLANTED_SECRET", "ResumeBackendTests", "WrappedFileSystem", "call_hook",
           "payload", "permanent", "transient"]
