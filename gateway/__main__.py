"""`python -m gateway --listen 127.0.0.1:8080 --provider unix:/path/or/host:port`.

Flags override the environment (C2D_GATEWAY_LISTEN, C2D_PROVIDER_ADDRESS), which overrides the
embedded node's defaults."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from gateway.app import serve
from gateway.config import GatewayConfig
from mesh import config as mesh_config
from mesh.logging import configure_logging
from mesh.server import run_service


def main(argv: Sequence[str] | None = None) -> None:
    defaults = mesh_config.load("gateway", GatewayConfig.from_env)
    parser = argparse.ArgumentParser(
        prog="python -m gateway", description="The REST edge of a c2d Provider."
    )
    parser.add_argument(
        "--listen",
        default=defaults.listen,
        help=f"host:port or unix:/path to serve HTTP on (default {defaults.listen})",
    )
    parser.add_argument(
        "--provider",
        default=defaults.provider_address,
        help=f"the Provider's gRPC address (default {defaults.provider_address})",
    )
    parser.add_argument(
        "--call-timeout",
        type=float,
        default=defaults.call_timeout_seconds,
        help="deadline of each unary call to the Provider, in seconds",
    )
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        defaults,
        listen=args.listen,
        provider_address=args.provider,
        call_timeout_seconds=args.call_timeout,
    )
    configure_logging("gateway")
    run_service(serve(config))


if __name__ == "__main__":
    main()
