"""A real HTTP server on 127.0.0.1 serving dataset files the way the configure stage meets them,
well and badly, for the tests of fetched dataset files.

Paths (NAME is a file given to `serve`):
    /files/NAME          the file, with its Content-Length
    /private/NAME        the same, only with `Authorization: Bearer TOKEN` (else 401)
    /redirect/NAME       302 to /private/NAME on this origin
    /redirect-away/NAME  302 to /private/NAME on another origin (`localhost` for `127.0.0.1`)
    /more/NAME           the file and 100 bytes more, announced honestly
    /short/NAME          its first half, announced honestly
    /endless             bytes until the client goes away, with no length announced
    /slow/NAME           its Content-Length at once, then one byte every 0.1 s
    /hang                reads the request and never answers"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "source-token-0f1e2d3c4b5a"


@dataclass
class HttpSource:
    """The running server: its base URL, its files, and the requests it has seen."""

    base_url: str
    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    # (path, Authorization header or "") per request, in order.
    seen: list[tuple[str, str]] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)

    def serve(self, name: str, content: bytes) -> str:
        """Adds a file; returns its /files/ URL."""
        self.files[name] = content
        return self.url(f"/files/{name}")

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


def _handler(source: HttpSource) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test's output stays its own

        def do_GET(self) -> None:
            source.seen.append((self.path, self.headers.get("Authorization", "")))
            kind, _, name = self.path.lstrip("/").partition("/")
            if kind == "hang":
                source.released.wait(30)
                self.close_connection = True
                return
            if kind == "endless":
                self._endless()
                return
            content = source.files.get(name)
            if content is None:
                self._send(404, b"no such file")
            elif kind == "files":
                self._send(200, content)
            elif kind == "private":
                if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                    self._send(200, content)
                else:
                    self._send(401, b"who are you?")
            elif kind == "redirect":
                self._redirect(f"{source.base_url}/private/{name}")
            elif kind == "redirect-away":
                self._redirect(f"http://localhost:{source.port}/private/{name}")
            elif kind == "more":
                self._send(200, content + b"x" * 100)
            elif kind == "short":
                self._send(200, content[: len(content) // 2])
            elif kind == "slow":
                self._slow(content)
            else:
                self._send(404, b"no such path")

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # A client that refuses what was announced hangs up before the body is sent.
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _endless(self) -> None:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            chunk = b"y" * 65536
            try:
                # Bounded all the same (1 GiB), should a client never stop reading.
                for _ in range(16384):
                    self.wfile.write(chunk)
            except OSError:
                pass

        def _slow(self, content: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            try:
                for byte in content:
                    if source.released.is_set():
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

    return Handler


@contextlib.contextmanager
def running_http_source() -> Iterator[HttpSource]:
    """Starts the server in a thread of its own; stops it (and every hung answer) at the end."""
    source = HttpSource("", 0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(source))
    server.daemon_threads = True
    source.port = int(server.server_address[1])
    source.base_url = f"http://127.0.0.1:{source.port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield source
    finally:
        source.released.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
