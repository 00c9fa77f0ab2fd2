"""The one place where gRPC statuses become HTTP errors.

Every error the gateway answers, whether the Provider returned it or the gateway found it
itself (a bad body, an unknown route), is a `google.rpc.Status` first and is rendered the same
way: `{"error": {"code", "status", "message", "details"}}` as in Google's JSON APIs."""

from __future__ import annotations

import base64
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

from mesh.errors import ERROR_DOMAIN

# Imported for its side effect too: it registers ErrorInfo and friends in the default pool,
# so that `details` can be printed as JSON with their fields rather than opaque bytes.
_ = error_details_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# The standard mapping, as in google/rpc/code.proto and grpc-gateway.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class HttpError(Exception):
    """An error to answer as JSON: a status, and the HTTP code when it is not the standard one
    for that status (405 for a wrong method, 416 for an unsatisfiable range)."""

    def __init__(
        self, status: status_pb2.Status, *, http_code: int | None = None, headers: dict[str, str]
    ) -> None:
        super().__init__(status.message)
        self.status = status
        self.http_code = http_code or HTTP_STATUS.get(code_of(status), 500)
        self.headers = headers

    @classmethod
    def local(
        cls,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str,
        field: str | None = None,
        http_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> HttpError:
        """An error found by the gateway itself, with an ErrorInfo like the Provider's own."""
        info = error_details_pb2.ErrorInfo(
            reason=reason, domain=ERROR_DOMAIN, metadata={"field": field} if field else {}
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
        return cls(status, http_code=http_code, headers=headers or {})

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> HttpError:
        return cls(status_from_rpc_error(error), headers={})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.http_code)


def code_of(status: status_pb2.Status) -> grpc.StatusCode:
    return _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)


def status_from_rpc_error(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The rich status of a failed call: the `grpc-status-details-bin` trailer when the server
    sent one (it carries the ErrorInfo), else just the code and message."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                rich = status_pb2.Status.FromString(value)
            except Exception:  # a garbled trailer must not hide the real error
                break
            # The trailer must agree with the call's own status (as grpc_status checks);
            # when it does not, the status line wins and the details are dropped.
            if rich.code == code.value[0]:
                if not rich.message:
                    rich.message = message
                return rich
            break
    return status_pb2.Status(code=code.value[0], message=message)


def _detail_json(detail: any_pb2.Any) -> dict[str, Any]:
    try:
        rendered: dict[str, Any] = json_format.MessageToDict(detail)
        return rendered
    except (TypeError, KeyError, json_format.Error):
        # A detail type this process does not know: keep it, opaque, rather than fail.
        return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode()}


def error_body(status: status_pb2.Status, http_code: int) -> dict[str, Any]:
    return {
        "error": {
            "code": http_code,
            "status": code_of(status).name,
            "message": status.message,
            "details": [_detail_json(d) for d in status.details],
        }
    }
