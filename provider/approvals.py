"""Approval requests: a consumer asks a dataset's owners to trust an algorithm that its policy
does not trust yet. An owner reads the code (DownloadAlgorithm allows it while a request for
the algorithm is pending), may run it on the dataset's sample, then approves, and the
algorithm, pinned by the checksums the owner reviewed, joins the dataset's trusted algorithms
as a new policy version; or rejects it with a reason the consumer reads."""

from __future__ import annotations

import re
import secrets
import sqlite3
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from c2d.provider.v1 import provider_pb2_grpc
from google.protobuf import json_format

from mesh import jobs as job_facts
from mesh.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from provider import parameters, request_fields
from provider.audit import AuditLog
from provider.auth import Authenticator, Caller, require_owner
from provider.config import ProviderConfig
from provider.launch import DecidedDataset, JobPlan
from provider.policy import check_trusted
from provider.sources import FileSource
from provider.store import ProviderStore

log = structlog.get_logger()
Context = grpc.aio.ServicerContext[Any, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approval_requests (
    id TEXT PRIMARY KEY,             -- 32 hex: approvalRequests/{id}
    seq INTEGER NOT NULL,
    dataset TEXT NOT NULL,           -- datasets/{id}
    algorithm TEXT NOT NULL,         -- algorithms/{id}
    requester TEXT NOT NULL,         -- EIP-55
    state INTEGER NOT NULL,          -- ApprovalState, as in the record
    record BLOB NOT NULL             -- provider.v1.ApprovalRequest
);
CREATE INDEX IF NOT EXISTS approval_requests_by_seq ON approval_requests (seq);
CREATE INDEX IF NOT EXISTS approval_requests_by_algorithm ON approval_requests (algorithm, state);
"""

_NAME = re.compile(r"approvalRequests/([0-9a-f]{32})")
MAX_TEXT = 4096
PENDING = pb.APPROVAL_STATE_PENDING
# The basis on which a sample run reads its dataset, as its audit entry and provenance say.
SAMPLE_BASIS = "approval_sample"


def _request_id(name: str) -> str:
    match = _NAME.fullmatch(name)
    if match is None:
        raise InvalidArgument(
            "name must look like approvalRequests/{id} with 32 lowercase hex digits", field="name"
        )
    return match.group(1)


def _checksums(
    item: pb.ApprovalRequest | pb.Algorithm | pb.ApproveApprovalRequestRequest,
) -> tuple[str, str]:
    """What pins an algorithm's version: its files and container section checksums."""
    return item.files_checksum, item.container_section_checksum


def _audit_details(request: pb.ApprovalRequest) -> dict[str, Any]:
    """What the audit log says of a request: what it is about, never the consumer's text."""
    return {
        "dataset": request.dataset,
        "algorithm": request.algorithm,
        "algorithm_did": request.algorithm_did,
        "files_checksum": request.files_checksum,
        "container_section_checksum": request.container_section_checksum,
    }


def _check_unchanged(algorithm: pb.Algorithm, request: pb.ApprovalRequest) -> None:
    """FAILED_PRECONDITION when the algorithm's checksums are no longer the ones the request
    pinned."""
    if _checksums(algorithm) != _checksums(request):
        raise FailedPrecondition(
            f"{algorithm.did} changed since {request.name} was made; "
            "the consumer must ask again for its new version",
            reason="ALGORITHM_CHANGED",
        )


def _check_text(text: str, field: str, *, required: bool = False) -> None:
    if len(text) > MAX_TEXT or (required and not text):
        least = 1 if required else 0
        raise InvalidArgument(f"{field} must be {least} to {MAX_TEXT} characters", field=field)


class ApprovalBook:
    """The approval requests in the Provider's database. No method awaits between its reads
    and writes, so each is atomic (mesh.sqlite)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)

    async def create(self, request: pb.ApprovalRequest) -> pb.ApprovalRequest:
        """Adds `request` (pending), unless its requester has a pending one for the same
        dataset and algorithm at the same checksums: that one is returned instead."""
        rows = self.db.execute(
            "SELECT record FROM approval_requests "
            "WHERE requester = ? AND dataset = ? AND algorithm = ? AND state = ?",
            (request.requester, request.dataset, request.algorithm, PENDING),
        ).fetchall()
        for (record,) in rows:
            existing = pb.ApprovalRequest.FromString(record)
            if _checksums(existing) == _checksums(request):
                return existing
        self.db.execute(
            "INSERT INTO approval_requests "
            "(id, seq, dataset, algorithm, requester, state, record) VALUES "
            "(?, COALESCE((SELECT MAX(seq) FROM approval_requests), 0) + 1, ?, ?, ?, ?, ?)",
            (
                request.name.removeprefix("approvalRequests/"),
                request.dataset,
                request.algorithm,
                request.requester,
                request.state,
                request.SerializeToString(),
            ),
        )
        return request

    async def get(self, request_id: str) -> pb.ApprovalRequest | None:
        return self._get(request_id)

    def _get(self, request_id: str) -> pb.ApprovalRequest | None:
        row = self.db.execute(
            "SELECT record FROM approval_requests WHERE id = ?", (request_id,)
        ).fetchone()
        return None if row is None else pb.ApprovalRequest.FromString(row[0])

    def _put(self, request: pb.ApprovalRequest) -> None:
        self.db.execute(
            "UPDATE approval_requests SET state = ?, record = ? WHERE id = ?",
            (
                request.state,
                request.SerializeToString(),
                request.name.removeprefix("approvalRequests/"),
            ),
        )

    async def page(
        self,
        *,
        dataset: str,
        state: int,
        requester: str | None,
        before: int | None,
        limit: int,
    ) -> list[tuple[int, pb.ApprovalRequest]]:
        """Requests newest first, from before position `before`; only for `dataset`, in
        `state`, and of `requester` when they are given."""
        rows = self.db.execute(
            "SELECT seq, record FROM approval_requests WHERE (? IS NULL OR seq < ?) "
            "AND (? = '' OR dataset = ?) AND (? = 0 OR state = ?) "
            "AND (? IS NULL OR requester = ?) ORDER BY seq DESC LIMIT ?",
            (before, before, dataset, dataset, state, state, requester, requester, limit),
        ).fetchall()
        return [(int(seq), pb.ApprovalRequest.FromString(record)) for seq, record in rows]

    async def decide(
        self,
        request_id: str,
        *,
        state: pb.ApprovalState.ValueType,
        note: str,
        decided_by: str,
        policy_version: int = 0,
    ) -> pb.ApprovalRequest:
        """Records an owner's decision on a pending request; FAILED_PRECONDITION when it was
        decided meanwhile."""
        request = self._get(request_id)
        if request is None or request.state != PENDING:
            raise FailedPrecondition(
                f"approvalRequests/{request_id} was decided meanwhile",
                reason="APPROVAL_REQUEST_NOT_PENDING",
            )
        request.state = state
        request.decision_note = note
        request.decided_by = decided_by
        request.decide_time.GetCurrentTime()
        request.policy_version = policy_version
        self._put(request)
        return request

    async def add_sample_job(self, request_id: str, job: str) -> None:
        request = self._get(request_id)
        if request is not None:
            request.sample_jobs.append(job)
            self._put(request)

    async def pending_for(self, algorithm: str) -> bool:
        """Whether a pending request names `algorithm` (`algorithms/{id}`)."""
        row = self.db.execute(
            "SELECT 1 FROM approval_requests WHERE algorithm = ? AND state = ? LIMIT 1",
            (algorithm, PENDING),
        ).fetchone()
        return row is not None


class ApprovalsMixin(provider_pb2_grpc.ProviderServiceServicer):
    """The approval requests' RPCs, for ProviderServicer."""

    # Set by ProviderServicer.__init__.
    config: ProviderConfig
    store: ProviderStore
    auth: Authenticator
    audit: AuditLog
    approvals: ApprovalBook

    if TYPE_CHECKING:

        async def _dataset(self, name: str, field: str = "name") -> pb.Dataset: ...

        async def _dataset_with_files(
            self, name: str, field: str = "name"
        ) -> tuple[pb.Dataset, list[FileSource]]: ...

        async def _algorithm(self, name: str, field: str = "name") -> pb.Algorithm: ...

        async def _algorithm_with_code(
            self, name: str, field: str = "name"
        ) -> tuple[pb.Algorithm, bytes]: ...

        async def _job(self, name: str, owner: str) -> job_pb2.Job: ...

        async def _environment(self, name: str) -> job_pb2.Environment: ...

        async def _launch(self, plan: JobPlan) -> job_pb2.Job: ...

    async def _approval_request(self, name: str, caller: Caller) -> pb.ApprovalRequest:
        """The request, if the caller made it or is an owner; NOT_FOUND otherwise, as for an
        unknown one, so that nobody learns what others asked for."""
        found = await self.approvals.get(_request_id(name))
        if found is None or (
            caller.address not in self.config.owners and found.requester != caller.address
        ):
            raise NotFound(f"no approval request {name}", reason="APPROVAL_REQUEST_NOT_FOUND")
        return found

    async def _pending_request(self, name: str, caller: Caller) -> pb.ApprovalRequest:
        request = await self._approval_request(name, caller)
        if request.state != PENDING:
            state = pb.ApprovalState.Name(request.state).removeprefix("APPROVAL_STATE_").lower()
            raise FailedPrecondition(
                f"{name} is {state}, no longer pending", reason="APPROVAL_REQUEST_NOT_PENDING"
            )
        return request

    async def CreateApprovalRequest(
        self, request: pb.CreateApprovalRequestRequest, context: Context
    ) -> pb.CreateApprovalRequestResponse:
        caller = await self.auth.signed(context, "CreateApprovalRequest", request)
        request_fields.check_request_id(request.request_id)
        previous = await self.store.request_resource(caller.address, request.request_id)
        if previous is not None:
            return pb.CreateApprovalRequestResponse(
                approval_request=await self._approval_request(previous, caller)
            )
        async with self.audit.refusals(caller.address, "approval.create", request.dataset):
            _check_text(request.message, "message")
            dataset = await self._dataset(request.dataset, "dataset")
            algorithm = await self._algorithm(request.algorithm, "algorithm")
            try:
                check_trusted(dataset, algorithm)
            except PermissionDenied:
                pass
            else:
                raise FailedPrecondition(
                    f"{dataset.name} trusts {algorithm.did} already",
                    reason="ALGORITHM_ALREADY_TRUSTED",
                )
            parameters.job_values(algorithm, json_format.MessageToDict(request.parameters), [])
            approval = pb.ApprovalRequest(
                name=f"approvalRequests/{secrets.token_hex(16)}",
                dataset=dataset.name,
                algorithm=algorithm.name,
                algorithm_did=algorithm.did,
                files_checksum=algorithm.files_checksum,
                container_section_checksum=algorithm.container_section_checksum,
                requester=caller.address,
                message=request.message,
                parameters=request.parameters,
                state=PENDING,
            )
            approval.create_time.GetCurrentTime()
            created = await self.approvals.create(approval)
        await self.store.remember_request(caller.address, request.request_id, created.name)
        if created.name == approval.name:
            await self.audit.record(
                caller.address,
                "approval.create",
                created.name,
                allowed=True,
                details=_audit_details(created),
            )
            log.info("approval requested", approval_request=created.name)
        return pb.CreateApprovalRequestResponse(approval_request=created)

    async def ListApprovalRequests(
        self, request: pb.ListApprovalRequestsRequest, context: Context
    ) -> pb.ListApprovalRequestsResponse:
        caller = await self.auth.reader(context, "ListApprovalRequests", request)
        if request.dataset:
            job_facts.parse_name(request.dataset, "datasets", "dataset")
        size = request_fields.page_size(request.page_size)
        rows = await self.approvals.page(
            dataset=request.dataset,
            state=request.state,
            requester=None if caller.address in self.config.owners else caller.address,
            before=request_fields.page_position(request.page_token),
            limit=size + 1,
        )
        approval_requests, token = request_fields.one_page(rows, size)
        return pb.ListApprovalRequestsResponse(
            approval_requests=approval_requests, next_page_token=token
        )

    async def GetApprovalRequest(
        self, request: pb.GetApprovalRequestRequest, context: Context
    ) -> pb.GetApprovalRequestResponse:
        caller = await self.auth.reader(context, "GetApprovalRequest", request)
        return pb.GetApprovalRequestResponse(
            approval_request=await self._approval_request(request.name, caller)
        )

    async def ApproveApprovalRequest(
        self, request: pb.ApproveApprovalRequestRequest, context: Context
    ) -> pb.ApproveApprovalRequestResponse:
        caller = await self.auth.signed(context, "ApproveApprovalRequest", request)
        async with self.audit.refusals(caller.address, "approval.approve", request.name):
            require_owner(caller, self.config.owners, "approve approval requests")
            _check_text(request.note, "note")
            approval = await self._pending_request(request.name, caller)
            if _checksums(request) != _checksums(approval):
                raise FailedPrecondition(
                    f"the checksums are not the ones {approval.name} pinned: review the "
                    "algorithm as the request names it",
                    reason="CHECKSUMS_NOT_THE_REQUESTS",
                )
            _check_unchanged(await self._algorithm(approval.algorithm, "algorithm"), approval)
            dataset = await self._trust(approval)
            decided = await self.approvals.decide(
                _request_id(approval.name),
                state=pb.APPROVAL_STATE_APPROVED,
                note=request.note,
                decided_by=caller.address,
                policy_version=dataset.policy_version,
            )
        await self.audit.record(
            caller.address,
            "approval.approve",
            decided.name,
            allowed=True,
            details={**_audit_details(decided), "policy_version": decided.policy_version},
        )
        log.info("approval granted", approval_request=decided.name, dataset=decided.dataset)
        return pb.ApproveApprovalRequestResponse(approval_request=decided, dataset=dataset)

    async def _trust(self, approval: pb.ApprovalRequest) -> pb.Dataset:
        """Adds the request's algorithm, pinned by its checksums, to the dataset's trusted
        algorithms as a new policy version, in place of an entry for an older version of it
        (which would refuse the new one). No await suspends between the read and the write
        (mesh.sqlite), so no other change of the policy comes between them."""
        dataset = await self._dataset(approval.dataset)
        policy = pb.ComputePolicy()
        policy.CopyFrom(dataset.policy)
        kept = [t for t in policy.publisher_trusted_algorithms if t.did != approval.algorithm_did]
        del policy.publisher_trusted_algorithms[:]
        policy.publisher_trusted_algorithms.extend(kept)
        policy.publisher_trusted_algorithms.add(
            did=approval.algorithm_did,
            files_checksum=approval.files_checksum,
            container_section_checksum=approval.container_section_checksum,
        )
        return await self.store.update_dataset_policy(
            job_facts.parse_name(approval.dataset, "datasets"), policy, dataset.policy_version
        )

    async def RejectApprovalRequest(
        self, request: pb.RejectApprovalRequestRequest, context: Context
    ) -> pb.RejectApprovalRequestResponse:
        caller = await self.auth.signed(context, "RejectApprovalRequest", request)
        async with self.audit.refusals(caller.address, "approval.reject", request.name):
            require_owner(caller, self.config.owners, "reject approval requests")
            _check_text(request.reason, "reason", required=True)
            approval = await self._pending_request(request.name, caller)
            decided = await self.approvals.decide(
                _request_id(approval.name),
                state=pb.APPROVAL_STATE_REJECTED,
                note=request.reason,
                decided_by=caller.address,
            )
        await self.audit.record(
            caller.address,
            "approval.reject",
            decided.name,
            allowed=True,
            details=_audit_details(decided),
        )
        log.info("approval rejected", approval_request=decided.name, dataset=decided.dataset)
        return pb.RejectApprovalRequestResponse(approval_request=decided)

    async def RunApprovalSample(
        self, request: pb.RunApprovalSampleRequest, context: Context
    ) -> pb.RunApprovalSampleResponse:
        caller = await self.auth.signed(context, "RunApprovalSample", request)
        request_fields.check_request_id(request.request_id)
        async with self.audit.refusals(caller.address, "approval.sample", request.name):
            require_owner(caller, self.config.owners, "run approval samples")
            previous = await self.store.request_resource(caller.address, request.request_id)
            if previous is not None:
                return pb.RunApprovalSampleResponse(job=await self._job(previous, caller.address))
            approval = await self._pending_request(request.name, caller)
            dataset = await self._dataset(approval.dataset)
            if not dataset.sample:
                raise FailedPrecondition(
                    f"{dataset.name} has no sample dataset", reason="NO_SAMPLE_DATASET"
                )
            algorithm, code = await self._algorithm_with_code(approval.algorithm, "algorithm")
            _check_unchanged(algorithm, approval)
            sample = await self._dataset_with_files(dataset.sample)
            job = await self._start_sample_job(caller, sample, algorithm, code, approval, request)
            await self.approvals.add_sample_job(_request_id(approval.name), job.name)
        await self.store.remember_request(caller.address, request.request_id, job.name)
        await self.audit.record(
            caller.address,
            "approval.sample",
            approval.name,
            allowed=True,
            details={**_audit_details(approval), "sample": dataset.sample, "job": job.name},
        )
        return pb.RunApprovalSampleResponse(job=job)

    async def _start_sample_job(
        self,
        caller: Caller,
        sample: tuple[pb.Dataset, list[FileSource]],
        algorithm: pb.Algorithm,
        code: bytes,
        approval: pb.ApprovalRequest,
        request: pb.RunApprovalSampleRequest,
    ) -> job_pb2.Job:
        """Starts the owner's job on the sample through StartCompute's own launch, with the
        parameters the consumer asked for checked against the declaration. The sample's policy
        is not consulted, and the job gets no network: it is a look at the algorithm, not a
        run the dataset's policy allowed."""
        environment = await self._environment(request.environment or "default")
        given = json_format.MessageToDict(approval.parameters)
        return await self._launch(
            JobPlan(
                owner=caller,
                datasets=[DecidedDataset(sample[0], sample[1], SAMPLE_BASIS)],
                algorithm=algorithm,
                code=code,
                entrypoint=algorithm.entrypoint,
                container=algorithm.container,
                parameters=parameters.job_values(algorithm, given, []),
                environment=environment,
                allow_network=False,
            )
        )
