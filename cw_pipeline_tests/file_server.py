"""A local HTTP file server for the download tests (127.0.0.1, a random port): answers Range
requests with 206 (or ignores them when told), can cut a response short, and records every
request. Sources are served under ``/mirror/<host>/<path>``, the tree the ``--mirror`` option
maps the official URLs to. The ``server`` fixture (``conftest.py``) runs one per test."""

from __future__ import annotations

import re
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FileServer:
    root: str = ""  # http://127.0.0.1:PORT
    url: str = ""  # the mirror base: ROOT/mirror
    files: dict[str, bytes] = field(default_factory=dict)  # request path -> body
    cut: dict[str, int] = field(default_factory=dict)  # path -> bytes sent once, then close
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)

    def serve(self, official_url: str, data: bytes) -> str:
        """Serve ``data`` where the mirror maps ``official_url``; returns the request path."""
        parts = urllib.parse.urlsplit(official_url)
        path = f"/mirror/{parts.netloc}{parts.path}"
        self.files[path] = data
        return path

    def direct(self, path: str) -> str:
        """The URL of a request path."""
        return self.root + path

    def requested(self, path: str) -> list[str | None]:
        """The Range headers of the requests for ``path`` (None: no Range)."""
        return [r for p, r in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    state: FileServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        st = self.state
        rng = self.headers.get("Range")
        st.requests.append((self.path, rng))
        data = st.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not st.ignore_range:
            start = int(m[1])
            end = int(m[2]) if m[2] else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = st.cut.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def serving() -> Iterator[FileServer]:
    """A :class:`FileServer` on a thread, shut down on exit."""
    state = FileServer()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    state.root = f"http://127.0.0.1:{httpd.server_address[1]}"
    state.url = f"{state.root}/mirror"  # a mirror with a path prefix
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
