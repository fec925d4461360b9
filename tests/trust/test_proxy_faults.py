"""Storage that fails requests, through a fault proxy in front of a real S3 server (moto).

With a fifth of all requests answered 503 or cut off, every save commits intact (the retry
policy absorbs them); with every request failing, save and restore raise typed errors within
the bound that the retry policy and the client time-outs set (held by pytest-timeout).
"""

from __future__ import annotations

import random

import pytest
import torch

import ckptkit
from ckptkit.errors import BackendError, CkptkitError, SaveError, StorageUnavailableError
from ckptkit.plugins import make_plugin_manager

from trust.common import AWS_ENV, SEED, Fault, new_bucket, trials

SAVES = trials(10, 100)
FAILING = 0.2
SHAPE = (1280, 1024)  # just over 5 MiB: two multipart parts


def model_at(step: int) -> torch.nn.Module:
    m = torch.nn.Linear(*SHAPE)
    with torch.no_grad():
        m.weight.fill_(float(step))
        m.bias.fill_(-float(step))
    return m


def s3_options(bucket: str, endpoint: str, attempts: int, **extra) -> dict:
    # botocore's own retries off, so that ckptkit's policy is what absorbs the faults.
    return {"type": "s3", "path": f"s3://{bucket}/ckpts", "part_size_mb": 5,
            "storage_options": {"endpoint_url": endpoint,
                                "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 0},
                                                  "connect_timeout": 2, "read_timeout": 10}},
            "retry": {"attempts": attempts, "backoff_s": 0.01, "max_backoff_s": 0.05}, **extra}


def manager(options: dict, keep_last: int = 3) -> ckptkit.CheckpointManager:
    cfg = {"backends": {"archive": options},
           "roles": {"resume": {"backends": ["archive"], "every_n_steps": 1, "keep_last": keep_last}}}
    return ckptkit.CheckpointManager.from_config(cfg, run_name="run", plugin_manager=make_plugin_manager())


@pytest.mark.timeout(60 + 15 * SAVES)
def test_a_fifth_of_requests_failing_every_save_commits_intact(moto_port, make_fault_proxy):
    bucket = new_bucket("s3", moto_port)
    proxy = make_fault_proxy(moto_port)
    rng = random.Random(f"{SEED}:proxy")
    failing = [proxy.add(Fault(match=lambda m, p: rng.random() < FAILING / 2, status=503, times=None)),
               proxy.add(Fault(match=lambda m, p: rng.random() < FAILING / 2, drop=True, times=None))]
    ck = manager(s3_options(bucket, proxy.url, attempts=8))
    direct = manager(s3_options(bucket, f"http://127.0.0.1:{moto_port}", attempts=1))
    committed = []
    for step in range(SAVES):
        refs = ck.save(step=step, model=model_at(step))
        assert [r.step for r in refs] == [step]
        # Read back around the proxy: the bytes the store holds are the ones that were saved.
        manifest = direct.verify(refs[0])
        assert manifest.step == step
        committed.append(step)
    ck.wait()  # the prune after the last save runs on a thread of its own
    injected = sum(f.hits for f in failing)
    print(f"\n[proxy] {len(committed)}/{SAVES} saves committed intact; {injected} of "
          f"{len(proxy.requests)} requests failed (seed {SEED})")
    assert injected > 0
    m = model_at(-1)
    restored = direct.restore(model=m)
    assert restored.step == SAVES - 1 and torch.equal(m.weight, model_at(SAVES - 1).weight)
    assert [r.step for r in direct.list_checkpoints()] == list(range(SAVES - 1, SAVES - 4, -1))
    ck.close()
    direct.close()


@pytest.fixture
def down(moto_port, make_fault_proxy):
    """A bucket holding step 1, reached through a proxy that fails every request."""
    bucket = new_bucket("s3", moto_port)
    with manager(s3_options(bucket, f"http://127.0.0.1:{moto_port}", attempts=1)) as ck:
        ck.save(step=1, model=model_at(1))
    proxy = make_fault_proxy(moto_port)
    proxy.add(Fault(match=lambda m, p: True, status=503, times=None))
    return bucket, proxy


@pytest.mark.timeout(30)
def test_all_requests_failing_save_raises_a_typed_error_naming_the_backend(down):
    bucket, proxy = down
    ck = manager(s3_options(bucket, proxy.url, attempts=2))
    with pytest.raises(SaveError) as err:
        ck.save(step=2, model=model_at(2))
    failure = err.value.failures["archive"]
    assert isinstance(failure, BackendError) and failure.backend == "archive"
    assert f"s3://{bucket}/ckpts/run/step-0000000002" in str(failure)
    assert "gave up after 2 attempts" in str(failure), failure
    assert err.value.saved == []
    for text in (str(err.value), str(failure)):
        assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in text
    ck.close()


@pytest.mark.timeout(30)
def test_all_requests_failing_restore_raises_storage_unavailable(down):
    bucket, proxy = down
    ck = manager(s3_options(bucket, proxy.url, attempts=2))
    with pytest.raises(StorageUnavailableError) as err:
        ck.restore(model=model_at(0))
    assert err.value.backend == "archive"
    assert isinstance(err.value, CkptkitError)
    assert f"s3://{bucket}/ckpts/run" in str(err.value)
    ck.close()
