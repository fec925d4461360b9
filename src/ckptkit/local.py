"""The built-in ``local`` backend: checkpoints on this machine's disk, committed by rename."""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import fsspec

from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import check_options
from .errors import BackendError, ConfigError
from .hashing import HashingWriter, copy_hashed
from .manifest import MANIFEST_NAME, FileEntry
from .storage import DEFAULT_GRACE_S, FileBackend, _check_file_name


def local_root(path: Any, key: str) -> str:
    """An absolute root from a plain path or a ``file://`` URI, relative ones from the cwd."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigError(f"{key}: must be a local path or a file:// URI, got {path!r}")
    text = os.fspath(path)
    if text.startswith("file://"):
        rest = text[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest or not (rest.startswith(("/", ".", "~"))):
            raise ConfigError(
                f"{key}: malformed file URI {text!r}; write file:///absolute/path, "
                "file://./relative/path or a plain path"
            )
        text = rest
    elif text.startswith("file:"):
        text = text[len("file:"):]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise ConfigError(
            f"{key}: {text!r} is a {scheme}:// URI, but type local takes a local path; "
            f"use type: {scheme} for it"
        )
    return os.path.abspath(os.path.expanduser(text))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend(FileBackend):
    """Checkpoints in ``<path>/<run_name>/``.

    A checkpoint is written into a hidden temporary folder beside its final place, every file
    and the folder are fsynced, and one rename publishes it, so a crash leaves either the whole
    checkpoint or a leftover that nothing reads.
    """

    OPTIONS = ("path", "leftover_grace_s")
    keeps_files_locally = True

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> LocalBackend:
        key = f"backends.{name}"
        check_options(key, options, cls.OPTIONS, required=("path",))
        grace = options.get("leftover_grace_s", DEFAULT_GRACE_S)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
            raise ConfigError(f"{key}.leftover_grace_s: must be a number of seconds >= 0, got {grace!r}")
        root = local_root(options["path"], f"{key}.path")
        return cls(name, fsspec.filesystem("file"), root, leftover_grace_s=float(grace))

    def _ref(self, run_name, step, path, role="resume", sizes=None, mtime=None) -> CheckpointRef:
        ref = super()._ref(run_name, step, path, role=role, sizes=sizes, mtime=mtime)
        return attrs.evolve(ref, local_dir=path)

    def _store(self, run_name: str, dirname: str, payload: Payload) -> CheckpointRef:
        run = self.run_path(run_name)
        target = posixpath.join(run, dirname)
        tmp = posixpath.join(run, f".tmp-{dirname}-{uuid.uuid4().hex[:12]}")
        with self._lock:
            self._in_flight.add(tmp)
        try:
            os.makedirs(tmp)
            entries = {}
            for pf in payload.files:
                entries[pf.name] = self._write(pf, os.path.join(tmp, _check_file_name(pf.name)))
            manifest = payload.manifest(entries)
            with open(os.path.join(tmp, MANIFEST_NAME), "wb") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if os.path.exists(target):
                # Saving a step again: swap the old copy out, the new one in, then drop the old.
                trash = posixpath.join(run, f".trash-{dirname}-{uuid.uuid4().hex[:12]}")
                os.rename(target, trash)
                os.rename(tmp, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, target)
            _fsync_dir(run)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BackendError(self.name, f"could not store {target}: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._lock:
                self._in_flight.discard(tmp)
        return self._ref(run_name, payload.step, target, role=payload.role,
                         sizes={k: e.size for k, e in entries.items()})

    def _write(self, pf: PayloadFile, path: str) -> FileEntry:
        with open(path, "wb") as f:
            if pf.source is not None:
                with open(pf.source, "rb") as src:
                    size, digest = copy_hashed(src, f)
            else:
                with ThreadPoolExecutor(1) as pool:
                    writer = HashingWriter(f, pool)
                    pf.write(writer)
                    size, digest = writer.size, writer.hexdigest()
            f.flush()
            os.fsync(f.fileno())
        entry = FileEntry(size=size, sha256=digest)
        if pf.expected is not None and pf.expected != entry:
            raise OSError(f"{pf.source} changed while it was copied")
        return entry

    def _delete(self, path: str) -> None:
        manifest = os.path.join(path, MANIFEST_NAME)
        if os.path.exists(manifest):
            os.remove(manifest)
        shutil.rmtree(path)
