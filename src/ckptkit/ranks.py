"""The few collective steps the manager needs, on torch.distributed; no-ops in one process."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .errors import CkptkitError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled between the trusted ranks of one job)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """Run ``fn`` on rank 0 and tell every rank how it went: ``("ok", result)`` or ``("error", reason)``.

    Rank 0 always reaches the broadcast, also when ``fn`` raises, so a failure there becomes an
    error on every rank instead of a hang.
    """
    outcome: tuple[str, Any] = ("ok", None)
    if rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as exc:
            outcome = ("error", str(exc) if isinstance(exc, CkptkitError) else f"{type(exc).__name__}: {exc}")
    return broadcast(outcome)
