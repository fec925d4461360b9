"""The mlflow backend against a real tracking server on loopback and the embedded sqlite store."""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch
from mlflow.tracking import MlflowClient

from ckptkit import CheckpointManager, ConfigError, PublishError
from ckptkit.cli import main
from ckptkit.plugin import hash_stream
from ckptkit_mlflow import FINAL_URI_PARAM, MlflowBackend, redact


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(ck, model, opt, steps):
    loss = None
    for step in steps:
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ck.save(step=step, epoch=step // 10, model=model, optimizer=opt, metrics={"loss": loss.item()})
    return loss.item()


def _config(tmp_path, uri, experiment, model_name="reg_{algorithm}", final=("registry",), backends=None, **opts):
    return {
        "algorithm": "sft",
        "backends": {"scratch": {"type": "local", "path": str(tmp_path / "scratch")},
                     "registry": {"type": "mlflow", "tracking_uri": uri, "experiment": experiment,
                                  "registered_model_name": model_name, **opts},
                     **(backends or {})},
        "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 5, "keep_last": 2},
                  "final": {"backends": list(final)}},
    }


def _files(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(_files(client, run_id, a.path) if a.is_dir else [(a.path, a.file_size)])
    return out


def _manifest_run_ids(tmp_path, run_name):
    return {json.load(open(p))["mlflow_run_id"]
            for p in glob.glob(str(tmp_path / "scratch" / run_name / "step-*" / "manifest.json"))}


def _uid():
    return uuid.uuid4().hex[:8]


def _secret_uri(server):
    return server.url.replace("http://", "http://alice:s3cr3t-pw@")


# -- a real tracking server -------------------------------------------------------------------

def test_thirty_steps_leave_only_the_final_model_in_mlflow(tmp_path, mlflow_server):
    exp = f"thirty-{_uid()}"
    ck = CheckpointManager.from_config(_config(tmp_path, mlflow_server.url, exp), run_name="thirty")
    # Saves never wait for the run's lookup; waiting here makes every manifest name it.
    assert ck.tracking_run_id(timeout=60) is not None
    model, opt = _model()
    loss = _train(ck, model, opt, range(1, 31))
    refs = ck.finalize(model=model, step=30, epoch=3, metrics={"loss": loss, "acc": 0.75},
                       params={"n_layer": 2, "dropout": 0.1}, extra={"vocab": ["a"]})
    ck.close()
    assert [r.uri for r in refs] == ["models:/reg_sft/1"] or refs[0].uri.startswith("models:/reg_sft/")

    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    # Six resume saves happened (5, 10, ..., 30); MLflow holds one file: the final model.
    assert sorted(os.listdir(tmp_path / "scratch" / "thirty")) == ["step-0000000025", "step-0000000030"]
    files = _files(client, run.info.run_id)
    assert [p for p, _ in files] == ["checkpoints/final_model.pt"]
    on_server = [os.path.join(d, f) for d, _, fs in os.walk(mlflow_server.artifacts) for f in fs
                 if run.info.run_id in d]
    assert len(on_server) == 1 and on_server[0].endswith("checkpoints/final_model.pt")
    body = torch.load(on_server[0], weights_only=True)
    assert body["step"] == 30 and body["algorithm"] == "sft"
    assert body["params"] == {"n_layer": 2, "dropout": 0.1} and body["extra"] == {"vocab": ["a"]}
    assert all(torch.equal(body["model"][k], v) for k, v in model.state_dict().items())
    # The run of the checkpoints is the run of the model.
    assert _manifest_run_ids(tmp_path, "thirty") == {run.info.run_id}
    assert run.data.metrics == {"final/step": 30.0, "final/epoch": 3.0, "final/loss": pytest.approx(loss),
                                "final/acc": 0.75}
    assert run.data.tags["ckptkit.run_name"] == "thirty" and run.info.status == "FINISHED"
    assert FINAL_URI_PARAM not in run.data.params
    assert run.data.params == {"n_layer": "2", "dropout": "0.1"}, "the model's settings, to rebuild it"
    version = client.get_model_version("reg_sft", refs[0].uri.rsplit("/", 1)[1])
    assert version.run_id == run.info.run_id
    assert version.source.endswith("checkpoints/final_model.pt")


def test_server_down_at_finalize_then_publish_once_it_is_back(tmp_path, mlflow_server, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    exp = f"down-{_uid()}"
    secret_uri = mlflow_server.url.replace("http://", "http://alice:s3cr3t-pw@")
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, secret_uri, exp, model_name="down_{run_name}",
                                      timeout_s=4, retries=1)))
    fallback = tmp_path / "fallback"
    ck = CheckpointManager.from_config(str(cfg), run_name="down", fallback_dir=fallback)
    assert ck.tracking_run_id(timeout=60) is not None
    model, opt = _model(1)
    _train(ck, model, opt, range(1, 11))
    (run_id,) = _manifest_run_ids(tmp_path, "down")

    mlflow_server.stop()
    try:
        caplog.set_level(logging.DEBUG)
        t0 = time.monotonic()
        with pytest.raises(PublishError) as err:
            ck.finalize(model=model, step=10, epoch=1, metrics={"loss": 0.25})
        elapsed = time.monotonic() - t0
        ck.close()
        message = str(err.value)
        assert elapsed < 30, f"a down server took {elapsed:.0f} s to fail"
        assert "registry" in message and str(fallback) in message and "ckptkit publish" in message
        assert "s3cr3t-pw" not in message and "s3cr3t-pw" not in caplog.text
        assert "***@127.0.0.1" in message
        assert os.path.exists(fallback / "down" / "final" / "final_model.pt")
        probe = MlflowBackend.from_config("registry", {"tracking_uri": secret_uri, "timeout_s": 1,
                                                       "retries": 0}).probe()
        assert probe["connect"] != "ok" and "s3cr3t-pw" not in json.dumps(probe)
    finally:
        mlflow_server.start()

    assert main(["publish", str(cfg), "--run-name", "down", "--fallback-dir", str(fallback), "--json"]) == 0
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert [p for p, _ in _files(client, run_id)] == ["checkpoints/final_model.pt"]
    assert run.data.metrics["final/step"] == 10.0 and run.data.metrics["final/loss"] == 0.25
    (version,) = client.search_model_versions("name='down_down'")
    assert version.run_id == run_id and version.tags["ckptkit.digest"].startswith("xxh3_128:")
    assert all("s3cr3t" not in v for v in run.data.params.values())
    assert len(client.search_runs([client.get_experiment_by_name(exp).experiment_id])) == 1

    # The fallback still holds the model: publishing it again finds the version that has it.
    assert main(["publish", str(cfg), "--run-name", "down", "--fallback-dir", str(fallback), "--json"]) == 0
    assert [str(v.version) for v in client.search_model_versions("name='down_down'")] == [str(version.version)]


def test_finalize_and_publish_print_no_credentials_and_json_stays_json(tmp_path, mlflow_server, capfd, caplog):
    caplog.set_level(logging.INFO)
    exp = f"quiet-{_uid()}"
    name = f"quiet_{_uid()}"
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, _secret_uri(mlflow_server), exp, model_name=name)))
    ck = CheckpointManager.from_config(str(cfg), run_name="quiet")
    model, opt = _model(7)
    _train(ck, model, opt, range(1, 6))
    (ref,) = ck.finalize(model=model, step=5)
    ck.close()
    out, err = capfd.readouterr()
    assert "View run" not in out and "s3cr3t-pw" not in out + err
    # ckptkit says where the model went, without the credentials.
    assert any(ref.uri in r.getMessage() and "***@127.0.0.1" in r.getMessage() for r in caplog.records)
    assert "s3cr3t-pw" not in caplog.text

    code = main(["publish", str(cfg), "--run-name", "quiet", "--step", "5", "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert [p["backend"] for p in data["published"]] == ["registry"]
    assert "s3cr3t-pw" not in out + err


def test_publish_skips_a_registry_that_holds_the_same_bytes_unless_forced(tmp_path, mlflow_server, capfd):
    exp = f"dedup-{_uid()}"
    name = f"dedup_{_uid()}"
    archive = {"archive": {"type": "local", "path": str(tmp_path / "archive")}}
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, _secret_uri(mlflow_server), exp, model_name=name,
                                      final=("archive", "registry"), backends=archive)))
    ck = CheckpointManager.from_config(str(cfg), run_name="dedup")
    model, opt = _model(8)
    _train(ck, model, opt, range(1, 6))
    ck.finalize(model=model, step=5, metrics={"loss": 0.5})
    ck.close()
    client = MlflowClient(mlflow_server.url)
    (v1,) = client.search_model_versions(f"name='{name}'")
    assert str(v1.version) == "1"
    manifest = json.loads((tmp_path / "archive" / "dedup" / "final" / "manifest.json").read_text())
    assert v1.tags["ckptkit.digest"] == manifest["files"]["final_model.pt"]["digest"]
    capfd.readouterr()

    for _ in range(2):
        assert main(["publish", str(cfg), "--run-name", "dedup", "--json"]) == 0
        data = json.loads(capfd.readouterr().out)
        assert data["published"] == []
        assert data["already_held"] == [{"backend": "archive", "uri": f"file://{tmp_path}/archive/dedup/final"},
                                        {"backend": "registry", "uri": f"models:/{name}/1"}]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]

    assert main(["publish", str(cfg), "--run-name", "dedup", "--json", "--force"]) == 0
    data = json.loads(capfd.readouterr().out)
    assert [(p["backend"], p["uri"]) for p in data["published"]][1] == ("registry", f"models:/{name}/2")
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'")) == ["1", "2"]


@pytest.mark.timeout(120)
def test_a_hung_tracking_server_holds_up_no_save_and_fails_finalize_within_timeout_s(tmp_path, silent_server, caplog):
    uri = f"http://alice:s3cr3t-pw@127.0.0.1:{silent_server}"
    cfg = _config(tmp_path, uri, "hung", timeout_s=4, retries=1)
    ck = CheckpointManager.from_config(cfg, run_name="hung", fallback_dir=tmp_path / "fallback")
    model, opt = _model(9)
    _train(ck, model, opt, range(0, 6))  # the run's lookup hangs on its own thread meanwhile
    assert _manifest_run_ids(tmp_path, "hung") == {None}, "both saves were committed without the run"

    with pytest.raises(PublishError) as err:
        ck.finalize(model=model, step=5)
    ck.close()
    # finalize waited for the lookup in flight; once that found the server silent, it did not
    # ask again (a second wait as long): the lookup's one request, in two attempts, was all.
    assert silent_server.accepted == 2
    message = str(err.value)
    (warning,) = [r.getMessage() for r in caplog.records if "could not name the MLflow run" in r.getMessage()]
    assert "'registry'" in warning and f"***@127.0.0.1:{silent_server}" in warning
    assert "did not answer within 2 s (2 attempts, timeout_s: 4 bounds each request)" in warning
    assert f"registry: finding the run on MLflow at http://***@127.0.0.1:{silent_server} failed" in message
    assert err.value.failures["registry"].backend == "registry"
    assert "the tracking server did not answer within 2 s" in message and "raise timeout_s" in message
    assert str(tmp_path / "fallback") in message
    assert "s3cr3t-pw" not in message + caplog.text

    probe = MlflowBackend.from_config("registry", {"tracking_uri": uri, "timeout_s": 1, "retries": 0}).probe()
    assert "did not answer within 1 s (1 attempt," in probe["connect"]
    # Each further probe would wait as long again: a hung server is asked once.
    assert probe["experiment"] == probe["registry"] == "not tried (the connect failed)"


@pytest.mark.timeout(180)
def test_a_tracking_server_that_answers_a_byte_at_a_time_fails_finalize_in_bounded_time(
        tmp_path, mlflow_server, make_fault_proxy, in_thread):
    """urllib3's timeout waits for each next byte, so a dripping answer never trips it: each
    client call has a deadline of its own (two requests' worth, 2 x timeout_s), and finalize
    falls back to the fallback folder with the command that publishes it later."""
    proxy = make_fault_proxy(mlflow_server.port)
    cfg = _config(tmp_path, proxy.url, f"drip-{uuid.uuid4().hex[:8]}", timeout_s=4, retries=1)
    ck = CheckpointManager.from_config(cfg, run_name="drip", fallback_dir=tmp_path / "fallback")
    model, opt = _model(3)
    _train(ck, model, opt, range(0, 6))
    ck.wait()
    FaultT = type(proxy).__init__.__globals__["Fault"]
    # Every answer from now on, at a byte every 0.5 s: each read within the 2 s per attempt.
    dripping = proxy.add(FaultT(lambda m, p: True, drip=0.5, times=None, hold=threading.Event()))
    start = time.monotonic()
    running, outcome = in_thread(lambda: ck.finalize(model=model, step=5))
    took = time.monotonic() - start
    dripping.hold.set()  # the abandoned calls' connections close
    assert not running, "finalize still waited on a dripping server"
    assert isinstance(outcome, PublishError), outcome
    assert dripping.hits >= 1
    message = str(outcome)
    assert "had not finished" in message and "after 8 s" in message and "a byte at a time" in message
    assert str(tmp_path / "fallback") in message and "ckptkit publish" in message
    assert glob.glob(str(tmp_path / "fallback" / "**" / "final_model.pt"), recursive=True)
    # The run lookup (the manifests' run id) was made before; one call's deadline, then the rest.
    assert took < 60, f"finalize took {took:.0f} s against a dripping server"
    ck.close()


def test_calls_given_up_on_are_capped_and_a_calls_own_timeout_is_its_own():
    """A stand-in client whose calls wait as a dripping server makes them wait."""
    from ckptkit_mlflow.backend import _MAX_ABANDONED, CallTimedOut, _BoundedClient

    release = threading.Event()

    class Stalling:
        def hang(self):
            release.wait(60)
            return "late"

        def own_timeout(self):
            raise TimeoutError("the call's own")

    client = _BoundedClient(Stalling(), lambda: 0.05)  # each call gets 2 x 0.05 s
    with pytest.raises(TimeoutError, match="the call's own") as info:
        client.own_timeout()
    assert not isinstance(info.value, CallTimedOut)

    def hanging() -> int:  # the threads of calls to hang, not whatever else the process runs
        return sum(t.name == "ckptkit-mlflow-hang" and t.is_alive() for t in threading.enumerate())

    threads = hanging()
    for _ in range(_MAX_ABANDONED):
        with pytest.raises(CallTimedOut, match="had not finished hang after 0 s"):
            client.hang()
    with pytest.raises(CallTimedOut, match=f"{_MAX_ABANDONED} earlier calls .* still wait .* so hang was not sent"):
        client.hang()
    assert hanging() == threads + _MAX_ABANDONED, "no thread more for a call not sent"
    release.set()
    deadline = time.monotonic() + 10
    while hanging() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.hang() == "late"  # the calls given up on have ended: calls go out again


def test_settings_read_during_a_call_are_the_users_not_the_ones_the_call_set(monkeypatch):
    """Inside a call ckptkit sets MLFLOW_HTTP_REQUEST_*; an error explained there (or another
    thread's settings) must not take those for values the user exported."""
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)
    backend = MlflowBackend.from_config("registry", {"tracking_uri": "http://127.0.0.1:1"})
    outside = backend.http_settings()
    with backend._requests():
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(outside.timeout)
        seen = {}
        thread = threading.Thread(target=lambda: seen.update(other=backend.http_settings()))
        thread.start()
        thread.join()
        assert backend.http_settings() == outside and seen["other"] == outside
        assert outside.budget == 30 and "timeout_s: 30 bounds each request" in backend._cause(TimeoutError("timed out"))
    # What the user exports is still theirs.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(outside.timeout))
    assert backend.http_settings().budget is None


def test_a_run_link_logged_during_a_call_holds_no_credentials(caplog):
    # MLflow before 3 logs "View run <name> at: <tracking URI>/#/..." from set_terminated.
    from ckptkit_mlflow.backend import RUN_LINK_LOGGER

    caplog.set_level(logging.INFO)
    backend = MlflowBackend.from_config("registry", {"tracking_uri": "http://alice:s3cr3t-pw@127.0.0.1:1"})
    link = logging.getLogger(RUN_LINK_LOGGER)
    with backend._requests():
        link.info("View run %s at: %s.", "r", "http://alice:s3cr3t-pw@127.0.0.1:1/#/experiments/1/runs/abc")
    link.info("outside: %s", "http://bob:other-pw@h")  # ckptkit's calls only
    assert "View run r at: http://***@127.0.0.1:1/#/experiments/1/runs/abc." in caplog.text
    assert "s3cr3t-pw" not in caplog.text and "other-pw" in caplog.text


def test_http_settings_come_from_the_config_else_the_environment(monkeypatch):
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(var, raising=False)
    default = MlflowBackend.from_config("registry", {"tracking_uri": "http://127.0.0.1:1"})
    s = default.http_settings()
    # 30 s in all: three attempts of 9 s, 2 s of back-off between the second and the third.
    assert (s.timeout, s.retries, s.backoff, s.budget) == (9, 2, 1, 30)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "3")
    s = default.http_settings()
    assert (s.timeout, s.retries, s.budget) == (77, 2, None)  # what the user exported is kept
    with default._requests():
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"

    configured = MlflowBackend.from_config("registry", {"tracking_uri": "http://127.0.0.1:1", "timeout_s": 12,
                                                        "retries": 3})
    with configured._requests():  # the config wins over the environment
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] == "0"
    # ... and only for the duration of its calls.
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77" and os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] == "3"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ


# -- the embedded store -----------------------------------------------------------------------

def test_registry_versions_increment_and_keep_their_own_bytes(tmp_path, embedded_uri):
    exp = f"versions-{_uid()}"
    name = f"v{_uid()}_{{algorithm}}"
    sources = []
    for i, run_name in enumerate(["first", "second", "second"]):
        ck = CheckpointManager.from_config(_config(tmp_path, embedded_uri, exp, model_name=name), run_name=run_name)
        model, opt = _model(i)
        restored = ck.restore(model=model, optimizer=opt) if i == 2 else None  # "second" goes on
        start = restored.step + 1 if restored else 1
        _train(ck, model, opt, range(start, start + 5))
        (ref,) = ck.finalize(model=model, step=5 + i, algorithm="dpo")
        ck.close()
        sources.append((ref.uri, model.state_dict()["0.weight"].clone()))
    model_name = name.format(algorithm="dpo")
    client = MlflowClient(embedded_uri)
    versions = sorted(client.search_model_versions(f"name='{model_name}'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2", "3"]
    assert [r for r, _ in sources] == [f"models:/{model_name}/{n}" for n in (1, 2, 3)]
    assert versions[1].run_id == versions[2].run_id != versions[0].run_id
    # The second final of a run goes beside the first, so version 2 still points at its bytes.
    assert versions[2].source.endswith("checkpoints/final-2/final_model.pt")
    for v, (_, weight) in zip(versions, sources):
        local = client.download_artifacts(v.run_id, v.source.split(f"{v.run_id}/", 1)[1], str(tmp_path))
        assert torch.equal(torch.load(local, weights_only=True)["model"]["0.weight"], weight)
        assert v.tags["ckptkit.algorithm"] == "dpo"


def _s3_archive(spawn_server, monkeypatch) -> tuple[str, str, dict]:
    """A moto server with a new bucket: its endpoint, the bucket, and an S3 final backend's
    options for a prefix in it."""
    pytest.importorskip("ckptkit_s3")
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = spawn_server(lambda p: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)])
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"final-{_uid()}"
    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
    return endpoint, bucket, {"type": "s3", "path": f"s3://{bucket}/finals", "storage_options": {"endpoint_url": endpoint}}


def test_an_s3_final_copy_is_referenced_not_uploaded(tmp_path, embedded_uri, spawn_server, monkeypatch):
    import s3fs

    endpoint, bucket, archive = _s3_archive(spawn_server, monkeypatch)
    exp = f"s3-{_uid()}"
    cfg = _config(tmp_path, embedded_uri, exp, model_name=f"s3_{_uid()}", final=("registry", "archive"),
                  backends={"archive": archive})
    ck = CheckpointManager.from_config(cfg, run_name="ref")
    model, opt = _model(2)
    _train(ck, model, opt, range(1, 11))
    import ckptkit.manager

    serialised = []
    writer = ckptkit.manager.torch_writer
    monkeypatch.setattr(ckptkit.manager, "torch_writer",
                        lambda obj: (lambda f: (serialised.append(1), writer(obj)(f))[1]))
    refs = ck.finalize(model=model, step=10, epoch=1, metrics={"loss": 0.5})
    ck.close()
    assert [r.backend for r in refs] == ["archive", "registry"]  # the registry goes last
    # The registry took the checksum S3's upload computed: the model was serialised once, not
    # a second time to learn it.
    assert len(serialised) == 1
    client = MlflowClient(embedded_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    expected = f"s3://{bucket}/finals/ref/final/final_model.pt"
    assert run.data.params[FINAL_URI_PARAM] == expected
    assert _files(client, run.info.run_id) == []
    assert run.data.metrics == {"final/step": 10.0, "final/epoch": 1.0, "final/loss": 0.5}
    (version,) = client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert version.source == expected
    # No local copy existed, and the version still carries the checksum S3's manifest has.
    s3_manifest = json.loads(s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).cat_file(
        f"{bucket}/finals/ref/final/manifest.json"))
    assert version.tags["ckptkit.digest"] == s3_manifest["files"]["final_model.pt"]["digest"]

    # A later final of the run (trained on, finalized again) goes beside the first: version 1
    # still points at the bytes its checksum tag names.
    ck = CheckpointManager.from_config(cfg, run_name="ref")
    ck.restore(model=model, optimizer=opt)
    _train(ck, model, opt, range(11, 16))
    ck.finalize(model=model, step=15)
    ck.close()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    first, second = sorted(client.search_model_versions(f"run_id='{run.info.run_id}'"), key=lambda v: int(v.version))
    assert first.source == expected
    assert second.source == f"s3://{bucket}/finals/ref/final-2/final_model.pt"
    for v in (first, second):
        with fs.open(v.source) as f:
            assert hash_stream(f)[1] == v.tags["ckptkit.digest"], f"version {v.version} lost its bytes"
    assert first.tags["ckptkit.digest"] != second.tags["ckptkit.digest"]
    params = client.get_run(run.info.run_id).data.params
    assert (params[FINAL_URI_PARAM], params[f"{FINAL_URI_PARAM}-2"]) == (expected, second.source)


def test_final_held_asks_the_registry_for_the_newest_step_of_the_run(tmp_path, embedded_uri):
    """What a training restarted finished asks before publishing what a job stopped inside
    finalize left unpublished: the registry answers with the steps its versions carry."""
    exp = f"held-{_uid()}"
    cfg = _config(tmp_path, embedded_uri, exp, model_name=f"held_{_uid()}")
    ck = CheckpointManager.from_config(cfg, run_name="first")
    model, opt = _model(0)
    assert ck.final_held(5) is False
    ck.finalize(model=model, step=5)
    assert (ck.final_held(5), ck.final_held(4), ck.final_held(6)) == (True, True, False)
    ck.close()
    # Another run, registering to the same model name, holds none of its own.
    other = CheckpointManager.from_config(cfg, run_name="second")
    assert other.final_held(1) is False
    other.close()


def test_final_held_counts_the_versions_of_this_training_whatever_run_registered_them(tmp_path, embedded_uri,
                                                                                       monkeypatch):
    """A training restarted finished publishes what a job stopped inside finalize left
    unpublished, once: each launch in an active run of its own (transformers' MLflowCallback
    starts one) registers from that run, yet it is the same training. Another experiment's
    training of the same run name registers to the same model, and holds none of this one's."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", embedded_uri)
    mlflow.set_tracking_uri(embedded_uri)
    name = f"held_{_uid()}"
    other = _config(tmp_path / "other", embedded_uri, f"other-{_uid()}", model_name=name)
    with CheckpointManager.from_config(other, run_name="baseline") as ck:
        model, opt = _model(0)
        _train(ck, model, opt, range(1, 21))
        ck.finalize(model=model, step=20)
    cfg = _config(tmp_path / "mine", embedded_uri, f"mine-{_uid()}", model_name=name)
    with mlflow.start_run():
        with CheckpointManager.from_config(cfg, run_name="baseline") as ck:
            model, opt = _model(1)
            _train(ck, model, opt, range(1, 6))  # then stopped inside finalize
    for launch in range(3):
        with mlflow.start_run() as active, CheckpointManager.from_config(cfg, run_name="baseline") as ck:
            model, opt = _model(2)
            assert ck.restore(model=model, optimizer=opt).step == 5
            if launch == 0:
                assert ck.final_held(5) is False, "the other training's version of step 20 is not this one's"
                ck.finalize(model=model, step=5)
            assert ck.final_held(5) is True, f"launch {launch}: its own version, registered from another run"
    mine = [v for v in MlflowClient(embedded_uri).search_model_versions(f"name='{name}'") if v.tags["ckptkit.step"] == "5"]
    assert len(mine) == 1 and mine[0].run_id != active.info.run_id


def test_publishing_a_step_twice_registers_it_once(tmp_path, embedded_uri, capsys):
    exp = f"twice-{_uid()}"
    name = f"twice_{_uid()}"
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, embedded_uri, exp, model_name=name)))
    ck = CheckpointManager.from_config(str(cfg), run_name="twice")
    model, opt = _model(10)
    _train(ck, model, opt, range(1, 11))
    ck.close()
    client = MlflowClient(embedded_uri)
    for _ in range(2):
        assert main(["publish", str(cfg), "--run-name", "twice", "--step", "10", "--json"]) == 0
        assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    data = json.loads(capsys.readouterr().out.split("\n}\n", 1)[1])
    assert data["already_held"] == [{"backend": "registry", "uri": f"models:/{name}/1"}]
    # Another step is other bytes; --force registers the same bytes again.
    assert main(["publish", str(cfg), "--run-name", "twice", "--step", "5", "--json"]) == 0
    assert main(["publish", str(cfg), "--run-name", "twice", "--step", "10", "--json", "--force"]) == 0
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions) == ["1", "2", "3"]
    assert versions["3"].tags["ckptkit.digest"] == versions["1"].tags["ckptkit.digest"]
    assert versions["2"].tags["ckptkit.digest"] != versions["1"].tags["ckptkit.digest"]
    local = client.download_artifacts(versions["1"].run_id, versions["1"].source.split(f"{versions['1'].run_id}/", 1)[1],
                                      str(tmp_path))
    from ckptkit.hashing import hash_stream

    with open(local, "rb") as f:
        assert hash_stream(f)[1] == versions["1"].tags["ckptkit.digest"]


def test_a_restored_run_keeps_its_mlflow_run_id(tmp_path, embedded_uri):
    exp = f"restore-{_uid()}"
    cfg = _config(tmp_path, embedded_uri, exp)
    ck = CheckpointManager.from_config(cfg, run_name="crashy")
    assert ck.tracking_run_id(timeout=60) is not None
    model, opt = _model(3)
    _train(ck, model, opt, range(1, 13))
    ck.close()  # the job dies here, before finalize
    (first,) = _manifest_run_ids(tmp_path, "crashy")
    client = MlflowClient(embedded_uri)
    client.set_terminated(first, "KILLED")

    ck = CheckpointManager.from_config(cfg, run_name="crashy")
    model, opt = _model(4)
    restored = ck.restore(model=model, optimizer=opt)
    assert restored.step == 10 and restored.mlflow_run_id == first
    assert ck.tracking_run_id(timeout=60) == first
    _train(ck, model, opt, range(restored.step + 1, 21))
    ck.finalize(model=model, step=20, epoch=2)
    ck.close()
    assert _manifest_run_ids(tmp_path, "crashy") == {first}
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert [r.info.run_id for r in runs] == [first]
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["final/step"] == 20.0


def test_the_active_run_is_used_and_left_open(tmp_path, embedded_uri, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", embedded_uri)
    mlflow.set_tracking_uri(embedded_uri)
    exp = f"active-{_uid()}"
    ck = CheckpointManager.from_config(_config(tmp_path, embedded_uri, exp), run_name="mine")
    with mlflow.start_run(run_name="the-users-own") as active:
        assert ck.tracking_run_id(timeout=60) == active.info.run_id
        model, opt = _model(5)
        _train(ck, model, opt, range(1, 6))
        ck.finalize(model=model, step=5)
        ck.close()
        run = MlflowClient(embedded_uri).get_run(active.info.run_id)
        assert run.info.status == "RUNNING"
        assert run.data.metrics["final/step"] == 5.0
    assert _manifest_run_ids(tmp_path, "mine") == {active.info.run_id}


_IMPORT_SPY = """
import json, sys, threading
importers = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow":
            importers.append(threading.current_thread().name)

sys.meta_path.insert(0, Spy())
import torch
from ckptkit import CheckpointManager
config = json.loads(sys.argv[1])
ck = CheckpointManager.from_config(config, run_name="spied")
model = torch.nn.Linear(4, 4)
opt = torch.optim.AdamW(model.parameters())
ck.restore(model=model, optimizer=opt)
ck.save(step=5, model=model, optimizer=opt)
ck.tracking_run_id(timeout=60)
ck.close()
print(json.dumps(importers))
"""


def test_a_training_that_never_imported_mlflow_does_not_import_it_on_its_own_thread(tmp_path, embedded_uri):
    """No run can be active on a thread while mlflow is not imported: importing it there, about
    a second, would stop the first save; the run lookup imports it on its own thread."""
    import subprocess

    config = _config(tmp_path, embedded_uri, f"spied-{_uid()}")
    done = subprocess.run([sys.executable, "-c", _IMPORT_SPY, json.dumps(config)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    importers = json.loads(done.stdout.strip().splitlines()[-1])
    assert importers and "MainThread" not in importers, done.stderr
    assert _manifest_run_ids(tmp_path, "spied") != set()


def test_log_pytorch_model_is_the_only_copy(tmp_path, embedded_uri, monkeypatch):
    import mlflow.pytorch

    exp = f"flavour-{_uid()}"
    model_name = f"flav_{_uid()}"
    ck = CheckpointManager.from_config(_config(tmp_path, embedded_uri, exp, model_name=model_name,
                                               log_pytorch_model=True), run_name="flav")
    model, opt = _model(6)
    _train(ck, model, opt, range(1, 6))
    (ref,) = ck.finalize(model=model, step=5)
    ck.close()
    client = MlflowClient(embedded_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    paths = [p for p, _ in _files(client, run.info.run_id)]
    assert "checkpoints/model/MLmodel" in paths
    assert not any(p.endswith("final_model.pt") for p in paths)
    # A URI set by an earlier test in this process (the frameworks' MLflow loggers set one) wins
    # over the environment: set both; the conftest puts them back.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", embedded_uri)
    mlflow.set_tracking_uri(embedded_uri)
    mlflow.set_registry_uri(embedded_uri)
    loaded = mlflow.pytorch.load_model(ref.uri)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))


# -- configuration ----------------------------------------------------------------------------

def test_mlflow_for_resume_is_a_config_error_that_says_why(tmp_path):
    cfg = {"backends": {"registry": {"type": "mlflow"}}, "roles": {"resume": {"backends": ["registry"]}}}
    with pytest.raises(ConfigError) as err:
        CheckpointManager.from_config(cfg)
    text = str(err.value)
    assert "MLflow never holds resume checkpoints" in text and "nothing prunes" in text
    assert "roles.resume.backends" in text and "'registry'" in text


@pytest.mark.parametrize("options,match", [
    ({"registered_model_name": "m_{algo}"}, r"backends\.registry\.registered_model_name: unknown placeholder \{algo\}"),
    ({"registered_model_name": "m_{run_name!r}"}, "unknown placeholder"),
    ({"registered_model_name": "m_{"}, "not a valid template"),
    ({"experimnet": "x"}, r"backends\.registry\.experimnet: unknown key; did you mean 'experiment'"),
    ({"tracking_uri": "ftp://bob:hunter2@host/x"}, r"backends\.registry\.tracking_uri: 'ftp://\*\*\*@host/x'"),
    ({"log_pytorch_model": "yes"}, r"backends\.registry\.log_pytorch_model: must be true or false"),
    ({"timeout_s": 0.5}, r"backends\.registry\.timeout_s: must be a number >= 3"),
    ({"timeout_s": 2, "retries": 2}, r"backends\.registry\.timeout_s: must be a number >= 3"),
    ({"retries": -1}, r"backends\.registry\.retries: must be an integer >= 0"),
    ({"retries": 1.5}, r"backends\.registry\.retries: must be an integer"),
    ({"retries": 40}, r"backends\.registry\.retries: 40 retries do not fit the default timeout_s"),
    ({"request_timeout": 10}, r"backends\.registry\.request_timeout: replaced by timeout_s"),
    ({"request_max_retries": 1}, r"backends\.registry\.request_max_retries: replaced by retries"),
    ({"tracking_uri": "alice:hunter2@mlflow.internal:5000"},
     r"backends\.registry\.tracking_uri: '\*\*\*@mlflow\.internal:5000' is not a tracking URI"),
])
def test_bad_options_name_the_key(options, match):
    with pytest.raises(ConfigError, match=match) as err:
        MlflowBackend.from_config("registry", options)
    assert "hunter2" not in str(err.value)


def test_the_embedded_default_needs_no_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    backend = MlflowBackend.from_config("registry", {})
    assert backend.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert backend.artifact_location == f"file://{tmp_path}/mlartifacts"
    assert backend.registered_model_name == "{run_name}"


_CREATE_DB = """
import sys
from ckptkit_mlflow import MlflowBackend
MlflowBackend.from_config("registry", {"tracking_uri": sys.argv[1]}).client.search_experiments()
"""


def test_a_process_killed_while_the_database_is_created_leaves_none_the_next_one_cannot_use(tmp_path):
    """MLflow makes its tables in many migrations into the file itself: kill -9 between them left a
    database every later call refused ("index ... already exists"), ckptkit publish included."""
    folder = tmp_path / "store"
    folder.mkdir()
    uri = f"sqlite:///{folder}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", _CREATE_DB, uri], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not os.listdir(folder):
            time.sleep(0.001)
    finally:
        proc.kill()  # at once once the first file appears: MLflow is making its tables
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / "mlflow.db").exists(), "a half-made database was left in place"
    left = os.listdir(folder)
    assert len(left) == 1 and left[0].startswith(".mlflow.db.creating-"), left
    old = time.time() - 3600
    os.utime(folder / left[0], (old, old))

    cfg = _config(tmp_path, uri, "after-kill")
    ck = CheckpointManager.from_config(cfg, run_name="after-kill", fallback_dir=tmp_path / "fb")
    model, _ = _model()
    refs = ck.finalize(model=model, step=1, algorithm="sft")
    ck.close()
    assert [r.uri for r in refs] == ["models:/reg_sft/1"]
    # The scratch of the killed process, an hour old, is gone.
    assert sorted(os.listdir(folder)) == ["mlartifacts", "mlflow.db"]


def test_the_final_model_loads_back_as_the_quickstart_says(tmp_path, embedded_uri):
    """docs/quickstart.md, "Loading the final model back": the version's source, downloaded and
    loaded weights-only, is the trained state dict with its step."""
    import mlflow

    cfg = _config(tmp_path, embedded_uri, f"load-back-{_uid()}", model_name=f"load-back-{_uid()}")
    ck = CheckpointManager.from_config(cfg, run_name="load-back", fallback_dir=tmp_path / "fb")
    model, _ = _model(seed=3)
    [ref] = ck.finalize(model=model, step=7, algorithm="sft")
    ck.close()
    name, number = ref.uri.split("/")[1:]

    version = MlflowClient(embedded_uri).get_model_version(name, number)
    path = mlflow.artifacts.download_artifacts(version.source, tracking_uri=embedded_uri)
    final = torch.load(path, weights_only=True)
    fresh, _ = _model(seed=4)
    fresh.load_state_dict(final["model"])
    assert final["step"] == 7
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_an_embedded_store_in_a_folder_not_made_yet_or_under_an_encoded_name_is_created(tmp_path):
    """What MLflow itself creates: the folder of the database, and the name its URI encodes."""
    for uri, made in [(f"sqlite:///{tmp_path}/new/mlflow.db", tmp_path / "new" / "mlflow.db"),
                      (f"sqlite:///{tmp_path}/my%20store.db", tmp_path / "my store.db")]:
        MlflowBackend.from_config("registry", {"tracking_uri": uri}).client.search_experiments()
        assert made.is_file(), uri
    assert sorted(os.listdir(tmp_path)) == ["my store.db", "new"]  # no scratch left beside them


def test_a_missing_algorithm_is_named(tmp_path, embedded_uri):
    cfg = _config(tmp_path, embedded_uri, f"noalgo-{_uid()}")
    del cfg["algorithm"]
    ck = CheckpointManager.from_config(cfg, run_name="noalgo", fallback_dir=tmp_path / "fb")
    model, _ = _model()
    with pytest.raises(PublishError, match=r"uses \{algorithm\}, but no algorithm is given"):
        ck.finalize(model=model, step=1)
    ck.close()


def test_redact():
    assert redact("GET https://u:p@h:5000/api failed; also http://x@y") == \
        "GET https://***@h:5000/api failed; also http://***@y"


@pytest.mark.timeout(180)
def test_saves_never_wait_for_the_tracking_run(tmp_path, mlflow_server, make_fault_proxy):
    """Every request to the tracking server is held until the test lets it through: the saves
    commit meanwhile, the run's id reaches the manifests once known, and one run results."""
    proxy = make_fault_proxy(mlflow_server.port)
    gate = threading.Event()
    proxy.add(type(proxy).__init__.__globals__["Fault"](lambda method, path: True, times=None, hold=gate))
    exp = f"held-{_uid()}"
    ck = CheckpointManager.from_config(_config(tmp_path, proxy.url, exp, model_name="held_{algorithm}"),
                                       run_name="held")
    assert proxy.requests == [], "building a manager asks the tracking server nothing"
    model, opt = _model(11)
    _train(ck, model, opt, range(1, 11))
    assert proxy.requests, "the first save call started the lookup"
    assert _manifest_run_ids(tmp_path, "held") == {None}, "saves 5 and 10 went ahead without it"
    gate.set()
    run_id = ck.tracking_run_id(timeout=60)
    assert run_id is not None
    _train(ck, model, opt, range(11, 16))
    with open(tmp_path / "scratch" / "held" / "step-0000000015" / "manifest.json") as f:
        assert json.load(f)["mlflow_run_id"] == run_id
    (ref,) = ck.finalize(model=model, step=15)
    ck.close()
    client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name(exp).experiment_id])] == [run_id]
    assert client.get_model_version("held_sft", ref.uri.rsplit("/", 1)[1]).run_id == run_id


_KILLED_IN_UPLOAD = """
import json, sys, time
from ckptkit import CheckpointManager
from ckptkit.plugin import Payload, PayloadFile

def write(f):
    f.write(b"x" * 100000)
    open(sys.argv[2], "w").close()  # the copy to upload is being written: the parent kills us now
    time.sleep(120)

with CheckpointManager.from_config(json.loads(sys.argv[1]), run_name="killed") as ck:
    payload = Payload(run_name="killed", step=1, epoch=None, format="torch", role="final",
                      files=(PayloadFile("final_model.pt", write=write),))
    ck.router.instances["registry"].publish_final(run_name="killed", payload=payload, stored=[], algorithm="sft",
                                                  model=None)
"""


def test_the_copy_a_killed_publish_was_uploading_is_swept_from_the_temporary_folder(tmp_path, embedded_uri):
    """A finalize killed while the registry's copy of the model was written left that copy (the
    model's full size) in TMPDIR for good: its folder was no scratch folder, which ckptkit sweeps."""
    from ckptkit.reading import SCRATCH_PREFIX, sweep_scratch

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    cfg = _config(tmp_path, embedded_uri, f"killed-{_uid()}")
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_IN_UPLOAD, json.dumps(cfg), str(ready)],
                             env={**os.environ, "TMPDIR": str(tmpdir)}, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the child never wrote its copy (exit {child.poll()})"
    finally:
        child.kill()
        child.wait()
    left = [p for p in tmpdir.iterdir() if p.name.startswith(SCRATCH_PREFIX + "mlflow-")]
    assert len(left) == 1 and (left[0] / "final_model.pt").stat().st_size == 100000, list(tmpdir.iterdir())
    assert sweep_scratch(str(tmpdir)) == [str(left[0])]
    assert not left[0].exists()


def test_a_retry_to_the_registry_alone_references_the_s3_copy_committed_before(tmp_path, embedded_uri, spawn_server,
                                                                                 monkeypatch):
    """The printed retry after a registry that failed in finalize names the registry alone: it
    uploaded the model again as an MLflow artifact, though the S3 final prefix held the same
    bytes, which the registry records by URI when both are sent in one go (FinOps probe)."""
    import yaml

    _, bucket, archive = _s3_archive(spawn_server, monkeypatch)
    exp = f"retry-{_uid()}"
    both = _config(tmp_path, embedded_uri, exp, model_name=f"retry_{_uid()}", final=("registry", "archive"),
                   backends={"archive": archive})
    archive_only = {**both, "roles": {**both["roles"], "final": {"backends": ["archive"]}}}
    ck = CheckpointManager.from_config(archive_only, run_name="retried")
    model, opt = _model(3)
    _train(ck, model, opt, range(1, 6))
    ck.finalize(model=model, step=5)  # the S3 copy committed; the registry's part left to the retry
    ck.close()
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(both))
    assert main(["publish", str(tmp_path / "both.yaml"), "--run-name", "retried", "--backend", "registry"]) == 0
    client = MlflowClient(embedded_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    (version,) = client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert version.source == f"s3://{bucket}/finals/retried/final/final_model.pt"
    assert _files(client, run.info.run_id) == [], "the model uploaded a second time"


def test_a_registration_that_failed_after_its_upload_is_retried_from_that_upload(tmp_path, embedded_uri):
    """The model uploaded, its registration refused (a model name MLflow does not take), then the
    printed retry run with the name fixed: the retry uploaded the model again to final-2, and the
    first upload stayed in the run, pointed at by nothing (FinOps probe)."""
    import yaml

    exp = f"reupload-{_uid()}"
    cfg = _config(tmp_path, embedded_uri, exp, model_name="bad:{run_name}")
    ck = CheckpointManager.from_config(cfg, run_name="reup")
    model, opt = _model(4)
    _train(ck, model, opt, range(1, 6))
    with pytest.raises(PublishError, match="Invalid model name"):
        ck.finalize(model=model, step=5)
    ck.close()
    client = MlflowClient(embedded_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    uploaded = _files(client, run.info.run_id)
    assert [p for p, _ in uploaded] == ["checkpoints/final_model.pt"]
    cfg["backends"]["registry"]["registered_model_name"] = "good_{run_name}"
    (tmp_path / "fixed.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["publish", str(tmp_path / "fixed.yaml"), "--run-name", "reup", "--backend", "registry"]) == 0
    assert _files(client, run.info.run_id) == uploaded, "uploaded a second time"
    (version,) = client.search_model_versions("name='good_reup'")
    assert version.run_id == run.info.run_id
    assert version.source.endswith("checkpoints/final_model.pt") and "final-2" not in version.source, version.source
