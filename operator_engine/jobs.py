"""The engine's jobs as both backends keep them (the local Runner and the Kubernetes backend):
the job table by id, each environment's queue (its slots, the jobs waiting in turn, the bounds
on how many wait and for how long), the algorithm log within its cap, and what readers get of
a job (the job, each change, the live log), and the delivery of its results to the consumer's
own storage, between its publishing and its final state (`JobBook._settle_delivery`). A
backend adds how a job runs and where its state is kept (`JobBook._accept`, `_keep`,
`_forget`).

A delivery's secrets (keys, upload URLs) live only in the job's spec in memory: every copy a
backend keeps (`mesh.delivery.stored_spec`) holds the destination without them, so a job
picked up again after a restart has none, and its delivery ends failed, saying so."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from mesh import delivery as delivery_rules
from mesh import jobs as job_facts
from mesh.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from operator_engine import delivery
from operator_engine.config import EngineConfig, EnvironmentSpec
from operator_engine.private_log import split_utf8
from pods import workspace as layout

if TYPE_CHECKING:
    from mesh.storage import Storage
    from operator_engine.images import PreparedImage

log = structlog.get_logger()
State = job_pb2.Job.State

_LOG_CHUNK = 64 * 1024
# While a job is not final, watchers hear from it at least this often: the Operator Service
# renews the job's lease with each message and ends the job when the engine falls silent.
HEARTBEAT_S = 2.0
_NANOS = 1_000_000_000


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
    # Local backend: the job's own disk, holding its outputs from compute until they are
    # published.
    disk: Path | None = None
    # Local backend: the container image its algorithm runs in, in use from configure to the
    # job's end.
    image: PreparedImage | None = None
    # Kubernetes backend: how much of the pod's own log (before filtering) the log holds.
    raw_log_size: int = 0
    # How its delivery ended, once it has (see JobBook._settle_delivery).
    delivered: job_pb2.DeliveryStatus | None = None

    @property
    def log_path(self) -> Path:
        return self.workspace / layout.LOGS / layout.ALGORITHM_LOG

    async def update(self, **fields: object) -> bytes:
        """Changes the job and wakes every watcher; returns the job as it is now, serialized."""
        async with self.changed:
            set_fields(self.job, fields)
            job_facts.set_status_code(self.job)
            snapshot = self.job.SerializeToString()
            self.changed.notify_all()
        return snapshot

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


def set_fields(job: job_pb2.Job, fields: dict[str, object]) -> None:
    """Sets the job's fields, message fields (its delivery) by copy."""
    for key, value in fields.items():
        if isinstance(value, Message):
            getattr(job, key).CopyFrom(value)
        else:
            setattr(job, key, value)


class QueueStopped(Exception):
    """The job was stopped (or the engine stops) while it waited in the queue."""


class QueueTimeout(Exception):
    """The job waited its environment's longest wait in the queue."""


class JobBook(abc.ABC):
    """Owns every job of this engine, whichever backend runs it (see the module docstring)."""

    # Named in the log line of each job accepted.
    backend: ClassVar[str]
    # Where the job's results are stored, for the delivery to read them back.
    storage: Storage

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.environments = {env.name: env for env in config.environments}
        self.jobs: dict[str, EngineJob] = {}
        self._slots = {
            env.name: asyncio.Semaphore(env.max_concurrent_jobs) for env in config.environments
        }
        self._waiting: dict[str, list[str]] = {env.name: [] for env in config.environments}
        # Jobs holding a slot, per environment: the queue's length is what waits beyond them.
        self._holding: dict[str, int] = {env.name: 0 for env in config.environments}
        # Set while the engine shuts down: what then becomes of its jobs is each backend's
        # own (see its close).
        self.stopping = False

    # -- the API -------------------------------------------------------------------------

    def environment_list(self) -> list[job_pb2.Environment]:
        return [environment_message(env) for env in self.environments.values()]

    async def submit(self, spec: engine_pb2.JobSpec) -> job_pb2.Job:
        """Accepts a job (idempotent by id) and queues it."""
        job_facts.check_job_id(spec.job_id, "spec.job_id")
        existing = self.jobs.get(spec.job_id)
        if existing is not None:
            return existing.job
        env, job = new_job(spec, self.environments)
        self._check_spec(spec)
        self._check_queue(env)
        await self._accept(spec, job)
        log.info("job accepted", job_id=spec.job_id, environment=env.name, backend=self.backend)
        return job

    def get(self, job_id: str) -> EngineJob:
        entry = self.jobs.get(job_id)
        if entry is None:
            raise NotFound("no such job on this engine", reason="JOB_NOT_FOUND")
        return entry

    def watch(self, job_id: str) -> AsyncIterator[job_pb2.Job]:
        """The job now, then after every change; ends after a final state."""
        return _watch(self.get(job_id))

    def stream_log(self, job_id: str, offset: int) -> AsyncIterator[job_pb2.LogChunk]:
        """The algorithm log from `offset`, live; ends once the job is final and all is sent."""
        if offset < 0:
            raise InvalidArgument("offset must not be negative", field="offset")
        return _stream_log(self.get(job_id), offset)

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
        if entry.task is not None:
            # Its cleanup after the final state (the spec rewritten, its disk released) ends
            # first: removing the workspace under it would race it.
            await asyncio.shield(_wait_quietly(entry.task))
        await self._forget(entry)
        await asyncio.to_thread(shutil.rmtree, entry.workspace, True)
        log.info("job deleted", job_id=job_id)

    # -- what a backend adds ---------------------------------------------------------------

    def _check_spec(self, spec: engine_pb2.JobSpec) -> None:
        """Refuses a spec that this backend cannot run, beyond what every backend refuses
        (none, unless the backend says so)."""
        return None

    @abc.abstractmethod
    async def _accept(self, spec: engine_pb2.JobSpec, job: job_pb2.Job) -> None:
        """Keeps the new job and starts its task."""

    @abc.abstractmethod
    async def _keep(self, entry: EngineJob, **fields: object) -> None:
        """Changes the job, keeps it where this backend keeps its jobs, and wakes its
        watchers."""

    @abc.abstractmethod
    async def _forget(self, entry: EngineJob) -> None:
        """Removes what the backend keeps of a deleted job, but its workspace."""

    # -- one job -------------------------------------------------------------------------

    def _launch(self, entry: EngineJob, run: Coroutine[Any, Any, None]) -> None:
        self.jobs[entry.spec.job_id] = entry
        entry.task = asyncio.create_task(run, name=f"job-{entry.spec.job_id}")

    async def _finish(
        self, entry: EngineJob, state: int, reason: int = 0, message: str = ""
    ) -> None:
        """Keeps the job's final state, with its end time and, when no message is given, its
        reason's; a delivery asked for is over first, and kept with it."""
        delivered = await self._settle_delivery(entry)
        entry.job.end_time.GetCurrentTime()
        if not message and reason:
            message = job_facts.format_reason(reason)
        fields: dict[str, object] = {"delivery": delivered} if delivered is not None else {}
        await self._keep(
            entry,
            state=state,
            failure_reason=reason,
            message=message,
            queue_position=0,
            **fields,
        )
        log.info(
            "job final",
            state=job_pb2.Job.State.Name(state),  # type: ignore[arg-type]
            failure_reason=reason,
        )

    async def _settle_delivery(self, entry: EngineJob) -> job_pb2.DeliveryStatus | None:
        """Delivers the job's results (those it lists now) to the consumer's storage when it
        asked for it, once: the outcome, for its final state; None when no delivery was asked.
        The job stays as it is meanwhile (PUBLISHING, once published). Its secrets are
        dropped from memory afterwards."""
        if entry.job.delivery.state != job_pb2.DeliveryStatus.STATE_PENDING:
            return None
        if entry.delivered is None:
            target = entry.spec.delivery
            if self.stopping:
                entry.delivered = delivery.failed(
                    target, entry.spec.job_id, delivery.ENGINE_STOPPED
                )
            else:
                entry.delivered = await delivery.deliver(
                    self.storage,
                    entry.spec.job_id,
                    list(entry.job.results),
                    target,
                    self.config.delivery,
                )
            # A spec kept without its delivery (a recovered job) still has its destination.
            entry.delivered.destination = (
                entry.delivered.destination or entry.job.delivery.destination
            )
            entry.spec.delivery.CopyFrom(delivery_rules.without_secrets(target))
        return entry.delivered

    async def _append_log(
        self, entry: EngineJob, data: bytes, write: Callable[[bytes], object]
    ) -> None:
        """Adds `data` to the job's algorithm log through `write`, up to the engine's cap (the
        rest is dropped, and said once), and wakes its readers."""
        room = self.config.log_cap_bytes - entry.log_size
        if room <= 0:
            if not entry.log_dropped:
                entry.log_dropped = True
                log.warning("algorithm log cap reached; dropping the rest")
            return
        data = data[:room]
        write(data)
        entry.log_size += len(data)
        await entry.notify()

    # -- the queue -----------------------------------------------------------------------

    def _check_queue(self, env: EnvironmentSpec) -> None:
        """RESOURCE_EXHAUSTED when one more job would wait beyond the environment's bound. Jobs
        just accepted that a free slot will take at once are in the waiting list too, for a
        moment: the free slots make up for them."""
        free = env.max_concurrent_jobs - self._holding[env.name]
        if len(self._waiting[env.name]) + 1 - free > env.max_queued_jobs:
            raise ResourceExhausted(
                f"the queue of environment {env.name!r} is full ({env.max_queued_jobs} jobs "
                "waiting); try again later",
                reason="QUEUE_FULL",
            )

    def _enqueue(self, entry: EngineJob) -> None:
        """Puts the job last in its environment's queue, for `_take_slot`."""
        self._waiting[entry.job.environment].append(entry.spec.job_id)

    async def _take_slot(self, entry: EngineJob, env: EnvironmentSpec) -> None:
        """Waits in the queue (`_enqueue`) for a slot in the environment, held until
        `_give_slot`. Raises QueueStopped when the job is stopped first, QueueTimeout once it
        has waited the environment's longest wait, counted from its creation (an engine
        restart does not start it again)."""
        slot = self._slots[env.name]
        waiting = self._waiting[env.name]
        created = entry.job.create_time.ToNanoseconds() / 1e9
        remaining = created + env.max_queue_wait_s - time.time()
        if remaining <= 0 and not entry.cancel.is_set():
            waiting.remove(entry.spec.job_id)
            self._waiting_changed(env.name)
            raise QueueTimeout
        if waiting[0] == entry.spec.job_id and not slot.locked() and not entry.cancel.is_set():
            # A free slot and nobody ahead: taken at once, without the race below, which costs
            # a few turns of the event loop and would show the job at queue position 1. (The
            # jobs behind it have not queued yet: each one's own _take_slot sets its position.)
            await slot.acquire()  # does not wait: the slot is free
            waiting.pop(0)
            self._holding[env.name] += 1
            return
        self._waiting_changed(env.name)
        acquire = asyncio.ensure_future(slot.acquire())
        cancel = asyncio.ensure_future(entry.cancel.wait())
        try:
            done, _ = await asyncio.wait(
                {acquire, cancel}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            cancel.cancel()
            waiting.remove(entry.spec.job_id)
        if acquire not in done:
            acquire.cancel()
            # The acquire may have won the race after all: give the slot back.
            if acquire.done() and not acquire.cancelled():
                slot.release()
            self._waiting_changed(env.name)
            if entry.cancel.is_set():
                raise QueueStopped
            raise QueueTimeout
        self._holding[env.name] += 1
        self._waiting_changed(env.name)

    async def _hold_slot(self, env: EnvironmentSpec) -> None:
        """Takes a slot in the environment without queueing, held until `_give_slot`."""
        await self._slots[env.name].acquire()
        self._holding[env.name] += 1

    def _give_slot(self, env: EnvironmentSpec) -> None:
        self._slots[env.name].release()
        self._holding[env.name] -= 1
        self._waiting_changed(env.name)

    def _waiting_changed(self, env_name: str) -> None:
        for position, job_id in enumerate(self._waiting[env_name], start=1):
            entry = self.jobs.get(job_id)
            if entry is not None and entry.job.queue_position != position:
                entry.job.queue_position = position
                asyncio.get_running_loop().create_task(entry.notify())


async def _watch(entry: EngineJob) -> AsyncIterator[job_pb2.Job]:
    """The job now, then after every change (at least every HEARTBEAT_S); ends after a final
    state."""
    last: bytes | None = None
    while True:
        async with entry.changed:
            snapshot = entry.job.SerializeToString(deterministic=True)
            if snapshot == last:
                try:
                    await asyncio.wait_for(entry.changed.wait(), HEARTBEAT_S)
                except TimeoutError:
                    last = None  # nothing changed: send it again, as a heartbeat
                continue
        last = snapshot
        job = job_pb2.Job.FromString(snapshot)
        yield job
        if job_facts.is_final(job.state):
            return


async def _stream_log(entry: EngineJob, offset: int) -> AsyncIterator[job_pb2.LogChunk]:
    """The algorithm log kept at `entry.log_path` from `offset`, live; ends once the job is
    final and all is sent."""
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


def new_job(
    spec: engine_pb2.JobSpec, environments: dict[str, EnvironmentSpec]
) -> tuple[EnvironmentSpec, job_pb2.Job]:
    """The job a valid spec makes, QUEUED in its environment; NOT_FOUND for an unknown
    environment, INVALID_ARGUMENT for a spec no backend may run."""
    env_name = spec.environment or "default"
    env = environments.get(env_name)
    if env is None:
        raise NotFound(f"no environment named {env_name!r}", reason="ENVIRONMENT_NOT_FOUND")
    if not spec.datasets:
        raise InvalidArgument("a job needs at least one dataset", field="spec.datasets")
    job_facts.check_viewers(spec.owner, spec.viewers)
    job_facts.check_resources(spec.resources, environment_message(env))
    delivery_rules.check_results(spec.results, "spec.results")
    check_delivery(spec.delivery)
    job = job_pb2.Job(
        name=job_facts.job_name(spec.job_id),
        owner=spec.owner,
        dataset_ids=[d.id for d in spec.datasets],
        algorithm_id=spec.algorithm.id,
        environment=env_name,
        state=State.STATE_QUEUED,
        exit_code=0,
        viewers=spec.viewers,
        limits=job_limits(env, spec.resources),
        result_selection=spec.results,
    )
    if delivery_rules.is_set(spec.delivery):
        job.delivery.CopyFrom(delivery_rules.pending(spec.delivery, spec.job_id))
    job.create_time.GetCurrentTime()
    job_facts.set_status_code(job)
    return env, job


def check_delivery(target: job_pb2.ResultDelivery) -> None:
    """INVALID_ARGUMENT (naming spec.delivery...) unless the delivery is unset or well formed.
    A stored copy (without its secrets: a job handed over again from the Operator Service's
    registry) is accepted when its destination is well formed: its delivery then fails."""
    if delivery_rules.is_set(target) and delivery_rules.without_secrets(target) == target:
        # A stored copy (no secret at all; some but not all is malformed): placeholders stand
        # in for its secrets, checked for their shape only.
        stand_in = job_pb2.ResultDelivery()
        stand_in.CopyFrom(target)
        if target.WhichOneof("destination") == "s3":
            stand_in.s3.access_key_id = stand_in.s3.secret_access_key = "stored"  # noqa: S105
        else:
            for name in stand_in.upload_urls.urls:
                stand_in.upload_urls.urls[name] = "https://stored.invalid/"
        target = stand_in
    delivery_rules.check_delivery(target, "spec.delivery")


def environment_message(env: EnvironmentSpec) -> job_pb2.Environment:
    return job_pb2.Environment(
        name=env.name,
        cpus=env.cpus,
        memory_bytes=env.memory_bytes,
        disk_bytes=env.disk_bytes,
        max_processes=env.max_processes,
        max_duration=_duration(env.max_duration_s),
        max_concurrent_jobs=env.max_concurrent_jobs,
        network_allowed=env.network_allowed,
        free=env.free,
        max_queue_wait=_duration(env.max_queue_wait_s),
        max_queued_jobs=env.max_queued_jobs,
        price=None
        if env.free
        else job_pb2.EnvironmentPrice(
            token=env.fee_token, amount_per_minute=str(env.fee_per_minute)
        ),
        # Unset when results are kept until the job is deleted.
        result_retention=_duration(env.result_retention_s) if env.result_retention_s else None,
    )


def job_limits(env: EnvironmentSpec, asked: job_pb2.Resources) -> job_pb2.Resources:
    """The limits a job runs under: the environment's, lowered where the job asked for less
    (a zero field takes the environment's). Never above the environment's, even for a job
    accepted under an environment that has since changed."""
    env_ns = round(env.max_duration_s * _NANOS)
    asked_ns = asked.max_duration.seconds * _NANOS + asked.max_duration.nanos
    limits = job_pb2.Resources(
        cpus=min(asked.cpus, env.cpus) if asked.cpus > 0 else env.cpus,
        memory_bytes=min(asked.memory_bytes, env.memory_bytes)
        if asked.memory_bytes > 0
        else env.memory_bytes,
        disk_bytes=min(asked.disk_bytes, env.disk_bytes)
        if asked.disk_bytes > 0
        else env.disk_bytes,
    )
    limits.max_duration.FromNanoseconds(min(asked_ns, env_ns) if asked_ns > 0 else env_ns)
    return limits


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * _NANOS))
    return duration


def _read_at(path: Path, offset: int, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        return b""


async def _wait_quietly(task: asyncio.Task[None]) -> None:
    # The job's own task reports its errors; the stopper only waits for it to end.
    with contextlib.suppress(BaseException):
        await task
