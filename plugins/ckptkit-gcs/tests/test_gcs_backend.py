"""The gcs backend against a real GCS JSON API (gcp-storage-emulator on loopback)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import ckptkit
from ckptkit.errors import BackendError, ConfigError, SaveError
from ckptkit.manifest import MANIFEST_NAME


def model(seed: int = 0, n: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.ReLU(), torch.nn.Linear(n, 4))


def manager(pm, backends: dict, resume: list[str], final: list[str] | None = None, keep_last: int = 2):
    roles = {"resume": {"backends": resume, "every_n_steps": 1, "keep_last": keep_last}}
    if final:
        roles["final"] = {"backends": final}
    return ckptkit.CheckpointManager.from_config({"backends": backends, "roles": roles},
                                                 run_name="run", plugin_manager=pm())


@pytest.mark.parametrize("settings, told", [
    ({}, "soft delete keeps what a prune deletes for 7 days, billed (gcloud storage buckets update gs://{bucket} "
         "--clear-soft-delete turns it off)"),
    ({"softDeletePolicy": {"retentionDurationSeconds": "0"}, "versioning": {"enabled": True}},
     "object versioning keeps it as noncurrent versions, billed until a lifecycle rule deletes them "
     "(daysSinceNoncurrentTime or numNewerVersions)"),
    ({"softDeletePolicy": {"retentionDurationSeconds": "0"}}, None),
])
def test_a_prune_in_a_bucket_that_keeps_what_is_deleted_warns_once(pm, gcs_backend_options, gcs_endpoint, bucket,
                                                                  caplog, settings, told):
    import gcsfs

    import logging

    if settings:
        fs = gcsfs.GCSFileSystem(endpoint_url=gcs_endpoint, token="anon", skip_instance_cache=True)
        fs.call("PATCH", "b/{}", bucket, json=settings)
    ck = manager(pm, {"archive": gcs_backend_options()}, ["archive"], keep_last=1)
    with caplog.at_level(logging.WARNING, logger="ckptkit_gcs"):
        for step in range(4):
            ck.save(step=step, model=model())
        ck.close()
    assert keys(gcs_endpoint, f"{bucket}/ckpts/run") == ["step-0000000003/manifest.json", "step-0000000003/state.pt"]
    said = [r.getMessage() for r in caplog.records if r.name == "ckptkit_gcs"]
    if told is None:
        assert said == []
        return
    assert said == [f"backend 'archive': in bucket {bucket}, {told.format(bucket=bucket)}. ckptkit leaves those "
                    "copies; a bucket of checkpoints usually wants neither"]


def keys(endpoint: str, path: str) -> list[str]:
    import gcsfs

    fs = gcsfs.GCSFileSystem(endpoint_url=endpoint, token="anon", skip_instance_cache=True)
    try:
        return sorted(p[len(path) + 1:] for p in fs.find(path))
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("path, message", [
    ("s3://bucket/x", "has scheme s3://"),
    ("gs://", "names no bucket"),
    ("gs://UPPER/x", "is not a valid bucket name"),
    ("gs://bucket/team[12]", "which gs:// clients take for a pattern"),
    ("bucket/x", "is not a gs:// URI"),
])
def test_malformed_path_is_a_config_error_naming_the_key(pm, path, message):
    with pytest.raises(ConfigError) as err:
        manager(pm, {"archive": {"type": "gcs", "path": path}}, ["archive"])
    assert "backends.archive.path" in str(err.value) and message in str(err.value)


def test_entry_point_gives_both_roles(pm):
    btype = pm().backend_types["gcs"]
    assert btype.dist.startswith("ckptkit-gcs ")
    assert {r.value for r in btype.roles} == {"resume", "final"}


def test_save_prune_restore_cycle_and_final(pm, gcs_backend_options, gcs_endpoint, bucket):
    ck = manager(pm, {"archive": gcs_backend_options(part_size_mb=1)}, ["archive"], final=["archive"])
    m = model(1)
    for step in range(4):
        ck.save(step=step, model=m, epoch=1, metrics={"loss": float(step)},
                extra={"seen": step} if step == 3 else None)
    ck.finalize(model=m, step=3)
    assert keys(gcs_endpoint, f"{bucket}/ckpts/run") == [
        "final/final_model.pt", "final/manifest.json",
        "step-0000000002/manifest.json", "step-0000000002/state.pt",  # no extra, no extra.pt
        "step-0000000003/extra.pt", "step-0000000003/manifest.json", "step-0000000003/state.pt",
    ]
    m2 = model(2)
    restored = manager(pm, {"archive": gcs_backend_options()}, ["archive"]).restore(model=m2)
    assert restored.step == 3 and restored.ref.uri == f"gs://{bucket}/ckpts/run/step-0000000003"
    assert restored.extra == {"seen": 3}
    assert torch.equal(m[0].weight, m2[0].weight)


@pytest.mark.parametrize("planted", ["oversized", "empty"])
def test_a_manifest_too_large_or_empty_is_skipped_without_reading_it_whole(pm, gcs_backend_options, gcs_endpoint,
                                                                            bucket, planted):
    import gcsfs

    from ckptkit.storage import MANIFEST_MAX

    ck = manager(pm, {"archive": gcs_backend_options()}, ["archive"], keep_last=3)
    for step in (10, 20):
        ck.save(step=step, model=model(step))
    ck.close()
    body = b" " * (MANIFEST_MAX + 1) if planted == "oversized" else b""
    fs = gcsfs.GCSFileSystem(endpoint_url=gcs_endpoint, token="anon", skip_instance_cache=True)
    fs.pipe_file(f"{bucket}/ckpts/run/step-0000000020/{MANIFEST_NAME}", body)
    m = model(99)
    told = "larger than any manifest ckptkit writes" if planted == "oversized" else "not a readable manifest"
    with pytest.warns(RuntimeWarning, match=f"step-0000000020.*{told}"):
        restored = manager(pm, {"archive": gcs_backend_options()}, ["archive"]).restore(model=m)
    assert restored.step == 10


def test_multi_chunk_upload_round_trips(pm, gcs_backend_options):
    ck = manager(pm, {"archive": gcs_backend_options(part_size_mb=1)}, ["archive"])
    big = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB: several resumable chunks
    ck.save(step=0, model=big)
    m = torch.nn.Linear(1024, 1024, bias=False)
    assert manager(pm, {"archive": gcs_backend_options()}, ["archive"]).restore(model=m).step == 0
    assert torch.equal(m.weight, big.weight)


def test_local_and_remote_resume_newest_wins(pm, gcs_backend_options, tmp_path):
    local = {"type": "local", "path": str(tmp_path)}
    manager(pm, {"scratch": local}, ["scratch"]).save(step=4, model=model(4))
    manager(pm, {"archive": gcs_backend_options()}, ["archive"]).save(step=6, model=model(6))
    m = model(0)
    restored = manager(pm, {"scratch": local, "archive": gcs_backend_options()}, ["scratch", "archive"]).restore(model=m)
    assert (restored.step, restored.ref.backend) == (6, "archive")
    assert torch.equal(m[0].weight, model(6)[0].weight)


def test_a_bucket_that_does_not_exist_is_unavailable_never_an_empty_run(pm, gcs_backend_options, bucket):
    options = gcs_backend_options()
    options["path"] = options["path"].replace(bucket, bucket + "x")
    ck = manager(pm, {"archive": options}, ["archive"])
    with pytest.raises(ckptkit.StorageUnavailableError, match=f"backend 'archive'.*{bucket}x"):
        ck.restore(model=model())


def test_transient_fault_is_retried(pm, gcs_backend_options, make_fault_proxy, gcs_port, gcs_endpoint, bucket):
    proxy = make_fault_proxy(gcs_port)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    chunk = proxy.add(FaultT(lambda m, p: "upload_id=" in p and "state.pt" in p, status=503, times=1,
                             body=b'{"error": {"code": 503, "message": "injected"}}'))
    listing = proxy.add(FaultT(lambda m, p: m == "GET" and "/o?" in p, status=500, times=1,
                               body=b'{"error": {"code": 500, "message": "injected"}}'))
    ck = manager(pm, {"archive": gcs_backend_options(endpoint=proxy.url, part_size_mb=1)}, ["archive"])
    big = torch.nn.Linear(1024, 1024, bias=False)
    ck.save(step=0, model=big)
    assert chunk.hits == 1 and listing.hits == 1
    m = torch.nn.Linear(1024, 1024, bias=False)
    assert ck.restore(model=m).step == 0 and torch.equal(m.weight, big.weight)
    assert json.loads(keys and __import__("gcsfs").GCSFileSystem(
        endpoint_url=gcs_endpoint, token="anon", skip_instance_cache=True).cat_file(
        f"{bucket}/ckpts/run/step-0000000000/{MANIFEST_NAME}"))["step"] == 0


def test_a_state_damaged_on_its_way_is_read_again_not_passed_over(pm, gcs_backend_options, make_fault_proxy,
                                                                   gcs_port, bucket, caplog):
    """One bit flipped in flight (gcsfs checks no checksum of what it reads) made the newest
    checkpoint "damaged": restore went back to the step before, which the next save wrote over.
    Damaged where it is kept, every read disagrees, and the step before is restored."""
    proxy = make_fault_proxy(gcs_port)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    ck = manager(pm, {"archive": gcs_backend_options(endpoint=proxy.url)}, ["archive"], keep_last=3)
    for step in (1, 2):
        ck.save(step=step, model=model(step))
    def newest(method, path):  # the bytes of step 2's state (alt=media), not its metadata
        return method == "GET" and "alt=media" in path and any(
            s in path for s in ("step-0000000002%2Fstate.pt", "step-0000000002/state.pt"))

    once = proxy.add(FaultT(newest, flip=True, times=1))
    m = model(99)
    restored = manager(pm, {"archive": gcs_backend_options(endpoint=proxy.url)}, ["archive"]).restore(model=m)
    assert once.hits == 1 and (restored.step, restored.skipped) == (2, ())
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model(2).state_dict().values()))
    assert "step-0000000002/state.pt did not match its checksum as read; reading it again" in caplog.text
    # verify (and prune by hand, which verifies) reads again too: CORRUPT is what users delete.
    proxy.clear()
    again = proxy.add(FaultT(newest, flip=True, times=1))
    checking = manager(pm, {"archive": gcs_backend_options(endpoint=proxy.url)}, ["archive"])
    assert checking.verify(restored.ref).step == 2 and again.hits == 1
    proxy.clear()
    again = proxy.add(FaultT(newest, flip=True, times=1))
    assert checking.reader.verify(restored.ref).step == 2 and again.hits == 1  # prune's check
    proxy.clear()
    always = proxy.add(FaultT(newest, flip=True, times=None))
    with pytest.warns(RuntimeWarning, match="does not match its checksum"):
        restored = manager(pm, {"archive": gcs_backend_options(endpoint=proxy.url)}, ["archive"]).restore(model=m)
    assert restored.step == 1 and always.hits == 2


def test_unrecoverable_fault_leaves_nothing_committed(pm, gcs_backend_options, make_fault_proxy, gcs_port,
                                                      gcs_endpoint, bucket, tmp_path):
    proxy = make_fault_proxy(gcs_port)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    denied = proxy.add(FaultT(lambda m, p: m in ("POST", "PUT") and "state.pt" in p, status=403, times=None,
                              body=b'{"error": {"code": 403, "message": "denied"}}'))
    both = {"scratch": {"type": "local", "path": str(tmp_path)}, "archive": gcs_backend_options(endpoint=proxy.url)}
    with pytest.raises(SaveError) as err:
        manager(pm, both, ["scratch", "archive"]).save(step=0, model=model())
    assert denied.hits >= 1
    failure = err.value.failures["archive"]
    assert isinstance(failure, BackendError)
    assert f"gs://{bucket}/ckpts/run/step-0000000000/state.pt" in str(failure)
    assert [r.backend for r in err.value.saved] == ["scratch"]
    assert keys(gcs_endpoint, f"{bucket}/ckpts/run") == []


@pytest.mark.parametrize("what", ["manifest.json", "state.pt"])
def test_a_newest_checkpoint_the_bucket_refuses_to_this_process_is_not_restored_past(
        pm, gcs_backend_options, make_fault_proxy, gcs_port, bucket, what):
    """gcsfs answers a 403 with a plain OSError: read as "could not be read" like any other, the
    step before the refused one was restored, and training would then save over the refused one."""
    from ckptkit import StorageUnavailableError

    proxy = make_fault_proxy(gcs_port)
    FaultT = type(proxy).__init__.__globals__["Fault"]
    options = {"archive": gcs_backend_options(endpoint=proxy.url, retry={"attempts": 1})}
    with manager(pm, options, ["archive"], keep_last=3) as ck:
        for step in (1, 2):
            ck.save(step=step, model=model(step))
    denied = proxy.add(FaultT(lambda m, p: m == "GET" and f"step-0000000002%2F{what}" in p, status=403, times=None,
                              body=b'{"error": {"code": 403, "message": "denied"}}'))
    ck = manager(pm, options, ["archive"], keep_last=3)
    with pytest.raises(StorageUnavailableError) as err:
        ck.restore(model=model(7))
    assert denied.hits >= 1
    text = str(err.value)
    assert "Forbidden" in text and "does not let this process read it" in text, text
    assert "step-0000000001 was not read" in text, text
    proxy.clear()
    assert ck.restore(model=model(7)).step == 2
    ck.close()


@pytest.mark.timeout(30)
def test_a_hung_store_fails_the_save_and_is_not_nothing_to_resume(pm, gcs_backend_options, silent_server, bucket):
    """A server that accepts and never answers. With one try per request (gcsfs's own retries
    off) and one attempt, each operation gives up after timeout_s."""
    from ckptkit import StorageUnavailableError

    options = gcs_backend_options(endpoint=f"http://127.0.0.1:{silent_server}", timeout_s=0.5,
                                  request_retries=0, retry={"attempts": 1})
    ck = manager(pm, {"archive": options}, ["archive"])
    with pytest.raises(SaveError) as err:
        ck.save(step=0, model=model())
    failure = err.value.failures["archive"]
    assert isinstance(failure, BackendError) and failure.backend == "archive"
    assert f"gs://{bucket}/ckpts/run/step-0000000000" in str(failure) and "Timeout" in str(failure)
    with pytest.raises(StorageUnavailableError, match="archive.*could not be listed.*[Tt]imeout"):
        ck.restore(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("extra, key", [
    ({"storage_option": {}}, "backends.archive.storage_option"),
    ({"storage_options": "endpoint"}, "backends.archive.storage_options"),
    ({"retry": {"attempts": 0}}, "backends.archive.retry.attempts"),
    ({"part_size_mb": 0}, "backends.archive.part_size_mb"),
    ({"leftover_grace_s": -1}, "backends.archive.leftover_grace_s"),
    ({"timeout_s": 0}, "backends.archive.timeout_s"),
    ({"request_retries": -1}, "backends.archive.request_retries"),
    # gcsfs took the path for a raw token, and the first request failed on the network.
    ({"storage_options": {"token": "/nonexistent/key.json"}}, "backends.archive.storage_options: its token names a key file that does not exist"),
    ({"storage_options": {"endpoint_url": "http://u:s3cr3t@127.0.0.1:9"}},
     "backends.archive.storage_options.endpoint_url: credentials (user:password@) do not belong in a URL"),
])
def test_bad_options_name_their_key(pm, extra, key):
    with pytest.raises(ConfigError) as err:
        manager(pm, {"archive": {"type": "gcs", "path": "gs://bucket/x", **extra}}, ["archive"])
    assert key in str(err.value)


def test_remote_only_resume_skips_a_corrupt_newest(pm, gcs_backend_options, gcs_endpoint, bucket):
    ck = manager(pm, {"archive": gcs_backend_options()}, ["archive"], keep_last=3)
    for step in (10, 20):
        ck.save(step=step, model=model(step))
    import gcsfs

    gcsfs.GCSFileSystem(endpoint_url=gcs_endpoint, token="anon", skip_instance_cache=True).pipe_file(
        f"{bucket}/ckpts/run/step-0000000020/state.pt", b"not a checkpoint")
    m = model(99)
    with pytest.warns(RuntimeWarning, match="step-0000000020"):
        restored = manager(pm, {"archive": gcs_backend_options()}, ["archive"]).restore(model=m)
    assert restored.step == 10
    assert torch.equal(m[0].weight, model(10)[0].weight)



def test_a_download_the_store_sends_a_byte_at_a_time_fails_the_restore_in_bounded_time(
        pm, gcs_backend_options, make_fault_proxy, gcs_port, bucket, in_thread):
    """aiohttp's read timeout is a wait between bytes: an answer sent a byte at a time held the
    restore for good. Each try of a request now ends by a deadline (the timeout plus what it
    sends and receives at the slowest rate that counts as progress)."""
    proxy = make_fault_proxy(gcs_port)
    opts = gcs_backend_options(endpoint=proxy.url, timeout_s=1.0, request_retries=0)
    opts["retry"] = {"attempts": 2, "backoff_s": 0.01}
    manager(pm, {"archive": gcs_backend_options()}, ["archive"]).save(step=0, model=model(3))
    FaultT = type(proxy).__init__.__globals__["Fault"]
    dripping = proxy.add(FaultT(lambda m, p: m == "GET" and "state.pt" in p and "alt=media" in p,
                                drip=0.1, times=None, hold=threading.Event()))
    restored = model()
    hung, outcome = in_thread(lambda: manager(pm, {"archive": opts}, ["archive"]).restore(model=restored))
    dripping.hold.set()
    assert not hung, "restore still waits on a store that sends a byte at a time"
    assert isinstance(outcome, ckptkit.StorageUnavailableError), outcome
    assert "archive" in str(outcome) and "was not done within" in str(outcome), outcome
    assert dripping.hits >= 2  # ckptkit's retry policy read it again
    proxy.clear()
    # The step is intact: read straight from the store, not through the proxy at 1 s a request.
    assert manager(pm, {"archive": gcs_backend_options()}, ["archive"]).restore(model=restored).step == 0
    assert torch.equal(restored[0].weight, model(3)[0].weight)


def test_an_upload_chunk_the_store_stops_reading_fails_the_save_in_bounded_time(
        pm, gcs_backend_options, make_fault_proxy, gcs_port, bucket, monkeypatch, in_thread):
    """aiohttp's read timeout starts once a body is sent: a chunk the store stopped reading held
    the save for good. The chunk's try now has a deadline; the slowest rate that counts as
    progress is raised here so that the test need not wait for 16 MiB at 64 KiB/s."""
    import ckptkit_gcs

    monkeypatch.setattr(ckptkit_gcs, "_MIN_RATE", 64 * 2**20, raising=False)
    proxy = make_fault_proxy(gcs_port)
    opts = gcs_backend_options(endpoint=proxy.url, timeout_s=2.0, request_retries=0, part_size_mb=16)
    opts["retry"] = {"attempts": 1}
    manager(pm, {"archive": gcs_backend_options()}, ["archive"]).save(step=0, model=model(n=8))
    ck = manager(pm, {"archive": opts}, ["archive"])
    FaultT = type(proxy).__init__.__globals__["Fault"]
    stalled = proxy.add(FaultT(lambda m, p: m in ("PUT", "POST") and "upload_id=" in p, unread=True,
                               times=None, hold=threading.Event()))
    big = model(n=2600)  # 27 MB: more than loopback's socket buffers take unread
    hung, outcome = in_thread(lambda: ck.save(step=1, model=big))
    stalled.hold.set()
    assert not hung, "save still waits on a store that stopped reading the upload"
    assert isinstance(outcome, SaveError) and "was not done within" in str(outcome), outcome
    assert stalled.hits >= 1
    assert [r.step for r in manager(pm, {"archive": gcs_backend_options()}, ["archive"]).list_checkpoints()] == [0]


def test_the_store_clock_a_prune_checks_ages_against_is_the_stores_own(gcs_backend_options, gcs_endpoint, bucket):
    """As for S3: the time the store gives an object written for the purpose, not this machine's
    clock, and the object is gone afterwards."""
    from ckptkit_gcs import GCSBackend

    options = gcs_backend_options()
    del options["type"]
    backend = GCSBackend.from_config("archive", options)
    store_now = backend._store_now("run", time.time() + 7200)
    assert abs(store_now - time.time()) < 60
    assert keys(gcs_endpoint, f"{bucket}/ckpts") == []
