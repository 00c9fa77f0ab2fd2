"""Where a job's results (outputs and logs) are kept once the publish stage has stored them.

`Storage` is what the publish stage writes to and the download paths read from; `LocalStorage`
keeps objects on the node's disk, one directory per job. S3 comes later behind the same
protocol, so nothing above this module knows where bytes live."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import structlog
from c2d.common.v1 import job_pb2

from mesh.errors import NotFound

log = structlog.get_logger()

# Copies stream in chunks of this size, so no object is ever held whole in memory.
CHUNK_SIZE = 1 << 20

# Job ids and keys become path segments: only shapes that cannot name `..`, `/` or a
# hidden temporary file are accepted.
_JOB_ID_RE = re.compile(r"[0-9a-f]{32}")
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Temporary files start with a dot, which no valid key does, so they never shadow an object.
_TEMP_PREFIX = ".part-"


@dataclass(frozen=True)
class StoredObject:
    """What `put` stored: its size in bytes and the lowercase hex sha256 of its content."""

    size: int
    sha256: str


class Source(Protocol):
    """What `put` reads an object from: `read(size)` returns at most `size` bytes, and b""
    once the content is over (a binary file, or the publish stage's capped reader)."""

    def read(self, size: int = -1, /) -> bytes: ...


class Storage(Protocol):
    """A job's result objects, addressed by (job_id, key)."""

    async def put(self, job_id: str, key: str, source: Source) -> StoredObject:
        """Stores everything `source` yields until EOF, read in chunks, replacing any object
        already under `key`. Until it returns, no reader sees a partial object."""
        ...

    def put_blocking(self, job_id: str, key: str, source: Source) -> StoredObject:
        """`put` for a caller already on a worker thread: the publish stage stores all of a
        job's results in one pass there, instead of one hop to a thread per object."""
        ...

    def read(
        self, job_id: str, key: str, offset: int = 0, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        """Yields the object's bytes from `offset` in chunks of at most `chunk_size`. Raises
        `NotFound` (on first iteration) when there is no such object."""
        ...

    async def size(self, job_id: str, key: str) -> int:
        """The object's size in bytes; `NotFound` when there is no such object."""
        ...

    async def sync(self, job_id: str) -> None:
        """Makes every object of the job durable (survives a power loss); called once after
        the last put of a job, before it is reported published."""
        ...

    def sync_blocking(self, job_id: str) -> None:
        """`sync` for a caller already on a worker thread."""
        ...

    async def delete_job(self, job_id: str) -> None:
        """Removes every object of the job; nothing to remove is not an error."""
        ...


def result_key(result: job_pb2.ResultFile) -> str:
    """The storage key of a job's result. Keys come from the index, never from the name the
    algorithm chose, so a hostile output name cannot steer where bytes are written."""
    if result.index < 0:
        raise ValueError("a result index is never negative")
    return f"{result.index:04d}"


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID_RE.fullmatch(job_id):
        raise ValueError("a job id is 32 lowercase hex digits")


def _check_key(key: str) -> None:
    if not _KEY_RE.fullmatch(key):
        raise ValueError(
            "a storage key is 1-128 letters, digits, '_' or '-', starting alphanumeric"
        )


class LocalStorage:
    """Objects as files at `root/<job_id>/<key>`: directories 0700, files 0600, since results
    may hold data-derived outputs that only the services should read.

    The async methods run their blocking file I/O in worker threads (`asyncio.to_thread`) so
    that a large copy never stalls the event loop serving other jobs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _job_dir(self, job_id: str) -> Path:
        _check_job_id(job_id)
        return self.root / job_id

    def _object_path(self, job_id: str, key: str) -> Path:
        _check_key(key)
        return self._job_dir(job_id) / key

    async def put(self, job_id: str, key: str, source: Source) -> StoredObject:
        return await asyncio.to_thread(self.put_blocking, job_id, key, source)

    def put_blocking(self, job_id: str, key: str, source: Source) -> StoredObject:
        path = self._object_path(job_id, key)
        stored = self._put_sync(path, source)
        log.debug("storage.put", job_id=job_id, key=key, size=stored.size)
        return stored

    def _put_sync(self, path: Path, source: Source) -> StoredObject:
        # mkdir's mode is filtered by the umask, so set it explicitly, but only on directories
        # created here: an existing root keeps the mode its operator gave it.
        for directory in (path.parent.parent, path.parent):
            try:
                directory.mkdir(mode=0o700, parents=directory == self.root)
            except FileExistsError:
                continue
            os.chmod(directory, 0o700)
        # mkstemp creates the file 0600 with O_EXCL in the job's own directory, so the rename
        # below is atomic (same file system) and readers see the old object or the whole new one.
        fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = source.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
            # Durable only at sync(): one flush for all of a job's objects costs about what
            # one fsync per object would cost for the first alone.
            os.replace(temp_name, path)
        except BaseException:
            # Whatever failed (the source, the disk, a cancellation), leave no partial object.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        return StoredObject(size=size, sha256=digest.hexdigest())

    async def sync(self, job_id: str) -> None:
        await asyncio.to_thread(self.sync_blocking, job_id)

    def sync_blocking(self, job_id: str) -> None:
        job_dir = self._job_dir(job_id)
        if not job_dir.is_dir():
            return
        for entry in os.scandir(job_dir):
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(job_dir)

    async def read(
        self, job_id: str, key: str, offset: int = 0, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        if offset < 0:
            raise ValueError("offset must not be negative")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        path = self._object_path(job_id, key)
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise NotFound(f"result {key} of job {job_id} is not stored") from None
        try:
            if offset:
                await asyncio.to_thread(handle.seek, offset)
            while True:
                chunk = await asyncio.to_thread(handle.read, chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            handle.close()

    async def size(self, job_id: str, key: str) -> int:
        path = self._object_path(job_id, key)
        try:
            stat = await asyncio.to_thread(os.stat, path)
        except FileNotFoundError:
            raise NotFound(f"result {key} of job {job_id} is not stored") from None
        return stat.st_size

    async def delete_job(self, job_id: str) -> None:
        job_dir = self._job_dir(job_id)
        # rmtree is safe against symlink swaps on Linux (it works with directory fds).
        await asyncio.to_thread(_rmtree_if_present, job_dir)
        log.info("storage.job_deleted", job_id=job_id)


def _rmtree_if_present(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some file systems refuse fsync on a directory.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def storage_from_url(url: str) -> Storage:
    """The storage a configuration URL names: `file:///abs/path` or a plain path for local
    disk. Other schemes (s3://...) are refused until they are implemented."""
    if not url:
        raise ValueError("the storage URL is empty")
    parsed = urlparse(url)
    if parsed.scheme == "":
        return LocalStorage(Path(url))
    if parsed.scheme == "file":
        # Only the local host: a file URL naming another host cannot be honoured here.
        if parsed.netloc not in ("", "localhost"):
            raise ValueError("a file:// storage URL must name a local path (file:///abs/path)")
        path = unquote(parsed.path)
        if not path.startswith("/"):
            raise ValueError("a file:// storage URL must hold an absolute path")
        return LocalStorage(Path(path))
    raise ValueError(f"storage scheme {parsed.scheme!r} is not supported yet")
