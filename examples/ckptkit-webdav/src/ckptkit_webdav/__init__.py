"""The ``webdav`` backend: ckptkit checkpoints on a WebDAV server, an example third-party distribution.

Everything comes from ``ckptkit.plugin``; ``FileBackend`` does the storage contract (layout,
manifest-last commit, checksums, leftovers, pruning, retries). WebDAV differs from an object
store in three ways, each answered by one of ``FileBackend``'s documented capabilities:

- A file can only be written into a folder that exists (a PUT elsewhere is 409 Conflict), so
  ``needs_folders`` asks ``FileBackend`` to make each checkpoint's folder first.
- An upload streams into the file's final name, so a cut-off upload leaves a truncated file;
  but MOVE renames on the server, so ``atomic_move`` commits the manifest by writing it under a
  temporary name and moving it into place. A truncated ``manifest.json`` never exists.
- Paths are relative to the server's URL, which ``uri`` puts back (without credentials), so
  that ``ckptkit check``, refs and every message name the host.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import httpx
from webdav4.client import BadGatewayError, HTTPError, ResourceLocked
from webdav4.fsspec import WebdavFileSystem, translate_exceptions, translate_info

from ckptkit.plugin import ConfigError, FileBackend, RetryPolicy, check_number, check_options

__all__ = ["DavFileSystem", "WebdavBackend", "parse_url"]
__version__ = "0.1.0"

# What is worth another try: a dropped or timed-out connection, a busy or failing server (its
# 5xx and 429 answers are retried by ckptkit's own rules), a lock another client holds.
TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, BadGatewayError,
             ResourceLocked)


class DavFileSystem(WebdavFileSystem):
    """webdav4's filesystem, with a file move that is one MOVE and a listing that is one PROPFIND."""

    def mv(self, path1: str, path2: str, recursive: bool = False, maxdepth: int | None = None,
           **kwargs: Any) -> None:
        if recursive:
            return super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
        # webdav4 moves a file by copying it and deleting the original; MOVE is a rename on the
        # server, so the target is never seen half-written (FileBackend relies on it).
        with translate_exceptions():
            self.client.move(self._strip_protocol(path1), self._strip_protocol(path2), overwrite=True)
        self.invalidate_cache(self._parent(path2))
        return None

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
             **kwargs: Any) -> Any:
        # fsspec's find lists folder by folder: a request per checkpoint. One PROPFIND with
        # "Depth: infinity" answers for the whole tree where the server allows it.
        if maxdepth is not None:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        path = self._strip_protocol(path).rstrip("/")
        try:
            with translate_exceptions():
                result = self.client.propfind(path, headers={"Depth": "infinity"}, follow_redirects=True)
        except HTTPError as exc:
            if exc.status_code != 403:  # 403: the server refuses infinite depth (RFC 4918 9.1)
                raise
            return super().find(path, withdirs=withdirs, detail=detail, **kwargs)
        found = {}
        for response in result.responses.values():
            name = response.path_relative_to(self.client.base_url).rstrip("/")
            info = translate_info({"name": name, "href": response.href, **response.properties.as_dict()})
            if info.get("type") == "directory" and (not withdirs or name == path):
                continue
            found[name] = info
        return found if detail else sorted(found)


def parse_url(key: str, value: Any) -> tuple[str, str]:
    """``(server URL, folder)`` from ``http(s)://host[:port]/folder``; a ConfigError names ``key``."""
    example = "https://dav.example.org/remote.php/dav/files/me/checkpoints"
    if not isinstance(value, str) or "://" not in value:
        raise ConfigError(f"{key}: must be an http:// or https:// URL of a folder, like {example}; got {value!r}")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{key}: the webdav backend takes http:// or https:// URLs, got {parts.scheme}://")
    if "@" in parts.netloc:
        # The whole value may hold a password: it is not shown.
        raise ConfigError(f"{key}: credentials do not belong in the URL; set username and password_env")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}: the URL takes no query or fragment")
    if not parts.hostname:
        raise ConfigError(f"{key}: {value!r} names no server; write it like {example}")
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    if not segments:
        raise ConfigError(f"{key}: {value!r} names no folder on the server; write it like {example}")
    if any(s in (".", "..") for s in segments):
        raise ConfigError(f"{key}: the folder {parts.path!r} may not contain '.' or '..' segments")
    return f"{parts.scheme}://{parts.netloc}/", "/".join(segments)


class WebdavBackend(FileBackend):
    """Checkpoints under ``<path>/<run_name>/`` on a WebDAV server.

    Options: ``path`` (required; the URL of a folder, every folder on the way served by WebDAV),
    ``username`` and ``password_env`` (the name of the environment variable that holds the
    password: credentials stay out of the YAML), ``timeout_s`` (connect and read timeout of each
    request), ``retry`` (``attempts``, ``backoff_s``, ``max_backoff_s``), ``leftover_grace_s``.
    """

    OPTIONS = ("path", "username", "password_env", "timeout_s", "retry", "leftover_grace_s")
    needs_folders = True
    atomic_move = True

    def __init__(self, name: str, fs: DavFileSystem, root: str, server: str, **kwargs: Any):
        super().__init__(name, fs, root, **kwargs)
        self.server = server  # ``https://host:port/``, never with credentials

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> WebdavBackend:
        key = f"backends.{name}"
        check_options(key, options, cls.OPTIONS, required=("path",))
        server, root = parse_url(f"{key}.path", options["path"])
        username, password_env = options.get("username"), options.get("password_env")
        if (username is None) != (password_env is None):
            raise ConfigError(f"{key}: give both username and password_env, or neither")
        auth, secrets = None, ()
        if username is not None:
            if not isinstance(username, str) or not isinstance(password_env, str):
                raise ConfigError(f"{key}: username and password_env must be strings")
            password = os.environ.get(password_env)
            if not password:
                raise ConfigError(f"{key}.password_env: the environment variable {password_env} is not set; "
                                  "export the WebDAV password in it")
            auth, secrets = (username, password), (password,)
        timeout = check_number(f"{key}.timeout_s", options.get("timeout_s", 60), 0.001)
        grace = check_number(f"{key}.leftover_grace_s", options.get("leftover_grace_s", 3600), 0)
        retry = RetryPolicy.from_config(f"{key}.retry", options.get("retry")).with_transient(*TRANSIENT)
        # webdav4 would retry each request itself (3 tries, 1 s and 2 s apart); ckptkit's policy
        # is the one bound the config sets, so the client's own is off.
        fs = DavFileSystem(server, auth=auth, timeout=timeout, retry=False, skip_instance_cache=True)
        return cls(name, fs, root, server, leftover_grace_s=float(grace), retry=retry, secrets=secrets)

    def uri(self, path: str) -> str:
        return self.server + urllib.parse.quote(self.fs._strip_protocol(path).lstrip("/"))
