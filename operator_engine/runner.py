"""Runs jobs: queues them per environment, then configure -> compute -> publish, and keeps
each job's state and live log for watchers.

Each job's spec and latest state are kept in its workspace (`spec.pb`, `job.pb`, root-only), so
an engine that restarts, even after kill -9, picks every job up again: queued jobs queue again,
jobs cut off while configuring or running end `failed: engine lost` with their logs published,
jobs cut off while publishing are published again and end as they would have.

`spec.pb` never holds a delivery's secrets (keys, upload URLs: `mesh.delivery.stored_spec`);
only the job's spec in memory does, so a job picked up after a restart ends with its delivery
failed, saying why. A delivery runs after publishing, before the job's final state
(JobBook._finish).

RUNNING is not written to `job.pb`: recovery ends a job cut off while configuring or running
alike, and the job's `disk` file, written just before, marks that it got as far as running.

A job runs under its environment's limits, lowered where its spec asks for less
(`JobSpec.resources`; asking for more is INVALID_ARGUMENT): `Job.limits`, set when it is
accepted and kept in `job.pb`, is what its sandbox, its disk and its publishing use. A job's
disk is then made for it, at the size it asked for, rather than taken from the pool. RunJob is
RESOURCE_EXHAUSTED (QUEUE_FULL) when the job would wait beyond the environment's
`max_queued_jobs`; a job that waits longer than `max_queue_wait_s`, counted from its creation,
ends `queue timeout` with its logs published. A private algorithm's output passes through
`private_log` on its way to the log, so that no line of its code reaches it.

Making a file or a folder costs 0.1-0.4 ms on a node's file system (ten to thirty renames), and a
job would make about twenty: workspaces are made ahead of time (`.spare-*` in the workspace
root, with files for the stages to fill) and renamed into place, storage prepares job folders
likewise, and rewritten state files reuse their previous versions' files. All of it is made
after a job's final state, off the next job's path."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf.message import DecodeError

from mesh import containers
from mesh import delivery as delivery_rules
from mesh import jobs as job_facts
from mesh.storage import Storage
from operator_engine.config import EngineConfig, EnvironmentSpec
from operator_engine.disks import JobDisks, is_full
from operator_engine.images import ImageCache, ImageError
from operator_engine.jobs import EngineJob, JobBook, QueueStopped, QueueTimeout, job_limits
from operator_engine.private_log import CodeRedactor
from operator_engine.sandbox import Limits, Mount, Outcome, Sandbox, SandboxSpec
from pods import workspace as layout
from pods.configure import (
    AlgorithmProvisioningError,
    ConfigureStopped,
    ProvisioningError,
    configure,
    make_layout,
    remote_files,
    stored_files,
)
from pods.publish import PublishError, publish

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
_SPEC_FILE = "spec.pb"
_JOB_FILE = "job.pb"
_OUTCOME_FILE = "outcome.json"
_DISK_FILE = "disk"
_SPARE_PREFIX = ".spare-"
# In a spare workspace: the algorithm log's file, out of the logs folder until the job runs.
_READY_LOG = "algorithm.log.ready"
# Files made ahead in storage for each job to come: one output and the three logs, a small
# job's results.
_PREPARED_RESULTS = 4
# A job this small is configured inline on the event loop: a few small writes and stats cost
# less than a hop to a worker thread and back (0.3-1 ms on a busy engine). Larger ones (big
# code or DDOs to hash and write, many dataset files to check) go to a thread.
_INLINE_CONFIGURE_BYTES = 64 * 1024
_INLINE_CONFIGURE_FILES = 8


class Runner(JobBook):
    """Owns every job of this engine, run in local sandboxes."""

    backend = "local"

    def __init__(
        self,
        config: EngineConfig,
        sandbox: Sandbox,
        storage: Storage,
        disks: JobDisks,
        images: ImageCache,
    ) -> None:
        super().__init__(config)
        self.sandbox = sandbox
        self.storage = storage
        self.disks = disks
        self.images = images
        # Workspaces made ahead of time (see _make_spare), one per job that can run at once.
        self._spares: list[Path] = []
        self._spares_wanted = sum(env.max_concurrent_jobs for env in config.environments)
        self._spare_task: asyncio.Task[None] | None = None

    # -- the API -------------------------------------------------------------------------

    async def _accept(self, spec: engine_pb2.JobSpec, job: job_pb2.Job) -> None:
        entry = EngineJob(spec=spec, job=job, workspace=self.config.workspace_root / spec.job_id)
        # Inline: a rename, or a few small local writes; cheaper than hops to a thread.
        if not self._take_spare(entry.workspace):
            _make_workspace(entry.workspace)
        _write_atomic(
            entry.workspace / _SPEC_FILE, delivery_rules.stored_spec(spec).SerializeToString()
        )
        await self._keep(entry)
        self._start(entry)

    async def _keep(self, entry: EngineJob, **fields: object) -> None:
        snapshot = await entry.update(**fields)
        # Inline: a write of a few hundred bytes costs less than a hop to a thread.
        _write_atomic(entry.workspace / _JOB_FILE, snapshot)

    async def _forget(self, entry: EngineJob) -> None:
        await self._release_disk(entry)

    def _start(self, entry: EngineJob, *, resume_publish: bool = False) -> None:
        if not resume_publish:
            self._enqueue(entry)
        self._launch(entry, self._run(entry, resume_publish=resume_publish))

    async def recover(self) -> None:
        """Picks up the jobs a previous engine left in the workspace root, once the job disks
        it left but theirs are removed."""
        root = self.config.workspace_root
        entries = sorted(
            await asyncio.to_thread(_saved_jobs, root),
            key=lambda e: e.job.create_time.ToNanoseconds(),
        )
        # Before any job starts: a job resumed now may be making its disk while a later sweep
        # runs, and that disk is in no list yet. A final job's disk (an engine cut off between
        # its end and its cleanup) goes too: its outputs are published, or never will be.
        await self.disks.sweep(
            keep={
                e.disk
                for e in entries
                if e.disk is not None and not job_facts.is_final(e.job.state)
            }
        )
        for entry in entries:
            job_id = entry.spec.job_id
            state = entry.job.state
            with structlog.contextvars.bound_contextvars(job_id=job_id):
                if entry.job.environment not in self.environments:
                    entry.job.environment = next(iter(self.environments))
                env = self.environments[entry.job.environment]
                if not job_facts.is_final(state) or not entry.job.HasField("limits"):
                    # The environment may have changed since: never above its limits now.
                    entry.job.limits.CopyFrom(job_limits(env, entry.spec.resources))
                if job_facts.is_final(state):
                    self.jobs[job_id] = entry
                    await self._clean_up(entry)  # what a cut-off cleanup left
                elif state == State.STATE_QUEUED:
                    log.info("job queued again after an engine restart")
                    self._start(entry)
                else:
                    log.warning(
                        "job cut off by an engine restart", state=job_pb2.Job.State.Name(state)
                    )
                    self._start(entry, resume_publish=True)
        self._refill_spares()

    async def close(self) -> None:
        """Stops the engine's work: running jobs end `engine lost` with their logs published,
        queued jobs stay queued on disk for the engine that comes next."""
        self.stopping = True
        for entry in self.jobs.values():
            entry.cancel.set()
        tasks = [e.task for e in self.jobs.values() if e.task is not None and not e.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._spare_task is not None:
            # Spares left behind are removed by the next engine.
            self._spare_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._spare_task
        await self.disks.close(
            keep={
                e.disk
                for e in self.jobs.values()
                if e.disk is not None and not job_facts.is_final(e.job.state)
            }
        )

    # -- one job -------------------------------------------------------------------------

    async def _run(self, entry: EngineJob, *, resume_publish: bool = False) -> None:
        job_id = entry.spec.job_id
        env = self.environments[entry.job.environment]
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            if resume_publish:
                await self._resume_publish(entry, env)
                return
            try:
                await self._take_slot(entry, env)
            except QueueStopped:
                if not self.stopping:
                    await self._finish(entry, State.STATE_CANCELLED, message="stopped while queued")
                return
            except QueueTimeout:
                await self._time_out(entry, env)
                return
            started = time.perf_counter()
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
                self._give_slot(env)
                image, entry.image = entry.image, None
                if image is not None:
                    self.images.release(image)
            # After the slot is given back: the next job does not wait for this cleanup.
            await self._clean_up(entry)
            self._refill_spares()
            if image is not None:
                await self._trim_images()
            log.info("job done", total_ms=round((time.perf_counter() - started) * 1000, 1))

    def _take_spare(self, ws: Path) -> bool:
        """Renames a spare workspace to `ws`; False when none is ready."""
        if not self._spares:
            return False
        spare = self._spares.pop()
        try:
            os.rename(spare, ws)
        except FileNotFoundError:
            return False  # gone (removed by hand): dropped
        except OSError:
            self._spares.append(spare)  # `ws` exists already: made as before
            return False
        return True

    def _refill_spares(self) -> None:
        # Called after a job's final state and cleanup, so the making competes with no job's
        # start; a burst of submits beyond the spares makes its workspaces as before.
        running = self._spare_task is not None and not self._spare_task.done()
        if not running and not self.stopping and len(self._spares) < self._spares_wanted:
            self._spare_task = asyncio.get_running_loop().create_task(self._make_spares())

    async def _make_spares(self) -> None:
        while len(self._spares) < self._spares_wanted and not self.stopping:
            try:
                spare = await asyncio.to_thread(_make_spare, self.config.workspace_root)
            except OSError as error:
                log.warning("could not make a workspace ahead of time", error=str(error))
                return
            self._spares.append(spare)
        try:
            await asyncio.to_thread(
                self.storage.prepare_blocking, self._spares_wanted, _PREPARED_RESULTS
            )
        except OSError as error:
            log.warning("could not prepare storage ahead of time", error=str(error))

    async def _time_out(self, entry: EngineJob, env: EnvironmentSpec) -> None:
        """Ends a job that waited too long in the queue: FAILED, `queue timeout`, with its logs
        published like any failure's. It stays QUEUED while they are (it never ran): an engine
        cut off meanwhile queues it again, and it times out again at once."""
        waited = time.time() - entry.job.create_time.ToNanoseconds() / 1e9
        log.info("job timed out in the queue", waited_s=round(waited, 1))
        message = (
            f"queue timeout: the job waited {waited:.0f} s for a free slot in environment "
            f"{env.name!r}, whose longest wait is {env.max_queue_wait_s:g} s, and never ran"
        )
        await self._publish_and_finish(
            entry,
            env,
            State.STATE_FAILED,
            job_pb2.FAILURE_REASON_QUEUE_TIMEOUT,
            message,
            publishing_state=False,
        )

    async def _stages(self, entry: EngineJob, env: EnvironmentSpec) -> None:
        job_id = entry.spec.job_id
        ws = entry.workspace
        entry.job.start_time.GetCurrentTime()
        await self._keep(entry, state=State.STATE_CONFIGURING, queue_position=0)

        sources = self.config.sources
        try:
            if _configure_is_small(entry.spec):
                prepared = configure(entry.spec, ws, self.config.data_root, sources)
            else:
                # Files of datasets made from jobs' outputs are read from this engine's own
                # results storage (its credentials stay here, never in the sandbox).
                # A fetch looks at the job's stop between chunks: a stop (or the engine's)
                # does not wait for a download to end.
                prepared = await asyncio.to_thread(
                    configure,
                    entry.spec,
                    ws,
                    self.config.data_root,
                    sources,
                    stopped=entry.cancel.is_set,
                    storage=self.storage,
                )
        except ProvisioningError as error:
            reason = (
                job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED
                if isinstance(error, AlgorithmProvisioningError)
                else job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
            )
            log.info("configure failed", reason=str(error))
            await self._publish_and_finish(entry, env, State.STATE_FAILED, reason, str(error))
            return
        except ConfigureStopped:
            if self.stopping:
                await self._publish_and_finish(
                    entry,
                    env,
                    State.STATE_FAILED,
                    job_pb2.FAILURE_REASON_ENGINE_LOST,
                    "engine lost: the engine was stopped while the job's inputs were fetched",
                )
            else:
                await self._publish_and_finish(entry, env, State.STATE_CANCELLED, 0, "stopped")
            return
        in_image = containers.is_set(entry.spec.algorithm.container)
        if in_image and not await self._prepare_image(entry, env):
            return
        if entry.cancel.is_set():
            await self._publish_and_finish(entry, env, State.STATE_CANCELLED, 0, "stopped")
            return

        limits = entry.job.limits
        try:
            outputs = await self.disks.take(limits.disk_bytes)
            entry.disk = outputs
            _write_atomic(ws / _DISK_FILE, str(outputs).encode())
        except OSError as error:
            log.error("could not make the job's disk", error=str(error))
            await self._publish_and_finish(
                entry,
                env,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_SANDBOX_FAILED,
                "the job's disk could not be made; the operator has the details",
            )
            return
        # Not kept on disk: the disk file just written tells recovery as much (see the top).
        redactor: CodeRedactor | None = None
        if entry.spec.algorithm.private:
            # No line of a private algorithm's code may reach its log (see private_log).
            code = entry.spec.algorithm.code
            if len(code) <= _INLINE_CONFIGURE_BYTES:
                redactor = CodeRedactor.for_code(code)
            else:
                redactor = await asyncio.to_thread(CodeRedactor.for_code, code)
        await entry.update(state=State.STATE_RUNNING)
        log_file = _open_log(entry.workspace)
        # Inline: the chunk is small and the log's readers are waiting for it.
        write = functools.partial(_write_flush, log_file)
        try:

            async def on_output(data: bytes) -> None:
                await self._append_log(entry, data, write)

            async def on_output_redacted(data: bytes) -> None:
                assert redactor is not None
                kept = redactor.feed(data)
                if kept:
                    await self._append_log(entry, kept, write)

            result = await self.sandbox.run(
                SandboxSpec(
                    job_id=job_id,
                    mounts=[
                        Mount(
                            # The outputs live on the job's own disk.
                            host_path=outputs
                            if m.sandbox_path == layout.SANDBOX_OUTPUTS
                            else m.host_path,
                            sandbox_path=m.sandbox_path,
                            writable=m.writable,
                        )
                        for m in prepared.mounts
                    ],
                    argv=prepared.argv,
                    env=prepared.env,
                    limits=Limits(
                        cpus=limits.cpus,
                        memory_bytes=limits.memory_bytes,
                        disk_bytes=limits.disk_bytes,
                        max_processes=env.max_processes,
                        max_duration_s=limits.max_duration.ToNanoseconds() / 1e9,
                        network=entry.spec.allow_network and env.network_allowed,
                    ),
                    image=None if entry.image is None else entry.image.root,
                ),
                on_output if redactor is None else on_output_redacted,
                entry.cancel,
            )
            if redactor is not None:
                # The last line, when the output did not end with a newline.
                rest = redactor.finish()
                if rest:
                    await self._append_log(entry, rest, write)
        finally:
            log_file.close()
        log.info(
            "compute ended",
            outcome=result.outcome.name,
            exit_code=result.exit_code,
            duration_ms=round(result.duration_s * 1000, 1),
        )
        entry.job.exit_code = result.exit_code
        outcome = result.outcome
        detail = result.detail
        # Inline: one statvfs of the job's own disk.
        if outcome in (Outcome.OK, Outcome.EXIT_NONZERO) and is_full(outputs):
            # Whatever the algorithm did about it, its outputs may be cut short.
            outcome, detail = Outcome.DISK_FULL, "the outputs filled the job's disk"

        if result.outcome is Outcome.CANCELLED and self.stopping:
            await self._publish_and_finish(
                entry,
                env,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_ENGINE_LOST,
                "engine lost: the engine was stopped while the job ran",
            )
        elif result.outcome is Outcome.CANCELLED:
            await self._publish_and_finish(entry, env, State.STATE_CANCELLED, 0, "stopped")
        elif outcome is Outcome.OK:
            await self._publish_and_finish(entry, env, State.STATE_SUCCEEDED, 0, "")
        else:
            reason = _OUTCOME_REASON[outcome]
            await self._publish_and_finish(entry, env, State.STATE_FAILED, reason, detail)

    async def _prepare_image(self, entry: EngineJob, env: EnvironmentSpec) -> bool:
        """Fetches and unpacks the algorithm's image, or takes it from the cache, and notes in
        the configuration log which digest runs. False when the job has ended: FAILED
        (algorithm provisioning) when the image cannot be had. A stop ends the wait at once
        (the caller then ends the job CANCELLED)."""
        container = entry.spec.algorithm.container
        preparing = asyncio.ensure_future(self.images.prepare(container))
        stopped = asyncio.ensure_future(entry.cancel.wait())
        try:
            await asyncio.wait({preparing, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not preparing.done():
                preparing.cancel()  # the fetch goes on only for other jobs waiting for it
            await asyncio.gather(preparing, stopped, return_exceptions=True)
        if preparing.cancelled():
            return True
        try:
            entry.image = preparing.result()
        except ImageError as error:
            log.info("image failed", reason=str(error))
            await asyncio.to_thread(_note_configuration, entry.workspace, f"image failed: {error}")
            await self._publish_and_finish(
                entry,
                env,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED,
                str(error),
            )
            return False
        image = entry.image
        tag = f", tag {image.ref.tag}" if image.ref.tag else ""
        note = f"image: {image.ref} ({image.size_bytes >> 20} MiB unpacked{tag}) ready"
        await asyncio.to_thread(_note_configuration, entry.workspace, note)
        return True

    async def _trim_images(self) -> None:
        try:
            await self.images.trim()
        except OSError as error:
            log.warning("could not trim the image cache", error=str(error))

    async def _resume_publish(self, entry: EngineJob, env: EnvironmentSpec) -> None:
        """Ends a job a previous engine was running: publishing again what it was publishing,
        or ending it `engine lost` with whatever logs it had."""
        outcome = await asyncio.to_thread(_read_outcome, entry.workspace)
        if entry.job.state == State.STATE_PUBLISHING and outcome is not None:
            state, reason, message = outcome
        else:
            state, reason = State.STATE_FAILED, job_pb2.FAILURE_REASON_ENGINE_LOST
            message = "engine lost: the engine restarted while the job ran"
        try:
            await self._publish_and_finish(entry, env, state, reason, message)
        except Exception:
            log.exception("could not finish a recovered job")
            await self._finish(
                entry,
                State.STATE_FAILED,
                reason=job_pb2.FAILURE_REASON_ENGINE_LOST,
                message="engine lost: the job could not be recovered",
            )
        await self._clean_up(entry)

    async def _publish_and_finish(
        self,
        entry: EngineJob,
        env: EnvironmentSpec,
        state: int,
        reason: int,
        message: str,
        *,
        publishing_state: bool = True,
    ) -> None:
        if publishing_state:
            # Kept first, so that an engine cut off while publishing knows how the job ended.
            # Inline, as job.pb is: a few bytes.
            _write_atomic(
                entry.workspace / _OUTCOME_FILE, json.dumps([state, reason, message]).encode()
            )
            await self._keep(entry, state=State.STATE_PUBLISHING)
        try:
            published = await publish(
                entry.workspace,
                self.storage,
                entry.spec.job_id,
                max_files=env.max_output_files,
                max_total_bytes=entry.job.limits.disk_bytes,
                outputs=entry.disk,
                results=entry.job.result_selection,
            )
        except PublishError as error:
            # What was stored all the same (the logs, kept on the node's disk when the store
            # is down) stays listed; the message says what failed, naming no store.
            log.exception("publish failed")
            entry.job.results.extend(error.results)
            await self._finish(entry, State.STATE_FAILED, reason=error.reason, message=str(error))
            return
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
        await self._finish(entry, state, reason=reason, message=message)

    async def _clean_up(self, entry: EngineJob) -> None:
        """After a final state: the outputs are in storage now, so the job's disk goes back
        and the workspace keeps only the logs for live readers. A job that is not final (the
        engine stopped) keeps both, for the next engine to publish."""
        if not job_facts.is_final(entry.job.state):
            return
        await self._release_disk(entry)
        outputs = entry.workspace / layout.OUTPUTS
        try:
            # Inline: with a job disk, outputs/ in the workspace was never used and is empty.
            os.rmdir(outputs)
        except FileNotFoundError:
            pass
        except OSError:
            await asyncio.to_thread(shutil.rmtree, outputs, True)
        # Dataset files fetched for the job (the owner's data), the algorithm's code, the DDOs
        # and the parameters: the sandbox's inputs, kept no longer than the job.
        for name in (layout.DATASET_INPUTS, layout.TRANSFORMATIONS, layout.DDOS):
            if (entry.workspace / name).exists():
                await asyncio.to_thread(shutil.rmtree, entry.workspace / name, True)
        (entry.workspace / layout.ALGO_CUSTOM_DATA_FILE).unlink(missing_ok=True)
        if entry.spec.algorithm.code or entry.spec.datasets:
            # A private algorithm's code and the datasets' locations are not kept past the job
            # either: reads of a final job need only who may read it.
            entry.spec = _record_only(entry.spec)
            await asyncio.to_thread(_forget_spec, entry.workspace, entry.spec)

    async def _release_disk(self, entry: EngineJob) -> None:
        # Taken off the job first, so that a delete during the wipe cannot release it twice.
        disk, entry.disk = entry.disk, None
        if disk is not None:
            (entry.workspace / _DISK_FILE).unlink(missing_ok=True)
            await self.disks.release(disk)


def _configure_is_small(spec: engine_pb2.JobSpec) -> bool:
    size = len(spec.algorithm.code) + len(spec.parameters_json)
    size += sum(len(dataset.ddo_json) for dataset in spec.datasets)
    files = sum(len(dataset.files) for dataset in spec.datasets)
    # A fetch is never inline: it takes time, and runs an event loop of its own for S3.
    return (
        size <= _INLINE_CONFIGURE_BYTES
        and files <= _INLINE_CONFIGURE_FILES
        and not remote_files(spec)
        and not stored_files(spec)
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` whole: a killed engine leaves the old or the new content, never a mix.
    Not fsynced: a job's state changes many times a second, and a power loss, unlike a crash,
    also ends every job's sandbox, so recovery then ends them `engine lost` anyway.

    Makes no file when `<name>.tmp` exists (a spare workspace has them): the previous version's
    file, kept by a second name (`<name>.prev`), becomes the next `<name>.tmp`. Only `path`
    is ever read back; the other two are scratch at every step."""
    temporary = path.with_name(path.name + ".tmp")
    previous = path.with_name(path.name + ".prev")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    # No previous version (FileNotFoundError), or a `.prev` already there (FileExistsError:
    # made ahead of time, or left by a kill): either way it is fine to go on.
    with contextlib.suppress(FileNotFoundError, FileExistsError):
        os.link(path, previous)
    os.replace(temporary, path)
    with contextlib.suppress(FileNotFoundError):
        os.rename(previous, temporary)


def _note_configuration(ws: Path, line: str) -> None:
    """Adds a line to the configuration log configure wrote (best effort: it is only a log)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = ws / layout.LOGS / layout.CONFIGURATION_LOG
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "a", encoding="utf-8") as file:
            file.write(f"{stamp} {line}\n")


def _read_outcome(ws: Path) -> tuple[int, int, str] | None:
    try:
        state, reason, message = json.loads((ws / _OUTCOME_FILE).read_text())
        return int(state), int(reason), str(message)
    except (OSError, ValueError):
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _saved_jobs(root: Path) -> list[EngineJob]:
    """The jobs saved under `root`, with the size of their algorithm logs (none, for a job that
    never ran); a workspace that cannot be read is removed."""
    entries: list[EngineJob] = []
    if not root.is_dir():
        return entries
    for ws in root.iterdir():
        if ws.name.startswith(_SPARE_PREFIX):
            shutil.rmtree(ws, ignore_errors=True)  # made ahead of time by an earlier engine
            continue
        try:
            spec = engine_pb2.JobSpec.FromString((ws / _SPEC_FILE).read_bytes())
            job = job_pb2.Job.FromString((ws / _JOB_FILE).read_bytes())
            if spec.job_id != ws.name:
                raise ValueError("workspace and spec disagree")
        except (OSError, ValueError, DecodeError):
            log.warning("removing a workspace that cannot be read", workspace=ws.name)
            shutil.rmtree(ws, ignore_errors=True)
            continue
        disk_file = ws / _DISK_FILE
        disk = Path(disk_file.read_text()) if disk_file.exists() else None
        if job.state == State.STATE_CONFIGURING and disk is not None:
            job.state = State.STATE_RUNNING  # not written to job.pb (see the top)
            job_facts.set_status_code(job)
        entry = EngineJob(spec=spec, job=job, workspace=ws, disk=disk)
        entry.log_size = _size(entry.log_path)
        entries.append(entry)
    return entries


def _record_only(spec: engine_pb2.JobSpec) -> engine_pb2.JobSpec:
    """What a final job's spec keeps: who owns and may read it, and where it ran."""
    return engine_pb2.JobSpec(
        job_id=spec.job_id,
        owner=spec.owner,
        viewers=spec.viewers,
        environment=spec.environment,
        allow_network=spec.allow_network,
        resources=spec.resources,
    )


def _forget_spec(ws: Path, spec: engine_pb2.JobSpec) -> None:
    _write_atomic(ws / _SPEC_FILE, spec.SerializeToString())
    # _write_atomic keeps the previous version as its next scratch file: not this time.
    for scratch in (f"{_SPEC_FILE}.tmp", f"{_SPEC_FILE}.prev"):
        (ws / scratch).unlink(missing_ok=True)


def _make_workspace(ws: Path) -> None:
    ws.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ws.mkdir(mode=0o700, exist_ok=True)
    for sub in (layout.OUTPUTS, layout.LOGS):
        (ws / sub).mkdir(mode=0o755, exist_ok=True)


def _make_spare(root: Path) -> Path:
    """A workspace for a job yet to come, holding what its start would make: the folders of
    the engine and of configure, the algorithm log, a first file for each state file that
    `_write_atomic` writes (`job.pb` two, as it is rewritten), and files for the stages to
    fill (`layout.READY_FILES`: configure's three, publish's log)."""
    spare = root / f"{_SPARE_PREFIX}{uuid.uuid4().hex}"
    _make_workspace(spare)
    make_layout(layout.Workspace(spare))
    scratch = [f"{_SPEC_FILE}.tmp", f"{_JOB_FILE}.tmp", f"{_JOB_FILE}.prev"]
    scratch += [f"{_DISK_FILE}.tmp", f"{_OUTCOME_FILE}.tmp", *layout.READY_FILES]
    for name in scratch:
        os.close(os.open(spare / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    # Not in logs/ yet: a job that never runs has no algorithm log.
    open(spare / _READY_LOG, "ab").close()
    return spare


def _open_log(ws: Path) -> BinaryIO:
    """The algorithm log, to append to; closed by the caller when compute ends."""
    path = ws / layout.LOGS / layout.ALGORITHM_LOG
    # The spare workspace's file, when there is one: a link and an unlink cost less than
    # making a file. A link, not a rename, so that a log already there is never replaced.
    with contextlib.suppress(FileNotFoundError, FileExistsError):
        os.link(ws / _READY_LOG, path)
        os.unlink(ws / _READY_LOG)
    return open(path, "ab")


def _write_flush(f: BinaryIO, data: bytes) -> None:
    f.write(data)
    f.flush()
