"""Config options shared by the object-store backends (bucket URI, retries, timeouts, multipart sizes)."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Mapping

import attrs

from .config import check_number, check_options
from .errors import ConfigError
from .redact import redact, secret_values
from .retry import RetryPolicy
from .storage import DEFAULT_GRACE_S


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def parse_bucket_uri(key: str, value: Any, scheme: str) -> tuple[str, str]:
    """``(bucket, prefix)`` from ``<scheme>://bucket/prefix``; a ConfigError names ``key``."""
    example = f"{scheme}://my-bucket/checkpoints"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a {scheme}:// URI like {example}, got {value!r}")
    shown = redact(value)  # the value may hold credentials; messages show it without them
    if "://" not in value:
        raise ConfigError(f"{key}: {shown!r} is not a {scheme}:// URI; write it like {example}")
    given, rest = value.split("://", 1)
    if given.lower() != scheme:
        hint = f"; use type: {given} for it" if given in ("s3", "gs", "file") else ""
        raise ConfigError(f"{key}: {shown!r} has scheme {given}://, this backend takes {scheme}:// "
                          f"(like {example}){hint}")
    if any(c in rest.split("/", 1)[0] for c in ":@"):
        # ``KEY:SECRET@bucket``: a secret may hold '/', so the whole value stays unshown.
        raise ConfigError(f"{key}: credentials (user:password@) do not belong in the {scheme}:// path; "
                          "put them under storage_options or in the environment")
    if "?" in rest or "#" in rest:
        raise ConfigError(f"{key}: {scheme}:// URIs take no query or fragment; put client settings "
                          "under storage_options")
    if any(c in rest for c in "*[]"):
        # The store's client takes them for a pattern: a prune would match other prefixes' files.
        raise ConfigError(f"{key}: {shown!r} holds '*', '[' or ']', which {scheme}:// clients take for a "
                          "pattern when deleting; choose a path without them")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{key}: {shown!r} names no bucket; write it like {example}")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(f"{key}: {bucket!r} is not a valid bucket name (3 to 222 lowercase "
                          "letters, digits, '.', '-', '_', starting and ending with a letter or digit)")
    segments = [s for s in prefix.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ConfigError(f"{key}: the prefix {prefix!r} may not contain '.' or '..' segments")
    return bucket, "/".join(segments)


def _refuse_credentials_in_urls(key: str, options: Mapping[str, Any]) -> None:
    """Refuse a URL with ``user:password@`` among ``options`` (an ``endpoint_url``, also one under
    ``client_kwargs``): the client sends it with its own credentials and the store refuses every
    request, which reads as a store that does not answer. The value is not shown."""
    for name, value in options.items():
        if isinstance(value, Mapping):
            _refuse_credentials_in_urls(f"{key}.{name}", value)
        elif isinstance(value, str) and "://" in value:
            try:
                parts = urllib.parse.urlsplit(value)
            except ValueError:
                continue
            if parts.username is not None or parts.password is not None:
                raise ConfigError(f"{key}.{name}: credentials (user:password@) do not belong in a URL; put them "
                                  "under storage_options (key, secret) or in the environment")


@attrs.frozen
class RemoteOptions:
    """The options every object-store backend reads from its config."""

    bucket: str
    prefix: str
    storage_options: dict[str, Any]
    leftover_grace_s: float
    retry: RetryPolicy
    part_size: int
    concurrency: int
    # The longest one request may wait to connect, or between bytes of an answer, before it
    # counts as failed (and is retried by ``retry``): a hung server cannot stall training.
    timeout_s: float = 30.0
    # How often the client library (botocore, gcsfs) retries one failed request itself before
    # ``retry`` sees the failure; with ``timeout_s`` it bounds how long one operation can hang.
    request_retries: int = 2

    KEYS = ("path", "storage_options", "leftover_grace_s", "retry", "part_size_mb", "upload_concurrency",
            "timeout_s", "request_retries")

    @property
    def root(self) -> str:
        """``bucket/prefix``: the root a ``FileBackend`` is built on."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any], scheme: str,
                    part_size_mb: int = 32, min_part_size_mb: int = 5,
                    concurrency: int = 4) -> RemoteOptions:
        """Read and check the shared options of backend ``name`` (keys in ``KEYS``); ``scheme``
        is the URI scheme its ``path`` must have, the other arguments are the type's defaults."""
        key = f"backends.{name}"
        check_options(key, options, cls.KEYS, required=("path",))
        bucket, prefix = parse_bucket_uri(f"{key}.path", options["path"], scheme)
        storage_options = options.get("storage_options") or {}
        if not isinstance(storage_options, Mapping):
            raise ConfigError(f"{key}.storage_options: must be a mapping of fsspec options, "
                              f"got {type(storage_options).__name__}")
        _refuse_credentials_in_urls(f"{key}.storage_options", storage_options)
        grace = check_number(f"{key}.leftover_grace_s", options.get("leftover_grace_s", DEFAULT_GRACE_S), 0)
        mb = check_number(f"{key}.part_size_mb", options.get("part_size_mb", part_size_mb), min_part_size_mb,
                     integer=True)
        conc = check_number(f"{key}.upload_concurrency", options.get("upload_concurrency", concurrency), 1,
                       integer=True)
        timeout = check_number(f"{key}.timeout_s", options.get("timeout_s", 30), 0.001)
        request_retries = check_number(f"{key}.request_retries", options.get("request_retries", 2), 0, integer=True)
        return cls(bucket=bucket, prefix=prefix, storage_options=dict(storage_options),
                   leftover_grace_s=float(grace), retry=RetryPolicy.from_config(f"{key}.retry", options.get("retry")),
                   part_size=mb * 2**20, concurrency=conc, timeout_s=float(timeout),
                   request_retries=request_retries)

    def backend(self, cls: type, name: str, fs: Any) -> Any:
        """An instance of ``cls`` (a ``FileBackend`` subclass) over ``fs`` with these options."""
        instance = cls(name, fs, self.root, leftover_grace_s=self.leftover_grace_s, retry=self.retry,
                       secrets=secret_values(self.storage_options))
        instance.part_size = self.part_size
        instance.upload_concurrency = self.concurrency
        return instance
