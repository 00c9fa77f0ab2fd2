"""Where jobs run: the local sandbox (operator_engine.runner.Runner, the embedded default) or
a Kubernetes cluster (operator_engine.backends.kubernetes). One interface, which the engine's
gRPC servicer calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2

from operator_engine.jobs import EngineJob


class Backend(Protocol):
    """Runs jobs and reports them; every error is a domain error (mesh.errors)."""

    def environment_list(self) -> list[job_pb2.Environment]: ...

    async def submit(self, spec: engine_pb2.JobSpec) -> job_pb2.Job:
        """Accepts a job (idempotent by id) and queues it."""
        ...

    def get(self, job_id: str) -> EngineJob:
        """The job; NOT_FOUND when unknown."""
        ...

    def watch(self, job_id: str) -> AsyncIterator[job_pb2.Job]:
        """The job now, then after each change and at least every heartbeat; ends after a
        final state."""
        ...

    def stream_log(self, job_id: str, offset: int) -> AsyncIterator[job_pb2.LogChunk]:
        """The algorithm's log from `offset`, live; ends once the job is final."""
        ...

    async def stop(self, job_id: str) -> job_pb2.Job: ...

    async def delete(self, job_id: str) -> None: ...

    async def recover(self) -> None:
        """Picks up the jobs a previous engine left."""
        ...

    async def close(self) -> None: ...
