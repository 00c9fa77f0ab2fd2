"""A job's network, for real: slirp4netns attached to the job's own network namespace, and the
host's own addresses made unreachable inside it.

A job allowed the network reaches a server beyond the host (in a network namespace of the
test's own, behind a veth pair, standing for the outside) but neither the host's loopback nor a
service the host binds on 0.0.0.0, through any of the host's addresses. A job without it sees
only its loopback. Nothing of slirp4netns outlives the job, or a killed engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2

from operator_engine.config import EnvironmentSpec
from operator_engine.runner import Runner
from operator_engine.sandbox import (
    Limits,
    Outcome,
    Sandbox,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
)
from tests.conftest import SandboxIdentity, engine_config
from tests.operator_engine.killed_engine import restarted_engine

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None or shutil.which("slirp4netns") is None,
    reason="a job's network needs root, bubblewrap and slirp4netns (make setup installs them)",
)

PYTHON = "/usr/bin/python3"
LIMITS = Limits(
    cpus=1.0,
    memory_bytes=256 << 20,
    disk_bytes=16 << 20,
    max_processes=32,
    max_duration_s=20.0,
    network=True,
)
OFFLINE = dataclasses.replace(LIMITS, network=False)
# What a job prints for each address it tried: "connected", or the errno of the failure.
CONNECT = """
import json, socket, sys
def connect(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.settimeout(3)
            s.connect((host, port))
            return "connected: " + s.recv(64).decode()
    except OSError as e:
        return e.errno
"""
HELLO = "hello from outside"


def host_addresses() -> list[dict[str, str]]:
    """The host's addresses, as `ip -j addr` gives them (family, local)."""
    links = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True).stdout)
    return [info for link in links for info in link.get("addr_info", [])]


def primary_ipv4() -> str:
    for info in host_addresses():
        if info["family"] == "inet" and not info["local"].startswith("127."):
            return info["local"]
    pytest.skip("the host has no IPv4 address besides loopback to try reaching")


def global_ipv6() -> list[str]:
    return [
        info["local"]
        for info in host_addresses()
        if info["family"] == "inet6" and info.get("scope") == "global"
    ]


def slirp_processes(*, ours: bool = False) -> set[int]:
    """slirp4netns processes on the host; `ours`: those this process started (its children
    until reaped, zombies included), whatever else runs on the machine."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry.name}/comm").read_text().strip() != "slirp4netns":
                    continue
                status = Path(f"/proc/{entry.name}/status").read_text()
                parent = int(status.split("PPid:", 1)[1].split()[0])
                if not ours or parent == os.getpid():
                    found.add(int(entry.name))
    return found


def in_cgroup(pid: int, cgroup_name: str) -> bool:
    try:
        return f"/{cgroup_name}/" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


@dataclass
class Outside:
    """A server beyond the host: in a network namespace of its own, behind a veth pair whose
    host end (`host_side`) is one more address of the host."""

    address: str
    port: int
    host_side: str


@pytest.fixture
def outside() -> Iterator[Outside]:
    tag = f"{random.randrange(1 << 24):06x}"
    netns, veth = f"c2d-out-{tag}", f"c2do{tag}"
    # A /30 of the benchmarking range (198.18.0.0/15), unlikely to meet another test's.
    base = random.randrange(1 << 15) * 4
    host_side, peer = (
        f"198.{18 + (base >> 16)}.{(base >> 8) & 255}.{(base & 255) + i}" for i in (1, 2)
    )
    server = None
    try:
        for command in (
            f"ip netns add {netns}",
            f"ip link add {veth} type veth peer name peer netns {netns}",
            f"ip addr add {host_side}/30 dev {veth}",
            f"ip link set {veth} up",
            f"ip -n {netns} addr add {peer}/30 dev peer",
            f"ip -n {netns} link set peer up",
            f"ip -n {netns} link set lo up",
        ):
            subprocess.run(command.split(), check=True, capture_output=True)
        code = (
            "import socket, sys\n"
            "s = socket.create_server(('0.0.0.0', 0))\n"
            "print(s.getsockname()[1], flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept()\n"
            f"    c.sendall({HELLO!r}.encode()); c.close()\n"
        )
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", code], stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        port = int(server.stdout.readline())
        yield Outside(peer, port, host_side)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)


@pytest.fixture(scope="module")
def identity() -> SandboxIdentity:
    return SandboxIdentity.new()


@pytest.fixture(scope="module")
def checked(identity: SandboxIdentity) -> Iterator[Sandbox]:
    sandbox = Sandbox(identity.config())
    sandbox.check()
    yield sandbox
    sandbox.close()


@pytest.fixture
async def sandbox(checked: Sandbox) -> AsyncIterator[Sandbox]:
    await checked.sweep()
    yield checked
    assert checked.stray_processes() == [], "a job process outlived its run"
    assert slirp_processes(ours=True) == set(), "a slirp4netns outlived its job"


async def run_code(
    sandbox: Sandbox,
    code: str,
    limits: Limits = LIMITS,
    job_id: str = "net-job",
    cancel: asyncio.Event | None = None,
) -> tuple[SandboxResult, bytes]:
    output = bytearray()

    async def on_output(chunk: bytes) -> None:
        output.extend(chunk)

    spec = SandboxSpec(
        job_id=job_id,
        mounts=[],
        argv=[PYTHON, "-c", textwrap.dedent(code)],
        env={},
        limits=limits,
    )
    result = await sandbox.run(spec, on_output, cancel)
    return result, bytes(output)


def last_json(output: bytes) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith(b"{")]
    assert lines, output
    value = json.loads(lines[-1])
    assert isinstance(value, dict)
    return value


class Servers:
    """TCP servers on the host that count who reached them."""

    def __init__(self) -> None:
        self.sockets: dict[str, socket.socket] = {}

    def add(self, name: str, family: socket.AddressFamily, host: str) -> int:
        server = socket.create_server((host, 0), family=family)
        server.setblocking(False)
        self.sockets[name] = server
        return int(server.getsockname()[1])

    def reached(self) -> list[str]:
        found = []
        for name, server in self.sockets.items():
            with contextlib.suppress(BlockingIOError):
                server.accept()[0].close()
                found.append(name)
        return found

    def close(self) -> None:
        for server in self.sockets.values():
            server.close()


# -- what a job sees -------------------------------------------------------------------------

IP_VIEW = """
import json, subprocess
def ip(*args):
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, check=True).stdout)
print(json.dumps({
    "links": ip("addr"), "routes": ip("route"),
    "resolv": open("/etc/resolv.conf").read(),
}))
"""


async def test_a_network_job_has_tap0_a_default_route_via_slirp_and_its_dns(
    sandbox: Sandbox,
) -> None:
    host = primary_ipv4()
    result, output = await run_code(sandbox, IP_VIEW)
    assert result.outcome is Outcome.OK, output
    seen = last_json(output)
    links = {link["ifname"]: link for link in seen["links"]}
    assert set(links) == {"lo", "tap0"}
    tap = links["tap0"]
    assert "UP" in tap["flags"] and tap["mtu"] == 65520
    v4 = [(a["local"], a["prefixlen"]) for a in tap["addr_info"] if a["family"] == "inet"]
    assert v4 == [("10.0.2.100", 24)]
    routes = seen["routes"]
    assert {"dst": "default", "gateway": "10.0.2.2", "dev": "tap0"}.items() <= routes[0].items()
    unreachable = {r["dst"] for r in routes if r.get("type") == "unreachable"}
    assert host in unreachable
    # A cloud's metadata service lives at 169.254.169.254.
    assert "169.254.0.0/16" in unreachable
    assert seen["resolv"] == "nameserver 10.0.2.3\n"


async def test_a_job_without_the_network_has_only_loopback_and_no_route(
    sandbox: Sandbox,
) -> None:
    result, output = await run_code(
        sandbox,
        CONNECT
        + """
import os, subprocess
print(json.dumps({
    "interfaces": [name for _, name in socket.if_nameindex()],
    "routes": json.loads(subprocess.run(["ip", "-j", "route"], capture_output=True).stdout),
    "gateway": connect("10.0.2.2", 80),
    "resolv": os.path.exists("/etc/resolv.conf"),
}))
""",
        OFFLINE,
    )
    assert result.outcome is Outcome.OK, output
    assert last_json(output) == {
        "interfaces": ["lo"],
        "routes": [],
        "gateway": errno.ENETUNREACH,
        "resolv": False,
    }


# -- what a job reaches ----------------------------------------------------------------------


async def test_a_network_job_reaches_a_server_beyond_the_host(
    sandbox: Sandbox, outside: Outside
) -> None:
    result, output = await run_code(
        sandbox,
        CONNECT + f"print(json.dumps({{'outside': connect({outside.address!r}, {outside.port})}}))",
    )
    assert result.outcome is Outcome.OK, output
    assert last_json(output) == {"outside": f"connected: {HELLO}"}


def dns_query(name: bytes) -> bytes:
    header = struct.pack(">HHHHHH", 0xC2D0, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(part)]) + part for part in name.split(b"."))
    return header + labels + b"\0" + struct.pack(">HH", 1, 1)


def host_resolver_answers(query: bytes) -> bool:
    servers = [
        line.split()[1]
        for line in Path("/etc/resolv.conf").read_text().splitlines()
        if line.startswith("nameserver") and len(line.split()) > 1
    ]
    for server in servers:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            with contextlib.suppress(OSError):
                s.sendto(query, (server, 53))
                if s.recv(512)[:2] == query[:2]:
                    return True
    return False


async def test_dns_queries_are_relayed_by_slirp(sandbox: Sandbox) -> None:
    query = dns_query(b"example.com")
    if not host_resolver_answers(query):
        pytest.skip("the host's own resolver does not answer here: nothing to relay to")
    result, output = await run_code(
        sandbox,
        f"""
        import json, socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto({query!r}, ("10.0.2.3", 53))
            answer = s.recv(512)
        print(json.dumps({{"same_id": answer[:2] == {query[:2]!r}, "reply": answer[2] >> 7}}))
        """,
    )
    assert result.outcome is Outcome.OK, output
    assert last_json(output) == {"same_id": True, "reply": 1}


async def test_the_host_loopback_and_services_on_all_addresses_are_unreachable(
    sandbox: Sandbox, outside: Outside
) -> None:
    host = primary_ipv4()
    servers = Servers()
    try:
        loopback = servers.add("loopback", socket.AF_INET, "127.0.0.1")
        anywhere = servers.add("anywhere", socket.AF_INET, "0.0.0.0")
        targets = [
            ("gateway to loopback", "10.0.2.2", loopback),
            ("gateway to anywhere", "10.0.2.2", anywhere),
            ("host address", host, anywhere),
            # Added by the fixture after the engine started: read again at the job's start.
            ("veth host end", outside.host_side, anywhere),
            ("own loopback", "127.0.0.1", loopback),
        ]
        if socket.has_ipv6 and global_ipv6():
            anywhere6 = servers.add("anywhere6", socket.AF_INET6, "::")
            targets += [(f"host {a}", a, anywhere6) for a in global_ipv6()]
        probes = ", ".join(f"{n!r}: connect({h!r}, {p})" for n, h, p in targets)
        result, output = await run_code(
            sandbox,
            CONNECT
            + f"""
import subprocess
# The job cannot lift the block: no CAP_NET_ADMIN in its namespace.
lift = subprocess.run(["ip", "route", "del", "unreachable", "{host}/32"], capture_output=True)
print(json.dumps({{{probes}, "lift": lift.returncode,
                  "outside": connect({outside.address!r}, {outside.port})}}))
""",
        )
        reached = servers.reached()
    finally:
        servers.close()
    assert result.outcome is Outcome.OK, output
    seen = last_json(output)
    assert reached == [], seen
    # The path out works: what fails below fails by the filter, not for want of a network.
    assert seen.pop("outside") == f"connected: {HELLO}"
    assert seen.pop("lift") != 0
    assert seen.pop("own loopback") == errno.ECONNREFUSED  # its own, empty
    for name in ("gateway to loopback", "gateway to anywhere"):
        # slirp4netns refuses 10.0.2.2 (--disable-host-loopback), with an ICMP "network
        # unreachable" of its own: the route to it is there, on tap0.
        assert seen.pop(name) == errno.ENETUNREACH, name
    assert seen == {name: errno.EHOSTUNREACH for name in seen}, seen


# -- what is left ----------------------------------------------------------------------------


async def test_no_slirp4netns_outlives_its_job_however_it_ends(
    sandbox: Sandbox, identity: SandboxIdentity
) -> None:
    ok, _ = await run_code(sandbox, "print('done')", job_id="net-ok")
    assert ok.outcome is Outcome.OK
    assert slirp_processes(ours=True) == set()

    timed_out, _ = await run_code(
        sandbox,
        "import time; time.sleep(60)",
        dataclasses.replace(LIMITS, max_duration_s=1.0),
        job_id="net-timeout",
    )
    assert timed_out.outcome is Outcome.TIMED_OUT
    assert slirp_processes(ours=True) == set()

    running = asyncio.ensure_future(
        run_code(
            sandbox, "print('up', flush=True); import time; time.sleep(60)", job_id="net-cancel"
        )
    )
    async with asyncio.timeout(10):
        # The job's slirp4netns runs in the job's cgroups, counted and ended with it.
        while not [p for p in slirp_processes(ours=True) if in_cgroup(p, identity.cgroup_name)]:
            await asyncio.sleep(0.02)
    assert sandbox.cancel("net-cancel")
    cancelled, _ = await running
    assert cancelled.outcome is Outcome.CANCELLED
    assert slirp_processes(ours=True) == set()


KILLED_ENGINE = """
import asyncio, json, sys
from pathlib import Path
import structlog
from operator_engine.sandbox import Limits, Sandbox, SandboxConfig, SandboxSpec

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: the job's

async def main():
    fields = json.loads(sys.argv[1])
    fields["stage_root"] = Path(fields["stage_root"])
    sandbox = Sandbox(SandboxConfig(**fields))
    sandbox.check()
    await sandbox.sweep()

    async def on_output(chunk):
        sys.stdout.write(chunk.decode()); sys.stdout.flush()

    code = "print('running', flush=True); import time; time.sleep(60)"
    limits = Limits(1.0, 128 << 20, 1 << 20, 8, 60.0, network=True)
    await sandbox.run(SandboxSpec("killed", [], ["/usr/bin/python3", "-c", code], {}, limits),
                      on_output)

asyncio.run(main())
"""


async def test_no_slirp4netns_outlives_a_killed_engine(tmp_path: Path) -> None:
    identity = SandboxIdentity.new()
    config = identity.config()
    engine = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_ENGINE,
            json.dumps(
                {
                    "uid_base": config.uid_base,
                    "uid_count": config.uid_count,
                    "stage_root": str(config.stage_root),
                    "cgroup_name": config.cgroup_name,
                }
            ),
        ],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert engine.stdout is not None
        assert await asyncio.to_thread(engine.stdout.readline) == b"running\n"
        ours = [p for p in slirp_processes() if in_cgroup(p, config.cgroup_name)]
        assert len(ours) == 1
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        deadline = time.monotonic() + 5
        # Its exit pipe closed with the engine: slirp4netns ends by itself.
        while set(ours) & slirp_processes() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not set(ours) & slirp_processes()
    finally:
        engine.kill()
        engine.wait()
        await identity.sweep()  # what the next engine does: the job's cgroups, mounts
    left = Sandbox(config)
    assert left.stray_processes() == []


# -- refusing rather than running unfiltered -------------------------------------------------


async def test_the_engine_refuses_the_network_without_slirp4netns() -> None:
    # Stands for a node without the package: the tool's name is a SandboxConfig knob.
    config = SandboxIdentity.new().config()
    missing = Sandbox(dataclasses.replace(config, slirp4netns="/nonexistent/slirp4netns"))
    missing.check()
    try:
        with pytest.raises(SandboxUnavailable, match="slirp4netns is not installed"):
            await missing.check_network()
    finally:
        missing.close()


async def test_a_job_whose_network_cannot_start_does_not_run() -> None:
    # A "slirp4netns" that exits at once: the job's network never comes up.
    broken = Sandbox(dataclasses.replace(SandboxIdentity.new().config(), slirp4netns="/bin/false"))
    broken.check()
    try:
        with pytest.raises(SandboxUnavailable, match="filtered network does not start"):
            await broken.check_network()
        result, output = await run_code(broken, "print('ran')")
        assert result.outcome is Outcome.SANDBOX_FAILED
        assert "network" in result.detail
        assert output == b""
        assert broken.stray_processes() == []
    finally:
        broken.close()


# -- through the engine's runner -------------------------------------------------------------

JOB_PROBE = """
import json, socket
params = json.load(open("/data/inputs/algoCustomData.json"))
def connect(host, port):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            return "connected: " + s.recv(64).decode()
    except OSError as e:
        return e.errno
print(json.dumps({
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "outside": connect(params["outside"], params["port"]),
    "host": connect(params["host"], params["host_port"]),
}))
"""


def engine(tmp_path: Path, identity: SandboxIdentity) -> AbstractAsyncContextManager[Runner]:
    environments = (
        EnvironmentSpec(name="online", network_allowed=True),
        EnvironmentSpec(name="offline"),
    )
    return restarted_engine(engine_config(tmp_path, identity, environments))


async def run_through(
    runner: Runner, tmp_path: Path, environment: str, allow_network: bool, params: dict[str, object]
) -> tuple[job_pb2.Job, dict[str, object]]:
    data = tmp_path / "data" / "dataset.csv"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("a,b\n1,2\n")
    data.chmod(0o644)
    code = JOB_PROBE.encode()
    job_id = os.urandom(16).hex()
    spec = engine_pb2.JobSpec(
        job_id=job_id,
        owner="0x" + "1" * 40,
        datasets=[
            engine_pb2.DatasetInput(
                id="ab" * 32, files=[engine_pb2.DatasetFileSource(path=str(data))]
            )
        ],
        algorithm=engine_pb2.AlgorithmInput(
            code=code,
            code_sha256=hashlib.sha256(code).hexdigest(),
            entrypoint="python3 $ALGO",
        ),
        parameters_json=json.dumps(params),
        environment=environment,
        allow_network=allow_network,
    )
    await runner.submit(spec)
    async with asyncio.timeout(60):
        final = [job async for job in runner.watch(job_id)][-1]
    log = runner.get(job_id).log_path.read_bytes()
    assert final.state == job_pb2.Job.STATE_SUCCEEDED, (final.message, log)
    return final, last_json(log)


async def test_the_runner_gives_the_network_only_when_job_and_environment_allow_it(
    tmp_path: Path, outside: Outside
) -> None:
    identity = SandboxIdentity.new()
    servers = Servers()
    host_port = servers.add("anywhere", socket.AF_INET, "0.0.0.0")
    params = {
        "outside": outside.address,
        "port": outside.port,
        "host": primary_ipv4(),
        "host_port": host_port,
    }
    try:
        async with engine(tmp_path, identity) as runner:
            _, online = await run_through(runner, tmp_path, "online", True, params)
            _, refused = await run_through(runner, tmp_path, "online", False, params)
            _, offline = await run_through(runner, tmp_path, "offline", True, params)
        reached = servers.reached()
    finally:
        servers.close()
    assert online == {
        "interfaces": ["lo", "tap0"],
        "outside": f"connected: {HELLO}",
        "host": errno.EHOSTUNREACH,
    }
    for seen in (refused, offline):
        assert seen == {
            "interfaces": ["lo"],
            "outside": errno.ENETUNREACH,
            "host": errno.ENETUNREACH,
        }
    assert reached == []
