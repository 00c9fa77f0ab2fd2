"""What makes an asset: DIDs, checksums, and the checks on a dataset's files."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import InvalidArgument

DID_PREFIX = "did:c2d:"
MAX_DATASET_FILES = 1000


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


def check_dataset_file(raw: str, index: int, data_root: Path) -> CheckedFile:
    """Resolves a dataset file and checks that jobs can use it. Errors name the field, never
    the path, so that nothing echoes where data lives."""
    field = f"file_paths[{index}]"
    if not raw or "\x00" in raw or not os.path.isabs(raw):
        raise InvalidArgument(f"{field} must be an absolute path", field=field)
    root = data_root.resolve()
    try:
        path = Path(raw).resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidArgument(
            f"{field} is not a readable file under the node's data root", field=field
        ) from None
    if not path.is_relative_to(root):
        raise InvalidArgument(f"{field} is outside the node's data root", field=field)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f"{field} is not a regular file", field=field)
    if not info.st_mode & stat.S_IROTH:
        # Jobs run as an unprivileged identity of their own, never as the file's owner.
        raise InvalidArgument(
            f"{field} must be readable by others (chmod o+r): jobs run as an unprivileged "
            "identity of their own",
            field=field,
        )
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return CheckedFile(path=str(path), size=info.st_size, sha256=digest.hexdigest())
