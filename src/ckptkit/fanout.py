"""The fan-out: one checkpoint handed to each backend of a role, one at a time.

A backend that fails never stops or undoes another; every failure is kept as an exception (a
``CkptkitError`` whose cause is what the backend raised) under the backend's name. The first
backend that keeps files on local disk is written first, and the others copy its verified bytes
instead of serialising the state again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import attrs
import torch
from torch.distributed.checkpoint.api import CheckpointException

from . import ranks, safeload, sharded
from .checkpoint import CheckpointRef, Payload
from .errors import BackendError, CkptkitError, CorruptCheckpointError
from .hashing import HashingWriter, algorithm_of, copy_hashed
from .manifest import FileEntry
from .roles import Role
from .routing import Router
from .storage import no_space, storage_full

log = logging.getLogger(__name__)

EXTRA_FILE = "extra.pt"


_crc32_lock = threading.Lock()
_crc32_off = 0  # torch.save calls in flight that turned torch's crc32 off
_crc32_before: bool | None = None


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """torch's per-record crc32 off while any ckptkit write is in flight, and back as it was after
    the last one: the option is process-wide, and parts of one state are saved at the same time."""
    global _crc32_off, _crc32_before
    get, set_ = (getattr(torch.serialization, n, None) for n in ("get_crc32_options", "set_crc32_options"))
    if get is None or set_ is None:
        yield
        return
    with _crc32_lock:
        if _crc32_off == 0:
            _crc32_before = get()
            set_(False)
        _crc32_off += 1
    try:
        yield
    finally:
        with _crc32_lock:
            _crc32_off -= 1
            if _crc32_off == 0:
                set_(_crc32_before)


_empty_dict_file: bytes | None = None


def _empty_dict_bytes() -> bytes:
    """What ``torch.save({})`` writes, made once per process: an empty ``extra`` is the common
    case, and torch.save's fixed work (a zip of five records) cost each save 0.07 to 0.2 ms."""
    global _empty_dict_file
    if _empty_dict_file is None:
        buf = io.BytesIO()
        with _without_crc32():
            torch.save({}, buf)
        _empty_dict_file = buf.getvalue()
    return _empty_dict_file


def torch_writer(obj: Any) -> Callable[[BinaryIO], None]:
    """A payload ``write``: ``torch.save(obj)`` streamed into the file it is given."""
    if type(obj) is dict and not obj:
        def write_empty(f: BinaryIO) -> None:
            f.write(_empty_dict_bytes())

        return write_empty

    if safeload.inflation_problem(obj) is not None:
        # Written densely, as an async save's copy is: restore refuses such a file (safeload.load).
        obj = safeload.densified(obj)

    def write(f: BinaryIO) -> None:
        watched = _WatchedFile(f)
        # The stream is checksummed as it is written; torch's own per-record crc32 would read
        # every byte a second time for nothing.
        with _without_crc32():
            try:
                torch.save(obj, watched)
            except RuntimeError:
                # A Ctrl-C that landed in a write must stay an interrupt: reported as a failing
                # backend, it would blame the storage, and with on_error="warn" training went on.
                if watched.interrupt is None:
                    raise
                raise watched.interrupt from None

    return write


class _WatchedFile:
    """The file ``torch.save`` writes into, noting a KeyboardInterrupt or SystemExit raised in one
    of its writes: torch's writer turns whatever a write raised into its own RuntimeError
    ("unexpected pos"). Only one raised there counts, not one being handled around the save (a
    handler that saves at Ctrl-C, whose storage failures must still be told)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.interrupt: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except (KeyboardInterrupt, SystemExit) as exc:
            self.interrupt = exc
            raise

    def flush(self) -> None:
        flush = getattr(self._f, "flush", None)
        if flush is not None:
            flush()


def _interrupted_shard_write(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit that this rank raised inside DCP's save, which wraps
    whatever a rank raised into its CheckpointException; not one the failure happened beside."""
    failures = getattr(exc, "failures", None)
    if not isinstance(exc, CheckpointException) or not isinstance(failures, dict):
        return None
    mine = failures.get(ranks.rank() if ranks.active() else 0)
    inner = mine[0] if isinstance(mine, tuple) else getattr(mine, "exception", mine)
    return inner if isinstance(inner, (KeyboardInterrupt, SystemExit)) else None


def _backend_failure(router: Router, name: str, hook: str, exc: Exception) -> CkptkitError:
    """``exc`` from ``hook`` of backend ``name`` as ckptkit's error; one of the plugin's own types
    also says which hook raised it and where the plugin comes from."""
    if isinstance(exc, CkptkitError):
        return exc
    failure = BackendError(name, f"{type(exc).__name__}: {exc}" if isinstance(exc, (OSError, TimeoutError)) else
                                 f"{hook}{router.origin(name)} raised {type(exc).__name__}: {exc}")
    failure.__cause__ = exc
    return failure


def store_each(router: Router, run_name: str, role: Role, payload: Payload, hook: str,
               names: Iterable[str] | None = None, stored: Iterable[CheckpointRef] = (),
               **role_kwargs: Any) -> tuple[list[CheckpointRef], dict[str, CkptkitError]]:
    """Call ``hook`` on each backend of ``role`` (or ``names``) in routing order; ``(saved, failures)``.

    ``role_kwargs`` are the hook's role-specific arguments (``step``; or ``algorithm`` and
    ``model``). Final backends also get ``stored``: where the model is already committed,
    starting from ``stored``.
    """
    saved: list[CheckpointRef] = []
    failures: dict[str, CkptkitError] = {}
    copied = any(pf.source is not None for pf in payload.files)
    order = list(router.backends(role) if names is None else names)
    for i, name in enumerate(order):
        if role is Role.FINAL:
            kwargs = dict(role_kwargs, stored=[r for r in (*stored, *saved) if holds_files(r, payload)])
        else:
            kwargs = role_kwargs
        try:
            ref = router.call(name, hook, run_name=run_name, payload=payload, **kwargs)
        except Exception as exc:
            failures[name] = _backend_failure(router, name, hook, exc)
            log.error("backend %r failed: %s", name, _strip(name, failures[name]))
            continue
        try:
            ref = router.checked_ref(name, hook, ref, payload)
        except CkptkitError as exc:
            failures[name] = exc
            log.error("backend %r failed: %s", name, _strip(name, exc))
            continue
        saved.append(ref)
        if ref.local_dir and not copied and i < len(order) - 1 and holds_files(ref, payload):
            # Later backends copy these bytes instead of serialising the state again.
            local = _stored_payload(router, name, ref, payload)
            if local is not None:
                payload, copied = local, True
        elif (role is Role.FINAL and not copied and i < len(order) - 1 and holds_files(ref, payload)
              and any(pf.expected is None for pf in payload.files)):
            # A registry after it records the checksum the store computed as it uploaded, and
            # points at that copy, rather than serialising the model once more to learn it.
            payload = _with_checksums(router, name, ref, payload)
    return saved, failures


def holds_files(ref: CheckpointRef, payload: Payload) -> bool:
    """Whether ``ref`` may hold the payload's own files; a ref whose ``sizes`` names other files
    (a final backend that stored a converted model) does not."""
    return ref.sizes is None or all(pf.name in ref.sizes for pf in payload.files)


def _stored_payload(router: Router, name: str, ref: CheckpointRef, payload: Payload) -> Payload | None:
    """``payload`` read from the files ``ref`` committed on local disk, or None where that backend
    cannot show them (no ``read_manifest``, or a manifest or files that lack them): the backend
    has stored its copy all the same, and the later ones serialise the state themselves."""
    if not router.implements(name, "read_manifest"):
        return None
    try:
        local = payload.from_stored(ref.local_dir, router.call(name, "read_manifest", ref=ref))
        if all(os.path.getsize(pf.source) == pf.expected.size for pf in local.files):
            return local
        why = "its files differ in size from its manifest"
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
    log.warning("backend %r: the copy at %s cannot be read back (%s); the other backends write their own",
                name, ref.uri, why)
    return None


def _with_checksums(router: Router, name: str, ref: CheckpointRef, payload: Payload) -> Payload:
    """``payload`` with the size and checksum of each file as the manifest of ``ref`` (a copy
    that is not on this machine's disk) lists them, where backend ``name`` can show it."""
    if not router.implements(name, "read_manifest"):
        return payload
    try:
        listed = router.call(name, "read_manifest", ref=ref).files
    except Exception as exc:  # the copy stands; a later backend computes the checksum itself
        log.info("backend %r: the manifest of %s could not be read back (%s)", name, ref.uri, exc)
        return payload
    return attrs.evolve(payload, files=tuple(
        attrs.evolve(pf, expected=listed[pf.name]) if pf.expected is None and pf.name in listed else pf
        for pf in payload.files))


def put_file(fs, folder: str, name: str, write: Callable[[BinaryIO], None]) -> FileEntry:
    """Stream one small file into ``folder`` on ``fs``, hashed on the way."""
    with fs.open(f"{folder}/{name}", "wb") as f:
        w = HashingWriter(f)
        write(w)
    return FileEntry(size=w.size, digest=w.digest())


def copy_file(source: str, fs, folder: str, name: str, expected: FileEntry) -> FileEntry:
    """Copy a committed local file into ``folder`` on ``fs``, checking it against ``expected``."""
    with open(source, "rb") as src, fs.open(f"{folder}/{name}", "wb") as dst:
        size, digest = copy_hashed(src, dst, algorithm_of(expected.digest))
    entry = FileEntry(size=size, digest=digest)
    if entry != expected:
        raise CorruptCheckpointError(f"{source} changed while it was copied")
    return entry


def first_line(exc: BaseException) -> str:
    """One line saying why ``exc`` happened; for DCP's wrapper, each rank's own reason."""
    failures = getattr(exc, "failures", None)
    if isinstance(exc, CheckpointException) and failures:
        # Each rank's failure is an (exception, traceback frames) pair, or an object holding one.
        inner = (f[0] if isinstance(f, tuple) else getattr(f, "exception", f) for f in failures.values())
        return "; ".join(f"{type(e).__name__}: {first_line(e)}" for e in inner)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if isinstance(exc, CheckpointException) and lines else (lines[0] if lines else "")


def save_sharded(router: Router, run_name: str, payload: Payload, state: dict[str, Any],
                 extra: dict[str, Any], rank_files: dict[str, Callable[[BinaryIO], None]] | None,
                 coll: ranks.Collectives) -> tuple[list[CheckpointRef], dict[str, CkptkitError]]:
    """Every rank writes its shards into each resume backend; rank 0 commits each one (collective).

    The first backend that keeps files on local disk gets the shards from DCP; the others
    get each rank's own files copied from there, so nothing is serialised twice. Rank 0 also
    writes ``extra``; ``rank_files`` are further files this rank writes beside its shards.
    """
    saved: list[CheckpointRef] = []
    failures: dict[str, CkptkitError] = {}
    source: str | None = None
    mine: dict[str, FileEntry] = {}
    for name in router.backends(Role.RESUME):
        backend = router.instances[name]
        at = f"save step {payload.step}: {name}"
        status, path = coll.on_rank0(f"{at}: stage", router.call, name, "stage_sharded", run_name=run_name,
                                     step=payload.step)
        if status == "error":
            failures[name] = _backend_failure(router, name, "stage_sharded", path)
            continue
        report: tuple[str, Any] = ("ok", {})
        if source is None:
            try:
                target = sharded.writer(backend.fs, path, sync=bool(getattr(backend, "keeps_files_locally", False)))
            except Exception as exc:
                report = ("error", _on_this_rank(exc))
            # DCP's collectives run on ckptkit's group: every rank enters them, or none does.
            reports = coll.all_gather(f"{at}: ready", report)
        if report[0] == "ok" and (source is not None or all(r[0] == "ok" for r in reports)):
            try:
                if source is None:
                    written = sharded.save(state, target, process_group=coll.group)
                    if ranks.rank() == 0:
                        written[EXTRA_FILE] = put_file(backend.fs, path, EXTRA_FILE, torch_writer(extra))
                    for fname, write in (rank_files or {}).items():
                        written[fname] = put_file(backend.fs, path, fname, write)
                else:
                    written = {n: copy_file(os.path.join(source, n), backend.fs, path, n, e) for n, e in mine.items()}
                report = ("ok", written)
            except (Exception, CheckpointException) as exc:  # DCP's own error is a BaseException
                interrupt = _interrupted_shard_write(exc)
                if interrupt is not None:  # a Ctrl-C, not a failing backend (see torch_writer)
                    raise interrupt from None
                report = ("full" if no_space(exc) is not None else "error", _on_this_rank(exc))
            reports = coll.all_gather(f"{at}: written", report)
        errors = [r[1] for r in reports if r[0] != "ok"]
        if errors:
            coll.on_rank0(f"{at}: discard", router.call, name, "discard_sharded", path=path)
            failures[name] = (storage_full(name, getattr(backend, "location", name),
                                           f"step {payload.step} of run {run_name!r}", "; ".join(errors))
                              if any(r[0] == "full" for r in reports) else BackendError(name, "; ".join(errors)))
            continue
        files = {n: e for r in reports for n, e in r[1].items()}
        status, ref = coll.on_rank0(f"{at}: commit", router.call, name, "commit_sharded", run_name=run_name,
                                     step=payload.step, path=path, payload=payload, files=files)
        if status == "ok":
            try:
                ref = router.checked_ref(name, "commit_sharded", ref, payload)
            except CkptkitError as exc:
                status, ref = "error", exc
        if status == "error":
            coll.on_rank0(f"{at}: discard", router.call, name, "discard_sharded", path=path)
            failures[name] = _backend_failure(router, name, "commit_sharded", ref)
            continue
        saved.append(ref)
        if source is None and ref.local_dir:
            source, mine = ref.local_dir, report[1]
    return saved, failures


def _on_this_rank(exc: BaseException) -> str:
    return f"rank {ranks.rank()}: {type(exc).__name__}: {first_line(exc)}"


def describe_failures(failures: dict[str, Exception]) -> str:
    return "; ".join(f"{n}: {_strip(n, e)}" for n, e in failures.items())


def _strip(name: str, exc: Exception) -> str:
    """The failure's text without a repeated ``backend 'name':`` prefix."""
    if isinstance(exc, BackendError) and exc.backend == name:
        return exc.detail
    return str(exc)

