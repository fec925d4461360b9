"""The gatherer: turns a model and its optimizer into the state each role needs, and back.

Everything goes through ``torch.distributed.checkpoint.state_dict``, which gives the same
fully-qualified keys for a plain module, DDP and FSDP, so a checkpoint does not depend on how
the model was wrapped when it was saved.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resume_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The model (and optimizer) state to resume from. Tensors are not copied."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def load_resume_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                      state: dict[str, Any]) -> None:
    """Copy a state made by ``resume_state`` back into the model and optimizer."""
    if optimizer is not None and "optimizer" not in state:
        raise KeyError("the checkpoint holds no optimizer state; restore without optimizer=")
    if optimizer is None:
        set_state_dict(model, (), model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def final_state(model: torch.nn.Module, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The full model state on the CPU, optionally cast; empty on ranks other than 0."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dtype is not None:
        target = DTYPES[dtype]
        sd = {k: v.to(target) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sd.items()}
    return sd
