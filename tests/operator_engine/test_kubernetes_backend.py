"""Contract tests of the Kubernetes backend against a stand-in of the Kubernetes API
(tests/operator_engine/kube_standin.py; no cluster can run here). The backend runs for real:
its client, its watches, its log streams. The configure and publish pods run the project's
real stage programs as local processes (the stand-in's RunLocally kubelet); the algorithm's
pod, whose image cannot run here, is played by a script that writes its log, its outputs and
its end as a kubelet would. Every object the backend makes is validated strictly by the
stand-in on arrival and here against every Kubernetes version we support."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from c2d.common.v1 import container_pb2, job_pb2
from c2d.engine.v1 import engine_pb2
from kubernetes_asyncio import client as kube_client

from mesh import jobs as job_facts
from mesh.errors import NotFound, ResourceExhausted
from mesh.storage import storage_from_url
from operator_engine import delivery as delivery_module
from operator_engine.backends import kube_objects as objects
from operator_engine.backends.kubernetes import ClusterUnavailable, KubernetesBackend, connect
from operator_engine.backends.kubernetes_config import KubernetesSettings
from operator_engine.config import DeliverySettings, EngineConfig, EnvironmentSpec
from tests.kube_schemas import validate_strict
from tests.operator_engine.kube_standin import KubeStandIn, RunLocally, Running, Terminated
from tests.pods.http_source import TOKEN, running_http_source
from tests.s3_server import S3Server

NS = "c2d-jobs"
DATASET = "ab" * 32
ALGORITHM_ID = "cd" * 32
CODE = b"print('hello')\n"
State = job_pb2.Job.State
# One job at a time and one waiting; one job at a time, each waiting at most QUEUE_WAIT_S.
ONE_SLOT = EnvironmentSpec(name="one", max_concurrent_jobs=1, max_queued_jobs=1)
QUEUE_WAIT_S = 2.0
BRIEF_WAIT = EnvironmentSpec(name="brief", max_concurrent_jobs=1, max_queue_wait_s=QUEUE_WAIT_S)
Script = Callable[[KubeStandIn, dict[str, Any]], Awaitable[None]]


@dataclass
class Cluster:
    kube: KubeStandIn
    kubelet: RunLocally
    settings: KubernetesSettings
    config: EngineConfig
    data: Path
    results: Path
    created: list[dict[str, Any]]
    algorithm: list[Script]

    async def backend(self, config: EngineConfig | None = None) -> KubernetesBackend:
        api = await connect(self.settings)
        backend = KubernetesBackend(
            config or self.config, self.settings, api, storage_from_url(str(self.results))
        )
        await backend.check()
        await backend.recover()
        return backend

    def claim(self, job_id: str) -> Path:
        return self.kubelet.claim_dir(NS, objects.object_name(job_id))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    results.mkdir()
    (data / "numbers.csv").write_bytes(b"1\n2\n3\n")
    async with KubeStandIn(tmp_path / "kube") as kube:
        settings = KubernetesSettings(
            namespace=NS,
            pods_image="c2d-mesh:test",
            data_volume={"hostPath": {"path": str(data), "type": "Directory"}},
            results_volume={"hostPath": {"path": str(results), "type": "Directory"}},
            data_mount=str(data),
            results_mount=str(results),
            pending_timeout_s=5.0,
            kubeconfig=str(kube.kubeconfig_path),
        )
        config = EngineConfig(
            listen="unix:/nonexistent",
            workspace_root=tmp_path / "workspaces",
            data_root=data,
            storage_url=str(results),
            environments=(
                EnvironmentSpec(max_duration_s=60),
                EnvironmentSpec(name="networked", network_allowed=True),
                ONE_SLOT,
                BRIEF_WAIT,
            ),
        )
        kubelet = RunLocally(tmp_path / "kubelet")
        created: list[dict[str, Any]] = []
        algorithm: list[Script] = []

        async def run_pod(standin: KubeStandIn, pod: dict[str, Any]) -> None:
            created.append(pod)
            stage = pod["metadata"]["labels"][objects.STAGE_LABEL]
            if stage == objects.ALGORITHM:
                await algorithm[0](standin, pod)
            else:
                await kubelet(standin, pod)

        kube.on_pod(lambda pod: True, run_pod)
        yield Cluster(kube, kubelet, settings, config, data, results, created, algorithm)
        assert not kube.script_errors, kube.script_errors


def spec(job_id: str = "", **fields: Any) -> engine_pb2.JobSpec:
    made = engine_pb2.JobSpec(
        job_id=job_id or job_facts.new_job_id(),
        owner="0x" + "11" * 20,
        datasets=[engine_pb2.DatasetInput(id=DATASET, ddo_json='{"id": "did:c2d:ab"}')],
        algorithm=engine_pb2.AlgorithmInput(
            id=ALGORITHM_ID,
            code=CODE,
            code_sha256=hashlib.sha256(CODE).hexdigest(),
            entrypoint="python3 $ALGO",
        ),
        environment="default",
    )
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(made, name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(made, name).CopyFrom(value)
        else:
            setattr(made, name, value)
    return made


def with_data(cluster: Cluster, **fields: Any) -> engine_pb2.JobSpec:
    made = spec(**fields)
    made.datasets[0].files.add(path=str(cluster.data / "numbers.csv"))
    return made


def plays(
    cluster: Cluster,
    lines: list[str],
    ended: Terminated | None = None,
    outputs: dict[str, bytes] | None = None,
    *,
    gate: asyncio.Event | None = None,
    pod_reason: str | None = None,
) -> None:
    """The algorithm pod: runs, logs `lines`, writes `outputs`, waits for `gate`, ends."""

    async def script(kube: KubeStandIn, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        kube.set_pod_phase(NS, name, "Running", container_states={"algorithm": Running()})
        for line in lines:
            kube.append_log(NS, name, line + "\n")
            await asyncio.sleep(0.05)
        job_id = pod["metadata"]["labels"][objects.JOB_LABEL]
        for file, content in (outputs or {}).items():
            (cluster.claim(job_id) / "outputs" / file).write_bytes(content)
        if gate is not None:
            await gate.wait()
            if kube.get("pods", NS, name) is None:
                return
        end = ended or Terminated(0)
        kube.set_pod_phase(
            NS,
            name,
            "Succeeded" if end.exit_code == 0 and pod_reason is None else "Failed",
            container_states={"algorithm": end},
            reason=pod_reason,
        )

    cluster.algorithm[:] = [script]


def plays_reading_input(cluster: Cluster, index: int) -> list[bytes]:
    """The algorithm pod as `plays(cluster, [])`, first reading file `index` of DATASET from
    the job's volume (where the configure pod put it): what it read, one item per job."""
    plays(cluster, [])
    played = cluster.algorithm[0]
    seen: list[bytes] = []

    async def reading(kube: KubeStandIn, pod: dict[str, Any]) -> None:
        job_id = pod["metadata"]["labels"][objects.JOB_LABEL]
        inputs = cluster.claim(job_id) / "dataset-inputs" / DATASET
        seen.append((inputs / str(index)).read_bytes())
        await played(kube, pod)

    cluster.algorithm[:] = [reading]
    return seen


async def final(backend: KubernetesBackend, job_id: str, timeout: float = 30) -> job_pb2.Job:
    async def last() -> job_pb2.Job:
        seen = [job async for job in backend.watch(job_id)]
        return seen[-1]

    return await asyncio.wait_for(last(), timeout)


async def run_to_end(cluster: Cluster, job_spec: engine_pb2.JobSpec) -> job_pb2.Job:
    """Runs one job on an engine of its own, to its final state."""
    backend = await cluster.backend()
    try:
        await backend.submit(job_spec)
        return await final(backend, job_spec.job_id)
    finally:
        await backend.close()


async def read_result(cluster: Cluster, job: job_pb2.Job, kind: int) -> bytes:
    storage = storage_from_url(str(cluster.results))
    (result,) = [r for r in job.results if r.kind == kind]
    job_id = job.name.removeprefix("jobs/")
    return b"".join([c async for c in storage.read(job_id, f"{result.index:04d}")])


async def test_a_job_runs_through_its_pods_and_leaves_only_its_record(cluster: Cluster) -> None:
    plays(cluster, ["reading", "done"], outputs={"answer.txt": b"6\n"})
    backend = await cluster.backend()
    try:
        job_spec = with_data(cluster)
        accepted = await backend.submit(job_spec)
        assert accepted.state == State.STATE_QUEUED
        # Idempotent by id.
        assert (await backend.submit(job_spec)).name == accepted.name
        job = await final(backend, job_spec.job_id)
        assert job.state == State.STATE_SUCCEEDED, job.message
        kinds = {r.name: r.kind for r in job.results}
        assert kinds == {
            "answer.txt": job_pb2.ResultFile.KIND_OUTPUT,
            "configuration.log": job_pb2.ResultFile.KIND_CONFIGURATION_LOG,
            "publish.log": job_pb2.ResultFile.KIND_PUBLISH_LOG,
            "algorithm.log": job_pb2.ResultFile.KIND_ALGORITHM_LOG,
        }
        assert [r.index for r in job.results] == list(range(4))
        assert await read_result(cluster, job, job_pb2.ResultFile.KIND_OUTPUT) == b"6\n"
        assert (
            await read_result(cluster, job, job_pb2.ResultFile.KIND_ALGORITHM_LOG)
            == b"reading\ndone\n"
        )
        configuration = await read_result(cluster, job, job_pb2.ResultFile.KIND_CONFIGURATION_LOG)
        assert b"configure succeeded" in configuration
        chunks = [c.text async for c in backend.stream_log(job_spec.job_id, 0)]
        assert "".join(chunks) == "reading\ndone\n"

        # Every stage ran as a pod of its own, each validated on arrival and here.
        stages = [p["metadata"]["labels"][objects.STAGE_LABEL] for p in cluster.created]
        assert stages == [objects.CONFIGURE, objects.ALGORITHM, objects.PUBLISH]
        made = [r.body for r in cluster.kube.requests if r.method == "POST" and r.body]
        for obj in made:
            validate_strict(obj)
        # Nothing of the job is left but its record, without the spec (code, data paths).
        for kind in ("pods", "persistentvolumeclaims", "networkpolicies"):
            assert cluster.kube.objects(kind, NS) == [], kind
        (secret,) = cluster.kube.objects("secrets", NS)
        assert objects.SPEC_KEY not in (secret.get("data") or {})
        recorded = objects.decode_job(secret["metadata"]["annotations"][objects.JOB_ANNOTATION])
        assert recorded.state == State.STATE_SUCCEEDED
        await backend.delete(job_spec.job_id)
        assert cluster.kube.objects("secrets", NS) == []
    finally:
        await backend.close()


async def test_every_pod_is_hardened_and_sees_only_its_inputs(cluster: Cluster) -> None:
    plays(cluster, [])
    image = container_pb2.Container(
        image="registry.example/algo", tag="1", checksum="sha256:" + "ef" * 32
    )
    job_spec = with_data(
        cluster,
        parameters_json='{"rounds": 3}',
        resources=job_pb2.Resources(cpus=0.5, memory_bytes=256 << 20),
    )
    job_spec.algorithm.container.CopyFrom(image)
    job = await run_to_end(cluster, job_spec)
    assert job.state == State.STATE_SUCCEEDED, job.message
    for pod in cluster.created:
        spec_ = pod["spec"]
        assert spec_["restartPolicy"] == "Never"
        assert spec_["automountServiceAccountToken"] is False
        assert spec_["enableServiceLinks"] is False
        assert spec_["securityContext"]["runAsNonRoot"] is True
        assert spec_["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec_["activeDeadlineSeconds"] >= 1
        (container,) = spec_["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert not any(
            v.get("secret") for v in spec_["volumes"] if pod_stage(pod) != objects.CONFIGURE
        )
    (algorithm,) = [p for p in cluster.created if pod_stage(p) == objects.ALGORITHM]
    (container,) = algorithm["spec"]["containers"]
    assert container["image"] == f"registry.example/algo@{image.checksum}"
    assert container["command"] == ["python3", "/data/transformations/algorithm"]
    assert container["resources"]["limits"]["cpu"] == "500m"
    assert container["resources"]["limits"]["memory"] == str(256 << 20)
    assert algorithm["spec"]["activeDeadlineSeconds"] == 60
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[f"/data/inputs/{DATASET}/0"] == {
        "name": "data",
        "mountPath": f"/data/inputs/{DATASET}/0",
        "subPath": "numbers.csv",
        "readOnly": True,
    }
    assert mounts["/data/outputs"]["readOnly"] is False
    writable = [path for path, m in mounts.items() if not m.get("readOnly")]
    assert sorted(writable) == ["/data/outputs", "/tmp"]
    assert "/data/inputs/algoCustomData.json" in mounts
    env = {e["name"]: e["value"] for e in container["env"]}
    assert json.loads(env["DIDS"]) == [DATASET]
    assert env["TRANSFORMATION_DID"] == f"did:c2d:{ALGORITHM_ID}"


def pod_stage(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"][objects.STAGE_LABEL])


@pytest.mark.parametrize(
    ("ended", "pod_reason", "reason"),
    [
        (Terminated(137, "OOMKilled"), None, job_pb2.FAILURE_REASON_OUT_OF_MEMORY),
        (Terminated(137, "Error"), "DeadlineExceeded", job_pb2.FAILURE_REASON_TIMED_OUT),
        (Terminated(3, "Error"), None, job_pb2.FAILURE_REASON_ALGORITHM_EXIT_NONZERO),
    ],
)
async def test_how_the_algorithm_pod_ended_is_the_jobs_reason(
    cluster: Cluster, ended: Terminated, pod_reason: str | None, reason: int
) -> None:
    plays(cluster, ["working"], ended, pod_reason=pod_reason)
    job = await run_to_end(cluster, with_data(cluster))
    assert (job.state, job.failure_reason) == (State.STATE_FAILED, reason), job.message
    # The logs are published whatever the end.
    assert await read_result(cluster, job, job_pb2.ResultFile.KIND_ALGORITHM_LOG) == b"working\n"
    assert cluster.kube.objects("pods", NS) == []


async def test_a_missing_dataset_file_fails_in_configure(cluster: Cluster) -> None:
    plays(cluster, [])
    job_spec = spec()
    job_spec.datasets[0].files.add(path=str(cluster.data / "gone.csv"))
    job = await run_to_end(cluster, job_spec)
    assert job.failure_reason == job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
    assert "gone.csv" not in job.message  # never a dataset's location
    assert [pod_stage(p) for p in cluster.created] == [objects.CONFIGURE, objects.PUBLISH]


async def test_an_image_that_cannot_be_pulled_fails_the_algorithm(cluster: Cluster) -> None:
    async def unpullable(kube: KubeStandIn, pod: dict[str, Any]) -> None:
        from tests.operator_engine.kube_standin import Waiting

        kube.set_pod_phase(
            NS,
            pod["metadata"]["name"],
            "Pending",
            container_states={"algorithm": Waiting("ImagePullBackOff", "not found")},
        )

    cluster.algorithm[:] = [unpullable]
    job = await run_to_end(cluster, with_data(cluster))
    assert job.failure_reason == job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED
    assert "image" in job.message


async def test_a_stopped_job_loses_its_pod_and_ends_cancelled(cluster: Cluster) -> None:
    gate = asyncio.Event()
    plays(cluster, ["started"], gate=gate)
    backend = await cluster.backend()
    try:
        job_spec = with_data(cluster)
        await backend.submit(job_spec)
        async for job in backend.watch(job_spec.job_id):
            if job.state == State.STATE_RUNNING:
                break
        # The live log reaches readers while the pod runs.
        stream = backend.stream_log(job_spec.job_id, 0)
        first = await asyncio.wait_for(anext(stream), 10)
        assert first.text.startswith("started")
        stopped = await asyncio.wait_for(backend.stop(job_spec.job_id), 20)
        assert stopped.state == State.STATE_CANCELLED
        gate.set()
        assert cluster.kube.objects("pods", NS) == []
        deletes = [r.path for r in cluster.kube.requests if r.method == "DELETE"]
        assert any(
            path.endswith(objects.object_name(job_spec.job_id, objects.ALGORITHM))
            for path in deletes
        )
    finally:
        await backend.close()


async def test_network_is_denied_unless_the_job_and_environment_allow_it(cluster: Cluster) -> None:
    plays(cluster, [])
    backend = await cluster.backend()
    try:
        closed = with_data(cluster, allow_network=True)  # the default environment denies it
        opened = with_data(cluster, allow_network=True, environment="networked")
        for job_spec in (closed, opened):
            await backend.submit(job_spec)
            await final(backend, job_spec.job_id)
    finally:
        await backend.close()
    policies = {
        r.body["metadata"]["labels"][objects.JOB_LABEL]: r.body
        for r in cluster.kube.requests
        if r.method == "POST" and r.path.endswith("/networkpolicies")
    }
    assert policies[closed.job_id]["spec"]["egress"] == []
    assert policies[closed.job_id]["spec"]["ingress"] == []
    egress = policies[opened.job_id]["spec"]["egress"]
    blocked = egress[0]["to"][0]["ipBlock"]["except"]
    assert "10.0.0.0/8" in blocked and "169.254.0.0/16" in blocked


async def test_an_engine_restart_loses_nothing(cluster: Cluster) -> None:
    gate = asyncio.Event()
    plays(cluster, ["before the restart"], outputs={"out.txt": b"x"}, gate=gate)
    first = await cluster.backend()
    job_spec = with_data(cluster)
    try:
        await first.submit(job_spec)
        async for job in first.watch(job_spec.job_id):
            if job.state == State.STATE_RUNNING:
                break
    finally:
        await first.close()  # the engine stops; the job's pod runs on
    assert cluster.kube.get("pods", NS, objects.object_name(job_spec.job_id, objects.ALGORITHM))
    # An object of a job no engine knows is swept at start.
    orphan = objects.workspace_claim(
        cluster.settings, "f" * 32, job_pb2.Resources(disk_bytes=1 << 20)
    )
    cluster.kube.add(orphan, NS)

    second = await cluster.backend()
    try:
        assert cluster.kube.get("persistentvolumeclaims", NS, orphan["metadata"]["name"]) is None
        # Picked up where it was: its pod is watched again, not started again.
        async for job in second.watch(job_spec.job_id):
            if job.state == State.STATE_RUNNING:
                break
        gate.set()
        job = await final(second, job_spec.job_id)
        assert job.state == State.STATE_SUCCEEDED, job.message
        log = await read_result(cluster, job, job_pb2.ResultFile.KIND_ALGORITHM_LOG)
        assert log == b"before the restart\n"
        algorithm_pod = objects.object_name(job_spec.job_id, objects.ALGORITHM)
        creations = [
            r
            for r in cluster.kube.requests
            if r.method == "POST" and r.body and r.body["metadata"]["name"] == algorithm_pod
        ]
        assert len(creations) == 1
    finally:
        await second.close()

    # A third engine knows the final job, its results and its log.
    third = await cluster.backend()
    try:
        again = third.get(job_spec.job_id).job
        assert again.state == State.STATE_SUCCEEDED
        assert list(again.results) == list(job.results)
        chunks = [c.text async for c in third.stream_log(job_spec.job_id, 0)]
        assert "".join(chunks) == "before the restart\n"
    finally:
        await third.close()


async def test_a_spec_too_large_for_a_secret_is_refused(cluster: Cluster) -> None:
    from mesh.errors import InvalidArgument

    backend = await cluster.backend()
    try:
        big = b"#" * (800 * 1024)
        job_spec = with_data(cluster)
        job_spec.algorithm.code = big
        job_spec.algorithm.code_sha256 = hashlib.sha256(big).hexdigest()
        with pytest.raises(InvalidArgument, match="700 KiB"):
            await backend.submit(job_spec)
        assert cluster.kube.objects("secrets", NS) == []
    finally:
        await backend.close()


def test_the_job_secret_carries_the_spec_and_state() -> None:
    settings = KubernetesSettings(data_volume={"emptyDir": {}}, results_volume={"emptyDir": {}})
    made = spec()
    job = job_pb2.Job(name=f"jobs/{made.job_id}", state=State.STATE_QUEUED)
    secret = objects.job_secret(settings, made, job)
    validate_strict(secret)
    text = base64.b64decode(secret["data"][objects.SPEC_KEY]).decode()
    assert json.loads(text)["jobId"] == made.job_id
    assert objects.decode_job(secret["metadata"]["annotations"][objects.JOB_ANNOTATION]) == job


async def test_a_retried_submit_makes_one_job(cluster: Cluster) -> None:
    plays(cluster, [])
    backend = await cluster.backend()
    try:
        job_spec = with_data(cluster)
        first, second = await asyncio.gather(backend.submit(job_spec), backend.submit(job_spec))
        assert first.name == second.name
        job = await final(backend, job_spec.job_id)
        assert job.state == State.STATE_SUCCEEDED, job.message
        assert [pod_stage(p) for p in cluster.created] == [
            objects.CONFIGURE,
            objects.ALGORITHM,
            objects.PUBLISH,
        ]
    finally:
        await backend.close()


async def test_a_pod_removed_while_no_engine_watched_is_not_run_again(cluster: Cluster) -> None:
    gate = asyncio.Event()
    plays(cluster, ["once"], gate=gate)
    first = await cluster.backend()
    job_spec = with_data(cluster)
    try:
        await first.submit(job_spec)
        async for job in first.watch(job_spec.job_id):
            if job.state == State.STATE_RUNNING:
                break
    finally:
        await first.close()
    name = objects.object_name(job_spec.job_id, objects.ALGORITHM)
    api = await connect(cluster.settings)
    try:
        await kube_client.CoreV1Api(api).delete_namespaced_pod(name, NS)
    finally:
        await api.close()
    gate.set()
    second = await cluster.backend()
    try:
        job = await final(second, job_spec.job_id)
        assert job.failure_reason == job_pb2.FAILURE_REASON_ENGINE_LOST, job.message
        assert [pod_stage(p) for p in cluster.created].count(objects.ALGORITHM) == 1
    finally:
        await second.close()


def sources_secret(name: str, document: Any) -> dict[str, Any]:
    text = json.dumps(document).encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "data": {objects.SOURCES_KEY: base64.b64encode(text).decode()},
    }


async def test_remote_files_are_fetched_by_the_configure_pod_alone(cluster: Cluster) -> None:
    """The configure pod (the real program, run by the stand-in kubelet) fetches an HTTP file
    with the credentials from the sources Secret, through an egress policy of its own; the
    algorithm pod sees the file on the job's volume, read-only, and nothing of the secret."""
    content = b"4\n5\n"
    credentials = {"api": {"http": {"headers": {"Authorization": f"Bearer {TOKEN}"}}}}
    cluster.kube.add(sources_secret("c2d-sources", credentials), NS)
    cluster.settings = dataclasses.replace(cluster.settings, sources_secret="c2d-sources")
    seen = plays_reading_input(cluster, 1)
    with running_http_source() as http:
        http.serve("remote.csv", content)
        job_spec = with_data(cluster)
        job_spec.datasets[0].files.add(
            http_url=http.url("/private/remote.csv"),
            credentials="api",
            size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
        )
        job = await run_to_end(cluster, job_spec)
        assert http.seen == [("/private/remote.csv", f"Bearer {TOKEN}")]
    assert job.state == State.STATE_SUCCEEDED, job.message
    assert seen == [content]
    configuration = await read_result(cluster, job, job_pb2.ResultFile.KIND_CONFIGURATION_LOG)
    assert f"file 1 of dataset {DATASET}: 4 bytes fetched from HTTP".encode() in configuration

    made = [r.body for r in cluster.kube.requests if r.method == "POST" and r.body]
    for obj in made:
        validate_strict(obj)
    configure, algorithm = (
        next(p for p in cluster.created if pod_stage(p) == stage)
        for stage in (objects.CONFIGURE, objects.ALGORITHM)
    )
    (container,) = configure["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["C2D_SOURCE_CREDENTIALS"] == "/c2d/sources/credentials.json"
    assert env["C2D_SOURCE_TIMEOUT_S"] == "600.0"
    assert {"name": "sources", "mountPath": "/c2d/sources", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert configure["spec"]["activeDeadlineSeconds"] == 900 + 600
    (container,) = algorithm["spec"]["containers"]
    assert not any(v.get("secret") for v in algorithm["spec"]["volumes"])
    assert not [e for e in container["env"] if e["name"].startswith("C2D_")]
    assert TOKEN not in json.dumps(algorithm)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[f"/data/inputs/{DATASET}/1"] == {
        "name": "job",
        "mountPath": f"/data/inputs/{DATASET}/1",
        "subPath": f"dataset-inputs/{DATASET}/1",
        "readOnly": True,
    }
    # Egress for the configure pod only, gone with the job; the claim holds the fetched bytes.
    policies = [o for o in made if o["kind"] == "NetworkPolicy"]
    (egress,) = [p for p in policies if p["spec"].get("egress") == [{}]]
    assert egress["spec"]["podSelector"]["matchLabels"][objects.STAGE_LABEL] == objects.CONFIGURE
    assert egress["spec"]["policyTypes"] == ["Egress"]
    (claim,) = [o for o in made if o["kind"] == "PersistentVolumeClaim"]
    requested = int(claim["spec"]["resources"]["requests"]["storage"])
    assert requested == job.limits.disk_bytes + (64 << 20) + len(content)
    assert cluster.kube.objects("networkpolicies", NS) == []


async def test_a_job_without_remote_files_gets_no_egress_and_no_secret(cluster: Cluster) -> None:
    cluster.kube.add(sources_secret("c2d-sources", {}), NS)
    cluster.settings = dataclasses.replace(cluster.settings, sources_secret="c2d-sources")
    plays(cluster, [])
    assert (await run_to_end(cluster, with_data(cluster))).state == State.STATE_SUCCEEDED
    configure = next(p for p in cluster.created if pod_stage(p) == objects.CONFIGURE)
    assert [v["name"] for v in configure["spec"]["volumes"]] == ["job", "tmp", "spec", "data"]
    posted = [
        r.body for r in cluster.kube.requests if r.method == "POST" and r.path.endswith("policies")
    ]
    assert len(posted) == 1 and posted[0]["spec"]["egress"] == []


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (None, "no such Secret or key"),
        ({"w": {"s3": {"secret_access_key": "hidden-value"}}}, "entry 'w': an S3 access key"),
        ("not json", "not JSON"),
    ],
)
async def test_the_engine_refuses_a_missing_or_bad_sources_secret(
    cluster: Cluster, secret: Any, message: str
) -> None:
    if secret is not None:
        manifest = sources_secret("c2d-sources", {})
        manifest["data"][objects.SOURCES_KEY] = base64.b64encode(
            (secret if isinstance(secret, str) else json.dumps(secret)).encode()
        ).decode()
        cluster.kube.add(manifest, NS)
    cluster.settings = dataclasses.replace(cluster.settings, sources_secret="c2d-sources")
    api = await connect(cluster.settings)
    try:
        backend = KubernetesBackend(
            cluster.config, cluster.settings, api, storage_from_url(str(cluster.results))
        )
        with pytest.raises(ClusterUnavailable) as caught:
            await backend.check()
    finally:
        await api.close()
    assert message in str(caught.value)
    assert "C2D_K8S_SOURCES_SECRET 'c2d-sources'" in str(caught.value)
    assert "hidden-value" not in str(caught.value)


async def until(
    backend: KubernetesBackend, job_id: str, seen: Callable[[job_pb2.Job], bool]
) -> None:
    async with asyncio.timeout(20):
        async for job in backend.watch(job_id):
            if seen(job):
                return
    raise AssertionError(f"the job ended without {seen}")


def pods_of(cluster: Cluster, job_id: str) -> list[str]:
    return [
        pod_stage(p)
        for p in cluster.created
        if p["metadata"]["labels"][objects.JOB_LABEL] == job_id
    ]


async def test_a_full_queue_refuses_and_a_job_stopped_in_it_never_runs(cluster: Cluster) -> None:
    gate = asyncio.Event()
    plays(cluster, ["busy"], gate=gate)
    backend = await cluster.backend()
    try:
        running = with_data(cluster, environment=ONE_SLOT.name)
        await backend.submit(running)
        await until(backend, running.job_id, lambda job: job.state == State.STATE_RUNNING)
        waiting = with_data(cluster, environment=ONE_SLOT.name)
        assert (await backend.submit(waiting)).state == State.STATE_QUEUED
        await until(backend, waiting.job_id, lambda job: job.queue_position == 1)
        refused = with_data(cluster, environment=ONE_SLOT.name)
        with pytest.raises(ResourceExhausted) as full:
            await backend.submit(refused)
        assert full.value.reason == "QUEUE_FULL"
        with pytest.raises(NotFound):
            backend.get(refused.job_id)

        stopped = await asyncio.wait_for(backend.stop(waiting.job_id), 20)
        assert (stopped.state, stopped.message) == (State.STATE_CANCELLED, "stopped while queued")
        assert stopped.queue_position == 0
        gate.set()
        done = await final(backend, running.job_id)
        assert done.state == State.STATE_SUCCEEDED, done.message
    finally:
        await backend.close()
    assert pods_of(cluster, waiting.job_id) == []
    assert pods_of(cluster, refused.job_id) == []


async def test_a_job_that_waits_too_long_ends_queue_timeout(cluster: Cluster) -> None:
    gate = asyncio.Event()
    plays(cluster, ["busy"], gate=gate)
    backend = await cluster.backend()
    try:
        running = with_data(cluster, environment=BRIEF_WAIT.name)
        await backend.submit(running)
        await until(backend, running.job_id, lambda job: job.state == State.STATE_RUNNING)
        waiting = with_data(cluster, environment=BRIEF_WAIT.name)
        await backend.submit(waiting)
        timed_out = await final(backend, waiting.job_id)
        assert timed_out.state == State.STATE_FAILED, timed_out.message
        assert timed_out.failure_reason == job_pb2.FAILURE_REASON_QUEUE_TIMEOUT
        assert "queue timeout" in timed_out.message and "never ran" in timed_out.message
        gate.set()
        assert (await final(backend, running.job_id)).state == State.STATE_SUCCEEDED
    finally:
        await backend.close()
    assert pods_of(cluster, waiting.job_id) == []


async def test_a_wait_that_ran_out_while_no_engine_ran_ends_the_job_at_once(
    cluster: Cluster,
) -> None:
    """The wait counts from the job's creation: the next engine ends it `queue timeout` even
    with a slot free, rather than run it late."""
    gate = asyncio.Event()
    plays(cluster, ["busy"], gate=gate)
    first = await cluster.backend()
    try:
        running = with_data(cluster, environment=BRIEF_WAIT.name)
        await first.submit(running)
        await until(first, running.job_id, lambda job: job.state == State.STATE_RUNNING)
        waiting = with_data(cluster, environment=BRIEF_WAIT.name)
        created = (await first.submit(waiting)).create_time.ToNanoseconds() / 1e9
        await until(first, waiting.job_id, lambda job: job.queue_position == 1)
    finally:
        await first.close()
    await asyncio.sleep(max(0.0, created + QUEUE_WAIT_S - time.time()) + 0.2)
    # A slot is free for it in the next engine.
    wider = dataclasses.replace(
        cluster.config,
        environments=tuple(
            dataclasses.replace(env, max_concurrent_jobs=2) if env == BRIEF_WAIT else env
            for env in cluster.config.environments
        ),
    )
    second = await cluster.backend(wider)
    try:
        timed_out = await final(second, waiting.job_id)
        assert timed_out.failure_reason == job_pb2.FAILURE_REASON_QUEUE_TIMEOUT, timed_out.message
        gate.set()
        assert (await final(second, running.job_id)).state == State.STATE_SUCCEEDED
    finally:
        await second.close()
    assert pods_of(cluster, waiting.job_id) == []


def consumer_bucket(s3_server: S3Server, bucket: str) -> job_pb2.ResultDelivery:
    """The consumer's own bucket on moto's S3 server, with keys of its own."""
    return job_pb2.ResultDelivery(
        s3=job_pb2.S3Delivery(
            endpoint=s3_server.endpoint_url,
            bucket=bucket,
            prefix="mine/",
            access_key_id="consumer-key",
            secret_access_key=CONSUMER_SECRET,
        )
    )


CONSUMER_SECRET = "consumer-secret-never-in-the-cluster"
LOOPBACK_ALLOWED = DeliverySettings(allow_hosts=frozenset({"127.0.0.1"}), timeout_s=30)


async def test_the_publish_pod_keeps_the_choice_and_the_engine_delivers_after_it(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    plays(cluster, ["working"], outputs={"answer.txt": b"6\n"})
    config = dataclasses.replace(cluster.config, delivery=LOOPBACK_ALLOWED)
    backend = await cluster.backend(config)
    try:
        job_spec = with_data(cluster, results=job_pb2.RESULT_SELECTION_OUTPUTS)
        job_spec.delivery.CopyFrom(consumer_bucket(s3_server, s3_bucket))
        accepted = await backend.submit(job_spec)
        assert accepted.delivery.state == job_pb2.DeliveryStatus.STATE_PENDING
        job = await final(backend, job_spec.job_id)
    finally:
        await backend.close()
    assert job.state == State.STATE_SUCCEEDED, job.message
    # The publish pod was told the choice; the engine kept the algorithm's log out too.
    (publish,) = [p for p in cluster.created if pod_stage(p) == objects.PUBLISH]
    args = publish["spec"]["containers"][0]["args"]
    assert args[args.index("--results") + 1] == "outputs"
    assert [r.name for r in job.results] == ["answer.txt", "publish.log"]
    # Delivered by the engine, read back from the node's storage after the pod.
    assert job.delivery.state == job_pb2.DeliveryStatus.STATE_DELIVERED, job.delivery.message
    assert job.delivery.delivered_count == 2
    found = s3_server.objects(s3_bucket)
    assert set(found) == {
        f"mine/{job_spec.job_id}/answer.txt",
        f"mine/{job_spec.job_id}/publish.log",
    }
    assert found[f"mine/{job_spec.job_id}/answer.txt"] == b"6\n"
    # No request to the cluster ever carried the consumer's secret: the job's Secret holds
    # its spec without it.
    specs = 0
    for request in cluster.kube.requests:
        body = request.body or {}
        assert CONSUMER_SECRET not in json.dumps(body)
        spec_data = (body.get("data") or {}).get(objects.SPEC_KEY)
        if spec_data:
            specs += 1
            assert CONSUMER_SECRET not in base64.b64decode(spec_data).decode()
    assert specs == 1
    (secret,) = cluster.kube.objects("secrets", NS)
    recorded = objects.decode_job(secret["metadata"]["annotations"][objects.JOB_ANNOTATION])
    assert recorded.delivery == job.delivery


async def test_a_job_picked_up_by_another_engine_fails_its_delivery(
    cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    gate = asyncio.Event()
    plays(cluster, ["before the restart"], outputs={"out.txt": b"x"}, gate=gate)
    config = dataclasses.replace(cluster.config, delivery=LOOPBACK_ALLOWED)
    first = await cluster.backend(config)
    job_spec = with_data(cluster)
    job_spec.delivery.CopyFrom(consumer_bucket(s3_server, s3_bucket))
    try:
        await first.submit(job_spec)
        await until(first, job_spec.job_id, lambda job: job.state == State.STATE_RUNNING)
    finally:
        await first.close()
    # What the cluster holds of the job: its spec without the delivery's secrets.
    secret = cluster.kube.get("secrets", NS, objects.object_name(job_spec.job_id))
    assert secret is not None
    kept = json.loads(base64.b64decode(secret["data"][objects.SPEC_KEY]))
    assert kept["delivery"]["s3"] == {
        "endpoint": s3_server.endpoint_url,
        "bucket": s3_bucket,
        "prefix": "mine/",
    }
    second = await cluster.backend(config)
    try:
        gate.set()
        job = await final(second, job_spec.job_id)
    finally:
        await second.close()
    assert job.state == State.STATE_SUCCEEDED, job.message
    assert job.delivery.state == job_pb2.DeliveryStatus.STATE_FAILED
    assert job.delivery.message == delivery_module.NO_SECRETS
    assert s3_server.objects(s3_bucket) == {}
