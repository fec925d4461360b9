"""Asynchronous saving: the state is staged in CPU memory, and rank 0 writes it on a thread.

One save is in flight at a time. Its outcome, ``(step, saved, failures)``, is collected on
every rank at the next point where all ranks meet (the next due save, ``wait``, ``restore``,
``finalize`` or ``close``), so a failure is reported everywhere and never dropped.

With ``async_copy: optimizer_state`` the copy of the optimizer's state is made on the writer
thread, too, and with ``background`` that of the parameters it trains as well. Every
optimizer's ``step`` waits for it first (a global step pre-hook), so the only writer of those
tensors in a training loop cannot run before their copy is done. Then, still on the training
thread, the step pre-hook (or the first forward pass of the model given to ``save``, or of a
module it wraps, once the copies are done, or the next ``collect``) compares the tensors' version counters with those at ``save``: there
every in-place operation that thread started has finished and counted, which the writer thread
cannot know of an operation still running. The writer commits only after that verdict; a
tensor changed in place between ``save`` and the verdict fails the save instead of committing
a mix of before and after.

``prepare_for`` starts a thread that makes and pages in the CPU buffers an optimizer's
parameters and state will be staged into, so that the first save copies into memory already
paged in, as later saves do. When the optimizer holds no state yet (a new training), that is
its parameters and the state its first step will make, where known (the moments of Adam, SGD
with momentum and other common optimizers), and at that first step (a global step post-hook)
whatever else the state holds.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from copy import deepcopy  # (``copy`` names stage's argument)
from typing import Any, Callable, Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import ranks
from .errors import CkptkitError
from .safeload import out_of_memory
from .staging import (Stager, copy_flat, expected_likes, inside_optimizer_step, live_storages, plain_cpu_likes,
                      detached, shares_views, stepped_storages)

log = logging.getLogger(__name__)

# (step, the references committed, backend name -> its CkptkitError)
Outcome = tuple[int, list, dict]


class AsyncSaver:
    """Stages state into reused CPU buffers and runs the write of the last staged save on a thread."""

    def __init__(self, coll: ranks.Collectives) -> None:
        self._coll = coll
        self._pid = os.getpid()  # a forked child inherits this object, but not its writer thread
        self._stager = Stager()
        self._copy_mode = "blocking"  # async_copy of the last stage
        self._writer: ThreadPoolExecutor | None = None
        self._exit_hooked = False  # _finish_at_exit registered, once whatever executors come and go
        self._pending: Future | None = None
        self._copies: list[torch.cuda.Event] = []
        self._copied = threading.Event()  # set while no deferred copy is pending
        self._copied.set()
        self._judged = threading.Event()  # set while no verdict on the deferred tensors is pending
        self._judged.set()
        # Re-entrant: a SIGTERM handler on the thread judging judges too (see _on_sigterm).
        self._judging = threading.RLock()
        # (tensor, its version counter at save, its path): what the verdict compares.
        self._watched: list[tuple[torch.Tensor, int, tuple]] = []
        self._changed: list[tuple] = []  # the verdict: paths of tensors changed since save
        self._saving_thread: threading.Thread | None = None
        self._step_hook: Any = None
        self._forward_hooks: list = []  # while a verdict is pending: see _judges_at_forward
        self._model: weakref.ref[torch.nn.Module] | None = None  # the model of the last stage
        self._prepare_hook: Any = None
        self._awaited: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()  # prepared at their first step
        self._stops_at_exit = False
        self._sigterm_settled = False  # SIGTERM's handler set, or left to the trainer's own
        self._sigterm_told = False

    def prepare_for(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the first save's CPU buffers for ``optimizer``'s parameters and state while
        training runs, on rank 0 (which stages), until the first save: the memory that save would
        allocate, taken earlier. Only for the optimizer given, which the manager learns from
        ``restore``: not for every optimizer the process steps, nor once per manager. Called
        again, for this optimizer or another (an evaluation loop restoring into a new one each
        time), the plan is replaced, not added to: the buffers are for the latest only."""
        if not self._stager.preparing or ranks.rank() != 0:
            return  # only rank 0 stages
        new = not optimizer.state  # a new training's optimizer; a restored one holds its state
        self._awaited = weakref.WeakSet()
        self._prepare(optimizer, expected_likes if new else plain_cpu_likes, only=True)
        if new:
            self._awaited.add(optimizer)
            if self._prepare_hook is None:
                self._prepare_hook = register_optimizer_step_post_hook(_prepares_for(weakref.ref(self)))
                # Torch's hooks are global: a manager dropped without close() takes its hook with it.
                weakref.finalize(self, self._prepare_hook.remove)

    def _prepare(self, optimizer: torch.optim.Optimizer,
                 likes_of: Callable[[torch.optim.Optimizer], list[tuple[torch.Size, torch.dtype]]],
                 only: bool = False) -> None:
        try:
            wanted = self._stager.plan(likes_of(optimizer), owner=id(optimizer), only=only)
            if wanted and self._stop_at_exit():
                threading.Thread(target=self._stager.prepare, args=(wanted,), name="ckptkit-prepare").start()
        except Exception as exc:  # an optimization: it must never fail the training step it runs in
            log.warning("could not make the first asynchronous save's buffers ahead (%s: %s); that save "
                        "makes them", type(exc).__name__, exc)

    def _stop_at_exit(self) -> bool:
        """Whether the preparing thread is stopped at exit, as it must be: not a daemon thread,
        which the interpreter stops wherever it stands, inside torch too, but one that an exit hook
        stops within a chunk and the interpreter joins."""
        if not self._stops_at_exit:
            stager, pid = weakref.ref(self._stager), self._pid

            def stop() -> None:
                # A forked child (a data loader's worker) inherits the hook, not the thread, and
                # perhaps the spares' lock held: it has nothing to stop.
                if os.getpid() == pid and (s := stager()) is not None:
                    s.stop_preparing()

            try:
                threading._register_atexit(stop)  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):  # an interpreter without it, or one already exiting
                return False
            self._stops_at_exit = True
        return True

    def stage(self, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              copy_always: tuple[str, ...], copy: str = "blocking") -> dict[str, Any]:
        """A copy of ``state`` that training cannot change once ``save`` returns, or, with
        ``copy`` (``async_copy``) other than ``blocking``, once the next optimizer step starts.

        Gathered model and optimizer state that is a private copy already passes through; the
        keys in ``copy_always`` (``extra``: anything training keeps changing, such as an EMA's
        state) are always copied before ``stage`` returns.
        """
        self._stager.deferred = []  # what a stage that raised part way left
        live = live_storages(model, optimizer)
        deferring = copy != "blocking" and not inside_optimizer_step()
        defer = stepped_storages(optimizer, parameters=copy == "background") if deferring else frozenset()
        self._copy_mode = copy
        self._model = weakref.ref(model)
        seen: dict = {}  # tensors that appear twice (tied weights) are staged once
        moves: list = []  # the copies of dense CPU tensors, made together below
        try:
            # Views of one storage are copied as torch's own deep copy makes them, still sharing
            # it, into memory of this save's own (rare: a flat-buffer EMA in extra).
            staged = {k: deepcopy(detached(v)) if k in copy_always and shares_views(v) else
                      self._stager.stage(v, None if k in copy_always else live, (k,),
                                         frozenset() if k in copy_always else defer, seen, moves)
                      for k, v in state.items()}
            copy_flat(moves)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            # Kept, the buffers it made would take the memory the next training step needs (the
            # exception's traceback holds this frame, and so these two).
            self._stager.release()
            seen.clear()
            moves.clear()
            raise MemoryError(f"async save: this machine ran out of memory for the copy of the state that the write "
                              f"goes on from ({str(exc).splitlines()[0]}); nothing was saved, and the copy's buffers "
                              "were released. Free memory, or set roles.resume.async: false (a save then writes "
                              "from the model itself, without a copy)") from exc
        finally:
            # What the first save did not take, later saves will not either. The post-hook stays
            # until shutdown (it returns at once now): a save made inside a step hook would
            # otherwise change the hook dict that torch is going through.
            self._stager.stop_preparing()
        if self._stager.deferred and self._step_hook is None:
            self._step_hook = register_optimizer_step_pre_hook(_waits_for(weakref.ref(self)))
            weakref.finalize(self, self._step_hook.remove)
        # Copies from a GPU are queued, not waited for: the writer thread waits before it reads.
        self._copies = self._stager.record()
        return staged

    def guard_sigterm(self) -> None:
        """Let a SIGTERM wait for this saver's save in flight (``_finish_at_sigterm``), once
        called from the main thread: the manager's constructor and each submit try."""
        if not self._sigterm_settled:
            self._sigterm_settled = _finish_at_sigterm(self)

    def settle(self) -> None:
        """On the thread that trains: wait for the deferred copies of the save in flight, then
        give the verdict on them (at once when there are none)."""
        self._copied.wait()
        self._judge()

    def _judge(self) -> None:
        if self._judged.is_set():  # every optimizer step comes here: no lock when nothing waits
            return
        with self._judging:
            if self._judged.is_set():
                return
            self._changed = [path for t, version, path in self._watched if t._version != version]
            self._watched = []
            self._judged.set()
            self._drop_forward_hook()

    def _drop_forward_hook(self) -> None:
        while self._forward_hooks:
            self._forward_hooks.pop().remove()

    def submit(self, write: Callable[..., Outcome], *args: Any) -> None:
        """Run ``write(*args)`` on the writer thread; it must return an outcome, never raise."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckptkit-save")
            if not self._exit_hooked:
                self._exit_hooked = True
                _finish_at_exit(weakref.ref(self))
        self.guard_sigterm()
        if not self._sigterm_settled and not self._sigterm_told:
            self._sigterm_told = True
            log.warning("async save from thread %r, not the main thread: ckptkit cannot set its SIGTERM handler "
                        "from there, so a SIGTERM (a preemption's, torchrun's) ends this process before a save in "
                        "flight commits. Build the CheckpointManager on the main thread (it sets the handler then), "
                        "or have a SIGTERM handler of yours call ck.wait() before the process ends",
                        threading.current_thread().name)
        copies, self._copies = self._copies, []
        deferred, self._stager.deferred = self._stager.deferred, []
        if deferred:
            self._watched = [(src, version, path) for _, src, version, path in deferred]
            self._saving_thread = threading.current_thread()
            self._copied.clear()  # set by the writer thread once the deferred copies are done
            self._judged.clear()  # set by settle, on the training thread
            model = self._model() if self._model is not None else None
            if not self._forward_hooks and model is not None:
                # On the model given to save and the module it wraps, not on every module (a
                # global hook made each call of every module slower, and every call of a
                # torch.compile'd one warn).
                hook = _judges_at_forward(weakref.ref(self), self._forward_hooks)
                self._forward_hooks.extend(m.register_forward_pre_hook(hook) for m in _wrapped_chain(model))
        try:
            self._pending = self._writer.submit(self._after_copies, deferred, copies, write, *args)
        except BaseException as exc:
            if isinstance(exc, RuntimeError):
                # The executor queues the write before it starts its thread: where that fails (no
                # memory for a stack), the write stayed queued and ran with the next save's
                # thread, committing this step from buffers that save had filled with its own.
                writer, self._writer = self._writer, None
                writer.shutdown(wait=False, cancel_futures=True)
            self._copied.set()
            self._judged.set()
            self._drop_forward_hook()
            raise

    def _after_copies(self, deferred: list, copies: list[torch.cuda.Event], write: Callable[..., Outcome],
                      payload: Any, *args: Any) -> Outcome:
        try:
            try:
                self._stager.copy_deferred(deferred)
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
        if deferred:
            # The thread that saved gives the verdict at its next optimizer step or collect; once
            # it has ended (the interpreter exits), nothing of it can still be changing a tensor.
            while not self._judged.wait(0.2):
                if self._saving_thread is not None and not self._saving_thread.is_alive():
                    self._judge()
            if self._changed:
                changed = self._changed
                names = ", ".join(".".join(map(str, p)) for p in changed[:3]) + (" ..." if len(changed) > 3 else "")
                return payload.step, [], {"(staging)": CkptkitError(
                    f"step {payload.step} was not written: {names} changed in place between save() and the "
                    f"next optimizer.step() (or wait()), while async_copy: {self._copy_mode} copied it on "
                    "the writer thread, so the copy could mix values from before and after. Only "
                    "optimizer.step() waits for that copy: call wait() before changing "
                    f"{'parameters or ' if self._copy_mode == 'background' else ''}optimizer state any "
                    "other way after save, or set roles.resume.async_copy: blocking")}
        return write(payload, *args)

    def collect(self, caller: str) -> Outcome | None:
        """The outcome of the save in flight, once it is done, on every rank (collective);
        ``caller`` names the call that waits, so that ranks in different calls are told apart."""
        outcome = None
        if self._pending is not None:
            self.settle()
            outcome = self._pending.result()
            self._pending = None
        return self._coll.share(f"{caller}: collect the asynchronous save", outcome)

    def shutdown(self) -> None:
        self._stager.stop_preparing()
        self.settle()  # a save in flight that nobody collected still gets its verdict
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        for hook in (self._step_hook, self._prepare_hook):
            if hook is not None:
                hook.remove()
        self._step_hook = self._prepare_hook = None
        self._drop_forward_hook()
        # A closed manager may stay referenced (a list of results, a callback): its buffers,
        # the size of the state, are not kept with it.
        self._stager = Stager()


def _finish_at_exit(saver: weakref.ref[AsyncSaver]) -> None:
    """At interpreter exit (training crashed or ended without ``close``), let the save in flight
    finish before ``concurrent.futures`` refuses new work: the write hashes on a thread pool, and
    without this it failed half written. A failure is logged, there being nobody to raise to."""
    def finish() -> None:
        s = saver()
        if s is None or s._pending is None or os.getpid() != s._pid:
            return  # a forked child (a data loader's worker) inherits this hook but not the writer
        if s._saving_thread is not None and s._saving_thread is not threading.current_thread() \
                and s._saving_thread.is_alive() and not s._saving_thread.daemon:
            return  # that thread gives the verdict, or the writer does once it has ended
        # The thread that saved is this one, done with training, or a daemon thread, which may
        # wait for work forever: the verdict is given here (the writer cannot wait for that
        # thread to end, as the interpreter joins the writer before that).
        s.settle()
        step, saved, failures = s._pending.result()
        for name, error in failures.items():
            log.error("the asynchronous save of step %d, in flight at exit, failed on %s: %s", step, name, error)
        if saved:
            log.info("the asynchronous save of step %d, in flight at exit, is committed at %s", step,
                     ", ".join(r.uri for r in saved))

    try:
        # Run before concurrent.futures' own exit hook, which was registered earlier.
        threading._register_atexit(finish)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # an interpreter without it, or one already exiting
        pass


# The savers of this process whose save in flight a SIGTERM lets finish, and whether the handler is ours.
_sigterm_savers: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()
_sigterm_lock = threading.Lock()


_sigterm_at_build: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptkit_sigterm_at_build", default=True)


def sigterm_at_build() -> bool:
    """Whether a manager built now sets its SIGTERM handler at once (see ``sigterm_left_to_trainer``)."""
    return _sigterm_at_build.get()


@contextlib.contextmanager
def sigterm_left_to_trainer() -> Iterator[None]:
    """Managers built in this block set no SIGTERM handler when built. A trainer that sets its
    own afterwards and calls the one it replaced (Lightning's) stops training its own way, which
    ckptkit's would cut short by ending the process; its shutdown closes the manager, which
    waits for the save in flight. A first save where no handler is set by then still sets one."""
    token = _sigterm_at_build.set(False)
    try:
        yield
    finally:
        _sigterm_at_build.reset(token)


def _finish_at_sigterm(saver: AsyncSaver) -> bool:
    """On SIGTERM, let the save in flight commit before the process ends as SIGTERM ends it.

    torchrun sends it to every rank once one has failed, as Slurm and Kubernetes do to preempt:
    without this, a save that returned was lost with the process. Only where SIGTERM does what
    it does by default: a handler of the trainer's own is left as it is (and decides). Returns
    False where nothing could be decided: off the main thread, from which alone a handler is set."""
    if threading.current_thread() is not threading.main_thread():
        return False
    with _sigterm_lock:
        _sigterm_savers.add(saver)
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return True  # ours already, or the trainer's
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):  # not the main interpreter (a subinterpreter, an embedding)
            pass
        return True


# How long SIGTERM waits for the verdict on deferred copies from a training thread other than the
# one it runs on. One that is stuck (in a collective whose peer died: what torchrun sends SIGTERM
# for) gives none, and the signal's grace period is short; a stuck thread changes no tensor, so
# the verdict is then given here.
_VERDICT_WAIT_S = 10.0


def _on_sigterm(signum: int, frame: Any) -> None:
    for s in list(_sigterm_savers):
        if s._pending is None or s._pending.done() or os.getpid() != s._pid:
            continue
        log.warning("SIGTERM: the asynchronous save in flight is finished before the process ends")
        try:
            training = s._saving_thread
            if training not in (None, threading.current_thread()) and not s._judged.wait(_VERDICT_WAIT_S):
                log.warning("SIGTERM: thread %r, which saved, has not reached its next optimizer step in %.0f s; the "
                            "save in flight is checked from here", training.name, _VERDICT_WAIT_S)
            s.settle()
            step, saved, failures = s._pending.result()
        except Exception as exc:  # nothing to raise to: the process is ending
            log.error("the asynchronous save in flight at SIGTERM failed: %s", exc)
            continue
        for name, error in failures.items():
            log.error("the asynchronous save of step %d, in flight at SIGTERM, failed on %s: %s", step, name, error)
        if saved:
            log.warning("the asynchronous save of step %d, in flight at SIGTERM, is committed at %s", step,
                        ", ".join(r.uri for r in saved))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)  # ends the process as SIGTERM would have


def _waits_for(saver: weakref.ref[AsyncSaver]) -> Callable[..., None]:
    """An optimizer step pre-hook that settles ``saver``'s deferred copies; a weak reference,
    so that a manager dropped without ``close`` does not live on in torch's global hooks."""
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if (s := saver()) is not None and os.getpid() == s._pid:
            s.settle()
    return hook


def _wrapped_chain(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model`` and the modules it wraps (torch.compile's, DDP's): an evaluation may call any."""
    chain = [model]
    while True:
        inner = getattr(chain[-1], "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module) and isinstance(chain[-1], torch.nn.parallel.DistributedDataParallel):
            inner = chain[-1].module
        if not isinstance(inner, torch.nn.Module) or inner in chain:
            return chain
        chain.append(inner)


def _judges_at_forward(saver: weakref.ref[AsyncSaver], holder: list) -> Callable[..., None]:
    """A forward pre-hook on the model given to save, there while a verdict on deferred copies
    is pending: its first forward pass on the thread that saved, once the copies are done, gives
    it. A save followed by a long evaluation then commits without waiting for the next optimizer
    step; an in-place change that thread started before has finished there, as at a step. A
    saver dropped without ``close`` takes the hooks (``holder``: their handles) off at the next call."""
    def hook(module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return  # traced into a compiled graph (fullgraph refuses thread calls): a no-op there
        s = saver()
        if s is None:
            while holder:
                holder.pop().remove()
            return
        if s._copied.is_set() and threading.current_thread() is s._saving_thread and os.getpid() == s._pid:
            s._judge()
    return hook


def _prepares_for(saver: weakref.ref[AsyncSaver]) -> Callable[..., None]:
    """An optimizer step post-hook that starts ``saver``'s preparation for an optimizer it
    awaits, at that optimizer's first step."""
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if (s := saver()) is not None and optimizer in s._awaited and os.getpid() == s._pid and s._stager.preparing:
            s._awaited.discard(optimizer)
            # The state it did make: the stager makes what is missing, releases what was expected in vain.
            s._prepare(optimizer, plain_cpu_likes)
    return hook
