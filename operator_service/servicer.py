"""The OperatorService API: the job registry in front of the engine and the result storage."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc
from c2d.operator.v1 import operator_pb2, operator_pb2_grpc

from mesh import delivery as delivery_rules
from mesh import jobs as job_facts
from mesh.channels import UNARY_TIMEOUT
from mesh.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from mesh.storage import Storage, Tally, result_key
from operator_service.retention import refuse_expired
from operator_service.store import JobStore, may_read, owns
from operator_service.tracker import ENGINE as ENGINE  # the server names the next hop by it
from operator_service.tracker import Tracker, engine_error, engine_refused

log = structlog.get_logger()
Context = grpc.aio.ServicerContext[Any, Any]
State = job_pb2.Job.State


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(requested or 50, 500)


class OperatorServicer(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(
        self,
        store: JobStore,
        tracker: Tracker,
        engine: engine_pb2_grpc.EngineServiceAsyncStub,
        storage: Storage,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.engine = engine
        self.storage = storage

    async def _readable(self, job_id: str, caller: str) -> job_pb2.Job:
        """The job, when `caller` owns or views it."""
        job_facts.check_job_id(job_id)
        job = await self.store.job(job_id)
        # A job the caller may not read does not exist, as far as this caller can tell.
        if job is None or not may_read(job, caller):
            raise NotFound("no such job", reason="JOB_NOT_FOUND")
        return job

    async def _owned(self, job_id: str, caller: str) -> job_pb2.Job:
        """The job, when `caller` owns it: to a viewer too, it does not exist."""
        job_facts.check_job_id(job_id)
        job = await self.store.job(job_id)
        if job is None or not owns(job, caller):
            raise NotFound("no such job", reason="JOB_NOT_FOUND")
        return job

    async def CreateJob(
        self, request: operator_pb2.CreateJobRequest, context: Context
    ) -> operator_pb2.CreateJobResponse:
        spec = request.spec
        job_facts.check_job_id(spec.job_id, "spec.job_id")
        if not spec.owner:
            raise InvalidArgument("spec.owner is required", field="spec.owner")
        # Each viewer is kept, and shown, in its EIP-55 form.
        spec.viewers[:] = job_facts.check_viewers(spec.owner, spec.viewers)
        structlog.contextvars.bind_contextvars(job_id=spec.job_id, consumer=spec.owner)
        job = job_pb2.Job(
            name=job_facts.job_name(spec.job_id),
            owner=spec.owner,
            dataset_ids=[d.id for d in spec.datasets],
            algorithm_id=spec.algorithm.id,
            environment=spec.environment or "default",
            state=State.STATE_QUEUED,
            viewers=spec.viewers,
            result_selection=spec.results,
        )
        if delivery_rules.is_set(spec.delivery):
            job.delivery.CopyFrom(delivery_rules.pending(spec.delivery, spec.job_id))
        job.create_time.GetCurrentTime()
        job_facts.set_status_code(job)
        if not await self.store.insert(spec, job, time.time() + self.tracker.lease_s):
            existing = await self._owned(spec.job_id, spec.owner)
            return operator_pb2.CreateJobResponse(job=existing)
        try:
            response = await self.engine.RunJob(
                engine_pb2.RunJobRequest(spec=spec), timeout=UNARY_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            mapped = engine_error(error)
            if engine_refused(error):
                # The engine said no (a malformed spec, resources above the environment's, a
                # full queue): nothing runs, so nothing is kept; the caller hears why.
                await self.store.delete(spec.job_id)
                log.info("job refused by the engine", code=error.code().name, reason=mapped.reason)
                raise mapped from None
            # Not known to have reached the engine: recorded as failed, never lost.
            await self.tracker.end(
                spec.job_id,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_SANDBOX_FAILED,
                f"the job could not be started: {mapped.message}",
            )
            raise mapped from None
        # The engine's form (its limits, its queue position) is the registry's at once; from
        # here the tracker records every change the engine reports.
        await self.tracker.record(response.job)
        self.tracker.follow(spec.job_id)
        log.info("job created")
        return operator_pb2.CreateJobResponse(job=response.job)

    async def GetJob(
        self, request: operator_pb2.GetJobRequest, context: Context
    ) -> operator_pb2.GetJobResponse:
        return operator_pb2.GetJobResponse(job=await self._readable(request.job_id, request.owner))

    async def ListJobs(
        self, request: operator_pb2.ListJobsRequest, context: Context
    ) -> operator_pb2.ListJobsResponse:
        size = _page_size(request.page_size)
        before: int | None = None
        if request.page_token:
            try:
                before = int(base64.urlsafe_b64decode(request.page_token.encode()).decode())
            except ValueError as error:
                raise InvalidArgument("page_token is not valid", field="page_token") from error
        rows = await self.store.page(request.owner, size + 1, before)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = base64.urlsafe_b64encode(str(rows[-1][0]).encode()).decode()
        return operator_pb2.ListJobsResponse(jobs=[job for _, job in rows], next_page_token=token)

    async def WatchJob(
        self, request: operator_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[operator_pb2.WatchJobResponse]:
        await self._readable(request.job_id, request.owner)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        async for job in self.tracker.watch(request.job_id, request.owner):
            yield operator_pb2.WatchJobResponse(job=job)

    async def StreamJobLogs(
        self, request: operator_pb2.StreamJobLogsRequest, context: Context
    ) -> AsyncIterator[operator_pb2.StreamJobLogsResponse]:
        job = await self._readable(request.job_id, request.owner)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        if request.offset < 0:
            raise InvalidArgument("offset must not be negative", field="offset")
        # The log is one of the results: it expires with them.
        refuse_expired(job)
        try:
            stream = self.engine.StreamJobLogs(
                engine_pb2.StreamJobLogsRequest(job_id=request.job_id, offset=request.offset)
            )
            async for response in stream:
                yield operator_pb2.StreamJobLogsResponse(chunk=response.chunk)
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise  # the interceptor maps it, naming the engine
        # The engine no longer holds the log: serve the published copy (unless it expired
        # meanwhile: the engine forgets a job when its results expire).
        job = await self._readable(request.job_id, request.owner)
        refuse_expired(job)
        logs = [r for r in job.results if r.kind == job_pb2.ResultFile.KIND_ALGORITHM_LOG]
        if not logs:
            return
        offset = request.offset
        async for data in self.storage.read(request.job_id, result_key(logs[0]), offset):
            yield operator_pb2.StreamJobLogsResponse(
                chunk=job_pb2.LogChunk(
                    offset=offset,
                    next_offset=offset + len(data),
                    text=data.decode("utf-8", errors="replace"),
                )
            )
            offset += len(data)

    async def StopJob(
        self, request: operator_pb2.StopJobRequest, context: Context
    ) -> operator_pb2.StopJobResponse:
        job = await self._owned(request.job_id, request.owner)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        if job_facts.is_final(job.state):
            return operator_pb2.StopJobResponse(job=job)
        try:
            response = await self.engine.StopJob(
                engine_pb2.StopJobRequest(job_id=request.job_id), timeout=UNARY_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise  # the interceptor maps it, naming the engine
            await self.tracker.end(request.job_id, State.STATE_CANCELLED, 0, "stopped")
        else:
            await self.tracker.record(response.job)
        log.info("job stopped")
        return operator_pb2.StopJobResponse(job=await self._owned(request.job_id, request.owner))

    async def DeleteJob(
        self, request: operator_pb2.DeleteJobRequest, context: Context
    ) -> operator_pb2.DeleteJobResponse:
        job = await self._owned(request.job_id, request.owner)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        if not job_facts.is_final(job.state):
            raise FailedPrecondition(
                "the job is still running; stop it first", reason="JOB_NOT_FINAL"
            )
        try:
            await self.engine.DeleteJob(
                engine_pb2.DeleteJobRequest(job_id=request.job_id), timeout=UNARY_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise  # the interceptor maps it, naming the engine
        await self.storage.delete_job(request.job_id)
        await self.store.delete(request.job_id)
        log.info("job deleted")
        return operator_pb2.DeleteJobResponse()

    async def ReadResult(
        self, request: operator_pb2.ReadResultRequest, context: Context
    ) -> AsyncIterator[operator_pb2.ReadResultResponse]:
        job = await self._readable(request.job_id, request.owner)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        result = _result(job, request.index)
        if not 0 <= request.offset <= result.size_bytes:
            raise InvalidArgument("offset is outside the result", field="offset")
        tally = Tally(result.size_bytes, result.sha256)
        # Read from the start, the bytes before `offset` hashed but not sent, so that every
        # download is checked whole (in one read of the object, not two).
        async for data in self.storage.read(request.job_id, result_key(result)):
            position = tally.seen
            tally.add(data)
            if tally.seen > request.offset:
                skip = max(0, request.offset - position)
                yield operator_pb2.ReadResultResponse(offset=position + skip, data=data[skip:])
        if not tally.matches():
            log.error("stored result does not match its checksum", index=result.index)
            raise DataLoss("the stored result no longer matches its sha256; do not use it")

    async def GetResultUrl(
        self, request: operator_pb2.GetResultUrlRequest, context: Context
    ) -> operator_pb2.GetResultUrlResponse:
        job = await self._readable(request.job_id, request.owner)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        result = _result(job, request.index)
        key = result_key(result)
        filename = result.name.rpartition("/")[2] or f"result-{result.index}"
        # Signed first: signing makes no request, and a storage that hands out no URLs (local
        # disk) refuses here, before the check below would read the whole object for nothing.
        presigned = await self.storage.presign(request.job_id, key, filename=filename)
        if job.HasField("results_expire_time"):
            # Never beyond the results' own expiry: the sweeper deletes them then anyway.
            expiry = job.results_expire_time.ToDatetime(tzinfo=UTC)
            if presigned.expire_time > expiry:
                remaining = max(1, int((expiry - datetime.now(UTC)).total_seconds()))
                presigned = await self.storage.presign(
                    request.job_id, key, expires_s=remaining, filename=filename
                )
        # A URL skips our download path's checksum: the object must be the recorded one.
        await self.storage.check_object(request.job_id, key, result.size_bytes, result.sha256)
        response = operator_pb2.GetResultUrlResponse(url=presigned.url, result=result)
        response.expire_time.FromDatetime(presigned.expire_time)
        log.info("result url issued", index=result.index, expire_time=str(presigned.expire_time))
        return response

    async def ExportResults(
        self, request: operator_pb2.ExportResultsRequest, context: Context
    ) -> operator_pb2.ExportResultsResponse:
        job = await self._owned(request.job_id, request.owner)
        structlog.contextvars.bind_contextvars(job_id=request.job_id)
        if job.state != State.STATE_SUCCEEDED:
            raise FailedPrecondition(
                "only a succeeded job's outputs can be exported", reason="JOB_NOT_SUCCEEDED"
            )
        refuse_expired(job)
        if not job_facts.is_sha256_hex(request.dataset_id):
            raise InvalidArgument("dataset_id must be 64 lowercase hex digits", field="dataset_id")
        files = []
        for position, result in enumerate(
            job_facts.chosen_outputs(job, request.indexes, "indexes")
        ):
            # Checked against the recorded size and sha256 by the storage (DATA_LOSS).
            await self.storage.export_result(
                request.job_id,
                result_key(result),
                request.dataset_id,
                position,
                size=result.size_bytes,
                sha256=result.sha256,
            )
            files.append(
                job_pb2.ResultFile(
                    index=position,
                    name=result.name,
                    kind=job_pb2.ResultFile.KIND_OUTPUT,
                    size_bytes=result.size_bytes,
                    sha256=result.sha256,
                )
            )
        log.info("results exported", dataset_id=request.dataset_id, files=len(files))
        return operator_pb2.ExportResultsResponse(files=files)

    async def ListEnvironments(
        self, request: operator_pb2.ListEnvironmentsRequest, context: Context
    ) -> operator_pb2.ListEnvironmentsResponse:
        response = await self.engine.ListEnvironments(
            engine_pb2.ListEnvironmentsRequest(), timeout=UNARY_TIMEOUT
        )
        return operator_pb2.ListEnvironmentsResponse(environments=response.environments)


def _result(job: job_pb2.Job, index: int) -> job_pb2.ResultFile:
    """The job's result at `index`, once the caller may read it: NOT_FOUND once the results
    expired (RESULTS_EXPIRED) or when there is no such result."""
    refuse_expired(job)
    for result in job.results:
        if result.index == index:
            return result
    raise NotFound(f"job has no result {index}", reason="RESULT_NOT_FOUND")
