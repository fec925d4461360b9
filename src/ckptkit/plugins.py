"""The plugin manager: hook specs, backend types found through entry points, instances."""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import re
import sysconfig
import traceback
from typing import Any

import attrs
import pluggy

from . import hookspecs
from ._project import BACKENDS_ENTRY_POINT_GROUP, DISABLE_AUTOLOAD_ENV, PROJECT_NAME
from .errors import ConfigError, PluginError
from .roles import ROLE_HOOKS, Role

log = logging.getLogger(__name__)

# Backend types that ckptkit documents, and the extra that installs each.
KNOWN_EXTRAS = {"s3": "s3", "gcs": "gcs", "mlflow": "mlflow"}
# Method names a backend may still define from before they became public: the new name.
RENAMED = {"_multipart": "multipart", "_stale_uploads": "stale_uploads", "_local_dir": "local_dir",
           "_location": "place"}


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

    def check_instance(self, backend: str, instance: Any) -> None:
        """Refuse what ``from_config`` returned if it is no instance of the type's class, or one
        whose documented attributes (``BACKEND_ATTRIBUTES``) have the wrong type."""
        where = f"backend {backend!r} (type {self.name!r}, {self.cls.__module__}.{self.cls.__qualname__}, from {self.dist})"
        if not isinstance(instance, self.cls):
            # Registered as it is, None would answer no hook: every later error would blame a hook.
            raise PluginError(f"{where}: from_config returned {type(instance).__name__}, not an instance of "
                              f"{self.cls.__qualname__}; the backend plugin is faulty: report it to its authors")
        for spec in hookspecs.BACKEND_ATTRIBUTES:
            value = getattr(instance, spec.name, None)
            if value is not None:
                _check_attribute(where, spec, value)
        if "stage_sharded" in self.hooks and getattr(instance, "fs", None) is None:
            raise PluginError(f"{where}: the type implements the sharded hooks, so every instance needs an "
                              "fs attribute (the fsspec filesystem that every rank writes its shards through)")


def _normalized(name: str) -> str:
    """A distribution name as packaging compares them (PEP 503): ckptkit_s3 is ckptkit-s3."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_label(dist: importlib.metadata.Distribution | None) -> str:
    if dist is None:
        return "<unknown distribution>"
    return f"{dist.metadata['Name']} {dist.version}"


# Arguments that an implementation of these hooks must take: one that leaves them out runs as if
# they never held anything, and deletes what they protect (a prune without dry_run deleted the
# checkpoints `ckptkit prune --dry-run` only listed).
REQUIRED_ARGUMENTS = {"prune": ("dry_run", "protected_steps"), "delete_run": ("dry_run",)}


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


def _check_attribute(where: str, spec: hookspecs.AttributeSpec, value: Any) -> None:
    if not spec.check(value):
        raise PluginError(f"{where}: attribute {spec.name} must be {spec.kind}, got {type(value).__name__} "
                          f"{value!r:.80}. ckptkit reads it as follows: {spec.doc}")


def _check_class_attributes(where: str, cls: type) -> None:
    for spec in hookspecs.BACKEND_ATTRIBUTES:
        try:
            raw = inspect.getattr_static(cls, spec.name)
        except AttributeError:
            continue
        # A property or other descriptor has its value only on an instance: checked there.
        if raw is not None and not hasattr(raw, "__get__"):
            _check_attribute(where, spec, raw)
    for old, new in RENAMED.items():
        if callable(getattr(cls, old, None)):
            raise PluginError(f"{where}: defines {old}, which ckptkit no longer calls; rename it to {new} "
                              f"(documented in ckptkit.plugin.FileBackend.{new})")


def _entry_point_help(type_name: str) -> str:
    return (f'[project.entry-points."{BACKENDS_ENTRY_POINT_GROUP}"]\n'
            f'{type_name} = "<module>:<BackendClass>"')


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _relates_to_ckptkit(dist: importlib.metadata.Distribution) -> bool:
    if _normalize(dist.metadata["Name"] or "").startswith(PROJECT_NAME):
        return True
    return any(re.match(rf"{PROJECT_NAME}\b(?![-_.])", r) for r in dist.requires or ())


def _dists_without_entry_point(type_name: str) -> list[str]:
    """Sentences about installed distributions that look like type ``type_name`` but declare no
    entry point for it in the backends group."""
    wanted = _normalize(type_name)
    out = []
    for dist in importlib.metadata.distributions():
        dname = dist.metadata["Name"]
        if not dname or wanted not in _normalize(dname).split("-") or not _relates_to_ckptkit(dist):
            continue
        eps = list(dist.entry_points)
        if any(ep.group == BACKENDS_ENTRY_POINT_GROUP for ep in eps):
            continue  # it declares backends, loaded or broken: reported elsewhere
        groups = sorted({ep.group for ep in eps})
        near = difflib.get_close_matches(BACKENDS_ENTRY_POINT_GROUP, groups, n=1, cutoff=0.8)
        if near:
            said = (f"it declares its entry point in the group {near[0]!r} instead of "
                    f"{BACKENDS_ENTRY_POINT_GROUP!r}")
        else:
            said = f"it declares no entry point in the group {BACKENDS_ENTRY_POINT_GROUP!r}" + (
                f" (only in: {', '.join(groups)})" if groups else "")
        out.append(f"the distribution {_dist_label(dist)} is installed, but {said}, so ckptkit cannot "
                   f"find its backend class; its pyproject.toml needs\n{_entry_point_help(type_name)}\n"
                   "and the distribution must then be installed again (entry points are read at install time)")
    return out


def _load_entry_point(ep: importlib.metadata.EntryPoint, label: str) -> Any:
    """The object an entry point names, or a PluginError that says whose mistake a failure is."""
    head = f"backend type {ep.name!r} from {label} failed to load"
    dist = label.split()[0]
    fix = (f"fix the entry point in {dist}'s packaging (pyproject.toml, "
           f'[project.entry-points."{BACKENDS_ENTRY_POINT_GROUP}"]) and install the fixed version; '
           "reinstalling this one will not help")
    module_name = ep.module
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise PluginError(f"{head}: its entry point value {ep.value!r} is wrong: there is no module "
                              f"{module_name!r} (No module named {missing!r}); {fix}") from exc
        raise PluginError(f"{head}: importing {module_name} needs the module {missing or str(exc)!r}, which "
                          f"is not installed; install {dist}'s dependencies, or uninstall {dist}") from exc
    except Exception as exc:
        # Where it was raised: the traceback stays on __cause__, which the command line never shows.
        if isinstance(exc, SyntaxError):  # raised by the import machinery: the file is in the error
            at = f" at {exc.filename}:{exc.lineno}" if exc.filename else ""
        else:
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
            # The plugin's own line, not the standard library's where it failed (os.environ[...]).
            stdlib = sysconfig.get_paths()["stdlib"]
            frame = ([f for f in frames if not f.filename.startswith(stdlib)] or frames or [None])[-1]
            at = f" at {frame.filename}:{frame.lineno}" if frame is not None else ""
        raise PluginError(f"{head}: importing {module_name} ({ep.value}) raised {type(exc).__name__}{at}: {exc}; "
                          f"that is a bug in {dist}: upgrade or uninstall it") from exc
    if not ep.attr:
        raise PluginError(f"{head}: its entry point value {ep.value!r} names a module, not a class; write it "
                          f"as '{module_name}:<BackendClass>'; {fix}")
    owner = module_name
    for part in ep.attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PluginError(f"{head}: its entry point value {ep.value!r} is wrong: {owner} has no "
                              f"attribute {part!r}{hint}; {fix}") from None
        owner = f"{owner}.{part}"
    return obj


class CkptkitPluginManager(pluggy.PluginManager):
    """A pluggy manager that also knows the backend types and where each came from."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.backend_types: dict[str, BackendType] = {}
        self.broken: dict[str, PluginError] = {}
        self.broken_dists: dict[str, str] = {}  # the distribution each broken type came from
        # Whether entry points of every distribution were loaded, or only ckptkit's own.
        self.autoloaded = False
        # The types ckptkit itself provides: another distribution's type of the same name is
        # ignored (with a warning), never taken for it, nor does it make ckptkit's unusable.
        self.builtin: frozenset[str] = frozenset()

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        # pluggy reads every attribute of a plugin to find its hooks. A backend's property (a
        # client made on first use, say) must not run then: it may connect, or create a database
        # in the working directory, while a config is only being checked.
        if isinstance(inspect.getattr_static(plugin, name, None), (property, functools.cached_property)):
            return None
        return super().parse_hookimpl_opts(plugin, name)

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
        _check_class_attributes(where, cls)
        hooks = set()
        for attr in dir(cls):
            opts = self.parse_hookimpl_opts(cls, attr)
            if opts is None:
                spec = None if attr.startswith("_") else getattr(getattr(self.hook, attr, None), "spec", None)
                if spec is not None and callable(getattr(cls, attr, None)):
                    # pluggy only calls marked methods: this one would silently never run.
                    raise PluginError(
                        f"{where}: {attr} is named like the ckptkit hook {attr} but is not marked as a hook "
                        f"implementation, so ckptkit would never call it; decorate it with @hookimpl "
                        "(from ckptkit.plugin import hookimpl), or rename it if it is not meant as the hook"
                    )
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
            missing = [p for p in REQUIRED_ARGUMENTS.get(attr, ()) if p not in params]
            if missing:
                raise PluginError(
                    f"{where}: hook {attr} does not take {', '.join(missing)}, which it must honour: left out, "
                    f"{attr} would delete what {'they protect' if len(missing) > 1 else 'it protects'} "
                    f"(with dry_run, what it should only list); add {', '.join(missing)} to its arguments"
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
        if only_dist is None:
            self.autoloaded = True
        found = only_dist is None or _normalized(only_dist) == _normalized(PROJECT_NAME)
        for ep in importlib.metadata.entry_points(group=BACKENDS_ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            if only_dist is not None and (dist is None or _normalized(dist.metadata["Name"] or "") != _normalized(only_dist)):
                continue
            found = True
            label = _dist_label(dist)
            own = dist is not None and _normalized(dist.metadata["Name"] or "") == _normalized(PROJECT_NAME)
            if ep.name in self.builtin and not own:
                log.warning("%s declares backend type %r, which ckptkit itself provides: ckptkit's is used and %s's "
                            "is ignored; ask its authors to give theirs another name, or uninstall %s",
                            label, ep.name, label, label if dist is None else label.split()[0])
                continue
            try:
                cls = _load_entry_point(ep, label)
                self.add_backend_type(ep.name, cls, label)
            except PluginError as exc:
                log.warning("%s", exc)
                self.broken[ep.name] = exc
                self.broken_dists[ep.name] = label
        if not found:
            # A misspelt name loaded nothing, and the config's type then looked uninstalled.
            declaring = sorted({_dist_label(ep.dist).split()[0] for ep in importlib.metadata.entry_points(
                group=BACKENDS_ENTRY_POINT_GROUP) if getattr(ep, "dist", None) is not None})
            raise PluginError(f"load_backend_entrypoints(only_dist={only_dist!r}): no installed distribution of that "
                              f"name declares {BACKENDS_ENTRY_POINT_GROUP} entry points (those that do: "
                              f"{', '.join(declaring) or 'none'})")

    def backend_type(self, name: str, key: str) -> BackendType:
        """The type called ``name``; ``key`` is the config key that asked for it."""
        if name in self.broken:
            # Broken, or claimed by two distributions, where using either would be a guess.
            raise PluginError(f"{key}: {self.broken[name]}")
        if name in self.backend_types:
            return self.backend_types[name]
        installed = ", ".join(sorted(self.backend_types)) or "none"
        hints = []
        if not self.autoloaded:
            declared = [_dist_label(ep.dist) for ep in importlib.metadata.entry_points(
                group=BACKENDS_ENTRY_POINT_GROUP, name=name) if getattr(ep, "dist", None) is not None]
            if declared:
                # Switched off by the variable, or by make_plugin_manager(autoload=False) in code.
                how = (f"unset {DISABLE_AUTOLOAD_ENV}" if not autoload_enabled() else
                       "build the plugin manager with autoload=True, or call load_backend_entrypoints()")
                if len(set(declared)) > 1:  # loading them would refuse the clash: say so now
                    hints.append(f"{' and '.join(sorted(set(declared)))} declare it, so loading installed plugins "
                                 f"(switched off: {how}) would refuse it too; uninstall all but one of them")
                else:
                    hints.append(f"{declared[0]} declares it, but loading installed plugins is switched off "
                                 f"({how}, or add the type with add_backend_type)")
        hints += _dists_without_entry_point(name)
        if not hints and str(name).lower() in KNOWN_EXTRAS:
            extra = KNOWN_EXTRAS[str(name).lower()]
            if extra != name:
                hints.append(f"type names are lower case: {extra!r}")
            hints.append(install_hint(extra))
        if not hints:
            by_case = [t for t in self.backend_types if t.lower() == str(name).lower()]
            near = by_case or difflib.get_close_matches(name, list(self.backend_types), n=1)
            if near:
                hints.append(f"did you mean {near[0]!r}?")
        raise ConfigError(f"{key}: unknown backend type {name!r} (installed: {installed})"
                          + "".join(f"; {h}" for h in hints))

    def register_backend(self, instance: object, name: str, btype: BackendType) -> None:
        try:
            self.register(instance, name=name)
        except ValueError as exc:
            held = self.get_plugin(name)
            if any(isinstance(held, t.cls) for t in self.backend_types.values()):
                raise PluginError(
                    f"backend {name!r}: this plugin manager serves a CheckpointManager with a backend of that name "
                    "already, one that is still open. Close that manager first (close()), or give each manager a "
                    "plugin manager of its own (plugin_manager=make_plugin_manager())"
                ) from exc
            raise PluginError(
                f"backend {name!r} (type {btype.name!r}, from {btype.dist}) could not be "
                f"registered: {exc}"
            ) from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"backend {name!r} (type {btype.name!r}, from {btype.dist}): {exc}") from exc


def install_hint(extra: str) -> str:
    """How to install the backend plugin of ``extra`` ("s3"): never from the public index alone,
    where the name ckptkit is another project's."""
    return (f'install it from a checkout with: pip install -c constraints.txt ".[{extra}]" ./plugins/ckptkit-{extra}, '
            f'or from your team\'s index with: pip install --index-url URL "ckptkit[{extra}]" (see docs/install.md)')


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
    pm.builtin = frozenset(pm.backend_types)
    if autoload:
        pm.load_backend_entrypoints()
    pm.check_pending()
    return pm
