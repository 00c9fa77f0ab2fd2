"""Provenance records: signed by the provider's own key, checked offline against the address
pinned beforehand, broken by any changed byte, naming the policy version and the results'
digests, kept after the job is deleted, and readable only by the job's owner and viewers."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import rfc8785
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb

from mesh.provenance import ProvenanceError, verify_document
from provider.config import ProviderConfig
from provider.signing import load_provider_key
from sdk.client import Client
from sdk.keys import Key
from tests.conftest import LocalMesh, needs_root, new_key, write_key
from tests.e2e.test_job import SUM_ALGORITHM, error_info, publish_pair, run_to_end

pytestmark = needs_root


@dataclass
class Parties:
    """The node's owner, a consumer, the viewer the consumer names, and a stranger, each a
    client of the same node; and the provider's address, pinned first."""

    mesh: LocalMesh
    owner: Client
    consumer: Client
    viewer: Client
    stranger: Client
    provider_address: str

    async def finished_job(
        self, viewers: Sequence[str] = ()
    ) -> tuple[job_pb2.Job, pb.Dataset, pb.Algorithm]:
        algorithm, dataset = await publish_pair(self.mesh, self.owner, numbers="4\n5\n")
        job = await self.consumer.start_compute(
            [dataset.did], algorithm=algorithm.did, viewers=viewers
        )
        _, final = await run_to_end(self.consumer, job)
        assert final.state == job_pb2.Job.STATE_SUCCEEDED, final.message
        return final, dataset, algorithm


@pytest.fixture
async def parties(local_mesh: LocalMesh) -> AsyncIterator[Parties]:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
        local_mesh.client(new_key()) as viewer,
        local_mesh.client(new_key()) as stranger,
    ):
        address = (await stranger.get_provider_info()).address
        yield Parties(local_mesh, owner, consumer, viewer, stranger, address)


async def test_a_finished_jobs_record_verifies_against_the_pinned_address(
    parties: Parties, tmp_path: Path
) -> None:
    consumer, mesh = parties.consumer, parties.mesh
    info = await consumer.get_provider_info()
    job, dataset, algorithm = await parties.finished_job()
    document = await consumer.get_provenance(job.name)
    record = verify_document(document, parties.provider_address)
    # Built once: the same bytes every time.
    assert await consumer.get_provenance(job.name) == document
    downloaded = {
        r.index: (await consumer.download_result(job.name, r, tmp_path / f"r{r.index}"))
        for r in job.results
    }
    assert info.address != mesh.owner.address
    assert list(info.owners) == [mesh.owner.address]
    assert info.version

    assert record["version"] == 1
    assert record["job"] == job.name
    assert record["provider"] == info.address
    assert record["consumer"] == consumer.key.address
    assert record["state"] == "STATE_SUCCEEDED"
    assert record["exit_code"] == 0
    assert record["end_time"].endswith("Z")
    [used] = record["datasets"]
    assert used["name"] == dataset.name
    assert used["policy_version"] == dataset.policy_version == 1
    assert used["decision"] == "trusted_algorithm"
    assert used["files"] == [hashlib.sha256(b"4\n5\n").hexdigest()]
    assert record["algorithm"]["did"] == algorithm.did
    assert record["algorithm"]["files_checksum"] == algorithm.files_checksum
    assert record["algorithm"]["code_sha256"] == hashlib.sha256(SUM_ALGORITHM).hexdigest()
    assert record["parameters_sha256"] == hashlib.sha256(rfc8785.dumps({})).hexdigest()
    assert record["environment"]["name"] == "default"
    # The results it names are the bytes the consumer downloaded.
    assert len(record["results"]) == len(job.results) >= 2
    for result in record["results"]:
        content = downloaded[result["index"]].read_bytes()
        assert result["sha256"] == hashlib.sha256(content).hexdigest()
        assert result["size_bytes"] == len(content)
    assert {r["kind"] for r in record["results"]} >= {"KIND_OUTPUT", "KIND_ALGORITHM_LOG"}
    # Where the data lives is never in it.
    assert str(mesh.data_root).encode() not in document

    with pytest.raises(ProvenanceError, match="not signed by the expected provider"):
        verify_document(document, new_key().address)
    # The address inside the record is informative only: another pinned address fails.
    with pytest.raises(ProvenanceError):
        verify_document(document, mesh.owner.address)


async def test_every_changed_byte_of_a_document_fails(parties: Parties) -> None:
    job, _, _ = await parties.finished_job()
    document = await parties.consumer.get_provenance(job.name)
    address = parties.provider_address
    verify_document(document, address)
    # Every position, with a change that keeps the byte printable ASCII (so the failure
    # comes from canonical form or the signature, not from a decoding error) ...
    for position in range(len(document)):
        changed = bytearray(document)
        changed[position] ^= 0x01
        with pytest.raises(ProvenanceError):
            verify_document(bytes(changed), address)
    # ... and whole JSON-level edits: reformatted, reordered, a value changed.
    parsed = json.loads(document)
    for edited in (
        json.dumps(parsed).encode(),
        document + b"\n",
        rfc8785.dumps({**parsed, "provenance": {**parsed["provenance"], "exit_code": 1}}),
    ):
        with pytest.raises(ProvenanceError):
            verify_document(edited, address)


async def test_the_record_is_kept_after_the_job_is_deleted(parties: Parties) -> None:
    consumer = parties.consumer
    job, _, _ = await parties.finished_job([parties.viewer.key.address])
    # Never asked for before the delete: DeleteJob seals it first.
    await consumer.delete_job(job.name)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await consumer.get_job(job.name)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    document = await consumer.get_provenance(job.name)
    assert await parties.viewer.get_provenance(job.name) == document
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await parties.stranger.get_provenance(job.name)
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    record = verify_document(document, parties.provider_address)
    assert record["job"] == job.name
    assert record["viewers"] == [parties.viewer.key.address]


async def test_viewers_read_the_record_and_strangers_find_no_job(parties: Parties) -> None:
    job, _, _ = await parties.finished_job([parties.viewer.key.address])
    # The viewer asks first: the record is built then, and is the owner's too.
    document = await parties.viewer.get_provenance(job.name)
    assert await parties.consumer.get_provenance(job.name) == document
    for name in (job.name, "jobs/" + "0" * 32):
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await parties.stranger.get_provenance(name)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_job_has_no_record_until_it_is_final(parties: Parties) -> None:
    code = b"import time\nprint('working', flush=True)\ntime.sleep(60)\n"
    owner = parties.owner
    algorithm, dataset = await publish_pair(parties.mesh, owner, code)
    job = await owner.start_compute([dataset.did], algorithm=algorithm.did)
    async for chunk in owner.stream_logs(job.name):
        if "working" in chunk.text:
            break
    with pytest.raises(grpc.aio.AioRpcError) as early:
        await owner.get_provenance(job.name)
    assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(early.value).reason == "JOB_NOT_FINAL"
    await owner.stop_job(job.name)
    record = verify_document(await owner.get_provenance(job.name), parties.provider_address)
    assert record["state"] == "STATE_CANCELLED"
    assert record["consumer"] == owner.key.address


def provider_config(mesh: LocalMesh, key_file: Path | None = None) -> ProviderConfig:
    return ProviderConfig(
        listen="127.0.0.1:0",
        operator_address=mesh.operator_address,
        database=mesh.home / "provider" / "provider.db",
        data_root=mesh.data_root,
        owners=frozenset({mesh.owner.address}),
        provider_key_file=key_file,
    )


async def test_the_providers_key_is_its_own_kept_private_and_reused(
    local_mesh: LocalMesh, tmp_path: Path
) -> None:
    async with local_mesh.client(new_key()) as client:
        address = (await client.get_provider_info()).address
    key_file = local_mesh.home / "provider" / "signing-key.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    # A restart reads the same key.
    assert load_provider_key(provider_config(local_mesh)).address == address

    configured = new_key()
    write_key(tmp_path / "provider-key.json", configured)
    assert load_provider_key(provider_config(local_mesh, tmp_path / "provider-key.json")) == (
        Key(address=configured.address, private_key=configured.private_key)
    )
    # A configured key must exist (a typo must not make a new identity), and must not be an
    # owner's.
    with pytest.raises(ValueError, match="names no file"):
        load_provider_key(provider_config(local_mesh, tmp_path / "missing.json"))
    write_key(tmp_path / "owner-key.json", local_mesh.owner)
    with pytest.raises(ValueError, match="data owner's key"):
        load_provider_key(provider_config(local_mesh, tmp_path / "owner-key.json"))
