"""Keeping credentials, signatures and tokens out of every message ckptkit shows or logs."""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

# A query already redacted is left as it is: a message passed through several layers, each
# redacting it, would otherwise grow a "<redacted>" per layer.
_QUERY_RE = re.compile(r"((?:https?|s3|gs|gcs)://[^\s?'\"<>]+)\?(?!<redacted>)[^\s'\"<>]*")
_SECRET_FIELD_RE = re.compile(
    r"(?i)\b(authorization|x-amz-security-token|x-amz-credential|x-amz-signature|x-goog-signature|"
    r"x-goog-credential|signature|access_token|refresh_token|id_token|client_secret|"
    r"aws_secret_access_key|aws_session_token|secret_access_key|session_token|secret|password|"
    r"token|upload_id|uploadid)(['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+|aws4-hmac-sha256\s+)?[^\s,'\"}&;]+"
)
_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
# ``scheme://user:password@``. The first form runs to the last ``@`` before the path, so a
# password holding ``@`` goes too, and quotes, which a user part may hold unencoded; the
# second takes a secret holding ``/`` (AWS secret keys do) when a ``:`` comes first and what
# follows it is not a port.
_USERINFO_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?:[^/\s]+@|[^/\s'\"<>@:]*:(?!\d+(?:/|$))[^\s'\"<>@]*@)"
)
# ``user:password@host`` without a scheme (MLflow takes such a tracking URI, and a bucket
# parsed out of ``s3://KEY:SECRET@bucket`` looks like it).
_BARE_USERINFO_RE = re.compile(
    r"(?<![\w.~%+@:/*-])[\w.~%+-][\w.~%+@-]*:(?!//|\d+(?:/|$))[^\s'\"<>@]+@(?=[\w\[])"
)
_SECRET_OPTION_NAMES = ("key", "secret", "token", "password", "session_token", "client_secret",
                        "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                        "access_token", "refresh_token", "private_key", "private_key_id")
# What gcsfs takes as its ``token`` besides a credential: how to find one, no secret itself.
# Taken for one, "anon" was cut out of every message ("C<redacted>ical_Data", a bucket name).
_TOKEN_MODES = frozenset({"anon", "cloud", "cache", "browser", "google_default"})
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "GOOGLE_OAUTH_ACCESS_TOKEN", "GCS_OAUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN")


def secret_values(options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Credential strings that must never be shown: from storage options and the environment."""
    found: list[str] = []

    def walk(value: Any, name: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k).lower())
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, name)
        elif (isinstance(value, str) and name in _SECRET_OPTION_NAMES and len(value) >= 4
              and not (name == "token" and value in _TOKEN_MODES)):
            found.append(value)

    walk(dict(options or {}))
    found.extend(v for e in _SECRET_ENV if len(v := os.environ.get(e, "")) >= 4)
    return tuple(sorted(set(found), key=len, reverse=True))


def masked(value: Any) -> Any:
    """``value`` (options as a config gives them) with the values of credential keys replaced
    and credentials in every string redacted, for showing it."""
    if isinstance(value, Mapping):
        return {k: "<redacted>" if str(k).lower() in _SECRET_OPTION_NAMES and v else masked(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked(v) for v in value)
    return redact(value) if isinstance(value, str) else value


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without credentials, signatures, tokens or URL query strings."""
    # A URL's user part first: a known secret replaced there would hide it from the pattern,
    # and the password beside it would stay.
    text = _USERINFO_RE.sub(r"\g<scheme>***@", text)
    text = _BARE_USERINFO_RE.sub("***@", text)
    for value in secrets:
        if value:
            text = text.replace(value, "<redacted>")
    text = _QUERY_RE.sub(r"\1?<redacted>", text)
    text = _SECRET_FIELD_RE.sub(r"\1\2<redacted>", text)
    return _KEY_ID_RE.sub("<redacted-key-id>", text)


def scrub(exc: BaseException, secrets: Iterable[str] = ()) -> BaseException:
    """``exc`` and the exceptions chained to it with credentials redacted from their string
    arguments, in place: a client's own error becomes the cause of ckptkit's, and a traceback
    prints every cause's text. Returns ``exc``."""
    secrets = tuple(secrets)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            current.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in current.args)
        except (AttributeError, TypeError):  # an exception type that fixes its arguments
            pass
        for name in ("filename", "filename2", "strerror", "msg", "url"):
            value = getattr(current, name, None)
            if isinstance(value, str) and redact(value, secrets) != value:
                try:
                    setattr(current, name, redact(value, secrets))
                except (AttributeError, TypeError):
                    pass
        current = current.__cause__ or current.__context__
    return exc


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A one-line description of an exception, safe to log."""
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    if not detail and exc.__cause__ is not None:
        return describe(exc.__cause__, secrets)
    return redact(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__, secrets)
