"""Fetches one dataset file from S3 or HTTP(S) for the configure stage: streamed in chunks into
an open file, never past its recorded size, within the node's time limits, its sha256 computed
on the way and checked at the end.

Blocking: S3 runs on an event loop of its own (`asyncio.run`), since the configure stage runs in
a worker thread or a process of its own; HTTP uses httpx's blocking client.

A FetchError's message is safe to show the consumer: it never names the URL, bucket, key, host
or anything of the credentials. It is raised outside the handler of the library's error, so no
exception chain carries those either; the libraries' own log lines that name a URL are kept
below the level a node logs at."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from c2d.engine.v1 import engine_pb2

from mesh.s3 import S3Settings, error_code, parse_s3_url
from operator_engine.sources import SourceSettings

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

CHUNK_BYTES = 1 << 20
MAX_REDIRECTS = 3
_SAFE_CODE = re.compile(r"[A-Za-z0-9.]{1,40}")
# httpx logs each request's URL at INFO, httpcore each host at DEBUG: a dataset's location must
# never reach a log, whatever level the node's standard logging is set to.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class FetchError(Exception):
    """The file could not be fetched as recorded; the message is safe for the consumer."""


class Stopped(Exception):
    """The job was stopped while the file was being fetched."""


class _LocalWriteError(Exception):
    """Writing the workspace failed (not for want of room): the node's failure, re-raised as
    an OSError once out of the fetch's handlers."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Fetched:
    """What was fetched: its size and sha256 (both as recorded), and how long it took."""

    size_bytes: int
    sha256: str
    seconds: float


class _Sink:
    """Writes the chunks to `out`, counting and hashing them: refuses a byte past the recorded
    size, a stopped job, and a fetch beyond its deadline, before writing anything more."""

    def __init__(
        self, out: int, size_bytes: int, timeout_s: float, stopped: Callable[[], bool]
    ) -> None:
        self.out = out
        self.expected = size_bytes
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.stopped = stopped
        self.size = 0
        self.hash = hashlib.sha256()

    def check_announced(self, announced: int | None) -> None:
        """Fails at once when the server announces another size than the recorded one."""
        if announced is not None and announced > self.expected:
            raise FetchError(self.too_large())
        if announced is not None and announced < self.expected:
            raise FetchError(
                f"smaller than its recorded size ({announced} of {self.expected} bytes announced)"
            )

    def too_large(self) -> str:
        return f"larger than its recorded size of {self.expected} bytes"

    def write(self, chunk: bytes) -> None:
        if self.stopped():
            raise Stopped
        if time.monotonic() > self.deadline:
            raise FetchError(self.timed_out())
        self.size += len(chunk)
        if self.size > self.expected:
            raise FetchError(self.too_large())
        self.hash.update(chunk)
        view = memoryview(chunk)
        code = 0
        while view and not code:
            try:
                view = view[os.write(self.out, view) :]
            except OSError as error:
                code = error.errno or errno.EIO
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise FetchError("no room left for the job's inputs")
        if code:
            raise _LocalWriteError(code)

    def timed_out(self) -> str:
        return f"timed out (the node allows {self.timeout_s:g} s per file)"

    def finish(self, sha256: str) -> Fetched:
        if self.size < self.expected:
            raise FetchError(
                f"smaller than its recorded size ({self.size} of {self.expected} bytes)"
            )
        digest = self.hash.hexdigest()
        if digest != sha256:
            raise FetchError("content does not match its recorded sha256")
        return Fetched(self.size, digest, time.monotonic() - self.started)


def fetch(
    source: engine_pb2.DatasetFileSource,
    access: S3Settings | Mapping[str, str],
    out: int,
    sources: SourceSettings,
    stopped: Callable[[], bool],
) -> Fetched:
    """Fetches `source` into the open file `out`: its s3_url with the S3 settings `access`,
    or its http_url sending the headers `access`. Either way through one sink, within
    `sources.timeout_s`, checked against the recorded size and sha256."""
    sink = _Sink(out, source.size_bytes, sources.timeout_s, stopped)
    if isinstance(access, S3Settings):
        bucket, key = parse_s3_url(source.s3_url)
        outcome = asyncio.run(_s3_stream(access, bucket, key, sink))
    else:
        outcome = _http_stream(source.http_url, access, sink, sources)
    # Raised here, outside every handler: a failure's description, or a local write's errno.
    if isinstance(outcome, str):
        raise FetchError(outcome)
    if isinstance(outcome, int):
        raise OSError(outcome, os.strerror(outcome))
    return sink.finish(source.sha256)


# -- HTTP(S) ---------------------------------------------------------------------------------


def _http_stream(
    url: str, headers: Mapping[str, str], sink: _Sink, sources: SourceSettings
) -> str | int | None:
    """Streams the body into `sink`; a failure's safe description, a local write's errno, or
    None."""
    read_s = min(sources.read_timeout_s, sources.timeout_s)
    timeout = httpx.Timeout(read_s, connect=min(sources.connect_timeout_s, sources.timeout_s))
    try:
        # Certificates verified; redirects followed by hand (see _get).
        with httpx.Client(timeout=timeout, follow_redirects=False, verify=True) as client:
            _get(client, httpx.URL(url), dict(headers), sink)
    except _LocalWriteError as error:
        return error.code
    except (FetchError, Stopped):
        raise
    except httpx.TimeoutException:
        return f"timed out (no answer within {read_s:g} s)"
    except (httpx.InvalidURL, httpx.UnsupportedProtocol):
        return "not a usable http:// or https:// URL"
    except httpx.TransportError:
        return "the server could not be reached, or broke off"
    except Exception as error:
        # Anything else may carry the URL in its message: only its kind is said.
        return f"the download failed ({type(error).__name__})"
    return None


def _get(client: httpx.Client, target: httpx.URL, headers: dict[str, str], sink: _Sink) -> None:
    """GETs `target` into `sink`, sending `headers` (never after a redirect to another origin),
    following at most MAX_REDIRECTS redirects, never from https to http."""
    # The file's bytes as stored: a compressed body would be another size and digest.
    sent = {**headers, "Accept-Encoding": "identity"}
    for _ in range(MAX_REDIRECTS + 1):
        with client.stream("GET", target, headers=sent) as response:
            if response.is_redirect:
                following = target.join(response.headers.get("location", ""))
                if following.scheme not in ("http", "https"):
                    raise FetchError("redirected to a location that is not http(s)")
                if target.scheme == "https" and following.scheme == "http":
                    raise FetchError("redirected from https to plain http")
                if _origin(following) != _origin(target):
                    # The node's credentials are for the origin the owner registered.
                    sent = {"Accept-Encoding": "identity"}
                target = following
                continue
            if response.status_code != httpx.codes.OK:
                raise FetchError(f"the server answered HTTP {response.status_code}")
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                raise FetchError("the server sent it content-encoded, not as its bytes")
            sink.check_announced(_announced(response.headers.get("content-length")))
            # As the bytes arrive (a network read's worth, at most 64 KiB): a chunk size would
            # make httpx gather them first, out of sight of the deadline and the stop.
            for chunk in response.iter_raw():
                sink.write(chunk)
            return
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _announced(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    return int(value)


# -- S3 --------------------------------------------------------------------------------------


async def _s3_stream(settings: S3Settings, bucket: str, key: str, sink: _Sink) -> str | int | None:
    """Streams the object into `sink`; a failure's safe description, a local write's errno,
    or None."""
    # Imported here, as mesh.s3 does: most configure runs never touch S3.
    import aiohttp
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    try:
        # The whole fetch, retries included, within the node's time per file.
        async with asyncio.timeout(sink.timeout_s), settings.client(max_connections=1) as s3:
            response = await s3.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                sink.check_announced(response.get("ContentLength"))
                while chunk := await body.read(CHUNK_BYTES):
                    sink.write(chunk)
            finally:
                body.close()  # a refused file's connection is dropped, not read to its end
    except _LocalWriteError as error:
        return error.code
    except (FetchError, Stopped):
        raise
    except TimeoutError:
        return sink.timed_out()
    except (ReadTimeoutError, ConnectTimeoutError):
        return f"timed out (no answer within {settings.read_timeout_s:g} s)"
    except NoCredentialsError:
        return "no S3 credentials for it on this node"
    except ClientError as error:
        return _s3_refusal(error)
    except (BotoCoreError, aiohttp.ClientError):
        return "the store could not be reached, or broke off"
    except Exception as error:
        # Anything else may carry the bucket or key in its message: only its kind is said.
        return f"the download failed ({type(error).__name__})"
    return None


def _s3_refusal(error: ClientError) -> str:
    code = error_code(error)
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
        return "not found in the store"
    denied = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
    if code in denied or status == 403:
        return "access denied by the store"
    # The store's error code is a short fixed word (never the bucket or key).
    return f"the store refused it ({code if _SAFE_CODE.fullmatch(code) else 'error'})"
