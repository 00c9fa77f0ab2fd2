"""Building, binding and stopping the mesh's gRPC servers.

Every service gets the same things here: the error-mapping and access-log interceptor, the
standard health service, server reflection, owner-only Unix sockets, mutual TLS on TCP ports
when configured (`mesh.tls`), and a graceful stop on SIGTERM or SIGINT that first reports
NOT_SERVING."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeAlias, TypeVar, cast

import grpc
import structlog
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh.errors import MeshError, from_rpc_error
from mesh.tls import TlsConfig

log = structlog.get_logger()

GRACE_SECONDS = 5.0
# Large enough for a 16 MiB algorithm in one request; results stream in 1 MiB chunks.
MAX_MESSAGE_BYTES = 20 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


def _status_trailer(error: MeshError) -> tuple[tuple[str, bytes], ...]:
    return (("grpc-status-details-bin", error.to_status().SerializeToString()),)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: MeshError) -> None:
    await context.abort(error.code, error.message, trailing_metadata=_status_trailer(error))


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# Lets a call in, or raises a domain error (the caller's identity, checked before the handler).
Authorize: TypeAlias = "Callable[[grpc.aio.ServicerContext[Any, Any]], None]"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to statuses, and errors of the service this one calls (`downstream`)
    to the same kind of status naming it; hides unexpected ones behind INTERNAL; writes one
    summary log line per call. With `authorize`, every call (health and reflection too) must
    pass it first."""

    def __init__(self, downstream: str = "", authorize: Authorize | None = None) -> None:
        self.downstream = downstream
        self.authorize = authorize
        # Each method's wrapped handler, made once: the server asks for it on every call.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, self.downstream, handler.unary_unary, self.authorize),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(
                    method,
                    self.downstream,
                    cast(Callable[..., AsyncIterator[Any]], handler.unary_stream),
                    self.authorize,
                ),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if self.authorize is not None and handler.stream_stream is not None:
            # Only server reflection streams requests (no RPC of the mesh does): guarded, not
            # mapped.
            return grpc.stream_stream_rpc_method_handler(
                _guard_stream_stream(
                    self.authorize, cast(Callable[..., AsyncIterator[Any]], handler.stream_stream)
                ),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if self.authorize is not None and handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _guard_stream_unary(self.authorize, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _quiet(method: str) -> bool:
    return method.startswith(("/grpc.health.", "/grpc.reflection."))


def _finish(method: str, started: float, code: str) -> None:
    if _quiet(method):
        return
    elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
    log.info("rpc", method=method, code=code, duration_ms=elapsed_ms)


def _as_mesh_error(error: Exception, downstream: str, method: str) -> MeshError:
    """What a handler's exception means to its caller. Call inside the `except` block."""
    if isinstance(error, MeshError):
        return error
    if downstream and isinstance(error, grpc.aio.AioRpcError):
        return from_rpc_error(error, service=downstream)
    log.exception("rpc failed", method=method)
    return MeshError("internal error; it has been logged")


def _wrap_unary(
    method: str,
    downstream: str,
    behavior: Callable[..., Awaitable[Any]],
    authorize: Authorize | None = None,
) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars():
            try:
                if authorize is not None:
                    authorize(context)
                response = await behavior(request, context)
            except asyncio.CancelledError:
                _finish(method, started, "CANCELLED")
                raise
            except Exception as error:
                if _is_abort(error):
                    _finish(method, started, "ABORTED_BY_HANDLER")
                    raise
                mapped = _as_mesh_error(error, downstream, method)
                _finish(method, started, mapped.code.name)
                await _abort(context, mapped)
            else:
                _finish(method, started, "OK")
                return response

    return wrapper


def _wrap_stream(
    method: str,
    downstream: str,
    behavior: Callable[..., AsyncIterator[Any]],
    authorize: Authorize | None = None,
) -> Callable[..., Any]:
    async def wrapper(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars():
            try:
                if authorize is not None:
                    authorize(context)
                async for item in behavior(request, context):
                    yield item
            except asyncio.CancelledError:
                _finish(method, started, "CANCELLED")
                raise
            except Exception as error:
                if _is_abort(error):
                    raise
                mapped = _as_mesh_error(error, downstream, method)
                _finish(method, started, mapped.code.name)
                await _abort(context, mapped)
            else:
                _finish(method, started, "OK")

    return wrapper


def _guard_stream_stream(
    authorize: Authorize, behavior: Callable[..., AsyncIterator[Any]]
) -> Callable[..., Any]:
    async def wrapper(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            authorize(context)
        except MeshError as error:
            await _abort(context, error)
        async for item in behavior(requests, context):
            yield item

    return wrapper


def _guard_stream_unary(
    authorize: Authorize, behavior: Callable[..., Awaitable[Any]]
) -> Callable[..., Any]:
    async def wrapper(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            authorize(context)
        except MeshError as error:
            await _abort(context, error)
        return await behavior(requests, context)

    return wrapper


def _is_abort(error: Exception) -> bool:
    # context.abort raises this internal exception to unwind the handler.
    return type(error).__name__ == "AbortError"


class Server:
    """A gRPC server with health and reflection, bound to one address. With `tls`, its TCP
    ports take only mutual TLS from the allowed clients, and `tls.health_listen` (if any) is a
    second, plaintext server with the health service alone."""

    def __init__(
        self,
        name: str,
        register: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
        *,
        downstream: str = "",
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        tls: TlsConfig | None = None,
    ) -> None:
        self.name = name
        self.service_names = list(service_names)
        self.tls = tls
        authorize = tls.authorize if tls is not None else None
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(downstream, authorize), *interceptors],
            options=SERVER_OPTIONS,
        )
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.address = ""
        self.health_server: grpc.aio.Server | None = None
        self.health_address = ""
        if tls is not None and tls.health_listen:
            # The same servicer, so both ports report the same status.
            self.health_server = grpc.aio.server(options=SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)

    def bind(self, address: str) -> str:
        """Binds `address` ("unix:/path" or "host:port", port 0 for any) and returns the bound
        address. A Unix socket is made owner-only: no other local user and no job can call it."""
        if address.startswith("unix:"):
            path = Path(address.removeprefix("unix:"))
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(path.parent, 0o700)
            path.unlink(missing_ok=True)
            old = os.umask(0o177)
            try:
                self.server.add_insecure_port(address)
            finally:
                os.umask(old)
            self.address = address
        else:
            self.address = self._bind_tcp(self.server, address, self.tls)
        return self.address

    def _bind_tcp(self, server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> str:
        """Binds a TCP address, with mutual TLS when `tls` is given."""
        host, _, port = address.rpartition(":")
        if tls is None:
            bound = server.add_insecure_port(address)
        elif not tls.allowed_clients:
            raise ValueError(
                f"{self.name}: C2D_TLS_ALLOWED_CLIENTS is empty, so no service could call it "
                f"on {address}"
            )
        else:
            bound = server.add_secure_port(address, tls.server_credentials())
        if bound == 0:
            raise OSError(f"{self.name}: cannot listen on {address}")
        return f"{host}:{bound if port == '0' else port}"

    async def start(self) -> None:
        await self.server.start()
        for service in [*self.service_names, ""]:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.health_server is not None and self.tls is not None:
            # Opened last, so that it never answers before the service does.
            self.health_address = self._bind_tcp(self.health_server, self.tls.health_listen, None)
            await self.health_server.start()
        log.info(
            "serving",
            server=self.name,
            address=self.address,
            tls=self.tls is not None,
            health_address=self.health_address or None,
        )

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Reports NOT_SERVING, lets calls in flight finish within `grace`, then stops."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            # Probes saw NOT_SERVING during the grace period; nothing is in flight here.
            await self.health_server.stop(0)
        if self.address.startswith("unix:"):
            Path(self.address.removeprefix("unix:")).unlink(missing_ok=True)  # noqa: ASYNC240
        log.info("stopped", server=self.name)


def stop_with_supervisor() -> None:
    """When `c2d up` started this process (it sets C2D_SUPERVISOR_PID), asks the kernel for a
    SIGTERM should the supervisor die, even by SIGKILL: no service outlives its node."""
    expected = os.environ.get("C2D_SUPERVISOR_PID")
    if not expected:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(expected):
        # The supervisor was gone before the request took effect.
        os.kill(os.getpid(), signal.SIGTERM)


async def run_until_signalled(
    server: Server,
    *,
    before_stop: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Runs a started server until SIGTERM or SIGINT, then stops it gracefully:
    `before_stop` runs while calls are still served (to end long streams), `on_stop` after."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stop_with_supervisor()
    await stop.wait()
    log.info("stopping", server=server.name)
    if before_stop is not None:
        await before_stop()
    await server.stop()
    if on_stop is not None:
        await on_stop()


_T = TypeVar("_T")


def run_service(main: Coroutine[Any, Any, _T]) -> _T:
    """Runs a service's main coroutine to its end on uvloop: an event loop in C costs each
    job's messages about a tenth less CPU than asyncio's own (measured through the REST edge,
    all four services)."""
    return uvloop.run(main)
