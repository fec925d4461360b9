"""A state split over several objects (roles.resume.write_threads), uploaded at the same time to a real S3 endpoint."""

from __future__ import annotations

import pytest
import s3fs
import torch

import ckptkit
from ckptkit.errors import SaveError

DENIED = b"<Error><Code>AccessDenied</Code><Message>injected</Message></Error>"


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(3, 64)).sum().backward()
    opt.step()
    return m, opt


def manager(pm, options, threads: int):
    roles = {"resume": {"backends": ["archive"], "every_n_steps": 1, "keep_last": 3, "write_threads": threads}}
    return ckptkit.CheckpointManager.from_config({"backends": {"archive": options}, "roles": roles},
                                                 run_name="run", plugin_manager=pm())


def keys(endpoint: str, path: str) -> list[str]:
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    try:
        return sorted(p[len(path) + 1:] for p in fs.find(path))
    except FileNotFoundError:
        return []


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            same(a[k], b[k])
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k])
        else:
            assert a[k] == b[k]


def test_a_split_state_round_trips_bit_identical(pm, s3_backend_options, s3_endpoint, bucket):
    m, opt = model_and_optimizer(0)
    ck = manager(pm, s3_backend_options(), 4)
    ck.save(step=1, model=m, optimizer=opt)
    ck.close()
    assert keys(s3_endpoint, f"{bucket}/ckpts/run/step-0000000001") == [
        "manifest.json", "state-00-of-04.pt", "state-01-of-04.pt", "state-02-of-04.pt",
        "state-03-of-04.pt"]
    m2, opt2 = model_and_optimizer(5)
    ck = manager(pm, s3_backend_options(), 1)
    assert ck.restore(model=m2, optimizer=opt2).step == 1
    same(m2.state_dict(), m.state_dict())
    same(opt2.state_dict(), opt.state_dict())
    ck.close()


def test_one_failed_part_commits_nothing_and_the_previous_checkpoint_restores(
        pm, s3_backend_options, make_fault_proxy, moto_port, s3_endpoint, bucket):
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url)
    ck = manager(pm, opts, 4)
    m, opt = model_and_optimizer(0)
    ck.save(step=1, model=m, optimizer=opt)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(3, 64)).sum().backward()
    opt.step()
    FaultT = type(proxy).__init__.__globals__["Fault"]
    denied = proxy.add(FaultT(lambda method, path: method == "PUT" and "state-02-of-04.pt" in path,
                              status=403, body=DENIED, times=None))
    with pytest.raises(SaveError) as err:
        ck.save(step=2, model=m, optimizer=opt)
    assert denied.hits >= 1
    assert f"s3://{bucket}/ckpts/run/step-0000000002/state-02-of-04.pt" in str(err.value)
    ck.close()
    assert not [k for k in keys(s3_endpoint, f"{bucket}/ckpts/run") if k.startswith("step-0000000002")]
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    m2, opt2 = model_and_optimizer(5)
    ck = manager(pm, s3_backend_options(), 4)
    assert ck.restore(model=m2, optimizer=opt2).step == 1
    same(m2.state_dict(), before)
    ck.close()
