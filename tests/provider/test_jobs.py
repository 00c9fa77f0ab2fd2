"""Starting jobs: every dataset is checked and laid out in order; viewers read a job but never
change it; resources above the environment's limits are refused up front; the facts kept for
the provenance say what ran under which policy version and limits; and a policy change racing
many starts leaves each started job under the one version that allowed it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from pathlib import Path

import grpc
import rfc8785
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import duration_pb2

from provider.policy import check_trusted
from provider.store import ProviderStore
from sdk.client import Client
from tests.conftest import LocalMesh, needs_root, new_key
from tests.e2e.test_hostile import log_of
from tests.e2e.test_job import error_info, run_to_end
from tests.provider.test_policy import job_facts, provider_db, publish_data, refused, trusting

pytestmark = needs_root

# Shows what the job sees of each dataset, in the order of DIDS.
LAYOUT = b"""
import json, os
dids = json.loads(os.environ["DIDS"])
print("DIDS", json.dumps(dids), flush=True)
for dataset_id in dids:
    folder = f"/data/inputs/{dataset_id}"
    contents = [open(f"{folder}/{name}").read() for name in sorted(os.listdir(folder))]
    ddo = json.load(open(f"/data/ddos/{dataset_id}"))
    print(json.dumps([dataset_id, contents, ddo["did"]]), flush=True)
with open("/data/outputs/done.txt", "w") as f:
    f.write("done")
"""
GIB = 1 << 30


async def test_every_dataset_is_checked_and_laid_out_in_order(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        algorithm = await consumer.publish_algorithm(LAYOUT, "python3 $ALGO")
        by_checksum = trusting(await owner.trust(algorithm.did))
        by_publisher = pb.ComputePolicy(
            publisher_trusted_algorithm_publishers=[algorithm.publisher]
        )
        everyone = pb.ComputePolicy(publisher_trusted_algorithm_publishers=["*"])
        files = [[b"a0", b"a1"], [b"b0"], [b"c0"]]
        datasets = []
        for contents, policy in zip(files, (by_checksum, by_publisher, everyone), strict=True):
            paths = [
                local_mesh.data_file(f"{len(datasets)}-{i}.txt", c) for i, c in enumerate(contents)
            ]
            datasets.append(await owner.publish_dataset(paths, policy=policy))
        first, second, third = datasets

        # Each dataset's policy is checked: a refusal names the one that refuses.
        untrusting = await publish_data(local_mesh, owner)
        error = await refused(
            consumer.start_compute([first.did, untrusting.did], algorithm=algorithm.did)
        )
        assert error_info(error).reason == "ALGORITHM_NOT_TRUSTED"
        assert untrusting.name in (error.details() or "")
        assert first.name not in (error.details() or "")

        order = [third, first, second]
        job = await consumer.start_compute([d.did for d in order], algorithm=algorithm.did)
        _, final = await run_to_end(consumer, job)
        assert final.state == final.STATE_SUCCEEDED, final.message
        ids = [d.name.removeprefix("datasets/") for d in order]
        lines = (await log_of(consumer, final)).splitlines()
        assert lines[0] == f"DIDS {json.dumps(ids)}"
        seen = [json.loads(line) for line in lines[1:]]
        expected = {d.name: [c.decode() for c in f] for d, f in zip(datasets, files, strict=True)}
        assert seen == [[i, expected[d.name], d.did] for i, d in zip(ids, order, strict=True)]

        facts = job_facts(local_mesh, job.name)
        assert facts == {
            "consumer": consumer.key.address,
            "viewers": [],
            "algorithm": {
                "name": algorithm.name,
                "did": algorithm.did,
                "version": 1,
                "access": "private",
                "files_checksum": algorithm.files_checksum,
                "container_section_checksum": algorithm.container_section_checksum,
                "code_sha256": hashlib.sha256(LAYOUT).hexdigest(),
                "entrypoint": "python3 $ALGO",
                "image": "",
            },
            "datasets": [
                {
                    "name": d.name,
                    "did": d.did,
                    "files": [f.sha256 for f in d.files],
                    "policy_version": 1,
                    "decision": decision,
                }
                for d, decision in zip(
                    order, ["all_publishers", "trusted_algorithm", "trusted_publisher"], strict=True
                )
            ],
            "parameters_sha256": hashlib.sha256(rfc8785.dumps({})).hexdigest(),
            "environment": {
                "name": "default",
                "cpu_millis": 1000,
                "memory_bytes": GIB,
                "disk_bytes": GIB,
                "max_processes": 256,
                "max_duration_seconds": 600,
                "network": False,
            },
            "orders": {},
            "result_selection": "outputs_and_logs",
            "delivery": "",
        }
        starts = await owner.list_audit_events(action="compute.start")
        assert [(e.outcome, e.resource) for e in starts] == [
            (pb.AUDIT_OUTCOME_REFUSED, first.name),
            (pb.AUDIT_OUTCOME_ALLOWED, job.name),
        ]
        assert starts[0].reason == "ALGORITHM_NOT_TRUSTED"
        assert starts[1].reason == "all_publishers,trusted_algorithm,trusted_publisher"
        assert [d["policy_version"] for d in starts[1].details["datasets"]] == [1, 1, 1]


async def test_viewers_read_a_job_but_never_change_it(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    viewer_key = new_key()
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
        local_mesh.client(viewer_key) as viewer,
        local_mesh.client(new_key()) as stranger,
    ):
        dataset = await publish_data(local_mesh, owner, pb.ComputePolicy(allow_raw_algorithm=True))
        code = "print('visible', flush=True)\nopen('/data/outputs/out.txt', 'w').write('out')\n"
        # The same viewer twice, in two spellings: kept once, in EIP-55 form.
        job = await consumer.start_compute(
            [dataset.did], raw_code=code, viewers=[viewer_key.address.lower(), viewer_key.address]
        )
        assert job_facts(local_mesh, job.name)["viewers"] == [viewer_key.address]
        _, final = await run_to_end(viewer, job)
        assert final.state == final.STATE_SUCCEEDED, final.message
        assert list(final.viewers) == [viewer_key.address]
        assert (await viewer.get_job(job.name)).name == job.name
        assert job.name in [j.name for j in await viewer.list_jobs()]
        assert "visible" in await log_of(viewer, final)
        output = next(r for r in final.results if r.name == "out.txt")
        saved = await viewer.download_result(job.name, output, tmp_path / "out.txt")
        assert saved.read_text() == "out"

        for change in (viewer.stop_job(job.name), viewer.delete_job(job.name)):
            assert (await refused(change)).code() == grpc.StatusCode.NOT_FOUND
        assert (await refused(stranger.get_job(job.name))).code() == grpc.StatusCode.NOT_FOUND
        assert job.name not in [j.name for j in await stranger.list_jobs()]
        await consumer.delete_job(job.name)
        assert (await refused(viewer.get_job(job.name))).code() == grpc.StatusCode.NOT_FOUND

        # Each decision is audited; a download once, at its start.
        decisions = [
            (e.action, e.actor, e.outcome, e.reason)
            for e in await owner.list_audit_events(resource=job.name)
            + await owner.list_audit_events(action="result.download")
        ]
        allowed, refused_ = pb.AUDIT_OUTCOME_ALLOWED, pb.AUDIT_OUTCOME_REFUSED
        assert decisions == [
            ("compute.start", consumer.key.address, allowed, "raw_allowed"),
            ("job.stop", viewer_key.address, refused_, "NOT_FOUND"),
            ("job.delete", viewer_key.address, refused_, "NOT_FOUND"),
            ("job.delete", consumer.key.address, allowed, ""),
            ("result.download", viewer_key.address, allowed, ""),
        ]


async def test_viewers_must_be_other_addresses(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        dataset = await publish_data(local_mesh, owner, pb.ComputePolicy(allow_raw_algorithm=True))
        for viewers, field in (
            (["0x1234"], "viewers[0]"),
            ([new_key().address, consumer.key.address], "viewers[1]"),
            ([new_key().address for _ in range(21)], "viewers"),
        ):
            error = await refused(
                consumer.start_compute([dataset.did], raw_code="print(1)\n", viewers=viewers)
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(error).metadata["field"] == field


async def test_resources_above_the_environment_are_refused_up_front(
    local_mesh: LocalMesh,
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        dataset = await publish_data(local_mesh, owner, pb.ComputePolicy(allow_raw_algorithm=True))
        R = job_pb2.Resources
        for resources, field in (
            (R(cpus=2), "resources.cpus"),
            (R(memory_bytes=2 * GIB), "resources.memory_bytes"),
            (R(disk_bytes=-1), "resources.disk_bytes"),
            (R(max_duration=duration_pb2.Duration(seconds=601)), "resources.max_duration"),
        ):
            error = await refused(
                consumer.start_compute([dataset.did], raw_code="print(1)\n", resources=resources)
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(error).metadata["field"] == field
            assert field in (error.details() or "")
        # Each refusal is a decision the audit log keeps, with its reason.
        events = await owner.list_audit_events(action="compute.start")
        assert [e.outcome for e in events] == [pb.AUDIT_OUTCOME_REFUSED] * 4

        # Within the limits (the small environment's memory cap is 128 MiB): accepted, and
        # recorded as the limits the job runs under.
        lower = R(cpus=0.5, memory_bytes=96 << 20, max_duration=duration_pb2.Duration(seconds=3))
        job = await consumer.start_compute(
            [dataset.did], raw_code="print(1)\n", environment="small", resources=lower
        )
        assert job_facts(local_mesh, job.name)["environment"] == {
            "name": "small",
            "cpu_millis": 500,
            "memory_bytes": 96 << 20,
            "disk_bytes": 64 << 20,
            "max_processes": 32,
            "max_duration_seconds": 3,
            "network": False,
        }
        _, final = await run_to_end(consumer, job)
        assert final.state == final.STATE_SUCCEEDED, final.message


QUICK = b"print('ok')\n"


async def test_a_policy_change_racing_starts_leaves_each_job_under_the_version_that_allowed_it(
    local_mesh: LocalMesh,
) -> None:
    async with contextlib.AsyncExitStack() as clients:
        owner = await clients.enter_async_context(local_mesh.client(local_mesh.owner))
        # Several clients: one client's signed calls go one at a time.
        consumers = [
            await clients.enter_async_context(local_mesh.client(new_key())) for _ in range(6)
        ]
        algorithm = await owner.publish_algorithm(QUICK, "python3 $ALGO")
        dataset = await publish_data(local_mesh, owner, trusting(await owner.trust(algorithm.did)))
        # The change comes once some starts have gone through, while others are in flight.
        enough_started = asyncio.Event()
        started: list[str] = []

        async def start_until_refused(client: Client) -> bool:
            for _ in range(10):
                try:
                    job = await client.start_compute([dataset.did], algorithm=algorithm.did)
                except grpc.aio.AioRpcError as error:
                    assert error_info(error).reason == "ALGORITHM_NOT_TRUSTED"
                    return True
                started.append(job.name)
                if len(started) >= 8:
                    enough_started.set()
            return False

        async def withdraw_trust() -> pb.Dataset:
            await enough_started.wait()
            return await owner.update_policy(dataset.did, pb.ComputePolicy())

        *refusals, withdrawn = await asyncio.gather(
            *(start_until_refused(c) for c in consumers), withdraw_trust()
        )
        assert isinstance(withdrawn, pb.Dataset) and withdrawn.policy_version == 2
        assert len(started) >= 8
        assert any(refusals), "no start saw the new policy"

        store = await ProviderStore.open(provider_db(local_mesh))
        try:
            dataset_id = dataset.name.removeprefix("datasets/")
            for name in started:
                version = job_facts(local_mesh, name)["datasets"][0]["policy_version"]
                policy = await store.dataset_policy(dataset_id, version)
                assert policy is not None, (name, version)
                # The version recorded trusts the algorithm (check_trusted raises otherwise).
                check_trusted(pb.Dataset(name=dataset.name, policy=policy), algorithm)
        finally:
            await store.close()
        # After the change, no start gets through.
        late = await refused(consumers[0].start_compute([dataset.did], algorithm=algorithm.did))
        assert error_info(late).reason == "ALGORITHM_NOT_TRUSTED"

        # Jobs that have not run yet are stopped, so the test ends quickly.
        for client in consumers:
            for job in await client.list_jobs():
                await client.stop_job(job.name)


async def test_an_unknown_environment_is_not_found(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as owner:
        dataset = await publish_data(local_mesh, owner, pb.ComputePolicy(allow_raw_algorithm=True))
        error = await refused(
            owner.start_compute([dataset.did], raw_code="print(1)\n", environment="nowhere")
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(error).reason == "ENVIRONMENT_NOT_FOUND"


@needs_root
async def test_a_number_json_cannot_carry_is_an_invalid_argument(local_mesh: LocalMesh) -> None:
    """A NaN cannot be digested (RFC 8785 has no form for it): the request is refused as
    malformed before its signature is checked, never an internal error."""
    consumer = new_key()
    async with local_mesh.client(consumer) as client:
        request = pb.StartComputeRequest(
            dataset="datasets/" + "a" * 64,
            algorithm="algorithms/" + "b" * 64,
            resources=job_pb2.Resources(cpus=float("nan")),
        )
        metadata = [
            ("x-c2d-address", consumer.address),
            ("x-c2d-nonce", "1"),
            ("x-c2d-signature", "0x" + "11" * 65),
        ]
        error = await refused(client.stub.StartCompute(request, metadata=metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_info(error).reason == "NOT_CANONICAL_JSON"
