"""`python -m operator_service`: runs the Operator Service until SIGTERM."""

from __future__ import annotations

import sys

from mesh import config as mesh_config
from mesh.logging import configure_logging
from mesh.server import run_service, run_until_signalled
from operator_service.config import OperatorConfig
from operator_service.server import build


async def main() -> int:
    configure_logging("operator_service")
    service = await build(mesh_config.load("operator_service", OperatorConfig.from_env))
    await service.start()
    await run_until_signalled(
        service.server, before_stop=service.tracker.close, on_stop=service.close
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_service(main()))
