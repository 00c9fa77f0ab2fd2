"""The layout of a job's workspace, shared by the configure and publish stages and the engine.

One workspace per job, created by the engine as root with mode 0700. Inside it:

    transformations/algorithm   the algorithm's code (0444)   -> /data/transformations/algorithm
    ddos/<dataset_id>           each dataset's public DDO     -> /data/ddos/<dataset_id>
    algoCustomData.json         the parameters, when given    -> /data/inputs/algoCustomData.json
    outputs/                    the algorithm's outputs (rw)  -> /data/outputs
    logs/algorithm.log          the algorithm's stdout/stderr -> /data/logs (read-only)
    logs/configuration.log      written by configure
    logs/publish.log            written by publish

Dataset files under the data root are not copied into the workspace: each is mounted read-only
from its place at /data/inputs/<dataset_id>/<index>. Files fetched from S3 or HTTP(S) are written
to the workspace (root-only folders, files 0444) and mounted read-only the same way:

    dataset-inputs/<dataset_id>/<index>                      -> /data/inputs/<dataset_id>/<index>

The engine may also leave empty files in the root (`.ready-N`, never mounted), made ahead of
time: a stage that writes a file takes one of those (`open_new_file`) before making one, since
making a file costs ten to thirty renames on a node's file system."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mesh.jobs import is_asset_id as is_asset_id
from mesh.jobs import is_job_id as is_job_id

# Inside the sandbox: the reference system's layout, so existing algorithms run unchanged.
SANDBOX_DATA = "/data"
SANDBOX_INPUTS = "/data/inputs"
SANDBOX_OUTPUTS = "/data/outputs"
SANDBOX_LOGS = "/data/logs"
SANDBOX_DDOS = "/data/ddos"
SANDBOX_TRANSFORMATIONS = "/data/transformations"
SANDBOX_ALGORITHM = "/data/transformations/algorithm"
SANDBOX_ALGO_CUSTOM_DATA = "/data/inputs/algoCustomData.json"

# On the host, relative to the workspace.
TRANSFORMATIONS = "transformations"
ALGORITHM_FILE = "algorithm"
DDOS = "ddos"
ALGO_CUSTOM_DATA_FILE = "algoCustomData.json"
OUTPUTS = "outputs"
LOGS = "logs"
DATASET_INPUTS = "dataset-inputs"
ALGORITHM_LOG = "algorithm.log"
CONFIGURATION_LOG = "configuration.log"
PUBLISH_LOG = "publish.log"
READY_FILES = tuple(f".ready-{n}" for n in range(4))


def check_job_id(value: str) -> str:
    """Returns `value` when it is a job id; ValueError otherwise."""
    if not is_job_id(value):
        raise ValueError("a job id is 32 lowercase hex digits")
    return value


def open_new_file(root: Path | int, temp: Path | str, dir_fd: int | None = None) -> int:
    """A new empty file at `temp`, open for writing: one of the workspace's ready files moved
    there, or, when none is left, one made now (0600, never through a link). `root` is the
    workspace (a path or an open folder), `temp` the new name (a path, or a name in the open
    folder `dir_fd`).

    Only root writes in a workspace's root, yet what is taken is checked like a file made
    anew would be: opened without following a link or blocking, and refused unless it is a
    regular file with this one name, so writing it can change nothing else."""
    fd = _take_ready_file(root, temp, dir_fd)
    if fd is None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
    return fd


def _take_ready_file(root: Path | int, temp: Path | str, dir_fd: int | None) -> int | None:
    for ready in READY_FILES:
        source = ready if isinstance(root, int) else root / ready
        source_fd = root if isinstance(root, int) else None
        try:
            os.rename(source, temp, src_dir_fd=source_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        try:
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(temp, flags, dir_fd=dir_fd)
        except OSError:
            fd = -1
        if fd >= 0:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                if info.st_size:
                    os.ftruncate(fd, 0)
                return fd
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
    return None


def sandbox_input_path(dataset_id: str, index: int) -> str:
    """Where file `index` of a dataset appears inside the sandbox."""
    return f"{SANDBOX_INPUTS}/{dataset_id}/{index}"


def asset_did(asset_id: str) -> str:
    """The DID of an asset from its 64-hex id."""
    return f"did:c2d:{asset_id}"


@dataclass(frozen=True)
class Workspace:
    """Host paths inside one job's workspace."""

    root: Path

    @property
    def transformations(self) -> Path:
        return self.root / TRANSFORMATIONS

    @property
    def algorithm(self) -> Path:
        return self.transformations / ALGORITHM_FILE

    @property
    def ddos(self) -> Path:
        return self.root / DDOS

    def ddo(self, dataset_id: str) -> Path:
        if not is_asset_id(dataset_id):
            raise ValueError("a dataset id is 64 lowercase hex digits")
        return self.ddos / dataset_id

    @property
    def dataset_inputs(self) -> Path:
        return self.root / DATASET_INPUTS

    def dataset_input(self, dataset_id: str, index: int) -> Path:
        """Where file `index` of a dataset is written when it is fetched."""
        if not is_asset_id(dataset_id):
            raise ValueError("a dataset id is 64 lowercase hex digits")
        return self.dataset_inputs / dataset_id / str(index)

    @property
    def algo_custom_data(self) -> Path:
        return self.root / ALGO_CUSTOM_DATA_FILE

    @property
    def outputs(self) -> Path:
        return self.root / OUTPUTS

    @property
    def logs(self) -> Path:
        return self.root / LOGS

    @property
    def algorithm_log(self) -> Path:
        return self.logs / ALGORITHM_LOG

    @property
    def configuration_log(self) -> Path:
        return self.logs / CONFIGURATION_LOG

    @property
    def publish_log(self) -> Path:
        return self.logs / PUBLISH_LOG


def write_termination_log(path: Path | None, text: str) -> None:
    """What a stage program leaves for Kubernetes to read (`--termination-log`). Best effort:
    the exit code already says how the stage ended."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.write_text(text[:4000], "utf-8")
