"""What the end-to-end tests share: the whole node behind the REST edge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from gateway.app import BackgroundServer, create_app, run_in_background
from tests.conftest import LocalMesh


@dataclass
class Rest:
    mesh: LocalMesh
    gateway: BackgroundServer
    http: httpx.AsyncClient


@pytest.fixture
async def rest(local_mesh: LocalMesh) -> AsyncIterator[Rest]:
    """The node of `local_mesh` behind a gateway on an ephemeral port, and a client for it."""
    gateway = await run_in_background(create_app(local_mesh.provider_address), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            yield Rest(local_mesh, gateway, http)
    finally:
        await gateway.stop()
