"""The layout of a job's workspace, shared by the configure and publish stages and the engine.

One workspace per job, created by the engine as root with mode 0700. Inside it:

    transformations/algorithm   the algorithm's code (0444)   -> /data/transformations/algorithm
    ddos/<dataset_id>           each dataset's public DDO     -> /data/ddos/<dataset_id>
    algoCustomData.json         the parameters, when given    -> /data/inputs/algoCustomData.json
    outputs/                    the algorithm's outputs (rw)  -> /data/outputs
    logs/algorithm.log          the algorithm's stdout/stderr -> /data/logs (read-only)
    logs/configuration.log      written by configure
    logs/publish.log            written by publish

Dataset files are not copied into the workspace: each is mounted read-only from its place under
the data root at /data/inputs/<dataset_id>/<index>."""

from __future__ import annotations

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
ALGORITHM_LOG = "algorithm.log"
CONFIGURATION_LOG = "configuration.log"
PUBLISH_LOG = "publish.log"


def check_job_id(value: str) -> str:
    """Returns `value` when it is a job id; ValueError otherwise."""
    if not is_job_id(value):
        raise ValueError("a job id is 32 lowercase hex digits")
    return value


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
