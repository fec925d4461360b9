"""The hook specifications every backend implements.

A backend *type* is a class found through the ``ckptkit.backends`` entry-point group. The
manager builds one instance per backend declared in the config and registers it with the
plugin manager under its config name. For a role, only the instances declared for that role are
called, one at a time, so that one failing backend never stops or undoes another. Every hook is
called with keyword arguments only; an implementation may accept fewer arguments than a spec
lists, which is how specs grow without breaking older plugins.

A type serves the ``resume`` role when it implements ``save_resume``, ``list_checkpoints``,
``read_manifest``, ``open_file`` and ``prune``, and sharded resume checkpoints (``format: dcp``)
when it also implements ``stage_sharded``, ``commit_sharded`` and ``discard_sharded``; it serves
the ``final`` role when it implements ``publish_final``. Declaring a backend for a role (or a
format) its type does not serve is a config error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO

import pluggy

from ._project import PROJECT_NAME

if TYPE_CHECKING:
    from .checkpoint import CheckpointRef, Payload
    from .manifest import Manifest

_hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@_hookspec
def save_resume(run_name: str, step: int, payload: Payload) -> CheckpointRef:
    """Store and commit one resume checkpoint.

    Called by ``CheckpointManager.save`` on the writing rank when a step is due, once for each
    backend declared under ``roles.resume``, in config order, except that backends which keep
    files on local disk go first so that the others can copy their bytes.

    :param run_name: the folder under the backend's root, already checked to be a safe name.
    :param step: the training step; the checkpoint's folder is ``step-<step, zero-padded>``.
    :param payload: the files to write, in order. A file carries either ``write`` (a callable
        that streams the content into an open binary file) or ``source`` (the local path of the
        same bytes) with ``expected`` (their size and checksum). ``payload.manifest(files)``
        builds the manifest, which must be written last: its presence is the commit.

    :return: a ``CheckpointRef`` to the committed checkpoint. Raise on failure, after removing
        or leaving uncommitted whatever was written; never touch other checkpoints.
    """


@_hookspec
def list_checkpoints(run_name: str) -> list[CheckpointRef]:
    """List the committed resume checkpoints of a run, in any order.

    Called by ``restore``, ``export``, ``ckptkit ls`` and ``ckptkit verify``, once per resume
    backend (on rank 0 when distributed). A folder without a manifest is not committed and must
    not be listed. Remote backends should answer from one listing rather than one request per
    checkpoint.

    :param run_name: the run whose checkpoints to list.
    :return: a list of ``CheckpointRef``, empty when the run has none. Raise
        ``StorageUnavailableError`` (keeping the cause) when the storage could not be listed,
        retries included: ``restore`` must not take that for a run without checkpoints.
    """


@_hookspec
def read_manifest(ref: CheckpointRef) -> Manifest:
    """Read the manifest of a checkpoint that ``list_checkpoints`` returned.

    :param ref: the checkpoint.
    :return: its ``Manifest``. Raise ``CheckpointError`` when it is missing or unreadable, and
        ``StorageUnavailableError`` when the storage did not answer (retries included), which
        says nothing about the checkpoint.
    """


@_hookspec
def open_file(ref: CheckpointRef, name: str) -> BinaryIO:
    """Open one file of a checkpoint for reading.

    Called by ``restore`` and ``verify`` after the manifest was read.

    :param ref: the checkpoint.
    :param name: a file name from its manifest.
    :return: a binary file object, usable as a context manager; the caller closes it.
    """


@_hookspec
def prune(run_name: str, keep_last: int, protected_steps: frozenset[int],
          dry_run: bool, counted_steps: frozenset[int] | None) -> list[CheckpointRef]:
    """Delete all but the newest ``keep_last`` committed checkpoints of a run.

    Called by the manager after each committed resume save, once per backend that committed
    it, and by ``ckptkit prune``. The newest committed checkpoint is never deleted, whatever
    ``keep_last`` says, nor one that is being written or uploaded. Leftovers of crashed saves
    (folders without a manifest, unfinished uploads) may be removed once they are older than the
    backend's grace period.

    :param run_name: the run to prune.
    :param keep_last: how many committed checkpoints to keep, at least 1.
    :param protected_steps: steps that must survive (the save just made, ``keep_best``).
    :param dry_run: when true, report what would be deleted and delete nothing.
    :param counted_steps: None, or the steps known to be intact: the manager passes the steps
        it wrote (checksummed while written) or verified when it restored; ``ckptkit prune``
        passes the steps it has just verified by reading every byte. A checkpoint damaged
        after its commit must not push intact ones out of ``keep_last``, so only these steps
        count toward it. A committed checkpoint newer than the oldest counted one that is kept
        is never deleted, and when fewer than ``keep_last`` counted checkpoints exist, nothing
        is deleted but leftovers, so a run is never left without a checkpoint that verifies.
        (A committed checkpoint whose files disagree in size with its manifest is a leftover.)
        A backend that ignores it counts every committed checkpoint.
    :return: the ``CheckpointRef`` of every checkpoint or leftover deleted (or that would be).
    """


@_hookspec
def delete_run(run_name: str, dry_run: bool) -> list[CheckpointRef]:
    """Delete every resume checkpoint of a run, the newest included, and its leftovers.

    Called only by ``ckptkit prune --all``, when a person wants a run name free for a new
    training. The final model (``final/``) is not a resume checkpoint and stays.

    :param run_name: the run to empty.
    :param dry_run: when true, report what would be deleted and delete nothing.
    :return: the ``CheckpointRef`` of everything deleted (or that would be).
    """


@_hookspec
def stage_sharded(run_name: str, step: int) -> str:
    """Prepare the folder that the shards of a sharded (``format: dcp``) checkpoint go into.

    Called by ``CheckpointManager.save`` on rank 0 only, once per resume backend, before every
    rank writes its shards with ``torch.distributed.checkpoint`` through the backend instance's
    ``fs`` attribute (an fsspec filesystem), which every rank's instance must have. Nothing in
    the folder counts as committed until ``commit_sharded``.

    :param run_name: the run.
    :param step: the step being saved.
    :return: the folder's path on ``fs``; rank 0 broadcasts it to the other ranks.
    """


@_hookspec
def commit_sharded(run_name: str, step: int, path: str, payload: Payload,
                   files: dict[str, Any]) -> CheckpointRef:
    """Commit a sharded checkpoint once every rank has written its shards into ``path``.

    Called on rank 0 only, after a barrier. Writes the manifest last (and, on local disk,
    renames the folder into place).

    :param path: what ``stage_sharded`` returned.
    :param payload: the checkpoint's metadata; its ``files`` are empty.
    :param files: every file in the folder, name to ``FileEntry`` (size and digest), gathered
        from all ranks.
    :return: a ``CheckpointRef`` to the committed checkpoint.
    """


@_hookspec
def discard_sharded(path: str) -> None:
    """Remove a staged folder whose save failed on some rank. Called on rank 0 only."""


@_hookspec
def publish_final(run_name: str, payload: Payload, stored: list[CheckpointRef],
                  algorithm: str | None, model: Any | None) -> CheckpointRef:
    """Store the final model.

    Called by ``CheckpointManager.finalize`` and ``ckptkit publish`` on the writing rank, once
    for each backend declared under ``roles.final``. Implementations marked ``trylast`` are
    called after the others, so a registry can refer to a copy a file backend already holds.

    :param run_name: the run the model belongs to.
    :param payload: the final model's files (``final_model.pt``), as for ``save_resume``.
    :param stored: where earlier final backends of this call already committed the same model.
    :param algorithm: a free-form tag for the model (``{algorithm}`` in names), or None.
    :param model: the ``torch.nn.Module`` given to ``finalize`` (None from ``ckptkit publish``),
        for a registry that logs a framework-flavoured model instead of the file.
    :return: a ``CheckpointRef`` to where the model now lives.
    """


@_hookspec(firstresult=True)
def tracking_run_id(run_name: str, resumed_run_id: str | None) -> str | None:
    """Name the experiment-tracking run that checkpoints of this run belong to.

    Called by the manager before each save and by ``finalize``, on the final backends. The first
    non-None result wins and is stored in every manifest, so a restored training continues the
    same tracking run.

    :param run_name: the ckptkit run name.
    :param resumed_run_id: the run id found in the checkpoint that was restored, if any.
    :return: a run id, or None when this backend does not track runs.
    """


@_hookspec
def probe() -> dict[str, Any]:
    """Touch the backend's storage for ``ckptkit check --probe``.

    :return: a dict from an operation (``write``, ``list``, ``delete``, ...) to ``"ok"`` or a
        one-line reason it failed. Must clean up after itself.
    """
