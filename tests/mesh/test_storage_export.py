"""The dataset area of both storages: a job's result copied (`export_result`) to
`datasets/{id}/{index}`, checked against its recorded size and sha256, idempotent, untouched by
the job's deletion, and read back verified (`read_dataset_file_blocking`). On local disk the
copy is a hard link when it can be (else a streamed copy), readable by the sandbox; in S3 a
server-side copy (CopyObject, or UploadPartCopy ranges above `copy_part_size`) that carries the
sha256 as metadata. S3 is moto's server on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import DataLoss, NotFound
from mesh.s3 import MIN_PART_SIZE
from mesh.storage import LocalStorage, dataset_key, parse_dataset_key
from mesh.storage_s3 import SHA256_FIELD, S3Storage
from tests.mesh import test_storage_s3
from tests.mesh.test_storage_s3 import sha
from tests.s3_server import S3Server

JOB = "0123456789abcdef0123456789abcdef"
DATASET = "ab" * 32
OTHER_DATASET = "cd" * 32
PREFIX = "node-results"
CONTENT = b"row\n" * 5000
# A plain boto3 client on the S3 server (the S3 storage tests' fixture), as `s3`.
s3 = test_storage_s3.s3


def read_back(storage: LocalStorage | S3Storage, dataset_id: str, index: int, data: bytes) -> bytes:
    chunks = storage.read_dataset_file_blocking(
        dataset_id, index, size=len(data), sha256=sha(data), chunk_size=4096
    )
    return b"".join(chunks)


# -- keys --------------------------------------------------------------------------------------


def test_a_dataset_key_has_one_spelling() -> None:
    assert dataset_key(DATASET, 3) == f"datasets/{DATASET}/0003"
    assert dataset_key(DATASET, 12345) == f"datasets/{DATASET}/12345"
    assert parse_dataset_key(f"datasets/{DATASET}/0003") == (DATASET, 3)
    for bad in (
        f"datasets/{DATASET}/3",
        f"datasets/{DATASET}/00003",
        f"datasets/{DATASET.upper()}/0003",
        f"datasets/{DATASET}/0003/..",
        f"{JOB}/0003",
        f"datasets/../{DATASET}/0003",
    ):
        with pytest.raises(ValueError):
            parse_dataset_key(bad)
    for dataset_id, index in (("ab" * 31, 0), (DATASET, -1), (DATASET, 1_000_000)):
        with pytest.raises(ValueError):
            dataset_key(dataset_id, index)


# -- local disk --------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    storage = LocalStorage(tmp_path / "results")
    storage.put_blocking(JOB, "0000", io.BytesIO(CONTENT))
    storage.sync_blocking(JOB)
    return storage


async def test_a_local_export_is_a_hard_link_that_outlives_the_job(local: LocalStorage) -> None:
    await local.export_result(JOB, "0000", DATASET, 0, size=len(CONTENT), sha256=sha(CONTENT))
    copy = local.dataset_file(DATASET, 0)
    assert copy == local.root / "datasets" / DATASET / "0000"
    assert os.path.samefile(copy, local.root / JOB / "0000")
    # Readable by the sandbox's unrelated uid (bind-mounted into jobs), written by nobody.
    assert stat.S_IMODE(copy.stat().st_mode) == 0o444
    for folder in (copy.parent, copy.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    # Again: nothing changes, nothing fails.
    await local.export_result(JOB, "0000", DATASET, 0, size=len(CONTENT), sha256=sha(CONTENT))
    assert read_back(local, DATASET, 0, CONTENT) == CONTENT

    await local.delete_job(JOB)
    assert not (local.root / JOB).exists()
    assert read_back(local, DATASET, 0, CONTENT) == CONTENT
    assert copy.stat().st_nlink == 1


async def test_without_links_a_local_export_is_a_checked_copy(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, "another file system")

    monkeypatch.setattr(os, "link", no_links)
    await local.export_result(JOB, "0000", DATASET, 1, size=len(CONTENT), sha256=sha(CONTENT))
    copy = local.dataset_file(DATASET, 1)
    assert not os.path.samefile(copy, local.root / JOB / "0000")
    assert copy.read_bytes() == CONTENT
    assert stat.S_IMODE(copy.stat().st_mode) == 0o444
    # The job's own result keeps its mode: only a link shares it.
    assert stat.S_IMODE((local.root / JOB / "0000").stat().st_mode) == 0o600
    assert [p.name for p in copy.parent.iterdir()] == ["0001"]


async def test_a_local_export_refuses_a_result_that_is_not_the_recorded_one(
    local: LocalStorage,
) -> None:
    with pytest.raises(DataLoss, match="sha256"):
        await local.export_result(JOB, "0000", DATASET, 0, size=len(CONTENT), sha256="0" * 64)
    with pytest.raises(DataLoss, match="size"):
        await local.export_result(JOB, "0000", DATASET, 0, size=len(CONTENT) + 1, sha256="0" * 64)
    with pytest.raises(NotFound):
        await local.export_result(JOB, "0001", DATASET, 0, size=1, sha256="0" * 64)
    # Nothing half-made is left in the dataset area.
    assert list((local.root / "datasets" / DATASET).iterdir()) == []


async def test_a_bad_local_copy_is_replaced_and_a_bad_read_refused(local: LocalStorage) -> None:
    folder = local.root / "datasets" / DATASET
    folder.mkdir(parents=True)
    tampered = bytes(reversed(CONTENT[:100])) + CONTENT[100:]
    (folder / "0000").write_bytes(tampered)
    await local.export_result(JOB, "0000", DATASET, 0, size=len(CONTENT), sha256=sha(CONTENT))
    assert read_back(local, DATASET, 0, CONTENT) == CONTENT

    copy = local.dataset_file(DATASET, 0)
    copy.unlink()
    copy.write_bytes(tampered)
    with pytest.raises(DataLoss, match="sha256"):
        read_back(local, DATASET, 0, CONTENT)
    copy.write_bytes(CONTENT + b"more")
    with pytest.raises(DataLoss, match="larger"):
        read_back(local, DATASET, 0, CONTENT)
    with pytest.raises(NotFound):
        read_back(local, OTHER_DATASET, 0, CONTENT)


# -- S3 ----------------------------------------------------------------------------------------


@pytest.fixture
def store(s3_server: S3Server, s3_bucket: str) -> Iterator[S3Storage]:
    storage = S3Storage(
        s3_server.settings,
        s3_bucket,
        PREFIX,
        part_size=MIN_PART_SIZE,
        copy_part_size=MIN_PART_SIZE,
    )
    yield storage
    storage.close()


def dataset_object(dataset_id: str, index: int) -> str:
    return f"{PREFIX}/datasets/{dataset_id}/{index:04d}"


async def test_an_s3_export_is_a_server_side_copy_that_outlives_the_job(
    store: S3Storage, s3: Any, s3_bucket: str
) -> None:
    stored = await store.put(JOB, "0000", io.BytesIO(CONTENT))
    await store.export_result(JOB, "0000", DATASET, 0, size=stored.size, sha256=stored.sha256)
    head = s3.head_object(Bucket=s3_bucket, Key=dataset_object(DATASET, 0))
    assert head["ContentLength"] == len(CONTENT)
    assert head["Metadata"] == {SHA256_FIELD: sha(CONTENT)}
    # Idempotent: a retry keeps the copy as it is.
    before = head["LastModified"]
    await store.export_result(JOB, "0000", DATASET, 0, size=stored.size, sha256=stored.sha256)
    after = s3.head_object(Bucket=s3_bucket, Key=dataset_object(DATASET, 0))
    assert after["LastModified"] == before

    await store.delete_job(JOB)
    assert s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{PREFIX}/{JOB}/")["KeyCount"] == 0
    assert read_back(store, DATASET, 0, CONTENT) == CONTENT


async def test_an_s3_object_above_the_copy_size_is_copied_part_by_part(
    store: S3Storage, s3: Any, s3_bucket: str
) -> None:
    # 11 MiB, stored as a multipart upload (its sha256 a tag): a copy of three ranges.
    big = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(11 << 15))
    stored = await store.put(JOB, "0000", io.BytesIO(big))
    assert stored.size == 11 << 20
    await store.export_result(JOB, "0000", DATASET, 2, size=stored.size, sha256=stored.sha256)
    part = s3.head_object(Bucket=s3_bucket, Key=dataset_object(DATASET, 2), PartNumber=1)
    assert part["PartsCount"] == 3
    head = s3.head_object(Bucket=s3_bucket, Key=dataset_object(DATASET, 2))
    assert head["Metadata"] == {SHA256_FIELD: sha(big)}
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert read_back(store, DATASET, 2, big) == big


async def test_an_s3_export_refuses_a_result_that_is_not_the_recorded_one(
    store: S3Storage, s3: Any, s3_bucket: str
) -> None:
    stored = await store.put(JOB, "0000", io.BytesIO(CONTENT))
    with pytest.raises(DataLoss):
        await store.export_result(JOB, "0000", DATASET, 0, size=stored.size, sha256="0" * 64)
    # Replaced behind the storage's back (no recorded sha256 any more).
    s3.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/{JOB}/0000", Body=CONTENT)
    with pytest.raises(DataLoss):
        await store.export_result(JOB, "0000", DATASET, 0, size=stored.size, sha256=stored.sha256)
    with pytest.raises(NotFound):
        await store.export_result(JOB, "0001", DATASET, 0, size=1, sha256="0" * 64)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{PREFIX}/datasets/")
    assert listed["KeyCount"] == 0


async def test_a_tampered_s3_copy_is_refused_when_read(
    store: S3Storage, s3: Any, s3_bucket: str
) -> None:
    stored = await store.put(JOB, "0000", io.BytesIO(CONTENT))
    await store.export_result(JOB, "0000", DATASET, 0, size=stored.size, sha256=stored.sha256)
    tampered = CONTENT[:-4] + b"ROW\n"
    s3.put_object(
        Bucket=s3_bucket,
        Key=dataset_object(DATASET, 0),
        Body=tampered,
        Metadata={SHA256_FIELD: sha(CONTENT)},  # the metadata lies: the bytes are read
    )
    with pytest.raises(DataLoss, match="sha256"):
        read_back(store, DATASET, 0, CONTENT)
    with pytest.raises(NotFound):
        read_back(store, OTHER_DATASET, 0, CONTENT)
