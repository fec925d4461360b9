"""The hook specifications every backend implements.

A backend *type* is a class found through the ``ckptkit.backends`` entry-point group. The
manager builds one instance per backend declared in the config and registers it with the
plugin manager under its config name. For a role, only the instances declared for that role are
called, one at a time, so that one failing backend never stops or undoes another. Every hook is
called with keyword arguments only; an implementation may accept fewer arguments than a spec
lists, which is how specs grow without breaking older plugins, except those of
``plugins.REQUIRED_ARGUMENTS`` (``prune``'s ``dry_run`` and ``protected_steps``, ``delete_run``'s
``dry_run``): left out, they would delete what they protect.

A type serves the ``resume`` role when it implements ``save_resume``, ``list_checkpoints``,
``read_manifest``, ``open_file`` and ``prune``, and sharded resume checkpoints (``format: dcp``)
when it also implements ``stage_sharded``, ``commit_sharded`` and ``discard_sharded``; it serves
the ``final`` role when it implements ``publish_final``. Declaring a backend for a role (or a
format) its type does not serve is a config error.

Everything ckptkit *calls* on a backend is a hook below, marked with ``hookimpl``; a method
named like a hook but not marked is refused when the type is loaded, since it would never be
called. Everything ckptkit *reads* from a backend besides its hooks is listed in
``BACKEND_ATTRIBUTES`` and checked when the type is loaded (class attributes) and when an
instance is built from the config (instance attributes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Mapping

import attrs
import pluggy

from ._project import PROJECT_NAME

if TYPE_CHECKING:
    from .checkpoint import CheckpointRef, Payload
    from .manifest import Manifest

_hookspec = pluggy.HookspecMarker(PROJECT_NAME)


class HookimplMarker(pluggy.HookimplMarker):
    """Marks a method of a backend class as its implementation of the ckptkit hook of that name.

    Use it bare (``@hookimpl``) or with pluggy's options (``@hookimpl(trylast=True)`` makes a
    ``publish_final`` run after the other final backends'). The method may take any subset of
    the spec's arguments, by the spec's names, without default values. Import it as
    ``from ckptkit.plugin import hookimpl`` (``ckptkit.hookimpl`` is the same object).
    """


hookimpl = HookimplMarker(PROJECT_NAME)


@attrs.frozen
class AttributeSpec:
    """An attribute ckptkit reads from a backend besides its hooks; all are optional.

    ``on`` says where it is looked up: ``"class"`` (checked when the type is loaded) or
    ``"instance"`` (checked when ``from_config`` has built an instance; a value set on the
    class is checked there too). ``kind`` says in words what the value must be, ``check``
    tests it, and ``doc`` says what ckptkit does with it.
    """

    name: str
    on: str
    kind: str
    doc: str
    check: Callable[[Any], bool] = attrs.field(repr=False)


def _is_role_hints(value: Any) -> bool:
    roles = ("resume", "final")
    return isinstance(value, Mapping) and all(k in roles and isinstance(v, str) for k, v in value.items())


def _is_filesystem(value: Any) -> bool:
    import fsspec

    return isinstance(value, fsspec.AbstractFileSystem)


def _is_retry_policy(value: Any) -> bool:
    from .retry import RetryPolicy

    return isinstance(value, RetryPolicy)


def _is_strings(value: Any) -> bool:
    return isinstance(value, (tuple, list, frozenset, set)) and all(isinstance(v, str) for v in value)


BACKEND_ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec(
        "ROLE_HINTS", "class", "a dict from a role name (resume, final) to a sentence",
        "Added to the config error when the type is declared for a role it does not serve, to say "
        "why (mlflow: it never holds resume checkpoints).", _is_role_hints),
    AttributeSpec(
        "keeps_files_locally", "instance", "a bool",
        "True when committed files sit on this machine's disk: the backend then goes first among "
        "the resume backends so that the others copy its bytes, and dcp shards are fsynced.",
        lambda v: isinstance(v, bool)),
    AttributeSpec(
        "fs", "instance", "an fsspec.AbstractFileSystem",
        "The filesystem every rank writes dcp shards through (between stage_sharded and "
        "commit_sharded), and restore and export read them through. Needed by a type that "
        "implements the sharded hooks; with root, it is the location ckptkit check shows.",
        _is_filesystem),
    AttributeSpec(
        "root", "instance", "a str",
        "The folder on fs that holds the runs; without a location, ckptkit check shows "
        "fs.unstrip_protocol(root).",
        lambda v: isinstance(v, str)),
    AttributeSpec(
        "location", "instance", "a str",
        "Where the backend stores things, without credentials, shown by ckptkit check (before "
        "fs.unstrip_protocol(root), which may leave out a server); FileBackend sets it to uri(root).",
        lambda v: isinstance(v, str)),
    AttributeSpec(
        "retry", "instance", "a ckptkit.plugin.RetryPolicy",
        "How restore and verify retry a read of a whole file that failed transiently (open_file "
        "retries only the open).", _is_retry_policy),
    AttributeSpec(
        "secrets", "instance", "a tuple of str",
        "Strings (keys, tokens) scrubbed from the messages of errors raised while reading this "
        "backend's files.", _is_strings),
)


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
        same bytes) with ``expected`` (their size and checksum); for a final model stored on an
        object store before, ``write`` with ``expected`` (that copy's size and checksum, which
        serialising it again gives too). ``payload.manifest(files)``
        builds the manifest, which must be written last, once every file is stored: its
        presence is the commit. ``payload.concurrency`` is how many files may be written at
        the same time (``roles.resume.write_threads``); writing them one after the other is
        correct too.

    :return: a ``CheckpointRef`` to the committed checkpoint: this backend's name, the payload's
        run and step (any other ref is reported as the plugin's fault, and the save as failed on
        this backend). Raise on failure, after removing
        or leaving uncommitted whatever was written; never touch other checkpoints. A step that
        is committed here already is replaced whole (no file of its old copy stays), and a
        failure before the new copy is complete should leave the old one committed:
        ``FileBackend`` uploads the new files beside it first.
    """


@_hookspec
def list_checkpoints(run_name: str) -> list[CheckpointRef]:
    """List the committed resume checkpoints of a run, in any order.

    Called by ``restore``, ``export``, ``ckptkit ls`` and ``ckptkit verify``, once per resume
    backend (on rank 0 when distributed; at a restore, a backend that ``keeps_files_locally`` is
    also listed by one rank per machine, to tell disks that the ranks do not share). A folder
    without a manifest is not committed and must not be listed. Remote backends should answer
    from one listing rather than one request per checkpoint.

    :param run_name: the run whose checkpoints to list; a run whose name begins with this one
        (``exp-2`` for ``exp``) is another run, and none of its checkpoints is listed.
    :return: a list of ``CheckpointRef`` of this backend and ``run_name``, empty when the run
        has none (a ref of another run or backend is refused as the plugin's fault). Raise
        ``StorageUnavailableError`` (keeping the cause) when the storage could not be listed,
        retries included: ``restore`` must not take that for a run without checkpoints.
    """


@_hookspec
def read_manifest(ref: CheckpointRef) -> Manifest:
    """Read the manifest of a checkpoint that ``list_checkpoints`` returned.

    :param ref: the checkpoint.
    :return: its ``Manifest``. Raise ``CheckpointError`` when it is missing or unreadable, and
        ``StorageUnavailableError`` when the storage did not answer (retries included), which
        says nothing about the checkpoint. ``Manifest.from_json`` raises ``NewerManifestError``
        (a ``ValueError``) for a manifest of a newer ckptkit: raise ``IncompatibleCheckpointError``
        for it, as ``FileBackend`` does, and never delete such a checkpoint in ``prune``.
    """


@_hookspec
def open_file(ref: CheckpointRef, name: str) -> BinaryIO:
    """Open one file of a checkpoint for reading.

    Called by ``restore`` and ``verify`` after the manifest was read.

    :param ref: the checkpoint.
    :param name: a file name from its manifest.
    :return: a binary file object, usable as a context manager; the caller closes it. It must
        give the file's bytes whole: restore compares them with the manifest's size and digest
        and skips a checkpoint that does not match as damaged. A file that is not there raises
        ``FileNotFoundError`` (damage too); a store that does not answer raises ``OSError``
        (or ``StorageUnavailableError``), which restore does not take for damage.
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

    :param run_name: the run to prune, and no other: a run whose name begins with this one
        (``exp`` and ``exp-2``) is another run, whose checkpoints are never listed or deleted.
    :param keep_last: how many committed checkpoints to keep, at least 1 (below 1 raises
        ``ValueError``, deleting nothing).
    :param protected_steps: steps that must survive (the save just made, ``keep_best``).
    :param dry_run: when true, report what would be deleted and delete nothing.
    :param counted_steps: None, or the steps taken for intact: the manager passes the steps it
        wrote (checksummed while written), the one it verified when it restored and the older
        ones that restore did not skip; ``ckptkit prune`` passes the steps it has just verified
        by reading every byte. A checkpoint found damaged after its commit must not push intact
        ones out of ``keep_last``, so only these steps
        count toward it. A committed checkpoint newer than the oldest counted one that is kept
        is never deleted, and when fewer than ``keep_last`` counted checkpoints exist, nothing
        is deleted but leftovers, so a run is never left without a checkpoint that verifies.
        (A committed checkpoint whose files disagree in size with its manifest is a leftover.)
        A backend that ignores it counts every committed checkpoint, so one damaged after its
        commit can push intact ones out; the conformance suite fails such a backend.
    :return: the ``CheckpointRef`` of every checkpoint or leftover deleted (or that would be).
    """


@_hookspec
def delete_run(run_name: str, dry_run: bool) -> list[CheckpointRef]:
    """Delete every resume checkpoint of a run, the newest included, and its leftovers.

    Called only by ``ckptkit prune --all``, when a person wants a run name free for a new
    training. The final models (``final/``, ``final-2/``...) are not resume checkpoints and stay.

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

    :param run_name: the run, as given to ``stage_sharded``.
    :param step: the step, as given to ``stage_sharded``.
    :param path: what ``stage_sharded`` returned.
    :param payload: the checkpoint's metadata; its ``files`` are empty.
    :param files: every file in the folder, name to ``FileEntry`` (size and digest), gathered
        from all ranks.
    :return: a ``CheckpointRef`` to the committed checkpoint, of this backend, the run and
        the step (any other is refused as the plugin's fault).
    """


@_hookspec
def discard_sharded(path: str) -> None:
    """Remove a staged folder whose save failed on some rank.

    Called on rank 0 only, when some rank failed to write its shards or the commit failed.

    :param path: what ``stage_sharded`` returned.
    :return: nothing. Must not raise for a folder that is already gone.
    """


@_hookspec
def publish_final(run_name: str, payload: Payload, stored: list[CheckpointRef],
                  algorithm: str | None, model: Any | None, state: dict[str, Any]) -> CheckpointRef:
    """Store the final model.

    Called by ``CheckpointManager.finalize`` and ``ckptkit publish`` on the writing rank, once
    for each backend declared under ``roles.final``. Implementations marked ``trylast`` are
    called after the others, so a registry can refer to a copy a file backend already holds.
    A model published before is never replaced: a registry may point at its bytes, so a later
    one of the run goes beside it (``FileBackend``: ``final-2/``, ``final-3/``...).

    :param run_name: the run the model belongs to.
    :param payload: the final model's files (``final_model.pt``), as for ``save_resume``.
    :param stored: where earlier final backends of this call already committed the same model.
    :param algorithm: a free-form tag for the model (``{algorithm}`` in names), or None.
    :param model: the ``torch.nn.Module`` given to ``finalize`` (None from ``ckptkit publish``),
        for a registry that logs a framework-flavoured model instead of the file.
    :param state: the model state that ``final_model.pt`` holds under ``"model"`` (names to CPU
        tensors, cast to ``roles.final.dtype``), in memory; from ``ckptkit publish``, loaded from
        the verified source. A backend that converts the model (safetensors, another dtype)
        reads it here instead of loading the file again; it must not modify it.
    :return: a ``CheckpointRef`` to where the model now lives, of this backend and the
        payload's run (any other is refused as the plugin's fault). A backend that stores a
        converted model sets its ``sizes`` to the files it wrote, so that the ref is not taken
        for a copy of ``final_model.pt`` (in ``stored``, or as a place ``ckptkit publish`` can
        read the model back from).
    """


@_hookspec(firstresult=True)
def tracking_run_id(run_name: str, resumed_run_id: str | None) -> str | None:
    """Name the experiment-tracking run that checkpoints of this run belong to.

    Called by the manager on rank 0 at ``restore``, at every ``save`` call until a backend
    answers, and by ``finalize``, on the final backends. It sits on the training's critical
    path, so it must return at once: look the run up in the background on the first call
    (bounded by the backend's own timeouts) and return None until it is known. The first
    non-None result wins and is stored in every later manifest, so a restored training
    continues the same tracking run.

    :param run_name: the ckptkit run name.
    :param resumed_run_id: the run id found in the checkpoint that was restored, if any.
    :return: a run id, or None when this backend does not track runs or does not know it yet.
    """


@_hookspec
def probe() -> dict[str, Any]:
    """Touch the backend's storage for ``ckptkit check --probe``.

    Called once per configured backend, on the process that runs the command; takes no argument.

    :return: a dict from an operation (``write``, ``list``, ``delete``, ...) to ``"ok"`` or a
        one-line reason it failed. Must clean up after itself.
    """


@_hookspec
def final_ref(run_name: str) -> CheckpointRef | None:
    """Find the newest committed final model of a run in this backend.

    Called by ``ckptkit publish`` directly on each configured backend (and on the local fallback
    folder), to find stored final models to send and to skip backends that already hold
    identical bytes; and by ``CheckpointManager.final_held`` on rank 0, when a training finds
    itself finished at a restart. ``FileBackend`` implements it; a registry answers with
    ``find_published`` and ``final_step``.

    :param run_name: the run.
    :return: a ``CheckpointRef`` (role ``final``) whose manifest ``read_manifest`` can read, or
        None when this backend holds no final model of the run.
    """


@_hookspec
def find_published(run_name: str, digest: str, algorithm: str | None) -> CheckpointRef | None:
    """Find a published final model with the given checksum, for a backend without ``final_ref``.

    Called by ``ckptkit publish`` directly on each final backend before it sends a model; a
    backend that answers with a ref is skipped (unless ``--force``).

    :param run_name: the run the model belongs to.
    :param digest: the final file's checksum, ``"<algorithm>:<hex>"`` as in a ``FileEntry``.
    :param algorithm: the model's tag, as passed to ``publish_final``, or None.
    :return: a ``CheckpointRef`` to where the same bytes are already published, or None.
    """


@_hookspec
def final_step(run_name: str, algorithm: str | None, training_id: str | None) -> int | None:
    """Tell the highest step among the final models of a run that this backend holds (not the
    newest one's: ``ckptkit publish --step`` of an older step publishes last).

    Called by ``CheckpointManager.final_held`` on rank 0, directly on each final backend, when a
    training finds itself finished at a restart (the Lightning and transformers integrations):
    a job stopped inside ``finalize`` published nothing, and is published then. ``FileBackend``
    implements it; a final backend with neither this hook nor ``final_ref`` cannot tell, and
    the restart then warns and publishes nothing.

    :param run_name: the run.
    :param algorithm: the model's tag, as passed to ``publish_final``, or None.
    :param training_id: the training asked after (``Payload.training_id`` of the final models it
        publishes: the one whose checkpoints the asking manager saved or restored, else the one
        that committed the run's resume checkpoint of that step, or its newest), or None for
        any (the run holds no resume checkpoint to tell it by). A backend that records each final model's ``training_id`` counts only that
        training's and those that name none (written before they did): another training of the
        same run name (a colleague's, another experiment's, the name used again after ``ckptkit
        prune --all``) holds none of this one's.
    :return: the step, or None when this backend holds no final model of the run.
    """


@_hookspec
def close() -> None:
    """Release what the backend holds (clients, connections, thread pools).

    Called by ``CheckpointManager.close()`` directly on every backend instance built from the
    config, declared for a role or not, after it was unregistered; called once.

    :return: nothing. Should not raise.
    """


@_hookspec
def check_final(run_name: str, algorithm: str | None) -> list[str]:
    """Say what would make a later publish of this run fail, before training starts.

    Called by ``ckptkit check`` on each final backend (problems make it exit 1) and by
    ``CheckpointManager.from_config`` (logged as warnings, since ``finalize(algorithm=...)``
    may still supply what the config lacks). Optional; needs no network.

    :param run_name: the run.
    :param algorithm: the config's ``algorithm``, or None.
    :return: one line per problem, naming the key and how to fix it; empty when there is none.
    """
