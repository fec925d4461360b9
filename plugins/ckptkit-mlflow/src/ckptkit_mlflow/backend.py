"""The ``mlflow`` backend type: the final model, once, in an MLflow run and its model registry.

It serves the ``final`` role only. ``publish_final`` uploads ``final_model.pt`` as the run's
artifact ``checkpoints/final_model.pt`` (or, when an S3/GCS final backend already holds it, logs
that URI as the run parameter ``final_checkpoint_uri``), logs ``final/epoch``, ``final/step`` and
``final/<metric>``, and registers a new model version whose source is that one copy, tagged
with the file's checksum (``ckptkit.digest``) so that ``ckptkit publish`` can tell that the
registry already holds those bytes (``find_published``). ``tracking_run_id`` names the MLflow
run whose id every resume manifest records.

Every request to a tracking server is bounded (``timeout_s``, ``retries``), and MLflow's own
printing of run links (which would show ``user:password@`` of the tracking URI on stdout) is
turned off around ckptkit's calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import string
import sys
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Iterator

import attrs

import ckptkit
from ckptkit.plugin import (BackendError, CheckpointRef, ConfigError, HashingWriter, Payload, PayloadFile,
                            check_number, check_options, counts_for, hash_stream, redact, scratch, secret_values)

log = logging.getLogger(__name__)

FINAL_FILE = "final_model.pt"
ARTIFACT_DIR = "checkpoints"
FLAVOUR_DIR = "model"
FINAL_URI_PARAM = "final_checkpoint_uri"
RUN_NAME_TAG = "ckptkit.run_name"
PLACEHOLDERS = ("algorithm", "run_name")
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
URI_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
DEFAULT_EXPERIMENT = "ckptkit"
DEFAULT_MODEL_NAME = "{run_name}"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
DIGEST_TAG = "ckptkit.digest"
# The training a version came from (``Payload.training_id``), for final_step.
TRAINING_TAG = "ckptkit.training_id"
# A run tag per final file uploaded, ``ckptkit.artifact.<folder>`` = its checksum: a publish
# retried after the registry failed (the upload done) registers that file rather than another copy.
ARTIFACT_TAG = "ckptkit.artifact."
# The most one request to the tracking server may take, retries included, unless configured.
DEFAULT_TIMEOUT_S = 30
DEFAULT_RETRIES = 2
BACKOFF_FACTOR = 1
_DIGEST_RE = re.compile(r"^[a-z0-9_]+:[0-9a-f]+$")
RENAMED = {"request_timeout": "timeout_s", "request_max_retries": "retries"}
_TIMEOUT_TYPES = frozenset({"ReadTimeoutError", "ConnectTimeoutError", "ReadTimeout", "ConnectTimeout",
                            "Timeout", "TimeoutError", "timeout"})
_UNREACHABLE_TYPES = frozenset({"NewConnectionError", "ConnectionRefusedError", "NameResolutionError",
                                "gaierror"})
# MLflow before 3 logs the run link (the tracking URI with any user:password@) at INFO here,
# with no switch to turn it off; MLflow 3 prints it, and MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
# turns that off.
RUN_LINK_LOGGER = "mlflow.tracking._tracking_service.client"
# After the tracking server failed to name a run, saves do not ask again for this long.
RUN_ID_RETRY_AFTER_S = 300.0

_ENV_LOCK = threading.RLock()
# The MLFLOW_HTTP_* values that ckptkit's own calls have set (``MlflowBackend._requests``), by
# variable, so that reading the environment never takes them for values the user exported.
_SET_HERE: dict[str, str] = {}
# urllib3's timeout bounds each wait for the next bytes, not a whole answer: a server that
# sends one byte at a time never trips it. Each client call therefore has a deadline of its own,
# for the few requests one call makes (each within timeout_s), and for an upload also its size
# at the slowest rate that counts as progress.
_REQUESTS_PER_CALL = 2
_MIN_RATE = 64 * 1024  # bytes per second
# Seconds a call may also spend waiting by design: a new model version is polled until the
# registry says it is ready (MLflow waits up to 300 s; Databricks registers asynchronously).
_WAITS = {"create_model_version": 300.0}
# Calls given up on whose threads still wait on the server, at most: past it, a call fails at
# once instead of leaving one more thread and connection behind (a server that drips answers to
# a run lookup retried every few minutes would otherwise gather them for as long as it trains).
_MAX_ABANDONED = 4
_abandoned_lock = threading.Lock()
_abandoned: set[int] = set()  # ids of the calls given up on that are still running
_BOUNDED_SCHEMES = ("http://", "https://", "databricks")


def _one_line(exc: BaseException) -> str:
    text = redact(str(exc), secret_values()).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:300] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what lies under it: causes, contexts, and urllib3's ``reason``."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]


class CallTimedOut(TimeoutError):
    """A call to the tracking server that went on past its deadline (``_BoundedClient``)."""


def _local_size(path: Any) -> int:
    """Bytes of a file, or of every file under a folder, that a call uploads (0 if unknown)."""
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        return os.path.getsize(path)
    except (OSError, TypeError, ValueError):
        return 0


class _BoundedClient:
    """An ``MlflowClient`` each of whose calls fails with ``CallTimedOut`` once it has run past its
    deadline (see ``_REQUESTS_PER_CALL``). The call goes on in a daemon thread that nothing waits
    for: the caller gets its error, and a process that ends does not wait for it either."""

    def __init__(self, client: Any, request_s: Any):
        self._client = client
        self._request_s = request_s  # the most one request may take, as the settings are now

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            seconds = _REQUESTS_PER_CALL * self._request_s() + _WAITS.get(name, 0.0)
            if name in ("log_artifact", "log_artifacts") and len(args) > 1:
                seconds += _local_size(args[1]) / _MIN_RATE
            outcome: Future = Future()

            def run() -> None:
                try:
                    outcome.set_result(attr(*args, **kwargs))
                except BaseException as exc:
                    outcome.set_exception(exc)
                finally:
                    with _abandoned_lock:
                        _abandoned.discard(id(outcome))

            with _abandoned_lock:
                if len(_abandoned) >= _MAX_ABANDONED:
                    raise CallTimedOut(f"{_MAX_ABANDONED} earlier calls to the tracking server still wait for it "
                                       f"to finish answering, so {name} was not sent; check that it is healthy")
            threading.Thread(target=run, name=f"ckptkit-mlflow-{name}", daemon=True).start()
            try:
                return outcome.result(timeout=seconds)
            except FutureTimeout:
                with _abandoned_lock:
                    if not outcome.done():  # still running: counted until it ends
                        _abandoned.add(id(outcome))
                if outcome.done() and outcome.exception() is not None:
                    raise outcome.exception() from None  # the call's own TimeoutError (builtin, as FutureTimeout)
                if outcome.done():
                    return outcome.result()
                raise CallTimedOut(f"the tracking server had not finished {name} after {seconds:.0f} s, though "
                                   "it answered within each attempt's timeout (it sends its answers too "
                                   "slowly, or a byte at a time); check that it is healthy, or raise "
                                   "timeout_s for a slow one") from None

        return call


def _network_failure(exc: BaseException) -> tuple[str, BaseException] | None:
    """``("timeout", e)`` when the server did not answer in time, ``("unreachable", e)`` when no
    connection could be made (``e``: the exception that says so), else None."""
    chain = list(_chain(exc))
    for kind, types in (("timeout", _TIMEOUT_TYPES), ("unreachable", _UNREACHABLE_TYPES)):
        found = [e for e in chain if type(e).__name__ in types]
        if found:
            return kind, found[0]
    return None


def _sleeps(backoff: int, retries: int) -> int:
    """Seconds urllib3 sleeps over ``retries`` retries: ``backoff * 2**(k-1)`` before the k-th,
    none before the first."""
    return sum(backoff * 2 ** (k - 1) for k in range(2, retries + 1))


@attrs.frozen
class HttpSettings:
    """How MLflow's HTTP client waits: per attempt, how many retries, how long between them."""

    timeout: int
    retries: int
    backoff: int
    budget: float | None  # the configured (or default) timeout_s these were derived from

    ENV = {"timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT", "retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
           "backoff": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"}

    @classmethod
    def within(cls, budget: float, retries: int) -> HttpSettings:
        """Attempts that together, sleeps between them included, stay within ``budget`` seconds.

        urllib3 sleeps ``backoff * 2**(k-1)`` before the k-th retry, except before the first.
        """
        attempts = retries + 1
        backoff = BACKOFF_FACTOR
        sleeps = _sleeps(backoff, retries)
        if budget - sleeps < attempts:
            backoff, sleeps = 0, 0
        return cls(timeout=max(1, int((budget - sleeps) // attempts)), retries=retries, backoff=backoff,
                   budget=budget)

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def environ(self) -> dict[str, str]:
        env = {var: str(getattr(self, field)) for field, var in self.ENV.items()}
        # Jitter and a server's Retry-After would stretch the sleeps past the budget.
        env["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0"
        env["MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER"] = "false"
        return env


class _Redacting(logging.Filter):
    """Rewrites a record that holds credentials into one that does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text, secret_values())
        if clean != text:
            record.msg, record.args = clean, ()
        return True


_REDACTING = _Redacting()


class _Discard:
    def write(self, data) -> int:
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def _active_run_id() -> str | None:
    """The id of the MLflow run this thread started (``mlflow.start_run``), if any."""
    mlflow = sys.modules.get("mlflow")
    # Not imported, or still being imported by the run lookup's thread: no run was started on
    # this thread then, and importing mlflow here would stop training for about a second at
    # the first save.
    if mlflow is None or getattr(getattr(mlflow, "__spec__", None), "_initializing", False):
        return None
    active = mlflow.active_run()
    return active.info.run_id if active is not None else None


def _is_active(run_id: str) -> bool:
    return _active_run_id() == run_id


def _template_fields(key: str, template: Any) -> str:
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{key}: must be a non-empty string such as 'wmtp_{{algorithm}}'")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{key}: {template!r} is not a valid template: {exc}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            raise ConfigError(
                f"{key}: unknown placeholder {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} in {template!r} (allowed: "
                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS) + ")"
            )
    return template


# A database being created beside its place younger than this may be another process's at work.
_SCRATCH_DB_AGE_S = 600.0


def _create_sqlite_whole(uri: str) -> None:
    """Create the SQLite database of ``uri`` with all of MLflow's tables, if it does not exist yet.

    MLflow makes its tables in dozens of migrations, one after another, into the file itself: a
    process killed in between (a training stopped with kill -9 while the run was looked up)
    left a database that every later MLflow call refused ("index ... already exists"), the
    retry ``ckptkit publish`` included. Here they are made in a file beside it, which is then
    linked into place whole; a database someone made meanwhile is kept. Where that cannot be
    done (a filesystem without hard links), MLflow creates it in place, as before.
    """
    if not uri.lower().startswith("sqlite:"):
        return
    from sqlalchemy.engine.url import make_url

    path = make_url(uri).database  # decoded as MLflow decodes it (%20 and the like)
    if not path or path == ":memory:" or path.startswith("file:") or os.path.exists(path):
        return
    from mlflow.tracking import MlflowClient

    folder, name = os.path.split(os.path.abspath(path))
    creating = None
    try:
        os.makedirs(folder, exist_ok=True)
        for entry in os.scandir(folder):  # what a process killed while creating it left
            if entry.name.startswith(f".{name}.creating-") and time.time() - entry.stat().st_mtime > _SCRATCH_DB_AGE_S:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        # A name no one else takes, and no file yet: MLflow makes its tables only in a new database.
        creating = os.path.join(folder, f".{name}.creating-{uuid.uuid4().hex[:12]}")
        scratch_uri = "sqlite:///" + urllib.parse.quote(creating)
        client = MlflowClient(tracking_uri=scratch_uri, registry_uri=scratch_uri)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's
        os.link(creating, path)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("could not create the MLflow database %s beside its place (%s); MLflow creates it in place",
                    path, exc)
    finally:
        if creating is not None:
            for leftover in (creating, creating + "-journal", creating + "-wal", creating + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)


def _tracking_uri(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a URI such as sqlite:///mlflow.db or http://host:5000")
    scheme = value.split(":", 1)[0].split("+", 1)[0].lower() if ":" in value else ""
    if scheme not in URI_SCHEMES:
        raise ConfigError(
            f"{key}: {redact(value)!r} is not a tracking URI MLflow reads here (schemes: "
            f"{', '.join(URI_SCHEMES)}); e.g. sqlite:///mlflow.db or http://127.0.0.1:5000"
        )
    if scheme in ("http", "https") and not re.match(r"^https?://[^/\s]+", value):
        raise ConfigError(f"{key}: {redact(value)!r} names no host")
    return value



class MlflowBackend:
    """Publishes the final model to MLflow. See the module docstring for what it logs."""

    OPTIONS = ("tracking_uri", "experiment", "registered_model_name", "artifact_location",
               "log_pytorch_model", "timeout_s", "retries")
    ROLE_HINTS = {
        "resume": (
            "MLflow never holds resume checkpoints: it keeps every logged artifact forever and "
            "nothing prunes it, so a checkpoint every N steps piles up there (30 saves of a 14 GB "
            "state add 420 GB); put resume checkpoints on a local, s3 or gcs backend and keep "
            "mlflow under roles.final, which also records the run id in every resume checkpoint"
        ),
    }

    def __init__(self, name: str, tracking_uri: str, experiment: str, registered_model_name: str,
                 artifact_location: str | None = None, log_pytorch_model: bool = False,
                 timeout_s: float | None = None, retries: int | None = None):
        self.name = name
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.registered_model_name = registered_model_name
        self.artifact_location = artifact_location
        self.log_pytorch_model = log_pytorch_model
        self.timeout_s = timeout_s
        self.retries = retries
        self.location = redact(tracking_uri)
        self._client = None
        self._experiment_id: str | None = None
        self._owned: set[str] = set()
        self._run_id_failed_at: float | None = None
        self._run_id_error: BaseException | None = None  # why the last lookup failed
        # The tracking run, looked up on a thread: (run name, resumed id, active id) -> its answer.
        self._lookup: Future | None = None
        self._lookup_key: tuple | None = None
        self._lookup_lock = threading.Lock()
        self._lookups_in_flight: set[Future] = set()

    def __repr__(self) -> str:
        return f"<MlflowBackend {self.name!r} at {self.location}>"

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> MlflowBackend:
        key = f"backends.{name}"
        for old, new in RENAMED.items():
            if old in options:
                raise ConfigError(f"{key}.{old}: replaced by {new} (timeout_s: the most seconds one request "
                                  "to the tracking server may take, retries included; retries: how many "
                                  "times a failed request is tried again)")
        check_options(key, options, cls.OPTIONS)
        artifact_location = options.get("artifact_location")
        if artifact_location is not None and (not isinstance(artifact_location, str) or not artifact_location):
            raise ConfigError(f"{key}.artifact_location: must be a path or URI, got {artifact_location!r}")
        if "tracking_uri" in options:
            uri = _tracking_uri(f"{key}.tracking_uri", options["tracking_uri"])
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            uri = _tracking_uri("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
        else:
            uri = "sqlite:///" + os.path.abspath(DEFAULT_DB)
        if uri.startswith("sqlite:") and artifact_location is None:
            # The embedded store: artifacts in a folder beside the database file.
            db = uri.split(":///", 1)[1] if ":///" in uri else DEFAULT_DB
            folder = os.path.dirname(os.path.abspath(db)) if db and db != ":memory:" else os.getcwd()
            artifact_location = os.path.join(folder, DEFAULT_ARTIFACTS)
        if artifact_location is not None and "://" not in artifact_location:
            artifact_location = "file://" + os.path.abspath(os.path.expanduser(artifact_location))
        experiment = options.get("experiment", DEFAULT_EXPERIMENT)
        if not isinstance(experiment, str) or not experiment.strip():
            raise ConfigError(f"{key}.experiment: must be a non-empty experiment name, got {experiment!r}")
        template = _template_fields(f"{key}.registered_model_name",
                                    options.get("registered_model_name", DEFAULT_MODEL_NAME))
        flavour = options.get("log_pytorch_model", False)
        if not isinstance(flavour, bool):
            raise ConfigError(f"{key}.log_pytorch_model: must be true or false, got {flavour!r}")
        retries = options.get("retries")
        if retries is not None:
            check_number(f"{key}.retries", retries, 0, integer=True)
        timeout = options.get("timeout_s")
        if timeout is not None:
            # MLflow waits whole seconds per attempt: each attempt needs at least one.
            attempts = (DEFAULT_RETRIES if retries is None else retries) + 1
            check_number(f"{key}.timeout_s", timeout, attempts)
        elif retries is not None and retries + 1 > DEFAULT_TIMEOUT_S:
            raise ConfigError(f"{key}.retries: {retries} retries do not fit the default timeout_s of "
                              f"{DEFAULT_TIMEOUT_S} s; set timeout_s to at least {retries + 1}")
        return cls(name, uri, experiment, template, artifact_location=artifact_location,
                   log_pytorch_model=flavour, timeout_s=timeout, retries=retries)

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _configured(self) -> bool:
        return self.timeout_s is not None or self.retries is not None

    def http_settings(self) -> HttpSettings:
        """How requests to the tracking server wait.

        ``timeout_s``/``retries`` from the config win. Without them, values the user exported in
        ``MLFLOW_HTTP_REQUEST_*`` are kept, and ckptkit's default budget fills in the rest.
        """
        if self._configured:
            return HttpSettings.within(DEFAULT_TIMEOUT_S if self.timeout_s is None else self.timeout_s,
                                       DEFAULT_RETRIES if self.retries is None else self.retries)

        def exported(field: str) -> int | None:
            var = HttpSettings.ENV[field]
            value = os.environ.get(var)
            if value is None or _SET_HERE.get(var) == value:
                return None  # unset, or set by a call of ckptkit's own that is under way
            try:
                return int(value)
            except ValueError:
                return None

        given = {f: exported(f) for f in HttpSettings.ENV}
        retries = DEFAULT_RETRIES if given["retries"] is None else given["retries"]
        derived = HttpSettings.within(DEFAULT_TIMEOUT_S, retries)
        if given["timeout"] is None and given["backoff"] is None:
            return derived
        return HttpSettings(timeout=derived.timeout if given["timeout"] is None else given["timeout"],
                            retries=retries, backoff=derived.backoff if given["backoff"] is None else given["backoff"],
                            budget=None)

    @contextlib.contextmanager
    def _requests(self) -> Iterator[None]:
        """Every MLflow call of this backend runs inside: bounded waits, no printed links.

        MLflow takes these settings only from environment variables, read on every request, so
        they are set for the duration of the call (under a lock) and put back afterwards.
        MlflowClient.set_terminated prints ``View run ... at: <tracking URI>`` to stdout, with
        any ``user:password@`` in it; MLflow's own switch turns that off, and where MLflow logs
        the line instead (before 3), a filter takes the credentials out of it.
        """
        wanted = self.http_settings().environ()
        wanted["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        link_logger = logging.getLogger(RUN_LINK_LOGGER)
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in wanted}
            ours = {k: _SET_HERE.get(k) for k in wanted}
            try:
                for k, v in wanted.items():
                    if (self._configured or saved[k] is None
                            or k == "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
                        os.environ[k] = _SET_HERE[k] = v
                link_logger.addFilter(_REDACTING)
                yield
            finally:
                link_logger.removeFilter(_REDACTING)
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                    if ours[k] is None:
                        _SET_HERE.pop(k, None)
                    else:
                        _SET_HERE[k] = ours[k]

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            _create_sqlite_whole(self.tracking_uri)
            client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            # Only an HTTP server can drip its answers; a database store is called as it is.
            bounded = self.tracking_uri.lower().startswith(_BOUNDED_SCHEMES)
            self._client = _BoundedClient(client, self._request_s) if bounded else client
        return self._client

    def _request_s(self) -> float:
        """The most seconds one request may take, its retries and the pauses between them included."""
        settings = self.http_settings()
        if settings.budget is not None:
            return settings.budget
        return settings.timeout * settings.attempts + _sleeps(settings.backoff, settings.retries)

    def _cause(self, exc: BaseException) -> str:
        """Why a call failed, in one line without credentials; a network failure says which."""
        settings = self.http_settings()
        if isinstance(exc, CallTimedOut):
            return str(exc)
        failure = _network_failure(exc)
        if failure is None:
            return _one_line(exc)
        kind, reason = failure
        tries = f"{settings.attempts} attempt{'s' if settings.attempts != 1 else ''}"
        bound = (f"timeout_s: {settings.budget:g} bounds each request" if settings.budget is not None
                 else "MLFLOW_HTTP_REQUEST_* as exported")
        if kind == "timeout":
            return (f"the tracking server did not answer within {settings.timeout} s ({tries}, {bound}); "
                    "check that it is up, or raise timeout_s for a slow one")
        return f"cannot connect to the tracking server ({tries}): {_one_line(reason)}"

    def _error(self, what: str, exc: BaseException) -> BackendError:
        return BackendError(self.name, f"{what} on MLflow at {self.location} failed: {self._cause(exc)}")

    def _get_experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location)
                except MlflowException as exc:
                    if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
                    self._experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                if exp.lifecycle_stage != "active":
                    raise BackendError(self.name, f"experiment {self.experiment!r} is deleted; restore "
                                       "it or set another backends.<name>.experiment")
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _usable_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            log.warning("backend %r: MLflow run %s is not usable: %s", self.name, run_id, _one_line(exc))
            return False
        return run.info.lifecycle_stage == "active"

    def _reopen(self, run_id: str) -> str:
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        self._owned.add(run_id)
        return run_id

    def _resolve_run(self, run_name: str, resumed_run_id: str | None, active_id: str | None) -> str:
        """The run to use: the caller's active run (``active_id``), the resumed one, the newest
        run of that name, or a new one."""
        if active_id is not None:
            if self._usable_run(active_id):
                return active_id
            log.warning("backend %r: the active MLflow run %s is not in %s; using a run named %r there",
                        self.name, active_id, self.location, run_name)
        if resumed_run_id and self._usable_run(resumed_run_id):
            return self._reopen(resumed_run_id)
        exp_id = self._get_experiment_id()
        runs = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1,
            order_by=["attributes.start_time DESC"])
        if runs:
            return self._reopen(runs[0].info.run_id)
        run = self.client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
        self._owned.add(run.info.run_id)
        return run.info.run_id

    def model_name(self, run_name: str, algorithm: str | None) -> str:
        problem = self._name_problem(algorithm)
        if problem:
            raise BackendError(self.name, problem)
        return self.registered_model_name.format(algorithm=algorithm or "", run_name=run_name)

    def _name_problem(self, algorithm: str | None) -> str | None:
        if algorithm is None and "{algorithm}" in self.registered_model_name:
            return (f"registered_model_name {self.registered_model_name!r} uses {{algorithm}}, but no algorithm "
                    "is given: set algorithm in the config, pass finalize(algorithm=...), or publish with "
                    "ckptkit publish --algorithm NAME")
        return None

    # -- hooks ------------------------------------------------------------------------------

    @ckptkit.hookimpl
    def check_final(self, run_name: str, algorithm: str | None) -> list[str]:
        problem = self._name_problem(algorithm)
        return [problem] if problem else []

    @ckptkit.hookimpl
    def tracking_run_id(self, run_name: str, resumed_run_id: str | None) -> str | None:
        # MLflow keeps the active run per thread: only the caller's thread can see it.
        key = (run_name, resumed_run_id, _active_run_id())
        with self._lookup_lock:
            lookup = self._lookup
            failed_at = self._run_id_failed_at
            retry = failed_at is None or time.monotonic() - failed_at >= RUN_ID_RETRY_AFTER_S
            if lookup is None or self._lookup_key != key or (lookup.done() and lookup.result() is None and retry):
                lookup = self._lookup = Future()
                self._lookup_key = key
                self._lookups_in_flight.add(lookup)
                lookup.add_done_callback(self._forget_lookup)
                # A daemon thread: a hung server must not keep the process from exiting.
                threading.Thread(target=self._look_up, args=(lookup, *key), name="ckptkit-mlflow-run",
                                 daemon=True).start()
        return lookup.result() if lookup.done() else None

    def _look_up(self, lookup: Future, run_name: str, resumed_run_id: str | None, active_id: str | None) -> None:
        run_id = None
        try:
            with self._requests():
                run_id = self._resolve_run(run_name, resumed_run_id, active_id)
            self._run_id_failed_at = None
        except Exception as exc:
            self._run_id_error = exc
            self._run_id_failed_at = time.monotonic()
            log.warning("backend %r: could not name the MLflow run at %s (checkpoints are saved without "
                        "it; asking again in %.0f s): %s", self.name, self.location, RUN_ID_RETRY_AFTER_S,
                        self._cause(exc))
        finally:
            lookup.set_result(run_id)

    def _forget_lookup(self, lookup: Future) -> None:
        with self._lookup_lock:
            self._lookups_in_flight.discard(lookup)

    def _settle_lookup(self) -> BaseException | None:
        """Wait for the lookups in flight, so that publishing cannot create a second run of the
        same name beside them. Each of their few requests is bounded by timeout_s.

        Returns why a lookup failed while this waited, where the server could not be reached or
        did not answer: asking it again at once would only wait as long a second time."""
        bound = 4 * self._request_s() + 5
        started = time.monotonic()
        with self._lookup_lock:
            pending = list(self._lookups_in_flight)
        for lookup in pending:
            try:
                lookup.result(timeout=bound)
            except TimeoutError:
                log.warning("backend %r: the MLflow run lookup is still waiting after %.0f s", self.name, bound)
        failed_at, error = self._run_id_failed_at, self._run_id_error
        if pending and failed_at is not None and failed_at >= started and error is not None:
            if _network_failure(error) is not None or isinstance(error, CallTimedOut):
                return error
        return None

    @ckptkit.hookimpl(trylast=True)
    def publish_final(self, run_name: str, payload: Payload, stored: list[CheckpointRef],
                      algorithm: str | None, model: Any | None) -> CheckpointRef:
        name = self.model_name(run_name, algorithm)
        if self.log_pytorch_model and model is None:
            raise BackendError(self.name, "log_pytorch_model needs the torch.nn.Module, which only "
                               "finalize(model=...) has; republish with log_pytorch_model: false, "
                               "or finalize again")
        remote = None if self.log_pytorch_model else next(
            (r for r in stored if r.uri.startswith(REMOTE_SCHEMES)), None)
        step = "hashing the final file"
        try:
            # Only a remote copy exists: its checksum is computed here, outside the env lock.
            digest = self._digest(payload) if remote is not None else None
            # Outside _requests: the lookup thread takes the same lock for its requests.
            unreachable = None if payload.mlflow_run_id else self._settle_lookup()
            step = "finding the run"
            if unreachable is not None:
                raise self._error(step, unreachable) from None
            with self._requests():
                run_id = payload.mlflow_run_id
                if run_id and self._usable_run(run_id):
                    if not _is_active(run_id):
                        self._owned.add(run_id)
                else:
                    run_id = self._resolve_run(run_name, None, _active_run_id())
                step = "logging the final metrics"
                self._log_final_metrics(run_id, payload, algorithm)
                sizes = None
                if self.log_pytorch_model:
                    step = "logging the pytorch-flavour model"
                    source = self._log_flavour(run_id, model)
                elif remote is not None:
                    source = remote.uri.rstrip("/") + "/" + FINAL_FILE
                    param = self._uri_param(run_id, source)
                    step = f"logging parameter {param}"
                    self.client.log_param(run_id, param, source)
                else:
                    step = f"uploading {ARTIFACT_DIR}/{FINAL_FILE}"
                    artifact, size, digest = self._upload(run_id, payload)
                    source = f"runs:/{run_id}/{artifact}"
                    sizes = {FINAL_FILE: size}
                step = f"registering model {name!r}"
                version = self._register(name, source, run_id, run_name, payload, algorithm, digest)
                if run_id in self._owned:
                    step = "ending the run"
                    self.client.set_terminated(run_id, "FINISHED")
        except BackendError:
            raise
        except Exception as exc:
            raise self._error(step, exc) from None
        uri = f"models:/{name}/{version}"
        log.info("backend %r: registered %s from MLflow run %s at %s", self.name, uri, run_id, self.location)
        return CheckpointRef(backend=self.name, run_name=run_name, step=payload.step, path=uri, uri=uri,
                             role="final", sizes=sizes)

    @ckptkit.hookimpl
    def find_published(self, run_name: str, digest: str, algorithm: str | None) -> CheckpointRef | None:
        """The registered version that already holds the final file with checksum ``digest``.

        ``ckptkit publish`` asks before sending a model, and skips this backend (unless
        ``--force``) when there is one. Versions are matched on the ``ckptkit.digest`` tag,
        within the model that this run and algorithm register to.
        """
        name = self.model_name(run_name, algorithm)
        if not _DIGEST_RE.match(digest):
            return None  # not a checksum ckptkit writes, so no version carries it
        try:
            with self._requests():
                found = self.client.search_model_versions(f"tags.`{DIGEST_TAG}` = '{digest}'")
        except Exception as exc:
            raise self._error(f"looking for a version of {name!r} that holds {digest}", exc) from None
        versions = sorted((v for v in found if v.name == name and v.status != "FAILED_REGISTRATION"),
                          key=lambda v: int(v.version))
        if not versions:
            return None
        v = versions[0]
        uri = f"models:/{name}/{v.version}"
        try:
            step = int(v.tags.get("ckptkit.step", -1))
        except ValueError:
            step = -1
        return CheckpointRef(backend=self.name, run_name=run_name, step=step, path=uri, uri=uri, role="final")

    @ckptkit.hookimpl
    def final_step(self, run_name: str, algorithm: str | None, training_id: str | None) -> int | None:
        """The highest ``ckptkit.step`` among the registered versions of the run's model that
        carry this run's name and, where they name one, training ``training_id``: the model
        name is shared by every experiment's run of that name, by default."""
        name = self.model_name(run_name, algorithm)
        try:
            with self._requests():
                found = self.client.search_model_versions(f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
        except Exception as exc:
            raise self._error(f"looking for the versions of {name!r} of run {run_name!r}", exc) from None
        steps = []
        for v in found:
            if (v.name == name and v.status != "FAILED_REGISTRATION"
                    and counts_for(v.tags.get(TRAINING_TAG), training_id)):
                try:
                    steps.append(int(v.tags.get("ckptkit.step", "")))
                except ValueError:
                    continue
        return max(steps, default=None)

    @ckptkit.hookimpl
    def probe(self) -> dict[str, Any]:
        db = self.tracking_uri.split(":///", 1)[1] if self.tracking_uri.startswith("sqlite:///") else None
        if db and db != ":memory:" and not os.path.exists(db):
            # MLflow would create the database to answer; a probe leaves no trace. The first
            # publish creates it, which needs a writable folder.
            folder = os.path.dirname(os.path.abspath(db))
            ok = os.path.isdir(folder) and os.access(folder, os.W_OK)
            return {"connect": "ok" if ok else f"cannot create the database {db}: {folder} is not a writable folder"}
        results: dict[str, Any] = {}
        with self._requests():
            for op, action in (("connect", lambda: self.client.search_experiments(max_results=1)),
                               ("experiment", lambda: self.client.get_experiment_by_name(self.experiment)),
                               ("registry", lambda: self.client.search_registered_models(max_results=1))):
                if results.get("connect", "ok") != "ok":
                    # A server that did not answer would make each further probe wait as long.
                    results[op] = "not tried (the connect failed)"
                    continue
                try:
                    action()
                    results[op] = "ok"
                except Exception as exc:
                    results[op] = self._cause(exc)
        return results

    @ckptkit.hookimpl
    def close(self) -> None:
        self._client = None

    # -- publishing steps -------------------------------------------------------------------

    def _log_final_metrics(self, run_id: str, payload: Payload, algorithm: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        values = {"final/step": float(payload.step)}
        if payload.epoch is not None:
            values["final/epoch"] = float(payload.epoch)
        values.update({f"final/{k}": float(v) for k, v in payload.metrics.items()})
        tags = [RunTag(RUN_NAME_TAG, payload.run_name)]
        if algorithm:
            tags.append(RunTag("ckptkit.algorithm", algorithm))
        self.client.log_batch(run_id, metrics=[Metric(k, v, ts, payload.step) for k, v in values.items()],
                              tags=tags, params=self._new_params(run_id, payload))

    def _new_params(self, run_id: str, payload: Payload) -> list:
        """The model's settings (``finalize(params=...)``) that the run does not hold yet.

        MLflow never changes a logged parameter; a second final of the run with other values
        keeps the first ones (they are in the final file either way) and says so.
        """
        from mlflow.entities import Param

        given = {k: str(v) for k, v in (getattr(payload, "params", None) or {}).items()}
        if not given:
            return []
        held = self.client.get_run(run_id).data.params
        changed = sorted(k for k, v in given.items() if k in held and held[k] != v)
        if changed:
            log.warning("backend %r: run %s already logs params %s with other values; MLflow keeps the first "
                        "ones, the final file holds the new ones", self.name, run_id, ", ".join(changed))
        return [Param(k, v) for k, v in given.items() if k not in held]

    def _uri_param(self, run_id: str, source: str) -> str:
        """The parameter that records ``source``: ``final_checkpoint_uri``, or for a later final
        of the run stored elsewhere (a file backend keeps each beside the last), the first of
        ``final_checkpoint_uri-2``, ``-3``... free or holding it. MLflow never changes a logged
        parameter."""
        held = self.client.get_run(run_id).data.params
        param, n = FINAL_URI_PARAM, 1
        while held.get(param, source) != source:
            n += 1
            param = f"{FINAL_URI_PARAM}-{n}"
        return param

    def _artifact_dir(self, run_id: str) -> str:
        """``checkpoints``, or a fresh subfolder when this run already holds a final model.

        A registered version points at its artifact, so a second final of the same run must not
        overwrite the first one's bytes.
        """
        taken = {a.path for a in self.client.list_artifacts(run_id, ARTIFACT_DIR)}
        if f"{ARTIFACT_DIR}/{FINAL_FILE}" not in taken:
            return ARTIFACT_DIR
        n = 2
        while f"{ARTIFACT_DIR}/final-{n}" in taken:
            n += 1
        return f"{ARTIFACT_DIR}/final-{n}"

    def _digest(self, payload: Payload) -> str:
        """The final file's checksum: known when it was stored before, else computed.

        When only a remote copy exists, the file is serialised once more into a hash and
        nowhere else (``torch.save`` writes the same bytes for the same state).
        """
        pf = self._final_file(payload)
        if pf.expected is not None:
            return pf.expected.digest
        if pf.source is not None:
            with open(pf.source, "rb") as f:
                return hash_stream(f)[1]
        sink = HashingWriter(_Discard())
        pf.write(sink)
        return sink.digest()

    def _upload(self, run_id: str, payload: Payload) -> tuple[str, int, str]:
        """Upload the final file as a run artifact, unless the run holds one of the same bytes;
        its path in the run, size and checksum."""
        pf = self._final_file(payload)
        if pf.source is not None and os.path.basename(pf.source) == FINAL_FILE:
            size, digest = os.path.getsize(pf.source), self._digest(payload)
            return f"{self._send(run_id, pf.source, size, digest)}/{FINAL_FILE}", size, digest
        # A scratch folder: one a killed process left (a full copy of the model) is swept later.
        with scratch("mlflow") as tmp:
            path = os.path.join(tmp, FINAL_FILE)
            if pf.source is not None:
                os.symlink(os.path.abspath(pf.source), path)
                digest = self._digest(payload)
            else:
                # Nothing local holds the file yet: write it once, hashed on the way, and upload it.
                with open(path, "wb") as f:
                    w = HashingWriter(f)
                    pf.write(w)
                digest = w.digest()
            size = os.path.getsize(path)
            return f"{self._send(run_id, path, size, digest)}/{FINAL_FILE}", size, digest

    def _send(self, run_id: str, path: str, size: int, digest: str) -> str:
        """The run's folder that holds the final file at ``path``: one uploaded before with these
        bytes (a registration that failed after its upload), else a new one it is uploaded to."""
        for key, value in self.client.get_run(run_id).data.tags.items():
            if key.startswith(ARTIFACT_TAG) and value == digest:
                folder = key[len(ARTIFACT_TAG):]
                held = {a.path: a.file_size for a in self.client.list_artifacts(run_id, folder)}
                if held.get(f"{folder}/{FINAL_FILE}") == size:
                    return folder
        folder = self._artifact_dir(run_id)
        self.client.log_artifact(run_id, path, folder)
        self.client.set_tag(run_id, ARTIFACT_TAG + folder, digest)
        return folder

    def _log_flavour(self, run_id: str, model: Any) -> str:
        import mlflow.pytorch
        import torch

        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        if any(type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule") or
               type(m).__name__.startswith("FSDP") for m in model.modules()):
            raise BackendError(self.name, "log_pytorch_model cannot pickle an FSDP-sharded module; "
                               "set log_pytorch_model: false to register the gathered final_model.pt")
        taken = {a.path for a in self.client.list_artifacts(run_id, ARTIFACT_DIR)}
        folder = f"{ARTIFACT_DIR}/{FLAVOUR_DIR}"
        n = 2
        while folder in taken:
            folder = f"{ARTIFACT_DIR}/{FLAVOUR_DIR}-{n}"
            n += 1
        with scratch("mlflow") as tmp:
            path = os.path.join(tmp, "model")
            mlflow.pytorch.save_model(model, path, serialization_format="pickle")
            self.client.log_artifacts(run_id, path, folder)
        return f"runs:/{run_id}/{folder}"

    def _register(self, name: str, source: str, run_id: str, run_name: str, payload: Payload,
                  algorithm: str | None, digest: str | None) -> str:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {RUN_NAME_TAG: run_name, "ckptkit.step": str(payload.step)}
        if algorithm:
            tags["ckptkit.algorithm"] = algorithm
        if digest is not None:
            tags[DIGEST_TAG] = digest
        if payload.training_id is not None:
            tags[TRAINING_TAG] = payload.training_id
        mv = self.client.create_model_version(name, source, run_id=run_id, tags=tags)
        return str(mv.version)

    def _final_file(self, payload: Payload) -> PayloadFile:
        for pf in payload.files:
            if pf.name == FINAL_FILE:
                return pf
        raise BackendError(self.name, f"the final payload has no {FINAL_FILE} (files: "
                           f"{', '.join(p.name for p in payload.files)})")
