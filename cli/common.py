"""What every `c2d` command needs: the caller's key, a client for the Provider, the output."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cli.output import print_json
from mesh import config as mesh_config
from sdk.client import Client
from sdk.keys import Key


def key(args: argparse.Namespace) -> Key:
    path = args.key_file or os.environ.get("C2D_KEY_FILE") or str(mesh_config.home() / "key.json")
    return Key.load_or_create(Path(path))


def client(args: argparse.Namespace) -> Client:
    return Client(args.provider or mesh_config.provider_address(), key(args))


def emit(args: argparse.Namespace, document: Any, text: str) -> None:
    if args.json:
        print_json(document)
    else:
        print(text)


def parse_parameters(pairs: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` pairs; a VALUE that parses as JSON is taken as such (`k=3` is a number)."""
    parameters: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"c2d: --param takes NAME=VALUE, not {pair!r}")
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError:
            parameters[name] = value
    return parameters


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Writes `path` whole with `mode`: created with it, and tightened if the file existed, so
    a private file (a key, private code) is never readable by others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
