"""A loopback HTTP server for download tests: serves in-memory files with Range support and
can misbehave on request (ignore Range, fail with 500, cut a body short). Binds 127.0.0.1
on a free port and shuts down after each test."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest


@dataclass
class ServerState:
    """What the fake server serves, how it misbehaves, and what it saw."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    body_bytes_sent: int = 0
    ignore_range: bool = False
    fail_next: int = 0  # answer this many requests with 500
    cut_next: int = 0  # send only half the body of this many responses, then close
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state = self.server.state
        path, range_header = urlsplit(self.path).path, self.headers.get("Range")
        with state.lock:
            state.requests.append((path, range_header))
            fail = state.fail_next > 0
            cut = not fail and state.cut_next > 0
            state.fail_next -= fail
            state.cut_next -= cut
        body = state.files.get(path)
        if fail or body is None:
            self.send_error(500 if fail else 404)
            return
        start = 0
        if range_header and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if cut:
            payload = payload[: len(payload) // 2]
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client hung up on purpose (e.g. a size it rejects from the headers)
        with state.lock:
            state.body_bytes_sent += len(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState


@pytest.fixture
def server() -> Iterator[ServerState]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


