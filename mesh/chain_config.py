"""Where the node's chain is and how long to wait for it, from the environment. Apart from
mesh.chain so that reading the configuration does not import web3 (most of a second)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mesh.config import env_float, env_int

# Shared by the chain code and the Provider, which must not load web3 to know them.
ZERO_ADDRESS = "0x" + "00" * 20
# One whole token (18 decimals): what an order of an Ocean datatoken pays.
ONE_TOKEN = 10**18


@dataclass(frozen=True)
class ChainConfig:
    """Where the chain is and how long to wait for it."""

    url: str
    chain_id: int
    # Blocks, counting the order's own block: 1 accepts an order as soon as it is mined.
    confirmations: int = 1
    # Each JSON-RPC call.
    timeout_s: float = 10.0
    # How long to wait for an order to reach `confirmations`.
    confirmation_wait_s: float = 30.0
    # The JSON written by mesh.ocean.Contracts.save.
    contracts_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the chain URL must be http(s)://..., not {self.url!r}")
        if self.confirmations < 1:
            raise ValueError("confirmations counts the order's own block: at least 1")
        if self.timeout_s <= 0 or self.confirmation_wait_s <= 0:
            raise ValueError("chain timeouts must be positive")

    @classmethod
    def from_env(cls) -> ChainConfig | None:
        """`C2D_CHAIN_URL` (None when unset: no paid compute), `C2D_CHAIN_ID` (required with
        it), `C2D_CHAIN_CONFIRMATIONS`, `C2D_CHAIN_TIMEOUT` and `C2D_CHAIN_CONFIRMATION_WAIT`
        (seconds), `C2D_CHAIN_CONTRACTS` (a file written by `c2d chain up`)."""
        url = os.environ.get("C2D_CHAIN_URL", "")
        if not url:
            return None
        if not os.environ.get("C2D_CHAIN_ID"):
            # A chain id guards against verifying orders on the wrong chain: no default.
            raise ValueError("C2D_CHAIN_ID is required when C2D_CHAIN_URL is set")
        contracts = os.environ.get("C2D_CHAIN_CONTRACTS", "")
        return cls(
            url=url,
            chain_id=env_int("C2D_CHAIN_ID", 0),
            confirmations=env_int("C2D_CHAIN_CONFIRMATIONS", 1),
            timeout_s=env_float("C2D_CHAIN_TIMEOUT", 10.0),
            confirmation_wait_s=env_float("C2D_CHAIN_CONFIRMATION_WAIT", 30.0),
            contracts_file=Path(contracts).expanduser() if contracts else None,
        )
