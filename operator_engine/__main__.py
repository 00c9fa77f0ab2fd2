"""`python -m operator_engine`: runs the Operator Engine until SIGTERM."""

from __future__ import annotations

import sys

import structlog

from mesh import config as mesh_config
from mesh.logging import configure_logging
from mesh.server import run_service, run_until_signalled
from operator_engine.config import EngineConfig
from operator_engine.runner import Runner
from operator_engine.sandbox import SandboxUnavailable
from operator_engine.server import build


async def main() -> int:
    configure_logging("operator_engine")
    log = structlog.get_logger()
    config = mesh_config.load("operator_engine", EngineConfig.from_env)
    try:
        server, runner = await build(config)
    except (SandboxUnavailable, ValueError) as error:
        log.error("the backend cannot run jobs as configured; refusing to start", reason=str(error))
        print(f"operator_engine: refusing to start: {error}", file=sys.stderr)
        return 2
    await server.start()
    await run_until_signalled(server, before_stop=runner.close)
    if isinstance(runner, Runner):
        runner.sandbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_service(main()))
