"""The ``s3`` backend: ckptkit checkpoints in an S3 bucket (or any S3-compatible store).

A checkpoint is committed when its ``manifest.json`` is written, after every other file.
Large files go up as multipart uploads, several parts at a time, while they are serialised;
an upload that fails is aborted, so a failed save leaves no object behind that looks whole.
Credentials come from the usual AWS chain (environment, config files, instance roles) or from
``storage_options``; they never need to be in the YAML.
"""

from __future__ import annotations

import asyncio
import difflib
import email.utils
import functools
import inspect
import importlib.util
import logging
import math
import posixpath
import sys
from typing import Any, Callable, Iterable

import s3fs
from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError
from fsspec.asyn import sync_wrapper
from s3fs.core import S3_RETRYABLE_ERRORS, _error_wrapper


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


_require_this_ckptkit("ckptkit-s3")

from ckptkit.plugin import (  # noqa: E402
    LEFTOVER_PREFIXES, MANIFEST_NAME, CheckpointRef, ConfigError, FileBackend, RemoteOptions, RetriesExhausted,
    is_transient, parse_final, parse_step)

__all__ = ["S3Backend"]

log = logging.getLogger(__name__)
_BUSY = object()  # the store failed a listing of an upload's parts for now: asked again at the next prune
__version__ = "0.4.0"


# botocore's read timeout waits between bytes, and starts only once a request's body is sent: a
# store that takes a request and never reads its body (or never answers its "Expect:
# 100-continue"), or that sends an answer a byte at a time, would hold the transfer, and
# training, for good. So an upload has a deadline from its size at the slowest rate that counts
# as progress (several parts and files share one link), and a download must bring at least
# _MIN_PROGRESS bytes a second over each wait of ``wait_s`` (however many share the link).
_MIN_UPLOAD_RATE = 64 * 1024
_MIN_PROGRESS = 4 * 1024
_SENDS_BODY = frozenset({"put_object", "upload_part"})
# The largest answer a request that sends no body gets, whole, before botocore returns: a
# listing page of 1000 keys is about 350 KB. It is read at _MIN_UPLOAD_RATE at least.
_WHOLE_ANSWER = 2**20
# Copies the store makes itself take a time that grows with a size not known here (and S3 sends
# filler bytes meanwhile): bounded by botocore's timeouts alone.
_UNBOUNDED = frozenset({"copy_object", "upload_part_copy"})


class UploadStalled(ConnectionError):
    """A request body the store did not take, or did not answer, within its deadline. A
    ``ConnectionError``: fsspec would turn a ``TimeoutError`` into an empty ``FSTimeoutError``,
    and ckptkit's retry policy takes either as transient."""


class DownloadStalled(ConnectionError):
    """An answer's body that the store sent slower than the slowest rate that counts as progress."""


class StoreNotAnswering(ConnectionError):
    """A request that failed on every one of botocore's tries (timeouts, dropped connections).
    Raised instead of botocore's error so that s3fs's own retries around a download do not try
    it all again: ckptkit's retry policy decides what happens next."""


class _WatchedBody:
    """An answer's body that fails with ``DownloadStalled`` once a window of ``window`` seconds
    brought fewer than ``_MIN_PROGRESS`` bytes a second."""

    _PIECE = 1 << 20

    def __init__(self, body: Any, window: float, what: str):
        self._body, self._window, self._what = body, window, what
        self._start = asyncio.get_running_loop().time()
        self._got = 0

    async def read(self, amt: int | None = None) -> bytes:
        if amt is not None and amt >= 0:
            return await self._some(amt)
        pieces = []
        while piece := await self._some(self._PIECE):
            pieces.append(piece)
        return b"".join(pieces)

    async def _some(self, amt: int) -> bytes:
        loop = asyncio.get_running_loop()
        asked = loop.time()
        limit = max(self._start + self._window - asked, 0.0) + self._window
        try:
            data = await asyncio.wait_for(self._body.read(amt), limit)
        except asyncio.TimeoutError as exc:
            if loop.time() < asked + limit:
                raise  # a timeout of the client's own
            raise DownloadStalled(f"nothing of {self._what} came for {limit:g} s: the store stopped "
                                  "sending it") from exc
        self._got += len(data)
        elapsed = loop.time() - self._start
        if data and elapsed >= self._window:
            if self._got < _MIN_PROGRESS * elapsed:
                raise DownloadStalled(f"{self._what} came at {self._got / elapsed:.0f} bytes/s over {elapsed:.1f} s, "
                                      f"less than {_MIN_PROGRESS // 1024} KiB/s: the store stopped sending it")
            self._start, self._got = loop.time(), 0
        return data

    async def __aenter__(self) -> _WatchedBody:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        close = self._body.close()
        if asyncio.iscoroutine(close):
            await close

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)


class _S3FileSystem(s3fs.S3FileSystem):
    """s3fs with one layer of retries and bounds on every body, on every path that reads or
    writes: ckptkit's multipart uploads, s3fs's own file writer and reader (``format: dcp``
    shards, ``open_file``), ``put_file`` and ``cat_file``.

    ``wait_s`` and ``tries`` are the client's own bounds on one request (botocore's timeout and
    tries). A request body may take ``tries × (wait_s + size at _MIN_UPLOAD_RATE)`` in all, and
    is then cancelled with ``UploadStalled``; an answer's body fails with ``DownloadStalled``
    once ``wait_s`` seconds brought less than ``_MIN_PROGRESS`` a second."""

    wait_s = 30.0
    tries = 9

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        body = kwargs.get("Body")
        call = self._call_once(method, *args, **kwargs)
        if method in _SENDS_BODY and body is not None:
            size = len(body) if hasattr(body, "__len__") else 0
            deadline = self.tries * (self.wait_s + size / _MIN_UPLOAD_RATE)
            try:
                return await asyncio.wait_for(call, deadline)
            except asyncio.TimeoutError as exc:  # the built-in TimeoutError from Python 3.11 on
                raise UploadStalled(
                    f"{method} of {size} bytes to {kwargs.get('Bucket')}/{kwargs.get('Key')} was not answered "
                    f"within {deadline:.1f} s (the store's timeouts and retries, the body sent at "
                    f"{_MIN_UPLOAD_RATE // 1024} KiB/s at least)") from exc
        if method in _UNBOUNDED:
            out = await call
        else:
            # The whole answer (headers alone for a download, whose body is watched below):
            # a store sending it a byte at a time never trips botocore's wait between bytes.
            deadline = self.tries * (self.wait_s + _WHOLE_ANSWER / _MIN_UPLOAD_RATE)
            if method == "complete_multipart_upload":  # the store assembles the parts first
                deadline += len((kwargs.get("MultipartUpload") or {}).get("Parts") or ())
            try:
                out = await asyncio.wait_for(call, deadline)
            except asyncio.TimeoutError as exc:
                raise StoreNotAnswering(
                    f"{method} of {kwargs.get('Bucket')}/{kwargs.get('Key', kwargs.get('Prefix', ''))} was not "
                    f"answered within {deadline:.1f} s (the store's timeouts and retries, the answer at "
                    f"{_MIN_UPLOAD_RATE // 1024} KiB/s at least)") from exc
        if method == "get_object" and isinstance(out, dict) and "Body" in out:
            out["Body"] = _WatchedBody(out["Body"], self.wait_s, f"{kwargs.get('Bucket')}/{kwargs.get('Key')}")
        return out

    async def _call_once(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """s3fs's ``_call_s3`` with its own retries left out: botocore has retried the request
        ``tries`` times already, and s3fs's would multiply every wait on a store that hangs."""
        await self.set_session()
        s3 = await self.get_s3(kwargs.get("Bucket"))
        fn = getattr(s3, method)
        try:
            return await _error_wrapper(fn, kwargs=self._get_s3_method_kwargs(fn, *args, **kwargs), retries=1)
        except S3_RETRYABLE_ERRORS as exc:
            if isinstance(exc.__cause__, ClientError) or isinstance(exc, ResponseParserError):
                raise  # an answer: S3's RequestTimeout (translated), or a throttle's unparsable reply
            raise StoreNotAnswering(f"{method} of {kwargs.get('Bucket')}/{kwargs.get('Key', '')}: "
                                    f"{type(exc).__name__}: {exc}") from exc

    async def _iterdir(self, bucket: str, *args: Any, **kwargs: Any) -> Any:
        """s3fs's listing, each page within the deadline ``_call_s3`` gives an answer: s3fs before
        2026.9 fetches the pages with botocore's paginator, not through ``_call_s3``, so a page
        answered a byte at a time held a listing (and restore) for good."""
        deadline = self.tries * (self.wait_s + _WHOLE_ANSWER / _MIN_UPLOAD_RATE)
        entries = super()._iterdir(bucket, *args, **kwargs)
        try:
            while True:
                try:
                    # Entries of a page already fetched come at once; the next page's fetch is
                    # the one wait here.
                    entry = await asyncio.wait_for(entries.__anext__(), deadline)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError as exc:
                    raise StoreNotAnswering(
                        f"list_objects_v2 of {bucket}/{kwargs.get('prefix', '')} was not answered within "
                        f"{deadline:.1f} s (the store's timeouts and retries, the answer at "
                        f"{_MIN_UPLOAD_RATE // 1024} KiB/s at least)") from exc
                yield entry
        finally:
            await entries.aclose()

    # s3fs binds its blocking call_s3 (which its file writer uses too) to its own _call_s3.
    call_s3 = sync_wrapper(_call_s3)


class _S3Multipart:
    """The S3 multipart upload of one object, one request per method."""

    def __init__(self, fs: s3fs.S3FileSystem, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def put_whole(self, data: bytes) -> None:
        self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data)

    def begin(self) -> str:
        return self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]

    def put_part(self, upload: str, number: int, data: bytearray) -> str:
        out = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=upload,
                              PartNumber=number, Body=data)
        return out["ETag"]

    def complete(self, upload: str, parts: list[tuple[int, str]]) -> None:
        self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload,
                        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]})

    def abort(self, upload: str) -> None:
        self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload)


def _check_passed_on(name: str, fs: Any) -> None:
    """Refuse a ``storage_options`` key that s3fs took for none of its own: it passes those to
    the client's session at the first request, which then fails (a typo'd ``endpointurl``), and
    that failure would read as a store that does not answer."""
    from aiobotocore.session import AioSession

    session = set(inspect.signature(AioSession.__init__).parameters) - {"self"}
    unknown = sorted(k for k in getattr(fs, "kwargs", {}) if k not in session)
    if unknown:
        known = [p for p in inspect.signature(s3fs.S3FileSystem.__init__).parameters if p not in ("self", "kwargs")]
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"backends.{name}.storage_options.{unknown[0]}: not an option of s3fs.S3FileSystem"
                          f"{hint}; its options are {', '.join(known)}")


class S3Backend(FileBackend):
    """Checkpoints under ``s3://bucket/prefix/<run_name>/``.

    Options: ``path`` (required), ``storage_options`` (passed to ``s3fs.S3FileSystem``, e.g.
    ``endpoint_url``, ``profile``, ``config_kwargs``), ``leftover_grace_s``, ``retry``
    (``attempts``, ``backoff_s``, ``max_backoff_s``), ``part_size_mb`` (at least 5) and
    ``upload_concurrency`` (parts in flight per file), ``timeout_s`` (connect and read
    timeout of each request) and ``request_retries`` (botocore's retries of each request),
    unless ``storage_options.config_kwargs`` sets ``connect_timeout``, ``read_timeout`` or
    ``retries`` itself.
    """

    OPTIONS = RemoteOptions.KEYS
    SCHEME = "s3"
    # The client is safe to use from several threads: the files of a split state go up at once.
    concurrent_writes = True

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> S3Backend:
        opts = RemoteOptions.from_config(name, options, cls.SCHEME, part_size_mb=16, min_part_size_mb=5)
        storage_options = dict(opts.storage_options)
        config_kwargs = dict(storage_options.get("config_kwargs") or {})
        # botocore retries each request inside each attempt of ckptkit's own retry policy;
        # ``max_attempts`` in botocore's config counts the retries, not the first try.
        config_kwargs.setdefault("retries", {"mode": "standard", "max_attempts": opts.request_retries})
        config_kwargs.setdefault("connect_timeout", opts.timeout_s)
        config_kwargs.setdefault("read_timeout", opts.timeout_s)
        # Room for every part in flight (up to 64 files written at once, roles.resume.write_threads,
        # × upload_concurrency): a request waiting for a pooled connection behind slow parts
        # counts against its deadline. Connections are opened as needed, not ahead.
        config_kwargs.setdefault("max_pool_connections", max(10, 64 * opts.concurrency))
        storage_options["config_kwargs"] = config_kwargs
        storage_options.setdefault("skip_instance_cache", True)
        fs = _S3FileSystem(**storage_options)
        _check_passed_on(name, fs)
        # s3fs retries a download cut off mid-body (per block read) as often as botocore
        # retries a request; a request botocore gave up on it does not try again (``_call_once``).
        fs.retries = opts.request_retries + 1
        # The deadlines from what the client was told, config_kwargs included.
        retries = config_kwargs["retries"].get("max_attempts", opts.request_retries) \
            if isinstance(config_kwargs["retries"], dict) else opts.request_retries
        fs.wait_s = float(max(config_kwargs["connect_timeout"], config_kwargs["read_timeout"]))
        fs.tries = int(retries) + 1
        return opts.backend(cls, name, fs)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Per run: the time before which no unfinished upload can be older than the grace
        # period, as the last listing of them showed (see ``stale_uploads``).
        self._uploads_quiet_until: dict[str, float] = {}
        self._parts_unlisted = False  # said once: the store refused to list an upload's parts
        self._versioning_told = False

    def store_exists(self) -> bool:
        return self.fs.exists(self.root.split("/", 1)[0])

    def file_exists(self, path: str) -> bool:
        # One HEAD: s3fs's exists lists the key as a folder too when the HEAD finds nothing.
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def multipart(self, path: str) -> _S3Multipart:
        return _S3Multipart(self.fs, path)

    def _delete(self, path: str, names: Iterable[str] | None = None) -> None:
        self._tell_versioning()
        names = None if names is None else list(names)
        # s3fs's rm takes keys with * ? [ as glob patterns: a file named like one would stay
        # behind, so such a folder is listed and deleted whole (a path holding one is refused).
        if names is None or any(c in key for key in (path, *names) for c in "*?["):
            return super()._delete(path)
        # Two requests where a recursive delete takes four: S3 answers the deletion of a
        # missing key with success, so the manifest is not asked for first, and the files the
        # prune's listing showed go in one batch without listing the folder again.
        manifest = posixpath.join(path, MANIFEST_NAME)
        self._call(f"deleting {self.uri(manifest)}", self.fs.rm_file, manifest)
        keys = [posixpath.join(path, name) for name in names]
        if keys:
            self._call(f"deleting {self.uri(path)}", self.fs.rm, keys)

    def _tell_versioning(self) -> None:
        """Warn once, before the first delete, when the bucket keeps what is deleted: in a
        versioned bucket every pruned checkpoint stays as a noncurrent version, billed, and a
        run's storage grows by one checkpoint per save. Deleting those versions is the bucket
        owner's choice (a lifecycle rule), not a prune's."""
        if self._versioning_told:
            return
        self._versioning_told = True
        bucket = self.root.split("/", 1)[0]
        try:
            status = self.fs.call_s3("get_bucket_versioning", Bucket=bucket).get("Status")
        except Exception as exc:  # not allowed to ask (a narrow IAM policy), no answer, or one not understood
            log.debug("backend %r: could not read the versioning of bucket %s: %s", self.name, bucket,
                      self.describe(exc))
            return
        # Suspended versioning deletes what is written since for good: only Enabled keeps it.
        if status == "Enabled":
            log.warning(
                "backend %r: bucket %s has versioning enabled: what a prune deletes stays in it as noncurrent "
                "versions, billed until they expire, and ckptkit leaves them. Add a lifecycle rule with "
                "NoncurrentVersionExpiration to the bucket (or to the prefix %s), or keep checkpoints in a "
                "bucket without versioning", self.name, bucket, self.uri(self.root))

    def stale_uploads(self, run_name: str, in_flight: set[str], now: float
                      ) -> list[tuple[CheckpointRef, Callable[[], None]]]:
        """Multipart uploads of this run's checkpoints that a killed save started and never finished.

        S3 keeps their parts (and bills them) until they are aborted. Only uploads into a step
        folder or a ``final/``, ``final-N/`` of this run, not this process's own save in flight,
        and idle for longer than the grace period are returned: begun that long ago, and no part
        received since, by this machine's clock and by the store's (``_idle_for``). A large
        upload of another process takes longer than the grace period and is still sending parts;
        a machine whose clock runs ahead of the store's would take any upload for an old one.

        They are listed only when one can have grown old enough: an upload that a listing did
        not show began after it, so none can be stale before the grace period has passed since
        that listing, nor before the oldest one it showed reaches the grace period. The prune
        after each save thus lists them once per grace period, not once per save.
        """
        run = self.run_path(run_name)
        if math.isfinite(now) and now < self._uploads_quiet_until.get(run, -math.inf):
            return []
        bucket, key, _ = self.fs.split_path(run)
        prefix = key.rstrip("/") + "/"
        uploads = self._call(f"listing unfinished uploads under {self.uri(run)}", self._list_uploads, bucket, prefix)
        stale = []
        quiet_until = now + self.leftover_grace_s
        busy = False
        for upload in uploads:
            folder = upload["Key"][len(prefix):].split("/", 1)[0]
            # Uploads into a checkpoint's folder, or beside it where a step saved again is staged.
            if parse_step(folder) is None and parse_final(folder) is None and not folder.startswith(LEFTOVER_PREFIXES):
                continue
            begun = upload["Initiated"].timestamp()
            if posixpath.join(run, folder) in in_flight or now - begun <= self.leftover_grace_s:
                quiet_until = min(quiet_until, begun + self.leftover_grace_s)
                continue
            ref = self._ref(run_name, -1, f"{bucket}/{upload['Key']}", role="unfinished upload")
            if math.isfinite(now):
                # After one listing of parts the store failed for now, the others wait for the next prune.
                idle = None if busy else self._told_idle(ref, bucket, upload, now)
                busy = busy or idle is _BUSY
                if busy:
                    quiet_until = min(quiet_until, now)
                    continue
                if idle is None:
                    continue  # finished or aborted since the listing
                if idle <= self.leftover_grace_s:
                    quiet_until = min(quiet_until, now + self.leftover_grace_s - idle)
                    continue
            quiet_until = min(quiet_until, begun + self.leftover_grace_s)  # listed again should its abort fail
            abort = functools.partial(self._call, f"aborting the upload of {ref.uri}", self.fs.call_s3,
                                      "abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                      UploadId=upload["UploadId"])
            stale.append((ref, abort))
        if math.isfinite(now):
            self._uploads_quiet_until[run] = quiet_until
        return stale

    def _told_idle(self, ref: CheckpointRef, bucket: str, upload: dict[str, Any], now: float) -> Any:
        """``_idle_for``, asked of the store: ``_BUSY`` where it failed for now (throttled, slow),
        and its age by when it began where it refuses to list parts for good, saying so once."""
        try:
            return self._call(f"listing the parts of {ref.uri}", self._idle_for, bucket, upload, now)
        except Exception as exc:  # noqa: BLE001 - told here, and the upload decided on
            if isinstance(exc, RetriesExhausted) or is_transient(exc):
                log.warning("backend %r: the parts of %s could not be listed (%s); its unfinished uploads are left "
                            "for the next prune", self.name, ref.uri, self.describe(exc))
                return _BUSY
            if not self._parts_unlisted:
                self._parts_unlisted = True
                log.warning("backend %r: the parts of unfinished uploads could not be listed (%s), so they are "
                            "aged by when they began: an upload of another process that takes longer than "
                            "leftover_grace_s may be aborted. Where the store refused it, allow "
                            "s3:ListMultipartUploadParts", self.name, self.describe(exc))
            return now - upload["Initiated"].timestamp()

    def _idle_for(self, bucket: str, upload: dict[str, Any], now: float) -> float | None:
        """How long ``upload`` (an entry of ``list_multipart_uploads``) has received nothing: since
        its newest part, or its start if it has none, by this machine's clock (``now``) or by the
        store's (the ``Date`` of its answers), whichever tells less. None once it is gone."""
        newest = upload["Initiated"].timestamp()
        store_now = now
        page: dict[str, Any] = {"Bucket": bucket, "Key": upload["Key"], "UploadId": upload["UploadId"]}
        while True:
            try:
                out = self.fs.call_s3("list_parts", **page)
            except FileNotFoundError:
                return None
            newest = max([newest, *(part["LastModified"].timestamp() for part in out.get("Parts", ()))])
            date = out.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            try:
                store_now = min(store_now, email.utils.parsedate_to_datetime(date).timestamp())
            except (TypeError, ValueError):
                pass  # no Date: this machine's clock alone
            if not out.get("IsTruncated"):
                return store_now - newest
            page["PartNumberMarker"] = out["NextPartNumberMarker"]

    def _list_uploads(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        page: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        while True:
            out = self.fs.call_s3("list_multipart_uploads", **page)
            found += out.get("Uploads", [])
            if not out.get("IsTruncated"):
                return found
            page.update(KeyMarker=out["NextKeyMarker"], UploadIdMarker=out["NextUploadIdMarker"])
