"""Per-job limits and the queue's bounds, through the engine's gRPC API (and the Operator
Service's, where it decides what is kept): a job may ask for less than its environment gives,
never more; a full queue refuses a job, which then leaves no trace; a job that waits too long
ends `queue timeout`, counted from its creation, across an engine restart."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import grpc
import pytest
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from c2d.operator.v1 import operator_pb2
from google.protobuf import duration_pb2

from mesh import jobs as job_facts
from operator_engine.config import EnvironmentSpec
from operator_service.store import JobStore
from tests.conftest import SandboxIdentity, engine_config, needs_root, new_key
from tests.operator_engine.killed_engine import restarted_engine, updates_until_final
from tests.operator_service.node import Node, error_info, job_spec, running_node

pytestmark = needs_root
State = job_pb2.Job.State
MIB = 1 << 20
SLEEPER = b"import time\nprint('sleeping', flush=True)\ntime.sleep(600)\n"
ENVIRONMENT = EnvironmentSpec(
    memory_bytes=256 * MIB, disk_bytes=64 * MIB, cpus=1.0, max_duration_s=60
)


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


async def run_job(node: Node, spec: engine_pb2.JobSpec) -> job_pb2.Job:
    return (await node.engine.RunJob(engine_pb2.RunJobRequest(spec=spec))).job


async def engine_final(node: Node, job_id: str) -> job_pb2.Job:
    async with asyncio.timeout(60):
        async for response in node.engine.WatchJob(engine_pb2.WatchJobRequest(job_id=job_id)):
            job = response.job
    return job


async def wait_for_log(node: Node, job_id: str, text: str) -> None:
    request = engine_pb2.StreamJobLogsRequest(job_id=job_id)
    async with asyncio.timeout(30):
        async for response in node.engine.StreamJobLogs(request):
            if text in response.chunk.text:
                return


async def stop(node: Node, job_id: str) -> None:
    await node.engine.StopJob(engine_pb2.StopJobRequest(job_id=job_id))


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        (job_pb2.Resources(memory_bytes=257 * MIB), "resources.memory_bytes"),
        (job_pb2.Resources(memory_bytes=-1), "resources.memory_bytes"),
        (job_pb2.Resources(memory_bytes=1 * MIB), "resources.memory_bytes"),
        (job_pb2.Resources(cpus=1.5), "resources.cpus"),
        (job_pb2.Resources(cpus=-0.5), "resources.cpus"),
        (job_pb2.Resources(cpus=float("nan")), "resources.cpus"),
        (job_pb2.Resources(disk_bytes=65 * MIB), "resources.disk_bytes"),
        (job_pb2.Resources(disk_bytes=-5), "resources.disk_bytes"),
        (job_pb2.Resources(max_duration=seconds(61)), "resources.max_duration"),
        (job_pb2.Resources(max_duration=seconds(-1)), "resources.max_duration"),
    ],
)
async def test_resources_beyond_the_environment_are_refused_naming_the_field(
    tmp_path: Path, resources: job_pb2.Resources, field: str
) -> None:
    owner = new_key().address
    async with running_node(tmp_path, (ENVIRONMENT,)) as node:
        spec = node.spec(owner, resources=resources)
        for call in (run_job(node, spec), node.create(spec)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (refused.value.details() or "")
            assert error_info(refused.value).metadata["field"] == field
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await node.engine.GetJob(engine_pb2.GetJobRequest(job_id=spec.job_id))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # Refused by the engine, the job is not kept by the Operator Service either.
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await node.get(spec.job_id, owner)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_job_carries_its_limits_the_environments_lowered_where_it_asked(
    tmp_path: Path,
) -> None:
    owner = new_key().address
    async with running_node(tmp_path, (ENVIRONMENT,)) as node:
        plain = await run_job(node, node.spec(owner))
        assert plain.limits == job_pb2.Resources(
            cpus=1.0, memory_bytes=256 * MIB, disk_bytes=64 * MIB, max_duration=seconds(60)
        )
        asked = job_pb2.Resources(memory_bytes=64 * MIB, max_duration=seconds(30.5))
        lowered = await node.create(node.spec(owner, resources=asked))
        expected = job_pb2.Resources(
            cpus=1.0, memory_bytes=64 * MIB, disk_bytes=64 * MIB, max_duration=seconds(30.5)
        )
        assert lowered.limits == expected
        final = await engine_final(node, lowered.name.removeprefix("jobs/"))
        assert final.state == State.STATE_SUCCEEDED, final.message
        assert final.limits == expected
        # The Operator Service hands on the same.
        assert (await node.get(lowered.name.removeprefix("jobs/"), owner)).limits == expected
        await engine_final(node, plain.name.removeprefix("jobs/"))

        environments = await node.engine.ListEnvironments(engine_pb2.ListEnvironmentsRequest())
        (environment,) = environments.environments
        assert environment.max_queue_wait == seconds(3600)
        assert environment.max_queued_jobs == 1000


async def test_the_sandbox_enforces_the_lower_limits(tmp_path: Path) -> None:
    owner = new_key().address
    cases = [
        (
            b"import time\ntime.sleep(30)\n",
            job_pb2.Resources(max_duration=seconds(1)),
            job_pb2.FAILURE_REASON_TIMED_OUT,
            "timed out after 1 s",
        ),
        (
            b"block = bytearray(120 << 20)\nblock[::4096] = b'x' * len(block[::4096])\n",
            job_pb2.Resources(memory_bytes=48 * MIB),
            job_pb2.FAILURE_REASON_OUT_OF_MEMORY,
            "limit 48 MiB",
        ),
        (
            b"with open('/data/outputs/big', 'wb') as f:\n"
            b"    for _ in range(16):\n"
            b"        f.write(b'x' * (1 << 20))\n",
            job_pb2.Resources(disk_bytes=8 * MIB),
            job_pb2.FAILURE_REASON_DISK_FULL,
            "",
        ),
    ]
    async with running_node(tmp_path, (ENVIRONMENT,)) as node:
        for code, resources, reason, detail in cases:
            job = await run_job(node, node.spec(owner, code, resources=resources))
            final = await engine_final(node, job.name.removeprefix("jobs/"))
            assert final.state == State.STATE_FAILED, final.message
            assert final.failure_reason == reason, final.message
            assert detail in final.message


async def test_a_full_queue_refuses_the_job_and_keeps_no_trace_of_it(tmp_path: Path) -> None:
    owner = new_key().address
    one = EnvironmentSpec(max_concurrent_jobs=1, max_queued_jobs=1)
    async with running_node(tmp_path, (one,)) as node:
        running = node.spec(owner, SLEEPER)
        await node.create(running)
        await wait_for_log(node, running.job_id, "sleeping")
        waiting = node.spec(owner)
        queued = await node.create(waiting)
        assert queued.state == State.STATE_QUEUED

        refused_spec = node.spec(owner)
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await node.create(refused_spec)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(full.value).reason == "QUEUE_FULL"
        # No ghost: neither the Operator Service nor the engine knows the refused job.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await node.get(refused_spec.job_id, owner)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        listing = await node.operator.ListJobs(operator_pb2.ListJobsRequest(owner=owner))
        assert [j.name for j in listing.jobs] == [
            job_facts.job_name(waiting.job_id),
            job_facts.job_name(running.job_id),
        ]
        assert not (node.config.workspace_root / refused_spec.job_id).exists()
        # The engine says the same to a direct RunJob.
        with pytest.raises(grpc.aio.AioRpcError) as direct:
            await run_job(node, node.spec(owner))
        assert direct.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Once the queue has room again, a job is accepted.
        await stop(node, running.job_id)
        final = (await node.watch_to_end(waiting.job_id, owner))[-1]
        assert final.state == State.STATE_SUCCEEDED, final.message
        later = await node.create(node.spec(owner))
        await node.watch_to_end(later.name.removeprefix("jobs/"), owner)


async def test_a_job_that_waits_too_long_ends_queue_timeout_with_its_logs(
    tmp_path: Path,
) -> None:
    owner = new_key().address
    impatient = EnvironmentSpec(max_concurrent_jobs=1, max_queue_wait_s=1.5)
    async with running_node(tmp_path, (impatient,)) as node:
        running = node.spec(owner, SLEEPER)
        await node.create(running)
        await wait_for_log(node, running.job_id, "sleeping")
        waiting = node.spec(owner)
        await node.create(waiting)

        updates = await node.watch_to_end(waiting.job_id, owner)
        assert any(u.state == State.STATE_QUEUED and u.queue_position == 1 for u in updates)
        assert {u.state for u in updates} == {State.STATE_QUEUED, State.STATE_FAILED}
        final = updates[-1]
        assert final.failure_reason == job_pb2.FAILURE_REASON_QUEUE_TIMEOUT
        assert "queue timeout" in final.message and "never ran" in final.message
        assert final.queue_position == 0
        assert final.end_time.seconds and not final.start_time.seconds
        kinds = {r.kind for r in final.results}
        assert job_pb2.ResultFile.KIND_PUBLISH_LOG in kinds
        assert (await node.get(waiting.job_id, owner)).failure_reason == (
            job_pb2.FAILURE_REASON_QUEUE_TIMEOUT
        )
        # The job that held the slot was not disturbed.
        assert (await node.get(running.job_id, owner)).state == State.STATE_RUNNING
        await stop(node, running.job_id)


async def test_the_queue_wait_counts_from_creation_across_an_engine_restart(
    tmp_path: Path,
) -> None:
    """A job queued two hours ago, left by an engine that was down since, times out at once
    although a slot is free: the wait is not started again."""
    owner = new_key().address
    config = engine_config(tmp_path, SandboxIdentity.new())
    spec = job_spec(config.data_root, owner)
    # What a stopped engine leaves of a job it had queued.
    ws = config.workspace_root / spec.job_id
    (ws / "logs").mkdir(parents=True)
    job = job_pb2.Job(
        name=job_facts.job_name(spec.job_id),
        owner=owner,
        environment="default",
        state=State.STATE_QUEUED,
        queue_position=1,
    )
    job.create_time.FromSeconds(int(time.time()) - 7200)
    (ws / "spec.pb").write_bytes(spec.SerializeToString())
    (ws / "job.pb").write_bytes(job.SerializeToString())

    async with restarted_engine(config) as runner:
        final = (await updates_until_final(runner, spec.job_id))[-1]
        assert final.state == State.STATE_FAILED
        assert final.failure_reason == job_pb2.FAILURE_REASON_QUEUE_TIMEOUT
        assert re.search(r"waited 72\d\d s", final.message), final.message
        assert final.limits.memory_bytes == EnvironmentSpec().memory_bytes


async def test_the_limits_a_job_asked_for_survive_an_engine_restart(tmp_path: Path) -> None:
    owner = new_key().address
    one = EnvironmentSpec(max_concurrent_jobs=1)
    asked = job_pb2.Resources(memory_bytes=32 * MIB, cpus=0.5)
    async with running_node(tmp_path, (one,)) as node:
        config = node.config
        running = node.spec(owner, SLEEPER)
        await run_job(node, running)
        await wait_for_log(node, running.job_id, "sleeping")
        queued = node.spec(owner, resources=asked)
        assert (await run_job(node, queued)).limits.memory_bytes == 32 * MIB
    # The engine stopped with the job still queued: the next one runs it, as asked.
    async with restarted_engine(config) as runner:
        assert runner.get(queued.job_id).job.limits.memory_bytes == 32 * MIB
        final = (await updates_until_final(runner, queued.job_id))[-1]
        assert final.state == State.STATE_SUCCEEDED, final.message
        assert final.limits.memory_bytes == 32 * MIB
        assert final.limits.cpus == 0.5
        assert final.limits.disk_bytes == one.disk_bytes


async def test_a_job_handed_over_again_and_refused_ends_failed_saying_why(
    tmp_path: Path,
) -> None:
    """The Operator Service stopped between registering a job and handing it to the engine;
    when it comes back, the engine refuses the job: it ends failed with the engine's reason
    rather than waiting for its lease."""
    owner = new_key().address
    config = engine_config(tmp_path, SandboxIdentity.new(), (ENVIRONMENT,))
    spec = job_spec(config.data_root, owner, resources=job_pb2.Resources(cpus=8))
    store = await JobStore.open(tmp_path / "operator" / "operator.db")
    job = job_pb2.Job(name=job_facts.job_name(spec.job_id), owner=owner, state=State.STATE_QUEUED)
    job.create_time.GetCurrentTime()
    await store.insert(spec, job, time.time() + 600)
    await store.close()

    async with running_node(tmp_path, (ENVIRONMENT,)) as node:
        final = (await node.watch_to_end(spec.job_id, owner))[-1]
        assert final.state == State.STATE_FAILED
        assert "could not be started" in final.message
        assert "resources.cpus" in final.message
