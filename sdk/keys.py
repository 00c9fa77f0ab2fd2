"""The consumer's or owner's Ethereum key on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account


@dataclass(frozen=True)
class Key:
    address: str
    private_key: bytes

    @classmethod
    def load_or_create(cls, path: Path) -> Key:
        """Reads the key at `path`, creating it (mode 0600) on first use."""
        if path.exists():
            data = json.loads(path.read_text())
            account = Account.from_key(data["private_key"])
            return cls(address=account.address, private_key=bytes(account.key))
        account = Account.create()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"address": account.address, "private_key": account.key.hex()}, f)
        return cls(address=account.address, private_key=bytes(account.key))
