"""A whole mesh whose internal hops run over TCP on 127.0.0.1 with mutual TLS, as between
machines in Kubernetes: the real Operator Engine (with its sandbox), Operator Service and
Provider, each from its own `build`, with certificates `c2d certs` makes."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.certs import DEFAULT_NAMES, write_certs
from mesh.tls import TlsConfig
from operator_service.config import OperatorConfig
from provider.config import ProviderConfig
from provider.server import build as build_provider
from tests.conftest import (
    LocalMesh,
    SandboxIdentity,
    engine_and_operator,
    engine_config,
    new_key,
    operator_config,
)


@dataclass(frozen=True)
class Certs:
    """The files `c2d certs` wrote to `folder`."""

    folder: Path

    @classmethod
    def make(cls, folder: Path, names: tuple[str, ...] = DEFAULT_NAMES) -> Certs:
        write_certs(folder, names)
        return cls(folder)

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def tls(
        self,
        name: str,
        allowed: tuple[str, ...] = (),
        *,
        health_listen: str = "",
        ca: Path | None = None,
    ) -> TlsConfig:
        """`name`'s key and certificate; trusting this CA, or `ca` when given."""
        return TlsConfig.load(
            self.folder / f"{name}.crt",
            self.folder / f"{name}.key",
            ca or self.ca,
            frozenset(allowed),
            health_listen,
        )


@dataclass
class TlsMesh:
    node: LocalMesh
    certs: Certs
    # The engine's plaintext port with the health service alone.
    engine_health_address: str
    operator: OperatorConfig


@contextlib.asynccontextmanager
async def tls_mesh(tmp_path: Path) -> AsyncIterator[TlsMesh]:
    """Engine, Operator Service and Provider, started in order: the engine takes only the
    operator service's certificate, the Operator Service only the provider's; the Provider's
    own port stays plaintext."""
    certs = Certs.make(tmp_path / "certs")
    home = tmp_path / "home"
    data_root = tmp_path / "data"
    data_root.mkdir(parents=True)
    sandbox = SandboxIdentity.new()
    config = dataclasses.replace(
        engine_config(home, sandbox, data_root=data_root),
        listen="127.0.0.1:0",
        tls=certs.tls("engine", ("operator-service",), health_listen="127.0.0.1:0"),
    )
    over_tls: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tls": certs.tls("operator-service", ("provider",)),
    }
    async with engine_and_operator(home, config, sandbox, lease_s=5, **over_tls) as started:
        engine_server, runner, operator = started
        owner = new_key()
        provider = await build_provider(
            ProviderConfig(
                listen="127.0.0.1:0",
                operator_address=operator.server.address,
                database=home / "provider" / "provider.db",
                data_root=data_root,
                owners=frozenset({owner.address}),
                tls=certs.tls("provider"),
            )
        )
        await provider.server.start()
        try:
            yield TlsMesh(
                node=LocalMesh(
                    home=home,
                    data_root=data_root,
                    provider_address=provider.server.address,
                    operator_address=operator.server.address,
                    engine_address=engine_server.address,
                    owner=owner,
                    stray_processes=runner.sandbox.stray_processes,
                ),
                certs=certs,
                engine_health_address=engine_server.health_address,
                # What the Operator Service runs with, for a second one beside it.
                operator=operator_config(
                    home, engine_server.address, config.storage_url, lease_s=5, **over_tls
                ),
            )
        finally:
            await provider.server.stop(0.5)
            await provider.close()
