"""Hostile algorithms through the whole job path: each ends with its exact failure reason,
leaves no process behind, and leaves the services serving and other jobs unaffected."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb

from sdk.client import Client
from tests.conftest import LocalMesh, needs_root

pytestmark = needs_root
State = job_pb2.Job.State
R = job_pb2

CRASH = "raise SystemExit(7)\n"
ENDLESS = "while True:\n    pass\n"
MEMORY_BOMB = "hog = []\nwhile True:\n    hog.append(bytearray(8 << 20))\n"
FORK_BOMB = """
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    except OSError:
        time.sleep(30)
"""
DISK_FILL = """
import os
block = b"x" * (1 << 20)
for i in range(10_000):
    with open(f"/data/outputs/fill-{i}.bin", "wb") as f:
        f.write(block)
"""
MANY_OUTPUTS = """
for i in range(25):
    open(f"/data/outputs/out-{i:02}.txt", "w").write(str(i))
"""
TMP_FILL = """
block = b"x" * (1 << 20)
with open("/tmp/fill", "wb") as f:
    while True:
        f.write(block)
"""


async def run_raw(
    mesh: LocalMesh,
    client: Client,
    code: str,
    environment: str = "small",
    parameters: dict[str, object] | None = None,
) -> job_pb2.Job:
    dataset = await client.publish_dataset(
        [mesh.data_file(f"in-{time.monotonic_ns()}.txt", b"1\n")],
        policy=pb.ComputePolicy(allow_raw_algorithm=True),
    )
    job = await client.start_compute(
        [dataset.did], raw_code=code, environment=environment, parameters=parameters
    )
    final = job
    async for update in client.watch_job(job.name):
        final = update
    return final


async def log_of(client: Client, job: job_pb2.Job) -> str:
    return "".join([c.text async for c in client.stream_logs(job.name)])


def assert_nothing_left(mesh: LocalMesh) -> None:
    assert mesh.stray_processes() == [], "a job left a process behind"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (CRASH, R.FAILURE_REASON_ALGORITHM_EXIT_NONZERO),
        (ENDLESS, R.FAILURE_REASON_TIMED_OUT),
        (MEMORY_BOMB, R.FAILURE_REASON_OUT_OF_MEMORY),
        (FORK_BOMB, R.FAILURE_REASON_TOO_MANY_PROCESSES),
        (DISK_FILL, R.FAILURE_REASON_DISK_FULL),
        (MANY_OUTPUTS, R.FAILURE_REASON_OUTPUT_TOO_LARGE),
    ],
    ids=["crash", "endless-loop", "memory-bomb", "fork-bomb", "disk-fill", "too-many-outputs"],
)
async def test_each_limit_ends_the_job_with_its_reason(
    local_mesh: LocalMesh, code: str, reason: int
) -> None:
    async with local_mesh.client(local_mesh.owner) as client:
        final = await run_raw(local_mesh, client, code)
        assert final.state == State.STATE_FAILED, final
        assert final.failure_reason == reason, (
            job_pb2.FailureReason.Name(final.failure_reason),
            final.message,
        )  # type: ignore[arg-type]
        # Logs are published whatever the failure.
        assert any(r.kind == job_pb2.ResultFile.KIND_PUBLISH_LOG for r in final.results)
        assert_nothing_left(local_mesh)
        # The services still serve.
        assert (await client.get_job(final.name)).state == State.STATE_FAILED


async def test_a_ram_filling_tmp_is_stopped(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as client:
        final = await run_raw(local_mesh, client, TMP_FILL)
        assert final.state == State.STATE_FAILED
        # /tmp is capped below the memory limit: it fills first.
        assert final.failure_reason in (R.FAILURE_REASON_DISK_FULL, R.FAILURE_REASON_OUT_OF_MEMORY)
        assert_nothing_left(local_mesh)


async def test_other_jobs_are_unaffected_by_a_fork_bomb(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(local_mesh.owner) as client:
        bomb = asyncio.create_task(run_raw(local_mesh, client, FORK_BOMB, "small"))
        calm = await run_raw(
            local_mesh, client, "open('/data/outputs/ok.txt', 'w').write('fine')\n", "default"
        )
        assert calm.state == State.STATE_SUCCEEDED, calm.message
        bombed = await bomb
        assert bombed.failure_reason in (
            R.FAILURE_REASON_TOO_MANY_PROCESSES,
            R.FAILURE_REASON_TIMED_OUT,
        )


NETWORK_PROBE = """
import json, socket
params = json.load(open("/data/inputs/algoCustomData.json"))
targets = [("127.0.0.1", params["provider_port"]), ("10.0.0.1", 80), ("1.1.1.1", 53)]
for host, port in targets:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print(f"CONNECTED {host}:{port}", flush=True)
    except OSError as error:
        print(f"refused {host}:{port}: {error}", flush=True)
try:
    socket.getaddrinfo("example.com", 443)
    print("RESOLVED example.com", flush=True)
except OSError as error:
    print(f"no dns: {error}", flush=True)
import os
for path in params["private_paths"]:
    print(f"{'VISIBLE' if os.path.exists(path) else 'hidden'} {path}", flush=True)
print("done", flush=True)
"""


async def test_the_network_is_unreachable_from_a_job(local_mesh: LocalMesh) -> None:
    port = int(local_mesh.provider_address.rsplit(":", 1)[1])
    async with local_mesh.client(local_mesh.owner) as client:
        # The services' sockets, their databases and the node's home are not in the sandbox.
        private = [
            local_mesh.operator_address.removeprefix("unix:"),
            local_mesh.engine_address.removeprefix("unix:"),
            str(local_mesh.home),
            "/root",
            "/etc/shadow",
            "/work",
        ]
        final = await run_raw(
            local_mesh,
            client,
            NETWORK_PROBE,
            parameters={"provider_port": port, "private_paths": private},
        )
        text = await log_of(client, final)
        assert final.state == State.STATE_SUCCEEDED, (final.message, text)
        assert "CONNECTED" not in text and "RESOLVED" not in text, text
        refusals = [line for line in text.splitlines() if line.startswith("refused ")]
        assert len(refusals) == 3 and "no dns" in text, text
        assert "VISIBLE" not in text and text.count("hidden") == 6, text


PLANTED = """
import os
os.symlink("/etc/passwd", "/data/outputs/passwd-link")
os.symlink("/data/inputs", "/data/outputs/inputs-link")
os.mkfifo("/data/outputs/a-fifo")
with open("/data/outputs/setuid-file", "w") as f:
    f.write("not really a program")
os.chmod("/data/outputs/setuid-file", 0o4755)
os.makedirs("/data/outputs/sub/deeper")
with open("/data/outputs/sub/deeper/real.txt", "w") as f:
    f.write("real")
with open("/data/outputs/linked.txt", "w") as f:
    f.write("two names")
os.link("/data/outputs/linked.txt", "/data/outputs/hard-link")
import socket
s = socket.socket(socket.AF_UNIX)
s.bind("/data/outputs/a-socket")
print("planted", flush=True)
"""


async def test_planted_links_fifos_and_setid_files_never_bring_a_host_file_back(
    local_mesh: LocalMesh, tmp_path: object
) -> None:
    async with local_mesh.client(local_mesh.owner) as client:
        final = await asyncio.wait_for(run_raw(local_mesh, client, PLANTED), 30)
        assert final.state == State.STATE_SUCCEEDED, final.message
        outputs = {r.name for r in final.results if r.kind == job_pb2.ResultFile.KIND_OUTPUT}
        # Only regular files with one link are results; the rest is skipped and reported.
        assert outputs == {"setuid-file", "sub/deeper/real.txt"}, outputs
        publish_log = next(
            r for r in final.results if r.kind == job_pb2.ResultFile.KIND_PUBLISH_LOG
        )
        from pathlib import Path

        saved = await client.download_result(
            final.name, publish_log, Path(str(tmp_path)) / "publish.log"
        )
        text = saved.read_text()
        for name in ("passwd-link", "inputs-link", "a-fifo", "a-socket", "hard-link", "linked.txt"):
            assert name in text, (name, text)
        assert "root:" not in json.dumps([r.name for r in final.results])
        assert_nothing_left(local_mesh)
