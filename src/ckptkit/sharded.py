"""Sharded checkpoints: every rank writes its own shards with torch.distributed.checkpoint.

DCP does the planning, resharding and collective coordination. What ckptkit adds is a DCP
file system over the backend's own fsspec filesystem that hashes every file while it is
written (so the manifest gets checksums without reading anything back), and a read path that
runs nothing stored in the checkpoint: ``.metadata`` is unpickled with an exact allowlist of
DCP's metadata classes, and every non-tensor ("bytes") item goes through ``safeload.load``
(weights-only) instead of DCP's ``torch.load(weights_only=False)``. Tensors DCP itself loads
with ``weights_only=True``. Before DCP reads an item, what would make that read costly or wrong is
refused: a compressed record in it, a transform, a byte range past its file, and chunks that do
not cover their tensor exactly.
"""

from __future__ import annotations

import bisect
import errno
import io
import itertools
import math
import os
import pickle
import posixpath
import re
import types
from contextlib import contextmanager
from typing import Any, Callable, Collection, Generator, Iterable, Mapping

import fsspec
import fsspec.utils
from fsspec.implementations.local import LocalFileSystem
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import (
    FileSystemBase,
    FileSystemReader,
    FileSystemWriter,
    _StorageInfo,
)
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.utils import _create_file_view

from . import safeload
from .errors import CkptkitError, CorruptCheckpointError, UnsafeCheckpointError
from .hashing import HashingWriter
from .manifest import FileEntry

METADATA_FILE = ".metadata"


class _TellingWriter(HashingWriter):
    """DCP records each item's offset with ``tell()``; files are written front to back."""

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        """DCP closes its stream itself; the file system finishes the file after that."""


def _abandon(raw: Any) -> None:
    """Give up a file being written without publishing it where the filesystem allows that."""
    try:
        raw.discard()
    except (AttributeError, RuntimeError):
        raw.close()


class HashingFileSystem(FileSystemBase):
    """A DCP file system over an fsspec filesystem that records the size and digest of each file written."""

    def __init__(self, fs: fsspec.AbstractFileSystem, sync: bool = False):
        self.fs = fs
        self.sync = sync
        self.written: dict[str, FileEntry] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        if "w" not in mode:
            with self.fs.open(path, mode) as raw:
                yield raw
            return
        raw = self.fs.open(path, mode)
        try:
            writer = _TellingWriter(raw)
            yield writer
            writer.flush()
            if self.sync:
                fileno = getattr(raw, "fileno", None)
                try:
                    os.fsync(fileno())
                except (TypeError, AttributeError, OSError, io.UnsupportedOperation):
                    pass
        except BaseException:
            _abandon(raw)
            raise
        raw.close()
        self.written[posixpath.basename(path)] = FileEntry(size=writer.size, digest=writer.digest())

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return posixpath.join(os.fspath(path), suffix)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.fs.mv(os.fspath(path), os.fspath(new_path))
        old, new = posixpath.basename(os.fspath(path)), posixpath.basename(os.fspath(new_path))
        if old in self.written:
            self.written[new] = self.written.pop(old)

    def init_path(self, path: str | os.PathLike) -> str:
        return os.fspath(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        self.fs.makedirs(os.fspath(path), exist_ok=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return self.fs.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.fs.rm(os.fspath(path))


# DCP's metadata is a pickle. These are all the names that the metadata of model and optimizer
# state (plain, DDP or FSDP2; Adam, AdamW, SGD; with an LR scheduler's state) asks for, found by
# recording what unpickling real checkpoints looks up, plus every torch dtype by its name.
_METADATA_NAMES: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.metadata", cls.__name__): cls
    for cls in (Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata,
                TensorProperties, MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING)
}
_METADATA_NAMES[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
_METADATA_NAMES[("torch", "Size")] = torch.Size
_METADATA_NAMES[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
_METADATA_NAMES.update({("torch", name): value for name, value in vars(torch).items()
                        if isinstance(value, torch.dtype)})
# The pickle's BUILD opcode may set attributes on any object it can reach, these classes and
# functions included; what it could change is checked after each load.
_MUTABLE = [v for v in _METADATA_NAMES.values() if isinstance(v, (type, types.FunctionType)) and v is not torch.Size]
# Calling the enum class gives back its one member for the value, shared by the whole process:
# BUILD on it would change what every later save writes.
_MUTABLE += list(_MEM_FORMAT_ENCODING)
# A list index in ``planner_data`` above the number of items by more than this is refused:
# torch grows the list one element at a time up to it.
_INDEX_SLACK = 1024


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP metadata and nothing else: each global must be one of ``_METADATA_NAMES``.

    Looked up by exact (module, name); never imported, so a dotted protocol-4 name (an
    attribute chain such as ``os.system`` under a DCP module) cannot reach anything.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_NAMES.get((module, name))
        if found is None or "." in name:
            raise UnsafeCheckpointError(
                f"the sharded checkpoint's {METADATA_FILE} refers to {module}.{name}, which is not one of DCP's "
                "metadata types; nothing in it ran. The file is not DCP metadata or was tampered with")
        return found


def _attributes() -> list[dict[str, Any]]:
    return [dict(vars(v)) for v in _MUTABLE]


def _check_attributes(before: list[dict[str, Any]]) -> None:
    """Undo and refuse any change the pickle made to the allowed classes or functions themselves."""
    changed = []
    for value, old in zip(_MUTABLE, before):
        now = vars(value)
        if now.keys() != old.keys() or any(now[k] is not old[k] for k in old):
            changed.append(getattr(value, "__qualname__", None) or f"{type(value).__name__}.{old.get('_name_')}")
            for key in set(now) - set(old):
                delattr(value, key)
            for key, item in old.items():
                if now.get(key) is not item:
                    setattr(value, key, item)
    if changed:
        raise UnsafeCheckpointError(f"the sharded checkpoint's {METADATA_FILE} tries to change "
                                    f"{', '.join(changed)}; it was undone and nothing in it ran")


def read_metadata(stream: Any) -> Metadata:
    """DCP metadata from ``stream``, unpickled with the exact allowlist; typed errors."""
    before = _attributes()
    try:
        metadata = _MetadataUnpickler(stream).load()
    except CkptkitError:
        raise
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # truncated, or not a pickle at all
        raise CorruptCheckpointError(f"the sharded checkpoint's {METADATA_FILE} cannot be read "
                                     f"({type(exc).__name__}: {exc})") from exc
    finally:
        _check_attributes(before)
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(f"the sharded checkpoint's {METADATA_FILE} holds a "
                                     f"{type(metadata).__name__}, not DCP metadata")
    _check_planner_data(metadata)
    for info in (metadata.storage_data or {}).values():
        where = getattr(info, "relative_path", None)
        if (not isinstance(info, _StorageInfo) or not isinstance(where, str) or not where
                or "/" in where or "\\" in where or where in (".", "..")):
            raise CorruptCheckpointError(f"the sharded checkpoint's {METADATA_FILE} points at {safeload.shown(where)}, "
                                         "which is not a file of its own folder")
        if not all(type(n) is int and n >= 0 for n in (info.offset, info.length)):
            raise CorruptCheckpointError(f"the sharded checkpoint's {METADATA_FILE} places an item of {where} at "
                                         f"{safeload.shown((info.offset, info.length))}, not a byte range")
        if getattr(info, "transform_descriptors", None):
            # DCP unpacks a transformed item (zstd) whole before anything sees it: 50 KB became 2 GB.
            raise CorruptCheckpointError(f"the sharded checkpoint's {METADATA_FILE} stores an item of {where} through "
                                         f"{safeload.shown(info.transform_descriptors)}, which ckptkit never writes: "
                                         "refused unread, as a few bytes of a compressed item can unpack into "
                                         "gigabytes")
    return metadata


def _check_planner_data(metadata: Metadata) -> None:
    """``planner_data`` maps each item to its place in the nested state: keys and list indexes.
    A load rebuilds the nesting from it, so an index far beyond the items there are would make
    a list of that length (a 2 KB file asking for 10**10 elements)."""
    data = metadata.planner_data
    if data is None:
        return
    most = len(metadata.state_dict_metadata or {}) + _INDEX_SLACK
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"the sharded checkpoint's {METADATA_FILE} has planner data of type "
                                     f"{type(data).__name__}")
    for fqn, path in data.items():
        if not (isinstance(path, (tuple, list)) and path and all(
                type(k) is str or type(k) is int and 0 <= k < most for k in path)):
            raise CorruptCheckpointError(f"the sharded checkpoint's {METADATA_FILE} places {safeload.shown(fqn)} at "
                                         f"{safeload.shown(path)}, which no state it holds has")


class _SafeReader(FileSystemReader):
    """Reads ``.metadata`` with the allowlist, once: ``open_reader`` reads it before DCP asks,
    because DCP would turn a typed error into text and fall back to per-rank metadata."""

    _metadata: Metadata | None = None
    # Set once every item a load may read was checked (by ``check_records`` here or on other
    # ranks, the caller having gathered that none refused), so that a load does not check again.
    records_checked = False

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CorruptCheckpointError(f"no per-rank metadata: ckptkit writes one {METADATA_FILE}")
        if self._metadata is None:
            with self.fs.create_stream(self._get_metadata_path(), "rb") as f:
                self._metadata = read_metadata(f)
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        if not self.records_checked:
            self.check_records(item.storage_index for item in plan.items)
        return super().read_data(plan, planner)

    def check_records(self, indexes: Iterable[MetadataIndex]) -> None:
        """Refuse, before DCP reads any, an item (a ``torch.save`` file inside a shard) holding a
        compressed record: DCP loads each tensor with ``torch.load``, which unpacks a record whole
        (a 1 MB shard into 1 GB). Only the items' zip directories are read."""
        storage = self.read_metadata().storage_data
        by_file: dict[str, list[MetadataIndex]] = {}
        for index in indexes:
            by_file.setdefault(storage[index].relative_path, []).append(index)
        remote = not isinstance(self.fs.fs, LocalFileSystem)
        for name, items in sorted(by_file.items()):
            path = self.fs.concat_path(self.path, name)
            items.sort(key=lambda i: storage[i].offset)
            what = lambda index: f"the sharded checkpoint's item {safeload.shown(index.fqn)} in {name}"  # noqa: E731
            if remote:
                # From an object store, each item's first bytes and its end (where the zip
                # directory is) in one batch of ranged reads: a stream would fetch its read-ahead
                # (50 MiB for s3fs) at each seek, 5.5 GB for a 1.5 GB shard.
                for index, item in zip(items, _fetched(self.fs.fs, path, [storage[i] for i in items])):
                    safeload.refuse_compressed(item, what(index))
                continue
            with self.fs.create_stream(path, "rb") as stream:
                for index in items:
                    info = storage[index]
                    safeload.refuse_compressed(_Window(stream, info.offset, info.length), what(index))

    def share_of_items(self, rank: int, world_size: int) -> list[MetadataIndex]:
        """Rank ``rank``'s share of every item, in an order every rank computes alike, for
        ``check_records``: all shares together are every item, each checked once."""
        storage = self.read_metadata().storage_data
        ordered = sorted(storage, key=lambda i: (storage[i].relative_path, storage[i].offset))
        return ordered[rank::world_size]


class _Item(io.RawIOBase):
    """An item of a shard, ``length`` bytes, as a readable, seekable file of its own."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.pos = length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = offset + (0 if whence == os.SEEK_SET else self.pos if whence == os.SEEK_CUR else self.length)
        if pos < 0:
            raise OSError(errno.EINVAL, "seek before the start of the item")
        self.pos = pos
        return pos


class _Window(_Item):
    """Bytes ``start`` to ``start + length`` of the seekable file ``raw`` (DCP's own view of an
    item seeks from its end the wrong way)."""

    def __init__(self, raw: Any, start: int, length: int):
        super().__init__(length)
        self.raw, self.start = raw, start

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), max(0, self.length - self.pos))
        if not wanted:
            return 0
        self.raw.seek(self.start + self.pos)
        got = self.raw.readinto(memoryview(buffer)[:wanted])
        self.pos += got
        return got


# How much of an item's end is fetched at once: its zip directory and end record, behind a
# comment of at most 64 KiB (torch writes none, and a directory of a few records).
_ITEM_TAIL = 128 * 1024


def _fetched(fs: fsspec.AbstractFileSystem, path: str, infos: list[_StorageInfo]) -> list[_Fetched]:
    """Each item of file ``path`` (``infos``) as a ``_Fetched`` holding its first bytes and its
    end, fetched in one call (concurrently, where ``fs`` is asynchronous). Ranges less than
    ``_ITEM_TAIL`` apart are fetched as one: small items, a request for many at once."""
    starts, ends = [], []
    for info in infos:
        starts += [info.offset, max(info.offset, info.offset + info.length - _ITEM_TAIL)]
        ends += [min(info.offset + 4, info.offset + info.length), info.offset + info.length]
    _, block_starts, block_ends = fsspec.utils.merge_offset_ranges([path] * len(starts), starts, ends,
                                                                   max_gap=_ITEM_TAIL)
    blocks = fs.cat_ranges([path] * len(block_starts), block_starts, block_ends, on_error="raise")

    def piece(start: int, end: int) -> bytes:
        i = bisect.bisect_right(block_starts, start) - 1
        return blocks[i][start - block_starts[i]:end - block_starts[i]]

    return [_Fetched(fs, path, info.offset, info.length,
                     {0: piece(starts[2 * i], ends[2 * i]),
                      starts[2 * i + 1] - info.offset: piece(starts[2 * i + 1], ends[2 * i + 1])})
            for i, info in enumerate(infos)]


class _Fetched(_Item):
    """An item of a remote file, read from the ``pieces`` (offset in the item to bytes) fetched
    already; a read elsewhere fetches what it asks for."""

    def __init__(self, fs: Any, path: str, start: int, length: int, pieces: dict[int, bytes]):
        super().__init__(length)
        self.fs, self.path, self.start, self.pieces = fs, path, start, pieces

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), max(0, self.length - self.pos))
        if not wanted:
            return 0
        for at, piece in self.pieces.items():
            if at <= self.pos < at + len(piece):
                got = piece[self.pos - at:self.pos - at + wanted]
                break
        else:
            got = self.fs.cat_file(self.path, self.start + self.pos, self.start + self.pos + wanted)
            self.pieces[self.pos] = got
        memoryview(buffer)[:len(got)] = got
        self.pos += len(got)
        return len(got)


class _SafeBytes:
    """Load planner part: DCP's bytes items (all state but tensors) are loaded weights-only.

    Mirrors ``DefaultLoadPlanner.load_bytes`` of torch 2.13, which uses
    ``torch.load(weights_only=False)``.
    """

    safe_globals: tuple = ()

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = safeload.load(value, self.safe_globals, name=f"the sharded checkpoint's item {safeload.shown(fqn)}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """DCP's default load planner, loading bytes items weights-only."""

    def __init__(self, safe_globals: Iterable[Any] = (), **kwargs: Any):
        super().__init__(**kwargs)
        self.safe_globals = tuple(safe_globals)


class SafeEmptyLoadPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that rebuilds the whole state from the metadata, loading bytes items weights-only."""

    def __init__(self, safe_globals: Iterable[Any] = (), **kwargs: Any):
        super().__init__(**kwargs)
        self.safe_globals = tuple(safe_globals)


def _typed(exc: CheckpointException, path: str) -> BaseException:
    """The typed ckptkit error behind DCP's CheckpointException (which carries every rank's), if any,
    naming the checkpoint."""
    failures = [f[0] if isinstance(f, tuple) else f for f in (exc.failures or {}).values()]
    ours = [f for f in failures if isinstance(f, CkptkitError)]
    if not ours:
        return exc
    # An unsafe file is never skipped, so it is the one to report.
    ours.sort(key=lambda f: not isinstance(f, UnsafeCheckpointError))
    typed = type(ours[0])(f"{path}: {ours[0]}")
    typed.__cause__ = ours[0]
    return typed


def writer(fs: fsspec.AbstractFileSystem, path: str, sync: bool) -> tuple[FileSystemWriter, HashingFileSystem]:
    w = FileSystemWriter(path, sync_files=False, overwrite=True)
    hfs = HashingFileSystem(fs, sync=sync)
    w.fs = hfs
    w.path = hfs.init_path(path)
    return w, hfs


def reader(fs: fsspec.AbstractFileSystem, path: str) -> _SafeReader:
    r = _SafeReader(path)
    r.fs = HashingFileSystem(fs)
    r.path = r.fs.init_path(path)
    return r


def open_reader(fs: fsspec.AbstractFileSystem, path: str, name: str | None = None,
                listed: Collection[str] | None = None) -> _SafeReader:
    """A reader whose metadata has been read and checked; typed errors naming ``name`` (default ``path``).

    ``listed``: the files the checkpoint's manifest lists. ``.metadata`` must be one, and so must
    every file it points at: a file the manifest does not list was never verified, and DCP would
    read it as it is. Checked before anything but ``.metadata`` is read.
    """
    if listed is not None and METADATA_FILE not in listed:
        raise CorruptCheckpointError(f"{name or path}: its manifest does not list {METADATA_FILE}")
    r = reader(fs, path)
    try:
        metadata = r.read_metadata()
    except CkptkitError as exc:
        raise type(exc)(f"{name or path}: {exc}") from exc
    if listed is not None:
        unlisted = sorted({info.relative_path for info in metadata.storage_data.values()} - set(listed))
        if unlisted:
            raise CorruptCheckpointError(f"{name or path}: {METADATA_FILE} points at {', '.join(unlisted[:5])}, "
                                         "which its manifest does not list; nothing of it was read")
        if isinstance(listed, Mapping):
            _check_sizes(metadata, listed, name or path)
    return r


def _check_sizes(metadata: Metadata, listed: Mapping[str, Any], name: str) -> None:
    """Every tensor the metadata declares is as large as its chunks, and all of them together no
    larger than the checkpoint's files (``listed``: name to ``FileEntry``). A load of the whole
    state (export, publish) makes each declared tensor before it reads a chunk: a 2 KB
    ``.metadata`` declaring one tensor of 10**9 elements and no chunks made a 4 GB file."""
    stored = sum(e.size for e in listed.values() if isinstance(getattr(e, "size", None), int))
    tensors = {fqn: md for fqn, md in (metadata.state_dict_metadata or {}).items()
               if isinstance(md, TensorStorageMetadata)}
    # The checks that cost a pass over the chunks first, for every tensor; the tiling after them.
    declared = 0
    for fqn, md in tensors.items():
        size = tuple(md.size)
        chunks = [tuple(c.sizes) for c in md.chunks]
        if not all(type(n) is int and n >= 0 for n in [*size, *(n for c in chunks for n in c)]):
            raise CorruptCheckpointError(f"{name}: {METADATA_FILE} gives {safeload.shown(fqn)} a size that is "
                                         "not a list of counts")
        numel = math.prod(size)
        covered = sum(math.prod(c) for c in chunks)
        if covered != numel:
            raise CorruptCheckpointError(f"{name}: {METADATA_FILE} declares {safeload.shown(fqn)} with {numel} "
                                         f"elements, but its chunks hold {covered}")
        dtype = getattr(md.properties, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"{name}: {METADATA_FILE} gives {safeload.shown(fqn)} no torch dtype")
        declared += numel * dtype.itemsize
    if declared > stored:
        raise CorruptCheckpointError(f"{name}: {METADATA_FILE} declares {declared} bytes of tensors, more than the "
                                     f"{stored} bytes of all its files; nothing of it was loaded")
    placed = {(index.fqn, tuple(index.offset or ())) for index in metadata.storage_data}
    unplaced = None
    for fqn, md in tensors.items():
        try:
            tiled = _tiles(tuple(md.size), [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks])
        except _Irregular as exc:
            raise CorruptCheckpointError(
                f"{name}: {METADATA_FILE} splits {safeload.shown(fqn)} into {len(md.chunks)} chunks laid out so "
                f"irregularly that checking them would cover {exc.args[0]} cells of the grid their edges make "
                f"(at most {_CELLS_PER_CHUNK} a chunk are checked; a DCP save covers one); nothing of it was loaded"
                ) from None
        if not tiled:
            # Chunks as large as the tensor that overlap leave part of it unwritten: a load of the
            # whole state (export, publish) made it with torch.empty and wrote what memory held.
            raise CorruptCheckpointError(f"{name}: {METADATA_FILE} gives {safeload.shown(fqn)} chunks that overlap "
                                         "or reach outside it, so part of it would be read twice and part never")
        chunk = next((c for c in md.chunks if math.prod(c.sizes) and (fqn, tuple(c.offsets)) not in placed), None)
        if chunk is not None and unplaced is None:
            unplaced = (fqn, list(chunk.offsets))
    if unplaced is not None:
        raise CorruptCheckpointError(f"{name}: {METADATA_FILE} gives {safeload.shown(unplaced[0])} a chunk at "
                                     f"{unplaced[1]} that no shard holds; nothing of it was loaded")
    for index, info in metadata.storage_data.items():
        entry = listed.get(info.relative_path)
        if isinstance(getattr(entry, "size", None), int) and info.offset + info.length > entry.size:
            raise CorruptCheckpointError(f"{name}: {METADATA_FILE} places {safeload.shown(index.fqn)} at bytes "
                                         f"{info.offset} to {info.offset + info.length} of {info.relative_path}, "
                                         f"which has {entry.size}")


# The most grid cells ``_tiles`` marks for a tensor, per chunk (and in all for a tensor of few
# chunks), so that the check of a whole .metadata grows with its size. A layout DCP writes (a
# tensor split along some of its dimensions, evenly or not, over the ranks of a mesh) covers one
# cell per chunk; chunks placed to cover many cells each are only a crafted .metadata's, whose
# check would otherwise grow with the square of its size (16,384 chunks of a 1.4 MB file: 103 s).
_CELLS_PER_CHUNK = 4
_MIN_CELLS = 1024


class _Irregular(Exception):
    """Chunks laid out too irregularly to check in bounded time."""


def _tiles(size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Do ``chunks`` (offsets, sizes) lie inside a tensor of ``size`` without overlapping? With
    their elements adding up to the tensor's, that is: they cover it exactly.

    The chunks' edges along each dimension cut the tensor into a grid of cells, and each chunk
    covers a block of them; no two chunks may cover the same cell. The work is the number of
    cells the chunks cover (one per chunk for DCP's layouts), plus a sort; more than
    ``_CELLS_PER_CHUNK`` a chunk (``_MIN_CELLS`` for a few chunks) raises ``_Irregular``."""
    boxes = []
    for offsets, sizes in chunks:
        if len(offsets) != len(size) or len(sizes) != len(size) or not all(
                type(o) is int and 0 <= o and o + n <= dim for o, n, dim in zip(offsets, sizes, size)):
            return False
        if all(sizes):
            boxes.append((offsets, sizes))
    if len(boxes) <= 1:
        return True
    edges = [{0, dim} for dim in size]
    for offsets, sizes in boxes:
        for d, (o, n) in enumerate(zip(offsets, sizes)):
            edges[d].update((o, o + n))
    index = [{edge: i for i, edge in enumerate(sorted(axis))} for axis in edges]
    blocks = [[range(index[d][o], index[d][o + n]) for d, (o, n) in enumerate(zip(offsets, sizes))]
              for offsets, sizes in boxes]
    covered = sum(math.prod(map(len, block)) for block in blocks)
    if covered > math.prod(len(axis) - 1 for axis in index):
        return False  # more cells covered than there are: two chunks share one
    if covered > max(_CELLS_PER_CHUNK * len(boxes), _MIN_CELLS):
        raise _Irregular(covered)
    strides = [math.prod(len(axis) - 1 for axis in index[d + 1:]) for d in range(len(index))]
    seen: set[int] = set()
    for block in blocks:
        for cell in itertools.product(*block):
            key = sum(i * stride for i, stride in zip(cell, strides))
            if key in seen:
                return False
            seen.add(key)
    return True


def items_read(state: dict[str, Any], r: _SafeReader) -> dict[MetadataIndex, str]:
    """The items of the checkpoint that ``load(state, r, ...)`` reads on this rank, each with the
    file it lies in (a name in the checkpoint's folder).

    DCP's own local plan for ``state``, made from the metadata alone: a rank reads the items its
    part of the state needs, which may lie in other ranks' files. Raises as ``load`` would for
    state that the checkpoint cannot fill (a key it does not hold).
    """
    metadata = r.read_metadata()
    planner = SafeLoadPlanner()
    planner.set_up_planner(state, metadata, is_coordinator=False)
    return {item.storage_index: metadata.storage_data[item.storage_index].relative_path
            for item in planner.create_local_plan().items}


def optimizer_state_held(r: _SafeReader) -> set[str]:
    """The names of the parameters that the checkpoint holds optimizer state for (from its
    metadata: DCP flattens ``optimizer.state.<name>.<key>``, and a name has dots of its own)."""
    prefix = "optimizer.state."
    held: set[str] = set()
    for key in r.read_metadata().state_dict_metadata:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            held.update(rest[:i] for i, c in enumerate(rest) if c == ".")
    return held


def items_under(r: _SafeReader, prefix: str) -> set[str]:
    """The names, without ``prefix``, of the items whose flattened keys start with it."""
    return {key[len(prefix):] for key in r.read_metadata().state_dict_metadata if key.startswith(prefix)}


def optimizer_groups_saved(r: _SafeReader) -> int | None:
    """How many param groups the checkpoint's optimizer has (from its metadata), or None when
    it was saved without an optimizer."""
    prefix = "optimizer.param_groups."
    keys = r.read_metadata().state_dict_metadata
    if not any(k.startswith("optimizer.") for k in keys):
        return None
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def save(state: dict[str, Any], target: tuple[FileSystemWriter, HashingFileSystem],
         process_group: Any = None) -> dict[str, FileEntry]:
    """Write this rank's shards of ``state`` through ``target`` (from ``writer``), collective on
    ``process_group`` (default: the default group); return the files this rank wrote."""
    w, hfs = target
    dcp.save(state, storage_writer=w, process_group=process_group)
    return dict(hfs.written)


def load(state: dict[str, Any], r: _SafeReader, path: str, safe_globals: Iterable[Any] = (),
         process_group: Any = None) -> None:
    """Fill ``state`` in place from a sharded checkpoint through ``r`` (from ``open_reader``),
    resharding as needed (collective on ``process_group`` if a group exists).

    Runs nothing stored in the checkpoint: raises ``UnsafeCheckpointError`` for anything that
    safe loading refuses (``safe_globals`` names further types to allow in non-tensor items),
    DCP's ``CheckpointException`` for the rest.
    """
    try:
        dcp.load(state, storage_reader=r, planner=SafeLoadPlanner(safe_globals), process_group=process_group)
    except CheckpointException as exc:
        typed = _typed(exc, path)
        if typed is exc:
            raise
        raise typed  # noqa: B904 (its cause is the rank's own error, set by _typed)


def load_full(fs: fsspec.AbstractFileSystem, path: str, listed: Collection[str],
              safe_globals: Iterable[Any] = (), name: str | None = None) -> dict[str, Any]:
    """The whole state of a sharded checkpoint in one process, as plain CPU tensors; ``listed``
    and ``name`` (what errors call it, default ``path``: a scratch copy's is no help) as for
    ``open_reader``; raises as ``load`` does."""
    name = name or path
    r = open_reader(fs, path, name=name, listed=listed)
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=r, planner=SafeEmptyLoadPlanner(safe_globals), no_dist=True)
    except CheckpointException as exc:
        typed = _typed(exc, name)
        if typed is not exc:
            raise typed  # noqa: B904 (its cause is the rank's own error, set by _typed)
        failures = [f[0] if isinstance(f, tuple) else f for f in (exc.failures or {}).values()]
        for failure in failures:
            if not isinstance(failure, Exception) or isinstance(failure, (MemoryError, OSError)):
                raise failure from exc  # an interrupt, this machine's memory or disk: not the checkpoint
        # No model to misfit here: verified files that DCP cannot read together disagree.
        detail = next((f"{type(f).__name__}: {str(f).splitlines()[0] if str(f) else ''}" for f in failures), "")
        raise CorruptCheckpointError(f"{name}: its shards do not fit its {METADATA_FILE} ({detail})") from exc
    safeload.refuse_inflated(state, name)  # each small item was within its own allowance
    return state


def check(fs: fsspec.AbstractFileSystem, path: str, listed: Collection[str], safe_globals: Iterable[Any] = ()) -> None:
    """Raise as ``load`` would, reading only ``.metadata``, the zip directories of every item and
    the non-tensor items (no tensor's bytes); ``listed`` as for ``open_reader``.

    What a deep verify needs to tell that a sharded checkpoint would load safely, at the cost
    of its small items.
    """
    r = open_reader(fs, path, listed=listed)
    try:
        _check(r, safe_globals)
    except CkptkitError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def _check(r: _SafeReader, safe_globals: Iterable[Any]) -> None:
    r.check_records(r.read_metadata().storage_data)
    _items(r, lambda fqn: True, safe_globals)


def saved_param_groups(r: _SafeReader) -> list[dict[str, Any]]:
    """The checkpoint's optimizer param groups, each as ``{"params": [parameter names]}``, read
    weights-only from their small items without DCP (no collective, no tensor read)."""
    items = _items(r, lambda fqn: _GROUP_PARAMS.fullmatch(fqn) is not None, ())
    groups = {int(_GROUP_PARAMS.fullmatch(fqn).group(1)): value for fqn, value in items.items()}
    return [{"params": list(groups[i])} for i in sorted(groups)]


_GROUP_PARAMS = re.compile(r"optimizer\.param_groups\.(\d+)\.params")


def saved_model_dtypes(r: _SafeReader) -> dict[str, torch.dtype]:
    """The dtype of each tensor in the checkpoint's model state, from its metadata."""
    return {fqn[len("model."):]: md.properties.dtype for fqn, md in r.read_metadata().state_dict_metadata.items()
            if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)}


def saved_model_names(r: _SafeReader) -> set[str]:
    """The names in the checkpoint's model state, from its metadata (nothing else is read)."""
    return {fqn[len("model."):] for fqn in r.read_metadata().state_dict_metadata if fqn.startswith("model.")}


def _items(r: _SafeReader, wanted: Callable[[str], bool], safe_globals: Iterable[Any]) -> dict[str, Any]:
    """The non-tensor items whose names ``wanted`` accepts, loaded weights-only."""
    metadata = r.read_metadata()
    by_file: dict[str, list[tuple[Any, _StorageInfo]]] = {}
    for index, info in metadata.storage_data.items():
        if wanted(index.fqn) and isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            by_file.setdefault(info.relative_path, []).append((index, info))
    out = {}
    for name, items in sorted(by_file.items()):
        with r.fs.create_stream(r.fs.concat_path(r.path, name), "rb") as stream:
            for index, info in sorted(items, key=lambda item: item[1].offset):
                raw = r.transforms.transform_load_stream(None, info.transform_descriptors or (),
                                                         _create_file_view(stream, info.offset, info.length))
                out[index.fqn] = safeload.load(io.BytesIO(raw.read()), safe_globals,
                                               name=f"the sharded checkpoint's item {index.fqn!r}")
    return out
