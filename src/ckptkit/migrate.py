"""``ckptkit migrate-config``: a trainer's checkpoint settings turned into ckptkit's role mapping.

It reads the shape many training stacks share::

    paths:
      checkpoints: {base_path: s3://bucket/ckpts, save_interval: 1000, keep_last: 5, save_final: true}
    mlflow: {experiment: wmtp, tracking_uri: http://mlflow:5000, registry_uri: http://mlflow:5000}

and writes a ckptkit config whose every setting says, in a comment, where it came from and
why. What has no ckptkit equivalent is refused with an error naming the key.
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any, Mapping

import attrs
import yaml

from .config import Config, check_expanded_size
from .errors import ConfigError
from .plugins import make_plugin_manager
from .redact import redact

CHECKPOINT_KEYS = ("base_path", "save_interval", "keep_last", "save_final")
MLFLOW_KEYS = ("experiment", "tracking_uri", "registry_uri")
STORE = "checkpoints"
REGISTRY = "registry"
_SCHEMES = {"s3": "s3", "gs": "gcs", "file": "local"}
_LAYOUT = "{path}/<run_name>/step-<step>/"


@attrs.frozen
class Choice:
    """One setting of the new config: its dotted ckptkit key, the trainer key it came from, and why."""

    key: str
    source: str
    why: str


@attrs.frozen
class Migration:
    """The ckptkit config made from a trainer config, with the reason for each setting."""

    config: dict[str, Any]
    choices: tuple[Choice, ...]
    ignored: tuple[str, ...]
    source: str

    def explanation(self) -> str:
        """One paragraph per setting, then the trainer keys that stay the trainer's."""
        lines = [f"from {self.source}:"]
        for c in self.choices:
            head = f"{c.key} <- {c.source}: " if c.source else f"{c.key}: "
            lines += _wrap(redact(head + c.why), 100, "  ", "      ")
        if self.ignored:
            lines += _wrap("left to the trainer (not checkpoint settings): " + ", ".join(self.ignored), 100,
                           "  ", "      ")
        return "\n".join(lines)

    def to_yaml(self) -> str:
        """The config as YAML, each setting under a comment that gives its source and reason."""
        why = {c.key: c for c in self.choices}
        out = [f"# ckptkit config made by `ckptkit migrate-config {os.path.basename(self.source)}`.",
               "# Check it with `ckptkit check FILE`; the reason for each setting is above it."]

        def comment(key: str, indent: str) -> None:
            c = why.get(key)
            if c is not None:
                text = (f"{c.source}: " if c.source else "") + c.why
                out.extend(_wrap(text, 96, f"{indent}# ", f"{indent}# "))

        def walk(mapping: Mapping[str, Any], prefix: str, depth: int) -> None:
            indent = "  " * depth
            for k, v in mapping.items():
                key = f"{prefix}.{k}" if prefix else k
                comment(key, indent)
                if isinstance(v, Mapping):
                    out.append(f"{indent}{k}:")
                    walk(v, key, depth + 1)
                else:  # JSON scalars and lists are YAML too, and quote what needs quoting
                    out.append(f"{indent}{k}: {json.dumps(v)}")

        walk(self.config, "", 0)
        if self.ignored:
            out.append("# Left to the trainer: " + ", ".join(self.ignored))
        return "\n".join(out) + "\n"


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    # URIs stay whole: no breaks at their hyphens.
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False, break_long_words=False)


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
    return value


def _refuse_unknown(given: Mapping[str, Any], key: str, known: tuple[str, ...], why: str) -> None:
    for k in given:
        if k not in known:
            raise ConfigError(f"{key}.{k}: cannot be mapped to ckptkit ({why}; known here: {', '.join(known)}); "
                              "remove it, and carry its meaning over by hand if it matters (docs/migrate.md)")


def _interval(value: Any, key: str, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: {value!r} cannot be mapped: ckptkit's {meaning} must be an integer >= 1")
    return value


def _store(base_path: Any, key: str) -> tuple[dict[str, Any], str]:
    """The backend for ``base_path`` and a sentence on where checkpoints land."""
    if not isinstance(base_path, str) or not base_path.strip():
        raise ConfigError(f"{key}: must be a path or a file://, s3:// or gs:// URI, got {base_path!r}")
    path = base_path.strip()
    scheme = path.split("://", 1)[0].lower() if "://" in path else ""
    if scheme and scheme not in _SCHEMES:
        raise ConfigError(f"{key}: {base_path!r} cannot be mapped: no ckptkit backend reads {scheme}:// "
                          "(local paths and file://, s3:// with ckptkit-s3, gs:// with ckptkit-gcs)")
    btype = _SCHEMES.get(scheme, "local")
    if btype != "local":
        path = path.rstrip("/")
    where = _LAYOUT.format(path=path.rstrip("/"))
    if btype == "local":
        why = (f"resume checkpoints stay on this disk, in {where}, each written under a temporary name, "
               "fsynced and renamed into place, so a crash never leaves a half checkpoint that looks whole.")
    else:
        store = "S3" if btype == "s3" else "GCS"
        why = (f"resume checkpoints stay on {store}, in {where}; a checkpoint counts once its manifest.json, "
               f"written last, is there. Credentials come from the {store} default chain as before"
               + ("; for MinIO or another S3-compatible store add storage_options: {endpoint_url: ...}."
                  if btype == "s3" else "."))
    return {"type": btype, "path": path}, why + (" Checkpoints that the trainer wrote in its own layout are not "
                                                 "read by ckptkit: finish those runs with the old code, or start "
                                                 "new run names.")


def migrate(data: Any, source: str = "<dict>") -> Migration:
    """The ckptkit config for a trainer config of the shape above; ``ConfigError`` names what cannot be mapped."""
    data = _mapping(data, source)
    paths = _mapping(data.get("paths"), "paths") if "paths" in data else None
    if paths is None or "checkpoints" not in paths:
        raise ConfigError(f"{source}: paths.checkpoints: required (base_path, save_interval, keep_last, save_final)")
    ckpt = _mapping(paths["checkpoints"], "paths.checkpoints")
    _refuse_unknown(ckpt, "paths.checkpoints", CHECKPOINT_KEYS, "ckptkit has no such checkpoint setting")
    if "base_path" not in ckpt:
        raise ConfigError("paths.checkpoints.base_path: required: where the checkpoints go")
    mlflow = _mapping(data["mlflow"], "mlflow") if data.get("mlflow") is not None else None
    if mlflow is not None:
        _refuse_unknown(mlflow, "mlflow", MLFLOW_KEYS, "ckptkit's mlflow backend has no such setting")

    choices: list[Choice] = []
    store, store_why = _store(ckpt["base_path"], "paths.checkpoints.base_path")
    backends: dict[str, Any] = {STORE: store}
    choices.append(Choice(f"backends.{STORE}", "paths.checkpoints.base_path", store_why))

    resume: dict[str, Any] = {"backends": [STORE]}
    choices.append(Choice("roles.resume.backends", "", (
        f"resume checkpoints go to the backend {STORE!r} only, never to MLflow: MLflow keeps every artifact forever and "
        "nothing prunes it, so a checkpoint every N steps piles up there. A resume checkpoint records the "
        "MLflow run id, so a resumed training logs to the same MLflow run.")))
    if "save_interval" in ckpt:
        resume["every_n_steps"] = _interval(ckpt["save_interval"], "paths.checkpoints.save_interval",
                                            "roles.resume.every_n_steps (a checkpoint every N steps)")
        why = (f"save(step=...) writes a checkpoint when step % {resume['every_n_steps']} == 0 (step 0 included) "
               "and does nothing on other steps, so the training loop calls it every step.")
    else:
        resume["every_n_steps"] = 1000
        why = "not given: ckptkit's default, a checkpoint every 1000 steps (step % 1000 == 0)."
    choices.append(Choice("roles.resume.every_n_steps", "paths.checkpoints.save_interval", why))
    if "keep_last" in ckpt:
        resume["keep_last"] = _interval(ckpt["keep_last"], "paths.checkpoints.keep_last",
                                        "roles.resume.keep_last (it always prunes; keeping every checkpoint is "
                                        "not a resume role)")
        why = (f"after each save, the newest {resume['keep_last']} checkpoints that are known intact stay and "
               "older ones are deleted; the newest is never deleted.")
    else:
        resume["keep_last"] = 3
        why = "not given: ckptkit's default, the newest 3 checkpoints stay."
    choices.append(Choice("roles.resume.keep_last", "paths.checkpoints.keep_last", why))

    save_final = ckpt.get("save_final", True)
    if not isinstance(save_final, bool):
        raise ConfigError(f"paths.checkpoints.save_final: must be true or false, got {save_final!r}")
    roles: dict[str, Any] = {"resume": resume}
    if mlflow is not None and save_final:
        backends[REGISTRY] = _registry(mlflow, choices)
    if save_final:
        final = [STORE] + ([REGISTRY] if REGISTRY in backends else [])
        roles["final"] = {"backends": final}
        why = (f"finalize() writes the final model once, to {store['path'].rstrip('/')}/<run_name>/final/,"
               + (" as save_final: true asks" if "save_final" in ckpt else " (save_final not given: taken as true)") + ".")
        if REGISTRY in backends:
            why += (" Then MLflow registers it: "
                    + ("it records the URI of that copy instead of uploading a second one."
                       if store["type"] != "local" else "it uploads a copy, since a local path is not readable "
                                                        "by everyone who uses the registry."))
        choices.append(Choice("roles.final.backends", "paths.checkpoints.save_final", why))
    else:
        choices.append(Choice("roles", "paths.checkpoints.save_final", (
            "false: no final role, so finalize() is not called."
            + (" The mlflow section is not used, since ckptkit sends MLflow only the final model; set "
               "save_final: true to register one." if mlflow is not None else ""))))
    config = {"backends": backends, "roles": roles}
    ignored = tuple(sorted({k for k in data if k not in ("paths", "mlflow")}
                           | {f"paths.{k}" for k in paths if k != "checkpoints"}))
    migration = Migration(config=config, choices=tuple(choices), ignored=ignored, source=source)
    _check(migration)
    return migration


def _registry(mlflow: Mapping[str, Any], choices: list[Choice]) -> dict[str, Any]:
    registry: dict[str, Any] = {"type": "mlflow"}
    tracking = mlflow.get("tracking_uri")
    registry_uri = mlflow.get("registry_uri")
    if registry_uri is not None and registry_uri != tracking:
        raise ConfigError(f"mlflow.registry_uri: {redact(str(registry_uri))!r} differs from tracking_uri "
                          f"{redact(str(tracking))!r} and cannot be mapped: ckptkit's mlflow backend registers "
                          "models on its tracking server; make them the same, or remove registry_uri")
    why = ("MLflow gets the final model only, once per run, registered as a new version of the model named "
           "after the run (add registered_model_name to choose another name; it may use {run_name} and "
           "{algorithm}). The trainer's upload of every checkpoint to MLflow goes away.")
    if registry_uri is not None:
        why += " mlflow.registry_uri is the tracking URI, which ckptkit uses for the registry too, so it is not written."
    choices.append(Choice(f"backends.{REGISTRY}", "mlflow", why))
    if tracking is not None:
        registry["tracking_uri"] = tracking
        why = "the tracking server (and model registry) that the final model goes to."
        if isinstance(tracking, str) and "@" in tracking.split("://", 1)[-1].split("/", 1)[0]:
            why += (" It holds credentials: ckptkit removes them from its messages, but keep them out of this "
                    "file with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.")
        choices.append(Choice(f"backends.{REGISTRY}.tracking_uri", "mlflow.tracking_uri", why))
    else:
        choices.append(Choice(f"backends.{REGISTRY}.type", "mlflow.tracking_uri", (
            "not given: ckptkit uses $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.")))
    if "experiment" in mlflow:
        experiment = mlflow["experiment"]
        if not isinstance(experiment, str) or not experiment.strip():
            raise ConfigError(f"mlflow.experiment: must be a non-empty experiment name, got {experiment!r}")
        registry["experiment"] = experiment
        choices.append(Choice(f"backends.{REGISTRY}.experiment", "mlflow.experiment",
                              "the final model's run is logged in this experiment (created on first use)."))
    return registry


def _check(migration: Migration) -> None:
    """The new config must load, and a backend whose type is installed checks its options too
    (building a backend touches no storage). An error names the trainer key it came from."""
    source_of = {c.key: c.source for c in migration.choices if c.source}
    config = Config.from_dict(migration.config, source="the migrated config")
    types = make_plugin_manager().backend_types
    for name, spec in config.backends.items():
        btype = types.get(spec.type)
        if btype is None:
            continue  # not installed here: `ckptkit check` says what to install
        try:
            instance = btype.cls.from_config(name, dict(spec.options))
        except ConfigError as exc:
            raise ConfigError(_in_trainer_terms(str(exc), source_of)) from None
        close = getattr(instance, "close", None)
        if callable(close):
            close()


def _in_trainer_terms(message: str, source_of: Mapping[str, str]) -> str:
    """A backend's error about ``backends.x.key`` said about the trainer key it came from."""
    key, _, rest = message.partition(": ")
    owners = [k for k in source_of if key == k or key.startswith(k + ".")]
    if not owners:
        return message
    return f"{source_of[max(owners, key=len)]}: {rest} (in the migrated config: {key})"


def migrate_file(path: str | os.PathLike) -> Migration:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: trainer config not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    check_expanded_size(data, path)
    try:
        return migrate(data, source=path)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(f"{path}: ") else f"{path}: {message}") from None
