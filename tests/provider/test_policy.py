"""Dataset policies: only the node's owners change them; each change is a new version, kept
whole, that the next job runs under without a restart; a malformed policy is refused naming
its field; the network is granted only where every dataset allows it; samples are linked to
their dataset both ways; and a database from before versions opens with its policies at 1."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from c2d.provider.v1 import provider_pb2 as pb
from eth_account import Account

from provider.config import ProviderConfig
from provider.server import build as build_provider
from provider.store import ProviderStore
from sdk.client import Client
from tests.conftest import LocalMesh, needs_root, new_key
from tests.e2e.test_job import SUM_ALGORITHM, error_info, run_to_end


def provider_db(mesh: LocalMesh) -> Path:
    return mesh.home / "provider" / "provider.db"


def job_facts(mesh: LocalMesh, job: str) -> dict[str, Any]:
    """What the Provider recorded for a job's provenance when it started it (read from its
    database: the signed record exists only once the job is final)."""
    db = sqlite3.connect(provider_db(mesh))
    try:
        row = db.execute("SELECT facts FROM job_facts WHERE job = ?", (job,)).fetchone()
    finally:
        db.close()
    assert row is not None, f"no facts recorded for {job}"
    facts: dict[str, Any] = json.loads(row[0])
    return facts


async def publish_data(
    mesh: LocalMesh, owner: Client, policy: pb.ComputePolicy | None = None, sample_of: str = ""
) -> pb.Dataset:
    data = mesh.data_file(f"data-{uuid.uuid4().hex}.txt", b"1\n2\n3\n")
    return await owner.publish_dataset([data], policy=policy, sample_of=sample_of)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def trusting(entry: pb.TrustedAlgorithm) -> pb.ComputePolicy:
    return pb.ComputePolicy(publisher_trusted_algorithms=[entry])


@needs_root
async def test_only_owners_change_a_policy(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        dataset = await publish_data(local_mesh, owner)
        error = await refused(
            consumer.update_policy(dataset.did, pb.ComputePolicy(allow_raw_algorithm=True))
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(error).reason == "NOT_A_DATA_OWNER"
        unchanged = await consumer.get_dataset(dataset.did)
        assert unchanged.policy_version == 1
        assert not unchanged.policy.allow_raw_algorithm

        unknown = await refused(owner.update_policy("datasets/" + "0" * 64, pb.ComputePolicy()))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND


@needs_root
async def test_each_change_is_a_version_the_next_job_runs_under(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        algorithm = await consumer.publish_algorithm(SUM_ALGORITHM, "python3 $ALGO")
        dataset = await publish_data(local_mesh, owner)
        assert dataset.policy_version == 1
        first = await refused(consumer.start_compute([dataset.did], algorithm=algorithm.did))
        assert error_info(first).reason == "ALGORITHM_NOT_TRUSTED"

        policy = trusting(await owner.trust(algorithm.did))
        updated = await owner.update_policy(dataset.did, policy, expected_version=1)
        assert updated.policy_version == 2
        assert updated.policy == policy
        # Nothing restarted: the next start runs under version 2.
        job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
        assert job_facts(local_mesh, job.name)["datasets"][0]["policy_version"] == 2
        assert (await consumer.get_dataset(dataset.did)).policy_version == 2

        # A stale expected version changes nothing.
        stale = await refused(
            owner.update_policy(dataset.did, pb.ComputePolicy(), expected_version=1)
        )
        assert stale.code() == grpc.StatusCode.ABORTED
        assert error_info(stale).reason == "POLICY_VERSION_MISMATCH"
        assert (await owner.get_dataset(dataset.did)).policy_version == 2

        # Trust withdrawn: the next start is refused, the running job goes on.
        withdrawn = await owner.update_policy(dataset.did, pb.ComputePolicy())
        assert withdrawn.policy_version == 3
        again = await refused(consumer.start_compute([dataset.did], algorithm=algorithm.did))
        assert error_info(again).reason == "ALGORITHM_NOT_TRUSTED"
        _, final = await run_to_end(consumer, job)
        assert final.state == final.STATE_SUCCEEDED, final.message

        # Every version is kept whole.
        store = await ProviderStore.open(provider_db(local_mesh))
        try:
            dataset_id = dataset.name.removeprefix("datasets/")
            versions = [await store.dataset_policy(dataset_id, v) for v in (1, 2, 3, 4)]
        finally:
            await store.close()
        assert versions == [pb.ComputePolicy(), policy, pb.ComputePolicy(), None]

        changes = await owner.list_audit_events(action="dataset.policy.update")
        assert [(e.outcome, e.reason) for e in changes] == [
            (pb.AUDIT_OUTCOME_ALLOWED, ""),
            (pb.AUDIT_OUTCOME_REFUSED, "POLICY_VERSION_MISMATCH"),
            (pb.AUDIT_OUTCOME_ALLOWED, ""),
        ]
        assert dict(changes[2].details) == {"old_policy_version": 2, "new_policy_version": 3}


BAD_POLICIES = [
    (
        pb.ComputePolicy(parameter_bounds=[pb.ParameterBound(name="1st", minimum=1)]),
        "policy.parameter_bounds[0].name",
    ),
    (
        pb.ComputePolicy(
            parameter_bounds=[
                pb.ParameterBound(name="k", minimum=1),
                pb.ParameterBound(name="k", algorithm_did="did:c2d:xyz", minimum=1),
            ]
        ),
        "policy.parameter_bounds[1].algorithm_did",
    ),
    (
        pb.ComputePolicy(parameter_bounds=[pb.ParameterBound(name="k", minimum=5, maximum=1)]),
        "policy.parameter_bounds[0].minimum",
    ),
    (
        pb.ComputePolicy(publisher_trusted_algorithms=[pb.TrustedAlgorithm(did="did:c2d:1")]),
        "policy.publisher_trusted_algorithms[0].did",
    ),
    (
        pb.ComputePolicy(publisher_trusted_algorithm_publishers=["0x123"]),
        "policy.publisher_trusted_algorithm_publishers[0]",
    ),
]


@needs_root
@pytest.mark.parametrize(("policy", "field"), BAD_POLICIES, ids=lambda v: str(v)[:30])
async def test_a_malformed_policy_is_refused_naming_its_field(
    local_mesh: LocalMesh, policy: pb.ComputePolicy, field: str
) -> None:
    async with local_mesh.client(local_mesh.owner) as owner:
        published = await refused(publish_data(local_mesh, owner, policy))
        dataset = await publish_data(local_mesh, owner)
        updated = await refused(owner.update_policy(dataset.did, policy))
        for error in (published, updated):
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(error).metadata["field"] == field
        assert (await owner.get_dataset(dataset.did)).policy_version == 1


@needs_root
async def test_the_network_only_where_every_dataset_and_the_environment_allow_it(
    local_mesh: LocalMesh,
) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        online = await publish_data(
            local_mesh, owner, pb.ComputePolicy(allow_raw_algorithm=True, allow_network_access=True)
        )
        offline = await publish_data(local_mesh, owner, pb.ComputePolicy(allow_raw_algorithm=True))
        code = "print('hello')\n"

        # One dataset without the network: named when the network is required.
        mixed = await refused(
            consumer.start_compute([online.did, offline.did], raw_code=code, require_network=True)
        )
        assert mixed.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(mixed).reason == "NETWORK_NOT_ALLOWED"
        assert offline.name in (mixed.details() or "")
        # Every dataset allows it, but the test environments do not: the environment is named.
        environment = await refused(
            consumer.start_compute([online.did], raw_code=code, require_network=True)
        )
        assert error_info(environment).reason == "NETWORK_NOT_ALLOWED"
        assert "'default'" in (environment.details() or "")

        # Not required: the job runs, without the network.
        job = await consumer.start_compute([online.did, offline.did], raw_code=code)
        assert job_facts(local_mesh, job.name)["environment"]["network"] is False
        _, final = await run_to_end(consumer, job)
        assert final.state == final.STATE_SUCCEEDED, final.message


@needs_root
async def test_a_sample_is_linked_to_its_dataset_both_ways(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as owner:
        real = await publish_data(local_mesh, owner)
        sample = await publish_data(local_mesh, owner, sample_of=real.did)
        assert sample.sample_of == real.name
        assert (await owner.get_dataset(real.did)).sample == sample.name
        got_sample = await owner.get_dataset(sample.did)
        assert (got_sample.sample_of, got_sample.sample) == (real.name, "")
        listed = await owner.stub.ListDatasets(pb.ListDatasetsRequest())
        by_name = {d.name: d for d in listed.datasets}
        assert by_name[real.name].sample == sample.name
        assert by_name[sample.name].sample_of == real.name

        for target, reason in (
            (real.did, "SAMPLE_EXISTS"),
            (sample.did, "SAMPLE_OF_SAMPLE"),
            ("datasets/" + "0" * 64, "SAMPLE_TARGET_NOT_FOUND"),
        ):
            error = await refused(publish_data(local_mesh, owner, sample_of=target))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, target
            assert error_info(error).reason == reason
        malformed = await refused(publish_data(local_mesh, owner, sample_of="datasets/nope"))
        assert error_info(malformed).metadata["field"] == "sample_of"
        # A policy change keeps the link.
        await owner.update_policy(real.did, pb.ComputePolicy(allow_raw_algorithm=True))
        assert (await owner.get_dataset(real.did)).sample == sample.name


# The Provider's tables as they were before policy versions and samples.
_OLD_SCHEMA = """
CREATE TABLE datasets (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, record BLOB NOT NULL, file_paths TEXT NOT NULL
);
CREATE TABLE algorithms (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, record BLOB NOT NULL, code BLOB NOT NULL
);
CREATE INDEX datasets_by_seq ON datasets (seq);
CREATE INDEX algorithms_by_seq ON algorithms (seq);
"""


async def test_a_database_from_before_versions_opens_with_its_policies_at_1(
    tmp_path: Path,
) -> None:
    database = tmp_path / "provider" / "provider.db"
    database.parent.mkdir(mode=0o700)
    policy = pb.ComputePolicy(allow_raw_algorithm=True)
    dataset = pb.Dataset(name="datasets/" + "a" * 64, did="did:c2d:" + "a" * 64, policy=policy)
    algorithm = pb.Algorithm(name="algorithms/" + "b" * 64, did="did:c2d:" + "b" * 64)
    algorithm.create_time.FromSeconds(1_700_000_000)
    old = sqlite3.connect(database)
    old.executescript(_OLD_SCHEMA)
    old.execute(
        "INSERT INTO datasets VALUES (?, 1, ?, ?)",
        ("a" * 64, dataset.SerializeToString(), json.dumps(["/data/x"])),
    )
    old.execute(
        "INSERT INTO algorithms VALUES (?, 1, ?, ?)",
        ("b" * 64, algorithm.SerializeToString(), b"print(1)\n"),
    )
    old.commit()
    old.close()

    owner = Account.create().address
    provider = await build_provider(
        ProviderConfig(
            listen="127.0.0.1:0",
            operator_address=f"unix:{tmp_path / 'no-operator.sock'}",
            database=database,
            data_root=tmp_path,
            owners=frozenset({owner}),
        )
    )
    await provider.server.start()
    try:
        async with Client(provider.server.address, new_key()) as client:
            upgraded = await client.get_dataset(dataset.did)
            assert (upgraded.policy_version, upgraded.policy) == (1, policy)
            kept = await client.get_algorithm(algorithm.did)
            # No API could read an algorithm's code before: it stays unreadable (private).
            assert kept.access == pb.ALGORITHM_ACCESS_PRIVATE
            assert (kept.version, kept.update_time) == (1, algorithm.create_time)
        assert await provider.store.dataset_policy("a" * 64, 1) == policy
    finally:
        await provider.server.stop(0.5)
        await provider.close()
    # Opening it again changes nothing more.
    store = await ProviderStore.open(database)
    try:
        found = await store.dataset("a" * 64)
        assert found is not None and found[0].policy_version == 1
    finally:
        await store.close()
