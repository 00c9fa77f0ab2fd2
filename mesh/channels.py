"""Channels for the internal hops. Every outbound call carries a deadline; these are the
defaults."""

from __future__ import annotations

import grpc

from mesh.server import MAX_MESSAGE_BYTES

UNARY_TIMEOUT = 30.0

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Internal hops reconnect fast after a service restarts.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def open_channel(target: str) -> grpc.aio.Channel:
    """A channel to `target` ("unix:/path" or "host:port")."""
    return grpc.aio.insecure_channel(target, options=_OPTIONS)
