"""The plugin manager: hook specs, backend types found through entry points, instances."""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os

import attrs
import pluggy

from . import hookspecs
from ._project import BACKENDS_ENTRY_POINT_GROUP, DISABLE_AUTOLOAD_ENV, PROJECT_NAME
from .errors import ConfigError, PluginError
from .roles import ROLE_HOOKS, Role

log = logging.getLogger(__name__)

# Backend types that ckptkit documents, and the extra that installs each.
KNOWN_EXTRAS = {"s3": "s3", "gcs": "gcs", "mlflow": "mlflow"}


@attrs.frozen
class BackendType:
    """A backend class found under a type name, and the distribution that provides it."""

    name: str
    cls: type
    dist: str
    hooks: frozenset[str]

    @property
    def roles(self) -> tuple[Role, ...]:
        return tuple(r for r, needed in ROLE_HOOKS.items() if set(needed) <= self.hooks)

    def missing_hooks(self, role: Role) -> list[str]:
        return [h for h in ROLE_HOOKS[role] if h not in self.hooks]


def _dist_label(dist: importlib.metadata.Distribution | None) -> str:
    if dist is None:
        return "<unknown distribution>"
    return f"{dist.metadata['Name']} {dist.version}"


def _check_passable(where: str, hook: str, params: list[inspect.Parameter]) -> None:
    """Refuse parameters of a hook implementation that pluggy would not fill in."""
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            raise PluginError(
                f"{where}: hook {hook} declares {p}, which pluggy never passes (it passes only "
                "plain named parameters); list the spec's arguments by name"
            )
        if p.default is not p.empty:
            # pluggy < 1.7 treats such a parameter as optional and never passes it, so the
            # implementation silently runs with the default (prune's dry_run stayed False).
            raise PluginError(
                f"{where}: hook {hook} gives argument {p.name!r} a default ({p.default!r}); "
                "pluggy before 1.7 never passes a defaulted argument, so the default would "
                f"always win: drop the default from {p.name}"
            )


class CkptkitPluginManager(pluggy.PluginManager):
    """A pluggy manager that also knows the backend types and where each came from."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.backend_types: dict[str, BackendType] = {}
        self.broken: dict[str, PluginError] = {}

    def add_backend_type(self, name: str, cls: type, dist: str = "<registered in code>") -> BackendType:
        """Make ``cls`` available as backend type ``name``, after checking its hooks."""
        where = f"backend type {name!r} ({cls.__module__}.{cls.__qualname__}, from {dist})"
        if name in self.backend_types:
            other = self.backend_types[name]
            if other.cls is cls:
                return other
            raise PluginError(
                f"{where} clashes with the type of the same name from {other.dist}; "
                "uninstall one of the two distributions"
            )
        if not inspect.isclass(cls):
            raise PluginError(f"{where}: the entry point must name a class, got {type(cls).__name__}")
        if not callable(getattr(cls, "from_config", None)):
            raise PluginError(f"{where}: the class needs a from_config(name, options) classmethod")
        hooks = set()
        for attr in dir(cls):
            opts = self.parse_hookimpl_opts(cls, attr)
            if opts is None:
                continue
            caller = getattr(self.hook, attr, None)
            if caller is None or caller.spec is None:
                raise PluginError(f"{where}: {attr} is marked as a hook but ckptkit has no such hook")
            signature = inspect.signature(getattr(cls, attr))
            _check_passable(where, attr, [p for n, p in signature.parameters.items() if n != "self"])
            params = [p for p in signature.parameters if p != "self"]
            extra = [p for p in params if p not in caller.spec.argnames]
            if extra:
                raise PluginError(
                    f"{where}: hook {attr} takes {', '.join(extra)}, which the spec does not "
                    f"provide (it provides {', '.join(caller.spec.argnames)})"
                )
            hooks.add(attr)
        if not hooks:
            raise PluginError(f"{where}: the class implements no ckptkit hook (mark them with ckptkit.hookimpl)")
        btype = BackendType(name=name, cls=cls, dist=dist, hooks=frozenset(hooks))
        self.backend_types[name] = btype
        return btype

    def load_backend_entrypoints(self, only_dist: str | None = None) -> None:
        """Load every entry point of the backends group (or only those of ``only_dist``).

        A type that fails to load or to validate is kept in ``broken`` with its error, which is
        raised when a config uses that type, so one broken distribution does not stop configs
        that do not need it.
        """
        for ep in importlib.metadata.entry_points(group=BACKENDS_ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            if only_dist is not None and (dist is None or dist.metadata["Name"] != only_dist):
                continue
            label = _dist_label(dist)
            try:
                try:
                    cls = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f"backend type {ep.name!r} from {label} failed to load ({ep.value}): "
                        f"{type(exc).__name__}: {exc}; reinstall or uninstall {label.split()[0]}"
                    ) from exc
                self.add_backend_type(ep.name, cls, label)
            except PluginError as exc:
                log.warning("%s", exc)
                self.broken[ep.name] = exc

    def backend_type(self, name: str, key: str) -> BackendType:
        """The type called ``name``; ``key`` is the config key that asked for it."""
        if name in self.broken:
            # Broken, or claimed by two distributions, where using either would be a guess.
            raise PluginError(f"{key}: {self.broken[name]}")
        try:
            return self.backend_types[name]
        except KeyError:
            installed = ", ".join(sorted(self.backend_types)) or "none"
            hint = ""
            if name in KNOWN_EXTRAS:
                hint = f'; install it with: pip install "ckptkit[{KNOWN_EXTRAS[name]}]"'
            raise ConfigError(
                f"{key}: unknown backend type {name!r} (installed: {installed}){hint}"
            ) from None

    def register_backend(self, instance: object, name: str, btype: BackendType) -> None:
        try:
            self.register(instance, name=name)
        except ValueError as exc:
            raise PluginError(
                f"backend {name!r} (type {btype.name!r}, from {btype.dist}) could not be "
                f"registered: {exc}"
            ) from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"backend {name!r} (type {btype.name!r}, from {btype.dist}): {exc}") from exc


def autoload_enabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")


def make_plugin_manager(autoload: bool | None = None) -> CkptkitPluginManager:
    """Build a plugin manager: specs, built-in types, third-party entry points, then a check.

    The built-in ``local`` type comes through ckptkit's own entry point like any other. With
    autoload off (``autoload=False`` or ``CKPTKIT_DISABLE_PLUGIN_AUTOLOAD=1``) only ckptkit's
    own entry points load; add others with ``add_backend_type``.
    """
    if autoload is None:
        autoload = autoload_enabled()
    pm = CkptkitPluginManager()
    pm.add_hookspecs(hookspecs)
    pm.load_backend_entrypoints(only_dist=PROJECT_NAME)
    if "local" not in pm.backend_types:
        # Running from a source tree that was never installed: no entry points at all.
        from .local import LocalBackend

        pm.add_backend_type("local", LocalBackend, f"{PROJECT_NAME} (built in)")
    if autoload:
        pm.load_backend_entrypoints()
    pm.check_pending()
    return pm
