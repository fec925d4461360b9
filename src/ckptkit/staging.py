"""Staging for asynchronous saves: a copy of the state in CPU memory that training cannot touch.

The buffers are kept between saves and refilled in place, so only the first save pays for
allocating them. New memory costs about half a second per GiB to page in, five times the copy
into it, so ``prepare`` makes CPU buffers ahead of the first save, on a thread of its own while
training runs, and the first ``stage`` takes them by shape and dtype. Tensors that are already
private CPU copies (what gathering a sharded model to rank 0 produces) are passed through, not
copied again.

For GPU tensors the buffers are pinned and the copies are queued, not waited for. Pinning
host memory is slow (about half a second per GiB), so the first save does not wait for it
when the GPU has room: it snapshots the tensors on the device, which takes a fraction of a
millisecond per GiB, and the writer thread moves the snapshot into pinned buffers that it
allocates there (``materialize``).

With ``defer`` (``async_copy: optimizer_state`` or ``background``), CPU tensors that only an
optimizer step changes (its state, and with ``background`` the parameters it trains) are not
copied by ``stage``: it sets their buffers
aside with the tensors' version counters, and ``copy_deferred``, on the writer thread, fills
them while training runs its next forward and backward passes.
"""

from __future__ import annotations

import collections
import copy
import ctypes
import functools
import inspect
import logging
import signal
import sys
import threading
from typing import Any, Callable

import torch

from .hashing import hash_pool, usable_cpus

log = logging.getLogger(__name__)


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def shares_views(obj: Any) -> bool:
    """Whether ``obj`` (walked through dicts, lists and tuples, as ``Stager.stage`` walks it)
    holds CPU tensors that are different views of one storage: a flat buffer and views of it,
    as a flat-buffer EMA keeps. ``Stager.stage`` gives each its own buffer, and an object whose
    ``load_state_dict`` adopts what restore gives it would no longer update its views with the
    buffer; ``torch.save`` keeps them sharing."""
    views: dict[int, tuple] = {}
    walked: set[int] = set()
    shared = False
    stack = [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            if item.device.type != "cpu":
                return False  # staged to the CPU as ever: a deep copy would stay on the device
            if item.layout != torch.strided or not item.numel():
                continue
            storage = _storage(item)
            if storage is None:
                continue
            view = (item.storage_offset(), tuple(item.shape), item.stride(), item.dtype)
            shared = shared or views.setdefault(storage, view) != view
        elif isinstance(item, (dict, list, tuple)) and id(item) not in walked:
            walked.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return shared


def detached(obj: Any) -> Any:
    """``obj`` with each tensor in its dicts, lists and tuples detached from autograd, still
    sharing its storage: a deep copy refuses a view that records how it was made."""
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, dict):
        return dict((k, detached(v)) for k, v in obj.items()) if type(obj) is dict else \
            collections.OrderedDict((k, detached(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):  # as ``Stager.stage`` rebuilds them
        items = [detached(v) for v in obj]
        return type(obj)(*items) if isinstance(obj, tuple) and hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _extra_state(key: Any) -> bool:
    """Whether a state dict's ``key`` holds what a module's ``get_extra_state`` returned: no
    parameter or buffer, so outside ``live_storages``, yet whatever the module keeps and may
    change in place (a running statistic), never a private copy. It is copied at once."""
    return isinstance(key, str) and (key == "_extra_state" or key.endswith("._extra_state"))


def live_storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> frozenset[int]:
    """The storages that training writes to: parameters, buffers and optimizer state, and tensors
    among the optimizer's settings (a tensor ``lr``, which a scheduler changes in place)."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += _state_tensors(optimizer)
        tensors += [v for group in optimizer.param_groups for v in group.values() if torch.is_tensor(v)]
    return _storages(tensors)


def _step_wrapper() -> Any:
    """The code of the wrapper torch puts around every optimizer's ``step`` (its hooks run in
    it), or None where torch has none by that name."""
    consts = getattr(getattr(torch.optim.Optimizer, "profile_hook_step", None), "__code__", None)
    return next((c for c in getattr(consts, "co_consts", ()) if getattr(c, "co_name", None) == "wrapper"), None)


_STEP_WRAPPER = _step_wrapper()


def inside_optimizer_step() -> bool:
    """Whether this thread is inside an optimizer's ``step`` (a save from the closure given to
    it, or from a step hook): there the step goes on changing the state once ``save`` returns,
    and no later step's wait comes first."""
    return _step_frames()[0] is not None


def _step_frames() -> tuple[Any, list[Any]]:
    """The frame of torch's wrapper around the optimizer step this thread is in (None outside
    one), and the frames of the calls made in it, innermost first, the callers of this module's
    functions left out."""
    frames = []
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _STEP_WRAPPER:
        frames.append(frame)
        frame = frame.f_back
    return frame, frames


def interrupted_step() -> str | None:
    """What interrupted an optimizer's own ``step`` ("SIGTERM", say), where this call comes from a
    signal handler that did: the parameters and the optimizer's state are then part updated,
    some tensors stepped and others not. None otherwise: outside a step, in its hooks (run before
    and after it), and in the closure given to one of torch's own optimizers, which runs it
    before it changes anything (but LBFGS, which runs it between updates too; another's step,
    SAM's say, may change the parameters before its closure runs)."""
    frame, frames = _step_frames()
    if frame is None or not frames:
        return None
    wrapper = frame.f_locals
    stepping = wrapper.get("func")  # what torch's wrapper wraps: the optimizer's own step
    if getattr(stepping, "__code__", None) is not frames[-1].f_code:
        return None
    args, kwargs = wrapper.get("args") or (), wrapper.get("kwargs") or {}
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    optimizer = args[0] if args else None
    own = (type(optimizer).__module__.startswith("torch.optim.")
           and not isinstance(optimizer, torch.optim.LBFGS))
    in_closure = _code_of(closure) if closure is not None and own else None
    installed = _installed_handlers()
    for i, f in enumerate(frames):
        number = installed.get(f.f_code) or _signal_handled(f)
        if number is None:
            continue
        if in_closure is not None and any(g.f_code is in_closure for g in frames[i + 1:]):
            return None
        return signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
    return None


def _installed_handlers() -> dict[Any, int]:
    """The code of each Python signal handler set now, and its signal."""
    found: dict[Any, int] = {}
    for number in signal.valid_signals():
        try:
            code = _code_of(signal.getsignal(number))
        except (ValueError, OSError):
            continue
        if code is not None:
            found.setdefault(code, number)
    return found


def _signal_handled(frame: Any) -> int | None:
    """The signal a Python signal handler's ``frame`` was called for, or None for a frame of
    another function. Python calls a handler with the signal's number and the frame it
    interrupted, the one below it: a handler no longer set (one that set the default back
    first) and a wrapper around one (a decorator's ``*args``) are found by those arguments."""
    code = frame.f_code
    if frame.f_back is None:
        return None
    values = frame.f_locals
    given = [values.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
    if code.co_flags & inspect.CO_VARARGS:
        extra = values.get(code.co_varnames[code.co_argcount + code.co_kwonlyargcount])
        given += list(extra) if isinstance(extra, tuple) else []
    if not any(v is frame.f_back for v in given):
        return None
    return next((int(v) for v in given if type(v) in (int, signal.Signals) and v in signal.valid_signals()), None)


def _code_of(fn: Any) -> Any:
    """The code a call of ``fn`` runs first: through partials, bound methods and callable objects;
    None for ``SIG_DFL``, ``SIG_IGN`` and the like."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn) and not isinstance(fn, int):
        code = getattr(getattr(type(fn), "__call__", None), "__code__", None)
    return code


def stepped_storages(optimizer: torch.optim.Optimizer | None, parameters: bool = True) -> frozenset[int]:
    """The storages that only ``optimizer.step()`` changes in a training loop: its state and, with
    ``parameters``, the parameters it trains. Buffers, frozen parameters and settings are not
    among them: a forward pass or a scheduler may change those."""
    if optimizer is None:
        return frozenset()
    trained = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad] if parameters else []
    return _storages(trained + _state_tensors(optimizer))


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # Any nesting: an optimizer may keep lists of tensors, or plain numbers, in its state.
    found: list[torch.Tensor] = []
    stack: list[Any] = list(optimizer.state.values())
    while stack:
        v = stack.pop()
        if torch.is_tensor(v):
            found.append(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return found


def _storages(tensors: list[torch.Tensor]) -> frozenset[int]:
    return frozenset(p for t in tensors if (p := _storage(t)) is not None)


def _plain_cpu(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"


def plain_cpu_likes(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Size, torch.dtype]]:
    """The shapes and dtypes of the tensors of ``optimizer`` (the parameters it trains, its
    state) that staging copies into CPU buffers of their own shape: plain CPU tensors, not a
    sharded tensor's parts."""
    tensors = [p for group in optimizer.param_groups for p in group["params"]] + _state_tensors(optimizer)
    return [(t.shape, t.dtype) for t in tensors if _plain_cpu(t)]


def _adam(group: dict) -> int:
    return 2 + bool(group.get("amsgrad"))


# How many state tensors shaped like each parameter with a gradient the first step of these
# torch.optim optimizers makes, by param group (the scalars they also make are left to that step).
_MOMENTS: dict[type, Callable[[dict], int]] = {
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
    torch.optim.NAdam: lambda group: 2,
    torch.optim.RAdam: lambda group: 2,
    torch.optim.Adamax: lambda group: 2,
    torch.optim.Adadelta: lambda group: 2,
    torch.optim.SGD: lambda group: int(bool(group.get("momentum"))),
    torch.optim.RMSprop: lambda group: 1 + bool(group.get("momentum")) + bool(group.get("centered")),
}


def expected_likes(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Size, torch.dtype]]:
    """``plain_cpu_likes``, and before the first step of one of the common ``torch.optim``
    optimizers also the moments that step will make, so that their buffers can be made while
    it runs."""
    likes = plain_cpu_likes(optimizer)
    moments = _MOMENTS.get(type(optimizer))
    if moments is not None and not optimizer.state:
        for group in optimizer.param_groups:
            likes += [(p.shape, p.dtype) for p in group["params"] if p.requires_grad and _plain_cpu(p)] * moments(group)
    return likes


_PAGE_IN_CHUNK = 32 << 20


def _page_in(buf: torch.Tensor, going_on: Callable[[], bool]) -> None:
    """Write every page of ``buf``, so that later copies into it take no page faults. memset
    through ctypes, chunk by chunk: it runs without the interpreter lock, on this one thread
    (torch's own fill would start a parallel region beside training's)."""
    start, size = buf.data_ptr(), buf.numel() * buf.element_size()
    for offset in range(0, size, _PAGE_IN_CHUNK):
        if not going_on():
            return
        ctypes.memset(start + offset, 0, min(_PAGE_IN_CHUNK, size - offset))


def _flat_alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b``'s bytes, copied as they are, make ``a`` equal to it: both plain, dense and
    contiguous on the CPU, of one shape and dtype, with no lazy conjugation or negation."""
    return all(t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()
               and not t.is_conj() and not t.is_neg() and type(t) in (torch.Tensor, torch.nn.Parameter)
               for t in (a, b)) and a.shape == b.shape and a.dtype == b.dtype


def _memmove(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src`` into ``dst`` (``_flat_alike``) with one ``memmove``, without the interpreter
    lock. torch's own copy of a large CPU tensor starts a parallel region, whose threads wait for
    each other: on two cores with anything else running, a 341 MiB copy took 165 ms that way
    against 18 ms with one thread."""
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())


# Below this many bytes in all, one thread copies: a hand-off to another costs more than it saves.
_PARALLEL_MIN = 64 * 2**20
_CHUNK = 16 * 2**20


def copy_flat(moves: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each (buffer, source) pair of ``moves`` (``_flat_alike``) by ``memmove``, in chunks
    that this thread and up to three of the shared pool's take in turn: one thread copies about
    15 GB/s, and the caller waits for the copy. This thread takes chunks until none is left, so a
    pool busy with another save's work only lends fewer threads, and no chunk waits for one."""
    total = sum(dst.numel() * dst.element_size() for dst, _ in moves)
    helpers = min(3, usable_cpus() - 1, total // _PARALLEL_MIN)
    if helpers < 1:
        for dst, src in moves:
            _memmove(dst, src)
        return
    chunks = iter([(dst.data_ptr() + at, src.data_ptr() + at, min(_CHUNK, size - at))
                   for dst, src in moves for size in (dst.numel() * dst.element_size(),)
                   for at in range(0, size, _CHUNK)])
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            ctypes.memmove(*chunk)

    pool = hash_pool()
    helping = [pool.submit(drain) for _ in range(helpers)]
    drain()
    for future in helping:
        if not future.cancel():  # started: it ends after the chunk in its hands
            future.result()


def _host_buffer(like: torch.Tensor) -> torch.Tensor:
    """A CPU tensor shaped like ``like``: pinned for a GPU tensor, so that copies run at full bus
    speed and asynchronously; ordinary memory where pinning is refused (a memlock limit)."""
    if like.is_cuda:
        try:
            return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(like.shape, dtype=like.dtype, device="cpu")


class Stager:
    """Copies a nested state into CPU buffers it reuses while shapes and dtypes stay the same."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._copying: set[torch.device] = set()  # devices with queued device-to-host copies
        # Device memory the snapshots of one save may still take, per device (see _room).
        self._room: dict[torch.device, int] = {}
        self._snapshots: dict[int, tuple] = {}  # id of a device snapshot -> its buffer's path
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # copies out of snapshots
        # (buffer, source, the source's version counter when staged, path): see ``defer``.
        self.deferred: list[tuple[torch.Tensor, torch.Tensor, int, tuple]] = []
        # Paged-in CPU buffers made by ``prepare``, by shape and dtype, until a stage takes them.
        self._spares: dict[tuple, list[torch.Tensor]] = {}
        # The buffers each owner needs (``plan``), and all of them together.
        self._plans: dict[int, collections.Counter[tuple]] = {}
        self._planned: collections.Counter[tuple] = collections.Counter()
        self._spares_lock = threading.Lock()
        self.preparing = True  # until ``stop_preparing``: buffers made after the first stage go unused

    def plan(self, likes: list[tuple[torch.Size, torch.dtype]], owner: int,
             only: bool = False) -> list[tuple[tuple, torch.dtype]]:
        """Record that ``owner`` (an optimizer's id) needs CPU buffers of these shapes and dtypes,
        in place of what it needed before (with ``only``, in place of what every owner needed);
        release the spares that no owner needs any more (the moments a first step was expected
        to make and did not: parameters that got no gradient, or moved off the CPU), and return
        the buffers still to be made, for ``prepare``."""
        keys = collections.Counter((tuple(shape), dtype) for shape, dtype in likes)
        with self._spares_lock:
            if not self.preparing:
                return []
            before = +self._planned
            if only:
                self._plans.clear()
                self._planned.clear()
            self._planned.subtract(self._plans.get(owner, collections.Counter()))
            self._planned.update(keys)
            self._planned = +self._planned  # drop what no owner needs
            self._plans[owner] = keys
            for key, spares in self._spares.items():
                del spares[self._planned[key]:]
            return list((self._planned - before).elements())

    def prepare(self, likes: list[tuple[tuple, torch.dtype]]) -> None:
        """Make and page in CPU buffers of these shapes and dtypes (what ``plan`` returned), the
        largest first, for the first ``stage`` to take; one that the plans no longer need when it
        is done is dropped. Meant for a thread of its own; it stops once a stage has run."""
        try:
            for shape, dtype in sorted(likes, key=lambda like: -torch.Size(like[0]).numel() * like[1].itemsize):
                if not self.preparing:
                    return
                buf = torch.empty(shape, dtype=dtype)
                _page_in(buf, lambda: self.preparing)
                with self._spares_lock:
                    if not self.preparing:
                        return
                    spares = self._spares.setdefault((shape, dtype), [])
                    if len(spares) < self._planned[(shape, dtype)]:
                        spares.append(buf)
        except Exception as exc:  # noqa: BLE001 - a head start, never the training's failure
            # Out of memory, most likely: what it made would take the memory training needs.
            self.stop_preparing()
            log.warning("making the async save's buffers ahead failed (%s); those made were released, and the "
                        "first save makes its own", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def release(self) -> None:
        """Drop every buffer kept for the next stage, those a stage that failed part way made
        (its deferred copies' too), and the spares made ahead."""
        self.stop_preparing()
        self._buffers.clear()
        self.deferred = []
        self._snapshots.clear()
        self._copying.clear()
        self._room.clear()

    def stop_preparing(self) -> None:
        """Release the buffers that ``prepare`` made and no stage took, and make no more."""
        with self._spares_lock:
            self.preparing = False
            self._spares.clear()
            self._planned.clear()
            self._plans.clear()

    def _new_buffer(self, like: torch.Tensor) -> torch.Tensor:
        if not like.is_cuda:
            with self._spares_lock:
                if spares := self._spares.get((tuple(like.shape), like.dtype)):
                    return spares.pop()
        return _host_buffer(like)

    def stage(self, obj: Any, live: frozenset[int] | None = None, path: tuple = (),
              defer: frozenset[int] = frozenset(), seen: dict[tuple, torch.Tensor] | None = None,
              moves: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
        """A copy of ``obj`` that training cannot change. With ``live`` (see ``live_storages``),
        CPU tensors outside those storages are private already and are passed through. CPU
        tensors in the storages ``defer`` get their buffer, left to ``copy_deferred`` to fill.
        ``seen`` (shared by the calls of one save) gives a tensor that appears again, such as a
        weight tied to another module's, the buffer it got the first time: one copy in memory,
        and one in the file, as ``torch.save`` of the tensors themselves writes it. With ``moves``,
        the copies of dense CPU tensors are added to it as (buffer, source) pairs for
        ``copy_flat`` to make, instead of being made one by one here."""
        seen = {} if seen is None else seen
        if torch.is_tensor(obj) and obj.layout != torch.strided:
            # A sparse tensor has no storage of its own to keep a buffer for: copied whole, each time.
            return obj.detach().clone()
        if torch.is_tensor(obj):
            storage = _storage(obj) if obj.device.type == "cpu" else None
            if live is not None and storage is not None and storage not in live:
                return obj
            # One element (a step counter) is copied at once: nothing to gain from waiting for it.
            deferred = storage in defer and obj.numel() > 1
            same = (obj.device, obj.data_ptr(), tuple(obj.shape), obj.stride(), obj.dtype, deferred)
            if obj.numel() and same in seen:
                return seen[same]
            buf = self._buffers.get(path)
            fits = buf is not None and buf.shape == obj.shape and buf.dtype == obj.dtype
            if deferred:
                if not fits:
                    buf = self._buffers[path] = self._new_buffer(obj)
                self.deferred.append((buf, obj.detach(), obj._version, path))
                seen[same] = buf
                return buf
            if not fits:
                if obj.is_cuda and self._take_room(obj):
                    self._copying.add(obj.device)
                    snapshot = obj.detach().clone()
                    self._snapshots[id(snapshot)] = path
                    return snapshot
                buf = self._buffers[path] = self._new_buffer(obj)
            queued = obj.is_cuda and buf.is_pinned()
            if _flat_alike(buf, obj):
                if moves is not None:
                    moves.append((buf, obj.detach()))
                else:
                    _memmove(buf, obj)
            else:
                buf.copy_(obj.detach(), non_blocking=queued)
            if queued:
                self._copying.add(obj.device)
            seen[same] = buf
            return buf
        if isinstance(obj, dict):
            # A module state dict's submodule versions, by which load_state_dict converts what
            # an older version of a module saved: the copy must carry them as the original does.
            metadata = getattr(obj, "_metadata", None)
            kind = dict if metadata is None else collections.OrderedDict
            staged = kind((k, self.stage(v, None, path + (k,), frozenset(), seen, moves) if _extra_state(k)
                           else self.stage(v, live, path + (k,), defer, seen, moves)) for k, v in obj.items())
            if metadata is not None:
                staged._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
            return staged
        if isinstance(obj, (list, tuple)):
            items = [self.stage(v, live, path + (i,), defer, seen, moves) for i, v in enumerate(obj)]
            # A namedtuple takes its fields one by one, as a sync save stores it.
            return type(obj)(*items) if isinstance(obj, tuple) and hasattr(obj, "_fields") else type(obj)(items)
        return copy.deepcopy(obj)

    def copy_deferred(self, deferred: list[tuple[torch.Tensor, torch.Tensor, int, tuple]]) -> None:
        """Fill the buffers of ``deferred`` (what ``stage`` set aside), on one thread: torch's
        own copy would start a parallel region of its own beside training's, and on few cores
        the two teams' threads took turns (a 1 MB copy took 3 ms instead of 0.2 ms)."""
        for buf, src, _, _ in deferred:
            if _flat_alike(buf, src):
                _memmove(buf, src)
            else:
                buf.copy_(src)

    def _take_room(self, t: torch.Tensor) -> bool:
        """Whether a snapshot of ``t`` fits on its device, leaving a tenth of the device (at
        least 1 GiB) free for training; if so, the room is counted as taken until ``record``."""
        if t.device not in self._room:
            free, total = torch.cuda.mem_get_info(t.device)
            self._room[t.device] = free - max(total // 10, 2**30)
        need = t.numel() * t.element_size()
        if need > self._room[t.device]:
            return False
        self._room[t.device] -= need
        return True

    def materialize(self, obj: Any) -> Any:
        """``obj`` with the device snapshots of ``stage`` moved into pinned host buffers, which
        later saves reuse. Run it where waiting is harmless (the writer thread), after the
        events of ``record`` completed. Dicts and lists are updated in place, so that each
        snapshot's device memory is released as soon as it is copied."""
        if torch.is_tensor(obj):
            path = self._snapshots.pop(id(obj), None)
            if path is None:
                return obj
            buf = _host_buffer(obj)
            self._buffers[path] = buf
            stream = self._streams.setdefault(obj.device, torch.cuda.Stream(obj.device))
            with torch.cuda.stream(stream):
                buf.copy_(obj, non_blocking=buf.is_pinned())
            # Finished before the snapshot's memory can go back to the allocator.
            stream.synchronize()
            return buf
        if isinstance(obj, dict):
            for k, v in obj.items():
                obj[k] = self.materialize(v)
        elif isinstance(obj, list):
            obj[:] = [self.materialize(v) for v in obj]
        elif isinstance(obj, tuple):
            return type(obj)(self.materialize(v) for v in obj)
        return obj

    def record(self) -> list[torch.cuda.Event]:
        """Events that complete once the device-to-host copies queued by ``stage`` are done, one
        per device. They are recorded on each device's current stream, so training work queued
        after them runs after the copies and cannot change what is copied; the caller need not
        wait, and whoever reads the buffers synchronizes on the events first."""
        events = []
        for device in self._copying:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        self._copying.clear()
        self._room.clear()
        return events

    def wait(self, staged: Any) -> Any:
        """``staged`` (what ``stage`` returned) complete in host memory: waits for the queued
        copies and moves any device snapshots into host buffers."""
        for event in self.record():
            event.synchronize()
        return self.materialize(staged)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
