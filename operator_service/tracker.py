"""Follows every unfinished job on the engine and records each change, so that the registry
always knows the job's latest state, and ends jobs the engine has lost.

Each unfinished job holds a lease (in the registry, so it outlives a restart of this service),
renewed by every message the engine sends about it, heartbeats included. When the engine has
been silent or unreachable past the lease, the job ends `failed: engine lost`. A job the engine
never heard of (the service stopped between registering it and handing it over) is handed over
again, unless the engine now refuses it (then it ends failed, saying why).

A job recorded final gets the expiry of its results here (operator_service.retention), whichever
backend ran it."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator

import grpc
import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc

from mesh import jobs as job_facts
from mesh.channels import UNARY_TIMEOUT
from mesh.errors import MeshError, NotFound, from_rpc_error
from operator_service.retention import Retention
from operator_service.store import JobStore, may_read

log = structlog.get_logger()
State = job_pb2.Job.State
# The next hop as its errors name it: CreateJob and the tracker map them themselves, the
# interceptor the rest.
ENGINE = "operator engine"
# Answers by which the engine refuses a job outright: it was not accepted, and asking again
# gets the same answer.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


def engine_refused(error: grpc.aio.AioRpcError) -> bool:
    """Whether RunJob's error is the engine's refusal of the job (as opposed to the engine
    being out of reach, or failing)."""
    return error.code() in _REFUSALS


def engine_error(error: grpc.aio.AioRpcError) -> MeshError:
    """The engine's error as the same kind of domain error, with its reason and field (for
    example QUEUE_FULL, or `resources.memory_bytes`)."""
    return from_rpc_error(error, service=ENGINE)


class Tracker:
    def __init__(
        self,
        store: JobStore,
        engine: engine_pb2_grpc.EngineServiceAsyncStub,
        lease_s: float,
        retention: Retention,
    ) -> None:
        self.store = store
        self.engine = engine
        self.lease_s = lease_s
        self.retention = retention
        self._changed: dict[str, asyncio.Condition] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # The latest form of each job being followed: watchers are told from here, before
        # the registry has written it.
        self._latest: dict[str, job_pb2.Job] = {}

    def condition(self, job_id: str) -> asyncio.Condition:
        return self._changed.setdefault(job_id, asyncio.Condition())

    def follow(self, job_id: str) -> None:
        task = self._tasks.get(job_id)
        if task is None or task.done():
            task = asyncio.create_task(self._follow(job_id), name=f"follow-{job_id}")
            self._tasks[job_id] = task
            task.add_done_callback(functools.partial(self._forget, job_id))

    def _forget(self, job_id: str, task: asyncio.Task[None]) -> None:
        # Finished jobs leave nothing behind: the service runs for months of jobs.
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]

    async def resume(self) -> None:
        """Follows again every job that was unfinished when the service last stopped."""
        for job_id in await self.store.unfinished():
            self.follow(job_id)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def record(self, job: job_pb2.Job, *, renew: bool = False) -> None:
        job_id = job.name.removeprefix("jobs/")
        final = job_facts.is_final(job.state)
        # Before anyone sees the final state: it comes with its results' expiry.
        results_due = await self.retention.stamp(job) if final else None
        cond = self.condition(job_id)
        async with cond:
            self._latest[job_id] = job
            cond.notify_all()
        # Lets the watchers just woken hand the change to their streams before the write
        # below, which is not what they wait for. A crash in between loses nothing: the engine
        # still has the change and says it again when this service follows the job anew.
        await asyncio.sleep(0)
        await self.store.save(
            job, time.time() + self.lease_s if renew else None, results_due=results_due
        )
        if final:
            # Watchers still running read the final state from the registry from now on.
            self._latest.pop(job_id, None)
            self._changed.pop(job_id, None)

    async def end(self, job_id: str, state: int, reason: int, message: str) -> None:
        """Ends a job here when the engine cannot: it is never left unfinished."""
        job = await self.store.job(job_id)
        if job is None or job_facts.is_final(job.state):
            return
        job.state = state  # type: ignore[assignment]
        job.failure_reason = reason  # type: ignore[assignment]
        job.message = message
        job.queue_position = 0
        job.end_time.GetCurrentTime()
        job_facts.set_status_code(job)
        await self.record(job)
        log.warning("job ended by the operator service", job_id=job_id, message=message)

    async def _follow(self, job_id: str) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            while True:
                try:
                    if await self._follow_stream(job_id):
                        return
                    continue
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    if code == grpc.StatusCode.NOT_FOUND:
                        try:
                            if not await self._hand_over_again(job_id):
                                return
                            continue
                        except grpc.aio.AioRpcError as again:
                            # Out of reach again: tried anew until the lease runs out.
                            code = again.code()
                    log.info("engine unreachable; retrying", code=code.name)
                except TimeoutError:
                    log.warning("engine silent past the lease")
                if time.time() > await self.store.lease_until(job_id):
                    await self.end(
                        job_id,
                        State.STATE_FAILED,
                        job_pb2.FAILURE_REASON_ENGINE_LOST,
                        "engine lost: no word from the engine within the job's lease",
                    )
                    return
                await asyncio.sleep(0.2)

    async def _follow_stream(self, job_id: str) -> bool:
        """Records what the engine says of the job; True once it is final."""
        stream = self.engine.WatchJob(engine_pb2.WatchJobRequest(job_id=job_id))
        try:
            messages = stream.__aiter__()
            while True:
                # A deadline on the read alone (every message renews it, heartbeats included);
                # unlike wait_for, it makes no task of every read.
                async with asyncio.timeout(self.lease_s):
                    try:
                        response = await messages.__anext__()
                    except StopAsyncIteration:
                        return False
                await self.record(response.job, renew=True)
                if job_facts.is_final(response.job.state):
                    return True
        finally:
            stream.cancel()

    async def _hand_over_again(self, job_id: str) -> bool:
        """Hands a registered job that never reached the engine over again. False when the job
        is ended here instead, saying why: it had started (then the engine lost it), or the
        engine now refuses it. Raises RunJob's other errors (the engine out of reach)."""
        found = await self.store.get(job_id)
        if found is None or found[1].state != State.STATE_QUEUED:
            await self.end(
                job_id,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_ENGINE_LOST,
                "engine lost: the engine no longer knows this job",
            )
            return False
        log.info("handing the job to the engine again")
        try:
            await self.engine.RunJob(engine_pb2.RunJobRequest(spec=found[0]), timeout=UNARY_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if not engine_refused(error):
                raise
            await self.end(
                job_id,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_SANDBOX_FAILED,
                f"the job could not be started: {engine_error(error).message}",
            )
            return False
        return True

    async def watch(self, job_id: str, reader: str) -> AsyncIterator[job_pb2.Job]:
        """The job now, then after every recorded change; ends after a final state. NOT_FOUND
        unless `reader` owns or views it."""
        cond = self.condition(job_id)
        last: bytes | None = None
        job: job_pb2.Job | None = None
        try:
            while True:
                async with cond:
                    job = self._latest.get(job_id)
                    if job is None:
                        job = await self.store.job(job_id)
                    if job is None or not may_read(job, reader):
                        raise NotFound("no such job", reason="JOB_NOT_FOUND")
                    snapshot = job.SerializeToString(deterministic=True)
                    if snapshot == last:
                        await cond.wait()
                        continue
                last = snapshot
                yield job
                if job_facts.is_final(job.state):
                    return
        finally:
            # A final or missing job changes no more: its condition need not outlive the watch.
            gone = job is None or job_facts.is_final(job.state)
            if gone and self._changed.get(job_id) is cond:
                del self._changed[job_id]
