"""Restoring from S3 while reads of the newest checkpoint fail (a fault proxy in front of moto).

A read that keeps failing past the retry budget makes ``restore`` fall back to the next older
committed checkpoint, with a warning naming the skipped one; a read that fails once and then
recovers is retried and the newest checkpoint is restored without any warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ckptkit

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
ATTEMPTS = 2


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def manager(pm, options: dict) -> ckptkit.CheckpointManager:
    roles = {"resume": {"backends": ["archive"], "every_n_steps": 1, "keep_last": 3}}
    return ckptkit.CheckpointManager.from_config({"backends": {"archive": options}, "roles": roles},
                                                 run_name="run", plugin_manager=pm())


def assert_same_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert list(got_sd) == list(want_sd)
    for key in want_sd:
        assert torch.equal(got_sd[key], want_sd[key]), key


def fault(proxy, *args, **kwargs):
    """A ``Fault`` added to the proxy (plugins/conftest.py is not importable by name here)."""
    return proxy.add(type(proxy).__init__.__globals__["Fault"](*args, **kwargs))


def state_get(step: int):
    """Matches a GET of ``state.pt`` of one step (path-style addressing: /bucket/key?query)."""
    suffix = f"/ckpts/run/step-{step:010d}/state.pt"
    return lambda method, path: method == "GET" and path.split("?")[0].endswith(suffix)


@pytest.fixture
def two_checkpoints(pm, s3_backend_options):
    """Steps 10 and 20 committed on S3, written straight to moto (no proxy)."""
    writer = manager(pm, s3_backend_options())
    for step in (10, 20):
        writer.save(step=step, model=model(step))
    assert [r.step for r in writer.list_checkpoints()] == [20, 10]
    # The two states differ, so restoring the wrong one cannot pass for the right one.
    assert not torch.equal(model(10)[0].weight, model(20)[0].weight)


def reader(pm, s3_backend_options, proxy) -> ckptkit.CheckpointManager:
    opts = s3_backend_options(
        endpoint=proxy.url,
        storage_options={"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 0}},
                         "key": KEY_ID, "secret": SECRET},
        retry={"attempts": ATTEMPTS, "backoff_s": 0.01, "max_backoff_s": 0.02})
    return manager(pm, opts)


def test_newest_unreadable_past_the_retry_budget_is_not_restored_past(
        pm, s3_backend_options, two_checkpoints, make_fault_proxy, moto_port, bucket):
    """503 on every read of the newest state, through the retries: it may be intact, so the
    older checkpoint is not restored (training would save over the newer step); once the store
    delivers, the newest is."""
    proxy = make_fault_proxy(moto_port)
    broken = fault(proxy, state_get(20), status=503, times=None)
    m = model(99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ckptkit.StorageUnavailableError) as err:
            reader(pm, s3_backend_options, proxy).restore(model=m)

    newest, older = (f"s3://{bucket}/ckpts/run/step-{s:010d}" for s in (20, 10))
    assert_same_state(m, model(99))
    # Every read of step 20's state was spoiled, and it was tried as often as the policy allows.
    assert broken.hits == ATTEMPTS, proxy.requests
    # The older checkpoint's state was not read.
    assert not any(p.split("?")[0].endswith("step-0000000010/state.pt") for meth, p in proxy.requests if meth == "GET")
    text = str(err.value)
    assert f"reading {newest}/state.pt: gave up after {ATTEMPTS} attempts" in text, text
    assert f"{older} was not read: the store did not deliver a newer checkpoint through every retry, and that one may be intact" \
        in text, text
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for blob in [text, *runtime]:
        assert SECRET not in blob and KEY_ID not in blob
    proxy.clear()
    restored = reader(pm, s3_backend_options, proxy).restore(model=m)
    assert (restored.step, restored.ref.uri) == (20, newest)
    assert_same_state(m, model(20))


def test_newest_read_that_recovers_is_restored_without_a_warning(
        pm, s3_backend_options, two_checkpoints, make_fault_proxy, moto_port, bucket):
    proxy = make_fault_proxy(moto_port)
    flaky = fault(proxy, state_get(20), status=503, times=1)
    m = model(99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = reader(pm, s3_backend_options, proxy).restore(model=m)

    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert flaky.hits == 1  # the fault did fire: the read was retried, not skipped
    assert restored is not None
    assert (restored.step, restored.ref.uri) == (20, f"s3://{bucket}/ckpts/run/step-0000000020")
    assert restored.skipped == ()
    assert_same_state(m, model(20))
    # Step 10 was never needed.
    assert not any("step-0000000010/state.pt" in p for _, p in proxy.requests)


def test_a_state_damaged_on_its_way_is_read_again_not_passed_over(
        pm, s3_backend_options, two_checkpoints, make_fault_proxy, moto_port, bucket):
    """One bit flipped in flight: botocore's check of the answer's checksum raised
    FlexibleChecksumError, which ckptkit blamed on the s3 plugin ("report it to the plugin's
    authors") and restore failed. It is a read to make again; one that never comes whole leaves
    the step unread, not damaged, and no older step is restored past it."""
    proxy = make_fault_proxy(moto_port)
    flipped = fault(proxy, state_get(20), flip=True, times=1)
    m = model(99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = reader(pm, s3_backend_options, proxy).restore(model=m)
    assert flipped.hits == 1
    assert (restored.step, restored.skipped) == (20, ())
    assert_same_state(m, model(20))
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    proxy.clear()
    fault(proxy, state_get(20), flip=True, times=None)
    with pytest.raises(ckptkit.StorageUnavailableError, match=f"gave up after {ATTEMPTS} attempts"):
        reader(pm, s3_backend_options, proxy).restore(model=model(99))
