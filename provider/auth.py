"""Who is calling: a verified signature (then its nonce is spent) or a bearer token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from mesh.auth import AUTHORIZATION_HEADER, SignedRequest
from mesh.digests import digest_for
from mesh.errors import PermissionDenied, Unauthenticated
from provider.store import ProviderStore


@dataclass(frozen=True)
class Caller:
    address: str
    # The nonce of a signed call; empty for a token call.
    nonce: str = ""


def require_owner(caller: Caller, owners: frozenset[str], what: str) -> None:
    """PERMISSION_DENIED unless the caller is one of the node's data owners."""
    if caller.address not in owners:
        raise PermissionDenied(f"only the node's data owners may {what}", reason="NOT_A_DATA_OWNER")


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class Authenticator:
    def __init__(self, store: ProviderStore) -> None:
        self.store = store

    async def signed(
        self, context: grpc.aio.ServicerContext[Any, Any], command: str, request: Message
    ) -> Caller:
        """A call that changes something: a valid signature over this very request."""
        signed = SignedRequest.from_metadata(_metadata(context))
        if signed is None:
            raise Unauthenticated(
                f"{command} must be signed (x-c2d-address, x-c2d-nonce, x-c2d-signature)",
                reason="SIGNATURE_REQUIRED",
            )
        return await self._verify(signed, command, request)

    async def reader(
        self, context: grpc.aio.ServicerContext[Any, Any], command: str, request: Message
    ) -> Caller:
        """A read or a stream: a bearer token, or a signature."""
        metadata = _metadata(context)
        authorization = metadata.get(AUTHORIZATION_HEADER, "")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("authorization must be 'Bearer <token>'")
            address = await self.store.token_address(token.strip())
            if address is None:
                raise Unauthenticated(
                    "the token is unknown, expired or revoked", reason="TOKEN_INVALID"
                )
            structlog.contextvars.bind_contextvars(consumer=address)
            return Caller(address=address)
        signed = SignedRequest.from_metadata(metadata)
        if signed is None:
            raise Unauthenticated(
                f"{command} needs a bearer token (CreateAuthToken) or a signature",
                reason="CREDENTIALS_REQUIRED",
            )
        return await self._verify(signed, command, request)

    async def _verify(self, signed: SignedRequest, command: str, request: Message) -> Caller:
        # The signature first: only its rightful owner can spend an address's nonce.
        address = signed.verify(command, digest_for(command, request))
        await self.store.use_nonce(address, signed.nonce)
        structlog.contextvars.bind_contextvars(consumer=address)
        return Caller(address=address, nonce=signed.nonce)
