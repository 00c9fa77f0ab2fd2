"""The audit log: every decision the Provider takes, appended in order, for the node's owners.

Entries are chained. An entry's `hash` is the lowercase hex sha256 of the previous entry's
`hash` (its 64 hex characters; nothing for the first entry) followed by the RFC 8785 canonical
JSON of the entry without `hash`, in the proto3 JSON form the REST edge returns (field names
in lowerCamelCase, `sequence` as a string, `time` in RFC 3339, `outcome` by name, fields at
their default left out). So a removed, inserted or changed entry breaks every hash after it,
and anyone holding the whole listing can check it (`verify_chain`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import rfc8785
import structlog
from c2d.provider.v1 import provider_pb2 as pb
from c2d.provider.v1 import provider_pb2_grpc
from google.protobuf import json_format, struct_pb2

from mesh.errors import MeshError
from provider import request_fields
from provider.auth import Authenticator, require_owner
from provider.config import ProviderConfig

log = structlog.get_logger()
Context = grpc.aio.ServicerContext[Any, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    sequence INTEGER PRIMARY KEY,
    time_us INTEGER NOT NULL,        -- microseconds since 1970, UTC
    actor TEXT NOT NULL, action TEXT NOT NULL, resource TEXT NOT NULL,
    allowed INTEGER NOT NULL, reason TEXT NOT NULL,
    details TEXT NOT NULL,           -- JSON object
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_by_action ON audit_events (action, sequence);
CREATE INDEX IF NOT EXISTS audit_events_by_resource ON audit_events (resource, sequence);
"""

# The next sequence and the previous hash are read by the same statement that writes the
# entry: one statement is one transaction, so concurrent decisions (even from another
# connection) cannot both chain onto the same entry.
_APPEND = """
INSERT INTO audit_events (sequence, time_us, actor, action, resource, allowed, reason, details,
                          hash)
SELECT next.sequence, :time_us, :actor, :action, :resource, :allowed, :reason, :details,
       c2d_audit_hash(next.previous, next.sequence, :time_us, :actor, :action, :resource,
                      :allowed, :reason, :details)
FROM (SELECT COALESCE(MAX(sequence), 0) + 1 AS sequence,
             COALESCE((SELECT hash FROM audit_events ORDER BY sequence DESC LIMIT 1), '')
                 AS previous
      FROM audit_events) AS next
"""

# Keys that would carry what the log must never hold: where a dataset lives (as a path, a URL
# or a source's fields, provider.sources), which credential reaches it, or code.
_FORBIDDEN_DETAILS = frozenset(
    {
        "code",
        "credentials",
        "file_paths",
        "http_url",
        "location",
        "locations",
        "path",
        "paths",
        "s3_url",
        "url",
        "urls",
    }
)

DEFAULT_PAGE = 100
MOST_PAGE = 1000


class AuditChainError(ValueError):
    """The entries do not form an unbroken chain; the message names the first bad entry."""


def _event(
    sequence: int,
    time_us: int,
    actor: str,
    action: str,
    resource: str,
    allowed: int,
    reason: str,
    details: str,
    hash_: str = "",
) -> pb.AuditEvent:
    event = pb.AuditEvent(
        sequence=sequence,
        actor=actor,
        action=action,
        resource=resource,
        outcome=pb.AUDIT_OUTCOME_ALLOWED if allowed else pb.AUDIT_OUTCOME_REFUSED,
        reason=reason,
        hash=hash_,
    )
    event.time.FromMicroseconds(time_us)
    event.details.update(json.loads(details))
    return event


def entry_hash(previous_hash: str, event: pb.AuditEvent) -> str:
    """The hash `event` must carry after an entry whose hash is `previous_hash`."""
    unhashed = pb.AuditEvent()
    unhashed.CopyFrom(event)
    unhashed.ClearField("hash")
    canonical = rfc8785.dumps(json_format.MessageToDict(unhashed))
    return hashlib.sha256(previous_hash.encode() + canonical).hexdigest()


def _hash_row(previous: str, *row: Any) -> str:
    return entry_hash(previous, _event(*row))


def verify_chain(events: Iterable[pb.AuditEvent], previous_hash: str = "") -> int:
    """Checks that `events` are consecutive entries whose hashes chain, starting after the
    entry whose hash is `previous_hash` (from the first entry when empty). Returns how many
    were checked; AuditChainError at the first entry that does not fit."""
    expected_sequence = 0
    checked = 0
    for event in events:
        if expected_sequence and event.sequence != expected_sequence:
            raise AuditChainError(
                f"entry {event.sequence} follows entry {expected_sequence - 1}: entries are missing"
            )
        if not previous_hash and event.sequence != 1:
            raise AuditChainError(f"the log starts at entry {event.sequence}, not at 1")
        if event.hash != entry_hash(previous_hash, event):
            raise AuditChainError(f"entry {event.sequence} does not match its hash")
        previous_hash = event.hash
        expected_sequence = event.sequence + 1
        checked += 1
    return checked


def _safe_details(value: Any, where: str = "details") -> Any:
    """`value` without keys that could hold a dataset's location or code (a caller's slip is
    logged by the key's place, never by its value)."""
    if isinstance(value, list):
        return [_safe_details(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    kept: dict[str, Any] = {}
    for key, item in value.items():
        if key in _FORBIDDEN_DETAILS:
            log.warning("audit detail left out", key=f"{where}.{key}")
            continue
        kept[key] = _safe_details(item, f"{where}.{key}")
    return kept


class AuditLog:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)
        db.create_function("c2d_audit_hash", 9, _hash_row, deterministic=True)

    async def record(
        self,
        actor: str,
        action: str,
        resource: str,
        *,
        allowed: bool,
        reason: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        """Appends one decision. `details` must be JSON-able and never hold a dataset's
        location or an algorithm's code."""
        safe = _safe_details(details or {})
        # Checked before the insert, so a value a Struct cannot hold fails here, not inside
        # the hash function.
        struct_pb2.Struct().update(safe)
        self.db.execute(
            _APPEND,
            {
                "time_us": time.time_ns() // 1000,
                "actor": actor,
                "action": action,
                "resource": resource,
                "allowed": int(allowed),
                "reason": reason,
                "details": json.dumps(safe, sort_keys=True),
            },
        )

    @contextlib.asynccontextmanager
    async def refusals(self, actor: str, action: str, resource: str) -> AsyncIterator[None]:
        """Records each refusal raised inside (a domain error by its reason, an error of the
        Operator Service by its status) before it goes on to the caller."""
        try:
            yield
        except MeshError as error:
            await self.record(actor, action, resource, allowed=False, reason=error.reason)
            raise
        except grpc.aio.AioRpcError as error:
            await self.record(actor, action, resource, allowed=False, reason=error.code().name)
            raise

    async def events(
        self, *, action: str, resource: str, after: int, limit: int
    ) -> list[pb.AuditEvent]:
        """Entries after sequence `after`, oldest first, only of `action` and `resource` when
        they are not empty."""
        # Only the filters given, so that SQLite can use the index of each.
        clauses: list[str] = ["sequence > ?"]
        values: list[int | str] = [after]
        for column, value in (("action", action), ("resource", resource)):
            if value:
                clauses.append(f"{column} = ?")
                values.append(value)
        where = " AND ".join(clauses)
        columns = "sequence, time_us, actor, action, resource, allowed, reason, details, hash"
        query = f"SELECT {columns} FROM audit_events WHERE {where} ORDER BY sequence LIMIT ?"  # noqa: S608
        rows = self.db.execute(query, (*values, limit)).fetchall()
        return [_event(*row) for row in rows]


class AuditMixin(provider_pb2_grpc.ProviderServiceServicer):
    """ListAuditEvents, for ProviderServicer."""

    # Set by ProviderServicer.__init__.
    config: ProviderConfig
    auth: Authenticator
    audit: AuditLog

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        caller = await self.auth.reader(context, "ListAuditEvents", request)
        require_owner(caller, self.config.owners, "read the audit log")
        size = request_fields.page_size(request.page_size, default=DEFAULT_PAGE, most=MOST_PAGE)
        events = await self.audit.events(
            action=request.action,
            resource=request.resource,
            after=request_fields.page_position(request.page_token) or 0,
            limit=size + 1,
        )
        page, token = request_fields.one_page([(e.sequence, e) for e in events], size)
        return pb.ListAuditEventsResponse(events=page, next_page_token=token)
