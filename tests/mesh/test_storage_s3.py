"""S3Storage against moto's S3 server on 127.0.0.1: single and multipart round trips, ranged and
resumed reads, deletion, failures that leave nothing behind, S3 down, the storage used from
threads and from programs with no event loop, presigned URLs (checked by our own SigV4
verifier, since moto checks no signature) and the checks of stored objects."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import pytest
import structlog
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from mesh.errors import DataLoss, FailedPrecondition, NotFound
from mesh.s3 import MIN_PART_SIZE
from mesh.storage import (
    LocalStorage,
    StorageUnavailable,
    StoredObject,
    attachment_disposition,
    storage_from_url,
)
from mesh.storage_s3 import SHA256_FIELD, S3Storage
from tests.s3_server import (
    ACCESS_KEY_ID,
    REGION,
    SECRET_ACCESS_KEY,
    S3Server,
    dead_endpoint,
    settings_at,
)

REPO = Path(__file__).resolve().parents[2]
JOB = "0123456789abcdef0123456789abcdef"
OTHER_JOB = "fedcba9876543210fedcba9876543210"
PREFIX = "results"
MIB = 1 << 20


def pattern(size: int, seed: int = 0) -> bytes:
    """`size` bytes that differ from part to part (a digest would catch parts swapped)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MIB // 32)
    return b"".join(
        hashlib.sha256(f"{seed}-{i}".encode()).digest() + block[32:] for i in range(size // MIB + 1)
    )[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def name(key: str, job_id: str = JOB) -> str:
    return f"{PREFIX}/{job_id}/{key}"


async def read_all(storage: S3Storage, key: str, job_id: str = JOB, **kwargs: int) -> bytes:
    return b"".join([chunk async for chunk in storage.read(job_id, key, **kwargs)])


@pytest.fixture
def store(s3_server: S3Server, s3_bucket: str) -> Iterator[S3Storage]:
    storage = S3Storage(s3_server.settings, s3_bucket, PREFIX, part_size=MIN_PART_SIZE)
    yield storage
    storage.close()


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[Any]:
    """A plain boto3 client on the same server: what another writer, or an operator, does."""
    client = s3_server.client()
    yield client
    client.close()


@pytest.fixture(autouse=True)
def node_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A C2D_HOME of the test's own (inherited by the programs it starts): a storage made by
    storage_from_url keeps logs S3 cannot take under it, never in the real ~/.c2d."""
    home = tmp_path / "c2d-home"
    monkeypatch.setenv("C2D_HOME", str(home))
    monkeypatch.delenv("C2D_STORAGE_SPILL", raising=False)
    return home


def pending_uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def stored_keys(s3: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


class FailingSource(io.RawIOBase):
    """`good` bytes, then a read error: a disk failing in the middle of an upload."""

    def __init__(self, good: bytes) -> None:
        super().__init__()
        self.rest = memoryview(good)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if not self.rest:
            raise OSError("read failed halfway")
        taken, self.rest = bytes(self.rest[:size]), self.rest[size:]
        return taken


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "multipart"),
    [
        (1000, False),
        (MIN_PART_SIZE, False),  # exactly one part: still one PutObject
        (MIN_PART_SIZE + 1, True),
        (4 * MIN_PART_SIZE + 12345, True),  # ~20 MiB, five parts
    ],
)
async def test_round_trip(
    store: S3Storage, s3: Any, s3_bucket: str, size: int, multipart: bool
) -> None:
    data = pattern(size)
    stored = await store.put(JOB, "0000", io.BytesIO(data))
    assert (stored.size, stored.sha256) == (size, sha(data))
    assert await read_all(store, "0000") == data
    assert await store.size(JOB, "0000") == size
    head = s3.head_object(Bucket=s3_bucket, Key=name("0000"))
    assert head["ContentType"] == "application/octet-stream"
    assert head["ETag"].endswith(f'-{-(-size // MIN_PART_SIZE)}"') == multipart
    # The digest is recorded on the object: metadata for one PutObject, a tag for multipart.
    tags = s3.get_object_tagging(Bucket=s3_bucket, Key=name("0000"))["TagSet"]
    recorded = head["Metadata"].get(SHA256_FIELD) or {t["Key"]: t["Value"] for t in tags}.get(
        SHA256_FIELD
    )
    assert recorded == sha(data)
    assert bool(tags) == multipart
    await store.check_object(JOB, "0000", size, sha(data))
    assert pending_uploads(s3, s3_bucket) == []


async def test_read_from_an_offset_and_in_small_chunks(store: S3Storage) -> None:
    data = pattern(3 * MIN_PART_SIZE)
    await store.put(JOB, "0000", io.BytesIO(data))
    offset = MIN_PART_SIZE - 3  # a resume that starts just before a part's end
    chunk_size = 64 * 1024 + 7
    chunks = [c async for c in store.read(JOB, "0000", offset=offset, chunk_size=chunk_size)]
    assert b"".join(chunks) == data[offset:]
    assert {len(c) for c in chunks[:-1]} == {chunk_size}
    assert 0 < len(chunks[-1]) <= chunk_size
    assert await read_all(store, "0000", offset=len(data) - 1) == data[-1:]
    assert await read_all(store, "0000", offset=len(data)) == b""
    assert await read_all(store, "0000", offset=len(data) + 5) == b""


async def test_missing_objects_are_not_found(store: S3Storage) -> None:
    with pytest.raises(NotFound):
        await read_all(store, "0000")
    with pytest.raises(NotFound):
        await read_all(store, "0000", offset=10)
    with pytest.raises(NotFound):
        await store.size(JOB, "0000")
    with pytest.raises(NotFound):
        await store.check_object(JOB, "0000", 0, sha(b""))


async def test_delete_job_removes_its_objects_and_uploads_and_nothing_else(
    store: S3Storage, s3_server: S3Server, s3: Any, s3_bucket: str
) -> None:
    other_prefix = S3Storage(s3_server.settings, s3_bucket, f"{PREFIX}-2")
    try:
        await store.put(JOB, "0000", io.BytesIO(b"a"))
        await store.put(JOB, "0001", io.BytesIO(pattern(MIN_PART_SIZE + 10)))
        await store.put(OTHER_JOB, "0000", io.BytesIO(b"c"))
        await other_prefix.put(JOB, "0000", io.BytesIO(b"d"))
        # An upload a crashed publish left behind.
        s3.create_multipart_upload(Bucket=s3_bucket, Key=name("0002"))
        s3.create_multipart_upload(Bucket=s3_bucket, Key=name("0002", OTHER_JOB))
        await store.delete_job(JOB)
        assert stored_keys(s3, s3_bucket) == [
            f"{PREFIX}-2/{JOB}/0000",
            f"{PREFIX}/{OTHER_JOB}/0000",
        ]
        assert pending_uploads(s3, s3_bucket) == [name("0002", OTHER_JOB)]
        with pytest.raises(NotFound):
            await store.size(JOB, "0001")
        assert await other_prefix.size(JOB, "0000") == 1
        # Again, or a job that never stored anything: not an error.
        await store.delete_job(JOB)
        await store.delete_job("1" * 32)
    finally:
        other_prefix.close()


# -- failures -------------------------------------------------------------------------------


async def test_a_source_failing_mid_upload_leaves_no_object_and_no_upload(
    store: S3Storage, s3: Any, s3_bucket: str
) -> None:
    # Two parts read (so the multipart upload has begun) and a third half read, then an error.
    with pytest.raises(OSError, match="halfway"):
        await store.put(JOB, "0000", FailingSource(pattern(2 * MIN_PART_SIZE + MIB)))
    with pytest.raises(NotFound):
        await store.size(JOB, "0000")
    assert pending_uploads(s3, s3_bucket) == []
    assert stored_keys(s3, s3_bucket) == []
    # A failed replace leaves the old object whole.
    old = pattern(2 * MIN_PART_SIZE + 5, seed=1)
    await store.put(JOB, "0000", io.BytesIO(old))
    with pytest.raises(OSError, match="halfway"):
        await store.put(JOB, "0000", FailingSource(pattern(3 * MIN_PART_SIZE)))
    assert await read_all(store, "0000") == old
    await store.check_object(JOB, "0000", len(old), sha(old))
    assert pending_uploads(s3, s3_bucket) == []


def unreachable(**kwargs: int) -> S3Storage:
    return S3Storage(settings_at(dead_endpoint()), "results-bucket", PREFIX, **kwargs)


def assert_clean(error: StorageUnavailable) -> None:
    text = str(error)
    assert error.reason == "STORAGE_UNAVAILABLE"
    assert ACCESS_KEY_ID not in text and SECRET_ACCESS_KEY not in text
    assert "127.0.0.1" not in text  # nor where the store is


def test_s3_down_is_a_clean_error_in_bounded_time() -> None:
    storage = unreachable()  # the default retries, with botocore's backoff: bounded
    try:
        started = time.monotonic()
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(StorageUnavailable, match="unreachable") as caught,
        ):
            storage.put_blocking(JOB, "0000", io.BytesIO(b"x"))
        assert time.monotonic() - started < 10
        assert_clean(caught.value)
        assert any(e.get("job_id") == JOB and e["log_level"] == "warning" for e in logs)
    finally:
        storage.close()


async def test_every_call_with_s3_down_is_a_clean_error() -> None:
    storage = unreachable(attempts=1)
    try:
        calls = [
            lambda: storage.put(JOB, "0000", io.BytesIO(pattern(2 * MIN_PART_SIZE))),
            lambda: read_all(storage, "0000"),
            lambda: storage.size(JOB, "0000"),
            lambda: storage.check_object(JOB, "0000", 1, sha(b"x")),
            lambda: storage.delete_job(JOB),
        ]
        for call in calls:
            with pytest.raises(StorageUnavailable) as caught:
                await call()
            assert_clean(caught.value)
    finally:
        storage.close()


async def test_a_missing_bucket_is_named_as_the_refusal(s3_server: S3Server) -> None:
    storage = S3Storage(s3_server.settings, "no-such-bucket-here", PREFIX)
    try:
        with pytest.raises(StorageUnavailable, match="NoSuchBucket") as caught:
            await storage.put(JOB, "0000", io.BytesIO(b"x"))
        assert_clean(caught.value)
    finally:
        storage.close()


async def test_no_credentials_is_named_as_such(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env = {"C2D_S3_ENDPOINT": s3_server.endpoint_url, "C2D_S3_REGION": REGION}
    storage = storage_from_url(f"s3://{s3_bucket}/{PREFIX}", env)
    assert isinstance(storage, S3Storage)
    try:
        with pytest.raises(StorageUnavailable, match="no credentials"):
            await storage.put(JOB, "0000", io.BytesIO(b"x"))
        with pytest.raises(StorageUnavailable, match="no credentials"):
            await storage.presign(JOB, "0000")
    finally:
        storage.close()


class FlakyLink:
    """A TCP relay to the S3 server, on the test's event loop: drops the response it is
    relaying once `cut` is set, or refuses everything while `down`, to act out a network
    failing between the storage and S3."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "", parts.port or 80)
        self.cut = False
        self.down = False
        self.down_after_upload_bytes: int | None = None
        self.connections = 0
        self.uploaded = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FlakyLink:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def endpoint_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        def drop() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, upload: bool
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(64 * 1024):
                    if upload:
                        self.uploaded += len(data)
                        limit = self.down_after_upload_bytes
                        if limit is not None and self.uploaded > limit:
                            self.down = True
                    if self.down or (self.cut and not upload):
                        self.cut = False
                        drop()
                        return
                    dst.write(data)
                    await dst.drain()
                dst.close()

        await asyncio.gather(
            pump(reader, up_writer, upload=True), pump(up_reader, writer, upload=False)
        )


@pytest.fixture
async def link(s3_server: S3Server) -> AsyncIterator[FlakyLink]:
    async with FlakyLink(s3_server.endpoint_url) as relay:
        yield relay


def through(link: FlakyLink, bucket: str, **kwargs: Any) -> S3Storage:
    return S3Storage(
        settings_at(link.endpoint_url), bucket, PREFIX, part_size=MIN_PART_SIZE, **kwargs
    )


async def test_a_dropped_download_resumes_where_it_stopped(
    store: S3Storage, link: FlakyLink, s3_bucket: str
) -> None:
    # Large enough that most of it is still at the server when the link drops.
    data = pattern(24 * MIB)
    await store.put(JOB, "0000", io.BytesIO(data))
    flaky = through(link, s3_bucket)
    try:
        received = []
        async for chunk in flaky.read(JOB, "0000", chunk_size=256 * 1024):
            received.append(chunk)
            if len(received) == 1:
                link.cut = True
        assert b"".join(received) == data
        assert link.connections == 2
    finally:
        flaky.close()


async def test_an_object_replaced_during_a_resumed_download_is_data_loss(
    store: S3Storage, link: FlakyLink, s3_bucket: str
) -> None:
    await store.put(JOB, "0000", io.BytesIO(pattern(24 * MIB)))
    flaky = through(link, s3_bucket)
    replaced = False
    try:
        with pytest.raises(DataLoss, match="replaced"):
            async for _ in flaky.read(JOB, "0000", chunk_size=256 * 1024):
                if not replaced:
                    await store.put(JOB, "0000", io.BytesIO(pattern(24 * MIB, seed=2)))
                    replaced = link.cut = True
    finally:
        flaky.close()


async def test_s3_failing_mid_upload_fails_the_put_and_delete_job_cleans_up(
    store: S3Storage, link: FlakyLink, s3: Any, s3_bucket: str
) -> None:
    flaky = through(link, s3_bucket, attempts=1)
    link.down_after_upload_bytes = MIN_PART_SIZE + MIB  # during the second part
    try:
        with pytest.raises(StorageUnavailable) as caught:
            await flaky.put(JOB, "0000", io.BytesIO(pattern(4 * MIN_PART_SIZE)))
        assert_clean(caught.value)
        with pytest.raises(NotFound):
            await store.size(JOB, "0000")
        # The abort could not reach S3 either: the upload waits for delete_job (or the
        # bucket's lifecycle rule).
        assert pending_uploads(s3, s3_bucket) == [name("0000")]
        link.down, link.down_after_upload_bytes = False, None
        await flaky.delete_job(JOB)
        assert pending_uploads(s3, s3_bucket) == []
    finally:
        flaky.close()


# -- callers without an event loop ----------------------------------------------------------


def test_put_blocking_from_plain_threads(store: S3Storage) -> None:
    payloads = {f"{i:04d}": pattern(size, seed=i) for i, size in enumerate([10, 2 * MIN_PART_SIZE])}
    results: dict[str, Any] = {}

    def put(key: str) -> None:
        results[key] = store.put_blocking(JOB, key, io.BytesIO(payloads[key]))

    threads = [threading.Thread(target=put, args=(key,)) for key in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for key, data in payloads.items():
        assert (results[key].size, results[key].sha256) == (len(data), sha(data))
        assert asyncio.run(read_all(store, key)) == data


PUT_PROGRAM = """
import io, json, sys
from mesh.logging import configure_logging
from mesh.storage import storage_from_url
configure_logging("put")
storage = storage_from_url(sys.argv[1])
data = bytes(range(256)) * (40 * 1024)  # 10 MiB: more than one 8 MiB part
stored = storage.put_blocking(sys.argv[2], "0000", io.BytesIO(data))
print(json.dumps({"size": stored.size, "sha256": stored.sha256}))
"""


def program_env(s3_server: S3Server) -> dict[str, str]:
    return {**os.environ, **s3_server.env, "C2D_LOG_FORMAT": "json", "PYTHONWARNINGS": "default"}


def run_python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )


def run_publish(
    env: dict[str, str], workspace: Path, storage_url: str, max_total_bytes: int, *more: str
) -> subprocess.CompletedProcess[str]:
    """The publish stage as the program a backend starts, for JOB."""
    return run_python(
        env,
        "-m",
        "pods.publish",
        "--workspace",
        str(workspace),
        "--storage",
        storage_url,
        "--job-id",
        JOB,
        "--max-total-bytes",
        str(max_total_bytes),
        *more,
    )


async def test_put_blocking_from_a_program_with_no_event_loop(
    store: S3Storage, s3_server: S3Server, s3_bucket: str
) -> None:
    done = run_python(program_env(s3_server), "-c", PUT_PROGRAM, f"s3://{s3_bucket}/{PREFIX}", JOB)
    assert done.returncode == 0, done.stderr
    # The client is closed at exit: no warning about an unclosed session or connector.
    assert "Unclosed" not in done.stderr
    data = bytes(range(256)) * (40 * 1024)
    assert json.loads(done.stdout) == {"size": len(data), "sha256": sha(data)}
    assert await read_all(store, "0000") == data


async def test_the_publish_program_stores_results_in_s3(
    store: S3Storage, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    (workspace / "outputs" / "nested").mkdir(parents=True)
    (workspace / "logs").mkdir()
    big = pattern(9 * MIB)  # multipart with the default 8 MiB parts
    (workspace / "outputs" / "nested" / "big.bin").write_bytes(big)
    (workspace / "outputs" / "small.txt").write_bytes(b"small")
    (workspace / "logs" / "algorithm.log").write_bytes(b"algorithm said hello\n")
    done = run_publish(
        program_env(s3_server),
        workspace,
        f"s3://{s3_bucket}/{PREFIX}",
        100 * MIB,
        "--listing-key",
        "publish-listing",
    )
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    assert [r["name"] for r in listing["results"]] == [
        "nested/big.bin",
        "small.txt",
        "algorithm.log",
        "publish.log",
    ]
    assert listing["results"][0]["sha256"] == sha(big)
    for result in listing["results"]:
        key = f"{result.get('index', 0):04d}"
        await store.check_object(JOB, key, int(result.get("size_bytes", 0)), result["sha256"])
    assert await read_all(store, "0000") == big
    assert json.loads(await read_all(store, "publish-listing")) == listing


async def test_publishing_to_an_unreachable_s3_fails_cleanly(
    s3_server: S3Server, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    (workspace / "outputs").mkdir(parents=True)
    (workspace / "outputs" / "r.txt").write_bytes(b"result")
    env = {**program_env(s3_server), "C2D_S3_ENDPOINT": dead_endpoint()}
    done = run_publish(env, workspace, "s3://results-bucket/results", 1000)
    assert done.returncode == 4, done.stderr
    assert json.loads(done.stdout)["reason"] == "FAILURE_REASON_PUBLISH_FAILED"
    # The publish log is still kept locally, saying what failed.
    assert (
        "storing r.txt failed (StorageUnavailable)"
        in (workspace / "logs" / "publish.log").read_text()
    )
    assert SECRET_ACCESS_KEY not in done.stdout + done.stderr


# -- presigned URLs -------------------------------------------------------------------------


class BadUrl(Exception):
    """The URL was not signed by a key we hold, for what it now says."""


class ExpiredUrl(Exception):
    """The URL's signature holds, but its lifetime is over."""


def verify_presigned(url: str, secrets: dict[str, str], now: datetime) -> None:
    """What S3 does on a presigned GET, which moto skips: recomputes the SigV4 query signature
    from the URL's own method, path, query (but the signature), X-Amz-Date, X-Amz-Expires and
    credential scope, with the secret of the access key it names, and compares; then checks
    the lifetime. Raises BadUrl or ExpiredUrl."""
    parts = urlsplit(url)
    pairs = parts.query.split("&")
    signatures = [p.partition("=")[2] for p in pairs if p.startswith("X-Amz-Signature=")]
    unsigned = "&".join(p for p in pairs if not p.startswith("X-Amz-Signature="))
    params = dict(parse_qsl(unsigned, keep_blank_values=True))
    if len(signatures) != 1 or params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        raise BadUrl("not a SigV4 query-signed URL")
    if params.get("X-Amz-SignedHeaders") != "host":
        raise BadUrl("signs headers a plain GET does not send")
    access_key, day, region, service, terminal = params["X-Amz-Credential"].split("/")
    stamp = params["X-Amz-Date"]
    expires = int(params["X-Amz-Expires"])
    if access_key not in secrets or day != stamp[:8] or terminal != "aws4_request":
        raise BadUrl("credential scope")
    if not 1 <= expires <= 7 * 24 * 3600:
        raise BadUrl("lifetime out of SigV4's bounds")
    signer = S3SigV4QueryAuth(
        Credentials(access_key, secrets[access_key]), service, region, expires=expires
    )
    request = AWSRequest(method="GET", url=urlunsplit(parts._replace(query=unsigned)))
    request.context["timestamp"] = stamp
    expected = signer.signature(
        signer.string_to_sign(request, signer.canonical_request(request)), request
    )
    if not hmac.compare_digest(expected, signatures[0]):
        raise BadUrl("signature mismatch")
    signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if now >= signed_at + timedelta(seconds=expires):
        raise ExpiredUrl(f"expired at {signed_at + timedelta(seconds=expires)}")


KEYS = {ACCESS_KEY_ID: SECRET_ACCESS_KEY}


def replace_param(url: str, param: str, value: str) -> str:
    parts = urlsplit(url)
    pairs = [f"{param}={value}" if p.startswith(f"{param}=") else p for p in parts.query.split("&")]
    return urlunsplit(parts._replace(query="&".join(pairs)))


async def test_a_presigned_url_downloads_the_object_as_an_attachment(store: S3Storage) -> None:
    data = pattern(MIB + 17)
    await store.put(JOB, "0000", io.BytesIO(data))
    before = datetime.now(UTC).replace(microsecond=0)
    url, expire_time = await store.presign(JOB, "0000", filename='résumé "final".csv')
    after = datetime.now(UTC)
    assert before + timedelta(seconds=900) <= expire_time <= after + timedelta(seconds=900)
    async with httpx.AsyncClient() as http:
        whole = await http.get(url)
        assert whole.status_code == 200
        assert whole.content == data
        assert whole.headers["content-type"] == "application/octet-stream"
        assert whole.headers["content-disposition"] == (
            'attachment; filename="r_sum___final_.csv"; '
            "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.csv"
        )
        tail = await http.get(url, headers={"Range": f"bytes={MIB}-"})
        assert tail.status_code == 206
        assert tail.content == data[MIB:]
    verify_presigned(url, KEYS, datetime.now(UTC))


async def test_a_tampered_or_expired_url_is_refused_by_our_check(store: S3Storage) -> None:
    await store.put(JOB, "0000", io.BytesIO(b"result"))
    url, expire_time = await store.presign(JOB, "0000", expires_s=60, filename="r.txt")
    verify_presigned(url, KEYS, expire_time - timedelta(seconds=1))
    with pytest.raises(ExpiredUrl):
        verify_presigned(url, KEYS, expire_time)
    tampered = [
        url.replace(f"/{JOB}/0000?", f"/{JOB}/0001?"),  # another object
        url.replace(f"/{JOB}/", f"/{OTHER_JOB}/"),  # another job's
        replace_param(url, "X-Amz-Expires", "604800"),  # a longer life
        replace_param(url, "X-Amz-Date", "20991231T000000Z"),  # signed "later"
        replace_param(url, "response-content-disposition", "inline"),  # rendered after all
    ]
    for changed in tampered:
        assert changed != url
        with pytest.raises(BadUrl):
            verify_presigned(changed, KEYS, expire_time - timedelta(seconds=1))
    with pytest.raises(BadUrl):
        verify_presigned(url, {ACCESS_KEY_ID: "another-secret"}, expire_time)


async def test_url_lifetimes(s3_server: S3Server, s3_bucket: str, store: S3Storage) -> None:
    assert "X-Amz-Expires=900&" in (await store.presign(JOB, "0000")).url
    configured = storage_from_url(
        f"s3://{s3_bucket}/{PREFIX}", {**s3_server.env, "C2D_RESULT_URL_TTL_S": "60"}
    )
    assert isinstance(configured, S3Storage)
    try:
        assert "X-Amz-Expires=60&" in (await configured.presign(JOB, "0000")).url
        assert "X-Amz-Expires=5&" in (await configured.presign(JOB, "0000", expires_s=5)).url
        for bad in (0, 7 * 24 * 3600 + 1):
            with pytest.raises(ValueError, match="7 days"):
                await configured.presign(JOB, "0000", expires_s=bad)
    finally:
        configured.close()
    for raw in ("0", "604801", "ten"):
        with pytest.raises(ValueError, match="C2D_RESULT_URL_TTL_S"):
            storage_from_url("s3://bucket/prefix", {"C2D_RESULT_URL_TTL_S": raw})


async def test_local_storage_hands_out_no_urls(tmp_path: Path) -> None:
    local = LocalStorage(tmp_path / "store")
    await local.put(JOB, "0000", io.BytesIO(b"x"))
    with pytest.raises(FailedPrecondition) as caught:
        await local.presign(JOB, "0000", filename="x")
    assert caught.value.reason == "RESULT_URLS_UNAVAILABLE"


def test_attachment_disposition() -> None:
    assert attachment_disposition("") == "attachment"
    assert (
        attachment_disposition("out.csv")
        == "attachment; filename=\"out.csv\"; filename*=UTF-8''out.csv"
    )
    hostile = attachment_disposition('a"\r\nSet-Cookie: x=1;.html')
    assert "\r" not in hostile and "\n" not in hostile
    assert hostile.count('"') == 2
    assert hostile.endswith("filename*=UTF-8''a%22%0D%0ASet-Cookie%3A%20x%3D1%3B.html")


# -- checks of stored objects ---------------------------------------------------------------


async def test_check_object_refuses_what_is_not_the_recorded_object(
    store: S3Storage, s3: Any, s3_bucket: str
) -> None:
    small, large = b"result", pattern(MIN_PART_SIZE + 3)
    await store.put(JOB, "0000", io.BytesIO(small))
    await store.put(JOB, "0001", io.BytesIO(large))
    await store.check_object(JOB, "0000", len(small), sha(small))
    await store.check_object(JOB, "0001", len(large), sha(large))
    with pytest.raises(DataLoss, match="size"):
        await store.check_object(JOB, "0000", len(small) + 1, sha(small))
    with pytest.raises(DataLoss, match="sha256"):
        await store.check_object(JOB, "0000", len(small), sha(b"other!"))
    # Replaced behind the storage's back by an object of the same size: no digest of ours.
    s3.put_object(Bucket=s3_bucket, Key=name("0000"), Body=b"RESULT")
    with pytest.raises(DataLoss, match="sha256"):
        await store.check_object(JOB, "0000", len(small), sha(small))
    # Replaced by a writer that copied our metadata but not the bytes.
    s3.put_object(
        Bucket=s3_bucket, Key=name("0000"), Body=b"RESULT", Metadata={SHA256_FIELD: sha(small)}
    )
    with pytest.raises(DataLoss):
        await store.check_object(JOB, "0000", len(small), sha(b"RESULT"))
    s3.delete_object_tagging(Bucket=s3_bucket, Key=name("0001"))
    with pytest.raises(DataLoss, match="sha256"):
        await store.check_object(JOB, "0001", len(large), sha(large))


async def test_local_check_object(tmp_path: Path) -> None:
    local = LocalStorage(tmp_path / "store")
    await local.put(JOB, "0000", io.BytesIO(b"result"))
    await local.check_object(JOB, "0000", 6, sha(b"result"))
    (tmp_path / "store" / JOB / "0000").write_bytes(b"RESULT")
    with pytest.raises(DataLoss, match="sha256"):
        await local.check_object(JOB, "0000", 6, sha(b"result"))
    with pytest.raises(DataLoss, match="size"):
        await local.check_object(JOB, "0000", 7, sha(b"RESULT"))
    with pytest.raises(NotFound):
        await local.check_object(JOB, "0001", 6, sha(b"result"))


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://bucket", "prefix"),
        ("s3://bucket/", "prefix"),
        ("s3://bucket/a/../b", "prefix"),
        ("s3://bucket/a//b", "prefix"),
        ("s3://Bad_Bucket/results", "bucket name"),
        ("s3://ab/results", "bucket name"),
        ("s3://bucket/results?x=1", "query"),
    ],
)
def test_bad_s3_urls_are_refused_in_one_line(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        storage_from_url(url, {})
    assert "\n" not in str(caught.value)


async def test_storage_from_url_reads_the_s3_settings(s3_server: S3Server, s3_bucket: str) -> None:
    storage = storage_from_url(f"s3://{s3_bucket}//{PREFIX}/", s3_server.env)
    assert isinstance(storage, S3Storage)
    try:
        assert storage.prefix == PREFIX
        stored = await storage.put(JOB, "0000", io.BytesIO(b"via url"))
        assert stored.size == 7
        assert await read_all(storage, "0000") == b"via url"
    finally:
        storage.close()


# -- logs kept on the node's disk while S3 is down ----------------------------------------


async def put_log(
    storage: S3Storage, key: str, source: io.BytesIO, job_id: str = JOB, **kwargs: bool
) -> StoredObject:
    # In a thread: the link relays on this test's event loop, which must not be blocked.
    return await asyncio.to_thread(storage.put_log_blocking, job_id, key, source, **kwargs)


def spill_of(storage: S3Storage) -> LocalStorage:
    assert storage.spill is not None
    return storage.spill


@pytest.fixture
def spilling(link: FlakyLink, s3_bucket: str, tmp_path: Path) -> Iterator[S3Storage]:
    """An S3Storage through the link, with a spill on the test's disk, each call tried once."""
    storage = through(link, s3_bucket, attempts=1, spill=LocalStorage(tmp_path / "spill"))
    yield storage
    storage.close()


async def test_a_log_s3_cannot_take_is_kept_in_the_spill_and_read_from_there(
    spilling: S3Storage, link: FlakyLink, s3: Any, s3_bucket: str, tmp_path: Path
) -> None:
    data = b"the algorithm said something\n" * 100
    link.down = True
    with structlog.testing.capture_logs() as logs:
        kept = await put_log(spilling, "0001", io.BytesIO(data))
    assert (kept.size, kept.sha256, kept.kept_locally) == (len(data), sha(data), True)
    assert any(e["event"] == "storage.log_kept_locally" and e["job_id"] == JOB for e in logs)
    path = tmp_path / "spill" / JOB / "0001"
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Every read finds it while S3 is still down: no call reaches S3.
    assert await read_all(spilling, "0001") == data
    assert await read_all(spilling, "0001", offset=10, chunk_size=7) == data[10:]
    assert await spilling.size(JOB, "0001") == len(data)
    await spilling.check_object(JOB, "0001", len(data), sha(data))
    with pytest.raises(DataLoss):
        await spilling.check_object(JOB, "0001", len(data), sha(b"another"))
    with pytest.raises(FailedPrecondition, match="download it through the Provider") as refused:
        await spilling.presign(JOB, "0001", filename="algorithm.log")
    assert refused.value.reason == "RESULT_URLS_UNAVAILABLE"
    # Another object of the job is still looked up in S3 (down: a clean error).
    with pytest.raises(StorageUnavailable):
        await spilling.size(JOB, "0000")
    link.down = False
    assert stored_keys(s3, s3_bucket) == []
    with pytest.raises(NotFound):
        await spilling.size(JOB, "0000")


async def test_a_log_is_read_again_from_its_start_when_s3_fails_partway(
    spilling: S3Storage, link: FlakyLink, s3: Any, s3_bucket: str
) -> None:
    data = b"0123" + pattern(2 * MIN_PART_SIZE + MIB)
    source = io.BytesIO(data)
    source.seek(4)  # the log starts where the source stands, not at 0
    link.down_after_upload_bytes = MIN_PART_SIZE + MIB  # during the second part
    kept = await put_log(spilling, "0002", source)
    assert kept.kept_locally
    assert (kept.size, kept.sha256) == (len(data) - 4, sha(data[4:]))
    assert await read_all(spilling, "0002") == data[4:]
    link.down, link.down_after_upload_bytes = False, None
    assert stored_keys(s3, s3_bucket) == []


async def test_a_log_goes_to_s3_while_s3_is_up_and_straight_to_the_spill_when_told(
    spilling: S3Storage, link: FlakyLink, s3: Any, s3_bucket: str, tmp_path: Path
) -> None:
    stored = await put_log(spilling, "0000", io.BytesIO(b"to s3"))
    assert (stored.size, stored.kept_locally) == (5, False)
    assert stored_keys(s3, s3_bucket) == [name("0000")]
    assert not (tmp_path / "spill").exists()  # nothing made on the node's disk
    connections = link.connections
    kept = await put_log(spilling, "0001", io.BytesIO(b"kept"), store_down=True)
    assert kept.kept_locally
    assert link.connections == connections  # S3 was not tried again
    assert await read_all(spilling, "0001") == b"kept"
    # The job made durable: the spill's files too.
    spilling.sync_blocking(JOB)
    await spilling.sync(JOB)


async def test_storing_an_object_again_in_s3_drops_its_spilled_copy(
    spilling: S3Storage, link: FlakyLink, tmp_path: Path
) -> None:
    link.down = True
    await put_log(spilling, "0000", io.BytesIO(b"publish.log of a first try"))
    link.down = False
    # A job published again (after an engine restart) may store an output under that key.
    await spilling.put(JOB, "0000", io.BytesIO(b"an output"))
    assert not (tmp_path / "spill" / JOB / "0000").exists()
    assert await read_all(spilling, "0000") == b"an output"
    assert (await spilling.presign(JOB, "0000")).url


async def test_delete_job_removes_spilled_logs_and_s3_objects(
    spilling: S3Storage, link: FlakyLink, s3: Any, s3_bucket: str, tmp_path: Path
) -> None:
    await spilling.put(JOB, "0000", io.BytesIO(b"output in s3"))
    link.down = True
    await put_log(spilling, "0001", io.BytesIO(b"log kept locally"))
    await put_log(spilling, "0000", io.BytesIO(b"another job's"), OTHER_JOB)
    # S3 down: the delete fails, but the job's spilled logs are gone already.
    with pytest.raises(StorageUnavailable):
        await spilling.delete_job(JOB)
    assert not (tmp_path / "spill" / JOB).exists()
    link.down = False
    await spilling.delete_job(JOB)
    assert stored_keys(s3, s3_bucket) == []
    assert (tmp_path / "spill" / OTHER_JOB / "0000").read_bytes() == b"another job's"
    with pytest.raises(NotFound):
        await read_all(spilling, "0001")


async def test_without_a_spill_a_log_s3_cannot_take_is_an_error(
    link: FlakyLink, s3_bucket: str
) -> None:
    storage = through(link, s3_bucket, attempts=1)
    link.down = True
    try:
        with pytest.raises(StorageUnavailable) as caught:
            await put_log(storage, "0000", io.BytesIO(b"log"))
        assert_clean(caught.value)
    finally:
        storage.close()


async def test_local_storage_stores_a_log_as_any_object(tmp_path: Path) -> None:
    local = LocalStorage(tmp_path / "store")
    stored = local.put_log_blocking(JOB, "0000", io.BytesIO(b"log"), store_down=True)
    assert (stored.size, stored.kept_locally) == (3, False)
    assert (tmp_path / "store" / JOB / "0000").read_bytes() == b"log"


async def test_storage_from_url_spills_where_the_node_says(
    s3_server: S3Server, s3_bucket: str, node_home: Path, tmp_path: Path
) -> None:
    url = f"s3://{s3_bucket}/{PREFIX}"
    default = storage_from_url(url, s3_server.env)
    configured = storage_from_url(
        url, {**s3_server.env, "C2D_STORAGE_SPILL": str(tmp_path / "elsewhere")}
    )
    assert isinstance(default, S3Storage) and isinstance(configured, S3Storage)
    try:
        assert spill_of(default).root == node_home / "results-spill"
        assert spill_of(configured).root == tmp_path / "elsewhere"
    finally:
        default.close()
        configured.close()


async def test_the_publish_program_keeps_its_logs_in_the_spill_when_s3_is_down(
    s3_server: S3Server, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    (workspace / "outputs").mkdir(parents=True)
    (workspace / "logs").mkdir()
    (workspace / "outputs" / "r.txt").write_bytes(b"result")
    (workspace / "logs" / "algorithm.log").write_bytes(b"algorithm said hello\n")
    spill = tmp_path / "spill"
    env = {
        **program_env(s3_server),
        "C2D_S3_ENDPOINT": dead_endpoint(),
        "C2D_STORAGE_SPILL": str(spill),
    }
    done = run_publish(env, workspace, "s3://results-bucket/results", 1000)
    assert done.returncode == 4, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["reason"] == "FAILURE_REASON_PUBLISH_FAILED"
    assert "results store was unreachable" in outcome["message"]
    assert "127.0.0.1" not in outcome["message"]
    # The logs, not the output: algorithm.log as result 0, publish.log as result 1.
    assert sorted(os.listdir(spill / JOB)) == ["0000", "0001"]
    assert (spill / JOB / "0000").read_bytes() == b"algorithm said hello\n"
    assert (spill / JOB / "0001").read_bytes() == (workspace / "logs" / "publish.log").read_bytes()
