"""Asynchronous saving: the state is staged in CPU memory, and rank 0 writes it on a thread.

One save is in flight at a time. Its outcome, ``(step, saved, failures)``, is collected on
every rank at the next point where all ranks meet (the next due save, ``wait``, ``restore``,
``finalize`` or ``close``), so a failure is reported everywhere and never dropped.

With ``background`` staging (``async_copy: background``) the copy of the parameters and the
optimizer state is made on the writer thread, too. Every optimizer's ``step`` waits for it
first (a global step pre-hook), so the only writer of those tensors in a training loop cannot
run before their copy is done. A tensor whose version counter moved before its copy was done
(an in-place change outside ``optimizer.step()``) fails the save instead of committing a mix.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import ranks
from .errors import CkptkitError
from .staging import Stager, live_storages, stepped_storages

# (step, the references committed, backend name -> its CkptkitError)
Outcome = tuple[int, list, dict]


class AsyncSaver:
    """Stages state into reused CPU buffers and runs the write of the last staged save on a thread."""

    def __init__(self, coll: ranks.Collectives) -> None:
        self._coll = coll
        self._stager = Stager()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._copies: list[torch.cuda.Event] = []
        self._copied = threading.Event()  # set while no deferred copy is pending
        self._copied.set()
        self._step_hook: Any = None

    def stage(self, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              copy_always: tuple[str, ...], background: bool = False) -> dict[str, Any]:
        """A copy of ``state`` that training cannot change once ``save`` returns, or, with
        ``background``, once the next optimizer step starts.

        Gathered model and optimizer state that is a private copy already passes through; the
        keys in ``copy_always`` (``extra``: anything training keeps changing, such as an EMA's
        state) are always copied before ``stage`` returns.
        """
        live = live_storages(model, optimizer)
        defer = stepped_storages(model, optimizer) if background else frozenset()
        staged = {k: self._stager.stage(v, None if k in copy_always else live, (k,),
                                        frozenset() if k in copy_always else defer)
                  for k, v in state.items()}
        if self._stager.deferred and self._step_hook is None:
            self._step_hook = register_optimizer_step_pre_hook(_waits_for(weakref.ref(self)))
        # Copies from a GPU are queued, not waited for: the writer thread waits before it reads.
        self._copies = self._stager.record()
        return staged

    def wait_copied(self) -> None:
        """Return once the deferred copies of the save in flight are done (at once when none are)."""
        self._copied.wait()

    def submit(self, write: Callable[..., Outcome], *args: Any) -> None:
        """Run ``write(*args)`` on the writer thread; it must return an outcome, never raise."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckptkit-save")
        copies, self._copies = self._copies, []
        if self._stager.deferred:
            self._copied.clear()  # set by the writer thread once the deferred copies are done
        self._pending = self._writer.submit(self._after_copies, copies, write, *args)

    def _after_copies(self, copies: list[torch.cuda.Event], write: Callable[..., Outcome], payload: Any,
                      *args: Any) -> Outcome:
        try:
            try:
                changed = self._stager.copy_deferred()
            finally:
                self._copied.set()
            for event in copies:
                event.synchronize()
            # The first save from a GPU may hand over device snapshots (see staging).
            args = tuple(self._stager.materialize(a) for a in args)
        except Exception as exc:  # a CUDA error, no host memory: this save fails, on every rank
            error = CkptkitError(f"copying the state of step {payload.step} into host memory failed: {exc}")
            error.__cause__ = exc
            return payload.step, [], {"(staging)": error}
        if changed:
            names = ", ".join(".".join(map(str, p)) for p in changed[:3]) + (" ..." if len(changed) > 3 else "")
            return payload.step, [], {"(staging)": CkptkitError(
                f"step {payload.step} was not written: {names} changed in place while async_copy: background "
                "was copying it, so the copy could mix values from before and after. Only optimizer.step() "
                "waits for that copy: call wait() before changing parameters or optimizer state any other "
                "way after save, or set roles.resume.async_copy: blocking")}
        return write(payload, *args)

    def collect(self, caller: str) -> Outcome | None:
        """The outcome of the save in flight, once it is done, on every rank (collective);
        ``caller`` names the call that waits, so that ranks in different calls are told apart."""
        outcome = None
        if self._pending is not None:
            outcome = self._pending.result()
            self._pending = None
        return self._coll.share(f"{caller}: collect the asynchronous save", outcome)

    def shutdown(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None


def _waits_for(saver: weakref.ref[AsyncSaver]) -> Callable[..., None]:
    """An optimizer step pre-hook that waits for ``saver``'s deferred copies; a weak reference,
    so that a manager dropped without ``close`` does not live on in torch's global hooks."""
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if (s := saver()) is not None:
            s.wait_copied()
    return hook

