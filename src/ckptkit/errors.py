"""Exceptions raised by ckptkit. Each one names what failed and says what to do.

Every error ckptkit raises on purpose is a ``CkptkitError``. An error caused by another keeps it
as ``__cause__`` (``raise ... from exc``), so code can look past the message to what happened.
"""

from __future__ import annotations

from typing import Any


class CkptkitError(Exception):
    """Base class of every error ckptkit raises on purpose."""


class ConfigError(CkptkitError, ValueError):
    """The configuration is invalid; raised before any training step."""


class PluginError(CkptkitError):
    """A backend plugin could not be loaded or does not fit the hook specifications."""


class BackendError(CkptkitError):
    """A backend failed to store, list, read or delete a checkpoint."""

    # Whether what the backend held is as it was before the failed call: False where the store
    # may hold the step after all, or a copy committed before was damaged or removed (the
    # message says which).
    held_as_it_was = True

    def __init__(self, backend: str, message: str):
        self.backend = backend
        self.detail = message
        prefix = f"backend {backend!r}: "
        super().__init__(message if message.startswith(prefix) else prefix + message)

    def __reduce__(self):
        return (type(self), (self.backend, self.detail), {"held_as_it_was": self.held_as_it_was})


class FaultyAnswerError(BackendError):
    """A backend plugin's hook answered what its contract does not allow (a ref of another step,
    not a ref at all): it ran, so what it did to its store is not known."""


class StorageUnavailableError(BackendError):
    """A backend's storage could not be reached, listed or read (retries included).

    Raised by ``restore`` when no checkpoint was found and some resume backend could not be
    listed: "nothing to resume" would be a guess, and training from step 0 would lose work.
    """


class StorageFullError(BackendError):
    """The storage ran out of space (or quota) while a checkpoint was written."""


class LocalWriteError(CkptkitError):
    """This machine could not write a file that a checkpoint is read into: the scratch copy of a
    remote checkpoint that a restore, verify, export or publish downloads, or ``restore_files``'
    folder. A full or read-only disk here, not damage to the checkpoint, nor its storage's
    failure: the error names the file and its ``__cause__`` is the ``OSError``."""


class CheckpointError(CkptkitError):
    """A stored checkpoint is missing, corrupt or cannot be loaded safely."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files or manifest disagree with what was committed; restore skips it."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No committed checkpoint of the step asked for (``restore(step=...)``, ``peek(step=...)``,
    ``export(step=...)``, ``ckptkit publish --step``), or of any step where one was needed
    (``ckptkit ls`` and ``ckptkit verify`` of a run with none; ``step`` is -1 then).

    Raised only when every resume backend answered; with one that could not be listed,
    ``StorageUnavailableError`` is raised instead, since the step may lie there. ``run_name``,
    ``step`` and ``available`` (the committed steps found, newest first) say which.
    """

    def __init__(self, message: str, run_name: str = "", step: int = -1, available: tuple[int, ...] = ()):
        self.run_name = run_name
        self.step = step
        self.available = tuple(available)
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.run_name, self.step, self.available))


class UnsafeCheckpointError(CheckpointError):
    """Loading the checkpoint would need to rebuild objects that safe loading refuses.

    Nothing from the file was executed. Never skipped silently: it is either an attack or a
    type the trainer has to allow by name (``safe_globals=``).
    """


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint is intact but does not fit what ``restore`` was asked to fill."""


class RunConflictError(CkptkitError):
    """A new training would write into a run that already holds newer checkpoints of another one.

    Raised by the first ``save`` of a manager that did not restore from the run, when the run's
    newest committed step is at or above the step being saved; by a ``save`` of a step below one
    the same manager saved or restored (its steps went back); and by every ``save`` after
    ``restore(step=N)`` while the run holds checkpoints newer than N (new saves would be pruned
    by the newer steps, and a plain restore would resume those). ``run_name`` and
    ``newest_step`` say which.
    """

    def __init__(self, message: str, run_name: str = "", newest_step: int = -1):
        self.run_name = run_name
        self.newest_step = newest_step
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.run_name, self.newest_step))


class UnstorableStateError(CkptkitError, TypeError):
    """``save`` was given state that safe loading could not rebuild; refused before anything is written."""


class SaveError(CkptkitError):
    """A save did not reach every backend declared for its role.

    ``failures`` maps each backend name that failed to its exception (a ``CkptkitError`` whose
    ``__cause__`` is the original one); ``saved`` lists the references that did commit, so
    nothing that was stored is lost from view.
    """

    def __init__(self, message: str, failures: dict, saved: list):
        self.failures = failures
        self.saved = saved
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.failures, self.saved))


class PruneError(BackendError):
    """A pruning by hand (``CheckpointManager.prune``) failed on some resume backends after it
    pruned the others. ``backend`` names the first that failed; ``failures`` maps each one to its
    exception; ``result`` (a ``PruneResult``) holds what was deleted on the others, so that no
    deletion goes untold."""

    def __init__(self, backend: str, message: str, failures: dict | None = None, result: Any = None):
        super().__init__(backend, message)
        self.failures = failures or {}
        self.result = result

    def __reduce__(self):
        return (type(self), (self.backend, self.detail, self.failures, self.result))


class PublishError(SaveError):
    """The final model did not reach every final backend; it stays where it was saved."""


class RanksOutOfStepError(CkptkitError):
    """The ranks of a distributed job did not meet in ckptkit's collectives as they must.

    Raised on every rank that is still running, instead of waiting for the process group's
    own timeout. ``RanksDisagreeError`` and ``CollectiveTimeoutError`` say how.
    """


class RanksDisagreeError(RanksOutOfStepError):
    """The ranks differ where they must agree: their configs, run names, or the ckptkit call each is in."""


class CollectiveTimeoutError(RanksOutOfStepError):
    """A rank waited longer than ``distributed.timeout_s`` for the others in one of ckptkit's collectives."""
