"""The configure stage: verify the algorithm and the dataset files, lay out the job's workspace,
and say how the sandbox must be started (argument list, environment, mounts).

Runs as root on the host (local engine, in-process) or as a container entrypoint (Kubernetes):

    python -m pods.configure --spec spec.json --workspace DIR --data-root DIR

A dataset file under the data root is checked and bind-mounted, never copied. A file in S3 or
behind an HTTP(S) URL is fetched into the workspace (pods.fetch) with the node's source
credentials and limits (operator_engine.sources), checked against its recorded size and sha256,
and mounted read-only like the others; every file's cheap checks come before the first fetch.
A file of a dataset made from a job's outputs (`stored`) is read from the node's results storage
with the engine's own storage settings, checked against its recorded size and sha256: on local
disk it is then bind-mounted where it is, from S3 (or with `--copy-stored`, as a Kubernetes
configure pod does) it is copied into the workspace like a fetched file. The storage's
credentials stay in the stage: the algorithm's environment is never more than `algorithm_env`.

Nothing here ever names a dataset file's location in an error or a log line: the consumer reads
both, and where the owner keeps data is the owner's business."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shlex
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import structlog
from c2d.common.v1 import job_pb2
from c2d.engine.v1 import engine_pb2
from google.protobuf import json_format

from mesh.errors import DataLoss, NotFound
from mesh.jobs import is_sha256_hex
from mesh.s3 import S3Settings, parse_s3_object
from mesh.storage import (
    LocalStorage,
    Storage,
    StorageUnavailable,
    parse_dataset_key,
    storage_from_url,
)
from operator_engine.sources import SourceSettings, UnknownCredentials
from pods import fetch
from pods.workspace import (
    ALGO_CUSTOM_DATA_FILE,
    ALGORITHM_FILE,
    CONFIGURATION_LOG,
    SANDBOX_ALGO_CUSTOM_DATA,
    SANDBOX_ALGORITHM,
    SANDBOX_DDOS,
    SANDBOX_INPUTS,
    SANDBOX_LOGS,
    SANDBOX_OUTPUTS,
    SANDBOX_TRANSFORMATIONS,
    Workspace,
    asset_did,
    check_job_id,
    is_asset_id,
    open_new_file,
    sandbox_input_path,
    write_termination_log,
)

# The placeholder an entrypoint uses for the code's path, as in the reference system.
ALGO_PLACEHOLDER = "$ALGO"

# Exit codes of the program form: the reference system's status codes for the two failures,
# so a Kubernetes backend can map a container's exit code without parsing its output.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA_PROVISIONING_FAILED = 31
EXIT_ALGORITHM_PROVISIONING_FAILED = 32
# A fetched file: only root (the engine) writes it; the sandbox's unrelated uid reads it
# through its read-only mount.
_FETCHED_MODE = 0o444


class ProvisioningError(Exception):
    """The configure stage refused the job. `str(error)` is safe to show the consumer (it never
    names a dataset's location); `reason` is the job's failure reason and `status_code` the
    reference system's numeric status."""

    reason: job_pb2.FailureReason.ValueType = job_pb2.FAILURE_REASON_UNSPECIFIED
    status_code: int = 0


class DataProvisioningError(ProvisioningError):
    """A dataset file is missing, outside the data root, not a regular file or not readable by
    the sandbox; or a dataset id is malformed."""

    reason = job_pb2.FAILURE_REASON_DATA_PROVISIONING_FAILED
    status_code = 31


class AlgorithmProvisioningError(ProvisioningError):
    """The algorithm's code is missing or does not match its checksum, its entrypoint is unusable,
    its id is malformed, or the parameters are not a JSON object (they belong to the algorithm's
    run, so a job with bad parameters fails as an algorithm provisioning failure)."""

    reason = job_pb2.FAILURE_REASON_ALGORITHM_PROVISIONING_FAILED
    status_code = 32


class ConfigureStopped(Exception):
    """The job was stopped while its inputs were being fetched; the stage gave up."""


@dataclass(frozen=True)
class Mount:
    """One bind mount of the sandbox: `host_path` appears at `sandbox_path`."""

    host_path: Path
    sandbox_path: str
    writable: bool = False


@dataclass(frozen=True)
class ConfigureResult:
    """How to start the compute stage: exec `argv` (no shell) with exactly `env`, working
    directory `/`, and `mounts` in place (read-only unless `writable`)."""

    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form, for the program form's standard output. Holds host paths: it is
        for the engine, never for the consumer."""
        return {
            "argv": self.argv,
            "env": self.env,
            "mounts": [
                {
                    "host_path": str(m.host_path),
                    "sandbox_path": m.sandbox_path,
                    "writable": m.writable,
                }
                for m in self.mounts
            ],
        }


class _ConfigurationLog:
    """The lines of logs/configuration.log, which the consumer downloads: what was verified,
    sizes and checksums, never a dataset's location."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.lines.append(f"{stamp} {message}")

    def render(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode("utf-8")


@dataclass(frozen=True)
class _Remote:
    """A dataset file to fetch, checked and resolved: where it goes and with what."""

    label: str
    dataset_id: str
    index: int
    source: engine_pb2.DatasetFileSource = field(repr=False)
    # The S3 settings for an s3_url; the headers for an http_url.
    access: S3Settings | dict[str, str] = field(repr=False)

    @property
    def kind(self) -> str:
        return "S3" if isinstance(self.access, S3Settings) else "HTTP"


@dataclass(frozen=True)
class _Stored:
    """A file of a dataset made from a job's outputs, checked as far as can be done without
    reading it: where it goes, and, on local disk, the file to mount (None: copied)."""

    label: str
    dataset_id: str
    index: int
    source: engine_pb2.DatasetFileSource = field(repr=False)
    # Its place in the storage's dataset area (mesh.storage.dataset_key).
    area: tuple[str, int]
    host_path: Path | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Stage:
    """What the dataset steps need besides the spec."""

    ws: Workspace
    data_root: Path
    record: _ConfigurationLog
    sources: SourceSettings
    stopped: Callable[[], bool]
    log: structlog.typing.FilteringBoundLogger
    # The node's results storage, for `stored` files (None: the stage has none to read).
    storage: Storage | None = None
    # Copy `stored` files into the workspace even from local disk (a pod that cannot mount
    # the results volume into the algorithm's pod).
    copy_stored: bool = False


def configure(
    spec: engine_pb2.JobSpec,
    workspace: Path,
    data_root: Path,
    sources: SourceSettings | None = None,
    *,
    stopped: Callable[[], bool] | None = None,
    storage: Storage | None = None,
    copy_stored: bool = False,
) -> ConfigureResult:
    """Verifies the job's inputs, fetches its remote dataset files with `sources` (the node's
    credentials and limits; none and the defaults when None), reads its `stored` files from
    `storage` (the node's results storage: bind-mounted from local disk unless `copy_stored`,
    else copied into the workspace), and lays out `workspace` (see `pods.workspace`).

    Blocking (file I/O, downloads); an async caller runs it with `asyncio.to_thread`. Raises
    `DataProvisioningError` or `AlgorithmProvisioningError` when the job must fail with that
    reason, `ConfigureStopped` when `stopped()` turned true during a fetch, `ValueError` for a
    malformed job id (the engine validates it at RunJob, so this is a bug upstream), and
    `OSError` when the workspace itself cannot be written (the engine's own failure, not the
    job's). logs/configuration.log is written in every case where the workspace exists."""
    ws = Workspace(Path(workspace))
    record = _ConfigurationLog()
    log = structlog.get_logger().bind(job_id=spec.job_id, stage="configure")
    stage = _Stage(
        ws,
        Path(data_root),
        record,
        sources or SourceSettings(),
        stopped or _never,
        log,
        storage=storage,
        copy_stored=copy_stored,
    )
    try:
        check_job_id(spec.job_id)
        record.add(f"configure: job {spec.job_id}")
        make_layout(ws)
        result = _configure(spec, stage)
        record.add("configure succeeded")
    except ProvisioningError as error:
        record.add(f"configure failed: {error}")
        log.warning("configure.failed", reason=job_pb2.FailureReason.Name(error.reason))
        raise
    except ConfigureStopped:
        record.add("configure stopped: the job was stopped while its inputs were fetched")
        log.info("configure.stopped")
        raise
    except Exception as error:
        # Not the consumer's fault and possibly holding a host path: say only what kind it was.
        record.add(f"configure failed: internal error ({type(error).__name__})")
        log.error("configure.error", error_type=type(error).__name__)
        raise
    finally:
        _write_configuration_log(ws, record, log)
    log.info("configure.done", datasets=len(spec.datasets), mounts=len(result.mounts))
    return result


def _never() -> bool:
    return False


def _configure(spec: engine_pb2.JobSpec, stage: _Stage) -> ConfigureResult:
    ws, record = stage.ws, stage.record
    argv = _provision_algorithm(spec.algorithm, ws, record)
    mounts = _provision_datasets(spec.datasets, stage)
    if _provision_parameters(spec.parameters_json, ws, record):
        mounts.append(Mount(ws.algo_custom_data, SANDBOX_ALGO_CUSTOM_DATA))
    mounts += [
        Mount(ws.ddos, SANDBOX_DDOS),
        Mount(ws.transformations, SANDBOX_TRANSFORMATIONS),
        Mount(ws.outputs, SANDBOX_OUTPUTS, writable=True),
        # Read-only: the engine writes algorithm.log from the process's pipes; the algorithm
        # may read its logs but never forge them.
        Mount(ws.logs, SANDBOX_LOGS),
    ]
    return ConfigureResult(argv=argv, env=algorithm_env(spec), mounts=mounts)


def algorithm_env(spec: engine_pb2.JobSpec) -> dict[str, str]:
    """The algorithm's environment variables, as the reference system sets them."""
    return {
        "DIDS": json.dumps([dataset.id for dataset in spec.datasets]),
        "TRANSFORMATION_DID": asset_did(spec.algorithm.id) if spec.algorithm.id else "",
        "INPUTS": SANDBOX_INPUTS,
        "OUTPUTS": SANDBOX_OUTPUTS,
        "LOGS": SANDBOX_LOGS,
        "ALGO": SANDBOX_ALGORITHM,
    }


def _provision_algorithm(
    algorithm: engine_pb2.AlgorithmInput, ws: Workspace, record: _ConfigurationLog
) -> list[str]:
    if algorithm.id and not is_asset_id(algorithm.id):
        raise AlgorithmProvisioningError("the algorithm id is not 64 lowercase hex digits")
    record.add(f"algorithm: {asset_did(algorithm.id)}" if algorithm.id else "algorithm: raw code")
    if not algorithm.code:
        raise AlgorithmProvisioningError("the algorithm has no code")
    digest = hashlib.sha256(algorithm.code).hexdigest()
    if digest != algorithm.code_sha256:
        raise AlgorithmProvisioningError(
            f"the algorithm's code does not match its checksum "
            f"(expected sha256 {algorithm.code_sha256!r}, got {digest})"
        )
    record.add(f"algorithm code: {len(algorithm.code)} bytes, sha256 {digest} verified")
    argv = entrypoint_argv(algorithm.entrypoint)
    record.add(f"entrypoint: {json.dumps(argv)}")
    # 0444: the sandbox's unrelated uid must read it, nobody needs to change it.
    _write_file(ws, ws.transformations, ALGORITHM_FILE, algorithm.code, 0o444)
    return argv


def entrypoint_argv(entrypoint: str) -> list[str]:
    """Splits the entrypoint like a shell would, without a shell: no expansion, no pipes, no
    redirections, only `$ALGO` replaced in each argument."""
    if ALGO_PLACEHOLDER not in entrypoint:
        raise AlgorithmProvisioningError(f"the entrypoint does not mention {ALGO_PLACEHOLDER}")
    if "\x00" in entrypoint:
        raise AlgorithmProvisioningError("the entrypoint contains a NUL character")
    try:
        words = shlex.split(entrypoint)
    except ValueError as error:
        raise AlgorithmProvisioningError(f"the entrypoint cannot be split: {error}") from None
    argv = [word.replace(ALGO_PLACEHOLDER, SANDBOX_ALGORITHM) for word in words]
    if not argv or not any(SANDBOX_ALGORITHM in arg for arg in argv):
        raise AlgorithmProvisioningError(f"the entrypoint does not mention {ALGO_PLACEHOLDER}")
    return argv


def _provision_datasets(datasets: Iterable[engine_pb2.DatasetInput], stage: _Stage) -> list[Mount]:
    """Checks every dataset file (local ones fully, stored and remote ones as far as can be
    done without reading them), writes the DDOs, then reads the stored files and fetches the
    remote ones; returns the mounts, in order."""
    ws, record = stage.ws, stage.record
    # Resolved at the first local file: a job with only remote files needs no data root.
    root: Path | None = None
    mounts: list[Mount] = []
    remote: list[_Remote] = []
    stored: list[_Stored] = []
    seen: set[str] = set()
    for dataset in datasets:
        if not is_asset_id(dataset.id):
            raise DataProvisioningError("a dataset id is not 64 lowercase hex digits")
        if dataset.id in seen:
            # Two datasets with one id would share /data/inputs/<id>/.
            raise DataProvisioningError(f"dataset {dataset.id} is listed twice")
        seen.add(dataset.id)
        total = 0
        fetched = 0
        for index, source in enumerate(dataset.files):
            label = f"file {index} of dataset {dataset.id}"
            target = sandbox_input_path(dataset.id, index)
            if source.WhichOneof("location") == "path":
                root = root or resolve_data_root(stage.data_root)
                host_path, size = check_dataset_file(source.path, root, label)
                record.add(f"{label}: {size} bytes, regular file readable by the sandbox")
                mounts.append(Mount(host_path, target))
            elif source.WhichOneof("location") == "stored":
                item = _plan_stored(dataset.id, index, source, stage, label)
                stored.append(item)
                mounts.append(Mount(item.host_path or ws.dataset_input(dataset.id, index), target))
                size = source.size_bytes
                fetched += item.host_path is None
            else:
                remote.append(_plan_remote(dataset.id, index, source, stage.sources, label))
                mounts.append(Mount(ws.dataset_input(dataset.id, index), target))
                size = source.size_bytes
                fetched += 1
            total += size
        ddo = dataset.ddo_json.encode("utf-8")
        _write_file(ws, ws.ddos, dataset.id, ddo, 0o444)
        to_fetch = f" ({fetched} to fetch)" if fetched else ""
        record.add(
            f"dataset {dataset.id}: {len(dataset.files)} files{to_fetch}, {total} bytes; "
            f"ddo {len(ddo)} bytes, sha256 {hashlib.sha256(ddo).hexdigest()}"
        )
    copies = [item for item in stored if item.host_path is None]
    _check_room(copies, remote, stage)
    if copies or remote:
        _make_dir(ws.dataset_inputs, 0o700)
    _read_stored(stored, stage)
    _fetch_all(remote, stage)
    return mounts


def stored_files(spec: engine_pb2.JobSpec) -> list[engine_pb2.DatasetFileSource]:
    """The job's dataset files that are copies of outputs in the node's results storage."""
    return [
        source
        for dataset in spec.datasets
        for source in dataset.files
        if source.WhichOneof("location") == "stored"
    ]


def _plan_stored(
    dataset_id: str,
    index: int,
    source: engine_pb2.DatasetFileSource,
    stage: _Stage,
    label: str,
) -> _Stored:
    """Checks what can be checked before reading a stored file: its key, its recorded size
    and sha256, a storage to read it from, and on local disk the file itself (there, of the
    recorded size, readable by the sandbox)."""
    problem = ""
    area: tuple[str, int] = ("", 0)
    try:
        area = parse_dataset_key(source.stored)
    except ValueError:
        problem = "not a file of this node's dataset area"
    problem = problem or _record_problem(source)
    if not problem and source.credentials:
        problem = "a file in the node's storage takes no source credentials"
    if not problem and stage.storage is None:
        problem = "this stage has no results storage to read it from"
    if problem:
        raise DataProvisioningError(f"{label}: {problem}")
    if not isinstance(stage.storage, LocalStorage) or stage.copy_stored:
        return _Stored(label, dataset_id, index, source, area)
    path = stage.storage.dataset_file(*area)
    info: os.stat_result | None = None
    with contextlib.suppress(OSError):
        info = os.stat(path, follow_symlinks=False)
    # Raised after the suppressed error: no exception context carries the path.
    if info is None or not stat.S_ISREG(info.st_mode):
        raise DataProvisioningError(f"{label}: not stored on this node")
    if info.st_size != source.size_bytes:
        raise DataProvisioningError(
            f"{label}: {info.st_size} bytes stored, not its recorded {source.size_bytes}"
        )
    if not info.st_mode & stat.S_IROTH:
        raise DataProvisioningError(f"{label}: not readable by the sandbox")
    return _Stored(label, dataset_id, index, source, area, host_path=path)


def _read_stored(items: list[_Stored], stage: _Stage) -> None:
    """Checks each stored file against its recorded size and sha256 as it is read: a local
    one in place (it is then mounted as it is), the others into the workspace."""
    for item in items:
        started = time.monotonic()
        if item.host_path is None:
            _make_dir(stage.ws.dataset_inputs / item.dataset_id, 0o700)
            target = stage.ws.dataset_input(item.dataset_id, item.index)
            with _replacing(stage.ws, target, _FETCHED_MODE) as fd:
                _copy_stored(item, stage, fd)
            done = "copied from the node's storage"
        else:
            _copy_stored(item, stage, None)
            done = "in the node's storage"
        seconds = time.monotonic() - started
        stage.record.add(
            f"{item.label}: {item.source.size_bytes} bytes {done} in {seconds:.2f} s, "
            f"sha256 {item.source.sha256} verified"
        )
        stage.log.info(
            "configure.stored_file_read",
            dataset_id=item.dataset_id,
            index=item.index,
            copied=item.host_path is None,
            bytes=item.source.size_bytes,
            seconds=round(seconds, 3),
        )


def _copy_stored(item: _Stored, stage: _Stage, out: int | None) -> None:
    """Reads a stored file through its checks, into `out` when it is given; a refusal
    fails the job (data provisioning failed), naming the file by its position only."""
    assert stage.storage is not None  # _plan_stored saw to it
    chunks = stage.storage.read_dataset_file_blocking(
        *item.area, size=item.source.size_bytes, sha256=item.source.sha256
    )
    problem = ""
    try:
        for chunk in chunks:
            if stage.stopped():
                raise ConfigureStopped
            if out is not None:
                _write_all(out, chunk)
    except DataLoss:
        problem = "the stored copy does not match its recorded size and sha256"
    except NotFound:
        problem = "not stored on this node"
    except StorageUnavailable as error:
        problem = f"the node's storage could not be read ({error.message})"
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        problem = "no room left for the job's inputs"
    # Raised here, outside the handlers: no chain carries the storage's own error.
    if problem:
        raise DataProvisioningError(f"{item.label}: {problem}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def remote_files(spec: engine_pb2.JobSpec) -> list[engine_pb2.DatasetFileSource]:
    """The job's dataset files that the configure stage fetches (S3 or HTTP(S))."""
    return [
        source
        for dataset in spec.datasets
        for source in dataset.files
        if source.WhichOneof("location") in ("s3_url", "http_url")
    ]


def _plan_remote(
    dataset_id: str,
    index: int,
    source: engine_pb2.DatasetFileSource,
    sources: SourceSettings,
    label: str,
) -> _Remote:
    """Checks what can be checked before fetching: the URL's form, the recorded size and
    sha256, the credentials. Never echoes the URL."""
    location = source.WhichOneof("location")
    if location is None:
        raise DataProvisioningError(f"{label}: no location")
    problem = _record_problem(source) or _url_problem(location, source)
    if problem:
        raise DataProvisioningError(f"{label}: {problem}")
    access: S3Settings | dict[str, str] = {}
    # The problem is kept and raised after the handler, so no exception chain holds the
    # lookup's own error.
    try:
        if location == "s3_url":
            access = sources.s3_settings(source.credentials)
        else:
            access = sources.http_headers(source.credentials)
    except UnknownCredentials as error:
        problem = str(error)
    except ValueError:
        problem = "the node's default S3 settings are unusable"
    if problem:
        raise DataProvisioningError(f"{label}: {problem}")
    return _Remote(label, dataset_id, index, source, access)


def _record_problem(source: engine_pb2.DatasetFileSource) -> str:
    """What is wrong with a copied or fetched file's record (its sha256 and size), which the
    copy is checked against; empty when fine."""
    if not is_sha256_hex(source.sha256):
        return "no recorded sha256 to check it against"
    if source.size_bytes < 0:
        return "its recorded size is negative"
    return ""


def _url_problem(location: str, source: engine_pb2.DatasetFileSource) -> str:
    """What is wrong with the file's URL, in words that never echo it; empty when fine."""
    if location == "s3_url":
        try:
            parse_s3_object(source.s3_url)
        except ValueError as error:
            return str(error)  # parse_s3_url's messages never echo the URL
        return ""
    try:
        parsed = urlparse(source.http_url)
        port = parsed.port  # ValueError for a port that is not a number
    except ValueError:
        return "not a usable http:// or https:// URL"
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port == 0:
        return "not an http:// or https:// URL"
    if parsed.username is not None or parsed.password is not None:
        return "credentials belong in the node's source credentials, not in the URL"
    if any(c in source.http_url for c in "\r\n\x00 "):
        return "not a usable http:// or https:// URL"
    return ""


def _check_room(copies: list[_Stored], remote: list[_Remote], stage: _Stage) -> None:
    """Before any copy or fetch: the files to fetch must fit the node's limit, and those to
    copy into the workspace and to fetch its free space (a quota'd or small disk fails here,
    not half way)."""
    fetched = sum(item.source.size_bytes for item in remote)
    if fetched > stage.sources.max_bytes:
        raise DataProvisioningError(
            f"the dataset files to fetch ({fetched} bytes) exceed this node's limit of "
            f"{stage.sources.max_bytes} bytes"
        )
    total = fetched + sum(item.source.size_bytes for item in copies)
    room = _free_bytes(stage.ws.root) if copies or remote else None
    if room is not None and total > room:
        what = "to copy and fetch" if copies else "to fetch"
        raise DataProvisioningError(
            f"the dataset files {what} ({total} bytes) do not fit the {room} bytes left for "
            "the job's inputs"
        )


def _fetch_all(remote: list[_Remote], stage: _Stage) -> None:
    """Fetches every remote file (`_check_room` has seen that they fit)."""
    for item in remote:
        _make_dir(stage.ws.dataset_inputs / item.dataset_id, 0o700)
        done = _fetch_one(item, stage)
        stage.record.add(
            f"{item.label}: {done.size_bytes} bytes fetched from {item.kind} in "
            f"{done.seconds:.2f} s, sha256 {done.sha256} verified"
        )
        stage.log.info(
            "configure.file_fetched",
            dataset_id=item.dataset_id,
            index=item.index,
            source=item.kind,
            bytes=done.size_bytes,
            seconds=round(done.seconds, 3),
        )


def _fetch_one(item: _Remote, stage: _Stage) -> fetch.Fetched:
    """Fetches one file into place once its size and sha256 are right; nothing is left
    behind otherwise."""
    final = stage.ws.dataset_input(item.dataset_id, item.index)
    failure: str | None = None
    stopped = False
    try:
        with _replacing(stage.ws, final, _FETCHED_MODE) as fd:
            done = fetch.fetch(item.source, item.access, fd, stage.sources, stage.stopped)
    except fetch.FetchError as error:
        failure = str(error)
    except fetch.Stopped:
        stopped = True
    # Raised here, after the handlers: no chain carries the library's error.
    if stopped:
        raise ConfigureStopped
    if failure is not None:
        raise DataProvisioningError(f"{item.label}: {failure}")
    return done


def _free_bytes(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        info = os.statvfs(path)
        return info.f_bavail * info.f_frsize
    return None


def resolve_data_root(data_root: Path) -> Path:
    root: Path | None = None
    with contextlib.suppress(OSError, RuntimeError):
        root = data_root.resolve(strict=True)
    # Raised after the suppressed error, so the exception carries no context naming the path.
    if root is None or not root.is_dir():
        raise DataProvisioningError("the node's data root is not available")
    return root


def check_dataset_file(raw_path: str, root: Path, label: str) -> tuple[Path, int]:
    """Returns the file's resolved host path and size, or raises with a message that names the
    file only by its position: the consumer reads these messages."""
    if not raw_path or "\x00" in raw_path or not os.path.isabs(raw_path):
        raise DataProvisioningError(f"{label}: not an absolute path under the data root")
    resolved: Path | None = None
    # Every link resolved, so the check below is about where the bytes really are.
    # RuntimeError: a symlink loop (Python 3.11).
    with contextlib.suppress(OSError, RuntimeError):
        resolved = Path(raw_path).resolve(strict=True)
    # Raised after the suppressed error: a FileNotFoundError in __context__ would carry the path
    # into any traceback the engine logs.
    if resolved is None:
        raise DataProvisioningError(f"{label}: not found")
    if resolved == root or not resolved.is_relative_to(root):
        raise DataProvisioningError(f"{label}: not under the data root")
    info: os.stat_result | None = None
    # No link is followed: were the file swapped for a link since resolve(), this sees the link
    # and refuses it.
    with contextlib.suppress(OSError):
        info = os.stat(resolved, follow_symlinks=False)
    if info is None:
        raise DataProvisioningError(f"{label}: not found")
    if not stat.S_ISREG(info.st_mode):
        raise DataProvisioningError(f"{label}: not a regular file")
    # The sandbox runs as an unrelated uid, so only the "other" bits grant it access.
    if not info.st_mode & stat.S_IROTH:
        raise DataProvisioningError(f"{label}: not readable by the sandbox (grant read to others)")
    return resolved, info.st_size


def _provision_parameters(parameters_json: str, ws: Workspace, record: _ConfigurationLog) -> bool:
    """Writes algoCustomData.json when parameters were given; True when it did."""
    if not parameters_json:
        record.add("parameters: none")
        return False
    failed = False
    parsed: Any = None
    try:
        parsed = json.loads(parameters_json, parse_constant=_refuse_constant)
    except ValueError:
        failed = True
    if failed or not isinstance(parsed, dict):
        raise AlgorithmProvisioningError("the algorithm parameters are not a JSON object")
    data = parameters_json.encode("utf-8")
    _write_file(ws, ws.root, ALGO_CUSTOM_DATA_FILE, data, 0o444)
    record.add(
        f"parameters: {len(parsed)} keys, {len(data)} bytes, "
        f"sha256 {hashlib.sha256(data).hexdigest()}"
    )
    return True


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; algorithms in other languages would choke on them.
    raise ValueError(f"{name} is not JSON")


def make_layout(ws: Workspace) -> None:
    """The workspace's folders, with their modes; what exists already is kept. The engine also
    calls it to make workspaces ahead of time."""
    ws.root.mkdir(mode=0o700, exist_ok=True)
    # 0755: the sandbox's uid reads through these mounts. outputs/ starts root-only; the sandbox
    # chowns it to the job's uid.
    _make_dir(ws.transformations, 0o755)
    _make_dir(ws.ddos, 0o755)
    _make_dir(ws.logs, 0o755)
    _make_dir(ws.outputs, 0o700)


def _make_dir(path: Path, mode: int) -> None:
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        # A rerun of the stage: fine, as long as it is a real directory and not a link.
        if not stat.S_ISDIR(os.stat(path, follow_symlinks=False).st_mode):
            raise
        return
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask


def _write_file(ws: Workspace, directory: Path, name: str, data: bytes, mode: int) -> None:
    """Writes `directory/name` whole or not at all (see _replacing)."""
    with _replacing(ws, directory / name, mode) as fd, os.fdopen(fd, "wb", closefd=False) as out:
        out.write(data)


@contextlib.contextmanager
def _replacing(ws: Workspace, target: Path, mode: int) -> Iterator[int]:
    """An open temporary file beside `target` (never following a link), given `mode` and
    renamed over `target` when the block ends, removed when it raises: a rerun replaces a
    read-only file and a crash leaves no half. The temporary file is one made ahead in the
    workspace when there is one (see pods.workspace), else a new one."""
    temp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    fd = open_new_file(ws.root, temp)
    try:
        try:
            yield fd
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _write_configuration_log(
    ws: Workspace, record: _ConfigurationLog, log: structlog.typing.FilteringBoundLogger
) -> None:
    try:
        if not ws.logs.is_dir():
            _make_dir(ws.logs, 0o755)
        # 0644: the consumer receives it anyway, and the sandbox may read /data/logs.
        _write_file(ws, ws.logs, CONFIGURATION_LOG, record.render(), 0o644)
    except OSError as error:
        # A log that cannot be written must not hide the stage's real outcome.
        log.error("configure.log_not_written", error_type=type(error).__name__)


def main(argv: list[str] | None = None) -> int:
    """The program form. Prints the ConfigureResult as JSON on standard output; exits 31 or 32
    (the reference status codes) for a provisioning failure, printing its message."""
    from mesh.logging import configure_logging

    parser = argparse.ArgumentParser(prog="python -m pods.configure", description=__doc__)
    parser.add_argument("--spec", required=True, help="JobSpec as protobuf JSON; '-' for stdin")
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument(
        "--termination-log",
        type=Path,
        help="also write the outcome there (Kubernetes reads a container's /dev/termination-log "
        "into its status)",
    )
    parser.add_argument(
        "--storage",
        default="",
        help="the node's results storage (a path or s3://BUCKET/PREFIX, reached with the "
        "C2D_S3_* settings), for dataset files made from jobs' outputs",
    )
    parser.add_argument(
        "--copy-stored",
        action="store_true",
        help="copy such files into the workspace even from a local storage",
    )
    args = parser.parse_args(argv)
    configure_logging("configure")
    try:
        text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text("utf-8")
        spec = json_format.Parse(text, engine_pb2.JobSpec())
        check_job_id(spec.job_id)
    except (OSError, ValueError, json_format.ParseError) as error:
        print(f"configure: unusable spec: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # C2D_SOURCE_*: the credentials file (a Kubernetes Secret's) and the limits.
        sources = SourceSettings.from_env()
    except ValueError as error:
        print(f"configure: bad source settings: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        storage = storage_from_url(args.storage) if args.storage else None
    except ValueError as error:
        print(f"configure: bad storage: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = configure(
            spec,
            args.workspace,
            args.data_root,
            sources,
            storage=storage,
            copy_stored=args.copy_stored,
        )
    except ProvisioningError as error:
        outcome = json.dumps(
            {"reason": job_pb2.FailureReason.Name(error.reason), "message": str(error)}
        )
        print(outcome)
        write_termination_log(args.termination_log, outcome)
        return error.status_code
    print(json.dumps(result.to_json()))
    write_termination_log(args.termination_log, json.dumps({"message": "configured"}))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
