"""scripts/kind-e2e.sh driven to its end with stand-ins for docker, kind and kubectl (no Docker
engine or cluster can run here): the steps in order, the files it hands them (cluster config
with the dataset, certificates from the real `c2d certs`, an owner address), the real
tests/e2e/test_kind.py failing against a Provider that is not there, and the clean-up after."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kind-e2e.sh"

# Each stand-in records its arguments, one call a line.
DOCKER = """#!/bin/sh
echo "docker $*" >>"$STANDIN_LOG"
"""
KIND = """#!/bin/sh
echo "kind $*" >>"$STANDIN_LOG"
if [ "$1 $2" = "create cluster" ]; then
    while [ $# -gt 0 ]; do
        if [ "$1" = --config ]; then
            cp "$2" "$STANDIN_DIR/cluster.yaml"
            node_dir=$(sed -n 's/.*hostPath: //p' "$2")
            cp -r "$node_dir/data" "$STANDIN_DIR/node-data"
        fi
        shift
    done
fi
"""
KUBECTL = """#!/bin/sh
echo "kubectl $*" >>"$STANDIN_LOG"
for arg in "$@"; do
    case "$arg" in
    --from-file=*=*)
        file=${arg#--from-file=*=}
        [ -f "$file" ] || { echo "kubectl stand-in: no file $file" >&2; exit 1; } ;;
    esac
done
for arg in "$@"; do
    if [ "$arg" = port-forward ]; then
        echo "Forwarding from 127.0.0.1:$STANDIN_PORT -> 8031"
        echo $$ >"$STANDIN_DIR/port-forward.pid"
        exec sleep 120
    fi
done
"""


def _free_port() -> int:
    # Nothing listens there during the run: the test on the "cluster" must find no Provider.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _run_script(tmp_path: Path, keep: bool) -> tuple[subprocess.CompletedProcess[str], Path]:
    bin_dir, record, temp = tmp_path / "bin", tmp_path / "record", tmp_path / "tmp"
    for folder in (bin_dir, record, temp):
        folder.mkdir()
    for name, body in (("docker", DOCKER), ("kind", KIND), ("kubectl", KUBECTL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("C2D_", "KUBECONFIG", "KEEP_CLUSTER", "KIND_"))
    }
    env.update(
        PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        TMPDIR=str(temp),
        STANDIN_LOG=str(record / "calls"),
        STANDIN_DIR=str(record),
        STANDIN_PORT=str(_free_port()),
    )
    if keep:
        env["KEEP_CLUSTER"] = "1"
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, record


def _calls(record: Path) -> list[str]:
    return (record / "calls").read_text().splitlines()


def _index(calls: list[str], prefix: str) -> int:
    found = [i for i, call in enumerate(calls) if call.startswith(prefix)]
    assert found, f"no call starting {prefix!r} in {calls}"
    return found[0]


@pytest.mark.parametrize("keep", [False, True], ids=["delete", "keep-cluster"])
def test_the_script_deploys_tests_and_cleans_up(tmp_path: Path, keep: bool) -> None:
    result, record = _run_script(tmp_path, keep)
    # The real test ran, strictly: no Provider answers, so it fails instead of skipping.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "does not answer" in result.stdout, result.stdout

    calls = _calls(record)
    steps = [
        "docker info",
        "kind get clusters",
        "docker build -f deploy/images/Containerfile -t c2d-mesh:dev .",
        "kind create cluster --name c2d-e2e --config ",
        "kind load docker-image c2d-mesh:dev --name c2d-e2e",
        "docker exec c2d-e2e-control-plane chown 10001:10001 /var/lib/c2d/results",
        "kubectl apply -f deploy/base/namespaces.yaml",
        "kubectl -n c2d-system create secret generic c2d-tls-provider --type=kubernetes.io/tls",
        "kubectl -n c2d-system create secret generic c2d-tls-operator-service",
        "kubectl -n c2d-system create secret generic c2d-tls-engine",
        "kubectl -n c2d-system create configmap c2d-owners --from-literal=C2D_OWNERS=0x",
        "kubectl apply -k deploy/overlays/kind",
        "kubectl -n c2d-system rollout status deployment/engine",
        "kubectl -n c2d-system rollout status deployment/gateway",
        "kubectl -n c2d-system port-forward --address 127.0.0.1 svc/provider :8031",
        "kubectl get pods,pvc -A -o wide",  # the diagnosis after the failure
    ]
    positions = [_index(calls, step) for step in steps]
    assert positions == sorted(positions), calls
    owners = next(call for call in calls if "C2D_OWNERS=" in call)
    assert re.search(r"C2D_OWNERS=0x[0-9a-fA-F]{40}$", owners), owners
    for name in ("provider", "operator-service", "engine"):
        secret = next(call for call in calls if f"c2d-tls-{name} " in call)
        for key in ("tls.crt", "tls.key", "ca.crt"):
            assert f"--from-file={key}=" in secret, secret

    # The cluster config the script wrote: the template, its host folder holding the dataset.
    config = yaml.safe_load((record / "cluster.yaml").read_text())
    (mount,) = config["nodes"][0]["extraMounts"]
    assert mount["containerPath"] == "/var/lib/c2d"
    assert mount["hostPath"].startswith(str(tmp_path / "tmp"))
    numbers = record / "node-data" / "numbers.txt"
    assert [int(line) for line in numbers.read_text().split()] == list(range(1, 11))
    assert numbers.stat().st_mode & 0o004, "the Provider needs the dataset readable by others"

    # The port-forward is stopped; the cluster and the folder go unless asked to stay.
    pid = int((record / "port-forward.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    deleted = "kind delete cluster --name c2d-e2e" in calls
    assert deleted is not keep
    left = list((tmp_path / "tmp").iterdir())
    if keep:
        assert len(left) == 1 and "kept cluster c2d-e2e" in result.stderr
    else:
        assert left == [], left
        assert calls[-1] == "kind delete cluster --name c2d-e2e"


def test_an_existing_cluster_of_that_name_is_left_alone(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    for name, body in (
        ("docker", 'echo "docker $*" >>"$STANDIN_LOG"'),
        ("kubectl", 'echo "kubectl $*" >>"$STANDIN_LOG"'),
        ("kind", 'echo "kind $*" >>"$STANDIN_LOG"; [ "$1" = get ] && echo c2d-e2e; exit 0'),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C2D_", "KEEP_CLUSTER"))}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", STANDIN_LOG=str(log))
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "exists already" in result.stderr
    calls = log.read_text().splitlines()
    assert not any(
        call.startswith(("kind delete", "kind create", "docker build")) for call in calls
    )
