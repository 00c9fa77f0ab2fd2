"""The Kubernetes backend: each job runs as pods in the jobs namespace (configure, algorithm,
publish; see kube_objects for what they are), and the cluster holds the job's state.

The engine keeps nothing of a job that matters on its own disk: the job's Secret carries the
spec and, as an annotation rewritten at each change, the job itself; the pods say how far it
got. An engine that restarts lists its Secrets and pods and picks every job up where it is:
queued jobs queue again, a running stage is watched again (the algorithm's log is read again
from its start), a job cut off while publishing is published again, and objects of jobs it no
longer knows are removed. Stopping the engine leaves running jobs running in the cluster.

The algorithm's log streams from the pod while it runs (the API's follow mode, resumed where
it broke off) into the engine's workspace, through the private-code filter when the algorithm
is private, and the engine stores it as the job's last result: the unfiltered log never
reaches the job's volume or storage.

The consumer's choice of results reaches the publish pod as its --results flag, and the
engine stores the algorithm's log only when that choice keeps the logs. A delivery to the
consumer's own storage runs in the engine after the publish pod, reading the results back
from storage (JobBook._settle_delivery), before the job's objects go and its final state is
kept. The job's Secret holds its spec without the delivery's secrets (`mesh.delivery.stored_spec`):
an engine that picks a job up after a restart has none, and its delivery ends failed.

Known limits: a pod's deadline (activeDeadlineSeconds) counts from the pod's start, image pull
included; the process limit is the node's (kubelet's podPidsLimit), not the environment's; an
output quota holds only where the job volume's storage class enforces sizes; a spec (code
included) above 700 KiB does not fit the job's Secret and is refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import json_format
from kubernetes_asyncio import client as kube
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio import watch as kube_watch
from kubernetes_asyncio.client.exceptions import ApiException

from mesh import delivery as delivery_rules
from mesh import jobs as job_facts
from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.storage import Storage, result_key
from operator_engine.backends import kube_objects as objects
from operator_engine.backends.kubernetes_config import KubernetesSettings
from operator_engine.config import EngineConfig, EnvironmentSpec
from operator_engine.jobs import EngineJob, JobBook, QueueStopped, QueueTimeout, set_fields
from operator_engine.private_log import CodeRedactor
from operator_engine.sources import parse_credentials
from pods import configure as configure_exit
from pods import publish as publish_exit
from pods import workspace as layout

log = structlog.get_logger()
State = job_pb2.Job.State

# Image errors the kubelet does not recover from by waiting.
_IMAGE_FAILURES = frozenset({"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
_WATCH_TIMEOUT_S = 60
_RETRY_S = 1.0
_LOG_CHUNK = 64 * 1024
_API_TIMEOUT_S = 30.0
# A pod watch is cut this often to look at the job's stop request and the clock.
_LOOK_AGAIN_S = 2.0


class ClusterUnavailable(Exception):
    """The Kubernetes API cannot be used (no configuration, unreachable, refused)."""


@dataclass
class _StageEnd:
    """How a stage pod ended."""

    succeeded: bool
    exit_code: int
    reason: str  # the pod's or the container's reason (OOMKilled, DeadlineExceeded, ...)
    message: str  # the container's termination message, or the pod's


class _Stopped(Exception):
    """The job was asked to stop while a stage ran."""


async def connect(settings: KubernetesSettings) -> kube.ApiClient:
    """An API client from the kubeconfig the settings name, $KUBECONFIG or ~/.kube/config, or
    the in-cluster service account; ClusterUnavailable saying which was tried."""
    configuration = kube.Configuration()
    try:
        if settings.kubeconfig:
            await kube_config.load_kube_config(
                config_file=settings.kubeconfig, client_configuration=configuration
            )
        else:
            try:
                kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except kube_config.ConfigException:
                await kube_config.load_kube_config(client_configuration=configuration)
    except (kube_config.ConfigException, OSError) as error:
        raise ClusterUnavailable(f"no usable Kubernetes configuration: {error}") from None
    return kube.ApiClient(configuration)


class KubernetesBackend(JobBook):
    """Owns every job of this engine, run in the cluster. The same API as the local Runner."""

    backend = "kubernetes"

    def __init__(
        self,
        config: EngineConfig,
        settings: KubernetesSettings,
        api: kube.ApiClient,
        storage: Storage,
    ) -> None:
        super().__init__(config)
        self.settings = settings
        self.api = api
        self.core = kube.CoreV1Api(api)
        self.networking = kube.NetworkingV1Api(api)
        self.storage = storage
        # Jobs recording their end: the engine's stop lets them finish (see close).
        self._finishing: set[str] = set()

    # -- the API -------------------------------------------------------------------------

    async def check(self) -> None:
        """Refuses to start (ClusterUnavailable) when the jobs namespace cannot be used."""
        try:
            await self.core.list_namespaced_pod(
                self.settings.namespace,
                label_selector=objects.engine_selector(self.settings),
                limit=1,
                _request_timeout=_API_TIMEOUT_S,
            )
        except ApiException as error:
            raise ClusterUnavailable(
                f"cannot list pods in namespace {self.settings.namespace!r}: "
                f"{error.status} {error.reason}"
            ) from None
        except (OSError, TimeoutError) as error:
            raise ClusterUnavailable(f"the Kubernetes API is unreachable: {error}") from None
        await self._check_sources_secret()
        await self._check_storage_secret()

    async def _check_storage_secret(self) -> None:
        """Refuses to start when results go to S3 and the Secret the publish pods take their
        S3 settings from is missing: every job would otherwise fail at its last stage."""
        name = self.settings.storage_secret
        if not name:
            return
        try:
            secret = await self._read(self.core.read_namespaced_secret, name)
        except ApiException as error:
            raise ClusterUnavailable(
                f"cannot read C2D_K8S_STORAGE_SECRET {name!r}: {error.status} {error.reason}"
            ) from None
        if secret is None:
            raise ClusterUnavailable(
                f"C2D_K8S_STORAGE_SECRET {name!r}: no such Secret in the jobs namespace"
            )

    async def _check_sources_secret(self) -> None:
        """Refuses to start when the source credentials Secret the configure pods would mount
        is missing or holds a bad file: found now rather than by every job that fetches."""
        name = self.settings.sources_secret
        if not name:
            return
        origin = f"C2D_K8S_SOURCES_SECRET {name!r} (key {objects.SOURCES_KEY})"
        problem = ""
        try:
            secret = await self._read(self.core.read_namespaced_secret, name)
        except ApiException as error:
            raise ClusterUnavailable(
                f"cannot read {origin}: {error.status} {error.reason}"
            ) from None
        raw = ((secret or {}).get("data") or {}).get(objects.SOURCES_KEY)
        if raw is None:
            raise ClusterUnavailable(f"{origin}: no such Secret or key in the jobs namespace")
        try:
            parse_credentials(json.loads(base64.b64decode(raw)), origin)
        except ValueError as error:
            # JSON's and base64's messages say where, never what: no secret is echoed.
            problem = str(error) if str(error).startswith(origin) else f"{origin}: not JSON"
        if problem:
            raise ClusterUnavailable(problem)

    def _check_spec(self, spec: engine_pb2.JobSpec) -> None:
        if len(objects.spec_json(delivery_rules.stored_spec(spec))) > objects.MAX_SPEC_JSON_BYTES:
            raise InvalidArgument(
                "the Kubernetes backend takes jobs up to 700 KiB of code and metadata",
                field="spec.algorithm.code",
            )
        self._check_stored(spec)

    def _check_stored(self, spec: engine_pb2.JobSpec) -> None:
        """FAILED_PRECONDITION (STORED_DATASETS_UNREACHABLE) for a job on a dataset made from
        jobs' outputs when the configure pods cannot read the results storage: refused now,
        not failed in configure."""
        if not configure_exit.stored_files(spec):
            return
        problem = objects.stored_files_problem(self.settings)
        if problem:
            log.error("job refused: its stored dataset files are out of reach", problem=problem)
            raise FailedPrecondition(
                "this node cannot run jobs on datasets made from jobs' outputs: "
                f"its configure stage cannot read the results storage ({problem})",
                reason="STORED_DATASETS_UNREACHABLE",
            )

    async def _accept(self, spec: engine_pb2.JobSpec, job: job_pb2.Job) -> None:
        entry = self._entry(spec, job)
        # Known before the first await: a retried RunJob meanwhile gets this job, not a twin.
        self.jobs[spec.job_id] = entry
        try:
            await self._create(
                self.core.create_namespaced_secret,
                objects.job_secret(self.settings, delivery_rules.stored_spec(spec), job),
            )
        except BaseException:
            del self.jobs[spec.job_id]
            raise
        self._start(entry)

    async def _forget(self, entry: EngineJob) -> None:
        await self._delete_objects(entry.spec.job_id, with_secret=True)

    async def close(self) -> None:
        """Lets go of the jobs without stopping them: they run on in the cluster, and the
        next engine picks them up from there."""
        self.stopping = True
        tasks = [e.task for e in self.jobs.values() if e.task is not None and not e.task.done()]
        for entry in self.jobs.values():
            # A job recording its end finishes: cut off between deleting its objects and
            # recording its state, it would be published again by the next engine.
            if entry.task in tasks and entry.spec.job_id not in self._finishing:
                entry.task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self.api.close()

    async def recover(self) -> None:
        """Rebuilds every job from the cluster's objects, and removes the objects of jobs
        whose Secret is gone (a crash between deletes)."""
        selector = objects.engine_selector(self.settings)
        secrets = await self._list(self.core.list_namespaced_secret, selector)
        known: set[str] = set()
        recovered: list[EngineJob] = []
        for secret in secrets:
            metadata = secret["metadata"]
            job_id = metadata.get("labels", {}).get(objects.JOB_LABEL, "")
            try:
                job = objects.decode_job(metadata["annotations"][objects.JOB_ANNOTATION])
                raw_spec = secret.get("data", {}).get(objects.SPEC_KEY)
                spec = (
                    json_format.Parse(base64.b64decode(raw_spec), engine_pb2.JobSpec())
                    if raw_spec
                    else engine_pb2.JobSpec(job_id=job_id, environment=job.environment)
                )
            except (KeyError, ValueError, json_format.ParseError):
                log.warning("unreadable job secret; left alone", job_id=job_id)
                continue
            known.add(job_id)
            if job.environment not in self.environments:
                job.environment = next(iter(self.environments))
            recovered.append(self._entry(spec, job))
        await self._sweep_orphans(known)
        for entry in sorted(recovered, key=lambda e: e.job.create_time.ToNanoseconds()):
            with structlog.contextvars.bound_contextvars(job_id=entry.spec.job_id):
                if job_facts.is_final(entry.job.state):
                    self.jobs[entry.spec.job_id] = entry
                    await self._restore_log(entry)
                else:
                    # Its pod's log is read again from the start.
                    entry.log_path.unlink(missing_ok=True)
                    log.info(
                        "job picked up after an engine restart",
                        state=job_pb2.Job.State.Name(entry.job.state),
                    )
                    self._start(entry, recovering=True)

    # -- one job -------------------------------------------------------------------------

    def _entry(self, spec: engine_pb2.JobSpec, job: job_pb2.Job) -> EngineJob:
        workspace = self.config.workspace_root / spec.job_id
        (workspace / layout.LOGS).mkdir(parents=True, exist_ok=True, mode=0o700)
        return EngineJob(spec=spec, job=job, workspace=workspace)

    def _start(self, entry: EngineJob, *, recovering: bool = False) -> None:
        self._launch(entry, self._run(entry, recovering=recovering))

    async def _keep(self, entry: EngineJob, **fields: object) -> None:
        """Keeps the changed job on its Secret (a final one without its spec), then changes it
        here and wakes its watchers: nobody sees a state the cluster does not hold."""
        changed = job_pb2.Job()
        changed.CopyFrom(entry.job)
        set_fields(changed, fields)
        job_facts.set_status_code(changed)
        patch: dict[str, Any] = {
            "metadata": {"annotations": {objects.JOB_ANNOTATION: objects.encode_job(changed)}}
        }
        if job_facts.is_final(changed.state):
            # A final job's record keeps its state, not its spec (code, dataset locations).
            patch["data"] = {objects.SPEC_KEY: None}
        await self._patch_secret(entry, patch)
        await entry.update(**fields)

    async def _patch_secret(self, entry: EngineJob, patch: dict[str, Any]) -> None:
        try:
            await self.core.patch_namespaced_secret(
                objects.object_name(entry.spec.job_id),
                self.settings.namespace,
                patch,
                _request_timeout=_API_TIMEOUT_S,
            )
        except (ApiException, OSError, TimeoutError) as error:
            # The job goes on; a restart then reads its state from its pods.
            log.warning("could not keep the job's state in the cluster", error=str(error))

    async def _run(self, entry: EngineJob, *, recovering: bool) -> None:
        job_id = entry.spec.job_id
        env = self.environments[entry.job.environment]
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                pods = await self._job_pods(job_id) if recovering else {}
                if recovering and (pods or entry.job.state != State.STATE_QUEUED):
                    # It held a slot before the restart: it takes one now without queueing.
                    await self._hold_slot(env)
                elif not await self._queue(entry, env):
                    return
                try:
                    await self._stages(entry, env, pods)
                finally:
                    self._give_slot(env)
            except asyncio.CancelledError:
                if self.stopping:
                    return  # the job runs on in the cluster
                raise
            except Exception:
                log.exception("job crashed in the engine")
                await self._finish(
                    entry,
                    State.STATE_FAILED,
                    job_pb2.FAILURE_REASON_SANDBOX_FAILED,
                    "internal engine error; the operator has the details",
                )

    async def _queue(self, entry: EngineJob, env: EnvironmentSpec) -> bool:
        """Waits for a slot; False when the job ended meanwhile (stopped, timed out)."""
        self._enqueue(entry)
        try:
            await self._take_slot(entry, env)
        except QueueStopped:
            await self._finish(entry, State.STATE_CANCELLED, 0, "stopped while queued")
            return False
        except QueueTimeout:
            await self._finish(
                entry,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_QUEUE_TIMEOUT,
                f"queue timeout: the job waited {env.max_queue_wait_s:g} s for a free slot in "
                f"environment {env.name!r} and never ran",
            )
            return False
        return True

    async def _stages(
        self, entry: EngineJob, env: EnvironmentSpec, pods: dict[str, dict[str, Any]]
    ) -> None:
        job_id = entry.spec.job_id
        state = entry.job.state
        if objects.PUBLISH in pods or state == State.STATE_PUBLISHING:
            outcome = await self._saved_outcome(job_id)
            await self._publish(entry, env, *outcome)
            return
        if state == State.STATE_RUNNING and objects.ALGORITHM not in pods:
            # RUNNING is recorded once its pod exists: the pod was removed while no engine
            # watched it, and the algorithm is never run twice.
            await self._publish(
                entry,
                env,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_ENGINE_LOST,
                "engine lost: the job's pod was removed while the engine was away",
            )
            return
        if objects.ALGORITHM not in pods:
            if not entry.job.HasField("start_time"):
                entry.job.start_time.GetCurrentTime()
            await self._keep(entry, state=State.STATE_CONFIGURING, queue_position=0)
            try:
                configured = await self._configure(entry, pods.get(objects.CONFIGURE))
            except _Stopped:
                await self._publish(entry, env, State.STATE_CANCELLED, 0, "stopped")
                return
            if configured is not None:
                await self._publish(entry, env, State.STATE_FAILED, *configured)
                return
        ended: tuple[int, int, str]
        try:
            ended = await self._compute(entry, pods.get(objects.ALGORITHM))
        except _Stopped:
            ended = (State.STATE_CANCELLED, 0, "stopped")
        await self._publish(entry, env, *ended)

    async def _configure(
        self, entry: EngineJob, pod: dict[str, Any] | None
    ) -> tuple[int, str] | None:
        """Runs the configure pod; None when the job may run, else (reason, message)."""
        job_id = entry.spec.job_id
        fetches, fetched_bytes = objects.remote_inputs(entry.spec)
        copies, copied_bytes = objects.stored_inputs(entry.spec)
        # Copies from S3 need the store; a job that fetches may reach it already.
        store_egress = bool(copies) and self.settings.results_in_s3 and not fetches
        if pod is None:
            await self._create(
                self.core.create_namespaced_persistent_volume_claim,
                objects.workspace_claim(
                    self.settings, job_id, entry.job.limits, fetched_bytes + copied_bytes
                ),
            )
            network = (
                entry.spec.allow_network
                and self.environments[entry.job.environment].network_allowed
            )
            await self._create(
                self.networking.create_namespaced_network_policy,
                objects.network_policy(self.settings, job_id, network=network),
            )
            if fetches:
                await self._create(
                    self.networking.create_namespaced_network_policy,
                    objects.configure_network_policy(self.settings, job_id),
                )
            elif store_egress:
                await self._create(
                    self.networking.create_namespaced_network_policy,
                    objects.configure_store_network_policy(self.settings, job_id),
                )
            await self._create(
                self.core.create_namespaced_pod,
                objects.configure_pod(
                    self.settings,
                    job_id,
                    self.config.sources,
                    remote_files=fetches,
                    stored_files=copies,
                ),
            )
        end = await self._wait_stage(entry, objects.object_name(job_id, objects.CONFIGURE))
        if fetches or store_egress:
            # The fetching is over: no egress is left open for the job.
            await self._delete(
                self.networking.delete_namespaced_network_policy,
                objects.object_name(job_id, objects.CONFIGURE),
            )
        if end.succeeded:
            return None
        detail = _termination_detail(end.message)
        if end.exit_code == configure_exit.EXIT_DATA_PROVISIONING_FAILED:
            return job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED, detail
        if end.exit_code == configure_exit.EXIT_ALGORITHM_PROVISIONING_FAILED:
            return job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED, detail
        log.error("configure pod failed", reason=end.reason, exit_code=end.exit_code)
        return (
            job_pb2.FAILURE_REASON_SANDBOX_FAILED,
            f"the configure stage failed ({end.reason or f'exit {end.exit_code}'})",
        )

    async def _compute(self, entry: EngineJob, pod: dict[str, Any] | None) -> tuple[int, int, str]:
        job_id = entry.spec.job_id
        env = self.environments[entry.job.environment]
        name = objects.object_name(job_id, objects.ALGORITHM)
        if pod is None:
            try:
                manifest = objects.algorithm_pod(
                    self.settings,
                    entry.spec,
                    entry.job.limits,
                    network=entry.spec.allow_network and env.network_allowed,
                )
            except ValueError as error:
                return (
                    State.STATE_FAILED,
                    job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED,
                    str(error),
                )
            await self._create(self.core.create_namespaced_pod, manifest)
        await self._keep(entry, state=State.STATE_RUNNING)
        redactor = (
            CodeRedactor.for_code(entry.spec.algorithm.code)
            if entry.spec.algorithm.private
            else None
        )
        follower = asyncio.create_task(self._follow_log(entry, name, redactor))
        try:
            end = await self._wait_stage(entry, name, image_stage=True)
        finally:
            # The log to its end, then the follower stops.
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(follower), 10)
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower
        await self._read_rest_of_log(entry, name, redactor)
        entry.job.exit_code = end.exit_code
        log.info("compute ended", reason=end.reason, exit_code=end.exit_code)
        return _compute_outcome(end)

    async def _publish(
        self, entry: EngineJob, env: EnvironmentSpec, state: int, reason: int, message: str
    ) -> None:
        job_id = entry.spec.job_id
        outcome = json.dumps([state, reason, message])
        await self._patch_secret(
            entry, {"metadata": {"annotations": {objects.OUTCOME_ANNOTATION: outcome}}}
        )
        await self._keep(entry, state=State.STATE_PUBLISHING)
        name = objects.object_name(job_id, objects.PUBLISH)
        await self._delete_pod(objects.object_name(job_id, objects.ALGORITHM))
        await self._delete_pod(objects.object_name(job_id, objects.CONFIGURE))
        if self.settings.results_in_s3:
            # The job's deny-all policy would keep the publish pod from the results store.
            await self._create(
                self.networking.create_namespaced_network_policy,
                objects.publish_network_policy(self.settings, job_id),
            )
        if await self._read_pod(name) is None:
            await self._create(
                self.core.create_namespaced_pod,
                objects.publish_pod(
                    self.settings,
                    job_id,
                    max_files=env.max_output_files,
                    max_total_bytes=entry.job.limits.disk_bytes,
                    results=entry.job.result_selection,
                ),
            )
        try:
            end = await self._wait_stage(entry, name, stoppable=False)
            listing = (
                await self._listing(job_id)
                if end.exit_code in (0, publish_exit.EXIT_TOO_LARGE)
                else None
            )
        except Exception:
            log.exception("publish failed")
            end, listing = _StageEnd(False, -1, "", ""), None
        if listing is None:
            await self._finish(
                entry,
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_PUBLISH_FAILED,
                "results could not be stored: " + _termination_detail(end.message or end.reason),
            )
            return
        results = listing
        await self._store_algorithm_log(entry, results)
        del entry.job.results[:]
        entry.job.results.extend(results)
        if end.exit_code == publish_exit.EXIT_TOO_LARGE and state == State.STATE_SUCCEEDED:
            state = State.STATE_FAILED
            reason = job_pb2.FAILURE_REASON_OUTPUT_TOO_LARGE
            message = "the outputs exceed the environment's limit; the publish log lists them"
        await self._finish(entry, state, reason, message)

    async def _listing(self, job_id: str) -> list[job_pb2.ResultFile]:
        data = b"".join([chunk async for chunk in self.storage.read(job_id, objects.LISTING_KEY)])
        listing = json.loads(data)
        return [json_format.ParseDict(item, job_pb2.ResultFile()) for item in listing["results"]]

    async def _store_algorithm_log(
        self, entry: EngineJob, results: list[job_pb2.ResultFile]
    ) -> None:
        """Stores the algorithm's log (filtered already) as the job's next result, unless the
        consumer asked for the outputs only."""
        if not publish_exit.keeps_logs(entry.job.result_selection):
            return
        if not entry.log_path.exists():
            return
        result = job_pb2.ResultFile(
            index=len(results),
            name=layout.ALGORITHM_LOG,
            kind=job_pb2.ResultFile.KIND_ALGORITHM_LOG,
        )
        try:
            with entry.log_path.open("rb") as source:
                stored = await self.storage.put(entry.spec.job_id, result_key(result), source)
        except Exception:
            log.exception("the algorithm log could not be stored")
            return
        result.size_bytes = stored.size
        result.sha256 = stored.sha256
        results.append(result)

    async def _finish(
        self, entry: EngineJob, state: int, reason: int = 0, message: str = ""
    ) -> None:
        """Delivers its results when asked (while the engine's stop may still cut it off: the
        next engine then publishes again), removes the job's objects, then records its final
        state: a final job has nothing left running or held in the cluster but its record."""
        await self._settle_delivery(entry)
        self._finishing.add(entry.spec.job_id)
        try:
            # The publish pod is the only one left by now (or none, for a queued job).
            await self._delete_objects(entry.spec.job_id)
            await super()._finish(entry, state, reason, message)
        finally:
            self._finishing.discard(entry.spec.job_id)

    async def _saved_outcome(self, job_id: str) -> tuple[int, int, str]:
        secret = await self._read(self.core.read_namespaced_secret, objects.object_name(job_id))
        raw = ((secret or {}).get("metadata", {}).get("annotations") or {}).get(
            objects.OUTCOME_ANNOTATION
        )
        try:
            state, reason, message = json.loads(raw) if raw else (None, 0, "")
        except (TypeError, ValueError):
            state = None
        if state is None:
            return (
                State.STATE_FAILED,
                job_pb2.FAILURE_REASON_ENGINE_LOST,
                "engine lost: the engine restarted while the job ran",
            )
        return int(state), int(reason), str(message)

    # -- the algorithm's log --------------------------------------------------------------

    async def _follow_log(
        self, entry: EngineJob, pod_name: str, redactor: CodeRedactor | None
    ) -> None:
        """Appends the pod's log to the job's log as it comes, resuming after a broken
        stream; returns when the container has ended and the stream is done."""
        while True:
            pod = await self._read_pod(pod_name)
            if pod is None:
                return
            status = _container_status(pod)
            if "running" not in status.get("state", {}) and "terminated" not in status.get(
                "state", {}
            ):
                await asyncio.sleep(_RETRY_S)
                continue
            try:
                await self._copy_log(entry, pod_name, redactor, follow=True)
            except (TimeoutError, ApiException, OSError) as error:
                log.info("log stream broke off; resuming", error=str(error))
            if "terminated" in status.get("state", {}):
                return
            pod = await self._read_pod(pod_name)
            if pod is None or "terminated" in _container_status(pod).get("state", {}):
                return
            await asyncio.sleep(_RETRY_S)

    async def _read_rest_of_log(
        self, entry: EngineJob, pod_name: str, redactor: CodeRedactor | None
    ) -> None:
        """The whole log once more, once the container has ended: what the stream missed."""
        with contextlib.suppress(ApiException, OSError, asyncio.TimeoutError):
            await self._copy_log(entry, pod_name, redactor, _request_timeout=_API_TIMEOUT_S)
        if redactor is not None:
            rest = redactor.finish()
            if rest:
                await self._append_log(entry, rest, functools.partial(_append_file, entry.log_path))

    async def _copy_log(
        self, entry: EngineJob, pod_name: str, redactor: CodeRedactor | None, **options: Any
    ) -> None:
        """Appends the algorithm container's log, read from its start (followed, or within a
        timeout: `options`), to the job's log."""
        response: Any = await self.core.read_namespaced_pod_log(
            pod_name,
            self.settings.namespace,
            container=objects.ALGORITHM,
            _preload_content=False,
            **options,
        )
        _check_status(response)
        try:
            seen = 0
            async for chunk in response.content.iter_chunked(_LOG_CHUNK):
                seen = await self._append(entry, chunk, seen, redactor)
        finally:
            response.release()

    async def _append(
        self, entry: EngineJob, chunk: bytes, seen: int, redactor: CodeRedactor | None
    ) -> int:
        """Appends what of `chunk` (at raw offset `seen` of the pod's log) the job's log does
        not have yet; returns the raw offset after it."""
        raw_had = entry.raw_log_size
        end = seen + len(chunk)
        if end > raw_had:
            new = chunk[max(0, raw_had - seen) :]
            entry.raw_log_size = end
            if redactor is not None:
                new = redactor.feed(new)
            if new:
                await self._append_log(entry, new, functools.partial(_append_file, entry.log_path))
        return end

    async def _restore_log(self, entry: EngineJob) -> None:
        """A final job's log for its readers, from storage, after a restart."""
        for result in entry.job.results:
            if result.kind != job_pb2.ResultFile.KIND_ALGORITHM_LOG:
                continue
            with contextlib.suppress(Exception):
                data = b"".join(
                    [c async for c in self.storage.read(entry.spec.job_id, result_key(result))]
                )
                entry.log_path.write_bytes(data[: self.config.log_cap_bytes])
                entry.log_size = min(len(data), self.config.log_cap_bytes)

    # -- pods -----------------------------------------------------------------------------

    async def _wait_stage(
        self, entry: EngineJob, name: str, *, image_stage: bool = False, stoppable: bool = True
    ) -> _StageEnd:
        """Waits for the pod to end. Raises _Stopped (after deleting the pod) when the job is
        stopped first; a pod that cannot start ends with the reason why."""
        pending_since = time.monotonic()
        cancel = asyncio.ensure_future(entry.cancel.wait()) if stoppable else None
        try:
            async for pod in self._pod_states(name):
                if cancel is not None and cancel.done():
                    await self._delete_pod(name)
                    raise _Stopped
                if pod is None:
                    return _StageEnd(False, -1, "PodDeleted", "the job's pod was removed")
                end = _ended(pod)
                if end is not None:
                    return end
                waiting = _container_status(pod).get("state", {}).get("waiting", {})
                if image_stage and waiting.get("reason") in _IMAGE_FAILURES:
                    await self._delete_pod(name)
                    return _StageEnd(
                        False,
                        -1,
                        "ImageUnavailable",
                        f"the image could not be pulled ({waiting['reason']})",
                    )
                phase = pod.get("status", {}).get("phase", "Pending")
                if (
                    phase == "Pending"
                    and time.monotonic() - pending_since > self.settings.pending_timeout_s
                ):
                    await self._delete_pod(name)
                    why = waiting.get("reason") or _unscheduled_reason(pod)
                    return _StageEnd(
                        False,
                        -1,
                        "PendingTimeout",
                        f"the cluster did not start the job's pod within "
                        f"{self.settings.pending_timeout_s:g} s ({why})",
                    )
            raise AssertionError("the pod watch ended")  # _pod_states never ends by itself
        finally:
            if cancel is not None:
                cancel.cancel()

    async def _pod_states(self, name: str) -> AsyncIterator[dict[str, Any] | None]:
        """The pod now, then at each change, and again at least every few seconds so that
        callers look at the clock and the job's stop; None once it is gone. One watch feeds
        it, resumed from where it was; nothing is handed to the caller from inside a timeout
        or a watch, so the caller's own awaits are never cut short."""
        states: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        feeder = asyncio.create_task(self._watch_pod(name, states))
        last: dict[str, Any] | None = None
        seen = False
        try:
            while True:
                try:
                    last = await asyncio.wait_for(states.get(), _LOOK_AGAIN_S)
                    seen = True
                except TimeoutError:
                    if feeder.done():
                        feeder.result()  # its error, if it failed
                        return
                    if not seen:
                        continue
                yield last
                if last is None:
                    return
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    async def _watch_pod(self, name: str, states: asyncio.Queue[dict[str, Any] | None]) -> None:
        """Puts the pod's states on `states`: first as read, then as its watch reports them,
        resuming after each break from the last version seen (read again after a 410)."""
        pod = await self._read_pod(name)
        await states.put(pod)
        while pod is not None:
            version = pod["metadata"].get("resourceVersion", "")
            watcher = kube_watch.Watch()
            try:
                async for event in watcher.stream(
                    self.core.list_namespaced_pod,
                    self.settings.namespace,
                    field_selector=f"metadata.name={name}",
                    resource_version=version,
                    timeout_seconds=_WATCH_TIMEOUT_S,
                ):
                    if event["type"] == "DELETED":
                        await states.put(None)
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        pod = event["raw_object"]
                        await states.put(pod)
            except ApiException as error:
                if error.status == 410:  # its version is gone: from the pod as it is now
                    pod = await self._read_pod(name)
                    await states.put(pod)
                else:
                    log.info("pod watch broke off; watching again", pod=name, error=str(error))
                    await asyncio.sleep(_RETRY_S)
            except OSError as error:
                log.info("pod watch broke off; watching again", pod=name, error=str(error))
                await asyncio.sleep(_RETRY_S)
            finally:
                watcher.stop()

    async def _read_pod(self, name: str) -> dict[str, Any] | None:
        return await self._read(self.core.read_namespaced_pod, name)

    async def _job_pods(self, job_id: str) -> dict[str, dict[str, Any]]:
        selector = f"{objects.engine_selector(self.settings)},{objects.JOB_LABEL}={job_id}"
        pods = await self._list(self.core.list_namespaced_pod, selector)
        return {p["metadata"]["labels"].get(objects.STAGE_LABEL, ""): p for p in pods}

    async def _delete_pod(self, name: str) -> None:
        await self._delete(self.core.delete_namespaced_pod, name, grace=0)

    async def _delete_objects(self, job_id: str, *, with_secret: bool = False) -> None:
        """Every object of the job; its Secret (the job's record) too when `with_secret`."""
        for stage in objects.STAGES:
            await self._delete_pod(objects.object_name(job_id, stage))
        name = objects.object_name(job_id)
        await self._delete(self.core.delete_namespaced_persistent_volume_claim, name)
        await self._delete(self.networking.delete_namespaced_network_policy, name)
        for stage in (objects.CONFIGURE, objects.PUBLISH):
            await self._delete(
                self.networking.delete_namespaced_network_policy,
                objects.object_name(job_id, stage),
            )
        if with_secret:
            await self._delete(self.core.delete_namespaced_secret, name)

    async def _sweep_orphans(self, known: set[str]) -> None:
        selector = objects.engine_selector(self.settings)
        kinds: list[tuple[Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]]] = [
            (self.core.list_namespaced_pod, self.core.delete_namespaced_pod),
            (
                self.core.list_namespaced_persistent_volume_claim,
                self.core.delete_namespaced_persistent_volume_claim,
            ),
            (
                self.networking.list_namespaced_network_policy,
                self.networking.delete_namespaced_network_policy,
            ),
        ]
        for list_call, delete_call in kinds:
            for item in await self._list(list_call, selector):
                job_id = item["metadata"].get("labels", {}).get(objects.JOB_LABEL, "")
                if job_id not in known:
                    log.info("removing an orphaned object", job_id=job_id, kind=item.get("kind"))
                    await self._delete(delete_call, item["metadata"]["name"], grace=0)

    # -- API calls ------------------------------------------------------------------------

    async def _create(self, call: Callable[..., Awaitable[Any]], body: dict[str, Any]) -> None:
        try:
            await call(self.settings.namespace, body, _request_timeout=_API_TIMEOUT_S)
        except ApiException as error:
            if error.status != 409:  # made before a restart: the same object
                raise

    async def _read(self, call: Callable[..., Awaitable[Any]], name: str) -> dict[str, Any] | None:
        while True:
            try:
                response = await call(
                    name,
                    self.settings.namespace,
                    _preload_content=False,
                    _request_timeout=_API_TIMEOUT_S,
                )
                found: dict[str, Any] = json.loads(await _body(response))
                return found
            except ApiException as error:
                if error.status == 404:
                    return None
                if error.status < 500 and error.status != 429:
                    raise
                log.info("API call failed; retrying", status=error.status)
            except (OSError, TimeoutError) as error:
                log.info("API unreachable; retrying", error=str(error))
            await asyncio.sleep(_RETRY_S)

    async def _list(
        self, call: Callable[..., Awaitable[Any]], selector: str
    ) -> list[dict[str, Any]]:
        response = await call(
            self.settings.namespace,
            label_selector=selector,
            _preload_content=False,
            _request_timeout=_API_TIMEOUT_S,
        )
        items: list[dict[str, Any]] = json.loads(await _body(response)).get("items", [])
        return items

    async def _delete(
        self, call: Callable[..., Awaitable[Any]], name: str, *, grace: int | None = None
    ) -> None:
        options = {"grace_period_seconds": grace} if grace is not None else {}
        try:
            await call(
                name,
                self.settings.namespace,
                propagation_policy="Background",
                _request_timeout=_API_TIMEOUT_S,
                **options,
            )
        except ApiException as error:
            if error.status != 404:
                log.warning("could not delete", name=name, status=error.status)
        except (OSError, TimeoutError) as error:
            log.warning("could not delete", name=name, error=str(error))


async def _body(response: Any) -> bytes:
    """A raw response's body; ApiException for an error status (the client checks statuses
    only of the responses it parses itself)."""
    data: bytes = await response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=data[:300].decode("utf-8", "replace"))
    return data


def _append_file(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _check_status(response: Any) -> None:
    if not 200 <= response.status <= 299:
        response.release()
        raise ApiException(status=response.status, reason=response.reason)


def _container_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def _ended(pod: dict[str, Any]) -> _StageEnd | None:
    status = pod.get("status", {})
    phase = status.get("phase", "Pending")
    if phase not in ("Succeeded", "Failed"):
        return None
    terminated = _container_status(pod).get("state", {}).get("terminated", {})
    reason = status.get("reason") or terminated.get("reason", "")
    message = terminated.get("message") or status.get("message", "")
    return _StageEnd(phase == "Succeeded", int(terminated.get("exitCode", -1)), reason, message)


def _compute_outcome(end: _StageEnd) -> tuple[int, int, str]:
    """The job's end from its algorithm pod's, as the local sandbox names them."""
    failed = State.STATE_FAILED
    if end.succeeded:
        return State.STATE_SUCCEEDED, 0, ""
    if end.reason == "OOMKilled":
        return (
            failed,
            job_pb2.FAILURE_REASON_OUT_OF_MEMORY,
            "out of memory: the algorithm used more than its memory limit",
        )
    if end.reason == "DeadlineExceeded":
        return (
            failed,
            job_pb2.FAILURE_REASON_TIMED_OUT,
            "timed out: the algorithm ran past the job's deadline",
        )
    if end.reason == "Evicted" and "ephemeral" in end.message:
        return failed, job_pb2.FAILURE_REASON_DISK_FULL, "the job used more disk than its limit"
    if end.reason == "ImageUnavailable":
        return failed, job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED, end.message
    if end.exit_code > 0:
        return (
            failed,
            job_pb2.FAILURE_REASON_ALGORITHM_EXIT_NONZERO,
            f"the algorithm exited with status {end.exit_code}",
        )
    return (
        failed,
        job_pb2.FAILURE_REASON_SANDBOX_FAILED,
        end.message or f"the job's pod failed ({end.reason})",
    )


def _termination_detail(message: str) -> str:
    """The stage program's own message from its termination log (JSON), or the text."""
    try:
        parsed = json.loads(message)
    except ValueError:
        return message.strip()[:500]
    return str(parsed.get("message", "")) if isinstance(parsed, dict) else message[:500]


def _unscheduled_reason(pod: dict[str, Any]) -> str:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("message") or condition.get("reason") or "not scheduled")
    return "still pending"
