"""`python -m provider`: runs the Provider until SIGTERM."""

from __future__ import annotations

import sys

import structlog

from mesh import config as mesh_config
from mesh.logging import configure_logging
from mesh.server import run_service, run_until_signalled
from provider.config import ProviderConfig
from provider.server import build


async def main() -> int:
    configure_logging("provider")
    config = mesh_config.load("provider", ProviderConfig.from_env)
    if not config.owners:
        structlog.get_logger().warning(
            "no data owners configured (C2D_OWNERS): nobody can publish datasets"
        )
    provider = await build(config)
    await provider.server.start()
    await run_until_signalled(provider.server, on_stop=provider.close)
    return 0


if __name__ == "__main__":
    sys.exit(run_service(main()))
