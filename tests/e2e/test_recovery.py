"""kill -9 of each service while jobs are queued, running or publishing: after the restart
every job carries on or ends with a reason within 30 s, and no job record is lost.

The mesh runs as `c2d up` runs it: one process per service, the supervisor restarting the one
that was killed."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb

from cli.supervisor import Mesh, Supervisor, free_address
from sdk.client import Client
from sdk.keys import Key
from tests.conftest import SandboxIdentity, needs_root, new_key

pytestmark = [needs_root, pytest.mark.timeout(240)]
State = job_pb2.Job.State
SLEEPER = b"import time\nprint('started', flush=True)\ntime.sleep(4)\nprint('done', flush=True)\n"
# Writes a large output quickly, so that publishing takes long enough to be interrupted.
BIG_OUTPUT = b"""
block = b"x" * (1 << 20)
with open("/data/outputs/big.bin", "wb") as f:
    for _ in range(700):
        f.write(block)
print("written", flush=True)
"""


@dataclass
class Node:
    supervisor: Supervisor
    owner: Key
    data_root: Path

    async def kill(self, name: str) -> None:
        """kill -9, then the supervisor's restart, as `c2d up` does."""
        process = self.supervisor.process(name)
        process.kill()
        await process.wait()
        assert await self.supervisor.restart(name), f"{name} did not come back"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    home = tmp_path / "home"
    owner = new_key()
    environments = tmp_path / "environments.json"
    environments.write_text(
        json.dumps(
            [
                {"name": "default", "max_concurrent_jobs": 2},
                {"name": "one", "max_concurrent_jobs": 1, "disk_bytes": 2 << 30},
            ]
        )
    )
    mesh = Mesh.defaults(home, owner.address, provider=free_address(), gateway=free_address())
    sandbox = SandboxIdentity.new()
    mesh.env.update(
        {
            "C2D_DATA_ROOT": str(tmp_path / "data"),
            "C2D_ENVIRONMENTS_FILE": str(environments),
            "C2D_ENGINE_LEASE_S": "10",
            **sandbox.env(),
            "C2D_LOG_FORMAT": "json",
        }
    )
    supervisor = Supervisor(mesh, log_dir=home / "logs")
    await supervisor.start()
    try:
        yield Node(supervisor, owner, tmp_path / "data")
    finally:
        await supervisor.stop()
        await sandbox.sweep()


async def publish(node: Node, client: Client, code: bytes) -> tuple[str, str]:
    algorithm = await client.publish_algorithm(code, "python3 $ALGO")
    data = node.data_root / f"{uuid.uuid4().hex}.csv"
    data.parent.mkdir(exist_ok=True)
    data.write_text("1\n")
    data.chmod(0o644)
    dataset = await client.publish_dataset(
        [data],
        policy=pb.ComputePolicy(publisher_trusted_algorithms=[await client.trust(algorithm.did)]),
    )
    return algorithm.did, dataset.did


async def reach(client: Client, job: str, states: set[int], within: float = 30) -> job_pb2.Job:
    """Polls the job (through restarts of any service) until it is in one of `states`."""
    deadline = time.monotonic() + within
    last: job_pb2.Job | None = None
    while time.monotonic() < deadline:
        try:
            last = await client.get_job(job)
            if last.state in states:
                return last
        except grpc.aio.AioRpcError as error:
            assert error.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ), error
        await asyncio.sleep(0.05)
    raise AssertionError(f"job never reached {states}; last seen {last}")


FINAL = {State.STATE_SUCCEEDED, State.STATE_FAILED, State.STATE_CANCELLED}


async def test_each_service_killed_while_jobs_run(node: Node) -> None:
    async with Client(node.supervisor.mesh.provider, node.owner) as client:
        sleeper = await publish(node, client, SLEEPER)

        # The provider and the operator service are not in the job's path: it carries on.
        for name in ("provider", "operator_service"):
            job = await client.start_compute([sleeper[1]], algorithm=sleeper[0])
            await reach(client, job.name, {State.STATE_RUNNING})
            await node.kill(name)
            final = await reach(client, job.name, FINAL)
            assert final.state == State.STATE_SUCCEEDED, (name, final.message)

        # The engine dies with its sandboxes: the job ends "engine lost", logs kept.
        job = await client.start_compute([sleeper[1]], algorithm=sleeper[0])
        # Killed once the algorithm has printed: RUNNING alone may precede its first line.
        async for chunk in client.stream_logs(job.name):
            if "started" in chunk.text:
                break
        began = time.monotonic()
        await node.kill("operator_engine")
        final = await reach(client, job.name, FINAL)
        assert time.monotonic() - began < 30
        assert final.state == State.STATE_FAILED
        assert final.failure_reason == job_pb2.FAILURE_REASON_ENGINE_LOST
        assert any(r.kind == job_pb2.ResultFile.KIND_ALGORITHM_LOG for r in final.results)
        log_text = "".join([c.text async for c in client.stream_logs(job.name)])
        assert "started" in log_text

        assert len(await client.list_jobs()) == 3, "no job record is lost"


async def test_queued_jobs_survive_an_engine_kill(node: Node) -> None:
    async with Client(node.supervisor.mesh.provider, node.owner) as client:
        sleeper = await publish(node, client, SLEEPER)
        first = await client.start_compute([sleeper[1]], algorithm=sleeper[0], environment="one")
        second = await client.start_compute([sleeper[1]], algorithm=sleeper[0], environment="one")
        await reach(client, first.name, {State.STATE_RUNNING})
        assert (await client.get_job(second.name)).state == State.STATE_QUEUED
        await node.kill("operator_engine")
        lost = await reach(client, first.name, FINAL)
        assert lost.failure_reason == job_pb2.FAILURE_REASON_ENGINE_LOST
        # The queued job never started: the engine that comes back runs it.
        final = await reach(client, second.name, FINAL, within=40)
        assert final.state == State.STATE_SUCCEEDED, final.message


@pytest.mark.parametrize("victim", ["operator_engine", "operator_service"])
async def test_a_kill_while_publishing_publishes_again(node: Node, victim: str) -> None:
    async with Client(node.supervisor.mesh.provider, node.owner) as client:
        writer = await publish(node, client, BIG_OUTPUT)
        job = await client.start_compute([writer[1]], algorithm=writer[0], environment="one")
        await reach(client, job.name, {State.STATE_PUBLISHING}, within=60)
        await node.kill(victim)
        final = await reach(client, job.name, FINAL)
        assert final.state == State.STATE_SUCCEEDED, final.message
        big = next(r for r in final.results if r.name == "big.bin")
        assert big.size_bytes == 700 << 20
        if victim == "operator_engine":
            assert node.supervisor.log_dir is not None
            engine_log = (node.supervisor.log_dir / "operator_engine.log").read_text()
            assert "job cut off by an engine restart" in engine_log, "publish was not interrupted"
