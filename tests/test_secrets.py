"""The secrets scan: runs configured with credentials leave none of them anywhere people look.

Credentials go in through every door ckptkit has: S3 ``storage_options`` key and secret (real S3:
a moto server), an MLflow tracking URI with ``user:password@`` (a real tracking server, which
does not check basic auth unless configured to, so the credentials travel with every request),
and the ``AWS_*`` environment variables. Then save, restore, finalize, publish, ls, verify, check
and prune run, and also fail (a wrong endpoint, a server that is down, malformed URIs). The scan
reads stdout and stderr (at the file-descriptor level, so MLflow's own ``sys.stdout.write`` is
seen), the log records of ckptkit's loggers at DEBUG and of MLflow's and urllib3's at INFO, every
file under the test's folder (manifests, final models, fallbacks), every object in the bucket,
the MLflow run's params, tags and metric names, the registered versions' tags and sources, and
each exception's message and formatted traceback (its causes included).

botocore's own DEBUG log prints request headers (the SigV4 ``Authorization`` header holds the
access key id). ckptkit never raises botocore's log level, and the scan asserts that it stays
above DEBUG; a user who turns botocore debugging on gets what botocore prints.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import traceback
import uuid
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ckptkit_s3", reason="the secrets scan needs the ckptkit-s3 plugin (tox installs it)")
pytest.importorskip("ckptkit_mlflow", reason="the secrets scan needs the ckptkit-mlflow plugin (tox installs it)")

from ckptkit import CheckpointManager, CkptkitError  # noqa: E402
from ckptkit.cli import main  # noqa: E402
from ckptkit.redact import redact  # noqa: E402

from ckpt_helpers import make_model, train_step  # noqa: E402

pytestmark = pytest.mark.timeout(600)

_HEX = uuid.uuid4().hex
SECRETS = {
    "mlflow password": f"mlf-pw-{_HEX[:10]}",
    "storage_options key": f"sokey{_HEX[10:20]}",
    "storage_options secret": f"so/secret+{_HEX[:12]}",
    "AWS_ACCESS_KEY_ID": f"ENVKEY{_HEX[20:30].upper()}",
    "AWS_SECRET_ACCESS_KEY": f"env/secret+{_HEX[12:24]}",
    "AWS_SESSION_TOKEN": f"envtoken{_HEX[:16]}",
}
CKPTKIT_LOGGERS = ("ckptkit", "ckptkit_s3", "ckptkit_gcs", "ckptkit_mlflow")
CLIENT_LOGGERS = ("mlflow", "urllib3", "s3fs", "fsspec")


# -- servers ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server_class():
    """The tracking-server launcher of the mlflow plugin's tests, so both start it the same way."""
    path = Path(__file__).parents[1] / "plugins" / "ckptkit-mlflow" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_ckptkit_mlflow_test_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MlflowServer


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = _mlflow_server_class()(str(tmp_path_factory.mktemp("mlflow-server")), _free_port())
    server.start()
    yield server
    server.stop()
    server.log.close()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server in its own process (its request log stays out of this one)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRETS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRETS["AWS_SESSION_TOKEN"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    # A server that is down fails in seconds (these are what a user would export).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.fixture
def bucket(s3_endpoint, aws_env):
    import s3fs

    name = f"scan-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(name)
    return name


# -- the scan ---------------------------------------------------------------------------------

class Scan:
    """Everything a run left where people (or programs) look; ``assert_clean`` names each leak."""

    def __init__(self, capfd, caplog):
        self.capfd = capfd
        self.caplog = caplog
        self.seen: list[tuple[str, str]] = []
        caplog.set_level(logging.DEBUG)
        for name in CKPTKIT_LOGGERS:
            caplog.set_level(logging.DEBUG, logger=name)
        for name in CLIENT_LOGGERS:
            caplog.set_level(logging.INFO, logger=name)
        # Root at DEBUG would let botocore's header dumps through; keep it where users keep it.
        logging.getLogger().setLevel(logging.WARNING)
        caplog.handler.setLevel(logging.DEBUG)

    def add(self, where: str, text: str) -> str:
        self.seen.append((where, text))
        return text

    def output(self, where: str) -> tuple[str, str]:
        out, err = self.capfd.readouterr()
        self.add(f"{where}: stdout", out)
        self.add(f"{where}: stderr", err)
        return out, err

    def cli(self, *argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = self.output("ckptkit " + " ".join(argv[:1]))
        return code, out, err

    def error(self, where: str, exc: BaseException) -> None:
        self.add(f"{where}: message", str(exc))
        self.add(f"{where}: repr", repr(exc))
        self.add(f"{where}: traceback", "".join(traceback.format_exception(exc)))

    def files(self, root: Path) -> None:
        """Every file the runs wrote (the configs are the user's own input, with the credentials)."""
        for path in root.rglob("*"):
            if path.is_file() and path.suffix != ".yaml":
                self.add(f"file {path}", path.read_bytes().decode("latin-1"))

    def bucket(self, endpoint: str, bucket: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        for key in fs.find(bucket):
            self.add(f"object s3://{key}", fs.cat_file(key).decode("latin-1"))

    def mlflow(self, url: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(url, registry_uri=url)
        exp = client.get_experiment_by_name(experiment)
        self.add(f"experiment {experiment}", json.dumps([exp.name, exp.artifact_location, exp.tags]))
        for run in client.search_runs([exp.experiment_id]):
            self.add(f"run {run.info.run_id}", json.dumps({
                "params": run.data.params, "tags": run.data.tags, "metrics": sorted(run.data.metrics),
                "artifact_uri": run.info.artifact_uri, "name": run.info.run_name}))
            for v in client.search_model_versions(f"run_id='{run.info.run_id}'"):
                self.add(f"model version {v.name}/{v.version}",
                         json.dumps([v.source, v.tags, v.description, v.run_link]))

    def assert_clean(self) -> None:
        self.output("last")
        self.add("log records", "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}"
                                          for r in self.caplog.records))
        leaks = [f"{where} holds the {label}: ...{text[max(0, text.find(value) - 80):text.find(value) + 40]!r}..."
                 for where, text in self.seen for label, value in SECRETS.items() if value in text]
        assert not leaks, "credentials leaked:\n" + "\n".join(leaks[:20])
        assert logging.getLogger("botocore").getEffectiveLevel() > logging.DEBUG


@pytest.fixture
def scan(capfd, caplog):
    return Scan(capfd, caplog)


def _config(tmp_path, endpoint, bucket, tracking_uri, experiment, run_name="scan"):
    return {
        "run_name": run_name,
        "algorithm": "sft",
        "backends": {
            "scratch": {"type": "local", "path": str(tmp_path / "scratch")},
            "archive": {"type": "s3", "path": f"s3://{bucket}/ckpts",
                        "storage_options": {"endpoint_url": endpoint, "key": SECRETS["storage_options key"],
                                            "secret": SECRETS["storage_options secret"]},
                        "retry": {"attempts": 2, "backoff_s": 0.01, "max_backoff_s": 0.05}},
            "registry": {"type": "mlflow", "tracking_uri": tracking_uri, "experiment": experiment,
                         "registered_model_name": f"scan_{_HEX[:6]}_{{algorithm}}"},
        },
        "roles": {"resume": {"backends": ["scratch", "archive"], "every_n_steps": 1, "keep_last": 3},
                  "final": {"backends": ["registry"]}},
    }


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRETS['mlflow password']}@")


def _train(ck, steps):
    model, opt = make_model()
    for step in steps:
        loss = train_step(model, opt)
        ck.save(step=step, epoch=0, model=model, optimizer=opt, metrics={"loss": loss})
    return model, opt


def test_a_run_with_credentials_leaves_none_anywhere(tmp_path, monkeypatch, scan, bucket, s3_endpoint,
                                                     mlflow_server):
    monkeypatch.chdir(tmp_path)
    experiment = f"scan-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "ckptkit.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, s3_endpoint, bucket, _with_password(mlflow_server.url),
                                          experiment)))

    ck = CheckpointManager.from_config(str(cfg))
    _train(ck, range(4))
    ck.close()
    scan.output("save")
    ck = CheckpointManager.from_config(str(cfg))
    model, opt = make_model(1)
    restored = ck.restore(model=model, optimizer=opt)
    assert restored is not None and restored.step == 3
    ck.finalize(model=model, step=3, epoch=0, metrics={"loss": 0.5})
    ck.close()
    scan.output("restore and finalize")

    for command in ("ls", "verify", "check"):
        extra = ("--probe",) if command == "check" else ()
        code, out, _ = scan.cli(command, str(cfg), "--json", *extra)
        assert code == 0
        json.loads(out)
    code, out, _ = scan.cli("prune", str(cfg), "--dry-run", "--json")
    assert code == 0 and json.loads(out)["dry_run"] is True
    code, out, err = scan.cli("publish", str(cfg), "--step", "2", "--json")
    assert code == 0, err
    assert [p["backend"] for p in json.loads(out)["published"]] == ["registry"]

    scan.files(tmp_path)
    scan.bucket(s3_endpoint, bucket)
    scan.mlflow(mlflow_server.url, experiment)
    places = [where for where, _ in scan.seen]
    for kind in ("run ", "model version ", "object s3://", "file "):
        assert any(p.startswith(kind) and ("manifest" in p or kind in ("run ", "model version "))
                   for p in places), f"the scan read no {kind.strip()}"
    assert len([p for p in places if p.startswith("model version ")]) == 2  # finalize, publish
    scan.assert_clean()


def test_failures_with_credentials_leave_none_anywhere(tmp_path, monkeypatch, scan, bucket, s3_endpoint):
    from ckptkit.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    nothing = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    good = _config(tmp_path, s3_endpoint, bucket, _with_password(nothing), "down")

    # S3 at a wrong endpoint (the credentials of the environment this time), MLflow down.
    cfg = tmp_path / "down.yaml"
    down = json.loads(json.dumps(good))
    down["backends"]["archive"]["storage_options"] = {"endpoint_url": nothing}
    cfg.write_text(yaml.safe_dump(down))
    ck = CheckpointManager.from_config(str(cfg), fallback_dir=tmp_path / "fallback")
    with pytest.raises(CkptkitError) as err:
        _train(ck, range(1))
    scan.error("save to a wrong endpoint", err.value)
    model, opt = make_model()
    with pytest.raises(CkptkitError) as err:
        ck.finalize(model=model, step=0)
    scan.error("finalize with MLflow down", err.value)
    ck.close()
    scan.output("failing save and finalize")
    code, _, err_text = scan.cli("check", str(cfg), "--probe", "--json")
    assert code == 1 and "probe failed" in err_text
    code, _, _ = scan.cli("publish", str(cfg), "--fallback-dir", str(tmp_path / "fallback"), "--json")
    assert code == 1
    code, _, _ = scan.cli("ls", str(cfg))

    # Credentials where a URI is malformed: the error names the key without them.
    bad_uris = [
        ("registry", "tracking_uri", f"alice:{SECRETS['mlflow password']}@mlflow.internal:5000"),
        ("archive", "path", f"s3://{SECRETS['AWS_ACCESS_KEY_ID']}:{SECRETS['AWS_SECRET_ACCESS_KEY']}@{bucket}/x"),
        ("archive", "path", f"gs://{SECRETS['storage_options key']}:{SECRETS['storage_options secret']}@b/x"),
    ]
    for backend, key, value in bad_uris:
        bad = json.loads(json.dumps(good))
        bad["backends"][backend][key] = value
        with pytest.raises(ConfigError) as err:
            CheckpointManager.from_config(bad)
        assert f"backends.{backend}.{key}" in str(err.value)
        scan.error(f"config {backend}.{key}", err.value)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        code, _, err_text = scan.cli("check", str(path))
        assert code == 1 and f"backends.{backend}.{key}" in err_text

    scan.files(tmp_path)
    scan.assert_clean()


_LEAKS = {
    "stdout": lambda scan, tmp, value: os.write(1, value.encode()),
    "print": lambda scan, tmp, value: print(value),
    "stderr": lambda scan, tmp, value: os.write(2, value.encode()),
    "ckptkit debug log": lambda scan, tmp, value: logging.getLogger("ckptkit.fanout").debug("x %s", value),
    "plugin debug log": lambda scan, tmp, value: logging.getLogger("ckptkit_mlflow.backend").debug(value),
    "mlflow info log": lambda scan, tmp, value: logging.getLogger("mlflow.tracking").info(value),
    "manifest": lambda scan, tmp, value: (tmp / "manifest.json").write_text(value),
    "exception cause": lambda scan, tmp, value: scan.error("x", _raised(value)),
}


def _raised(value: str) -> BaseException:
    try:
        try:
            raise OSError(value)
        except OSError as exc:
            raise CkptkitError("wrapped") from exc
    except CkptkitError as exc:
        return exc


@pytest.mark.parametrize("channel", sorted(_LEAKS))
def test_the_scan_sees_a_secret_in(channel, tmp_path, capfd, caplog):
    scan = Scan(capfd, caplog)
    _LEAKS[channel](scan, tmp_path, SECRETS["mlflow password"])
    scan.files(tmp_path)
    with pytest.raises(AssertionError, match="holds the mlflow password"):
        scan.assert_clean()


# -- redaction itself -------------------------------------------------------------------------

@pytest.mark.parametrize("text,secret", [
    ("tracking_uri 'alice:s3cr3t@mlflow.internal:5000' is not a URI", "s3cr3t"),
    ("tracking_uri alice:s3cr3t@mlflow.internal is not a URI", "s3cr3t"),
    ("bob@corp.example:pa55@mlflow.internal:5000", "pa55"),
    ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCY@bucket/ckpts", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY"),
    ("s3://KEY:SECRET@bucket/ckpts", "SECRET"),
    ("'KEY:SECRET@bucket' is not a valid bucket name", "SECRET"),
    ("GET https://u:p%40ss@h:5000/api failed", "p%40ss"),
    ("http://alice:p@ss@host:5000/api", "ss@host"),
    ("postgresql+psycopg2://ml:dbpass@db:5432/mlflow", "dbpass"),
    ("https://ghp_token123@github.example/x", "ghp_token123"),
    ("tracking at http://alice:it's-Secret1@127.0.0.1:9 failed", "Secret1"),
    ('uri "http://alice:pw\"Secret2@host:5000/api"', "Secret2"),
    ("http://alice:<Secret3>@host", "Secret3"),
])
def test_redact_removes_userinfo(text, secret):
    assert secret not in redact(text)


def test_redact_removes_the_password_beside_a_known_key_in_a_url():
    """The key id is a known secret (storage_options, AWS_ACCESS_KEY_ID); replaced first, it
    hid the user part from the pattern, and the password stayed."""
    text = "Custom endpoint `http://AKIAIOSFODNN7EXAMPLE:Sup3r/S3cret+x@127.0.0.1:9000` was not a valid URI"
    out = redact(text, ("AKIAIOSFODNN7EXAMPLE",))
    assert "Sup3r" not in out and "AKIAIOSFODNN7EXAMPLE" not in out and "127.0.0.1:9000" in out


def test_the_repr_of_a_config_shows_no_credentials():
    """A config's repr reaches logs, tracebacks and debuggers."""
    from ckptkit.config import Config

    config = Config.from_dict({
        "backends": {
            "arch": {"type": "s3", "path": "s3://bkt/ck",
                     "storage_options": {"key": "AKIAABCDEFGHIJKLMNOP", "secret": "S3-SECRET-VALUE-xyz"}},
            "registry": {"type": "mlflow", "tracking_uri": "http://alice:PlainPw123@mlflow.internal:5000",
                         "experiment": "e"}},
        "roles": {"resume": {"backends": ["arch"]}, "final": {"backends": ["registry"]}}})
    shown = repr(config)
    for secret in ("AKIAABCDEFGHIJKLMNOP", "S3-SECRET-VALUE-xyz", "PlainPw123"):
        assert secret not in shown
    assert "s3://bkt/ck" in shown and "mlflow.internal:5000" in shown


@pytest.mark.parametrize("text", [
    "http://127.0.0.1:5000/api/2.0/mlflow/runs/get",
    "s3://bucket/team/ckpts/exp/step-0000000010",
    "models:/wmtp_sft/3",
    "backend 'registry': registering model 'm' on MLflow at http://***@host:5000 failed: x",
    "time 12:30 at the office",
    "a dict {'key': 'value'} and a ratio 3:4",
])
def test_redact_keeps_what_holds_no_credentials(text):
    assert redact(text) == text


def test_a_client_error_that_retry_passes_on_holds_no_credentials_in_its_chain():
    """A client's own error (not transient) goes up as the cause of ckptkit's: a traceback prints
    its text, and that of what it was raised from."""
    from ckptkit.retry import RetryPolicy

    password, key, secret = "Sup3" + "rPw", "KEYID" + "12", "Secr" + "3t"  # a traceback shows source lines

    def request():
        try:
            raise OSError(5, f"connect to http://alice:{password}@host:9 failed", f"s3://{key}:{secret}@bkt/x")
        except OSError as exc:
            raise ValueError(f"Invalid endpoint http://alice:{password}@host:9 (key {key})") from exc

    with pytest.raises(ValueError) as caught:
        RetryPolicy(attempts=1).call("a request", request, secrets=(key,))
    try:
        raise RuntimeError("ckptkit's own error") from caught.value
    except RuntimeError as wrapper:
        text = "".join(traceback.format_exception(wrapper))
    assert "Invalid endpoint" in text and "connect to" in text
    for shown in (password, secret, key):
        assert shown not in text, shown


class _Unreachable(Exception):
    """As urllib3's MaxRetryError: the URL it could not reach, in its text and as an attribute."""

    def __init__(self, url: str):
        self.url = url
        super().__init__(f"Max retries exceeded with url: {url}")


@pytest.mark.parametrize("failure", ["unreachable", "config"])
def test_a_backend_that_fails_to_be_built_shows_no_credential_of_its_config(pm, tmp_path, failure):
    """gcsfs checks a raw token as it is made, at tokeninfo?access_token=<token>; on a machine
    that cannot reach Google, the error from_config raised held the token in its text, its
    cause's, and the traceback a training job's log shows."""
    from ckptkit.errors import ConfigError, PluginError
    from ckptkit.local import LocalBackend

    token = "ya29." + "a-raw-access-token-0123"  # a traceback shows source lines

    class Vetting(LocalBackend):
        @classmethod
        def from_config(cls, name, options):
            given = options["storage_options"]["token"]
            if failure == "config":
                raise ConfigError(f"backends.{name}.storage_options.token: {given!r} is not a token file")
            try:
                raise _Unreachable(f"https://oauth2.example/tokeninfo?access_token={given}")
            except _Unreachable as exc:
                raise ConnectionError(exc)  # noqa: B904 - its text is its cause's, as requests' is

    pm.add_backend_type("vetting", Vetting)
    cfg = {"backends": {"g": {"type": "vetting", "path": str(tmp_path), "storage_options": {"token": token}}},
           "roles": {"resume": {"backends": ["g"]}}}
    with pytest.raises(ConfigError if failure == "config" else PluginError) as caught:
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    shown = ["".join(traceback.format_exception(caught.value)), repr(caught.value)]
    current = caught.value
    while current is not None:
        shown += [repr(current.args), str(getattr(current, "url", ""))]
        current = current.__cause__ or current.__context__
    assert not [text for text in shown if token in text], shown
    if failure == "unreachable":
        assert "backend 'g' (type 'vetting'" in str(caught.value) and "ConnectionError" in str(caught.value)
        assert "tokeninfo?<redacted>" in str(caught.value)


@pytest.mark.parametrize("mode", ["anon", "cloud", "cache", "browser", "google_default"])
def test_a_gcs_token_mode_is_no_secret_and_no_message_loses_it(mode):
    """gcsfs takes token: anon (and cloud, cache, browser, google_default) for how to find
    credentials; taken for a credential, "anon" was cut out of a bucket name in a config error."""
    from ckptkit.redact import secret_values

    assert secret_values({"storage_options": {"token": mode}}) == secret_values({})
    assert redact("backends.g.path: 'Canonical_Data' is not a valid bucket name",
                  secret_values({"storage_options": {"token": mode}})).startswith("backends.g.path: 'Canonical_Data'")
    assert "ya29.a-real-token" in secret_values({"storage_options": {"token": "ya29.a-real-token"}})


def test_redacting_twice_changes_nothing_more():
    """A client's message goes through several layers that each redact it: the query of a URL
    in it read "?<redacted><redacted><redacted>" after three."""
    text = 'Could not connect to the endpoint URL: "http://127.0.0.1:9000/bucket?list-type=2&prefix=run%2F"'
    once = redact(text)
    assert once == 'Could not connect to the endpoint URL: "http://127.0.0.1:9000/bucket?<redacted>"'
    assert redact(redact(once)) == once
