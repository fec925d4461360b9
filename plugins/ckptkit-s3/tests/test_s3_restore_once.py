"""A restore from S3 downloads each file of the checkpoint once, checking it on the way, and
applies nothing of a file that does not match its manifest.

The bytes are counted by a proxy in front of the moto server: what the server sent back for
each object.
"""

from __future__ import annotations

import collections
import json

import pytest
import s3fs
import torch

import ckptkit
from ckptkit import CorruptCheckpointError

STEP = 5


def model(seed: int):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(4, 128)).pow(2).mean().backward()
    opt.step()
    return m, opt


def manager(pm, options: dict, fmt: str) -> ckptkit.CheckpointManager:
    roles = {"resume": {"backends": ["archive"], "every_n_steps": 1, "keep_last": 3, "format": fmt}}
    return ckptkit.CheckpointManager.from_config({"backends": {"archive": options}, "roles": roles},
                                                 run_name="run", plugin_manager=pm())


def snapshot(m, opt) -> list[torch.Tensor]:
    return [t.clone() for t in m.state_dict().values()] + [
        t.clone() for p in m.parameters() for t in opt.state[p].values() if torch.is_tensor(t)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def bytes_read(proxy, folder: str) -> dict[str, int]:
    """Bytes the server sent per file of ``folder`` (path-style addressing: /bucket/key?query)."""
    out: collections.Counter = collections.Counter()
    for method, path, n in proxy.responses:
        key = path.split("?")[0]
        if method == "GET" and f"/{folder}/" in key:
            out[key.rsplit("/", 1)[1]] += n
    return dict(out)


@pytest.fixture
def saved(pm, s3_backend_options, bucket, s3_endpoint, request):
    """A checkpoint of the requested format committed on S3, written straight to moto."""
    fmt = request.param
    m, opt = model(1)
    manager(pm, s3_backend_options(), fmt).save(step=STEP, model=m, optimizer=opt)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    folder = f"{bucket}/ckpts/run/step-{STEP:010d}"
    files = json.loads(fs.cat_file(f"{folder}/manifest.json"))["files"]
    return fmt, snapshot(m, opt), fs, folder, files


@pytest.mark.parametrize("saved", ["dcp", "torch"], indirect=True)
def test_each_file_is_downloaded_once(pm, s3_backend_options, saved, make_fault_proxy, moto_port):
    fmt, expected, _, folder, files = saved
    proxy = make_fault_proxy(moto_port)
    m, opt = model(2)
    assert not same(snapshot(m, opt), expected)
    restored = manager(pm, s3_backend_options(endpoint=proxy.url), fmt).restore(model=m, optimizer=opt)
    assert restored.step == STEP
    assert same(snapshot(m, opt), expected)
    if fmt == "dcp":
        assert {".metadata", "__0_0.distcp", "extra.pt"} <= set(files)
    read = bytes_read(proxy, f"step-{STEP:010d}")
    read.pop("manifest.json")
    assert read == {name: entry["size"] for name, entry in files.items()}


@pytest.mark.parametrize("saved", ["dcp", "torch"], indirect=True)
def test_a_flipped_byte_on_s3_is_refused_and_nothing_is_applied(pm, s3_backend_options, saved):
    fmt, _, fs, folder, files = saved
    name = "__0_0.distcp" if fmt == "dcp" else "state.pt"
    data = bytearray(fs.cat_file(f"{folder}/{name}"))
    data[len(data) // 2] ^= 0xFF  # tensor bytes: DCP and torch.load read them without complaint
    fs.pipe_file(f"{folder}/{name}", bytes(data))
    m, opt = model(2)
    before = snapshot(m, opt)
    with pytest.warns(RuntimeWarning, match=rf"{name} does not match its checksum"), \
            pytest.raises(CorruptCheckpointError, match="none could be restored"):
        manager(pm, s3_backend_options(), fmt).restore(model=m, optimizer=opt)
    assert same(snapshot(m, opt), before)


def test_a_sharded_checkpoint_without_optimizer_state_says_so(pm, s3_backend_options):
    """The plan of what to download is DCP's own, so it refuses what DCP would, before any download."""
    m, opt = model(1)
    manager(pm, s3_backend_options(), "dcp").save(step=STEP, model=m)
    m2, opt2 = model(2)
    before = snapshot(m2, opt2)
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="holds no optimizer state"):
        manager(pm, s3_backend_options(), "dcp").restore(model=m2, optimizer=opt2)
    assert same(snapshot(m2, opt2), before)


def test_a_dcp_optimizer_over_other_parameters_is_refused_before_the_shards_reach_the_model(
        pm, s3_backend_options):
    """The saved param groups are read from their small items before DCP loads any shard, so
    the model is left as it was (a trainer that catches the error does not go on from a model
    half restored)."""
    m, _ = model(0)
    head_only = torch.optim.AdamW(m[2].parameters(), lr=1e-2)
    m(torch.randn(4, 128)).pow(2).mean().backward()
    head_only.step()
    ck = manager(pm, s3_backend_options(), "dcp")
    ck.save(step=STEP, model=m, optimizer=head_only)
    ck.close()
    m2, _ = model(1)
    over_all = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    before = [t.clone() for t in m2.state_dict().values()]
    ck = manager(pm, s3_backend_options(), "dcp")
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="no parameter named 0.bias, 0.weight"):
        ck.restore(model=m2, optimizer=over_all)
    ck.close()
    assert same([t.clone() for t in m2.state_dict().values()], before)
    assert len(over_all.state) == 0
