"""The gatherer: turns a model and its optimizer into the state each role needs, and back.

Everything goes through ``torch.distributed.checkpoint.state_dict``, which gives the same
fully-qualified keys for a plain module, DDP, FSDP2 and FSDP1, so a checkpoint does not depend
on how the model was wrapped when it was saved. *Full* state is gathered to rank 0 and
offloaded to the CPU; *sharded* state stays where it lives, one shard per rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import ranks

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _full_options(**extra: Any) -> StateDictOptions | None:
    # In one process the model's own tensors are the state; gathering would only copy them.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra) if ranks.active() else None


def resume_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 sharded: bool = False, load_target: bool = False) -> dict[str, Any]:
    """Model (and optimizer) state to resume from: full on rank 0 (empty elsewhere) or this rank's shards.

    ``load_target``: the state is only a structure for a sharded load to fill in, so an
    unstepped optimizer may keep the state that DCP creates for it.
    """
    options = None if sharded else _full_options()
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    unstepped = not optimizer.state
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if unstepped and not load_target:
        # DCP fills an unstepped optimizer's state by taking a step with lr=0 (step counters
        # become 1); undo that, so that saving never changes how training goes on.
        optimizer.state.clear()
        optim_sd = {**optim_sd, "state": {}}
    return {"model": model_sd, "optimizer": optim_sd}


def load_resume_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                      state: dict[str, Any], full: bool = True) -> None:
    """Copy state back into the model and optimizer.

    ``full`` state lives on rank 0 only when distributed and is broadcast from there; sharded
    state was loaded by each rank into the structure ``resume_state(sharded=True)`` gave it.
    """
    options = _full_options(broadcast_from_rank0=True) if full else None
    if full and ranks.active() and ranks.rank() != 0:
        state = {"model": {}, "optimizer": {}}
    # Model and optimizer separately: set_state_dict with both and broadcast_from_rank0 issues
    # mismatched collectives when the other ranks pass empty dicts (torch 2.13).
    set_model_state_dict(model, state["model"], options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def final_state(model: torch.nn.Module, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The full model state on the CPU, optionally cast; empty on ranks other than 0."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast(sd, dtype)


def cast(sd: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """A copy of ``sd`` with floating-point tensors in ``dtype``; ``sd`` itself when None."""
    if dtype is None:
        return sd
    target = DTYPES[dtype]
    return {k: v.to(target) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sd.items()}
