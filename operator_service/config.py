"""The Operator Service's configuration, from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mesh import config as mesh_config


@dataclass(frozen=True)
class OperatorConfig:
    listen: str
    engine_address: str
    database: Path
    storage_url: str
    # How long the engine may stay unreachable before its running jobs end `engine lost`.
    engine_lease_s: float = 30.0

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
            engine_lease_s=float(os.environ.get("C2D_ENGINE_LEASE_S", "30")),
        )
