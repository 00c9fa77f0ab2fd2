"""Fixtures shared by the suite: a whole mesh in this process (each service a real gRPC
server on its own socket, talking to the others only over gRPC), and keys."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from gateway.app import BackgroundServer, create_app, run_in_background
from mesh.server import Server
from operator_engine.config import EngineConfig, EnvironmentSpec
from operator_engine.mounts import mounted_under
from operator_engine.runner import Runner
from operator_engine.sandbox import Sandbox, SandboxConfig
from operator_engine.server import build as build_engine
from operator_service.config import OperatorConfig
from operator_service.server import OperatorService
from operator_service.server import build as build_operator
from provider.config import ProviderConfig
from provider.server import build as build_provider
from sdk.client import Client
from sdk.keys import Key
from tests.pods.http_source import HttpSource, running_http_source
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 (fixtures for every test)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("bwrap") is None,
    reason="the local sandbox needs root and bubblewrap (make setup installs it)",
)


@dataclass(frozen=True)
class SandboxIdentity:
    """Cgroups, job uids and a staging root of a test engine's own, so that test engines and
    any node running on this machine never meet (an engine sweeps what it thinks it left)."""

    tag: str

    @classmethod
    def new(cls) -> SandboxIdentity:
        return cls(uuid.uuid4().hex[:8])

    @property
    def uid_base(self) -> int:
        return 1_700_000_000 + int(self.tag, 16) % 10_000 * 64

    @property
    def uids(self) -> range:
        return range(self.uid_base, self.uid_base + 64)

    @property
    def stage_root(self) -> Path:
        return Path(f"/run/c2d-test-{self.tag}")

    @property
    def cgroup_name(self) -> str:
        return f"c2d-test-{self.tag}"

    def config(self) -> SandboxConfig:
        return SandboxConfig(
            uid_base=self.uid_base,
            uid_count=len(self.uids),
            stage_root=self.stage_root,
            cgroup_name=self.cgroup_name,
        )

    async def sweep(self) -> None:
        """Does what the next engine would after one was killed: kills its processes, detaches
        its staging mounts, removes its cgroups."""
        sandbox = Sandbox(self.config())
        await sandbox.sweep()
        sandbox.close()

    def env(self) -> dict[str, str]:
        """The same, for an engine started as a process."""
        return {
            "C2D_SANDBOX_CGROUP": self.cgroup_name,
            "C2D_SANDBOX_STAGE_ROOT": str(self.stage_root),
            "C2D_SANDBOX_UID_BASE": str(self.uid_base),
        }


def new_key() -> Key:
    account = Account.create()
    return Key(address=account.address, private_key=bytes(account.key))


@dataclass
class LocalMesh:
    home: Path
    data_root: Path
    provider_address: str
    operator_address: str
    engine_address: str
    owner: Key
    # Processes left running as a job uid (parked sandboxes aside): none may outlive a job.
    stray_processes: Callable[[], list[int]]

    def client(self, key: Key) -> Client:
        return Client(self.provider_address, key)

    def data_file(self, name: str, content: bytes) -> Path:
        path = self.data_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o644)
        return path


TEST_ENVIRONMENTS = (
    EnvironmentSpec(),
    EnvironmentSpec(
        name="small",
        memory_bytes=128 << 20,
        disk_bytes=64 << 20,
        max_processes=32,
        max_duration_s=5,
        max_concurrent_jobs=1,
        max_output_files=20,
    ),
)


def engine_config(
    home: Path,
    sandbox: SandboxIdentity,
    environments: tuple[EnvironmentSpec, ...] = (EnvironmentSpec(),),
    *,
    data_root: Path | None = None,
    storage_url: str | None = None,
) -> EngineConfig:
    """An engine's configuration with its state under `home` (socket in `home/run`) and the
    sandbox identity's uids, cgroups and staging root; results in `storage_url` (default
    `home/results`)."""
    return EngineConfig(
        listen=f"unix:{home / 'run' / 'engine.sock'}",
        workspace_root=home / "engine" / "jobs",
        data_root=data_root or home / "data",
        storage_url=storage_url or str(home / "results"),
        environments=environments,
        sandbox_uid_base=sandbox.uid_base,
        sandbox_stage_root=sandbox.stage_root,
        sandbox_cgroup_name=sandbox.cgroup_name,
    )


def operator_config(
    home: Path, engine_address: str, storage_url: str, *, lease_s: float, **settings: Any
) -> OperatorConfig:
    """An Operator Service's configuration in front of the engine at `engine_address`: its
    socket in `home/run`, its registry in `home/operator`; `settings` replace fields."""
    return dataclasses.replace(
        OperatorConfig(
            listen=f"unix:{home / 'run' / 'operator.sock'}",
            engine_address=engine_address,
            database=home / "operator" / "operator.db",
            storage_url=storage_url,
            engine_lease_s=lease_s,
        ),
        **settings,
    )


@contextlib.asynccontextmanager
async def engine_and_operator(
    home: Path,
    config: EngineConfig,
    sandbox: SandboxIdentity,
    *,
    lease_s: float,
    **operator_settings: Any,
) -> AsyncIterator[tuple[Server, Runner, OperatorService]]:
    """An engine on `config` and an Operator Service in front of it (`operator_config`, with
    `operator_settings`), started in order and stopped again afterwards; the engine must then
    have left no job disk mounted under `home` and no staging root."""
    engine_server, runner = await build_engine(config)
    await engine_server.start()
    operator = await build_operator(
        operator_config(
            home, engine_server.address, config.storage_url, lease_s=lease_s, **operator_settings
        )
    )
    await operator.start()
    try:
        yield engine_server, runner, operator
    finally:
        await operator.tracker.close()
        await operator.server.stop(0.5)
        await operator.close()
        await runner.close()
        await engine_server.stop(0.5)
        runner.sandbox.close()
        assert mounted_under(home) == [], "the engine left a job disk mounted"
        # Never removed by force: a mount left there could be a dataset's.
        assert not sandbox.stage_root.exists(), "the engine left its staging root"


@pytest.fixture
async def local_mesh(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    """Engine, Operator Service and Provider, started in order on fresh state."""
    async with start_local_mesh(tmp_path) as mesh:
        yield mesh


@contextlib.asynccontextmanager
async def start_local_mesh(
    tmp_path: Path,
    *,
    storage_url: str | None = None,
    environments: tuple[EnvironmentSpec, ...] = TEST_ENVIRONMENTS,
    **operator_settings: Any,
) -> AsyncIterator[LocalMesh]:
    """What `local_mesh` starts, with results in `storage_url` (default: on local disk under
    the node's home), the engine's `environments`, and `operator_settings` replacing fields of
    the Operator Service's configuration. An s3:// URL reaches S3 with the C2D_S3_* settings
    of the environment."""
    home = tmp_path / "home"
    data_root = tmp_path / "data"
    data_root.mkdir(parents=True)
    owner = new_key()
    sandbox = SandboxIdentity.new()
    config = engine_config(
        home, sandbox, environments, data_root=data_root, storage_url=storage_url
    )
    async with engine_and_operator(
        home, config, sandbox, lease_s=5, **operator_settings
    ) as started:
        engine_server, runner, operator = started
        provider = await build_provider(
            ProviderConfig(
                listen="127.0.0.1:0",
                operator_address=operator.server.address,
                database=home / "provider" / "provider.db",
                data_root=data_root,
                owners=frozenset({owner.address}),
            )
        )
        await provider.server.start()
        try:
            yield LocalMesh(
                home=home,
                data_root=data_root,
                provider_address=provider.server.address,
                operator_address=operator.server.address,
                engine_address=engine_server.address,
                owner=owner,
                stray_processes=runner.sandbox.stray_processes,
            )
        finally:
            await provider.server.stop(0.5)
            await provider.close()


@dataclass
class Rest:
    """A node (`local_mesh`, or another) behind the REST edge, and an HTTP client for it."""

    mesh: LocalMesh
    gateway: BackgroundServer
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def rest_edge(mesh: LocalMesh) -> AsyncIterator[Rest]:
    """The REST edge in front of `mesh`'s Provider, on 127.0.0.1, and a client for it."""
    gateway = await run_in_background(create_app(mesh.provider_address), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            yield Rest(mesh, gateway, http)
    finally:
        await gateway.stop()


@pytest.fixture
async def rest(local_mesh: LocalMesh) -> AsyncIterator[Rest]:
    async with rest_edge(local_mesh) as edge:
        yield edge


def write_key(path: Path, key: Key) -> None:
    path.write_text(json.dumps({"address": key.address, "private_key": key.private_key.hex()}))
    path.chmod(0o600)


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A 127.0.0.1 TCP server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
def http_source() -> Iterator[HttpSource]:
    """A threaded HTTP file server on 127.0.0.1 (tests.pods.http_source) for remote datasets."""
    with running_http_source() as source:
        yield source
