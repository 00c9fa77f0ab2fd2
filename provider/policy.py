"""The dataset's compute policy: does it trust this algorithm? Deny by default."""

from __future__ import annotations

from c2d.provider.v1 import provider_pb2

from mesh.errors import PermissionDenied


def check_trusted(dataset: provider_pb2.Dataset, algorithm: provider_pb2.Algorithm | None) -> None:
    """Raises PERMISSION_DENIED naming the dataset unless its policy lets `algorithm` run
    (None means raw code)."""
    policy = dataset.policy
    if algorithm is None:
        if not policy.allow_raw_algorithm:
            raise PermissionDenied(
                f"{dataset.name} does not allow raw algorithms", reason="RAW_ALGORITHM_NOT_ALLOWED"
            )
        return
    publishers = set(policy.publisher_trusted_algorithm_publishers)
    if "*" in publishers or algorithm.publisher.lower() in {p.lower() for p in publishers}:
        return
    for trusted in policy.publisher_trusted_algorithms:
        if trusted.did != algorithm.did:
            continue
        if (
            trusted.files_checksum == algorithm.files_checksum
            and trusted.container_section_checksum == algorithm.container_section_checksum
        ):
            return
        raise PermissionDenied(
            f"{dataset.name} trusted {algorithm.did} with other checksums: the algorithm changed",
            reason="ALGORITHM_CHECKSUM_MISMATCH",
        )
    raise PermissionDenied(
        f"{dataset.name} does not trust {algorithm.did}", reason="ALGORITHM_NOT_TRUSTED"
    )
