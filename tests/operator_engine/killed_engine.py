"""What a killed engine leaves in its workspace root, and the engine that starts after it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2

from mesh import jobs as job_facts
from operator_engine.config import EngineConfig
from operator_engine.runner import Runner
from operator_engine.server import build


def leave_configuring_job(config: EngineConfig, log_name: str, log_text: str) -> Path:
    """The workspace of a job saved as CONFIGURING, with one log; returns the workspace."""
    job_id = job_facts.new_job_id()
    ws = config.workspace_root / job_id
    (ws / "logs").mkdir(parents=True)
    (ws / "logs" / log_name).write_text(log_text)
    spec = engine_pb2.JobSpec(
        job_id=job_id,
        owner="0x" + "1" * 40,
        environment="default",
        datasets=[engine_pb2.DatasetInput(id="a" * 64)],
    )
    job = job_pb2.Job(
        name=f"jobs/{job_id}", state=job_pb2.Job.STATE_CONFIGURING, environment="default"
    )
    (ws / "spec.pb").write_bytes(spec.SerializeToString())
    (ws / "job.pb").write_bytes(job.SerializeToString())
    return ws


@contextlib.asynccontextmanager
async def restarted_engine(config: EngineConfig) -> AsyncIterator[Runner]:
    """An engine on `config` (the next one, after a killed engine, on the same workspace root),
    closed again afterwards."""
    server, runner = await build(config)
    try:
        yield runner
    finally:
        await runner.close()
        await server.stop(0)
        runner.sandbox.close()


async def updates_until_final(runner: Runner, job_id: str) -> list[job_pb2.Job]:
    updates = []
    async with asyncio.timeout(10):
        async for change in runner.watch(job_id):
            updates.append(change)
    return updates
