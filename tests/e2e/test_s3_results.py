"""Whole jobs on a node whose results are in S3 (moto's server on 127.0.0.1): outputs and logs
land in the bucket, come back through the Provider's gRPC stream, the REST edge (with Range)
and presigned URLs handed only to the job's readers, are checked against their sha256, and go
with the job. With S3 down while a job publishes, the job fails clearly and its logs stay on
the node, listed and downloadable. A node on local disk hands out no URLs."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from c2d.common.v1 import job_pb2

from mesh.storage import attachment_disposition
from sdk.client import Client
from tests.conftest import LocalMesh, needs_root, new_key, rest_edge, start_local_mesh
from tests.e2e.test_job import error_info, publish_pair, run_to_end
from tests.mesh.test_storage_s3 import FlakyLink
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server

pytestmark = needs_root

PREFIX = "node-results"
URL_TTL_S = 120
# About 2.4 MB: several chunks of a download, one S3 object.
OUTPUT_ALGORITHM = b"""
data = b"".join(i.to_bytes(4, "big") for i in range(600_000))
with open("/data/outputs/numbers.bin", "wb") as f:
    f.write(data)
print("wrote", len(data), flush=True)
"""
# Gives the test time to take S3 down before the job publishes.
SLOW_ALGORITHM = b"""
import time
print("computing", flush=True)
time.sleep(1.5)
with open("/data/outputs/answer.txt", "w") as f:
    f.write("42")
"""
Kind = job_pb2.ResultFile


@dataclass
class S3Node:
    mesh: LocalMesh
    bucket: str
    spill: Path
    s3: Any  # a plain boto3 client on moto, beside the node: what an operator sees

    def objects(self, job_id: str) -> dict[str, int]:
        """The job's objects in the bucket, by key, with their sizes."""
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"{PREFIX}/{job_id}/")
        return {o["Key"]: o["Size"] for o in listed.get("Contents", [])}


@contextlib.asynccontextmanager
async def s3_node(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    bucket: str,
    endpoint_url: str,
) -> AsyncIterator[S3Node]:
    """A whole mesh with results at s3://bucket/PREFIX, reaching S3 at `endpoint_url`: the
    settings are read from the environment by the engine and the Operator Service alike."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("C2D_S3_ENDPOINT", endpoint_url)
    monkeypatch.setenv("C2D_RESULT_URL_TTL_S", str(URL_TTL_S))
    spill = tmp_path / "spill"
    monkeypatch.setenv("C2D_STORAGE_SPILL", str(spill))
    s3 = s3_server.client()
    try:
        async with start_local_mesh(tmp_path, storage_url=f"s3://{bucket}/{PREFIX}") as mesh:
            yield S3Node(mesh, bucket, spill, s3)
    finally:
        s3.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job_id_of(job: job_pb2.Job) -> str:
    return job.name.removeprefix("jobs/")


async def run_job(mesh: LocalMesh, owner: Client, consumer: Client, code: bytes) -> job_pb2.Job:
    algorithm, dataset = await publish_pair(mesh, owner, code)
    job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
    _, final = await run_to_end(consumer, job)
    return final


async def expect_error(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def test_results_in_s3_from_a_job_to_its_deletion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, s3_bucket: str
) -> None:
    async with (
        s3_node(tmp_path, monkeypatch, s3_server, s3_bucket, s3_server.endpoint_url) as node,
        node.mesh.client(node.mesh.owner) as owner,
        node.mesh.client(new_key()) as consumer,
        node.mesh.client(new_key()) as stranger,
        rest_edge(node.mesh) as rest,
    ):
        http = rest.http
        final = await run_job(node.mesh, owner, consumer, OUTPUT_ALGORITHM)
        assert final.state == job_pb2.Job.STATE_SUCCEEDED, final.message
        job_id = job_id_of(final)
        expected = b"".join(i.to_bytes(4, "big") for i in range(600_000))

        # (a) Every result is an object under the prefix, as large as listed, with its sha256.
        assert [(r.name, r.kind) for r in final.results] == [
            ("numbers.bin", Kind.KIND_OUTPUT),
            ("algorithm.log", Kind.KIND_ALGORITHM_LOG),
            ("configuration.log", Kind.KIND_CONFIGURATION_LOG),
            ("publish.log", Kind.KIND_PUBLISH_LOG),
        ]
        assert node.objects(job_id) == {
            f"{PREFIX}/{job_id}/{r.index:04d}": r.size_bytes for r in final.results
        }
        for result in final.results:
            body = node.s3.get_object(Bucket=s3_bucket, Key=f"{PREFIX}/{job_id}/{result.index:04d}")
            assert sha(body["Body"].read()) == result.sha256
        output = final.results[0]
        assert (output.size_bytes, output.sha256) == (len(expected), sha(expected))
        assert not node.spill.exists()  # S3 took everything

        # (b) Through the Provider's stream and through the REST edge, resumed with Range.
        saved = await consumer.download_result(final.name, output, tmp_path / "numbers.bin")
        assert saved.read_bytes() == expected
        token = dict(await consumer.token_metadata())
        download = f"/v1/{final.name}/results/{output.index}:download"
        whole = await http.get(download, headers=token)
        assert whole.status_code == 200, whole.text
        assert sha(whole.content) == output.sha256
        start = len(expected) - 12345
        part = await http.get(download, headers={**token, "Range": f"bytes={start}-"})
        assert part.status_code == 206, part.text
        assert part.content == expected[start:]

        # (c) A presigned URL, through the SDK and through REST: a plain GET straight from S3.
        before = datetime.now(UTC).replace(microsecond=0)
        issued = await consumer.result_url(final.name, output)
        after = datetime.now(UTC)
        assert issued.url.startswith(f"{s3_server.endpoint_url}/{s3_bucket}/{PREFIX}/{job_id}/")
        assert issued.result == output
        expire_time = issued.expire_time.ToDatetime(tzinfo=UTC)
        ttl = timedelta(seconds=URL_TTL_S)
        assert before + ttl <= expire_time <= after + ttl
        over_rest = await http.get(f"/v1/{final.name}/results/{output.index}:url", headers=token)
        assert over_rest.status_code == 200, over_rest.text
        rest_expiry = datetime.fromisoformat(over_rest.json()["expireTime"])
        assert before + ttl <= rest_expiry <= datetime.now(UTC) + ttl
        async with httpx.AsyncClient(timeout=30) as plain:
            for url in (issued.url, over_rest.json()["url"]):
                fetched = await plain.get(url)
                assert fetched.status_code == 200
                assert sha(fetched.content) == output.sha256
                assert fetched.headers["content-disposition"] == attachment_disposition(
                    "numbers.bin"
                )
        # Only the job's owner and viewers get one.
        await expect_error(stranger.result_url(final.name, output), grpc.StatusCode.NOT_FOUND)
        stranger_token = dict(await stranger.token_metadata())
        refused = await http.get(
            f"/v1/{final.name}/results/{output.index}:url", headers=stranger_token
        )
        assert refused.status_code == 404, refused.text

        # An object replaced behind the mesh's back (same size, its own honest digest) is
        # neither handed out as a URL nor streamed as the result.
        replacement = bytes(reversed(expected))
        node.s3.put_object(
            Bucket=s3_bucket,
            Key=f"{PREFIX}/{job_id}/{output.index:04d}",
            Body=replacement,
            Metadata={"c2d-sha256": sha(replacement)},
        )
        await expect_error(consumer.result_url(final.name, output), grpc.StatusCode.DATA_LOSS)
        await expect_error(
            consumer.download_result(final.name, output, tmp_path / "replaced.bin"),
            grpc.StatusCode.DATA_LOSS,
        )

        # (f) Deleting the job deletes its objects.
        await consumer.delete_job(final.name)
        assert node.objects(job_id) == {}


async def test_a_node_on_local_disk_hands_out_no_urls(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as owner:
        final = await run_job(local_mesh, owner, owner, OUTPUT_ALGORITHM)
        assert final.state == job_pb2.Job.STATE_SUCCEEDED, final.message
        refused = await expect_error(
            owner.result_url(final.name, final.results[0]), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert error_info(refused).reason == "RESULT_URLS_UNAVAILABLE"
        assert "through the Provider" in (refused.details() or "")


async def test_s3_down_while_publishing_fails_the_job_and_keeps_its_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, s3_bucket: str
) -> None:
    async with (
        FlakyLink(s3_server.endpoint_url) as link,
        s3_node(tmp_path, monkeypatch, s3_server, s3_bucket, link.endpoint_url) as node,
        node.mesh.client(node.mesh.owner) as owner,
        node.mesh.client(new_key()) as consumer,
    ):
        algorithm, dataset = await publish_pair(node.mesh, owner, SLOW_ALGORITHM)
        job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
        async for chunk in consumer.stream_logs(job.name):
            if "computing" in chunk.text:
                break
        link.down = True  # S3 stops answering while the algorithm still runs
        _, final = await run_to_end(consumer, job)
        job_id = job_id_of(final)

        assert final.state == job_pb2.Job.STATE_FAILED
        assert final.failure_reason == job_pb2.FAILURE_REASON_PUBLISH_FAILED
        assert "results store was unreachable" in final.message
        assert "logs are kept on the node" in final.message
        port = link.endpoint_url.rsplit(":", 1)[1]
        for secret in ("127.0.0.1", port, ACCESS_KEY_ID, SECRET_ACCESS_KEY, s3_bucket):
            assert secret not in final.message
        # The logs, listed as results (the output is not: it was never stored).
        assert [(r.index, r.name, r.kind) for r in final.results] == [
            (0, "algorithm.log", Kind.KIND_ALGORITHM_LOG),
            (1, "configuration.log", Kind.KIND_CONFIGURATION_LOG),
            (2, "publish.log", Kind.KIND_PUBLISH_LOG),
        ]
        assert sorted(os.listdir(node.spill / job_id)) == ["0000", "0001", "0002"]

        # Downloadable through the Provider from the node's disk, S3 still down.
        for result in final.results:
            saved = await consumer.download_result(final.name, result, tmp_path / result.name)
            assert sha(saved.read_bytes()) == result.sha256 != ""
        assert (tmp_path / "algorithm.log").read_text() == "computing\n"
        publish_log = (tmp_path / "publish.log").read_text()
        assert "storing answer.txt failed (StorageUnavailable)" in publish_log
        # Not as a URL: S3 does not have them.
        refused = await expect_error(
            consumer.result_url(final.name, final.results[0]),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert error_info(refused).reason == "RESULT_URLS_UNAVAILABLE"
        assert "download it through the Provider" in (refused.details() or "")

        # (f) Once S3 is back, deleting the job removes what the node kept too.
        link.down = False
        assert node.objects(job_id) == {}
        await consumer.delete_job(final.name)
        assert not (node.spill / job_id).exists()
        assert node.objects(job_id) == {}
