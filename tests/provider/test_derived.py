"""The Provider's side of datasets made from a job's outputs: the request digests (the flag at
the end of every policy list, PublishJobOutputs' own list), the `stored` file source as the
store keeps it and the engine gets it, and on a real local mesh: a derived dataset derived
again (where its own policy allows it, and refused, naming it, where not), the node's owners
still changing its policy, and approval requests on it (the owners' flow, as for any
dataset: its publisher changes its policy directly instead; it has no sample)."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import duration_pb2

from mesh.auth import request_digest
from mesh.digests import digest_for
from provider.sources import FileSource, stored_file
from sdk.client import Client
from tests.conftest import LocalMesh, needs_root, new_key
from tests.e2e.test_job import expect, run_to_end

DATASET = "ab" * 32
JOB = "jobs/" + "0123456789abcdef" * 2
# Writes one output from its dataset's first file: a copy, upper-cased.
SHOUT = b"""
import json, os
dataset = json.loads(os.environ["DIDS"])[0]
text = open(f"/data/inputs/{dataset}/0").read()
open("/data/outputs/shout.txt", "w").write(text.upper())
"""


# -- digests and sources -----------------------------------------------------------------------


def test_the_policy_digests_its_flag_last_and_publish_outputs_its_fields() -> None:
    policy = pb.ComputePolicy(
        allow_network_access=True,
        timeout=duration_pb2.Duration(seconds=60),
        allow_derived_datasets=True,
    )
    policy_list = [False, True, 60, [], [], [], True]
    update = pb.UpdateDatasetPolicyRequest(name=f"datasets/{DATASET}", policy=policy)
    assert digest_for("UpdateDatasetPolicy", update) == request_digest(
        [f"datasets/{DATASET}", policy_list, 0]
    )
    request = pb.PublishJobOutputsRequest(
        name=JOB,
        request_id="r-1",
        metadata=pb.AssetMetadata(title="t", description="d", tags=["x"]),
        result_indexes=[2, 0],
        policy=policy,
    )
    assert digest_for("PublishJobOutputs", request) == request_digest(
        [JOB, "r-1", ["t", "d", "", "", ["x"]], [2, 0], policy_list]
    )
    # Unset: every field at its default, the policy as its list would be.
    assert digest_for("PublishJobOutputs", pb.PublishJobOutputsRequest()) == request_digest(
        ["", "", ["", "", "", "", []], [], [False, False, 0, [], [], [], False]]
    )
    # The flag is signed: flipping it changes the digest.
    flipped = pb.PublishJobOutputsRequest()
    flipped.CopyFrom(request)
    flipped.policy.allow_derived_datasets = False
    assert digest_for("PublishJobOutputs", flipped) != digest_for("PublishJobOutputs", request)


def test_a_stored_file_is_kept_and_handed_over_by_its_key() -> None:
    source = stored_file(DATASET, 3, 42, "cd" * 32)
    document = source.to_json()
    assert document == {"stored": f"datasets/{DATASET}/0003", "size_bytes": 42, "sha256": "cd" * 32}
    assert FileSource.from_json(json.loads(json.dumps(document))) == source
    assert not source.remote
    engine = source.to_engine()
    assert engine.WhichOneof("location") == "stored"
    assert (engine.stored, engine.size_bytes, engine.sha256) == (
        f"datasets/{DATASET}/0003",
        42,
        "cd" * 32,
    )
    with pytest.raises(ValueError):
        stored_file("not-an-id", 0, 1, "cd" * 32)


# -- on a real mesh ----------------------------------------------------------------------------


async def succeeded(client: Client, job: job_pb2.Job) -> job_pb2.Job:
    _, final = await run_to_end(client, job)
    assert final.state == job_pb2.Job.STATE_SUCCEEDED, final.message
    return final


@needs_root
async def test_a_derived_dataset_is_derived_again_where_its_own_policy_allows_it(
    local_mesh: LocalMesh,
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
        local_mesh.client(new_key()) as other,
    ):
        shout = await owner.publish_algorithm(
            SHOUT, "python3 $ALGO", access=pb.ALGORITHM_ACCESS_PUBLIC
        )
        trusted = pb.ComputePolicy(
            publisher_trusted_algorithms=[await owner.trust(shout.did)],
            allow_derived_datasets=True,
        )
        source = await owner.publish_dataset(
            [local_mesh.data_file("words.txt", b"hello\n")], policy=trusted
        )
        first = await succeeded(
            consumer, await consumer.start_compute([source.did], algorithm=shout.did)
        )
        # Its publisher lets jobs on it be derived again, and trusts the same algorithm.
        derived = await consumer.publish_job_outputs(
            first.name, metadata=pb.AssetMetadata(title="loud"), policy=trusted
        )
        second = await succeeded(
            consumer, await consumer.start_compute([derived.did], algorithm=shout.did)
        )
        again = await consumer.publish_job_outputs(
            second.name, metadata=pb.AssetMetadata(title="louder")
        )
        assert again.derived_from.datasets == [derived.name]
        assert [f.sha256 for f in again.files] == [f.sha256 for f in derived.files]

        # Its policy changed by a node owner: derived datasets no longer allowed.
        closed = await owner.update_policy(
            derived.did,
            pb.ComputePolicy(publisher_trusted_algorithms=trusted.publisher_trusted_algorithms),
        )
        assert closed.policy_version == 2 and not closed.policy.allow_derived_datasets
        third = await succeeded(
            consumer, await consumer.start_compute([derived.did], algorithm=shout.did)
        )
        refused = await expect(
            consumer.publish_job_outputs(third.name, metadata=pb.AssetMetadata(title="no")),
            grpc.StatusCode.PERMISSION_DENIED,
            "DERIVED_DATASETS_NOT_ALLOWED",
        )
        assert derived.name in (refused.details() or "")
        # Nobody but the owners and its publisher changes it; an owner's dataset stays the
        # owners' alone.
        await expect(
            other.update_policy(derived.did, pb.ComputePolicy()),
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_THE_PUBLISHER",
        )
        await expect(
            consumer.update_policy(source.did, pb.ComputePolicy()),
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_A_DATA_OWNER",
        )
        # Unknown jobs are not found; a stranger's job is not there either.
        await expect(
            consumer.publish_job_outputs(JOB, metadata=pb.AssetMetadata(title="x")),
            grpc.StatusCode.NOT_FOUND,
            "JOB_NOT_FOUND",
        )
        await expect(
            other.publish_job_outputs(first.name, metadata=pb.AssetMetadata(title="x")),
            grpc.StatusCode.NOT_FOUND,
            "JOB_NOT_FOUND",
        )


@needs_root
async def test_approval_requests_on_a_derived_dataset_stay_the_owners_flow(
    local_mesh: LocalMesh,
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
        local_mesh.client(new_key()) as asker,
    ):
        shout = await owner.publish_algorithm(SHOUT, "python3 $ALGO")
        source = await owner.publish_dataset(
            [local_mesh.data_file("words.txt", b"hi\n")],
            policy=pb.ComputePolicy(
                publisher_trusted_algorithms=[await owner.trust(shout.did)],
                allow_derived_datasets=True,
            ),
        )
        first = await succeeded(
            consumer, await consumer.start_compute([source.did], algorithm=shout.did)
        )
        derived = await consumer.publish_job_outputs(
            first.name, metadata=pb.AssetMetadata(title="loud")
        )
        mine = await asker.publish_algorithm(SHOUT + b"# mine\n", "python3 $ALGO")
        approval = await asker.create_approval_request(derived.did, mine.did, message="please")
        assert approval.dataset == derived.name
        # Its publisher does not decide requests (it changes the policy directly); owners do.
        await expect(
            consumer.approve(
                approval.name, approval.files_checksum, approval.container_section_checksum
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_A_DATA_OWNER",
        )
        await expect(
            owner.run_approval_sample(approval.name),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_SAMPLE_DATASET",
        )
        decided = await owner.approve(
            approval.name, approval.files_checksum, approval.container_section_checksum
        )
        assert decided.dataset.policy_version == 2
        job = await succeeded(asker, await asker.start_compute([derived.did], algorithm=mine.did))
        (output,) = [r for r in job.results if r.kind == job_pb2.ResultFile.KIND_OUTPUT]
        # It read the first job's output ("HI\n"), and shouted it again.
        assert output.sha256 == hashlib.sha256(b"HI\n").hexdigest()
