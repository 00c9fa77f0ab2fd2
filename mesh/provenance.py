"""Signed provenance documents: how the Provider signs a job's record, and how anyone checks one
offline against the provider's address pinned beforehand (GetProviderInfo).

A document is the RFC 8785 canonical JSON of `{"provenance": record, "signature": "0x..."}`.
The signature is an EIP-191 personal-message signature over the 32-byte keccak256 of the
record's canonical JSON (the scheme of request signatures, see mesh.auth). A record holds only
strings, integers, booleans, lists and objects: no floats, whose text forms differ between
languages, and no nulls."""

from __future__ import annotations

import json
import re
from typing import Any

import rfc8785
from eth_hash.auto import keccak

from mesh.auth import checksum, recover_signer, sign_hash

RECORD_VERSION = 1
_SIGNATURE = re.compile(r"0x[0-9a-f]{130}")


class ProvenanceError(ValueError):
    """A document that is not a valid provenance document signed by the expected provider."""


def check_record_values(value: Any, where: str = "provenance") -> None:
    """ValueError naming the first value that is not a string, integer, boolean, list or
    object."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a key that is not a string")
            check_record_values(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_record_values(item, f"{where}[{index}]")
    elif not isinstance(value, str | int):  # bool is an int
        raise ValueError(f"{where} is a {type(value).__name__}; records hold no floats or nulls")


def _record_hash(record: dict[str, Any]) -> bytes:
    return bytes(keccak(rfc8785.dumps(record)))


def sign_document(record: dict[str, Any], private_key: bytes) -> bytes:
    """The canonical document of `record`, signed with `private_key`."""
    check_record_values(record)
    signature = sign_hash(_record_hash(record), private_key)
    return rfc8785.dumps({"provenance": record, "signature": signature})


def _reject_floats(text: str) -> Any:
    raise ProvenanceError("the document holds a number with a fraction or exponent")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ProvenanceError("the document repeats a key")
    return dict(pairs)


def verify_document(document: bytes, provider_address: str) -> dict[str, Any]:
    """The record of `document` once it is shown to be exactly the canonical form, signed by
    `provider_address` (which the caller pinned beforehand: an address inside the record is
    never trusted). ProvenanceError otherwise, so that any changed byte fails."""
    try:
        expected = checksum(provider_address).lower()
    except ValueError:
        raise ProvenanceError("the provider address is not an Ethereum address") from None
    try:
        parsed = json.loads(
            document.decode("utf-8"),
            parse_float=_reject_floats,
            parse_constant=_reject_floats,
            object_pairs_hook=_unique_keys,
        )
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProvenanceError("the document is not UTF-8 JSON") from None
    if not isinstance(parsed, dict) or set(parsed) != {"provenance", "signature"}:
        raise ProvenanceError('the document must hold exactly "provenance" and "signature"')
    record, signature = parsed["provenance"], parsed["signature"]
    if not isinstance(record, dict):
        raise ProvenanceError('"provenance" must be an object')
    if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
        raise ProvenanceError('"signature" must be 0x and 130 lowercase hex digits')
    try:
        check_record_values(record)
        canonical = rfc8785.dumps(parsed)
    except (ValueError, rfc8785.CanonicalizationError) as error:
        raise ProvenanceError(f"the record is not canonical JSON: {error}") from None
    if canonical != document:
        raise ProvenanceError("the document is not in canonical form: it was changed")
    try:
        signer = recover_signer(_record_hash(record), bytes.fromhex(signature[2:]))
    except Exception:
        raise ProvenanceError("the signature is not valid") from None
    if signer.lower() != expected:
        raise ProvenanceError("the document was not signed by the expected provider")
    if record.get("version") != RECORD_VERSION:
        raise ProvenanceError(f"unknown record version {record.get('version')!r}")
    return record
