"""Serving gRPC server streams over HTTP/1.1: reading a call with a timeout that does not cancel
it, a response that ends the call when the client goes away, Server-Sent Events framing and
HTTP Range parsing."""

from __future__ import annotations

import asyncio
import enum
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import proto_json

log = structlog.get_logger()


class Signal(enum.Enum):
    # The stream ended normally.
    END = "end"
    # Nothing arrived within the timeout; the call goes on.
    SILENCE = "silence"


def _retrieve(task: asyncio.Future[Any]) -> None:
    # A read left behind by a cancelled call fails; fetch its error so asyncio does not report
    # "exception was never retrieved".
    if not task.cancelled():
        task.exception()


class StreamReader:
    """Reads a unary-stream call one message at a time. A read that times out is kept, not
    cancelled, so that waiting with a timeout (for a keepalive) never loses a message or ends
    the call; `close` ends the call.

    `stopping` is a future every reader of the gateway shares, done once it shuts down: waiting
    on it costs nothing per read, where waiting on an Event would take a task each time."""

    def __init__(self, call: Any, *, stopping: asyncio.Future[None] | None = None) -> None:
        self._call = call
        self._pending: asyncio.Future[Any] | None = None
        self._stopping = stopping

    async def next(self, wait_seconds: float | None) -> Message | Signal:
        """The next message, END, or SILENCE after `wait_seconds`; raises the call's AioRpcError."""
        pending = self._pending
        if pending is None:
            pending = self._pending = asyncio.ensure_future(self._call.read())
            pending.add_done_callback(_retrieve)
        if not pending.done():
            waiting: set[asyncio.Future[Any]] = {pending}
            if self._stopping is not None:
                # The gateway is shutting down: end the stream as if it had ended, so that an
                # event stream client reconnects (elsewhere) instead of waiting for a dead server.
                waiting.add(self._stopping)
            await asyncio.wait(waiting, timeout=wait_seconds, return_when=asyncio.FIRST_COMPLETED)
            if not pending.done():
                stopped = self._stopping is not None and self._stopping.done()
                return Signal.END if stopped else Signal.SILENCE
        self._pending = None
        result = pending.result()
        if result is grpc.aio.EOF:
            return Signal.END
        message: Message = result
        return message

    def close(self) -> None:
        self._call.cancel()
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


class LiveResponse(StreamingResponse):
    """A streaming response that watches for the client's disconnect whatever the server's
    ASGI version, and always runs `on_close` (which cancels the gRPC call) at the end: a
    consumer closing a browser tab must not leave a log stream open on the Provider."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str,
        on_close: Callable[[], None],
    ) -> None:
        super().__init__(content, status_code=status_code, headers=headers, media_type=media_type)
        self._chunks = content
        self._on_close = on_close

    async def _pump(self, send: Send) -> None:
        try:
            async for chunk in self._chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            return  # the client has gone
        except Exception:
            # Too late for an error status: leave the response unfinished, so that the server
            # drops the connection and the client sees a truncated body, not a complete one.
            log.exception("stream failed after the response started")
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump: asyncio.Task[None] | None = None
        watch: asyncio.Task[None] | None = None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            pump = asyncio.create_task(self._pump(send))
            watch = asyncio.create_task(self._disconnected(receive))
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            for task in (pump, watch):
                if task is not None:
                    task.cancel()
            await asyncio.gather(
                *(t for t in (pump, watch) if t is not None), return_exceptions=True
            )
            self._on_close()
            close: Callable[[], Awaitable[None]] | None = getattr(self._chunks, "aclose", None)
            if close is not None:
                await close()


def resume_path(descriptor: Descriptor) -> tuple[str, ...] | None:
    """Where a stream message keeps the offset to resume from: a `next_offset` field, at the top
    or in one of its message fields (StreamJobLogsResponse.chunk.next_offset)."""
    if "next_offset" in descriptor.fields_by_name:
        return ("next_offset",)
    for field in descriptor.fields:
        nested = field.message_type
        if nested is not None and not field.is_repeated and "next_offset" in nested.fields_by_name:
            return (field.name, "next_offset")
    return None


def _resume_id(message: Message, path: tuple[str, ...]) -> str | None:
    current: Any = message
    for index, part in enumerate(path):
        if index < len(path) - 1 and not current.HasField(part):
            return None
        current = getattr(current, part)
    return str(current)


def compact_json(value: Any) -> str:
    # Compact and on one line: JSON escapes newlines inside strings, so `data:` needs one line.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sse_event(event: str, data: str, *, event_id: str | None = None) -> bytes:
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines += [f"event: {event}", f"data: {data}"]
    return ("\n".join(lines) + "\n\n").encode()


def message_event(message: Message, resume: tuple[str, ...] | None) -> bytes:
    data = compact_json(proto_json.to_dict(message))
    event_id = _resume_id(message, resume) if resume is not None else None
    return sse_event(message.DESCRIPTOR.name, data, event_id=event_id)


KEEPALIVE = b": keepalive\n\n"


@dataclass(frozen=True)
class ByteRange:
    """A single `Range: bytes=` request, before the size is known."""

    first: int | None  # None for a suffix range (`bytes=-N`)
    last: int | None  # inclusive; None for "to the end"

    def resolve(self, size: int) -> tuple[int, int] | None:
        """The inclusive (start, end) within a file of `size` bytes, None if unsatisfiable."""
        if self.first is None:
            if not self.last or size == 0:
                return None
            return max(size - self.last, 0), size - 1
        if self.first >= size:
            return None
        end = size - 1 if self.last is None else min(self.last, size - 1)
        return self.first, end


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None) -> ByteRange | None:
    """A single byte range, or None: a server may ignore a Range it cannot or will not serve
    (several ranges, other units, bad syntax) and send the whole file (RFC 9110 14.2)."""
    if not header:
        return None
    found = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if found is None:
        return None
    first, last = found.group(1), found.group(2)
    if not first and not last:
        return None
    if first and last and int(last) < int(first):
        return None
    return ByteRange(int(first) if first else None, int(last) if last else None)
