"""Staging for asynchronous saves: a copy of the state in CPU memory that training cannot touch.

The buffers are kept between saves and refilled in place, so only the first save pays for
allocating (and page-faulting) them. Tensors that are already private CPU copies (what
gathering a sharded model to rank 0 produces) are passed through, not copied again.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def live_storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> frozenset[int]:
    """The storages that training writes to: parameters, buffers and optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return frozenset(p for t in tensors if (p := _storage(t)) is not None)


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

    def stage(self, obj: Any, live: frozenset[int] | None = None, path: tuple = ()) -> Any:
        """A copy of ``obj`` that training cannot change. With ``live`` (see ``live_storages``),
        CPU tensors outside those storages are private already and are passed through."""
        if torch.is_tensor(obj):
            if live is not None and obj.device.type == "cpu" and (p := _storage(obj)) is not None and p not in live:
                return obj
            buf = self._buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = _host_buffer(obj)
                self._buffers[path] = buf
            queued = obj.is_cuda and buf.is_pinned()
            buf.copy_(obj.detach(), non_blocking=queued)
            if queued:
                self._copying.add(obj.device)
            return buf
        if isinstance(obj, dict):
            return {k: self.stage(v, live, path + (k,)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.stage(v, live, path + (i,)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

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
        return events

    def wait(self) -> None:
        """Wait for the device-to-host copies queued by ``stage``: the buffers are complete after it."""
        for event in self.record():
            event.synchronize()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
