"""The dataset's compute policy: is it well formed, does it trust this algorithm, may the job
use the network, may a job's outputs become a dataset (`allow_derived_datasets`)? Deny by
default."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2

from mesh.auth import checksum
from mesh.errors import Aborted, InvalidArgument, PermissionDenied
from mesh.jobs import is_sha256_hex
from provider import parameters

# Why a dataset let an algorithm run: the audit log and provenance record name it.
Basis = Literal["trusted_algorithm", "trusted_publisher", "all_publishers", "raw_allowed"]

_DID = re.compile(r"did:c2d:[0-9a-f]{64}")


class PolicyVersionMismatch(Aborted):
    """The dataset's policy changed since the caller read it (UpdateDatasetPolicy's
    `expected_policy_version`)."""

    default_reason = "POLICY_VERSION_MISMATCH"


def check_policy(policy: provider_pb2.ComputePolicy) -> None:
    """INVALID_ARGUMENT naming the field unless `policy` is well formed."""
    for i, trusted in enumerate(policy.publisher_trusted_algorithms):
        field = f"policy.publisher_trusted_algorithms[{i}]"
        if not _DID.fullmatch(trusted.did):
            raise InvalidArgument(f"{field}.did must be did:c2d:<64 hex>", field=f"{field}.did")
        for name in ("files_checksum", "container_section_checksum"):
            if not is_sha256_hex(getattr(trusted, name)):
                raise InvalidArgument(
                    f"{field}.{name} must be 64 lowercase hex digits", field=f"{field}.{name}"
                )
    for i, publisher in enumerate(policy.publisher_trusted_algorithm_publishers):
        if publisher == "*":
            continue
        try:
            checksum(publisher)
        except ValueError:
            field = f"policy.publisher_trusted_algorithm_publishers[{i}]"
            raise InvalidArgument(f'{field} must be an address or "*"', field=field) from None
    if policy.timeout.seconds < 0:
        raise InvalidArgument("policy.timeout must not be negative", field="policy.timeout")
    for i, bound in enumerate(policy.parameter_bounds):
        _check_bound(bound, f"policy.parameter_bounds[{i}]")


def _check_bound(bound: provider_pb2.ParameterBound, field: str) -> None:
    if not parameters.NAME.fullmatch(bound.name):
        raise InvalidArgument(f"{field}.name {parameters.NAME_RULE}", field=f"{field}.name")
    if bound.algorithm_did and not _DID.fullmatch(bound.algorithm_did):
        raise InvalidArgument(
            f"{field}.algorithm_did must be empty or did:c2d:<64 hex>",
            field=f"{field}.algorithm_did",
        )
    parameters.check_range(bound, field)


def check_trusted(dataset: provider_pb2.Dataset, algorithm: provider_pb2.Algorithm | None) -> Basis:
    """The basis on which the dataset's policy lets `algorithm` run (None means raw code);
    PERMISSION_DENIED naming the dataset when it does not."""
    policy = dataset.policy
    if algorithm is None:
        if not policy.allow_raw_algorithm:
            raise PermissionDenied(
                f"{dataset.name} does not allow raw algorithms", reason="RAW_ALGORITHM_NOT_ALLOWED"
            )
        return "raw_allowed"
    publishers = set(policy.publisher_trusted_algorithm_publishers)
    if "*" in publishers:
        return "all_publishers"
    if algorithm.publisher.lower() in {p.lower() for p in publishers}:
        return "trusted_publisher"
    for trusted in policy.publisher_trusted_algorithms:
        if trusted.did != algorithm.did:
            continue
        if (
            trusted.files_checksum == algorithm.files_checksum
            and trusted.container_section_checksum == algorithm.container_section_checksum
        ):
            return "trusted_algorithm"
        raise PermissionDenied(
            f"{dataset.name} trusted {algorithm.did} with other checksums: the algorithm changed",
            reason="ALGORITHM_CHECKSUM_MISMATCH",
        )
    raise PermissionDenied(
        f"{dataset.name} does not trust {algorithm.did}", reason="ALGORITHM_NOT_TRUSTED"
    )


def network_allowed(
    datasets: Sequence[provider_pb2.Dataset],
    environment: job_pb2.Environment,
    *,
    required: bool,
) -> bool:
    """Whether every dataset lets the job use the network (the engine grants it only where
    the environment permits it too). With `required`, PERMISSION_DENIED naming the first
    dataset, or else the environment, that does not allow it."""
    for dataset in datasets:
        if not dataset.policy.allow_network_access:
            if required:
                raise PermissionDenied(
                    f"{dataset.name} does not allow network access", reason="NETWORK_NOT_ALLOWED"
                )
            return False
    if required and not environment.network_allowed:
        raise PermissionDenied(
            f"environment {environment.name!r} does not permit network access",
            reason="NETWORK_NOT_ALLOWED",
        )
    return True


def check_derived_allowed(datasets: Sequence[provider_pb2.Dataset]) -> None:
    """PERMISSION_DENIED (DERIVED_DATASETS_NOT_ALLOWED) naming the first of the datasets a job
    read whose current policy does not let its outputs become a dataset of their own."""
    for dataset in datasets:
        if not dataset.policy.allow_derived_datasets:
            raise PermissionDenied(
                f"{dataset.name} does not allow datasets made from the outputs of jobs on it",
                reason="DERIVED_DATASETS_NOT_ALLOWED",
            )
