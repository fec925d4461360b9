"""The ``gcs`` backend: ckptkit checkpoints in a Google Cloud Storage bucket.

A checkpoint is committed when its ``manifest.json`` is written, after every other file.
Large files go up as resumable uploads in chunks while they are serialised, on a thread of
their own; an upload that fails is cancelled, so a failed save leaves no object behind that
looks whole. Credentials come from Google's default chain (``GOOGLE_APPLICATION_CREDENTIALS``,
gcloud, the metadata server) or from ``storage_options.token``; never from the YAML itself.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import gcsfs

from ckptkit.remote import RemoteOptions
from ckptkit.storage import FileBackend

__all__ = ["GCSBackend"]
__version__ = "0.1.0"


class GCSBackend(FileBackend):
    """Checkpoints under ``gs://bucket/prefix/<run_name>/``.

    Options: ``path`` (required), ``storage_options`` (passed to ``gcsfs.GCSFileSystem``, e.g.
    ``project``, ``token``, ``endpoint_url``), ``leftover_grace_s``, ``retry`` (``attempts``,
    ``backoff_s``, ``max_backoff_s``), ``part_size_mb`` (the resumable-upload chunk) and
    ``upload_concurrency`` (unused: a resumable upload takes its chunks in order) and
    ``timeout_s`` (connect and read timeout of each request, unless ``storage_options`` sets
    ``requests_timeout``).
    """

    OPTIONS = RemoteOptions.KEYS
    SCHEME = "gs"

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> GCSBackend:
        opts = RemoteOptions.from_config(name, options, cls.SCHEME, part_size_mb=16, min_part_size_mb=1)
        storage_options = dict(opts.storage_options)
        storage_options.setdefault("skip_instance_cache", True)
        # A bound on each wait (connecting, and between bytes of an answer), not on a whole
        # transfer, which may rightly take long for a large chunk.
        storage_options.setdefault("requests_timeout", aiohttp.ClientTimeout(
            total=None, sock_connect=opts.timeout_s, sock_read=opts.timeout_s))
        return opts.backend(cls, name, gcsfs.GCSFileSystem(**storage_options))
