"""The EngineService API over the job runner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc

from mesh import jobs as job_facts
from operator_engine.backends import Backend

Context = grpc.aio.ServicerContext[Any, Any]


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    def __init__(self, runner: Backend) -> None:
        self.runner = runner

    async def RunJob(
        self, request: engine_pb2.RunJobRequest, context: Context
    ) -> engine_pb2.RunJobResponse:
        structlog.contextvars.bind_contextvars(job_id=request.spec.job_id)
        return engine_pb2.RunJobResponse(job=await self.runner.submit(request.spec))

    async def GetJob(
        self, request: engine_pb2.GetJobRequest, context: Context
    ) -> engine_pb2.GetJobResponse:
        job_facts.check_job_id(request.job_id)
        return engine_pb2.GetJobResponse(job=self.runner.get(request.job_id).job)

    async def WatchJob(
        self, request: engine_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[engine_pb2.WatchJobResponse]:
        job_facts.check_job_id(request.job_id)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        async for job in self.runner.watch(request.job_id):
            yield engine_pb2.WatchJobResponse(job=job)

    async def StreamJobLogs(
        self, request: engine_pb2.StreamJobLogsRequest, context: Context
    ) -> AsyncIterator[engine_pb2.StreamJobLogsResponse]:
        job_facts.check_job_id(request.job_id)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        async for chunk in self.runner.stream_log(request.job_id, request.offset):
            yield engine_pb2.StreamJobLogsResponse(chunk=chunk)

    async def StopJob(
        self, request: engine_pb2.StopJobRequest, context: Context
    ) -> engine_pb2.StopJobResponse:
        job_facts.check_job_id(request.job_id)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        return engine_pb2.StopJobResponse(job=await self.runner.stop(request.job_id))

    async def DeleteJob(
        self, request: engine_pb2.DeleteJobRequest, context: Context
    ) -> engine_pb2.DeleteJobResponse:
        job_facts.check_job_id(request.job_id)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        await self.runner.delete(request.job_id)
        return engine_pb2.DeleteJobResponse()

    async def ListEnvironments(
        self, request: engine_pb2.ListEnvironmentsRequest, context: Context
    ) -> engine_pb2.ListEnvironmentsResponse:
        return engine_pb2.ListEnvironmentsResponse(environments=self.runner.environment_list())
