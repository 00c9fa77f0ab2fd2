"""The `c2d` command as a user runs it: `c2d up` in the foreground, the other commands against
it, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.supervisor import free_address
from tests.conftest import SandboxIdentity, needs_root

pytestmark = needs_root
C2D = [sys.executable, "-m", "cli.main"]


class Node:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.provider = free_address()
        self.gateway = free_address()
        self.sandbox = SandboxIdentity.new()
        self.env = {
            **os.environ,
            "C2D_HOME": str(home),
            "C2D_PROVIDER_LISTEN": self.provider,
            "C2D_PROVIDER_ADDRESS": self.provider,
            "C2D_GATEWAY_LISTEN": self.gateway,
            **self.sandbox.env(),
            "C2D_LOG_FORMAT": "json",
        }
        self.process: subprocess.Popen[str] | None = None

    def data_file(self, name: str, text: str) -> Path:
        """A file under the node's data root, readable by the jobs' own identity."""
        path = self.home / "data" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
        return path

    def c2d(self, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--key-file", key] if key else []
        return subprocess.run(
            [*C2D, *args, *extra], env=self.env, capture_output=True, text=True, timeout=60
        )


def run_until_ready(
    command: list[str], env: dict[str, str], ready: str, *, within_s: float = 60
) -> tuple[subprocess.Popen[str], str]:
    """Runs a long-lived `c2d` command until it prints `ready`; its output so far. Fails the
    test (the command killed, its stderr shown) when it does not within `within_s`."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    banner = ""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and ready not in banner:
        line = process.stdout.readline()
        if not line:
            break
        banner += line
    if ready not in banner:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"{command} did not start:\n{banner}\n{stderr}")
    return process, banner


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path / "home")
    node.process, banner = run_until_ready([*C2D, "up"], node.env, "Ctrl-C", within_s=30)
    assert node.provider in banner and node.gateway in banner
    try:
        yield node
    finally:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait()
        asyncio.run(node.sandbox.sweep())


def test_up_serves_the_cli_and_stops_cleanly_on_sigterm(node: Node) -> None:
    home = node.home
    # The internal hops are Unix sockets no other local user can reach.
    run = home / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for sock in ("operator.sock", "engine.sock"):
        mode = (run / sock).stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077 == 0
    # Without configuration, the CLI's own key is the node's owner.
    owner_key = home / "key.json"
    assert stat.S_IMODE(owner_key.stat().st_mode) == 0o600

    algo = home / "algo.py"
    algo.write_text(
        "import json, os\nprint('hello from the sandbox', flush=True)\n"
        "open('/data/outputs/out.txt', 'w').write(str(len(json.loads("
        "os.environ['DIDS']))))\n"
    )
    published = node.c2d(
        "algorithm", "publish", str(algo), "--entrypoint", "python3 $ALGO", "--json"
    )
    assert published.returncode == 0, published.stderr
    algorithm = json.loads(published.stdout)["did"]
    data = node.data_file("d.csv", "1\n")
    dataset_run = node.c2d("dataset", "publish", str(data), "--trust", algorithm)
    assert dataset_run.returncode == 0, dataset_run.stderr
    dataset = dataset_run.stdout.strip()
    assert dataset.startswith("did:c2d:")

    consumer = str(home / "consumer.json")
    refused = node.c2d("dataset", "publish", str(data), key=consumer)
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr
    assert stat.S_IMODE(Path(consumer).stat().st_mode) == 0o600

    started = node.c2d(
        "compute", "start", "--dataset", dataset, "--algorithm", algorithm, "--follow", key=consumer
    )
    assert started.returncode == 0, started.stderr
    assert "hello from the sandbox" in started.stdout
    assert "status: succeeded" in started.stderr
    job = started.stderr.split("job ", 1)[1].split()[0]

    status = node.c2d("compute", "status", job, "--json", key=consumer)
    assert json.loads(status.stdout)["state"] == "STATE_SUCCEEDED"
    assert json.loads(status.stdout)["statusCode"] == 70
    logs = node.c2d("compute", "logs", job, key=consumer)
    assert logs.stdout == "hello from the sandbox\n"
    out = home / "downloads"
    results = node.c2d("compute", "results", job, "--out", str(out), key=consumer)
    assert results.returncode == 0, results.stderr
    assert (out / "out.txt").read_text() == "1"
    listing = node.c2d("compute", "list", "--json", key=consumer)
    assert [j["name"] for j in json.loads(listing.stdout)] == [f"jobs/{job}"]
    # Another consumer does not see the job.
    other = node.c2d("compute", "status", job, key=str(home / "other.json"))
    assert other.returncode != 0 and "NOT_FOUND" in other.stderr

    # The REST edge is up as well.
    reply = httpx.get(f"http://{node.gateway}/v1/datasets", timeout=10)
    assert reply.status_code == 200
    assert reply.json()["datasets"][0]["did"] == dataset

    assert node.process is not None
    began = time.monotonic()
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=12) == 0
    assert time.monotonic() - began < 10
    assert not (run / "engine.sock").exists()


def test_failed_job_makes_follow_exit_non_zero(node: Node) -> None:
    algo = node.home / "fail.py"
    algo.write_text("raise SystemExit(4)\n")
    data = node.data_file("x.csv", "1\n")
    dataset = node.c2d("dataset", "publish", str(data), "--allow-raw").stdout.strip()
    started = node.c2d(
        "compute", "start", "--dataset", dataset, "--raw", str(algo), "--follow", "--json"
    )
    assert started.returncode == 1
    document = json.loads(started.stdout)
    assert document["state"] == "STATE_FAILED"
    assert document["failureReason"] == "FAILURE_REASON_ALGORITHM_EXIT_NONZERO"


def test_no_service_outlives_a_killed_supervisor(node: Node) -> None:
    assert node.process is not None
    children = subprocess.run(
        ["pgrep", "-P", str(node.process.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 4
    node.process.kill()  # SIGKILL: the supervisor cannot pass anything on
    node.process.wait()
    deadline = time.monotonic() + 12
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [
            pid
            for pid in children
            if Path(f"/proc/{pid}").exists()
            and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        ]
        time.sleep(0.1)
    assert alive == [], "a service outlived its supervisor"
