"""Republishing: a stored final or resume checkpoint sent through the final backends again.

``ckptkit publish`` uses this when a final backend failed at ``finalize`` (the model then sits in
another final backend or in the local fallback folder), or to publish a resume checkpoint as the
final model without retraining. Final files are copied as they are; a resume checkpoint's model
state is written once as a final file, in the same form ``finalize`` writes.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable

import attrs
import fsspec

from .checkpoint import CheckpointRef, Payload, PayloadFile
from .errors import (BackendError, CheckpointError, CkptkitError, ConfigError, CorruptCheckpointError,
                     IncompatibleCheckpointError, StorageUnavailableError)
from . import fanout, gather, local, reading, safeload, sharded
from .hashing import HashingWriter, algorithm_of, hash_stream
from .local import LocalBackend
from .fanout import torch_writer
from .manager import FINAL_FILE, CheckpointManager
from .manifest import MANIFEST_NAME, FileEntry, Manifest, training_of
from .redact import redact, secret_values
from .roles import Role
from .split import STATE_FILE


@attrs.frozen
class PublishSource:
    """A stored checkpoint to publish: where it is, what its manifest says, what kind it is."""

    kind: str  # "final" or "resume"
    ref: CheckpointRef
    manifest: Manifest
    backend: str | None  # the configured backend holding it; None for the fallback or a folder

    @property
    def uri(self) -> str:
        return self.ref.uri


@attrs.frozen
class PublishResult:
    """What one ``publish`` did, per backend."""

    source: PublishSource
    published: tuple[CheckpointRef, ...] = ()
    already_held: tuple[CheckpointRef, ...] = ()
    failures: dict[str, str] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": {"kind": self.source.kind, "uri": self.source.uri, "step": self.source.manifest.step,
                       "backend": self.source.backend, "mlflow_run_id": self.source.manifest.mlflow_run_id},
            "published": [{"backend": r.backend, "uri": r.uri} for r in self.published],
            "already_held": [{"backend": r.backend, "uri": r.uri} for r in self.already_held],
            "failures": dict(self.failures),
        }


def _fallback(ck: CheckpointManager, fallback_dir: str | os.PathLike | None) -> LocalBackend:
    return LocalBackend.from_config("fallback", {"path": os.fspath(fallback_dir or ck.fallback_dir)})


def _holding(ck: CheckpointManager, name: str, entry: FileEntry, algorithm: str | None) -> CheckpointRef | None:
    """Where final backend ``name`` already holds a final file equal to ``entry``, if it does."""
    backend = ck.router.instances[name]
    ref = None
    if _has(backend, "final_ref"):
        try:
            ref = _final_of(ck, name, ck.run_name)
        except (OSError, StorageUnavailableError):
            pass  # what it holds cannot be told: it is sent the model, as one that holds none
        except IncompatibleCheckpointError:
            raise  # a newer ckptkit's final model: never replaced by an older one
        except CkptkitError as exc:
            if isinstance(exc, BackendError):
                raise  # the plugin's bug, named: that backend fails
            # A damaged final model: sent this one, which repairs it.
    if ref is not None:
        try:
            theirs = backend.read_manifest(ref)
            if theirs.files.get(FINAL_FILE) != entry:
                return None
            # Its bytes read back: a copy changed since its manifest was written is sent the model again.
            ck.reader.check_files(ref, theirs, [FINAL_FILE])
        except CkptkitError:
            return None
        return ref
    if not _has(backend, "find_published"):
        return None
    try:
        found = ck.router.call_blaming(name, "find_published", storage_errors=True, run_name=ck.run_name,
                                       digest=entry.digest, algorithm=algorithm)
    except OSError as exc:  # its server down (TimeoutError too): not the plugin's bug
        raise StorageUnavailableError(name, f"find_published{ck.router.origin(name)}: could not ask whether it "
                                            f"holds the model ({type(exc).__name__}: {exc})") from exc
    return ck.router.found_ref(name, "find_published", found, ck.run_name)


def _has(backend: Any, hook: str) -> bool:
    # A type loads only if every method named like a hook is marked, so the method is the hook.
    return callable(getattr(backend, hook, None))


def _final_of(ck: CheckpointManager, name: str, run_name: str) -> CheckpointRef | None:
    """``final_ref`` of configured backend ``name``: a plugin's own exception, or an answer that
    is not a ``CheckpointRef`` or None, is raised as its bug (``BackendError``, naming it)."""
    return ck.router.found_ref(name, "final_ref", ck.router.call_blaming(
        name, "final_ref", storage_errors=True, run_name=run_name), run_name)


def stored_finals(ck: CheckpointManager, fallback_dir: str | os.PathLike | None = None,
                  unread: dict[str, Exception] | None = None) -> list[PublishSource]:
    """Every committed final model of the run: in the final backends, then the fallback. A
    resume backend's is none: what the final role did not write is not taken for its model.
    ``unread`` gets the backends that hold final models but could not be read, and why."""
    out = []
    seen = set()
    finals = ck.router.backends(Role.FINAL) if ck.config.final is not None else []
    for name in finals:
        instance = ck.router.instances[name]
        if not _has(instance, "final_ref"):
            continue  # keeps no stored copy to publish from (a model registry)
        ref = None
        try:
            ref = _final_of(ck, name, ck.run_name)
            if ref is None:
                continue
            manifest = _final_manifest(instance, ref, ck.run_name)
        except (OSError, StorageUnavailableError) as exc:
            if unread is not None:  # may hold the final model: not "none stored"
                unread[name] = exc
            continue
        except IncompatibleCheckpointError:
            raise  # a newer ckptkit's: never passed over for an older copy, which would replace it
        except CkptkitError as exc:
            if ref is None and isinstance(exc, BackendError):
                raise  # final_ref's own bug: the plugin's, named
            # Damaged (final_ref reads the manifest too), or another run's: not a final model to publish.
            where = ref.uri if ref is not None else f"backend {name!r}: its final model of run {ck.run_name!r}"
            warnings.warn(f"{where} is not published: {exc}", RuntimeWarning, stacklevel=3)
            continue
        out.append(PublishSource("final", ref, manifest, name))
        seen.add(ref.uri)
    fb = _fallback(ck, fallback_dir)
    ref = fb.final_ref(run_name=ck.run_name)
    if ref is not None and ref.uri not in seen:
        try:
            out.append(PublishSource("final", ref, _final_manifest(fb, ref, ck.run_name), None))
        except CorruptCheckpointError as exc:
            warnings.warn(f"{ref.uri} is not published: {exc}", RuntimeWarning, stacklevel=3)
    return out


def _final_manifest(backend: Any, ref: CheckpointRef, run_name: str) -> Manifest:
    """The manifest of the final model at ``ref``, refused (``CorruptCheckpointError``) where it
    says it belongs to another run than ``run_name``: publish would send that model sealed as
    this run's."""
    manifest = backend.read_manifest(ref)
    try:
        manifest.check_location(run_name, None, f"the manifest of {ref.uri}")
    except ValueError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    return manifest


def find_source(ck: CheckpointManager, step: int | None = None, path: str | os.PathLike | None = None,
                fallback_dir: str | os.PathLike | None = None) -> PublishSource:
    """The checkpoint ``ckptkit publish`` sends.

    ``path``: a checkpoint folder (one holding ``manifest.json``). ``step``: that resume
    checkpoint. Neither: the newest stored final model (configured backends and the fallback
    folder), else an error that suggests ``--step``.
    """
    if path is not None:
        return source_from_folder(path)
    if step is not None:
        ref = ck.list_checkpoints(step=step)[0]  # CheckpointNotFoundError names the steps there are
        # As restore reads it: intact, and refused where it says it is another run's or step's.
        return PublishSource("resume", ref, ck.reader.manifest(ref), ref.backend)
    unread: dict[str, Exception] = {}
    finals = stored_finals(ck, fallback_dir, unread)
    if unread:
        # Not "none stored", and what was found is not known to be the newest: a store that did
        # not answer may hold a newer final model, which an older one would follow as the newest
        # version in a registry.
        name = next(iter(unread))
        found = (f"the newest final model found (step {max(finals, key=_newest).manifest.step}) may not be the "
                 "newest" if finals else "no stored final model was found")
        error = StorageUnavailableError(
            name, f"run {ck.run_name!r}: {found}, as these final backends could not be read: "
            f"{fanout.describe_failures(unread)}. Nothing was published; try again once they answer, or name the model: "
            "a resume checkpoint with --step STEP, or a folder with --from")
        error.__cause__ = unread[name]
        raise error
    if not finals:
        where = os.fspath(fallback_dir or ck.fallback_dir)
        # A registry may hold the run's model, but nothing publish can read back and send on.
        opaque = [n for n in (ck.router.backends(Role.FINAL) if ck.config.final is not None else ())
                  if not callable(getattr(ck.router.instances[n], "final_ref", None))]
        held = (f" ({', '.join(opaque)} keep{'s' if len(opaque) == 1 else ''} no copy that publish can read back, "
                "as a model registry does, whatever it holds)" if opaque else "")
        raise CheckpointError(
            f"run {ck.run_name!r} has no stored final model in its backends{held} nor in the fallback "
            f"folder {where}; publish a resume checkpoint with --step STEP, or name a folder with --from")
    return max(finals, key=_newest)


def _newest(source: PublishSource) -> tuple[str, int]:
    return source.manifest.created, source.manifest.step


def source_from_folder(path: str | os.PathLike) -> PublishSource:
    """A checkpoint folder on local disk (a ``file://`` URI or a path) as a publish source."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    folder = os.path.abspath(os.path.expanduser(text))
    try:
        manifest = Manifest.from_json(local.manifest_bytes(os.path.join(folder, MANIFEST_NAME)))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} holds no {MANIFEST_NAME}: not a committed checkpoint") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}/{MANIFEST_NAME} is not a readable manifest: {exc}") from None
    kind = "final" if FINAL_FILE in manifest.files else "resume"
    ref = CheckpointRef(backend="folder", run_name=manifest.run_name, step=manifest.step, path=folder,
                        uri="file://" + folder, role=kind, local_dir=folder)
    return PublishSource(kind, ref, manifest, None)


def _verified_local(ck: CheckpointManager, source: PublishSource, workdir: str) -> str:
    """A local folder with the source's files, each checked against the manifest."""
    if source.backend is not None:
        return ck.reader.fetch(source.ref, source.manifest, workdir)
    folder = source.ref.local_dir
    for name, entry in source.manifest.files.items():
        try:
            # A regular file of the size listed, or not read: a pipe or a link to a device never ends.
            with local.open_regular(os.path.join(folder, name)) as f:
                size = os.fstat(f.fileno()).st_size
                digest = hash_stream(f, algorithm_of(entry.digest))[1] if size == entry.size else ""
        except FileNotFoundError:
            raise CheckpointError(f"{source.uri}: {name} is missing") from None
        if (size, digest) != (entry.size, entry.digest):
            raise CheckpointError(f"{source.uri}: {name} does not match its manifest")
    return folder


def final_body_from_resume(state: dict[str, Any], manifest: Manifest, algorithm: str | None,
                           dtype: str | None) -> dict[str, Any]:
    """What ``finalize`` would have written for the model a resume checkpoint holds."""
    if "model" not in state:
        raise CheckpointError("the resume checkpoint holds no model state")
    model = state["model"]
    return {"model": gather.cast(model, dtype), "step": manifest.step, "epoch": manifest.epoch,
            "metrics": dict(manifest.metrics), "algorithm": algorithm}


def _payload(ck: CheckpointManager, source: PublishSource, folder: str, final: dict[str, Any] | None,
             algorithm: str | None, workdir: str) -> tuple[Payload, dict[str, Any]]:
    """The final file to send, and the model state it holds (``publish_final``'s ``state``).

    ``final``: the loaded final file, for a final source.
    """
    m = source.manifest
    # A resume step's final model is of the training that committed it (training_of: also one
    # written before ids); a final model sent again keeps what it says.
    common = dict(run_name=ck.run_name, step=m.step, epoch=m.epoch, format="torch", role="final",
                  metrics=dict(m.metrics), mlflow_run_id=m.mlflow_run_id,
                  training_id=m.training_id if source.kind == "final" else training_of(m))
    if source.kind == "final":
        if FINAL_FILE not in m.files:
            raise CheckpointError(f"{source.uri}: a final checkpoint without {FINAL_FILE}")
        return Payload(files=(PayloadFile(FINAL_FILE, source=os.path.join(folder, FINAL_FILE),
                                          expected=m.files[FINAL_FILE]),), **common), final["model"]
    if m.format == "dcp":
        # The shards, verified and local by now, put together in this one process.
        full = sharded.load_full(fsspec.filesystem("file"), folder, m.files, name=source.uri)
        state = {**full, "model": gather.rank0_model(full)}
    elif m.format == "torch":
        state = reading.load_state(folder, source.ref, m, (), keep=("model",))
    else:
        raise CheckpointError(f"{source.uri}: a {m.format!r} checkpoint without {STATE_FILE} cannot be published")
    dtype = ck.config.final.dtype if ck.config.final is not None else None
    body = final_body_from_resume(state, m, algorithm, dtype)
    # Written once, hashed on the way: every backend copies these bytes, and the checksum tells
    # which backends already hold them.
    out = os.path.join(workdir, "final")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, FINAL_FILE)
    with reading.LocalCopy(path, f"the final model made from {source.uri}", reading.SCRATCH_ADVICE) as f:
        w = HashingWriter(f)
        torch_writer(body)(w)
    return Payload(files=(PayloadFile(FINAL_FILE, source=path, expected=FileEntry(size=w.size, digest=w.digest())),),
                   **common), body["model"]


def _final_body(source: PublishSource, folder: str) -> dict[str, Any]:
    """The verified final file of ``source``, loaded weights-only and memory-mapped: a tensor is
    read from disk only if a backend uses it, and the file outlives every use (it is removed
    after all backends were called)."""
    body = safeload.load(os.path.join(folder, FINAL_FILE), name=f"{source.uri}/{FINAL_FILE}", mapped=True)
    if not isinstance(body, dict) or not isinstance(body.get("model"), dict):
        raise CheckpointError(f"{source.uri}/{FINAL_FILE} holds no model state (a dict under 'model'); "
                              "it was not written by ckptkit finalize")
    return body


def _held_elsewhere(ck: CheckpointManager, order: list[str], source: PublishSource, entry: FileEntry | None,
                    algorithm: str | None) -> list[CheckpointRef]:
    """The copies of these bytes that final backends not named for this publish hold (a retry
    with --backend of the registry alone, the S3 copy committed): handed on in ``stored``, so that
    a registry records one's URI instead of uploading the model again. Only file backends count
    (a copy that can be pointed at); one that cannot tell is passed over, as it is not asked.
    The source's own copy, verified as it was read, is not read a second time."""
    found: list[CheckpointRef] = []
    if entry is None:
        return found
    for name in ck.router.backends(Role.FINAL):
        if name in order or not _has(ck.router.instances[name], "final_ref"):
            continue
        if name == source.backend and source.kind == "final" and source.manifest.files.get(FINAL_FILE) == entry:
            found.append(source.ref)
            continue
        try:
            ref = _holding(ck, name, entry, algorithm)
        except CkptkitError:
            continue
        if ref is not None:
            found.append(ref)
    return found


def final_backends(ck: CheckpointManager, backends: Iterable[str] | None = None) -> list[str]:
    """The final backends a publish sends to, in their order: all, or those named in ``backends``;
    a name that is not one is refused before any source is looked for."""
    if ck.config.final is None:
        raise ConfigError("roles.final: no final backends are declared in the config")
    order = ck.router.backends(Role.FINAL)
    if backends is None:
        return order
    wanted = list(backends)
    unknown = [b for b in wanted if b not in order]
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a final backend of this config "
                          f"(final backends: {', '.join(order)})")
    return [b for b in order if b in wanted]


def publish(ck: CheckpointManager, source: PublishSource, backends: Iterable[str] | None = None,
            algorithm: str | None = None, force: bool = False) -> PublishResult:
    """Send ``source`` through the final backends (all, or those named), one at a time.

    A backend that already holds these exact bytes as its final model (same size and checksum)
    is not written again unless ``force``; it is handed on in ``stored``, so that a registry
    records its URI instead of uploading a copy. A file backend tells through its final
    manifest; a registry through ``find_published(run_name, digest, algorithm)``, which returns
    the reference of what holds them (or None) and raises a ``CkptkitError`` when it cannot tell:
    that backend then fails without being sent the model. A file backend not named that holds
    them is handed on too (``_held_elsewhere``). A failing backend does not stop the others.
    """
    order = final_backends(ck, backends)
    # The source's files are checked unchanged before anything is sent, and again once it is
    # sent: a backend may send a local final file by its path, and a model state loaded from a
    # mapping is read while it is sent.
    with reading.scratch("publish") as workdir, reading.unchanged(source.ref, source.manifest.files) as unchanged:
        folder = _verified_local(ck, source, workdir)
        final = _final_body(source, folder) if source.kind == "final" else None
        stored_tag = final.get("algorithm") if final is not None else None
        algorithm = algorithm or ck.config.algorithm or (stored_tag if isinstance(stored_tag, str) else None)
        payload, state = _payload(ck, source, folder, final, algorithm, workdir)
        unchanged()
        entry = payload.files[0].expected
        held: list[CheckpointRef] = []
        lookup_failed: dict[str, CkptkitError] = {}
        if not force and entry is not None:
            for name in order:
                try:
                    ref = _holding(ck, name, entry, algorithm)
                except CkptkitError as exc:
                    lookup_failed[name] = exc
                    continue
                if ref is not None:
                    held.append(ref)
        skip = {r.backend for r in held} | set(lookup_failed)
        sent = [n for n in order if n not in skip]
        stored = held + _held_elsewhere(ck, order, source, entry, algorithm)
        published, errors = fanout.store_each(ck.router, ck.run_name, Role.FINAL, payload, "publish_final",
                                              names=sent, stored=stored, algorithm=algorithm, model=None,
                                              state=state)
        unchanged()
        failures = {n: redact(str(e), secret_values()) for n, e in {**lookup_failed, **errors}.items()}
    return PublishResult(source=source, published=tuple(published), already_held=tuple(held),
                         failures=failures)
