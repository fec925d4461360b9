"""A full training state as one file or as several of about equal bytes, and back.

With ``roles.resume.write_threads: N`` above 1, a ``torch`` checkpoint's state goes into
``state-00-of-NN.pt`` ... instead of one ``state.pt``, so that a backend can write the files at
the same time. Each part is a plain weights-only torch file holding the same nested dicts as
the whole state, with a share of the leaves (and every part's model state the module versions,
``_metadata``); merging the parts gives the whole state back.

Only the ``model`` and ``optimizer`` subtrees are spread over the parts, leaf by leaf; every
other value (``param_groups``, ``rank_extra``, anything that is not a tensor) goes whole into
part 0. A tensor is never split, and tensors that share storage (tied weights, views) stay in
one part so that the file keeps them shared. The assignment depends only on the state's keys,
order and sizes: the same state always gives the same files.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable, Iterator

import torch

from .errors import CorruptCheckpointError

STATE_FILE = "state.pt"
# The subtrees that are spread over the parts: what the gatherer produced, plain dicts of tensors.
SPREAD = ("model", "optimizer")
_PART = re.compile(r"^state-(\d+)-of-(\d+)\.pt$")
_CONTAINERS = (dict, collections.OrderedDict)


def part_names(count: int) -> list[str]:
    """The file names of a state split in ``count`` parts: ``state.pt`` alone for one."""
    if count < 1:
        raise ValueError(f"a state has at least one part, got {count}")
    if count == 1:
        return [STATE_FILE]
    width = max(2, len(str(count)))
    return [f"state-{i:0{width}d}-of-{count:0{width}d}.pt" for i in range(count)]


def state_files(names: Iterable[str], where: str) -> list[str]:
    """The files of a checkpoint's file ``names`` that hold its state, in part order.

    ``state.pt`` alone, or every part of one split. A manifest that lists neither, both, or an
    incomplete split is corrupt: ``where`` names it in the error.
    """
    names = set(names)
    parts: dict[int, tuple[int, str]] = {}
    for name in names:
        m = _PART.match(name)
        if m:
            parts[int(m.group(1))] = (int(m.group(2)), name)
    if STATE_FILE in names and not parts:
        return [STATE_FILE]
    if STATE_FILE in names:
        raise CorruptCheckpointError(f"{where} lists both {STATE_FILE} and state parts "
                                     f"({', '.join(sorted(n for _, n in parts.values()))})")
    if not parts:
        raise CorruptCheckpointError(f"{where} lists no state file ({STATE_FILE} or state-NN-of-NN.pt)")
    counts = {c for c, _ in parts.values()}
    count = counts.pop() if len(counts) == 1 else None
    # Names are built only for as many parts as are listed: a manifest's "of 9999999999" is its own.
    expected = part_names(count) if count and 1 < count == len(parts) else None
    if expected is None or sorted(n for _, n in parts.values()) != expected:
        raise CorruptCheckpointError(f"{where} lists an incomplete or mixed set of state parts: "
                                     f"{', '.join(sorted(n for _, n in parts.values()))}")
    return expected


def _leaves(obj: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) for the leaves of nested plain dicts; an empty dict is a leaf of its own."""
    if type(obj) in _CONTAINERS and obj:
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    else:
        yield path, obj


def _storages(obj: Any) -> Iterator[tuple[Any, int]]:
    """(storage key, bytes) of every tensor inside ``obj``."""
    if torch.is_tensor(obj):
        try:
            s = obj.untyped_storage()
            yield (obj.device, s.data_ptr(), s.nbytes()), s.nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage: counted by its own size
            yield ("tensor", id(obj)), obj.numel() * obj.element_size()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _storages(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _storages(v)


def _put(tree: Any, like: Any, path: tuple, value: Any) -> None:
    """Set ``tree[path] = value``, making the containers on the way of the same type as in
    ``like``, with its ``_metadata``: a module's state dict carries each submodule's version
    there, by which ``load_state_dict`` converts what an older version saved."""
    for key in path[:-1]:
        like = like[key]
        if key not in tree:
            tree[key] = type(like)()
            metadata = getattr(like, "_metadata", None)
            if metadata is not None:
                tree[key]._metadata = metadata
        tree = tree[key]
    tree[path[-1]] = value


def split(state: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """``state`` as at most ``count`` parts of about equal bytes (fewer when it has fewer groups
    of tensors to spread), each a dict of the same shape holding a share of the leaves.

    Largest group first, each to the part with the fewest bytes so far (the lowest index on a
    tie); within a part the leaves keep their order in ``state``.
    """
    if count <= 1:
        return [state]
    units: list[tuple[tuple, Any]] = []  # leaves to spread, in order
    for key, value in state.items():
        if key in SPREAD and type(value) in _CONTAINERS:
            units += list(_leaves(value, (key,)))
    # Leaves that share a storage form one group (union-find on storage keys).
    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[Any, int] = {}
    sizes: dict[Any, int] = {}
    for i, (_, leaf) in enumerate(units):
        for skey, nbytes in _storages(leaf):
            sizes[skey] = nbytes
            if skey in owner:
                parent[find(i)] = find(owner[skey])
            else:
                owner[skey] = i
    group_bytes: dict[int, int] = collections.defaultdict(int)
    for skey, i in owner.items():
        group_bytes[find(i)] += sizes[skey]
    # Groups without bytes (scalars, empty dicts) stay in part 0 with the rest.
    groups = sorted((g for g, n in group_bytes.items() if n > 0), key=lambda g: (-group_bytes[g], g))
    count = min(count, max(1, len(groups)))
    if count == 1:
        return [state]
    loads = [0] * count
    part_of_group: dict[int, int] = {}
    for g in groups:
        target = min(range(count), key=lambda p: (loads[p], p))
        part_of_group[g] = target
        loads[target] += group_bytes[g]
    parts: list[dict[str, Any]] = [{} for _ in range(count)]
    spread = set()
    for i, (path, leaf) in enumerate(units):
        _put(parts[part_of_group.get(find(i), 0)], state, path, leaf)
        spread.add(path[0])
    for key, value in state.items():
        if key not in spread:
            parts[0][key] = value
    return parts


def merge(parts: Iterable[Any], where: str) -> dict[str, Any]:
    """The whole state from its loaded parts (in part order); ``where`` names the checkpoint in errors."""
    whole: dict[str, Any] = {}
    for i, part in enumerate(parts):
        if type(part) not in _CONTAINERS:
            raise CorruptCheckpointError(f"{where}: state part {i} holds {type(part).__name__}, not a dict")
        _merge_into(whole, part, (), where)
    return whole


def _merge_into(whole: Any, part: Any, path: tuple, where: str) -> None:
    for key, value in part.items():
        if key not in whole:
            whole[key] = value
        elif type(whole[key]) in _CONTAINERS and type(value) in _CONTAINERS:
            _merge_into(whole[key], value, path + (key,), where)
        else:
            at = "/".join(map(str, path + (key,)))
            raise CorruptCheckpointError(f"{where}: two state parts both hold {at!r}")
