"""Workspaces made ahead of time, and state files rewritten without making a file each time:
whatever a kill leaves, the state file read back is a whole version, never a mix."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from structlog.testing import capture_logs

from operator_engine import runner
from operator_engine.config import EnvironmentSpec
from operator_engine.server import build
from tests.conftest import SandboxIdentity, engine_config, needs_root


def inode(path: Path) -> int:
    return os.stat(path).st_ino


def test_rewrites_reuse_the_previous_versions_file(tmp_path: Path) -> None:
    state = tmp_path / "job.pb"
    seen: set[int] = set()
    for version in range(6):
        data = f"version {version}".encode()
        runner._write_atomic(state, data)
        assert state.read_bytes() == data
        scratch = tmp_path / "job.pb.tmp"
        if version:
            # The next temporary file is the previous version's, never the current one.
            assert inode(scratch) != inode(state)
            assert scratch.read_bytes() == f"version {version - 1}".encode()
        seen |= {inode(state)} | ({inode(scratch)} if scratch.exists() else set())
    assert len(seen) == 2, "each rewrite made a file"
    assert sorted(os.listdir(tmp_path)) == ["job.pb", "job.pb.tmp"]


def test_whatever_a_kill_left_the_next_write_is_whole(tmp_path: Path) -> None:
    state = tmp_path / "job.pb"
    scratch, previous = tmp_path / "job.pb.tmp", tmp_path / "job.pb.prev"
    runner._write_atomic(state, b"one")
    runner._write_atomic(state, b"two")
    # Killed after keeping the old version by a second name, before the rename.
    os.link(state, previous)
    scratch.write_bytes(b"half of thr")
    runner._write_atomic(state, b"three")
    assert state.read_bytes() == b"three"
    assert inode(scratch) != inode(state) and not previous.exists()
    # Killed after the rename, before the old version became the next temporary file.
    os.link(state, previous)
    os.replace(scratch, state)  # stands for the rename of a new version
    runner._write_atomic(state, b"four")
    assert state.read_bytes() == b"four"
    assert inode(scratch) != inode(state) and not previous.exists()
    runner._write_atomic(state, b"five")
    assert state.read_bytes() == b"five"


@needs_root
async def test_the_engine_keeps_spare_workspaces_and_removes_an_earlier_engines(
    tmp_path: Path,
) -> None:
    sandbox = SandboxIdentity.new()
    config = engine_config(tmp_path, sandbox, (EnvironmentSpec(max_concurrent_jobs=2),))
    left = config.workspace_root / ".spare-0123"
    (left / "logs").mkdir(parents=True)
    with capture_logs() as events:
        server, engine = await build(config)
    try:
        assert not left.exists()
        assert not [e for e in events if e["log_level"] == "warning"], events
        async with asyncio.timeout(10):
            while len(spares := list(config.workspace_root.glob(".spare-*"))) < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert len(list(config.workspace_root.glob(".spare-*"))) == 2
        for spare in spares:
            assert (spare / "job.pb.tmp").exists() and (spare / "transformations").is_dir()
            assert not (spare / "logs" / "algorithm.log").exists()
            assert os.stat(spare).st_mode & 0o777 == 0o700
    finally:
        await engine.close()
        await server.stop(0)
        engine.sandbox.close()
