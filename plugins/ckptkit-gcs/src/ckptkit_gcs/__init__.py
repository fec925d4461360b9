"""The ``gcs`` backend: ckptkit checkpoints in a Google Cloud Storage bucket.

A checkpoint is committed when its ``manifest.json`` is written, after every other file.
Large files go up as resumable uploads in chunks while they are serialised, on a thread of
their own; an upload that fails is cancelled, so a failed save leaves no object behind that
looks whole. Credentials come from Google's default chain (``GOOGLE_APPLICATION_CREDENTIALS``,
gcloud, the metadata server) or from ``storage_options.token``; never from the YAML itself.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import math
import os
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

from ckptkit.plugin import ConfigError, FileBackend, RemoteOptions  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["GCSBackend"]
__version__ = "0.4.0"


# gcsfs tries each request 6 times, backing off up to about 31 s in all, a count fixed when
# the class is defined; the undecorated request lets the config choose it instead.
_PLAIN_REQUEST = getattr(gcsfs.core.GCSFileSystem._request, "__wrapped__", None)

# The slowest transfer of a body, up or down, that counts as progress, low enough for several
# files and ranges to share a slow link. aiohttp's read timeout waits between bytes of an
# answer, and starts only once a request's body is sent: a store that stops reading an upload,
# or sends an answer a byte at a time, would hold it for good.
_MIN_RATE = 64 * 1024
# What an answer of unknown size to a request that sends nothing (a listing, a manifest, a whole
# small object) may be, for its deadline; ckptkit reads large files in ranges, whose size is
# known, and the answer to an upload is a few hundred bytes.
_UNSIZED_ANSWER = 4 * 2**20


class RequestStalled(aiohttp.ClientConnectionError):
    """One try of a request that did not finish within its deadline: retried by gcsfs like a
    dropped connection, then by ckptkit's retry policy."""


def _range_size(headers: Any) -> int | None:
    value = (headers or {}).get("Range", "")
    if value.startswith("bytes=") and "," not in value:
        first, _, last = value[len("bytes="):].partition("-")
        if first.isdigit() and last.isdigit():
            return int(last) - int(first) + 1
    return None


def _size(data: Any) -> int:
    if data is None:
        return 0
    if hasattr(data, "__len__"):
        return len(data)
    if hasattr(data, "seek") and hasattr(data, "tell"):
        here = data.tell()
        end = data.seek(0, 2)
        data.seek(here)
        return end - here
    return _UNSIZED_ANSWER


def _longest_wait(timeout: Any) -> float | None:
    """The longest single wait of an aiohttp ``ClientTimeout`` (or a number of seconds)."""
    if isinstance(timeout, (int, float)):
        return float(timeout)
    waits = [w for w in (getattr(timeout, k, None) for k in ("total", "connect", "sock_connect", "sock_read"))
             if w is not None]
    return max(waits) if waits else None


class _GCSFileSystem(gcsfs.GCSFileSystem):
    """gcsfs whose own retries of one request number ``request_retries``, and whose every try
    ends by a deadline: ``wait_s`` plus what it sends and receives at ``_MIN_RATE``."""

    def __init__(self, *args: Any, request_retries: int = 5, wait_s: float = 30.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.wait_s = wait_s
        if _PLAIN_REQUEST is not None:  # else a gcsfs whose retries cannot be chosen: its own stay
            self._request = types.MethodType(retry_request(retries=request_retries + 1)(_bounded_request), self)


async def _bounded_request(self: _GCSFileSystem, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
    sent = _size(kwargs.get("data"))
    received = _range_size(kwargs.get("headers"))
    if received is None:
        received = 0 if sent else _UNSIZED_ANSWER
    # aiohttp may wait wait_s to connect and wait_s again for the answer's first bytes.
    deadline = 2 * self.wait_s + (sent + received) / _MIN_RATE
    try:
        return await asyncio.wait_for(_PLAIN_REQUEST(self, method, path, *args, **kwargs),
                                      deadline if math.isfinite(deadline) else None)
    except asyncio.TimeoutError as exc:  # the built-in TimeoutError from Python 3.11 on
        if isinstance(exc, aiohttp.ClientError):  # aiohttp's own timeouts are TimeoutErrors too
            raise
        url = self._format_path(path, args).split("?", 1)[0]
        raise RequestStalled(f"{method} {url} ({sent} bytes sent) was not done within {deadline:.1f} s "
                             f"(the store's timeout, the bodies at {_MIN_RATE // 1024} KiB/s at least)") from exc
    except OSError as exc:  # below TimeoutError, itself an OSError
        # gcsfs answers a 403 with a plain OSError("Forbidden: ..."); as the PermissionError s3fs
        # and the local disk give, ckptkit tells a refused read from damage (it may be intact).
        if type(exc) is OSError and str(exc).startswith("Forbidden:"):
            raise PermissionError(errno.EACCES, str(exc)) from exc
        raise


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
        token = storage_options.get("token")
        if isinstance(token, str) and (token.endswith(".json") or "/" in token) \
                and not os.path.isfile(os.path.expanduser(token)):
            # gcsfs takes a string that is no file for a raw access token, and the first
            # request fails on the network: the value (perhaps a token) is not shown.
            raise ConfigError(f"backends.{name}.storage_options: its token names a key file that does not exist on "
                              "this machine; give the path of the service account's JSON key, or google_default")
        storage_options.setdefault("skip_instance_cache", True)
        # A bound on each wait (connecting, and between bytes of an answer), not on a whole
        # transfer, which may rightly take long for a large chunk.
        storage_options.setdefault("requests_timeout", aiohttp.ClientTimeout(
            total=None, sock_connect=opts.timeout_s, sock_read=opts.timeout_s))
        # A ``requests_timeout`` of the user's own sets the deadline's wait; one without any
        # limit sets no deadline either.
        wait = _longest_wait(storage_options["requests_timeout"])
        return opts.backend(cls, name, _GCSFileSystem(
            request_retries=opts.request_retries, wait_s=math.inf if wait is None else wait, **storage_options))

    def store_exists(self) -> bool:
        return self.fs.exists(self.root.split("/", 1)[0])

    _retention_told = False

    def _delete(self, path: str, names: Any = None) -> None:
        self._tell_retention()
        super()._delete(path, names)

    def _tell_retention(self) -> None:
        """Warn once, before the first delete, when the bucket keeps what is deleted: with soft
        delete (on by default, 7 days, in buckets made since 2024) or object versioning, every
        pruned checkpoint stays billed, and a run that saves often pays for many times its
        ``keep_last``. Changing that is the bucket owner's choice, not a prune's."""
        if self._retention_told:
            return
        self._retention_told = True
        bucket = self.root.split("/", 1)[0]
        kept = []
        # Not allowed to read the settings (storage.buckets.get), no answer, or an answer not
        # understood: nothing to tell, and the delete goes on.
        try:
            meta = self.fs.call("GET", "b/{}", bucket, json_out=True)
            days = int((meta.get("softDeletePolicy") or {}).get("retentionDurationSeconds") or 0) / 86400
            versioned = bool((meta.get("versioning") or {}).get("enabled"))
        except Exception as exc:
            log.debug("backend %r: could not read the settings of bucket %s: %s", self.name, bucket,
                      self.describe(exc))
            return
        if days > 0:
            kept.append(f"soft delete keeps what a prune deletes for {days:g} days, billed "
                        f"(gcloud storage buckets update gs://{bucket} --clear-soft-delete turns it off)")
        if versioned:
            kept.append("object versioning keeps it as noncurrent versions, billed until a lifecycle rule "
                        "deletes them (daysSinceNoncurrentTime or numNewerVersions)")
        if kept:
            log.warning("backend %r: in bucket %s, %s. ckptkit leaves those copies; a bucket of checkpoints "
                        "usually wants neither", self.name, bucket, "; and ".join(kept))
