"""The REST edge: serves the Provider's gRPC API as JSON over HTTP/1.1.

Every request is transcoded to one gRPC call on a channel to the Provider. Routes come from the
`google.api.http` annotations; unary calls answer JSON, server streams answer Server-Sent
Events, and `DownloadResult` answers the file's raw bytes with HTTP Range support."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
import uvicorn
from c2d.common.v1 import job_pb2
from c2d.provider.v1 import provider_pb2, provider_pb2_grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from gateway import proto_json
from gateway.config import GatewayConfig
from gateway.errors import HTTP_STATUS, HttpError, error_body
from gateway.openapi import build_openapi
from gateway.routes import CREDENTIAL_HEADERS, Kind, Route, RouteTable, build_request, routes_for
from gateway.streams import (
    KEEPALIVE,
    LiveResponse,
    Signal,
    StreamReader,
    compact_json,
    message_event,
    parse_range,
    resume_path,
    sse_event,
)
from mesh.server import stop_with_supervisor

log = structlog.get_logger()

PROVIDER_SERVICE = provider_pb2.DESCRIPTOR.services_by_name["ProviderService"]

# A PublishAlgorithm body holds up to 16 MiB of code as base64, a third larger.
MAX_BODY_BYTES = 24 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 20 * 1024 * 1024),
    ("grpc.max_receive_message_length", 20 * 1024 * 1024),
]
# Event streams hold their headers back this long for the first message, so that a call the
# Provider refuses at once (NOT_FOUND, UNAUTHENTICATED) gets its HTTP status rather than a 200
# followed by an error event. After it the stream opens with a keepalive.
_FIRST_EVENT_WAIT_SECONDS = 1.0
_HEALTH_TIMEOUT_SECONDS = 3.0
# The catch-all route takes every method, so that the annotations decide between 404 and 405.
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RESULT_NAME = re.compile(r"(jobs/[^/]+)/results/(\d+)")
_ALGORITHM_NAME = re.compile(r"algorithms/[^/]+")


@dataclass(frozen=True)
class _FileFacts:
    """What a download's headers say about the file."""

    name: str
    size_bytes: int
    sha256: str


def _json(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status_code, headers=headers)


def _error_response(error: HttpError) -> Response:
    return _json(error.body(), error.http_code, error.headers)


def _to_json(message: Message) -> dict[str, Any]:
    # lowerCamelCase names and enum names as strings: the proto3 JSON mapping.
    rendered: dict[str, Any] = proto_json.to_dict(message)
    return rendered


class Gateway:
    """Owns the channel to the Provider and answers every transcoded request."""

    def __init__(
        self,
        provider_target: str,
        *,
        channel: grpc.aio.Channel | None,
        services: Sequence[ServiceDescriptor],
        call_timeout_seconds: float,
        keepalive_seconds: float,
    ) -> None:
        self.provider_target = provider_target
        self.services = list(services)
        self.routes = RouteTable(routes_for(self.services))
        self.openapi = build_openapi(self.routes.routes, self.services)
        self.call_timeout = call_timeout_seconds
        self.keepalive = keepalive_seconds
        self._channel = channel
        self._owns_channel = channel is None
        # Made with the channel it calls on, and dropped with it.
        self._provider: provider_pb2_grpc.ProviderServiceAsyncStub | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._own_endpoints: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/healthz": self.healthz,
            "/openapi.json": self.openapi_json,
        }

    @property
    def channel(self) -> Any:
        # Made on first use, inside the server's event loop, which grpc.aio binds it to.
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.provider_target, options=_CHANNEL_OPTIONS
            )
        return self._channel

    @property
    def provider(self) -> provider_pb2_grpc.ProviderServiceAsyncStub:
        """The Provider's own stub, for the reads the gateway makes beside a transcoded call."""
        if self._provider is None:
            channel: grpc.aio.Channel = self.channel
            self._provider = provider_pb2_grpc.ProviderServiceStub(channel)
        return self._provider

    @property
    def stopping(self) -> asyncio.Future[None]:
        """Done once the gateway stops: every event stream waits on it."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
        return self._stopping

    def stop_streams(self) -> None:
        """Ends every event stream, so a graceful stop does not wait for jobs to finish."""
        if not self.stopping.done():
            self.stopping.set_result(None)

    async def close(self) -> None:
        self.stop_streams()
        if self._owns_channel and self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._provider = None

    # -- requests ---------------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        try:
            own = self._own_endpoints.get(request.url.path)
            if own is not None:
                if request.method not in ("GET", "HEAD"):
                    raise HttpError.local(
                        grpc.StatusCode.UNIMPLEMENTED,
                        f"{request.method} is not allowed on {request.url.path}; allowed: GET",
                        reason="METHOD_NOT_ALLOWED",
                        http_code=405,
                        headers={"Allow": "GET"},
                    )
                return await own(request)
            route, path_values = self.routes.find(request.method, request.url.path)
            body = await _read_body(request) if route.body else b""
            message = build_request(route, path_values, request.query_params.multi_items(), body)
            metadata = _metadata(request)
            if route.kind is Kind.UNARY:
                return await self._unary(route, message, metadata)
            if route.kind is Kind.EVENTS:
                return await self._events(route, message, metadata, request)
            return await self._download(route, message, metadata, request)
        except HttpError as error:
            return _error_response(error)

    async def _unary(
        self, route: Route, message: Message, metadata: tuple[tuple[str, str], ...]
    ) -> Response:
        call = self.channel.unary_unary(
            route.grpc_path,
            request_serializer=route.request_class.SerializeToString,
            response_deserializer=route.response_class.FromString,
        )
        try:
            response = await call(message, metadata=metadata, timeout=self.call_timeout)
        except grpc.aio.AioRpcError as error:
            raise HttpError.from_rpc_error(error) from None
        return _json(_to_json(response))

    def _start_stream(
        self,
        route: Route,
        message: Message,
        metadata: tuple[tuple[str, str], ...],
        *,
        end_on_stop: bool,
    ) -> StreamReader:
        # No deadline: a stream lasts as long as its job, which the Provider bounds; the call
        # is cancelled as soon as the HTTP client goes away.
        call = self.channel.unary_stream(
            route.grpc_path,
            request_serializer=route.request_class.SerializeToString,
            response_deserializer=route.response_class.FromString,
        )(message, metadata=metadata)
        # Event streams end when the gateway stops (clients reconnect); a download must not
        # look complete when cut short, so it is left to the graceful shutdown period.
        return StreamReader(call, stopping=self.stopping if end_on_stop else None)

    async def _events(
        self,
        route: Route,
        message: Message,
        metadata: tuple[tuple[str, str], ...],
        request: Request,
    ) -> Response:
        last_event_id = request.headers.get("last-event-id")
        if last_event_id and "offset" in route.method.input_type.fields_by_name:
            try:
                offset = int(last_event_id, 10)
            except ValueError:
                raise HttpError.local(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Last-Event-ID must be a log offset (an integer), not {last_event_id!r}",
                    reason="INVALID_FIELD",
                    field="offset",
                ) from None
            message.offset = offset  # type: ignore[attr-defined]
        reader = self._start_stream(route, message, metadata, end_on_stop=True)
        try:
            first = await reader.next(_FIRST_EVENT_WAIT_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise HttpError.from_rpc_error(error) from None
        except BaseException:
            reader.close()
            raise
        resume = resume_path(route.method.output_type)
        return LiveResponse(
            self._event_chunks(reader, first, resume),
            media_type="text/event-stream; charset=utf-8",
            headers={
                "Cache-Control": "no-cache, no-store",
                # Tells nginx-like proxies not to buffer: events must reach clients at once.
                "X-Accel-Buffering": "no",
            },
            on_close=reader.close,
        )

    async def _event_chunks(
        self, reader: StreamReader, first: Message | Signal, resume: tuple[str, ...] | None
    ) -> AsyncIterator[bytes]:
        item = first
        while item is not Signal.END:
            if item is Signal.SILENCE:
                yield KEEPALIVE
            else:
                assert isinstance(item, Message)
                yield message_event(item, resume)
            try:
                item = await reader.next(self.keepalive)
            except grpc.aio.AioRpcError as error:
                failure = HttpError.from_rpc_error(error)
                yield sse_event("error", compact_json(failure.body()))
                return

    async def _download(
        self,
        route: Route,
        message: Message,
        metadata: tuple[tuple[str, str], ...],
        request: Request,
    ) -> Response:
        name: str = message.name  # type: ignore[attr-defined]
        facts = await self._file_facts(name, metadata, request)
        filename = (facts.name if facts is not None else name).rpartition("/")[2]
        headers = {
            # Results are untrusted bytes written by an algorithm: never render them inline,
            # and name them safely (no path, no quotes).
            "Content-Disposition": f'attachment; filename="{_safe_filename(filename)}"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
        }
        size: int | None = None
        if facts is not None:
            size = facts.size_bytes
            headers["Accept-Ranges"] = "bytes"
            if facts.sha256:
                headers["ETag"] = f'"{facts.sha256}"'
        status_code = 200
        start: int = message.offset  # type: ignore[attr-defined]
        end: int | None = None  # inclusive
        wanted = parse_range(request.headers.get("range"))
        if_range = request.headers.get("if-range")
        if wanted is not None and if_range and if_range != headers.get("ETag"):
            wanted = None  # the file changed since the client's partial copy: send it whole
        if wanted is not None:
            if size is None:
                raise HttpError.local(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "a Range request needs a bearer token (authorization header), with which "
                    "the gateway reads the result's size; with a signature, resume with the "
                    "`offset` query parameter instead",
                    reason="RANGE_NEEDS_TOKEN",
                    field="offset",
                )
            resolved = wanted.resolve(size)
            if resolved is None:
                raise HttpError.local(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"the range is past the end of the result ({size} bytes)",
                    reason="RANGE_NOT_SATISFIABLE",
                    http_code=416,
                    headers={"Content-Range": f"bytes */{size}"},
                )
            start, end = resolved
            status_code = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            message.offset = start  # type: ignore[attr-defined]
        if size is not None:
            last = size - 1 if end is None else end
            headers["Content-Length"] = str(max(last - start + 1, 0))

        reader = self._start_stream(route, message, metadata, end_on_stop=False)
        try:
            # Nothing is sent before the first chunk, so that a refusal keeps its HTTP status.
            first = await reader.next(self.call_timeout)
        except grpc.aio.AioRpcError as error:
            raise HttpError.from_rpc_error(error) from None
        except BaseException:
            reader.close()
            raise
        if first is Signal.SILENCE:
            reader.close()
            raise HttpError.local(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the Provider did not start sending the result in time",
                reason="DEADLINE_EXCEEDED",
            )
        limit = None if end is None else end - start + 1
        return LiveResponse(
            self._download_chunks(reader, first, limit),
            status_code=status_code,
            headers=headers,
            media_type="application/octet-stream",
            on_close=reader.close,
        )

    async def _download_chunks(
        self, reader: StreamReader, first: Message | Signal, limit: int | None
    ) -> AsyncIterator[bytes]:
        item = first
        while isinstance(item, Message):
            data: bytes = item.data  # type: ignore[attr-defined]
            if limit is not None:
                data = data[:limit]
                limit -= len(data)
            if data:
                yield data
            if limit == 0:
                return  # a closed range is complete; on_close cancels the rest of the call
            # A chunk must come within the deadline once the transfer has begun; a stall past
            # it breaks the download (the client sees a truncated body) instead of hanging.
            item = await reader.next(self.call_timeout)
            if item is Signal.SILENCE:
                raise TimeoutError("the Provider stopped sending the result")

    async def _file_facts(
        self, name: str, metadata: tuple[tuple[str, str], ...], request: Request
    ) -> _FileFacts | None:
        """The size, sha256 and name of what is downloaded, which Range needs and the download
        stream does not carry; None when the gateway cannot learn them."""
        if _ALGORITHM_NAME.fullmatch(name):
            try:
                found = await self.provider.GetAlgorithm(
                    provider_pb2.GetAlgorithmRequest(name=name), timeout=self.call_timeout
                )
            except grpc.aio.AioRpcError as error:
                raise HttpError.from_rpc_error(error) from None
            # An algorithm is one file, so its files checksum is its content's sha256.
            algorithm = found.algorithm
            return _FileFacts("algorithm", algorithm.size_bytes, algorithm.files_checksum)
        # A result's facts come from GetJob under the caller's own credentials: a token can be
        # used twice, a signature (good for one call only) cannot.
        if not request.headers.get("authorization"):
            return None
        result = await self._result(name, metadata)
        return _FileFacts(result.name, result.size_bytes, result.sha256)

    async def _result(self, name: str, metadata: tuple[tuple[str, str], ...]) -> job_pb2.ResultFile:
        found = _RESULT_NAME.fullmatch(name)
        if found is None:
            raise HttpError.local(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name!r} is not a result name (jobs/{{job}}/results/{{index}})",
                reason="INVALID_FIELD",
                field="name",
            )
        try:
            response = await self.provider.GetJob(
                provider_pb2.GetJobRequest(name=found.group(1)),
                metadata=metadata,
                timeout=self.call_timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise HttpError.from_rpc_error(error) from None
        for result in response.job.results:
            if result.index == int(found.group(2)):
                return result
        raise HttpError.local(
            grpc.StatusCode.NOT_FOUND,
            f"{found.group(1)} has no result {found.group(2)}",
            reason="NOT_FOUND",
            field="name",
        )

    # -- service endpoints -----------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """200 when the Provider's health service says SERVING, else 503."""
        check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        status = "UNKNOWN"
        # The Provider's own service first; "" (the whole server) if it does not list it.
        for service in [*(s.full_name for s in self.services), ""]:
            try:
                response = await check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=_HEALTH_TIMEOUT_SECONDS,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    continue
                status = "UNREACHABLE"
                break
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            break
        return _json({"status": status}, 200 if status == "SERVING" else 503)

    async def openapi_json(self, request: Request) -> Response:
        return _json(self.openapi)


def _safe_filename(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    return cleaned or "result"


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """The credential headers, as gRPC metadata, plus the request id for the Provider's logs."""
    entries: list[tuple[str, str]] = []
    for name in CREDENTIAL_HEADERS:
        for value in request.headers.getlist(name):
            # gRPC metadata is printable ASCII; anything else could not be signed anyway.
            if not (value.isascii() and value.isprintable()):
                raise HttpError.local(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"header {name} must be printable ASCII",
                    reason="INVALID_HEADER",
                    field=name,
                )
            entries.append((name, value))
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if isinstance(request_id, str):
        entries.append(("x-request-id", request_id))
    return tuple(entries)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    too_large = HttpError.local(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the body is larger than {MAX_BODY_BYTES} bytes",
        reason="BODY_TOO_LARGE",
        http_code=413,
    )
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class AccessLog:
    """One summary line per request, with the request id bound for every line in between."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                given = value.decode("latin-1")
        # A client's id is kept only when it is tame: it goes into logs and gRPC metadata.
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                log.info(
                    "http",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own errors (a method no route takes) in the same JSON error shape.
    assert isinstance(exc, HTTPException)
    code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(
        exc.status_code, grpc.StatusCode.UNKNOWN
    )
    error = HttpError.local(code, str(exc.detail), reason="HTTP_ERROR", http_code=exc.status_code)
    return _json(error.body(), exc.status_code, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("request failed", exc_info=exc)
    status = HttpError.local(grpc.StatusCode.INTERNAL, "internal error", reason="INTERNAL").status
    return _json(error_body(status, HTTP_STATUS[grpc.StatusCode.INTERNAL]), 500)


def create_app(
    provider_target: str,
    *,
    channel: grpc.aio.Channel | None = None,
    call_timeout_seconds: float = 30.0,
    keepalive_seconds: float = 15.0,
    services: Sequence[ServiceDescriptor] = (PROVIDER_SERVICE,),
) -> Starlette:
    """The ASGI app serving `services` (the Provider's by default) over REST.

    `provider_target` is "host:port" or "unix:/path"; the channel to it is made on first use
    unless `channel` is given (then the caller owns it and closes it)."""
    gateway = Gateway(
        provider_target,
        channel=channel,
        services=services,
        call_timeout_seconds=call_timeout_seconds,
        keepalive_seconds=keepalive_seconds,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await gateway.close()

    app = Starlette(
        routes=[
            # One route: /healthz, /openapi.json, then the annotations, which answer 404/405.
            StarletteRoute("/{path:path}", gateway.dispatch, methods=_ALL_METHODS),
        ],
        middleware=[Middleware(AccessLog)],
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app


class _Server(uvicorn.Server):
    # The owner of the process installs its own signal handlers (see `serve`); uvicorn's would
    # re-raise the signal after stopping and make a clean stop look like a crash.
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class BackgroundServer:
    """A gateway running in this event loop on an ephemeral port, for tests and embedding."""

    host: str
    port: int
    _server: _Server
    _task: asyncio.Task[None]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        _gateway_of(self._server).stop_streams()
        self._server.should_exit = True
        await self._task


def _gateway_of(server: uvicorn.Server) -> Gateway:
    app: Any = server.config.app
    gateway: Gateway = app.state.gateway
    return gateway


def _uvicorn_config(app: Starlette, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,  # AccessLog writes the one line per request
        # Nothing here reads the client's address: no X-Forwarded-* rewriting on each request.
        proxy_headers=False,
        timeout_graceful_shutdown=5,
        **kwargs,
    )


async def run_in_background(
    app: Starlette, host: str = "127.0.0.1", port: int = 0
) -> BackgroundServer:
    """Starts `app` with uvicorn on `host:port` (0 for any free port) and returns once it
    accepts connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Named TCP so that asyncio sets TCP_NODELAY on each accepted connection (it checks the
    # protocol number, which a plain socket() leaves at 0): without it, a response written in
    # two parts on a kept-alive connection waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = _Server(_uvicorn_config(app))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            await task  # raises why it could not start
            raise RuntimeError("the gateway stopped while starting")
        await asyncio.sleep(0.01)
    return BackgroundServer(host, sock.getsockname()[1], server, task)


def _listen_kwargs(listen: str) -> dict[str, Any]:
    if listen.startswith("unix:"):
        return {"uds": listen.removeprefix("unix:")}
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address must be host:port or unix:/path, not {listen!r}")
    return {"host": host.strip("[]"), "port": int(port)}


async def serve(config: GatewayConfig) -> None:
    """Runs the gateway until SIGTERM or SIGINT, then ends event streams, lets requests in
    flight finish within the grace period and closes the channel."""
    app = create_app(
        config.provider_address,
        call_timeout_seconds=config.call_timeout_seconds,
        keepalive_seconds=config.keepalive_seconds,
    )
    server = _Server(_uvicorn_config(app, **_listen_kwargs(config.listen)))
    gateway = _gateway_of(server)

    def stop() -> None:
        log.info("stopping", listen=config.listen)
        gateway.stop_streams()
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    stop_with_supervisor()
    log.info("serving", listen=config.listen, provider=config.provider_address)
    try:
        await server.serve()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
