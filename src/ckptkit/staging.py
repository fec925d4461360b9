"""Staging for asynchronous saves: a copy of the state in CPU memory that training cannot touch.

The buffers are kept between saves and refilled in place, so only the first save pays for
allocating (and page-faulting) them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class Stager:
    """Copies a nested state into CPU buffers it reuses while shapes and dtypes stay the same."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def stage(self, obj: Any, path: tuple = ()) -> Any:
        if torch.is_tensor(obj):
            buf = self._buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu")
                self._buffers[path] = buf
            buf.copy_(obj.detach())
            return buf
        if isinstance(obj, dict):
            return {k: self.stage(v, path + (k,)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.stage(v, path + (i,)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
