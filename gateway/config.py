"""The gateway's configuration, from the environment (flags of `python -m gateway` override it)."""

from __future__ import annotations

from dataclasses import dataclass

from mesh import config as mesh_config


@dataclass(frozen=True)
class GatewayConfig:
    # Where the REST edge listens: "host:port" or "unix:/path".
    listen: str = mesh_config.GATEWAY_LISTEN
    # The Provider's gRPC address: "host:port" or "unix:/path".
    provider_address: str = mesh_config.PROVIDER_LISTEN
    # The deadline of every unary call to the Provider.
    call_timeout_seconds: float = 30.0
    # A comment line is sent on an event stream after this long without an event, so that
    # proxies and clients do not take a quiet job for a dead connection.
    keepalive_seconds: float = 15.0

    @classmethod
    def from_env(cls) -> GatewayConfig:
        return cls(
            listen=mesh_config.env_str("C2D_GATEWAY_LISTEN", mesh_config.GATEWAY_LISTEN),
            provider_address=mesh_config.provider_address(),
            call_timeout_seconds=mesh_config.env_float("C2D_GATEWAY_CALL_TIMEOUT", 30.0),
            keepalive_seconds=mesh_config.env_float("C2D_GATEWAY_KEEPALIVE", 15.0),
        )
