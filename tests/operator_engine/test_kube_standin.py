"""The Kubernetes API stand-in, driven through the real kubernetes_asyncio client: what the
backend's contract tests rely on must behave as a real API server does."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client import ApiClient, ApiException

from tests.operator_engine.kube_standin import (
    KubeStandIn,
    RunLocally,
    Terminated,
    resource_for,
    run_and_exit,
    validation_causes,
)

NS = "c2d-jobs"


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[KubeStandIn]:
    async with KubeStandIn(tmp_path / "kube") as standin:
        yield standin


@pytest.fixture
async def api(kube: KubeStandIn) -> AsyncIterator[ApiClient]:
    api_client = await config.new_client_from_config(config_file=str(kube.kubeconfig_path))
    async with api_client:
        yield api_client


@pytest.fixture
def core(api: ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def manifest(fields: dict[str, Any]) -> Any:
    """A body as plain JSON: the client sends a dict as it is, where its stubs want a model."""
    return fields


def pod_body(name: str, *, labels: dict[str, str] | None = None, **spec: Any) -> Any:
    container = {"name": "main", "image": "python:3.11-slim", "command": ["python", "-c", "pass"]}
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def status_of(error: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(error.body or b"{}")
    return body


async def test_the_kubeconfig_reaches_it_and_other_tokens_are_refused(
    kube: KubeStandIn, api: ApiClient
) -> None:
    version = await client.VersionApi(api).get_code()
    assert version.minor == "34"

    anonymous = ApiClient(client.Configuration(host=kube.url))
    async with anonymous:
        with pytest.raises(ApiException) as refused:
            await client.CoreV1Api(anonymous).list_namespaced_pod(NS)
    assert refused.value.status == 401


async def test_a_pod_is_created_read_listed_and_deleted(
    kube: KubeStandIn, core: client.CoreV1Api
) -> None:
    created = await core.create_namespaced_pod(NS, pod_body("job-1", labels={"app": "c2d"}))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.namespace == NS
    assert created.status.phase == "Pending"
    # Defaults a backend may read back.
    assert created.spec.containers[0].termination_message_path == "/dev/termination-log"

    read = await core.read_namespaced_pod("job-1", NS)
    assert read.metadata.resource_version == created.metadata.resource_version
    listed = await core.list_namespaced_pod(NS)
    assert [p.metadata.name for p in listed.items] == ["job-1"]
    assert int(listed.metadata.resource_version) >= int(created.metadata.resource_version)
    assert (await core.list_namespaced_pod("elsewhere")).items == []

    deleted = await core.delete_namespaced_pod(
        "job-1", NS, grace_period_seconds=0, propagation_policy="Background"
    )
    assert deleted.metadata.deletion_timestamp is not None
    with pytest.raises(ApiException) as missing:
        await core.read_namespaced_pod("job-1", NS)
    assert missing.value.status == 404
    assert status_of(missing.value)["reason"] == "NotFound"
    assert status_of(missing.value)["message"] == 'pods "job-1" not found'

    method, path, query, body = kube.requests[0]
    assert (method, path, query) == ("POST", f"/api/v1/namespaces/{NS}/pods", {})
    # Recorded as sent: the stand-in's own defaults are not in it.
    assert "kind" not in body and body["metadata"]["name"] == "job-1"
    delete = kube.requests[-2]
    assert delete.method == "DELETE"
    assert delete.query == {"gracePeriodSeconds": "0", "propagationPolicy": "Background"}


async def test_a_second_create_of_a_name_is_already_exists(core: client.CoreV1Api) -> None:
    secret = {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}}
    created = await core.create_namespaced_secret(NS, manifest(secret))
    assert created.data == {"token": base64.b64encode(b"s3cret").decode()}
    assert created.string_data is None
    with pytest.raises(ApiException) as again:
        await core.create_namespaced_secret(NS, manifest(secret))
    assert again.value.status == 409
    status = status_of(again.value)
    assert (status["kind"], status["reason"]) == ("Status", "AlreadyExists")
    assert status["details"] == {"name": "creds", "kind": "secrets"}
    gone = await core.delete_namespaced_secret("creds", NS)
    assert gone.status == "Success"


async def test_generate_name_gets_a_random_suffix(core: client.CoreV1Api) -> None:
    body = {"metadata": {"generateName": "job-"}, "data": {"a": "b"}}
    first = await core.create_namespaced_config_map(NS, manifest(body))
    second = await core.create_namespaced_config_map(NS, manifest(body))
    assert first.metadata.name.startswith("job-") and len(first.metadata.name) == 9
    assert first.metadata.name != second.metadata.name


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda pod: pod["spec"]["containers"][0].update(bogus=1), "spec.containers[0]", "bogus"),
        (lambda pod: pod["metadata"].update(name="Job_1"), "metadata.name", "RFC 1123"),
        (
            lambda pod: pod["metadata"].update(labels={"app": "x" * 64}),
            "metadata.labels",
            "63 characters",
        ),
        (
            lambda pod: pod["spec"]["containers"][0].update(
                volumeMounts=[{"name": "nowhere", "mountPath": "/data"}]
            ),
            "spec.containers[0].volumeMounts[0].name",
            "Not found",
        ),
        (lambda pod: pod["spec"].update(containers=[]), "spec.containers", "Required value"),
    ],
)
async def test_an_invalid_object_is_refused_as_the_server_would(
    kube: KubeStandIn, core: client.CoreV1Api, mutate: Any, field: str, words: str
) -> None:
    body = pod_body("job-1")
    mutate(body)
    with pytest.raises(ApiException) as refused:
        await core.create_namespaced_pod(NS, body)
    assert refused.value.status == 422
    status = status_of(refused.value)
    assert status["reason"] == "Invalid"
    cause = status["details"]["causes"][0]
    assert cause["field"] == field
    assert words in cause["message"]
    assert kube.objects("pods", NS) == []


async def test_label_and_field_selectors(core: client.CoreV1Api) -> None:
    for name, labels in [("a", {"app": "c2d", "job": "1"}), ("b", {"app": "c2d"}), ("c", {})]:
        await core.create_namespaced_config_map(
            NS, manifest({"metadata": {"name": name, "labels": labels}})
        )

    async def names(
        label_selector: str | None = None, field_selector: str | None = None
    ) -> list[str]:
        selectors = {"label_selector": label_selector, "field_selector": field_selector}
        found = await core.list_namespaced_config_map(NS, **manifest(selectors))
        return [item.metadata.name for item in found.items]

    assert await names(label_selector="app=c2d") == ["a", "b"]
    assert await names(label_selector="app==c2d,job") == ["a"]
    assert await names(label_selector="job!=1") == ["b", "c"]
    assert await names(label_selector="app in (c2d, other)") == ["a", "b"]
    assert await names(label_selector="app notin (c2d)") == ["c"]
    assert await names(label_selector="!app") == ["c"]
    assert await names(field_selector="metadata.name=b") == ["b"]
    assert await names(field_selector="metadata.name!=b", label_selector="app") == ["a"]
    page = await core.list_namespaced_config_map(NS, limit=2)
    assert len(page.items) == 2 and page.metadata._continue
    rest = await core.list_namespaced_config_map(NS, limit=2, _continue=page.metadata._continue)
    assert [item.metadata.name for item in rest.items] == ["c"]
    with pytest.raises(ApiException) as bad:
        await names(label_selector="app in c2d")
    assert bad.value.status == 400
    with pytest.raises(ApiException) as unknown:
        await names(field_selector="spec.nodeName=x")
    assert unknown.value.status == 400


async def test_patches_and_replace(kube: KubeStandIn, core: client.CoreV1Api) -> None:
    created = await core.create_namespaced_pod(NS, pod_body("job-1", labels={"app": "c2d"}))
    # A dict body is a strategic merge patch for the client.
    patched = await core.patch_namespaced_pod("job-1", NS, {"metadata": {"labels": {"x": "1"}}})
    assert patched.metadata.labels == {"app": "c2d", "x": "1"}
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
    merged = await core.patch_namespaced_pod(
        "job-1",
        NS,
        {"metadata": {"labels": {"x": None}}, "status": {"phase": "Running"}},
        # Accepted by the client at run time, missing from its typed signature.
        _content_type="application/merge-patch+json",  # type: ignore[call-arg]
    )
    assert merged.metadata.labels == {"app": "c2d"}
    assert merged.status.phase == "Pending", "status changes only through /status"
    json_patched = await core.patch_namespaced_pod(
        "job-1",
        NS,
        [
            {"op": "add", "path": "/metadata/annotations", "value": {"c2d/stage": "compute"}},
            {"op": "add", "path": "/spec/activeDeadlineSeconds", "value": 60},
            {"op": "remove", "path": "/metadata/labels/app"},
        ],
    )
    assert json_patched.metadata.annotations == {"c2d/stage": "compute"}
    assert json_patched.metadata.labels is None
    assert json_patched.spec.active_deadline_seconds == 60
    assert [r.content_type for r in kube.requests if r.method == "PATCH"] == [
        "application/strategic-merge-patch+json",
        "application/merge-patch+json",
        "application/json-patch+json",
    ]

    with pytest.raises(ApiException) as immutable:
        await core.patch_namespaced_pod("job-1", NS, {"spec": {"restartPolicy": "Always"}})
    assert immutable.value.status == 422 and "Forbidden" in status_of(immutable.value)["message"]
    with pytest.raises(ApiException) as missing_path:
        await core.patch_namespaced_pod("job-1", NS, [{"op": "remove", "path": "/nope"}])
    assert missing_path.value.status == 422

    config_map = await core.create_namespaced_config_map(NS, manifest({"metadata": {"name": "cm"}}))
    config_map.data = {"k": "v"}
    replaced = await core.replace_namespaced_config_map("cm", NS, config_map)
    assert replaced.data == {"k": "v"}
    # The version the first replace was based on is stale now.
    with pytest.raises(ApiException) as stale:
        await core.replace_namespaced_config_map("cm", NS, config_map)
    assert stale.value.status == 409 and status_of(stale.value)["reason"] == "Conflict"


async def test_network_policies_through_their_own_group(kube: KubeStandIn, api: ApiClient) -> None:
    networking = client.NetworkingV1Api(api)
    policy: dict[str, Any] = {
        "metadata": {"name": "deny-all", "labels": {"c2d/job": "1"}},
        "spec": {
            "podSelector": {"matchLabels": {"c2d/job": "1"}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }
    await networking.create_namespaced_network_policy(NS, manifest(policy))
    listed = await networking.list_namespaced_network_policy(NS, label_selector="c2d/job=1")
    assert [p.metadata.name for p in listed.items] == ["deny-all"]
    assert kube.requests[0].path == f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"
    policy["spec"]["bogus"] = True
    with pytest.raises(ApiException) as refused:
        await networking.create_namespaced_network_policy(
            NS, manifest({**policy, "metadata": {"name": "x"}})
        )
    assert refused.value.status == 422
    await networking.delete_namespaced_network_policy("deny-all", NS)
    assert kube.objects("NetworkPolicy", NS) == []


async def events(stream: watch.Watch, count: int) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    async for event in stream:
        seen.append((event["type"], event["raw_object"]["metadata"].get("name", "")))
        if len(seen) == count:
            break
    return seen


async def test_watch_replays_after_a_version_and_follows_the_selection(
    kube: KubeStandIn, core: client.CoreV1Api
) -> None:
    await core.create_namespaced_config_map(
        NS, manifest({"metadata": {"name": "a", "labels": {"w": "1"}}})
    )
    since = (await core.list_namespaced_config_map(NS)).metadata.resource_version
    await core.patch_namespaced_config_map("a", NS, {"data": {"k": "v"}})
    await core.create_namespaced_config_map(
        NS, manifest({"metadata": {"name": "b", "labels": {"w": "1"}}})
    )
    await core.create_namespaced_config_map(NS, manifest({"metadata": {"name": "other"}}))

    async with watch.Watch() as stream:
        stream.stream(
            core.list_namespaced_config_map,
            NS,
            label_selector="w=1",
            resource_version=since,
            timeout_seconds=5,
        )
        assert await events(stream, 2) == [("MODIFIED", "a"), ("ADDED", "b")]
        # Leaving the selection is a DELETED for this watch.
        await core.patch_namespaced_config_map("b", NS, {"metadata": {"labels": {"w": None}}})
        await core.delete_namespaced_config_map("a", NS)
        assert await events(stream, 2) == [("DELETED", "b"), ("DELETED", "a")]


async def test_a_watch_from_the_start_lists_first_then_ends_at_its_timeout(
    core: client.CoreV1Api,
) -> None:
    await core.create_namespaced_config_map(NS, manifest({"metadata": {"name": "a"}}))
    seen = []
    async with watch.Watch() as stream:
        async for event in stream.stream(
            core.list_namespaced_config_map, NS, timeout_seconds=1, allow_watch_bookmarks=True
        ):
            seen.append(event["type"])
    assert seen == ["ADDED", "BOOKMARK"]


async def test_an_expired_version_is_410_gone_for_a_watch(
    kube: KubeStandIn, core: client.CoreV1Api
) -> None:
    await core.create_namespaced_config_map(NS, manifest({"metadata": {"name": "a"}}))
    old = str(kube.resource_version)
    await core.patch_namespaced_config_map("a", NS, {"data": {"k": "v"}})
    kube.compact()
    async with watch.Watch() as stream:
        stream.stream(core.list_namespaced_config_map, NS, resource_version=old, timeout_seconds=5)
        with pytest.raises(ApiException) as expired:
            await events(stream, 1)
    assert expired.value.status == 410 and "too old resource version" in str(expired.value.reason)

    kube.fail_next("watch", "configmaps", 410)
    async with watch.Watch() as stream:
        stream.stream(core.list_namespaced_config_map, NS, timeout_seconds=5)
        with pytest.raises(ApiException) as injected:
            await events(stream, 1)
    assert injected.value.status == 410


async def test_a_dropped_watch_is_resumed_by_the_client_without_losing_events(
    kube: KubeStandIn, core: client.CoreV1Api
) -> None:
    await core.create_namespaced_config_map(NS, manifest({"metadata": {"name": "a"}}))
    async with watch.Watch() as stream:
        # No timeout: the client watches forever and reconnects by itself.
        stream.stream(core.list_namespaced_config_map, NS)
        assert await events(stream, 1) == [("ADDED", "a")]
        kube.drop_watches()
        await core.create_namespaced_config_map(NS, manifest({"metadata": {"name": "b"}}))
        assert await events(stream, 1) == [("ADDED", "b")]
    watches = [r for r in kube.requests if r.query.get("watch") == "True"]
    assert len(watches) == 2
    assert "resourceVersion" not in watches[0].query
    assert watches[1].query["resourceVersion"] == "1"


async def test_an_aborted_watch_breaks_the_clients_stream(
    kube: KubeStandIn, core: client.CoreV1Api
) -> None:
    await core.create_namespaced_config_map(NS, manifest({"metadata": {"name": "a"}}))
    async with watch.Watch() as stream:
        stream.stream(core.list_namespaced_config_map, NS, timeout_seconds=30)
        assert await events(stream, 1) == [("ADDED", "a")]
        kube.drop_watches(abort=True)
        # What a client sees when the connection to a real server drops mid-watch.
        with pytest.raises(aiohttp.ClientPayloadError):
            await events(stream, 1)


async def test_pod_logs_wait_for_the_start_then_follow_to_the_end(
    kube: KubeStandIn, core: client.CoreV1Api
) -> None:
    await core.create_namespaced_pod(NS, pod_body("job-1"))
    with pytest.raises(ApiException) as unscheduled:
        await core.read_namespaced_pod_log("job-1", NS)
    assert unscheduled.value.status == 400
    kube.set_pod_phase(NS, "job-1", "Pending")
    with pytest.raises(ApiException) as waiting:
        await core.read_namespaced_pod_log("job-1", NS, container="main")
    assert waiting.value.status == 400
    assert (
        'container "main" in pod "job-1" is waiting to start: ContainerCreating'
        in (status_of(waiting.value)["message"])
    )

    kube.set_pod_phase(NS, "job-1", "Running")
    kube.append_log(NS, "job-1", "one\ntwo\n")
    lines: list[str] = []

    async def follow() -> None:
        async with watch.Watch() as stream:
            async for line in stream.stream(core.read_namespaced_pod_log, "job-1", NS):
                lines.append(line)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    kube.append_log(NS, "job-1", "three\n")
    kube.set_pod_phase(NS, "job-1", "Succeeded")
    await asyncio.wait_for(follower, 5)
    assert lines == ["one\n", "two\n", "three\n"]

    tail = await core.read_namespaced_pod_log("job-1", NS, tail_lines=1, timestamps=True)
    stamp, text = tail.split(" ", 1)
    assert text == "three\n" and stamp.endswith("Z")
    log_request = kube.requests[-1]
    assert log_request.path == f"/api/v1/namespaces/{NS}/pods/job-1/log"
    assert log_request.query == {"tailLines": "1", "timestamps": "True"}


async def test_a_scripted_kubelet_runs_each_new_pod(
    kube: KubeStandIn, core: client.CoreV1Api
) -> None:
    kube.on_pod(
        lambda pod: pod["metadata"]["labels"].get("stage") == "compute",
        run_and_exit(["working", "done"], exit_code=0),
    )
    await core.create_namespaced_pod(NS, pod_body("job-1", labels={"stage": "compute"}))
    finished = await kube.wait_for(
        "pods", NS, lambda pod: pod["status"]["phase"] == "Succeeded", timeout=5
    )
    terminated = finished["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert await core.read_namespaced_pod_log("job-1", NS) == "working\ndone\n"


async def test_injected_errors_come_as_the_server_sends_them(
    kube: KubeStandIn, core: client.CoreV1Api
) -> None:
    kube.fail_next("create", "pods", 500)
    kube.fail_next("list", "Pod", 429)
    kube.fail_next("get", "pods/log", 403)
    with pytest.raises(ApiException) as server_error:
        await core.create_namespaced_pod(NS, pod_body("job-1"))
    assert server_error.value.status == 500
    assert kube.objects("pods") == []
    with pytest.raises(ApiException) as throttled:
        await core.list_namespaced_pod(NS)
    assert throttled.value.status == 429
    assert throttled.value.headers is not None and throttled.value.headers["Retry-After"] == "1"
    await core.create_namespaced_pod(NS, pod_body("job-1"))
    with pytest.raises(ApiException) as forbidden:
        await core.read_namespaced_pod_log("job-1", NS)
    assert forbidden.value.status == 403 and status_of(forbidden.value)["reason"] == "Forbidden"
    # Each failure was for one request only.
    assert len((await core.list_namespaced_pod(NS)).items) == 1


async def test_kubelet_statuses_are_valid_pods(kube: KubeStandIn, core: client.CoreV1Api) -> None:
    body = pod_body("job-1")
    body["spec"]["initContainers"] = [dict(body["spec"]["containers"][0], name="configure")]
    await core.create_namespaced_pod(NS, body)
    kube.set_pod_phase(NS, "job-1", "Pending")
    kube.set_pod_phase(NS, "job-1", "Running")
    running = kube.get("pods", NS, "job-1")
    assert running is not None
    assert "running" in running["status"]["containerStatuses"][0]["state"]
    assert running["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    kube.set_pod_phase(
        NS, "job-1", "Failed", container_states={"main": Terminated(137, "OOMKilled")}
    )
    oom = kube.get("pods", NS, "job-1")
    assert oom is not None
    assert oom["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"
    assert validation_causes(resource_for("pods"), oom) == []

    await core.create_namespaced_pod(NS, pod_body("job-2", activeDeadlineSeconds=5))
    kube.set_pod_phase(NS, "job-2", "Running")
    killed = kube.deadline_exceeded(NS, "job-2")
    assert killed["status"]["reason"] == "DeadlineExceeded"
    assert killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert validation_causes(resource_for("pods"), killed) == []
    # A write by the backend after the kubelet's is validated with the status in it.
    await core.patch_namespaced_pod("job-2", NS, {"metadata": {"labels": {"seen": "yes"}}})


SCRIPT = """
import os, pathlib, sys
token = pathlib.Path(sys.argv[1]).read_text() + pathlib.Path(sys.argv[4]).read_text()
out = pathlib.Path(os.environ["OUT"])
(out / "result.txt").write_text(token.upper())
print("wrote", out.name, flush=True)
print("to stderr", file=sys.stderr, flush=True)
pathlib.Path(sys.argv[2]).write_text("exit " + sys.argv[3])
sys.exit(int(sys.argv[3]))
"""


def local_pod(name: str, exit_code: int) -> Any:
    return {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11-slim",
                    "command": ["python", "-c", SCRIPT],
                    "args": [
                        "/etc/creds/token",
                        "$(MESSAGE_FILE)",
                        str(exit_code),
                        "/data/inputs/d1/0",
                    ],
                    "env": [
                        {"name": "OUT", "value": "/work/out"},
                        {"name": "MESSAGE_FILE", "value": "/tmp/message"},
                    ],
                    "terminationMessagePath": "/tmp/message",
                    "volumeMounts": [
                        {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                        {"name": "workspace", "mountPath": "/work/out", "subPath": name},
                        {
                            "name": "data",
                            "mountPath": "/data/inputs/d1/0",
                            "subPath": "sets/d1.csv",
                            "readOnly": True,
                        },
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "creds",
                    "secret": {"secretName": "creds", "items": [{"key": "t", "path": "token"}]},
                },
                {"name": "workspace", "persistentVolumeClaim": {"claimName": "workspace"}},
                {
                    "name": "data",
                    "nfs": {"server": "nfs.example", "path": "/export", "readOnly": True},
                },
            ],
        },
    }


async def test_run_locally_runs_a_pod_with_its_volumes(
    kube: KubeStandIn, core: client.CoreV1Api, tmp_path: Path
) -> None:
    data = tmp_path / "export"
    (data / "sets").mkdir(parents=True)
    (data / "sets" / "d1.csv").write_text("-xyz")
    kubelet = RunLocally(tmp_path / "node", volume_dirs={"data": data})
    kube.on_pod(lambda pod: True, kubelet)
    claim_body = {
        "metadata": {"name": "workspace"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    await core.create_namespaced_persistent_volume_claim(NS, manifest(claim_body))
    # Created before its secret: the pod waits, as on a node.
    await core.create_namespaced_pod(NS, local_pod("ok", 0))
    waiting = await kube.wait_for(
        "pods", NS, lambda pod: "containerStatuses" in pod["status"], timeout=5
    )
    assert waiting["status"]["containerStatuses"][0]["state"]["waiting"] == {
        "reason": "ContainerCreating",
        "message": 'Secret "creds" not found',
    }
    secret = {"metadata": {"name": "creds"}, "stringData": {"t": "abc"}}
    await core.create_namespaced_secret(NS, manifest(secret))
    await core.create_namespaced_pod(NS, local_pod("bad", 3))

    def ended(pod: dict[str, Any]) -> bool:
        return pod["status"]["phase"] in ("Succeeded", "Failed")

    ok = await kube.wait_for("pods", NS, lambda pod: pod["metadata"]["name"] == "ok" and ended(pod))
    bad = await kube.wait_for(
        "pods", NS, lambda pod: pod["metadata"]["name"] == "bad" and ended(pod)
    )

    assert ok["status"]["phase"] == "Succeeded"
    state = ok["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (state["exitCode"], state["reason"], state["message"]) == (0, "Completed", "exit 0")
    assert bad["status"]["phase"] == "Failed"
    state = bad["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (state["exitCode"], state["reason"], state["message"]) == (3, "Error", "exit 3")

    claim = kubelet.claim_dir(NS, "workspace")
    assert (claim / "ok" / "result.txt").read_text() == "ABC-XYZ"
    assert (claim / "bad" / "result.txt").read_text() == "ABC-XYZ"
    assert await core.read_namespaced_pod_log("ok", NS) == "wrote ok\nto stderr\n"
    bound = await core.read_namespaced_persistent_volume_claim("workspace", NS)
    assert bound.status.phase == "Bound"


def has_log(kube: KubeStandIn, pod: str) -> bool:
    return bool(kube.log(NS, pod))


async def test_run_locally_enforces_the_deadline_and_kills_on_delete(
    kube: KubeStandIn, core: client.CoreV1Api, tmp_path: Path
) -> None:
    kube.on_pod(lambda pod: True, RunLocally(tmp_path / "node", kill_grace_s=0.2))
    sleeper = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(30)"
    slow = pod_body("slow", activeDeadlineSeconds=1)
    slow["spec"]["containers"][0]["command"] = ["python", "-c", sleeper]
    await core.create_namespaced_pod(NS, slow)
    failed = await kube.wait_for("pods", NS, lambda pod: pod["status"]["phase"] == "Failed")
    assert failed["status"]["reason"] == "DeadlineExceeded"
    assert failed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137

    doomed = pod_body("doomed")
    doomed["spec"]["containers"][0]["command"] = ["python", "-c", sleeper]
    await core.create_namespaced_pod(NS, doomed)
    await kube.wait_for(
        "pods", NS, lambda pod: pod["metadata"]["name"] == "doomed" and has_log(kube, "doomed")
    )
    pid = int(kube.log(NS, "doomed"))
    await core.delete_namespaced_pod("doomed", NS)
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the deleted pod's process is still running")


async def test_run_locally_fails_the_test_when_a_read_only_mount_changes(tmp_path: Path) -> None:
    body = pod_body("writer")
    body["spec"]["containers"][0]["command"] = [
        "python",
        "-c",
        "import pathlib; pathlib.Path('/in/x').write_text('changed')",
    ]
    body["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "in", "mountPath": "/in", "readOnly": True}
    ]
    body["spec"]["volumes"] = [{"name": "in", "emptyDir": {}}]
    with pytest.raises(ExceptionGroup) as failed:
        async with KubeStandIn(tmp_path / "kube") as kube:
            kube.on_pod(lambda pod: True, RunLocally(tmp_path / "node"))
            kube.add(dict(body, kind="Pod", apiVersion="v1"), NS)
            for _ in range(250):
                if kube.script_errors:
                    break
                await asyncio.sleep(0.02)
    assert "changed a read-only mount" in str(failed.value.exceptions[0])


async def test_run_locally_runs_this_projects_stage_programs(
    kube: KubeStandIn, core: client.CoreV1Api, tmp_path: Path
) -> None:
    kube.on_pod(lambda pod: True, RunLocally(tmp_path / "node"))
    body = pod_body("configure")
    body["spec"]["containers"][0]["command"] = ["python", "-m", "pods.configure", "--help"]
    await core.create_namespaced_pod(NS, body)
    done = await kube.wait_for("pods", NS, lambda pod: pod["status"]["phase"] == "Succeeded")
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert "--workspace" in kube.log(NS, "configure")
