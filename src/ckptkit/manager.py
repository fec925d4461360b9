"""The CheckpointManager: the training loop's one entry point to ckptkit.

It orchestrates only: gathering state (``gather``), handing it to the backends (``fanout``),
writing in the background (``asyncsave``) and reading back (``reading``).
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import itertools
import logging
import numbers
import operator
import os
import re
import secrets
import shlex
import shutil
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Collection, Iterable, Iterator, Mapping

import attrs
import fsspec
import torch
from torch.distributed.checkpoint.api import CheckpointException

from . import fanout, gather, ranks, reading, safeload, sharded, split, staging
from .asyncsave import AsyncSaver, sigterm_at_build
from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import Config, ResumeRole, check_run_name
from .errors import (
    BackendError,
    CheckpointNotFoundError,
    CkptkitError,
    ConfigError,
    CorruptCheckpointError,
    FaultyAnswerError,
    IncompatibleCheckpointError,
    LocalWriteError,
    PruneError,
    PublishError,
    RanksDisagreeError,
    RunConflictError,
    SaveError,
    StorageUnavailableError,
    UnsafeCheckpointError,
    UnstorableStateError,
)
from .fanout import EXTRA_FILE, torch_writer
from .hashing import algorithm_of, copy_hashed, hash_stream
from .manifest import MANIFEST_NAME, FileEntry, Manifest, branch_of, training_of, valid_file_name
from .plugins import CkptkitPluginManager, make_plugin_manager
from .reading import SKIPPABLE, Reader
from .roles import Role
from .routing import Router
from .split import STATE_FILE  # noqa: F401  (tools and tests import it from here)
from .storage import FileBackend, no_space, written_by_ckptkit

log = logging.getLogger(__name__)

RANK_EXTRA_KEY = "rank_extra"
FINAL_FILE = "final_model.pt"
# The manifest format of a checkpoint committed by ``save_files``: a folder of files ckptkit only
# moves and verifies (a framework's own checkpoint), never loads.
FILES_FORMAT = "files"
DEFAULT_RUN_NAME = "default"


def _add_buffer_targets(state: dict[str, Any], model, opened) -> None:
    """A place in a sharded load's ``state`` for this rank's own buffers (``gather.own_buffers``):
    those it saved, and rank 0's where rank 0 saved some it did not."""
    if not state:  # this rank has a problem already, raised on all
        return
    prefix = gather.RANK_BUFFERS
    mine = sharded.items_under(opened, f"{prefix}.{ranks.rank()}.")
    first = sharded.items_under(opened, f"{prefix}.0.") - mine
    targets = {key: gather.buffer_targets(model, names) for key, names in ((str(ranks.rank()), mine), ("0", first))
               if names}
    if any(targets.values()):
        state[prefix] = targets


def _load_resume_state(model, optimizer, state: dict[str, Any], coll, held, source: str) -> None:
    """``gather.load_resume_state`` of a sharded load's ``state``, then this rank's own buffers."""
    own = gather.own_buffers_of(state.pop(gather.RANK_BUFFERS, {}), str(ranks.rank()), "0")
    gather.load_resume_state(model, optimizer, state, full=False, coll=coll, held=held, source=source)
    if own:
        gather.load_own_buffers(model, own, source)


# How many times a restore or peek lists the run again while each listing shows new steps.
_RELISTS = 8


def _tries(reader: Reader, candidates: list[CheckpointRef], unreachable: dict[str, CkptkitError],
           step: int | None, list_again: Callable[[], tuple[list[CheckpointRef], dict[str, CkptkitError]]]
           ) -> Iterator[CheckpointRef]:
    """Each of ``candidates`` in turn, for a restore or peek, then those of later listings.

    A listing is no snapshot: a training process writing the run may have committed a step after
    it and pruned those it showed, before or while they were read. So once the candidates are
    used up (none there, or none intact), the run is listed again, and the steps not tried yet
    are tried; again while each listing shows steps not tried yet (a trainer saving and pruning
    faster than a restore reads), up to ``_RELISTS`` times. ``unreachable`` is updated in place.
    Not for a given ``step``, nor once a backend could not be listed (listing again would wait
    through its retries again). It is one pass of ``reader`` (``Reader.one_pass``)."""
    with reader.one_pass():
        tried: set[tuple[str, int]] = set()
        pending = list(candidates)
        relists = _RELISTS if step is not None or unreachable else 0
        while True:
            if not pending:
                if relists >= _RELISTS:
                    return
                relists += 1
                listed, again = list_again()
                pending = [r for r in listed if (r.backend, r.step) not in tried]
                if not pending:
                    return
                unreachable.clear()
                unreachable.update(again)
                if again:
                    relists = _RELISTS
            ref = pending.pop(0)
            tried.add((ref.backend, ref.step))
            yield ref


def _require_sharded_files(ref: CheckpointRef, manifest: Manifest) -> None:
    """A sharded checkpoint's manifest lists its metadata and its ``extra.pt``: a restore reads
    both, and a file it does not list was never verified."""
    if EXTRA_FILE not in manifest.files or sharded.METADATA_FILE not in manifest.files:
        raise CorruptCheckpointError(f"{ref.uri}: its manifest lists no {sharded.METADATA_FILE} or no {EXTRA_FILE}")


_RANK_EXTRA_NAME = re.compile(r"rank_extra-(\d{5,})\.pt")


def rank_extra_file(rank: int) -> str:
    """The file of a sharded checkpoint that holds rank ``rank``'s own ``rank_extra``."""
    return f"rank_extra-{rank:05d}.pt"


@attrs.frozen
class PruneResult:
    """What a pruning by hand deleted (or would), and the damaged checkpoints it found and did not count."""

    deleted: tuple[CheckpointRef, ...]
    corrupt: tuple[tuple[CheckpointRef, CkptkitError], ...]
    keep_last: int = 1  # the keep_last it pruned to: the one given, else the config's


@attrs.frozen
class CheckpointInfo:
    """A committed checkpoint's step, epoch, metrics and shared ``extra``, and where it lies."""

    step: int
    epoch: int | None
    metrics: dict[str, float]
    extra: dict[str, Any]
    mlflow_run_id: str | None
    ref: CheckpointRef
    manifest: Manifest


@attrs.frozen
class Restored(CheckpointInfo):
    """What ``restore`` put back, and where it came from.

    ``rank_extra`` is this rank's own state as saved by the rank of the same number;
    ``ranks_without_state`` lists the ranks of this job that found none (the checkpoint was
    saved on fewer ranks, or without ``rank_extra``).
    """

    # Why each newer checkpoint was passed over: damaged, or on a backend that could not be
    # listed (which may hold newer steps than the one restored).
    skipped: tuple[str, ...] = ()
    rank_extra: dict[str, Any] = attrs.field(factory=dict)
    ranks_without_state: tuple[int, ...] = ()


def _skipped(ref: CheckpointRef, problem: BaseException) -> str:
    """Why a checkpoint was skipped, naming it once (most errors begin with its address)."""
    text = str(problem)
    return f"skipped {ref.uri}: {text.removeprefix(f'{ref.uri}: ')}"


def _closure_misfit(optimizer: torch.optim.Optimizer, fmt: str) -> str:
    where = "in format dcp" if fmt == "dcp" else "into a distributed model"
    return (f"the state of {type(optimizer).__name__}, whose step() needs a closure, cannot be restored {where}: "
            "restore loads it there through torch's distributed state dict API (DCP), which makes an "
            "optimizer's state by calling step() without a closure")


def _count(name: str, given: Any) -> int:
    """A step or epoch as a plain int, so that manifests and pickles hold no numpy or torch objects.

    numpy integers and one-element integer tensors are fine; bools, floats and negatives are not.
    """
    try:
        value = None if isinstance(given, bool) else operator.index(given)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {given!r}")
    return value


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"metric names must be non-empty strings, got {k!r}")
        try:
            value = float(v.item() if torch.is_tensor(v) else v)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            shown = (repr(v[:40]) if isinstance(v, (str, bytes)) else "None" if v is None else
                     "an integer too large for a float" if isinstance(v, int) else
                     f"a tensor of {v.numel()} elements" if torch.is_tensor(v) else f"a {type(v).__name__}")
            raise ValueError(f"metrics[{k!r}] is {shown}, not a number: a metric is a float, an int or a tensor "
                             "of one element; keep other values in extra=") from None
        out[k] = value
    return out


def _one_optimizer(optimizer: Any) -> None:
    """Refuse what is not one optimizer (a list of a GAN's two) before anything is saved or loaded."""
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer) or (
            hasattr(optimizer, "param_groups") and hasattr(optimizer, "state_dict")):
        return
    raise TypeError(f"optimizer= takes one optimizer, not a {type(optimizer).__name__}. For several (a GAN's), "
                    "pass one as optimizer= and the others in extra= (extra={'opt_d': opt_d}: their state_dict() "
                    "is saved whole, and restore gives it back to the objects passed the same way)")


def _named(objects: Any, where: str) -> Mapping[str, Any] | None:
    """``extra`` or ``rank_extra`` as given, refused unless a mapping, before anything is saved
    or loaded: restore fills the model and optimizer before these objects."""
    if objects is None or isinstance(objects, Mapping):
        return objects
    raise TypeError(f"{where} must map names to objects or values ({where}={{'scheduler': scheduler}}), "
                    f"not a {type(objects).__name__}")


def _extra_state(extra: Mapping[str, Any] | None, where: str, safe_globals: Iterable[Any] = ()) -> dict[str, Any]:
    """Extra state as stored: objects with ``state_dict()`` give their state, the rest as is.

    Refused before anything is written when restore could not load it back safely.
    """
    _named(extra, where)
    state = {}
    for key, value in (extra or {}).items():
        if not callable(getattr(value, "state_dict", None)):
            state[key] = value
            continue
        try:
            state[key] = value.state_dict()
        except Exception as exc:  # e.g. accelerate's DataLoader, stateful only when built so
            raise UnstorableStateError(
                f"{where}[{key!r}]: its state_dict() raised {type(exc).__name__}: {exc}. Pass an object whose "
                "state_dict() works (a data loader built to keep its position), or leave it out") from exc
    safeload.check_storable(state, where, safe_globals)
    inflated = safeload.inflation_problem(state, where)
    if inflated is not None:
        raise UnstorableStateError(f"{where}: {inflated}. Restore refuses such a file, so nothing was saved: store "
                                   "a dense copy of that tensor (tensor.contiguous()) instead")
    return state


def _unloadable(step: int, state: dict[str, Any], safe_globals: Iterable[Any]) -> Exception | None:
    """Why restore could not load back the gathered model and optimizer state, or None. Their
    tensors always load; what else they hold is the user's to choose (a module's
    ``get_extra_state()``, a custom optimizer's settings or per-parameter values) and is held to
    the rules ``extra`` is, before anything is written: a save that took a dataclass from a module
    committed every step, and every restore of them was refused."""
    try:
        model = state.get("model") or {}
        safeload.check_storable({k: v for k, v in model.items() if not isinstance(v, torch.Tensor)},
                                f"save step {step}: the model's state_dict()", safe_globals)
        optim = state.get("optimizer") or {}
        safeload.check_storable(optim.get("param_groups", []), f"save step {step}: the optimizer's param_groups",
                                safe_globals)
        for name, entry in (optim.get("state") or {}).items():
            values = {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)} \
                if isinstance(entry, dict) else entry
            safeload.check_storable(values, f"save step {step}: the optimizer's state[{name!r}]", safe_globals)
    except Exception as exc:  # any: a rank that raised alone would leave the others in the agreement
        return exc
    return None


def _params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Model settings as plain values a registry can record and anyone can read back."""
    out = {}
    for key, value in (params or {}).items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"params: names must be non-empty strings, got {key!r}")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"params[{key!r}]: must be a string, number, boolean or None, got "
                             f"{type(value).__name__}; put richer state in extra=")
        out[key] = value
    return out


# Values nobody expects restore to change in place: what restore gives back for them is in the result only.
_VALUES = (type(None), numbers.Number, str, bytes, tuple, frozenset, range, enum.Enum, os.PathLike,
           datetime.date, datetime.time, datetime.timedelta, torch.dtype, torch.device, torch.Size)


def _fill(targets: Mapping[str, Any] | None, saved: Mapping[str, Any], where: str, uri: str
          ) -> tuple[list[str], list[str]]:
    """Give objects with ``load_state_dict`` their saved state back, in place; return the keys
    of those the checkpoint holds no state for, and of the objects it holds state for that
    restore cannot set in place (a generator trusted through ``safe_globals``, a list)."""
    lacking, unset = [], []
    for key, target in (targets or {}).items():
        if not callable(getattr(target, "load_state_dict", None)):
            if key in saved and not isinstance(target, _VALUES) and not _numpy_value(target):
                unset.append(f"{key!r} ({type(target).__name__})")
            continue
        if key not in saved:
            lacking.append(key)
            continue
        try:
            target.load_state_dict(saved[key])
        except Exception as exc:
            # Whole, not its first line: torch's refusal names the keys on the lines after it.
            reason = " ".join(str(exc).split())
            reason = reason if len(reason) <= 800 else reason[:800] + " ..."
            compiled = ("; torch.compile's '_orig_mod.' prefix is on the keys of one side only: build the object the "
                        "same way when saving and restoring (from the compiled module, or from the plain one)"
                        if "_orig_mod." in reason else "")
            raise IncompatibleCheckpointError(
                f"{where}[{key!r}] (a {type(target).__name__}) refused the state saved in {uri}: "
                f"{type(exc).__name__}: {reason}{compiled}. The model, the optimizer and the objects "
                "before it are loaded already; restore again once it fits (it sets each of them again), or "
                "build them anew") from exc
    return lacking, unset


def _refuse_mid_step(what: str) -> None:
    """Refuse ``what`` when called from a signal handler that interrupted ``optimizer.step()``."""
    signal_name = staging.interrupted_step()
    if signal_name is not None:
        raise CkptkitError(
            f"{what} was called from a {signal_name} handler that interrupted optimizer.step(): the parameters and "
            "the optimizer's state are part updated, so nothing was saved (the checkpoints committed before stand). "
            "In the handler, set a flag and save once the step has returned (at the top of the next iteration); "
            "an async save in flight commits with ck.wait() or ck.close()")


def _numpy_value(obj: Any) -> bool:
    """A numpy scalar (``np.float32(0.5)``, ``np.bool_``): a value, as a Python number is."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.generic)


def _fill_warning(unset: list[str], argument: str, where: str, uri: str) -> str:
    """The warning for the objects ``unset`` of ``argument`` (``extra``, ``rank_extra``) that
    restore could not set in place; ``where`` begins it."""
    return (f"{where}: restore left {', '.join(unset)} as {'it was' if len(unset) == 1 else 'they were'}: "
            f"{'it has' if len(unset) == 1 else 'they have'} no load_state_dict, so the state saved in {uri} "
            f"is not put into {'it' if len(unset) == 1 else 'them'}. Take it from the result "
            f"(restored.{argument}[key]), or save an object restore sets in place (one with "
            "state_dict/load_state_dict, such as ckptkit.RngState for random generators)")


def _outside_checkpoints(out: str, backends: Iterable[Any]) -> None:
    """Refuse an output file inside a checkpoint folder (a step, final/, or a save's temporary
    folder) of any run under a backend on this machine's disk: replacing a file there damages
    that checkpoint, whose checksums no longer match."""
    target = os.path.realpath(out)
    for backend in backends:
        root = backend.local_dir(backend.root) if isinstance(backend, FileBackend) else None
        if root is None or os.path.commonpath([os.path.realpath(root), target]) != os.path.realpath(root):
            continue
        parts = os.path.relpath(target, os.path.realpath(root)).split(os.sep)
        # <root>/<run>/<checkpoint folder>/...: the run's own folder, and the root, hold no checkpoint files.
        if len(parts) > 2 and written_by_ckptkit(parts[1]):
            raise CkptkitError(f"{out} lies inside checkpoint folder {os.path.join(root, *parts[:2])}; write the "
                               "model file outside the backends' checkpoint folders")


def _write_whole(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write`` a file at ``path`` through a temporary file beside it, renamed into place once
    complete and on disk: a Ctrl-C or a full disk halfway leaves the file that was there (an
    earlier export, a good model) as it was, not cut short under its name."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        # Made as open() makes a file (0666 less the umask), or with the mode of the file it
        # replaces: an exported model is for others to read, which mkstemp's 0600 does not allow.
        while True:
            tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                break
            except FileExistsError:
                continue
    except OSError as exc:
        raise CkptkitError(f"cannot write {path}: {exc.strerror or exc} in {folder}; choose a folder you can "
                           "write to") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(OSError):  # a filesystem without modes (some FUSE, CIFS) keeps its own
                os.fchmod(f.fileno(), os.stat(path).st_mode & 0o777)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(exc, Exception) or isinstance(exc, CkptkitError):
            raise
        full = no_space(exc)
        why = f"no space left in {folder}" if full is not None else f"{type(exc).__name__}: {exc}"
        raise CkptkitError(f"could not write {path} ({why}); what was there is left as it was") from exc


def _source_files(files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """``save_files``'s input as (name in the checkpoint, path) pairs, or a ValueError saying what is wrong."""
    if isinstance(files, (str, os.PathLike)):
        folder = os.fspath(files)
        if not os.path.isdir(folder):
            raise ValueError(f"save_files: {folder} is not a folder (pass a folder or a list of files)")
        paths = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name == _FILLED:  # restore_files's own mark, not the trainer's
                continue
            if entry.is_dir():
                raise ValueError(f"save_files: {folder} holds the folder {entry.name!r}; a checkpoint is a flat "
                                 "folder of files: commit the files of that folder as their own list, or "
                                 "save without subfolders")
            paths.append(entry.path)
    else:
        paths = [os.fspath(p) for p in files]
    out: dict[str, str] = {}
    for path in paths:
        name = os.path.basename(path)
        if not os.path.isfile(path):
            raise ValueError(f"save_files: {path} is not a file")
        if name == MANIFEST_NAME:
            raise ValueError(f"save_files: {path} is named {MANIFEST_NAME}, the name of ckptkit's own manifest; "
                             "rename it")
        if not valid_file_name(name):  # what restore would refuse to read back
            raise ValueError(f"save_files: {path} has a name that a checkpoint cannot hold (a control character "
                             "or a backslash in it); rename it")
        if name in out:
            raise ValueError(f"save_files: {out[name]} and {path} share the name {name!r}")
        out[name] = path
    if not out:
        raise ValueError(f"save_files: no files to commit in {files!r}")
    return list(out.items())


# Left in a folder restore_files filled, which a later restore_files may then replace whole.
_FILLED = ".ckptkit-restored"
_FILES_ADVICE = ("restore_files copies the checkpoint's files into a new folder beside the one it fills: free space "
                 "on that disk, or give it a folder where this process may write and that has room for the checkpoint")


def _holds(folder: str, manifest: Manifest) -> bool:
    """Does ``folder`` already hold every file of ``manifest``, byte for byte?"""
    for name, entry in manifest.files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != entry.size:
            return False
    for name, entry in manifest.files.items():
        with open(os.path.join(folder, name), "rb") as f:
            if hash_stream(f, algorithm_of(entry.digest))[1] != entry.digest:
                return False
    return True


def _steps_text(steps: list[int], wanted: int, shown: int = 5) -> str:
    """The committed ``steps`` (newest first) in words: the newest few, and the nearest to ``wanted``."""
    if not steps:
        return "it holds no committed checkpoint"
    text = "committed steps, newest first: " + ", ".join(map(str, steps[:shown]))
    if len(steps) > shown:
        text += f", ... ({len(steps)} in all)"
        nearest = [s for s in (max((s for s in steps if s < wanted), default=None),
                               min((s for s in steps if s > wanted), default=None))
                   if s is not None and s not in steps[:shown]]
        if nearest:
            text += f"; nearest to {wanted}: {', '.join(map(str, sorted(nearest)))}"
    return text


def _unwrap(exc: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException, else ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(exc, CheckpointException) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) else getattr(first, "exception", first)
        if isinstance(inner, BaseException):
            return inner
    return exc


@attrs.define
class _PassedOver:
    """The checkpoints a restore's tries passed over: why (``reasons``), the backends of those the
    storage did not answer for (``silent``), and their steps (never counted toward keep_last).
    ``notes``: rank 0's warnings of them not given yet, given once no rank waits for rank 0 any
    more (``_warn_rank0``): under -W error a warning raises, and the others would wait for it."""

    reasons: list[str] = attrs.Factory(list)
    silent: list[str] = attrs.Factory(list)
    steps: set[int] = attrs.Factory(set)
    notes: list[str] = attrs.Factory(list)
    damaged: dict[str, set[int]] = attrs.Factory(dict)  # the steps found damaged, by backend

    def add(self, ref: CheckpointRef, problem: BaseException) -> None:
        reason = _skipped(ref, problem)
        self.reasons.append(reason)
        self.notes.append(reason)
        self.steps.add(ref.step)
        if isinstance(problem, StorageUnavailableError):
            self.silent.append(ref.backend)
        elif isinstance(problem, CorruptCheckpointError):
            self.damaged.setdefault(ref.backend, set()).add(ref.step)


def _warn_rank0(notes: list[str], quietly: bool = False) -> None:
    """Give rank 0 each of ``notes`` as a ``RuntimeWarning`` pointing at the caller, once: the
    list is emptied. ``quietly``, while an error is raised: a warning that the filters make an
    error (-W error) is dropped, so that the error raised is the one seen."""
    given, notes[:] = list(notes), []
    if ranks.rank() == 0:
        for note in given:
            with contextlib.suppress(Warning) if quietly else contextlib.nullcontext():
                warnings.warn(note, RuntimeWarning, stacklevel=_outside_ckptkit())


def _outside_ckptkit() -> int:
    """For ``warnings.warn`` in the caller of this: the stack level of the first frame outside
    ckptkit (the trainer's call, which save, wait and finalize reach at different depths)."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


class CheckpointManager:
    """Saves resume checkpoints when due, prunes them, restores the newest, publishes the final.

    Build it with ``from_config``. Call ``save`` every step on every rank (it only saves when
    due), ``restore`` once before training, ``finalize`` once at the end and ``close`` last.
    """

    def __init__(self, config: Config, run_name: str, pm: CkptkitPluginManager, router: Router,
                 on_error: str = "raise", fallback_dir: str | os.PathLike = "ckptkit-fallback"):
        if on_error not in ("raise", "warn"):
            raise ValueError("on_error must be 'raise' or 'warn'")
        self.config = config
        self.run_name = run_name
        self.pm = pm
        self.router = router
        self.reader = Reader(router, run_name)
        self.on_error = on_error
        self.fallback_dir = os.path.abspath(fallback_dir)
        # Resolved now: a trainer may change folder before a retry command names the file.
        self._config_file = os.path.abspath(config.source) if config.source != "<dict>" else None
        self.mlflow_run_id: str | None = None
        self._resumed_run_id: str | None = None
        # This training's own, unless restore carries on another's (rank 0's is the one written).
        self._training_id = secrets.token_hex(8)
        self._closed = False
        self._pid = os.getpid()
        self.coll = ranks.Collectives(config.distributed.timeout_s,
                                      attrs.evolve(config, run_name=run_name).fingerprint())
        self._async = AsyncSaver(self.coll)
        if config.resume is not None and config.resume.async_ and sigterm_at_build():
            self._async.guard_sigterm()  # from here, where a training on a thread of its own cannot
        # The steps that count toward keep_last when pruning after a save: those hashed while
        # this manager wrote them, the one verified when restored, and those older than it that
        # restore did not skip (once their sizes agree with their manifests, as for the ones
        # written here: nothing reads those again either). A checkpoint found damaged must not
        # push an intact one out; the older ones of earlier processes must go, or a training
        # restarted more often than every keep_last saves keeps them all.
        self._counted: set[int] = set()
        self._damaged_copies: dict[str, set[int]] = {}  # steps restore found damaged, by backend
        self._metrics: dict[int, dict[str, float]] = {}
        self._run_checked = False
        # Resume backends that could not be listed when the run was checked, and a conflict with
        # another training found on one later (rank 0; raised by every later save).
        self._unchecked: frozenset[str] = frozenset()
        self._checked_at = 0  # the step the run was checked for
        # The steps committed on each backend while some backend was unchecked: one that
        # failed on a backend down at the time is not this training's there.
        self._ours: dict[str, set[int]] = {}
        # The arguments of ``_conflict_error`` for the conflict found, on rank 0.
        self._conflict: tuple | None = None
        # The newest step this training holds as its own (committed or restored), on rank 0: a
        # newer step in the run, which the prune's listing shows, is another training's.
        self._newest_own: int | None = None
        # After restore(step=N) while the run may hold newer steps: (N, the newest step seen then,
        # or None). The next save lists the run again and is refused while steps above N remain.
        self._rolled_back: tuple[int, int | None] | None = None
        # The highest step this manager saved (or began to save) or restored, on every rank.
        self._last_step: int | None = None
        self._swept = False  # scratch folders of killed processes removed after this manager's first prune
        self._trim_due: tuple[list[CheckpointRef], int] | None = None  # _trim, for the first save
        self._behind: list[tuple[str, int, int | None, int]] = []  # _check_seen_alike, for restore's errors
        # Rank 0 prunes after each commit on a thread of its own (with the pid that started it:
        # a forked child starts its own); every later call of this manager waits for it first.
        self._pruner: tuple[int, ThreadPoolExecutor] | None = None
        self._pruning: Future | None = None
        self._pruning_lock = threading.Lock()  # an async save's writer thread starts prunes too

    @classmethod
    def from_config(cls, source: str | os.PathLike | Mapping | Config, run_name: str | None = None,
                    *, plugin_manager: CkptkitPluginManager | None = None, on_error: str = "raise",
                    fallback_dir: str | os.PathLike = "ckptkit-fallback") -> CheckpointManager:
        """Load and check a config (a YAML path, a dict or a ``Config``) and build every backend.

        Every config error is raised here, before the first training step. Under
        torch.distributed it is collective: every rank calls it, and a config or run name that
        differs between ranks raises ``RanksDisagreeError`` on all of them. ``run_name`` wins over
        the config's ``run_name``. ``on_error`` says what a failing backend does to ``save`` and
        ``finalize`` once every other backend was tried: ``raise`` or ``warn``.
        """
        config = Config.load(source)
        # An empty name (--run-name "$UNSET") is refused, not taken for "the config's".
        name = (check_run_name(run_name, "run_name") if run_name is not None
                else config.run_name or DEFAULT_RUN_NAME)
        pm = plugin_manager or make_plugin_manager()
        router = Router(pm, config)
        try:
            manager = cls(config, name, pm, router, on_error=on_error, fallback_dir=fallback_dir)
        except BaseException:
            router.close()  # a shared plugin manager keeps none of its backends
            raise
        try:
            # Ranks whose configs differ are refused here, before the first training step.
            manager.coll.start()
        except BaseException:
            try:
                router.close()
            finally:
                manager.coll.close()
            raise
        if ranks.rank() == 0:
            for line in manager.final_problems():
                log.warning("%s (finalize will refuse unless it is given what is missing)", line)
        return manager

    # -- helpers ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CkptkitError(f"the checkpoint manager of run {self.run_name!r} is closed; build a new one")
        self._settle_prune()

    @property
    def resume_role(self) -> ResumeRole:
        if self.config.resume is None:
            raise ConfigError("roles.resume: no resume backends are declared in the config")
        return self.config.resume

    def _carry_on(self, manifest: Manifest) -> None:
        """Go on as the training that committed the restored ``manifest``: its tracking run and id."""
        self._resumed_run_id = manifest.mlflow_run_id
        self._training_id = training_of(manifest)
        self.mlflow_run_id = None
        self._tracking_run_id()

    def _tracking_run_id(self) -> str | None:
        """Rank 0: the tracking run's id once a final backend knows it, else the restored one.

        Backends answer at once and look the run up in the background (the hookspec asks them
        to), so a slow or hung tracking server never holds up a save: a checkpoint written
        before the answer names no run. Asked at restore and at every save call until known.
        """
        if self.mlflow_run_id is None and self.config.final is not None and ranks.rank() == 0:
            for name in self.router.backends(Role.FINAL):  # the first answer wins
                if self.router.implements(name, "tracking_run_id"):
                    self.mlflow_run_id = self.router.call_blaming(
                        name, "tracking_run_id", run_name=self.run_name, resumed_run_id=self._resumed_run_id)
                    if self.mlflow_run_id is not None:
                        break
        return self.mlflow_run_id or self._resumed_run_id

    def tracking_run_id(self, timeout: float = 0.0) -> str | None:
        """The experiment-tracking run (MLflow's run id) that checkpoints of this run record.

        The final backends look it up in the background, starting at ``restore`` or the first
        ``save`` call (or here); until they know it, saves name no run. ``timeout`` waits up to
        that many seconds for the answer, for a trainer that logs its own metrics to the same
        run. Rank 0 only; None on other ranks, without a tracking backend, or not yet known.
        """
        deadline = time.monotonic() + timeout
        while True:
            run_id = self._tracking_run_id()
            if run_id is not None or time.monotonic() >= deadline or ranks.rank() != 0:
                return run_id
            time.sleep(0.05)

    def final_problems(self) -> list[str]:
        """What would make publishing this run's final model fail, as each final backend sees it
        from the config alone (``ckptkit check`` reports these)."""
        problems = []
        for name in self.router.backends(Role.FINAL) if self.config.final is not None else ():
            if self.router.implements(name, "check_final"):
                found = self.router.call_blaming(name, "check_final", run_name=self.run_name,
                                                 algorithm=self.config.algorithm)
                if found is not None and not (isinstance(found, (list, tuple)) and all(isinstance(line, str)
                                                                                     for line in found)):
                    # A string would be read a character to a problem.
                    raise self.router.faulty(name, "check_final", type(found).__name__, "a list of strings")
                problems += [line if line.startswith(f"backend {name!r}") else f"backend {name!r}: {line}"
                             for line in found or ()]
        return problems

    def _fail(self, exc: SaveError) -> None:
        if self.on_error == "raise":
            raise exc
        warnings.warn(str(exc), RuntimeWarning, stacklevel=_outside_ckptkit())

    # -- saving -----------------------------------------------------------------------------

    def is_due(self, step: int) -> bool:
        return self.config.resume is not None and step % self.config.resume.every_n_steps == 0

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
             extra: Mapping[str, Any] | None = None, force: bool = False,
             rank_extra: Mapping[str, Any] | None = None, safe_globals: Iterable[Any] = ()) -> list[CheckpointRef]:
        """Save a resume checkpoint if ``step`` is due (a multiple of every_n_steps), then prune.

        The prune (keep_last) runs on a thread of rank 0 once the checkpoint is committed; the
        next call of this manager that writes or reads the store waits for it (a save of a step
        that is not due does not), and a failed prune is logged as a warning (as an error where a
        backend's plugin deleted a step it was told to keep).

        Call it on every rank. Returns the references of the committed copies (on every rank),
        empty when nothing was due. A backend that fails does not stop the others; once all were
        tried, a ``SaveError`` names the failures on every rank (or a warning does, with
        ``on_error="warn"``). ``extra`` is shared state: rank 0's is saved and every rank gets it
        back. ``rank_extra`` is each rank's own (its RNG state, its data loader's position):
        every rank's mapping is saved and each rank gets its own back. State that safe loading
        could not rebuild is refused with ``UnstorableStateError`` before anything is written,
        unless its type is in ``safe_globals`` (then pass the same to ``restore``).

        The first save of a manager that did not restore from its run refuses to write into a
        run whose newest checkpoint is at or above ``step`` (``RunConflictError``): two
        trainings under one name would prune and resume each other's checkpoints; so is every
        later save. A resume backend that could not be listed then is listed again after the
        first save it commits (on the pruning thread), and if it holds newer steps it is not
        pruned and every later save is refused. After ``restore(step=N)``, every save is refused
        the same way while the run holds steps above N. A step below one this manager saved or
        restored is refused too: keep_last would prune it first and restore would pass it over.

        With ``async: true`` it returns once the state is copied to CPU buffers (reused between
        saves), and rank 0 writes and prunes in a background thread while training goes on. It
        then returns ``[]``; the next due ``save``, or ``wait``, ``restore``, ``finalize`` or
        ``close``, waits for that write and reports its outcome as above. One save is in flight
        at a time. By default (``async_copy: optimizer_state``) the optimizer's state is copied on
        that thread too (with ``background``, the parameters it trains as well), and the next
        ``optimizer.step()`` (of any optimizer) waits for the copy.
        """
        if self._closed:
            self._check_open()
        role = self.resume_role
        self._tracking_run_id()  # starts the lookup well before the first due save
        step = _count("step", step)
        epoch = None if epoch is None else _count("epoch", epoch)
        _one_optimizer(optimizer)
        if not force and not self.is_due(step):
            # Nothing to write: the prune after the last save (on a store that stopped
            # answering, minutes of retries) is waited for by the next save that writes.
            return []
        self._check_open()
        self._check_step_grows(step)
        extra_state, own_state = self._storable(step, extra, rank_extra, safe_globals, optimizer is not None)
        unloadable = gather.groups_misfit(None, optimizer) if optimizer is not None else None
        if unloadable is None and optimizer is not None and (
                role.format == "dcp" or gather.distributed(model)) and gather.needs_closure(optimizer):
            unloadable = (f"{_closure_misfit(optimizer, role.format)}. Save it with format: torch from one "
                          "process, or save the model without optimizer=")
        if unloadable is not None:  # every rank has the same groups, so every rank raises
            raise UnstorableStateError(f"save step {step}: {unloadable}")
        # Asked on this thread, never the writer's: a tracker may keep its active run per thread.
        # Only rank 0 writes the manifest, the one file that holds it.
        payload = Payload(
            run_name=self.run_name, step=step, epoch=epoch, format=role.format, files=(),
            metrics=_metrics(metrics), world_size=ranks.world_size(),
            mlflow_run_id=self._tracking_run_id() if ranks.rank() == 0 else None,
            optimizer=None if optimizer is None else gather.optimizer_class(optimizer),
            training_id=self._training_id,
        )
        previous = self._async.collect(f"save step {step}") if role.async_ else None
        with self._reported_on_failure(previous) as unreported:
            if not self._run_checked:
                self._check_run(step)
            self._trim_now()
            buffers = gather.own_buffers(model, self.coll, sharded=role.format == "dcp")
            if role.format == "dcp":
                state = gather.resume_state(model, optimizer, sharded=True)
                self.coll.agree(f"save step {step}: check model state", _unloadable(step, state, safe_globals))
                self._last_step = step
                if buffers is not None:  # under a key of its own per rank: DCP writes each rank's
                    state[gather.RANK_BUFFERS] = {str(ranks.rank()): buffers}
                own_file = {} if own_state is None else {rank_extra_file(ranks.rank()): torch_writer(own_state)}
                saved, failures = fanout.save_sharded(self.router, self.run_name, payload, state, extra_state, own_file,
                                                      self.coll)
                if saved:
                    self.coll.on_rank0(f"save step {step}: prune", self._prune_after, saved, step, payload.metrics)
                self._report(step, saved, failures)
                return saved
            state = gather.resume_state(model, optimizer)
            self.coll.agree(f"save step {step}: check model state", _unloadable(step, state, safe_globals))
            self._last_step = step
            gathered = self.coll.gather(f"save step {step}: rank_extra", (own_state, buffers))
            if gathered is not None and own_state is not None:
                state[RANK_EXTRA_KEY] = {r: extra for r, (extra, _) in enumerate(gathered)}
            if gathered is not None and any(bufs for _, bufs in gathered):
                state[gather.RANK_BUFFERS] = {r: bufs for r, (_, bufs) in enumerate(gathered) if bufs}
            if role.async_:
                if ranks.rank() == 0:
                    # Training may change the model as soon as save returns: write from a copy.
                    staged = self._async.stage({**state, "extra": extra_state}, model, optimizer,
                                               copy_always=("extra", RANK_EXTRA_KEY, gather.RANK_BUFFERS),
                                               copy=role.async_copy)
                    self._async.submit(self._store_full, payload, staged, staged.pop("extra"))
                if unreported:
                    # Reported after this step's save started, so that a failure never drops it.
                    self._report(*unreported.pop())
                return []
            status, result = self.coll.on_rank0(f"save step {step}: write", self._store_full, payload, state, extra_state)
            _, saved, failures = result if status == "ok" else (step, [], {"(all)": result})
            self._report(step, saved, failures)
            return saved

    @contextlib.contextmanager
    def _reported_on_failure(self, previous: tuple[int, list[CheckpointRef], dict[str, CkptkitError]] | None
                             ) -> Iterator[list]:
        """The outcome of the async save before this one (``previous``, collected), for the block
        to report (it pops it from the list it is given); one it has not, when the block raises,
        is logged then as an error if it failed (dropped, a failed save went unsaid), and the
        block's own exception goes on as it was (a Ctrl-C stays one)."""
        unreported = [] if previous is None else [previous]
        try:
            yield unreported
        except BaseException:
            failed = self._save_error(*unreported.pop()) if unreported else None
            if failed is not None:
                log.error("%s (the save after it failed too, with the error raised now)", failed)
            raise

    def _storable(self, step, extra, rank_extra, safe_globals,
                  with_optimizer: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``extra`` (rank 0's, the one saved) and this rank's ``rank_extra`` as stored, checked on
        every rank before anything is written; a refusal on any rank is raised on all (collective),
        as is an optimizer given on some ranks only."""
        extra_state: dict[str, Any] = {}
        own_state = None
        problem = None
        try:
            _refuse_mid_step(f"save step {step}")
            if ranks.rank() == 0 and self._conflict is not None:
                raise self._conflict_error(*self._conflict)  # a new one each time: no traceback piles up
            if ranks.rank() == 0:
                extra_state = _extra_state(extra, "extra", safe_globals)
            if rank_extra is not None:
                own_state = _extra_state(rank_extra, "rank_extra", safe_globals)
        except Exception as exc:  # a state_dict() that raises on one rank, too
            problem = exc
        self.coll.agree(f"save step {step}: check state", problem)
        # A sharded model's optimizer state is gathered collectively: one rank without it left the
        # others in torch's gather for the model's own timeout (30 minutes), not ckptkit's.
        given = self.coll.all_gather(f"save step {step}: optimizer given", with_optimizer)
        if len(set(given)) > 1:
            raise RanksDisagreeError(
                f"save step {step}: ranks {[r for r, g in enumerate(given) if g]} passed optimizer= and ranks "
                f"{[r for r, g in enumerate(given) if not g]} did not; every rank saves with the same arguments")
        return extra_state, own_state

    def _check_step_grows(self, step: int) -> None:
        """Refuse a step below the highest this manager saved or restored (every rank alike):
        keep_last keeps the highest steps, so the new checkpoint would be the first pruned, and a
        plain restore would resume the higher step, rolling back what was trained since."""
        if self._last_step is None or step >= self._last_step:
            return
        raise RunConflictError(
            f"save step {step}: this training already saved or restored step {self._last_step} of run "
            f"{self.run_name!r}, and steps must only grow: keep_last keeps the highest steps, so step {step} would "
            f"be pruned first, and a plain restore() would resume step {self._last_step}, losing what was trained "
            f"since. Pass a count that keeps growing across epochs and restarts (the global step, not the step "
            f"within an epoch). To train on from an older step, restore(step=N) it in a new process, and save "
            f"under a new run name or once the higher steps are deleted (that restore says where they lie)",
            self.run_name, self._last_step)

    def _check_run(self, step: int) -> None:
        """Refuse to write into a run that holds newer checkpoints this manager did not restore (collective)."""
        status, listing = self.coll.on_rank0(f"save step {step}: check run", self.reader.list_all)
        self._run_checked = True
        if self._rolled_back is not None:
            self._check_rolled_back(step, status, listing)
            return
        if status == "error":
            log.warning("could not check run %r for newer checkpoints: %s", self.run_name, listing)
            return
        refs, unreachable = listing
        # What these hold is unknown until they answer: each is listed again, off this thread,
        # after the first save it commits (_prune_backends).
        self._unchecked, self._checked_at, self._ours = frozenset(unreachable), step, {}
        newest = max((r.step for r in refs), default=None)
        if newest is not None and newest >= step:
            self._run_checked = False  # refused at every save, not only the first
            # Which backend listed it: a plugin that lists a step it never committed is the one to ask.
            where = sorted({r.backend for r in refs if r.step == newest})
            raise self._conflict_error(step, newest, where=where)

    def _conflict_error(self, step: int, newest: int, how: str = "old", replaced: int | None = None,
                        where: Iterable[str] = ()) -> RunConflictError:
        """``how``: "old", the run holds steps up to ``newest`` that this training did not restore
        from; "newer" and "replaced", another training writes the run at the same time, seen from
        a step above any this one saved or restored, or from this one's step ``replaced`` saved
        again by it. ``where``: the backends that listed ``newest``."""
        if how != "old":
            found = (f"holds step {newest}, newer than any step this training saved (the last, step {step}) or "
                     "restored, and not written by it" if how == "newer" else
                     f"holds step {replaced} saved again, not by this training, since this training saw it "
                     f"(found after it saved step {step})")
            return RunConflictError(
                f"run {self.run_name!r} {found}: another training is writing the same run at the same time (a "
                "job started again while the first one still runs, or one config launched twice). The two would "
                "overwrite and prune each other's checkpoints, so this one saves no more. Stop one of them; to "
                "keep both, give one another run name",
                self.run_name, newest)
        return RunConflictError(
            f"run {self.run_name!r} already holds checkpoints up to step {newest}, and this training "
            f"did not restore from it but would save step {step} there: the two trainings would prune "
            "and resume each other's checkpoints. If the training that wrote them still runs, stop it "
            "or choose a new run name. Otherwise call restore() first to continue that run, choose "
            f"a new run name, or delete the old run with: {self._command('prune', '--all')}"
            + "".join(f". Step {newest} is listed by backend {name!r}{self.router.origin(name)}" for name in where),
            self.run_name, newest)

    def _check_rolled_back(self, step: int, status: str, listing: Any) -> None:
        """After ``restore(step=N)``: refuse to save while the run holds steps above N, which keep_last
        and a plain restore would take for the newest. Refused again at every save until they are gone."""
        restored, seen = self._rolled_back
        if status == "error":
            log.warning("could not check run %r for checkpoints newer than the restored step %d: %s",
                        self.run_name, restored, listing)
            newest = seen  # what restore saw: refused on that, rather than not checked at all
        else:
            newest = max((r.step for r in listing[0]), default=None)
        if newest is None or newest <= restored:
            self._rolled_back = None
            self._newest_own = restored  # the steps above it are gone
            return
        self._run_checked = False
        raise RunConflictError(
            f"run {self.run_name!r}: step {restored} was restored, but the run holds newer checkpoints up to "
            f"step {newest}, so saving step {step} there would write behind them: keep_last prunes by step "
            f"number (the new checkpoints could be pruned at once) and a plain restore() would resume step "
            f"{newest}. To go on from step {restored}, save under a new run name (a manager built with "
            f"another run_name, after restore(step={restored}) from this one); or remove the steps above "
            f"{restored} for good: `ckptkit ls CONFIG --run-name {self.run_name}` shows where they lie, and "
            "the storage's own tools delete their step-* folders (ckptkit prune deletes only older "
            f"checkpoints, and prune --all would delete step {restored} too)",
            self.run_name, newest)

    def _store_full(self, payload: Payload, state: dict[str, Any], extra: dict[str, Any]
                    ) -> tuple[int, list[CheckpointRef], dict[str, CkptkitError]]:
        """Rank 0: write a full checkpoint to every resume backend, then prune. Never raises.

        With ``write_threads`` above 1 the state goes into that many files of about equal bytes,
        which the backends may write at the same time."""
        threads = self.resume_role.write_threads
        parts = split.split(state, threads)
        files = tuple(PayloadFile(name, write=torch_writer(part))
                      for name, part in zip(split.part_names(len(parts)), parts))
        if extra:  # a file of its own, so that peek reads no tensors; none for no extra
            files += (PayloadFile(EXTRA_FILE, write=torch_writer(extra)),)
        return self._store(attrs.evolve(payload, files=files, concurrency=min(threads, len(files))))

    def _store(self, payload: Payload) -> tuple[int, list[CheckpointRef], dict[str, CkptkitError]]:
        """Rank 0: commit ``payload`` to every resume backend, then start the prune. Never raises."""
        try:
            self._settle_prune()  # the last save's prune, which may run beside an async write's staging
            if self._conflict is not None:
                # Found by the prune after the last save: an async save, or save_files, that
                # passed the check before it was found writes nothing either.
                return payload.step, [], {"(all)": self._conflict_error(*self._conflict)}
            saved, failures = fanout.store_each(self.router, self.run_name, Role.RESUME, payload, "save_resume",
                                                step=payload.step)
            self._prune_after(saved, payload.step, payload.metrics)
            return payload.step, saved, failures
        except Exception as exc:
            failure = exc if isinstance(exc, CkptkitError) else CkptkitError(f"{type(exc).__name__}: {exc}")
            if failure is not exc:
                failure.__cause__ = exc
            return payload.step, [], {"(all)": failure}

    def _report(self, step: int, saved: list[CheckpointRef], failures: dict[str, CkptkitError]) -> None:
        failed = self._save_error(step, saved, failures)
        if failed is not None:
            self._fail(failed)

    def _save_error(self, step: int, saved: list[CheckpointRef], failures: dict[str, CkptkitError]
                    ) -> SaveError | None:
        """The ``SaveError`` of a save of ``step`` that committed ``saved`` and failed on the
        backends in ``failures``; None when none failed."""
        if failures:
            where = ", ".join(r.uri for r in saved) or "none, as far as the backends told"
            # What a store's failure leaves, and so what to do; a refused save (another
            # training's run, a plugin's bug) says so in its own words.
            answered = sorted(n for n, e in failures.items() if isinstance(e, FaultyAnswerError))
            if answered:
                # The hook ran and said what it must not: it may have committed the step.
                after = (f". What {', '.join(map(repr, answered))} stored is not known: it may hold step {step}, "
                         "which a restart would then resume; see what it holds with ckptkit ls and ckptkit verify "
                         f"--step {step}, and delete that step there if it is not whole")
            elif all(isinstance(e, BackendError) for e in failures.values()):
                changed = sorted(n for n, e in failures.items() if not e.held_as_it_was)
                held = (f"What {', '.join(map(repr, changed))} held may have changed, as its message says"
                        if changed else "What the failing backends held is as it was")
                after = (f". {held}; the next save tries every resume backend again, and a restart resumes from the "
                         "newest committed step")
            else:
                after = ""
            return SaveError(f"step {step} was not saved to every resume backend "
                             f"({fanout.describe_failures(failures)}); it is committed on: {where}{after}",
                             failures, saved)
        return None

    def wait(self) -> list[CheckpointRef]:
        """Wait for the asynchronous save in flight, if any, and the prune after the last save,
        and report how the save went.

        Call it on every rank (``save``, ``restore``, ``finalize`` and ``close`` call it). Returns
        the references of what that save committed; raises ``SaveError`` (or warns, with
        ``on_error="warn"``) on every rank if it failed. A failed prune was logged, as ``save``
        says.
        """
        if self._closed:  # close() waited for everything
            return []
        if self.config.resume is None or not self.config.resume.async_:
            self._settle_prune()
            return []
        outcome = self._async.collect("wait")
        self._settle_prune()
        if outcome is None:
            return []
        step, saved, failures = outcome
        self._report(step, saved, failures)
        return saved

    def _prune_after(self, saved: list[CheckpointRef], step: int, metrics: dict[str, float]) -> None:
        """Rank 0: prune the backends that committed ``step``, on the pruning thread.

        The commit is durable before this is called, and pruning it cannot undo it, so the
        caller goes on at once. The next call of this manager (and the next write, from any
        thread) waits for the prune first, so a prune never overlaps a save it could take
        for a leftover, nor a listing or restore; its failures are logged as it runs.
        """
        if not saved:
            return
        self._settle_prune()
        self._counted.add(step)
        self._metrics[step] = dict(metrics)
        self._newest_own = step if self._newest_own is None else max(self._newest_own, step)
        if self._unchecked:
            for ref in saved:
                self._ours.setdefault(ref.backend, set()).add(step)
        with self._pruning_lock:
            if self._pruner is None or self._pruner[0] != os.getpid():
                self._pruner = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="ckptkit-prune"))
            self._pruning = self._pruner[1].submit(self._prune_backends, list(saved), step,
                                                   frozenset(self._counted), self._newest_own)

    def _trim(self, candidates: list[CheckpointRef], manifest: Manifest) -> None:
        """Rank 0, once a restore goes on from ``manifest``'s step: note the backends where it lies
        beside more steps than keep_last (a process killed between a commit and the prune after
        it leaves one too many) or beside what a save killed on this machine left, for the first
        save to prune first (``_trim_now``), as the prune after a save would. On a disk with room
        for keep_last checkpoints and the one being written, every save failed for want of
        space, and only the prune after a save that commits removes either."""
        self._trim_due = None
        if ranks.rank() != 0 or self.config.resume is None:
            return
        held: dict[str, set[int]] = {}
        for ref in candidates:
            held.setdefault(ref.backend, set()).add(ref.step)
        keep = self.resume_role.keep_last
        due = [r for r in candidates
               if r.step == manifest.step and (len(held[r.backend]) > keep or self._killed_writes(r.backend))]
        if due:
            self._trim_due = (due, manifest.step)

    def _trim_now(self) -> None:
        """Rank 0, before the first write after a restore: the prune ``_trim`` found due, so that
        the write finds the space it frees. Not in restore itself, which changes nothing in the
        store (an evaluation job restores beside the training, with a config of its own)."""
        if self._trim_due is None:
            return
        (due, step), self._trim_due = self._trim_due, None
        self._settle_prune()
        self._prune_backends(due, step, frozenset(self._counted), self._newest_own)

    def _killed_writes(self, backend: str) -> bool:
        """Whether ``backend`` holds a folder of this run that a save killed on this machine left.
        Asked only of a backend whose names tell their writer (local disk: a listing costs no
        request, and one of an object store would hold rank 0 past restore's last meeting point)."""
        instance = self.router.instances.get(backend)
        if not (isinstance(instance, FileBackend) and instance.marks_writers):
            return False
        try:
            return instance.killed_writes(self.run_name)
        except Exception:  # noqa: BLE001 - a listing that fails now is the next prune's to report
            return False

    def _prune_backends(self, saved: list[CheckpointRef], step: int, counted: frozenset[int],
                        newest_own: int) -> None:
        gone: set[int] = set()
        for ref in saved:
            if ref.backend in self._unchecked and self._holds_another_training(ref.backend, step):
                continue  # its checkpoints are another training's: not this one's to prune
            try:
                protected = frozenset({step}) | self._best_steps(ref.backend)
                damaged = self._damaged_copies.get(ref.backend, set())
                deleted = self.router.checked_refs(ref.backend, "prune", self.router.call_blaming(
                    ref.backend, "prune", storage_errors=True, run_name=self.run_name, keep_last=self.resume_role.keep_last,
                    protected_steps=protected, dry_run=False, counted_steps=counted - damaged), self.run_name)
                damaged.difference_update(r.step for r in deleted)
                gone.update(r.step for r in deleted if r.step != step)
            except Exception as exc:
                log.warning("pruning backend %r failed: %s", ref.backend, exc)
            else:
                try:
                    self._kept_all(ref.backend, deleted, [ref])
                except BackendError as exc:  # a checkpoint a restore would take may be gone
                    log.error("pruning backend %r failed: %s", ref.backend, exc)
            self._note_another_writer(ref.backend, step, newest_own)  # from its listing, which may have worked
        # What a training of a million saves remembers stays the size of what it keeps. A step
        # forgotten while another backend still holds it counts less, so it is deleted later, not
        # sooner, and keep_best reads its metrics again from its manifest.
        self._counted -= gone
        for old in gone:
            self._metrics.pop(old, None)
        if not self._swept:
            # Once, here rather than in restore: listing the temporary folder (1 ms with 2,000
            # entries, most of it under the GIL) cost a 1 MB resume a fifth of its restore.
            self._swept = True
            try:
                reading.sweep_scratch()
            except Exception as exc:  # housekeeping: never the next save's failure
                log.warning("removing scratch folders of killed processes failed: %s", exc)

    def _note_another_writer(self, backend: str, step: int, newest_own: int) -> None:
        """After the prune of ``backend`` that followed this training's commit of ``step``: a
        newer step in the run than any this training committed or restored was written by
        another training writing the same run at the same time. Found, no later save writes
        (``_storable``, ``_store``). The prune kept this training's newest checkpoints all the
        same (only steps it committed count toward keep_last)."""
        instance = self.router.instances.get(backend)
        if not isinstance(instance, FileBackend) or self._conflict is not None:
            return
        newest, replaced = instance.pruned_listing(self.run_name)
        if newest is not None and newest > newest_own:
            self._conflict = (step, newest, "newer")
        elif replaced:
            self._conflict = (step, newest, "replaced", max(replaced))
        else:
            return
        log.error("%s (found on backend %r)", self._conflict_error(*self._conflict), backend)

    def _holds_another_training(self, backend: str, step: int) -> bool:
        """Whether ``backend``, which could not be listed when the run was checked and has just
        committed ``step``, holds steps of another training at or above the step the run was
        checked for, as the check would have found had it answered: steps this training did not
        commit (one it wrote over, at the same step, cannot be told). Found, no later save
        writes (``_storable``, ``_store``) and the backend is not pruned again."""
        if self._conflict is not None:
            return True
        try:
            listed = self.router.call(backend, "list_checkpoints", run_name=self.run_name)
            refs = self.router.checked_refs(backend, "list_checkpoints", listed, self.run_name)
        except Exception as exc:
            log.warning("could not check run %r on backend %r for newer checkpoints: %s", self.run_name, backend, exc)
            return True
        ours = self._ours.get(backend, set())
        others = [r.step for r in refs if r.step not in ours and r.step != step and r.step >= self._checked_at]
        if others:
            self._conflict = (step, max(others), "old")
            log.error("%s (found on backend %r once it answered)", self._conflict_error(*self._conflict), backend)
            return True
        self._unchecked -= {backend}
        if not self._unchecked:
            self._ours = {}
        return False

    def _settle_prune(self) -> None:
        """Wait for the prune after the last save, if it still runs."""
        pending = self._pruning
        if pending is None:
            return
        if self._pruner is not None and self._pruner[0] != os.getpid():
            self._pruning = None  # forked while the parent pruned: that thread does not run here
            return
        try:
            pending.result()  # failures were logged; anything else is a bug, raised here
        finally:
            with self._pruning_lock:
                if self._pruning is pending:
                    self._pruning = None

    def prune(self, keep_last: int | None = None, dry_run: bool = False) -> PruneResult:
        """Prune every resume backend by hand (what ``ckptkit prune`` does), verifying first.

        On each backend the checkpoints are verified newest first (every file read and checked)
        until ``keep_last`` verify; only those count toward ``keep_last``, so a run is never
        left without a checkpoint that verifies. Damaged ones are reported, not counted, and
        deleted only once older than the kept ones. ``keep_best`` checkpoints stay. An async save
        in flight is waited for first, and its outcome reported, as ``wait()`` does. A backend
        that fails is left as it is and the others are pruned all the same; then ``PruneError``
        is raised, naming each failure, with what was deleted on the others in its ``result``.
        """
        self._check_open()
        # A config of the final role alone has no resume checkpoints, only what a killed
        # finalize left in its stores (swept below).
        keep = (self.config.resume.keep_last if self.config.resume is not None else 1) if keep_last is None \
            else keep_last
        if keep < 1:
            raise ValueError("keep_last must be at least 1")
        self.wait()  # an async save in flight commits, and the prune after it ends, before this one lists
        deleted: list[CheckpointRef] = []
        corrupt: list[tuple[CheckpointRef, CkptkitError]] = []
        failures: dict[str, CkptkitError] = {}
        for name in self.router.backends(Role.RESUME):
            # Each backend alone: one that fails is left as it is and the others are still
            # pruned, whatever the order of the config's list, and what they lost is told.
            try:
                listed = self.router.call_blaming(name, "list_checkpoints", storage_errors=True,
                                                  run_name=self.run_name)
                refs = sorted(self.router.checked_refs(name, "list_checkpoints", listed, self.run_name),
                              key=lambda r: r.step, reverse=True)
                verified: set[int] = set()
                found: list[tuple[CheckpointRef, CkptkitError]] = []
                for ref in refs:
                    if len(verified) >= keep:
                        break
                    try:
                        self.reader.verify(ref)
                        verified.add(ref.step)
                    except (*SKIPPABLE, IncompatibleCheckpointError) as exc:  # a newer ckptkit's: kept too
                        found.append((ref, exc))
                protected = self.best_steps(name)
                pruned = self.router.checked_refs(name, "prune", self.router.call_blaming(
                    name, "prune", storage_errors=True, run_name=self.run_name, keep_last=keep,
                    protected_steps=protected, dry_run=dry_run, counted_steps=frozenset(verified)), self.run_name)
                # At most keep_last verified: all kept.
                self._kept_all(name, pruned, [r for r in refs if r.step in verified or r.step in protected])
            except CkptkitError as exc:
                failures[name] = exc
                continue
            corrupt += found
            deleted += pruned
        for name in self.router.backends(Role.FINAL):
            backend = self.router.instances[name]
            if name not in self.router.backends(Role.RESUME) and isinstance(backend, FileBackend):
                # No resume prune visits a final-only store, where a finalize killed while
                # writing leaves its temporary folder.
                deleted += backend.sweep_final_leftovers(self.run_name, dry_run)
        return self._pruned(PruneResult(deleted=tuple(deleted), corrupt=tuple(corrupt), keep_last=keep), failures,
                            dry_run)

    @staticmethod
    def _pruned(result: PruneResult, failures: dict[str, CkptkitError], dry_run: bool) -> PruneResult:
        """``result``, or ``PruneError`` telling ``failures`` and what ``result`` deleted elsewhere."""
        if not failures:
            return result
        verb = "would delete" if dry_run else "deleted"
        deleted = result.deleted
        done = (f"on the other backends it {verb} {len(deleted)} checkpoint(s) and leftover(s) ("
                f"{', '.join(r.uri for r in deleted[:5])}{' and more' if len(deleted) > 5 else ''})" if deleted
                else f"on the other backends it {verb} nothing")
        raise PruneError(next(iter(failures)), f"{'; '.join(str(e) for e in failures.values())}; {done}",
                         failures, result)

    def _kept_all(self, backend: str, deleted: list[CheckpointRef], kept: Collection[CheckpointRef]) -> None:
        """Raise ``BackendError`` for a prune of ``backend`` that deleted a committed checkpoint it
        was told to keep (``kept``: the step just saved; by hand, the verified ones and those
        keep_best keeps): a faulty plugin, which may have left the run without the checkpoint a
        restore would take. Told apart by path: a leftover of the same step (a save of it killed
        before) is the prune's to remove."""
        places = {(k.step, k.path) for k in kept}
        wrong = sorted({r.step for r in deleted if (r.step, r.path) in places})
        if wrong:
            raise self.router.faulty(backend, "prune", f"step {', '.join(map(str, wrong))} among those it deleted",
                                     "only steps it was free to delete (not protected_steps, nor the newest "
                                     "keep_last of counted_steps); what the run holds now: ckptkit ls")

    def delete_run(self, dry_run: bool = False) -> PruneResult:
        """Delete every resume checkpoint of the run on every resume backend (``ckptkit prune
        --all``); the result's ``keep_last`` is 0. A backend that fails is left as it is and the
        others are emptied all the same; then ``PruneError`` is raised, as ``prune`` does."""
        self._check_open()
        names = self.router.backends(Role.RESUME)
        for name in names:  # before anything is deleted anywhere
            if not self.router.implements(name, "delete_run"):
                raise CkptkitError(f"backend {name!r} (type {self.router.types[name].name!r}) cannot delete a "
                                   "whole run (its type does not implement delete_run); delete it with the "
                                   "storage's own tools")
        gone: list[CheckpointRef] = []
        failures: dict[str, CkptkitError] = {}
        for name in names:
            try:
                gone += self.router.call(name, "delete_run", run_name=self.run_name, dry_run=dry_run) or []
            except CkptkitError as exc:
                failures[name] = exc
        return self._pruned(PruneResult(deleted=tuple(gone), corrupt=(), keep_last=0), failures, dry_run)

    def best_steps(self, backend: str) -> frozenset[int]:
        """The steps that ``roles.resume.keep_best`` keeps on ``backend`` (empty without keep_best).

        Metrics come from the manifests, each read once per manager.
        """
        self._settle_prune()  # the prune after a save reads and fills the same metrics, on its thread
        return self._best_steps(backend)

    def _best_steps(self, backend: str) -> frozenset[int]:
        keep_best = self.resume_role.keep_best
        if keep_best is None:
            return frozenset()
        listed = self.router.call(backend, "list_checkpoints", run_name=self.run_name)
        refs = self.router.checked_refs(backend, "list_checkpoints", listed, self.run_name)
        for ref in refs:
            if ref.step not in self._metrics:
                try:
                    self._metrics[ref.step] = dict(self.reader.manifest(ref).metrics)
                except (*reading.SKIPPABLE, IncompatibleCheckpointError) as exc:
                    log.warning("keep_best: could not read the metrics of %s: %s", ref.uri, exc)
        listed = {r.step for r in refs}
        return keep_best.best({s: m for s, m in self._metrics.items() if s in listed})

    # -- restoring --------------------------------------------------------------------------

    def list_checkpoints(self, step: int | None = None) -> list[CheckpointRef]:
        """Committed resume checkpoints across all resume backends, newest first.

        Raises ``StorageUnavailableError`` when a backend could not be listed and no other
        gave a checkpoint; with checkpoints found elsewhere, it warns (``RuntimeWarning``, on
        rank 0) that the backend may hold newer ones. With
        ``step``, only the copies of that step, in the backends' order, and
        ``CheckpointNotFoundError`` (naming the steps there are) when every backend answered
        and none holds it.
        """
        self._check_open()
        self._settle_prune()  # the last save's prune, on its thread: the listing shows what it left
        refs, unreachable = self.reader.list_all()
        if step is not None:
            refs = self._copies_of(refs, unreachable, _count("step", step))
        self._unreachable(refs, unreachable, resuming=False)
        return refs

    def _copies_of(self, refs: list[CheckpointRef], unreachable: dict[str, CkptkitError],
                   step: int) -> list[CheckpointRef]:
        """The copies of ``step`` among ``refs`` (a listing, newest first), in the backends' order.

        None found: ``StorageUnavailableError`` when a backend could not be listed (the step may
        lie there), else ``CheckpointNotFoundError`` naming the steps the run holds.
        """
        copies = [r for r in refs if r.step == step]
        if copies:
            return copies
        steps = sorted({r.step for r in refs}, reverse=True)
        if unreachable:
            error = StorageUnavailableError(
                next(iter(unreachable)),
                f"run {self.run_name!r}: step {step} is not among the committed checkpoints of the backends that "
                f"answered ({_steps_text(steps, step)}), and these resume backends could not be listed: "
                f"{fanout.describe_failures(unreachable)}; it may lie there. Try again once the storage answers")
            error.__cause__ = next(iter(unreachable.values()))
            raise error
        raise CheckpointNotFoundError(
            f"run {self.run_name!r} has no committed checkpoint of step {step} ({_steps_text(steps, step)})",
            self.run_name, step, tuple(steps))

    def _unreachable(self, found: list, unreachable: dict[str, CkptkitError], resuming: bool = True,
                     notes: list[str] | None = None) -> str | None:
        """Raise where backends could not be listed and nothing was found elsewhere; where
        something was, warn (on rank 0) that those backends may hold newer steps, and return
        the warning. ``resuming``: for a restore, whose caller would otherwise start afresh.
        ``notes``: the warning is added there instead, for the caller to give (``_warn_rank0``)."""
        if not unreachable:
            return None
        detail = fanout.describe_failures(unreachable)
        if not found:
            if any(reading.refusal(e) for e in unreachable.values()):
                # What it holds may be there and readable once this process may read it: leaving
                # the backend out would throw that away.
                advice = ("Starting from step 0 could throw away training; give this process access to it "
                          "(permissions, or credentials), then restore again" if resuming else
                          "Give this process access to it (permissions, or credentials), then try again")
            else:
                advice = ("Starting from step 0 could throw away training; restore again once the storage answers, "
                          "or remove the backend from roles.resume.backends to start without it" if resuming else
                          "Try again once the storage answers (check its address and credentials)")
            error = StorageUnavailableError(
                next(iter(unreachable)),
                f"run {self.run_name!r}: no checkpoint was found, and these resume backends could not be "
                f"listed: {detail}. {advice}")
            error.__cause__ = next(iter(unreachable.values()))
            raise error
        reason = (f"run {self.run_name!r}: going on with what the other backends hold, which may be older than "
                  f"what these hold; could not list: {detail}")
        if notes is not None:
            notes.append(reason)
        elif ranks.rank() == 0:
            warnings.warn(reason, RuntimeWarning, stacklevel=_outside_ckptkit())
        return reason

    def verify(self, ref: CheckpointRef, safe_globals: Iterable[Any] = ()) -> Manifest:
        """Check a checkpoint as restore would, without loading it into a model; return the manifest.

        The manifest proves itself and its place, every file matches its size and checksum, and
        every pickle in it (``.pt`` files, DCP's ``.metadata`` and non-tensor shard items) is one
        that safe loading accepts; nothing in them is run. Raises ``CorruptCheckpointError``,
        ``StorageUnavailableError`` or ``UnsafeCheckpointError``; ``LocalWriteError`` where this
        machine cannot hold the scratch folder a ``torch`` checkpoint on a remote backend is
        downloaded into for this.
        """
        self._settle_prune()
        safe_globals = list(safe_globals)
        manifest = self.reader.manifest(ref)
        if manifest.format == "dcp":
            self.reader.check_files(ref, manifest, manifest.files)
            try:
                sharded.check(self.router.instances[ref.backend].fs, ref.path, manifest.files, safe_globals)
            except CkptkitError as exc:
                raise type(exc)(f"{ref.uri}: {exc}") from exc
            names = [n for n in manifest.files if n.endswith(".pt")]
            for name in names:
                self._load_file(ref, name, safe_globals)
            return manifest
        if manifest.format == "torch":
            reading.state_files(ref, manifest)
        with reading.scratch("verify") as workdir:
            folder = self.reader.fetch(ref, manifest, workdir)
            for name in manifest.files:
                # A trainer's own files (save_files) are never loaded by ckptkit: checked, not opened.
                if name.endswith(".pt") and manifest.format != FILES_FORMAT:
                    try:
                        safeload.check(os.path.join(folder, name), safe_globals, name=f"{ref.uri}/{name}")
                    except CkptkitError as exc:
                        raise type(exc)(str(exc)) from exc
        return manifest

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                extra: Mapping[str, Any] | None = None, safe_globals: Iterable[Any] = (),
                rank_extra: Mapping[str, Any] | None = None, step: int | None = None) -> Restored | None:
        """Load the newest committed checkpoint across all resume backends into model and optimizer.

        Call it on every rank. A checkpoint that is damaged or cannot be read is skipped with a
        warning naming it and why, and the next newest is tried: only another backend's where the
        store stopped answering, and none older where the storage refused this process a file of
        it (its permissions, or the credentials used), as the skipped one may be intact. Objects
        in ``extra`` (shared state) and ``rank_extra`` (this rank's own) with ``load_state_dict``
        get their saved state back (one under a key the checkpoint does not hold keeps its own,
        named in a warning); ``Restored.extra`` and ``Restored.rank_extra`` hold all of it. On another
        world size, rank r gets what saved rank r saved, and ranks without saved state are
        named in a warning and in ``Restored.ranks_without_state``. Given no ``optimizer``, the
        optimizer state a checkpoint holds is left out, with a warning. ``safe_globals`` lists
        extra types that ``torch.load(weights_only=True)`` may rebuild.

        Returns None only when every resume backend answered and none holds a checkpoint of
        this run. Raises ``StorageUnavailableError`` when nothing was found and some backend
        could not be listed, ``CorruptCheckpointError`` when checkpoints exist but none is
        intact, and ``UnsafeCheckpointError`` / ``IncompatibleCheckpointError`` at once (never
        skipped).

        ``step=N`` restores that step and no other (to roll back past a loss spike, or to
        reproduce a step): only copies of step N are tried, in the backends' order, so a
        damaged copy on one backend is skipped, with the same warning, for another backend's
        copy of step N. It raises ``CheckpointNotFoundError`` (naming the steps there are) when
        every resume backend answered and none holds step N, ``StorageUnavailableError`` when
        step N was not found and some backend could not be listed, and
        ``CorruptCheckpointError`` when every copy of step N is damaged (nothing is loaded).
        While the run holds steps newer than N, ``save`` is refused with ``RunConflictError``:
        keep_last would prune the new checkpoints in favour of the newer ones, and a plain
        restore would resume those. Save under a new run name instead, or delete the newer
        steps first. Restored past newer steps, the training is a branch with a training id of
        its own (the same each time step N is restored past the same newer steps): a final model
        published from those steps is not taken for its own (``final_held``). Restored after the
        newer steps were removed, it goes on as the training it restored.
        """
        self._check_open()
        step = None if step is None else _count("step", step)
        problem = None
        try:
            extra, rank_extra = _named(extra, "extra"), _named(rank_extra, "rank_extra")
            _one_optimizer(optimizer)
        except TypeError as exc:
            problem = exc
        self.coll.agree("restore: arguments", problem)  # raised on every rank, or the others would wait
        # Each rank loads the saved extra state into the objects it passed: one passed on some
        # ranks only (a scheduler on rank 0) was left as it was on the others, without a word.
        given = self.coll.all_gather("restore: extra given", sorted(extra) if extra else [])
        if any(names != given[0] for names in given):
            raise RanksDisagreeError(
                "restore: the ranks passed different extra= names (" + "; ".join(
                    f"rank {r}: {', '.join(names) or 'none'}" for r, names in enumerate(given)) + "); every rank "
                "passes the same objects, each of which gets the saved state, or reads it from Restored.extra")
        self.wait()
        self._trim_due = None
        safe_globals = list(safe_globals)
        candidates, unreachable = self._listing("restore: list")
        newest = candidates[0].step if candidates else None
        newest_copies = [r for r in candidates if r.step == newest]
        if step is not None:
            candidates = self._copies_of(candidates, unreachable, step)  # the same listing on every rank
        over = _PassedOver()
        try:
            for ref in _tries(self.reader, candidates, unreachable, step, lambda: self._listing("restore: list again")):
                status, manifest = self.coll.on_rank0(f"restore: manifest of step {ref.step}", self.reader.manifest, ref)
                if status == "ok" and manifest.format == FILES_FORMAT:
                    raise IncompatibleCheckpointError(
                        f"{ref.uri} is a folder of files committed by save_files (a trainer's own checkpoint), "
                        "not model state: fetch it with restore_files(dest) and let that trainer load it")
                if status == "ok":
                    self._check_restorable(ref, manifest, model, optimizer)
                    restore_one = self._restore_sharded if manifest.format == "dcp" else self._restore_full
                    problem, loaded = restore_one(ref, manifest, model, optimizer, safe_globals)
                elif isinstance(manifest, SKIPPABLE):
                    problem, loaded = manifest, None
                else:
                    raise manifest
                if problem is not None:
                    self.reader.note_skipped(ref, problem)
                    over.add(ref, problem)
                    continue
                passed_over = self._unreachable([ref], unreachable, notes=over.notes)
                if passed_over is not None:
                    over.reasons.append(passed_over)
                saved_extra, own, holders, cast = loaded
                problem = None
                try:
                    lacking, unset = _fill(extra, saved_extra, "extra", ref.uri)
                    lacking_own, unset_own = _fill(rank_extra, own or {}, "rank_extra", ref.uri)
                except Exception as exc:  # a state one rank's object refuses: every rank stops, as at save
                    problem = exc
                # Read before the last meeting point, so that a store slow to answer holds every rank there.
                past = self._training_at(newest_copies) if step is not None and newest > step else None
                # Also the last meeting point of a restore: a rank frozen in it makes the others raise here,
                # within timeout_s, rather than in the model's own first collective (gloo: 30 minutes).
                self.coll.agree(f"restore step {ref.step}: extra and rank_extra", problem)
                _warn_rank0(over.notes)
                if cast is not None:  # after the last meeting point: a warning raised (-W error) holds no rank up
                    warnings.warn(cast, RuntimeWarning, stacklevel=2)
                if optimizer is None and manifest.optimizer is not None and ranks.rank() == 0:
                    # Adam's moments and step counts gone without a word: a porting slip that only
                    # shows as a worse loss curve.
                    warnings.warn(f"{ref.uri} holds the state of a {manifest.optimizer.replace(':', '.')} optimizer, "
                                  "and restore was given no optimizer=: that state is not restored (an optimizer "
                                  "built now starts without it). Pass optimizer= to restore it", RuntimeWarning,
                                  stacklevel=2)
                if lacking and ranks.rank() == 0:
                    # A scheduler or loader that quietly kept its fresh state would train on from step 0's.
                    warnings.warn(f"extra: {', '.join(map(repr, lacking))} not in {ref.uri} (it holds "
                                  f"{', '.join(map(repr, sorted(saved_extra))) or 'no extra'}); "
                                  f"{'that object keeps' if len(lacking) == 1 else 'those objects keep'} the state "
                                  "it has now. Save it with extra= under the same key", RuntimeWarning, stacklevel=2)
                if unset and ranks.rank() == 0:
                    warnings.warn(_fill_warning(unset, "extra", "extra", ref.uri), RuntimeWarning, stacklevel=2)
                if unset_own:
                    warnings.warn(_fill_warning(unset_own, "rank_extra", f"rank_extra on rank {ranks.rank()}", ref.uri),
                                  RuntimeWarning, stacklevel=2)
                if lacking_own and own:
                    warnings.warn(f"rank_extra on rank {ranks.rank()}: {', '.join(map(repr, lacking_own))} not in what this "
                                  f"rank saved in {ref.uri}; kept as it is now", RuntimeWarning, stacklevel=2)
                missing = tuple(r for r in range(ranks.world_size()) if r not in holders)
                if missing and (rank_extra is not None or holders) and ranks.rank() == 0:
                    who = (f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}")
                    held = (f"it holds the state of ranks {', '.join(map(str, sorted(holders)))}" if holders else
                            "it holds none: it was saved without rank_extra")
                    keep = "it keeps what it has" if len(missing) == 1 else "they keep what they have"
                    warnings.warn(f"rank_extra: {who} of {ranks.world_size()} got no saved state from {ref.uri} ({held}); "
                                  f"{keep}", RuntimeWarning, stacklevel=2)
                unclaimed = sorted(r for r in holders if r >= ranks.world_size())
                if unclaimed and ranks.rank() == 0:
                    warnings.warn(f"rank_extra: the state that ranks {', '.join(map(str, unclaimed))} saved in {ref.uri} "
                                  f"is restored by no rank, as this job has {ranks.world_size()} (rank r gets what rank r "
                                  "saved): what it held (a data position, a random state) is not carried on",
                                  RuntimeWarning, stacklevel=2)
                self._carry_on(manifest)
                self._counted.update({manifest.step, *(r.step for r in candidates if r.step < manifest.step
                                                       and r.step not in over.steps)})
                # A copy of the restored step found damaged on one backend is not counted there: it
                # would keep an intact older step of that backend from the keep_last it is owed.
                self._damaged_copies = over.damaged
                # Newer steps the listing showed were skipped as damaged: they are no other training's.
                self._newest_own = max(manifest.step, newest if newest is not None else manifest.step)
                self._last_step = manifest.step
                self._prepare_first_save(optimizer)
                # This training continues the run now. A backend that could not be listed is listed
                # again after the first save it commits: steps above the restored one there are
                # another training's (``_holds_another_training``).
                self._unchecked, self._conflict = frozenset(unreachable), None
                self._checked_at, self._ours = self._newest_own + 1, {}
                if step is not None and (unreachable or newest > step):
                    # Newer steps (or a backend that may hold some): the first save checks the run again.
                    self._rolled_back = (step, newest if newest > step else None)
                    if newest > step:
                        # A branch: the final model the training restored published from a later
                        # step is not this one's (final_held asks after this training's alone).
                        # Made from what it branched off and what it went back past, so that the
                        # same job run again is the same branch (its final model not published
                        # twice), and a second branch off that step, past the first one's steps,
                        # another one.
                        self._training_id = branch_of(self._training_id, step, past)
                    self._run_checked = False
                    if newest > step and self.config.resume is not None and ranks.rank() == 0:
                        # Said now: the first save that is due, which refuses, may be hours of training away.
                        warnings.warn(f"run {self.run_name!r} holds checkpoints newer than the restored step {step} (up "
                                      f"to step {newest}): every save to it is refused with RunConflictError until "
                                      "they are removed; to train on from here, save under a new run name",
                                      RuntimeWarning, stacklevel=2)
                else:
                    self._rolled_back = None
                    self._run_checked = True
                    self._trim(candidates, manifest)
                return Restored(step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics),
                                extra=saved_extra, mlflow_run_id=manifest.mlflow_run_id, ref=ref,
                                manifest=manifest, skipped=tuple(over.reasons), rank_extra=own or {},
                                ranks_without_state=missing)
        except BaseException:
            _warn_rank0(over.notes, quietly=True)
            raise
        _warn_rank0(over.notes)
        self._unreachable([], unreachable)
        if over.reasons and len(over.silent) == len(over.reasons):
            # Intact for all anyone knows: the store stopped answering after the listing.
            raise StorageUnavailableError(
                over.silent[0],
                f"run {self.run_name!r} has {len(over.reasons)} committed checkpoint(s) and none could be read, as "
                f"the storage did not answer or refused this process ({'; '.join(over.reasons)}). Nothing was loaded; "
                "retry once it answers and lets this process read them")
        if over.silent:
            # Some are damaged, but the ones the storage did not answer for may be intact.
            raise StorageUnavailableError(
                over.silent[0],
                f"run {self.run_name!r} has {len(over.reasons)} committed checkpoint(s) and none could be restored: "
                f"{len(over.silent)} could not be read, as the storage did not answer or refused this process, and "
                f"may be intact ({'; '.join(over.reasons)}). Nothing was loaded; retry once it answers and lets this "
                "process read them")
        if over.reasons and step is not None:
            raise CorruptCheckpointError(
                f"run {self.run_name!r}: every copy of step {step} is damaged and none could be restored "
                f"({'; '.join(over.reasons)}). Nothing was loaded, and no other step was tried: restore another "
                f"step, or restore() without step= for the newest intact one{self._behind_note()}")
        if over.reasons:
            raise CorruptCheckpointError(
                f"run {self.run_name!r} has {len(over.reasons)} committed checkpoint(s) and none could be restored "
                f"({'; '.join(over.reasons)}). Nothing was loaded; starting from step 0 would throw them away. "
                f"Check the storage, or start a new run name{self._behind_note()}")
        self._prepare_first_save(optimizer)
        return None

    def _publish_command(self, failures: Mapping[str, Any]) -> str:
        """The ``ckptkit publish`` command line that sends this run's final model to the backends that failed."""
        words = ["--fallback-dir", self.fallback_dir]  # absolute: the command may run from another folder
        for name in failures:
            if name in self.router.instances:
                words += ["--backend", name]
        return self._command("publish", *words)

    def _command(self, command: str, *options: str) -> str:
        """The ``ckptkit`` command line that runs ``command`` on this run, quoted for a shell."""
        config = self._config_file or "<your config file>"
        words = ["ckptkit", command, config, "--run-name", self.run_name, *options]
        return " ".join(shlex.quote(w) if not w.startswith("<") else w for w in words)

    def _listing(self, what: str) -> tuple[list[CheckpointRef], dict[str, CkptkitError]]:
        """``Reader.list_all`` on rank 0, the same on every rank (collective)."""
        status, listing = self.coll.on_rank0(what, self.reader.list_all)
        if status == "error":
            raise listing
        self._check_seen_alike(what, *listing)
        return listing

    def _check_seen_alike(self, what: str, candidates: list[CheckpointRef], unreachable: Mapping[str, Any]) -> None:
        """Refuse, on every rank (collective), a backend keeping files on local disk in which some
        rank sees a newer committed step than rank 0, whose listing a restore goes by, and rank 0
        does not see it on a second look (a step committed meanwhile by a training beside it is
        seen then): its path is a local disk on each machine, and rank 0 runs on another one than
        the job that saved. Restoring would start over from nothing (or an older step) and throw
        the newer training away; not where rank 0 sees that step, or a newer one, on another
        resume backend (an object store beside a disk on each machine). One rank per machine lists (``LOCAL_RANK`` 0, where set); a
        backend that rank 0 could not list is left to restore's own error, and a rank whose
        listing fails says nothing."""
        self._behind = []
        if not ranks.active():
            return
        local = [n for n in self.router.backends(Role.RESUME)
                 if getattr(self.router.instances[n], "keeps_files_locally", False) and n not in unreachable]
        if not local:
            return
        lister = ranks.rank() != 0 and os.environ.get("LOCAL_RANK", "0") == "0"
        seen: dict[str, int | None] = {}
        for name in local:
            if ranks.rank() == 0:
                seen[name] = max((r.step for r in candidates if r.backend == name), default=None)
            elif lister:
                seen[name] = self._newest_seen(name)
        everyone = self.coll.all_gather(f"{what}: steps seen", seen)
        # Ranks that see less than rank 0 there: harmless where rank 0 reads for all, the cause
        # where each rank reads its own shards (said if no checkpoint can be restored).
        self._behind = [(name, r, got[name], everyone[0][name]) for name in local if everyone[0].get(name) is not None
                        for r, got in enumerate(everyone) if name in got and r
                        and (got[name] is None or got[name] < everyone[0][name])]
        ahead = {}
        for name in local:
            base = everyone[0].get(name)
            above = [(got[name], r) for r, got in enumerate(everyone)
                     if got.get(name) is not None and (base is None or got[name] > base)]
            if above:
                ahead[name] = (base, *max(above))
        if not ahead:
            return
        problem = None
        if ranks.rank() == 0:
            # What restore goes on from: rank 0's newest on any resume backend (another one, such
            # as an object store every machine reaches, may hold the step that disk lacks).
            newest = max((r.step for r in candidates), default=None)
            for name, (base, step, rank) in ahead.items():
                if newest is not None and newest >= step:
                    continue
                try:
                    again = self._newest_seen(name, quiet=False)
                except Exception:  # noqa: BLE001 - not listed again: whether it is there cannot be told
                    continue
                if again is not None and again >= step:
                    continue  # committed meanwhile, where every rank sees it
                where = getattr(self.router.instances[name], "location", name)
                problem = (
                    f"backend {name!r} ({where}): rank {rank} sees step {step} of run {self.run_name!r} committed "
                    f"there, and rank 0, whose listing restore goes by, sees {'none' if base is None else f'step {base} at newest'}"
                    ": the ranks do not share that folder (a local disk on each machine), and restoring would start "
                    f"from {'scratch' if newest is None else f'step {newest}'}, throwing the newer training away. "
                    "Nothing was loaded. Put the backend's path on a filesystem that every rank mounts (NFS, Lustre), "
                    "or run rank 0 on the machine that holds the checkpoints")
                break
        problem = self.coll.broadcast(f"{what}: steps seen again", problem)
        if problem is not None:
            raise ConfigError(problem)

    def _behind_note(self) -> str:
        """Why a restore found no checkpoint it could read where some rank lists less than rank 0
        (``_check_seen_alike``): a disk on each machine, of which every rank reads its own shards."""
        if not self._behind:
            return ""
        name, rank, got, base = self._behind[0]
        where = getattr(self.router.instances[name], "location", name)
        return (f". Rank {rank} sees {'no step' if got is None else f'step {got} at newest'} in backend {name!r} "
                f"({where}) where rank 0 sees step {base}: the ranks may not share that folder (a local disk on each "
                "machine), and a sharded (format: dcp) checkpoint is read by every rank from its own. Put the "
                "backend's path on a filesystem that every rank mounts (NFS, Lustre)")

    def _newest_seen(self, name: str, quiet: bool = True) -> int | None:
        """The newest step this process sees committed in backend ``name``; None when it sees
        none, or (``quiet``) cannot list it."""
        try:
            refs = self.router.call(name, "list_checkpoints", run_name=self.run_name)
        except Exception:  # noqa: BLE001 - rank 0's own listing says what fails; this one only compares
            if not quiet:
                raise
            return None
        return max((r.step for r in refs if r.role == "resume"), default=None)

    def _check_restorable(self, ref: CheckpointRef, manifest: Manifest, model, optimizer) -> None:
        """Refuse, on every rank and before anything is read (collective), a model on the meta
        device where nothing would be loaded into it, an optimizer of another class than the one
        whose state ``ref`` holds, and one whose state DCP cannot make where it would have to. torch's own ``load_state_dict`` takes the state of some other classes:
        Adam's into SGD (whose first step then fails for want of a momentum setting) or into
        AdamW (which would then train as Adam, its settings replaced)."""
        problem = None
        meta = next((name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta),
                    None)
        if meta is not None and (manifest.format == "dcp" or not gather.distributed(model)):
            # Only DCP's broadcast of a full state assigns tensors to a model on the meta
            # device; everywhere else restore copies into the model's own, and a meta tensor
            # takes nothing (torch warns, and the first forward pass fails).
            problem = IncompatibleCheckpointError(
                f"{ref.uri}: the model given to restore has {meta!r} on the meta device, which can hold "
                "no values: call model.to_empty(device=...) before restore")
        elif optimizer is not None and (manifest.format == "dcp" or gather.distributed(model)) and (
                gather.needs_closure(optimizer)):
            problem = IncompatibleCheckpointError(
                f"{ref.uri}: {_closure_misfit(optimizer, manifest.format)}. Restore it without optimizer= "
                "(the model alone)")
        elif optimizer is not None and manifest.optimizer is not None:
            live = gather.optimizer_class(optimizer)
            if not gather.same_class(manifest.optimizer, live):
                problem = IncompatibleCheckpointError(
                    f"{ref.uri} holds the state of a {manifest.optimizer.replace(':', '.')} optimizer, and the "
                    f"optimizer given to restore is a {live.replace(':', '.')}: its state and settings "
                    f"(learning rate, betas, momentum) would not carry over as they were. {gather.REBUILD} "
                    "(the model alone; a new optimizer then starts without state)")
        self.coll.agree(f"restore step {ref.step}: optimizer class", problem)

    def _prepare_first_save(self, optimizer: torch.optim.Optimizer | None) -> None:
        """After ``restore``, before training: an async manager makes the first save's buffers
        for that optimizer while training runs (paging in new memory costs about five times the
        copy into it, which the first save would otherwise pay while training waits)."""
        if optimizer is not None and self.config.resume is not None and self.config.resume.async_:
            self._async.prepare_for(optimizer)

    def _restore_full(self, ref: CheckpointRef, manifest: Manifest, model, optimizer, safe_globals):
        """Rank 0 verifies and reads the files; the state reaches the other ranks by broadcast."""
        state: dict[str, Any] = {}
        saved_extra: dict[str, Any] = {}
        outcome = None
        if ranks.rank() == 0:
            try:
                # Every file of the checkpoint, each verified before any of it is applied below.
                names = reading.state_files(ref, manifest)
                mapped = reading.worth_mapping(manifest, names)
                loaded = self.reader.load_files(ref, manifest, sorted(manifest.files), safe_globals,
                                                mapped=mapped if mapped and gather.copies_on_load(model) else ())
                state = split.merge([loaded[n] for n in names], ref.uri)
                if EXTRA_FILE in loaded:
                    saved_extra = loaded[EXTRA_FILE]
                else:  # checkpoints from before extra had a file of its own
                    saved_extra = state.pop("extra", {})
                if len(loaded) > 1:  # each file was measured alone as it loaded; one file needs no second look
                    safeload.refuse_inflated((state, saved_extra), ref.uri)
                if optimizer is not None and "optimizer" not in state:
                    raise IncompatibleCheckpointError(f"{ref.uri} holds no optimizer state (it was saved without "
                                                      "optimizer=); restore it without optimizer=")
            except SKIPPABLE as exc:
                outcome = ("skip", exc)
            except Exception as exc:
                outcome = ("fatal", exc)
        outcome = self.coll.share(f"restore step {ref.step}: read", outcome)
        if outcome is not None:
            if outcome[0] == "fatal":
                raise outcome[1]
            return outcome[1], None
        per_rank = state.pop(RANK_EXTRA_KEY, None) if ranks.rank() == 0 else None
        buffers = state.pop(gather.RANK_BUFFERS, None) if ranks.rank() == 0 else None
        # Told once the step is restored (restore warns of it), so only where it did load.
        cast = gather.cast_note(model, {k: v.dtype for k, v in state.get("model", {}).items()
                                        if isinstance(v, torch.Tensor)}, ref.uri) if ranks.rank() == 0 else None
        gather.load_resume_state(model, optimizer, state, full=True, coll=self.coll, source=ref.uri)
        saved_extra, per_rank, buffers = self.coll.share(f"restore step {ref.step}: extra",
                                                         (saved_extra, per_rank, buffers))
        own = gather.own_buffers_of(buffers or {}, ranks.rank(), 0)
        if own:
            gather.load_own_buffers(model, own, ref.uri)
        per_rank = per_rank or {}
        return None, (saved_extra, per_rank.get(ranks.rank()), frozenset(per_rank), cast)

    def _restore_sharded(self, ref: CheckpointRef, manifest: Manifest, model, optimizer, safe_globals):
        """``_load_sharded``; an optimizer that had not stepped is left without state when that
        fails or skips the checkpoint, though DCP gave it zero state to load into."""
        pristine = optimizer is not None and not optimizer.state
        try:
            outcome = self._load_sharded(ref, manifest, model, optimizer, safe_globals)
        except BaseException:
            if pristine:
                optimizer.state.clear()
            raise
        if outcome[0] is not None and pristine:
            optimizer.state.clear()
        return outcome

    def _load_sharded(self, ref: CheckpointRef, manifest: Manifest, model, optimizer, safe_globals):
        """Every file is verified before DCP writes any of it into the model: from local storage,
        each rank checks a share of the files, then every rank reads the shards it needs in place;
        from remote storage, each rank downloads the files it reads into a scratch folder, checking
        them on the way, and DCP reads those copies, so no byte is fetched twice by one rank."""
        if not ref.local_dir:
            with contextlib.ExitStack() as stack:
                problem, workdir = None, ""
                try:
                    workdir = stack.enter_context(reading.scratch("restore"))
                except LocalWriteError as exc:
                    problem = exc
                # On every rank: one whose temporary folder is unusable must not leave the others
                # waiting in the next collective until distributed.timeout_s.
                self.coll.agree(f"restore step {ref.step}: scratch folder", problem)
                return self._restore_sharded_copies(ref, manifest, model, optimizer, safe_globals, workdir)
        backend = self.router.instances[ref.backend]
        names = sorted(manifest.files)
        mine = names[ranks.rank()::ranks.world_size()]
        problem = None
        checked: dict[str, tuple[int, ...]] = {}
        try:
            _require_sharded_files(ref, manifest)
            # What each file was when this rank hashed it: DCP reads the files later, by name, on
            # any rank, and once every rank has read, this rank looks at them again (from the same
            # client of a shared filesystem).
            checked = {name: reading.identity(os.path.join(ref.local_dir, name), ref) for name in mine}
            self.reader.check_files(ref, manifest, mine)
        except Exception as exc:
            problem = exc
        skip = self._agree_sharded(ref, "check", problem)
        if skip is not None:
            return skip, None
        problem = None
        try:
            opened = sharded.open_reader(backend.fs, ref.path, name=ref.uri, listed=manifest.files)
        except Exception as exc:
            problem = exc
        # DCP's collectives run on ckptkit's group: every rank enters them, or none does.
        skip = self._agree_sharded(ref, "open", problem)
        if skip is not None:
            return skip, None
        names = gather.names_of(model) if optimizer is not None else {}
        held, problem = self._optimizer_held(ref, opened, names, optimizer)
        state, problem = self._load_target(model, optimizer, held, problem)
        _add_buffer_targets(state, model, opened)
        self._check_param_groups(ref, opened, names, optimizer, problem)
        skip = self._check_own_reads(ref, manifest, state, opened, checked)
        if skip is not None:
            return skip, None
        problem = None
        try:  # each rank a share of the items, before any rank loads one
            opened.check_records(opened.share_of_items(ranks.rank(), ranks.world_size()))
        except Exception as exc:
            problem = exc
        skip = self._agree_sharded(ref, "records", problem)
        if skip is not None:
            return skip, None
        opened.records_checked = True
        cast = gather.cast_note(model, sharded.saved_model_dtypes(opened), ref.uri) if ranks.rank() == 0 else None
        self._load_shards(ref, state, opened, optimizer, safe_globals)
        problem = saved_extra = own = None
        try:
            saved_extra = self._load_file(ref, EXTRA_FILE, safe_globals)
            own_file = rank_extra_file(ranks.rank())
            own = self._load_file(ref, own_file, safe_globals) if own_file in manifest.files else None
        except Exception as exc:
            problem = exc
        # Every rank has read what it reads (DCP's load ends in a collective; this waits for the
        # small files) before any looks at its share of the files again.
        self.coll.agree(f"restore step {ref.step}: small files", problem)
        try:
            changed = sorted(n for n, was in checked.items()
                             if reading.changed(os.path.join(ref.local_dir, n), ref, was, manifest.files[n]))
            if changed:
                problem = CorruptCheckpointError(
                    f"{ref.uri}: {', '.join(changed[:5])} changed while it was being restored, after it was "
                    "verified; the model may hold part of it. Keep other programs from writing into checkpoint "
                    "folders, and restore again")
        except Exception as exc:  # a file gone or replaced by now: raised on every rank, not left to hang
            problem = exc
        self.coll.agree(f"restore step {ref.step}: files unchanged", problem)
        _load_resume_state(model, optimizer, state, self.coll, held, ref.uri)
        return None, (saved_extra, own, self._extra_holders(manifest), cast)

    def _check_own_reads(self, ref: CheckpointRef, manifest: Manifest, state: dict[str, Any], opened,
                         checked: dict[str, tuple[int, ...]]) -> str | StorageUnavailableError | None:
        """Collective, from local storage: each rank hashes the files it reads that are not, by
        their size and time, the files the rank whose share they are hashed (``checked``,
        each rank's). A folder the ranks do not share (a disk on each machine, a copy staged onto
        each) can hold another copy of a file there, an older one: unchecked, it reached the
        model, one rank restoring the step and another a mix of it and an older one. On one
        shared filesystem they are the same files, and nothing is read again. Returns the reason
        to skip ``ref`` as ``_agree_sharded`` does, or None."""
        if ranks.world_size() == 1:
            return None
        problem = None
        seen: dict[str, tuple[int, ...]] = {}
        try:
            shards = set(sharded.items_read(state, opened).values())
        except Exception:  # state the checkpoint cannot fill: the load says so, in its own words
            shards = set(manifest.files)
        reads = {sharded.METADATA_FILE, EXTRA_FILE, rank_extra_file(ranks.rank()), *shards}
        try:
            seen = {n: reading.identity(os.path.join(ref.local_dir, n), ref)
                    for n in sorted(reads & set(manifest.files)) if n not in checked}
        except Exception as exc:
            problem = exc
        skip = self._agree_sharded(ref, "files read", problem)
        if skip is not None:
            return skip
        # Size and time, not the inode, which a filesystem mounted through FUSE numbers per machine.
        shares = self.coll.all_gather(f"restore step {ref.step}: files checked",
                                      {n: was[1:3] for n, was in checked.items()})
        hashed = {n: was for share in shares for n, was in share.items()}
        other = [n for n, was in seen.items() if hashed.get(n) != was[1:3]]
        problem = None
        try:
            self.reader.check_files(ref, manifest, other)
            checked.update((n, seen[n]) for n in other)  # looked at again once every rank has read
        except Exception as exc:
            problem = exc
        return self._agree_sharded(ref, "files read checked", problem)

    def _restore_sharded_copies(self, ref: CheckpointRef, manifest: Manifest, model, optimizer, safe_globals,
                                workdir: str):
        """``_load_sharded`` from remote storage, through verified copies in ``workdir``."""
        mine = rank_extra_file(ranks.rank())
        problem = opened = None
        try:
            _require_sharded_files(ref, manifest)
            self.reader.download(ref, manifest, sharded.METADATA_FILE, workdir)
            opened = sharded.open_reader(fsspec.filesystem("file"), workdir, name=ref.uri, listed=manifest.files)
        except Exception as exc:
            problem = exc
        skip = self._agree_sharded(ref, "open", problem)
        if skip is not None:
            return skip, None
        names = gather.names_of(model) if optimizer is not None else {}
        held, problem = self._optimizer_held(ref, opened, names, optimizer)
        state, problem = self._load_target(model, optimizer, held, problem)
        _add_buffer_targets(state, model, opened)
        wanted: set[str] = set()
        items: dict[Any, str] = {}
        if problem is None:
            try:
                items = sharded.items_read(state, opened)
                wanted = set(items.values()) | {EXTRA_FILE} | ({mine} & set(manifest.files))
            except Exception as exc:  # made here, so that every rank raises the same error
                problem = self._shards_failure(ref, optimizer, exc)
        plans = self.coll.all_gather(f"restore step {ref.step}: plan", (sorted(wanted), ranks.portable(problem)))
        failures = [p for _, p in plans if p is not None]
        if failures:
            raise problem if problem is not None else failures[0]
        # Files that no rank reads are still checked, a share per rank, where they lie.
        unread = sorted(set(manifest.files) - {sharded.METADATA_FILE}.union(*(names for names, _ in plans)))
        try:
            for name in sorted(wanted):
                if name not in manifest.files:
                    raise CorruptCheckpointError(f"{ref.uri}: {sharded.METADATA_FILE} points at {name}, "
                                                 "which its manifest does not list")
                self.reader.download(ref, manifest, name, workdir)
            self.reader.check_files(ref, manifest, unread[ranks.rank()::ranks.world_size()])
            opened.check_records(items)  # those this rank loads: the only ones it downloaded
        except Exception as exc:
            problem = exc
        skip = self._agree_sharded(ref, "check", problem)
        if skip is not None:
            return skip, None
        opened.records_checked = True
        self._check_param_groups(ref, opened, names, optimizer, None)
        cast = gather.cast_note(model, sharded.saved_model_dtypes(opened), ref.uri) if ranks.rank() == 0 else None
        self._load_shards(ref, state, opened, optimizer, safe_globals)
        _load_resume_state(model, optimizer, state, self.coll, held, ref.uri)
        saved_extra = reading.load(os.path.join(workdir, EXTRA_FILE), ref, safe_globals)
        own = reading.load(os.path.join(workdir, mine), ref, safe_globals) if mine in manifest.files else None
        return None, (saved_extra, own, self._extra_holders(manifest), cast)

    def _agree_sharded(self, ref: CheckpointRef, what: str,
                       problem: BaseException | None) -> str | StorageUnavailableError | None:
        """Every rank's ``problem`` (collective): the reason to skip ``ref`` when all are skippable
        (a ``StorageUnavailableError`` when the storage did not answer any of them), None when
        there were none; raises the first that is not skippable."""
        gathered = self.coll.all_gather(f"restore step {ref.step}: {what}",
                                        (ranks.portable(problem), problem is not None and reading.refusal(problem)))
        if any(refused for _, refused in gathered):  # on any rank: no rank restores an older step past it
            self.reader.refused_by_storage(ref)
        problems = [p for p, _ in gathered if p is not None]
        if not problems:
            return None
        if all(isinstance(p, SKIPPABLE) for p in problems):
            text = "; ".join(str(p) for p in problems)
            if all(isinstance(p, StorageUnavailableError) for p in problems):
                return StorageUnavailableError(ref.backend, text)
            return text
        raise problem if problem is not None and not isinstance(problem, SKIPPABLE) else next(
            p for p in problems if not isinstance(p, SKIPPABLE))

    def _load_shards(self, ref: CheckpointRef, state: dict[str, Any], opened, optimizer, safe_globals) -> None:
        try:
            sharded.load(state, opened, ref.path, safe_globals, process_group=self.coll.group)
        except (Exception, CheckpointException) as exc:
            lost = self.coll.lost(f"restore step {ref.step}: load shards", exc)
            if lost is not None:  # a rank left or froze: not a misfit of the checkpoint
                raise lost from exc
            failure = self._shards_failure(ref, optimizer, exc)
            raise failure from failure.__cause__

    def _shards_failure(self, ref: CheckpointRef, optimizer, exc: BaseException) -> BaseException:
        inner = _unwrap(exc)
        if isinstance(inner, (UnsafeCheckpointError, IncompatibleCheckpointError, CorruptCheckpointError)):
            return inner
        if optimizer is not None and "Missing key in checkpoint state_dict: optimizer" in fanout.first_line(exc):
            return IncompatibleCheckpointError(f"{ref.uri}: its optimizer state does not fit the optimizer given "
                                               f"to restore ({fanout.first_line(exc)}). {gather.REBUILD}")
        error = IncompatibleCheckpointError(f"{ref.uri}: its verified shards could not be loaded into this "
                                            f"model: {fanout.first_line(exc)}")
        error.__cause__ = exc
        return error

    def _optimizer_held(self, ref: CheckpointRef, opened, names: dict[torch.Tensor, set[str]],
                        optimizer) -> tuple[set[str], IncompatibleCheckpointError | None]:
        """Before a sharded load: the names of the parameters the checkpoint holds optimizer state
        for (``sharded.optimizer_state_held``), once it is checked that it holds optimizer state,
        in as many param groups as ``optimizer`` has, and that an optimizer that has stepped holds
        state for every parameter it trains that the checkpoint has state for; else, with them,
        why not. Returned, not raised: the caller makes every rank raise it (an optimizer's state
        may differ between ranks)."""
        if optimizer is None:
            return set(), None
        groups = sharded.optimizer_groups_saved(opened)
        if groups is None:
            return set(), IncompatibleCheckpointError(f"{ref.uri} holds no optimizer state (it was saved without "
                                                      "optimizer=); restore it without optimizer=")
        held = sharded.optimizer_state_held(opened)
        problem = gather.groups_misfit(groups, optimizer) or gather.lacking_state(names, optimizer, held)
        return held, None if problem is None else IncompatibleCheckpointError(f"{ref.uri}: {problem}")

    @staticmethod
    def _load_target(model, optimizer, held: set[str],
                     problem: BaseException | None) -> tuple[dict[str, Any], BaseException | None]:
        """The state a sharded load fills in place, unless this rank has a ``problem`` already;
        with what making it raised here as the problem (an unstepped optimizer's state is made
        here, and may not fit in memory on one rank alone), for the ranks to agree on."""
        if problem is not None:
            return {}, problem
        try:
            return gather.without_unsaved(gather.resume_state(model, optimizer, sharded=True, load_target=True,
                                                              held=held), held), None
        except Exception as exc:
            return {}, exc

    def _check_param_groups(self, ref: CheckpointRef, opened, names: dict[torch.Tensor, set[str]], optimizer,
                            problem: BaseException | None) -> None:
        """Before the shards reach the model: every parameter the optimizer trains is in a saved
        param group, read from the checkpoint's small items (verified files). ``problem`` (this
        rank's, found before) or a misfit found on any rank is raised on all (collective, also
        for a rank without optimizer): no rank goes into DCP's load alone."""
        if problem is None and optimizer is not None:
            try:
                groups = sharded.saved_param_groups(opened)
                misfit = gather.layout_misfit(names, optimizer, {"param_groups": groups},
                                              saved_model=sharded.saved_model_names(opened))
            except Exception:  # unreadable here: the check after the load still refuses a misfit
                misfit = None
            if misfit is not None:
                problem = IncompatibleCheckpointError(f"{ref.uri}: {misfit}")
        self.coll.agree(f"restore step {ref.step}: param groups", problem)

    def _extra_holders(self, manifest: Manifest) -> frozenset[int]:
        # From the names listed, not a range as long as the manifest's world_size says.
        limit = max(manifest.world_size, ranks.world_size())
        found = (int(m.group(1)) for name in manifest.files if (m := _RANK_EXTRA_NAME.fullmatch(name)))
        return frozenset(r for r in found if r < limit and rank_extra_file(r) in manifest.files)

    def _load_file(self, ref: CheckpointRef, name: str, safe_globals) -> Any:
        """One small verified file of a checkpoint, read straight from its backend and loaded weights-only."""
        with self.router.call(ref.backend, "open_file", ref=ref, name=name) as f:
            try:
                return safeload.load(f, safe_globals)
            except CkptkitError as exc:
                raise type(exc)(f"{ref.uri}/{name}: {exc}") from exc

    def peek(self, safe_globals: Iterable[Any] = (), step: int | None = None) -> CheckpointInfo | None:
        """The newest intact checkpoint's step, epoch, metrics and shared ``extra``, without a model.

        For trainers that need saved arguments (the model's config in ``extra``) before they can
        build the model that ``restore`` fills. Reads the manifest and the small ``extra.pt``
        only (verified; a checkpoint saved without extra has none, and its extra is ``{}``); no
        collective, so any rank may call it. ``step`` reads that step only, as
        ``restore(step=...)`` would. Returns None and raises as ``restore`` does.
        """
        self._check_open()
        step = None if step is None else _count("step", step)
        candidates, unreachable = self.reader.list_all()
        if step is not None:
            candidates = self._copies_of(candidates, unreachable, step)
        skipped = []
        for ref in _tries(self.reader, candidates, unreachable, step, self.reader.list_all):
            try:
                manifest = self.reader.manifest(ref)
                if EXTRA_FILE in manifest.files:
                    saved_extra = self.reader.load_files(ref, manifest, [EXTRA_FILE], safe_globals)[EXTRA_FILE]
                elif manifest.format == FILES_FORMAT or (manifest.format == "torch"
                                                         and not manifest.extra_in_state):
                    saved_extra = {}  # saved without extra, or a trainer's own files
                else:
                    # Older checkpoints keep extra inside state.pt: read it all.
                    saved_extra = self.reader.load_state(ref, manifest, safe_globals).get("extra", {})
            except SKIPPABLE as exc:
                self.reader.note_skipped(ref, exc)
                warnings.warn(_skipped(ref, exc), RuntimeWarning, stacklevel=2)
                skipped.append(exc)
                continue
            self._unreachable([ref], unreachable, resuming=False)
            return CheckpointInfo(step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics),
                                  extra=saved_extra, mlflow_run_id=manifest.mlflow_run_id, ref=ref, manifest=manifest)
        self._unreachable([], unreachable, resuming=False)
        unread = [e for e in skipped if isinstance(e, StorageUnavailableError)]
        if unread:  # may be intact: as restore says
            raise StorageUnavailableError(
                unread[0].backend, f"run {self.run_name!r} has {len(skipped)} committed checkpoint(s) and none could "
                f"be read: {len(unread)} could not be read, as the storage did not answer or refused this process, "
                f"and may be intact ({'; '.join(map(str, skipped))}); retry once it answers and lets this process "
                "read them")
        if skipped:
            which = "no committed checkpoint is intact" if step is None else f"no copy of step {step} is intact"
            raise CorruptCheckpointError(f"run {self.run_name!r}: {which} ({'; '.join(map(str, skipped))})")
        return None

    def export(self, out: str | os.PathLike, step: int | None = None, dtype: str | None = None, *,
               replace: bool = True) -> Restored:
        """Write one full, unsharded model file from a stored resume checkpoint, offline.

        Takes the newest verified checkpoint (or ``step``, and no other: ``CheckpointNotFoundError``
        when no backend holds it), in either format, and writes what ``finalize`` would have
        written: ``{"model", "step", "epoch", "metrics", "algorithm"}``. A file at ``out`` is
        replaced whole once the new one is complete; with ``replace=False``, ``FileExistsError``
        instead, before anything is read.
        """
        self._check_open()
        _outside_checkpoints(os.fspath(out), self.router.instances.values())
        if not replace and os.path.lexists(out):
            raise FileExistsError(errno.EEXIST, "exists already", os.fspath(out))
        skipped: list[Exception] = []
        # One pass: a newest step the storage would not let this process read is not passed over
        # for an older one, which would then go out as the newest model.
        with self.reader.one_pass():
            for ref in self.list_checkpoints(step=step):
                try:
                    manifest = self.reader.manifest(ref)
                    if manifest.format == FILES_FORMAT:
                        raise IncompatibleCheckpointError(
                            f"{ref.uri} is a folder of files committed by save_files (a trainer's own checkpoint), "
                            "not model state ckptkit can read: fetch it with restore_files(dest) and export it "
                            "with the tool that wrote it")
                    if manifest.format == "dcp":
                        with reading.scratch("export") as workdir, reading.unchanged(ref, manifest.files) as unchanged:
                            # Read once, from what was verified.
                            folder = self.reader.fetch(ref, manifest, workdir)
                            model_state = gather.rank0_model(sharded.load_full(fsspec.filesystem("file"), folder,
                                                                               manifest.files, name=ref.uri))
                            unchanged()
                    else:
                        model_state = self.reader.load_state(ref, manifest, (), keep=("model",))["model"]
                except SKIPPABLE as exc:
                    self.reader.note_skipped(ref, exc)
                    warnings.warn(_skipped(ref, exc), RuntimeWarning, stacklevel=2)
                    skipped.append(exc)
                    continue
                body = {"model": gather.cast(model_state, dtype), "step": manifest.step, "epoch": manifest.epoch,
                        "metrics": dict(manifest.metrics), "algorithm": self.config.algorithm}
                _write_whole(os.fspath(out), lambda f: torch.save(body, f))
                return Restored(step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics), extra={},
                                mlflow_run_id=manifest.mlflow_run_id, ref=ref, manifest=manifest)
        which = f"step {step}" if step is not None else "any step"
        unread = [e for e in skipped if isinstance(e, StorageUnavailableError)]
        if unread:
            raise StorageUnavailableError(
                unread[0].backend, f"run {self.run_name!r}: nothing was exported from {which}: {len(unread)} "
                "checkpoint(s) could not be read, as the storage did not answer or refused this process, and "
                f"may be intact ({'; '.join(map(str, skipped))}); retry once it answers and lets this process "
                "read them")
        raise CorruptCheckpointError(f"run {self.run_name!r} has no verified checkpoint at {which} to export")

    # -- folders of files (a framework's own checkpoint) ------------------------------------

    def save_files(self, step: int, files: str | os.PathLike | Iterable[str | os.PathLike],
                   epoch: int | None = None, metrics: Mapping[str, Any] | None = None,
                   force: bool = False) -> list[CheckpointRef]:
        """Commit a folder of files that something else wrote (a trainer's own checkpoint) as the
        resume checkpoint of ``step``, if it is due, then prune.

        ``files`` is a folder (every file directly in it; a subfolder is refused) or a list of
        file paths (stored under their base names). The files go to every resume backend as
        ``save`` writes its own: streamed, checksummed, the manifest (format ``files``) last, then
        ``keep_last`` applied. ckptkit never loads them; ``restore_files`` gives them back,
        verified. Call it on every rank once each has written its part: rank 0 reads the files,
        so they must lie where rank 0 sees them. Returns and raises as ``save`` does.
        """
        self._check_open()
        self.resume_role  # raises without a resume role
        self._tracking_run_id()
        step = _count("step", step)
        epoch = None if epoch is None else _count("epoch", epoch)
        if not force and not self.is_due(step):
            return []
        self._check_step_grows(step)
        self.wait()
        # Every rank has written its files (a trainer writes one RNG file per rank) before rank 0 reads them.
        self.coll.agree(f"save_files step {step}: written", None)
        status, listed = self.coll.on_rank0(f"save_files step {step}: list", _source_files, files)
        if status == "error":
            raise listed
        if ranks.active() and isinstance(files, (str, os.PathLike)):
            listed = self._files_seen_alike(step, os.fspath(files), listed)
        if not self._run_checked:
            self._check_run(step)
        conflict = self._conflict_error(*self._conflict) if ranks.rank() == 0 and self._conflict else None
        self.coll.agree(f"save_files step {step}: check run", conflict)
        self._last_step = step
        self._trim_now()
        payload = Payload(run_name=self.run_name, step=step, epoch=epoch, format=FILES_FORMAT,
                          files=tuple(PayloadFile(name, source=path) for name, path in listed or ()),
                          metrics=_metrics(metrics), world_size=ranks.world_size(),
                          mlflow_run_id=self._tracking_run_id() if ranks.rank() == 0 else None,
                          training_id=self._training_id)
        status, result = self.coll.on_rank0(f"save_files step {step}: write", self._store, payload)
        _, saved, failures = result if status == "ok" else (step, [], {"(all)": result})
        self._report(step, saved, failures)
        return saved

    def _files_seen_alike(self, step: int, folder: str, listed: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``listed`` (rank 0's files of ``folder``) with every file another rank sees there that
        rank 0 finds too, past its own listing (a shared filesystem's cached one); refused on
        every rank (collective) where rank 0 does not find it: the folder is on each machine's
        own disk (a Trainer's output_dir per node), and that rank's file (its random state) would
        be left out of the checkpoint without a word."""
        try:
            mine = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name != _FILLED)
        except OSError:
            mine = []
        everyone = self.coll.all_gather(f"save_files step {step}: files seen", mine)
        problem = None
        if ranks.rank() == 0:
            have = {name for name, _ in listed}
            unseen = {name: r for r, names in reversed(list(enumerate(everyone))) for name in names if name not in have}
            missing = sorted(n for n in unseen if not os.path.isfile(os.path.join(folder, n)))
            try:
                if missing:
                    raise ConfigError(
                        f"save_files step {step}: rank {unseen[missing[0]]} sees {', '.join(missing[:5])} in {folder}, "
                        "and rank 0, which reads and stores every file, does not find "
                        f"{'it' if len(missing) == 1 else 'them'} there: the folder is not one that every rank shares "
                        "(a disk on each machine), and those files would be left out. Nothing was saved. Write the "
                        "checkpoint onto a filesystem every rank mounts (the Trainer's output_dir)")
                if unseen:
                    listed = _source_files([p for _, p in listed] + [os.path.join(folder, n) for n in sorted(unseen)])
            except Exception as exc:
                problem = exc
        self.coll.agree(f"save_files step {step}: files seen by rank 0", problem)
        return listed

    def restore_files(self, dest: str | os.PathLike) -> CheckpointInfo | None:
        """Put the files of the newest intact checkpoint across the resume backends into a folder.

        ``dest`` is the folder to fill; ``{step}`` in it is replaced by the checkpoint's step
        (``out/checkpoint-{step}``). Every file is streamed from its backend and checked against
        the manifest; the folder is filled under a temporary name and renamed into place, so it
        holds either all the files or none. A folder already there is kept when its files match
        the manifest (nothing is downloaded), else replaced whole; without ``{step}`` in ``dest``,
        one holding anything but the checkpoint's files is refused, unless restore_files filled it
        (it leaves a ``.ckptkit-restored`` file there). Nothing is loaded: the files are
        for whoever wrote them (``save_files``). Damaged checkpoints are skipped with a warning
        as in ``restore``. Call it on every rank; rank 0 writes ``dest``, which the others must
        see. Returns the checkpoint's step, epoch and metrics (``extra`` empty) with ``ref``,
        or None when every resume backend answered and none holds one; raises as ``restore``.
        """
        self._check_open()
        self.wait()
        reading.sweep_scratch()
        candidates, unreachable = self._listing("restore_files: list")
        over = _PassedOver()
        try:
            for ref in _tries(self.reader, candidates, unreachable, None, lambda: self._listing("restore_files: list again")):
                status, result = self.coll.on_rank0(f"restore_files: step {ref.step}", self._fetch_files, ref,
                                                    os.fspath(dest))
                if status == "error":
                    if not isinstance(result, SKIPPABLE):
                        raise result
                    self.reader.note_skipped(ref, result)
                    over.add(ref, result)
                    continue
                manifest = result
                self._unreachable([ref], unreachable, notes=over.notes)
                self._carry_on(manifest)
                self._counted.update({manifest.step, *(r.step for r in candidates if r.step < manifest.step
                                                       and r.step not in over.steps)})
                self._damaged_copies = over.damaged  # as in restore
                self._newest_own = max([manifest.step, *(r.step for r in candidates)])  # as in restore
                self._last_step = manifest.step
                self._rolled_back = None
                self._run_checked = True
                self._unchecked, self._conflict = frozenset(unreachable), None  # as in restore
                self._checked_at, self._ours = self._newest_own + 1, {}
                self._trim(candidates, manifest)
                _warn_rank0(over.notes)
                return CheckpointInfo(step=manifest.step, epoch=manifest.epoch, metrics=dict(manifest.metrics),
                                      extra={}, mlflow_run_id=manifest.mlflow_run_id, ref=ref, manifest=manifest)
        except BaseException:
            _warn_rank0(over.notes, quietly=True)
            raise
        _warn_rank0(over.notes)
        self._unreachable([], unreachable)
        if over.silent:
            raise StorageUnavailableError(
                over.silent[0], f"run {self.run_name!r} has {len(over.reasons)} committed checkpoint(s) and none "
                f"could be fetched: {len(over.silent)} could not be read, as the storage did not answer or refused this "
                f"process, and may be intact ({'; '.join(over.reasons)}). Nothing was written; retry once it answers "
                "and lets this process read them")
        if over.reasons:
            raise CorruptCheckpointError(
                f"run {self.run_name!r} has {len(over.reasons)} committed checkpoint(s) and none could be fetched "
                f"({'; '.join(over.reasons)}). Nothing was written; check the storage, or start a new run name")
        return None

    def _fetch_files(self, ref: CheckpointRef, dest: str) -> Manifest:
        """Rank 0: the verified files of ``ref`` in ``dest`` (``{step}`` filled in); its manifest."""
        manifest = self.reader.manifest(ref)
        target = os.path.abspath(dest.replace("{step}", str(manifest.step)))
        if _holds(target, manifest):
            return manifest
        if os.path.lexists(target) and "{step}" not in dest and not os.path.lexists(os.path.join(target, _FILLED)):
            # The folder is replaced whole: anything else in it (a trainer's logs) would go too.
            # One named after the step (checkpoint-{step}), or one filled before, is ckptkit's.
            others = sorted(set(os.listdir(target)) - set(manifest.files)) if os.path.isdir(target) else [target]
            if others or os.path.islink(target):
                raise CkptkitError(f"restore_files: {target} holds what is not this checkpoint's "
                                   f"({', '.join(others[:5]) or 'it is a link'}), and restore_files replaces the "
                                   "folder whole; give it a folder of its own, such as one named after {step}")
        parent, base = os.path.split(target)
        tmp = os.path.join(parent, f".{base}.ckptkit-{uuid.uuid4().hex[:12]}")
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(tmp)
        except OSError as exc:
            raise LocalWriteError(f"restore_files: could not make {tmp} ({exc}). {_FILES_ADVICE}") from exc
        try:
            try:
                open(os.path.join(tmp, _FILLED), "w").close()
            except OSError as exc:
                raise LocalWriteError(f"restore_files: could not write into {tmp} ({exc}). {_FILES_ADVICE}") from exc
            for name, entry in manifest.files.items():
                def copy(name: str = name, entry: FileEntry = entry) -> tuple[int, str]:
                    with self.router.call(ref.backend, "open_file", ref=ref, name=name) as src, \
                            reading.LocalCopy(os.path.join(tmp, name), f"a copy of {ref.uri}/{name}", _FILES_ADVICE) as dst:
                        return copy_hashed(src, dst, algorithm_of(entry.digest), limit=entry.size)

                size, digest = self.reader.reading(ref, name, copy)
                if FileEntry(size=size, digest=digest) != entry:
                    raise CorruptCheckpointError(f"{ref.uri}: {name} does not match the manifest "
                                                 f"({size} bytes read, {entry.size} listed, or another checksum)")
            if os.path.lexists(target):
                old = f"{tmp}-old"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    # -- the final model --------------------------------------------------------------------

    def finalize(self, model: torch.nn.Module, step: int, epoch: int | None = None,
                 metrics: Mapping[str, Any] | None = None, algorithm: str | None = None,
                 extra: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None
                 ) -> list[CheckpointRef]:
        """Gather the full model once and publish it to every final backend.

        ``params`` (the model's settings: plain strings, numbers, booleans or None) and ``extra``
        are stored in the final file beside the model, and a registry records ``params`` (MLflow
        logs them as run parameters), so that someone else can rebuild the model.

        A backend that fails does not stop the others. If one failed and no other holds the final
        file where ``ckptkit publish`` can read it back (a registry or a converted copy cannot), it
        is written to a local fallback folder that the error names, for ``ckptkit publish`` later.
        """
        self._check_open()
        if self.config.final is None:
            raise ConfigError("roles.final: no final backends are declared in the config")
        problem = None
        try:
            _refuse_mid_step("finalize")
            step = _count("step", step)
            epoch = None if epoch is None else _count("epoch", epoch)
            extra_state = _extra_state(extra, "extra")
            model_params = _params(params)
        except Exception as exc:  # e.g. extra given on rank 0 only, and refused there
            problem = exc
        # Before any collective of the model's: a refusal on one rank is raised on every rank.
        self.coll.agree(f"finalize step {step}: check state", problem)
        is_async = self.config.resume is not None and self.config.resume.async_
        previous = self._async.collect(f"finalize step {step}") if is_async else None
        self._settle_prune()
        problem, state = None, {}
        try:
            state = gather.final_state(model, self.config.final.dtype)
        except RuntimeError as exc:  # rank 0's cast, after the gather: every rank raises
            if not safeload.out_of_memory(exc):
                raise
            cast = f" and casting it to {self.config.final.dtype}" if self.config.final.dtype else ""
            problem = MemoryError(f"finalize step {step}: this machine ran out of memory gathering the final model"
                                  f"{cast} ({str(exc).splitlines()[0]}); nothing was published, and the resume "
                                  "checkpoints are as they were. Publish its resume checkpoint where there is memory "
                                  f"with: {self._command('publish', '--step', str(step))}")
            problem.__cause__ = exc
        self.coll.agree(f"finalize step {step}: final state", problem)
        algorithm = algorithm or self.config.algorithm

        def publish() -> tuple[list[CheckpointRef], tuple[str, dict[str, CkptkitError]] | None]:
            told, training_id = self._training_of(step)
            if not told:
                log.warning("finalize step %d: the resume checkpoints could not all be read, so the final model is "
                            "published as this process's own training, whichever saved step %d", step, step)
            body = {"model": state, "step": step, "epoch": epoch, "metrics": _metrics(metrics),
                    "algorithm": algorithm, "extra": extra_state, "params": model_params}
            payload = Payload(
                run_name=self.run_name, step=step, epoch=epoch, format="torch", role="final",
                files=(PayloadFile(FINAL_FILE, write=torch_writer(body)),),
                metrics=_metrics(metrics), mlflow_run_id=self._tracking_run_id(), params=model_params,
                training_id=training_id or self._training_id,
            )
            saved, failures = fanout.store_each(self.router, self.run_name, Role.FINAL, payload, "publish_final",
                                                algorithm=algorithm, model=model, state=state)
            if not failures:
                return saved, None
            where = [r.uri for r in saved]
            if not any(fanout.holds_files(r, payload) and callable(getattr(self.router.instances.get(r.backend),
                                                                           "final_ref", None)) for r in saved):
                try:
                    where.append(self._write_fallback(payload))
                except Exception as exc:  # the backends' failures are the ones to fix: kept, not replaced
                    # Named so that no backend can be called it, as "(all)".
                    failures = {**failures, "(fallback folder)": exc}
                    held = f"it is held only at {', '.join(where)}" if where else "it is stored nowhere"
                    return saved, (f"the final model did not reach every final backend "
                                   f"({fanout.describe_failures(failures)}), nor the fallback folder "
                                   f"{self.fallback_dir}: {held}. Fix what the errors say (or pass a fallback_dir "
                                   "this process may write, with room), then call finalize again", failures)
            where = ", ".join(where)
            return saved, (f"the final model did not reach every final backend "
                           f"({fanout.describe_failures(failures)}); it is saved at {where}; retry with: "
                           f"{self._publish_command(failures)}", failures)

        status, result = self.coll.on_rank0(f"finalize step {step}", publish)
        saved, problem = result if status == "ok" else ([], (str(result), {"(all)": result}))
        # The last resume save's outcome, reported once the final model is safe, and with what
        # became of it: raised alone, it hid where a failed publish left the model, and that a
        # publish that worked needs no second finalize (a registry would hold it twice).
        resume_failure = self._save_error(*previous) if previous is not None else None
        if resume_failure is not None and self.on_error != "raise":
            self._fail(resume_failure)  # a warning
            resume_failure = None
        if problem:
            message, failures = problem
            if resume_failure is not None:
                message += f". The last resume save failed too: {resume_failure}"
            self._fail(PublishError(message, failures, saved))
        if resume_failure is not None:
            published = ", ".join(r.uri for r in saved) or "nowhere, as no final backend stores a copy"
            # ``saved`` holds the final model's copies too (role "final"), as finalize would return them.
            raise SaveError(f"{resume_failure}. The final model of step {step} was published all the same, to "
                            f"{published}: finalize need not run again", resume_failure.failures,
                            [*resume_failure.saved, *saved]) from resume_failure.__cause__
        return saved

    def final_held(self, step: int) -> bool | None:
        """Whether every final backend holds a final model of this training from ``step`` on (the
        furthest it holds of the training that saved or restored here, else of the one that
        committed the run's resume checkpoint of ``step`` (see ``_training_of``), is of that
        step or a later one, by ``final_step``, else ``final_ref``): True or False, or None when
        some backend cannot tell (a type with neither hook, a store that did not answer, a
        damaged final model). Collective under torch.distributed: every rank
        calls it; rank 0 asks, and every rank gets its answer.

        For a training that finds itself finished at a restart: a job stopped inside
        ``finalize`` published nothing, and publishes unless this is True.
        """
        self._check_open()
        if self.config.final is None:
            return True

        def ask() -> bool | None:
            told, training_id = self._training_of(step)
            if not told:
                return None
            answers: list[bool | None] = []
            for name in self.router.backends(Role.FINAL):
                backend = self.router.instances[name]
                try:
                    if callable(getattr(backend, "final_step", None)):
                        newest = self.router.call_blaming(name, "final_step", storage_errors=True,
                                                          run_name=self.run_name, algorithm=self.config.algorithm,
                                                          training_id=training_id)
                    elif callable(getattr(backend, "final_ref", None)):
                        ref = self.router.call_blaming(name, "final_ref", storage_errors=True, run_name=self.run_name)
                        newest = None if ref is None else ref.step
                    else:
                        answers.append(None)
                        continue
                except Exception as exc:  # unreadable or unreachable: not known to hold it
                    log.warning("could not tell whether backend %r holds the final model of run %r: %s", name,
                                self.run_name, exc)
                    answers.append(None)
                    continue
                answers.append(isinstance(newest, int) and newest >= step)
            return False if False in answers else None if None in answers else True

        status, result = self.coll.on_rank0(f"final model of step {step} held", ask)
        return result if status == "ok" else None

    def _training_at(self, copies: list[CheckpointRef]) -> str | None:
        """Rank 0: the training that committed the checkpoint of which ``copies`` are the copies
        (one per backend), from the first that can be read; None where none can."""
        if ranks.rank() != 0:
            return None
        for ref in copies:
            try:
                return training_of(self.reader.manifest(ref))
            except CkptkitError:
                continue
        return None

    def _training_of(self, step: int) -> tuple[bool, str | None]:
        """Rank 0: whether it can tell, and the training whose final model of ``step`` this one
        publishes or asks after. Its own (carried on from the checkpoint it restored) once it
        saved or restored; else, for a trainer that resumed by its own means (not through
        ``restore``), the one that committed the run's resume checkpoint of ``step``, or the
        newest one (that of ``step`` pruned); None (any) where the run holds none. Cannot tell
        where a store that did not answer may hold one."""
        if self._last_step is not None:
            return True, self._training_id
        try:
            refs, unreachable = self.reader.list_all()
            for ref in sorted(refs, key=lambda r: r.step != step):  # that of step first, then newest first
                try:
                    return True, training_of(self.reader.manifest(ref))
                except StorageUnavailableError:
                    return False, None
                except CkptkitError:
                    continue  # damaged: the next one
        except CkptkitError:
            return False, None
        return not unreachable, None

    def _write_fallback(self, payload: Payload) -> str:
        from .local import LocalBackend

        backend = LocalBackend.from_config("fallback", {"path": self.fallback_dir})
        ref = backend.publish_final(run_name=self.run_name, payload=payload)
        return ref.uri

    def close(self) -> None:
        """Finish pending work, release the backends and ckptkit's own process group. Safe to call twice.

        In a process forked from the one that made the manager (a data loader's worker) it only
        marks the manager closed: the save in flight, the backends and the group are the parent's."""
        if not self._closed and os.getpid() != self._pid:
            self._closed = True
            self.coll.close()  # lets the group go without touching it
            return
        if not self._closed:
            try:
                self.wait()
            finally:
                self._closed = True
                try:
                    self._async.shutdown()
                    if self._pruner is not None and self._pruner[0] == os.getpid():
                        self._pruner[1].shutdown(wait=True)
                    self.router.close()
                finally:
                    self.coll.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as failure:
            # What stopped the training is the exception on its way out; a save that failed
            # meanwhile is told beside it, not raised in its place.
            log.error("closing the checkpoint manager while %s propagated: %s", exc_type.__name__, failure)
            if hasattr(exc, "add_note"):
                exc.add_note(f"ckptkit: closing the checkpoint manager failed too: {failure}")
