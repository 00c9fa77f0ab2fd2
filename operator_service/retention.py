"""Retention of results: when a final job's results expire, and the sweeper that deletes them.

A job's results expire at its end time plus its environment's `result_retention`, fixed once,
when the job is recorded final (`Retention.stamp`, called by the tracker whichever backend ran
the job); an environment without one keeps them until the job is deleted. The retention of each
environment is the engine's (ListEnvironments), cached here: asked again for a name not in the
cache and every few minutes. When the engine cannot be asked and the environment is not known,
the job is due at its end time and the sweeper decides then.

From their expiry on, results are refused (`refuse_expired`), even before the sweeper has
deleted them. The sweeper, once at start and then every `interval_s`, reads the jobs that are
due (an index on `results_due`, never every job) and for each: has the engine forget the job
(its workspace: logs, code, inputs and state files, the job's scratch space), deletes its
stored results, then marks it `results_expired`, which stops it being due. Every step may be
repeated: whatever fails, or a crash between steps, is taken up again at the next sweep, and
the job stays listed, with its results' names, sizes and checksums."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from datetime import UTC

import grpc
import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2, engine_pb2_grpc
from google.protobuf import timestamp_pb2

from mesh.errors import NotFound
from mesh.storage import Storage
from operator_service.store import JobStore

log = structlog.get_logger()

# The environments are listed again after this long, so that a changed retention is seen.
_LIST_MAX_AGE_S = 300.0
# After the engine failed to list them, no new attempt before this long: a job ending then
# (`engine lost`, say) is not held up by calls that fail again.
_LIST_RETRY_S = 5.0
_LIST_TIMEOUT_S = 5.0
_DELETE_TIMEOUT_S = 10.0
# Engine answers that mean it is out of reach: the rest of that sweep does not ask it again.
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_PAGE = 100
_NANOS = 1_000_000_000


def _iso(timestamp: timestamp_pb2.Timestamp) -> str:
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def results_gone(job: job_pb2.Job) -> bool:
    """Whether the job's results have expired (deleted, or due to be at the next sweep)."""
    if job.results_expired:
        return True
    if not job.HasField("results_expire_time"):
        return False
    return job.results_expire_time.ToNanoseconds() <= time.time_ns()


def refuse_expired(job: job_pb2.Job) -> None:
    """NOT_FOUND (RESULTS_EXPIRED), saying when, once the job's results have expired: from
    their expiry time on, whether or not the sweeper has deleted them yet. For every read of
    a job's results or published logs (ReadResult, StreamJobLogs, GetResultUrl)."""
    if not results_gone(job):
        return
    when = f" at {_iso(job.results_expire_time)}" if job.HasField("results_expire_time") else ""
    raise NotFound(
        f"the job's results expired{when} and are deleted; the job still lists their names, "
        "sizes and checksums",
        reason="RESULTS_EXPIRED",
    )


def expire_ns(job: job_pb2.Job, retention_s: float) -> int | None:
    """When a final job's results expire (nanoseconds since the epoch): its end time plus
    `retention_s`; None for a retention of 0 (kept until the job is deleted)."""
    if retention_s <= 0:
        return None
    end = job.end_time.ToNanoseconds() if job.HasField("end_time") else time.time_ns()
    return end + round(retention_s * _NANOS)


class Retention:
    """Each environment's result retention, as the engine lists them, and the expiry it gives
    a final job."""

    def __init__(self, engine: engine_pb2_grpc.EngineServiceAsyncStub) -> None:
        self.engine = engine
        self._seconds: dict[str, float] = {}
        self._listed_at: float | None = None  # time.monotonic() of the last list
        self._failed_at: float | None = None  # of the last failure, unless a list came since
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Lists the engine's environments again, unless they were listed while this call
        waited or a list failed moments ago (a failure is logged; the cache stays)."""
        asked = time.monotonic()
        async with self._lock:
            if self._listed_at is not None and self._listed_at >= asked:
                return  # listed while this call waited for the lock
            if self._failed_at is not None and asked - self._failed_at < _LIST_RETRY_S:
                return
            try:
                response = await self.engine.ListEnvironments(
                    engine_pb2.ListEnvironmentsRequest(), timeout=_LIST_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as error:
                self._failed_at = time.monotonic()
                log.warning(
                    "could not list the engine's environments for their result retention",
                    code=error.code().name,
                )
                return
            self._seconds = {
                env.name: env.result_retention.ToNanoseconds() / _NANOS
                for env in response.environments
            }
            self._listed_at = time.monotonic()
            self._failed_at = None

    async def seconds(self, environment: str) -> float | None:
        """The environment's retention in seconds, 0 when results are kept until the job is
        deleted (an environment the engine does not list keeps them too); None when it is not
        known and the engine cannot be asked now."""
        stale = self._listed_at is None or time.monotonic() - self._listed_at > _LIST_MAX_AGE_S
        if stale or environment not in self._seconds:
            await self.refresh()
        if environment in self._seconds:
            return self._seconds[environment]
        if self._failed_at is not None or self._listed_at is None:
            return None
        log.warning("the engine lists no such environment; results kept", environment=environment)
        return 0.0

    async def stamp(self, job: job_pb2.Job) -> float | None:
        """For a job recorded final: sets its `results_expire_time` (unless set) and returns
        when the sweeper is due to act on its results (unix time): at their expiry; at the
        job's end when its environment's retention cannot be learnt now (the sweeper asks
        again); None when nothing is due (kept until the job is deleted, or deleted already)."""
        if job.results_expired:
            return None
        if not job.HasField("results_expire_time"):
            retention_s = await self.seconds(job.environment)
            if retention_s is None:
                end = job.end_time.ToNanoseconds() if job.HasField("end_time") else time.time_ns()
                return end / _NANOS
            expires = expire_ns(job, retention_s)
            if expires is None:
                return None
            job.results_expire_time.FromNanoseconds(expires)
        return job.results_expire_time.ToNanoseconds() / _NANOS


class _Outcome(enum.Enum):
    EXPIRED = "expired"  # engine, storage and registry done
    RETRY = "retry"  # something failed or could not be asked: the next sweep tries again
    SCHEDULED = "scheduled"  # its retention is now known: due later, or never
    GONE = "gone"  # deleted meanwhile


class Sweeper:
    """Deletes the results and scratch space of jobs whose results expired (see the top)."""

    def __init__(
        self,
        store: JobStore,
        engine: engine_pb2_grpc.EngineServiceAsyncStub,
        storage: Storage,
        retention: Retention,
        interval_s: float,
    ) -> None:
        self.store = store
        self.engine = engine
        self.storage = storage
        self.retention = retention
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sweeps now, then every `interval_s`, until `close`."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="retention-sweeper")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        try:
            # Known before the first job ends, so that ending one while the engine is out of
            # reach (`engine lost`) need not ask it.
            await self.retention.refresh()
        except Exception:
            log.exception("could not list the engine's environments; asking again when needed")
        while True:
            try:
                await self.sweep()
            except Exception:
                # The sweeper outlives any one failure (the registry busy, say).
                log.exception("retention sweep failed; trying again at the next")
            await asyncio.sleep(self.interval_s)

    async def sweep(self) -> int:
        """One pass over the jobs due now. Returns how many jobs' results it deleted."""
        started = time.perf_counter()
        now_ns = time.time_ns()
        counts = dict.fromkeys(_Outcome, 0)
        engine_reachable = True
        after: tuple[float, str] | None = None
        while True:
            page = await self.store.due(now_ns / _NANOS, _PAGE, after)
            for _, job_id in page:
                with structlog.contextvars.bound_contextvars(job_id=job_id):
                    try:
                        outcome, engine_reachable = await self._expire(
                            job_id, now_ns, engine_reachable
                        )
                    except Exception:
                        log.exception("could not expire the job's results; trying again later")
                        outcome = _Outcome.RETRY
                counts[outcome] += 1
            if len(page) < _PAGE:
                break
            after = page[-1]
        if any(counts.values()):
            log.info(
                "retention sweep",
                expired=counts[_Outcome.EXPIRED],
                retrying=counts[_Outcome.RETRY],
                scheduled=counts[_Outcome.SCHEDULED],
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
        return counts[_Outcome.EXPIRED]

    async def _expire(
        self, job_id: str, now_ns: int, engine_reachable: bool
    ) -> tuple[_Outcome, bool]:
        """Deletes one due job's scratch space and results and marks them expired; with
        whether the engine is still thought reachable."""
        job = await self.store.job(job_id)
        if job is None:
            return _Outcome.GONE, engine_reachable
        if not job.HasField("results_expire_time"):
            # Its retention was not known when it ended: decided now, when it can be.
            retention_s = await self.retention.seconds(job.environment)
            if retention_s is None:
                return _Outcome.RETRY, engine_reachable
            expires = expire_ns(job, retention_s)
            await self.store.set_expiry(job_id, expires)
            if expires is None or expires > now_ns:
                return _Outcome.SCHEDULED, engine_reachable
            job.results_expire_time.FromNanoseconds(expires)
        forgotten = False
        if engine_reachable:
            forgotten, engine_reachable = await self._forget_on_engine(job_id)
        # Even when the engine could not forget the job: results are not kept past their time
        # for want of an engine. Deleting them again at the next sweep costs little.
        try:
            await self.storage.delete_job(job_id)
        except Exception as error:
            log.warning(
                "could not delete expired results; trying again at the next sweep",
                job_id=job_id,
                error=f"{type(error).__name__}: {error}",
            )
            return _Outcome.RETRY, engine_reachable
        if not forgotten:
            return _Outcome.RETRY, engine_reachable
        await self.store.mark_expired(job_id)
        log.info(
            "results expired",
            job_id=job_id,
            expire_time=_iso(job.results_expire_time),
            results=len(job.results),
        )
        return _Outcome.EXPIRED, engine_reachable

    async def _forget_on_engine(self, job_id: str) -> tuple[bool, bool]:
        """Has the engine forget the job and remove its scratch space: (done, whether the
        engine is still thought reachable)."""
        try:
            await self.engine.DeleteJob(
                engine_pb2.DeleteJobRequest(job_id=job_id), timeout=_DELETE_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return True, True  # forgotten already (an earlier sweep, or a new engine)
            # FAILED_PRECONDITION: the engine still runs a job this service ended (`engine
            # lost`); it will publish, so the job is done only once the engine has let go.
            log.warning(
                "the engine did not delete the job's scratch space; trying again at the next sweep",
                job_id=job_id,
                code=code.name,
            )
            return False, code not in _UNREACHABLE
        return True, True
