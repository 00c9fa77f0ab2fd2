"""What makes an asset: DIDs and checksums. Where a dataset's files are is provider.sources."""

from __future__ import annotations

import hashlib

from c2d.provider.v1 import provider_pb2 as pb

DID_PREFIX = "did:c2d:"
# An algorithm's access as the audit log and provenance records name it.
ACCESS_WORDS = {pb.ALGORITHM_ACCESS_PUBLIC: "public", pb.ALGORITHM_ACCESS_PRIVATE: "private"}


def derive_id(publisher: str, creation_nonce: str) -> str:
    """An asset id from its publisher and the nonce of the publishing request: stable while
    the DDO changes, and unique because nonces only grow."""
    return hashlib.sha256(f"{publisher.lower()}:{creation_nonce}".encode()).hexdigest()


def did(asset_id: str) -> str:
    return DID_PREFIX + asset_id


def files_checksum(files: list[bytes]) -> str:
    digest = hashlib.sha256()
    for content in files:
        digest.update(content)
    return digest.hexdigest()


def container_section_checksum(entrypoint: str, image_digest: str = "") -> str:
    """sha256 of the entrypoint joined with the runtime image's digest (empty for the host
    runtime)."""
    return hashlib.sha256((entrypoint + image_digest).encode()).hexdigest()
