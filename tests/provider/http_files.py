"""A real HTTP server on 127.0.0.1 serving a folder, for dataset files given by URL. It runs in
a thread of its own, so that both async tests and blocking CLI subprocess calls can reach it."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keeps the test output free of one line per request."""


@dataclass(frozen=True)
class HttpFiles:
    """The served folder and the base URL it is at."""

    folder: Path
    url: str

    def add(self, name: str, content: bytes) -> str:
        """Serves `content` as `name`; returns its URL."""
        (self.folder / name).write_bytes(content)
        return f"{self.url}/{name}"


@pytest.fixture
def http_files(tmp_path: Path) -> Iterator[HttpFiles]:
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpFiles(folder, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
