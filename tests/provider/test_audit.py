"""The audit log: an entry for each decision, refusals with their reason, a hash chain that
any changed or removed entry breaks, appends that never fork the chain, and a listing only the
node's owners may read, over gRPC and REST."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import grpc
import pytest
import rfc8785
import structlog
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format

from provider.audit import AuditChainError, AuditLog, verify_chain
from sdk.client import Client
from tests.conftest import LocalMesh, needs_root, new_key, rest_edge
from tests.e2e.test_job import SUM_ALGORITHM, error_info, run_to_end

pytestmark = needs_root


def provider_db(mesh: LocalMesh) -> sqlite3.Connection:
    return sqlite3.connect(mesh.home / "provider" / "provider.db", isolation_level=None)


async def decisions(mesh: LocalMesh, owner: Client, consumer: Client) -> pb.Dataset:
    """A refused start, an approval request, its approval and an allowed start."""
    algorithm = await consumer.publish_algorithm(SUM_ALGORITHM, "python3 $ALGO")
    dataset = await owner.publish_dataset([mesh.data_file("numbers.txt", b"1\n2\n")])
    with pytest.raises(grpc.aio.AioRpcError):
        await consumer.start_compute([dataset.did], algorithm=algorithm.did)
    request = await consumer.create_approval_request(dataset.did, algorithm.did, message="hi")
    await owner.approve(request.name, request.files_checksum, request.container_section_checksum)
    job = await consumer.start_compute([dataset.did], algorithm=algorithm.did)
    await run_to_end(consumer, job)
    return dataset


async def test_each_decision_has_an_entry_and_the_chain_verifies(local_mesh: LocalMesh) -> None:
    consumer_key = new_key()
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(consumer_key) as consumer,
    ):
        dataset = await decisions(local_mesh, owner, consumer)
        # Small pages: the listing follows its page tokens, oldest first.
        events = await owner.list_audit_events(page_size=2)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert verify_chain(events) == len(events)

    starts = [e for e in events if e.action == "compute.start"]
    assert [(e.outcome, e.actor) for e in starts] == [
        (pb.AUDIT_OUTCOME_REFUSED, consumer_key.address),
        (pb.AUDIT_OUTCOME_ALLOWED, consumer_key.address),
    ]
    assert starts[0].reason == "ALGORITHM_NOT_TRUSTED"
    approvals = [(e.action, e.outcome) for e in events if e.action.startswith("approval.")]
    assert approvals == [
        ("approval.create", pb.AUDIT_OUTCOME_ALLOWED),
        ("approval.approve", pb.AUDIT_OUTCOME_ALLOWED),
    ]
    approve = next(e for e in events if e.action == "approval.approve")
    assert approve.actor == local_mesh.owner.address
    assert approve.details["dataset"] == dataset.name
    # Never where the data lives.
    assert str(local_mesh.data_root) not in str(events)


async def test_filters_keep_the_order(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        await decisions(local_mesh, owner, consumer)
        creates = await owner.list_audit_events(action="approval.create")
        assert [e.action for e in creates] == ["approval.create"]
        by_resource = await owner.list_audit_events(resource=creates[0].resource)
        assert {e.resource for e in by_resource} == {creates[0].resource}
        assert [e.sequence for e in by_resource] == sorted(e.sequence for e in by_resource)


async def test_a_changed_or_removed_entry_breaks_the_chain(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
    ):
        await decisions(local_mesh, owner, consumer)
        db = provider_db(local_mesh)
        (reason,) = db.execute("SELECT reason FROM audit_events WHERE sequence = 2").fetchone()
        db.execute("UPDATE audit_events SET reason = 'TAMPERED' WHERE sequence = 2")
        with pytest.raises(AuditChainError, match="entry 2 does not match"):
            verify_chain(await owner.list_audit_events())

        db.execute("UPDATE audit_events SET reason = ? WHERE sequence = 2", (reason,))
        verify_chain(await owner.list_audit_events())  # as it was: whole again

        db.execute("DELETE FROM audit_events WHERE sequence = 2")
        with pytest.raises(AuditChainError, match="missing"):
            verify_chain(await owner.list_audit_events())
        # Renumbering the rest to hide the gap breaks the hashes instead.
        db.execute("UPDATE audit_events SET sequence = sequence - 1 WHERE sequence > 2")
        with pytest.raises(AuditChainError, match="does not match"):
            verify_chain(await owner.list_audit_events())
        db.close()


def test_appends_from_two_connections_at_once_never_fork_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    first = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    first.execute("PRAGMA journal_mode=WAL")
    second = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
    logs = [AuditLog(first), AuditLog(second)]
    start = threading.Barrier(len(logs))

    def append(log: AuditLog, actor: str) -> None:
        start.wait()
        for i in range(200):
            asyncio.run(log.record(actor, "test.append", f"things/{i}", allowed=True))

    threads = [
        threading.Thread(target=append, args=(log, f"writer-{n}")) for n, log in enumerate(logs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = asyncio.run(logs[0].events(action="", resource="", after=0, limit=1000))
    assert verify_chain(events) == 400
    assert {e.actor for e in events} == {"writer-0", "writer-1"}


def test_details_never_keep_a_location_or_code(tmp_path: Path) -> None:
    log = AuditLog(sqlite3.connect(tmp_path / "audit.db", isolation_level=None))
    details = {
        "algorithm": "did:c2d:" + "a" * 64,
        "code": "print(secret)",
        "datasets": [{"name": "datasets/x", "file_paths": ["/srv/data/x.csv"]}],
        "source": {"url": "https://example.invalid/x.csv", "size": 3},
        "files": [{"s3_url": "s3://lake/x.csv", "credentials": "lake", "size_bytes": 4}],
    }
    with structlog.testing.capture_logs() as logs:
        asyncio.run(log.record("0xA", "test.details", "datasets/x", allowed=True, details=details))
    # The slip is logged by where it was, never by what it held.
    assert sorted(line["key"] for line in logs) == [
        "details.code",
        "details.datasets[0].file_paths",
        "details.files[0].credentials",
        "details.files[0].s3_url",
        "details.source.url",
    ]
    assert "/srv/data" not in str(logs) and "secret" not in str(logs)
    assert "lake" not in str(logs)
    [event] = asyncio.run(log.events(action="", resource="", after=0, limit=10))
    assert json_format.MessageToDict(event.details) == {
        "algorithm": "did:c2d:" + "a" * 64,
        "datasets": [{"name": "datasets/x"}],
        "source": {"size": 3.0},
        "files": [{"size_bytes": 4.0}],
    }
    assert verify_chain([event]) == 1


async def test_only_owners_read_the_audit_log(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(new_key()) as stranger:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stranger.list_audit_events()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(refused.value).reason == "NOT_A_DATA_OWNER"


async def test_the_audit_log_over_rest_verifies_from_its_json(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as consumer,
        rest_edge(local_mesh) as rest,
    ):
        http = rest.http
        await decisions(local_mesh, owner, consumer)
        listed = await http.get(
            "/v1/auditEvents",
            params={"pageSize": 100},
            headers=dict(await owner.token_metadata()),
        )
        refused = await http.get("/v1/auditEvents", headers=dict(await consumer.token_metadata()))
    assert listed.status_code == 200, listed.text
    events = listed.json()["events"]
    assert events[0]["sequence"] == "1"
    # A REST client checks the chain from the JSON alone, as the hash's definition says.
    previous = ""
    for event in events:
        unhashed = {k: v for k, v in event.items() if k != "hash"}
        expected = hashlib.sha256(previous.encode() + rfc8785.dumps(unhashed)).hexdigest()
        assert event["hash"] == expected, json.dumps(event)
        previous = event["hash"]
    assert refused.status_code == 403
    assert refused.json()["error"]["status"] == "PERMISSION_DENIED"
