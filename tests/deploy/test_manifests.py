"""The Kubernetes deployment in deploy/, checked offline: every object valid for every supported
Kubernetes version (strict schemas), each overlay rendered by kustomize, what the manifests
promise (locked-down containers, least-privilege RBAC, default-deny networks and the call chain
they allow, no committed secrets, the services wired to each other's addresses and ports), the
gateway's probes against the real gateway, and the kind script's refusal to run without what
it needs."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.kube_schemas import validate_strict

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KIND_CONFIG = DEPLOY / "kind" / "cluster.yaml"
SCRIPT = ROOT / "scripts" / "kind-e2e.sh"
OVERLAYS = ("kind", "production")
KUBECTL = shutil.which("kubectl")
NO_KUBECTL = "kubectl is not installed: it renders the kustomize overlays (kubectl kustomize)"

SERVICES = ("provider", "gateway", "operator-service", "engine")
GRPC_SERVICES = ("provider", "operator-service", "engine")
SYSTEM, JOBS = "c2d-system", "c2d-jobs"
# The port each service listens on, and the variable that says so.
LISTEN = {
    "provider": ("C2D_PROVIDER_LISTEN", 8031),
    "gateway": ("C2D_GATEWAY_LISTEN", 8030),
    "operator-service": ("C2D_OPERATOR_LISTEN", 8041),
    "engine": ("C2D_ENGINE_LISTEN", 8051),
}
HEALTH_PORT = 8081
# Who calls whom, through which variable.
CALLS = (
    ("gateway", "C2D_PROVIDER_ADDRESS", "provider"),
    ("provider", "C2D_OPERATOR_ADDRESS", "operator-service"),
    ("operator-service", "C2D_ENGINE_ADDRESS", "engine"),
)
# What the engine may do in c2d-jobs, and nothing more (deploy/base/rbac.yaml says why).
ENGINE_RULES = {
    ("", "pods"): {"create", "get", "list", "watch", "delete"},
    ("", "pods/log"): {"get"},
    ("", "secrets"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"create", "list", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"create", "list", "delete"},
}
# The volume types Pod Security "restricted" admits.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}

Obj = dict[str, Any]


# -- reading the manifests -------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    """Every YAML file under deploy/ that holds Kubernetes objects."""
    return sorted(
        path
        for path in DEPLOY.rglob("*")
        if path.suffix in (".yaml", ".yml")
        and path.name != "kustomization.yaml"
        and path != KIND_CONFIG
    )


def _documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def _render(overlay: str) -> tuple[Obj, ...]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[Obj, ...]:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    return _render(request.param)


def _render_overlay(overlay: str) -> tuple[Obj, ...]:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    return _render(overlay)


def _of_kind(objects: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def _one(objects: tuple[Obj, ...], kind: str, name: str, namespace: str = SYSTEM) -> Obj:
    found = [
        obj
        for obj in _of_kind(objects, kind)
        if obj["metadata"]["name"] == name and obj["metadata"].get("namespace", "") == namespace
    ]
    assert len(found) == 1, f"{len(found)} {kind} named {namespace}/{name}"
    return found[0]


def _pod_specs(objects: tuple[Obj, ...]) -> Iterator[tuple[str, Obj]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield obj["metadata"]["name"], obj["spec"]


def _containers(pod: Obj) -> list[Obj]:
    return [
        *pod.get("initContainers", []),
        *pod["containers"],
        *pod.get("ephemeralContainers", []),
    ]


def _container(objects: tuple[Obj, ...], name: str) -> Obj:
    pod = _one(objects, "Deployment", name)["spec"]["template"]["spec"]
    (container,) = (c for c in pod["containers"] if c["name"] == name)
    found: Obj = container
    return found


def _env(objects: tuple[Obj, ...], name: str) -> dict[str, str]:
    """The service's environment as its container will see it (ConfigMaps resolved; a key of a
    ConfigMap that is not rendered, such as c2d-owners, reads as `<configmap/key>`)."""
    configmaps = {
        obj["metadata"]["name"]: obj.get("data", {}) for obj in _of_kind(objects, "ConfigMap")
    }
    container = _container(objects, name)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["configMapKeyRef"]
        data = configmaps.get(ref["name"])
        env[item["name"]] = data[ref["key"]] if data else f"<{ref['name']}/{ref['key']}>"
    return env


def _pod_labels(objects: tuple[Obj, ...], name: str) -> dict[str, str]:
    labels: dict[str, str] = _one(objects, "Deployment", name)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def _quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", text).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit or "", 1)


# -- every object, valid -----------------------------------------------------------------------


def test_deploy_holds_the_expected_manifests() -> None:
    names = {path.relative_to(DEPLOY).as_posix() for path in _manifest_files()}
    assert {"base/namespaces.yaml", "base/rbac.yaml", "base/engine.yaml"} <= names
    assert "overlays/kind/volumes.yaml" in names and "overlays/production/volumes.yaml" in names


@pytest.mark.parametrize(
    "path", _manifest_files(), ids=lambda path: path.relative_to(DEPLOY).as_posix()
)
def test_every_manifest_document_validates_strictly(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{path} holds no object"
    for document in documents:
        validate_strict(document)


def test_every_manifest_is_part_of_a_kustomization() -> None:
    referenced: set[Path] = set()
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert spec["kind"] == "Kustomization"
        for entry in spec.get("resources", []):
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization} names {entry}, which does not exist"
            referenced.add(target)
    orphans = [path for path in _manifest_files() if path.resolve() not in referenced]
    assert not orphans, f"manifests no kustomization applies: {orphans}"


def test_the_kind_cluster_config_mounts_a_host_folder_on_the_node() -> None:
    config = yaml.safe_load(KIND_CONFIG.read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert config["name"] == "c2d-e2e"
    assert set(config) <= {"kind", "apiVersion", "name", "nodes", "networking", "featureGates"}
    (node,) = config["nodes"]
    assert node["role"] == "control-plane"
    (mount,) = node["extraMounts"]
    assert set(mount) <= {"hostPath", "containerPath", "readOnly", "propagation"}
    assert mount["containerPath"] == "/var/lib/c2d"
    assert Path(mount["hostPath"]).is_absolute()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_every_object_validates_strictly(overlay: str) -> None:
    objects = _render_overlay(overlay)
    kinds = {obj["kind"] for obj in objects}
    assert {"Namespace", "Deployment", "Service", "NetworkPolicy", "Role"} <= kinds
    for obj in objects:
        validate_strict(obj)


# -- containers --------------------------------------------------------------------------------


def test_every_container_is_locked_down(rendered: tuple[Obj, ...]) -> None:
    workloads = list(_pod_specs(rendered))
    assert sorted(name for name, _ in workloads) == sorted(SERVICES)
    for name, pod in workloads:
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), name
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{name}: volume {volume['name']} is {kinds}"
        pod_context = pod.get("securityContext", {})
        for container in _containers(pod):
            where = f"{name}/{container['name']}"
            context = container.get("securityContext", {})
            # A container's own setting wins over its pod's.
            effective = {**pod_context, **context}.get
            assert effective("runAsNonRoot") is True, where
            assert effective("runAsUser") not in (None, 0), where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("privileged") is not True, where
            capabilities = context.get("capabilities", {})
            assert "ALL" in capabilities.get("drop", []), where
            assert not capabilities.get("add"), where
            assert (effective("seccompProfile") or {}).get("type") == "RuntimeDefault", where
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("limits", {})), where
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where


def test_only_the_engine_holds_an_api_token(rendered: tuple[Obj, ...]) -> None:
    accounts = {
        (obj["metadata"]["namespace"], obj["metadata"]["name"]): obj
        for obj in _of_kind(rendered, "ServiceAccount")
    }
    for name, pod in _pod_specs(rendered):
        account = accounts[(SYSTEM, pod["serviceAccountName"])]
        mounted = pod.get(
            "automountServiceAccountToken", account.get("automountServiceAccountToken", True)
        )
        assert mounted is (name == "engine"), name
    assert pod_account(rendered, "engine") == "c2d-engine"
    # Job pods run untrusted code: their namespace's default identity has no token either.
    assert accounts[(JOBS, "default")]["automountServiceAccountToken"] is False


def pod_account(objects: tuple[Obj, ...], name: str) -> str:
    account: str = _one(objects, "Deployment", name)["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    return account


def test_namespaces_enforce_the_restricted_pod_security_profile(rendered: tuple[Obj, ...]) -> None:
    namespaces = {obj["metadata"]["name"]: obj for obj in _of_kind(rendered, "Namespace")}
    assert set(namespaces) == {SYSTEM, JOBS}
    for namespace in namespaces.values():
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    placed = {obj["metadata"].get("namespace") for obj in rendered if obj["kind"] != "Namespace"}
    # Cluster-scoped objects aside (the shared PersistentVolumes), everything is in the two.
    assert placed <= {SYSTEM, JOBS, None}
    cluster_scoped = {obj["kind"] for obj in rendered if "namespace" not in obj["metadata"]}
    assert cluster_scoped <= {"Namespace", "PersistentVolume"}


# -- RBAC --------------------------------------------------------------------------------------


def test_the_engine_role_grants_only_what_jobs_need(rendered: tuple[Obj, ...]) -> None:
    assert not _of_kind(rendered, "ClusterRole") and not _of_kind(rendered, "ClusterRoleBinding")
    roles = _of_kind(rendered, "Role")
    assert [(r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles] == [
        (JOBS, "c2d-engine")
    ]
    granted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rule in roles[0]["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted[(group, resource)] |= set(rule["verbs"])
    assert dict(granted) == ENGINE_RULES

    (binding,) = _of_kind(rendered, "RoleBinding")
    assert binding["metadata"]["namespace"] == JOBS
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "c2d-engine",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "c2d-engine", "namespace": SYSTEM}
    ]


# -- network policies --------------------------------------------------------------------------


@dataclass
class Peer:
    """One end of a connection: a pod (its namespace and labels) or an address outside."""

    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = ""


JOB_POD = Peer(JOBS, {"app.kubernetes.io/managed-by": "c2d-engine", "c2d.mesh/job-id": "j1"})
DNS_POD = Peer("kube-system", {"k8s-app": "kube-dns"})
ELSEWHERE = Peer("default", {"app": "someone-else"})
OUTSIDE = Peer(ip="203.0.113.7")
API_SERVER = Peer(ip="172.18.0.2")


def _selects(selector: Obj, labels: Mapping[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        matches = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matches:
            return False
    return True


def _namespace_labels(namespace: str) -> dict[str, str]:
    # The API server labels every namespace with its own name.
    return {"kubernetes.io/metadata.name": namespace}


def _peer_matches(rule_peer: Obj, policy_namespace: str, other: Peer) -> bool:
    if "ipBlock" in rule_peer:
        # Only addresses outside the cluster: whether a pod's address matches an ipBlock is
        # up to the network plugin, so nothing here may rely on it.
        if not other.ip:
            return False
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        excluded = any(address in ipaddress.ip_network(net) for net in block.get("except", []))
        return address in ipaddress.ip_network(block["cidr"]) and not excluded
    if not other.namespace:
        return False
    namespace_selector = rule_peer.get("namespaceSelector")
    if namespace_selector is None:
        in_namespace = other.namespace == policy_namespace
    else:
        in_namespace = _selects(namespace_selector, _namespace_labels(other.namespace))
    pod_selector = rule_peer.get("podSelector")
    return in_namespace and (pod_selector is None or _selects(pod_selector, other.labels))


def _port_matches(rule: Obj, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        assert isinstance(entry["port"], int), "named ports are not checked here: use numbers"
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def _policy_types(policy: Obj) -> set[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if "egress" in spec else {"Ingress"}


def _admits(
    policies: list[Obj], direction: str, subject: Peer, other: Peer, port: int, protocol: str
) -> bool:
    """Whether the policies let `subject` receive from (Ingress) or send to (Egress) `other`."""
    if not subject.namespace:
        return True  # outside the cluster: not ours to police
    applying = [
        policy
        for policy in policies
        if policy["metadata"]["namespace"] == subject.namespace
        and _selects(policy["spec"]["podSelector"], subject.labels)
        and direction in _policy_types(policy)
    ]
    if not applying:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in applying:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(
                _peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers
            )
            if peer_ok and _port_matches(rule, port, protocol):
                return True
    return False


def _connects(
    policies: list[Obj], source: Peer, destination: Peer, port: int, protocol: str = "TCP"
) -> bool:
    return _admits(policies, "Egress", source, destination, port, protocol) and _admits(
        policies, "Ingress", destination, source, port, protocol
    )


def _peers(objects: tuple[Obj, ...]) -> dict[str, Peer]:
    services = {name: Peer(SYSTEM, _pod_labels(objects, name)) for name in SERVICES}
    return {**services, "job": JOB_POD, "elsewhere": ELSEWHERE, "outside": OUTSIDE}


def test_each_service_accepts_only_its_callers(rendered: tuple[Obj, ...]) -> None:
    policies = _of_kind(rendered, "NetworkPolicy")
    peers = _peers(rendered)
    expected = {
        # Public: anyone outside the mesh, no service inside it (egress keeps them to callees).
        ("gateway", 8030): {"outside", "elsewhere"},
        ("provider", 8031): {"gateway", "outside", "elsewhere"},
        ("operator-service", 8041): {"provider"},
        ("engine", 8051): {"operator-service"},
        # The plaintext health port of each gRPC service, for the kubelet's probes.
        ("operator-service", HEALTH_PORT): {"outside", "elsewhere"},
        ("engine", HEALTH_PORT): {"outside", "elsewhere"},
        # Any other port of a service: nobody.
        ("engine", 8041): set(),
        ("operator-service", 8051): set(),
    }
    for (target, port), callers in expected.items():
        actual = {
            name
            for name, source in peers.items()
            if name != target and _connects(policies, source, peers[target], port)
        }
        assert actual == callers, f"{target}:{port} is reachable from {sorted(actual)}"


def test_each_service_reaches_only_its_callee_dns_and_what_it_calls_outside(
    rendered: tuple[Obj, ...],
) -> None:
    policies = _of_kind(rendered, "NetworkPolicy")
    peers = _peers(rendered)
    for name in SERVICES:
        assert _connects(policies, peers[name], DNS_POD, 53, "UDP"), name
        assert _connects(policies, peers[name], DNS_POD, 53, "TCP"), name
        assert not _connects(policies, peers[name], OUTSIDE, 80), name
        assert not _connects(policies, peers[name], ELSEWHERE, 8080), name
    # The engine reaches the API server (443 managed, 6443 kind/kubeadm) and no other service.
    assert _connects(policies, peers["engine"], API_SERVER, 6443)
    assert _connects(policies, peers["engine"], API_SERVER, 443)
    assert not _connects(policies, peers["engine"], peers["provider"], 8031)
    # The provider reaches a chain's JSON-RPC endpoint (HTTPS or a node's 8545).
    assert _connects(policies, peers["provider"], OUTSIDE, 8545)
    assert _connects(policies, peers["provider"], OUTSIDE, 443)
    for name in ("gateway", "operator-service"):
        assert not _connects(policies, peers[name], OUTSIDE, 443), name
        assert not _connects(policies, peers[name], API_SERVER, 6443), name


def test_job_pods_reach_nothing_and_nothing_reaches_them(rendered: tuple[Obj, ...]) -> None:
    policies = _of_kind(rendered, "NetworkPolicy")
    peers = _peers(rendered)
    for other in [*(peers[name] for name in SERVICES), OUTSIDE, API_SERVER, ELSEWHERE]:
        for port in (443, 6443, 8031, 8041, 8051, HEALTH_PORT):
            assert not _connects(policies, JOB_POD, other, port), (other, port)
            assert not _connects(policies, other, JOB_POD, port), (other, port)
    assert not _connects(policies, JOB_POD, DNS_POD, 53, "UDP")

    jobs_policies = [p for p in policies if p["metadata"]["namespace"] == JOBS]
    deny = [
        p
        for p in jobs_policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "c2d-jobs needs a default-deny policy for both directions"
    # Nothing committed allows anything there: the engine adds each job's allowances itself.
    assert jobs_policies == deny


# -- storage -----------------------------------------------------------------------------------


def test_every_claim_binds_its_own_volume(rendered: tuple[Obj, ...]) -> None:
    claims = {
        (c["metadata"]["namespace"], c["metadata"]["name"]): c
        for c in _of_kind(rendered, "PersistentVolumeClaim")
    }
    volumes = {v["metadata"]["name"]: v for v in _of_kind(rendered, "PersistentVolume")}
    for (namespace, name), claim in claims.items():
        volume_name = claim["spec"].get("volumeName")
        if volume_name is None:
            continue  # dynamically provisioned (a service's home)
        volume = volumes[volume_name]["spec"]
        assert volume["claimRef"] == {"namespace": namespace, "name": name}
        assert set(claim["spec"]["accessModes"]) <= set(volume["accessModes"])
        assert claim["spec"]["storageClassName"] == volume["storageClassName"] == ""
        wanted = _quantity(claim["spec"]["resources"]["requests"]["storage"])
        assert _quantity(volume["capacity"]["storage"]) >= wanted, name
    # Both shares are claimed in both namespaces.
    for share in ("c2d-data", "c2d-results"):
        for namespace in (SYSTEM, JOBS):
            assert claims[(namespace, share)]["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, pod in _pod_specs(rendered):
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert (SYSTEM, volume["persistentVolumeClaim"]["claimName"]) in claims, name


def test_the_engine_gives_job_pods_the_shared_claims(rendered: tuple[Obj, ...]) -> None:
    env = _env(rendered, "engine")
    claims = {
        c["metadata"]["name"]
        for c in _of_kind(rendered, "PersistentVolumeClaim")
        if c["metadata"]["namespace"] == JOBS
    }
    data = json.loads(env["C2D_K8S_DATA_VOLUME"])
    results = json.loads(env["C2D_K8S_RESULTS_VOLUME"])
    assert data == {"persistentVolumeClaim": {"claimName": "c2d-data", "readOnly": True}}
    assert results["persistentVolumeClaim"]["claimName"] == "c2d-results"
    assert {"c2d-data", "c2d-results"} <= claims
    assert env["C2D_K8S_NAMESPACE"] == JOBS
    assert env["C2D_ENGINE_BACKEND"] == "kubernetes"
    # As a job pod would carry them, both sources are valid volumes (and restricted ones).
    job_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "job", "namespace": JOBS},
        "spec": {
            "containers": [{"name": "stage", "image": env["C2D_K8S_PODS_IMAGE"]}],
            "volumes": [{"name": "data", **data}, {"name": "results", **results}],
        },
    }
    validate_strict(job_pod)


def test_the_paths_the_services_use_are_their_mounts(rendered: tuple[Obj, ...]) -> None:
    expected = {
        "provider": {"C2D_HOME": False, "C2D_DATA_ROOT": True},
        "operator-service": {"C2D_HOME": False, "C2D_STORAGE": False},
        "engine": {"C2D_HOME": False, "C2D_STORAGE": False},
    }
    for name, variables in expected.items():
        env = _env(rendered, name)
        mounts = {m["mountPath"]: m for m in _container(rendered, name)["volumeMounts"]}
        assert "/tmp" in mounts, name
        for variable, read_only in variables.items():
            mount = mounts[env[variable]]
            assert mount.get("readOnly", False) is read_only, (name, variable)


# -- wiring ------------------------------------------------------------------------------------


def _service_port(objects: tuple[Obj, ...], name: str) -> int:
    service = _one(objects, "Service", name)
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in _container(objects, name)["ports"]}
    assert container_ports[port["targetPort"]] == port["port"], name
    assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(objects, name))
    value: int = port["port"]
    return value


def test_each_service_listens_where_its_callers_call_it(rendered: tuple[Obj, ...]) -> None:
    for name, (variable, port) in LISTEN.items():
        assert _env(rendered, name)[variable] == f"0.0.0.0:{port}", name
        assert _service_port(rendered, name) == port, name
    for caller, variable, callee in CALLS:
        assert _env(rendered, caller)[variable] == f"{callee}.{SYSTEM}.svc:{LISTEN[callee][1]}"
    assert _env(rendered, "provider")["C2D_OWNERS"] == "<c2d-owners/C2D_OWNERS>"


def test_internal_hops_are_mutual_tls_with_per_service_identities(
    rendered: tuple[Obj, ...],
) -> None:
    allowed = {"provider": None, "operator-service": "provider", "engine": "operator-service"}
    for name, clients in allowed.items():
        env = _env(rendered, name)
        pod = _one(rendered, "Deployment", name)["spec"]["template"]["spec"]
        (tls,) = (v for v in pod["volumes"] if "secret" in v)
        assert tls["secret"]["secretName"] == f"c2d-tls-{name}"
        assert tls["secret"]["defaultMode"] == 0o440
        (mount,) = (m for m in _container(rendered, name)["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        for variable, key in (
            ("C2D_TLS_CERT", "tls.crt"),
            ("C2D_TLS_KEY", "tls.key"),
            ("C2D_TLS_CA", "ca.crt"),
        ):
            assert env[variable] == f"{mount['mountPath']}/{key}", (name, variable)
        assert env.get("C2D_TLS_ALLOWED_CLIENTS") == clients, name
    assert not any(key.startswith("C2D_TLS_") for key in _env(rendered, "gateway"))


def test_grpc_services_are_probed_on_their_plaintext_health_port(
    rendered: tuple[Obj, ...],
) -> None:
    # The Provider's own port is plaintext (consumers sign requests; TLS is the edge's): its
    # probes use it, and it has no health-only port.
    provider = _container(rendered, "provider")
    assert "C2D_HEALTH_LISTEN" not in _env(rendered, "provider")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert provider[probe]["grpc"] == {"port": 8031}, probe
    for name in ("operator-service", "engine"):
        container = _container(rendered, name)
        assert _env(rendered, name)["C2D_HEALTH_LISTEN"] == f"0.0.0.0:{HEALTH_PORT}"
        assert {"name": "health", "containerPort": HEALTH_PORT} in container["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": HEALTH_PORT}, (name, probe)
    gateway = _container(rendered, "gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/openapi.json", "port": "http"}


def test_no_secret_is_committed(rendered: tuple[Obj, ...]) -> None:
    assert not _of_kind(rendered, "Secret")
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "PRIVATE KEY" not in text, path
            assert not re.search(r"^kind:\s*Secret\b", text, re.MULTILINE), path
            assert "secretGenerator" not in text, path


# -- the overlays ------------------------------------------------------------------------------


def test_the_kind_overlay_runs_the_local_image_and_the_node_folders() -> None:
    objects = _render_overlay("kind")
    for name, pod in _pod_specs(objects):
        for container in _containers(pod):
            assert container["image"] == "c2d-mesh:dev", name
            assert container["imagePullPolicy"] == "IfNotPresent", name
    assert _env(objects, "engine")["C2D_K8S_PODS_IMAGE"] == "c2d-mesh:dev"
    paths = {
        v["metadata"]["name"]: v["spec"]["hostPath"]["path"]
        for v in _of_kind(objects, "PersistentVolume")
    }
    assert paths == {
        "c2d-data-system": "/var/lib/c2d/data",
        "c2d-data-jobs": "/var/lib/c2d/data",
        "c2d-results-system": "/var/lib/c2d/results",
        "c2d-results-jobs": "/var/lib/c2d/results",
    }
    config = yaml.safe_load(KIND_CONFIG.read_text())
    node_path = config["nodes"][0]["extraMounts"][0]["containerPath"]
    assert all(path.startswith(node_path + "/") for path in paths.values())


def test_the_production_overlay_keeps_state_and_names_its_registry() -> None:
    objects = _render_overlay("production")
    image = "registry.example.com/c2d-mesh:0.1.0"
    for name, pod in _pod_specs(objects):
        assert {c["image"] for c in _containers(pod)} == {image}, name
    assert _env(objects, "engine")["C2D_K8S_PODS_IMAGE"] == image
    for name in GRPC_SERVICES:
        deployment = _one(objects, "Deployment", name)
        assert deployment["spec"]["replicas"] == 1, name
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name
        (home,) = (
            v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "home"
        )
        assert home == {"name": "home", "persistentVolumeClaim": {"claimName": f"c2d-{name}-home"}}
    assert _one(objects, "Deployment", "gateway")["spec"]["replicas"] >= 2
    assert _one(objects, "PodDisruptionBudget", "gateway")["spec"]["minAvailable"] == 1
    for volume in _of_kind(objects, "PersistentVolume"):
        assert volume["spec"]["accessModes"] == ["ReadWriteMany"]
        assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"


# -- the gateway's probes, against the real gateway ------------------------------------------


def test_the_gateway_probe_paths_answer_as_the_manifest_expects(tmp_path: Path) -> None:
    """Run as its Deployment runs it, with the Provider down: the readiness path says 503
    (take no traffic), the liveness path says 200 (do not restart)."""
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    objects = _render("kind")
    container = _container(objects, "gateway")
    assert container["command"][:1] == ["python"]
    socket_path = tmp_path / "gateway.sock"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("C2D_")},
        **_env(objects, "gateway"),
        "C2D_GATEWAY_LISTEN": f"unix:{socket_path}",
        "C2D_PROVIDER_ADDRESS": f"unix:{tmp_path / 'no-provider.sock'}",
        "C2D_HOME": str(tmp_path / "home"),
    }
    process = subprocess.Popen(
        [sys.executable, *container["command"][1:]],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path))) as client:
            _wait_for_socket(process, socket_path)
            readiness = client.get(
                "http://gateway" + container["readinessProbe"]["httpGet"]["path"]
            )
            liveness = client.get("http://gateway" + container["livenessProbe"]["httpGet"]["path"])
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    assert readiness.status_code == 503, readiness.text
    assert readiness.json()["status"] == "UNREACHABLE"
    assert liveness.status_code == 200
    assert process.returncode == 0, stderr.decode()


def _wait_for_socket(process: subprocess.Popen[bytes], path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the gateway ended: {process.stderr.read().decode()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise AssertionError("the gateway did not listen within 30 s")
        time.sleep(0.05)


# -- the kind script -----------------------------------------------------------------------------


def test_the_kind_script_is_valid_bash() -> None:
    result = subprocess.run(
        ["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert os.access(SCRIPT, os.X_OK)


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(
    ("tools", "named", "not_named"),
    [
        # A Docker client whose engine is gone, kubectl, no kind: this machine's case.
        (("docker-client", "kubectl"), ["a Docker engine", "kind"], ["kubectl", "Docker CLI"]),
        ((), ["docker: the Docker CLI", "kind", "kubectl"], ["Docker engine"]),
        (("docker-engine", "kind"), ["kubectl"], ["Docker", "kind ("]),
    ],
    ids=["no-engine-no-kind", "nothing", "no-kubectl"],
)
def test_the_kind_script_names_what_is_missing_and_exits_2(
    tmp_path: Path, tools: tuple[str, ...], named: list[str], not_named: list[str]
) -> None:
    # Stand-ins for the tools (a PATH of these alone), so that the outcome does not depend on
    # what this machine has installed.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if "docker-client" in tools:
        _stand_in(bin_dir, "docker", 'echo "Cannot connect to the Docker daemon" >&2; exit 1')
    if "docker-engine" in tools:
        _stand_in(bin_dir, "docker", "exit 0")
    for tool in ("kind", "kubectl"):
        if tool in tools:
            _stand_in(bin_dir, tool, "exit 0")
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(SCRIPT)],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "TMPDIR": str(temp)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "missing" in result.stderr
    for text in named:
        assert text in result.stderr, result.stderr
    for text in not_named:
        assert text not in result.stderr, result.stderr
    assert not list(temp.iterdir()), "the script made files before its checks passed"


def test_the_kind_script_exits_2_on_this_machine_when_it_cannot_run() -> None:
    docker = shutil.which("docker")
    engine = docker is not None and (
        subprocess.run([docker, "info"], capture_output=True, timeout=30, check=False).returncode
        == 0
    )
    if engine and shutil.which("kind") and KUBECTL:
        pytest.skip("this machine has Docker, kind and kubectl: `make kind-e2e` runs for real")
    result = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    if docker is None:
        assert "Docker CLI" in result.stderr
    elif not engine:
        assert "a Docker engine" in result.stderr
    if shutil.which("kind") is None:
        assert "kind (" in result.stderr


def test_make_kind_e2e_runs_the_script() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        [make, "-n", "kind-e2e"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "scripts/kind-e2e.sh" in result.stdout
