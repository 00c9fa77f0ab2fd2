"""The Kubernetes backend's settings, from the environment (C2D_K8S_*)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from mesh import config as mesh_config

# Volume sources a job pod may mount data and results from: never a Secret or a projected
# token, which would hand a job credentials.
_VOLUME_KINDS = frozenset({"persistentVolumeClaim", "hostPath", "nfs", "csi", "emptyDir"})


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how jobs run in the cluster."""

    # The namespace of every job object; the engine needs rights there only.
    namespace: str = "c2d-jobs"
    # Tells this engine's objects from another engine's in the same namespace.
    engine_id: str = "c2d-engine"
    # The image of the configure and publish pods (the mesh's own image), and the image an
    # algorithm without a container runs in (the host runtime's counterpart: Python 3).
    pods_image: str = "c2d-mesh:dev"
    runtime_image: str = ""
    # Kubernetes volume sources (as in a pod spec) of the datasets and of the results folder.
    data_volume: dict[str, Any] = field(default_factory=dict)
    results_volume: dict[str, Any] = field(default_factory=dict)
    # Where the datasets and results appear in the stage pods: the engine's data root and
    # storage folder, so the paths in a job's spec mean the same thing there.
    data_mount: str = "/c2d/data"
    results_mount: str = "/c2d/results"
    storage_class: str = ""
    # The identity every job pod runs as (non-root); the job's volume belongs to its group.
    run_as_user: int = 10001
    # How long a pod may stay Pending (unschedulable, pulling its image) before the job fails.
    pending_timeout_s: float = 600.0
    # The deadline of the configure and publish pods.
    stage_timeout_s: float = 900.0
    # Path to a kubeconfig; empty: in-cluster, else $KUBECONFIG or ~/.kube/config.
    kubeconfig: str = ""
    # A Secret in the jobs namespace holding the source credentials file (key
    # `credentials.json`, as C2D_SOURCE_CREDENTIALS describes it), mounted into configure pods
    # only; empty: fetches use no named credentials.
    sources_secret: str = ""
    # The engine's results storage when it is S3 (s3://BUCKET/PREFIX; empty: the results
    # volume): publish pods then store there directly, with the store's non-secret settings
    # (C2D_S3_ENDPOINT, _REGION, _PATH_STYLE) as `storage_env` and the credentials from the
    # Secret `storage_secret` (C2D_K8S_STORAGE_SECRET), whose keys become their environment.
    # Publish pods only: no other pod of a job gets either.
    storage_url: str = ""
    storage_secret: str = ""
    storage_env: dict[str, str] = field(default_factory=dict)

    @property
    def algorithm_default_image(self) -> str:
        return self.runtime_image or self.pods_image

    @property
    def results_in_s3(self) -> bool:
        return self.storage_url.startswith("s3://")

    @classmethod
    def from_env(cls) -> KubernetesSettings:
        data_root = str(mesh_config.data_root())
        storage = mesh_config.storage_url()
        in_s3 = storage.startswith("s3://")
        storage_secret = os.environ.get("C2D_K8S_STORAGE_SECRET", "")
        if in_s3 and not storage_secret:
            raise ValueError(
                "C2D_K8S_STORAGE_SECRET must name the Secret holding the S3 credentials of the "
                "publish pods (e.g. C2D_S3_ACCESS_KEY_ID, C2D_S3_SECRET_ACCESS_KEY) when "
                "C2D_STORAGE is s3://"
            )
        return cls(
            namespace=os.environ.get("C2D_K8S_NAMESPACE", "c2d-jobs"),
            engine_id=os.environ.get("C2D_K8S_ENGINE_ID", "c2d-engine"),
            pods_image=os.environ.get("C2D_K8S_PODS_IMAGE", "c2d-mesh:dev"),
            runtime_image=os.environ.get("C2D_K8S_RUNTIME_IMAGE", ""),
            data_volume=volume_source("C2D_K8S_DATA_VOLUME"),
            # With results in S3, no pod mounts a results volume.
            results_volume=(
                {}
                if in_s3 and not os.environ.get("C2D_K8S_RESULTS_VOLUME")
                else volume_source("C2D_K8S_RESULTS_VOLUME")
            ),
            data_mount=data_root,
            results_mount="/c2d/results" if in_s3 else storage.removeprefix("file://"),
            storage_class=os.environ.get("C2D_K8S_STORAGE_CLASS", ""),
            run_as_user=mesh_config.env_int("C2D_K8S_RUN_AS_USER", 10001),
            pending_timeout_s=mesh_config.env_float("C2D_K8S_PENDING_TIMEOUT_S", 600.0),
            stage_timeout_s=mesh_config.env_float("C2D_K8S_STAGE_TIMEOUT_S", 900.0),
            kubeconfig=os.environ.get("C2D_K8S_KUBECONFIG", ""),
            sources_secret=os.environ.get("C2D_K8S_SOURCES_SECRET", ""),
            storage_url=storage if in_s3 else "",
            storage_secret=storage_secret if in_s3 else "",
            storage_env=_s3_env() if in_s3 else {},
        )


def _s3_env() -> dict[str, str]:
    """The engine's non-secret S3 settings, for publish pods (credentials come from the
    Secret, never from the engine's own environment)."""
    names = ("C2D_S3_ENDPOINT", "C2D_S3_REGION", "C2D_S3_PATH_STYLE")
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def volume_source(variable: str) -> dict[str, Any]:
    """A volume source from a JSON variable, e.g. {"persistentVolumeClaim": {"claimName":
    "c2d-data"}}; ValueError naming the variable when it is missing or not one source."""
    raw = os.environ.get(variable, "")
    if not raw:
        raise ValueError(
            f"{variable} must name the volume as a JSON volume source, e.g. "
            '{"persistentVolumeClaim": {"claimName": "c2d-data"}}'
        )
    try:
        source = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{variable} is not JSON: {error}") from None
    if not isinstance(source, dict) or len(source) != 1 or next(iter(source)) not in _VOLUME_KINDS:
        raise ValueError(
            f"{variable} must hold exactly one volume source of {sorted(_VOLUME_KINDS)}"
        )
    return source
