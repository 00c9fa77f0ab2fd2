"""Datasets made from a job's outputs (PublishJobOutputs): a consumer publishes outputs of a
job it owns as a new dataset on this node, so that further jobs run on them without the
outputs ever leaving.

Every dataset the job read must allow it in its current policy (`allow_derived_datasets`).
The Operator Service copies the outputs into the results storage's dataset area
(ExportResults), where neither the job's deletion nor its results' retention reaches them; the
new dataset's files are those copies (`stored` sources), its publisher the consumer, its
policy the one asked for (unset: it trusts no algorithm), and `derived_from` says where it came
from. Its publisher may change its policy later, as the node's owners may
(`require_policy_editor`).

Approval requests and sample runs stay the owners' flows: a consumer may ask for approval on a
derived dataset as on any other and the node's owners decide; its publisher changes its policy
directly instead. A derived dataset has no sample unless an owner registers one."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import grpc
import structlog
from c2d.common.v1 import job_pb2
from c2d.operator.v1 import operator_pb2, operator_pb2_grpc
from c2d.provider.v1 import provider_pb2 as pb

from mesh import jobs as job_facts
from mesh.channels import UNARY_TIMEOUT
from mesh.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    from_rpc_error,
)
from provider import assets
from provider.audit import AuditLog
from provider.auth import Caller, require_owner
from provider.policy import check_derived_allowed, check_policy
from provider.sources import MAX_DATASET_FILES, new_dataset, stored_file
from provider.store import ProviderStore

log = structlog.get_logger()

ACTION = "dataset.publish_outputs"
# Copying within the node's storage: a hard link, or a server-side copy of at most a few
# minutes per large object.
EXPORT_TIMEOUT_S = 900.0


async def publish_outputs(
    *,
    store: ProviderStore,
    operator: operator_pb2_grpc.OperatorServiceAsyncStub,
    audit: AuditLog,
    caller: Caller,
    request: pb.PublishJobOutputsRequest,
) -> pb.Dataset:
    """The dataset `request` makes of its job's outputs, published. Each refusal is audited;
    a retry with the same request id is the caller's to answer (as for PublishDataset)."""
    job_id = job_facts.parse_name(request.name, "jobs")
    structlog.contextvars.bind_contextvars(job_id=job_id)
    async with audit.refusals(caller.address, ACTION, request.name):
        job = await _owned_job(operator, job_id, caller.address)
        _check_succeeded(job)
        check_derived_allowed(await _datasets_read(store, job))
        indexes = _output_indexes(job, request.result_indexes)
        check_policy(request.policy)
        dataset_id = assets.derive_id(caller.address, caller.nonce)
        files = await _export(operator, job_id, caller.address, indexes, dataset_id)
    sources = [stored_file(dataset_id, f.index, f.size_bytes, f.sha256) for f in files]
    dataset = new_dataset(
        dataset_id,
        caller.address,
        request.metadata,
        request.policy,
        sources,
        derived_from=pb.DerivedFrom(
            job=job.name,
            datasets=[f"datasets/{d}" for d in job.dataset_ids],
            algorithm=f"algorithms/{job.algorithm_id}" if job.algorithm_id else "",
            outputs=[f.name for f in files],
        ),
    )
    await store.add_dataset(dataset, sources)
    await store.remember_request(caller.address, request.request_id, dataset.name)
    await audit.record(
        caller.address, ACTION, dataset.name, allowed=True, details=_audit_details(dataset)
    )
    log.info("job outputs published as a dataset", dataset=dataset.did, files=len(files))
    return dataset


async def require_policy_editor(
    store: ProviderStore, caller: Caller, owners: frozenset[str], dataset_id: str
) -> None:
    """PERMISSION_DENIED unless the caller may change the dataset's policy: one of the node's
    data owners, or for a dataset made from a job's outputs its publisher."""
    if caller.address in owners:
        return
    record = await store.dataset_record(dataset_id)
    if record is None or not record.HasField("derived_from"):
        require_owner(caller, owners, "change a dataset's policy")
    elif record.publisher != caller.address:
        raise PermissionDenied(
            f"only the node's data owners and the publisher of {record.name} may change its policy",
            reason="NOT_THE_PUBLISHER",
        )


async def _owned_job(
    operator: operator_pb2_grpc.OperatorServiceAsyncStub, job_id: str, caller: str
) -> job_pb2.Job:
    """The job, when the caller owns it: to a viewer, as to anyone else, it does not exist."""
    response = await operator.GetJob(
        operator_pb2.GetJobRequest(job_id=job_id, owner=caller), timeout=UNARY_TIMEOUT
    )
    if response.job.owner.lower() != caller.lower():
        raise NotFound("no such job", reason="JOB_NOT_FOUND")
    return response.job


def _check_succeeded(job: job_pb2.Job) -> None:
    """FAILED_PRECONDITION unless the job succeeded and its results are still kept."""
    if job.state != job_pb2.Job.STATE_SUCCEEDED:
        raise FailedPrecondition(
            "only a succeeded job's outputs can become a dataset", reason="JOB_NOT_SUCCEEDED"
        )
    expired = job.HasField("results_expire_time") and (
        job.results_expire_time.ToNanoseconds() <= time.time_ns()
    )
    if job.results_expired or expired:
        raise _results_expired()


def _results_expired() -> FailedPrecondition:
    return FailedPrecondition(
        "the job's results expired and are deleted: they can no longer become a dataset",
        reason="RESULTS_EXPIRED",
    )


async def _datasets_read(store: ProviderStore, job: job_pb2.Job) -> list[pb.Dataset]:
    """The datasets the job read, main one first, with their current policies. One that is
    not this node's (any more) is read as a dataset whose policy allows nothing."""
    found = []
    for dataset_id in job.dataset_ids:
        record = await store.dataset_record(dataset_id)
        found.append(pb.Dataset(name=f"datasets/{dataset_id}") if record is None else record)
    return found


def _output_indexes(job: job_pb2.Job, asked: Sequence[int]) -> list[int]:
    """The result indexes to publish, in the dataset's file order (see chosen_outputs), at
    most as many as a dataset has files."""
    chosen = [r.index for r in job_facts.chosen_outputs(job, asked, "result_indexes")]
    if len(chosen) > MAX_DATASET_FILES:
        raise InvalidArgument(
            f"a dataset has at most {MAX_DATASET_FILES} files: pick them in result_indexes",
            field="result_indexes",
        )
    return chosen


async def _export(
    operator: operator_pb2_grpc.OperatorServiceAsyncStub,
    job_id: str,
    caller: str,
    indexes: list[int],
    dataset_id: str,
) -> list[job_pb2.ResultFile]:
    """Has the Operator Service copy the outputs into the storage's dataset area; the copies,
    in the dataset's order. Results that expired meanwhile are FAILED_PRECONDITION, as here."""
    try:
        response = await operator.ExportResults(
            operator_pb2.ExportResultsRequest(
                job_id=job_id, owner=caller, indexes=indexes, dataset_id=dataset_id
            ),
            timeout=EXPORT_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as error:
        mapped = from_rpc_error(error, service="operator service")
        if mapped.reason == "RESULTS_EXPIRED":
            raise _results_expired() from None
        raise
    return list(response.files)


def _audit_details(dataset: pb.Dataset) -> dict[str, Any]:
    """What the audit log says of a derived dataset: where it came from, never where its
    files are."""
    derived = dataset.derived_from
    return {
        "job": derived.job,
        "derived_from": list(derived.datasets),
        "algorithm": derived.algorithm,
        "files": len(dataset.files),
        "policy_version": dataset.policy_version,
    }
