"""Domain errors, and the one place where they become gRPC statuses.

Handlers raise these; the interceptor in `mesh.server` turns them into a status with a
`google.rpc.ErrorInfo` detail, so no handler calls `context.abort` itself."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "c2d.mesh"


class MeshError(Exception):
    """An error a caller can act on. `reason` is a stable UPPER_SNAKE code; `field` names the
    request field at fault, when there is one."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field

    def to_status(self) -> status_pb2.Status:
        metadata = {"field": self.field} if self.field else {}
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=metadata
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(MeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(MeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(MeshError):
    """A conflict with a concurrent change: read again and retry."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class DataLoss(MeshError):
    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details that do not match the status: ignored
        return None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def from_rpc_error(error: grpc.aio.AioRpcError, *, service: str) -> MeshError:
    """Re-raises an error from an internal hop as the same kind of domain error, keeping its
    reason and field, so that a NOT_FOUND from the Operator Service stays NOT_FOUND for the
    consumer and a QUEUE_FULL stays QUEUE_FULL. Transport failures become UNAVAILABLE naming
    the service, never its address."""
    message = error.details() or ""
    by_code: dict[grpc.StatusCode, type[MeshError]] = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.ABORTED: Aborted,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
        grpc.StatusCode.DATA_LOSS: DataLoss,
    }
    kind = by_code.get(error.code())
    if kind is not None:
        info = _error_info(error)
        if info is None:
            return kind(message)
        return kind(message, reason=info.reason or None, field=info.metadata.get("field"))
    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"the {service} is not reachable; try again shortly")
    return MeshError(f"the {service} failed: {error.code().name}")
