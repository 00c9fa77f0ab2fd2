"""The Operator Service's configuration, from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mesh import config as mesh_config
from mesh.tls import TlsConfig


@dataclass(frozen=True)
class OperatorConfig:
    listen: str
    engine_address: str
    database: Path
    storage_url: str
    # How long the engine may stay unreachable before its running jobs end `engine lost`.
    engine_lease_s: float = 30.0
    # Mutual TLS for its TCP port and its calls to the engine (C2D_TLS_*); None: plaintext.
    tls: TlsConfig | None = None
    # The name the engine's certificate must carry (C2D_ENGINE_TLS_NAME); "": the host of
    # engine_address.
    engine_tls_name: str = ""
    # How often expired results are looked for (C2D_RETENTION_SWEEP_S), besides once at start.
    retention_sweep_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.retention_sweep_s < float("inf"):
            raise ValueError("C2D_RETENTION_SWEEP_S must be a positive number of seconds")

    @classmethod
    def from_env(cls) -> OperatorConfig:
        home = mesh_config.home()
        return cls(
            listen=os.environ.get("C2D_OPERATOR_LISTEN", mesh_config.operator_address()),
            engine_address=mesh_config.engine_address(),
            database=Path(
                os.environ.get("C2D_OPERATOR_DB", str(home / "operator" / "operator.db"))
            ),
            storage_url=mesh_config.storage_url(),
            engine_lease_s=mesh_config.env_float("C2D_ENGINE_LEASE_S", 30.0),
            tls=TlsConfig.from_env(),
            engine_tls_name=os.environ.get("C2D_ENGINE_TLS_NAME", ""),
            retention_sweep_s=mesh_config.env_float("C2D_RETENTION_SWEEP_S", 60.0),
        )
