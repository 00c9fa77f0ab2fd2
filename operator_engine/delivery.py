"""Delivery of a job's kept results to the consumer's own storage (`ResultDelivery`): an S3
bucket it names with its keys, or presigned upload URLs it made. Both backends call `deliver`
after the publish stage stored the results and before the job's final state, reading each
result back from the node's storage.

Each result is streamed, never held whole: from the node's storage, through a sha256 that must
match the one recorded when the result was stored, to the destination. A copy that does not
match never completes there: an S3 upload is aborted before it completes, and an HTTP upload
is cut before its last bytes (it was announced with its length, so the server drops it).

A destination is consumer input that makes the node open connections: it is checked right
before (https:// to public addresses only, unless the node allows the host; see mesh.delivery),
redirects are never followed, the node's own proxy settings and .netrc are not used for upload
URLs, and every request has timeouts, a few tries and the whole delivery a deadline.

The outcome is a DeliveryStatus: DELIVERED (every kept result that had a destination), or
FAILED with a message. Messages and log lines never hold a key, a URL or an error text of the
HTTP or S3 client (which can quote URLs): only fixed words, HTTP statuses and S3 error codes.
A failed delivery never changes the job's own outcome: its results stay downloadable from the
Provider."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import structlog
from c2d.common.v1 import job_pb2

from mesh import delivery as rules
from mesh.errors import MeshError, PermissionDenied
from mesh.s3 import S3Settings, error_code
from mesh.storage import Storage, Tally, result_key
from operator_engine.config import DeliverySettings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

Status = job_pb2.DeliveryStatus

NO_SECRETS = (
    "not delivered: the delivery's secrets (keys, upload URLs) are never kept on disk, and the "
    "job was picked up again after a restart without them; download the results from the "
    "Provider"
)
ENGINE_STOPPED = (
    "not delivered: the engine stopped before the results were delivered; download them from "
    "the Provider"
)
# The sha256 of each delivered object, as metadata (x-amz-meta-c2d-sha256), as in the node's
# own S3 storage.
SHA256_METADATA = "c2d-sha256"
_CONTENT_TYPE = "application/octet-stream"
# An S3 error code is a short word; anything else a server says is not repeated.
_CODE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# How many result names a message lists, and how much of each.
_LISTED = 10
_NAME_SHOWN = 120
_MESSAGE_MAX = 2000
_ABORT_TIMEOUT_S = 10.0
_BACKOFF_S = 0.5


class _Failure(Exception):
    """One result was not delivered. `reason` names no secret or URL; `unreachable` when the
    delivery's one destination (an S3 store) could not be reached at all: the rest is not
    tried. An upload URL is a destination of its own: one that fails stops no other."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable


@dataclass(frozen=True)
class _Item:
    """A kept result and where it goes: an S3 key or an upload URL."""

    result: job_pb2.ResultFile
    where: str


# Delivers one item; a _Failure when it cannot.
_Put = Callable[[_Item], Awaitable[None]]


@dataclass
class _Progress:
    delivered: int = 0
    failed: list[str] = field(default_factory=list)
    not_tried: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        """How many items were tried to the end, delivered or not (one entry each)."""
        return self.delivered + len(self.failed)


@dataclass
class _Plan:
    items: list[_Item]
    # Results left out: kept with no upload URL, or sharing an earlier result's name.
    no_url: list[str] = field(default_factory=list)
    same_name: list[str] = field(default_factory=list)
    # Upload URLs naming no result of the job.
    unknown: list[str] = field(default_factory=list)


async def deliver(
    storage: Storage,
    job_id: str,
    results: Sequence[job_pb2.ResultFile],
    target: job_pb2.ResultDelivery,
    settings: DeliverySettings,
) -> job_pb2.DeliveryStatus:
    """Delivers `results` (the job's kept results, stored in `storage`) to `target`; returns
    the outcome. Never raises for a delivery that fails: the status says why."""
    kind = target.WhichOneof("destination") or "none"
    log = structlog.get_logger().bind(job_id=job_id, destination_kind=kind)
    if not rules.has_secrets(target):
        log.warning("delivery.no_secrets")
        return failed(target, job_id, NO_SECRETS)
    plan = _plan(target, job_id, results)
    progress = _Progress()
    try:
        async with asyncio.timeout(settings.timeout_s):
            if plan.items:
                # Right before connecting: the engine's own view of DNS is the one that counts
                # (a slow resolver counts against the deadline too).
                await rules.check_destination(target, settings.allow_hosts)
            to = (
                _to_s3(storage, job_id, target.s3, settings)
                if kind == "s3"
                else _to_urls(storage, job_id, settings)
            )
            async with to as put:
                await _each(job_id, plan.items, put, progress)
    except PermissionDenied as refused:
        log.warning("delivery.refused", reason=refused.reason)
        return failed(target, job_id, f"not delivered: {refused.message}")
    except TimeoutError:
        log.warning("delivery.timed_out", delivered=progress.delivered)
        cut = plan.items[progress.done :]
        progress.failed += [
            f"{_shown(i.result.name)} (cut off: the delivery may take at most "
            f"{settings.timeout_s:g} s)"
            for i in cut[:1]
        ]
        progress.not_tried = [_shown(i.result.name) for i in cut[1:]]
    except Exception as error:
        # Not foreseen; its text is not shown (a client's error can quote a URL).
        log.error("delivery.crashed", error=type(error).__name__)
        progress.failed.append(f"the delivery failed ({type(error).__name__})")
    status = failed(target, job_id, _message(plan, progress))
    status.delivered_count = progress.delivered
    if not progress.failed and not progress.not_tried:
        status.state = Status.STATE_DELIVERED
    log.info(
        "delivery.done",
        state=Status.State.Name(status.state),
        delivered=progress.delivered,
        failed=len(progress.failed),
        not_tried=len(progress.not_tried),
        without_url=len(plan.no_url),
        unknown_urls=len(plan.unknown),
    )
    return status


def failed(target: job_pb2.ResultDelivery, job_id: str, message: str) -> job_pb2.DeliveryStatus:
    """A delivery that failed, saying why: every outcome starts here (`deliver` marks one
    where all went DELIVERED)."""
    return Status(
        state=Status.STATE_FAILED, destination=rules.describe(target, job_id), message=message
    )


# -- what goes where ---------------------------------------------------------------------


def _plan(
    target: job_pb2.ResultDelivery, job_id: str, results: Sequence[job_pb2.ResultFile]
) -> _Plan:
    """The results to deliver and where, in index order. Two results of one name (an output
    the algorithm named like a log) would land on one key: the first is delivered."""
    plan = _Plan(items=[])
    unique: list[job_pb2.ResultFile] = []
    names: set[str] = set()
    for result in sorted(results, key=lambda r: r.index):
        if result.name in names:
            plan.same_name.append(_shown(result.name))
            continue
        names.add(result.name)
        unique.append(result)
    if target.WhichOneof("destination") == "s3":
        prefix = rules.s3_key_prefix(target.s3, job_id)
        plan.items = [_Item(result, prefix + result.name) for result in unique]
        return plan
    urls = target.upload_urls.urls
    for result in unique:
        if result.name in urls:
            plan.items.append(_Item(result, urls[result.name]))
        else:
            plan.no_url.append(_shown(result.name))
    plan.unknown = [_shown(name) for name in sorted(set(urls) - names)]
    return plan


def _message(plan: _Plan, progress: _Progress) -> str:
    parts: list[str] = []
    if progress.failed or progress.not_tried:
        total = len(plan.items)
        parts.append(f"delivered {progress.delivered} of {total} results")
        if progress.failed:
            parts.append(f"not delivered: {_listed(progress.failed)}")
        if progress.not_tried:
            parts.append(f"not tried: {_listed(progress.not_tried)}")
    if plan.no_url:
        parts.append(f"kept results without an upload URL, not delivered: {_listed(plan.no_url)}")
    if plan.unknown:
        parts.append(f"upload URLs naming no result of the job: {_listed(plan.unknown)}")
    if plan.same_name:
        parts.append(
            f"results named like an earlier result, not delivered: {_listed(plan.same_name)}"
        )
    if not plan.items and not parts:
        parts.append("the job has no results to deliver")
    message = "; ".join(parts)
    return message if len(message) <= _MESSAGE_MAX else message[: _MESSAGE_MAX - 3] + "..."


def _shown(name: str) -> str:
    return name if len(name) <= _NAME_SHOWN else name[: _NAME_SHOWN - 3] + "..."


def _listed(entries: Sequence[str]) -> str:
    shown = ", ".join(entries[:_LISTED])
    more = len(entries) - _LISTED
    return f"{shown} and {more} more" if more > 0 else shown


# -- reading a result back ---------------------------------------------------------------


class _Verified:
    """A stored result read back in chunks, checked against its recorded size and sha256: a
    _Failure instead of the bytes that would end a copy that does not match."""

    def __init__(self, storage: Storage, job_id: str, result: job_pb2.ResultFile) -> None:
        self._chunks = storage.read(job_id, result_key(result))
        self.sha256 = result.sha256
        self._tally = Tally(result.size_bytes, result.sha256)
        self._pending = b""
        self._ended = False

    async def _next(self) -> bytes:
        """The next chunk from storage, hashed; b"" at the end."""
        if self._ended:
            return b""
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._ended = True
            return b""
        except (MeshError, OSError, ValueError) as error:
            raise _Failure(
                f"it could not be read from the node's storage ({type(error).__name__})"
            ) from None
        if not self._tally.add(chunk):
            raise _Failure("its stored copy is larger than recorded")
        return chunk

    async def take(self, size: int) -> io.BytesIO:
        """The next `size` bytes (fewer only at the end), in a buffer of their own."""
        body = io.BytesIO()
        have = 0
        while have < size:
            chunk, self._pending = (self._pending or await self._next()), b""
            if not chunk:
                break
            room = size - have
            if len(chunk) > room:
                chunk, self._pending = chunk[:room], chunk[room:]
            body.write(chunk)
            have += len(chunk)
        body.seek(0)
        return body

    async def finish(self) -> None:
        """Reads to the end and checks the whole against the record (_Failure if not)."""
        if self._pending or await self._next():
            raise _Failure("its stored copy is larger than recorded")
        if not self._tally.matches():
            raise _Failure("its stored copy does not match its recorded size and sha256")

    async def stream(self) -> AsyncIterator[bytes]:
        """Every byte, the last chunk held back until the whole is verified."""
        held = b""
        while chunk := await self._next():
            if held:
                yield held
            held = chunk
        await self.finish()
        if held:
            yield held

    async def close(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


# -- S3 ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _to_s3(
    storage: Storage, job_id: str, s3: job_pb2.S3Delivery, settings: DeliverySettings
) -> AsyncIterator[_Put]:
    """What puts an item at `{prefix}{job id}/{name}` in the consumer's bucket, path-style,
    with the consumer's keys only (never the node's: empty keys never reach here)."""
    region = s3.region or "us-east-1"
    client_settings = S3Settings(
        # AWS's own endpoint, named: so that no AWS_ENDPOINT_URL of the node's environment
        # can send a consumer's results (and keys) elsewhere.
        endpoint_url=s3.endpoint or f"https://s3.{region}.amazonaws.com",
        region=region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
        session_token=s3.session_token,
        path_style=True,
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
    )
    async with client_settings.client(max_connections=2, attempts=settings.attempts) as client:

        async def put(item: _Item) -> None:
            source = _Verified(storage, job_id, item.result)
            try:
                await _put_s3(client, s3.bucket, item.where, source, settings.part_size)
            finally:
                await source.close()

        yield put


async def _put_s3(
    client: S3Client, bucket: str, key: str, source: _Verified, part_size: int
) -> None:
    """One object: a PutObject when it fits one part, else a multipart upload, aborted unless
    the whole verified. Memory: one part."""
    sha256 = source.sha256
    first = await source.take(part_size)
    if first.getbuffer().nbytes < part_size:
        await source.finish()
        with _s3_errors():
            await client.put_object(
                Bucket=bucket,
                Key=key,
                Body=first,
                ContentType=_CONTENT_TYPE,
                Metadata={SHA256_METADATA: sha256},
            )
        return
    with _s3_errors():
        upload = await client.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType=_CONTENT_TYPE, Metadata={SHA256_METADATA: sha256}
        )
    upload_id = upload["UploadId"]
    try:
        parts: list[CompletedPartTypeDef] = []
        body: io.BytesIO | None = first
        del first
        while body is not None and body.getbuffer().nbytes:
            number = len(parts) + 1
            with _s3_errors():
                reply = await client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
            parts.append({"PartNumber": number, "ETag": reply["ETag"]})
            # Sent: freed before the next part is read, so that one part is held at a time.
            body = None
            body = await source.take(part_size)
        await source.finish()
        with _s3_errors():
            await client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
    except BaseException:
        # No part may outlive a failed (or cut off) upload in the consumer's bucket.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
                _ABORT_TIMEOUT_S,
            )
        raise


@contextlib.contextmanager
def _s3_errors() -> Iterator[None]:
    """What the S3 client raises, as a _Failure naming only a fixed word or an S3 error code:
    botocore's own texts can quote the endpoint, bucket and key."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as error:
        code = error_code(error)
        shown = code if _CODE_RE.fullmatch(code) else "no error code"
        raise _Failure(f"the S3 destination refused it ({shown})") from None
    except (BotoCoreError, OSError) as error:
        raise _Failure(
            f"the S3 destination could not be reached ({type(error).__name__})", unreachable=True
        ) from None


# -- upload URLs -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _to_urls(
    storage: Storage, job_id: str, settings: DeliverySettings
) -> AsyncIterator[_Put]:
    """What puts an item by an HTTP PUT of its bytes (with their length) to its own URL."""
    timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
    # trust_env off: no proxy of the node's and, above all, no credentials from its .netrc
    # are ever sent to a consumer's URL.
    async with httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False
    ) as client:
        yield functools.partial(_put_url, client, storage, job_id, attempts=settings.attempts)


async def _put_url(
    client: httpx.AsyncClient, storage: Storage, job_id: str, item: _Item, attempts: int
) -> None:
    """One PUT, tried again (from the start) when the URL is unreachable or answers 5xx or
    429; a _Failure once the tries are spent or at any other answer."""
    last = _Failure("not tried")
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(_BACKOFF_S * 2 ** (attempt - 1))
        source = _Verified(storage, job_id, item.result)
        try:
            response = await client.put(
                item.where,
                content=source.stream(),
                headers={"Content-Length": str(item.result.size_bytes)},
            )
        except httpx.TransportError as error:
            last = _Failure(f"its upload URL could not be reached ({type(error).__name__})")
            continue
        finally:
            await source.close()
        status = response.status_code
        if 200 <= status < 300:
            return
        last = _Failure(f"its upload URL refused it (HTTP {status})")
        if status < 500 and status != 429:
            break
    raise last


# -- both --------------------------------------------------------------------------------


async def _each(job_id: str, items: Sequence[_Item], put: _Put, progress: _Progress) -> None:
    """Each item through `put`, in turn, its outcome kept in `progress`; once the
    destination is unreachable (`_Failure.unreachable`), the rest is not tried."""
    for position, item in enumerate(items):
        try:
            await put(item)
        except _Failure as failure:
            structlog.get_logger().warning(
                "delivery.result_failed",
                job_id=job_id,
                index=item.result.index,
                reason=failure.reason,
            )
            progress.failed.append(f"{_shown(item.result.name)} ({failure.reason})")
            if failure.unreachable:
                progress.not_tried = [_shown(i.result.name) for i in items[position + 1 :]]
                return
        else:
            progress.delivered += 1
