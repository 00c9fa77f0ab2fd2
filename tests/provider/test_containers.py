"""An algorithm's container section: the image it runs in, pinned by the manifest digest. The
Provider checks its form, keeps it in the algorithm's record, binds it into the container
section checksum (so a dataset that trusted one image refuses another), signs it into the
request digests and records it in the job's provenance."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from c2d.common.v1 import container_pb2

from mesh import containers
from tests.conftest import LocalMesh, needs_root, new_key
from tests.e2e.test_job import error_info
from tests.provider.test_policy import publish_data, refused, trusting

pytestmark = needs_root

ENTRYPOINT = "python3 $ALGO"
DIGEST = "sha256:" + "ab" * 32
IMAGE = container_pb2.Container(image="docker.io/library/python", tag="3.11-slim", checksum=DIGEST)


async def test_the_container_is_kept_and_bound_into_the_checksum(local_mesh: LocalMesh) -> None:
    async with local_mesh.client(new_key()) as publisher:
        host = await publisher.publish_algorithm(b"print(1)\n", ENTRYPOINT)
        imaged = await publisher.publish_algorithm(b"print(1)\n", ENTRYPOINT, container=IMAGE)
        assert not host.HasField("container")
        assert imaged.container == IMAGE
        assert await publisher.get_algorithm(imaged.did) == imaged
        # The reference system's rule: sha256 of the entrypoint joined with the image digest.
        assert (
            imaged.container_section_checksum
            == hashlib.sha256((ENTRYPOINT + DIGEST).encode()).hexdigest()
        )
        assert host.container_section_checksum == hashlib.sha256(ENTRYPOINT.encode()).hexdigest()
        assert imaged.files_checksum == host.files_checksum


@pytest.mark.parametrize(
    ("container", "field"),
    [
        (container_pb2.Container(image="Bad Name", checksum=DIGEST), "container.image"),
        (container_pb2.Container(image="python", tag="a b", checksum=DIGEST), "container.tag"),
        (container_pb2.Container(image="python", tag="3"), "container.checksum"),
        (container_pb2.Container(image="python", checksum="sha256:AB"), "container.checksum"),
        (container_pb2.Container(image="x" * 256, checksum=DIGEST), "container.image"),
        (container_pb2.Container(checksum=DIGEST), "container.image"),
    ],
)
async def test_a_malformed_container_is_refused_naming_its_field(
    local_mesh: LocalMesh, container: container_pb2.Container, field: str
) -> None:
    async with local_mesh.client(new_key()) as publisher:
        error = await refused(
            publisher.publish_algorithm(b"print(1)\n", ENTRYPOINT, container=container)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).metadata["field"] == field


async def test_another_image_is_another_algorithm_for_the_policy(local_mesh: LocalMesh) -> None:
    async with (
        local_mesh.client(local_mesh.owner) as owner,
        local_mesh.client(new_key()) as publisher,
    ):
        algorithm = await publisher.publish_algorithm(b"print(1)\n", ENTRYPOINT, container=IMAGE)
        dataset = await publish_data(local_mesh, owner, trusting(await owner.trust(algorithm.did)))
        other = container_pb2.Container(
            image=IMAGE.image, tag=IMAGE.tag, checksum="sha256:" + "cd" * 32
        )
        updated = await publisher.update_algorithm(
            algorithm.did, b"print(1)\n", ENTRYPOINT, container=other
        )
        assert updated.files_checksum == algorithm.files_checksum
        assert updated.container_section_checksum != algorithm.container_section_checksum
        changed = await refused(publisher.start_compute([dataset.did], algorithm=algorithm.did))
        assert error_info(changed).reason == "ALGORITHM_CHECKSUM_MISMATCH"


def test_image_references_parse_as_the_cli_takes_them() -> None:
    parsed = containers.parse_reference(f"ghcr.io:443/org/algo:1.0@{DIGEST}")
    assert (parsed.image, parsed.tag, parsed.checksum) == ("ghcr.io:443/org/algo", "1.0", DIGEST)
    untagged = containers.parse_reference(f"localhost:5000/algo@{DIGEST}")
    assert (untagged.image, untagged.tag) == ("localhost:5000/algo", "")
    assert containers.reference(parsed) == f"ghcr.io:443/org/algo:1.0@{DIGEST}"
    for text in ("python:3.11", f"Python@{DIGEST}", "python@sha256:1234"):
        with pytest.raises(ValueError, match=r"image|digest"):
            containers.parse_reference(text)
