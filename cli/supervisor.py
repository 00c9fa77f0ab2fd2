"""`c2d up`: one child process per service plus the REST edge, started in order, watched,
and stopped together."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh import config as mesh_config
from mesh.channels import open_channel

STOP_SECONDS = 8.0
# A child that keeps crashing is not restarted forever: this many restarts a minute at most.
MAX_RESTARTS_PER_MINUTE = 5


def free_address() -> str:
    """A loopback address with a port nothing listens on now, for a node that must not meet
    another one on this machine (the demo, tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Mesh:
    """Where the parts of a running mesh listen."""

    home: Path
    provider: str
    gateway: str
    operator: str
    engine: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def defaults(cls, home: Path, owner: str, *, provider: str = "", gateway: str = "") -> Mesh:
        run = home / "run"
        env = {
            "C2D_HOME": str(home),
            "C2D_OWNERS": os.environ.get("C2D_OWNERS", owner),
            "C2D_OPERATOR_ADDRESS": f"unix:{run / 'operator.sock'}",
            "C2D_ENGINE_ADDRESS": f"unix:{run / 'engine.sock'}",
        }
        mesh = cls(
            home=home,
            provider=provider or os.environ.get("C2D_PROVIDER_LISTEN", mesh_config.PROVIDER_LISTEN),
            gateway=gateway or os.environ.get("C2D_GATEWAY_LISTEN", mesh_config.GATEWAY_LISTEN),
            operator=env["C2D_OPERATOR_ADDRESS"],
            engine=env["C2D_ENGINE_ADDRESS"],
            env=env,
        )
        mesh.env["C2D_PROVIDER_LISTEN"] = mesh.provider
        mesh.env["C2D_PROVIDER_ADDRESS"] = mesh.provider
        mesh.env["C2D_GATEWAY_LISTEN"] = mesh.gateway
        return mesh


async def _healthy(target: str, deadline: float) -> bool:
    channel = open_channel(target)
    try:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
        return False
    finally:
        await channel.close()


async def _http_ready(address: str, deadline: float) -> bool:
    host, _, port = address.rpartition(":")
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
            await writer.wait_closed()
            return True
        except OSError:
            await asyncio.sleep(0.05)
    return False


class Supervisor:
    def __init__(self, mesh: Mesh, *, log_dir: Path | None = None) -> None:
        self.mesh = mesh
        self.children: list[tuple[str, asyncio.subprocess.Process]] = []
        self.log_dir = log_dir
        self._restarts: dict[str, list[float]] = {}

    async def _spawn(self, name: str) -> asyncio.subprocess.Process:
        """Runs the part `name` as `python -m name`."""
        env = {**os.environ, **self.mesh.env, "C2D_SUPERVISOR_PID": str(os.getpid())}
        stderr: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                name,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            # The child writes to its own copy; ours would leak one descriptor per (re)start.
            if stderr is not None:
                stderr.close()
        self.children.append((name, process))
        return process

    def _parts(self) -> list[tuple[str, str]]:
        """Each part and the address it is ready at, in start order (each calls the one
        before it)."""
        return [
            ("operator_engine", self.mesh.engine),
            ("operator_service", self.mesh.operator),
            ("provider", self.mesh.provider),
            ("gateway", self.mesh.gateway),
        ]

    async def _start_part(self, name: str, address: str, startup_s: float) -> bool:
        process = await self._spawn(name)
        deadline = time.monotonic() + startup_s
        probe = _http_ready(address, deadline) if name == "gateway" else _healthy(address, deadline)
        ready = asyncio.ensure_future(probe)
        exited = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if ready not in done:
            ready.cancel()
            return False
        return bool(ready.result())

    async def start(self, startup_s: float = 30.0) -> None:
        """Starts engine, operator service, provider and gateway, each after the one it
        calls is healthy. Raises RuntimeError naming the part that did not come up."""
        mesh_config.ensure_private_dir(self.mesh.home)
        mesh_config.ensure_private_dir(self.mesh.home / "run")
        for name, address in self._parts():
            if not await self._start_part(name, address, startup_s):
                await self.stop()
                raise RuntimeError(f"{name} did not start (see its log above)")

    async def restart(self, name: str, startup_s: float = 30.0) -> bool:
        """Starts a part again after it died; False when it will not come up, or has
        crashed too often in the last minute."""
        now = time.monotonic()
        recent = [t for t in self._restarts.get(name, []) if now - t < 60]
        if len(recent) >= MAX_RESTARTS_PER_MINUTE:
            return False
        self._restarts[name] = [*recent, now]
        self.children = [(n, p) for n, p in self.children if n != name]
        address = dict(self._parts())[name]
        return await self._start_part(name, address, startup_s)

    def process(self, name: str) -> asyncio.subprocess.Process:
        return next(p for n, p in self.children if n == name)

    async def wait(self) -> str:
        """Returns the name of the first child that exits."""
        waits = {asyncio.ensure_future(p.wait()): name for name, p in self.children}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self) -> None:
        """SIGTERM to every child, front to back; SIGKILL whatever is left after the grace."""
        for _, process in reversed(self.children):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for _, process in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(process.wait(), remaining)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.children.clear()
