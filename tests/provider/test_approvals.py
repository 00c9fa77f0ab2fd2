"""Approval requests, the whole way: a consumer refused asks for approval; an owner reads the
private code while the request is pending, runs it on the dataset's sample, and approves (the
algorithm, pinned by the checksums reviewed, is trusted from a new policy version) or rejects
with a reason. Other consumers see nothing of it, and a changed algorithm is never approved."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import struct_pb2

from sdk.client import Client
from tests.conftest import LocalMesh, needs_root, new_key
from tests.e2e.test_job import SUM_ALGORITHM, error_info, run_to_end

pytestmark = needs_root

# SUM_ALGORITHM with its one parameter declared.
FACTOR = pb.ParameterSpec(
    name="factor",
    type=pb.PARAMETER_TYPE_INTEGER,
    default_value=struct_pb2.Value(number_value=1),
    minimum=1,
)
PENDING = pb.APPROVAL_STATE_PENDING


async def refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and ErrorInfo reason of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value.code(), error_info(refused.value).reason


async def publish_private_algorithm(consumer: Client) -> pb.Algorithm:
    algorithm = await consumer.publish_algorithm(
        SUM_ALGORITHM, "python3 $ALGO", parameters=[FACTOR]
    )
    assert algorithm.access == pb.ALGORITHM_ACCESS_PRIVATE
    return algorithm


async def update_algorithm(consumer: Client, algorithm: pb.Algorithm, code: bytes) -> pb.Algorithm:
    updated = await consumer.update_algorithm(
        algorithm.name, code, "python3 $ALGO", parameters=[FACTOR]
    )
    assert updated.files_checksum != algorithm.files_checksum
    return updated


async def publish_with_sample(mesh: LocalMesh, owner: Client) -> tuple[pb.Dataset, pb.Dataset]:
    """A dataset that trusts no algorithm, and its sample."""
    tag = time.monotonic_ns()
    dataset = await owner.publish_dataset([mesh.data_file(f"real-{tag}.txt", b"10\n20\n30\n")])
    sample = await owner.publish_dataset(
        [mesh.data_file(f"sample-{tag}.txt", b"1\n2\n")], sample_of=dataset.name
    )
    assert (await owner.get_dataset(dataset.name)).sample == sample.name
    return dataset, sample


async def asked_for_approval(
    mesh: LocalMesh, owner: Client, consumer: Client
) -> tuple[pb.Dataset, pb.Algorithm, pb.ApprovalRequest]:
    """A dataset with a sample, the consumer's private algorithm, and its pending request."""
    dataset, _ = await publish_with_sample(mesh, owner)
    algorithm = await publish_private_algorithm(consumer)
    asked = await consumer.create_approval_request(dataset.did, algorithm.did)
    return dataset, algorithm, asked


async def output_of(client: Client, job: job_pb2.Job, tmp_path: Path) -> Any:
    _, final = await run_to_end(client, job)
    assert final.state == job_pb2.Job.STATE_SUCCEEDED, final.message
    output = next(r for r in final.results if r.name == "total.json")
    saved = await client.download_result(job.name, output, tmp_path / f"{job.name[5:]}.json")
    return json.loads(saved.read_text())


async def test_a_consumer_refused_asks_and_an_owner_reviews_samples_and_approves(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    consumer_key = new_key()
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(consumer_key) as consumer,
    ):
        dataset, _ = await publish_with_sample(local_mesh, owner)
        algorithm = await publish_private_algorithm(consumer)
        start = consumer.start_compute([dataset.did], algorithm=algorithm.did)
        assert await refusal(start) == (grpc.StatusCode.PERMISSION_DENIED, "ALGORITHM_NOT_TRUSTED")
        # The code is private: no owner reads it while nobody asked for approval.
        no_request = owner.download_algorithm(algorithm.name)
        assert await refusal(no_request) == (grpc.StatusCode.PERMISSION_DENIED, "ALGORITHM_PRIVATE")

        asked = await consumer.create_approval_request(
            dataset.did, algorithm.did, message="sums only", parameters={"factor": 2}
        )
        assert asked.state == PENDING and asked.requester == consumer_key.address
        assert (asked.files_checksum, asked.container_section_checksum) == (
            algorithm.files_checksum,
            algorithm.container_section_checksum,
        )

        # The owner's review: the pending request, the code, its checksums, a sample run.
        [pending] = await owner.list_approval_requests(dataset=dataset.name, state=PENDING)
        assert pending.name == asked.name and pending.message == "sums only"
        code = await owner.download_algorithm(algorithm.name)
        assert code == SUM_ALGORITHM
        assert hashlib.sha256(code).hexdigest() == pending.files_checksum
        sample_job = await owner.run_approval_sample(pending.name)
        assert sample_job.owner == local_mesh.owner.address
        # The consumer's parameters, on the sample's numbers (1 + 2).
        assert await output_of(owner, sample_job, tmp_path) == {"total": 6}
        sample_log = "".join([c.text async for c in owner.stream_logs(sample_job.name)])
        assert sample_log == "total 3\n"
        reviewed = await owner.get_approval_request(pending.name)
        assert list(reviewed.sample_jobs) == [sample_job.name]
        # The sample run is the owner's alone.
        hidden = consumer.get_job(sample_job.name)
        assert (await refusal(hidden))[0] == grpc.StatusCode.NOT_FOUND

        approved = await owner.approve(
            pending.name, pending.files_checksum, pending.container_section_checksum, note="ok"
        )
        assert approved.dataset.policy_version == dataset.policy_version + 1
        assert [
            (t.did, t.files_checksum) for t in approved.dataset.policy.publisher_trusted_algorithms
        ] == [(algorithm.did, algorithm.files_checksum)]
        seen = await consumer.get_approval_request(asked.name)
        assert seen.state == pb.APPROVAL_STATE_APPROVED
        assert (seen.decision_note, seen.decided_by) == ("ok", local_mesh.owner.address)
        assert seen.policy_version == approved.dataset.policy_version
        # Decided: the code is private again.
        again = owner.download_algorithm(algorithm.name)
        assert await refusal(again) == (grpc.StatusCode.PERMISSION_DENIED, "ALGORITHM_PRIVATE")

        job = await consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, parameters={"factor": 2}
        )
        assert await output_of(consumer, job, tmp_path) == {"total": 120}


async def test_a_rejection_and_its_reason_reach_the_consumer(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        dataset, algorithm, asked = await asked_for_approval(local_mesh, owner, consumer)
        empty = owner.reject(asked.name, "")
        assert await refusal(empty) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        rejected = await owner.reject(asked.name, "prints single rows")
        assert rejected.state == pb.APPROVAL_STATE_REJECTED
        seen = await consumer.get_approval_request(asked.name)
        assert (seen.state, seen.decision_note) == (
            pb.APPROVAL_STATE_REJECTED,
            "prints single rows",
        )
        assert seen.HasField("decide_time")
        late = owner.approve(asked.name, asked.files_checksum, asked.container_section_checksum)
        not_pending = (grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_REQUEST_NOT_PENDING")
        assert await refusal(late) == not_pending
        assert await refusal(owner.run_approval_sample(asked.name)) == not_pending
        # Asking again makes a new request.
        anew = await consumer.create_approval_request(dataset.did, algorithm.did)
        assert anew.name != asked.name and anew.state == PENDING


async def test_another_consumer_can_neither_see_nor_act_on_a_request(
    local_mesh: LocalMesh,
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
        local_mesh.client(new_key()) as other,
    ):
        _, algorithm, asked = await asked_for_approval(local_mesh, owner, consumer)
        assert await other.list_approval_requests() == []
        assert [r.name for r in await consumer.list_approval_requests()] == [asked.name]
        assert await refusal(other.get_approval_request(asked.name)) == (
            grpc.StatusCode.NOT_FOUND,
            "APPROVAL_REQUEST_NOT_FOUND",
        )
        not_owner = (grpc.StatusCode.PERMISSION_DENIED, "NOT_A_DATA_OWNER")
        for client in (other, consumer):  # nor may the requester decide its own request
            checksums = (asked.files_checksum, asked.container_section_checksum)
            assert await refusal(client.approve(asked.name, *checksums)) == not_owner
            assert await refusal(client.reject(asked.name, "no")) == not_owner
            assert await refusal(client.run_approval_sample(asked.name)) == not_owner
        # Nor may it read the private code through the pending request.
        denied = other.download_algorithm(algorithm.name)
        assert await refusal(denied) == (grpc.StatusCode.PERMISSION_DENIED, "ALGORITHM_PRIVATE")
        assert (await owner.get_approval_request(asked.name)).state == PENDING


async def test_only_the_reviewed_checksums_of_an_unchanged_algorithm_are_approved(
    local_mesh: LocalMesh,
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        dataset, algorithm, asked = await asked_for_approval(local_mesh, owner, consumer)
        other_checksums = owner.approve(asked.name, "0" * 64, asked.container_section_checksum)
        assert await refusal(other_checksums) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "CHECKSUMS_NOT_THE_REQUESTS",
        )

        updated = await update_algorithm(consumer, algorithm, SUM_ALGORITHM + b"# v2\n")
        changed = (grpc.StatusCode.FAILED_PRECONDITION, "ALGORITHM_CHANGED")
        pinned = (asked.files_checksum, asked.container_section_checksum)
        assert await refusal(owner.approve(asked.name, *pinned)) == changed
        assert await refusal(owner.run_approval_sample(asked.name)) == changed
        current = (updated.files_checksum, updated.container_section_checksum)
        assert (await refusal(owner.approve(asked.name, *current)))[0] == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        assert (await owner.get_dataset(dataset.name)).policy_version == dataset.policy_version
        # The consumer asks again, for the new version.
        anew = await consumer.create_approval_request(dataset.did, algorithm.did)
        assert anew.name != asked.name and anew.files_checksum == updated.files_checksum


async def test_a_later_update_of_the_algorithm_is_not_approved(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        dataset, algorithm, asked = await asked_for_approval(local_mesh, owner, consumer)
        await owner.approve(asked.name, asked.files_checksum, asked.container_section_checksum)
        job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
        assert await output_of(consumer, job, tmp_path) == {"total": 60}

        await update_algorithm(consumer, algorithm, SUM_ALGORITHM.replace(b"total", b"t0tal"))
        start = consumer.start_compute([dataset.did], algorithm=algorithm.did)
        assert await refusal(start) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ALGORITHM_CHECKSUM_MISMATCH",
        )


async def test_requests_are_refused_or_reused_where_they_make_no_sense(
    local_mesh: LocalMesh,
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        algorithm = await publish_private_algorithm(consumer)
        alone = await owner.publish_dataset([local_mesh.data_file("alone.txt", b"1\n")])
        asked = await consumer.create_approval_request(alone.did, algorithm.did, request_id="r1")
        # The same request id, or a pending request for the same pair, gives the same request.
        assert (await consumer.create_approval_request(alone.did, algorithm.did)).name == asked.name
        retried = await consumer.create_approval_request(alone.did, algorithm.did, request_id="r1")
        assert retried.name == asked.name
        assert await refusal(owner.run_approval_sample(asked.name)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_SAMPLE_DATASET",
        )
        undeclared = consumer.create_approval_request(
            alone.did, algorithm.did, parameters={"factr": 2}
        )
        assert (await refusal(undeclared))[0] == grpc.StatusCode.INVALID_ARGUMENT

        await owner.approve(asked.name, asked.files_checksum, asked.container_section_checksum)
        trusted = consumer.create_approval_request(alone.did, algorithm.did)
        assert await refusal(trusted) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ALGORITHM_ALREADY_TRUSTED",
        )
