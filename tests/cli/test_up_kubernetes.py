"""`c2d up --engine kubernetes` as a user runs it, against a kubeconfig: here the stand-in of
the Kubernetes API (tests/operator_engine/kube_standin.py; no cluster runs on these machines)
with its RunLocally kubelet, which runs every pod's command as a local process. The whole node
runs for real; a job goes through the CLI from publication to results."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.supervisor import free_address
from tests.operator_engine.kube_standin import KubeStandIn, RunLocally

C2D = [sys.executable, "-m", "cli.main"]
# Uses only $OUTPUTS: a local process cannot see the pod's per-file input mounts.
ALGORITHM = """import os
print("dids", os.environ["DIDS"], flush=True)
with open(os.path.join(os.environ["OUTPUTS"], "hello.txt"), "w") as f:
    f.write("hi\\n")
"""


class Node:
    def __init__(self, home: Path, kubeconfig: Path) -> None:
        self.home = home
        self.kubeconfig = kubeconfig
        provider = free_address()
        self.env = {
            **os.environ,
            "C2D_HOME": str(home),
            "C2D_PROVIDER_LISTEN": provider,
            "C2D_PROVIDER_ADDRESS": provider,
            "C2D_GATEWAY_LISTEN": free_address(),
            "C2D_LOG_FORMAT": "json",
        }

    async def c2d(self, *args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *C2D,
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[KubeStandIn]:
    async with KubeStandIn(tmp_path / "kube") as standin:
        standin.on_pod(lambda pod: True, RunLocally(tmp_path / "kubelet"))
        yield standin


async def test_up_runs_jobs_in_the_cluster_of_a_kubeconfig(
    kube: KubeStandIn, tmp_path: Path
) -> None:
    node = Node(tmp_path / "home", kube.kubeconfig_path)
    up = await asyncio.create_subprocess_exec(
        *C2D,
        "up",
        "--engine",
        "kubernetes",
        "--kubeconfig",
        str(kube.kubeconfig_path),
        env=node.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert up.stdout is not None
        banner = ""
        while "Ctrl-C" not in banner:
            line = await asyncio.wait_for(up.stdout.readline(), 60)
            assert line, "c2d up ended before it was up"
            banner += line.decode()
        assert "jobs run in    Kubernetes namespace c2d-jobs" in banner

        data = node.home / "data" / "n.csv"
        data.write_text("1\n2\n3\n")
        algorithm_file = tmp_path / "algo.py"
        algorithm_file.write_text(ALGORITHM)
        code, algorithm, err = await node.c2d(
            "algorithm", "publish", str(algorithm_file), "--entrypoint", "python3 $ALGO"
        )
        assert code == 0, err
        algorithm = algorithm.strip().splitlines()[-1]
        code, dataset, err = await node.c2d("dataset", "publish", str(data), "--trust", algorithm)
        assert code == 0, err
        dataset = dataset.strip().splitlines()[-1]
        code, out, err = await node.c2d(
            "compute", "start", "--dataset", dataset, "--algorithm", algorithm, "--follow"
        )
        assert code == 0, out + err
        # The live log on stdout, the job's states on stderr.
        assert "dids" in out and "succeeded" in err
        job_id = err.split()[1]
        code, out, err = await node.c2d(
            "compute", "results", job_id, "--out", str(tmp_path / "results")
        )
        assert code == 0, err
        assert (tmp_path / "results" / "hello.txt").read_text() == "hi\n"
        # The job ran as pods in the cluster, and left only its record there.
        stages = sorted(
            pod_request.body["metadata"]["labels"]["c2d.mesh/stage"]
            for pod_request in kube.requests
            if pod_request.method == "POST" and pod_request.path.endswith("/pods")
        )
        assert stages == ["algorithm", "configure", "publish"]
        assert kube.objects("pods", "c2d-jobs") == []
        assert len(kube.objects("secrets", "c2d-jobs")) == 1
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(up.wait(), 20)
            except TimeoutError:
                up.kill()
                await up.wait()


async def test_up_without_a_kubeconfig_says_so(tmp_path: Path) -> None:
    node = Node(tmp_path / "home", tmp_path / "missing")
    node.env["KUBECONFIG"] = str(tmp_path / "missing")
    code, _, err = await node.c2d("up", "--engine", "kubernetes")
    assert code == 2
    assert "needs a kubeconfig" in err and str(tmp_path / "missing") in err
