"""Jobs on datasets made from jobs' outputs (`stored` dataset files) on the Kubernetes backend.
The configure pod, and no other, reads the results storage: the results volume read-only, or S3
with the storage's Secret and an egress policy of its own; it copies each file, checked against
its recorded size and sha256, onto the job's volume, where the algorithm pod mounts it like a
fetched file. A node whose configure pods cannot reach the storage refuses such a job at RunJob.

Manifests are validated strictly against every supported Kubernetes version; the jobs run
against the stand-in of the Kubernetes API (kube_standin.py, no cluster can run here) with the
real configure program, as tests/operator_engine/test_kubernetes_backend.py does. The stand-in's
kubelet reads no `envFrom`, so an S3 storage is checked on its manifests only."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any

import pytest
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import duration_pb2

from mesh.errors import FailedPrecondition
from mesh.storage import LocalStorage
from operator_engine.backends import kube_objects as objects
from operator_engine.backends.kubernetes_config import KubernetesSettings
from operator_engine.sources import SourceSettings
from tests.kube_schemas import validate_strict
from tests.operator_engine import test_kubernetes_backend
from tests.operator_engine.test_kubernetes_backend import (
    DATASET,
    Cluster,
    plays,
    plays_reading_input,
    pod_stage,
    read_result,
    run_to_end,
    spec,
)

JOB = "0123456789abcdef0123456789abcdef"
EARLIER_JOB = "fedcba9876543210fedcba9876543210"
STORAGE = "s3://c2d-results/node-1"
SECRET = "c2d-results-s3"
CONTENT = b"1\n4\n9\n16\n"
State = job_pb2.Job.State
# The backend tests' cluster (a stand-in API whose kubelet runs the stage programs), as the
# fixture `standin`.
standin = test_kubernetes_backend.cluster


def s3_settings() -> KubernetesSettings:
    return KubernetesSettings(
        data_volume={"persistentVolumeClaim": {"claimName": "c2d-data"}},
        storage_url=STORAGE,
        storage_secret=SECRET,
        storage_env={"C2D_S3_ENDPOINT": "http://minio.storage.svc:9000"},
    )


def volume_settings(results: dict[str, Any] | None = None) -> KubernetesSettings:
    return KubernetesSettings(
        data_volume={"persistentVolumeClaim": {"claimName": "c2d-data"}},
        results_volume=results or {"persistentVolumeClaim": {"claimName": "c2d-results"}},
        results_mount="/srv/results",
    )


def stored_spec(job_id: str = JOB, content: bytes = CONTENT) -> engine_pb2.JobSpec:
    made = spec(job_id)
    made.datasets[0].files.add(
        stored=f"datasets/{DATASET}/0000",
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
    )
    return made


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["spec"]["containers"]
    return dict(only)


# -- manifests ---------------------------------------------------------------------------------


def test_with_results_in_s3_the_configure_pod_alone_gets_the_store() -> None:
    settings = s3_settings()
    pod = objects.configure_pod(settings, JOB, SourceSettings(timeout_s=100), stored_files=2)
    validate_strict(pod)
    main = container(pod)
    args = main["args"]
    assert args[args.index("--storage") + 1] == STORAGE
    assert "--copy-stored" in args
    assert main["envFrom"] == [{"secretRef": {"name": SECRET}}]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["C2D_S3_ENDPOINT"] == "http://minio.storage.svc:9000"
    assert not {"C2D_S3_ACCESS_KEY_ID", "C2D_S3_SECRET_ACCESS_KEY"} & set(env)
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"job", "tmp", "spec", "data"}
    assert pod["spec"]["activeDeadlineSeconds"] == 900 + 2 * 100

    # The algorithm's pod never: its stored inputs come from the job's volume.
    limits = job_pb2.Resources(
        cpus=1,
        memory_bytes=256 << 20,
        disk_bytes=1 << 30,
        max_duration=duration_pb2.Duration(seconds=60),
    )
    algorithm = objects.algorithm_pod(settings, stored_spec(), limits, network=True)
    validate_strict(algorithm)
    main = container(algorithm)
    assert "envFrom" not in main
    assert not any(e["name"].startswith(("C2D_", "AWS_")) for e in main["env"])
    assert SECRET not in json.dumps(algorithm)
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert mounts[f"/data/inputs/{DATASET}/0"] == {
        "name": "job",
        "mountPath": f"/data/inputs/{DATASET}/0",
        "subPath": f"dataset-inputs/{DATASET}/0",
        "readOnly": True,
    }


def test_the_configure_pod_alone_may_reach_the_store() -> None:
    policy = objects.configure_store_network_policy(s3_settings(), JOB)
    validate_strict(policy)
    assert policy["metadata"]["name"] == objects.object_name(JOB, objects.CONFIGURE)
    spec_ = policy["spec"]
    assert spec_["podSelector"]["matchLabels"][objects.STAGE_LABEL] == objects.CONFIGURE
    store, dns = spec_["egress"]
    assert store == {"ports": [{"protocol": "TCP", "port": 9000}]}
    assert {p["port"] for p in dns["ports"]} == {53}
    # The publish pod's own policy is as it was.
    publish = objects.publish_network_policy(s3_settings(), JOB)
    assert publish["spec"]["podSelector"]["matchLabels"][objects.STAGE_LABEL] == objects.PUBLISH


def test_with_results_on_a_volume_the_configure_pod_mounts_it_read_only() -> None:
    pod = objects.configure_pod(volume_settings(), JOB, stored_files=1)
    validate_strict(pod)
    main = container(pod)
    args = main["args"]
    assert args[args.index("--storage") + 1] == "/srv/results"
    assert "--copy-stored" in args
    assert "envFrom" not in main
    (results,) = [v for v in pod["spec"]["volumes"] if v["name"] == "results"]
    assert results["persistentVolumeClaim"] == {"claimName": "c2d-results", "readOnly": True}
    assert {"name": "results", "mountPath": "/srv/results", "readOnly": True} in main[
        "volumeMounts"
    ]
    # Without stored files, nothing of the storage.
    plain = objects.configure_pod(volume_settings(), JOB)
    assert "--storage" not in container(plain)["args"]
    assert [v["name"] for v in plain["spec"]["volumes"]] == ["job", "tmp", "spec", "data"]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (s3_settings(), ""),
        (volume_settings(), ""),
        (dataclasses.replace(s3_settings(), storage_secret=""), "C2D_K8S_STORAGE_SECRET"),
        (KubernetesSettings(), "no results volume"),
        (volume_settings({"emptyDir": {}}), "emptyDir"),
    ],
)
def test_which_storage_the_configure_pods_can_read(
    settings: KubernetesSettings, problem: str
) -> None:
    found = objects.stored_files_problem(settings)
    assert (problem in found) if problem else found == ""
    assert objects.stored_inputs(stored_spec()) == (1, len(CONTENT))


# -- jobs, against the stand-in ----------------------------------------------------------------


async def stored_copy(standin: Cluster, content: bytes = CONTENT) -> None:
    """File 0 of DATASET in the results volume's dataset area, copied from an earlier job."""
    storage = LocalStorage(standin.results)
    stored = storage.put_blocking(EARLIER_JOB, "0000", io.BytesIO(content))
    await storage.export_result(
        EARLIER_JOB, "0000", DATASET, 0, size=stored.size, sha256=stored.sha256
    )


async def test_the_configure_pod_copies_a_stored_file_onto_the_jobs_volume(
    standin: Cluster,
) -> None:
    await stored_copy(standin)
    seen = plays_reading_input(standin, 0)
    job = await run_to_end(standin, stored_spec(job_id=""))
    assert job.state == State.STATE_SUCCEEDED, job.message
    assert seen == [CONTENT]
    configuration = await read_result(standin, job, job_pb2.ResultFile.KIND_CONFIGURATION_LOG)
    assert (
        f"file 0 of dataset {DATASET}: {len(CONTENT)} bytes copied from the node's storage".encode()
        in configuration
    )
    configure = next(p for p in standin.created if pod_stage(p) == objects.CONFIGURE)
    (main,) = configure["spec"]["containers"]
    assert main["args"][main["args"].index("--storage") + 1] == str(standin.results)
    # No egress for a volume; the claim holds the copy besides the job's disk.
    made = [r.body for r in standin.kube.requests if r.method == "POST" and r.body]
    policies = [o for o in made if o["kind"] == "NetworkPolicy"]
    assert len(policies) == 1 and policies[0]["spec"]["egress"] == []
    (claim,) = [o for o in made if o["kind"] == "PersistentVolumeClaim"]
    requested = int(claim["spec"]["resources"]["requests"]["storage"])
    assert requested == job.limits.disk_bytes + (64 << 20) + len(CONTENT)


async def test_a_tampered_stored_file_fails_the_job_in_configure(standin: Cluster) -> None:
    await stored_copy(standin, b"1\n4\n9\n17\n")  # what is stored is not what was recorded
    plays(standin, [])
    job = await run_to_end(standin, stored_spec(job_id=""))
    assert job.state == State.STATE_FAILED
    assert job.failure_reason == job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
    assert f"file 0 of dataset {DATASET}" in job.message
    assert str(standin.results) not in job.message
    assert [pod_stage(p) for p in standin.created] == [objects.CONFIGURE, objects.PUBLISH]


async def test_a_node_whose_configure_pods_cannot_read_the_storage_refuses_the_job(
    standin: Cluster,
) -> None:
    standin.settings = dataclasses.replace(standin.settings, results_volume={"emptyDir": {}})
    backend = await standin.backend()
    try:
        with pytest.raises(FailedPrecondition) as refused:
            await backend.submit(stored_spec(job_id=""))
        assert refused.value.reason == "STORED_DATASETS_UNREACHABLE"
        assert backend.jobs == {}
        # A job without stored files runs there as before.
        plays(standin, [])
        plain = spec()
        plain.datasets[0].files.add(path=str(standin.data / "numbers.csv"))
        await backend.submit(plain)
    finally:
        await backend.close()
