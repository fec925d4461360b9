"""Checkpoints as folders of files under a root on any fsspec filesystem.

``FileBackend`` implements the storage contract once for every file-like backend: a checkpoint
is the folder ``<root>/<run_name>/step-<step>/``, committed when its ``manifest.json`` is
written, which happens last. On object stores, where rename is not atomic, the manifest is the
commit; ``LocalBackend`` adds a temporary folder and an atomic rename on top. Deleting goes the
other way: the manifest first, so a half-deleted checkpoint never looks committed.
"""

from __future__ import annotations

import datetime as _dt
import posixpath
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import fsspec

from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import check_run_name
from .errors import BackendError, CheckpointError
from .hashing import HashingWriter, copy_hashed
from .hookspecs import hookimpl
from .manifest import MANIFEST_NAME, FileEntry, Manifest

STEP_PREFIX = "step-"
STEP_DIGITS = 10
FINAL_DIR = "final"
DEFAULT_GRACE_S = 3600.0


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step(dirname: str) -> int | None:
    if not dirname.startswith(STEP_PREFIX):
        return None
    digits = dirname[len(STEP_PREFIX):]
    return int(digits) if digits.isdigit() else None


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, _dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _check_file_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"file name {name!r} in a manifest points outside its checkpoint")
    return name


class FileBackend:
    """Resume checkpoints and the final model as folders of files on an fsspec filesystem.

    Subclasses provide ``from_config`` (building ``fs`` and ``root`` from the options) and may
    override the write path; the listing, reading and pruning here hold for all of them.
    """

    def __init__(self, name: str, fs: fsspec.AbstractFileSystem, root: str,
                 leftover_grace_s: float = DEFAULT_GRACE_S):
        self.name = name
        self.fs = fs
        self.root = root.rstrip("/")
        self.leftover_grace_s = leftover_grace_s
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} at {self.uri(self.root)}>"

    # -- layout ---------------------------------------------------------------------------

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def run_path(self, run_name: str) -> str:
        return posixpath.join(self.root, check_run_name(run_name))

    def _ref(self, run_name: str, step: int, path: str, role: str = "resume",
             sizes: dict[str, int] | None = None, mtime: float | None = None) -> CheckpointRef:
        return CheckpointRef(backend=self.name, run_name=run_name, step=step, path=path,
                             uri=self.uri(path), role=role, sizes=sizes, mtime=mtime)

    # -- hooks: writing -------------------------------------------------------------------

    @hookimpl
    def save_resume(self, run_name: str, step: int, payload: Payload) -> CheckpointRef:
        return self._store(run_name, step_dirname(step), payload)

    @hookimpl
    def publish_final(self, run_name: str, payload: Payload) -> CheckpointRef:
        return self._store(run_name, FINAL_DIR, payload)

    def _store(self, run_name: str, dirname: str, payload: Payload) -> CheckpointRef:
        target = posixpath.join(self.run_path(run_name), dirname)
        with self._lock:
            self._in_flight.add(target)
        try:
            manifest_path = posixpath.join(target, MANIFEST_NAME)
            # Saving a step again: un-commit the old copy before overwriting its files.
            if self.fs.exists(manifest_path):
                self.fs.rm_file(manifest_path)
            entries = {}
            for pf in payload.files:
                entries[pf.name] = self._put(pf, posixpath.join(target, _check_file_name(pf.name)))
            manifest = payload.manifest(entries)
            self.fs.pipe_file(manifest_path, manifest.to_json())
        except Exception as exc:
            self._discard(target)
            raise BackendError(self.name, f"could not store {self.uri(target)}: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._lock:
                self._in_flight.discard(target)
        self.fs.invalidate_cache(posixpath.dirname(target))
        return self._ref(run_name, payload.step, target, role=payload.role,
                         sizes={k: e.size for k, e in entries.items()})

    def _put(self, pf: PayloadFile, path: str) -> FileEntry:
        """Stream one payload file to ``path``; an aborted write publishes nothing."""
        f = self.fs.open(path, "wb")
        try:
            if pf.source is not None:
                with open(pf.source, "rb") as src:
                    size, digest = copy_hashed(src, f)
            else:
                with ThreadPoolExecutor(1) as pool:
                    writer = HashingWriter(f, pool)
                    pf.write(writer)
                    size, digest = writer.size, writer.hexdigest()
        except BaseException:
            # Closing a buffered remote file would publish what was written so far.
            discard = getattr(f, "discard", None)
            if discard is not None:
                discard()
            else:
                f.close()
            raise
        f.close()
        entry = FileEntry(size=size, sha256=digest)
        if pf.expected is not None and pf.expected != entry:
            raise CheckpointError(f"{pf.source} changed while it was copied to {self.uri(path)}")
        return entry

    def _discard(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception:
            pass  # what is left has no manifest; prune removes it after the grace period

    # -- hooks: reading -------------------------------------------------------------------

    def _listing(self, run_name: str) -> dict[str, dict[str, dict[str, Any]]]:
        """One listing of a run: folder name -> file name -> info."""
        run = self.run_path(run_name)
        self.fs.invalidate_cache(run)
        try:
            found = self.fs.find(run, maxdepth=2, withdirs=False, detail=True)
        except FileNotFoundError:
            return {}
        folders: dict[str, dict[str, dict[str, Any]]] = {}
        prefix = self.fs._strip_protocol(run).rstrip("/") + "/"
        for path, info in found.items():
            rel = self.fs._strip_protocol(path)
            if not rel.startswith(prefix):
                continue
            parts = rel[len(prefix):].split("/")
            if len(parts) == 2:
                folders.setdefault(parts[0], {})[parts[1]] = info
        return folders

    @hookimpl
    def list_checkpoints(self, run_name: str) -> list[CheckpointRef]:
        run = self.run_path(run_name)
        refs = []
        for dirname, files in self._listing(run_name).items():
            step = parse_step(dirname)
            if step is None or MANIFEST_NAME not in files:
                continue
            sizes = {n: int(i.get("size") or 0) for n, i in files.items() if n != MANIFEST_NAME}
            mtimes = [m for i in files.values() if (m := _mtime(i)) is not None]
            refs.append(self._ref(run_name, step, posixpath.join(run, dirname), sizes=sizes,
                                  mtime=max(mtimes) if mtimes else None))
        return refs

    def final_ref(self, run_name: str) -> CheckpointRef | None:
        """The committed final model of a run, if this backend holds one."""
        files = self._listing(run_name).get(FINAL_DIR)
        if not files or MANIFEST_NAME not in files:
            return None
        path = posixpath.join(self.run_path(run_name), FINAL_DIR)
        ref = self._ref(run_name, -1, path, role="final",
                        sizes={n: int(i.get("size") or 0) for n, i in files.items() if n != MANIFEST_NAME})
        return attrs.evolve(ref, step=self.read_manifest(ref).step)

    @hookimpl
    def read_manifest(self, ref: CheckpointRef) -> Manifest:
        path = posixpath.join(ref.path, MANIFEST_NAME)
        try:
            return Manifest.from_json(self.fs.cat_file(path))
        except FileNotFoundError:
            raise CheckpointError(f"{self.uri(path)} is missing: the checkpoint is not committed") from None
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.uri(path)} is not a readable manifest: {exc}") from None

    @hookimpl
    def open_file(self, ref: CheckpointRef, name: str):
        return self.fs.open(posixpath.join(ref.path, _check_file_name(name)), "rb")

    # -- hooks: pruning -------------------------------------------------------------------

    def _consistent(self, ref: CheckpointRef) -> bool:
        """Do the sizes the listing saw agree with the manifest? (No bytes are read.)"""
        try:
            manifest = self.read_manifest(ref)
        except CheckpointError:
            return False
        if ref.sizes is None:
            return True
        return all(ref.sizes.get(n) == e.size for n, e in manifest.files.items())

    def _delete(self, path: str) -> None:
        manifest = posixpath.join(path, MANIFEST_NAME)
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        self.fs.rm(path, recursive=True)

    def _leftovers(self, run_name: str) -> list[tuple[str, float | None]]:
        """Folders of a run that hold no committed checkpoint: (path, newest mtime)."""
        run = self.run_path(run_name)
        out = []
        for dirname, files in self._listing(run_name).items():
            if dirname == FINAL_DIR or (parse_step(dirname) is not None and MANIFEST_NAME in files):
                continue
            mtimes = [m for i in files.values() if (m := _mtime(i)) is not None]
            out.append((posixpath.join(run, dirname), max(mtimes) if mtimes else None))
        return out

    @hookimpl
    def prune(self, run_name: str, keep_last: int, protected_steps: frozenset[int] = frozenset(),
              dry_run: bool = False) -> list[CheckpointRef]:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        with self._lock:
            in_flight = set(self._in_flight)
        now = time.time()
        kept = 0
        doomed = []
        for ref in sorted(self.list_checkpoints(run_name), key=lambda r: r.step, reverse=True):
            if kept < keep_last and self._consistent(ref):
                kept += 1
            elif ref.step in protected_steps or ref.path in in_flight:
                continue
            elif kept >= keep_last:
                doomed.append(ref)
            elif ref.mtime is not None and now - ref.mtime > self.leftover_grace_s:
                # Committed but disagreeing with its manifest: not a checkpoint, a leftover.
                doomed.append(ref)
        for path, mtime in self._leftovers(run_name):
            if path in in_flight or (mtime is not None and now - mtime <= self.leftover_grace_s):
                continue
            doomed.append(self._ref(run_name, -1, path, role="leftover"))
        if not dry_run:
            for ref in doomed:
                try:
                    self._delete(ref.path)
                except FileNotFoundError:
                    pass
                except Exception as exc:
                    raise BackendError(self.name, f"could not delete {ref.uri}: {exc}") from exc
            self.fs.invalidate_cache(self.run_path(run_name))
        return doomed

    @hookimpl
    def probe(self) -> dict[str, Any]:
        path = posixpath.join(self.root, f".ckptkit-probe-{uuid.uuid4().hex[:12]}")
        data = b"ckptkit probe"

        def read() -> None:
            if self.fs.cat_file(path) != data:
                raise OSError("read back other bytes than were written")

        def list_root() -> None:
            self.fs.invalidate_cache(self.root)
            self.fs.ls(self.root, detail=False)

        results: dict[str, Any] = {}
        for op, action in (("write", lambda: self.fs.pipe_file(path, data)), ("list", list_root),
                           ("read", read), ("delete", lambda: self.fs.rm_file(path))):
            try:
                action()
                results[op] = "ok"
            except Exception as exc:
                results[op] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return results
