"""Where the configure stage may fetch dataset files from, and with which secrets: the node's
source credentials and the limits of every fetch (see DatasetFileSource in the engine contract).

The node's operator names the credentials in a JSON file, `C2D_SOURCE_CREDENTIALS`:

    {"warehouse": {"s3": {"endpoint_url": "https://s3.example", "region": "eu-west-1",
                          "access_key_id": "...", "secret_access_key": "...",
                          "session_token": "...", "path_style": true}},
     "partner": {"http": {"headers": {"Authorization": "Bearer ..."}}}}

It is read and checked once, when the engine starts (a bad file stops it with one line naming
the file and the entry), and must not be readable by others. A dataset file names an entry by
`credentials`; without one, S3 takes the node's default settings (`S3Settings.from_env`) and
HTTP sends no credentials. The secrets stay in the engine, or in the configure pod on
Kubernetes: never in a request, a log line, an error, the algorithm's environment or any file
the sandbox sees. Nothing here prints a secret value, and the objects' reprs show entry names
only.

Limits, from the environment: `C2D_SOURCE_MAX_BYTES` (default 64 GiB), the most one job may
fetch in all; `C2D_SOURCE_TIMEOUT_S` (default 600), the longest one file's fetch may take.

None of this is for a dataset made from a job's outputs (a `stored` file): its copies are in the
node's own results storage, read with the engine's storage settings (C2D_STORAGE, and C2D_S3_*
for S3), never with a source credential."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import config as mesh_config
from mesh.s3 import S3Settings

GIB = 1 << 30
CREDENTIALS_VARIABLE = "C2D_SOURCE_CREDENTIALS"
MAX_BYTES_VARIABLE = "C2D_SOURCE_MAX_BYTES"
TIMEOUT_VARIABLE = "C2D_SOURCE_TIMEOUT_S"
# A credentials file is a few entries; anything this large is a mistake.
_MAX_FILE_BYTES = 1 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# An HTTP header's name is a token (RFC 9110).
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the fetch sets itself, or that would change how the body is framed.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "te"}
)
_S3_STRINGS = ("endpoint_url", "region", "access_key_id", "secret_access_key", "session_token")


class UnknownCredentials(LookupError):
    """A dataset file names a credential the node does not have, or one of the other kind
    (S3 for an HTTP URL, or the reverse). The message is safe to show the consumer."""


@dataclass(frozen=True)
class S3Credential:
    """An S3 entry: how to reach the store and who we are to it."""

    settings: S3Settings = field(repr=False)


@dataclass(frozen=True)
class HttpCredential:
    """An HTTP entry: headers sent with the request (and not after a redirect elsewhere)."""

    headers: Mapping[str, str] = field(repr=False, hash=False)


Credential = S3Credential | HttpCredential


@dataclass(frozen=True)
class SourceSettings:
    """The node's source credentials, by name, and the limits of every fetch."""

    credentials: Mapping[str, Credential] = field(default_factory=dict, repr=False, hash=False)
    # Where the credentials came from, for messages; None: no file.
    credentials_file: Path | None = None
    # The most one job may fetch, all its remote files together.
    max_bytes: int = 64 * GIB
    # The longest one file's fetch may take, from the first connection to the last byte.
    timeout_s: float = 600.0
    # Seconds to connect, and to wait for each read; never above `timeout_s`.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"{MAX_BYTES_VARIABLE} must be a positive number of bytes")
        if not self.timeout_s > 0 or not self.connect_timeout_s > 0 or not self.read_timeout_s > 0:
            raise ValueError(f"{TIMEOUT_VARIABLE} and the fetch timeouts must be positive")

    def __repr__(self) -> str:
        names = ", ".join(sorted(self.credentials))
        return (
            f"SourceSettings(credentials=[{names}], max_bytes={self.max_bytes}, "
            f"timeout_s={self.timeout_s:g})"
        )

    @classmethod
    def from_env(cls) -> SourceSettings:
        """The engine's settings; ValueError, naming the variable or the file and the entry,
        when one is wrong."""
        raw = os.environ.get(CREDENTIALS_VARIABLE, "")
        path = Path(raw) if raw else None
        return cls(
            credentials=load_credentials(path) if path is not None else {},
            credentials_file=path,
            max_bytes=mesh_config.env_int(MAX_BYTES_VARIABLE, 64 * GIB),
            timeout_s=mesh_config.env_float(TIMEOUT_VARIABLE, 600.0),
        )

    def limits_env(self) -> dict[str, str]:
        """The limits as the variables `from_env` reads, for a configure stage run elsewhere
        (a Kubernetes pod). No secret: the credentials travel by a Secret of their own."""
        return {MAX_BYTES_VARIABLE: str(self.max_bytes), TIMEOUT_VARIABLE: repr(self.timeout_s)}

    def s3_settings(self, name: str) -> S3Settings:
        """The S3 settings of entry `name`, or the node's defaults when `name` is empty, with
        this node's fetch timeouts. UnknownCredentials when there is no such S3 entry;
        ValueError when the node's default settings are unusable."""
        if name:
            credential = self.credentials.get(name)
            if not isinstance(credential, S3Credential):
                raise UnknownCredentials(_unknown(credential))
            settings = credential.settings
        else:
            settings = S3Settings.from_env()
        return dataclasses.replace(
            settings,
            connect_timeout_s=min(self.connect_timeout_s, self.timeout_s),
            read_timeout_s=min(self.read_timeout_s, self.timeout_s),
        )

    def http_headers(self, name: str) -> dict[str, str]:
        """The headers of entry `name`; none when `name` is empty. UnknownCredentials when
        there is no such HTTP entry."""
        if not name:
            return {}
        credential = self.credentials.get(name)
        if not isinstance(credential, HttpCredential):
            raise UnknownCredentials(_unknown(credential))
        return dict(credential.headers)


def _unknown(found: Credential | None) -> str:
    if found is None:
        return "unknown source credentials"
    kind = "S3" if isinstance(found, S3Credential) else "HTTP"
    return f"the source credentials are for {kind}, not for this file's location"


def load_credentials(path: Path) -> dict[str, Credential]:
    """The entries of a credentials file. ValueError naming the file (and the entry, when one
    is at fault), never a value: the file refuses to be read when others may read or change
    it, as ssh refuses a private key."""
    text = _read_private(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        # The decoder's message says where, not what: no part of the file is echoed.
        raise ValueError(
            f"{CREDENTIALS_VARIABLE} {path}: not JSON ({error.msg} at line {error.lineno})"
        ) from None
    return parse_credentials(document, f"{CREDENTIALS_VARIABLE} {path}")


def parse_credentials(document: Any, origin: str) -> dict[str, Credential]:
    """The entries of a parsed credentials document; ValueError naming `origin` and the entry."""
    if not isinstance(document, dict):
        raise ValueError(f"{origin}: must be a JSON object of named entries")
    entries: dict[str, Credential] = {}
    for name, body in document.items():
        if not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"{origin}: an entry name must be 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        try:
            entries[name] = _credential(body)
        except ValueError as error:
            raise ValueError(f"{origin}: entry {name!r}: {error}") from None
    return entries


def _credential(body: Any) -> Credential:
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in ("s3", "http"):
        raise ValueError('must be an object with one key, "s3" or "http"')
    ((kind, options),) = body.items()
    if not isinstance(options, dict):
        raise ValueError(f"{kind!r} must be an object")
    return _s3_credential(options) if kind == "s3" else _http_credential(options)


def _s3_credential(options: dict[str, Any]) -> S3Credential:
    unknown = sorted(set(options) - {*_S3_STRINGS, "path_style"})
    if unknown:
        raise ValueError(f"unknown S3 settings {unknown}; known: {[*_S3_STRINGS, 'path_style']}")
    for key in _S3_STRINGS:
        if not isinstance(options.get(key, ""), str):
            raise ValueError(f"S3 setting {key!r} must be a string")
    if not isinstance(options.get("path_style", True), bool):
        raise ValueError("S3 setting 'path_style' must be true or false")
    # S3Settings's own checks name what is wrong without echoing a value.
    return S3Credential(S3Settings(**options))


def _http_credential(options: dict[str, Any]) -> HttpCredential:
    if set(options) != {"headers"}:
        raise ValueError('an HTTP entry holds exactly "headers"')
    headers = options["headers"]
    if not isinstance(headers, dict) or not headers:
        raise ValueError('"headers" must be a non-empty object of header names and values')
    for name, value in headers.items():
        if not _HEADER_NAME_RE.fullmatch(name) or name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is not a header name a source may set")
        if not isinstance(value, str) or any(c in value for c in "\r\n\x00"):
            raise ValueError(f"the value of header {name!r} must be one line of text")
    return HttpCredential(dict(headers))


def _read_private(path: Path) -> str:
    """The file's text, when only its owner (and group) may read it."""
    problem = ""
    info: os.stat_result | None = None
    try:
        # Links followed: a Kubernetes Secret's files are links into its current version.
        info = os.stat(path)
    except OSError as error:
        problem = f"cannot be read ({error.strerror})"
    if info is not None and not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info is not None and info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        problem = (
            f"is readable or writable by others (mode {stat.S_IMODE(info.st_mode):04o}) and "
            f"holds secrets: refused, as ssh refuses such a key; chmod o-rw it"
        )
    elif info is not None and info.st_size > _MAX_FILE_BYTES:
        problem = "is larger than 1 MiB"
    if problem:
        raise ValueError(f"{CREDENTIALS_VARIABLE} {path} {problem}")
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8"
        raise ValueError(f"{CREDENTIALS_VARIABLE} {path} cannot be read ({reason})") from None
