"""Viewers, through the Operator Service's gRPC API in front of a real engine: a job's owner and
its viewers read it (status, watch, logs, results, listing), only its owner stops or deletes it,
and to anyone else it does not exist. Addresses compare case-insensitively; the registry keeps
them, and a registry written before viewers existed still opens."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from c2d.operator.v1 import operator_pb2

from mesh import jobs as job_facts
from tests.conftest import needs_root, new_key
from tests.operator_service.node import Node, error_info, running_node

pytestmark = needs_root
State = job_pb2.Job.State


async def expect_not_found(call: Awaitable[object]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await call
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


async def listed(node: Node, address: str, page_size: int = 0) -> list[str]:
    """Every job ListJobs gives `address`, page after page."""
    names: list[str] = []
    token = ""
    while True:
        response = await node.operator.ListJobs(
            operator_pb2.ListJobsRequest(owner=address, page_size=page_size, page_token=token)
        )
        names += [job.name for job in response.jobs]
        for job in response.jobs:
            assert job.viewers == [] or all(v.startswith("0x") for v in job.viewers)
        token = response.next_page_token
        if not token:
            return names


async def test_viewers_read_a_job_and_only_its_owner_stops_or_deletes_it(tmp_path: Path) -> None:
    owner, viewer, other_viewer, stranger = (new_key().address for _ in range(4))
    async with running_node(tmp_path) as node:
        # A viewer named in lowercase is kept, and shown, in its EIP-55 form.
        spec = node.spec(owner, viewers=[viewer.lower(), other_viewer])
        created = await node.create(spec)
        assert list(created.viewers) == [viewer, other_viewer]
        job_id = spec.job_id

        updates = await node.watch_to_end(job_id, viewer)
        assert all(list(u.viewers) == [viewer, other_viewer] for u in updates)
        final = updates[-1]
        assert final.state == State.STATE_SUCCEEDED, final.message

        # Any case of a viewer's or the owner's address reads the job.
        for reader in (owner, owner.lower(), viewer, viewer.upper().replace("0X", "0x")):
            job = await node.get(job_id, reader)
            assert job.name == final.name and list(job.viewers) == [viewer, other_viewer]
        assert await node.log(job_id, other_viewer) == "hello\n"
        assert await node.algorithm_log(final, viewer) == "hello\n"
        assert await listed(node, viewer.lower()) == [final.name]
        assert await listed(node, owner) == [final.name]

        # To a stranger the job does not exist, whatever the call.
        assert await listed(node, stranger) == []
        await expect_not_found(node.get(job_id, stranger))
        await expect_not_found(node.log(job_id, stranger))
        await expect_not_found(node.result(job_id, stranger, 0))
        await expect_not_found(node.watch_to_end(job_id, stranger))

        # A viewer may only read: its stop and delete are NOT_FOUND, as a stranger's.
        for caller in (viewer, stranger):
            await expect_not_found(
                node.operator.StopJob(operator_pb2.StopJobRequest(job_id=job_id, owner=caller))
            )
            await expect_not_found(
                node.operator.DeleteJob(operator_pb2.DeleteJobRequest(job_id=job_id, owner=caller))
            )
        assert (await node.get(job_id, owner)).state == State.STATE_SUCCEEDED

        # The owner may, in any case of its address.
        await node.operator.DeleteJob(
            operator_pb2.DeleteJobRequest(job_id=job_id, owner=owner.lower())
        )
        await expect_not_found(node.get(job_id, viewer))
        assert await listed(node, viewer) == []


async def test_a_viewer_cannot_stop_a_running_job_its_owner_can(tmp_path: Path) -> None:
    owner, viewer = new_key().address, new_key().address
    code = b"import time\nprint('working', flush=True)\ntime.sleep(600)\n"
    async with running_node(tmp_path) as node:
        spec = node.spec(owner, code, viewers=[viewer])
        await node.create(spec)
        request = operator_pb2.StreamJobLogsRequest(job_id=spec.job_id, owner=viewer)
        async for response in node.operator.StreamJobLogs(request):
            if "working" in response.chunk.text:
                break
        await expect_not_found(
            node.operator.StopJob(operator_pb2.StopJobRequest(job_id=spec.job_id, owner=viewer))
        )
        assert (await node.get(spec.job_id, viewer)).state == State.STATE_RUNNING
        stopped = await node.operator.StopJob(
            operator_pb2.StopJobRequest(job_id=spec.job_id, owner=owner)
        )
        assert stopped.job.state == State.STATE_CANCELLED
        assert list(stopped.job.viewers) == [viewer]


async def test_listing_mixes_owned_and_viewed_jobs_newest_first_across_pages(
    tmp_path: Path,
) -> None:
    alice, bob, carol = (new_key().address for _ in range(3))
    async with running_node(tmp_path) as node:
        specs = [
            node.spec(alice),
            node.spec(bob, viewers=[alice]),
            node.spec(carol),  # neither alice's nor viewed by her
            node.spec(alice, viewers=[bob]),
            node.spec(carol, viewers=[bob, alice]),
        ]
        for spec in specs:
            await node.create(spec)
        expected = [job_facts.job_name(specs[i].job_id) for i in (4, 3, 1, 0)]
        for page_size in (0, 1, 2, 3):
            assert await listed(node, alice.lower(), page_size) == expected
        assert await listed(node, bob) == [job_facts.job_name(specs[i].job_id) for i in (4, 3, 1)]
        for spec in specs:
            await node.watch_to_end(spec.job_id, spec.owner)


@pytest.mark.parametrize(
    ("viewers", "problem"),
    [
        (["0x1234"], "viewers[0] is not"),
        (["not an address"], "viewers[0] is not"),
        (["OWNER"], "owner"),
        (["V", "v"], "twice"),
        ([f"0x{n:040x}" for n in range(1, 22)], "at most 20"),
    ],
)
async def test_malformed_viewers_are_refused_and_nothing_is_recorded(
    tmp_path: Path, viewers: list[str], problem: str
) -> None:
    owner, viewer = new_key().address, new_key().address
    named = [
        owner.lower() if v == "OWNER" else viewer if v == "V" else viewer.lower() if v == "v" else v
        for v in viewers
    ]
    async with running_node(tmp_path) as node:
        spec = node.spec(owner, viewers=named)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await node.create(spec)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (refused.value.details() or "")
        assert error_info(refused.value).metadata["field"] == "viewers"
        await expect_not_found(node.get(spec.job_id, owner))
        assert await listed(node, owner) == []
        # The engine refuses such a spec on its own too.
        with pytest.raises(grpc.aio.AioRpcError) as engine_refused:
            await node.engine.RunJob(engine_pb2.RunJobRequest(spec=spec))
        assert engine_refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(engine_refused.value).metadata["field"] == "viewers"


# The registry as it was before viewers: jobs listed by an index on their owner.
OLD_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state INTEGER NOT NULL,
    spec BLOB NOT NULL,
    job BLOB NOT NULL,
    lease_until REAL NOT NULL
);
CREATE INDEX jobs_by_owner ON jobs (owner, seq);
CREATE INDEX jobs_by_seq ON jobs (seq);
CREATE TABLE job_events (
    job_id TEXT NOT NULL,
    time REAL NOT NULL,
    state INTEGER NOT NULL,
    failure_reason INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX job_events_by_job ON job_events (job_id);
"""


async def test_a_registry_from_before_viewers_opens_with_its_jobs(tmp_path: Path) -> None:
    owner, viewer = new_key().address, new_key().address
    database = tmp_path / "operator" / "operator.db"
    database.parent.mkdir(parents=True, mode=0o700)
    old_id = job_facts.new_job_id()
    old_job = job_pb2.Job(name=job_facts.job_name(old_id), owner=owner, state=State.STATE_SUCCEEDED)
    db = sqlite3.connect(database)
    db.executescript(OLD_SCHEMA)
    db.execute(
        "INSERT INTO jobs VALUES (?, ?, 1, ?, ?, ?, 0)",
        (
            old_id,
            owner,
            State.STATE_SUCCEEDED,
            engine_pb2.JobSpec(job_id=old_id, owner=owner).SerializeToString(),
            old_job.SerializeToString(),
        ),
    )
    db.commit()
    db.close()

    async with running_node(tmp_path) as node:
        assert await listed(node, owner.lower()) == [old_job.name]
        assert (await node.get(old_id, owner)).name == old_job.name
        spec = node.spec(owner, viewers=[viewer])
        await node.create(spec)
        assert await listed(node, owner) == [job_facts.job_name(spec.job_id), old_job.name]
        assert await listed(node, viewer) == [job_facts.job_name(spec.job_id)]
        await node.watch_to_end(spec.job_id, viewer)

    # And it opens again, as it is now, with its viewers.
    async with running_node(tmp_path) as node:
        assert await listed(node, viewer) == [job_facts.job_name(spec.job_id)]
        assert list((await node.get(spec.job_id, viewer)).viewers) == [viewer]
