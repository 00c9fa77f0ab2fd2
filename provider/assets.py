"""What makes an asset: DIDs, checksums, and the checks on a dataset's files."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from c2d.provider.v1 import provider_pb2 as pb

from mesh.errors import InvalidArgument
from pods import configure
from pods.configure import DataProvisioningError

DID_PREFIX = "did:c2d:"
MAX_DATASET_FILES = 1000
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


@dataclass(frozen=True)
class CheckedFile:
    path: str
    size: int
    sha256: str


def check_dataset_files(raw_paths: Sequence[str], data_root: Path) -> list[CheckedFile]:
    """Checks each dataset file as the configure stage will (under the data root after resolving
    links, a regular file, readable by the sandbox) and hashes it. Errors name the field, never
    the path, so that nothing echoes where data lives."""
    checked: list[CheckedFile] = []
    root: Path | None = None
    for index, raw in enumerate(raw_paths):
        field = f"file_paths[{index}]"
        try:
            # Resolved once, at the first file, whose field a missing root is reported under.
            root = root or configure.resolve_data_root(data_root)
            path, size = configure.check_dataset_file(raw, root, field)
        except DataProvisioningError as error:
            raise InvalidArgument(str(error), field=field) from None
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        checked.append(CheckedFile(path=str(path), size=size, sha256=digest.hexdigest()))
    return checked
