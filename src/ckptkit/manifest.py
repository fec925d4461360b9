"""The manifest: the file whose presence commits a checkpoint and which lists what it holds."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any

import attrs

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@attrs.frozen
class FileEntry:
    """A file's size and its digest, ``"<algorithm>:<hex>"``."""

    size: int
    digest: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileEntry:
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict) or "files" not in data:
            raise ValueError("not a ckptkit manifest")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["metrics"] = {k: v if math.isfinite(v) else str(v) for k, v in self.metrics.items()}
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False).encode()

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
