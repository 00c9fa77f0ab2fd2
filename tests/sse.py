"""Server-Sent Events as a test client reads them from the REST edge."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


@dataclass
class Event:
    name: str | None
    data: str
    id: str | None
    received_at: float


async def read_events(response: httpx.Response) -> AsyncIterator[Event | str]:
    """Events as they arrive, each stamped with its arrival; comments (keepalives) as plain
    strings. Every event of the edge carries exactly one `data:` line."""
    fields: dict[str, str] = {}
    data_lines = 0
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield line
        elif line == "":
            if fields:
                assert data_lines == 1, fields
                yield Event(fields.get("event"), fields["data"], fields.get("id"), time.monotonic())
            fields, data_lines = {}, 0
        else:
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
            data_lines += key == "data"
