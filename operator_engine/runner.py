"""Runs jobs: queues them per environment, then configure -> compute -> publish, and keeps
each job's state and live log for watchers.

The engine holds jobs in memory; a job it does not know after a restart is reported NOT_FOUND,
and the Operator Service then ends it `failed: engine lost`, so no job is left hanging."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import duration_pb2

from mesh import jobs as job_facts
from mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from mesh.storage import Storage
from operator_engine.config import EngineConfig, EnvironmentSpec
from operator_engine.sandbox import Limits, Mount, Outcome, Sandbox, SandboxSpec
from pods import workspace as layout
from pods.configure import AlgorithmProvisioningError, ProvisioningError, configure
from pods.publish import publish

log = structlog.get_logger()
State = job_pb2.Job.State

_OUTCOME_REASON = {
    Outcome.EXIT_NONZERO: job_pb2.FAILURE_REASON_ALGORITHM_EXIT_NONZERO,
    Outcome.TIMED_OUT: job_pb2.FAILURE_REASON_TIMED_OUT,
    Outcome.OUT_OF_MEMORY: job_pb2.FAILURE_REASON_OUT_OF_MEMORY,
    Outcome.TOO_MANY_PROCESSES: job_pb2.FAILURE_REASON_TOO_MANY_PROCESSES,
    Outcome.DISK_FULL: job_pb2.FAILURE_REASON_DISK_FULL,
    Outcome.SANDBOX_FAILED: job_pb2.FAILURE_REASON_SANDBOX_FAILED,
}
_LOG_CHUNK = 64 * 1024


@dataclass
class EngineJob:
    """One job and what watchers wait on."""

    spec: engine_pb2.JobSpec
    job: job_pb2.Job
    workspace: Path
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    log_size: int = 0
    log_dropped: bool = False
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def log_path(self) -> Path:
        return self.workspace / layout.LOGS / layout.ALGORITHM_LOG

    async def update(self, **fields: object) -> None:
        """Changes the job and wakes every watcher."""
        async with self.changed:
            for key, value in fields.items():
                setattr(self.job, key, value)
            job_facts.set_status_code(self.job)
            self.changed.notify_all()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class Runner:
    """Owns every job of this engine."""

    def __init__(self, config: EngineConfig, sandbox: Sandbox, storage: Storage) -> None:
        self.config = config
        self.sandbox = sandbox
        self.storage = storage
        self.environments = {env.name: env for env in config.environments}
        self.jobs: dict[str, EngineJob] = {}
        self._slots = {
            env.name: asyncio.Semaphore(env.max_concurrent_jobs) for env in config.environments
        }
        self._waiting: dict[str, list[str]] = {env.name: [] for env in config.environments}

    # -- the API -------------------------------------------------------------------------

    def environment_list(self) -> list[job_pb2.Environment]:
        return [_environment_message(env) for env in self.environments.values()]

    async def submit(self, spec: engine_pb2.JobSpec) -> job_pb2.Job:
        job_facts.check_job_id(spec.job_id, "spec.job_id")
        existing = self.jobs.get(spec.job_id)
        if existing is not None:
            return existing.job
        env_name = spec.environment or "default"
        if env_name not in self.environments:
            raise NotFound(f"no environment named {env_name!r}", reason="ENVIRONMENT_NOT_FOUND")
        if not spec.datasets:
            raise InvalidArgument("a job needs at least one dataset", field="spec.datasets")
        job = job_pb2.Job(
            name=job_facts.job_name(spec.job_id),
            owner=spec.owner,
            dataset_ids=[d.id for d in spec.datasets],
            algorithm_id=spec.algorithm.id,
            environment=env_name,
            state=State.STATE_QUEUED,
            exit_code=0,
        )
        job.create_time.GetCurrentTime()
        job_facts.set_status_code(job)
        entry = EngineJob(spec=spec, job=job, workspace=self.config.workspace_root / spec.job_id)
        self.jobs[spec.job_id] = entry
        self._waiting[env_name].append(spec.job_id)
        entry.task = asyncio.create_task(self._run(entry), name=f"job-{spec.job_id}")
        log.info("job accepted", job_id=spec.job_id, environment=env_name)
        return job

    def get(self, job_id: str) -> EngineJob:
        entry = self.jobs.get(job_id)
        if entry is None:
            raise NotFound("no such job on this engine", reason="JOB_NOT_FOUND")
        return entry

    async def watch(self, job_id: str) -> AsyncIterator[job_pb2.Job]:
        """The job now, then after every change; ends after a final state."""
        entry = self.get(job_id)
        last: bytes | None = None
        while True:
            async with entry.changed:
                snapshot = entry.job.SerializeToString(deterministic=True)
                if snapshot == last:
                    await entry.changed.wait()
                    continue
            last = snapshot
            job = job_pb2.Job.FromString(snapshot)
            yield job
            if job_facts.is_final(job.state):
                return

    async def stream_log(self, job_id: str, offset: int) -> AsyncIterator[job_pb2.LogChunk]:
        """The algorithm log from `offset`, live; ends once the job is final and all is sent."""
        if offset < 0:
            raise InvalidArgument("offset must not be negative", field="offset")
        entry = self.get(job_id)
        position = offset  # how far the file has been read
        sent = offset  # where the next chunk starts; `pending` holds the bytes in between
        pending = b""
        while True:
            async with entry.changed:
                final = job_facts.is_final(entry.job.state)
                available = entry.log_size
                if position >= available and not final:
                    await entry.changed.wait()
                    continue
            if position < available:
                data = await asyncio.to_thread(_read_at, entry.log_path, position, _LOG_CHUNK)
                if not data:
                    return  # the workspace is gone: nothing more to send
                position += len(data)
                at_end = final and position >= available
                complete, pending = split_utf8(pending + data, final=at_end)
                if complete:
                    yield job_pb2.LogChunk(
                        offset=sent,
                        next_offset=sent + len(complete),
                        text=complete.decode("utf-8", errors="replace"),
                    )
                    sent += len(complete)
                continue
            if pending:
                yield job_pb2.LogChunk(
                    offset=sent,
                    next_offset=sent + len(pending),
                    text=pending.decode("utf-8", errors="replace"),
                )
            return

    async def stop(self, job_id: str) -> job_pb2.Job:
        entry = self.get(job_id)
        if not job_facts.is_final(entry.job.state):
            log.info("stop requested", job_id=job_id)
            entry.cancel.set()
            if entry.task is not None:
                await asyncio.shield(_wait_quietly(entry.task))
        return entry.job

    async def delete(self, job_id: str) -> None:
        entry = self.get(job_id)
        if not job_facts.is_final(entry.job.state):
            raise FailedPrecondition("the job is still running; stop it first")
        del self.jobs[job_id]
        await asyncio.to_thread(shutil.rmtree, entry.workspace, True)
        log.info("job deleted", job_id=job_id)

    async def close(self) -> None:
        """Cancels every job (the engine is stopping); their sandboxes die with the engine."""
        for entry in self.jobs.values():
            entry.cancel.set()
        tasks = [e.task for e in self.jobs.values() if e.task is not None and not e.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # -- one job -------------------------------------------------------------------------

    async def _run(self, entry: EngineJob) -> None:
        job_id = entry.spec.job_id
        env = self.environments[entry.job.environment]
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                await self._queue(entry, env)
            except asyncio.CancelledError:
                await self._finish(entry, State.STATE_CANCELLED, message="stopped while queued")
                return
            slot = self._slots[env.name]
            try:
                await self._stages(entry, env)
            except Exception:
                log.exception("job crashed in the engine")
                await self._finish(
                    entry,
                    State.STATE_FAILED,
                    reason=job_pb2.FAILURE_REASON_SANDBOX_FAILED,
                    message="internal engine error; the operator has the details",
                )
            finally:
                slot.release()
                self._waiting_changed(env.name)

    async def _queue(self, entry: EngineJob, env: EnvironmentSpec) -> None:
        slot = self._slots[env.name]
        self._waiting_changed(env.name)
        acquire = asyncio.ensure_future(slot.acquire())
        cancel = asyncio.ensure_future(entry.cancel.wait())
        try:
            done, _ = await asyncio.wait({acquire, cancel}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancel.cancel()
            self._waiting[env.name].remove(entry.spec.job_id)
        if acquire not in done:
            acquire.cancel()
            # The acquire may have won the race after all: give the slot back.
            if acquire.done() and not acquire.cancelled():
                slot.release()
            self._waiting_changed(env.name)
            raise asyncio.CancelledError
        self._waiting_changed(env.name)

    def _waiting_changed(self, env_name: str) -> None:
        for position, job_id in enumerate(self._waiting[env_name], start=1):
            entry = self.jobs.get(job_id)
            if entry is not None and entry.job.queue_position != position:
                entry.job.queue_position = position
                asyncio.get_running_loop().create_task(entry.notify())

    async def _stages(self, entry: EngineJob, env: EnvironmentSpec) -> None:
        job_id = entry.spec.job_id
        ws = entry.workspace
        started = time.perf_counter()
        await asyncio.to_thread(_make_workspace, ws)
        entry.job.start_time.GetCurrentTime()
        await entry.update(state=State.STATE_CONFIGURING, queue_position=0)

        try:
            prepared = await asyncio.to_thread(configure, entry.spec, ws, self.config.data_root)
        except ProvisioningError as error:
            reason = (
                job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED
                if isinstance(error, AlgorithmProvisioningError)
                else job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
            )
            log.info("configure failed", reason=str(error))
            await self._publish_and_finish(entry, env, State.STATE_FAILED, reason, str(error))
            return
        if entry.cancel.is_set():
            await self._publish_and_finish(entry, env, State.STATE_CANCELLED, 0, "stopped")
            return

        await entry.update(state=State.STATE_RUNNING)
        log_file = await asyncio.to_thread(open, entry.log_path, "ab")
        try:

            async def on_output(data: bytes) -> None:
                await self._append_log(entry, log_file, data)

            result = await self.sandbox.run(
                SandboxSpec(
                    job_id=job_id,
                    mounts=[
                        Mount(
                            host_path=m.host_path, sandbox_path=m.sandbox_path, writable=m.writable
                        )
                        for m in prepared.mounts
                    ],
                    argv=prepared.argv,
                    env=prepared.env,
                    limits=Limits(
                        cpus=env.cpus,
                        memory_bytes=env.memory_bytes,
                        disk_bytes=env.disk_bytes,
                        max_processes=env.max_processes,
                        max_duration_s=env.max_duration_s,
                        network=entry.spec.allow_network and env.network_allowed,
                    ),
                ),
                on_output,
                entry.cancel,
            )
        finally:
            await asyncio.to_thread(log_file.close)
        log.info(
            "compute ended",
            outcome=result.outcome.name,
            exit_code=result.exit_code,
            duration_ms=round(result.duration_s * 1000, 1),
        )
        entry.job.exit_code = result.exit_code

        if result.outcome is Outcome.CANCELLED:
            await self._publish_and_finish(entry, env, State.STATE_CANCELLED, 0, "stopped")
        elif result.outcome is Outcome.OK:
            await self._publish_and_finish(entry, env, State.STATE_SUCCEEDED, 0, "")
        else:
            reason = _OUTCOME_REASON[result.outcome]
            await self._publish_and_finish(entry, env, State.STATE_FAILED, reason, result.detail)
        log.info("job done", total_ms=round((time.perf_counter() - started) * 1000, 1))

    async def _append_log(self, entry: EngineJob, log_file: object, data: bytes) -> None:
        room = self.config.log_cap_bytes - entry.log_size
        if room <= 0:
            if not entry.log_dropped:
                entry.log_dropped = True
                log.warning("algorithm log cap reached; dropping the rest")
            return
        data = data[:room]
        await asyncio.to_thread(_write_flush, log_file, data)
        entry.log_size += len(data)
        await entry.notify()

    async def _publish_and_finish(
        self, entry: EngineJob, env: EnvironmentSpec, state: int, reason: int, message: str
    ) -> None:
        await entry.update(state=State.STATE_PUBLISHING)
        try:
            published = await publish(
                entry.workspace,
                self.storage,
                entry.spec.job_id,
                max_files=env.max_output_files,
                max_total_bytes=env.disk_bytes,
            )
        except Exception as error:
            log.exception("publish failed")
            await self._finish(
                entry,
                State.STATE_FAILED,
                reason=job_pb2.FAILURE_REASON_PUBLISH_FAILED,
                message=f"results could not be stored: {type(error).__name__}",
            )
            return
        entry.job.results.extend(published.results)
        if published.too_large and state == State.STATE_SUCCEEDED:
            state = State.STATE_FAILED
            reason = job_pb2.FAILURE_REASON_OUTPUT_TOO_LARGE
            message = "the outputs exceed the environment's limit; the publish log lists them"
        # Outputs are in storage now; the workspace keeps only the logs for live readers.
        await asyncio.to_thread(shutil.rmtree, entry.workspace / layout.OUTPUTS, True)
        await self._finish(entry, state, reason=reason, message=message)

    async def _finish(
        self, entry: EngineJob, state: int, *, reason: int = 0, message: str = ""
    ) -> None:
        entry.job.end_time.GetCurrentTime()
        if not message and reason:
            message = job_facts.format_reason(reason)
        await entry.update(state=state, failure_reason=reason, message=message, queue_position=0)
        log.info(
            "job final",
            state=job_pb2.Job.State.Name(state),  # type: ignore[arg-type]
            failure_reason=reason,
        )


def _environment_message(env: EnvironmentSpec) -> job_pb2.Environment:
    return job_pb2.Environment(
        name=env.name,
        cpus=env.cpus,
        memory_bytes=env.memory_bytes,
        disk_bytes=env.disk_bytes,
        max_processes=env.max_processes,
        max_duration=duration_pb2.Duration(seconds=int(env.max_duration_s)),
        max_concurrent_jobs=env.max_concurrent_jobs,
        network_allowed=env.network_allowed,
        free=env.free,
    )


def _make_workspace(ws: Path) -> None:
    ws.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ws.mkdir(mode=0o700, exist_ok=True)
    for sub in (layout.OUTPUTS, layout.LOGS):
        (ws / sub).mkdir(mode=0o755, exist_ok=True)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        return b""


def _write_flush(f: object, data: bytes) -> None:
    f.write(data)  # type: ignore[attr-defined]
    f.flush()  # type: ignore[attr-defined]


async def _wait_quietly(task: asyncio.Task[None]) -> None:
    # The job's own task reports its errors; the stopper only waits for it to end.
    with contextlib.suppress(BaseException):
        await task


def split_utf8(data: bytes, *, final: bool) -> tuple[bytes, bytes]:
    """Splits `data` into a part that ends on a character boundary and the incomplete tail,
    so that a log chunk never cuts a multi-byte character in two."""
    if final or not data:
        return data, b""
    # A UTF-8 sequence is at most 4 bytes: only the last 3 can be an unfinished one.
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            if need > back:
                return data[:-back], data[-back:]
            return data, b""
    return data, b""
