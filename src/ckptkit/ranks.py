"""The few collective steps the manager needs, on torch.distributed; no-ops in one process.

ckptkit's collectives run on a gloo group of their own, so that they never pair with the
training's collectives, and with a timeout, so that a frozen or diverging rank fails the
others within ``distributed.timeout_s`` instead of the process group's own (30 minutes).
Each one starts by comparing a label (which call, which step) across ranks: ranks that are at
different points raise at once rather than exchanging the wrong objects.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, NoReturn

import torch.distributed as dist

from .errors import (
    BackendError,
    CkptkitError,
    CollectiveTimeoutError,
    RanksDisagreeError,
    RanksOutOfStepError,
    SaveError,
)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def _on_rank(exc: CkptkitError | None, r: int) -> CkptkitError | None:
    """A text-only error (``portable``) that says which rank it happened on, for the ranks it is
    sent to: a trainer reads one rank's log, most often rank 0's."""
    if exc is None:
        return None
    if isinstance(exc, SaveError):
        return type(exc)(f"on rank {r}: {exc}", exc.failures, exc.saved)
    if isinstance(exc, BackendError):
        return type(exc)(exc.backend, f"on rank {r}: {exc.detail}")
    try:
        return type(exc)(f"on rank {r}: {exc}")
    except TypeError:  # a subclass with its own constructor
        return CkptkitError(f"on rank {r}: {exc}")


# What gloo says when a peer did not answer in time or went away.
_PEER_GONE = ("timed out", "timeout", "connection closed", "connection reset", "closed by peer", "broken pipe")


class Collectives:
    """The collectives of one checkpoint manager, bounded and checked.

    ``fingerprint`` (the config's, see ``Config.fingerprint``) is compared across ranks at the
    first meeting: a rank whose config differs is refused, naming the keys, never their values.
    """

    def __init__(self, timeout_s: float, fingerprint: dict[str, str]):
        self.timeout_s = timeout_s
        self._fingerprint = fingerprint
        self._group: Any = None
        # Only the type and text of the error that broke the collectives are kept: a kept exception
        # holds its traceback, and through it the caller's frames (the model, the optimizer, this
        # manager) until the interpreter's end, where tearing down a process group can abort.
        self._broken: tuple[type[RanksOutOfStepError], str] | None = None
        self._closed = False
        self._pid = os.getpid()  # the process whose group it is: a forked child's copy is not its own

    def start(self) -> None:
        """Make the group and compare configs across ranks (collective); a no-op once done or in one process."""
        if self._group is not None or not active():
            return
        self._usable()
        self._pid = os.getpid()
        self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        prints: list[Any] = [None] * world_size()
        self._call("comparing configs", dist.all_gather_object, prints, self._fingerprint, checked=False)
        theirs = dict(enumerate(prints))
        differ = sorted({k for fp in theirs.values() for k in set(fp) | set(theirs[0])
                         if fp.get(k) != theirs[0].get(k)})
        if differ:
            odd = [r for r, fp in theirs.items() if fp != theirs[0]]
            self.close()  # no manager is made, so nothing else would release the group
            self._fail(RanksDisagreeError,
                       f"ranks {', '.join(map(str, odd))} of {world_size()} have a different ckptkit config than "
                       f"rank 0 (keys {', '.join(differ)}); every rank must load the same config and run name, or "
                       "rank 0's would silently decide for all. Fix the config of those ranks")

    def close(self) -> None:
        """Destroy the group, on this rank only (for gloo that is no collective); safe to call twice.
        A peer still waiting in it fails at once instead of at the timeout. Later collectives
        raise instead of making a group again. In a forked child the group is only let go: its
        connections are the parent's, and destroying it there blocks."""
        group, self._group = self._group, None
        self._closed = True
        if group is None or self._pid != os.getpid():
            return
        try:
            dist.destroy_process_group(group)
        except ValueError:  # the job destroyed every group already
            pass

    def _usable(self) -> None:
        if self._broken is not None:
            cls, text = self._broken
            raise cls(f"{text} (seen earlier; ckptkit's collectives are unusable in this job now: restart it)")
        if self._closed:
            raise CkptkitError("this checkpoint manager was closed, and with it ckptkit's process group: "
                               "make a new manager (on every rank)")

    def _fail(self, cls: type[RanksOutOfStepError], text: str) -> NoReturn:
        self._broken = (cls, text)
        raise cls(text)

    @property
    def group(self) -> Any:
        """The process group for DCP's own collectives: None (the default group) in one process."""
        self.start()
        return self._group

    def _call(self, label: str, fn: Callable[..., Any], *args: Any, checked: bool = True) -> Any:
        """Run one collective ``fn(*args, group=...)``, its timeout and failures raised as ckptkit errors."""
        self._usable()
        if checked:
            labels: list[Any] = [None] * world_size()
            self._raw(label, dist.all_gather_object, labels, label)
            if any(other != label for other in labels):
                where = "; ".join(f"rank {r}: {other}" for r, other in enumerate(labels))
                self._fail(RanksDisagreeError,
                           f"rank {rank()} is at {label!r} but the ranks are at different ckptkit calls ({where}): "
                           "each rank must call save, restore and finalize with the same steps, and a rank that "
                           "catches an exception from save must not go on alone")
        return self._raw(label, fn, *args)

    def _raw(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args, group=self._group)
        except RuntimeError as exc:
            lost = self.lost(label, exc)
            if lost is None:
                raise
            raise lost from exc

    def lost(self, label: str, exc: BaseException) -> CollectiveTimeoutError | None:
        """The error to raise for ``exc`` from a collective at ``label`` (also DCP's own, on this
        group) when it says a peer did not answer in time or went away, else None. The
        collectives are unusable from then on. Only ``exc`` itself counts, raised by a collective:
        DCP raises its collectives' errors as they are, and wraps what each rank's own work raised
        (a missing key "timeout_head.weight" among them) in a ``CheckpointException``."""
        if not isinstance(exc, RuntimeError):
            return None
        reason = " ".join(str(exc).split())[:300]
        if not any(sign in reason.lower() for sign in _PEER_GONE):
            return None
        message = (f"rank {rank()}: the other ranks did not meet it at {label!r} within {self.timeout_s:g} s "
                   f"(distributed.timeout_s), or one left ({reason}). A rank is frozen, crashed, or did not "
                   "call ckptkit at the same step; what rank 0 was doing there may still have completed (see "
                   "ckptkit ls). Raise distributed.timeout_s if rank 0 needs longer to write a checkpoint")
        self._broken = (CollectiveTimeoutError, message)
        return CollectiveTimeoutError(message)

    def broadcast(self, label: str, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled between the trusted ranks of one job)."""
        if not active():
            return obj
        self.start()
        box = [obj]
        self._call(label, dist.broadcast_object_list, box, src)
        return box[0]

    def all_gather(self, label: str, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not active():
            return [obj]
        self.start()
        out: list[Any] = [None] * world_size()
        self._call(label, dist.all_gather_object, out, obj)
        return out

    def gather(self, label: str, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank ``dst``; None on the other ranks."""
        if not active():
            return [obj]
        self.start()
        out: list[Any] | None = [None] * world_size() if rank() == dst else None
        self._call(label, dist.gather_object, obj, out, dst)
        return out

    def share(self, label: str, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank; ``src`` keeps its own (exceptions with their causes),
        the others get ``portable(obj)``."""
        if not active():
            return obj
        shared = self.broadcast(label, portable(obj) if rank() == src else None, src=src)
        return obj if rank() == src else shared

    def on_rank0(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
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
        return self.share(label, outcome)

    def agree(self, label: str, problem: BaseException | None) -> None:
        """Raise on every rank if any rank had a ``problem`` (collective): a rank-local failure
        becomes everyone's, so no rank goes on alone. The first rank's problem wins; a rank
        keeps its own exception."""
        if not active():
            if problem is not None:
                raise problem
            return
        problems = [p for p in self.all_gather(label, _on_rank(portable(problem), rank())) if p is not None]
        if problems:
            raise problem if problem is not None else problems[0]
