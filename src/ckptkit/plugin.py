"""The public API for writing a ckptkit backend: the one module a backend author imports.

Everything a third-party distribution needs is here; the rest of ckptkit is private and may
change between releases. ``docs/plugins.md`` walks through each name. In short:

- ``hookimpl`` marks the methods of a backend class that implement the hooks specified in
  ``ckptkit.hookspecs``; ``FileBackend`` implements all of them for any fsspec filesystem.
- ``Payload``/``PayloadFile`` (what to store), ``CheckpointRef`` (where it now lives),
  ``Manifest``/``FileEntry`` (what a checkpoint holds; ``Manifest.to_json()`` and
  ``Manifest.from_json()`` serialise and parse it) are the values the hooks exchange;
  ``step_dirname``, ``parse_step``, ``final_dirname``, ``parse_final``, ``FINAL_DIR`` and
  ``MANIFEST_NAME`` name the standard layout; ``LEFTOVER_PREFIXES`` begin the names of what a
  killed save or publish leaves in a run's folder.
- ``RetryPolicy`` retries transient errors (``RetryPolicy.from_config`` reads a ``retry:``
  mapping; ``transient=`` adds a client's own exception types), ``RemoteOptions`` reads the
  options every object-store backend shares, ``check_options``/``check_number`` validate a
  backend's own options.
- ``BACKEND_ATTRIBUTES`` lists the attributes ckptkit reads from a backend besides its hooks.
- ``make_plugin_manager`` builds a plugin manager for a backend's tests.
- ``redact``/``secret_values`` keep credentials out of what a backend says (errors, logs).
- ``counts_for`` tells whether a final model counts for the training ``final_step`` asks after.
- The error types a backend raises or lets through.
"""

from __future__ import annotations

from .checkpoint import CheckpointRef, Payload, PayloadFile
from .config import check_number, check_options
from .errors import (
    BackendError,
    CheckpointError,
    CkptkitError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    PluginError,
    StorageFullError,
    StorageUnavailableError,
)
from .hashing import HashingWriter, hash_stream
from .hookspecs import BACKEND_ATTRIBUTES, hookimpl
from .manifest import MANIFEST_NAME, FileEntry, Manifest, NewerManifestError, counts_for
from .plugins import make_plugin_manager
from .reading import scratch
from .redact import redact, secret_values
from .remote import RemoteOptions, parse_bucket_uri
from .retry import RetriesExhausted, RetryPolicy, is_transient
from .storage import FINAL_DIR, LEFTOVER_PREFIXES, FileBackend, final_dirname, parse_final, parse_step, step_dirname
from .uploads import Multipart

__all__ = [
    "BACKEND_ATTRIBUTES",
    "BackendError",
    "CheckpointError",
    "CheckpointRef",
    "CkptkitError",
    "ConfigError",
    "CorruptCheckpointError",
    "FINAL_DIR",
    "FileBackend",
    "FileEntry",
    "HashingWriter",
    "IncompatibleCheckpointError",
    "LEFTOVER_PREFIXES",
    "MANIFEST_NAME",
    "Manifest",
    "Multipart",
    "NewerManifestError",
    "Payload",
    "PayloadFile",
    "PluginError",
    "RemoteOptions",
    "RetriesExhausted",
    "RetryPolicy",
    "StorageFullError",
    "StorageUnavailableError",
    "check_number",
    "check_options",
    "counts_for",
    "final_dirname",
    "hash_stream",
    "hookimpl",
    "is_transient",
    "make_plugin_manager",
    "parse_bucket_uri",
    "parse_final",
    "parse_step",
    "redact",
    "scratch",
    "secret_values",
    "step_dirname",
]
