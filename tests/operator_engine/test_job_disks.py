"""Job disks and what the engine does around them: a pool that reuses disks instead of making
and destroying one per job, and the recovery of a job cut off while it ran on one."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from c2d.common.v1 import job_pb2

from operator_engine.disks import JobDisks
from operator_engine.mounts import mounted_under
from tests.conftest import SandboxIdentity, engine_config, needs_root
from tests.operator_engine.killed_engine import (
    leave_configuring_job,
    restarted_engine,
    updates_until_final,
)

pytestmark = needs_root

SIZE = 16 << 20


async def mounted_soon(disks: JobDisks, count: int) -> set[Path]:
    async with asyncio.timeout(20):
        while len(found := mounted_under(disks.mounts)) < count:
            await asyncio.sleep(0.02)
    return set(found)


@pytest.fixture
async def disks(tmp_path: Path) -> AsyncIterator[JobDisks]:
    pool = JobDisks(tmp_path / "disks")
    pool.check()
    try:
        yield pool
    finally:
        await pool.close(keep=set())
        assert mounted_under(tmp_path) == []


async def test_released_disks_are_reused_and_none_is_made_for_a_job(disks: JobDisks) -> None:
    disks.want(SIZE, 2)
    pool = await mounted_soon(disks, 2)
    for _ in range(4):
        disk = await disks.take(SIZE)
        assert disk in pool
        (disk / "out.txt").write_text("result")
        os.chown(disk, 1234, 1234)
        await asyncio.sleep(0.05)  # room for a refill, were one (wrongly) started
        await disks.release(disk)
        assert os.listdir(disk) == []
        info = os.stat(disk)
        assert (info.st_uid, info.st_mode & 0o777) == (0, 0o700)
    await asyncio.sleep(0.05)
    assert set(mounted_under(disks.mounts)) == pool


async def test_a_take_waits_for_the_disk_being_wiped_rather_than_making_one(
    disks: JobDisks,
) -> None:
    disks.want(SIZE, 1)
    (only,) = await mounted_soon(disks, 1)
    disk = await disks.take(SIZE)
    (disk / "left-behind").write_bytes(b"x" * 4096)
    releasing = asyncio.create_task(disks.release(disk))
    await asyncio.sleep(0)  # the wipe has started
    again = await disks.take(SIZE)
    await releasing
    assert again == only
    assert os.listdir(again) == []
    await disks.release(again)


async def test_a_job_cut_off_while_running_ends_engine_lost_with_its_outputs(
    tmp_path: Path,
) -> None:
    """RUNNING is not written to job.pb; the job's disk file says it got that far."""
    sandbox = SandboxIdentity.new()
    config = engine_config(tmp_path, sandbox)
    # What a killed engine leaves: a job that was running, its outputs on its disk.
    ws = leave_configuring_job(config, "algorithm.log", "started\n")
    disk = tmp_path / "left-disk"
    disk.mkdir()
    (disk / "partial.txt").write_text("half a result")
    (ws / "disk").write_text(str(disk))

    async with restarted_engine(config) as runner:
        updates = await updates_until_final(runner, ws.name)
        assert job_pb2.Job.STATE_CONFIGURING not in {u.state for u in updates}
        final = updates[-1]
        assert final.state == job_pb2.Job.STATE_FAILED
        assert final.failure_reason == job_pb2.FAILURE_REASON_ENGINE_LOST
        assert {"partial.txt", "algorithm.log", "publish.log"} <= {r.name for r in final.results}
