"""Mutual TLS for the internal hops (Provider -> Operator Service -> Operator Engine) when they
go over TCP, as between machines in Kubernetes. Unix sockets stay plaintext: an owner-only
socket already lets no one else in.

`TlsConfig` owns one service's key, certificate chain and trusted CA, read once at start, and
the identities allowed to call it. An identity is a DNS name in the caller's certificate's
subjectAltName (the certificate's common name only when it has no DNS name), such as
`operator-service`: a certificate not signed by the CA never completes the handshake, and a
valid certificate of a service not allowed to call gets PERMISSION_DENIED (PEER_NOT_ALLOWED).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.errors import PermissionDenied, Unauthenticated

log = structlog.get_logger()

CERT_VAR = "C2D_TLS_CERT"
KEY_VAR = "C2D_TLS_KEY"
CA_VAR = "C2D_TLS_CA"
ALLOWED_VAR = "C2D_TLS_ALLOWED_CLIENTS"
HEALTH_VAR = "C2D_HEALTH_LISTEN"
# `c2d certs` puts this name in every certificate so that they all work on loopback: as an
# allowed client it would let any service in.
_SHARED_NAMES = frozenset({"localhost"})


@dataclass(frozen=True)
class TlsConfig:
    """One service's TLS material (PEM, read once) and who may call it."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    # Identities (DNS names) whose certificates may call this service; empty for a service
    # that only calls out (the Provider, whose own port stays plaintext).
    allowed_clients: frozenset[str]
    # A plaintext port that serves the standard health service and nothing else, for
    # probes that cannot do TLS (Kubernetes' gRPC probes); "" for none.
    health_listen: str = ""
    cert_pem: bytes = field(default=b"", repr=False)
    key_pem: bytes = field(default=b"", repr=False)
    ca_pem: bytes = field(default=b"", repr=False)

    @classmethod
    def load(
        cls,
        cert: Path,
        key: Path,
        ca: Path,
        allowed_clients: frozenset[str] = frozenset(),
        health_listen: str = "",
    ) -> TlsConfig:
        """Reads and checks the three files; a ValueError names the variable at fault."""
        cert_pem = _read(CERT_VAR, cert)
        key_pem = _read(KEY_VAR, key)
        ca_pem = _read(CA_VAR, ca)
        chain = _certificates(CERT_VAR, cert, cert_pem)
        _certificates(CA_VAR, ca, ca_pem)
        try:
            private_key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{KEY_VAR}: {key} is not an unencrypted PEM private key") from error
        if private_key.public_key() != chain[0].public_key():
            raise ValueError(f"{KEY_VAR}: {key} is not the key of the certificate in {cert}")
        shared = allowed_clients & _SHARED_NAMES
        if shared:
            raise ValueError(
                f"{ALLOWED_VAR}: {', '.join(sorted(shared))} is in every service's "
                "certificate; name the services that may call instead"
            )
        return cls(cert, key, ca, allowed_clients, health_listen, cert_pem, key_pem, ca_pem)

    @classmethod
    def from_env(cls) -> TlsConfig | None:
        """From C2D_TLS_CERT, C2D_TLS_KEY, C2D_TLS_CA (all three, or none: no TLS),
        C2D_TLS_ALLOWED_CLIENTS (comma-separated identities) and C2D_HEALTH_LISTEN."""
        paths = {name: os.environ.get(name, "") for name in (CERT_VAR, KEY_VAR, CA_VAR)}
        allowed = os.environ.get(ALLOWED_VAR, "")
        health_listen = os.environ.get(HEALTH_VAR, "")
        if not any(paths.values()) and not allowed:
            if health_listen:
                raise ValueError(
                    f"{HEALTH_VAR} is for services with TLS on: without it the service's own "
                    f"port answers health checks (set {CERT_VAR}, {KEY_VAR} and {CA_VAR})"
                )
            return None
        missing = [name for name, value in paths.items() if not value]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} not set: TLS needs {CERT_VAR}, {KEY_VAR} and {CA_VAR}"
            )
        return cls.load(
            Path(paths[CERT_VAR]),
            Path(paths[KEY_VAR]),
            Path(paths[CA_VAR]),
            frozenset(name.strip() for name in allowed.split(",") if name.strip()),
            health_listen,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that accept only callers with a certificate from the CA."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials that trust only servers with a certificate from the CA, and present
        this service's own certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )

    def authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Lets a call in when it came over a Unix socket (owner-only) or over TLS from an
        allowed identity; raises PermissionDenied or Unauthenticated otherwise."""
        if context.peer().startswith("unix:"):
            return
        auth = context.auth_context()
        if list(auth.get("transport_security_type", ())) != [b"ssl"]:
            # Not reachable while every TCP port of a TLS server is a TLS port: kept so that
            # a plaintext call could never pass for an authenticated one.
            raise Unauthenticated(
                "this service accepts only mutual TLS", reason="PEER_NOT_AUTHENTICATED"
            )
        identities = peer_identities(auth)
        if identities.isdisjoint(self.allowed_clients):
            log.warning("peer not allowed", peer=context.peer(), identities=sorted(identities))
            raise PermissionDenied(
                f"a caller with identity {', '.join(sorted(identities)) or '(none)'} "
                "may not call this service",
                reason="PEER_NOT_ALLOWED",
            )


def peer_identities(auth: Mapping[str, Iterable[bytes]]) -> set[str]:
    """The DNS names of a TLS peer's certificate; its common name when it has none."""
    names = list(auth.get("peer_dns", ())) or list(auth.get("x509_common_name", ()))
    return {name.decode(errors="replace") for name in names}


def _read(variable: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{variable}: cannot read {path}: {error.strerror}") from error


def _certificates(variable: str, path: Path, pem: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise ValueError(f"{variable}: {path} holds no PEM certificate") from error
    return certificates
