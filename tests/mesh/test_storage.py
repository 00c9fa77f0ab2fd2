"""The storage contract (streaming put/read, sizes, deletion, and no partial object on
failure), for LocalStorage and for S3Storage against a real S3 server; LocalStorage's own
ways (modes, files made ahead) beside it."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from c2d.common.v1 import job_pb2

from mesh.errors import NotFound
from mesh.s3 import MIN_PART_SIZE
from mesh.storage import (
    CHUNK_SIZE,
    LocalStorage,
    Storage,
    StoredObject,
    result_key,
    storage_from_url,
)
from mesh.storage_s3 import S3Storage
from tests.s3_server import S3Server

JOB = "0123456789abcdef0123456789abcdef"
OTHER_JOB = "fedcba9876543210fedcba9876543210"


async def read_all(storage: Storage, key: str, **kwargs: int) -> bytes:
    return b"".join([chunk async for chunk in storage.read(JOB, key, **kwargs)])


@pytest.fixture(params=["local", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """Each implementation in turn: local disk under tmp_path/store, S3 in a fresh bucket."""
    if request.param == "local":
        yield LocalStorage(tmp_path / "store")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    s3 = S3Storage(server.settings, bucket, "results", part_size=MIN_PART_SIZE)
    yield s3
    s3.close()


class ExplodingSource(io.RawIOBase):
    """Yields a few chunks, then fails like a disk error halfway through a copy."""

    def __init__(self, chunks_before_failure: int) -> None:
        self.left = chunks_before_failure

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left == 0:
            raise OSError("read failed halfway")
        self.left -= 1
        return b"x" * 1000


async def test_put_read_size_roundtrip(any_storage: Storage) -> None:
    storage = any_storage
    data = os.urandom(3 * CHUNK_SIZE + 123)
    stored = await storage.put(JOB, "0000", io.BytesIO(data))
    assert stored == StoredObject(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert await read_all(storage, "0000") == data
    assert await storage.size(JOB, "0000") == len(data)
    chunks = [chunk async for chunk in storage.read(JOB, "0000", chunk_size=CHUNK_SIZE)]
    assert all(len(chunk) <= CHUNK_SIZE for chunk in chunks)
    assert len(chunks) == 4


async def test_read_from_offset_and_small_chunks(any_storage: Storage) -> None:
    storage = any_storage
    await storage.put(JOB, "0001", io.BytesIO(b"0123456789"))
    assert await read_all(storage, "0001", offset=4) == b"456789"
    chunks = [chunk async for chunk in storage.read(JOB, "0001", offset=1, chunk_size=3)]
    assert chunks == [b"123", b"456", b"789"]
    assert await read_all(storage, "0001", offset=10) == b""
    assert await read_all(storage, "0001", offset=99) == b""


async def test_empty_object(any_storage: Storage) -> None:
    storage = any_storage
    stored = await storage.put(JOB, "0000", io.BytesIO(b""))
    assert stored.size == 0
    assert stored.sha256 == hashlib.sha256(b"").hexdigest()
    assert await read_all(storage, "0000") == b""


async def test_modes_are_owner_only(tmp_path: Path) -> None:
    root = tmp_path / "store"
    storage = LocalStorage(root)
    await storage.put(JOB, "0000", io.BytesIO(b"secret"))
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / JOB).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / JOB / "0000").st_mode) == 0o600


async def test_missing_object_is_not_found(any_storage: Storage) -> None:
    storage = any_storage
    with pytest.raises(NotFound):
        await storage.size(JOB, "0000")
    with pytest.raises(NotFound):
        await read_all(storage, "0000")
    await storage.put(JOB, "0000", io.BytesIO(b"x"))
    with pytest.raises(NotFound):
        await storage.size(JOB, "0001")


async def test_delete_job_removes_only_that_job(any_storage: Storage, tmp_path: Path) -> None:
    storage = any_storage
    await storage.put(JOB, "0000", io.BytesIO(b"a"))
    await storage.put(JOB, "0001", io.BytesIO(b"b"))
    await storage.put(OTHER_JOB, "0000", io.BytesIO(b"c"))
    await storage.delete_job(JOB)
    with pytest.raises(NotFound):
        await storage.size(JOB, "0000")
    if isinstance(storage, LocalStorage):
        assert not (tmp_path / "store" / JOB).exists()
    assert await storage.size(OTHER_JOB, "0000") == 1
    # Deleting again, or a job that never stored anything, is not an error.
    await storage.delete_job(JOB)
    await storage.delete_job("1" * 32)


async def test_failed_put_leaves_no_partial_object(any_storage: Storage, tmp_path: Path) -> None:
    storage = any_storage
    with pytest.raises(OSError, match="halfway"):
        await storage.put(JOB, "0000", ExplodingSource(3))  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await storage.size(JOB, "0000")
    # No temporary file left behind either (S3: see test_storage_s3, no upload left pending).
    if isinstance(storage, LocalStorage):
        assert os.listdir(tmp_path / "store" / JOB) == []


async def test_failed_replace_keeps_the_old_object(any_storage: Storage, tmp_path: Path) -> None:
    storage = any_storage
    await storage.put(JOB, "0000", io.BytesIO(b"old content"))
    with pytest.raises(OSError):
        await storage.put(JOB, "0000", ExplodingSource(2))  # type: ignore[arg-type]
    assert await read_all(storage, "0000") == b"old content"
    if isinstance(storage, LocalStorage):
        assert os.listdir(tmp_path / "store" / JOB) == ["0000"]


async def test_folders_and_files_made_ahead_are_used_and_the_rest_removed(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    storage = LocalStorage(root)
    storage.prepare_blocking(2, 3)
    spares = list((root / ".spare").iterdir())
    assert len(spares) == 2
    made_ahead = {os.stat(f).st_ino for spare in spares for f in spare.iterdir()}
    for index in range(4):  # one more than was made ahead
        await storage.put(JOB, f"{index:04d}", io.BytesIO(b"x" * index))
    await storage.sync(JOB)
    assert sorted(os.listdir(root / JOB)) == ["0000", "0001", "0002", "0003"]
    for index in range(4):
        assert await read_all(storage, f"{index:04d}") == b"x" * index
    stored = {os.stat(root / JOB / name).st_ino for name in os.listdir(root / JOB)}
    assert len(stored & made_ahead) == 3
    assert stat.S_IMODE(os.stat(root / JOB).st_mode) == 0o700
    assert {stat.S_IMODE(os.stat(f).st_mode) for f in (root / JOB).iterdir()} == {0o600}
    # Fewer objects than files made ahead: the job's folder keeps its objects only.
    await storage.put(OTHER_JOB, "0000", io.BytesIO(b"y"))
    await storage.sync(OTHER_JOB)
    assert os.listdir(root / OTHER_JOB) == ["0000"]
    assert not (root / ".spare").exists() or list((root / ".spare").iterdir()) == []
    # A storage on the same root (the engine restarted) removes what the last one made.
    storage.prepare_blocking(1, 2)
    restarted = LocalStorage(root)
    restarted.prepare_blocking(1, 1)
    (spare,) = (root / ".spare").iterdir()
    assert len(os.listdir(spare)) == 1


@pytest.mark.parametrize("job_id", ["", "../" + "a" * 29, "A" * 32, "a" * 31, "a" * 33, "a/" * 16])
async def test_bad_job_ids_are_rejected(any_storage: Storage, tmp_path: Path, job_id: str) -> None:
    storage = any_storage
    with pytest.raises(ValueError):
        await storage.put(job_id, "0000", io.BytesIO(b"x"))
    with pytest.raises(ValueError):
        await storage.delete_job(job_id)
    if isinstance(storage, LocalStorage):
        assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("key", ["", ".", "..", "../x", "a/b", ".part-x", "-x", "a" * 129, "a\x00"])
async def test_bad_keys_are_rejected(any_storage: Storage, key: str) -> None:
    storage = any_storage
    with pytest.raises(ValueError):
        await storage.put(JOB, key, io.BytesIO(b"x"))
    with pytest.raises(ValueError):
        await storage.size(JOB, key)


def test_result_key_comes_from_the_index() -> None:
    assert result_key(job_pb2.ResultFile(index=0, name="../../etc/passwd")) == "0000"
    assert result_key(job_pb2.ResultFile(index=42)) == "0042"
    assert result_key(job_pb2.ResultFile(index=12345)) == "12345"


def test_storage_from_url(tmp_path: Path) -> None:
    by_url = storage_from_url(f"file://{tmp_path}/store")
    assert isinstance(by_url, LocalStorage)
    assert by_url.root == tmp_path / "store"
    by_path = storage_from_url(str(tmp_path / "plain"))
    assert isinstance(by_path, LocalStorage)
    assert by_path.root == tmp_path / "plain"
    spaced = storage_from_url("file:///srv/with%20space")
    assert isinstance(spaced, LocalStorage)
    assert spaced.root == Path("/srv/with space")
    by_s3 = storage_from_url("s3://bucket/prefix")
    assert isinstance(by_s3, S3Storage)
    assert (by_s3.bucket, by_s3.prefix) == ("bucket", "prefix")
    by_s3.close()
    with pytest.raises(ValueError, match="not supported yet"):
        storage_from_url("ftp://host/prefix")
    with pytest.raises(ValueError):
        storage_from_url("file://otherhost/srv")
    with pytest.raises(ValueError):
        storage_from_url("")
