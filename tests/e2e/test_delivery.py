"""A consumer's choice of results and their delivery to its own storage, through the Provider
with the SDK, on a whole node (real sandboxes; results on the node's disk) and a consumer
bucket on moto's S3 server (127.0.0.1, allowed by the node: C2D_DELIVERY_ALLOW_HOSTS).

The consumer picks outputs, logs or both; the kept results land in its bucket (checked against
the sha256 the job lists) or at its presigned upload URLs, and stay downloadable from the
Provider whatever became of the delivery; a refused delivery leaves the job's outcome alone;
and no key or URL signature ends up in any file of the node."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from c2d.common.v1 import job_pb2

from sdk.client import Client, s3_delivery, upload_urls
from tests.conftest import LocalMesh, needs_root, new_key, start_local_mesh
from tests.e2e.test_job import publish_pair, run_to_end
from tests.operator_engine.test_delivery import files_holding, signature
from tests.s3_server import REGION, S3Server

pytestmark = [needs_root, pytest.mark.timeout(180)]

Status = job_pb2.DeliveryStatus
State = job_pb2.Job.State
CONSUMER_KEY_ID = "e2e-consumer-key-id"
CONSUMER_SECRET = "e2e-consumer-secret-4b9d-never-kept"
ALGORITHM = b"""
import os
os.makedirs("/data/outputs/tables", exist_ok=True)
with open("/data/outputs/tables/sum.csv", "w") as f:
    f.write("sum\\n6\\n")
with open("/data/outputs/model.bin", "wb") as f:
    f.write(bytes(range(256)) * 4096)
print("trained", flush=True)
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def downloaded(consumer: Client, job: job_pb2.Job, tmp_path: Path) -> dict[str, bytes]:
    """Every result of the job, from the Provider (each checked against its sha256)."""
    found = {}
    for result in job.results:
        dest = tmp_path / f"download-{result.index}"
        await consumer.download_result(job.name, result, dest)
        found[result.name] = dest.read_bytes()
    return found


@pytest.fixture
async def mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalMesh]:
    # The consumer's store is on the node's loopback: the node must allow it (Provider and
    # engine alike read the variable).
    monkeypatch.setenv("C2D_DELIVERY_ALLOW_HOSTS", "127.0.0.1")
    async with start_local_mesh(tmp_path) as started:
        yield started


async def test_outputs_and_logs_delivered_to_the_consumers_bucket(
    mesh: LocalMesh, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    async with mesh.client(mesh.owner) as owner, mesh.client(new_key()) as consumer:
        algorithm, dataset = await publish_pair(mesh, owner, ALGORITHM)
        job = await consumer.start_compute(
            [dataset.did],
            algorithm=algorithm.did,
            results="both",
            delivery=s3_delivery(
                s3_bucket,
                "c2d/",
                endpoint=s3_server.endpoint_url,
                region=REGION,
                access_key_id=CONSUMER_KEY_ID,
                secret_access_key=CONSUMER_SECRET,
            ),
        )
        job_id = job.name.removeprefix("jobs/")
        assert job.delivery.state == Status.STATE_PENDING
        assert job.delivery.destination.startswith(f"s3://{s3_bucket}/c2d/{job_id}/ at 127.0.0.1")
        _, final = await run_to_end(consumer, job)
        assert final.state == State.STATE_SUCCEEDED, final.message
        assert final.result_selection == job_pb2.RESULT_SELECTION_OUTPUTS_AND_LOGS
        names = [r.name for r in final.results]
        assert names == [
            "model.bin",
            "tables/sum.csv",
            "algorithm.log",
            "configuration.log",
            "publish.log",
        ]
        assert final.delivery.state == Status.STATE_DELIVERED, final.delivery.message
        assert final.delivery.delivered_count == 5
        # Every kept result is in the consumer's bucket, byte for byte as the job lists it.
        found = s3_server.objects(s3_bucket)
        assert set(found) == {f"c2d/{job_id}/{name}" for name in names}
        for result in final.results:
            assert sha(found[f"c2d/{job_id}/{result.name}"]) == result.sha256
        assert found[f"c2d/{job_id}/tables/sum.csv"] == b"sum\n6\n"
        assert found[f"c2d/{job_id}/algorithm.log"] == b"trained\n"
        # And still from the Provider, as ever.
        from_provider = await downloaded(consumer, final, tmp_path)
        assert {f"c2d/{job_id}/{n}": d for n, d in from_provider.items()} == found
        # The job as read later says the same, and holds no secret.
        again = await consumer.get_job(job.name)
        assert again.delivery == final.delivery
        assert CONSUMER_SECRET not in str(again) and CONSUMER_KEY_ID not in str(again)
    assert files_holding(tmp_path, CONSUMER_SECRET) == []


async def test_outputs_only_to_upload_urls(
    mesh: LocalMesh, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    urls = {
        "tables/sum.csv": s3_server.presigned_put(
            s3_bucket, "inbox/sum.csv", CONSUMER_KEY_ID, CONSUMER_SECRET
        ),
        "algorithm.log": s3_server.presigned_put(
            s3_bucket, "inbox/algorithm.log", CONSUMER_KEY_ID, CONSUMER_SECRET
        ),
    }
    signatures = [signature(u) for u in urls.values()]
    async with mesh.client(mesh.owner) as owner, mesh.client(new_key()) as consumer:
        algorithm, dataset = await publish_pair(mesh, owner, ALGORITHM)
        job = await consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, results="outputs", delivery=upload_urls(urls)
        )
        assert job.delivery.destination == "upload URLs (2)"
        _, final = await run_to_end(consumer, job)
        assert final.state == State.STATE_SUCCEEDED, final.message
        assert [r.name for r in final.results] == ["model.bin", "tables/sum.csv", "publish.log"]
        # Only the named result that was kept went; the rest is reported.
        assert final.delivery.state == Status.STATE_DELIVERED, final.delivery.message
        assert final.delivery.delivered_count == 1
        assert (
            "kept results without an upload URL, not delivered: model.bin, publish.log"
            in final.delivery.message
        )
        assert "upload URLs naming no result of the job: algorithm.log" in final.delivery.message
        assert s3_server.objects(s3_bucket) == {"inbox/sum.csv": b"sum\n6\n"}
        for each in signatures:
            assert each not in str(final)
    assert files_holding(tmp_path, *signatures) == []


async def test_a_refused_delivery_leaves_the_job_and_its_logs_downloadable(
    mesh: LocalMesh, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    from moto.core.authorization import enable_iam_authentication

    async with mesh.client(mesh.owner) as owner, mesh.client(new_key()) as consumer:
        algorithm, dataset = await publish_pair(mesh, owner, ALGORITHM)
        # moto checks keys only when asked to: the consumer's are then unknown to it.
        with enable_iam_authentication():
            job = await consumer.start_compute(
                [dataset.did],
                algorithm=algorithm.did,
                results="logs",
                delivery=s3_delivery(
                    s3_bucket,
                    endpoint=s3_server.endpoint_url,
                    access_key_id=CONSUMER_KEY_ID,
                    secret_access_key=CONSUMER_SECRET,
                ),
            )
            _, final = await run_to_end(consumer, job)
        assert final.state == State.STATE_SUCCEEDED, final.message
        assert final.result_selection == job_pb2.RESULT_SELECTION_LOGS
        assert [r.name for r in final.results] == [
            "algorithm.log",
            "configuration.log",
            "publish.log",
        ]
        assert final.delivery.state == Status.STATE_FAILED
        assert "InvalidAccessKeyId" in final.delivery.message
        for secret in (CONSUMER_SECRET, CONSUMER_KEY_ID, s3_server.endpoint_url):
            assert secret not in final.delivery.message
        assert s3_server.objects(s3_bucket) == {}
        from_provider = await downloaded(consumer, final, tmp_path)
        assert from_provider["algorithm.log"] == b"trained\n"
        assert (
            b"outputs: not stored, the consumer asked for logs only"
            in (from_provider["publish.log"])
        )
    assert files_holding(tmp_path, CONSUMER_SECRET) == []
