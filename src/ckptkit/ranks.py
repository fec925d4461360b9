"""The few collective steps the manager needs, on torch.distributed; no-ops in one process."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from .errors import BackendError, CkptkitError, SaveError


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


def gather(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank ``dst``; None on the other ranks."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def portable(obj: Any) -> Any:
    """``obj`` with every exception in it turned into a ckptkit error of the same kind that only
    carries text: what other ranks can be sent. Causes and tracebacks stay on the rank they happened on."""
    if isinstance(obj, BaseException):
        return _as_text(obj)
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(portable(v) for v in obj)
    return obj


def _as_text(exc: BaseException) -> CkptkitError:
    cls = type(exc)
    if isinstance(exc, SaveError):
        return cls(str(exc), portable(exc.failures), list(exc.saved))
    if isinstance(exc, BackendError):
        return cls(exc.backend, exc.detail)
    if isinstance(exc, CkptkitError):
        try:
            return cls(str(exc))
        except TypeError:  # a subclass with its own constructor
            pass
        return CkptkitError(str(exc))
    return CkptkitError(f"{cls.__name__}: {exc}")


def share(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank; ``src`` keeps its own (exceptions with their causes),
    the others get ``portable(obj)``."""
    if not active():
        return obj
    shared = broadcast(portable(obj) if rank() == src else None, src=src)
    return obj if rank() == src else shared


def on_rank0(fn, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """Run ``fn`` on rank 0 and tell every rank how it went: ``("ok", result)`` or ``("error", exc)``.

    Rank 0 always reaches the broadcast, also when ``fn`` raises, so a failure there becomes an
    error on every rank instead of a hang. Rank 0 gets its own exception; the others a
    ckptkit error of the same type with its text (see ``share``).
    """
    outcome: tuple[str, Any] = ("ok", None)
    if rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as exc:
            outcome = ("error", exc)
    return share(outcome)
