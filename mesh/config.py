"""Where the embedded node keeps its state, and the default addresses of its parts.

Each service's own `config.py` builds a frozen dataclass from the environment with these
defaults, so that `python -m provider` and friends work with no configuration at all."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")

PROVIDER_LISTEN = "127.0.0.1:8031"
GATEWAY_LISTEN = "127.0.0.1:8030"


def home() -> Path:
    """`$C2D_HOME`, default `~/.c2d`: keys, databases, sockets, workspaces and results."""
    return Path(os.environ.get("C2D_HOME", "~/.c2d")).expanduser().absolute()


def ensure_private_dir(path: Path) -> Path:
    """Creates `path` with owner-only permissions (and tightens them if it exists)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def run_dir() -> Path:
    return home() / "run"


def operator_address() -> str:
    return os.environ.get("C2D_OPERATOR_ADDRESS", f"unix:{run_dir() / 'operator.sock'}")


def engine_address() -> str:
    return os.environ.get("C2D_ENGINE_ADDRESS", f"unix:{run_dir() / 'engine.sock'}")


def provider_address() -> str:
    return os.environ.get("C2D_PROVIDER_ADDRESS", PROVIDER_LISTEN)


def data_root() -> Path:
    """The only folder dataset files may come from."""
    return Path(os.environ.get("C2D_DATA_ROOT", str(home() / "data"))).expanduser().absolute()


def storage_url() -> str:
    return os.environ.get("C2D_STORAGE", str(home() / "results"))


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_float(name: str, default: float) -> float:
    """A number from the environment; the default when unset or empty; ValueError naming the
    variable when it is not a number."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as error:
        raise ValueError(f"{name} must be a number, not {raw!r}") from error


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from error


def load(service: str, read: Callable[[], _T]) -> _T:
    """A service's configuration from `read` (its `from_env`); a one-line message naming the
    setting and exit status 2, not a traceback, when the environment sets something wrong."""
    try:
        return read()
    except ValueError as error:
        print(f"{service}: bad configuration: {error}", file=sys.stderr)
        raise SystemExit(2) from None
