"""The Provider's own Ethereum key, which signs provenance records. It is never an owner's key:
an owner's signature means "I decided this", the Provider's "this is what ran"."""

from __future__ import annotations

import os
import stat

import structlog

from mesh.config import ensure_private_dir
from provider.config import ProviderConfig
from sdk.keys import Key

log = structlog.get_logger()


def load_provider_key(config: ProviderConfig) -> Key:
    """The key at `config.provider_key_path` (JSON as the CLI's key file). A key file the
    operator configured must exist: a typo must not quietly give the provider a new identity.
    The default one is created at first start (mode 0600, in an owner-only folder) and reused
    afterwards."""
    path = config.provider_key_path
    if config.provider_key_file is not None:
        if not path.is_file():
            raise ValueError(f"C2D_PROVIDER_KEY_FILE names no file: {path}")
        if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the provider's key file is readable by other users", path=str(path))
    else:
        ensure_private_dir(path.parent)
    key = Key.load_or_create(path)
    if key.address in config.owners:
        raise ValueError(
            "the provider's signing key is a data owner's key; give the provider its own "
            "(C2D_PROVIDER_KEY_FILE, or none to have one created)"
        )
    return key
