"""The publish stage: store the job's outputs and logs and list them as its results.

Runs as root after every process of the job has ended, on a directory a hostile algorithm
filled. Everything under outputs/ is therefore treated as an attack on the host: it is walked
through directory file descriptors, never by path, nothing is opened following a link, and a
file is stored only when the descriptor actually opened is a regular file with a single name.
A link, a FIFO, a device or a socket can thus never make root read (or block on) anything but
the bytes the algorithm wrote itself.

When an output cannot be stored, the outputs stop there but the logs are still stored and
listed: when the store is down (S3 unreachable), on the node's own disk (see
`Storage.put_log_blocking`), so that a failed job still says what happened.

The consumer's choice of results (`ResultSelection`) decides what is stored: with logs only,
no output is even looked at; with outputs only, the algorithm's and the configure stage's logs
are left out. publish.log is stored in every case, and says what was left out and why.

Also a program, for backends that run stages as containers:

    python -m pods.publish --workspace DIR --storage DIR --job-id ID --max-total-bytes N \
        [--results outputs|logs|both]"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import secrets
import stat
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from c2d.common.v1 import job_pb2
from google.protobuf import json_format

from mesh.delivery import SELECTION_BY_WORD
from mesh.storage import (
    Storage,
    StorageUnavailable,
    StoredObject,
    result_key,
    storage_from_url,
)
from pods.workspace import (
    ALGORITHM_LOG,
    CONFIGURATION_LOG,
    LOGS,
    OUTPUTS,
    PUBLISH_LOG,
    check_job_id,
    open_new_file,
    write_termination_log,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

DEFAULT_MAX_FILES = 1000
# A result name has at most this many path components.
MAX_DEPTH = 32
# publish.log and `PublishResult.skipped` name at most this many skipped entries, so that a
# million planted links cannot turn the log itself into a huge output.
MAX_REPORTED_SKIPS = 1000

# Program exit codes.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TOO_LARGE = 3
EXIT_PUBLISH_FAILED = 4

# O_NOFOLLOW: a link in the last component fails (ELOOP) instead of being followed.
# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer that never comes.
# O_NOCTTY: a terminal device can never become our controlling terminal.
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# Characters that would let a name forge log lines or display as something it is not
# (bidirectional overrides, as in "Trojan source" attacks).
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})

_LOGS = (
    (ALGORITHM_LOG, job_pb2.ResultFile.KIND_ALGORITHM_LOG),
    (CONFIGURATION_LOG, job_pb2.ResultFile.KIND_CONFIGURATION_LOG),
)


def check_selection(selection: int) -> None:
    """ValueError unless `selection` is a value of ResultSelection."""
    if selection not in job_pb2.ResultSelection.values():
        raise ValueError(f"unknown result selection {selection}")


def keeps_outputs(selection: int) -> bool:
    """Whether the consumer's choice keeps the outputs (unset keeps outputs and logs)."""
    return selection != job_pb2.RESULT_SELECTION_LOGS


def keeps_logs(selection: int) -> bool:
    """Whether the consumer's choice keeps the algorithm's and the configure stage's logs."""
    return selection != job_pb2.RESULT_SELECTION_OUTPUTS


def selection_flag(selection: int) -> str:
    """The program's --results value for a selection (unset: both)."""
    if not keeps_outputs(selection):
        return "logs"
    return "both" if keeps_logs(selection) else "outputs"


class PublishError(Exception):
    """Results could not be stored; the job fails with `reason`. `results` lists what was
    stored all the same (outputs before the failure, the logs after it), for the job to list;
    publish.log says how far it got."""

    reason: job_pb2.FailureReason.ValueType = job_pb2.FAILURE_REASON_PUBLISH_FAILED

    def __init__(self, message: str, *, results: Sequence[job_pb2.ResultFile] = ()) -> None:
        super().__init__(message)
        self.results = list(results)


@dataclass
class PublishResult:
    """The job's results in index order (outputs sorted by name, then the logs, publish.log
    last); `too_large` when the outputs crossed a cap (the job then fails OUTPUT_TOO_LARGE);
    `skipped` holds one short "name: reason" per entry that was not published."""

    results: list[job_pb2.ResultFile] = field(default_factory=list)
    too_large: bool = False
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "results": [
                json_format.MessageToDict(result, preserving_proto_field_name=True)
                for result in self.results
            ],
            "too_large": self.too_large,
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class _Candidate:
    """An output found by the walk: where it is and which inode it was, so the store step can
    refuse anything swapped in since."""

    parts: tuple[str, ...]
    dev: int
    ino: int
    size: int

    @property
    def name(self) -> str:
        return "/".join(self.parts)


class _PublishLog:
    """The lines of publish.log, and the skip list returned with the result."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.skipped: list[str] = []
        self.skips = 0

    def add(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.lines.append(f"{stamp} {message}")

    def skip(self, display_name: str, reason: str) -> None:
        self.skips += 1
        if self.skips <= MAX_REPORTED_SKIPS:
            entry = f"{display_name}: {reason}"
            self.skipped.append(entry)
            self.add(f"skipped {entry}")

    def finish_skips(self) -> None:
        hidden = self.skips - MAX_REPORTED_SKIPS
        if hidden > 0:
            entry = f"... and {hidden} more skipped entries, not listed"
            self.skipped.append(entry)
            self.add(entry)

    def render(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode("utf-8")


@dataclass
class _Target:
    """Where this publish stores results and what it has learned of the store on the way."""

    storage: Storage
    job_id: str
    record: _PublishLog
    result: PublishResult
    # Set once the store is found unavailable: the logs left go straight to the node's own
    # disk, instead of waiting for the store's retries once more each.
    store_down: bool = False
    kept_locally: list[str] = field(default_factory=list)


@dataclass
class _Walk:
    record: _PublishLog
    root_dev: int
    max_entries: int
    entries: int = 0
    truncated: bool = False
    candidates: list[_Candidate] = field(default_factory=list)


async def publish(
    workspace: Path,
    storage: Storage,
    job_id: str,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_total_bytes: int,
    max_entries: int | None = None,
    outputs: Path | None = None,
    results: int = job_pb2.RESULT_SELECTION_UNSPECIFIED,
) -> PublishResult:
    """Stores the outputs under `workspace/outputs` and the logs under `workspace/logs` as the
    job's results, and writes logs/publish.log (stored last, so it is complete). `results` is
    the consumer's ResultSelection: outputs only leaves the algorithm's and the configuration
    log out, logs only leaves every output out (unwalked); publish.log is always stored.

    At most `max_files` outputs and `max_total_bytes` of them are stored: past either cap the
    remaining outputs are not stored and `too_large` is set; the logs are published anyway.
    `max_entries` (default ten times `max_files`, at least 1000) bounds how many directory
    entries of any kind the walk looks at; more also counts as too large, so a hostile
    algorithm cannot make publishing slow. `outputs` names the outputs folder when it is not
    `workspace/outputs` (the engine's job disk). Raises `PublishError` when storing fails (the
    logs are still stored, and listed in its `results`) and ValueError for a malformed job
    id or an unknown selection.

    The whole stage (walk, reads, stores, the final flush) runs in one worker thread: for a
    typical job of a few small files, hops to a thread per file cost more than the files."""
    return await asyncio.to_thread(
        publish_blocking,
        workspace,
        storage,
        job_id,
        max_files=max_files,
        max_total_bytes=max_total_bytes,
        max_entries=max_entries,
        outputs=outputs,
        results=results,
    )


def publish_blocking(
    workspace: Path,
    storage: Storage,
    job_id: str,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_total_bytes: int,
    max_entries: int | None = None,
    outputs: Path | None = None,
    algorithm_log: bool = True,
    results: int = job_pb2.RESULT_SELECTION_UNSPECIFIED,
) -> PublishResult:
    """`publish`, blocking: for a worker thread or the program form. Without `algorithm_log`,
    the algorithm's log is left to the caller (an engine that holds it, as the Kubernetes
    backend's does)."""
    check_job_id(job_id)
    check_selection(results)
    if max_files < 0 or max_total_bytes < 0:
        raise ValueError("caps must not be negative")
    entry_budget = max_entries if max_entries is not None else max(10 * max_files, 1000)
    log = structlog.get_logger().bind(job_id=job_id, stage="publish")
    record = _PublishLog()
    record.add(f"publish: job {job_id}")
    result = PublishResult()
    target = _Target(storage, job_id, record, result)
    try:
        # The workspace itself is the engine's own directory: following a link to it is fine.
        ws_fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise PublishError("the job's workspace is missing") from error
    # Outputs are found as (a folder fd, a name in it): the workspace's outputs/ or the disk.
    base_fd, out_name = ws_fd, OUTPUTS
    if outputs is not None:
        try:
            base_fd = os.open(outputs.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            os.close(ws_fd)
            raise PublishError("the job's outputs folder is missing") from error
        out_name = outputs.name
    try:
        failure: PublishError | None = None
        try:
            if keeps_outputs(results):
                _publish_outputs(
                    (base_fd, out_name), target, max_files, max_total_bytes, entry_budget
                )
            else:
                # Not even walked: nothing the algorithm left there is looked at.
                record.add("outputs: not stored, the consumer asked for logs only")
        except PublishError as error:
            # The outputs stop at the first that could not be stored; the logs are stored all
            # the same, to tell what happened.
            failure = error
        try:
            _publish_logs(ws_fd, target, algorithm_log=algorithm_log, logs=keeps_logs(results))
        except PublishError as error:
            failure = failure or error
        record.finish_skips()
        result.skipped = record.skipped
        if failure is not None:
            raise _failed(ws_fd, target, failure) from failure.__cause__
        _publish_own_log(ws_fd, target)
        try:
            storage.sync_blocking(job_id)
        except OSError as error:
            raise PublishError("the results could not be made durable") from error
    finally:
        os.close(ws_fd)
        if base_fd != ws_fd:
            os.close(base_fd)
    log.info(
        "publish.done",
        results=len(result.results),
        too_large=result.too_large,
        skipped=record.skips,
        kept_locally=len(target.kept_locally),
    )
    return result


def _failed(ws_fd: int, target: _Target, failure: PublishError) -> PublishError:
    """The error a failed publish ends with, once publish.log says why and is stored (kept,
    like the other logs, on the node's own disk when the store is down) and listed."""
    record, result = target.record, target.result
    if target.store_down:
        what = "the results store was unreachable, so the job's outputs could not be stored"
    else:
        what = str(failure)
    record.add(f"publish failed: {what}")
    # Best effort, from here on: the failure being reported matters more than this log.
    with contextlib.suppress(PublishError, OSError):
        _publish_own_log(ws_fd, target, failed=True)
    with contextlib.suppress(Exception):
        target.storage.sync_blocking(target.job_id)
    if target.kept_locally:
        what += "; its logs are kept on the node and listed with its results"
    structlog.get_logger().error(
        "publish.failed",
        job_id=target.job_id,
        stage="publish",
        stored=len(result.results),
        kept_locally=len(target.kept_locally),
    )
    return PublishError(what, results=result.results)


def _publish_outputs(
    where: tuple[int, str],
    target: _Target,
    max_files: int,
    max_total_bytes: int,
    max_entries: int,
) -> None:
    record, result = target.record, target.result
    walk = _scan_outputs(where, record, max_entries)
    if walk is None:
        return
    if walk.truncated:
        result.too_large = True
        record.add(f"outputs hold more than {max_entries} entries: stopped looking")
    # Results are listed sorted by name, so one job's listing never depends on the order the
    # file system happened to return.
    candidates = sorted(walk.candidates, key=lambda c: c.name)
    total = 0
    stored_files = 0
    for candidate in candidates:
        if stored_files + 1 > max_files or total + candidate.size > max_total_bytes:
            result.too_large = True
            record.add(
                f"outputs exceed the caps ({len(candidates)} files found, at most {max_files} "
                f"files and {max_total_bytes} bytes allowed): stopped storing outputs at "
                f"{candidate.name}"
            )
            break
        fd = _open_candidate(where, candidate)
        if fd is None:
            record.skip(candidate.name, "changed while publishing")
            continue
        entry = job_pb2.ResultFile(
            index=len(result.results), name=candidate.name, kind=job_pb2.ResultFile.KIND_OUTPUT
        )
        _store(target, entry, fd, candidate.size, is_log=False)
        stored_files += 1
        total += entry.size_bytes
    record.add(f"outputs: {stored_files} files stored, {total} bytes")


def _scan_outputs(where: tuple[int, str], record: _PublishLog, max_entries: int) -> _Walk | None:
    base_fd, out_name = where
    try:
        out_fd = os.open(out_name, _OPEN_DIR, dir_fd=base_fd)
    except FileNotFoundError:
        record.add("outputs: none (no outputs directory; an earlier stage failed)")
        return None
    except OSError:
        record.skip(OUTPUTS, "not a directory")
        return None
    try:
        walk = _Walk(record=record, root_dev=os.fstat(out_fd).st_dev, max_entries=max_entries)
        _walk_dir(out_fd, (), walk)
    finally:
        os.close(out_fd)
    return walk


def _walk_dir(dir_fd: int, prefix: tuple[str, ...], walk: _Walk) -> None:
    # scandir works on its own duplicate of dir_fd and yields names lazily, so a huge
    # directory is never listed into memory at once.
    try:
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                walk.entries += 1
                if walk.entries > walk.max_entries:
                    walk.truncated = True
                    return
                _visit(dir_fd, prefix, entry.name, walk)
                if walk.truncated:
                    return
    except OSError:
        # Without CAP_DAC_OVERRIDE (a container backend), a mode-000 directory is unreadable.
        walk.record.skip("/".join(prefix) or OUTPUTS, "directory could not be read")


def _visit(dir_fd: int, prefix: tuple[str, ...], name: str, walk: _Walk) -> None:
    record = walk.record
    problem = _name_problem(name)
    if problem is not None:
        record.skip(_display(prefix, name), problem)
        return
    parts = (*prefix, name)
    shown = "/".join(parts)
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        record.skip(shown, "vanished while publishing")
        return
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        record.skip(shown, "symbolic link")
    elif stat.S_ISDIR(mode):
        _visit_dir(dir_fd, parts, info, walk)
    elif stat.S_ISREG(mode):
        if info.st_nlink > 1:
            # A second name for one inode: it might be a host file linked in, so never read it.
            record.skip(shown, f"hard link ({info.st_nlink} names for one file)")
        elif info.st_dev != walk.root_dev:
            record.skip(shown, "on another file system")
        else:
            if mode & (stat.S_ISUID | stat.S_ISGID):
                # Only bytes are stored, never modes, so the bits cannot survive publishing.
                record.add(f"{shown}: set-id bits dropped (results are stored as plain bytes)")
            walk.candidates.append(_Candidate(parts, info.st_dev, info.st_ino, info.st_size))
    elif stat.S_ISFIFO(mode):
        record.skip(shown, "FIFO")
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        record.skip(shown, "device")
    elif stat.S_ISSOCK(mode):
        record.skip(shown, "socket")
    else:
        record.skip(shown, "not a regular file")


def _visit_dir(dir_fd: int, parts: tuple[str, ...], info: os.stat_result, walk: _Walk) -> None:
    shown = "/".join(parts)
    if len(parts) >= MAX_DEPTH:
        walk.record.skip(shown, f"directory nested deeper than {MAX_DEPTH} levels")
        return
    if info.st_dev != walk.root_dev:
        walk.record.skip(shown, "on another file system")
        return
    try:
        sub_fd = os.open(parts[-1], _OPEN_DIR, dir_fd=dir_fd)
    except OSError:
        walk.record.skip(shown, "directory could not be opened")
        return
    try:
        opened = os.fstat(sub_fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            walk.record.skip(shown, "changed while publishing")
            return
        _walk_dir(sub_fd, parts, walk)
    finally:
        os.close(sub_fd)


def _name_problem(name: str) -> str | None:
    """Why a directory entry's name cannot be a result name, or None when it can."""
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        return "reserved name"
    try:
        # scandir decodes undecodable bytes as lone surrogates; strict encoding refuses them.
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    for char in name:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES or char in _BIDI_CONTROLS:
            return "name contains control characters"
    return None


def _display(prefix: tuple[str, ...], name: str) -> str:
    """A refused name as printable ASCII, so it cannot forge or garble log lines."""
    raw = name.encode("utf-8", "surrogateescape")
    escaped = repr(raw)[2:-1]
    return "/".join((*prefix, escaped))


def _open_candidate(where: tuple[int, str], candidate: _Candidate) -> int | None:
    """Opens an output again, component by component without following links, and returns its
    descriptor only when it is still the very regular file the walk saw."""
    dir_fds: list[int] = []
    fd = -1
    try:
        current, out_name = where
        for part in (out_name, *candidate.parts[:-1]):
            current = os.open(part, _OPEN_DIR, dir_fd=current)
            dir_fds.append(current)
        fd = os.open(candidate.parts[-1], _OPEN_FILE, dir_fd=current)
    except OSError:
        return None
    finally:
        for dir_fd in dir_fds:
            os.close(dir_fd)
    info = os.fstat(fd)
    if (
        not stat.S_ISREG(info.st_mode)
        or info.st_nlink != 1
        or (info.st_dev, info.st_ino) != (candidate.dev, candidate.ino)
    ):
        os.close(fd)
        return None
    return fd


class _CappedReader(io.RawIOBase):
    """Reads a descriptor just opened (at offset 0) up to `limit` bytes, then reports EOF: the
    caps were checked against the size seen by the walk, so a file that somehow grew cannot
    exceed them. Seekable, so that a log the store failed to take can be read again."""

    def __init__(self, fd: int, limit: int) -> None:
        super().__init__()
        self._fd = fd
        self._limit = limit
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        if whence == os.SEEK_CUR:
            offset += self._position
        elif whence != os.SEEK_SET:
            raise io.UnsupportedOperation("only SEEK_SET and SEEK_CUR")
        if offset < 0:
            raise ValueError("negative seek position")
        self._position = os.lseek(self._fd, offset, os.SEEK_SET)
        return self._position

    def read(self, size: int = -1, /) -> bytes:
        # Direct, without a buffer: storage reads in large chunks, and a small output then
        # costs one read of its own size instead of a copy through a chunk-sized buffer.
        remaining = self._limit - self._position
        wanted = remaining if size < 0 else min(size, remaining)
        if wanted <= 0:
            return b""
        data = os.read(self._fd, wanted)
        self._position += len(data)
        return data

    def readinto(self, buffer: WriteableBuffer) -> int:
        # For io's buffered readers; storage calls read() directly.
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _store(
    target: _Target, entry: job_pb2.ResultFile, fd: int, limit: int, *, is_log: bool
) -> None:
    """Streams one open file into storage under the entry's key, fills in its size and digest
    and lists it. A log is kept on the node's own disk when the store is down. Takes
    ownership of `fd`."""
    reader = _CappedReader(fd, limit)
    try:
        stored = _put(target, entry, reader, is_log=is_log)
    finally:
        reader.close()
    _list(target, entry, stored)


def _put(
    target: _Target, entry: job_pb2.ResultFile, source: _CappedReader | io.BytesIO, *, is_log: bool
) -> StoredObject:
    storage, job_id, key = target.storage, target.job_id, result_key(entry)
    try:
        if is_log:
            return storage.put_log_blocking(job_id, key, source, store_down=target.store_down)
        return storage.put_blocking(job_id, key, source)
    except Exception as error:
        # The message may name storage internals; the log says only what failed.
        target.record.add(f"storing {entry.name} failed ({type(error).__name__})")
        if isinstance(error, StorageUnavailable):
            target.store_down = True
        raise PublishError(f"result {entry.name} could not be stored") from error


def _list(target: _Target, entry: job_pb2.ResultFile, stored: StoredObject) -> None:
    entry.size_bytes = stored.size
    entry.sha256 = stored.sha256
    where = ""
    if stored.kept_locally:
        target.store_down = True
        target.kept_locally.append(entry.name)
        where = " on the node's own disk (the results store is unreachable)"
    target.record.add(
        f"stored {entry.name} as result {entry.index}{where}: {stored.size} bytes, "
        f"sha256 {stored.sha256}"
    )
    target.result.results.append(entry)


def _publish_logs(ws_fd: int, target: _Target, *, algorithm_log: bool, logs: bool) -> None:
    """The workspace's logs as results; without `logs` (the consumer asked for outputs
    only), each left out and said so."""
    record, result = target.record, target.result
    for name, kind in _LOGS:
        if not logs:
            record.add(f"{name}: not stored, the consumer asked for outputs only")
            continue
        if name == ALGORITHM_LOG and not algorithm_log:
            record.add(f"{name}: stored by the engine, after these results")
            continue
        opened = _open_log(ws_fd, name)
        if isinstance(opened, str):
            record.add(f"{name}: {opened}")
            continue
        fd, size = opened
        entry = job_pb2.ResultFile(index=len(result.results), name=name, kind=kind)
        _store(target, entry, fd, size, is_log=True)


def _open_log(ws_fd: int, name: str) -> tuple[int, int] | str:
    """An open log and its size, or why it is not published. The logs are the engine's own
    files, but they are opened as warily as outputs: it costs nothing."""
    try:
        logs_fd = os.open(LOGS, _OPEN_DIR, dir_fd=ws_fd)
    except FileNotFoundError:
        return "none"
    except OSError:
        return "skipped, the logs directory is not a directory"
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=logs_fd)
    except FileNotFoundError:
        return "none"
    except OSError:
        return "skipped, not a regular file"
    finally:
        os.close(logs_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        return "skipped, not a regular file"
    return fd, info.st_size


def _publish_own_log(ws_fd: int, target: _Target, *, failed: bool = False) -> None:
    record, result = target.record, target.result
    entry = job_pb2.ResultFile(
        index=len(result.results), name=PUBLISH_LOG, kind=job_pb2.ResultFile.KIND_PUBLISH_LOG
    )
    record.add(
        f"{'kept' if failed else 'published'} {len(result.results)} results"
        + (", outputs too large" if result.too_large else "")
        + f"; this log is result {entry.index}"
    )
    content = record.render()
    # On disk too, so the engine can show it even if storing it fails below.
    _write_publish_log(ws_fd, content)
    stored = _put(target, entry, io.BytesIO(content), is_log=True)
    # Not in its own text: it is rendered already.
    entry.size_bytes = stored.size
    entry.sha256 = stored.sha256
    if stored.kept_locally:
        target.kept_locally.append(entry.name)
    result.results.append(entry)


def _write_publish_log(ws_fd: int, content: bytes) -> None:
    """Writes logs/publish.log whole (temporary file, then rename) without following links."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(LOGS, 0o755, dir_fd=ws_fd)
    logs_fd = os.open(LOGS, _OPEN_DIR, dir_fd=ws_fd)
    try:
        temp = f".{PUBLISH_LOG}.{secrets.token_hex(8)}.tmp"
        # One made ahead in the workspace when there is one (see pods.workspace).
        fd = open_new_file(ws_fd, temp, dir_fd=logs_fd)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(content)
                os.fchmod(out.fileno(), 0o644)
            os.replace(temp, PUBLISH_LOG, src_dir_fd=logs_fd, dst_dir_fd=logs_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=logs_fd)
            raise
    finally:
        os.close(logs_fd)


def main(argv: list[str] | None = None) -> int:
    """The program form. Prints the PublishResult as JSON on standard output; exits 0 when
    published, 3 when the outputs were too large (results still printed), 4 when storing
    failed."""
    from mesh.logging import configure_logging

    parser = argparse.ArgumentParser(prog="python -m pods.publish", description=__doc__)
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--storage", required=True, help="a directory or a file:// URL")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--max-files", type=int, default=DEFAULT_MAX_FILES)
    parser.add_argument("--max-total-bytes", type=int, required=True)
    parser.add_argument(
        "--listing-key",
        help="also store the printed listing in the storage under this key, for an engine that "
        "cannot read this program's output (Kubernetes merges a pod's stdout and stderr)",
    )
    parser.add_argument("--termination-log", type=Path, help="also write a one-line outcome there")
    parser.add_argument(
        "--results",
        choices=sorted(SELECTION_BY_WORD),
        default="both",
        help="which results the consumer asked for (publish.log is stored in every case)",
    )
    parser.add_argument(
        "--algorithm-log-by-engine",
        action="store_true",
        help="leave the algorithm's log out: the engine that holds it stores it",
    )
    args = parser.parse_args(argv)
    configure_logging("publish")
    try:
        storage = storage_from_url(args.storage)
        check_job_id(args.job_id)
    except ValueError as error:
        print(f"publish: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = publish_blocking(
            args.workspace,
            storage,
            args.job_id,
            max_files=args.max_files,
            max_total_bytes=args.max_total_bytes,
            algorithm_log=not args.algorithm_log_by_engine,
            results=SELECTION_BY_WORD[args.results],
        )
    except PublishError as error:
        outcome = json.dumps({"reason": "FAILURE_REASON_PUBLISH_FAILED", "message": str(error)})
        print(outcome)
        write_termination_log(args.termination_log, outcome)
        return EXIT_PUBLISH_FAILED
    listing = json.dumps(result.to_json())
    print(listing)
    if args.listing_key:
        try:
            storage.put_blocking(args.job_id, args.listing_key, io.BytesIO(listing.encode()))
        except Exception as error:
            outcome = json.dumps(
                {"reason": "FAILURE_REASON_PUBLISH_FAILED", "message": "the listing not stored"}
            )
            write_termination_log(args.termination_log, outcome)
            print(f"publish: the listing could not be stored: {error}", file=sys.stderr)
            return EXIT_PUBLISH_FAILED
    write_termination_log(
        args.termination_log, json.dumps({"message": f"published {len(result.results)} results"})
    )
    return EXIT_TOO_LARGE if result.too_large else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
