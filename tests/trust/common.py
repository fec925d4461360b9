"""What the trust suite's tests share: how long to torture, the random seed, server helpers.

Every test here takes its number of trials from ``trials(short, long)``: the short form runs in
the default suite, the long form when ``CKPTKIT_TORTURE=long`` (``tox -e torture``).
``CKPTKIT_TORTURE_SEED`` fixes the random choices (kill delays, failing requests) of a run.
Imported as ``trust.common`` (``tests`` is on the path), so that one seed holds for all.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import uuid

from hypothesis import HealthCheck, Phase, settings

LONG = os.environ.get("CKPTKIT_TORTURE", "").strip().lower() == "long"
SEED = int(os.environ.get("CKPTKIT_TORTURE_SEED") or random.SystemRandom().randrange(2**32))


def trials(short: int, long: int) -> int:
    return long if LONG else short


# Sequences of up to 15 steps in the short form, 50 (hypothesis's default) in the long one. The
# short form does not shrink a failure (that can take minutes in CI); rerun it with the blob it
# prints, or with CKPTKIT_TORTURE=long, for a minimal example.
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ckptkit-short", max_examples=50, stateful_step_count=15,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)
settings.register_profile("ckptkit-long", max_examples=1000, stateful_step_count=50, **_COMMON)
PROFILE = settings.get_profile("ckptkit-long" if LONG else "ckptkit-short")

# The fault proxy and port helpers of the plugin suites; their conftest is not importable by
# name from here, so it is loaded from its file.
_spec = importlib.util.spec_from_file_location(
    "ckptkit_plugins_conftest", pathlib.Path(__file__).parents[2] / "plugins" / "conftest.py")
plugin_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plugin_fixtures)
FaultProxy = plugin_fixtures.FaultProxy
Fault = plugin_fixtures.Fault
free_port = plugin_fixtures.free_port
wait_for_port = plugin_fixtures.wait_for_port

# Distinctive dummy credentials for moto.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
           "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY",
           "AWS_DEFAULT_REGION": "us-east-1"}
# Without it gcsfs probes each new bucket's type over gRPC and waits 60 s for an answer.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

GCS_SERVE = ("import sys, time\n"
             "from gcp_storage_emulator.server import create_server\n"
             "create_server('127.0.0.1', int(sys.argv[1]), in_memory=True).start()\n"
             "while True: time.sleep(3600)\n")


def new_bucket(kind: str, port: int) -> str:
    """A fresh, empty bucket on the S3 (``kind="s3"``) or GCS server listening on ``port``."""
    name = f"trust-{uuid.uuid4().hex[:12]}"
    if kind == "s3":
        import s3fs

        s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}", skip_instance_cache=True).mkdir(name)
    else:
        import gcsfs

        gcsfs.GCSFileSystem(endpoint_url=f"http://127.0.0.1:{port}", token="anon",
                            skip_instance_cache=True).mkdir(name)
    return name
