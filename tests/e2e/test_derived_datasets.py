"""A job's outputs published as a dataset of the consumer's on the node (PublishJobOutputs), on
a real local mesh with results on local disk and in S3 (moto's server on 127.0.0.1): the owner's
dataset allows it and trusts a first algorithm; the consumer's job on it succeeds; the consumer
publishes its outputs as a new, private dataset; as its publisher it trusts a second algorithm;
jobs on the derived dataset read the first job's outputs, also once that job's results have
expired and once the job is deleted. And what is refused: a dataset that does not allow it, a
viewer, a failed job, a log, another consumer changing the derived dataset's policy, a stored
copy that was tampered with. The REST edge serves it too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format

from operator_engine.config import EnvironmentSpec
from sdk.client import Client
from tests.conftest import LocalMesh, Rest, needs_root, new_key, start_local_mesh, write_key
from tests.e2e.test_job import error_info, expect, run_to_end
from tests.e2e.test_rest import signed
from tests.s3_server import S3Server

pytestmark = needs_root
REPO = Path(__file__).resolve().parents[2]

State = job_pb2.Job.State
Kind = job_pb2.ResultFile
PREFIX = "node-results"
RETENTION_S = 2.0
ENVIRONMENTS = (
    EnvironmentSpec(max_concurrent_jobs=4),
    EnvironmentSpec(name="brief", result_retention_s=RETENTION_S),
)
# The owner's trusted algorithm: per-row squares and a count, from the dataset's rows.
SQUARES = b"""
import json, os
dataset = json.loads(os.environ["DIDS"])[0]
rows = [int(r) for r in open(f"/data/inputs/{dataset}/0").read().split()]
open("/data/outputs/squares.txt", "w").write("".join(f"{r * r}\\n" for r in rows))
open("/data/outputs/count.txt", "w").write(str(len(rows)))
print("rows", len(rows), flush=True)
"""
# The consumer's second algorithm, run on the derived dataset: what each input file holds.
SUMMARY = b"""
import json, os
dataset = json.loads(os.environ["DIDS"])[0]
folder = f"/data/inputs/{dataset}"
files = {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))}
ddo = json.load(open(f"/data/ddos/{dataset}"))
json.dump({"files": files, "derived_from": ddo["derivedFrom"]},
          open("/data/outputs/summary.json", "w"))
"""
NUMBERS = b"1\n2\n3\n4\n"


@dataclass
class Node:
    mesh: LocalMesh
    results: Path  # the local results storage's root (unused with S3)


@contextlib.asynccontextmanager
async def derived_node(tmp_path: Path, storage_url: str | None = None) -> AsyncIterator[Node]:
    """A whole mesh whose environment `brief` keeps results RETENTION_S, swept every 0.2 s."""
    async with start_local_mesh(
        tmp_path, storage_url=storage_url, environments=ENVIRONMENTS, retention_sweep_s=0.2
    ) as mesh:
        yield Node(mesh, Path(storage_url or mesh.home / "results"))


def results_url(
    storage: str, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, bucket: str, tmp_path: Path
) -> str | None:
    """Where a node keeps results for `storage`: None (local disk) for "local", else `bucket`
    on the test S3 server, whose settings go into the environment."""
    if storage == "local":
        return None
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("C2D_STORAGE_SPILL", str(tmp_path / "spill"))
    return f"s3://{bucket}/{PREFIX}"


async def owner_dataset(
    mesh: LocalMesh, owner: Client, algorithm: pb.Algorithm, *, derived: bool = True
) -> pb.Dataset:
    data = mesh.data_file(f"numbers-{uuid.uuid4().hex}.txt", NUMBERS)
    return await owner.publish_dataset(
        [data],
        policy=pb.ComputePolicy(
            publisher_trusted_algorithms=[await owner.trust(algorithm.did)],
            allow_derived_datasets=derived,
        ),
    )


async def finished(client: Client, job: job_pb2.Job) -> job_pb2.Job:
    async with asyncio.timeout(60):
        _, final = await run_to_end(client, job)
    return final


async def output(client: Client, job: job_pb2.Job, name: str, tmp_path: Path) -> bytes:
    (result,) = [r for r in job.results if r.name == name]
    saved = await client.download_result(job.name, result, tmp_path / uuid.uuid4().hex)
    return saved.read_bytes()


async def eventually_expired(client: Client, job: job_pb2.Job) -> None:
    async with asyncio.timeout(RETENTION_S + 10):
        while not (await client.get_job(job.name)).results_expired:
            await asyncio.sleep(0.1)


# -- the whole story ---------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["local", "s3"])
async def test_outputs_become_a_dataset_that_outlives_their_job(
    storage: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    url = results_url(storage, monkeypatch, s3_server, s3_bucket, tmp_path)
    consumer_key, stranger_key = new_key(), new_key()
    async with (
        derived_node(tmp_path, url) as node,
        node.mesh.client(node.mesh.owner) as owner,
        node.mesh.client(consumer_key) as consumer,
        node.mesh.client(stranger_key) as stranger,
    ):
        squares = await owner.publish_algorithm(SQUARES, "python3 $ALGO")
        source = await owner_dataset(node.mesh, owner, squares)
        first = await finished(
            consumer,
            await consumer.start_compute([source.did], algorithm=squares.did, environment="brief"),
        )
        assert first.state == State.STATE_SUCCEEDED, first.message
        outputs = sorted(
            (r for r in first.results if r.kind == Kind.KIND_OUTPUT), key=lambda r: r.index
        )
        assert [r.name for r in outputs] == ["count.txt", "squares.txt"]

        # Published as the consumer's, private: it trusts no algorithm.
        request_id = uuid.uuid4().hex
        derived = await consumer.publish_job_outputs(
            first.name,
            metadata=pb.AssetMetadata(title="squares"),
            request_id=request_id,
        )
        assert derived.publisher == consumer_key.address
        assert derived.did == "did:c2d:" + derived.name.removeprefix("datasets/")
        assert derived.derived_from == pb.DerivedFrom(
            job=first.name,
            datasets=[source.name],
            algorithm=squares.name,
            outputs=["count.txt", "squares.txt"],
        )
        assert [(f.index, f.size_bytes, f.sha256) for f in derived.files] == [
            (i, r.size_bytes, r.sha256) for i, r in enumerate(outputs)
        ]
        assert derived.policy == pb.ComputePolicy() and derived.policy_version == 1
        # A retry is the same dataset; anyone sees it, never where its files are.
        again = await consumer.publish_job_outputs(
            first.name, metadata=pb.AssetMetadata(title="squares"), request_id=request_id
        )
        assert again.name == derived.name
        shown = await stranger.get_dataset(derived.did)
        assert shown == derived
        assert "datasets/" + derived.name.removeprefix("datasets/") + "/" not in str(shown)

        summary = await stranger.publish_algorithm(SUMMARY, "python3 $ALGO")
        await expect(
            consumer.start_compute([derived.did], algorithm=summary.did),
            grpc.StatusCode.PERMISSION_DENIED,
            "ALGORITHM_NOT_TRUSTED",
        )
        # Another consumer may not change its policy; its publisher may.
        trusts_summary = pb.ComputePolicy(
            publisher_trusted_algorithms=[await consumer.trust(summary.did)]
        )
        await expect(
            stranger.update_policy(derived.did, trusts_summary),
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_THE_PUBLISHER",
        )
        updated = await consumer.update_policy(derived.did, trusts_summary)
        assert updated.policy_version == 2

        # The first job's results expire: the derived dataset does not.
        await eventually_expired(consumer, first)
        await expect(
            consumer.publish_job_outputs(first.name, metadata=pb.AssetMetadata(title="late")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "RESULTS_EXPIRED",
        )
        expected = {
            "files": {"0": "4", "1": "1\n4\n9\n16\n"},
            "derived_from": json_format.MessageToDict(derived.derived_from),
        }
        second = await finished(
            consumer, await consumer.start_compute([derived.did], algorithm=summary.did)
        )
        assert second.state == State.STATE_SUCCEEDED, second.message
        assert json.loads(await output(consumer, second, "summary.json", tmp_path)) == expected
        # Mounted where it is from local disk; copied, checked, from S3.
        configuration = await output(consumer, second, "configuration.log", tmp_path)
        how = "in the node's storage" if storage == "local" else "copied from the node's storage"
        dataset_id = derived.name.removeprefix("datasets/")
        line = f"file 1 of dataset {dataset_id}: {derived.files[1].size_bytes} bytes {how}"
        assert line.encode() in configuration
        if storage == "local":
            job_folder = node.results / first.name.removeprefix("jobs/")
            assert not job_folder.exists()

        # Nor does deleting the job.
        await consumer.delete_job(first.name)
        third = await finished(
            consumer, await consumer.start_compute([derived.did], algorithm=summary.did)
        )
        assert third.state == State.STATE_SUCCEEDED, third.message
        assert json.loads(await output(consumer, third, "summary.json", tmp_path)) == expected

        # Audited: who made which dataset of which job.
        events = await owner.list_audit_events(action="dataset.publish_outputs")
        allowed = [e for e in events if e.outcome == pb.AUDIT_OUTCOME_ALLOWED]
        assert [(e.actor, e.resource) for e in allowed] == [(consumer_key.address, derived.name)]
        assert allowed[0].details["job"] == first.name


@pytest.mark.parametrize("storage", ["local", "s3"])
async def test_a_tampered_stored_copy_fails_the_job(
    storage: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    url = results_url(storage, monkeypatch, s3_server, s3_bucket, tmp_path)
    async with (
        derived_node(tmp_path, url) as node,
        node.mesh.client(node.mesh.owner) as owner,
        node.mesh.client(new_key()) as consumer,
    ):
        squares = await owner.publish_algorithm(SQUARES, "python3 $ALGO")
        source = await owner_dataset(node.mesh, owner, squares)
        first = await finished(
            consumer, await consumer.start_compute([source.did], algorithm=squares.did)
        )
        summary = await consumer.publish_algorithm(SUMMARY, "python3 $ALGO")
        derived = await consumer.publish_job_outputs(
            first.name,
            metadata=pb.AssetMetadata(title="squares"),
            result_indexes=[next(r.index for r in first.results if r.name == "squares.txt")],
            policy=pb.ComputePolicy(
                publisher_trusted_algorithms=[await consumer.trust(summary.did)]
            ),
        )
        key = f"datasets/{derived.name.removeprefix('datasets/')}/0000"
        forged = b"1\n4\n9\n17\n"  # as large as the real one
        if storage == "local":
            copy = node.results / key
            copy.unlink()  # a new file: the job's own result (the same inode) stays as it was
            copy.write_bytes(forged)
            copy.chmod(0o444)
        else:
            s3_server.put_object(s3_bucket, f"{PREFIX}/{key}", forged)
        job = await finished(
            consumer, await consumer.start_compute([derived.did], algorithm=summary.did)
        )
        assert job.state == State.STATE_FAILED
        assert job.failure_reason == job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
        dataset_id = derived.name.removeprefix("datasets/")
        assert f"file 0 of dataset {dataset_id}" in job.message
        assert "sha256" in job.message
        assert PREFIX not in job.message and str(node.results) not in job.message


# -- refusals ----------------------------------------------------------------------------------


async def test_what_may_not_become_a_dataset(tmp_path: Path) -> None:
    consumer_key, viewer_key = new_key(), new_key()
    async with (
        derived_node(tmp_path) as node,
        node.mesh.client(node.mesh.owner) as owner,
        node.mesh.client(consumer_key) as consumer,
        node.mesh.client(viewer_key) as viewer,
    ):
        squares = await owner.publish_algorithm(SQUARES, "python3 $ALGO")
        failing = await owner.publish_algorithm(b"raise SystemExit(3)\n", "python3 $ALGO")
        silent = await owner.publish_algorithm(b"print('nothing')\n", "python3 $ALGO")
        allows = await owner_dataset(node.mesh, owner, squares)
        forbids = await owner_dataset(node.mesh, owner, squares, derived=False)
        await owner.update_policy(
            allows.did,
            pb.ComputePolicy(
                publisher_trusted_algorithms=[
                    await owner.trust(a.did) for a in (squares, failing, silent)
                ],
                allow_derived_datasets=True,
            ),
        )
        started = [
            consumer.start_compute(
                [allows.did], algorithm=squares.did, viewers=[viewer_key.address]
            ),
            consumer.start_compute([allows.did, forbids.did], algorithm=squares.did),
            consumer.start_compute([allows.did], algorithm=failing.did),
            consumer.start_compute([allows.did], algorithm=silent.did),
        ]
        jobs = [await finished(consumer, await job) for job in started]
        viewed, mixed, failed, without = jobs
        title = pb.AssetMetadata(title="outputs")

        # A viewer reads the job, but to it the job is not there to publish.
        assert (await viewer.get_job(viewed.name)).name == viewed.name
        await expect(
            viewer.publish_job_outputs(viewed.name, metadata=title),
            grpc.StatusCode.NOT_FOUND,
            "JOB_NOT_FOUND",
        )
        log_index = next(r.index for r in viewed.results if r.kind == Kind.KIND_ALGORITHM_LOG)
        refused = await expect(
            consumer.publish_job_outputs(viewed.name, metadata=title, result_indexes=[log_index]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert error_info(refused).metadata["field"] == "result_indexes[0]"
        refused = await expect(
            consumer.publish_job_outputs(mixed.name, metadata=title),
            grpc.StatusCode.PERMISSION_DENIED,
            "DERIVED_DATASETS_NOT_ALLOWED",
        )
        assert forbids.name in (refused.details() or "")
        assert allows.name not in (refused.details() or "")
        assert failed.state == State.STATE_FAILED
        await expect(
            consumer.publish_job_outputs(failed.name, metadata=title),
            grpc.StatusCode.FAILED_PRECONDITION,
            "JOB_NOT_SUCCEEDED",
        )
        assert without.state == State.STATE_SUCCEEDED, without.message
        refused = await expect(
            consumer.publish_job_outputs(without.name, metadata=title),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert error_info(refused).metadata["field"] == "result_indexes"
        # A malformed policy, named; nothing was published meanwhile.
        refused = await expect(
            consumer.publish_job_outputs(
                viewed.name,
                metadata=title,
                policy=pb.ComputePolicy(publisher_trusted_algorithm_publishers=["nobody"]),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert (await consumer.get_job(viewed.name)).state == State.STATE_SUCCEEDED
        listed = [
            d
            async for page in owner.pages("ListDatasets", pb.ListDatasetsRequest(), "datasets")
            for d in page
        ]
        assert [d.name for d in listed] == [allows.name, forbids.name]
        # Every refusal is in the audit log, by its reason.
        events = await owner.list_audit_events(action="dataset.publish_outputs")
        assert [e.reason for e in events] == [
            "JOB_NOT_FOUND",
            "INVALID_ARGUMENT",
            "DERIVED_DATASETS_NOT_ALLOWED",
            "JOB_NOT_SUCCEEDED",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ]
        assert all(e.outcome == pb.AUDIT_OUTCOME_REFUSED for e in events)


# -- the REST edge -----------------------------------------------------------------------------


async def test_publish_outputs_through_the_rest_edge(rest: Rest) -> None:
    mesh = rest.mesh
    async with mesh.client(mesh.owner) as owner, mesh.client(new_key()) as consumer:
        squares = await owner.publish_algorithm(SQUARES, "python3 $ALGO")
        source = await owner_dataset(mesh, owner, squares)
        job = await finished(
            consumer, await consumer.start_compute([source.did], algorithm=squares.did)
        )
        assert job.state == State.STATE_SUCCEEDED, job.message
        body = {
            "requestId": uuid.uuid4().hex,
            "metadata": {"title": "squares", "tags": ["derived"]},
            "resultIndexes": [0],
            "policy": {"allowDerivedDatasets": True},
        }
        message = json_format.ParseDict(body, pb.PublishJobOutputsRequest())
        message.name = job.name
        response = await rest.http.post(
            f"/v1/{job.name}:publishOutputs",
            json=body,
            headers=signed(consumer, "PublishJobOutputs", message),
        )
        assert response.status_code == 200, response.text
        dataset = response.json()["dataset"]
        assert dataset["publisher"] == consumer.key.address
        assert dataset["derivedFrom"]["job"] == job.name
        assert dataset["policy"] == {"allowDerivedDatasets": True}
        (first,) = [r for r in job.results if r.index == 0]
        assert first.kind == Kind.KIND_OUTPUT
        # The file at position 0 (a default, left out of proto3 JSON).
        assert dataset["files"] == [{"sizeBytes": str(first.size_bytes), "sha256": first.sha256}]


# -- the command line --------------------------------------------------------------------------


async def c2d(mesh: LocalMesh, key_file: Path, *args: str) -> str:
    """`c2d ARGS --provider ... --key-file ...` as a process of its own (the mesh runs in this
    event loop, so it is awaited, never waited for); its standard output, once it succeeded."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        "--provider",
        mesh.provider_address,
        "--key-file",
        str(key_file),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_the_command_line_sets_the_flag_and_publishes_outputs(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    owner_file, consumer_file = tmp_path / "owner.json", tmp_path / "consumer.json"
    consumer_key = new_key()
    write_key(owner_file, local_mesh.owner)
    write_key(consumer_file, consumer_key)
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(consumer_key) as consumer,
    ):
        squares = await owner.publish_algorithm(SQUARES, "python3 $ALGO")
        data = local_mesh.data_file("numbers.txt", NUMBERS)
        published = json.loads(
            await c2d(
                local_mesh, owner_file, "dataset", "publish", str(data), "--trust", squares.did,
                "--allow-derived-datasets", "--json",
            )
        )  # fmt: skip
        assert published["policy"]["allowDerivedDatasets"] is True
        shown = await c2d(local_mesh, owner_file, "dataset", "policy", published["did"])
        assert "datasets of jobs' outputs allowed" in shown

        job = await finished(
            consumer, await consumer.start_compute([published["did"]], algorithm=squares.did)
        )
        squares_index = next(r.index for r in job.results if r.name == "squares.txt")
        policy_file = tmp_path / "policy.json"
        policy_file.write_text(json.dumps({"publisherTrustedAlgorithmPublishers": ["*"]}))
        job_id = job.name.removeprefix("jobs/")
        derived = json.loads(
            await c2d(
                local_mesh, consumer_file, "compute", "publish-outputs", job_id,
                "--outputs", str(squares_index), "--title", "squares", "--description", "mine",
                "--policy-file", str(policy_file), "--json",
            )
        )  # fmt: skip
        assert derived["publisher"] == consumer_key.address
        assert derived["metadata"] == {"title": "squares", "description": "mine"}
        assert derived["derivedFrom"]["outputs"] == ["squares.txt"]
        assert derived["policy"] == {"publisherTrustedAlgorithmPublishers": ["*"]}
        # Its publisher edits its policy from the command line too; the display says whence.
        text = await c2d(
            local_mesh, consumer_file, "dataset", "policy", derived["did"],
            "--allow-derived-datasets",
        )  # fmt: skip
        assert "policy version 2" in text
        assert "datasets of jobs' outputs allowed" in text
        assert f"made from the outputs of {job.name} (squares.txt)" in text
