"""The Operator Engine's configuration, from the environment, with defaults for the embedded
single-machine node."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mesh import config as mesh_config
from mesh import delivery as delivery_rules

# The least an environment, or a job within it, may have.
from mesh.jobs import MIN_DISK_BYTES, MIN_MEMORY_BYTES
from mesh.s3 import MAX_PART_SIZE, MIN_PART_SIZE, PART_SIZE
from mesh.tls import TlsConfig
from operator_engine.sources import SourceSettings

GIB = 1 << 30


@dataclass(frozen=True)
class EnvironmentSpec:
    """A named set of limits jobs run under (see Environment in the contract)."""

    name: str = "default"
    cpus: float = 1.0
    memory_bytes: int = GIB
    disk_bytes: int = GIB
    max_processes: int = 256
    max_duration_s: float = 600.0
    max_concurrent_jobs: int = 2
    network_allowed: bool = False
    # A priced environment: a provider fee of `fee_per_minute` (smallest units of the ERC-20
    # token at `fee_token`) per started minute of the fee's validity; 0 is free.
    fee_token: str = ""
    fee_per_minute: int = 0
    max_output_files: int = 1000
    # The longest a job waits in the queue for a free slot, counted from its creation (so an
    # engine restart does not start the wait again); after that it ends `queue timeout`.
    max_queue_wait_s: float = 3600.0
    # The most jobs that may wait in the queue at once; RunJob refuses more (QUEUE_FULL).
    max_queued_jobs: int = 1000
    # How long a job's results are kept after it ends (the Operator Service then deletes them
    # and the job's scratch space); 0 keeps them until the job is deleted.
    result_retention_s: float = 0.0

    @property
    def free(self) -> bool:
        return self.fee_per_minute == 0

    def __post_init__(self) -> None:
        if self.fee_per_minute < 0 or (self.fee_per_minute > 0) != bool(self.fee_token):
            raise ValueError(
                f"environment {self.name}: a priced environment needs both fee_token and a "
                "positive fee_per_minute"
            )
        if self.fee_token:
            # Checksummed once here: fees name their token in that form, and the Provider
            # compares the two. Imported here: a free node never loads it.
            from mesh.auth import checksum

            try:
                object.__setattr__(self, "fee_token", checksum(self.fee_token))
            except ValueError:
                raise ValueError(f"environment {self.name}: fee_token is not an address") from None
        if (
            self.cpus <= 0
            or self.memory_bytes < MIN_MEMORY_BYTES
            or self.disk_bytes < MIN_DISK_BYTES
        ):
            raise ValueError(f"environment {self.name}: cpus, memory or disk too small")
        if self.max_processes < 1 or self.max_duration_s <= 0 or self.max_concurrent_jobs < 1:
            raise ValueError(f"environment {self.name}: limits must be positive")
        if not self.max_queue_wait_s > 0 or self.max_queued_jobs < 0:
            raise ValueError(
                f"environment {self.name}: max_queue_wait_s must be positive and "
                "max_queued_jobs not negative"
            )
        # Written so that NaN and infinity are refused too.
        if not 0 <= self.result_retention_s < float("inf"):
            raise ValueError(
                f"environment {self.name}: result_retention_s must be a number of seconds, "
                "not negative"
            )


@dataclass(frozen=True)
class DeliverySettings:
    """How the engine delivers results to a consumer's own storage (operator_engine.delivery).
    `allow_hosts`: the hosts (`host` or `host:port`) a delivery may reach over plain http or at
    addresses that are not public (C2D_DELIVERY_ALLOW_HOSTS, comma-separated); by default the
    environment's, so that an engine built in a process sees what its Provider sees.
    `timeout_s` bounds one job's whole delivery (C2D_DELIVERY_TIMEOUT_S); each connection and
    read has its own timeouts, and each request is tried `attempts` times. `part_size` is the
    multipart part size of an S3 delivery (5 MiB to 5 GiB): what one upload holds in memory."""

    allow_hosts: frozenset[str] = field(default_factory=delivery_rules.allowed_hosts)
    timeout_s: float = 900.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    attempts: int = 3
    part_size: int = PART_SIZE

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError("C2D_DELIVERY_TIMEOUT_S must be a positive number of seconds")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0 or self.attempts < 1:
            raise ValueError("delivery timeouts must be positive and attempts at least 1")
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ValueError("a delivery's S3 part is 5 MiB to 5 GiB")

    @classmethod
    def from_env(cls) -> DeliverySettings:
        # allow_hosts: read from the environment by default.
        return cls(timeout_s=mesh_config.env_float("C2D_DELIVERY_TIMEOUT_S", 900.0))


@dataclass(frozen=True)
class EngineConfig:
    listen: str
    workspace_root: Path
    data_root: Path
    storage_url: str
    environments: tuple[EnvironmentSpec, ...] = field(default=(EnvironmentSpec(),))
    # The algorithm log is capped so that a chatty algorithm cannot fill the node's disk.
    log_cap_bytes: int = 64 << 20
    # Two engines on one machine need their own uid range (an engine that finds its range in
    # use refuses to start), stage root and cgroup folder.
    sandbox_uid_base: int = 1_600_000_000
    sandbox_uid_count: int = 64
    sandbox_stage_root: Path = Path("/run/c2d-sandbox")
    # The cgroup folder of this engine's jobs.
    sandbox_cgroup_name: str = "c2d"
    # Where jobs run: "local" (the bubblewrap sandbox) or "kubernetes" (C2D_K8S_* settings).
    backend: str = "local"
    # Container images (operator_engine.images): the node's local image store (an OCI layout the
    # operator fills), looked in before the registry; the engine's cache of unpacked images;
    # how long one fetch or unpack may take; the most one image may take unpacked; and the
    # cache's size, beyond which the least recently used images go. None: $C2D_HOME/images
    # and <workspace_root>/../images.
    image_store: Path | None = None
    image_cache: Path | None = None
    image_fetch_timeout_s: float = 600.0
    image_max_bytes: int = 4 * GIB
    image_cache_bytes: int = 32 * GIB
    # Mutual TLS for its TCP port (C2D_TLS_*); None: plaintext.
    tls: TlsConfig | None = None
    # Dataset files fetched from S3 or HTTP(S): the credentials file (C2D_SOURCE_CREDENTIALS,
    # read and checked at start; its secrets never shown in a repr) and the fetch limits.
    sources: SourceSettings = field(default_factory=SourceSettings)
    # Results delivered to the consumer's own storage (C2D_DELIVERY_*).
    delivery: DeliverySettings = field(default_factory=DeliverySettings)

    @classmethod
    def from_env(cls) -> EngineConfig:
        home = mesh_config.home()
        environments: tuple[EnvironmentSpec, ...] = (EnvironmentSpec(),)
        env_file = os.environ.get("C2D_ENVIRONMENTS_FILE")
        if env_file:
            raw = json.loads(Path(env_file).read_text())
            environments = tuple(EnvironmentSpec(**item) for item in raw)
        return cls(
            listen=os.environ.get("C2D_ENGINE_LISTEN", mesh_config.engine_address()),
            workspace_root=Path(
                os.environ.get("C2D_ENGINE_WORKSPACES", str(home / "engine" / "jobs"))
            ),
            data_root=mesh_config.data_root(),
            storage_url=mesh_config.storage_url(),
            environments=environments,
            log_cap_bytes=mesh_config.env_int("C2D_LOG_CAP_BYTES", 64 << 20),
            sandbox_uid_base=mesh_config.env_int("C2D_SANDBOX_UID_BASE", 1_600_000_000),
            sandbox_uid_count=mesh_config.env_int("C2D_SANDBOX_UID_COUNT", 64),
            sandbox_stage_root=Path(os.environ.get("C2D_SANDBOX_STAGE_ROOT", "/run/c2d-sandbox")),
            sandbox_cgroup_name=os.environ.get("C2D_SANDBOX_CGROUP", "c2d"),
            backend=engine_backend(),
            image_store=Path(os.environ.get("C2D_IMAGE_STORE", str(home / "images"))),
            image_cache=Path(os.environ.get("C2D_IMAGE_CACHE", str(home / "engine" / "images"))),
            image_fetch_timeout_s=mesh_config.env_float("C2D_IMAGE_FETCH_TIMEOUT_S", 600.0),
            image_max_bytes=mesh_config.env_int("C2D_IMAGE_MAX_BYTES", 4 * GIB),
            image_cache_bytes=mesh_config.env_int("C2D_IMAGE_CACHE_BYTES", 32 * GIB),
            tls=TlsConfig.from_env(),
            sources=SourceSettings.from_env(),
            delivery=DeliverySettings.from_env(),
        )


def engine_backend() -> str:
    backend = os.environ.get("C2D_ENGINE_BACKEND", "local")
    if backend not in ("local", "kubernetes"):
        raise ValueError(f"C2D_ENGINE_BACKEND must be local or kubernetes, not {backend!r}")
    return backend
