"""The manifest: the file whose presence commits a checkpoint and which lists what it holds."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import secrets
from typing import Any

import attrs
import xxhash

MANIFEST_NAME = "manifest.json"
# Version 2 manifests carry ``checksum``, a digest of everything else they say.
MANIFEST_VERSION = 2
_UNSEALED_VERSION = 1


@attrs.frozen
class FileEntry:
    """A file's size and its digest, ``"<algorithm>:<hex>"``."""

    size: int
    digest: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileEntry:
        """An entry from a manifest's ``files`` mapping (older manifests carry ``sha256`` instead of ``digest``)."""
        if "digest" in data:
            return cls(size=int(data["size"]), digest=str(data["digest"]))
        return cls(size=int(data["size"]), digest=f"sha256:{data['sha256']}")


def _files(value: dict) -> dict[str, FileEntry]:
    return {name: e if isinstance(e, FileEntry) else FileEntry.from_dict(e) for name, e in value.items()}


def _metrics(value: dict) -> dict[str, float]:
    # JSON has no NaN or infinity: they are stored as the strings "nan", "inf" and "-inf".
    return {k: float(v) for k, v in value.items()}


@attrs.frozen
class Manifest:
    """What a committed checkpoint holds. Written last; a folder without one holds nothing."""

    run_name: str
    step: int
    epoch: int | None
    format: str
    files: dict[str, FileEntry] = attrs.field(converter=_files)
    metrics: dict[str, float] = attrs.field(factory=dict, converter=_metrics)
    mlflow_run_id: str | None = None
    role: str = "resume"
    world_size: int = 1
    torch_version: str = ""
    ckptkit_version: str = ""
    created: str = ""
    version: int = MANIFEST_VERSION
    # False: a checkpoint without extra.pt was saved without extra. True (manifests that do not say,
    # written before): its extra may be inside state.pt.
    extra_in_state: bool = True
    # The class of the optimizer whose state it holds, ``module:qualname`` (``gather.optimizer_class``);
    # None when saved without one, or in manifests written before they said.
    optimizer: str | None = None
    # The training that wrote it: made by a training that restored nothing, carried on by one that
    # restored. Tells one training's final models from another's of the same run name; None in
    # manifests written before they said.
    training_id: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest from already-parsed fields, unknown ones ignored and nothing checked; use
        ``from_json`` for bytes read from storage."""
        known = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a manifest and check it against its own checksum.

        Raises ``ValueError`` for anything that is not an intact ckptkit manifest: a changed
        byte anywhere in a version 2 manifest no longer matches its ``checksum``.
        """
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except RecursionError:
            raise ValueError("it is nested too deeply to be a ckptkit manifest") from None
        if not isinstance(data, dict) or "files" not in data:
            raise ValueError("not a ckptkit manifest")
        version = data.get("version")
        if version == MANIFEST_VERSION:
            if not _sealed_as_now(data):
                raise ValueError("its checksum does not match its content (the manifest was changed "
                                 "or damaged after it was written)")
            del data["checksum"]
            if data.get("format") not in _FORMATS or data.get("role", "resume") not in _ROLES:
                # Intact, as its checksum shows: a kind of checkpoint a later ckptkit writes.
                raise NewerManifestError(f"it is sealed intact but holds a {data.get('role')!r} checkpoint of "
                                         f"format {data.get('format')!r}, which this ckptkit ({_version()}) "
                                         "does not know")
        elif type(version) is int and version > MANIFEST_VERSION and (
                _sealed_as_now(data) or _later(data.get("ckptkit_version"))):
            # Told from a flipped bit by the seal every later version keeps (checked whatever
            # ckptkit_version says: a format change may land before a release is numbered), or
            # by the later release that wrote it.
            raise NewerManifestError(f"its version is {version}, from ckptkit {data.get('ckptkit_version')}, and "
                                     f"this ckptkit ({_version()}) reads versions up to {MANIFEST_VERSION}")
        elif not (version == _UNSEALED_VERSION and "checksum" not in data):
            raise ValueError(f"unknown manifest version {version!r}")
        _check_fields(data)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (non-finite metrics as strings), without the checksum."""
        data = attrs.asdict(self)
        data["metrics"] = {k: v if math.isfinite(v) else str(v) for k, v in self.metrics.items()}
        return data

    def to_json(self) -> bytes:
        """The manifest as strict JSON, sealed with a checksum of everything else in it."""
        data = self.to_dict()
        if self.version == MANIFEST_VERSION:
            data["checksum"] = _checksum(data)
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode()

    def check_location(self, run_name: str, step: int | None, where: str) -> None:
        """Raise ``ValueError`` unless the manifest belongs where it was found.

        ``step`` is the step its folder is named after (None for a final model's folder). A
        manifest copied, or altered, into another run's or step's folder would otherwise make
        restore resume the wrong step with the right-looking weights.
        """
        if self.run_name != run_name:
            raise ValueError(f"{where} says it belongs to run {self.run_name!r}, but it lies in run {run_name!r}")
        if step is not None and self.step != step:
            raise ValueError(f"{where} says step {self.step}, but it lies in the folder of step {step}")

    @property
    def total_size(self) -> int:
        """The size of all files it lists, in bytes."""
        return sum(e.size for e in self.files.values())


def training_of(manifest: Manifest) -> str:
    """The training that committed ``manifest``: its ``training_id``, or for one written before
    manifests named one, an id made from what every copy of it says alike (run, step, files)."""
    if manifest.training_id is not None:
        return manifest.training_id
    made = json.dumps([manifest.run_name, manifest.step, sorted((n, e.digest) for n, e in manifest.files.items())])
    return "legacy-" + xxhash.xxh3_64_hexdigest(made.encode())


def branch_of(training_id: str, step: int, past: str | None) -> str:
    """The training that goes on from ``step`` of training ``training_id`` past the later steps
    that training ``past`` committed (``restore(step=)``): the same for every job that branches
    there past the same steps; a new one each time where ``past`` is not known."""
    if past is None:
        return "branch-" + secrets.token_hex(8)
    return "branch-" + xxhash.xxh3_64_hexdigest(f"{training_id}:{step}:{past}".encode())


def counts_for(recorded: str | None, asked: str | None) -> bool:
    """Whether a final model published by training ``recorded`` counts for ``final_step`` asked
    after training ``asked``: asked after none, every one does; one that names none (written
    before training ids) counts for every training."""
    return asked is None or recorded in (None, asked)


class NewerManifestError(ValueError):
    """A manifest that a later ckptkit wrote (or one damaged to look so): what it commits must be
    neither loaded nor skipped for an older step, nor pruned as damaged."""


def _version() -> str:
    from . import __version__

    return __version__


def _release(text: Any) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text) if isinstance(text, str) else None
    return tuple(int(n or 0) for n in match.groups()) if match else None


def _later(text: Any) -> bool:
    """Whether ``text`` names a ckptkit release later than this one."""
    theirs, ours = _release(text), _release(_version())
    return theirs is not None and ours is not None and theirs > ours


def _sealed_as_now(data: dict[str, Any]) -> bool:
    """Whether ``data`` carries this version's seal: a checksum, as ``to_json`` makes it, of
    everything else in it. Every later manifest version keeps this seal, so that a reader of
    an earlier one can tell a later manifest from one damaged to look so."""
    rest = {k: v for k, v in data.items() if k != "checksum"}
    try:
        return data.get("checksum") == _checksum(rest)
    except (TypeError, ValueError):  # not canonical JSON (a NaN): not sealed by ckptkit
        return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A key given twice reads differently in different JSON readers, and the checksum covers
    # only the value this one keeps.
    data = dict(pairs)
    if len(data) != len(pairs):
        seen = [k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])]
        raise ValueError(f"it gives the key {seen[0]!r} twice")
    return data


_FORMATS = ("torch", "dcp", "files")
_ROLES = ("resume", "final")
_ALGORITHMS = ("xxh3_128", "sha256")
_HEX = frozenset("0123456789abcdef")


def _count(value: Any, least: int = 0) -> bool:
    return type(value) is int and value >= least


def valid_file_name(name: str) -> bool:
    """Whether ``name`` may name a file of a checkpoint: one plain name in its folder, no control characters."""
    return (bool(name) and name not in (".", "..", MANIFEST_NAME) and "/" not in name and "\\" not in name
            and all(c >= " " and c != "\x7f" for c in name))


def _digest(value: Any) -> bool:
    algorithm, _, hexdigest = value.partition(":") if isinstance(value, str) else ("", "", "")
    return algorithm in _ALGORITHMS and bool(hexdigest) and set(hexdigest) <= _HEX


def _metric(value: Any) -> bool:
    return type(value) in (int, float) or value in ("nan", "inf", "-inf")


def _check_fields(data: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of a parsed manifest whose value no ckptkit
    writes: every value a reader acts on has the type and range it expects."""
    files = data["files"]
    if not isinstance(files, dict) or not files:
        raise ValueError("it lists no files")
    for name, entry in files.items():
        if not valid_file_name(name):
            raise ValueError(f"it names a file outside its folder, or no file: {name!r}")
        if not isinstance(entry, dict) or not _count(entry.get("size")) or not (
                _digest(entry.get("digest")) if "digest" in entry else _digest(f"sha256:{entry.get('sha256')}")):
            raise ValueError(f"its entry for {name!r} is not a size and a checksum: {entry!r}"[:300])
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and _metric(v) for k, v in metrics.items()):
        raise ValueError("its metrics are not names with numbers")
    checks = {
        "run_name": lambda v: isinstance(v, str) and bool(v),
        "step": _count,
        "epoch": lambda v: v is None or _count(v),
        "format": lambda v: v in _FORMATS,
        "role": lambda v: v in _ROLES,
        "world_size": lambda v: _count(v, 1),
        "mlflow_run_id": lambda v: v is None or isinstance(v, str),
        "optimizer": lambda v: v is None or isinstance(v, str),
        "training_id": lambda v: v is None or (isinstance(v, str) and bool(v)),
        "extra_in_state": lambda v: type(v) is bool,
        "torch_version": lambda v: isinstance(v, str),
        "ckptkit_version": lambda v: isinstance(v, str),
        "created": lambda v: isinstance(v, str),
    }
    required = ("run_name", "step", "epoch", "format")
    for key, valid in checks.items():
        if key in data and not valid(data[key]) or key in required and key not in data:
            shown = repr(data.get(key, "(missing)"))[:80]
            raise ValueError(f"its {key} is {shown}, which no ckptkit writes"
                             + (" (a format this version does not know)" if key == "format" else ""))


def _checksum(data: dict[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return f"xxh3_128:{xxhash.xxh3_128_hexdigest(canonical.encode())}"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
