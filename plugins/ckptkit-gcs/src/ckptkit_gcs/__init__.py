"""The ``gcs`` backend: ckptkit checkpoints in a Google Cloud Storage bucket.

A checkpoint is committed when its ``manifest.json`` is written, after every other file.
Large files go up as resumable uploads in chunks while they are serialised, on a thread of
their own; an upload that fails is cancelled, so a failed save leaves no object behind that
looks whole. Credentials come from Google's default chain (``GOOGLE_APPLICATION_CREDENTIALS``,
gcloud, the metadata server) or from ``storage_options.token``; never from the YAML itself.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import aiohttp
import gcsfs
import gcsfs.core
from gcsfs.retry import retry_request


def _require_this_ckptkit(plugin: str) -> None:
    """Stop the import with the cause when the ``ckptkit`` on the path is another project.

    The public package index's ``ckptkit`` is an unrelated checkpoint inspect/convert tool that
    imports under the same name; without this check it surfaces as a bare "No module named
    'ckptkit.<something>'" from deep inside the plugin. ``ckptkit.hookspecs`` (the plugin
    contract) is what marks ours.
    """
    try:
        ours = importlib.util.find_spec("ckptkit.hookspecs") is not None
    except ModuleNotFoundError:
        raise ImportError(f"{plugin} needs ckptkit, which is not installed; see docs/install.md in "
                          "the ckptkit repository") from None
    if not ours:
        found = sys.modules["ckptkit"]
        where = getattr(found, "__file__", None) or list(found.__path__)
        version = getattr(found, "__version__", "unknown")
        raise ImportError(
            f"{plugin} needs ckptkit, the role-routed training checkpoint library, but the 'ckptkit' "
            f"found at {where} (version {version}) is a "
            "different project of the same name, such as the public package index's unrelated "
            "checkpoint inspect/convert tool. Run `pip uninstall ckptkit`, then install ckptkit from "
            "a checkout, a git URL or your team's index (--index-url, never --extra-index-url); see "
            "docs/install.md in the ckptkit repository")


_require_this_ckptkit("ckptkit-gcs")

from ckptkit.remote import RemoteOptions  # noqa: E402
from ckptkit.storage import FileBackend  # noqa: E402

__all__ = ["GCSBackend"]
__version__ = "0.4.0"


# gcsfs tries each request 6 times, backing off up to about 31 s in all, a count fixed when
# the class is defined; the undecorated request lets the config choose it instead.
_PLAIN_REQUEST = getattr(gcsfs.core.GCSFileSystem._request, "__wrapped__", None)


class _GCSFileSystem(gcsfs.GCSFileSystem):
    """gcsfs whose own retries of one request number ``request_retries``."""

    def __init__(self, *args: Any, request_retries: int = 5, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if _PLAIN_REQUEST is not None:  # else a gcsfs whose retries cannot be chosen: its own stay
            self._request = types.MethodType(retry_request(retries=request_retries + 1)(_PLAIN_REQUEST), self)


class GCSBackend(FileBackend):
    """Checkpoints under ``gs://bucket/prefix/<run_name>/``.

    Options: ``path`` (required), ``storage_options`` (passed to ``gcsfs.GCSFileSystem``, e.g.
    ``project``, ``token``, ``endpoint_url``), ``leftover_grace_s``, ``retry`` (``attempts``,
    ``backoff_s``, ``max_backoff_s``), ``part_size_mb`` (the resumable-upload chunk) and
    ``upload_concurrency`` (unused: a resumable upload takes its chunks in order),
    ``timeout_s`` (connect and read timeout of each request, unless ``storage_options`` sets
    ``requests_timeout``) and ``request_retries`` (gcsfs's own retries of each request).

    Unfinished resumable uploads (a save killed mid-file) need no cleaning: they publish
    nothing, and GCS forgets an upload session a week after it began.
    """

    OPTIONS = RemoteOptions.KEYS
    SCHEME = "gs"
    # The client is safe to use from several threads: the files of a split state go up at once.
    concurrent_writes = True

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> GCSBackend:
        opts = RemoteOptions.from_config(name, options, cls.SCHEME, part_size_mb=16, min_part_size_mb=1)
        storage_options = dict(opts.storage_options)
        storage_options.setdefault("skip_instance_cache", True)
        # A bound on each wait (connecting, and between bytes of an answer), not on a whole
        # transfer, which may rightly take long for a large chunk.
        storage_options.setdefault("requests_timeout", aiohttp.ClientTimeout(
            total=None, sock_connect=opts.timeout_s, sock_read=opts.timeout_s))
        return opts.backend(cls, name, _GCSFileSystem(request_retries=opts.request_retries, **storage_options))

    def store_exists(self) -> bool:
        return self.fs.exists(self.root.split("/", 1)[0])
