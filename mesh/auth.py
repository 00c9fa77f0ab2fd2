"""The signature scheme that authenticates consumers and owners, for both sides of a call.

The signed text is `address + nonce + command + request_digest`; its keccak256 hash is signed
as an EIP-191 personal message. `request_digest` is the hex sha256 of the RFC 8785 canonical
JSON of the fields each RPC documents, in order (see protos/c2d/provider/v1/provider.proto)."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785
from coincurve import PublicKey
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_hash.auto import keccak as _keccak
from eth_utils.address import to_checksum_address

from mesh.errors import Unauthenticated

ADDRESS_HEADER = "x-c2d-address"
NONCE_HEADER = "x-c2d-nonce"
SIGNATURE_HEADER = "x-c2d-signature"
AUTHORIZATION_HEADER = "authorization"

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")
# At most 18 digits: every nonce fits a signed 64-bit integer (microseconds since 1970 use 16).
_NONCE = re.compile(r"[0-9]{1,18}")


def request_digest(fields: Sequence[Any]) -> str:
    """The hex sha256 of the canonical JSON array of `fields`."""
    return hashlib.sha256(rfc8785.dumps(list(fields))).hexdigest()


def signed_text(address: str, nonce: str, command: str, digest: str) -> str:
    return f"{address}{nonce}{command}{digest}"


def _text_hash(address: str, nonce: str, command: str, digest: str) -> bytes:
    return bytes(_keccak(signed_text(address, nonce, command, digest).encode()))


# What EIP-191 puts before a 32-byte personal message (encode_defunct's version E).
_PERSONAL_PREFIX = b"\x19Ethereum Signed Message:\n32"


def recover_signer(text_hash: bytes, signature: bytes) -> str:
    """The address that signed `text_hash` as a personal message, as Account.recover_message
    finds it. For the usual v of 27 or 28 it asks libsecp256k1 directly, a third of the cost of
    eth_account's layers (which call the same library); other forms of v take the long way."""
    v = signature[64]
    if v not in (27, 28):
        message = encode_defunct(primitive=text_hash)
        return str(Account.recover_message(message, signature=signature))
    message_hash = _keccak(_PERSONAL_PREFIX + text_hash)
    public = PublicKey.from_signature_and_message(
        signature[:64] + bytes((v - 27,)), message_hash, hasher=None
    )
    return "0x" + bytes(_keccak(public.format(compressed=False)[1:])[-20:]).hex()


def sign_hash(text_hash: bytes, private_key: bytes | str) -> str:
    """Signs a 32-byte hash as a personal message; returns the 0x-prefixed 65-byte signature
    (recover_signer finds the signer again)."""
    signed = Account.sign_message(encode_defunct(primitive=text_hash), private_key=private_key)
    return "0x" + bytes(signed.signature).hex()


def sign(private_key: bytes | str, address: str, nonce: int, command: str, digest: str) -> str:
    """Signs a request as a client; returns the 0x-prefixed 65-byte signature."""
    return sign_hash(_text_hash(address, str(nonce), command, digest), private_key)


@dataclass(frozen=True)
class SignedRequest:
    """The authentication headers of one call, parsed but not yet verified."""

    address: str
    nonce: str
    signature: str

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> SignedRequest | None:
        """Reads the three headers; None when none is present, UNAUTHENTICATED when some are
        missing or malformed."""
        present = [metadata.get(h) for h in (ADDRESS_HEADER, NONCE_HEADER, SIGNATURE_HEADER)]
        if not any(present):
            return None
        address, nonce, signature = (v or "" for v in present)
        if not _ADDRESS.fullmatch(address):
            raise Unauthenticated(f"{ADDRESS_HEADER} must be a 0x-prefixed 20-byte hex address")
        if not _NONCE.fullmatch(nonce):
            raise Unauthenticated(f"{NONCE_HEADER} must be a decimal integer")
        if not _SIGNATURE.fullmatch(signature):
            raise Unauthenticated(f"{SIGNATURE_HEADER} must be a 0x-prefixed 65-byte hex value")
        return cls(address=address, nonce=nonce, signature=signature)

    def verify(self, command: str, digest: str) -> str:
        """Checks the signature over this request; returns the checksummed signer address.
        UNAUTHENTICATED when the signer is not the claimed address (a wrong digest, another
        command, or a forged signature all end here)."""
        text_hash = _text_hash(self.address, self.nonce, command, digest)
        try:
            signer = recover_signer(text_hash, bytes.fromhex(self.signature[2:]))
        except Exception as error:
            raise Unauthenticated("the signature is not valid") from error
        if signer.lower() != self.address.lower():
            raise Unauthenticated(
                "the signature does not match the address and request "
                "(check the request digest and the command name)"
            )
        return _checksummed(signer.lower())


@functools.lru_cache(maxsize=1024)
def _checksummed(address: str) -> str:
    # The same few callers sign again and again: each address is checksummed once.
    return str(to_checksum_address(address))


def checksum(address: str) -> str:
    """EIP-55 form of an address; ValueError when it is not one."""
    if not _ADDRESS.fullmatch(address):
        raise ValueError("not an address")
    return _checksummed(address.lower())
