"""Running another program from a test whose servers live in the test's own event loop: the
wait must be async, or the servers freeze."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def run(argv: list[str], *, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """Runs `argv` in the repository root; returns its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()
