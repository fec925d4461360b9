"""The values that the manager and the backends exchange through the hooks."""

from __future__ import annotations

from typing import Any, BinaryIO, Callable

import attrs
import torch

from . import __version__
from .hashing import ALGORITHM, CHUNK, algorithm_of
from .manifest import FileEntry, Manifest, now


@attrs.frozen
class PayloadFile:
    """One file of a checkpoint, as the manager hands it to a backend.

    ``write`` streams the content into an open binary file. Once one backend has stored the
    file on local disk, later backends get ``source`` (that file's path) and ``expected`` (its
    size and checksum) instead, so they copy bytes rather than serialise the state again. Once
    a final backend has stored it elsewhere (an object store), later ones get ``write`` and
    ``expected`` as that copy's manifest lists it: a registry that points at that copy records
    its checksum without serialising the model again.
    """

    name: str
    write: Callable[[BinaryIO], None] | None = None
    source: str | None = None
    expected: FileEntry | None = None

    def __attrs_post_init__(self):
        if (self.write is None) == (self.source is None):
            raise ValueError("a payload file needs exactly one of write or source")

    @property
    def algorithm(self) -> str:
        """The checksum to compute while storing it: the one ``expected`` was made with, if any."""
        return algorithm_of(self.expected.digest) if self.expected is not None else ALGORITHM

    def write_to(self, f: BinaryIO) -> None:
        """Stream the content into ``f``: serialise it, or copy it from ``source``."""
        if self.source is None:
            self.write(f)
            return
        with open(self.source, "rb") as src:
            while chunk := src.read(CHUNK):
                f.write(chunk)


@attrs.frozen
class Payload:
    """A checkpoint to store: its metadata and its files, written in order (or up to ``concurrency``
    at once), manifest last, once every file is stored."""

    run_name: str
    step: int
    epoch: int | None
    format: str
    files: tuple[PayloadFile, ...]
    metrics: dict[str, float] = attrs.field(factory=dict)
    mlflow_run_id: str | None = None
    role: str = "resume"
    world_size: int = 1
    # The model's own settings (``finalize(params=...)``), for a registry to record beside it.
    params: dict[str, Any] = attrs.field(factory=dict)
    # How many of ``files`` a backend may write at the same time (``roles.resume.write_threads``).
    # Only a speed hint: a backend that writes them one after the other is just as correct.
    concurrency: int = 1
    # ``gather.optimizer_class`` of the optimizer whose state the files hold, if any.
    optimizer: str | None = None
    # The training that made it (``Manifest.training_id``).
    training_id: str | None = None

    def manifest(self, files: dict[str, FileEntry]) -> Manifest:
        """The manifest that commits this payload once ``files`` are stored."""
        return Manifest(
            run_name=self.run_name,
            step=self.step,
            epoch=self.epoch,
            format=self.format,
            files=files,
            metrics=dict(self.metrics),
            mlflow_run_id=self.mlflow_run_id,
            role=self.role,
            world_size=self.world_size,
            torch_version=torch.__version__,
            ckptkit_version=__version__,
            created=now(),
            extra_in_state=False,
            optimizer=self.optimizer,
            training_id=self.training_id,
        )

    def from_stored(self, local_dir: str, manifest: Manifest) -> Payload:
        """The same payload, its files now copied from ``local_dir`` where they sit committed."""
        import os

        files = tuple(
            PayloadFile(name=f.name, source=os.path.join(local_dir, f.name),
                        expected=manifest.files[f.name])
            for f in self.files
        )
        return attrs.evolve(self, files=files)


@attrs.frozen
class CheckpointRef:
    """Where one committed checkpoint lives.

    ``path`` is the backend's own address of the checkpoint folder; ``uri`` is what people
    see; ``local_dir`` is set when the files sit on this machine's disk and can be loaded in
    place. ``sizes`` maps file names to sizes as a listing saw them, when the listing gave them.
    """

    backend: str
    run_name: str
    step: int
    path: str
    uri: str
    role: str = "resume"
    local_dir: str | None = None
    sizes: dict[str, int] | None = None
    mtime: float | None = None
