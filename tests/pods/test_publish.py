"""The publish stage against a hostile outputs directory: only regular files with one name are
stored, everything else is skipped and reported, caps hold, and the logs are always published."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from c2d.common.v1 import job_pb2

from mesh.storage import LocalStorage, Source, StoredObject
from pods import publish as publish_module
from pods.publish import PublishError, PublishResult, publish

REPO = Path(__file__).resolve().parents[2]
JOB = "0123456789abcdef0123456789abcdef"
Kind = job_pb2.ResultFile
ALGORITHM_LOG = b"hello from the algorithm\n"
CONFIGURATION_LOG = b"configure: job ...\nconfigure succeeded\n"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (device nodes, ownership)")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "outputs").mkdir(parents=True)
    (ws / "logs").mkdir()
    (ws / "logs" / "algorithm.log").write_bytes(ALGORITHM_LOG)
    (ws / "logs" / "configuration.log").write_bytes(CONFIGURATION_LOG)
    return ws


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def outputs(workspace: Path) -> Path:
    return workspace / "outputs"


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


async def stored_bytes(storage: LocalStorage, index: int) -> bytes:
    return b"".join([chunk async for chunk in storage.read(JOB, f"{index:04d}")])


def names(result: PublishResult) -> list[str]:
    return [r.name for r in result.results]


def outputs_of(result: PublishResult) -> list[str]:
    return [r.name for r in result.results if r.kind == Kind.KIND_OUTPUT]


async def check_consistent(storage: LocalStorage, result: PublishResult) -> None:
    """Every listed result is stored under its index with the listed size and digest."""
    assert [r.index for r in result.results] == list(range(len(result.results)))
    for entry in result.results:
        data = await stored_bytes(storage, entry.index)
        assert len(data) == entry.size_bytes
        assert hashlib.sha256(data).hexdigest() == entry.sha256


async def test_regular_files_and_nested_dirs(
    workspace: Path, outputs: Path, storage: LocalStorage
) -> None:
    big = os.urandom(3 * (1 << 20) + 17)  # several storage chunks
    write(outputs / "result.csv", b"a,b\n1,2\n")
    write(outputs / "sub" / "x.csv", b"x")
    write(outputs / "sub" / "deeper" / "model.bin", big)
    write(outputs / "a-first.txt", b"")
    write(outputs / "caf\u00e9 r\u00e9sum\u00e9.txt", b"unicode names are fine")
    (outputs / "empty-dir").mkdir()

    result = await publish(workspace, storage, JOB, max_total_bytes=100 << 20)

    assert not result.too_large
    assert result.skipped == []
    assert names(result) == [
        "a-first.txt",
        "caf\u00e9 r\u00e9sum\u00e9.txt",
        "result.csv",
        "sub/deeper/model.bin",
        "sub/x.csv",
        "algorithm.log",
        "configuration.log",
        "publish.log",
    ]
    kinds = [r.kind for r in result.results]
    assert kinds == [Kind.KIND_OUTPUT] * 5 + [
        Kind.KIND_ALGORITHM_LOG,
        Kind.KIND_CONFIGURATION_LOG,
        Kind.KIND_PUBLISH_LOG,
    ]
    model = result.results[3]
    assert model.size_bytes == len(big)
    assert model.sha256 == hashlib.sha256(big).hexdigest()
    assert await stored_bytes(storage, 3) == big
    assert await stored_bytes(storage, 5) == ALGORITHM_LOG
    assert await stored_bytes(storage, 6) == CONFIGURATION_LOG
    await check_consistent(storage, result)

    # publish.log is complete on disk and in storage, and names what was stored.
    on_disk = (workspace / "logs" / "publish.log").read_bytes()
    assert await stored_bytes(storage, 7) == on_disk
    text = on_disk.decode()
    assert f"sub/deeper/model.bin as result 3: {len(big)} bytes" in text
    assert "this log is result 7" in text


@as_root
@pytest.mark.timeout(20)
async def test_hostile_entries_are_skipped_and_reported(
    tmp_path: Path, workspace: Path, outputs: Path, storage: LocalStorage
) -> None:
    write(outputs / "good.txt", b"good")
    host_secret = write(tmp_path / "host-secret.txt", b"the host's secret")
    (outputs / "passwd").symlink_to("/etc/passwd")
    (outputs / "etc-dir").symlink_to("/etc")
    (outputs / "dangling").symlink_to("/nonexistent/target")
    # A hard link to a host file (same file system) and one between two output names.
    os.link(host_secret, outputs / "hardlinked-host-file")
    write(outputs / "twin-a", b"twin")
    os.link(outputs / "twin-a", outputs / "twin-b")
    os.mkfifo(outputs / "a-fifo")
    os.mknod(outputs / "null-device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(outputs / "a-socket"))
    setuid = write(outputs / "setuid-tool", b"#!/bin/sh\n")
    os.chmod(setuid, 0o4755)
    os.makedirs(os.fsencode(outputs) + b"/dir-\xff")
    write(Path(os.fsdecode(os.fsencode(outputs) + b"/dir-\xff/inside.txt")), b"never")
    with open(os.fsencode(outputs) + b"/bad-\xfe\xff.txt", "wb") as f:
        f.write(b"bad name")
    write(outputs / "evil\nline.txt", b"newline")
    write(outputs / "bidi-\u202etxt.exe", b"spoof")
    deep = outputs.joinpath(*[f"d{i}" for i in range(33)])
    write(deep / "too-deep.txt", b"deep")
    write(outputs.joinpath(*[f"d{i}" for i in range(31)]) / "deep-ok.txt", b"ok")

    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)

    ok_name = "/".join(f"d{i}" for i in range(31)) + "/deep-ok.txt"
    assert outputs_of(result) == [ok_name, "good.txt", "setuid-tool"]
    assert not result.too_large
    await check_consistent(storage, result)
    for entry in result.results:
        data = await stored_bytes(storage, entry.index)
        assert b"the host's secret" not in data
        assert data != Path("/etc/passwd").read_bytes()

    expected = {
        "passwd: symbolic link",
        "etc-dir: symbolic link",
        "dangling: symbolic link",
        "hardlinked-host-file: hard link (2 names for one file)",
        "twin-a: hard link (2 names for one file)",
        "twin-b: hard link (2 names for one file)",
        "a-fifo: FIFO",
        "null-device: device",
        "a-socket: socket",
        "dir-\\xff: name is not valid UTF-8",
        "bad-\\xfe\\xff.txt: name is not valid UTF-8",
        "evil\\nline.txt: name contains control characters",
        "bidi-\\xe2\\x80\\xaetxt.exe: name contains control characters",
        "/".join(f"d{i}" for i in range(32)) + ": directory nested deeper than 32 levels",
    }
    assert set(result.skipped) == expected
    log = (workspace / "logs" / "publish.log").read_text()
    for skip in expected:
        assert f"skipped {skip}" in log
    assert "setuid-tool: set-id bits dropped" in log
    # A log line per event: no name could break a line.
    assert all(line[:4].isdigit() for line in log.splitlines())
    # The publish log stored equals the one on disk.
    assert await stored_bytes(storage, result.results[-1].index) == log.encode()


@pytest.mark.timeout(10)
async def test_a_fifo_does_not_hang_publish(
    workspace: Path, outputs: Path, storage: LocalStorage
) -> None:
    os.mkfifo(outputs / "result.csv")
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    assert outputs_of(result) == []
    assert result.skipped == ["result.csv: FIFO"]


@pytest.mark.timeout(10)
async def test_an_entry_swapped_for_a_fifo_after_the_walk_is_not_stored(
    workspace: Path, outputs: Path, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk saw a regular file; by the time it is opened it is a FIFO: the store step's own
    checks (O_NONBLOCK, fstat, same inode) refuse it without blocking."""
    write(outputs / "swap.csv", b"data")
    scan = publish_module._scan_outputs

    def scan_then_swap(*args: object) -> object:
        walk = scan(*args)  # type: ignore[arg-type]
        (outputs / "swap.csv").unlink()
        os.mkfifo(outputs / "swap.csv")
        return walk

    monkeypatch.setattr(publish_module, "_scan_outputs", scan_then_swap)
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    assert outputs_of(result) == []
    assert result.skipped == ["swap.csv: changed while publishing"]


async def test_a_symlinked_outputs_dir_is_not_followed(
    tmp_path: Path, workspace: Path, storage: LocalStorage
) -> None:
    host_dir = tmp_path / "host-dir"
    write(host_dir / "secret.txt", b"host")
    (workspace / "outputs").rmdir()
    (workspace / "outputs").symlink_to(host_dir)
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    assert outputs_of(result) == []
    assert result.skipped == ["outputs: not a directory"]
    assert names(result) == ["algorithm.log", "configuration.log", "publish.log"]


async def test_too_many_files(workspace: Path, outputs: Path, storage: LocalStorage) -> None:
    for letter in "edcba":
        write(outputs / f"{letter}.txt", letter.encode())
    result = await publish(workspace, storage, JOB, max_files=3, max_total_bytes=1 << 20)
    assert result.too_large
    # The first outputs by name were stored before the cap; the logs are published anyway.
    assert names(result) == [
        "a.txt",
        "b.txt",
        "c.txt",
        "algorithm.log",
        "configuration.log",
        "publish.log",
    ]
    await check_consistent(storage, result)
    log = (workspace / "logs" / "publish.log").read_text()
    assert "outputs exceed the caps (5 files found, at most 3 files" in log
    assert "outputs too large" in log


async def test_too_many_bytes(workspace: Path, outputs: Path, storage: LocalStorage) -> None:
    write(outputs / "one.bin", b"x" * 6)
    write(outputs / "two.bin", b"y" * 6)
    result = await publish(workspace, storage, JOB, max_total_bytes=10)
    assert result.too_large
    assert outputs_of(result) == ["one.bin"]
    assert [r.name for r in result.results][-3:] == [
        "algorithm.log",
        "configuration.log",
        "publish.log",
    ]
    await check_consistent(storage, result)
    assert "stopped storing outputs at two.bin" in (workspace / "logs" / "publish.log").read_text()


async def test_too_many_entries_stops_the_walk(
    workspace: Path, outputs: Path, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish_module, "MAX_REPORTED_SKIPS", 5)
    for i in range(40):
        (outputs / f"link-{i:02d}").symlink_to("/etc/passwd")
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20, max_entries=20)
    assert result.too_large
    assert outputs_of(result) == []
    # Five skips named, then one line for the rest, so the log stays small.
    assert len(result.skipped) == 6
    assert result.skipped[-1] == "... and 15 more skipped entries, not listed"
    log = (workspace / "logs" / "publish.log").read_text()
    assert "outputs hold more than 20 entries: stopped looking" in log


async def test_logs_are_published_when_outputs_are_missing(
    workspace: Path, storage: LocalStorage
) -> None:
    (workspace / "outputs").rmdir()
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    assert names(result) == ["algorithm.log", "configuration.log", "publish.log"]
    assert not result.too_large
    await check_consistent(storage, result)
    assert "no outputs directory" in (workspace / "logs" / "publish.log").read_text()


async def test_missing_logs_are_skipped(tmp_path: Path, storage: LocalStorage) -> None:
    workspace = tmp_path / "bare"
    workspace.mkdir()
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    assert names(result) == ["publish.log"]
    assert [r.kind for r in result.results] == [Kind.KIND_PUBLISH_LOG]
    text = (workspace / "logs" / "publish.log").read_text()
    assert "algorithm.log: none" in text
    await check_consistent(storage, result)


async def test_a_symlinked_log_is_not_followed(workspace: Path, storage: LocalStorage) -> None:
    (workspace / "logs" / "algorithm.log").unlink()
    (workspace / "logs" / "algorithm.log").symlink_to("/etc/passwd")
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    assert names(result) == ["configuration.log", "publish.log"]
    assert "algorithm.log: skipped" in (workspace / "logs" / "publish.log").read_text()


class BrokenStorage(LocalStorage):
    def put_blocking(self, job_id: str, key: str, source: Source) -> StoredObject:
        raise OSError("disk full at /srv/secret-storage")


async def test_storage_failure_raises_publish_error(
    tmp_path: Path, workspace: Path, outputs: Path
) -> None:
    write(outputs / "result.csv", b"data")
    with pytest.raises(PublishError) as caught:
        await publish(workspace, BrokenStorage(tmp_path / "s"), JOB, max_total_bytes=1 << 20)
    assert caught.value.reason == job_pb2.FAILURE_REASON_PUBLISH_FAILED
    log = (workspace / "logs" / "publish.log").read_text()
    assert "storing result.csv failed (OSError)" in log
    assert "secret-storage" not in log


async def test_one_worker_thread_does_the_whole_stage(
    workspace: Path, outputs: Path, storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Walk, stores and the final flush run in one worker thread, off the event loop: a hop to
    a thread per file would cost more than a typical job's few small files."""
    write(outputs / "a.txt", b"a")
    write(outputs / "b.txt", b"b")
    threads: list[int] = []
    put, sync = LocalStorage.put_blocking, LocalStorage.sync_blocking

    def put_blocking(self: LocalStorage, job_id: str, key: str, source: Source) -> StoredObject:
        threads.append(threading.get_ident())
        return put(self, job_id, key, source)

    def sync_blocking(self: LocalStorage, job_id: str) -> None:
        threads.append(threading.get_ident())
        sync(self, job_id)

    monkeypatch.setattr(LocalStorage, "put_blocking", put_blocking)
    monkeypatch.setattr(LocalStorage, "sync_blocking", sync_blocking)
    result = await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    assert len(result.results) == 5
    assert len(threads) == 6  # five stores, one flush
    assert len(set(threads)) == 1
    assert threads[0] != threading.get_ident()
    await check_consistent(storage, result)


async def test_publish_log_fills_a_file_made_ahead(workspace: Path, storage: LocalStorage) -> None:
    (workspace / ".ready-3").write_bytes(b"")
    made_ahead = os.stat(workspace / ".ready-3").st_ino
    await publish(workspace, storage, JOB, max_total_bytes=1 << 20)
    on_disk = workspace / "logs" / "publish.log"
    assert os.stat(on_disk).st_ino == made_ahead
    assert stat.S_IMODE(os.stat(on_disk).st_mode) == 0o644
    assert on_disk.read_bytes() == await stored_bytes(storage, 2)


async def test_bad_job_id_is_refused(workspace: Path, storage: LocalStorage) -> None:
    with pytest.raises(ValueError):
        await publish(workspace, storage, "../" + "a" * 29, max_total_bytes=1)


def run_program(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pods.publish", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "C2D_LOG_FORMAT": "json"},
    )


@pytest.fixture
def program_outputs(outputs: Path) -> Iterator[Path]:
    write(outputs / "r.txt", b"result")
    yield outputs


def test_program_form(tmp_path: Path, workspace: Path, program_outputs: Path) -> None:
    store = tmp_path / "program-store"
    common = ["--workspace", str(workspace), "--storage", f"file://{store}", "--job-id", JOB]
    done = run_program(*common, "--max-total-bytes", "1000")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert [r["name"] for r in printed["results"]] == [
        "r.txt",
        "algorithm.log",
        "configuration.log",
        "publish.log",
    ]
    assert printed["results"][0]["sha256"] == hashlib.sha256(b"result").hexdigest()
    assert printed["too_large"] is False
    assert (store / JOB / "0000").read_bytes() == b"result"

    too_large = run_program(*common, "--max-total-bytes", "2")
    assert too_large.returncode == 3
    assert json.loads(too_large.stdout)["too_large"] is True


def test_stored_from_a_capped_reader_in_chunks() -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"0123456789")
    os.close(write_fd)
    reader = io.BufferedReader(publish_module._CappedReader(read_fd, 4))
    assert reader.read() == b"0123"
    reader.close()
