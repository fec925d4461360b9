"""The configuration: which backends exist and which roles each one serves."""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import os
import re
from typing import Any, Mapping

import attrs
import yaml

from .errors import ConfigError
from .redact import masked
from .roles import Role

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMATS = ("torch", "dcp")
ASYNC_COPIES = ("blocking", "optimizer_state", "background")
DTYPES = ("float32", "float16", "bfloat16")


def _unknown(key: str, given: Mapping, allowed: tuple[str, ...]) -> None:
    for k in given:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = f"{key}.{k}" if key else str(k)
            raise ConfigError(f"{where}: unknown key{hint} (allowed: {', '.join(allowed)})")


def check_options(key: str, options: Mapping, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    """Reject unknown and missing keys of a backend's options; ``key`` is where they sit."""
    _unknown(key, options, allowed)
    for r in required:
        if r not in options:
            raise ConfigError(f"{key}.{r}: required key is missing")


def check_number(key: str, value: Any, minimum: float, integer: bool = False) -> Any:
    """``value`` when it is a number (an int when ``integer``) of at least ``minimum``, else a
    ConfigError naming ``key``; bools are refused."""
    bad = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if bad or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}: must be {kind} >= {minimum:g}, got {value!r}")
    return value


def check_run_name(name: Any, key: str = "run_name") -> str:
    """A run name becomes a folder under each backend's root: keep it one plain path segment."""
    if not isinstance(name, str) and isinstance(name, (int, float, datetime.date)):
        # YAML reads run_name: 42 (or 1.10, 010, yes, 2024-01-05) as a number, a boolean or a
        # date, and the value it made is not what was written: no value is suggested.
        kind = type(name).__name__
        raise ConfigError(f"{key}: YAML read it as {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a name; quote it as written, "
                          f"e.g. {key}: \"exp-42\"")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{key}: {name!r} is not a valid run name; use 1 to 128 ASCII letters, digits, '.', '_' and "
            "'-', starting with a letter or digit, with no '/' and no '..'"
        )
    from .storage import written_by_ckptkit  # storage checks run names with this function

    if written_by_ckptkit(name):
        # Under a root that is another run's folder, that run would take this one for its own
        # checkpoint: replace it with its save of that step, or prune it.
        raise ConfigError(f"{key}: {name!r} is the name of a folder ckptkit writes inside a run ('step-' and 10 "
                          "digits, 'final', 'final-' and digits); choose a run name of another shape (a run saved "
                          "under such a name before: rename its folder under each backend root to the new name)")
    return name



def _mapping(key: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
    return value


@attrs.frozen
class BackendSpec:
    """One declared backend: its config name, its type, and the options its type reads."""

    # The backend's name: its key under ``backends``, and what ``roles.*.backends`` lists.
    name: str
    # The backend type: a name in the ``ckptkit.backends`` entry-point group (``local``, ``s3``, ...).
    type: str
    # Every other key: the options that its type reads. Shown without credentials: a repr
    # ends up in logs, tracebacks and debuggers.
    options: dict[str, Any] = attrs.field(factory=dict, repr=lambda options: repr(masked(options)))

    @classmethod
    def from_dict(cls, name: str, data: Any) -> BackendSpec:
        key = f"backends.{name}"
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigError(f"{key}: backend names use ASCII letters, digits, '.', '_' and '-'")
        data = _mapping(key, data)
        btype = data.get("type")
        if "type" not in data:
            raise ConfigError(f"{key}.type: required key is missing (e.g. type: local)")
        if not isinstance(btype, str) or not btype:
            raise ConfigError(f"{key}.type: must be the name of a backend type (e.g. type: local), got {btype!r}")
        return cls(name=name, type=btype, options={k: v for k, v in data.items() if k != "type"})


def _backends(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: a role needs at least one backend (a list of backend names)")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: lists a backend twice")
    return tuple(value)


@attrs.frozen
class KeepBest:
    """``roles.resume.keep_best``: the ``count`` best checkpoints by ``metric`` are kept besides the last."""

    # The key of ``save(metrics=...)`` that ranks checkpoints; one without it, or with NaN, does not compete.
    metric: str
    # ``min`` or ``max``: whether a lower or a higher value is better. Ties go to the newer step.
    mode: str = "min"
    # How many of the best checkpoints are kept besides the newest ``keep_last`` (an integer >= 1).
    count: int = 1

    KEYS = ("metric", "mode", "count")

    @classmethod
    def from_dict(cls, data: Any, key: str) -> KeepBest:
        data = _mapping(key, data)
        _unknown(key, data, cls.KEYS)
        metric = data.get("metric")
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"{key}.metric: name the metric to rank checkpoints by (a key of save's metrics=), "
                              f"got {metric!r}")
        mode = data.get("mode", "min")
        if mode not in ("min", "max"):
            raise ConfigError(f"{key}.mode: must be min or max, got {mode!r}")
        return cls(metric=metric, mode=mode, count=check_number(f"{key}.count", data.get("count", 1), 1, integer=True))

    def best(self, metrics_by_step: Mapping[int, Mapping[str, float]]) -> frozenset[int]:
        """The steps of the ``count`` best checkpoints; those without the metric, or with NaN, do not compete."""
        scored = [(v, step) for step, m in metrics_by_step.items()
                  if isinstance(v := m.get(self.metric), (int, float)) and v == v]
        # Ties go to the newer step.
        scored.sort(key=lambda vs: (vs[0] if self.mode == "min" else -vs[0], -vs[1]))
        return frozenset(step for _, step in scored[: self.count])


@attrs.frozen
class ResumeRole:
    """``roles.resume``: where resume checkpoints go, how often they are written, how many are kept."""

    # Where resume checkpoints go: declared backend names (or one name). Local-disk ones are written first.
    backends: tuple[str, ...]
    # ``save`` writes only when ``step % every_n_steps == 0`` (or with ``force=True``); step 0 is due.
    every_n_steps: int = 1000
    # Each backend keeps its newest ``keep_last`` committed checkpoints and prunes older ones (>= 1).
    keep_last: int = 3
    # ``torch``: the full state, gathered to rank 0, in one file. ``dcp``: every rank writes its own
    # shards, and a checkpoint saved on N ranks loads on M.
    format: str = "torch"
    # With ``true`` (``format: torch`` only), ``save`` returns once the state is copied to CPU memory,
    # and rank 0 writes, commits and prunes in a background thread.
    async_: bool = False
    # With ``async: true``, which tensors are copied on the writer thread while training goes on
    # rather than before ``save`` returns. ``blocking``: none. ``optimizer_state``: the given
    # optimizer's state, which only its ``step`` changes (two thirds of an AdamW state).
    # ``background``: that and the parameters it trains. Every optimizer's ``step`` waits for that
    # copy, and a deferred tensor changed in place any other way between ``save`` and the next
    # step fails that save.
    async_copy: str = "optimizer_state"
    # Keep the best checkpoints by a metric besides the newest ``keep_last``.
    keep_best: KeepBest | None = None
    # ``format: torch`` only: split the state into this many files of about equal bytes
    # (``state-00-of-04.pt`` ...; one file keeps the name ``state.pt``), written at the same time
    # by backends whose client allows it (local, s3, gcs). 1 to 64.
    write_threads: int = 1

    KEYS = ("backends", "every_n_steps", "keep_last", "format", "async", "async_copy", "keep_best", "write_threads")

    @classmethod
    def from_dict(cls, data: Any, key: str = "roles.resume") -> ResumeRole:
        data = _mapping(key, data)
        _unknown(key, data, cls.KEYS)
        fmt = data.get("format", "torch")
        if fmt not in FORMATS:
            raise ConfigError(f"{key}.format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
        is_async = data.get("async", False)
        if not isinstance(is_async, bool):
            raise ConfigError(f"{key}.async: must be true or false, got {is_async!r}")
        if is_async and fmt != "torch":
            raise ConfigError(f"{key}.async: asynchronous saving works with format: torch; "
                              "sharded (dcp) saves are synchronous, so set async: false")
        async_copy = data.get("async_copy", "optimizer_state" if is_async else "blocking")
        if async_copy not in ASYNC_COPIES:
            raise ConfigError(f"{key}.async_copy: must be one of {', '.join(ASYNC_COPIES)}, got {async_copy!r}")
        if "async_copy" in data and async_copy != "blocking" and not is_async:
            raise ConfigError(f"{key}.async_copy: {async_copy} applies to asynchronous saves; set async: true "
                              "as well, or leave async_copy out")
        threads = check_number(f"{key}.write_threads", data.get("write_threads", 1), 1, integer=True)
        if threads > 64:
            raise ConfigError(f"{key}.write_threads: at most 64, got {threads}")
        if threads > 1 and fmt != "torch":
            raise ConfigError(f"{key}.write_threads: splits a format: torch state into files; with format: {fmt} "
                              "every rank writes its own shards already, so leave it out")
        return cls(
            write_threads=threads,
            backends=_backends(f"{key}.backends", data.get("backends")),
            every_n_steps=check_number(f"{key}.every_n_steps", data.get("every_n_steps", 1000), 1, integer=True),
            keep_last=check_number(f"{key}.keep_last", data.get("keep_last", 3), 1, integer=True),
            format=fmt,
            async_=is_async,
            async_copy=async_copy,
            keep_best=None if data.get("keep_best") is None else KeepBest.from_dict(data["keep_best"], f"{key}.keep_best"),
        )


@attrs.frozen
class FinalRole:
    """``roles.final``: where ``finalize`` and ``ckptkit publish`` send the final model."""

    # Where the final model goes: declared backend names (or one name). Registries (``mlflow``) go last.
    backends: tuple[str, ...]
    # Cast the final model's floating-point tensors to ``float32``, ``float16`` or ``bfloat16``
    # (default: keep them as trained). Resume checkpoints are not affected.
    dtype: str | None = None

    KEYS = ("backends", "dtype")

    @classmethod
    def from_dict(cls, data: Any, key: str = "roles.final") -> FinalRole:
        data = _mapping(key, data)
        _unknown(key, data, cls.KEYS)
        dtype = data.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"{key}.dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return cls(backends=_backends(f"{key}.backends", data.get("backends")), dtype=dtype)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: it keeps the last one
    silently, and a second ``roles:`` block dropped the first one's roles."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked once per mapping, before PyYAML merges ``<<: *base`` pairs into it (and into
        # a base, in place): the keys beside a merge key override the base's, as meant.
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice in one mapping (lines {first.line + 1} and "
                        f"{key_node.start_mark.line + 1}); the second would replace the first: merge them",
                        key_node.start_mark)
        super().flatten_mapping(node)


# A config is a few hundred values. YAML aliases that nest each other make a file of a few lines
# stand for billions (and one that holds itself, for endless ones), which any walk of it (a
# check, an error message's repr) would go through.
MAX_VALUES = 100_000


def check_expanded_size(data: Any, where: str) -> None:
    """Refuse ``data`` (as ``yaml.load`` made it) when it holds more than ``MAX_VALUES`` values
    counted as a walk meets them: a value an alias names again counts each time."""
    stack, count = [data], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where}: holds more than {MAX_VALUES} values once its YAML aliases (*name) are "
                              "expanded, where a config needs a few hundred; write the values out instead")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def _stable(value: Any) -> Any:
    """A stand-in for a value JSON cannot hold that is the same on every rank: sets sorted, any
    other object by its type alone (its repr may hold a memory address)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


@attrs.frozen
class Distributed:
    """How ckptkit's own collectives behave when training runs on several ranks."""

    # A rank waits this long for the others at each of ckptkit's meeting points, including
    # for rank 0 to finish writing a full checkpoint in a synchronous save.
    timeout_s: float = 600.0

    KEYS = ("timeout_s",)

    @classmethod
    def from_dict(cls, data: Any, key: str = "distributed") -> Distributed:
        data = _mapping(key, data)
        _unknown(key, data, cls.KEYS)
        return cls(timeout_s=float(check_number(f"{key}.timeout_s", data.get("timeout_s", 600.0), 1)))


@attrs.frozen
class Config:
    """A validated configuration. Build it with ``from_dict``, ``from_file`` or ``load``."""

    # The declared backends by name, each with its ``type`` and that type's options.
    backends: dict[str, BackendSpec]
    # The ``resume`` role (``roles.resume``), if declared.
    resume: ResumeRole | None = None
    # The ``final`` role (``roles.final``), if declared.
    final: FinalRole | None = None
    # The folder under each backend's root (default: ``default``). ``from_config(run_name=...)``
    # and ``--run-name`` take precedence.
    run_name: str | None = None
    # A free-form tag: fills ``{algorithm}`` in ``registered_model_name``, and is stored with the final model.
    algorithm: str | None = None
    # Where the config was read from (a file, or ``<dict>``), named in errors; not a key.
    source: str = "<dict>"
    # How ckptkit's own collectives behave across ranks (``distributed``).
    distributed: Distributed = Distributed()

    KEYS = ("run_name", "algorithm", "backends", "roles", "distributed")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: the config must be a mapping with keys {', '.join(cls.KEYS)}")
        _unknown("", data, cls.KEYS)
        run_name = data.get("run_name")
        if run_name is not None:
            check_run_name(run_name)
        algorithm = data.get("algorithm")
        if algorithm is not None and not isinstance(algorithm, str):
            raise ConfigError(f"algorithm: must be a string, got {algorithm!r}")
        raw_backends = _mapping("backends", data.get("backends") or {})
        if not raw_backends:
            raise ConfigError("backends: declare at least one backend (e.g. scratch: {type: local, path: ./checkpoints})")
        backends = {name: BackendSpec.from_dict(name, spec) for name, spec in raw_backends.items()}
        roles = _mapping("roles", data.get("roles") or {})
        _unknown("roles", roles, tuple(r.value for r in Role))
        if not roles:
            raise ConfigError("roles: declare at least one role (resume or final) and its backends")
        resume = ResumeRole.from_dict(roles["resume"]) if "resume" in roles else None
        final = FinalRole.from_dict(roles["final"]) if "final" in roles else None
        for role, rc in ((Role.RESUME, resume), (Role.FINAL, final)):
            for b in rc.backends if rc else ():
                if b not in backends:
                    raise ConfigError(
                        f"roles.{role}.backends: {b!r} is not declared under backends "
                        f"(declared: {', '.join(backends)})"
                    )
        distributed = Distributed.from_dict(data.get("distributed") or {})
        return cls(backends=backends, resume=resume, final=final, run_name=run_name,
                   algorithm=algorithm, source=source, distributed=distributed)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        path = os.fspath(path)
        if "\n" in path:  # the YAML text itself, not a path to it (never shown: it may hold credentials)
            raise ConfigError("the config given is text of several lines, not the path of a config file: pass "
                              "the file's path, or the text parsed (yaml.safe_load(text), a dict)")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{path}: cannot read the config file: {reason}") from None
        except yaml.YAMLError as exc:
            # One line: PyYAML's message spans several, with the position on its own line.
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        check_expanded_size(data, path)
        try:
            return cls.from_dict(data, source=path)
        except ConfigError as exc:
            message = str(exc)
            if message.startswith(f"{path}: "):  # from_dict already named the file
                raise
            raise ConfigError(f"{path}: {message}") from None

    @classmethod
    def load(cls, source: str | os.PathLike | Mapping | Config) -> Config:
        if isinstance(source, Config):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        return cls.from_file(source)

    def role(self, role: Role) -> ResumeRole | FinalRole | None:
        return self.resume if role is Role.RESUME else self.final

    def fingerprint(self) -> dict[str, str]:
        """A short digest of every setting by its dotted key, the source file left out: what the
        ranks of a job compare to find a config that differs. Digests, so that no value (a
        credential in a backend's options) leaves the rank."""
        plain = attrs.asdict(self, filter=lambda a, _: a.name != "source",
                             value_serializer=lambda _i, _f, v: _stable(v) if isinstance(v, (set, frozenset)) else v)
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping) and value:
                for k, v in value.items():
                    k = {"resume": "roles.resume", "final": "roles.final", "async_": "async"}.get(k, k) if prefix in ("", "roles.resume") else k
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                text = json.dumps(value, sort_keys=True, default=_stable)
                flat[prefix] = hashlib.sha256(text.encode()).hexdigest()[:16]

        walk("", plain)
        return flat

    def roles_of(self, backend: str) -> list[Role]:
        return [r for r in Role if (rc := self.role(r)) is not None and backend in rc.backends]
