"""The CheckpointManager: the training loop's one entry point to ckptkit."""

from __future__ import annotations

import logging
import operator
import os
import pickle
import re
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, TypeVar

import attrs
import torch
from torch.distributed.checkpoint.api import CheckpointException

from . import gather, ranks, sharded
from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import Config, ResumeRole, check_run_name
from .errors import BackendError, CheckpointError, CkptkitError, ConfigError, PublishError, SaveError
from .hashing import algorithm_of, copy_hashed, hash_stream
from .manifest import FileEntry, Manifest
from .plugins import CkptkitPluginManager, make_plugin_manager
from .retry import RetryPolicy
from .roles import Role
from .staging import Stager, live_storages
from .routing import Router

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_FILE = "state.pt"
EXTRA_FILE = "extra.pt"
FINAL_FILE = "final_model.pt"
DEFAULT_RUN_NAME = "default"


@attrs.frozen
class Restored:
    """What ``restore`` put back, and where it came from."""

    step: int
    epoch: int | None
    metrics: dict[str, float]
    extra: dict[str, Any]
    mlflow_run_id: str | None
    ref: CheckpointRef
    manifest: Manifest
    skipped: tuple[str, ...] = ()


def _count(name: str, given: Any) -> int:
    """A step or epoch as a plain int, so that manifests and pickles hold no numpy or torch objects.

    numpy integers and one-element integer tensors are fine; bools, floats and negatives are not.
    """
    try:
        value = None if isinstance(given, bool) else operator.index(given)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {given!r}")
    return value


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"metric names must be non-empty strings, got {k!r}")
        value = float(v.item() if torch.is_tensor(v) else v)
        out[k] = value
    return out


def _extra_state(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Extra state as stored: objects with ``state_dict()`` give their state, the rest as is."""
    return {k: v.state_dict() if callable(getattr(v, "state_dict", None)) else v
            for k, v in (extra or {}).items()}


def _save_writer(obj: Any):
    def write(f) -> None:
        # The stream is checksummed as it is written; torch's own per-record crc32 would read
        # every byte a second time for nothing.
        get, set_ = (getattr(torch.serialization, n, None) for n in ("get_crc32_options", "set_crc32_options"))
        before = get() if get else None
        if set_:
            set_(False)
        try:
            torch.save(obj, f)
        finally:
            if set_:
                set_(before)

    return write


class CheckpointManager:
    """Saves resume checkpoints when due, prunes them, restores the newest, publishes the final.

    Build it with ``from_config``. Call ``save`` every step on every rank (it only saves when
    due), ``restore`` once before training, ``finalize`` once at the end and ``close`` last.
    """

    def __init__(self, config: Config, run_name: str, pm: CkptkitPluginManager, router: Router,
                 on_error: str = "raise", fallback_dir: str | os.PathLike = "ckptkit-fallback"):
        if on_error not in ("raise", "warn"):
            raise ValueError("on_error must be 'raise' or 'warn'")
        self.config = config
        self.run_name = run_name
        self.pm = pm
        self.router = router
        self.on_error = on_error
        self.fallback_dir = os.path.abspath(fallback_dir)
        self.mlflow_run_id: str | None = None
        self._resumed_run_id: str | None = None
        self._closed = False
        self._stager = Stager()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    @classmethod
    def from_config(cls, source: str | os.PathLike | Mapping | Config, run_name: str | None = None,
                    *, plugin_manager: CkptkitPluginManager | None = None, on_error: str = "raise",
                    fallback_dir: str | os.PathLike = "ckptkit-fallback") -> CheckpointManager:
        """Load and check a config (a YAML path, a dict or a ``Config``) and build every backend.

        Every config error is raised here, before the first training step. ``run_name`` wins over
        the config's ``run_name``. ``on_error`` says what a failing backend does to ``save`` and
        ``finalize`` once every other backend was tried: ``raise`` or ``warn``.
        """
        config = Config.load(source)
        if config.resume is not None and config.resume.async_ and config.resume.format != "torch":
            raise ConfigError("roles.resume.async: asynchronous saving works with format: torch; "
                              "sharded (dcp) saves are synchronous, so set async: false")
        name = check_run_name(run_name, "run_name") if run_name else (config.run_name or DEFAULT_RUN_NAME)
        pm = plugin_manager or make_plugin_manager()
        router = Router(pm, config)
        return cls(config, name, pm, router, on_error=on_error, fallback_dir=fallback_dir)

    # -- helpers ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CkptkitError(f"the checkpoint manager of run {self.run_name!r} is closed; build a new one")

    @property
    def resume_role(self) -> ResumeRole:
        if self.config.resume is None:
            raise ConfigError("roles.resume: no resume backends are declared in the config")
        return self.config.resume

    def _tracking_run_id(self) -> str | None:
        if self.mlflow_run_id is None and self.config.final is not None:
            names = self.router.backends(Role.FINAL)
            self.mlflow_run_id = self.router.caller("tracking_run_id", names)(
                run_name=self.run_name, resumed_run_id=self._resumed_run_id)
        return self.mlflow_run_id or self._resumed_run_id

    def _fail(self, exc: SaveError) -> None:
        if self.on_error == "raise":
            raise exc
        warnings.warn(str(exc), RuntimeWarning, stacklevel=3)

    # -- saving -----------------------------------------------------------------------------

    def is_due(self, step: int) -> bool:
        return self.config.resume is not None and step % self.config.resume.every_n_steps == 0

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
             extra: Mapping[str, Any] | None = None, force: bool = False) -> list[CheckpointRef]:
        """Save a resume checkpoint if ``step`` is due (a multiple of every_n_steps), then prune.

        Call it on every rank. Returns the references of the committed copies (on every rank),
        empty when nothing was due. A backend that fails does not stop the others; once all were
        tried, a ``SaveError`` names the failures on every rank (or a warning does, with
        ``on_error="warn"``).

        With ``async: true`` it returns once the state is copied to CPU buffers (reused between
        saves), and rank 0 writes and prunes in a background thread while training goes on. It
        then returns ``[]``; the next due ``save``, or ``wait``, ``restore``, ``finalize`` or
        ``close``, waits for that write and reports its outcome as above. One save is in flight
        at a time.
        """
        self._check_open()
        role = self.resume_role
        step = _count("step", step)
        epoch = None if epoch is None else _count("epoch", epoch)
        if not force and not self.is_due(step):
            return []
        payload = Payload(
            run_name=self.run_name, step=step, epoch=epoch, format=role.format, files=(),
            metrics=_metrics(metrics), world_size=ranks.world_size(),
        )
        previous = self._collect()
        if role.format == "dcp":
            saved, failures = self._save_sharded(payload, gather.resume_state(model, optimizer, sharded=True),
                                                 _extra_state(extra))
            if saved:
                ranks.on_rank0(self._prune_after, saved, step)
            self._report(step, saved, failures)
            return saved
        state = gather.resume_state(model, optimizer)
        state["extra"] = _extra_state(extra)
        if role.async_:
            if ranks.rank() == 0:
                # Training may change the model as soon as save returns: write from a copy.
                # Gathered model and optimizer state that is a private copy already passes through;
                # ``extra`` may hold anything training keeps changing (an EMA's state), so it is copied.
                live = live_storages(model, optimizer)
                staged = {k: self._stager.stage(v, None if k == "extra" else live, (k,)) for k, v in state.items()}
                self._pending = self._pool().submit(self._store_full, payload, staged)
            if previous is not None:
                # Reported after this step's save started, so that a failure never drops it.
                self._report(*previous)
            return []
        status, result = ranks.on_rank0(self._store_full, payload, state)
        _, saved, failures = result if status == "ok" else (step, [], {"(all)": result})
        self._report(step, saved, failures)
        return saved

    def _store_full(self, payload: Payload, state: dict[str, Any]) -> tuple[int, list[CheckpointRef], dict[str, str]]:
        """Rank 0: write a full checkpoint to every resume backend, then prune. Never raises."""
        try:
            full = attrs.evolve(payload, files=(PayloadFile(STATE_FILE, write=_save_writer(state)),),
                                mlflow_run_id=self._tracking_run_id())
            saved, failures = self._store_each(Role.RESUME, full, "save_resume", step=payload.step)
            self._prune_after(saved, payload.step)
            return payload.step, saved, {n: str(e) for n, e in failures.items()}
        except Exception as exc:
            return payload.step, [], {"(all)": f"{type(exc).__name__}: {exc}"}

    def _report(self, step: int, saved: list[CheckpointRef], failures: dict[str, str]) -> None:
        if failures:
            detail = "; ".join(f"{n}: {e}" for n, e in failures.items())
            where = ", ".join(r.uri for r in saved) or "nowhere"
            self._fail(SaveError(f"step {step} was not saved to every resume backend ({detail}); "
                                 f"it is committed at: {where}",
                                 {n: BackendError(n, e) if n in self.router.instances else CkptkitError(e)
                                  for n, e in failures.items()}, saved))

    def _pool(self) -> ThreadPoolExecutor:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckptkit-save")
        return self._writer

    def wait(self) -> list[CheckpointRef]:
        """Wait for the asynchronous save in flight, if any, and report how it went.

        Call it on every rank (``save``, ``restore``, ``finalize`` and ``close`` call it). Returns
        the references of what that save committed; raises ``SaveError`` (or warns, with
        ``on_error="warn"``) on every rank if it failed.
        """
        outcome = self._collect()
        if outcome is None:
            return []
        step, saved, failures = outcome
        self._report(step, saved, failures)
        return saved

    def _collect(self) -> tuple[int, list[CheckpointRef], dict[str, str]] | None:
        """The outcome of the asynchronous save in flight, once it is done, on every rank."""
        if self.config.resume is None or not self.config.resume.async_:
            return None
        outcome = None
        if self._pending is not None:
            outcome = self._pending.result()
            self._pending = None
        return ranks.broadcast(outcome)

    def _prune_after(self, saved: list[CheckpointRef], step: int) -> None:
        for ref in saved:
            try:
                self.router.call(ref.backend, "prune", run_name=self.run_name, keep_last=self.resume_role.keep_last,
                                 protected_steps=frozenset({step}), dry_run=False)
            except Exception as exc:
                log.warning("pruning backend %r failed (nothing committed was lost): %s", ref.backend, exc)

    def _save_sharded(self, payload: Payload, state: dict[str, Any], extra: dict[str, Any]):
        """Every rank writes its shards into each resume backend; rank 0 commits each one.

        The first backend that keeps files on local disk gets the shards from DCP; the others
        get each rank's own files copied from there, so nothing is serialised twice.
        """
        saved: list[CheckpointRef] = []
        failures: dict[str, str] = {}
        source: str | None = None
        mine: dict[str, FileEntry] = {}
        status, run_id = ranks.on_rank0(self._tracking_run_id)
        if status == "error":
            log.warning("no tracking run id for step %d: %s", payload.step, run_id)
        payload = attrs.evolve(payload, mlflow_run_id=run_id if status == "ok" else None)
        for name in self.router.backends(Role.RESUME):
            backend = self.router.instances[name]
            status, path = ranks.on_rank0(self.router.call, name, "stage_sharded", run_name=self.run_name,
                                          step=payload.step)
            if status == "error":
                failures[name] = path
                continue
            try:
                if source is None:
                    written = sharded.save(state, backend.fs, path, sync=bool(getattr(backend, "keeps_files_locally", False)))
                    if ranks.rank() == 0:
                        written[EXTRA_FILE] = _put_file(backend.fs, path, EXTRA_FILE, _save_writer(extra))
                else:
                    written = {n: _copy_file(os.path.join(source, n), backend.fs, path, n, e) for n, e in mine.items()}
                report: tuple[str, Any] = ("ok", written)
            except (Exception, CheckpointException) as exc:  # DCP's own error is a BaseException
                report = ("error", f"rank {ranks.rank()}: {type(exc).__name__}: {_first_line(exc)}")
            reports = ranks.all_gather(report)
            errors = [r[1] for r in reports if r[0] == "error"]
            if errors:
                ranks.on_rank0(self.router.call, name, "discard_sharded", path=path)
                failures[name] = "; ".join(errors)
                continue
            files = {n: e for r in reports for n, e in r[1].items()}
            status, ref = ranks.on_rank0(self.router.call, name, "commit_sharded", run_name=self.run_name,
                                         step=payload.step, path=path, payload=payload, files=files)
            if status == "ok" and not isinstance(ref, CheckpointRef):
                status, ref = "error", (f"backend {name!r}: commit_sharded returned {type(ref).__name__}, "
                                        "not a CheckpointRef; the backend plugin is faulty")
            if status == "error":
                ranks.on_rank0(self.router.call, name, "discard_sharded", path=path)
                failures[name] = ref
                continue
            saved.append(ref)
            if source is None and ref.local_dir:
                source, mine = ref.local_dir, report[1]
        return saved, failures

    def _store_each(self, role: Role, payload: Payload, hook: str, names: Iterable[str] | None = None,
                    stored: Iterable[CheckpointRef] = (), **role_kwargs: Any):
        """Call ``hook`` on each backend of ``role`` (or ``names``) in routing order; ``(saved, failures)``.

        ``role_kwargs`` are the hook's role-specific arguments (``step``; or ``algorithm`` and
        ``model``). Final backends also get ``stored``: where the model is already committed,
        starting from ``stored``.
        """
        saved: list[CheckpointRef] = []
        failures: dict[str, Exception] = {}
        copied = any(pf.source is not None for pf in payload.files)
        for name in self.router.backends(role) if names is None else names:
            kwargs = dict(role_kwargs, stored=[*stored, *saved]) if role is Role.FINAL else role_kwargs
            try:
                ref = self.router.call(name, hook, run_name=self.run_name, payload=payload, **kwargs)
            except Exception as exc:
                failures[name] = exc if isinstance(exc, CkptkitError) else BackendError(name, f"{type(exc).__name__}: {exc}")
                log.error("backend %r failed: %s", name, failures[name])
                continue
            if not isinstance(ref, CheckpointRef):
                failures[name] = BackendError(name, f"{hook} returned {type(ref).__name__}, not a CheckpointRef; "
                                                    "the backend plugin is faulty")
                continue
            saved.append(ref)
            if ref.local_dir and not copied:
                # Later backends copy these bytes instead of serialising the state again.
                manifest = self.router.call(name, "read_manifest", ref=ref)
                payload = payload.from_stored(ref.local_dir, manifest)
                copied = True
        return saved, failures

    # -- restoring --------------------------------------------------------------------------

    def list_checkpoints(self) -> list[CheckpointRef]:
        """Committed resume checkpoints across all resume backends, newest first."""
        self._check_open()
        refs = []
        for name in self.router.backends(Role.RESUME):
            try:
                refs.extend(self.router.call(name, "list_checkpoints", run_name=self.run_name) or [])
            except Exception as exc:
                log.warning("could not list backend %r: %s", name, exc)
        order = {n: i for i, n in enumerate(self.router.backends(Role.RESUME))}
        return sorted(refs, key=lambda r: (-r.step, order[r.backend]))

    def verify(self, ref: CheckpointRef) -> Manifest:
        """Check every file of a checkpoint against its manifest; return the manifest."""
        manifest = self.router.call(ref.backend, "read_manifest", ref=ref)
        self._check_files(ref, manifest, manifest.files)
        return manifest

    def _fetch(self, ref: CheckpointRef, manifest: Manifest, workdir: str) -> str:
        """A local folder holding the checkpoint's verified files."""
        if ref.local_dir:
            self.verify(ref)
            return ref.local_dir
        for name, entry in manifest.files.items():
            def copy(name=name, entry=entry):
                with self.router.call(ref.backend, "open_file", ref=ref, name=name) as src, \
                        open(os.path.join(workdir, name), "wb") as dst:
                    return copy_hashed(src, dst, algorithm_of(entry.digest))

            size, digest = self._reading(ref, name, copy)
            if (size, digest) != (entry.size, entry.digest):
                raise CheckpointError(f"{ref.uri}: {name} does not match its manifest")
        return workdir

    def _reading(self, ref: CheckpointRef, name: str, read: Callable[[], T]) -> T:
        """``read()`` of one file, retried whole by the backend's policy on transient errors.

        ``open_file`` retries only the open; the reads after it (one request per block on an
        object store) fail through to here.
        """
        backend = self.router.instances.get(ref.backend)
        policy = getattr(backend, "retry", None)
        if not isinstance(policy, RetryPolicy):
            return read()
        return policy.call(f"reading {ref.uri}/{name}", read, secrets=getattr(backend, "secrets", ()))

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                extra: Mapping[str, Any] | None = None, safe_globals: Iterable[Any] = ()) -> Restored | None:
        """Load the newest committed checkpoint across all resume backends into model and optimizer.

        Call it on every rank. A checkpoint that fails verification is skipped with a warning
        naming it and the next newest is tried. Objects in ``extra`` with ``load_state_dict`` get
        their saved state back. ``safe_globals`` lists extra types that
        ``torch.load(weights_only=True)`` may rebuild. Returns None when there is nothing to resume.
        """
        self._check_open()
        self.wait()
        safe_globals = list(safe_globals)
        skipped: list[str] = []
        status, candidates = ranks.on_rank0(self.list_checkpoints)
        for ref in candidates if status == "ok" else []:
            status, manifest = ranks.on_rank0(self.router.call, ref.backend, "read_manifest", ref=ref)
            if status == "ok" and manifest.format == "dcp":
                problem, saved_extra = self._restore_sharded(ref, manifest, model, optimizer, safe_globals)
            elif status == "ok":
                problem, saved_extra = self._restore_full(ref, manifest, model, optimizer, safe_globals)
            else:
                problem, saved_extra = manifest, None
            if problem is not None:
                reason = f"skipped {ref.uri}: {problem}"
                if ranks.rank() == 0:
                    warnings.warn(reason, RuntimeWarning, stacklevel=2)
                skipped.append(reason)
                continue
            for key, target in (extra or {}).items():
                if key in saved_extra and callable(getattr(target, "load_state_dict", None)):
                    target.load_state_dict(saved_extra[key])
            self._resumed_run_id = manifest.mlflow_run_id
            self.mlflow_run_id = None
            return Restored(step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics),
                            extra=saved_extra, mlflow_run_id=manifest.mlflow_run_id, ref=ref,
                            manifest=manifest, skipped=tuple(skipped))
        return None

    def _restore_full(self, ref: CheckpointRef, manifest: Manifest, model, optimizer, safe_globals):
        """Rank 0 verifies and reads the file; the state reaches the other ranks by broadcast."""
        state: dict[str, Any] = {}
        problem = None
        with tempfile.TemporaryDirectory(prefix="ckptkit-restore-") as workdir:
            if ranks.rank() == 0:
                try:
                    folder = self._fetch(ref, manifest, workdir)
                    state = self._load(os.path.join(folder, STATE_FILE), ref, safe_globals)
                    if optimizer is not None and "optimizer" not in state:
                        raise CheckpointError(f"{ref.uri} holds no optimizer state (it was saved without "
                                              "optimizer=); restore it without optimizer=")
                except CheckpointError as exc:
                    if "weights_only" in str(exc) or "holds no optimizer state" in str(exc):
                        problem = ("fatal", str(exc))
                    else:
                        problem = ("skip", str(exc))
                except (OSError, EOFError, RuntimeError) as exc:
                    problem = ("skip", str(exc)) if not isinstance(exc, RuntimeError) or _looks_corrupt(exc) \
                        else ("fatal", f"{type(exc).__name__}: {exc}")
                except Exception as exc:
                    # Storage that kept failing (retries exhausted, say): try an older checkpoint.
                    problem = ("skip", f"{type(exc).__name__}: {exc}")
            problem = ranks.broadcast(problem)
            if problem is not None:
                if problem[0] == "fatal":
                    raise CheckpointError(problem[1])
                return problem[1], None
            gather.load_resume_state(model, optimizer, state)
            return None, ranks.broadcast(state.get("extra", {}) if ranks.rank() == 0 else None)

    def _restore_sharded(self, ref: CheckpointRef, manifest: Manifest, model, optimizer, safe_globals):
        """Each rank checks a share of the files, then every rank reads the shards it needs."""
        backend = self.router.instances[ref.backend]
        names = sorted(manifest.files)
        mine = names[ranks.rank()::ranks.world_size()]
        try:
            self._check_files(ref, manifest, mine)
            problem = None
        except Exception as exc:
            problem = f"rank {ranks.rank()}: {exc}"
        problems = [p for p in ranks.all_gather(problem) if p]
        if problems:
            return "; ".join(problems), None
        state = gather.resume_state(model, optimizer, sharded=True, load_target=True)
        try:
            sharded.load(state, backend.fs, ref.path)
        except (Exception, CheckpointException) as exc:
            if optimizer is not None and "Missing key in checkpoint state_dict: optimizer" in _first_line(exc):
                raise CheckpointError(f"{ref.uri} holds no optimizer state (it was saved without "
                                      "optimizer=); restore it without optimizer=") from None
            raise
        gather.load_resume_state(model, optimizer, state, full=False)
        with self.router.call(ref.backend, "open_file", ref=ref, name=EXTRA_FILE) as f, \
                torch.serialization.safe_globals(safe_globals):
            try:
                return None, torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise _refused(ref, exc) from None

    def _check_files(self, ref: CheckpointRef, manifest: Manifest, names: Iterable[str]) -> None:
        for name in names:
            entry = manifest.files[name]

            def read(name: str = name, entry: FileEntry = entry) -> tuple[int, str]:
                with self.router.call(ref.backend, "open_file", ref=ref, name=name) as f:
                    return hash_stream(f, algorithm_of(entry.digest))

            try:
                size, digest = self._reading(ref, name, read)
            except FileNotFoundError:
                raise CheckpointError(f"{ref.uri}: {name} is missing") from None
            if size != entry.size:
                raise CheckpointError(f"{ref.uri}: {name} has {size} bytes, the manifest says {entry.size}")
            if digest != entry.digest:
                raise CheckpointError(f"{ref.uri}: {name} does not match its checksum")

    @staticmethod
    def _load(path: str, ref: CheckpointRef, safe_globals: Iterable[Any]) -> dict[str, Any]:
        try:
            # Not memory-mapped: optimizers keep loaded tensors as they are, and a tensor that
            # points into the file would keep the whole file mapped (and, once pruned, its disk
            # space taken) for the rest of training.
            with torch.serialization.safe_globals(list(safe_globals)):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refused(ref, exc) from None

    def export(self, out: str | os.PathLike, step: int | None = None, dtype: str | None = None) -> Restored:
        """Write one full, unsharded model file from a stored resume checkpoint, offline.

        Takes the newest verified checkpoint (or ``step``), in either format, and writes what
        ``finalize`` would have written: ``{"model", "step", "epoch", "metrics", "algorithm"}``.
        """
        self._check_open()
        for ref in self.list_checkpoints():
            if step is not None and ref.step != step:
                continue
            try:
                manifest = self.verify(ref)
            except Exception as exc:
                warnings.warn(f"skipped {ref.uri}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            if manifest.format == "dcp":
                model_state = sharded.load_full(self.router.instances[ref.backend].fs, ref.path)["model"]
            else:
                with tempfile.TemporaryDirectory(prefix="ckptkit-export-") as workdir:
                    folder = self._fetch(ref, manifest, workdir)
                    model_state = self._load(os.path.join(folder, STATE_FILE), ref, ())["model"]
            body = {"model": gather.cast(model_state, dtype), "step": manifest.step, "epoch": manifest.epoch,
                    "metrics": dict(manifest.metrics), "algorithm": self.config.algorithm}
            torch.save(body, os.fspath(out))
            return Restored(step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics), extra={},
                            mlflow_run_id=manifest.mlflow_run_id, ref=ref, manifest=manifest)
        which = f"step {step}" if step is not None else "any step"
        raise CheckpointError(f"run {self.run_name!r} has no verified checkpoint at {which} to export")

    # -- the final model --------------------------------------------------------------------

    def finalize(self, model: torch.nn.Module, step: int, epoch: int | None = None,
                 metrics: Mapping[str, Any] | None = None, algorithm: str | None = None) -> list[CheckpointRef]:
        """Gather the full model once and publish it to every final backend.

        A backend that fails does not stop the others. If no backend took the model, it is
        written to a local fallback folder that the error names, for ``ckptkit publish`` later.
        """
        self._check_open()
        if self.config.final is None:
            raise ConfigError("roles.final: no final backends are declared in the config")
        previous = self._collect()
        step = _count("step", step)
        epoch = None if epoch is None else _count("epoch", epoch)
        state = gather.final_state(model, self.config.final.dtype)
        algorithm = algorithm or self.config.algorithm

        def publish() -> tuple[list[CheckpointRef], str | None]:
            body = {"model": state, "step": step, "epoch": epoch, "metrics": _metrics(metrics),
                    "algorithm": algorithm}
            payload = Payload(
                run_name=self.run_name, step=step, epoch=epoch, format="torch", role="final",
                files=(PayloadFile(FINAL_FILE, write=_save_writer(body)),),
                metrics=_metrics(metrics), mlflow_run_id=self._tracking_run_id(),
            )
            saved, failures = self._store_each(Role.FINAL, payload, "publish_final", algorithm=algorithm, model=model)
            if not failures:
                return saved, None
            where = ", ".join(r.uri for r in saved) or self._write_fallback(payload)
            detail = "; ".join(f"{n}: {e}" for n, e in failures.items())
            return saved, (f"the final model did not reach every final backend ({detail}); it is saved at "
                           f"{where}; retry with: ckptkit publish", {n: str(e) for n, e in failures.items()})

        status, result = ranks.on_rank0(publish)
        saved, problem = result if status == "ok" else ([], (result, {"(all)": result}))
        if previous is not None:
            # The last resume save's outcome, reported once the final model is safe.
            self._report(*previous)
        if problem:
            message, failures = problem
            self._fail(PublishError(message, {n: BackendError(n, e) for n, e in failures.items()}, saved))
        return saved

    def _write_fallback(self, payload: Payload) -> str:
        from .local import LocalBackend

        backend = LocalBackend.from_config("fallback", {"path": self.fallback_dir})
        ref = backend.publish_final(run_name=self.run_name, payload=payload)
        return ref.uri

    def close(self) -> None:
        """Finish pending work and release the backends. Safe to call twice."""
        if not self._closed:
            try:
                self.wait()
            finally:
                self._closed = True
                if self._writer is not None:
                    self._writer.shutdown(wait=True)
                self.router.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _put_file(fs, folder: str, name: str, write) -> FileEntry:
    """Stream one small file into ``folder`` on ``fs``, hashed on the way."""
    from .hashing import HashingWriter

    with fs.open(f"{folder}/{name}", "wb") as f:
        w = HashingWriter(f)
        write(w)
    return FileEntry(size=w.size, digest=w.digest())


def _copy_file(source: str, fs, folder: str, name: str, expected: FileEntry) -> FileEntry:
    """Copy a committed local file into ``folder`` on ``fs``, checking it against ``expected``."""
    with open(source, "rb") as src, fs.open(f"{folder}/{name}", "wb") as dst:
        size, digest = copy_hashed(src, dst, algorithm_of(expected.digest))
    entry = FileEntry(size=size, digest=digest)
    if entry != expected:
        raise CheckpointError(f"{source} changed while it was copied")
    return entry


def _refused(ref: CheckpointRef, exc: pickle.UnpicklingError) -> CheckpointError:
    """The error for state that ``torch.load(weights_only=True)`` will not rebuild, naming the type."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    named = found.group(1) if found else "an object of a type it does not know"
    return CheckpointError(
        f"{ref.uri}: the checkpoint holds {named}, which safe loading (weights_only=True) refuses. "
        f"If you trust the checkpoint, allow that type by name: restore(..., safe_globals=[{named.rsplit('.', 1)[-1]}]); "
        "better, store plain values or tensors in extra"
    )


def _first_line(exc: BaseException) -> str:
    """One line saying why ``exc`` happened; for DCP's wrapper, each rank's own reason."""
    failures = getattr(exc, "failures", None)
    if isinstance(exc, CheckpointException) and failures:
        # Each rank's failure is an (exception, traceback frames) pair, or an object holding one.
        inner = (f[0] if isinstance(f, tuple) else getattr(f, "exception", f) for f in failures.values())
        return "; ".join(f"{type(e).__name__}: {_first_line(e)}" for e in inner)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if isinstance(exc, CheckpointException) and lines else (lines[0] if lines else "")


def _looks_corrupt(exc: RuntimeError) -> bool:
    text = str(exc)
    return any(s in text for s in ("PytorchStreamReader", "zip archive", "central directory", "file read failed", "invalid header"))
