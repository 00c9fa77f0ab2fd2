"""What a well-formed container section (an algorithm's image) is, for the Provider that
accepts it and the engine that runs it."""

from __future__ import annotations

import re

from c2d.common.v1 import container_pb2

from mesh.errors import InvalidArgument

# A registry reference without tag or digest: host[:port]/path, lowercase path components.
_IMAGE_RE = re.compile(
    r"(?:[a-zA-Z0-9][a-zA-Z0-9.-]*(?::[0-9]{1,5})?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_IMAGE_CHARS = 255


def is_set(container: container_pb2.Container) -> bool:
    return bool(container.image or container.tag or container.checksum)


def check_container(container: container_pb2.Container, field: str) -> None:
    """INVALID_ARGUMENT naming the field unless `container` is unset or names an image by a
    well-formed repository, tag and manifest digest."""
    if not is_set(container):
        return
    if len(container.image) > MAX_IMAGE_CHARS or not _IMAGE_RE.fullmatch(container.image):
        raise InvalidArgument(
            f"{field}.image must be a registry reference such as docker.io/library/python",
            field=f"{field}.image",
        )
    if container.tag and not _TAG_RE.fullmatch(container.tag):
        raise InvalidArgument(
            f"{field}.tag must be letters, digits and ._- (at most 128)", field=f"{field}.tag"
        )
    if not _DIGEST_RE.fullmatch(container.checksum):
        raise InvalidArgument(
            f"{field}.checksum must be the image manifest's digest: sha256: and 64 lowercase "
            "hex digits",
            field=f"{field}.checksum",
        )


def reference(container: container_pb2.Container) -> str:
    """How people name the image: repository, tag when there is one, and the digest."""
    tag = f":{container.tag}" if container.tag else ""
    return f"{container.image}{tag}@{container.checksum}"


def parse_reference(text: str) -> container_pb2.Container:
    """`repository[:tag]@sha256:<hex>` as a Container; ValueError when malformed."""
    name, at, checksum = text.rpartition("@")
    if not at:
        raise ValueError(f"{text!r}: name the image by its digest, as repository[:tag]@sha256:...")
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    image, tag = (name[:colon], name[colon + 1 :]) if colon > last_slash else (name, "")
    container = container_pb2.Container(image=image, tag=tag, checksum=checksum)
    try:
        check_container(container, "container")
    except InvalidArgument as error:
        raise ValueError(f"{text!r}: {error.message}") from None
    return container
