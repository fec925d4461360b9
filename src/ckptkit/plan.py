"""Storage planning: the bytes each role and backend will hold for a state size and a step count.

Beside the routed plan (what ckptkit stores) it computes the duplicate-upload plan that training
stacks often follow: every resume checkpoint also logged to MLflow, where nothing prunes it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import attrs

from .config import Config
from .errors import ConfigError

REGISTRY_TYPES = ("mlflow",)
OBJECT_STORE_TYPES = ("s3", "gcs")
DUPLICATE_BACKEND = "mlflow"

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15, "ki": 2**10, "kib": 2**10,
          "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float, key: str = "--state-size") -> int:
    """Bytes from ``14GB`` (decimal units), ``13GiB`` (binary units) or ``1000B``; a number
    given as text must carry its unit (``14`` alone is far more likely 14 GB than 14 bytes)."""
    if isinstance(text, bool):
        raise ConfigError(f"{key}: a size such as 14GB, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{key}: {text!r} is not a size; write e.g. 14GB, 512MiB or 1000B")
        value, unit = float(m.group(1)), m.group(2).lower()
        if not unit:
            raise ConfigError(f"{key}: {text!r} has no unit; write {m.group(1)}GB (10^9 bytes), "
                              f"{m.group(1)}GiB (2^30 bytes) or {m.group(1)}B if bytes are meant")
    size = int(round(value * _UNITS[unit]))
    if size <= 0:
        raise ConfigError(f"{key}: must be more than 0 bytes, got {text!r}")
    return size


def format_size(n: int | float) -> str:
    """Decimal units, as sizes are quoted for storage (``70 GB``), to three significant digits."""
    if abs(n) < 999.5:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        rounded = float(f"{n:.3g}")  # rounded first: 999.96 KB is 1 MB, not 1e+03 KB
        if abs(rounded) < 1000:
            return f"{rounded:g} {unit}"
    return f"{n:,.0f} TB"


@attrs.frozen
class Holding:
    """What one backend holds for one role: copies, and bytes at the end and at the peak."""

    role: str
    backend: str
    type: str
    copies: int
    end_bytes: int
    peak_bytes: int
    note: str = ""


def _sum(rows: tuple[Holding, ...], role: str | None = None, field: str = "end_bytes") -> int:
    return sum(getattr(h, field) for h in rows if role is None or h.role == role)


def _cut(routed: int, duplicate: int) -> float:
    return 0.0 if duplicate == 0 else 1.0 - routed / duplicate


@attrs.frozen
class Plan:
    """The routed plan beside the duplicate-upload plan, for one config and one training."""

    state_size: int
    final_size: int
    steps: int
    every_n_steps: int | None
    keep_last: int | None
    saves: int
    routed: tuple[Holding, ...]
    duplicate: tuple[Holding, ...]

    @property
    def resume_end(self) -> int:
        return _sum(self.routed, "resume")

    @property
    def duplicate_resume_end(self) -> int:
        return _sum(self.duplicate, "resume")

    @property
    def resume_cut(self) -> float:
        """The share of resume-checkpoint bytes that routing saves at the end of training."""
        return _cut(self.resume_end, self.duplicate_resume_end)

    @property
    def total_end(self) -> int:
        return _sum(self.routed)

    @property
    def duplicate_total_end(self) -> int:
        return _sum(self.duplicate)

    @property
    def total_cut(self) -> float:
        return _cut(self.total_end, self.duplicate_total_end)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_size": self.state_size, "final_size": self.final_size, "steps": self.steps,
            "every_n_steps": self.every_n_steps, "keep_last": self.keep_last, "saves": self.saves,
            "routed": [attrs.asdict(h) for h in self.routed],
            "duplicate": [attrs.asdict(h) for h in self.duplicate],
            "totals": {
                "resume_end": self.resume_end, "duplicate_resume_end": self.duplicate_resume_end,
                "resume_cut": round(self.resume_cut, 4),
                "end": self.total_end, "duplicate_end": self.duplicate_total_end,
                "total_cut": round(self.total_cut, 4),
                "peak": _sum(self.routed, field="peak_bytes"),
                "duplicate_peak": _sum(self.duplicate, field="peak_bytes"),
            },
        }


def saves_for(steps: int, every_n_steps: int) -> int:
    """Resume saves in ``range(steps)``: every step that is a multiple of every_n_steps."""
    return math.ceil(steps / every_n_steps)


def make_plan(config: Config, state_size: int, steps: int, final_size: int | None = None) -> Plan:
    """Bytes per role and backend at the end of ``steps`` training steps and at the peak.

    A resume backend holds ``min(saves, keep_last)`` checkpoints at the end; at the peak one
    more, since a new checkpoint commits before the oldest is pruned. Each final backend holds
    the final model once, except that a registry holds only a URI when an S3/GCS final backend
    has the file. The duplicate plan adds every resume checkpoint to MLflow, unpruned.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps: must be an integer >= 1, got {steps!r}")
    if state_size <= 0:
        raise ConfigError("--state-size: must be more than 0 bytes")
    final_size = state_size if final_size is None else final_size
    resume = config.resume
    saves = saves_for(steps, resume.every_n_steps) if resume else 0
    resume_rows = []
    for name in resume.backends if resume else ():
        kept = min(saves, resume.keep_last)
        resume_rows.append(Holding(
            "resume", name, config.backends[name].type, kept, kept * state_size,
            min(saves, resume.keep_last + 1) * state_size,
            f"newest {resume.keep_last} of {saves}"))
    final = config.final
    final_names = list(final.backends) if final else []
    types = {n: config.backends[n].type for n in final_names}
    store = next((n for n in final_names if types[n] in OBJECT_STORE_TYPES), None)
    final_rows, dup_final_rows = [], []
    for name in final_names:
        if types[name] in REGISTRY_TYPES and store is not None:
            final_rows.append(Holding("final", name, types[name], 0, 0, 0,
                                      f"URI of the {store} copy"))
        else:
            final_rows.append(Holding("final", name, types[name], 1, final_size, final_size, "once"))
        dup_final_rows.append(Holding("final", name, types[name], 1, final_size, final_size, "once"))
    registry = next((n for n in final_names if types[n] in REGISTRY_TYPES), DUPLICATE_BACKEND)
    logged = Holding("resume", registry, "mlflow", saves, saves * state_size, saves * state_size,
                     "every save, never pruned")
    return Plan(
        state_size=state_size, final_size=final_size, steps=steps,
        every_n_steps=resume.every_n_steps if resume else None,
        keep_last=resume.keep_last if resume else None, saves=saves,
        routed=tuple(resume_rows + final_rows),
        duplicate=tuple(resume_rows + ([logged] if resume else []) + dup_final_rows),
    )
