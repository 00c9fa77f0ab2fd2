"""The engine as a process: it refuses to start when it cannot enforce the limits, saying why,
and picks up the jobs a killed engine left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from c2d.common.v1 import job_pb2

from tests.conftest import SandboxIdentity, engine_config, needs_root
from tests.operator_engine.killed_engine import (
    leave_configuring_job,
    restarted_engine,
    updates_until_final,
)

pytestmark = needs_root


def start_engine(home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m operator_engine` with a state folder and sandbox identity of its own."""
    return subprocess.run(
        [sys.executable, "-m", "operator_engine"],
        env={
            **os.environ,
            **SandboxIdentity.new().env(),
            "C2D_HOME": str(home),
            "C2D_LOG_FORMAT": "json",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_engine_refuses_to_start_when_it_cannot_enforce_a_limit(tmp_path: Path) -> None:
    # uid 0 is root: the sandbox's uid range would collide with real users.
    run = start_engine(tmp_path, C2D_SANDBOX_UID_BASE="0")
    assert run.returncode == 2
    assert "refusing to start" in run.stderr
    assert "uid" in run.stderr.lower()


async def test_a_job_cut_off_while_configuring_ends_engine_lost_with_its_logs(
    tmp_path: Path,
) -> None:
    sandbox = SandboxIdentity.new()
    config = engine_config(tmp_path, sandbox)
    # What a killed engine leaves: the workspace of a job it was configuring.
    ws = leave_configuring_job(config, "configuration.log", "configure: started\n")
    # And a workspace too damaged to read, which is removed.
    (config.workspace_root / ("f" * 32)).mkdir()

    async with restarted_engine(config) as runner:
        entry = runner.get(ws.name)
        update = (await updates_until_final(runner, ws.name))[-1]
        assert update.state == job_pb2.Job.STATE_FAILED
        assert update.failure_reason == job_pb2.FAILURE_REASON_ENGINE_LOST
        kinds = {r.kind for r in update.results}
        assert job_pb2.ResultFile.KIND_CONFIGURATION_LOG in kinds
        assert entry.workspace.exists()
        assert not (config.workspace_root / ("f" * 32)).exists()
