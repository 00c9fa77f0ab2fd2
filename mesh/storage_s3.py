"""Results in an S3 bucket (or an S3-compatible store) behind the `Storage` protocol: objects at
`s3://<bucket>/<prefix>/<job_id>/<key>`, streamed in both directions, never whole in memory.

Every S3 call of one `S3Storage` runs on an event loop of its own, in a daemon thread, with one
aioboto3 client. Callers on any thread (the engine's event loop, the publish stage's worker
thread, the publish pod's plain main thread) hand it coroutines and wait for their results, so
nothing requires an event loop in the calling thread and one client's connections serve all.

A put reads and hashes its source in the caller's thread. An object of at most one part is
stored by one PutObject carrying its sha256 as metadata; a larger one by a multipart upload
with a few parts in flight (memory about part size x (in flight + 1)), aborted on any failure so
that readers only ever see the old object or the whole new one. A multipart object's sha256 is
known only at its end, after its metadata is fixed: it is recorded as an object tag, written
before the put returns.

With a spill (a `LocalStorage` on the node's disk), a log S3 cannot take is kept there instead
(`put_log_blocking`), and every read, check and deletion looks there first: the Operator Service
of the node serves it like any result, though not as a presigned URL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import io
import math
import os
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
import structlog
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from mesh.errors import DataLoss, FailedPrecondition, NotFound
from mesh.s3 import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    PART_SIZE,
    S3Settings,
    error_code,
    parse_s3_url,
)
from mesh.storage import (
    CHUNK_SIZE,
    RESULT_URL_TTL_S,
    LocalStorage,
    PresignedUrl,
    RewindableSource,
    Source,
    StorageUnavailable,
    StoredObject,
    attachment_disposition,
    check_job_id,
    check_key,
    check_read,
    check_url_ttl,
    dataset_key,
    verified_chunks,
)

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        CopySourceTypeDef,
        GetObjectRequestTypeDef,
        ObjectIdentifierTypeDef,
    )

log = structlog.get_logger()

# Parts uploading at once: enough to keep a link busy, few enough to bound memory.
MAX_IN_FLIGHT = 4
# The largest object one CopyObject copies; a larger one is copied part by part
# (UploadPartCopy), server-side either way.
MAX_COPY_BYTES = 5 << 30
# The sha256 of an object: a metadata entry (x-amz-meta-c2d-sha256) or, for multipart
# objects, a tag of the same name.
SHA256_FIELD = "c2d-sha256"
_CONTENT_TYPE = "application/octet-stream"
# What S3 says for a missing object: NoSuchKey on GET, a bare 404 on HEAD (no body).
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# A download whose connection drops resumes from where it was, this many times.
_MAX_RESUMES = 3
# How long closing the client at exit may take.
_CLOSE_TIMEOUT_S = 10.0
_T = TypeVar("_T")


class _LoopThread:
    """A private event loop in a daemon thread, started at first use, and the S3 client that
    lives on it. A forked child starts its own (threads do not survive fork)."""

    def __init__(self, settings: S3Settings, max_connections: int, attempts: int) -> None:
        self._settings = settings
        self._max_connections = max_connections
        self._attempts = attempts
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False
        self._client: S3Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()

    def _running(self) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the storage is closed")
            if self._loop is None or self._thread is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="c2d-s3", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                self._client, self._stack = None, None
                self._client_lock = asyncio.Lock()
            return self._loop, self._thread

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Starts `coro` on the loop; its future, for any thread but the loop's own."""
        loop, thread = self._running()
        if threading.current_thread() is thread:
            coro.close()
            raise RuntimeError("a storage call from the storage's own loop would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Runs `coro` on the loop and waits for it: for a thread with no loop running."""
        return self.submit(coro).result()

    async def call_async(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Runs `coro` on the loop, awaited from another loop; cancelling the caller cancels
        it there too."""
        return await asyncio.wrap_future(self.submit(coro))

    async def client(self) -> S3Client:
        """The loop's client, made at its first use (no connection yet: that is lazy too)."""
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    made = self._settings.client(
                        max_connections=self._max_connections, attempts=self._attempts
                    )
                    self._client = await stack.enter_async_context(made)
                    self._stack = stack
        return self._client

    async def _close_client(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def close(self) -> None:
        """Closes the client and stops the loop; later calls raise RuntimeError."""
        with self._lock:
            loop, thread, pid = self._loop, self._thread, self._pid
            self._loop, self._thread, self._closed = None, None, True
        if loop is None or thread is None or pid != os.getpid():
            return
        if threading.current_thread() is thread:
            return  # cannot wait for itself; the daemon thread ends with the process
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close_client(), loop).result(_CLOSE_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CLOSE_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()


@contextlib.contextmanager
def _s3_errors(what: str, job_id: str, key: str = "") -> Iterator[None]:
    """Turns what the S3 client raises into domain errors: a missing object is NotFound, any
    other refusal or an unreachable store StorageUnavailable. Messages say what failed, never
    the endpoint or the credentials."""
    try:
        yield
    except ClientError as error:
        code = error_code(error)
        if code in _NOT_FOUND_CODES:
            missing = f"result {key} of job {job_id}" if job_id else f"object {key}"
            raise NotFound(f"{missing} is not stored") from None
        log.warning("storage.s3_refused", job_id=job_id, key=key, operation=what, code=code)
        raise StorageUnavailable(
            f"the results storage refused to {what} ({code or 'no error code'})"
        ) from error
    except NoCredentialsError as error:
        log.warning("storage.s3_no_credentials", job_id=job_id, key=key, operation=what)
        raise StorageUnavailable(
            f"no credentials for the results storage to {what} (C2D_S3_ACCESS_KEY_ID and "
            "C2D_S3_SECRET_ACCESS_KEY, or the standard AWS settings)"
        ) from error
    except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as error:
        log.warning(
            "storage.s3_unreachable",
            job_id=job_id,
            key=key,
            operation=what,
            error=type(error).__name__,
        )
        raise StorageUnavailable(
            f"the results storage is unreachable ({what}: {type(error).__name__})"
        ) from error


class _Part:
    """Up to `size` bytes of a source, read in chunks and hashed into `digest` as they come,
    in an io.BytesIO that owns its buffer. Bytes would be wrapped by botocore in a BytesIO
    sharing them, which aiohttp then copies whole before sending: a second copy of every part
    in flight, which a buffer of its own is sent without."""

    def __init__(self, source: Source, size: int, digest: hashlib._Hash) -> None:
        self.body = io.BytesIO()
        self.size = 0
        while self.size < size:
            data = source.read(min(CHUNK_SIZE, size - self.size))
            if not data:
                break
            digest.update(data)
            self.body.write(data)
            self.size += len(data)
        self.body.seek(0)


def _check_prefix(prefix: str) -> str:
    cleaned = prefix.strip("/")
    segments = cleaned.split("/")
    if (
        not cleaned
        or len(cleaned) > 512
        or any(segment in ("", ".", "..") for segment in segments)
        or not cleaned.isprintable()
    ):
        raise ValueError(
            "an s3:// storage URL names a prefix under the bucket (s3://BUCKET/PREFIX), "
            "without empty, '.' or '..' segments"
        )
    return cleaned


def _expire_time(url: str) -> datetime:
    """When a SigV4 presigned URL stops working, from its own X-Amz-Date and X-Amz-Expires."""
    query = parse_qs(urlsplit(url).query)
    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return signed + timedelta(seconds=int(query["X-Amz-Expires"][0]))


class S3Storage:
    """A job's results as objects under `<prefix>/<job_id>/` in one bucket, and the files of
    datasets made from them under `<prefix>/datasets/` (see `mesh.storage.dataset_key`).

    `part_size` (5 MiB to 5 GiB) is both the largest object stored by one PutObject and the
    multipart part size; `max_in_flight` parts upload at once. `url_ttl_s` is how long a
    presigned URL works unless `presign` is told otherwise. `attempts` bounds botocore's
    standard retries of each call (with their backoff of up to 1, 2, 4 s between tries), so
    that an unreachable store fails a call in seconds. `spill` is where logs go while S3 is
    down (none: a log S3 cannot take is lost, as any object). `copy_part_size` (5 MiB to
    5 GiB) is the largest object `export_result` copies with one CopyObject, and the part of a
    larger copy. `close` (or the process's exit) closes the client."""

    def __init__(
        self,
        settings: S3Settings,
        bucket: str,
        prefix: str,
        *,
        part_size: int = PART_SIZE,
        max_in_flight: int = MAX_IN_FLIGHT,
        url_ttl_s: int = RESULT_URL_TTL_S,
        attempts: int = 3,
        max_connections: int = 64,
        spill: LocalStorage | None = None,
        copy_part_size: int = MAX_COPY_BYTES,
    ) -> None:
        parse_s3_url(f"s3://{bucket}")  # checks the bucket's name
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError("an S3 part is 5 MiB to 5 GiB")
        if not MIN_PART_SIZE <= copy_part_size <= MAX_COPY_BYTES:
            raise ValueError("an S3 copy's part is 5 MiB to 5 GiB")
        if max_in_flight < 1 or attempts < 1 or max_connections < 1:
            raise ValueError("max_in_flight, attempts and max_connections are at least 1")
        self.bucket = bucket
        self.prefix = _check_prefix(prefix)
        self.part_size = part_size
        self.max_in_flight = max_in_flight
        self.url_ttl_s = check_url_ttl(url_ttl_s)
        self.spill = spill
        # The largest object one CopyObject copies, and the part size of larger copies.
        self.copy_part_size = copy_part_size
        # Downloads hold a connection while their reader is slow: a pool that size of them.
        self._loop = _LoopThread(settings, max(max_connections, max_in_flight), attempts)
        # Runs once: at close(), when the storage is collected, or at the process's exit.
        self._finalizer = weakref.finalize(self, self._loop.close)

    def close(self) -> None:
        """Closes the client and stops the storage's loop thread; the storage is then
        unusable. Not needed before the process exits: that closes it too."""
        self._finalizer()

    def _name(self, job_id: str, key: str) -> str:
        check_job_id(job_id)
        check_key(key)
        return f"{self.prefix}/{job_id}/{key}"

    # -- put ------------------------------------------------------------------------------

    async def put(self, job_id: str, key: str, source: Source) -> StoredObject:
        # The source's reads block: they and the hashing run in a worker thread.
        return await asyncio.to_thread(self.put_blocking, job_id, key, source)

    def put_blocking(self, job_id: str, key: str, source: Source) -> StoredObject:
        name = self._name(job_id, key)
        digest = hashlib.sha256()
        first = _Part(source, self.part_size, digest)
        second = _Part(source, self.part_size if first.size == self.part_size else 0, digest)
        if second.size:
            ready = [first, second]
            del first, second  # the uploads hold them from now on, and free them once sent
            stored, parts = self._put_multipart(job_id, key, name, source, digest, ready)
        else:
            stored = StoredObject(size=first.size, sha256=digest.hexdigest())
            self._loop.call(self._put_object(job_id, key, name, first.body, stored.sha256))
            parts = 1
        if self.spill is not None:
            # A copy kept while S3 was down (by an earlier publish of the job) would shadow
            # this object: reads look in the spill first.
            self.spill.remove_blocking(job_id, key)
        log.debug("storage.put", job_id=job_id, key=key, size=stored.size, parts=parts)
        return stored

    def put_log_blocking(
        self, job_id: str, key: str, source: RewindableSource, *, store_down: bool = False
    ) -> StoredObject:
        if self.spill is None:
            return self.put_blocking(job_id, key, source)
        if not store_down:
            start = source.seek(0, os.SEEK_CUR)
            try:
                return self.put_blocking(job_id, key, source)
            except StorageUnavailable:
                source.seek(start)  # whatever the failed upload read is read again
        kept = self.spill.put_blocking(job_id, key, source)
        log.warning("storage.log_kept_locally", job_id=job_id, key=key, size=kept.size)
        return replace(kept, kept_locally=True)

    def _kept_locally(self, job_id: str, key: str) -> LocalStorage | None:
        """The spill, when it holds the object (kept there while S3 was down)."""
        # One stat of a local file, inline: a hop to a thread would cost more.
        if self.spill is not None and self.spill.holds(job_id, key):
            return self.spill
        return None

    def _put_multipart(
        self,
        job_id: str,
        key: str,
        name: str,
        source: Source,
        digest: hashlib._Hash,
        ready: list[_Part],
    ) -> tuple[StoredObject, int]:
        """Uploads `ready` (the parts read already, taken from the list so that only the
        uploads hold them) and the rest of `source` as one multipart object."""
        upload_id = self._loop.call(self._create_upload(job_id, key, name))
        in_flight: dict[concurrent.futures.Future[str], int] = {}
        etags: dict[int, str] = {}
        size = 0
        number = 0
        try:
            while True:
                part = ready.pop(0) if ready else _Part(source, self.part_size, digest)
                if not part.size:
                    break
                number += 1
                if number > MAX_PARTS:
                    raise ValueError(
                        f"an object of more than {MAX_PARTS} parts of {self.part_size} bytes "
                        "cannot be stored"
                    )
                size += part.size
                upload = self._upload_part(job_id, key, name, upload_id, number, part.body)
                del part  # the upload holds the only reference: freed as soon as it is sent
                in_flight[self._loop.submit(upload)] = number
                while len(in_flight) >= self.max_in_flight:
                    self._collect(in_flight, etags)
            while in_flight:
                self._collect(in_flight, etags)
            sha256 = digest.hexdigest()
            parts: list[CompletedPartTypeDef] = [
                {"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)
            ]
            self._loop.call(self._complete(job_id, key, name, upload_id, parts, sha256))
        except BaseException:
            # Whatever failed (the source, S3, an interrupt): no part may outlive the upload.
            for future in in_flight:
                future.cancel()
            with contextlib.suppress(Exception):  # the first failure is the one to report
                self._loop.call(self._abort(job_id, key, name, upload_id))
            raise
        return StoredObject(size=size, sha256=sha256), number

    @staticmethod
    def _collect(
        in_flight: dict[concurrent.futures.Future[str], int], etags: dict[int, str]
    ) -> None:
        """Waits for at least one part upload to end; raises the first failure."""
        done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            number = in_flight.pop(future)
            etags[number] = future.result()

    async def _put_object(
        self, job_id: str, key: str, name: str, data: io.BytesIO, sha: str
    ) -> None:
        client = await self._loop.client()
        with _s3_errors("store a result", job_id, key):
            await client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=data,
                ContentType=_CONTENT_TYPE,
                Metadata={SHA256_FIELD: sha},
            )

    async def _create_upload(self, job_id: str, key: str, name: str, sha256: str = "") -> str:
        """Starts a multipart upload; with `sha256` (known ahead only by a copy) as its
        metadata."""
        client = await self._loop.client()
        with _s3_errors("start an upload", job_id, key):
            reply = await client.create_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                ContentType=_CONTENT_TYPE,
                Metadata={SHA256_FIELD: sha256} if sha256 else {},
            )
        return reply["UploadId"]

    async def _upload_part(
        self, job_id: str, key: str, name: str, upload_id: str, number: int, data: io.BytesIO
    ) -> str:
        client = await self._loop.client()
        with _s3_errors("upload a part", job_id, key):
            reply = await client.upload_part(
                Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=data
            )
        return reply["ETag"]

    async def _complete(
        self,
        job_id: str,
        key: str,
        name: str,
        upload_id: str,
        parts: list[CompletedPartTypeDef],
        sha256: str,
    ) -> None:
        client = await self._loop.client()
        with _s3_errors("complete an upload", job_id, key):
            await client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        try:
            with _s3_errors("record a result's sha256", job_id, key):
                await client.put_object_tagging(
                    Bucket=self.bucket,
                    Key=name,
                    Tagging={"TagSet": [{"Key": SHA256_FIELD, "Value": sha256}]},
                )
        except StorageUnavailable:
            # An object without its digest fails every check: better none, as for any failure.
            with contextlib.suppress(Exception), _s3_errors("remove a result", job_id, key):
                await client.delete_object(Bucket=self.bucket, Key=name)
            raise

    async def _abort(self, job_id: str, key: str, name: str, upload_id: str) -> None:
        client = await self._loop.client()
        try:
            await client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        except ClientError as error:
            if error_code(error) != "NoSuchUpload":  # completed or aborted already
                log.warning("storage.abort_failed", job_id=job_id, key=key, code=error_code(error))
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as error:
            # The store is gone: the bucket's lifecycle rule for incomplete uploads, or
            # delete_job, removes the parts later.
            log.warning("storage.abort_failed", job_id=job_id, key=key, error=type(error).__name__)

    # -- read -----------------------------------------------------------------------------

    async def read(
        self, job_id: str, key: str, offset: int = 0, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        check_read(offset, chunk_size)
        name = self._name(job_id, key)
        spill = self._kept_locally(job_id, key)
        if spill is not None:
            async for chunk in spill.read(job_id, key, offset, chunk_size):
                yield chunk
            return
        download = _Download(self, job_id, key, name, offset)
        try:
            while True:
                chunk = await self._loop.call_async(download.next(chunk_size))
                if not chunk:
                    return
                yield chunk
        finally:
            if download.open:
                # Not awaited: this may run while the reader is being cancelled.
                self._loop.submit(download.close())

    async def size(self, job_id: str, key: str) -> int:
        name = self._name(job_id, key)
        spill = self._kept_locally(job_id, key)
        if spill is not None:
            return await spill.size(job_id, key)
        head = await self._loop.call_async(self._head(job_id, key, name))
        return int(head["ContentLength"])

    async def _head(self, job_id: str, key: str, name: str) -> dict[str, Any]:
        client = await self._loop.client()
        with _s3_errors("look up a result", job_id, key):
            reply = await client.head_object(Bucket=self.bucket, Key=name)
        return dict(reply)

    # -- checks and URLs ------------------------------------------------------------------

    async def check_object(self, job_id: str, key: str, size: int, sha256: str) -> None:
        name = self._name(job_id, key)
        spill = self._kept_locally(job_id, key)
        if spill is not None:
            await spill.check_object(job_id, key, size, sha256)
            return
        recorded = await self._loop.call_async(self._recorded(job_id, key, name))
        if recorded[0] != size:
            log.error("storage.size_mismatch", job_id=job_id, key=key)
            raise DataLoss(f"result {key} of job {job_id} does not have its recorded size")
        if recorded[1] != sha256:
            log.error("storage.sha256_mismatch", job_id=job_id, key=key)
            raise DataLoss(f"result {key} of job {job_id} does not match its recorded sha256")

    async def _recorded(self, job_id: str, key: str, name: str) -> tuple[int, str]:
        """The object's size and the sha256 recorded when it was stored ("" when none is)."""
        size, sha256, _ = await self._described(job_id, key, name)
        return size, sha256

    async def _described(self, job_id: str, key: str, name: str) -> tuple[int, str, str]:
        """`_recorded`, with the object's ETag (which pins this very version of it)."""
        head = await self._head(job_id, key, name)
        sha256 = str(head.get("Metadata", {}).get(SHA256_FIELD, ""))
        if not sha256 and head.get("TagCount"):
            client = await self._loop.client()
            with _s3_errors("look up a result's sha256", job_id, key):
                tags = await client.get_object_tagging(Bucket=self.bucket, Key=name)
            sha256 = next((t["Value"] for t in tags["TagSet"] if t["Key"] == SHA256_FIELD), "")
        return int(head["ContentLength"]), sha256, str(head.get("ETag", ""))

    async def presign(
        self, job_id: str, key: str, expires_s: int | None = None, filename: str = ""
    ) -> PresignedUrl:
        name = self._name(job_id, key)
        ttl = check_url_ttl(self.url_ttl_s if expires_s is None else expires_s)
        if self._kept_locally(job_id, key) is not None:
            raise FailedPrecondition(
                "this result is kept on the node's disk (the results store was unreachable when "
                "the job was published), which hands out no URLs: download it through the "
                "Provider",
                reason="RESULT_URLS_UNAVAILABLE",
            )
        url = await self._loop.call_async(self._presign(job_id, key, name, ttl, filename))
        return PresignedUrl(url=url, expire_time=_expire_time(url))

    async def _presign(self, job_id: str, key: str, name: str, ttl: int, filename: str) -> str:
        client = await self._loop.client()
        # Signing is local: no request is made, so the object's existence is not checked.
        with _s3_errors("sign a result URL", job_id, key):
            return await client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": name,
                    "ResponseContentDisposition": attachment_disposition(filename),
                    "ResponseContentType": _CONTENT_TYPE,
                },
                ExpiresIn=ttl,
            )

    # -- the dataset area -----------------------------------------------------------------

    def _dataset_name(self, dataset_id: str, index: int) -> str:
        return f"{self.prefix}/{dataset_key(dataset_id, index)}"

    async def export_result(
        self, job_id: str, key: str, dataset_id: str, index: int, *, size: int, sha256: str
    ) -> None:
        source = self._name(job_id, key)
        target = self._dataset_name(dataset_id, index)
        await self._loop.call_async(self._export(job_id, key, source, target, size, sha256))

    async def _export(
        self, job_id: str, key: str, source: str, target: str, size: int, sha256: str
    ) -> None:
        """Copies `source` to `target` in the store (no byte passes through here), once the
        source is the recorded object; the copy carries its sha256 as metadata."""
        what = f"result {key} of job {job_id}"
        if await self._copy_recorded(target) == (size, sha256):
            log.info("storage.export_kept", job_id=job_id, key=key)
            return
        found_size, found_sha256, etag = await self._described(job_id, key, source)
        if (found_size, found_sha256) != (size, sha256):
            log.error("storage.export_mismatch", job_id=job_id, key=key)
            raise DataLoss(f"{what} is not the recorded one (its size or sha256 differ)")
        copy = _Copy(self, job_id, key, source, target, etag)
        parts = await copy.run(size, sha256)
        # What the store now holds under the copy's name: a copy that is not whole is refused.
        if await self._copy_recorded(target) != (size, sha256):
            log.error("storage.export_copy_mismatch", job_id=job_id, key=key)
            raise DataLoss(f"the copy of {what} is not the recorded one")
        log.info("storage.exported", job_id=job_id, key=key, size=size, parts=parts)

    async def _copy_recorded(self, name: str) -> tuple[int, str] | None:
        """The size and sha256 a dataset-area object carries; None when there is none."""
        try:
            return await self._recorded("", name, name)
        except NotFound:
            return None

    def read_dataset_file_blocking(
        self, dataset_id: str, index: int, *, size: int, sha256: str, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        check_read(0, chunk_size)
        key = dataset_key(dataset_id, index)
        chunks = self._download_blocking(key, f"{self.prefix}/{key}", chunk_size)
        return verified_chunks(chunks, size, sha256, f"file {index} of dataset {dataset_id}")

    def _download_blocking(self, key: str, name: str, chunk_size: int) -> Iterator[bytes]:
        """The object's bytes, read on the storage's loop for a thread that has none."""
        download = _Download(self, "", key, name, 0)
        try:
            while chunk := self._loop.call(download.next(chunk_size)):
                yield chunk
        finally:
            if download.open:
                with contextlib.suppress(Exception):  # the read's own failure is the one
                    self._loop.call(download.close())

    # -- the rest of the protocol ---------------------------------------------------------

    async def sync(self, job_id: str) -> None:
        check_job_id(job_id)  # a completed upload is durable already; only the spill may not be
        if self.spill is not None:
            await self.spill.sync(job_id)

    def sync_blocking(self, job_id: str) -> None:
        check_job_id(job_id)
        if self.spill is not None:
            self.spill.sync_blocking(job_id)

    def prepare_blocking(self, jobs: int, objects: int) -> None:
        """Nothing to make ahead: an object costs one request however it is made."""

    async def delete_job(self, job_id: str) -> None:
        check_job_id(job_id)
        if self.spill is not None:
            # First: it needs no network, so a store that is down keeps no log of the job.
            await self.spill.delete_job(job_id)
        deleted = await self._loop.call_async(self._delete_job(job_id))
        log.info("storage.job_deleted", job_id=job_id, objects=deleted)

    async def _delete_job(self, job_id: str) -> int:
        client = await self._loop.client()
        prefix = f"{self.prefix}/{job_id}/"
        deleted = 0
        with _s3_errors("delete a job's results", job_id):
            # A page holds at most 1000 keys, which is what one DeleteObjects takes.
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            async for page in pages:
                keys: list[ObjectIdentifierTypeDef] = [
                    {"Key": item["Key"]} for item in page.get("Contents", [])
                ]
                if not keys:
                    continue
                reply = await client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
                )
                errors = reply.get("Errors", [])
                if errors:
                    code = errors[0].get("Code", "")
                    log.warning("storage.delete_failed", job_id=job_id, count=len(errors))
                    raise StorageUnavailable(
                        f"the results storage kept {len(errors)} objects of the job ({code})"
                    )
                deleted += len(keys)
            # Parts of an upload a crashed publish left behind take room too.
            uploads = client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            async for listing in uploads:
                for upload in listing.get("Uploads", []):
                    await self._abort(job_id, "", upload["Key"], upload["UploadId"])
        return deleted


class _Copy:
    """One server-side copy of an object within the bucket, pinned to the source's ETag (a
    source replaced meanwhile fails it): one CopyObject up to the storage's `copy_part_size`,
    else a multipart upload of UploadPartCopy ranges, a few at once, aborted on any failure.
    Either way the copy gets the sha256 as metadata (known ahead, unlike a put's). Its
    methods run on the storage's loop."""

    def __init__(
        self, storage: S3Storage, job_id: str, key: str, source: str, target: str, etag: str
    ) -> None:
        self._storage = storage
        self._job_id = job_id
        self._key = key
        self._target = target
        self._source: CopySourceTypeDef = {"Bucket": storage.bucket, "Key": source}
        self._etag = etag

    async def run(self, size: int, sha256: str) -> int:
        """Copies the object; returns how many parts it took (1 for one CopyObject)."""
        storage = self._storage
        if size <= storage.copy_part_size:
            client = await storage._loop.client()
            with self._errors("copy a result"):
                await client.copy_object(
                    Bucket=storage.bucket,
                    Key=self._target,
                    CopySource=self._source,
                    CopySourceIfMatch=self._etag,
                    MetadataDirective="REPLACE",
                    Metadata={SHA256_FIELD: sha256},
                    ContentType=_CONTENT_TYPE,
                )
            return 1
        # At most MAX_PARTS parts: larger ones for an object that would need more.
        part = max(storage.copy_part_size, math.ceil(size / MAX_PARTS))
        ranges = [(start, min(start + part, size) - 1) for start in range(0, size, part)]
        upload_id = await storage._create_upload(self._job_id, self._key, self._target, sha256)
        try:
            gate = asyncio.Semaphore(storage.max_in_flight)
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._part(upload_id, number, first, last, gate))
                    for number, (first, last) in enumerate(ranges, start=1)
                ]
            parts: list[CompletedPartTypeDef] = [task.result() for task in tasks]
            client = await storage._loop.client()
            with self._errors("complete a copy"):
                await client.complete_multipart_upload(
                    Bucket=storage.bucket,
                    Key=self._target,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException as error:
            with contextlib.suppress(Exception):
                await storage._abort(self._job_id, self._key, self._target, upload_id)
            if isinstance(error, BaseExceptionGroup):
                raise error.exceptions[0] from None  # the first part's failure says why
            raise
        return len(ranges)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            with _s3_errors(what, self._job_id, self._key):
                yield
        except StorageUnavailable as error:
            if isinstance(error.__cause__, ClientError) and error_code(error.__cause__) in (
                "PreconditionFailed",
                "412",
            ):
                raise DataLoss(
                    f"result {self._key} of job {self._job_id} was replaced while being copied"
                ) from None
            raise

    async def _part(
        self, upload_id: str, number: int, first: int, last: int, gate: asyncio.Semaphore
    ) -> CompletedPartTypeDef:
        async with gate:
            client = await self._storage._loop.client()
            with self._errors("copy a part"):
                reply = await client.upload_part_copy(
                    Bucket=self._storage.bucket,
                    Key=self._target,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=self._source,
                    CopySourceIfMatch=self._etag,
                    CopySourceRange=f"bytes={first}-{last}",
                )
        return {"PartNumber": number, "ETag": reply["CopyPartResult"]["ETag"]}


class _Download:
    """One read of an object, from `offset`: a ranged GET streamed in chunks, resumed where it
    stopped (pinned to the object's ETag, so never spliced with a replacement) when the
    connection drops. Its methods run on the storage's loop."""

    def __init__(self, storage: S3Storage, job_id: str, key: str, name: str, offset: int):
        self._storage = storage
        self._job_id = job_id
        self._key = key
        self._name = name
        self._position = offset
        self._body: StreamingBody | None = None
        self._etag = ""
        self._done = False
        self._resumes = 0

    async def _open(self) -> None:
        client = await self._storage._loop.client()
        request: GetObjectRequestTypeDef = {"Bucket": self._storage.bucket, "Key": self._name}
        if self._position:
            request["Range"] = f"bytes={self._position}-"
        if self._etag:
            request["IfMatch"] = self._etag
        with _s3_errors("read a result", self._job_id, self._key):
            try:
                reply = await client.get_object(**request)
            except ClientError as error:
                code = error_code(error)
                if code == "InvalidRange":  # at or past the end: nothing (more) to read
                    self._done = True
                    return
                if code == "PreconditionFailed":
                    raise DataLoss(
                        f"result {self._key} of job {self._job_id} was replaced while being read"
                    ) from None
                raise
        self._body = reply["Body"]
        self._etag = reply["ETag"]

    async def next(self, size: int) -> bytes:
        """The next `size` bytes, fewer only at the end; b"" once it is over."""
        pieces: list[bytes] = []
        have = 0
        while have < size and not self._done:
            if self._body is None:
                await self._open()
                continue
            try:
                data = await self._body.read(size - have)
            except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as error:
                await self.close()
                self._resumes += 1
                if self._resumes > _MAX_RESUMES:
                    log.warning(
                        "storage.read_failed",
                        job_id=self._job_id,
                        key=self._key,
                        error=type(error).__name__,
                    )
                    raise StorageUnavailable(
                        f"the results storage kept dropping the download ({type(error).__name__})"
                    ) from error
                continue
            if not data:
                self._done = True
                await self.close()
                break
            pieces.append(data)
            have += len(data)
            self._position += len(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @property
    def open(self) -> bool:
        """True while a response is being read (a reader that stops early must close it)."""
        return self._body is not None

    async def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()
