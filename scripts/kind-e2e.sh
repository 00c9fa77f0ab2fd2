#!/usr/bin/env bash
# The mesh on a local kind cluster, end to end (`make kind-e2e`): builds the c2d-mesh:dev image,
# creates a kind cluster (deploy/kind/cluster.yaml) whose node folder holds a dataset, loads the
# image, makes the services' certificates (`c2d certs`) and an owner key, creates the TLS Secrets
# and the owners ConfigMap, applies deploy/overlays/kind, waits for the rollouts, forwards the
# Provider's port and runs tests/e2e/test_kind.py against it.
#
# Needs docker (with a running engine), kind, kubectl and the project's .venv (`make setup`);
# exits 2 naming what is missing. Everything it makes lives in a temporary folder and in the
# cluster, both removed at the end.
#
# Settings (environment):
#   KEEP_CLUSTER=1      keep the cluster (and its folder) afterwards, to look around
#   C2D_KIND_CLUSTER    the cluster's name (default c2d-e2e); an existing one is never touched
#   KIND_NODE_IMAGE     the node image (kindest/node:vX.Y.Z), default: kind's own
set -euo pipefail

# Builtins only until the checks pass, so that the message is right whatever is missing.
script_dir=${BASH_SOURCE[0]%/*}
[[ $script_dir == "${BASH_SOURCE[0]}" ]] && script_dir=.
cd "$script_dir/.."
root=$PWD

missing=()
if ! command -v docker >/dev/null 2>&1; then
    missing+=("docker: the Docker CLI (https://docs.docker.com/engine/install/)")
elif ! docker info >/dev/null 2>&1; then
    missing+=("a Docker engine: \`docker info\` cannot reach one (start the daemon, or set DOCKER_HOST)")
fi
if ! command -v kind >/dev/null 2>&1; then
    missing+=("kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)")
fi
if ! command -v kubectl >/dev/null 2>&1; then
    missing+=("kubectl (https://kubernetes.io/docs/tasks/tools/)")
fi
if [[ ! -x .venv/bin/c2d || ! -x .venv/bin/pytest ]]; then
    missing+=("the project's .venv with c2d and pytest (run \`make setup\`)")
fi
if ((${#missing[@]})); then
    echo "kind-e2e: cannot run; missing:" >&2
    for item in "${missing[@]}"; do
        echo "  - $item" >&2
    done
    exit 2
fi

cluster=${C2D_KIND_CLUSTER:-c2d-e2e}
node="$cluster-control-plane"
image=c2d-mesh:dev
services=(engine operator-service provider gateway)
work=$(mktemp -d "${TMPDIR:-/tmp}/c2d-kind-e2e.XXXXXX")
# The cluster's credentials stay in this run's folder, not in the user's ~/.kube/config.
export KUBECONFIG="$work/kubeconfig"
created=0
forward_pid=""

step() {
    printf '\n==> %s\n' "$*" >&2
}

diagnose() {
    echo "kind-e2e: failed; the cluster as it is:" >&2
    local wait=--request-timeout=20s
    kubectl get pods,pvc -A -o wide "$wait" >&2
    kubectl -n c2d-system get events --sort-by=.lastTimestamp "$wait" >&2
    for name in "${services[@]}"; do
        echo "--- last log lines of $name" >&2
        kubectl -n c2d-system logs "deployment/$name" --all-containers --tail=40 "$wait" >&2
    done
    kubectl -n c2d-jobs get pods,secrets,pvc,networkpolicies "$wait" >&2
}

cleanup() {
    local status=$?
    set +e
    if [[ -n $forward_pid ]]; then
        kill "$forward_pid" 2>/dev/null
        wait "$forward_pid" 2>/dev/null
    fi
    if ((created)); then
        ((status == 0)) || diagnose
        if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
            echo "kind-e2e: kept cluster $cluster; KUBECONFIG=$work/kubeconfig" >&2
            echo "  remove it with: kind delete cluster --name $cluster && rm -rf $work" >&2
            exit "$status"
        fi
        # Results belong to the pods' uid: remove them from inside the node, which may.
        docker exec "$node" rm -rf /var/lib/c2d/results /var/lib/c2d/data >/dev/null 2>&1
        kind delete cluster --name "$cluster" >&2
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Read whole first: a grep that stops early could make the listing fail and hide the cluster.
existing=$(kind get clusters 2>/dev/null || true)
if grep -qx -- "$cluster" <<<"$existing"; then
    echo "kind-e2e: a kind cluster named $cluster exists already; delete it" \
        "(kind delete cluster --name $cluster) or set C2D_KIND_CLUSTER" >&2
    exit 1
fi

step "building $image"
docker build -f deploy/images/Containerfile -t "$image" .

step "creating the kind cluster $cluster"
# The node's /var/lib/c2d: data/ (the datasets, readable by everyone, as the Provider
# requires) and results/ (given to the pods' uid once the node exists).
host_dir="$work/node"
mkdir -p "$host_dir/data" "$host_dir/results"
chmod 0755 "$host_dir" "$host_dir/data"
printf '%s\n' 1 2 3 4 5 6 7 8 9 10 >"$host_dir/data/numbers.txt"
chmod 0644 "$host_dir/data/numbers.txt"
.venv/bin/python - "$root/deploy/kind/cluster.yaml" "$host_dir" "$cluster" >"$work/cluster.yaml" <<'PY'
import sys

import yaml

template, host_dir, name = sys.argv[1:]
with open(template) as f:
    config = yaml.safe_load(f)
config["name"] = name
mounts = [
    mount
    for node in config["nodes"]
    for mount in node.get("extraMounts", [])
    if mount.get("containerPath") == "/var/lib/c2d"
]
if len(mounts) != 1:
    sys.exit(f"{template} must mount exactly one host folder at /var/lib/c2d")
mounts[0]["hostPath"] = host_dir
yaml.safe_dump(config, sys.stdout, sort_keys=False)
PY
created=1
kind create cluster --name "$cluster" --config "$work/cluster.yaml" --kubeconfig "$KUBECONFIG" \
    --wait 180s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}

step "loading $image into the cluster"
kind load docker-image "$image" --name "$cluster"
docker exec "$node" chown 10001:10001 /var/lib/c2d/results
docker exec "$node" chmod 0700 /var/lib/c2d/results

step "making the owner's key and the services' certificates"
owner=$(
    .venv/bin/python - "$work/owner.json" <<'PY'
import sys
from pathlib import Path

from sdk.keys import Key

print(Key.load_or_create(Path(sys.argv[1])).address)
PY
)
.venv/bin/c2d certs --out "$work/certs" >/dev/null

step "creating the namespaces, the TLS Secrets and the owners ConfigMap"
kubectl apply -f deploy/base/namespaces.yaml
for name in provider operator-service engine; do
    kubectl -n c2d-system create secret generic "c2d-tls-$name" --type=kubernetes.io/tls \
        --from-file=tls.crt="$work/certs/$name.crt" \
        --from-file=tls.key="$work/certs/$name.key" \
        --from-file=ca.crt="$work/certs/ca.crt"
done
kubectl -n c2d-system create configmap c2d-owners --from-literal=C2D_OWNERS="$owner"

step "applying deploy/overlays/kind"
kubectl apply -k deploy/overlays/kind
for name in "${services[@]}"; do
    kubectl -n c2d-system rollout status "deployment/$name" --timeout=300s
done

step "forwarding the Provider's port"
kubectl -n c2d-system port-forward --address 127.0.0.1 svc/provider :8031 \
    >"$work/port-forward.log" 2>&1 &
forward_pid=$!
port=""
for _ in $(seq 60); do
    port=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9][0-9]*\) .*/\1/p' "$work/port-forward.log")
    [[ -n $port ]] && break
    if ! kill -0 "$forward_pid" 2>/dev/null; then
        cat "$work/port-forward.log" >&2
        echo "kind-e2e: kubectl port-forward ended" >&2
        exit 1
    fi
    sleep 0.5
done
if [[ -z $port ]]; then
    echo "kind-e2e: kubectl port-forward did not start within 30 s" >&2
    exit 1
fi

step "running tests/e2e/test_kind.py against 127.0.0.1:$port"
C2D_KIND_PROVIDER="127.0.0.1:$port" \
    C2D_KIND_OWNER_KEY="$work/owner.json" \
    C2D_KIND_DATASET=/c2d/data/numbers.txt \
    C2D_KIND_STRICT=1 \
    .venv/bin/pytest tests/e2e/test_kind.py -v -p no:cacheprovider
