"""Loading checkpoint files without running code, and refusing at save time what could not be loaded.

Everything goes through ``torch.load(weights_only=True)``. On top of torch's own allowlist,
plain numeric numpy arrays and scalars (bool, integer, float, complex) and numpy's RNG state
load too, because they are everyday training state. numpy's own pickle format cannot be
allowed as it is: ``numpy.dtype`` plus a dtype's ``__setstate__`` can make an array of any
dtype, objects included, and a float64 dtype whose flags claim it holds objects (numpy then
treats the array's bytes as object pointers). So the numpy names map to stand-ins that check
every argument and build the array themselves from validated bytes; the stand-ins are replaced
by the real arrays once the file is loaded.

``check_storable`` is the save-side twin: it refuses, before anything is written, state that
``load`` could not rebuild, naming the key and what to store instead.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import contextvars
import copyreg
import datetime
import enum
import math
import os
import pathlib
import pickle
import random
import re
import reprlib
import threading
import types
import zipfile
from typing import Any, BinaryIO, Iterable, Iterator

import torch
from torch import _weights_only_unpickler

from .errors import CkptkitError, CorruptCheckpointError, UnsafeCheckpointError, UnstorableStateError

try:
    import numpy as np
except ImportError:  # numpy is optional: without it, nothing numpy-related is allowed
    np = None  # type: ignore[assignment]

__all__ = ["load", "check", "check_storable"]

_NUMERIC_KINDS = "biufc"
# The stand-ins created by the load running in this context, to be replaced by real values.
_CREATED: contextvars.ContextVar[list | None] = contextvars.ContextVar("ckptkit_safeload_created", default=None)


def _refuse(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{what}. ckptkit loads plain numeric numpy arrays and scalars (bool, integer, float, complex) "
        "only; nothing in it ran")


def _numeric(dtype: Any) -> bool:
    return (isinstance(dtype, np.dtype) and dtype.kind in _NUMERIC_KINDS and not dtype.hasobject
            and dtype.fields is None and dtype.subdtype is None and dtype.metadata is None)


def _register(standin: Any) -> None:
    created = _CREATED.get()
    if created is not None:
        created.append(standin)


class _DType:
    """Stands in for ``numpy.dtype`` while unpickling: a plain numeric dtype, byte order and nothing else."""

    __slots__ = ("dtype",)

    def __new__(cls, name: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(name, str) or len(name) > 16:
            raise _refuse(f"a numpy dtype given as {type(name).__name__} {shown(name, 40)}")
        try:
            dtype = np.dtype(name)
        except (TypeError, ValueError) as exc:
            raise _refuse(f"an unknown numpy dtype {shown(name)}") from exc
        if not _numeric(dtype):
            raise _refuse(f"a numpy array or scalar of dtype {dtype}")
        self = object.__new__(cls)
        self.dtype = dtype
        _register(self)
        return self

    def __setstate__(self, state: Any) -> None:
        # numpy writes (3, byteorder, subarray, names, fields, elsize, alignment, flags) for the
        # dtypes allowed here; anything else (fields, a subarray, flags saying "holds objects",
        # metadata) is not a plain numeric dtype.
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and state[1] in ("<", ">", "|", "=") and state[2:] == (None, None, None, -1, -1, 0)):
            raise _refuse(f"a numpy dtype {self.dtype} with the unexpected state {shown(state, 120)}")
        if state[1] in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(state[1])


class _NDArray:
    """Stands in for the ``numpy.ndarray`` class, which ``_reconstruct`` is given; never instantiated."""

    def __new__(cls, *args: Any, **kwargs: Any):
        raise _refuse("a numpy.ndarray built directly rather than through numpy's pickle format")


class _Array:
    """Stands in for ``numpy._core.multiarray._reconstruct`` and the array it starts."""

    __slots__ = ("array",)

    def __new__(cls, subtype: Any = None, shape: Any = None, typecode: Any = None):
        if subtype is not _NDArray:
            raise _refuse(f"a numpy array of the subclass {shown(subtype)}")
        self = object.__new__(cls)
        self.array = None
        _register(self)
        return self

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _refuse(f"a numpy array with the unexpected state {shown(state, 120)}")
        version, shape, dtype, fortran, data = state
        if not isinstance(dtype, _DType):
            raise _refuse(f"a numpy array whose dtype is {type(dtype).__name__}")
        if not (version == 1 and isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
                and type(fortran) is bool and isinstance(data, (bytes, bytearray))):
            raise _refuse(f"a numpy array with the unexpected state {shown(state, 120)}")
        count = math.prod(shape)
        if len(data) != count * dtype.dtype.itemsize:
            raise CorruptCheckpointError(f"a numpy array of shape {shape} and dtype {dtype.dtype} holds "
                                         f"{len(data)} bytes, not {count * dtype.dtype.itemsize}")
        flat = _from_bytes(data, dtype.dtype, count)
        self.array = flat.reshape(shape, order="F" if fortran else "C").copy(order="K")

    def value(self) -> Any:
        if self.array is None:
            raise _refuse("a numpy array without its contents")
        return self.array


def _scalar(dtype: Any = None, data: Any = None) -> Any:
    """Stands in for ``numpy._core.multiarray.scalar``: a numeric scalar from its bytes."""
    if not isinstance(dtype, _DType):
        raise _refuse(f"a numpy scalar whose dtype is {type(dtype).__name__}")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.dtype.itemsize:
        raise CorruptCheckpointError(f"a numpy {dtype.dtype} scalar stored in {type(data).__name__} "
                                     f"of {len(data) if isinstance(data, (bytes, bytearray)) else '?'} bytes")
    return _from_bytes(data, dtype.dtype, 1)[0]


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 60, 60


def shown(value: Any, limit: int = 80) -> str:
    """A repr of ``value`` read from a checkpoint, for a message, at most ``limit`` characters,
    never built whole first: a pickle of a few hundred bytes can nest a tuple in itself forty
    levels deep, and its full repr would take more memory than the machine has."""
    return _SHOWN.repr(value)[:limit]


def _from_bytes(data: bytes | bytearray, dtype: Any, count: int) -> Any:
    if dtype.kind == "b":  # a bool is one byte, 0 or 1; other byte values are not valid numpy bools
        return np.frombuffer(data, dtype=np.uint8, count=count) != 0
    return np.frombuffer(data, dtype=dtype, count=count)


def _empty_bytes(*args: Any) -> bytes:
    """Stands in for ``bytes``: pickle protocol 2 writes ``b""`` (an empty array's data, too) as ``bytes()``."""
    if args:
        raise UnsafeCheckpointError(f"a call of bytes() with arguments {shown(args)}; nothing in it ran")
    return b""


def _stand_ins() -> list[tuple[Any, str]]:
    """Names beyond torch's allowlist, each mapped to a stand-in that checks its arguments.

    Without numpy, no numpy name is allowed.
    """
    names: list[tuple[Any, str]] = [(_empty_bytes, "builtins.bytes")]
    if np is None:
        return names
    names += [(_DType, "numpy.dtype"), (_NDArray, "numpy.ndarray")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x
        names += [(_Array, f"{module}._reconstruct"), (_scalar, f"{module}.scalar")]
    return names


def _resolve(obj: Any, seen: dict[int, Any]) -> Any:
    """``obj`` with every numpy stand-in replaced by its real value; containers changed in place where mutable."""
    kind = type(obj)
    if kind is _Array:
        return obj.value()
    if kind is _DType:
        return obj.dtype
    if kind in _ATOMS or isinstance(obj, torch.Tensor):
        return obj
    key = id(obj)
    if key in seen:
        return seen[key]
    seen[key] = obj
    if isinstance(obj, dict):
        items = [(_resolve(k, seen), _resolve(v, seen)) for k, v in obj.items()]
        if any(k is not old for (k, _), old in zip(items, obj)):
            obj.clear()
        obj.update(items)
    elif isinstance(obj, list):
        obj[:] = [_resolve(v, seen) for v in obj]
    elif isinstance(obj, (tuple, set, frozenset)):
        values = [_resolve(v, seen) for v in obj]
        if any(v is not old for v, old in zip(values, obj)):
            rebuilt = getattr(kind, "_make", kind)(values) if isinstance(obj, tuple) else kind(values)
            seen[key] = rebuilt
            return rebuilt
    elif hasattr(obj, "__dict__"):  # an instance of a type the caller allowed
        for name, value in vars(obj).items():
            new = _resolve(value, seen)
            if new is not value:
                setattr(obj, name, new)
    return obj


_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray})

# How torch's weights-only unpickler says that it refused a name or an object.
_REFUSED = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"Trying to load unsupported GLOBAL (\S+) whose module"),
    re.compile(r"Trying to call reduce for unrecognized function (.+?)(?: which belongs to|$)"),
    re.compile(r"Can only build .* but got (.+)$"),
    re.compile(r"Can only create new object .* but got (.+)$"),
    re.compile(r"(\S+ must be imported to load .+)$"),
)


def _describe(source: Any) -> str:
    name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
    return os.path.basename(os.fspath(name)) if isinstance(name, (str, os.PathLike)) else "the file"


def _unpickling_failure(exc: pickle.UnpicklingError, what: str) -> CkptkitError:
    text = str(exc)
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip()
    for pattern in _REFUSED:
        for line in detail.splitlines():
            match = pattern.search(line.strip())
            if match is None:
                continue
            name = match.group(1).strip()
            if "must be imported" in name:
                return UnsafeCheckpointError(f"{what} holds an object that safe loading rebuilds only once "
                                             f"its module is imported ({name}); nothing in it ran")
            missing_numpy = name.startswith("numpy") and np is None
            hint = (" numpy is not installed here: install it to load numeric numpy arrays."
                    if missing_numpy else
                    f" If this checkpoint is yours and {name} is a class you trust, allow it by name: "
                    f"restore(..., safe_globals=[{name}]).")
            return UnsafeCheckpointError(
                f"{what} needs {name}, which safe loading (torch.load with weights_only=True) does not "
                f"rebuild; nothing in it ran.{hint}")
    first = detail.splitlines()[0] if detail else type(exc).__name__
    return CorruptCheckpointError(f"{what} is not a readable checkpoint file ({first})")


_allow_lock = threading.Lock()
# Entries this module added to torch's allowed globals, by how many loads in flight need them.
_allowed_here: collections.Counter = collections.Counter()


@contextlib.contextmanager
def _allowing(entries: Iterable[Any]) -> Iterator[None]:
    """``entries`` allowed for weights-only loading while the block runs, whatever other threads load.

    torch keeps one process-wide set, and ``torch.serialization.safe_globals`` removes on exit
    what it added, even while another thread's load still needs it (the parts of a split state
    load at once) and even what was allowed before (by the trainer's own ``add_safe_globals``).
    Here the first load that needs an entry adds it, unless it was allowed already, and the
    last one done removes it.
    """
    mine = []
    with _allow_lock:
        present = set(torch.serialization.get_safe_globals())
        for entry in dict.fromkeys(entries):
            if _allowed_here[entry] or entry not in present:
                if not _allowed_here[entry]:
                    torch.serialization.add_safe_globals([entry])
                _allowed_here[entry] += 1
                mine.append(entry)
    try:
        yield
    finally:
        with _allow_lock:
            done = []
            for entry in mine:
                _allowed_here[entry] -= 1
                if not _allowed_here[entry]:
                    del _allowed_here[entry]
                    done.append(entry)
            if done:
                _remove_allowed(done)


def _remove_allowed(entries: list[Any]) -> None:
    # torch's own removal replaces its set in one assignment, so a load on another thread never
    # sees it empty; clearing and adding back is the public way, for a torch without it.
    remove = getattr(_weights_only_unpickler, "_remove_safe_globals", None)
    if remove is not None:
        remove(entries)
        return
    rest = [g for g in torch.serialization.get_safe_globals() if g not in entries]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(rest)


def load(source: str | os.PathLike | BinaryIO, safe_globals: Iterable[Any] = (), *, name: str | None = None,
         mapped: bool = False) -> Any:
    """Load a file written by ``torch.save`` onto the CPU without running anything stored in it.

    ``source`` is a path or a readable binary file. ``safe_globals`` names further types the
    caller trusts (as ``torch.serialization.safe_globals`` takes them). Raises
    ``UnsafeCheckpointError`` (naming the type) when the file needs anything else, and
    ``CorruptCheckpointError`` when it is not a readable checkpoint file; ``OSError`` when it
    cannot be read at all. ``name`` is what errors call the source (default: its file name).

    ``mapped`` (a path only): the tensors point into the file, mapped, instead of memory of their
    own. A tensor kept from it keeps the whole file mapped (and, once pruned, its disk space
    taken), so a caller copies out what it keeps (see ``reading.load``).
    """
    what = name or _describe(source)
    refuse_compressed(source, what)
    # A caller's own entry for a name a stand-in covers (numpy.ndarray) is left out: torch looks
    # names up through a set, so which of the two won would change from one process to the next.
    stand_ins = _stand_ins()
    covered = {name for _, name in stand_ins}
    allowed = [*(g for g in safe_globals if _global_name(g) not in covered), *stand_ins]
    created: list = []
    token = _CREATED.set(created)
    try:
        with _allowing(allowed):
            obj = torch.load(source, map_location="cpu", weights_only=True,
                             mmap=mapped and isinstance(source, (str, os.PathLike)))
        if created:
            obj = _resolve(obj, {})
    except CkptkitError as exc:
        raise type(exc)(f"{what}: {exc}") from exc
    except pickle.UnpicklingError as exc:
        raise _unpickling_failure(exc, what) from exc
    except (OSError, MemoryError):
        raise
    except RecursionError as exc:
        raise CorruptCheckpointError(f"{what} nests objects too deeply to load") from exc
    except Exception as exc:  # zip errors, truncation, records that do not fit together
        if out_of_memory(exc):
            # This machine's lack, not the file's damage: a restore that took it for damage went
            # back to an older step, which it restored once memory freed up.
            raise MemoryError(f"this machine ran out of memory loading {what} ({str(exc).splitlines()[0]}): "
                              "the file is not known to be damaged, and nothing of it was applied. Free memory, or "
                              "load it where there is more, and try again") from exc
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CorruptCheckpointError(f"{what} is not a readable checkpoint file "
                                     f"({type(exc).__name__}{': ' + detail if detail else ''})") from exc
    finally:
        _CREATED.reset(token)
    refuse_inflated(obj, what)
    return obj


# torch's own words for an allocation or a mapping of the file that this machine refused.
_OUT_OF_MEMORY = re.compile(r"DefaultCPUAllocator: (can't allocate|not enough) memory"
                            r"|unable to mmap \d+ bytes from file <.*>: Cannot allocate memory \(12\)")


def out_of_memory(exc: BaseException) -> bool:
    """Whether torch's error ``exc`` says this machine ran out of memory (an allocation, or a
    mapping of the file), not that the file is damaged. Errors that quote the file's record
    names (which its pickle chooses) are never taken for it."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and "PytorchStreamReader" not in text and bool(_OUT_OF_MEMORY.search(text))


# How much more memory than they store the tensors of one file may take once copied densely
# (cast, or loaded into an optimizer): expanded views (stride 0) of a few bytes can claim any
# number of elements.
_INFLATION_FLOOR = 64 * 2**20


def inflation(obj: Any, where: str = "") -> tuple[int, int, str | None]:
    """The bytes that the tensors in ``obj`` store, the bytes more that copying every tensor
    densely takes than that (expanded views, many views of one storage), and where the view that
    adds most lies (``[key][key]``), or None."""
    stored, dense, worst, worst_at = 0, 0, 0, None
    seen: set[int] = set()
    storages: set[tuple[Any, int]] = set()
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, torch.Tensor):
            # What a tensor carries in its __dict__ loads with it (torch rebuilds it).
            stack.extend((v, f"{path}.{k}") for k, v in getattr(value, "__dict__", {}).items())
            parts = _components(value)
            if parts:  # sparse: measured by the plain tensors it is made of
                stack.extend((t, f"{path}.{n}") for n, t in parts)
                continue
            try:
                storage = value.untyped_storage()
                nbytes, key = storage.nbytes(), (value.device, storage.data_ptr())
            except (RuntimeError, NotImplementedError):  # quantized and the like: no plain storage
                continue
            if key not in storages:
                storages.add(key)
                stored += nbytes
            size = value.numel() * value.element_size()
            dense += size
            if size - nbytes > worst:
                worst, worst_at = size - nbytes, path
            continue
        if type(value) in _ATOMS or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack.extend((v, f"{path}[{k!r:.60}]") for k, v in value.items())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
        elif hasattr(value, "__dict__"):
            stack.extend((v, f"{path}.{k}") for k, v in vars(value).items())
    return stored, max(dense - stored, 0), worst_at


def _components(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The plain tensors a sparse tensor is made of (indices and values), each of which may be an
    expanded view; none for a strided one."""
    layout = t.layout
    if layout == torch.strided:
        return []
    if layout == torch.sparse_coo:
        return [("indices", t._indices()), ("values", t._values())]
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return [("crow_indices", t.crow_indices()), ("col_indices", t.col_indices()), ("values", t.values())]
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return [("ccol_indices", t.ccol_indices()), ("row_indices", t.row_indices()), ("values", t.values())]
    return []


def refuse_inflated(obj: Any, what: str) -> None:
    """Raise ``UnsafeCheckpointError`` naming ``what`` where ``inflation_problem`` finds one: for
    one file's content (``load``), and again for what was loaded from several files or items
    together (a split state, a sharded one's small items), each within its own allowance."""
    inflated = inflation_problem(obj)
    if inflated is not None:
        raise UnsafeCheckpointError(f"{what}: {inflated}. A few bytes of such a file can fill the memory of the "
                                    "process that casts it or loads it into an optimizer, so it was refused")


def inflation_problem(obj: Any, where: str = "") -> str | None:
    """Why the tensors in ``obj`` would take too much more memory copied densely than they store
    (more than the stored bytes and 64 MiB), naming the view that adds most (under ``where``);
    None when not. Tied weights (two names for one tensor) add no more than what is stored."""
    stored, extra, worst_at = inflation(obj, where)
    if extra <= max(stored, _INFLATION_FLOOR):
        return None
    return (f"its tensors store {stored / 2**20:.1f} MiB and copied densely take {extra / 2**20:.1f} MiB more: "
            f"expanded views (stride 0), or many views of one storage, claim far more than they hold"
            f"{f', most of all {worst_at}' if worst_at else ''}")


def densified(obj: Any) -> Any:
    """``obj`` with every tensor that claims more than its storage holds (an expanded view) copied
    densely, in new dicts, lists and tuples where one holds such a tensor; ``obj`` itself otherwise."""
    if isinstance(obj, torch.Tensor):
        try:
            return obj.contiguous() if obj.numel() * obj.element_size() > obj.untyped_storage().nbytes() else obj
        except (RuntimeError, NotImplementedError):
            return obj
    if type(obj) in (dict, collections.OrderedDict):
        items = {k: densified(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        out = type(obj)(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) in (list, tuple):
        values = [densified(v) for v in obj]
        return obj if all(a is b for a, b in zip(values, obj)) else type(obj)(values)
    return obj


def refuse_compressed(source: str | os.PathLike | BinaryIO, what: str) -> None:
    """Refuse a file with a compressed record before torch reads it. torch.save stores every
    record as it is; a compressed one is someone else's writing, and half a MiB of it unpacked
    into 512 MiB of memory. The central directory is all that is read. A zip file that Python's
    zipfile cannot read, or whose central directory is not where its end record says (where
    torch's reader would look), is refused too: what zipfile did not see, torch may unpack. A
    file not in torch's zip format is left to torch.load, which tells what it is."""
    if not isinstance(source, (str, os.PathLike)):
        if not getattr(source, "seekable", lambda: False)():
            return
        start = source.tell()
    try:
        with open(source, "rb") if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source) as f:
            if f.read(4) != b"PK\x03\x04":
                return
            f.seek(0)
            _check_stored(f, what, 0 if isinstance(source, (str, os.PathLike)) else start)
    finally:
        if not isinstance(source, (str, os.PathLike)):
            source.seek(start)


# Where a zip file's end record says its central directory is: zipfile's own reading of it, which
# ZipFile does not keep. Without it (another Python), that one check is left out.
_END_RECORD = getattr(zipfile, "_EndRecData", None)
_END_OFFSET = getattr(zipfile, "_ECD_OFFSET", None)


def _check_stored(f: BinaryIO, what: str, start: int) -> None:
    """``refuse_compressed`` of the zip file ``f``, whose first byte is at ``start``."""
    def refused(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{what} {problem}, which torch.save never writes: refused unread, as a few "
                                      "bytes of a compressed record can unpack into gigabytes")

    try:
        end = _END_RECORD(f) if _END_RECORD is not None and _END_OFFSET is not None else None
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            start_dir = archive.start_dir
    except (OSError, MemoryError):
        raise  # the storage's failure, not the file's: as load raises it
    except Exception as exc:  # noqa: BLE001 - every way zipfile fails: what it could not read is refused
        raise refused(f"is a zip file Python's zipfile cannot read ({type(exc).__name__}: {shown(str(exc))})") from exc
    if end is not None and start_dir - end[_END_OFFSET] != start:
        raise refused("has a central directory that is not where its end record says")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise refused(f"holds a compressed record ({shown(info.filename)})")


def check(path: str | os.PathLike, safe_globals: Iterable[Any] = (), name: str | None = None) -> None:
    """Raise as ``load`` would for the file at ``path``, without reading its tensors' bytes.

    The file is memory-mapped, so only its pickle is read: what a deep verify needs to tell
    that a checkpoint would load safely.
    """
    load(path, safe_globals, name=name, mapped=True)


# -- refusing at save time what load could not rebuild --------------------------------------

_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray,
                    torch.Size, torch.dtype, torch.device, torch.layout, torch.qscheme})
_MAPPINGS = frozenset({dict, collections.OrderedDict, collections.Counter})
_SEQUENCES = frozenset({list, tuple, set})


def _hint(value: Any) -> str:
    """What to store instead of ``value``."""
    if isinstance(value, datetime.datetime):
        return "a plain value, e.g. dt.timestamp() or dt.isoformat()"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a plain value, e.g. value.isoformat()"
    if isinstance(value, datetime.timedelta):
        return "a plain value, e.g. td.total_seconds()"
    if isinstance(value, random.Random):
        return "its state, rng.getstate() (rng.setstate(...) on resume), or ckptkit.RngState for the global ones"
    if isinstance(value, torch.Generator):
        return "its state, gen.get_state() (gen.set_state(...) on resume)"
    if np is not None and isinstance(value, np.random.Generator):
        return "its state, gen.bit_generator.state (assigned back on resume)"
    if np is not None and isinstance(value, np.random.RandomState):
        return "its state, rs.get_state(legacy=False) (rs.set_state(...) on resume)"
    if np is not None and isinstance(value, np.str_):
        return "a plain value, e.g. str(value)"
    if np is not None and isinstance(value, np.bytes_):
        return "a plain value, e.g. bytes(value)"
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return ("a numeric numpy array (bool, integer, float or complex), a list (array.tolist()) "
                "or a tensor (torch.from_numpy)")
    if np is not None and isinstance(value, type) and issubclass(value, (np.generic, np.dtype)):
        return "the dtype's name as a string, e.g. 'float32'"
    if isinstance(value, enum.Enum):
        return "a plain value, e.g. member.value or member.name"
    if isinstance(value, pathlib.PurePath):
        return "a plain value, e.g. str(path)"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return "a plain value that names it (a string) and look it up again on resume"
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return "a plain value, e.g. tuple(value) or value._asdict()"
    if isinstance(value, frozenset):
        return "a plain value, e.g. set(value)"
    if isinstance(value, collections.abc.Mapping):
        return "a plain dict, e.g. dict(value)"
    if callable(getattr(value, "state_dict", None)):
        return "its state, value.state_dict()"
    if hasattr(value, "__dataclass_fields__"):
        return "a plain value, e.g. dataclasses.asdict(value)"
    return "a plain value (number, string, list, dict)"


# torch's own data pipeline: objects that hold data and the way through it, never a position.
_DATA_PIPELINE = (torch.utils.data.DataLoader, torch.utils.data.Sampler, torch.utils.data.Dataset)


def _allowed_types(safe_globals: Iterable[Any]) -> frozenset:
    # An entry allowed under another name than its own (a class that moved, for old checkpoints)
    # does not let a save through: what is saved now is pickled under its own name.
    return frozenset(g[0] if isinstance(g, tuple) else g for g in safe_globals
                     if not isinstance(g, tuple) or g[1] == _global_name(g[0]))


def check_storable(obj: Any, where: str, safe_globals: Iterable[Any] = ()) -> None:
    """Raise ``UnstorableStateError`` unless ``load`` could rebuild ``obj`` after ``torch.save``.

    Walks dicts, lists, tuples and sets down to their leaves without serialising anything, so
    it costs next to nothing for large tensor dicts. ``where`` names ``obj`` in the error (e.g.
    ``"extra"``), which then gives the exact key, e.g. ``extra['clock']['started']``.
    ``safe_globals`` are types the caller allows on both save and restore.
    """
    allowed = _allowed_types(safe_globals)
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        value, path = stack.pop()
        kind = type(value)
        if kind in _PLAIN:
            continue
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            continue
        if np is not None and _numpy_storable(value):
            continue
        if _is_allowed(value, allowed):
            _refuse_nested(value, path, f"the {'class' if isinstance(value, type) else 'function'} "
                                        f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}")
            continue  # a class or function the caller trusts, stored by name
        if kind in allowed and kind not in _MAPPINGS and kind not in _SEQUENCES:
            _refuse_nested(kind, path, _type_name(value))
            # Trusted itself, but what it holds is pickled with it and must load too (a
            # datetime inside a trusted dataclass would make the checkpoint unloadable). A
            # tensor subclass is rebuilt by torch itself.
            if id(value) not in seen and not isinstance(value, torch.Tensor):
                seen.add(id(value))
                stack.extend(_rebuilt_from(value, path, allowed))
            continue
        if kind in _MAPPINGS or kind in _SEQUENCES:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if kind in _MAPPINGS:
                for key, item in value.items():
                    stack.append((key, f"{path} (the key {key!r:.60})"))
                    stack.append((item, f"{path}[{key!r}]"))
            elif kind is set:
                stack.extend((item, f"{path} (an element of the set)") for item in value)
            else:
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
            continue
        if isinstance(value, _DATA_PIPELINE):
            # Trusting the type would not help: pickled, a loader holds its dataset and no position.
            raise UnstorableStateError(
                f"{path} is {_type_name(value)}, which keeps no position in the data, so nothing was saved. "
                "Store where the epoch stands (the epoch and the batches trained on) and skip at the sampler on "
                "resume: docs/quickstart.md, 'Resuming in the middle of an epoch with torch's own DataLoader'; "
                "or use torchdata's StatefulDataLoader, whose state_dict() goes in as it is.")
        hint = _hint(value)
        raise UnstorableStateError(
            f"{path} is {_type_name(value)}, which restore could not load back safely (torch.load with "
            f"weights_only=True does not rebuild it), so nothing was saved. Store {hint} instead"
            f"{'' if hint.startswith('its state') else ', or convert it to a tensor'}; or, if you trust the type, "
            "pass it in safe_globals= to both save and restore.")


def _refuse_nested(allowed: Any, path: str, what: str) -> None:
    """Refuse ``what`` at ``path`` where the trusted class or function ``allowed`` it is, or is an
    instance of, is defined inside another (``Outer.Inner``): pickle stores it as
    ``getattr(Outer, "Inner")``, and weights-only loading refuses ``getattr``."""
    name = getattr(allowed, "__qualname__", "")
    if "." in name:
        raise UnstorableStateError(
            f"{path} is {what}, defined inside {name.rpartition('.')[0]}: pickle stores it through getattr, which "
            "restore's safe loading refuses whatever safe_globals allow, so nothing was saved. Define it at the "
            "top level of its module")


def _numpy_storable(value: Any) -> bool:
    if type(value) is np.ndarray or isinstance(value, np.generic):
        return _numeric(value.dtype)
    return isinstance(value, np.dtype) and _numeric(value)


def _global_name(entry: Any) -> str:
    """The name a safe_globals entry (an object, or an (object, name) pair) is allowed under."""
    if isinstance(entry, tuple):
        return entry[1]
    return f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', getattr(entry, '__name__', ''))}"


def _is_allowed(value: Any, allowed: frozenset) -> bool:
    """Whether ``value`` itself (a class, a function) is among the allowed globals."""
    try:
        return value in allowed
    except TypeError:  # unhashable: no global is
        return False


def _rebuilt_from(value: Any, path: str, allowed: frozenset) -> list[tuple[Any, str]]:
    """What pickle stores to rebuild ``value``, an instance of a type the caller allows: the
    arguments and state of its ``__reduce_ex__``, named under ``path``. Raises
    ``UnstorableStateError`` where it is rebuilt by a function that is not allowed."""
    try:
        reduced = value.__reduce_ex__(2)  # torch.save's protocol
    except Exception:
        return []  # torch.save raises the same, naming it
    if isinstance(reduced, str):
        return []  # a global looked up by name: the allowed type's own module
    rebuild, args, *rest = (*reduced, None, None, None)[:5]
    kind = type(value)
    # (copyreg.__newobj_ex__, keyword arguments to __new__, is written through functools.partial,
    # which weights-only loading refuses.)
    if rebuild is copyreg.__newobj__ and args and args[0] is kind:
        args = args[1:]
    elif rebuild is not kind and rebuild not in allowed:
        name = getattr(rebuild, "__qualname__", repr(rebuild))
        raise UnstorableStateError(
            f"{path} is {_type_name(value)}, which pickle rebuilds by calling {name}, and that is not in "
            "safe_globals, so restore could not load it back; nothing was saved. Pass it in safe_globals= "
            "to both save and restore too, or store plain values instead")
    found: list[tuple[Any, str]] = [(a, f"{path} (an argument that rebuilds it)") for a in args or ()]
    state, listitems, dictitems = rest[0], rest[1], rest[2]
    for part in state if type(state) is tuple else (state,):  # (__dict__, slots) or one of them
        if type(part) is dict:
            found.extend((v, f"{path}.{k}") for k, v in part.items())
        elif part is not None:
            found.append((part, f"{path} (its state)"))
    listitems, dictitems = list(listitems or ()), list(dictitems or ())
    if listitems or dictitems:
        # Weights-only loading fills only plain lists and dicts (OrderedDict among them) with items.
        raise UnstorableStateError(
            f"{path} is {_type_name(value)}, a subclass of {'list' if listitems else 'dict'} whose items "
            "restore could not put back (weights-only loading fills plain lists and dicts only), so nothing "
            f"was saved. Store a plain {'list' if listitems else 'dict'} of its items instead")
    return found


def _type_name(value: Any) -> str:
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return f"a {name} of dtype {value.dtype}"
    return f"a {name}"
