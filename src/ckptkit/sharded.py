"""Sharded checkpoints: every rank writes its own shards with torch.distributed.checkpoint.

DCP does the planning, resharding and collective coordination. What ckptkit adds is a DCP
file system over the backend's own fsspec filesystem that hashes every file while it is
written (so the manifest gets checksums without reading anything back) and a metadata reader
that refuses to unpickle anything but DCP's own metadata types.
"""

from __future__ import annotations

import io
import os
import pickle
import posixpath
from contextlib import contextmanager
from typing import Any, Generator

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter

from .errors import CheckpointError
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


# DCP's metadata is a pickle; only DCP's own types and these few others may appear in it.
_ALLOWED = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _ALLOWED or dtype:
            return super().find_class(module, name)
        raise CheckpointError(
            f"the sharded checkpoint's {METADATA_FILE} refers to {module}.{name}, which ckptkit does "
            "not unpickle; the file is not DCP metadata or was tampered with"
        )


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def writer(fs: fsspec.AbstractFileSystem, path: str, sync: bool) -> tuple[FileSystemWriter, HashingFileSystem]:
    w = FileSystemWriter(path, sync_files=False, overwrite=True)
    hfs = HashingFileSystem(fs, sync=sync)
    w.fs = hfs
    w.path = hfs.init_path(path)
    return w, hfs


def reader(fs: fsspec.AbstractFileSystem, path: str) -> FileSystemReader:
    r = _SafeReader(path)
    r.fs = HashingFileSystem(fs)
    r.path = r.fs.init_path(path)
    return r


def save(state: dict[str, Any], fs: fsspec.AbstractFileSystem, path: str, sync: bool) -> dict[str, FileEntry]:
    """Write this rank's shards of ``state`` (collective); return the files this rank wrote."""
    w, hfs = writer(fs, path, sync)
    dcp.save(state, storage_writer=w)
    return dict(hfs.written)


def load(state: dict[str, Any], fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Fill ``state`` in place from a sharded checkpoint, resharding as needed (collective if a group exists)."""
    dcp.load(state, storage_reader=reader(fs, path))


def load_full(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """The whole state of a sharded checkpoint in one process, as plain CPU tensors."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=reader(fs, path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state
