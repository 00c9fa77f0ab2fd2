"""Where a job's results (outputs and logs) are kept once the publish stage has stored them.

`Storage` is what the publish stage writes to and the download paths read from; `LocalStorage`
keeps objects on the node's disk, one directory per job, and `mesh.storage_s3.S3Storage` keeps
them in an S3 bucket. `storage_from_url` picks one from the node's configuration, so nothing
above this module knows where bytes live.

A job's logs must outlive an outage of a remote store: `put_log_blocking` keeps them on the
node's own disk (the spill, `C2D_STORAGE_SPILL`) when the store cannot take them, and every read
of the storage finds them there.

Beside the jobs' objects, the dataset area (`datasets/{dataset id}/{index}`) holds the files of
datasets made from jobs' outputs: `export_result` copies an output there (checked against its
recorded size and sha256), where deleting the job and the retention sweeper never reach, and
the configure stage reads them back (`read_dataset_file_blocking`, or on local disk the file
itself, `LocalStorage.dataset_file`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar
from urllib.parse import quote, unquote, urlparse

import structlog
from c2d.common.v1 import job_pb2

from mesh import config as mesh_config
from mesh.errors import DataLoss, FailedPrecondition, NotFound, Unavailable
from mesh.jobs import is_job_id, is_sha256_hex

log = structlog.get_logger()

# Copies stream in chunks of this size, so no object is ever held whole in memory.
CHUNK_SIZE = 1 << 20

# Keys become path segments (as job ids do, see mesh.jobs): only shapes that cannot name `..`,
# `/` or a hidden temporary file are accepted.
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Temporary files start with a dot, which no valid key does, so they never shadow an object.
_TEMP_PREFIX = ".part-"
# Job folders made ahead of time (a dot name: never a job id), and the files made in them.
_SPARE_DIR = ".spare"
_READY_PREFIX = ".ready-"
_T = TypeVar("_T")

# The dataset area: the files of datasets made from jobs' outputs, at `datasets/{id}/{index}`
# beside the jobs' folders (a job id is never `datasets`), so that deleting a job or expiring
# its results (both remove one job's folder or prefix) never reaches them.
DATASETS_AREA = "datasets"
_DATASET_KEY_RE = re.compile(r"datasets/([0-9a-f]{64})/([0-9]{4,6})")
MAX_DATASET_FILE_INDEX = 999_999
# What a dataset-area file is made: readable by the sandbox's unrelated uid (it is bind-mounted
# into jobs), written by nobody.
_DATASET_FILE_MODE = 0o444

# How long a presigned result URL works unless configured (C2D_RESULT_URL_TTL_S), and the
# longest SigV4 allows.
RESULT_URL_TTL_S = 900
MAX_RESULT_URL_TTL_S = 7 * 24 * 3600


class StorageUnavailable(Unavailable):
    """The storage could not be reached or refused a call (S3 down, a missing bucket, refused
    credentials). The message says what failed, never where or with which credentials."""

    default_reason = "STORAGE_UNAVAILABLE"


class PresignedUrl(NamedTuple):
    """A URL that downloads one object with a plain GET until `expire_time` (UTC)."""

    url: str
    expire_time: datetime


@dataclass(frozen=True)
class StoredObject:
    """What `put` stored: its size in bytes and the lowercase hex sha256 of its content;
    `kept_locally` when `put_log_blocking` kept it on the node's disk because the store was
    unavailable."""

    size: int
    sha256: str
    kept_locally: bool = False


class Source(Protocol):
    """What `put` reads an object from: `read(size)` returns at most `size` bytes, and b""
    once the content is over (a binary file, or the publish stage's capped reader)."""

    def read(self, size: int = -1, /) -> bytes: ...


class RewindableSource(Source, Protocol):
    """A `Source` that can be read again from an earlier position (an open file, BytesIO)."""

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int: ...


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

    def put_log_blocking(
        self, job_id: str, key: str, source: RewindableSource, *, store_down: bool = False
    ) -> StoredObject:
        """`put_blocking` for one of the job's logs, which must be kept even when the store is
        down: a storage whose store can be unreachable (S3) keeps the log on the node's own
        disk instead when the store fails with `StorageUnavailable` (reading `source` again
        from where it started), and says so in `StoredObject.kept_locally`; every read of the
        storage then finds it there. `store_down`: the caller saw the store fail already, so
        the log goes straight to the node's disk without waiting for the store's retries.
        Local disk stores it as any object."""
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

    def prepare_blocking(self, jobs: int, objects: int) -> None:
        """Makes ahead of time, for `jobs` jobs to come, what storing `objects` objects of each
        would make (nothing, for a storage with nothing to make), so that a job's puts then
        make less on its path. Blocking: for a worker thread, while no job is being stored."""
        ...

    async def delete_job(self, job_id: str) -> None:
        """Removes every object of the job (those kept on the node's disk by
        `put_log_blocking` too); nothing to remove is not an error."""
        ...

    async def check_object(self, job_id: str, key: str, size: int, sha256: str) -> None:
        """Raises `DataLoss` unless the stored object is `size` bytes with this sha256 (as
        recorded when it was stored, where the storage records it), `NotFound` when there is no
        such object."""
        ...

    async def presign(
        self, job_id: str, key: str, expires_s: int | None = None, filename: str = ""
    ) -> PresignedUrl:
        """A URL that downloads the object as an attachment named `filename`, working for
        `expires_s` seconds (the storage's configured default when None). Raises
        `FailedPrecondition` (reason RESULT_URLS_UNAVAILABLE) when the storage cannot hand out
        URLs, as local disk cannot (nor for a log kept on the node's disk while the store was
        down): the caller then streams the object itself."""
        ...

    async def export_result(
        self, job_id: str, key: str, dataset_id: str, index: int, *, size: int, sha256: str
    ) -> None:
        """Copies the job's object `key` into the dataset area as file `index` of dataset
        `dataset_id` (`dataset_key`), where neither `delete_job` nor the retention sweeper
        reaches it, durably. Raises `DataLoss` unless the object (and so its copy) is `size`
        bytes with this sha256, `NotFound` when there is no such object. Idempotent: a copy
        already there with this size and sha256 is kept."""
        ...

    def read_dataset_file_blocking(
        self, dataset_id: str, index: int, *, size: int, sha256: str, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        """Yields file `index` of dataset `dataset_id` from the dataset area in chunks, never
        past `size` bytes, and raises `DataLoss` (at the latest once the last chunk is out)
        unless it is `size` bytes with this sha256; `NotFound` when there is no such file.
        Blocking: for a worker thread (the configure stage)."""
        ...


def result_key(result: job_pb2.ResultFile) -> str:
    """The storage key of a job's result. Keys come from the index, never from the name the
    algorithm chose, so a hostile output name cannot steer where bytes are written."""
    if result.index < 0:
        raise ValueError("a result index is never negative")
    return f"{result.index:04d}"


def dataset_key(dataset_id: str, index: int) -> str:
    """The key of file `index` of a dataset made from a job's outputs, in the dataset area:
    `datasets/{dataset_id}/{index:04d}` (its place under a storage's root or prefix)."""
    if not is_sha256_hex(dataset_id):
        raise ValueError("a dataset id is 64 lowercase hex digits")
    if not 0 <= index <= MAX_DATASET_FILE_INDEX:
        raise ValueError(f"a dataset file's index is 0 to {MAX_DATASET_FILE_INDEX}")
    return f"{DATASETS_AREA}/{dataset_id}/{index:04d}"


def parse_dataset_key(key: str) -> tuple[str, int]:
    """The dataset id and file index of a dataset-area key; ValueError for anything else
    (only the one spelling `dataset_key` makes, so no two keys name one file)."""
    match = _DATASET_KEY_RE.fullmatch(key)
    if match is None or dataset_key(match[1], int(match[2])) != key:
        raise ValueError("not a dataset file's key (datasets/{64 hex}/{index, 4 digits})")
    return match[1], int(match[2])


class Tally:
    """Bytes read back from storage, counted and hashed as they pass, against the size and
    sha256 recorded when they were stored. Each reader says in its own words what a mismatch
    means."""

    def __init__(self, size: int, sha256: str) -> None:
        self.size = size
        self.sha256 = sha256
        self.seen = 0
        self._digest = hashlib.sha256()

    def add(self, chunk: bytes) -> bool:
        """Counts and hashes `chunk`; False once more than the recorded size has passed."""
        self.seen += len(chunk)
        self._digest.update(chunk)
        return self.seen <= self.size

    def matches(self) -> bool:
        """Whether exactly the recorded bytes passed."""
        return self.seen == self.size and self._digest.hexdigest() == self.sha256


def verified_chunks(chunks: Iterable[bytes], size: int, sha256: str, what: str) -> Iterator[bytes]:
    """`chunks` passed on while they hash and count to no more than `size` bytes; DataLoss
    naming `what` as soon as they pass it, and after the last one unless they made exactly
    `size` bytes with this sha256."""
    tally = Tally(size, sha256)
    try:
        for chunk in chunks:
            if not tally.add(chunk):
                raise DataLoss(f"{what} is larger than its recorded size")
            yield chunk
    finally:
        # A read stopped early (refused, or its reader gone) lets go of its file or connection.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if tally.seen != size:
        raise DataLoss(f"{what} is smaller than its recorded size")
    if not tally.matches():
        raise DataLoss(f"{what} does not match its recorded sha256")


def check_job_id(job_id: str) -> None:
    """ValueError unless `job_id` can name a job's objects in any storage."""
    if not is_job_id(job_id):
        raise ValueError("a job id is 32 lowercase hex digits")


def check_read(offset: int, chunk_size: int) -> None:
    """The arguments of `Storage.read`, checked the same way by every storage."""
    if offset < 0:
        raise ValueError("offset must not be negative")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")


def check_key(key: str) -> None:
    """ValueError unless `key` can name an object in any storage."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError(
            "a storage key is 1-128 letters, digits, '_' or '-', starting alphanumeric"
        )


def check_url_ttl(expires_s: int, what: str = "a result URL's lifetime") -> int:
    """`expires_s` when it is a lifetime a presigned URL can have (1 s to 7 days), else a
    ValueError naming `what`."""
    if not 1 <= expires_s <= MAX_RESULT_URL_TTL_S:
        raise ValueError(f"{what} must be 1 to {MAX_RESULT_URL_TTL_S} seconds (7 days)")
    return expires_s


def attachment_disposition(filename: str) -> str:
    """A Content-Disposition that makes a browser save the bytes instead of rendering them,
    under `filename`: an ASCII fallback for old clients and the exact name as RFC 6266's
    `filename*` (UTF-8, percent-encoded, so no quote, CR or LF can end the header)."""
    if not filename:
        return "attachment"
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
    exact = quote(filename, safe="", encoding="utf-8", errors="replace")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


class LocalStorage:
    """Objects as files at `root/<job_id>/<key>`: directories 0700, files 0600, since results
    may hold data-derived outputs that only the services should read.

    The async methods run their blocking file I/O in worker threads (`asyncio.to_thread`) so
    that a large copy never stalls the event loop serving other jobs.

    Making a file or a folder costs 0.1-0.4 ms on a node's file system, ten to thirty times a
    rename: `prepare_blocking` makes job folders, each with a few empty files, under
    `root/.spare`; a job's first put renames one into place and its puts fill those files
    before they make any. What a job did not use is removed at its `sync`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # Shared by the worker threads of prepare_blocking and of the puts.
        self._lock = threading.Lock()
        # Spare folders, each with the names of its empty files; a job's folder, once a spare
        # is renamed to it, keeps the names of those not used yet in `_ready`.
        self._spares: list[tuple[Path, list[str]]] = []
        self._ready: dict[Path, list[str]] = {}
        self._swept = False

    def _job_dir(self, job_id: str) -> Path:
        check_job_id(job_id)
        return self.root / job_id

    def _object_path(self, job_id: str, key: str) -> Path:
        check_key(key)
        return self._job_dir(job_id) / key

    async def put(self, job_id: str, key: str, source: Source) -> StoredObject:
        return await asyncio.to_thread(self.put_blocking, job_id, key, source)

    def put_blocking(self, job_id: str, key: str, source: Source) -> StoredObject:
        path = self._object_path(job_id, key)
        stored = self._put_sync(path, source)
        log.debug("storage.put", job_id=job_id, key=key, size=stored.size)
        return stored

    def put_log_blocking(
        self, job_id: str, key: str, source: RewindableSource, *, store_down: bool = False
    ) -> StoredObject:
        # The node's disk is the store: nowhere else to keep a log.
        return self.put_blocking(job_id, key, source)

    def holds(self, job_id: str, key: str) -> bool:
        """Whether the object exists (one stat: cheap enough for an event loop)."""
        return self._object_path(job_id, key).is_file()

    def remove_blocking(self, job_id: str, key: str) -> None:
        """Removes one object, if there is one."""
        self._object_path(job_id, key).unlink(missing_ok=True)

    def _put_sync(self, path: Path, source: Source) -> StoredObject:
        self._make_job_dir(path.parent)
        # A file made ahead in this job's folder, or one made now: either is 0600, made with
        # O_EXCL in the job's own folder, so the rename below is atomic (same file system) and
        # readers see the old object or the whole new one.
        ready = self._take(self._ready.get(path.parent))
        if ready is not None:
            temp_name = str(path.parent / ready)
            fd = os.open(temp_name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        else:
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

    def _make_job_dir(self, job_dir: Path) -> None:
        if job_dir.is_dir():
            return  # every put of a job but its first
        self._make_root()
        spare = self._take(self._spares)
        if spare is not None:
            folder, names = spare
            try:
                os.rename(folder, job_dir)  # made 0700 ahead of time
            except OSError:
                pass  # made meanwhile by another put of the job: the spare is dropped
            else:
                with self._lock:
                    self._ready[job_dir] = names
                return
        try:
            job_dir.mkdir(mode=0o700)
        except FileExistsError:
            return
        os.chmod(job_dir, 0o700)

    def _make_root(self) -> None:
        # mkdir's mode is filtered by the umask, so set it explicitly, but only on directories
        # created here: an existing root keeps the mode its operator gave it.
        try:
            self.root.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            return
        os.chmod(self.root, 0o700)

    def _take(self, items: list[_T] | None) -> _T | None:
        with self._lock:
            return items.pop() if items else None

    def prepare_blocking(self, jobs: int, objects: int) -> None:
        spare_root = self.root / _SPARE_DIR
        if not self._swept:
            # Spares of an earlier engine: this one does not know their files.
            shutil.rmtree(spare_root, ignore_errors=True)
            self._swept = True
        self._make_root()
        spare_root.mkdir(mode=0o700, exist_ok=True)
        while len(self._spares) < jobs:
            spare = Path(tempfile.mkdtemp(prefix="job-", dir=spare_root))  # 0700
            names = []
            for _ in range(objects):
                fd, name = tempfile.mkstemp(prefix=_READY_PREFIX, dir=spare)  # 0600
                os.close(fd)
                names.append(os.path.basename(name))
            with self._lock:
                self._spares.append((spare, names))

    async def sync(self, job_id: str) -> None:
        await asyncio.to_thread(self.sync_blocking, job_id)

    def sync_blocking(self, job_id: str) -> None:
        job_dir = self._job_dir(job_id)
        with self._lock:
            unused = self._ready.pop(job_dir, [])
        for name in unused:
            (job_dir / name).unlink(missing_ok=True)
        if not job_dir.is_dir():
            return
        for entry in os.scandir(job_dir):
            _fsync_file(entry.path)
        _fsync_dir(job_dir)

    async def read(
        self, job_id: str, key: str, offset: int = 0, chunk_size: int = CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        check_read(offset, chunk_size)
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
        with self._lock:
            self._ready.pop(job_dir, None)
        # rmtree is safe against symlink swaps on Linux (it works with directory fds).
        await asyncio.to_thread(_rmtree_if_present, job_dir)
        log.info("storage.job_deleted", job_id=job_id)

    async def check_object(self, job_id: str, key: str, size: int, sha256: str) -> None:
        # No digest is kept beside a file: the check reads it whole, in one worker thread.
        path = self._object_path(job_id, key)
        await asyncio.to_thread(_check_file, path, size, sha256, f"result {key} of job {job_id}")

    async def presign(
        self, job_id: str, key: str, expires_s: int | None = None, filename: str = ""
    ) -> PresignedUrl:
        self._object_path(job_id, key)  # a malformed name is still a ValueError
        raise FailedPrecondition(
            "results are kept on the node's disk, which hands out no URLs: download them "
            "through the Provider",
            reason="RESULT_URLS_UNAVAILABLE",
        )

    # -- the dataset area -----------------------------------------------------------------

    def dataset_file(self, dataset_id: str, index: int) -> Path:
        """Where file `index` of a dataset made from a job's outputs is kept (mode 0444), for
        the engine to bind-mount read-only; whether it is there is not checked."""
        return self.root / dataset_key(dataset_id, index)

    async def export_result(
        self, job_id: str, key: str, dataset_id: str, index: int, *, size: int, sha256: str
    ) -> None:
        await asyncio.to_thread(
            self._export_blocking, job_id, key, self.dataset_file(dataset_id, index), size, sha256
        )

    def _export_blocking(self, job_id: str, key: str, target: Path, size: int, sha256: str) -> None:
        what = f"result {key} of job {job_id}"
        if _holds(target, size, sha256):
            log.info("storage.export_kept", job_id=job_id, key=key)
            return
        source = self._object_path(job_id, key)
        if not source.is_file():
            raise NotFound(f"{what} is not stored")
        self._make_root()
        for folder in (target.parent.parent, target.parent):
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=0o700)
        temp = target.parent / f"{_TEMP_PREFIX}{os.urandom(8).hex()}"
        try:
            # One inode for both: no bytes are copied, and deleting the job leaves this name.
            os.link(source, temp, follow_symlinks=False)
            linked = True
        except OSError:
            linked = False  # another file system, or links refused: a copy instead
        try:
            if linked:
                _check_file(temp, size, sha256, what)
            else:
                _copy_checked(source, temp, size, sha256, what)
            # 0444 also for the job's own name of a linked inode: its folder is 0700 anyway.
            os.chmod(temp, _DATASET_FILE_MODE)
            _fsync_file(temp)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        _fsync_dir(target.parent)
        _fsync_dir(target.parent.parent)
        log.info("storage.exported", job_id=job_id, key=key, size=size, linked=linked)

    def read_dataset_file_blocking(
        self, dataset_id: str, index: int, *, size: int, sha256: str, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        check_read(0, chunk_size)
        path = self.dataset_file(dataset_id, index)
        what = f"file {index} of dataset {dataset_id}"
        return verified_chunks(_file_chunks(path, chunk_size, what), size, sha256, what)


def _file_chunks(path: Path, chunk_size: int, what: str) -> Iterator[bytes]:
    """The file's bytes in chunks, opened without following a link; NotFound when absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"{what} is not stored") from None
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(chunk_size):
            yield chunk


def _holds(path: Path, size: int, sha256: str) -> bool:
    """Whether `path` is a regular file of `size` bytes with this sha256 (a copy made before)."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        return False
    try:
        _check_file(path, size, sha256, "the copy")
    except DataLoss:
        log.warning("storage.export_replacing_a_bad_copy")
        return False
    return True


def _check_file(path: Path, size: int, sha256: str, what: str) -> None:
    """DataLoss naming `what` unless the file is `size` bytes with this sha256."""
    for _ in verified_chunks(_file_chunks(path, CHUNK_SIZE, what), size, sha256, what):
        pass


def _copy_checked(source: Path, temp: Path, size: int, sha256: str, what: str) -> None:
    """Streams `source` into a new file `temp` (0600 until it is whole), checked as it goes."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        for chunk in verified_chunks(_file_chunks(source, CHUNK_SIZE, what), size, sha256, what):
            out.write(chunk)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def storage_from_url(url: str, environ: Mapping[str, str] | None = None) -> Storage:
    """The storage a configuration URL names: `file:///abs/path` or a plain path for local
    disk, `s3://BUCKET/PREFIX` for S3 (reached with `S3Settings.from_env`, presigned URLs
    lasting C2D_RESULT_URL_TTL_S seconds, 900 by default, logs kept under `spill_root` while
    S3 is down). Makes no connection: a URL that cannot name a storage is a ValueError, an
    unreachable one fails at its first use. `environ` (default os.environ) is where the S3
    settings and C2D_STORAGE_SPILL are read from."""
    if not url:
        raise ValueError("the storage URL is empty")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return _s3_storage(url, os.environ if environ is None else environ)
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


def _s3_storage(url: str, environ: Mapping[str, str]) -> Storage:
    # Imported here: most processes keep results on disk and never load the S3 libraries.
    from mesh.s3 import S3Settings, parse_s3_url
    from mesh.storage_s3 import S3Storage

    bucket, prefix = parse_s3_url(url)
    raw_ttl = environ.get("C2D_RESULT_URL_TTL_S", "")
    try:
        ttl = int(raw_ttl) if raw_ttl else RESULT_URL_TTL_S
    except ValueError:
        raise ValueError(f"C2D_RESULT_URL_TTL_S must be an integer, not {raw_ttl!r}") from None
    check_url_ttl(ttl, "C2D_RESULT_URL_TTL_S")
    spill = LocalStorage(spill_root(environ))
    return S3Storage(S3Settings.from_env(environ), bucket, prefix, url_ttl_s=ttl, spill=spill)


def spill_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where a node whose results are in a remote store keeps the logs the store could not
    take: C2D_STORAGE_SPILL, default `results-spill` in the process's `mesh.config.home()`.
    The engine, the publish stage and the Operator Service of one node read the same setting,
    so all find the same files."""
    env = os.environ if environ is None else environ
    configured = env.get("C2D_STORAGE_SPILL", "")
    if not configured:
        return mesh_config.home() / "results-spill"
    return Path(configured).expanduser().absolute()
