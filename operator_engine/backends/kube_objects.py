"""The Kubernetes objects of one job, as plain manifests: a Secret holding the job (its spec,
and its state as an annotation), a volume for its workspace, a NetworkPolicy, and one pod per
stage (configure, algorithm, publish).

The configure pod alone may fetch dataset files from S3 or HTTP(S): a second NetworkPolicy,
made only for a job with such files, lets that pod (and no other) open connections, and the
node's source credentials reach it from the Secret named by C2D_K8S_SOURCES_SECRET, mounted
into it alone. Fetched files land on the job's volume (`dataset-inputs/`), which the
algorithm pod mounts file by file, read-only.

When results go to S3, the publish pod alone reaches the store (`publish_network_policy`, its
endpoint's port only) and gets its credentials, from the Secret named by
C2D_K8S_STORAGE_SECRET as environment variables; no pod mounts a results volume then. The one
exception is a job on a dataset made from jobs' outputs (`stored` files): its configure pod
reads them from the results storage (the results volume read-only, or S3 with the same Secret
and an egress policy of its own, `configure_store_network_policy`) and copies them, checked,
onto the job's volume, where the algorithm pod mounts them as it mounts fetched files.

Every pod is hardened the same way: non-root, read-only root file system, every capability
dropped, no privilege escalation, seccomp RuntimeDefault, no service-account token, no service
links, restartPolicy Never (a failed algorithm is never run again: an out-of-memory kill ends
the job with that reason), resource requests equal to the limits, and a deadline
(`activeDeadlineSeconds`). Only the algorithm pod runs consumer code; it mounts exactly its
inputs, read-only, and its outputs folder, and nothing else of the job's volume or the data
volume. Every job gets a NetworkPolicy selecting its pods that denies all traffic, with egress
to the outside (never to private ranges, so never the mesh's services or the cluster's
nodes) only when the job may use the network; it is made even where the namespace has a
default-deny policy of its own, so a cluster without one still isolates jobs."""

from __future__ import annotations

import base64
import math
import os
from typing import Any
from urllib.parse import urlparse

from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import json_format

from mesh import containers
from operator_engine.backends.kubernetes_config import KubernetesSettings
from operator_engine.sources import CREDENTIALS_VARIABLE, SourceSettings
from pods import workspace as layout
from pods.configure import algorithm_env, entrypoint_argv, remote_files, stored_files
from pods.publish import selection_flag

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "c2d-engine"
ENGINE_LABEL = "c2d.mesh/engine"
JOB_LABEL = "c2d.mesh/job-id"
STAGE_LABEL = "c2d.mesh/stage"
# The job's state (a serialized Job, base64) on its Secret: what the engine rebuilds from.
JOB_ANNOTATION = "c2d.mesh/job"
# How a job that reached publishing ended before it (JSON [state, reason, message]).
OUTCOME_ANNOTATION = "c2d.mesh/outcome"
SPEC_KEY = "spec.json"

CONFIGURE, ALGORITHM, PUBLISH = "configure", "algorithm", "publish"
STAGES = (CONFIGURE, ALGORITHM, PUBLISH)
# Where the stage pods see the job's volume, the spec, and the termination message.
WORKSPACE_MOUNT = "/c2d/job"
SPEC_MOUNT = "/c2d/spec"
# Where the configure pod sees the source credentials Secret, and the file's key in it.
SOURCES_MOUNT = "/c2d/sources"
SOURCES_KEY = "credentials.json"
TERMINATION_LOG = "/dev/termination-log"
# The publish pod stores its listing of results under this key, for the engine to read.
LISTING_KEY = "publish-listing"
# Room on the job's volume beyond its disk limit: the code, the DDOs, the logs.
_VOLUME_SLACK_BYTES = 64 << 20
# The stage programs' own needs, beside the job's limits.
_STAGE_CPU = "500m"
_STAGE_MEMORY = "256Mi"
_STAGE_TMP = "64Mi"
# Addresses a networked job still never reaches: private, shared, link-local (a cloud's
# metadata service) and loopback ranges, where the mesh and the cluster live.
_PRIVATE_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
)
_PRIVATE_V6 = ("::1/128", "fc00::/7", "fe80::/10")
# A spec this large does not fit a Secret (1 MiB, base64 and the rest included).
MAX_SPEC_JSON_BYTES = 700 * 1024


def object_name(job_id: str, stage: str = "") -> str:
    return f"c2d-{job_id}" + (f"-{stage}" if stage else "")


def labels(settings: KubernetesSettings, job_id: str, stage: str = "") -> dict[str, str]:
    found = {MANAGED_BY: MANAGER, ENGINE_LABEL: settings.engine_id, JOB_LABEL: job_id}
    if stage:
        found[STAGE_LABEL] = stage
    return found


def engine_selector(settings: KubernetesSettings) -> str:
    """The label selector of every object this engine made."""
    return f"{MANAGED_BY}={MANAGER},{ENGINE_LABEL}={settings.engine_id}"


def _metadata(
    settings: KubernetesSettings, job_id: str, stage: str = "", **extra: Any
) -> dict[str, Any]:
    return {
        "name": object_name(job_id, stage),
        "namespace": settings.namespace,
        "labels": labels(settings, job_id, stage),
        **extra,
    }


def encode_job(job: job_pb2.Job) -> str:
    return base64.b64encode(job.SerializeToString()).decode()


def decode_job(text: str) -> job_pb2.Job:
    return job_pb2.Job.FromString(base64.b64decode(text))


def spec_json(spec: engine_pb2.JobSpec) -> str:
    return json_format.MessageToJson(spec, indent=None)


def job_secret(
    settings: KubernetesSettings, spec: engine_pb2.JobSpec, job: job_pb2.Job
) -> dict[str, Any]:
    """The job's anchor: its spec (code, dataset locations: hence a Secret) and its state. The
    spec as stored: never with a delivery's secrets (the caller strips them)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(settings, spec.job_id, annotations={JOB_ANNOTATION: encode_job(job)}),
        "type": "Opaque",
        "data": {SPEC_KEY: base64.b64encode(spec_json(spec).encode()).decode()},
    }


def workspace_claim(
    settings: KubernetesSettings, job_id: str, limits: job_pb2.Resources, inputs_bytes: int = 0
) -> dict[str, Any]:
    """The job's volume: its outputs, its code, DDOs and logs, and `inputs_bytes` of dataset
    files the configure pod fetches."""
    size = limits.disk_bytes + _VOLUME_SLACK_BYTES + inputs_bytes
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(size)}},
    }
    if settings.storage_class:
        spec["storageClassName"] = settings.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(settings, job_id),
        "spec": spec,
    }


def network_policy(settings: KubernetesSettings, job_id: str, *, network: bool) -> dict[str, Any]:
    """Denies every pod of the job all traffic; with `network`, the algorithm may open
    connections to public addresses (and ask the cluster's DNS)."""
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": {JOB_LABEL: job_id, ENGINE_LABEL: settings.engine_id}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [],
        "egress": [],
    }
    if network:
        spec["egress"] = [
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(_PRIVATE_V4)}}]},
            {"to": [{"ipBlock": {"cidr": "::/0", "except": list(_PRIVATE_V6)}}]},
            {
                "to": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                        },
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            },
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(settings, job_id),
        "spec": spec,
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod(
    settings: KubernetesSettings,
    job_id: str,
    stage: str,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    deadline_s: float,
) -> dict[str, Any]:
    uid = settings.run_as_user
    container = {
        **container,
        "name": stage,
        "securityContext": _container_security(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(settings, job_id, stage),
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": max(1, math.ceil(deadline_s)),
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": uid,
                "runAsGroup": uid,
                "fsGroup": uid,
                "fsGroupChangePolicy": "OnRootMismatch",
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": volumes,
        },
    }


def _resources(cpu: str, memory: str, ephemeral: str) -> dict[str, Any]:
    amounts = {"cpu": cpu, "memory": memory, "ephemeral-storage": ephemeral}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _stage_volumes(settings: KubernetesSettings, job_id: str) -> list[dict[str, Any]]:
    return [
        {"name": "job", "persistentVolumeClaim": {"claimName": object_name(job_id)}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": _STAGE_TMP}},
    ]


def configure_network_policy(settings: KubernetesSettings, job_id: str) -> dict[str, Any]:
    """Lets the job's configure pod, and no other pod, open connections anywhere: it fetches
    the dataset files the owner registered (an in-cluster store as well as the Internet). It
    runs no consumer code. Ingress stays denied by the job's own policy; NetworkPolicies add
    up, so this one widens nothing for the algorithm."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(settings, job_id, CONFIGURE),
        "spec": {
            "podSelector": {
                "matchLabels": {
                    JOB_LABEL: job_id,
                    ENGINE_LABEL: settings.engine_id,
                    STAGE_LABEL: CONFIGURE,
                }
            },
            "policyTypes": ["Egress"],
            "egress": [{}],
        },
    }


def configure_pod(
    settings: KubernetesSettings,
    job_id: str,
    sources: SourceSettings | None = None,
    *,
    remote_files: int = 0,
    stored_files: int = 0,
) -> dict[str, Any]:
    """Verifies the inputs and lays out the job's volume: the same program as the local
    backend's configure stage. With `remote_files` to fetch, it gets `sources`'s limits, the
    source credentials Secret when there is one, and time for each fetch besides the stage's
    own deadline. With `stored_files` to copy from the results storage, it gets the storage
    (`_stored_access`) and time for each copy."""
    volumes = [
        *_stage_volumes(settings, job_id),
        {"name": "spec", "secret": {"secretName": object_name(job_id), "defaultMode": 0o400}},
        {"name": "data", **_read_only(settings.data_volume)},
    ]
    env = [{"name": "C2D_LOG_FORMAT", "value": "json"}]
    mounts = [
        {"name": "job", "mountPath": WORKSPACE_MOUNT},
        {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
        {"name": "data", "mountPath": settings.data_mount, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    deadline = settings.stage_timeout_s
    if remote_files:
        sources = sources or SourceSettings()
        env += [{"name": name, "value": value} for name, value in sources.limits_env().items()]
        deadline += remote_files * sources.timeout_s
    if remote_files and settings.sources_secret:
        # Owner-only (0400; the pod's group may read it through fsGroup): the file refuses to
        # load when others may read it.
        volumes.append(
            {
                "name": "sources",
                "secret": {"secretName": settings.sources_secret, "defaultMode": 0o400},
            }
        )
        mounts.append({"name": "sources", "mountPath": SOURCES_MOUNT, "readOnly": True})
        env.append({"name": CREDENTIALS_VARIABLE, "value": f"{SOURCES_MOUNT}/{SOURCES_KEY}"})
    container: dict[str, Any] = {
        "image": settings.pods_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "pods.configure"],
        "args": [
            "--spec",
            f"{SPEC_MOUNT}/{SPEC_KEY}",
            "--workspace",
            WORKSPACE_MOUNT,
            "--data-root",
            settings.data_mount,
            "--termination-log",
            TERMINATION_LOG,
        ],
        "env": env,
        "resources": _resources(_STAGE_CPU, _STAGE_MEMORY, _STAGE_TMP),
        "volumeMounts": mounts,
    }
    if stored_files:
        _stored_access(settings, container, volumes)
        deadline += stored_files * (sources or SourceSettings()).timeout_s
    return _pod(settings, job_id, CONFIGURE, container, volumes, deadline)


def _stored_access(
    settings: KubernetesSettings, container: dict[str, Any], volumes: list[dict[str, Any]]
) -> None:
    """Lets the configure container read the results storage, for `stored` files: the
    results volume read-only, or S3 with the store's settings and the credentials Secret as
    environment variables (this pod's and the publish pod's only: never the algorithm's)."""
    if settings.results_in_s3:
        storage = settings.storage_url
        container["env"] += [{"name": k, "value": v} for k, v in settings.storage_env.items()]
        container["envFrom"] = [{"secretRef": {"name": settings.storage_secret}}]
    else:
        storage = settings.results_mount
        volumes.append({"name": "results", **_read_only(settings.results_volume)})
        container["volumeMounts"].append(
            {"name": "results", "mountPath": settings.results_mount, "readOnly": True}
        )
    container["args"] += ["--storage", storage, "--copy-stored"]


def stored_inputs(spec: engine_pb2.JobSpec) -> tuple[int, int]:
    """How many dataset files the configure pod copies from the results storage, and their
    recorded bytes."""
    found = stored_files(spec)
    return len(found), sum(max(0, source.size_bytes) for source in found)


def stored_files_problem(settings: KubernetesSettings) -> str:
    """Why this engine's configure pods cannot read the results storage for `stored` files;
    empty when they can."""
    if settings.results_in_s3:
        if not settings.storage_secret:
            return "no Secret (C2D_K8S_STORAGE_SECRET) holds the results store's credentials"
        return ""
    if not settings.results_volume:
        return "no results volume (C2D_K8S_RESULTS_VOLUME) to mount into the configure pods"
    if "emptyDir" in settings.results_volume:
        return "the results volume is an emptyDir, which no other pod sees"
    return ""


def configure_store_network_policy(settings: KubernetesSettings, job_id: str) -> dict[str, Any]:
    """Lets the job's configure pod, and no other pod, reach the results store (as
    `publish_network_policy` lets the publish pod), for a job with `stored` files in S3 and no
    remote files (whose own policy lets the pod reach anything already)."""
    policy = publish_network_policy(settings, job_id)
    policy["metadata"] = _metadata(settings, job_id, CONFIGURE)
    policy["spec"]["podSelector"]["matchLabels"][STAGE_LABEL] = CONFIGURE
    return policy


def remote_inputs(spec: engine_pb2.JobSpec) -> tuple[int, int]:
    """How many dataset files the configure pod fetches, and their recorded bytes."""
    found = remote_files(spec)
    return len(found), sum(max(0, source.size_bytes) for source in found)


def algorithm_image(settings: KubernetesSettings, algorithm: engine_pb2.AlgorithmInput) -> str:
    """The image the algorithm runs in, pinned by digest when it names one."""
    if containers.is_set(algorithm.container):
        return f"{algorithm.container.image}@{algorithm.container.checksum}"
    return settings.algorithm_default_image


def algorithm_pod(
    settings: KubernetesSettings,
    spec: engine_pb2.JobSpec,
    limits: job_pb2.Resources,
    *,
    network: bool,
) -> dict[str, Any]:
    """The consumer's algorithm in its image, seeing the reference layout under /data: its
    inputs read-only, its outputs writable, nothing else."""
    job_id = spec.job_id
    mounts: list[dict[str, Any]] = []
    for dataset in spec.datasets:
        for index, source in enumerate(dataset.files):
            if source.WhichOneof("location") == "path":
                volume, sub = "data", os.path.relpath(source.path, settings.data_mount)
            else:
                # Fetched by the configure pod onto the job's volume.
                volume = "job"
                sub = f"{layout.DATASET_INPUTS}/{dataset.id}/{index}"
            mounts.append(
                {
                    "name": volume,
                    "mountPath": layout.sandbox_input_path(dataset.id, index),
                    "subPath": sub,
                    "readOnly": True,
                }
            )
    if spec.parameters_json:
        mounts.append(
            {
                "name": "job",
                "mountPath": layout.SANDBOX_ALGO_CUSTOM_DATA,
                "subPath": layout.ALGO_CUSTOM_DATA_FILE,
                "readOnly": True,
            }
        )
    for sub, target, writable in (
        (layout.DDOS, layout.SANDBOX_DDOS, False),
        (layout.TRANSFORMATIONS, layout.SANDBOX_TRANSFORMATIONS, False),
        (layout.OUTPUTS, layout.SANDBOX_OUTPUTS, True),
        (layout.LOGS, layout.SANDBOX_LOGS, False),
    ):
        mounts.append(
            {"name": "job", "mountPath": target, "subPath": sub, "readOnly": not writable}
        )
    # /tmp in memory, counted against the job's memory as in the local sandbox.
    tmp_bytes = max(1 << 20, limits.memory_bytes // 4)
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    volumes = [
        {"name": "job", "persistentVolumeClaim": {"claimName": object_name(job_id)}},
        {"name": "data", **_read_only(settings.data_volume)},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(tmp_bytes)}},
    ]
    env = {"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", **algorithm_env(spec)}
    container = {
        "image": algorithm_image(settings, spec.algorithm),
        "imagePullPolicy": "IfNotPresent",
        "command": entrypoint_argv(spec.algorithm.entrypoint),
        "workingDir": "/",
        "env": [{"name": name, "value": value} for name, value in env.items()],
        "resources": _resources(
            _millicores(limits.cpus), str(limits.memory_bytes), str(limits.disk_bytes)
        ),
        "volumeMounts": mounts,
    }
    deadline = limits.max_duration.ToNanoseconds() / 1e9
    pod = _pod(settings, job_id, ALGORITHM, container, volumes, deadline)
    if network:
        pod["metadata"]["labels"]["c2d.mesh/network"] = "allowed"
    return pod


def publish_network_policy(settings: KubernetesSettings, job_id: str) -> dict[str, Any]:
    """Lets the job's publish pod, and no other pod, reach the results store when results go to
    S3: the endpoint's port (any address: a store may be in-cluster or not, and a policy cannot
    name hosts) and the cluster's DNS. The pod runs no consumer code; NetworkPolicies add up, so
    this widens nothing for the algorithm."""
    port = _endpoint_port(settings.storage_env.get("C2D_S3_ENDPOINT", ""))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(settings, job_id, PUBLISH),
        "spec": {
            "podSelector": {
                "matchLabels": {
                    JOB_LABEL: job_id,
                    ENGINE_LABEL: settings.engine_id,
                    STAGE_LABEL: PUBLISH,
                }
            },
            "policyTypes": ["Egress"],
            "egress": [
                {"ports": [{"protocol": "TCP", "port": port}]},
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                            },
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
            ],
        },
    }


def _endpoint_port(endpoint: str) -> int:
    """The TCP port of an S3 endpoint URL (AWS's, https, when none is configured)."""
    parsed = urlparse(endpoint or "https://s3.amazonaws.com")
    return parsed.port or (80 if parsed.scheme == "http" else 443)


def publish_pod(
    settings: KubernetesSettings,
    job_id: str,
    *,
    max_files: int,
    max_total_bytes: int,
    results: int = job_pb2.RESULT_SELECTION_UNSPECIFIED,
) -> dict[str, Any]:
    """Stores the outputs and the stage logs and lists them: the same program as the local
    backend's publish stage, keeping what the consumer chose (`results`, a ResultSelection).
    The algorithm's log is stored by the engine, which holds it.

    Results go to the results volume, or, when the engine's storage is S3, to S3: the pod then
    mounts no results volume and gets the store's settings as environment variables, its
    credentials from the Secret `settings.storage_secret` (only this pod; the algorithm pod
    never sees them), and needs `publish_network_policy` to reach the store."""
    volumes = _stage_volumes(settings, job_id)
    mounts: list[dict[str, Any]] = [{"name": "job", "mountPath": WORKSPACE_MOUNT}]
    env = [{"name": "C2D_LOG_FORMAT", "value": "json"}]
    if settings.results_in_s3:
        storage = settings.storage_url
        env += [{"name": name, "value": value} for name, value in settings.storage_env.items()]
    else:
        storage = settings.results_mount
        volumes.append({"name": "results", **settings.results_volume})
        mounts.append({"name": "results", "mountPath": settings.results_mount})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    container: dict[str, Any] = {
        "image": settings.pods_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "pods.publish"],
        "args": [
            "--workspace",
            WORKSPACE_MOUNT,
            "--storage",
            storage,
            "--job-id",
            job_id,
            "--max-files",
            str(max_files),
            "--max-total-bytes",
            str(max_total_bytes),
            "--results",
            selection_flag(results),
            "--listing-key",
            LISTING_KEY,
            "--algorithm-log-by-engine",
            "--termination-log",
            TERMINATION_LOG,
        ],
        "env": env,
        "resources": _resources(_STAGE_CPU, _STAGE_MEMORY, _STAGE_TMP),
        "volumeMounts": mounts,
    }
    if settings.results_in_s3 and settings.storage_secret:
        container["envFrom"] = [{"secretRef": {"name": settings.storage_secret}}]
    return _pod(settings, job_id, PUBLISH, container, volumes, settings.stage_timeout_s)


def _millicores(cpus: float) -> str:
    return f"{max(1, math.ceil(cpus * 1000))}m"


def _read_only(source: dict[str, Any]) -> dict[str, Any]:
    """The volume source, read-only where the source type can say so."""
    ((kind, options),) = source.items()
    if kind in ("persistentVolumeClaim", "nfs", "csi"):
        return {kind: {**options, "readOnly": True}}
    return {kind: dict(options)}
