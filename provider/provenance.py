"""Provenance records: what ran on what, under which policy, and what it produced, signed by the
provider's key (the document format is mesh.provenance's).

StartCompute keeps the facts it decided (`job_started`); once the job is final the first
GetProvenance, or DeleteJob, adds what the job became and its results, signs the record and
stores the document, which is then returned byte for byte ever after, also once the job is
deleted."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import sqlite3
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2 as pb
from c2d.provider.v1 import provider_pb2_grpc
from google.protobuf import timestamp_pb2

from mesh import jobs as job_facts
from mesh.errors import FailedPrecondition, NotFound
from mesh.provenance import RECORD_VERSION, check_record_values, sign_document
from provider.auth import Authenticator, Caller
from provider.config import ProviderConfig
from sdk.keys import Key

log = structlog.get_logger()
Context = grpc.aio.ServicerContext[Any, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_facts (
    job TEXT PRIMARY KEY,            -- jobs/{job}
    facts TEXT NOT NULL              -- JSON: what the Provider decided at StartCompute
);
CREATE TABLE IF NOT EXISTS provenance_documents (
    job TEXT PRIMARY KEY,            -- jobs/{job}
    document BLOB NOT NULL,          -- the signed canonical JSON, returned as it is
    readers TEXT NOT NULL            -- JSON list: the job's owner and viewers, lowercase
);
"""


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    """RFC 3339 in UTC; empty when the job never got there."""
    return stamp.ToJsonString() if stamp.seconds or stamp.nanos else ""


def _outcome(job: job_pb2.Job) -> dict[str, Any]:
    """What the job became: the part of the record only known once it is final."""
    return {
        "job": job.name,
        "state": job_pb2.Job.State.Name(job.state),
        "failure_reason": job_pb2.FailureReason.Name(job.failure_reason),
        "exit_code": job.exit_code,
        "create_time": _time(job.create_time),
        "start_time": _time(job.start_time),
        "end_time": _time(job.end_time),
        "results": [
            {
                "index": r.index,
                "name": r.name,
                "kind": job_pb2.ResultFile.Kind.Name(r.kind),
                "size_bytes": r.size_bytes,
                "sha256": r.sha256,
            }
            for r in job.results
        ],
    }


class ProvenanceBook:
    def __init__(self, db: sqlite3.Connection, key: Key) -> None:
        self.db = db
        self.key = key
        db.executescript(_SCHEMA)

    async def job_started(self, job: str, facts: dict[str, Any]) -> None:
        """Keeps what the Provider decided when it started `job` (see the facts' layout in
        StartCompute). They must hold no floats or nulls: the signed record cannot."""
        check_record_values(facts, "facts")
        self.db.execute(
            "INSERT OR REPLACE INTO job_facts (job, facts) VALUES (?, ?)",
            (job, json.dumps(facts, sort_keys=True)),
        )

    async def document(self, job: str) -> tuple[str, frozenset[str]] | None:
        """The job's signed document and who may read it; None until it is sealed."""
        row = self.db.execute(
            "SELECT document, readers FROM provenance_documents WHERE job = ?", (job,)
        ).fetchone()
        if row is None:
            return None
        return bytes(row[0]).decode(), frozenset(json.loads(row[1]))

    async def seal(self, job: job_pb2.Job) -> str | None:
        """Signs and stores the record of the final `job`, unless it was sealed already;
        returns the stored document. None when no facts were kept for it."""
        row = self.db.execute("SELECT facts FROM job_facts WHERE job = ?", (job.name,)).fetchone()
        if row is None:
            return None
        record = {
            **json.loads(row[0]),
            **_outcome(job),
            "version": RECORD_VERSION,
            "provider": self.key.address,
        }
        readers = sorted({a.lower() for a in (job.owner, *job.viewers)})
        # The first document stored stays: a second caller racing this one gets the same bytes.
        self.db.execute(
            "INSERT OR IGNORE INTO provenance_documents (job, document, readers) VALUES (?, ?, ?)",
            (job.name, sign_document(record, self.key.private_key), json.dumps(readers)),
        )
        stored = await self.document(job.name)
        assert stored is not None
        log.info("provenance sealed", results=len(job.results))
        return stored[0]


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("c2d-mesh")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class ProvenanceMixin(provider_pb2_grpc.ProviderServiceServicer):
    """GetProvenance and GetProviderInfo, for ProviderServicer."""

    # Set by ProviderServicer.__init__.
    config: ProviderConfig
    auth: Authenticator
    provenance: ProvenanceBook

    if TYPE_CHECKING:

        async def _job(self, name: str, owner: str) -> job_pb2.Job: ...

    async def GetProviderInfo(
        self, request: pb.GetProviderInfoRequest, context: Context
    ) -> pb.GetProviderInfoResponse:
        return pb.GetProviderInfoResponse(
            address=self.provenance.key.address,
            owners=sorted(self.config.owners),
            version=_version(),
        )

    async def GetProvenance(
        self, request: pb.GetProvenanceRequest, context: Context
    ) -> pb.GetProvenanceResponse:
        caller = await self.auth.reader(context, "GetProvenance", request)
        job_id = job_facts.parse_name(request.name, "jobs")
        structlog.contextvars.bind_contextvars(job_id=job_id)
        stored = await self.provenance.document(request.name)
        if stored is not None:
            document, readers = stored
            if caller.address.lower() not in readers:
                raise NotFound("no such job", reason="JOB_NOT_FOUND")
            return pb.GetProvenanceResponse(document=document)
        # The Operator Service answers only the job's owner and viewers: NOT_FOUND for others.
        job = await self._job(request.name, caller.address)
        if not job_facts.is_final(job.state):
            raise FailedPrecondition(
                "the job is not final yet; its provenance is signed once it ends",
                reason="JOB_NOT_FINAL",
            )
        sealed = await self.provenance.seal(job)
        if sealed is None:
            raise FailedPrecondition(
                "no provenance was recorded when this job started", reason="NO_PROVENANCE"
            )
        return pb.GetProvenanceResponse(document=sealed)

    async def provenance_before_delete(self, name: str, caller: Caller) -> None:
        """Seals a final job's record before DeleteJob removes the job. A job the caller cannot
        see, or that is not final, is left to DeleteJob's own answer."""
        if await self.provenance.document(name) is not None:
            return
        structlog.contextvars.bind_contextvars(job_id=job_facts.parse_name(name, "jobs"))
        try:
            job = await self._job(name, caller.address)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise
        if job_facts.is_final(job.state) and await self.provenance.seal(job) is None:
            log.warning("job deleted without provenance: none was recorded when it started")
