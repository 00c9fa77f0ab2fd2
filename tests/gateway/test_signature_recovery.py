"""mesh.auth recovers a signer as eth_account does, whatever the signature: the fast path it
takes for v = 27/28 must accept and refuse exactly what Account.recover_message does.

(Here beside the REST edge's tests because every signed REST call ends in this check.)"""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from mesh.auth import SignedRequest, recover_signer, request_digest, sign
from mesh.errors import Unauthenticated

# secp256k1's group order: r and s must lie below it.
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _reference(text_hash: bytes, signature: bytes) -> str | None:
    try:
        return str(
            Account.recover_message(encode_defunct(primitive=text_hash), signature=signature)
        )
    except Exception:
        return None


def _ours(text_hash: bytes, signature: bytes) -> str | None:
    try:
        return recover_signer(text_hash, signature)
    except Exception:
        return None


def _same(text_hash: bytes, signature: bytes) -> None:
    expected, got = _reference(text_hash, signature), _ours(text_hash, signature)
    assert (got is None) == (expected is None), (signature.hex(), expected, got)
    if expected is not None:
        assert got is not None and got.lower() == expected.lower()


def test_agrees_with_eth_account_on_good_and_bad_signatures() -> None:
    for _ in range(40):
        account = Account.create()
        text_hash = secrets.token_bytes(32)
        good = bytes(
            Account.sign_message(encode_defunct(primitive=text_hash), account.key).signature
        )
        assert _ours(text_hash, good) == account.address.lower()
        r, s, v = good[:32], good[32:64], good[64]
        variants = [
            good,
            r + s + bytes((v ^ 1,)),  # the other recovery id: another key, or none
            r + s + bytes((v - 27,)),  # v as 0/1
            r + s + bytes((v + 10,)),  # an EIP-155 style v
            r + s + bytes((2,)),
            r + s + bytes((29,)),
            r + (N - int.from_bytes(s, "big")).to_bytes(32, "big") + bytes((v ^ 1,)),  # high s
            r + N.to_bytes(32, "big") + bytes((v,)),  # s out of range
            N.to_bytes(32, "big") + s + bytes((v,)),  # r out of range
            bytes(32) + s + bytes((v,)),
            r + bytes(32) + bytes((v,)),
            bytes([good[0] ^ 1]) + good[1:],
        ]
        for signature in variants:
            _same(text_hash, signature)
        _same(secrets.token_bytes(32), good)


def test_verify_accepts_the_signer_and_refuses_others() -> None:
    account = Account.create()
    digest = request_digest(["x", 1])
    signature = sign(account.key, account.address, 7, "GetJob", digest)
    signed = SignedRequest(account.address, "7", signature)
    assert signed.verify("GetJob", digest) == account.address
    with pytest.raises(Unauthenticated):
        signed.verify("StopJob", digest)
    other = SignedRequest(Account.create().address, "7", signature)
    with pytest.raises(Unauthenticated):
        other.verify("GetJob", digest)
    garbled = SignedRequest(account.address, "7", "0x" + "00" * 65)
    with pytest.raises(Unauthenticated):
        garbled.verify("GetJob", digest)
