"""The Provider's configuration, from the environment."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mesh import config as mesh_config
from mesh import delivery
from mesh.auth import checksum
from mesh.chain_config import ChainConfig
from mesh.tls import TlsConfig


@dataclass(frozen=True)
class ProviderConfig:
    listen: str
    operator_address: str
    database: Path
    data_root: Path
    # The addresses allowed to publish datasets (the node's data owners), EIP-55 form.
    owners: frozenset[str]
    # The key that signs provenance records (C2D_PROVIDER_KEY_FILE, JSON as the CLI's key
    # file), which must then exist. None: `signing-key.json` beside the database (so
    # $C2D_HOME/provider/ by default), created at first start.
    provider_key_file: Path | None = None
    # The chain paid assets are sold on (C2D_CHAIN_URL and friends); None: everything is free.
    chain: ChainConfig | None = None
    # Mutual TLS for its calls to the Operator Service (C2D_TLS_*); its own port stays
    # plaintext, since consumers sign their requests. None: plaintext.
    tls: TlsConfig | None = None
    # The name the Operator Service's certificate must carry (C2D_OPERATOR_TLS_NAME); "": the
    # host of operator_address.
    operator_tls_name: str = ""
    # The hosts (`host` or `host:port`) a consumer's delivery may reach over plain http or at
    # an address that is not public (C2D_DELIVERY_ALLOW_HOSTS, comma-separated). Read from
    # the environment by default, so that a node built in code follows the variable as its
    # engine does; empty: only https:// to public addresses.
    delivery_allow_hosts: frozenset[str] = field(default_factory=delivery.allowed_hosts)

    @property
    def provider_key_path(self) -> Path:
        return self.provider_key_file or self.database.parent / "signing-key.json"

    @classmethod
    def from_env(cls) -> ProviderConfig:
        home = mesh_config.home()
        raw = os.environ.get("C2D_OWNERS", "")
        owners = {checksum(a.strip()) for a in raw.split(",") if a.strip()}
        if not owners:
            # Without configuration the node belongs to whoever holds the CLI's key.
            key_file = home / "key.json"
            if key_file.exists():
                owners = {checksum(json.loads(key_file.read_text())["address"])}
        provider_key = os.environ.get("C2D_PROVIDER_KEY_FILE", "")
        return cls(
            listen=os.environ.get("C2D_PROVIDER_LISTEN", mesh_config.PROVIDER_LISTEN),
            operator_address=mesh_config.operator_address(),
            database=Path(
                os.environ.get("C2D_PROVIDER_DB", str(home / "provider" / "provider.db"))
            ),
            data_root=mesh_config.data_root(),
            owners=frozenset(owners),
            provider_key_file=Path(provider_key).expanduser().absolute() if provider_key else None,
            chain=ChainConfig.from_env(),
            tls=TlsConfig.from_env(),
            operator_tls_name=os.environ.get("C2D_OPERATOR_TLS_NAME", ""),
        )
