"""The s3 backend against a real S3 endpoint (moto's server on loopback)."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import tracemalloc

import pytest
import s3fs
import torch

import ckptkit
from ckptkit.errors import BackendError, ConfigError, SaveError
from ckptkit.manifest import MANIFEST_NAME

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def model(seed: int = 0, n: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.ReLU(), torch.nn.Linear(n, 4))


def manager(pm, backends: dict, resume: list[str], final: list[str] | None = None, keep_last: int = 2,
            run_name: str = "run", fmt: str = "torch"):
    roles = {"resume": {"backends": resume, "every_n_steps": 1, "keep_last": keep_last, "format": fmt}}
    if final:
        roles["final"] = {"backends": final}
    return ckptkit.CheckpointManager.from_config({"backends": backends, "roles": roles},
                                                 run_name=run_name, plugin_manager=pm())


def s3(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def keys(fs: s3fs.S3FileSystem, path: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(p[len(path) + 1:] for p in fs.find(path))
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("path, message", [
    ("gs://bucket/x", "has scheme gs://"),
    ("bucket/x", "is not a s3:// URI"),
    ("s3:///x", "names no bucket"),
    ("s3://", "names no bucket"),
    ("s3://Bad_Bucket!/x", "is not a valid bucket name"),
    ("s3://bucket/a/../b", "'..' segments"),
    ("s3://bucket/x?versionId=1", "no query"),
    ("s3://bucket/team[12]", "which s3:// clients take for a pattern"),
    ("s3://bucket/t*", "which s3:// clients take for a pattern"),
    (42, "must be a s3:// URI"),
])
def test_malformed_path_is_a_config_error_naming_the_key(pm, path, message):
    with pytest.raises(ConfigError) as err:
        manager(pm, {"archive": {"type": "s3", "path": path}}, ["archive"])
    assert "backends.archive.path" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("extra, key", [
    ({"storage_option": {}}, "backends.archive.storage_option"),
    ({"storage_options": "endpoint"}, "backends.archive.storage_options"),
    ({"retry": {"attempts": 0}}, "backends.archive.retry.attempts"),
    ({"retry": {"tries": 3}}, "backends.archive.retry.tries"),
    ({"part_size_mb": 1}, "backends.archive.part_size_mb"),
    ({"leftover_grace_s": -1}, "backends.archive.leftover_grace_s"),
    ({"timeout_s": 0}, "backends.archive.timeout_s"),
    ({"request_retries": -1}, "backends.archive.request_retries"),
    ({"request_retries": 1.5}, "backends.archive.request_retries"),
])
def test_bad_options_name_their_key(pm, extra, key):
    with pytest.raises(ConfigError) as err:
        manager(pm, {"archive": {"type": "s3", "path": "s3://bucket/x", **extra}}, ["archive"])
    assert key in str(err.value)


@pytest.mark.parametrize("storage_options, key, message", [
    # s3fs hands a key it does not know to the client's session at the first request, whose
    # TypeError then read as a store that does not answer ("restore again once it answers").
    ({"endpointurl": "http://127.0.0.1:9"}, "backends.archive.storage_options.endpointurl",
     "not an option of s3fs.S3FileSystem (did you mean endpoint_url?)"),
    # botocore refuses every request of such a client, which read as a store not answering.
    ({"endpoint_url": "http://alice:s3cr3t@127.0.0.1:9"}, "backends.archive.storage_options.endpoint_url",
     "credentials (user:password@) do not belong in a URL"),
    ({"client_kwargs": {"endpoint_url": "http://alice:s3cr3t@127.0.0.1:9"}},
     "backends.archive.storage_options.client_kwargs.endpoint_url", "credentials (user:password@) do not belong"),
])
def test_storage_options_the_client_would_fail_on_later_are_refused_by_name(pm, storage_options, key, message):
    with pytest.raises(ConfigError) as err:
        manager(pm, {"archive": {"type": "s3", "path": "s3://bucket/x", "storage_options": storage_options}},
                ["archive"])
    assert str(err.value).startswith(f"{key}: {message}"), err.value
    assert "s3cr3t" not in str(err.value)


def test_two_resume_backends_on_one_prefix_of_one_store_are_refused(pm):
    one = {"type": "s3", "path": "s3://bucket/ckpts", "storage_options": {"endpoint_url": "http://127.0.0.1:9"}}
    with pytest.raises(ConfigError) as err:
        manager(pm, {"archive": one, "again": {**one, "path": "s3://bucket/ckpts/"}}, ["archive", "again"])
    assert str(err.value).startswith("backends 'archive' and 'again' both keep resume checkpoints in one place "
                                     "(s3://bucket/ckpts)"), err.value
    # The same bucket and prefix on another endpoint is another store.
    other = {**one, "storage_options": {"endpoint_url": "http://127.0.0.1:10"}}
    manager(pm, {"archive": one, "again": other}, ["archive", "again"]).close()


@pytest.mark.parametrize("versioning", ["Enabled", "Suspended", None])
def test_a_prune_in_a_versioned_bucket_warns_once_that_it_frees_nothing(pm, s3_backend_options, s3_endpoint, bucket,
                                                                       caplog, versioning):
    """Suspended versioning deletes for good what is written after it: nothing to tell."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    for status in ("Enabled", versioning) if versioning else ():
        fs.call_s3("put_bucket_versioning", Bucket=bucket, VersioningConfiguration={"Status": status})
    versioned = versioning == "Enabled"
    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=1)
    with caplog.at_level(logging.WARNING, logger="ckptkit_s3"):
        for step in range(4):
            ck.save(step=step, model=model())
        ck.close()
    assert [r.step for r in manager(pm, {"archive": s3_backend_options()}, ["archive"]).list_checkpoints()] == [3]
    told = [r.getMessage() for r in caplog.records if "versioning" in r.getMessage()]
    if not versioned:
        assert told == []
        if versioning == "Suspended":  # and so it is: the pruned step is gone
            versions = fs.call_s3("list_object_versions", Bucket=bucket, Prefix="ckpts/run/step-0000000000/")
            assert not versions.get("Versions"), versions
        return
    assert told == [f"backend 'archive': bucket {bucket} has versioning enabled: what a prune deletes stays in it as "
                    "noncurrent versions, billed until they expire, and ckptkit leaves them. Add a lifecycle rule "
                    f"with NoncurrentVersionExpiration to the bucket (or to the prefix s3://{bucket}/ckpts), or keep "
                    "checkpoints in a bucket without versioning"]
    versions = fs.call_s3("list_object_versions", Bucket=bucket, Prefix="ckpts/run/step-0000000000/")
    assert versions.get("Versions"), "what the warning says: the pruned step is still there, as versions"


def test_credentials_are_not_needed_in_the_config(pm, s3_backend_options, s3_endpoint, bucket):
    # The env chain (AWS_ACCESS_KEY_ID/...) supplies them; the YAML names only the endpoint.
    opts = s3_backend_options()
    assert set(opts["storage_options"]) == {"endpoint_url"}
    ck = manager(pm, {"archive": opts}, ["archive"])
    assert ck.save(step=0, model=model())[0].uri == f"s3://{bucket}/ckpts/run/step-0000000000"


def test_save_prune_restore_cycle_and_final_prefix(pm, s3_backend_options, s3_endpoint, bucket):
    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], final=["archive"], keep_last=2)
    m = model(1)
    opt = torch.optim.AdamW(m.parameters())
    for step in range(5):
        m(torch.randn(3, 64)).sum().backward()
        opt.step()
        refs = ck.save(step=step, model=m, optimizer=opt, epoch=step // 2, metrics={"loss": 1.0 / (step + 1)},
                       extra={"note": {"step": step}})
        assert [r.backend for r in refs] == ["archive"]
    ck.finalize(model=m, step=4, epoch=2, metrics={"loss": 0.2})
    fs = s3(s3_endpoint)
    assert keys(fs, f"{bucket}/ckpts/run") == [
        "final/final_model.pt", "final/manifest.json",
        "step-0000000003/extra.pt", "step-0000000003/manifest.json", "step-0000000003/state.pt",
        "step-0000000004/extra.pt", "step-0000000004/manifest.json", "step-0000000004/state.pt",
    ]
    manifest = json.loads(fs.cat_file(f"{bucket}/ckpts/run/step-0000000004/{MANIFEST_NAME}"))
    assert manifest["step"] == 4 and manifest["epoch"] == 2 and manifest["metrics"] == {"loss": 0.2}
    assert manifest["files"]["state.pt"]["size"] == fs.size(f"{bucket}/ckpts/run/step-0000000004/state.pt")

    m2, fresh = model(2), None
    opt2 = torch.optim.AdamW(m2.parameters())
    fresh = manager(pm, {"archive": s3_backend_options()}, ["archive"])
    restored = fresh.restore(model=m2, optimizer=opt2)
    assert restored.step == 4 and restored.epoch == 2 and restored.extra == {"note": {"step": 4}}
    assert restored.ref.uri == f"s3://{bucket}/ckpts/run/step-0000000004"
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_the_training_behind_of_two_writing_one_run_is_stopped(pm, s3_backend_options, s3_endpoint, bucket):
    """Seen in the listing the prune after each save makes anyway: no request more per save."""
    first = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    for step in range(3):
        first.save(step=step, model=model(step))  # each step's state its own, as in training
    second = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    assert second.restore(model(99)).step == 2
    first.save(step=3, model=model(3))
    first.save(step=4, model=model(4))
    second.save(step=3, model=model(103))
    second.wait()
    with pytest.raises(ckptkit.RunConflictError, match="holds step 4.*another training is writing the same run"):
        second.save(step=4, model=model(104))
    assert first.save(step=5, model=model(5))  # its prune finds its step 3 saved again by the other
    first.wait()
    with pytest.raises(ckptkit.RunConflictError, match="holds step 3 saved again, not by this training"):
        first.save(step=6, model=model(6))
    fs = s3(s3_endpoint)
    assert [k.split("/")[0] for k in keys(fs, f"{bucket}/ckpts/run") if k.endswith(MANIFEST_NAME)] == [
        "step-0000000003", "step-0000000004", "step-0000000005"]
    first.close()
    second.close()


def test_remote_only_resume_skips_a_corrupt_newest(pm, s3_backend_options, s3_endpoint, bucket):
    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    for step in (10, 20):
        ck.save(step=step, model=model(step))
    fs = s3(s3_endpoint)
    fs.pipe_file(f"{bucket}/ckpts/run/step-0000000020/state.pt", b"not a checkpoint")
    m = model(99)
    with pytest.warns(RuntimeWarning, match="step-0000000020"):
        restored = manager(pm, {"archive": s3_backend_options()}, ["archive"]).restore(model=m)
    assert restored.step == 10
    assert torch.equal(m[0].weight, model(10)[0].weight)


@pytest.mark.parametrize("planted", ["oversized", "empty"])
def test_a_manifest_too_large_or_empty_is_skipped_without_reading_it_whole(pm, s3_backend_options, s3_endpoint,
                                                                            bucket, planted):
    """An S3 manifest was read whole and then parsed: 100 MB planted there took ten times that
    in the trainer's memory (the local backend stopped at 64 MiB)."""
    from ckptkit.storage import MANIFEST_MAX

    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    for step in (10, 20):
        ck.save(step=step, model=model(step))
    ck.close()
    body = b" " * (MANIFEST_MAX + 1) if planted == "oversized" else b""
    s3(s3_endpoint).pipe_file(f"{bucket}/ckpts/run/step-0000000020/{MANIFEST_NAME}", body)
    m = model(99)
    told = "larger than any manifest ckptkit writes" if planted == "oversized" else "not a readable manifest"
    with pytest.warns(RuntimeWarning, match=f"step-0000000020.*{told}"):
        restored = manager(pm, {"archive": s3_backend_options()}, ["archive"]).restore(model=m)
    assert restored.step == 10


def _oversized(fs, folder: str, name: str) -> int:
    """Replace file ``name`` of a committed checkpoint with 8 MiB; the size its manifest lists."""
    listed = json.loads(fs.cat_file(f"{folder}/{MANIFEST_NAME}"))["files"][name]["size"]
    fs.pipe_file(f"{folder}/{name}", b"x" * (8 * 2**20))
    return listed


def _copied_sizes(monkeypatch, module) -> list[int]:
    """The sizes ``module``'s calls of ``copy_hashed`` copy, as they happen."""
    copied: list[int] = []
    real = module.copy_hashed

    def counted(*args, **kwargs):
        size, digest = real(*args, **kwargs)
        copied.append(size)
        return size, digest

    monkeypatch.setattr(module, "copy_hashed", counted)
    return copied


def test_an_object_larger_than_its_manifest_says_is_downloaded_no_further_than_that(
        pm, s3_backend_options, s3_endpoint, bucket, monkeypatch):
    """A state file is downloaded into a scratch folder before its size is compared: an object
    far larger than its manifest lists was copied whole, onto the trainer's disk."""
    import ckptkit.reading

    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    for step in (10, 20):
        ck.save(step=step, model=model(step))
    ck.close()
    listed = _oversized(s3(s3_endpoint), f"{bucket}/ckpts/run/step-0000000020", "state.pt")
    copied = _copied_sizes(monkeypatch, ckptkit.reading)
    with pytest.warns(RuntimeWarning, match=f"step-0000000020.*state.pt has {listed + 1} bytes"):
        restored = manager(pm, {"archive": s3_backend_options()}, ["archive"]).restore(model=model(99))
    assert restored.step == 10
    assert max(copied) == listed + 1


def test_a_file_larger_than_its_manifest_says_is_fetched_no_further_than_that(
        pm, s3_backend_options, s3_endpoint, bucket, tmp_path, monkeypatch):
    """restore_files streams each file into the folder it fills: the same bound as a download."""
    import ckptkit.manager

    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    for step in (10, 20):
        own = tmp_path / f"own-{step}"
        own.mkdir()
        (own / "trainer_state.json").write_text(json.dumps({"step": step}))
        ck.save_files(step=step, files=own, force=True)
    ck.close()
    listed = _oversized(s3(s3_endpoint), f"{bucket}/ckpts/run/step-0000000020", "trainer_state.json")
    copied = _copied_sizes(monkeypatch, ckptkit.manager)
    with pytest.warns(RuntimeWarning, match="step-0000000020"):
        info = manager(pm, {"archive": s3_backend_options()}, ["archive"]).restore_files(tmp_path / "out")
    assert info.step == 10
    assert max(copied) == listed + 1


def test_a_step_listed_while_it_was_being_written_is_read_once_committed(pm, s3_backend_options, s3_endpoint,
                                                                          bucket):
    """An evaluation process lists the run while the trainer is between a step's files and its
    manifest; once the step is committed, that same process restores it. (Listings of the step
    folder kept from the first look made it unreadable for the life of the process.)"""
    writer = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    writer.save(step=1, model=model(1))
    reader = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    assert reader.restore(model=model(9)).step == 1
    # What the trainer's save of step 2 has written before its manifest.
    fs = s3(s3_endpoint)
    fs.pipe_file(f"{bucket}/ckpts/run/step-0000000002/state.pt", b"half of a save")
    assert [r.step for r in reader.list_checkpoints()] == [1]
    writer.save(step=2, model=model(2))
    m = model(9)
    assert reader.restore(model=m).step == 2
    assert torch.equal(m[0].weight, model(2)[0].weight)


def test_nothing_to_resume_returns_none(pm, s3_backend_options):
    assert manager(pm, {"archive": s3_backend_options(prefix="empty")}, ["archive"]).restore(model=model()) is None


def test_a_bucket_that_does_not_exist_is_unavailable_never_an_empty_run(pm, s3_backend_options, bucket):
    """A bucket name one letter off once made restore answer None: start from step 0."""
    options = s3_backend_options()
    options["path"] = options["path"].replace(bucket, bucket + "x")
    ck = manager(pm, {"archive": options}, ["archive"])
    with pytest.raises(ckptkit.StorageUnavailableError, match=f"backend 'archive'.*{bucket}x.*bucket does not exist"):
        ck.restore(model=model())
    with pytest.raises(ckptkit.StorageUnavailableError):
        ck.list_checkpoints()


@pytest.mark.parametrize("fmt, unread", [("torch", MANIFEST_NAME), ("dcp", MANIFEST_NAME), ("dcp", ".metadata")])
def test_a_store_that_stops_answering_after_the_listing_is_unavailable_not_corrupt(
        pm, s3_backend_options, make_fault_proxy, moto_port, fmt, unread):
    """Every read of the manifests (or of a dcp checkpoint's metadata) failing after the listing
    worked: the checkpoints are intact for all anyone knows, so the error says the storage did
    not answer, not that they are damaged."""
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, request_retries=0, timeout_s=2)
    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], fmt=fmt)  # past the proxy
    for step in range(2):
        ck.save(step=step, model=model())
    FaultT = type(proxy).__init__.__globals__["Fault"]
    proxy.add(FaultT(lambda m, p: m == "GET" and p.split("?")[0].endswith(unread), status=503, times=None))
    with pytest.raises(ckptkit.StorageUnavailableError, match="has 2 committed checkpoint.*storage did not answer"):
        manager(pm, {"archive": opts}, ["archive"], fmt=fmt).restore(model=model())


def _two_steps_behind_a_proxy(pm, s3_backend_options, make_fault_proxy, moto_port):
    """Steps 1 and 2 saved past a fault proxy; the proxy, backend options that go through it
    (no client retries, 2 s a request), and its ``Fault`` type."""
    proxy = make_fault_proxy(moto_port)
    opts = {"archive": s3_backend_options(endpoint=proxy.url, request_retries=0, timeout_s=2)}
    with manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3) as ck:
        for step in (1, 2):
            ck.save(step=step, model=model(step))
    return proxy, opts, type(proxy).__init__.__globals__["Fault"]


@pytest.mark.parametrize("what", [MANIFEST_NAME, "state.pt"])
def test_a_newest_checkpoint_the_bucket_refuses_to_this_process_is_not_restored_past(
        pm, s3_backend_options, make_fault_proxy, moto_port, what):
    """An AccessDenied (a bucket policy, keys without read rights) is no damage: the step before
    it is not restored, as training would then save over the refused one."""
    proxy, opts, FaultT = _two_steps_behind_a_proxy(pm, s3_backend_options, make_fault_proxy, moto_port)
    denied = proxy.add(FaultT(lambda m, p: m in ("GET", "HEAD") and p.split("?")[0].endswith(f"step-0000000002/{what}"),
                              status=403, times=None,
                              body=b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"))
    ck = manager(pm, opts, ["archive"], keep_last=3)
    with pytest.raises(ckptkit.StorageUnavailableError) as err:
        ck.restore(model=model(7))
    assert denied.hits >= 1
    text = str(err.value)
    assert "does not let this process read it" in text and "step-0000000001 was not read" in text, text
    proxy.clear()
    assert ck.restore(model=model(7)).step == 2
    ck.close()


@pytest.mark.parametrize("fault", ["dropped", "503"])
def test_a_newest_checkpoint_whose_file_the_store_does_not_deliver_is_not_restored_past(
        pm, s3_backend_options, make_fault_proxy, moto_port, fault):
    """The listing and the manifest answer, the state file's download does not (the connection
    cut, or 503 through every retry): the newest checkpoint may be intact, so the step before it
    is not restored, over which training would then save."""
    proxy, opts, FaultT = _two_steps_behind_a_proxy(pm, s3_backend_options, make_fault_proxy, moto_port)
    spoiled = proxy.add(FaultT(lambda m, p: m == "GET" and p.split("?")[0].endswith("step-0000000002/state.pt"),
                               drop=fault == "dropped", times=None))
    ck = manager(pm, opts, ["archive"], keep_last=3)
    with pytest.raises(ckptkit.StorageUnavailableError, match="may be intact") as err:
        ck.restore(model=model(7))
    assert "step-0000000001 was not read: the store did not deliver a newer checkpoint through every retry" \
        in str(err.value), str(err.value)
    assert spoiled.hits >= 1
    proxy.clear()
    assert ck.restore(model=model(7)).step == 2
    ck.close()


def test_local_and_remote_resume_newest_across_both_wins(pm, s3_backend_options, tmp_path):
    both = {"scratch": {"type": "local", "path": str(tmp_path / "scratch")}, "archive": s3_backend_options()}
    # Step 5 only on S3 (a job that lost its scratch disk), step 3 on both.
    manager(pm, both, ["scratch", "archive"], keep_last=5).save(step=3, model=model(3))
    manager(pm, {"archive": both["archive"]}, ["archive"], keep_last=5).save(step=5, model=model(5))
    m = model(0)
    restored = manager(pm, both, ["scratch", "archive"]).restore(model=m)
    assert (restored.step, restored.ref.backend) == (5, "archive")
    assert torch.equal(m[0].weight, model(5)[0].weight)
    # Newer on local disk: local wins, and its copy is loaded in place.
    manager(pm, {"scratch": both["scratch"]}, ["scratch"], keep_last=5).save(step=7, model=model(7))
    restored = manager(pm, both, ["scratch", "archive"]).restore(model=m)
    assert (restored.step, restored.ref.backend) == (7, "scratch")
    # Both hold step 3: the local save went first and S3 got the same bytes, checksum and all.
    ck = manager(pm, both, ["scratch", "archive"], keep_last=5)
    by_backend = {r.backend: ck.router.call(r.backend, "read_manifest", ref=r)
                  for r in ck.list_checkpoints() if r.step == 3}
    assert by_backend["scratch"].files == by_backend["archive"].files


def test_upload_streams_in_parts_with_bounded_memory(pm, s3_backend_options, moto_port, s3_endpoint, bucket):
    ck = manager(pm, {"archive": s3_backend_options(part_size_mb=5, upload_concurrency=2)}, ["archive"])
    big = torch.nn.Linear(4096, 8192, bias=False)  # 128 MiB of weights
    tracemalloc.start()
    try:
        ref = ck.save(step=0, model=big)[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = ref.sizes["state.pt"]
    fs = s3(s3_endpoint)
    head = fs.call_s3("head_object", Bucket=bucket, Key="ckpts/run/step-0000000000/state.pt")
    assert head["ETag"].strip('"').endswith(f"-{math.ceil(size / (5 * 2**20))}")  # a multipart ETag
    # Python-side buffers: parts in flight (and the client's copies of them), not 128 MiB.
    assert peak < 64 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"


def test_transient_faults_are_retried(pm, s3_backend_options, make_fault_proxy, moto_port, s3_endpoint, bucket):
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, part_size_mb=5,
                              storage_options={"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 0}}})
    ck = manager(pm, {"archive": opts}, ["archive"])
    add = proxy.add
    FaultT = type(proxy).__init__.__globals__["Fault"]
    part2 = add(FaultT(lambda m, p: m == "PUT" and "partNumber=2" in p, status=503, times=1))
    slow = add(FaultT(lambda m, p: m == "PUT" and "partNumber=3" in p, status=503, times=1,
                      body=b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"))
    dropped = add(FaultT(lambda m, p: m == "PUT" and p.split("?")[0].endswith(MANIFEST_NAME), drop=True, times=1))
    listing = add(FaultT(lambda m, p: m == "GET" and "list-type=2" in p, status=500, times=1))
    big = torch.nn.Linear(2048, 2048, bias=False)  # 16 MiB: four parts
    ref = ck.save(step=0, model=big)[0]
    assert (part2.hits, slow.hits, dropped.hits) == (1, 1, 1)
    assert [r.step for r in ck.list_checkpoints()] == [0]
    assert listing.hits == 1
    m = torch.nn.Linear(2048, 2048, bias=False)
    assert ck.restore(model=m).step == 0 and torch.equal(m.weight, big.weight)
    assert ref.uri.endswith("step-0000000000")


def test_unrecoverable_fault_leaves_nothing_committed_and_names_the_object(
        pm, s3_backend_options, make_fault_proxy, moto_port, s3_endpoint, bucket, tmp_path, caplog):
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, part_size_mb=5,
                              storage_options={"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 0}},
                                               "key": KEY_ID, "secret": SECRET})
    both = {"scratch": {"type": "local", "path": str(tmp_path)}, "archive": opts}
    ck = manager(pm, both, ["scratch", "archive"])
    ck.save(step=0, model=model())
    ck.wait()  # the prune after it runs on a thread of its own: done before the fault is armed
    FaultT = type(proxy).__init__.__globals__["Fault"]
    broken = proxy.add(FaultT(lambda m, p: m == "PUT" and "partNumber=3" in p, status=503, times=None))
    caplog.set_level(logging.DEBUG, logger="ckptkit")
    with pytest.raises(SaveError) as err:
        ck.save(step=1, model=torch.nn.Linear(2048, 2048, bias=False))
    assert broken.hits == 3  # retry.attempts, then it gives up
    failure = err.value.failures["archive"]
    assert isinstance(failure, BackendError) and failure.backend == "archive"
    text = str(failure)
    assert f"s3://{bucket}/ckpts/run/step-0000000001/state.pt" in text
    assert "gave up after 3 attempts" in text
    # The other backend committed it; S3 holds no trace of step 1, not even an open upload.
    assert [r.backend for r in err.value.saved] == ["scratch"]
    fs = s3(s3_endpoint)
    assert not any(k.startswith("step-0000000001") for k in keys(fs, f"{bucket}/ckpts/run"))
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    assert [r.step for r in ck.router.call("archive", "list_checkpoints", run_name="run")] == [0]
    # No credential in the error or in ckptkit's logs.
    for blob in (str(err.value), caplog.text):
        assert SECRET not in blob and KEY_ID not in blob


# A killed save's folder, or the folder beside a step saved again where its files are staged.
@pytest.mark.parametrize("folder", ["step-0000000005", ".tmp-step-0000000005-0123456789ab"])
def test_unfinished_uploads_of_a_killed_save_are_aborted_after_the_grace_period(
        pm, s3_backend_options, s3_endpoint, bucket, folder):
    # moto dates every upload in 2010, so every upload here began past any grace period; its
    # part was received just now, so a grace period of a second passes before the prune. They
    # are made before this backend first lists the run's uploads: one begun after a listing
    # cannot be stale before a grace period has passed since, so the prune does not list again
    # until then (moto's dates would contradict that).
    ck = manager(pm, {"archive": s3_backend_options(leftover_grace_s=1)}, ["archive"], keep_last=1)
    fs = s3(s3_endpoint)
    # What a save killed mid-upload leaves: a multipart upload with a part, never completed.
    crashed = f"ckpts/run/{folder}/state.pt"
    foreign = "ckpts/run-other/step-0000000005/state.pt"
    for key in (crashed, foreign):
        upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    time.sleep(2.1)  # past the grace period by the store's clock too, whose Date is in whole seconds

    def pending():
        return sorted(u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))

    backend = ck.router.instances["archive"]
    would = backend.prune(run_name="run", keep_last=1, protected_steps=frozenset(), dry_run=True, counted_steps=None)
    assert [r.role for r in would] == ["unfinished upload"] and crashed in would[0].uri
    assert pending() == sorted([crashed, foreign]), "a dry run aborts nothing"
    # An upload into a folder this backend is writing right now is never touched.
    backend._in_flight.add(f"{bucket}/ckpts/run/{folder}")
    assert backend.prune(run_name="run", keep_last=1, protected_steps=frozenset(), dry_run=True,
                         counted_steps=None) == []
    backend._in_flight.clear()
    ck.save(step=1, model=model())
    ck.wait()  # the prune after a save runs on a thread of its own
    assert pending() == [foreign], "another run's upload is not this run's to abort"


@pytest.mark.parametrize("folder", ["final", ".tmp-final-0123456789ab"])
def test_a_final_only_store_aborts_what_a_killed_publish_left_unfinished(
        pm, s3_backend_options, s3_endpoint, bucket, tmp_path, folder):
    """A store that serves the final role alone is visited by no resume prune: ``ckptkit prune``
    (``manager.prune``) sweeps it, unfinished uploads of the final model included, and only
    those (moto dates every upload in 2010, past any grace period)."""
    ck = manager(pm, {"scratch": {"type": "local", "path": str(tmp_path)},
                      "archive": s3_backend_options(leftover_grace_s=1)}, ["scratch"], final=["archive"])
    fs = s3(s3_endpoint)
    crashed = f"ckpts/run/{folder}/final_model.pt"
    others = ["ckpts/run-other/final/final_model.pt", "ckpts/run/step-0000000005/state.pt"]
    for key in (crashed, *others):
        upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    time.sleep(2.1)  # its last part past the grace period, by the store's clock too

    def pending():
        return sorted(u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))

    would = ck.prune(dry_run=True).deleted
    assert [(r.backend, r.role) for r in would] == [("archive", "unfinished upload")] and crashed in would[0].uri
    assert pending() == sorted([crashed, *others]), "a dry run aborts nothing"
    assert [r.uri for r in ck.prune().deleted] == [r.uri for r in would]
    # Not this run's final model, and not a resume checkpoint's upload: neither is the final sweep's.
    assert pending() == sorted(others)


def test_an_upload_still_receiving_parts_is_not_aborted_however_long_ago_it_began(
        pm, s3_backend_options, s3_endpoint, bucket):
    """Another process's upload of a large checkpoint or final model takes longer than the grace
    period: it is stale only once no part has arrived for that long, by this machine's clock and
    by the store's. moto dates every upload in 2010; the parts carry the time they arrived."""
    ck = manager(pm, {"archive": s3_backend_options(leftover_grace_s=3600)}, ["archive"], keep_last=1)
    fs = s3(s3_endpoint)
    busy = "ckpts/run/final-2/final_model.pt"
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=busy)["UploadId"]
    fs.call_s3("upload_part", Bucket=bucket, Key=busy, UploadId=upload, PartNumber=1, Body=b"x" * 1024)

    def pending():
        return [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])]

    assert not ck.prune().deleted and pending() == [busy]
    again = manager(pm, {"archive": s3_backend_options(leftover_grace_s=3600)}, ["archive"], keep_last=1)
    again.save(step=1, model=model())
    again.wait()
    assert pending() == [busy], "the prune after a save left it too"
    # This machine's clock two hours ahead of the store's: the part is two hours old by it alone.
    fresh = manager(pm, {"archive": s3_backend_options(leftover_grace_s=3600)}, ["archive"])
    assert fresh.router.instances["archive"].stale_uploads("run", set(), time.time() + 7200) == []
    # A store's clock that has passed the grace period since the last part, and this machine's too.
    quick = manager(pm, {"archive": s3_backend_options(leftover_grace_s=1)}, ["archive"])
    time.sleep(2.1)
    stale = quick.router.instances["archive"].stale_uploads("run", set(), time.time())
    assert [ref.uri for ref, _ in stale] == [f"s3://{bucket}/{busy}"]
    stale[0][1]()
    assert pending() == []


@pytest.mark.parametrize("status", [403, 503], ids=["refused", "throttled"])
def test_a_store_failing_to_list_an_uploads_parts_still_prunes_and_ages_it_by_its_start_only_if_refused(
        pm, s3_backend_options, make_fault_proxy, moto_port, s3_endpoint, bucket, caplog, status):
    """An identity without s3:ListMultipartUploadParts: the prune goes on (keep_last held, the
    killed save's upload aborted, by when it began, as before parts were asked), and says once
    which permission to allow. A store that fails the listing now (throttled) is asked again at
    the next prune: meanwhile the upload, which may still be receiving parts, is kept."""
    proxy = make_fault_proxy(moto_port)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    code = b"AccessDenied" if status == 403 else b"SlowDown"
    proxy.add(FaultT(lambda m, p: m == "GET" and "uploadId=" in p, status=status, times=None,
                     body=b"<Error><Code>" + code + b"</Code><Message>no</Message></Error>"))
    fs = s3(s3_endpoint)
    killed = "ckpts/run/step-0000000007/state.pt"
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=killed)["UploadId"]
    fs.call_s3("upload_part", Bucket=bucket, Key=killed, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    options = s3_backend_options(endpoint=proxy.url, leftover_grace_s=1, request_retries=0, retry={"attempts": 1})
    ck = manager(pm, {"archive": options}, ["archive"], keep_last=2)
    with caplog.at_level(logging.WARNING, logger="ckptkit_s3"):
        for step in range(1, 5):
            ck.save(step=step, model=model())
            ck.wait()
    assert [r.step for r in ck.list_checkpoints()] == [4, 3]
    pending = [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])]
    told = [r.getMessage() for r in caplog.records if "could not be listed" in r.getMessage()]
    if status == 403:
        assert pending == []
        assert len(told) == 1 and "aged by when they began" in told[0] and "ListMultipartUploadParts" in told[0]
    else:
        assert pending == [killed]
        assert told and all("left for the next prune" in m for m in told)


@pytest.mark.timeout(30)
def test_a_hung_store_fails_within_timeout_s_with_a_typed_error(pm, s3_backend_options, silent_server, bucket):
    """A server that accepts and never answers: save fails, and restore does not mistake it for
    "nothing". With one try per request and one attempt, each operation gives up after timeout_s."""
    from ckptkit import StorageUnavailableError

    options = s3_backend_options(endpoint=f"http://127.0.0.1:{silent_server}", timeout_s=0.5,
                                 request_retries=0, retry={"attempts": 1})
    ck = manager(pm, {"archive": options}, ["archive"])
    with pytest.raises(SaveError) as err:
        ck.save(step=0, model=model())
    failure = err.value.failures["archive"]
    assert isinstance(failure, BackendError) and failure.backend == "archive"
    assert f"s3://{bucket}/ckpts/run/step-0000000000" in str(failure)
    assert "timeout" in str(failure).lower() or "timed out" in str(failure).lower()
    with pytest.raises(StorageUnavailableError, match="archive.*could not be listed"):
        ck.restore(model())


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_store_that_takes_an_upload_and_never_reads_it_fails_the_save_in_bounded_time(
        pm, s3_backend_options, make_fault_proxy, moto_port, s3_endpoint, bucket, fmt):
    """botocore's read timeout starts only once a body is sent: an upload the store neither
    reads nor answers held save, and training, for good. Each request that sends a body now has
    a deadline, whoever sends it (ckptkit's uploads, s3fs's file writer for dcp shards); the
    save fails naming the object, and what was committed stays."""
    # The step saved before the fault goes straight to the store: a tight deadline is only
    # for the save that meets the stalled store, not one a loaded machine is slow to send.
    manager(pm, {"archive": s3_backend_options()}, ["archive"], fmt=fmt).save(step=0, model=model())
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=2.0, request_retries=0, part_size_mb=5)
    opts["retry"] = {"attempts": 1}
    ck = manager(pm, {"archive": opts}, ["archive"], fmt=fmt)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    stalled = proxy.add(FaultT(lambda m, p: m == "PUT", unread=True, times=None, hold=threading.Event()))
    outcome = []

    def save():
        try:
            ck.save(step=1, model=model())
        except SaveError as exc:
            outcome.append(exc)

    saving = threading.Thread(target=save, daemon=True)
    saving.start()
    saving.join(120)  # a hang is a failure here, not a stalled test run
    stalled.hold.set()
    assert not saving.is_alive(), "save still waits on a store that never reads the upload"
    text = str(outcome[0]) if len(outcome) == 1 else repr(outcome)
    assert re.search(r"archive.*within [\d.]+ s \(the store's timeouts and retries", text), text
    if fmt == "torch":  # DCP shortens its ranks' messages in the middle
        assert re.search(r"put_object of \d+ bytes to .*step-0000000001/state.pt was not answered", text), text
    assert stalled.hits >= 1
    assert [r.step for r in manager(pm, {"archive": s3_backend_options()}, ["archive"]).list_checkpoints()] == [0]


def test_a_save_takes_six_requests_and_lists_unfinished_uploads_once_per_grace_period(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket):
    """The round trips of a small save, pinned so that they cannot grow unnoticed: whether the
    step is stored (another training of the run may have committed it since the last listing),
    the two files (the state and the manifest; no extra.pt without extra), the prune's listing,
    and the deletion of the checkpoint keep_last lets go (manifest first, then the rest in one
    batch). Not asked: the manifest just written (the backend knows it), the folder's files
    again before deleting them, nor the unfinished uploads (none can be stale before the grace
    period has passed since the last look)."""
    proxy = make_fault_proxy(moto_port)
    ck = manager(pm, {"archive": s3_backend_options(endpoint=proxy.url)}, ["archive"], keep_last=2)
    m = model()
    for step in range(3):
        ck.save(step=step, model=m)
    ck.wait()
    first = list(proxy.requests)
    assert sum("uploads" in p for _, p in first) == 1, first
    for step in range(3, 6):
        proxy.clear()
        ck.save(step=step, model=m)
        ck.wait()
        folder, old = (f"/{bucket}/ckpts/run/step-{s:010d}" for s in (step, step - 2))
        assert [(method, path.split("?")[0]) for method, path in proxy.requests] == [
            ("HEAD", f"{folder}/{MANIFEST_NAME}"), ("PUT", f"{folder}/state.pt"), ("PUT", f"{folder}/{MANIFEST_NAME}"),
            ("GET", f"/{bucket}"),  # the prune's listing of the run
            ("DELETE", f"{old}/{MANIFEST_NAME}"), ("POST", f"/{bucket}"),
        ], proxy.requests
    assert [r.step for r in ck.list_checkpoints()] == [5, 4]
    ck.close()
    restored = manager(pm, {"archive": s3_backend_options()}, ["archive"]).restore(model(1))
    assert restored.step == 5


def test_a_pruned_checkpoint_holding_a_file_named_like_a_glob_pattern_is_deleted_whole(
        pm, s3_backend_options, s3_endpoint, bucket, tmp_path):
    """save_files keeps a trainer's own file names; one with [ ] * ? is still deleted by the
    prune (a batch delete through s3fs would read it as a pattern and leave it behind)."""
    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=1)
    folder = tmp_path / "trainer"
    folder.mkdir()
    (folder / "rng_state[0].pth").write_bytes(b"rng" * 100)
    (folder / "model.bin").write_bytes(b"weights" * 100)
    for step in range(2):
        ck.save_files(step=step, files=folder)
    ck.wait()  # the prune after a save runs on a thread of its own
    left = keys(s3(s3_endpoint), f"{bucket}/ckpts/run")
    assert left and all("step-0000000001/" in k for k in left), left
    ck.close()



@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_download_the_store_sends_a_byte_at_a_time_fails_the_restore_in_bounded_time(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket, fmt, in_thread):
    """Every read of the answer gets a byte, so botocore's read timeout (a wait between bytes)
    never fires: restore waited for good. Each answer's body now has a deadline (the timeout
    plus its size at the slowest rate that counts as progress), and a store that answers again
    is read at once."""
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=1.0, request_retries=0)
    opts["retry"] = {"attempts": 2, "backoff_s": 0.01}
    manager(pm, {"archive": s3_backend_options()}, ["archive"], fmt=fmt).save(step=0, model=model(3))
    FaultT = type(proxy).__init__.__globals__["Fault"]
    dripping = proxy.add(FaultT(lambda m, p: m == "GET" and "/step-0000000000/" in p and MANIFEST_NAME not in p,
                                drip=0.1, times=None, hold=threading.Event()))
    restored = model()
    hung, outcome = in_thread(lambda: manager(pm, {"archive": opts}, ["archive"], fmt=fmt).restore(model=restored))
    dripping.hold.set()
    assert not hung, "restore still waits on a store that sends a byte at a time"
    assert isinstance(outcome, ckptkit.StorageUnavailableError), outcome
    assert "archive" in str(outcome) and "the store stopped sending it" in str(outcome), outcome
    assert dripping.hits >= 2  # ckptkit's retry policy read it again
    proxy.clear()
    # The step is intact: read straight from the store, not through the proxy at 1 s a request.
    assert manager(pm, {"archive": s3_backend_options()}, ["archive"], fmt=fmt).restore(model=restored).step == 0
    assert torch.equal(restored[0].weight, model(3)[0].weight)


def test_a_listing_the_store_sends_a_byte_at_a_time_fails_the_restore_in_bounded_time(
        pm, s3_backend_options, make_fault_proxy, moto_port, in_thread):
    """botocore's read timeout waits between bytes, and only downloads' bodies had a deadline:
    a listing (or a multipart upload's completion) answered a byte at a time held restore, and
    a save, for half an hour and more. Every answer now has one: the timeout plus 1 MiB at the
    slowest rate that counts as progress, per client try."""
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=1.0, request_retries=0)
    opts["retry"] = {"attempts": 1}
    manager(pm, {"archive": s3_backend_options()}, ["archive"]).save(step=0, model=model(3))
    FaultT = type(proxy).__init__.__globals__["Fault"]
    dripping = proxy.add(FaultT(lambda m, p: m == "GET" and "list-type=2" in p, drip=0.5, times=None,
                                hold=threading.Event()))
    hung, outcome = in_thread(lambda: manager(pm, {"archive": opts}, ["archive"]).restore(model=model()))
    dripping.hold.set()
    assert not hung, "restore still waits on a listing sent a byte at a time"
    assert isinstance(outcome, ckptkit.StorageUnavailableError), outcome
    assert "was not answered within 17.0 s" in str(outcome), outcome
    proxy.clear()
    # The step is intact: read straight from the store (1 s a request through the proxy is
    # the bound under test above, not one for a loaded machine to keep).
    assert manager(pm, {"archive": s3_backend_options()}, ["archive"]).restore(model=model()).step == 0


def test_a_store_that_does_not_answer_is_asked_once_per_client_try_and_attempt(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket, in_thread):
    """botocore retries each request, s3fs retried botocore's failures again (and again around
    a download), and ckptkit's policy all of that: waits on a hung store multiplied into most of
    an hour per listing with the defaults. Now a request is tried request_retries + 1 times by
    the client, and that again by each of ckptkit's attempts, no more."""
    from ckptkit import StorageUnavailableError

    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=1.0, request_retries=1)
    opts["retry"] = {"attempts": 2, "backoff_s": 0.01}
    ck = manager(pm, {"archive": opts}, ["archive"])
    FaultT = type(proxy).__init__.__globals__["Fault"]
    hung = proxy.add(FaultT(lambda m, p: m == "GET", times=None, hold=threading.Event()))
    still, outcome = in_thread(ck.list_checkpoints)
    hung.hold.set()
    assert not still
    assert isinstance(outcome, StorageUnavailableError) and "archive" in str(outcome), outcome
    assert hung.hits == 2 * 2, proxy.requests


def _three_steps_behind(proxy, s3_backend_options, pm, attempts: int) -> dict:
    """Options of a backend behind ``proxy`` (timeout_s 3, one try a request, ``attempts`` of
    ckptkit's), with steps 1, 2 and 3 saved straight to the store (a loaded machine may be slow
    to send them, which only the faults added after are to test), each of ``model(step)``. A
    held request still times out; one the machine is slow to pass on does not."""
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=3.0, request_retries=0)
    opts["retry"] = {"attempts": attempts, "backoff_s": 0.01}
    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)  # past the proxy
    for step in (1, 2, 3):
        ck.save(step=step, model=model(step))
    return opts


def test_a_store_that_stops_answering_after_the_listing_is_not_asked_for_each_older_checkpoint(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket, in_thread):
    """Restore tried every checkpoint of a store that had stopped answering, each through all of
    its retries (with the defaults and three kept, hours). After one read gave up on it, the
    store's other checkpoints are not read until a listing shows that it answers again."""
    proxy = make_fault_proxy(moto_port)
    opts = _three_steps_behind(proxy, s3_backend_options, pm, attempts=2)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    hung = proxy.add(FaultT(lambda m, p: m == "GET" and "list-type" not in p, times=None, hold=threading.Event()))
    again = manager(pm, {"archive": opts}, ["archive"])
    still, outcome = in_thread(lambda: again.restore(model=model()))
    hung.hold.set()
    assert not still
    assert isinstance(outcome, ckptkit.StorageUnavailableError), outcome
    text = str(outcome)
    assert "step-0000000003" in text and "step-0000000001" in text and "none could be read" in text, text
    assert "the store did not deliver a newer checkpoint through every retry, and that one may be intact" in text, text
    assert hung.hits == 2, proxy.requests  # step 3's manifest, on each of two attempts; no more
    proxy.clear()
    # The same manager reads everything again once the store answers: nothing of it is remembered.
    assert again.verify(again.list_checkpoints()[-1]).step == 1
    restored = model()
    assert again.restore(model=restored).step == 3
    assert torch.equal(restored[0].weight, model(3)[0].weight)


def test_an_object_that_stalls_is_not_restored_past_to_an_older_step_of_its_store(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket, in_thread):
    """The newest checkpoint damaged, the next one's state stalling: that one may be intact, so
    the oldest is not restored (training would save over the stalled one); once the store
    answers, the stalled one is."""
    proxy = make_fault_proxy(moto_port)
    opts = _three_steps_behind(proxy, s3_backend_options, pm, attempts=2)
    s3(f"http://127.0.0.1:{moto_port}").pipe_file(f"{bucket}/ckpts/run/step-0000000003/state.pt", b"damaged")
    FaultT = type(proxy).__init__.__globals__["Fault"]
    hung = proxy.add(FaultT(lambda m, p: m == "GET" and p.split("?")[0].endswith("step-0000000002/state.pt"),
                            times=None, hold=threading.Event()))
    restored = model()
    with pytest.warns(RuntimeWarning):
        still, outcome = in_thread(lambda: manager(pm, {"archive": opts}, ["archive"]).restore(model=restored))
    hung.hold.set()
    assert not still
    assert isinstance(outcome, ckptkit.StorageUnavailableError), outcome
    assert "step-0000000001 was not read: the store did not deliver a newer checkpoint through every retry" in str(outcome)
    assert hung.hits >= 1 and torch.equal(restored[0].weight, model()[0].weight), "nothing was loaded"
    proxy.clear()
    with pytest.warns(RuntimeWarning):  # the damaged newest one, skipped
        assert manager(pm, {"archive": opts}, ["archive"]).restore(model=restored).step == 2


def test_a_save_whose_manifest_the_store_took_without_answering_is_left_whole(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket):
    """The clean-up of a save that failed because the store stopped answering went back to the
    hung store with all of its retries, and could delete the files of a step whose manifest the
    store then took: a committed checkpoint with its state gone. Now nothing is cleaned up after
    the store stopped answering (the prune removes what has no manifest), and the error says the
    step may be committed."""
    proxy = make_fault_proxy(moto_port)
    # 3 s a request: the state's upload, which a loaded machine may be slow to pass on, is not
    # the one that times out; the held manifest's write is, once on each of the two attempts.
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=3.0, request_retries=0)
    opts["retry"] = {"attempts": 2, "backoff_s": 0.01}
    first = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    first.save(step=0, model=model(0))
    first.wait()  # the prune after it, on a thread of its own
    ck = manager(pm, {"archive": opts}, ["archive"], keep_last=3)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    held = proxy.add(FaultT(lambda m, p: m == "PUT" and p.endswith(f"step-0000000001/{MANIFEST_NAME}"),
                            times=None, hold=threading.Event()))
    seen = len(proxy.requests)
    with pytest.raises(SaveError) as err:
        ck.save(step=1, model=model(1))
    assert "may have taken it" in str(err.value) and "step-0000000001" in str(err.value)
    assert held.hits == 2
    after = [r for r in proxy.requests[seen:]  # but the new manager's first listing of the run
             if (MANIFEST_NAME not in r[1] or r[0] != "PUT") and "list-type" not in r[1]]
    assert after[0] == ("HEAD", f"/{bucket}/ckpts/run/step-0000000001/{MANIFEST_NAME}"), after
    after = after[1:]  # whether the step was stored, asked before the save wrote anything
    assert all(m == "PUT" and "step-0000000001/state.pt" in p for m, p in after), after  # no clean-up
    held.hold.set()  # the store takes the held manifest writes now
    fs = s3(proxy.url.replace(str(proxy.port), str(moto_port)))
    for _ in range(100):
        if fs.exists(f"{bucket}/ckpts/run/step-0000000001/{MANIFEST_NAME}"):
            break
        threading.Event().wait(0.1)
    restored = model()
    got = manager(pm, {"archive": s3_backend_options()}, ["archive"]).restore(model=restored)  # past the proxy
    assert got.step == 1 and not got.skipped
    assert torch.equal(restored[0].weight, model(1)[0].weight)


def test_a_slow_but_steady_download_is_not_taken_for_a_stalled_one(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket, in_thread):
    """Downloads share a link (the parts of a split state, several ranges at once): one may get
    far less than the link's rate. A body coming at 20 KiB/s, below what a per-request deadline
    at the link's rate allowed, is read to the end; only one slower than the floor fails."""
    # The timeout is the window over which progress is measured: 5 s, so that a loaded machine
    # slow to answer the listing or the manifest does not fail the restore. The state (150 KB)
    # then drips for 7.5 s: longer than one window (the progress check runs), and longer than a
    # per-request deadline at the link's rate (5 s + 150 KB at 256 KiB/s = 5.6 s) would allow.
    n = 192
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=5.0, request_retries=0)
    opts["retry"] = {"attempts": 1}
    manager(pm, {"archive": s3_backend_options()}, ["archive"]).save(step=0, model=model(3, n=n))
    FaultT = type(proxy).__init__.__globals__["Fault"]
    slow = proxy.add(FaultT(lambda m, p: m == "GET" and p.split("?")[0].endswith("/state.pt"),
                            drip=0.05, drip_bytes=1024, times=None, hold=threading.Event()))
    restored = model(n=n)
    start = time.monotonic()
    hung, outcome = in_thread(lambda: manager(pm, {"archive": opts}, ["archive"]).restore(model=restored))
    took = time.monotonic() - start
    slow.hold.set()
    assert not hung
    assert isinstance(outcome, ckptkit.Restored) and outcome.step == 0 and not outcome.skipped, outcome
    assert slow.hits == 1
    assert took > 5.6, f"the state came in {took:.1f} s: not slow enough to tell a rate per request apart"
    assert torch.equal(restored[0].weight, model(3, n=n)[0].weight)


def test_a_step_saved_again_while_the_store_stops_answering_reads_as_damaged_never_as_gone(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket):
    """Saving a committed step again deleted its manifest before copying the new files into
    place: a store that stopped answering then left the step gone, and a restore of the run
    started from step 0 without a word. The old manifest now stays until the new one replaces
    it, so what is left reads as damaged, and restore says so."""
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=1.0, request_retries=0)
    opts["retry"] = {"attempts": 2, "backoff_s": 0.01}
    manager(pm, {"archive": s3_backend_options()}, ["archive"]).save(step=1, model=model(1))
    again = manager(pm, {"archive": opts}, ["archive"])
    again.restore(model=model())
    old = s3(f"http://127.0.0.1:{moto_port}").cat_file(f"{bucket}/ckpts/run/step-0000000001/state.pt")
    hung = {"from now on": False}

    def store_stops(method, path):  # at the first copy into the step's folder, for every request
        if method == "PUT" and path.split("?")[0].endswith("/step-0000000001/state.pt"):
            hung["from now on"] = True
        return hung["from now on"]

    FaultT = type(proxy).__init__.__globals__["Fault"]
    held = proxy.add(FaultT(store_stops, times=None, hold=threading.Event()))
    with pytest.raises(SaveError, match="may be damaged, which a restore checks"):
        again.save(step=1, model=model(7))
    held.hold.set()  # what it held now reaches the store
    proxy.clear()
    # What is left is read straight from the store: the fault is over, and a loaded machine
    # slow to answer through the proxy (1 s a request) must not pass for it.
    direct = s3_backend_options()
    fs = s3(f"http://127.0.0.1:{moto_port}")
    for _ in range(100):  # the held copy lands in the store
        fs.invalidate_cache()
        if fs.cat_file(f"{bucket}/ckpts/run/step-0000000001/state.pt") != old:
            break
        threading.Event().wait(0.1)
    [ref] = manager(pm, {"archive": direct}, ["archive"]).list_checkpoints()
    # The sizes agree (only the bytes differ): what the backend that saw the save fail knows.
    backend = again.router.instances["archive"]
    assert not backend._consistent(ref), "a prune would count the damaged step as intact"
    with pytest.raises(ckptkit.CorruptCheckpointError, match="step-0000000001"):
        manager(pm, {"archive": direct}, ["archive"]).restore(model=model())


def test_damaged_checkpoints_beside_ones_the_store_did_not_answer_for_are_not_called_all_damaged(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket, in_thread):
    """The newest damaged, the older ones' manifests unanswered: those may be intact, so restore
    says the storage did not answer (retry later), not that the run is damaged."""
    proxy = make_fault_proxy(moto_port)
    opts = _three_steps_behind(proxy, s3_backend_options, pm, attempts=1)
    s3(f"http://127.0.0.1:{moto_port}").pipe_file(f"{bucket}/ckpts/run/step-0000000003/state.pt", b"damaged")
    FaultT = type(proxy).__init__.__globals__["Fault"]
    hung = proxy.add(FaultT(lambda m, p: m == "GET" and p.split("?")[0].endswith(f"step-0000000002/{MANIFEST_NAME}"),
                            times=None, hold=threading.Event()))
    still, outcome = in_thread(lambda: manager(pm, {"archive": opts}, ["archive"]).restore(model=model()))
    hung.hold.set()
    assert not still
    assert isinstance(outcome, ckptkit.StorageUnavailableError), outcome
    assert "may be intact" in str(outcome) and "step-0000000001 was not read" in str(outcome), outcome


def test_restore_files_with_damaged_checkpoints_and_unanswered_ones_says_the_storage_did_not_answer(
        pm, s3_backend_options, make_fault_proxy, moto_port, bucket, tmp_path, in_thread):
    """As restore: the checkpoints whose manifests got no answer may be intact, so the error
    says to retry once the store answers, not that the run is damaged."""
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, timeout_s=3.0, request_retries=0)  # a held request still times out
    opts["retry"] = {"attempts": 1}
    ck = manager(pm, {"archive": s3_backend_options()}, ["archive"], keep_last=3)
    for step in (1, 2):
        folder = tmp_path / f"trainer-{step}"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(bytes([step]) * 1000)
        ck.save_files(step=step, files=folder)
    s3(f"http://127.0.0.1:{moto_port}").pipe_file(f"{bucket}/ckpts/run/step-0000000002/weights.bin", b"damaged")
    FaultT = type(proxy).__init__.__globals__["Fault"]
    hung = proxy.add(FaultT(lambda m, p: m == "GET" and p.split("?")[0].endswith(f"step-0000000001/{MANIFEST_NAME}"),
                            times=None, hold=threading.Event()))
    still, outcome = in_thread(lambda: manager(pm, {"archive": opts}, ["archive"]).restore_files(tmp_path / "out"))
    hung.hold.set()
    assert not still
    assert isinstance(outcome, ckptkit.StorageUnavailableError), outcome
    assert "may be intact" in str(outcome) and "step-0000000002" in str(outcome), outcome
    assert not (tmp_path / "out").exists()


def test_a_multipart_upload_the_store_will_not_start_is_named_not_torchs_unexpected_pos(
        pm, s3_backend_options, make_fault_proxy, moto_port):
    """A state larger than one part starts a multipart upload from inside torch's serialiser,
    which reports any failure of a write as "unexpected pos": the save says what failed."""
    proxy = make_fault_proxy(moto_port)
    opts = s3_backend_options(endpoint=proxy.url, request_retries=0, timeout_s=2, part_size_mb=5)
    opts["retry"] = {"attempts": 2, "backoff_s": 0.01, "max_backoff_s": 0.02}
    manager(pm, {"archive": s3_backend_options()}, ["archive"]).save(step=1, model=model(1))  # past the proxy
    ck = manager(pm, {"archive": opts}, ["archive"])
    FaultT = type(proxy).__init__.__globals__["Fault"]
    refused = proxy.add(FaultT(lambda m, p: m == "POST" and "uploads" in p.split("?", 1)[-1], times=None))
    with pytest.raises(ckptkit.SaveError) as err:
        ck.save(step=2, model=model(2, n=1400))  # 7.5 MiB of weights: two parts
    message = str(err.value)
    assert refused.hits >= 2
    assert "starting the upload of" in message and "unexpected pos" not in message, message
    assert [r.step for r in ck.list_checkpoints()] == [1]


def test_a_sharded_step_saved_again_keeps_its_committed_copy_when_the_new_upload_fails(
        pm, s3_backend_options, make_fault_proxy, moto_port):
    """The last periodic step saved again at the end (save(force=True)) with keep_last 1: the
    run's only checkpoint must outlive a failed upload of its replacement."""
    proxy = make_fault_proxy(moto_port)
    # One manager saves throughout, as a trainer's does: 5 s a request, as the fault is refusals
    # (answered at once) and a loaded machine may be slow to pass on the other requests.
    opts = s3_backend_options(endpoint=proxy.url, request_retries=0, timeout_s=5)
    opts["retry"] = {"attempts": 1}
    ck = manager(pm, {"archive": opts}, ["archive"], keep_last=1, fmt="dcp")
    ck.save(step=4, model=model(4))
    FaultT = type(proxy).__init__.__globals__["Fault"]
    refused = proxy.add(FaultT(lambda m, p: m in ("PUT", "POST") and ".distcp" in p, times=None))
    with pytest.raises(ckptkit.SaveError):
        ck.save(step=4, model=model(5), force=True)
    assert refused.hits >= 1
    proxy.faults.clear()
    direct = s3_backend_options()  # what the store holds, read past the proxy
    m = model(0)
    restored = manager(pm, {"archive": direct}, ["archive"], fmt="dcp").restore(model=m)
    assert restored is not None and restored.step == 4
    assert torch.equal(m[0].weight, model(4)[0].weight)
    # Saved again once the store answers: the new bytes replace the old, and nothing is left beside.
    ck.save(step=4, model=model(5), force=True)
    ck.close()
    restored = manager(pm, {"archive": direct}, ["archive"], fmt="dcp").restore(model=m)
    assert restored.step == 4 and torch.equal(m[0].weight, model(5)[0].weight)
    fs = s3(direct["storage_options"]["endpoint_url"])
    root = opts["path"][len("s3://"):]
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/run", refresh=True)] == ["step-0000000004"]


def test_the_store_clock_a_prune_checks_ages_against_is_the_stores_own(s3_backend_options, s3_endpoint, bucket):
    """Before a prune deletes a folder for its age it reads the store's clock (the time S3 gives
    an object it writes for the purpose), so that a machine whose clock runs hours ahead does not
    take a save in flight for a leftover; the object is gone afterwards."""
    from ckptkit_s3 import S3Backend

    options = s3_backend_options()
    del options["type"]
    backend = S3Backend.from_config("archive", options)
    ahead = time.time() + 7200
    store_now = backend._store_now("run", ahead)
    assert abs(store_now - time.time()) < 60
    assert keys(s3(s3_endpoint), f"{bucket}/ckpts") == []


def test_the_client_has_a_connection_for_every_part_in_flight(s3_backend_options):
    """Every request's answer has a deadline, and waiting for a pooled connection counts against
    it: botocore's pool of 10 made a small request wait behind 16 parts on a slow link (four
    files written at once, four parts each) until its deadline passed. Up to 64 files are
    written at once (write_threads)."""
    from ckptkit_s3 import S3Backend

    options = s3_backend_options(upload_concurrency=4)
    del options["type"]
    assert S3Backend.from_config("archive", options).fs.config_kwargs["max_pool_connections"] == 64 * 4
    options["storage_options"]["config_kwargs"] = {"max_pool_connections": 5}
    assert S3Backend.from_config("archive", options).fs.config_kwargs["max_pool_connections"] == 5  # as told
