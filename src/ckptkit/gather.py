"""The gatherer: turns a model and its optimizer into the state each role needs, and back.

Everything goes through ``torch.distributed.checkpoint.state_dict``, which gives the same
fully-qualified keys for a plain module, DDP, FSDP2 and FSDP1, so a checkpoint does not depend
on how the model was wrapped when it was saved. *Full* state is gathered to rank 0 and
offloaded to the CPU; *sharded* state stays where it lives, one shard per rank.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import inspect
import itertools
from typing import Any, Callable, Collection, Iterable, Iterator

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns as _dcp_names,  # the names a parameter has in DCP's state dicts: torch's own rule
    _iterate_valid_model_state,  # the model's tensors as DCP walks them
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from . import ranks
from .errors import IncompatibleCheckpointError, UnstorableStateError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def distributed(model: torch.nn.Module) -> bool:
    """Whether the model's full state has to be gathered and scattered through the process group.

    Decided by the model, not the world size: an FSDP2 model on one rank still holds DTensors
    that plain tensors cannot be copied into, and a DDP or FSDP1 module still wraps its state.
    A plain module on several ranks is a replica per rank, filled from rank 0.
    """
    if ranks.active():
        return True
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or any(
            isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    return any(isinstance(t, DTensor) for t in itertools.chain(model.parameters(), model.buffers()))


def _full_options(model: torch.nn.Module, **extra: Any) -> StateDictOptions | None:
    # A plain module in one process: its own tensors are the state; gathering would only copy them.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra) if distributed(model) else None


def resume_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 sharded: bool = False, load_target: bool = False,
                 held: Collection[str] = ()) -> dict[str, Any]:
    """Model (and optimizer) state to resume from: full on rank 0 (empty elsewhere) or this rank's shards.

    ``load_target``: the state is only a structure for a sharded load to fill in, so an
    unstepped optimizer may keep the state that DCP creates for it.
    ``held``: with ``load_target``, the parameters the checkpoint holds optimizer state for; the
    frozen ones among them get a place for it too.
    """
    options = None if sharded else _full_options(model)
    if optimizer is None:
        try:
            return {"model": get_model_state_dict(model, options=options)}
        except (RuntimeError, ValueError):
            # DCP refuses a model without state (a parameter-free baseline), asking the process
            # group for the rank to say so even in one process: there is nothing to gather.
            if model.state_dict():
                raise
            return {"model": {}}
    try:
        if optimizer.state or load_target:
            with _trainable(optimizer, held, lambda: names_of(model)) if load_target else contextlib.nullcontext():
                model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
            return {"model": model_sd, "optimizer": optim_sd}
        # DCP would first fill an unstepped optimizer's state by a step at lr=0: the optimizer's
        # and the user's step hooks would run, a moment the size of the model would be made for
        # each parameter, and an optimizer whose step needs a closure (LBFGS) would fail. Saving
        # must change nothing, and there is no state to save: DCP skips the step for an optimizer
        # that holds some, so it is given an empty entry while the groups are named.
        with _stateless(optimizer):
            model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        return {"model": model_sd, "optimizer": {**optim_sd, "state": {}}}
    except KeyError as exc:
        done = "restored" if load_target else "saved"
        problem = outside_model(model.parameters(), optimizer, done) or keys_of_its_own(optimizer, done)
        if problem is None:
            raise
        raise (IncompatibleCheckpointError if load_target else UnstorableStateError)(problem) from exc


def keys_of_its_own(optimizer: torch.optim.Optimizer, done: str) -> str | None:
    """Why ``optimizer`` state cannot be ``done``: entries of ``optimizer.state`` under keys that
    are none of its parameters (a hand-written optimizer's step count of its own); None where
    there are none."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    own = [k for k in optimizer.state if id(k) not in params]
    if not own:
        return None
    shown = ", ".join(repr(k) if isinstance(k, (str, int)) else f"a {type(k).__name__}" for k in own[:3])
    return (f"the {type(optimizer).__name__} optimizer's state holds {shown}{' and more' if len(own) > 3 else ''} "
            f"under a key that is none of its parameters: optimizer state is {done} per parameter, named by the "
            "model's parameter names (torch.distributed.checkpoint), so that entry has no name to be "
            f"{done} under, and nothing was. Keep such a value in a parameter's state (optimizer.state[p]) or in "
            "a param group (optimizer.param_groups[i]), or pass the optimizer as extra={'optimizer': ...} instead of "
            "optimizer= (its own state_dict() is then saved as it is)")


def outside_model(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, done: str) -> str | None:
    """Why ``optimizer`` state cannot be ``done`` ("saved", "restored") for a model whose
    parameters are ``params``: those it trains that are none of them, each named by where it sits
    in the optimizer; None where there are none."""
    own = {id(p) for p in params}
    outside = [f"param_groups[{g}]['params'][{i}] (a {'x'.join(map(str, p.shape)) or 'scalar'} {p.dtype} tensor)"
               for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])
               if id(p) not in own]
    if not outside:
        return None
    return (f"the optimizer trains {outside[0]}{f' (and {len(outside) - 1} more)' if len(outside) > 1 else ''}, "
            f"which is not a parameter of the model: its state has no name to be {done} under (optimizer state "
            "is named by the model's parameter names), so nothing was. Make the optimizer from the model's own "
            "parameters (after the model is built, not from an earlier copy); register a parameter that belongs "
            "elsewhere on the model (model.logit_scale = nn.Parameter(...)), or pass one nn.Module holding the "
            "model and the module it belongs to (the loss's) as model=")


@contextlib.contextmanager
def _stateless(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """An unstepped ``optimizer`` seen by DCP as one that holds state (``_empty_entries``), so
    that DCP does not make its state by a step; it holds none after."""
    _empty_entries(optimizer)
    try:
        yield
    finally:
        optimizer.state.clear()


def _empty_entries(optimizer: torch.optim.Optimizer) -> None:
    """An empty state entry for each parameter of an unstepped ``optimizer``: DCP makes the state
    of an optimizer that holds none by a step at lr=0, and skips that for one that holds some
    (FSDP1 wants the entries of all of a flat parameter's parameters, or of none)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {}


@contextlib.contextmanager
def _trainable(optimizer: torch.optim.Optimizer, held: Collection[str],
               names: Callable[[], dict[torch.Tensor, set[str]]]) -> Iterator[None]:
    """The optimizer's frozen parameters that the checkpoint holds state for (``held``, by name)
    require a gradient while DCP runs: DCP (torch 2.13) loads saved state only into parameters
    that require one, and makes a load target's state only for those, so a parameter frozen
    when the checkpoint was saved (its moments kept by the optimizer for when it is unfrozen)
    would silently lose its state. Only those: DCP makes a new optimizer's state for every
    parameter that requires a gradient, and a frozen backbone's would be made for nothing.
    ``names`` gives ``names_of(model)``, asked only when some parameter is frozen."""
    # Only floating-point tensors can require a gradient (an int8 base weight cannot).
    candidates = [p for group in optimizer.param_groups for p in group["params"]
                  if not p.requires_grad and (p.is_floating_point() or p.is_complex())]
    by_name = names() if candidates and held else {}
    frozen: list[torch.Tensor] = []
    try:
        for p in candidates:
            if not by_name.get(p, set()).isdisjoint(held):
                p.requires_grad_(True)
                frozen.append(p)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside wrappers that hold it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``), whose state it is."""
    seen = {id(optimizer)}
    while isinstance(inner := getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and id(inner) not in seen:
        seen.add(id(inner))
        optimizer = inner
    return optimizer


def optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    """How a manifest names the kind of state ``optimizer`` holds, ``module:qualname``: the
    ``torch.optim`` class it is or extends (a subclass of AdamW holds AdamW's state), else its
    own class; wrappers (``unwrapped``) do not count."""
    kind = type(unwrapped(optimizer))
    base = next((c for c in kind.__mro__ if c.__module__.startswith("torch.optim") and c is not torch.optim.Optimizer),
                kind)
    return f"{base.__module__}:{base.__qualname__}"


def same_class(saved: str, live: str) -> bool:
    """Whether two ``optimizer_class`` names are one kind of state. Between ``torch.optim``
    classes the qualified names count (torch has moved optimizers between modules); any other
    class must match in full."""
    if saved == live:
        return True
    torch_optim = saved.startswith("torch.optim") and live.startswith("torch.optim")
    return torch_optim and saved.rpartition(":")[2] == live.rpartition(":")[2]


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (LBFGS): DCP cannot make its state, which it
    does for a restore wherever the state is loaded in place or broadcast from rank 0."""
    try:
        closure = inspect.signature(type(unwrapped(optimizer)).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def load_resume_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                      state: dict[str, Any], full: bool, coll: ranks.Collectives,
                      held: Collection[str] | None = None, source: str = "the checkpoint") -> None:
    """Copy state back into the model and optimizer.

    ``full`` state lives on rank 0 only when distributed and is broadcast from there; sharded
    state was loaded by each rank into the structure ``resume_state(sharded=True)`` gave it,
    and ``held`` names the parameters the checkpoint holds optimizer state for
    (``sharded.optimizer_state_held``). A parameter without saved state (one that never got a
    gradient) has none after the restore either, as in the training that saved it. An optimizer
    whose groups do not match the saved ones raises ``IncompatibleCheckpointError`` (naming
    ``source``) on every rank, before the model is loaded (sharded state is in it already). An
    optimizer that fails to load is left as it was, and so is the model; a model that fails to
    load leaves the optimizer as it was.
    """
    options = _full_options(model, broadcast_from_rank0=True) if full else None
    if options is not None and ranks.rank() != 0:
        state = {"model": {}, "optimizer": {}}
    misfit = plain_misfit(model, state["model"]) if full and options is None else None
    if misfit is not None:
        raise IncompatibleCheckpointError(f"{source}: {misfit}")
    if options is not None and ranks.rank() == 0:
        try:
            misfit = broadcast_misfit(model, state["model"])
        except Exception:  # a check that cannot run leaves the verdict to torch's load
            misfit = None
    if optimizer is None and options is not None:
        misfit = coll.broadcast("restore: model layout", misfit)
        if misfit is not None:
            raise IncompatibleCheckpointError(f"{source}: {misfit}")
    if optimizer is not None:
        optim_state = state["optimizer"]
        without_params = _group_without_params(optim_state)
        names = names_of(model)
        if misfit is None and (options is None or ranks.rank() == 0):
            # A sharded load's state is the model's own target: its names say nothing of the saved model.
            misfit = layout_misfit(names, optimizer, optim_state, lacking_checked=options is not None,
                                   saved_model=state["model"] if full else None)
        if options is not None:
            # torch 2.13's broadcast takes its device from the optimizer's own per-parameter
            # state tensors, and a stateless optimizer (SGD without momentum, or one saved
            # before its first step) has none: "Expected device to be set". With no state to
            # scatter, every rank loads rank 0's param_groups (learning rates and the like) as
            # they are.
            groups, without_params, held, misfit = coll.broadcast(
                "restore: optimizer param_groups",
                (None if optim_state.get("state") else optim_state.get("param_groups"), without_params,
                 set(optim_state.get("state", ())), misfit))
            if groups is not None and misfit is None:
                optim_state, optim_options = {"state": {}, "param_groups": groups}, None
            else:
                optim_options = options
        else:
            optim_options = None
        if misfit is not None:
            raise IncompatibleCheckpointError(f"{source}: {misfit}")
    # Model and optimizer separately: set_state_dict with both and broadcast_from_rank0 issues
    # mismatched collectives when the other ranks pass empty dicts (torch 2.13). The optimizer
    # first: loading it is what fails for an optimizer of another class, and the model is then
    # left as it was.
    if optimizer is None:
        _load_model(model, state["model"], options, source, coll)
        return
    kept = _kept(optimizer)
    try:
        _load_optimizer(model, optimizer, optim_state, optim_options, names,
                        held if held is not None else set(optim_state.get("state", ())))
    except (KeyError, ValueError) as exc:  # torch's own load_state_dict meeting another class's state
        raise IncompatibleCheckpointError(
            f"{source}: its optimizer state does not fit the optimizer given to restore ({type(exc).__name__}: "
            f"{exc}). {REBUILD}") from exc
    try:
        _load_model(model, state["model"], options, source, coll)
    except BaseException:
        optimizer.state, optimizer.param_groups = kept
        raise
    if held is not None:
        _forget_unsaved(names, optimizer, held)
    # DCP (torch 2.13) matches a saved param group without parameters to the optimizer's only
    # when it is the last group; elsewhere the group is loaded without its settings (lr, betas:
    # the first step then fails), so they come back from the checkpoint here.
    empty = [g for g in optimizer.param_groups if not g["params"]]
    if without_params is not None and len(empty) == 1:
        empty[0].update(without_params)


REBUILD = ("Build the optimizer as the run that saved it did (the same class, parameters and groups), "
           "or restore without optimizer=")


def groups_misfit(saved: int | None, optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer``'s param groups cannot take those of a checkpoint whose optimizer has
    ``saved`` groups (``saved=None``: as many as ``optimizer``, for a save), or None."""
    if saved is not None and saved != len(optimizer.param_groups):
        return (f"its optimizer has {saved} param group(s), the optimizer given to restore "
                f"{len(optimizer.param_groups)}. {REBUILD}")
    empty = sum(1 for group in optimizer.param_groups if not group["params"])
    if empty > 1:
        return (f"the optimizer has {empty} param groups without parameters, and torch's distributed "
                "state dict API (DCP), which restore loads optimizers through, loads at most one: give "
                "each group a parameter, or merge the empty ones")
    return None


def layout_misfit(names: dict[torch.Tensor, set[str]], optimizer: torch.optim.Optimizer, optim_state: dict[str, Any],
                  lacking_checked: bool = False, saved_model: Collection[str] | None = None) -> str | None:
    """Why the saved optimizer state cannot fill ``optimizer``, or None. As torch's own
    ``load_state_dict`` requires: as many param groups, each of the optimizer's parameters in a
    saved group (by name), and each group holding the parameters of one saved group. Without the
    check DCP loads a group it cannot match without its settings (the first step then fails),
    trains parameters the checkpoint never saw from no state at all, and gives a parameter moved
    to another group that group's settings (lr, weight decay) without a word. ``lacking_checked``
    (full state broadcast to other ranks): also ``lacking_state``. ``saved_model``: the names in
    the checkpoint's model state, where known, so that a parameter the saved model did not have
    either is told as the model's change (a layer renamed or added), not the optimizer's."""
    saved = optim_state.get("param_groups") or []
    problem = groups_misfit(len(saved), optimizer)
    if problem is not None:
        return problem
    empty = [i for i, group in enumerate(optimizer.param_groups) if not group["params"]]
    saved_empty = sum(1 for group in saved if not group.get("params"))
    if empty and saved_empty != 1:
        # DCP refuses it in its own load, and only on rank 0 where the state is broadcast.
        return (f"the optimizer given to restore has a param group without parameters (group {empty[0]}), and "
                f"{'none' if not saved_empty else saved_empty} of the saved optimizer's groups is without: torch's "
                "distributed state dict API (DCP), which restore loads optimizers through, matches such a group "
                f"only to exactly one saved without parameters. {REBUILD}")
    problem = outside_model(names, optimizer, "restored")
    if problem is not None:
        return problem
    known = {name for group in saved for name in group.get("params", ())}
    unknown = sorted(min(names[p]) for group in optimizer.param_groups for p in group["params"]
                     if names[p].isdisjoint(known))
    if unknown:
        if saved_model is not None and not any(name in saved_model for name in unknown):
            return (f"its model has no parameter named {_listed(unknown)}, which the model given to restore "
                    "has (a layer renamed or added since the save?). Build the model as the run that saved it "
                    "did; to start a changed model from these weights, write them to a file with export() (or "
                    "`ckptkit export`) and load that with load_state_dict(strict=False)")
        return (f"its optimizer has no parameter named {_listed(unknown)}, which the optimizer given to "
                f"restore trains. {REBUILD}")
    problem = _regrouped(names, optimizer, saved)
    if problem is not None:
        return problem
    if lacking_checked:
        return lacking_state(names, optimizer, set(optim_state.get("state", ())))
    return None


def _regrouped(names: dict[torch.Tensor, set[str]], optimizer: torch.optim.Optimizer,
               saved: list[dict[str, Any]]) -> str | None:
    """Why ``optimizer``'s groups do not each hold the parameters of one saved group, or None.
    DCP gives each saved group's settings to a group holding one of its parameters (the last):
    a group mixing two saved groups' parameters, or two groups sharing one's, train some
    parameters with settings they were not saved with. Groups in another order are matched."""
    owner = {name: i for i, group in reversed(list(enumerate(saved))) for name in group.get("params", ())}
    claimed: dict[int, int] = {}
    for j, group in enumerate(optimizer.param_groups):
        by_saved: dict[int, list[str]] = {}
        for p in group["params"]:
            # By the saved name matched: a weight tied since the save has one in each saved group.
            for n in sorted(names[p]):
                if n in owner:
                    by_saved.setdefault(owner[n], []).append(n)
        if len(by_saved) > 1:
            held = "; ".join(f"{_listed(sorted(ps))} in its group {i}" for i, ps in sorted(by_saved.items()))
            return (f"param group {j} of the optimizer given to restore holds parameters the checkpoint's "
                    f"optimizer kept in different groups ({held}): loaded, they would all train with one "
                    f"saved group's settings (lr, weight decay, ...). {REBUILD}; to regroup on purpose, restore "
                    "into the saved grouping and move the parameters between groups afterwards")
        for i, ps in by_saved.items():
            if i in claimed:
                return (f"param groups {claimed[i]} and {j} of the optimizer given to restore both hold "
                        f"parameters of the checkpoint's group {i} ({_listed(sorted(ps))} in group {j}): "
                        f"loaded, one of them would train with another saved group's settings (lr, weight "
                        f"decay, ...). {REBUILD}")
            claimed[i] = j
    return None


def lacking_state(names: dict[torch.Tensor, set[str]], optimizer: torch.optim.Optimizer,
                  held: Collection[str]) -> str | None:
    """Why an optimizer that has stepped cannot take the saved state where it is loaded in place
    (sharded) or broadcast (full, from rank 0): there, only the state the optimizer holds
    already is filled in, and the checkpoint's state of a parameter it holds none for (one
    that got no gradient yet) would be lost, or reach rank 0 alone. None if nothing lacks.
    ``names``: ``names_of(model)``."""
    if not optimizer.state:
        return None  # an optimizer that has not stepped is given state for every parameter first
    trained = {p for group in optimizer.param_groups for p in group["params"]}
    lacking = sorted(min(names[p]) for p in trained
                     if p in names and p not in optimizer.state and not names[p].isdisjoint(held))
    if not lacking:
        return None
    return (f"it holds optimizer state for {_listed(lacking)}, which the optimizer given to restore has "
            "stepped without, so loading would lose it. Restore into an optimizer that has not stepped "
            "(build a new one), as a resuming process does")


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _kept(optimizer: torch.optim.Optimizer) -> tuple[Any, list[dict[str, Any]]]:
    """What puts ``optimizer`` back as it is now (``optimizer.state, optimizer.param_groups =``):
    a load swaps in new ones, or adds to the state in place (DCP's first step at lr=0)."""
    return collections.defaultdict(dict, optimizer.state), optimizer.param_groups


def _persistent_buffers(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Each plain (unsharded) buffer a state dict holds, by each of its names in DCP's state dicts."""
    for module_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is None or name in module._non_persistent_buffers_set or isinstance(buf, DTensor):
                continue
            for fqn in _dcp_names(model, f"{module_name}.{name}" if module_name else name):
                yield fqn, buf


# Where a state holds each rank's own buffers (``own_buffers``): by rank in a full state, by rank
# as text in a sharded one (DCP's keys are text).
RANK_BUFFERS = "rank_buffers"


def own_buffers(model: torch.nn.Module, coll: ranks.Collectives, sharded: bool) -> dict[str, torch.Tensor] | None:
    """The buffers (BatchNorm's running statistics) this rank must save for itself, on the CPU
    by name (collective): a buffer there is the model's own tensor, which every save path writes,
    pickles or stages before ``save`` returns. FSDP neither shards nor synchronises buffers, nor
    does DDP with ``broadcast_buffers=False``, nor anything for a plain module on several ranks: a state dict
    holds one rank's, and a resume must give every rank its own back. Only buffers that differ
    between ranks are kept: a rank keeps those where it differs from rank 0, and rank 0 those
    where any rank differs (a sharded save keeps the copy of whichever rank DCP picks). Under DDP
    broadcasting buffers, rank 0's are every rank's before the next forward pass: in a
    ``sharded`` save rank 0 keeps those that differ and the other ranks none; a full save holds
    rank 0's model state, theirs included. None on one process and where all agree."""
    wrapped = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if ranks.world_size() < 2 or not distributed(model):
        return None
    broadcast = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.broadcast_buffers
    if broadcast and not sharded:
        return None
    # Hashed where they lie on the CPU, not copied: most agree, and a save must not copy every
    # buffer (position tables) to find the few that differ.
    mine: dict[str, torch.Tensor] = {}
    own: dict[str, str] = {}
    for fqn, buf in _persistent_buffers(model):
        try:
            mine[fqn] = buf.detach().to("cpu")
            own[fqn] = _digest(mine[fqn])
        except Exception:  # noqa: BLE001 (a tensor without plain storage: not compared, and every rank goes on)
            mine.pop(fqn, None)
    digests = coll.all_gather("save: buffer digests", own)
    first = digests[0]
    if ranks.rank() == 0:
        keep = {fqn for fqn in mine if any(d.get(fqn) != first.get(fqn) for d in digests[1:])}
    else:
        keep = set() if broadcast else {fqn for fqn in mine if own[fqn] != first.get(fqn)}
    return {fqn: mine[fqn] for fqn in sorted(keep)} or None


def _digest(tensor: torch.Tensor) -> str:
    """A digest of a CPU tensor's values, its dtype and shape; of a quantized one, its scales and
    zero points too (its storage holds only the integers)."""
    if tensor.is_quantized:
        if tensor.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scales = f"{tensor.q_scale()!r}/{tensor.q_zero_point()}"
        else:
            scales = (f"{tensor.q_per_channel_axis()}/{_digest(tensor.q_per_channel_scales())}"
                      f"/{_digest(tensor.q_per_channel_zero_points())}")
        return f"{tensor.dtype}:{tensor.qscheme()}:{scales}:{_digest(tensor.int_repr())}"
    data = tensor.contiguous()
    size = data.numel() * data.element_size()
    raw = (ctypes.c_char * size).from_address(data.data_ptr()) if size else b""
    return f"{data.dtype}{tuple(data.shape)}:{xxhash.xxh3_128_hexdigest(raw)}"


def own_buffers_of(per_rank: dict[Any, dict[str, torch.Tensor] | None], rank: Any, first: Any) -> dict[str, torch.Tensor]:
    """The buffers rank ``rank`` gets back from what each rank saved (keys ``rank`` and ``first``
    for rank 0): its own where it saved them, else rank 0's where rank 0 saved them."""
    return {**(per_rank.get(first) or {}), **(per_rank.get(rank) or {})}


def rank0_model(state: dict[str, Any]) -> dict[str, Any] | None:
    """The model state of a whole sharded checkpoint (``sharded.load_full``) as rank 0 held it:
    DCP keeps one copy of a buffer every rank holds, of whichever rank it picks, and rank 0
    saved its own where the ranks' differ."""
    model = state.get("model")
    first = (state.get(RANK_BUFFERS) or {}).get("0") or {}
    if not isinstance(model, dict) or not first:
        return model
    return {**model, **{k: v for k, v in first.items() if k in model}}


def buffer_targets(model: torch.nn.Module, saved: Collection[str]) -> dict[str, torch.Tensor]:
    """Tensors for a sharded load to fill with the buffers named ``saved`` that the model has."""
    return {fqn: torch.empty_like(buf, device="cpu") for fqn, buf in _persistent_buffers(model) if fqn in saved}


def load_own_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor], source: str) -> None:
    """Copy this rank's saved buffers (``own_buffers``) into the model's."""
    for fqn, buf in _persistent_buffers(model):
        value = saved.get(fqn)
        if value is None:
            continue
        if value.shape != buf.shape:
            raise IncompatibleCheckpointError(f"{source}: this rank's saved buffer {fqn} has shape "
                                              f"{tuple(value.shape)}, the model's {tuple(buf.shape)}")
        with torch.no_grad():
            buf.copy_(value)


def cast_note(model: torch.nn.Module, saved: dict[str, torch.dtype], source: str) -> str | None:
    """What to warn of when ``model``'s parameters are of another dtype than ``saved`` (each saved
    tensor's dtype by name), or None: the load converts them, and the optimizer's state with them,
    as torch's copy does, so a model built in bfloat16 for a float32 training resumes rounded."""
    cast = sorted(f"{name} (saved {str(saved[name]).removeprefix('torch.')}, the model's "
                  f"{str(param.dtype).removeprefix('torch.')})"
                  for param, names in names_of(model).items() for name in sorted(names)[:1]
                  if name in saved and saved[name] != param.dtype)
    if not cast:
        return None
    return (f"{source}: the model given to restore holds {len(cast)} parameter(s) in another dtype than saved, so "
            f"their saved values were converted as they were loaded, and the optimizer's state with them: "
            f"{_listed(cast)}. Build the model in the dtype it was trained in to resume exactly (cast after "
            "restore for evaluation)")


def names_of(model: torch.nn.Module) -> dict[torch.Tensor, set[str]]:
    """Each parameter's names in DCP's state dicts: several for a tied weight."""
    names: dict[torch.Tensor, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param, set()).update(_dcp_names(model, name))
    return names


def without_unsaved(state: dict[str, Any], held: Collection[str]) -> dict[str, Any]:
    """A sharded load target (``resume_state(sharded=True, load_target=True)``) without the
    optimizer state of parameters the checkpoint holds none for: DCP gives an unstepped
    optimizer zero state for every parameter, and would then look for it in the checkpoint."""
    if "optimizer" not in state:
        return state
    optim = state["optimizer"]
    kept = {fqn: v for fqn, v in optim.get("state", {}).items() if fqn in held}
    return {**state, "optimizer": {**optim, "state": kept}}


def _forget_unsaved(names: dict[torch.Tensor, set[str]], optimizer: torch.optim.Optimizer,
                    held: Collection[str]) -> None:
    """Drop the state of optimizer parameters that have none in the checkpoint: where DCP first
    gave the optimizer zero state by a step at lr=0, such a parameter would keep it (and Adam's
    step counter a head start the first time it gets a gradient)."""
    for param, fqns in names.items():
        if param in optimizer.state and fqns.isdisjoint(held):
            del optimizer.state[param]


def copies_on_load(model: torch.nn.Module) -> bool:
    """Whether ``load_resume_state`` copies a full model state into the model's own tensors and
    keeps none of those it was given. Not while a parameter or buffer is on the meta device,
    where DCP takes the given tensors as they are; nor where code from outside torch sees them
    first (a module's own ``_load_from_state_dict``, a load pre-hook), which may keep one."""
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return False
    for module in model.modules():
        hooks = [getattr(h, "hook", h) for h in module._load_state_dict_pre_hooks.values()]
        if not all(_from_torch(f) for f in [type(module)._load_from_state_dict, *hooks]):
            return False
    return True


def _load_model(model: torch.nn.Module, model_state: dict[str, Any], options: StateDictOptions | None,
                source: str, coll: ranks.Collectives) -> None:
    """``set_model_state_dict``, with torch's refusal of another model's weights (missing or
    unexpected keys, other shapes) raised as ``IncompatibleCheckpointError`` naming ``source``:
    not a damaged checkpoint, so an older one is not tried. Where rank 0's full state is
    broadcast, rank 0 loads the saved state and the others what the broadcast gave them, so a
    load may fail on one rank alone (torch's refusal, a module's own ``set_extra_state``): one
    that fails once every rank is past the broadcast is raised on every rank. One that fails
    inside the broadcast is raised at once, the other ranks still waiting in it."""
    if not model_state and not model.state_dict():
        return  # nothing to load, and DCP refuses a model without state (``resume_state``)
    past_broadcast = []
    # The model's own load_state_dict begins once torch's broadcast has ended, on every rank.
    handle = model.register_load_state_dict_pre_hook(lambda *args: past_broadcast.append(True))
    problem = None
    try:
        set_model_state_dict(model, model_state, options=options)
    except Exception as exc:
        if options is not None and not past_broadcast:
            raise
        problem = exc
        if isinstance(exc, RuntimeError) and "Error(s) in loading state_dict" in str(exc):
            detail = " ".join(str(exc).split())
            detail = detail if len(detail) <= 600 else detail[:600] + " ..."
            problem = IncompatibleCheckpointError(
                f"{source}: the model given to restore does not fit the weights saved there ({detail}). "
                f"{REBUILD_MODEL}")
            problem.__cause__ = exc
    finally:
        handle.remove()
    if options is not None:
        coll.agree("restore: model loaded", problem)
    elif problem is not None:
        raise problem


REBUILD_MODEL = ("Build the model as the training that saved it did (the same layers, shapes and names, all made "
                 "before restore), or give this training a new run name to start it afresh")


def broadcast_misfit(model: torch.nn.Module, saved: dict[str, Any]) -> str | None:
    """Why torch's broadcast of the full state ``saved`` into ``model`` (DCP, strict) would fail
    part way, or None: a weight of the model missing there where DCP renames it (DDP's
    ``module.``: rank 0 alone raises, before it broadcasts), one the model lacks (every rank
    raises a bare ``KeyError``), or another shape than a sharded (DTensor) weight (the ranks
    whose shard does not fit raise, the others wait for them). Names as DCP makes them; what
    fails only in the model's own ``load_state_dict`` is left to it."""
    missing, other = [], []
    live: set[str] = set()
    for name, value in _iterate_valid_model_state(model):
        for fqn, prefixed in zip(_dcp_names(model, name),
                                 _dcp_names(model, name, skip_ddp_prefix=False, skip_compiler_prefix=False)):
            live.add(fqn)
            kept = saved.get(fqn)
            if kept is None and fqn != prefixed:
                missing.append(fqn)
            elif (isinstance(value, DTensor) and isinstance(kept, torch.Tensor) and kept.dim() > 0
                  and tuple(kept.shape) != tuple(value.shape)):
                other.append(f"{fqn} is {tuple(kept.shape)} there and {tuple(value.shape)} in the model")
    unknown = sorted(fqn for fqn, value in saved.items()
                     if fqn not in live and isinstance(value, torch.Tensor) and value.dim() > 0)
    return _misfit(missing, unknown, other)


def plain_misfit(model: torch.nn.Module, saved: dict[str, Any]) -> str | None:
    """Why the model's own strict ``load_state_dict``, which DCP runs for a plain module in one
    process, would refuse the full state ``saved``, or None: a weight the model has and ``saved``
    lacks, one the other way round, or one of another shape. Found before anything is loaded:
    torch copies in every weight that fits before it raises, and a trainer that catches the
    refusal and starts afresh would train a model part restored. An empty ``saved`` counts too,
    which DCP loads into any model without a word. The weights are named as ``state_dict`` names
    them, a shared module or tensor under each of its names. A model with a module that saves or
    loads its own way (a ``state_dict``, ``load_state_dict``, ``_save_to_state_dict`` or
    ``_load_from_state_dict`` other than torch's, ``_PLAIN_LOADS`` aside, or a state-dict hook
    from outside torch: any of them may rename, add or reshape) is left to its own load; lazy
    weights are not told by shape."""
    names: list[tuple[str, torch.nn.Module, str, Any]] = []  # (state_dict key, its module, its name there, value)
    for prefix, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        hooks = [*module._load_state_dict_pre_hooks.values(), *module._load_state_dict_post_hooks.values(),
                 *module._state_dict_hooks.values(), *module._state_dict_pre_hooks.values()]
        if (kind._load_from_state_dict not in _PLAIN_LOADS or "_load_from_state_dict" in vars(module)
                or any(getattr(kind, m) is not getattr(torch.nn.Module, m) or m in vars(module) for m in _OWN_WAYS)
                or not all(_from_torch(getattr(h, "hook", h)) for h in hooks)):
            return None
        dot = f"{prefix}." if prefix else ""
        names += [(dot + n, module, n, p) for n, p in module._parameters.items() if p is not None]
        names += [(dot + n, module, n, b) for n, b in module._buffers.items()
                  if b is not None and n not in module._non_persistent_buffers_set]
        if kind.get_extra_state is not torch.nn.Module.get_extra_state:
            names.append((dot + _EXTRA, module, _EXTRA, None))
    missing, other = [], []
    live: set[str] = set()
    for key, owner, leaf, value in names:
        for fqn in _dcp_names(model, key):
            live.add(fqn)
            kept = saved.get(fqn)
            if leaf == _EXTRA:
                if fqn not in saved and type(owner).set_extra_state is not torch.nn.Module.set_extra_state:
                    missing.append(fqn)
            elif fqn not in saved:
                # (BatchNorm makes up a step count that a checkpoint of an older torch lacks.)
                if not (leaf == "num_batches_tracked" and isinstance(owner, torch.nn.modules.batchnorm._NormBase)):
                    missing.append(fqn)
            elif not isinstance(kept, torch.Tensor):
                other.append(f"{fqn} is a {type(kept).__name__} there, not a tensor")
            elif not torch.nn.parameter.is_lazy(value) and tuple(kept.shape) != tuple(value.shape) and not (
                    value.dim() == 0 and kept.dim() == 1):  # (torch takes a 1-d weight for a 0-d one)
                other.append(f"{fqn} is {tuple(kept.shape)} there and {tuple(value.shape)} in the model")
    # (Saved extra state of a module that keeps none is an unexpected key too, under strict.)
    unknown = sorted(fqn for fqn in saved if fqn not in live)
    return _misfit(sorted(set(missing)), unknown, sorted(set(other)))


_EXTRA = torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
# What a module may override to save or load a state of its own making.
_OWN_WAYS = ("state_dict", "load_state_dict", "_save_to_state_dict")


# The loads whose rules ``plain_misfit`` knows: torch's own, and the norms' (which only convert
# what an older torch saved, and add a missing step count).
_PLAIN_LOADS = tuple(load for load in (
    torch.nn.Module._load_from_state_dict,
    getattr(getattr(torch.nn.modules.batchnorm, "_NormBase", None), "_load_from_state_dict", None),
    getattr(getattr(torch.nn.modules.instancenorm, "_InstanceNorm", None), "_load_from_state_dict", None),
) if load is not None)


def _misfit(missing: list[str], unknown: list[str], other: list[str]) -> str | None:
    found = ([f"no weights for {_listed(sorted(missing))}"] if missing else []) + (
        [f"weights the model lacks: {_listed(unknown)}"] if unknown else []) + (
        [_listed(sorted(other))] if other else [])
    if not found:
        return None
    renamed = (". To start a changed model from these weights, write them to a file with export() (or `ckptkit "
               "export`) and load that with load_state_dict(strict=False)" if missing or unknown else "")
    return (f"the model given to restore does not fit the weights saved there ({'; '.join(found)}). "
            f"{REBUILD_MODEL}{renamed}")


def _from_torch(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return module == "torch" or module.startswith("torch.")


def _group_without_params(optim_state: dict[str, Any]) -> dict[str, Any] | None:
    """The settings of the saved param group that has no parameters, when there is exactly one
    (DCP loads no more than one)."""
    groups = [g for g in optim_state.get("param_groups", ()) if not g.get("params")]
    return {k: v for k, v in groups[0].items() if k != "params"} if len(groups) == 1 else None


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict[str, Any],
                    options: StateDictOptions | None, names: dict[torch.Tensor, set[str]],
                    held: Collection[str]) -> None:
    """Load ``optim_state`` into ``optimizer``; one that fails leaves it as it was (torch's own
    ``load_state_dict`` swaps in new state and groups, and may fail after that, half done)."""
    # Not strict: a parameter that never got a gradient (an unused head, an expert no token was
    # routed to) has no optimizer state, saved or live, and torch's own load_state_dict accepts
    # that. DCP's strict default refuses the checkpoint instead (torch 2.13).
    loose = dataclasses.replace(options or StateDictOptions(), strict=False)
    kept = _kept(optimizer)
    if options is None and not optimizer.state:
        # An optimizer that has not stepped yet (the one a resuming process builds) would first
        # be given state by DCP through a step at lr=0: a zero tensor per moment (for AdamW
        # twice the model's size in fresh memory, half the time of restoring 1 GiB) computed and
        # then replaced by what is loaded. Loading by name needs none of it; the load replaces
        # the empty entries.
        _empty_entries(optimizer)
    try:
        with _trainable(optimizer, held, lambda: names):
            set_optimizer_state_dict(model, optimizer, optim_state, options=loose)
    except BaseException:
        optimizer.state, optimizer.param_groups = kept
        raise


def final_state(model: torch.nn.Module, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The full model state on the CPU, optionally cast; empty on ranks other than 0."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed(model):
        # DCP's full state is a plain dict: without the module versions (``_metadata``) that
        # load_state_dict converts by. A plain module's keys are its own, so they carry over.
        metadata = getattr(model.state_dict(), "_metadata", None)
        if metadata is not None:
            sd = collections.OrderedDict(sd)
            sd._metadata = metadata  # type: ignore[attr-defined]
    return cast(sd, dtype)


def cast(sd: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """A copy of ``sd`` with floating-point tensors in ``dtype``; ``sd`` itself when None."""
    if dtype is None:
        return sd
    target = DTYPES[dtype]
    # A tensor under two keys (an embedding tied to the output head) is cast once and stays one
    # tensor: torch.save writes a storage once, so the tie keeps the cast file at half the size.
    done: dict[tuple, torch.Tensor] = {}

    def one(v: Any) -> Any:
        if not (torch.is_tensor(v) and v.is_floating_point()):
            return v
        if type(v) not in (torch.Tensor, torch.nn.Parameter):  # a DTensor has no storage of its own to key by
            return v.to(target)
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if key not in done:
            done[key] = v.to(target)
        return done[key]

    out = type(sd)((k, one(v)) for k, v in sd.items())
    if hasattr(sd, "_metadata"):  # the module versions that load_state_dict converts by
        out._metadata = sd._metadata
    return out
