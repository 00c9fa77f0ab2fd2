"""`--follow`: status changes and log lines, live, with a progress line on a terminal."""

from __future__ import annotations

import asyncio
import sys
import time

from c2d.common.v1 import job_pb2

from cli.output import describe
from mesh import jobs as job_facts
from sdk.client import Client

_SPINNER = "|/-\\"


async def follow(
    client: Client, job_ref: str, *, logs: bool = True, quiet_status: bool = False
) -> job_pb2.Job:
    """Prints every state change and log line until the job is final; returns it. With
    `quiet_status` (for --json) no state changes are printed, and log lines go to standard
    error, so that standard output stays one JSON document."""
    started = time.monotonic()
    final: job_pb2.Job | None = None
    tty = sys.stderr.isatty()
    current = "submitted"

    def progress() -> None:
        if tty:
            spin = _SPINNER[int((time.monotonic() - started) * 4) % 4]
            elapsed = time.monotonic() - started
            sys.stderr.write(f"\r{spin} {current}  {elapsed:5.1f}s\x1b[K")
            sys.stderr.flush()

    def line(text: str, stream: object = sys.stdout) -> None:
        if tty:
            sys.stderr.write("\r\x1b[K")
        print(text, file=stream, flush=True)  # type: ignore[call-overload]
        progress()

    async def watch() -> None:
        nonlocal final, current
        async for job in client.watch_job(job_ref):
            current = describe(job)
            if not quiet_status:
                line(f"[{time.monotonic() - started:6.2f}s] status: {current}", sys.stderr)
            if job_facts.is_final(job.state):
                final = job

    async def tail() -> None:
        stream = sys.stderr if quiet_status else sys.stdout
        pending = ""
        async for chunk in client.stream_logs(job_ref):
            pending += chunk.text
            *complete, pending = pending.split("\n")
            for text in complete:
                line(f"  | {text}", stream)
        if pending:
            line(f"  | {pending}", stream)

    async def spin() -> None:
        while True:
            progress()
            await asyncio.sleep(0.25)

    spinner = asyncio.create_task(spin())
    try:
        await asyncio.gather(watch(), *([tail()] if logs else []))
    finally:
        spinner.cancel()
        if tty:
            sys.stderr.write("\r\x1b[K")
    assert final is not None
    return final
