"""Asynchronous saving: the state is staged in CPU memory, and rank 0 writes it on a thread.

One save is in flight at a time. Its outcome, ``(step, saved, failures)``, is collected on
every rank at the next point where all ranks meet (the next due save, ``wait``, ``restore``,
``finalize`` or ``close``), so a failure is reported everywhere and never dropped.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from . import ranks
from .errors import CkptkitError
from .staging import Stager, live_storages

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

    def stage(self, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              copy_always: tuple[str, ...]) -> dict[str, Any]:
        """A copy of ``state`` that training cannot change once ``save`` returns.

        Gathered model and optimizer state that is a private copy already passes through; the
        keys in ``copy_always`` (``extra``: anything training keeps changing, such as an EMA's
        state) are always copied.
        """
        live = live_storages(model, optimizer)
        staged = {k: self._stager.stage(v, None if k in copy_always else live, (k,)) for k, v in state.items()}
        # Copies from a GPU are queued, not waited for: the writer thread waits before it reads.
        self._copies = self._stager.record()
        return staged

    def submit(self, write: Callable[..., Outcome], *args: Any) -> None:
        """Run ``write(*args)`` on the writer thread; it must return an outcome, never raise."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckptkit-save")
        copies, self._copies = self._copies, []
        self._pending = self._writer.submit(self._after_copies, copies, write, *args)

    def _after_copies(self, copies: list[torch.cuda.Event], write: Callable[..., Outcome], payload: Any,
                      *args: Any) -> Outcome:
        try:
            for event in copies:
                event.synchronize()
            # The first save from a GPU may hand over device snapshots (see staging).
            args = tuple(self._stager.materialize(a) for a in args)
        except Exception as exc:  # a CUDA error, no host memory: this save fails, on every rank
            error = CkptkitError(f"copying the state of step {payload.step} into host memory failed: {exc}")
            error.__cause__ = exc
            return payload.step, [], {"(staging)": error}
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

