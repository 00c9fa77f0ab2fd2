"""Channels for the internal hops. Every outbound call carries a deadline; these are the
defaults."""

from __future__ import annotations

import grpc

from mesh.server import MAX_MESSAGE_BYTES
from mesh.tls import TlsConfig

UNARY_TIMEOUT = 30.0

_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Internal hops reconnect fast after a service restarts.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def open_channel(
    target: str, tls: TlsConfig | None = None, *, server_name: str = ""
) -> grpc.aio.Channel:
    """A channel to `target` ("unix:/path" or "host:port"). With `tls`, a TCP target gets
    mutual TLS, and the server's certificate must name `server_name` (default: the target's
    host); a Unix socket stays plaintext, as servers bind them."""
    if tls is None or target.startswith("unix:"):
        return grpc.aio.insecure_channel(target, options=_OPTIONS)
    options = list(_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options)
