"""Follows every unfinished job on the engine and records each change, so that the registry
always knows the job's latest state, and ends jobs the engine has lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc

from mesh import jobs as job_facts
from mesh.errors import NotFound
from operator_service.store import JobStore

log = structlog.get_logger()
State = job_pb2.Job.State


class Tracker:
    def __init__(
        self, store: JobStore, engine: engine_pb2_grpc.EngineServiceAsyncStub, lease_s: float
    ) -> None:
        self.store = store
        self.engine = engine
        self.lease_s = lease_s
        self._changed: dict[str, asyncio.Condition] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def condition(self, job_id: str) -> asyncio.Condition:
        return self._changed.setdefault(job_id, asyncio.Condition())

    def follow(self, job_id: str) -> None:
        task = self._tasks.get(job_id)
        if task is None or task.done():
            self._tasks[job_id] = asyncio.create_task(self._follow(job_id), name=f"follow-{job_id}")

    async def resume(self) -> None:
        """Follows again every job that was unfinished when the service last stopped."""
        for job_id in await self.store.unfinished():
            self.follow(job_id)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def record(self, job: job_pb2.Job) -> None:
        job_id = job.name.removeprefix("jobs/")
        await self.store.save(job)
        cond = self.condition(job_id)
        async with cond:
            cond.notify_all()

    async def end(self, job_id: str, state: int, reason: int, message: str) -> None:
        """Ends a job here when the engine cannot: it is never left unfinished."""
        found = await self.store.get(job_id)
        if found is None or job_facts.is_final(found[1].state):
            return
        job = found[1]
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
            unreachable_since: float | None = None
            while True:
                try:
                    stream = self.engine.WatchJob(engine_pb2.WatchJobRequest(job_id=job_id))
                    async for response in stream:
                        unreachable_since = None
                        await self.record(response.job)
                        if job_facts.is_final(response.job.state):
                            return
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        await self.end(
                            job_id,
                            State.STATE_FAILED,
                            job_pb2.FAILURE_REASON_ENGINE_LOST,
                            "engine lost: the engine restarted without this job",
                        )
                        return
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > self.lease_s:
                        await self.end(
                            job_id,
                            State.STATE_FAILED,
                            job_pb2.FAILURE_REASON_ENGINE_LOST,
                            "engine lost: unreachable for too long",
                        )
                        return
                    log.info("engine unreachable; retrying", code=error.code().name)
                await asyncio.sleep(0.2)

    async def watch(self, job_id: str, owner: str) -> AsyncIterator[job_pb2.Job]:
        """The job now, then after every recorded change; ends after a final state."""
        cond = self.condition(job_id)
        last: bytes | None = None
        while True:
            async with cond:
                found = await self.store.get(job_id)
                if found is None or found[1].owner != owner:
                    raise NotFound("no such job", reason="JOB_NOT_FOUND")
                job = found[1]
                snapshot = job.SerializeToString(deterministic=True)
                if snapshot == last:
                    await cond.wait()
                    continue
            last = snapshot
            yield job
            if job_facts.is_final(job.state):
                return
