"""Routing: each role's hooks reach only the backend instances declared for it."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from .checkpoint import CheckpointRef
from .config import Config
from .errors import BackendError, CkptkitError, ConfigError, FaultyAnswerError, PluginError
from .plugins import BackendType, CkptkitPluginManager
from .redact import redact, scrub, secret_values
from . import watchdog
from .roles import SHARDED_HOOKS, Role
from .storage import FileBackend

log = logging.getLogger(__name__)


def _sourced(config: Config, exc: ConfigError) -> ConfigError:
    """``exc`` naming the config file first, as the config's own errors do: which file, when a job
    reads several."""
    if config.source == "<dict>" or str(exc).startswith(f"{config.source}: "):
        return exc
    return ConfigError(f"{config.source}: {exc}")


class Router:
    """The configured backend instances, registered under their config names, by role."""

    def __init__(self, pm: CkptkitPluginManager, config: Config):
        self.pm = pm
        self.config = config
        self.types: dict[str, BackendType] = {}
        self.instances: dict[str, Any] = {}
        self._callers: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._registered: frozenset[tuple[str, int]] = frozenset()  # what the callers were made for
        try:
            self.types = self.types_for(pm, config)
            for name, spec in config.backends.items():
                self.instances[name] = self._build(name, self.types[name], spec.options, config.source)
            self._check_places(config)
            for name, instance in self.instances.items():
                if config.roles_of(name):
                    pm.register_backend(instance, name, self.types[name])
        except BaseException as exc:
            # Built backends are closed; a plugin manager shared between managers (a sweep's)
            # keeps nothing of a failed one. The first error is the one to see.
            with contextlib.suppress(Exception):
                self.close()
            if isinstance(exc, ConfigError) and _sourced(config, exc) is not exc:
                raise _sourced(config, exc) from exc
            raise

    @staticmethod
    def types_for(pm: CkptkitPluginManager, config: Config) -> dict[str, BackendType]:
        """Each backend's type, checked against the roles the config gives it (and against format
        dcp): what can be told of a config without building a backend, which may reach its
        store's service (gcsfs looks for credentials as it is made)."""
        types: dict[str, BackendType] = {}
        try:
            for name, spec in config.backends.items():
                btype = pm.backend_type(spec.type, f"backends.{name}.type")
                roles = config.roles_of(name)
                for role in roles:
                    missing = btype.missing_hooks(role)
                    if missing:
                        serves = ", ".join(r.value for r in btype.roles)
                        why = getattr(btype.cls, "ROLE_HINTS", {}).get(role.value)
                        raise ConfigError(
                            f"roles.{role}.backends: backend {name!r} has type {spec.type!r} "
                            f"(from {btype.dist}), which cannot serve the {role} role: "
                            + (f"{why}; " if why else "")
                            + f"it does not implement {', '.join(missing)}. "
                            + (f"That type serves: {serves}; declare {name!r} only under those roles"
                               if btype.roles else "That type serves no role: it lacks hooks every role needs "
                               "(see docs/plugins.md, 'Which hooks serve which role')")
                        )
                if Role.RESUME in roles and config.resume.format == "dcp":
                    missing = [h for h in SHARDED_HOOKS if h not in btype.hooks]
                    if missing:
                        raise ConfigError(
                            f"roles.resume.format: dcp needs every resume backend to write shards, but "
                            f"backend {name!r} (type {spec.type!r}, from {btype.dist}) does not implement "
                            f"{', '.join(missing)}; use format: torch or another backend"
                        )
                if not roles:
                    log.warning("backend %r is declared but no role uses it", name)
                types[name] = btype
        except ConfigError as exc:
            if _sourced(config, exc) is exc:
                raise
            raise _sourced(config, exc) from exc
        return types

    def _check_places(self, config: Config) -> None:
        """Refuse two resume backends that keep their checkpoints in one place: each save would
        land there twice, a copy that is the same copy, and losing the place loses both."""
        seen: dict[tuple, str] = {}
        for name in config.resume.backends if config.resume else ():
            if not isinstance(self.instances[name], FileBackend):
                continue
            where = self.instances[name].place()
            if where in seen:
                instance = self.instances[seen[where]]
                shown = redact(instance.uri(instance.root), getattr(instance, "secrets", ()))
                raise ConfigError(
                    f"backends {seen[where]!r} and {name!r} both keep resume checkpoints in one place "
                    f"({shown}): a save would write "
                    f"the same files twice and hold one copy, not two. Point one of them at another disk, "
                    f"bucket or prefix, or leave it out of roles.resume.backends")
            seen[where] = name

    @staticmethod
    def _build(name: str, btype: BackendType, options: dict, source: str = "<dict>") -> Any:
        # The backend does not exist yet to name its own secrets; a client checking a token as it
        # is made (gcsfs) fails with the token in the URL it could not reach.
        secrets = secret_values(options)
        try:
            instance = btype.cls.from_config(name, dict(options))
        except ConfigError as exc:
            scrub(exc, secrets)
            raise
        except Exception as exc:
            scrub(exc, secrets)  # a traceback prints every cause's text too
            raise PluginError(redact(
                f"{source}: backends.{name}: backend {name!r} (type {btype.name!r}, from {btype.dist}) could not be "
                f"built from its config: {type(exc).__name__}: {exc}", secrets)) from exc
        btype.check_instance(name, instance)
        return instance

    def backends(self, role: Role) -> list[str]:
        """The backends of a role, in the order their hooks are called.

        Resume: backends that keep files on local disk first, so that the rest copy their
        bytes. Final: backends whose ``publish_final`` is marked ``trylast`` go last.
        """
        rc = self.config.role(role)
        names = list(rc.backends) if rc else []
        if role is Role.RESUME:
            return sorted(names, key=lambda n: not getattr(self.instances[n], "keeps_files_locally", False))
        late = {impl.plugin_name for impl in self.pm.hook.publish_final.get_hookimpls() if impl.trylast}
        return sorted(names, key=lambda n: n in late)

    def caller(self, hook: str, names: list[str]):
        """A hook caller that reaches only the named backends."""
        # Built by leaving out the plugins registered when it is made: one registered later (by
        # another manager sharing the plugin manager, a sweep's next trial) would be called too.
        registered = frozenset((n, id(p)) for n, p in self.pm.list_name_plugin())
        if registered != self._registered:
            self._registered = registered
            self._callers.clear()
        key = (hook, tuple(sorted(names)))
        if key not in self._callers:
            others = [p for n, p in self.pm.list_name_plugin() if n not in names]
            self._callers[key] = self.pm.subset_hook_caller(hook, remove_plugins=others)
        return self._callers[key]

    def call(self, backend: str, hook: str, /, **kwargs: Any) -> Any:
        """Call ``hook`` on one backend; its single result, or None if it does not implement it."""
        with watchdog.watching(f"{hook} of backend {backend!r}{self.origin(backend)}"):
            results = self.caller(hook, [backend])(**kwargs)
        if isinstance(results, list):
            return results[0] if results else None
        return results

    def call_blaming(self, backend: str, hook: str, /, storage_errors: bool = False, **kwargs: Any) -> Any:
        """``call``, for hooks whose contract raises nothing but ckptkit's errors: any other
        exception is a bug of the plugin, raised as a ``BackendError`` that names the backend,
        its type and the distribution it came from. ``storage_errors``: an ``OSError`` or
        ``TimeoutError`` (a store that did not answer, as a hook that talks to one may raise
        it) is raised as it is."""
        try:
            return self.call(backend, hook, **kwargs)
        except CkptkitError:
            raise
        except Exception as exc:
            if storage_errors and isinstance(exc, (OSError, TimeoutError)):
                raise
            raise self.blame(backend, hook, exc) from exc

    def origin(self, backend: str) -> str:
        """Where ``backend``'s code comes from, for errors: `` (type 'x', from dist version)``."""
        btype = self.types.get(backend)
        return f" (type {btype.name!r}, from {btype.dist})" if btype is not None else ""

    def blame(self, backend: str, hook: str, exc: BaseException) -> BackendError:
        """A plugin's own exception from ``hook``, as a ``BackendError`` naming where it came from."""
        return BackendError(backend, f"{hook}{self.origin(backend)} raised {type(exc).__name__}: "
                                     f"{redact(str(exc), secret_values())}; report it to the plugin's authors")

    def faulty(self, backend: str, hook: str, got: Any, wanted: str) -> BackendError:
        """A hook's answer that breaks its contract (``wanted``: what it must return)."""
        return FaultyAnswerError(backend, f"{hook}{self.origin(backend)} returned {got}, not {wanted}; the backend "
                                     "plugin is faulty: report it to its authors")

    def checked_refs(self, backend: str, hook: str, got: Any, run_name: str) -> list[CheckpointRef]:
        """What a hook that returns checkpoints of run ``run_name`` (``list_checkpoints``,
        ``prune``) returned, as a list: anything else is a bug of the plugin, named as ``blame``
        names it. Taken for an empty answer, a listing would start training from step 0, and a
        prune that deleted checkpoints would be told to the user as one that deleted none. A ref
        of another run or another backend is such a bug too: restore would load another run's
        weights, or read one backend's checkpoint through another."""
        if not (isinstance(got, (list, tuple)) and all(isinstance(r, CheckpointRef) for r in got)):
            what = type(got).__name__ if not isinstance(got, (list, tuple)) else \
                f"a {type(got).__name__} holding {type(next(r for r in got if not isinstance(r, CheckpointRef))).__name__}"
            raise self.faulty(backend, hook, what, "a list of CheckpointRef")
        stray = next((r for r in got if r.backend != backend or r.run_name != run_name), None)
        if stray is not None:
            raise self.faulty(backend, hook, f"a ref of backend {stray.backend!r} and run {stray.run_name!r} "
                                             f"({stray.uri})", f"refs of backend {backend!r} and run {run_name!r}")
        return list(got)

    def checked_ref(self, backend: str, hook: str, got: Any, payload: Any) -> CheckpointRef:
        """What a hook that stores ``payload`` (``save_resume``, ``commit_sharded``,
        ``publish_final``) returned: a ref of this backend and the payload's run, and for a
        resume checkpoint its step. A ref to anything else would be reported as saved, and a
        later backend would copy its bytes (``fanout``) under the payload's step. A final ref's
        role is not checked: a registry plugin may leave it at the default, which harms nothing."""
        return self._owned_ref(backend, hook, got, payload.run_name, payload.step if payload.role == "resume" else None)

    def found_ref(self, backend: str, hook: str, got: Any, run_name: str) -> CheckpointRef | None:
        """What a hook that looks a final model up (``final_ref``, ``find_published``) returned:
        None, or a ref of this backend and run. Another run's would count as this run's model,
        held already, and the publish skip it."""
        if got is None:
            return None
        if not isinstance(got, CheckpointRef):
            raise self.faulty(backend, hook, type(got).__name__, "a CheckpointRef or None")
        return self._owned_ref(backend, hook, got, run_name, None)

    def _owned_ref(self, backend: str, hook: str, got: Any, run_name: str, step: int | None) -> CheckpointRef:
        if not isinstance(got, CheckpointRef):
            raise self.faulty(backend, hook, type(got).__name__, "a CheckpointRef")
        if (got.backend, got.run_name) != (backend, run_name) or step is not None and got.step != step:
            raise self.faulty(backend, hook, f"a ref of backend {got.backend!r}, run {got.run_name!r}, step "
                                             f"{got.step} ({got.uri})",
                              f"one of backend {backend!r}, run {run_name!r}" + (f", step {step}" if step is not None
                                                                                 else ""))
        return got

    def implements(self, name: str, hook: str) -> bool:
        return hook in self.types[name].hooks

    def close(self) -> None:
        instances, self.instances = self.instances, {}
        # A closed manager may stay referenced (a sweep's list of results): its backends' clients
        # (an S3 client holds its service models, about 13 MB) go with the backends.
        self._callers.clear()
        for instance in instances.values():
            if self.pm.is_registered(instance):
                self.pm.unregister(instance)
        failure: BaseException | None = None
        for name, instance in instances.items():
            close = getattr(instance, "close", None)
            try:
                if callable(close):
                    close()
            except Exception as exc:  # the others are closed all the same
                if failure is None and isinstance(exc, CkptkitError):
                    failure = exc
                elif failure is None:
                    failure = self.blame(name, "close", exc)
                    failure.__cause__ = exc
        if failure is not None:
            raise failure
