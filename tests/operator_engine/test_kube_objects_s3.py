"""The Kubernetes objects of a job whose results go to S3: the publish pod, and only it, gets the
store's settings and the credentials Secret, mounts no results volume, and may reach the
store; every object still validates strictly against the supported Kubernetes versions."""

from __future__ import annotations

from typing import Any

import pytest
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import duration_pb2

from operator_engine.backends import kube_objects as objects
from operator_engine.backends.kubernetes_config import KubernetesSettings
from tests.kube_schemas import validate_strict

JOB = "0123456789abcdef0123456789abcdef"
STORAGE = "s3://c2d-results/node-1"
SECRET = "c2d-results-s3"


def s3_settings(endpoint: str = "http://minio.storage.svc:9000") -> KubernetesSettings:
    return KubernetesSettings(
        data_volume={"persistentVolumeClaim": {"claimName": "c2d-data"}},
        storage_url=STORAGE,
        storage_secret=SECRET,
        storage_env={"C2D_S3_ENDPOINT": endpoint, "C2D_S3_REGION": "eu-west-1"} if endpoint else {},
    )


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["spec"]["containers"]
    return dict(only)


def env_names(pod: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container(pod).get("env", [])}


def test_the_publish_pod_stores_in_s3_with_the_secret_and_no_results_volume() -> None:
    settings = s3_settings()
    pod = objects.publish_pod(settings, JOB, max_files=10, max_total_bytes=1 << 20)
    validate_strict(pod)
    main = container(pod)
    args = main["args"]
    assert args[args.index("--storage") + 1] == STORAGE
    assert main["envFrom"] == [{"secretRef": {"name": SECRET}}]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["C2D_S3_ENDPOINT"] == "http://minio.storage.svc:9000"
    assert env["C2D_S3_REGION"] == "eu-west-1"
    assert not {"C2D_S3_ACCESS_KEY_ID", "C2D_S3_SECRET_ACCESS_KEY"} & set(env)
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"job", "tmp"}
    assert [m["name"] for m in main["volumeMounts"]] == ["job", "tmp"]


def test_with_results_on_a_volume_the_publish_pod_is_as_before() -> None:
    settings = KubernetesSettings(
        data_volume={"emptyDir": {}},
        results_volume={"persistentVolumeClaim": {"claimName": "c2d-results"}},
        results_mount="/srv/results",
        storage_secret=SECRET,  # set, but results are not in S3: unused
    )
    pod = objects.publish_pod(settings, JOB, max_files=10, max_total_bytes=1 << 20)
    validate_strict(pod)
    main = container(pod)
    assert main["args"][main["args"].index("--storage") + 1] == "/srv/results"
    assert "envFrom" not in main
    assert env_names(pod) == {"C2D_LOG_FORMAT"}
    assert [m["name"] for m in main["volumeMounts"]] == ["job", "results", "tmp"]


def test_no_other_pod_gets_the_store_or_its_credentials() -> None:
    settings = s3_settings()
    spec = engine_pb2.JobSpec(
        job_id=JOB,
        owner="0x" + "11" * 20,
        algorithm=engine_pb2.AlgorithmInput(
            code=b"print(1)", entrypoint="python3 $ALGO", code_sha256="ab" * 32
        ),
    )
    limits = job_pb2.Resources(
        cpus=1,
        memory_bytes=256 << 20,
        disk_bytes=1 << 30,
        max_duration=duration_pb2.Duration(seconds=60),
    )
    for pod in (
        objects.configure_pod(settings, JOB),
        objects.algorithm_pod(settings, spec, limits, network=True),
    ):
        validate_strict(pod)
        main = container(pod)
        assert "envFrom" not in main
        assert not any(name.startswith(("C2D_S3_", "AWS_")) for name in env_names(pod))
        assert not any(
            v.get("secret", {}).get("secretName") == SECRET for v in pod["spec"]["volumes"]
        )


@pytest.mark.parametrize(
    ("endpoint", "port"),
    [("http://minio.storage.svc:9000", 9000), ("https://s3.example", 443), ("", 443)],
)
def test_the_publish_pod_alone_may_reach_the_store(endpoint: str, port: int) -> None:
    policy = objects.publish_network_policy(s3_settings(endpoint), JOB)
    validate_strict(policy)
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"][objects.STAGE_LABEL] == objects.PUBLISH
    assert spec["policyTypes"] == ["Egress"]
    store, dns = spec["egress"]
    assert store == {"ports": [{"protocol": "TCP", "port": port}]}
    assert {p["port"] for p in dns["ports"]} == {53}
    assert policy["metadata"]["name"] == objects.object_name(JOB, objects.PUBLISH)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2D_STORAGE", STORAGE)
    monkeypatch.setenv("C2D_K8S_DATA_VOLUME", '{"emptyDir": {}}')
    monkeypatch.delenv("C2D_K8S_RESULTS_VOLUME", raising=False)
    monkeypatch.setenv("C2D_S3_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("C2D_S3_ACCESS_KEY_ID", "engine-key")
    monkeypatch.setenv("C2D_S3_SECRET_ACCESS_KEY", "engine-secret")
    monkeypatch.delenv("C2D_K8S_STORAGE_SECRET", raising=False)
    with pytest.raises(ValueError, match="C2D_K8S_STORAGE_SECRET"):
        KubernetesSettings.from_env()
    monkeypatch.setenv("C2D_K8S_STORAGE_SECRET", SECRET)
    settings = KubernetesSettings.from_env()
    assert settings.results_in_s3
    assert (settings.storage_url, settings.storage_secret) == (STORAGE, SECRET)
    # The engine's own credentials are never handed on.
    assert settings.storage_env == {"C2D_S3_ENDPOINT": "http://minio:9000"}
    assert settings.results_volume == {}
    monkeypatch.setenv("C2D_STORAGE", "/srv/results")
    monkeypatch.setenv("C2D_K8S_RESULTS_VOLUME", '{"hostPath": {"path": "/srv/results"}}')
    on_disk = KubernetesSettings.from_env()
    assert not on_disk.results_in_s3
    assert (on_disk.storage_url, on_disk.storage_secret, on_disk.storage_env) == ("", "", {})
    assert on_disk.results_mount == "/srv/results"
