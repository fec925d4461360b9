"""The CheckpointManager: the training loop's one entry point to ckptkit."""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import tempfile
import warnings
from typing import Any, Iterable, Mapping

import attrs
import torch

from . import gather
from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import Config, ResumeRole, check_run_name
from .errors import BackendError, CheckpointError, CkptkitError, ConfigError, PublishError, SaveError
from .hashing import copy_hashed, hash_stream
from .manifest import Manifest
from .plugins import CkptkitPluginManager, make_plugin_manager
from .roles import Role
from .routing import Router

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
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
        torch.save(obj, f)

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
        if config.resume is not None and config.resume.async_:
            raise ConfigError("roles.resume.async: asynchronous saving is not available in this "
                              "version of ckptkit; set async: false")
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

        Returns the references of the committed copies, empty when nothing was due. A backend
        that fails does not stop the others; once all were tried, a ``SaveError`` names the
        failures (or a warning does, with ``on_error="warn"``).
        """
        self._check_open()
        role = self.resume_role
        if not force and not self.is_due(step):
            return []
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        state = gather.resume_state(model, optimizer)
        state["extra"] = _extra_state(extra)
        if gather.rank() != 0:
            return []
        payload = Payload(
            run_name=self.run_name, step=step, epoch=epoch, format=role.format,
            files=(PayloadFile(STATE_FILE, write=_save_writer(state)),),
            metrics=_metrics(metrics), mlflow_run_id=self._tracking_run_id(),
            world_size=gather.world_size(),
        )
        saved, failures = self._store_each(Role.RESUME, payload, "save_resume", step=step)
        for ref in saved:
            try:
                self.router.call(ref.backend, "prune", run_name=self.run_name, keep_last=role.keep_last,
                                 protected_steps=frozenset({step}), dry_run=False)
            except Exception as exc:
                log.warning("pruning backend %r failed (nothing committed was lost): %s", ref.backend, exc)
        if failures:
            detail = "; ".join(f"{n}: {e}" for n, e in failures.items())
            where = ", ".join(r.uri for r in saved) or "nowhere"
            self._fail(SaveError(f"step {step} was not saved to every resume backend ({detail}); "
                                 f"it is committed at: {where}", failures, saved))
        return saved

    def _store_each(self, role: Role, payload: Payload, hook: str, **kwargs: Any):
        saved: list[CheckpointRef] = []
        failures: dict[str, Exception] = {}
        copied = False
        for name in self.router.backends(role):
            extra_kwargs = {"stored": list(saved), "algorithm": kwargs.get("algorithm"), "model": kwargs.get("model")} if role is Role.FINAL else {"step": kwargs["step"]}
            try:
                ref = self.router.call(name, hook, run_name=self.run_name, payload=payload, **extra_kwargs)
            except Exception as exc:
                failures[name] = exc if isinstance(exc, CkptkitError) else BackendError(name, f"{type(exc).__name__}: {exc}")
                log.error("backend %r failed: %s", name, failures[name])
                continue
            if isinstance(ref, CheckpointRef):
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
        for name, entry in manifest.files.items():
            try:
                with self.router.call(ref.backend, "open_file", ref=ref, name=name) as f:
                    size, digest = hash_stream(f)
            except FileNotFoundError:
                raise CheckpointError(f"{ref.uri}: {name} is missing") from None
            if size != entry.size:
                raise CheckpointError(f"{ref.uri}: {name} has {size} bytes, the manifest says {entry.size}")
            if digest != entry.sha256:
                raise CheckpointError(f"{ref.uri}: {name} does not match its checksum")
        return manifest

    def _fetch(self, ref: CheckpointRef, manifest: Manifest, workdir: str) -> str:
        """A local folder holding the checkpoint's verified files."""
        if ref.local_dir:
            self.verify(ref)
            return ref.local_dir
        for name, entry in manifest.files.items():
            with self.router.call(ref.backend, "open_file", ref=ref, name=name) as src, \
                    open(os.path.join(workdir, name), "wb") as dst:
                size, digest = copy_hashed(src, dst)
            if (size, digest) != (entry.size, entry.sha256):
                raise CheckpointError(f"{ref.uri}: {name} does not match its manifest")
        return workdir

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                extra: Mapping[str, Any] | None = None, safe_globals: Iterable[Any] = ()) -> Restored | None:
        """Load the newest committed checkpoint across all resume backends into model and optimizer.

        A checkpoint that fails verification is skipped with a warning naming it and the next
        newest is tried. Objects in ``extra`` with ``load_state_dict`` get their saved state back.
        ``safe_globals`` lists extra types that ``torch.load(weights_only=True)`` may rebuild.
        Returns None when there is nothing to resume from.
        """
        skipped: list[str] = []
        for ref in self.list_checkpoints():
            try:
                manifest = self.router.call(ref.backend, "read_manifest", ref=ref)
                with tempfile.TemporaryDirectory(prefix="ckptkit-restore-") as workdir:
                    folder = self._fetch(ref, manifest, workdir)
                    state = self._load(os.path.join(folder, STATE_FILE), ref, safe_globals)
                    gather.load_resume_state(model, optimizer, state)
            except (CheckpointError, OSError, EOFError, RuntimeError) as exc:
                if isinstance(exc, CheckpointError) and exc.args and "weights_only" in str(exc):
                    raise
                if isinstance(exc, RuntimeError) and not _looks_corrupt(exc):
                    raise
                reason = f"skipped {ref.uri}: {exc}"
                warnings.warn(reason, RuntimeWarning, stacklevel=2)
                skipped.append(reason)
                continue
            saved_extra = state.get("extra", {})
            for key, target in (extra or {}).items():
                if key in saved_extra and callable(getattr(target, "load_state_dict", None)):
                    target.load_state_dict(saved_extra[key])
            self._resumed_run_id = manifest.mlflow_run_id
            self.mlflow_run_id = None
            return Restored(step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics),
                            extra=saved_extra, mlflow_run_id=manifest.mlflow_run_id, ref=ref,
                            manifest=manifest, skipped=tuple(skipped))
        return None

    @staticmethod
    def _load(path: str, ref: CheckpointRef, safe_globals: Iterable[Any]) -> dict[str, Any]:
        try:
            with torch.serialization.safe_globals(list(safe_globals)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{ref.uri}: the checkpoint holds objects that safe loading (weights_only=True) "
                f"refuses: {str(exc).splitlines()[0]}. If you trust it, allow the named types with "
                "restore(..., safe_globals=[TheType]); better, store plain values or tensors"
            ) from None

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
        state = gather.final_state(model, self.config.final.dtype)
        if gather.rank() != 0:
            return []
        algorithm = algorithm or self.config.algorithm
        body = {"model": state, "step": step, "epoch": epoch, "metrics": _metrics(metrics),
                "algorithm": algorithm}
        payload = Payload(
            run_name=self.run_name, step=step, epoch=epoch, format="torch", role="final",
            files=(PayloadFile(FINAL_FILE, write=_save_writer(body)),),
            metrics=_metrics(metrics), mlflow_run_id=self._tracking_run_id(),
        )
        saved, failures = self._store_each(Role.FINAL, payload, "publish_final", algorithm=algorithm, model=model)
        if failures:
            where = ", ".join(r.uri for r in saved)
            if not saved:
                where = self._write_fallback(payload)
            detail = "; ".join(f"{n}: {e}" for n, e in failures.items())
            self._fail(PublishError(
                f"the final model did not reach every final backend ({detail}); it is saved at "
                f"{where}; retry with: ckptkit publish", failures, saved))
        return saved

    def _write_fallback(self, payload: Payload) -> str:
        from .local import LocalBackend

        backend = LocalBackend.from_config("fallback", {"path": self.fallback_dir})
        ref = backend.publish_final(run_name=self.run_name, payload=payload)
        return ref.uri

    def close(self) -> None:
        """Finish pending work and release the backends. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.router.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _looks_corrupt(exc: RuntimeError) -> bool:
    text = str(exc)
    return any(s in text for s in ("PytorchStreamReader", "zip archive", "central directory", "file read failed", "invalid header"))
