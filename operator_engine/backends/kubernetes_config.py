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

    @property
    def algorithm_default_image(self) -> str:
        return self.runtime_image or self.pods_image

    @classmethod
    def from_env(cls) -> KubernetesSettings:
        data_root = str(mesh_config.data_root())
        storage = mesh_config.storage_url()
        return cls(
            namespace=os.environ.get("C2D_K8S_NAMESPACE", "c2d-jobs"),
            engine_id=os.environ.get("C2D_K8S_ENGINE_ID", "c2d-engine"),
            pods_image=os.environ.get("C2D_K8S_PODS_IMAGE", "c2d-mesh:dev"),
            runtime_image=os.environ.get("C2D_K8S_RUNTIME_IMAGE", ""),
            data_volume=volume_source("C2D_K8S_DATA_VOLUME"),
            results_volume=volume_source("C2D_K8S_RESULTS_VOLUME"),
            data_mount=data_root,
            results_mount=storage.removeprefix("file://"),
            storage_class=os.environ.get("C2D_K8S_STORAGE_CLASS", ""),
            run_as_user=mesh_config.env_int("C2D_K8S_RUN_AS_USER", 10001),
            pending_timeout_s=mesh_config.env_float("C2D_K8S_PENDING_TIMEOUT_S", 600.0),
            stage_timeout_s=mesh_config.env_float("C2D_K8S_STAGE_TIMEOUT_S", 900.0),
            kubeconfig=os.environ.get("C2D_K8S_KUBECONFIG", ""),
        )


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
