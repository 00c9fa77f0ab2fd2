"""The request digest of every signed Provider RPC: which fields, in which order.

Both the Provider (to verify) and the SDK (to sign) use this table, and the proto comments
document the same lists for clients in other languages."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import rfc8785
from c2d.common.v1 import container_pb2, job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.auth import request_digest
from mesh.errors import InvalidArgument


def _metadata(m: pb.AssetMetadata) -> list[Any]:
    return [m.title, m.description, m.author, m.license, list(m.tags)]


def _optional(message: Message, field: str) -> Any:
    """A proto3 `optional` field: its value, or JSON null when unset."""
    return getattr(message, field) if message.HasField(field) else None


def _value(message: Message, field: str) -> Any:
    """A google.protobuf.Value field as JSON, null when unset."""
    return json_format.MessageToDict(getattr(message, field)) if message.HasField(field) else None


def _policy(p: pb.ComputePolicy) -> list[Any]:
    return [
        p.allow_raw_algorithm,
        p.allow_network_access,
        p.timeout.seconds,
        [
            [t.did, t.files_checksum, t.container_section_checksum]
            for t in p.publisher_trusted_algorithms
        ],
        list(p.publisher_trusted_algorithm_publishers),
        [
            [b.name, b.algorithm_did, _optional(b, "minimum"), _optional(b, "maximum")]
            for b in p.parameter_bounds
        ],
        p.allow_derived_datasets,
    ]


def _parameters(specs: Iterable[pb.ParameterSpec]) -> list[Any]:
    return [
        [
            s.name,
            s.type,
            s.required,
            _value(s, "default_value"),
            [json_format.MessageToDict(o) for o in s.options],
            _optional(s, "minimum"),
            _optional(s, "maximum"),
            s.description,
        ]
        for s in specs
    ]


def _pricing(p: pb.Pricing) -> list[Any]:
    return [p.datatoken, p.service_index, p.exchange_id]


def _container(c: container_pb2.Container) -> list[Any]:
    return [c.image, c.tag, c.checksum]


def _resources(r: job_pb2.Resources) -> list[Any]:
    return [r.cpus, r.memory_bytes, r.disk_bytes, r.max_duration.seconds]


def _sha256(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest() if raw else ""


def _job(r: pb.StartComputeRequest | pb.InitializeComputeRequest) -> list[Any]:
    """The fields that say what a job runs, shared by StartCompute and InitializeCompute."""
    return [
        r.dataset,
        list(r.additional_datasets),
        r.algorithm,
        _sha256(r.raw_algorithm.code),
        r.raw_algorithm.entrypoint,
        _container(r.raw_algorithm.container),
        json_format.MessageToDict(r.parameters),
        r.environment,
    ]


def _delivery(d: job_pb2.ResultDelivery) -> Any:
    """A delivery destination with its secrets (a signature binds them): null when unset."""
    kind = d.WhichOneof("destination")
    if kind == "s3":
        s = d.s3
        return [
            s.endpoint,
            s.region,
            s.bucket,
            s.prefix,
            s.access_key_id,
            s.secret_access_key,
            s.session_token,
        ]
    if kind == "upload_urls":
        return dict(d.upload_urls.urls)
    return None


def _start_compute(r: pb.StartComputeRequest) -> list[Any]:
    return [
        r.request_id,
        *_job(r),
        list(r.viewers),
        _resources(r.resources),
        r.require_network,
        list(r.orders),
        r.results,
        _delivery(r.delivery),
    ]


def _initialize_compute(r: pb.InitializeComputeRequest) -> list[Any]:
    return [*_job(r), _resources(r.resources), r.valid_for.seconds]


_FIELDS: dict[str, Callable[[Any], list[Any]]] = {
    "CreateAuthToken": lambda r: [r.valid_for.seconds],
    "RevokeAuthToken": lambda r: [r.token],
    "PublishDataset": lambda r: [
        r.request_id,
        _metadata(r.metadata),
        list(r.file_paths),
        [[f.path, f.url, f.credentials, f.size_bytes, f.sha256] for f in r.files],
        _policy(r.policy),
        r.sample_of,
        _pricing(r.pricing),
    ],
    "UpdateDatasetPolicy": lambda r: [r.name, _policy(r.policy), r.expected_policy_version],
    "PublishAlgorithm": lambda r: [
        r.request_id,
        _metadata(r.metadata),
        _sha256(r.code),
        r.entrypoint,
        r.access,
        _parameters(r.parameters),
        _pricing(r.pricing),
        _container(r.container),
    ],
    "UpdateAlgorithm": lambda r: [
        r.name,
        _sha256(r.code),
        r.entrypoint,
        _parameters(r.parameters),
        _container(r.container),
    ],
    "DownloadAlgorithm": lambda r: [r.name, r.offset],
    "StartCompute": _start_compute,
    "InitializeCompute": _initialize_compute,
    "GetJob": lambda r: [r.name],
    "WatchJob": lambda r: [r.name],
    "StopJob": lambda r: [r.name],
    "DeleteJob": lambda r: [r.name],
    "ListJobs": lambda r: [r.page_size, r.page_token],
    "StreamJobLogs": lambda r: [r.name, r.offset],
    "DownloadResult": lambda r: [r.name, r.offset],
    "GetResultUrl": lambda r: [r.name],
    "PublishJobOutputs": lambda r: [
        r.name,
        r.request_id,
        _metadata(r.metadata),
        list(r.result_indexes),
        _policy(r.policy),
    ],
    "GetProvenance": lambda r: [r.name],
    "CreateApprovalRequest": lambda r: [
        r.request_id,
        r.dataset,
        r.algorithm,
        r.message,
        json_format.MessageToDict(r.parameters),
    ],
    "ListApprovalRequests": lambda r: [r.dataset, r.state, r.page_size, r.page_token],
    "GetApprovalRequest": lambda r: [r.name],
    "ApproveApprovalRequest": lambda r: [
        r.name,
        r.files_checksum,
        r.container_section_checksum,
        r.note,
    ],
    "RejectApprovalRequest": lambda r: [r.name, r.reason],
    "RunApprovalSample": lambda r: [r.name, r.request_id, r.environment],
    "ListAuditEvents": lambda r: [r.action, r.resource, r.page_size, r.page_token],
}


def digest_for(command: str, request: Message) -> str:
    """The request digest of `request` for the RPC named `command`. INVALID_ARGUMENT for a
    request JSON cannot carry, such as a NaN or an infinity in a number field."""
    try:
        return request_digest(_FIELDS[command](request))
    except rfc8785.CanonicalizationError as error:
        raise InvalidArgument(
            f"the request holds a value that has no canonical JSON form: {error}",
            reason="NOT_CANONICAL_JSON",
        ) from None
