"""The publish stage when results cannot all be stored: the outputs stop at the first failure,
the logs are stored all the same and listed with the error, and with S3 down they are kept on
the node's own disk (the storage's spill), where every read of the storage finds them."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from c2d.common.v1 import job_pb2

from mesh.storage import LocalStorage, Source, Storage, StoredObject
from mesh.storage_s3 import S3Storage
from pods import publish as publish_module
from pods.publish import PublishError, publish
from tests.mesh.test_storage_s3 import FlakyLink
from tests.s3_server import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    S3Server,
    dead_endpoint,
    settings_at,
)

JOB = "0123456789abcdef0123456789abcdef"
Kind = job_pb2.ResultFile
ALGORITHM_LOG = b"hello from the algorithm\n"
CONFIGURATION_LOG = b"configure: job ...\nconfigure succeeded\n"
LOGS = [
    ("algorithm.log", Kind.KIND_ALGORITHM_LOG),
    ("configuration.log", Kind.KIND_CONFIGURATION_LOG),
    ("publish.log", Kind.KIND_PUBLISH_LOG),
]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "outputs").mkdir(parents=True)
    (ws / "logs").mkdir()
    (ws / "outputs" / "a.txt").write_bytes(b"first output")
    (ws / "outputs" / "b.txt").write_bytes(b"second output")
    (ws / "logs" / "algorithm.log").write_bytes(ALGORITHM_LOG)
    (ws / "logs" / "configuration.log").write_bytes(CONFIGURATION_LOG)
    return ws


def spilling(endpoint_url: str, bucket: str, tmp_path: Path) -> S3Storage:
    """Results in S3 at `endpoint_url` (each call tried once), logs spilled to the test's disk
    when it is down."""
    return S3Storage(
        settings_at(endpoint_url),
        bucket,
        "results",
        attempts=1,
        spill=LocalStorage(tmp_path / "spill"),
    )


@pytest.fixture
def s3_down(tmp_path: Path) -> Iterator[S3Storage]:
    """Results in an S3 nobody listens for, logs spilled to disk."""
    storage = spilling(dead_endpoint(), "results-bucket", tmp_path)
    yield storage
    storage.close()


async def read_all(storage: Storage, index: int) -> bytes:
    return b"".join([chunk async for chunk in storage.read(JOB, f"{index:04d}")])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_s3_down_fails_the_publish_but_keeps_and_lists_the_logs(
    workspace: Path, s3_down: S3Storage, tmp_path: Path
) -> None:
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(PublishError) as caught,
    ):
        await publish(workspace, s3_down, JOB, max_total_bytes=1 << 20)
    error = caught.value
    assert error.reason == job_pb2.FAILURE_REASON_PUBLISH_FAILED
    message = str(error)
    assert message.startswith("the results store was unreachable")
    assert "logs are kept on the node" in message
    for secret in ("127.0.0.1", ACCESS_KEY_ID, SECRET_ACCESS_KEY, "results-bucket"):
        assert secret not in message
    # The logs, never an output, listed in index order as a published job's are.
    assert [(r.index, r.name, r.kind) for r in error.results] == [
        (i, name, kind) for i, (name, kind) in enumerate(LOGS)
    ]
    # S3 was tried for the first output only: the logs then went straight to the spill.
    events = [e["event"] for e in logs]
    assert events.count("storage.s3_unreachable") == 1
    assert events.count("storage.log_kept_locally") == 3
    assert any(e["event"] == "publish.failed" and e["job_id"] == JOB for e in logs)

    # What the Operator Service of the node reads (a storage of its own on the same spill),
    # with the listed size and sha256, while S3 is still down.
    reader = spilling(dead_endpoint(), "results-bucket", tmp_path)
    try:
        for result in error.results:
            data = await read_all(reader, result.index)
            assert (len(data), sha(data)) == (result.size_bytes, result.sha256)
            await reader.check_object(JOB, f"{result.index:04d}", len(data), sha(data))
    finally:
        reader.close()
    assert await read_all(s3_down, 0) == ALGORITHM_LOG
    publish_log = (workspace / "logs" / "publish.log").read_text()
    assert await read_all(s3_down, 2) == publish_log.encode()
    assert "storing a.txt failed (StorageUnavailable)" in publish_log
    assert "as result 0 on the node's own disk" in publish_log
    assert "publish failed: the results store was unreachable" in publish_log
    assert "kept 2 results; this log is result 2" in publish_log
    assert "b.txt" not in publish_log  # the outputs stopped at the first failure
    assert sorted(os.listdir(tmp_path / "spill" / JOB)) == ["0000", "0001", "0002"]


class FailingOutput(LocalStorage):
    """Local disk that fails the second object stored (a read error, or no room for it)."""

    puts = 0

    def put_blocking(self, job_id: str, key: str, source: Source) -> StoredObject:
        self.puts += 1
        if self.puts == 2:
            raise OSError("no room for it at /srv/secret-storage")
        return super().put_blocking(job_id, key, source)


async def test_outputs_stop_at_a_failure_and_the_logs_are_still_stored(
    workspace: Path, tmp_path: Path
) -> None:
    storage = FailingOutput(tmp_path / "store")
    with pytest.raises(PublishError) as caught:
        await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    error = caught.value
    assert str(error) == "result b.txt could not be stored"
    assert [(r.index, r.name) for r in error.results] == [
        (0, "a.txt"),
        (1, "algorithm.log"),
        (2, "configuration.log"),
        (3, "publish.log"),
    ]
    for result in error.results:
        data = await read_all(storage, result.index)
        assert (len(data), sha(data)) == (result.size_bytes, result.sha256)
    publish_log = (await read_all(storage, 3)).decode()
    assert "storing b.txt failed (OSError)" in publish_log
    assert "publish failed: result b.txt could not be stored" in publish_log
    assert "secret-storage" not in publish_log
    assert "own disk" not in publish_log


@pytest.fixture
async def link(s3_server: S3Server) -> AsyncIterator[FlakyLink]:
    async with FlakyLink(s3_server.endpoint_url) as relay:
        yield relay


async def test_s3_down_after_the_outputs_keeps_the_logs_and_the_job_publishes(
    workspace: Path, link: FlakyLink, s3_bucket: str, tmp_path: Path
) -> None:
    (workspace / "outputs" / "b.txt").unlink()
    (workspace / "outputs" / "a.txt").write_bytes(b"o" * (64 << 10))
    (workspace / "logs" / "algorithm.log").write_bytes(b"l" * (64 << 10))
    # Down in the middle of the first log's upload, once the output is in.
    link.down_after_upload_bytes = (64 << 10) + (16 << 10)
    storage = spilling(link.endpoint_url, s3_bucket, tmp_path)
    try:
        result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
        assert [r.name for r in result.results] == ["a.txt"] + [name for name, _ in LOGS]
        assert sorted(os.listdir(tmp_path / "spill" / JOB)) == ["0001", "0002", "0003"]
        link.down, link.down_after_upload_bytes = False, None
        for entry in result.results:
            data = await read_all(storage, entry.index)
            assert (len(data), sha(data)) == (entry.size_bytes, entry.sha256)
        assert (await storage.presign(JOB, "0000")).url  # the output is in S3
        publish_log = (workspace / "logs" / "publish.log").read_text()
        assert "stored a.txt as result 0: 65536 bytes" in publish_log
        assert "stored algorithm.log as result 1 on the node's own disk" in publish_log
    finally:
        storage.close()


def test_the_capped_reader_reads_again_from_where_it_is_told() -> None:
    fd = os.memfd_create("capped")
    os.write(fd, b"0123456789")
    os.lseek(fd, 0, os.SEEK_SET)
    reader = publish_module._CappedReader(fd, 6)
    try:
        assert reader.read(4) == b"0123"
        assert reader.seek(0, os.SEEK_CUR) == reader.tell() == 4
        assert reader.read() == b"45"  # the cap holds
        assert reader.seek(1) == 1
        assert reader.read() == b"12345"
        assert reader.seek(-2, os.SEEK_CUR) == 4
        assert reader.read(100) == b"45"
        with pytest.raises(io.UnsupportedOperation):
            reader.seek(0, os.SEEK_END)
        with pytest.raises(ValueError):
            reader.seek(-1)
    finally:
        reader.close()
