"""A folder served over HTTP on loopback: the model downloads' tests use it in place of GitHub."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path


class FileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder quietly; a file named in ``cut`` is sent with its full Content-Length but only
    its first half, then the connection closes (a download interrupted midway)."""

    cut: set[str] = set()
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        name = self.path.lstrip("/")
        if name not in self.cut:
            return super().do_GET()
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


def server(folder: Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``folder`` on 127.0.0.1 (``port`` 0: a free one), not yet serving."""
    FileHandler.cut, FileHandler.requests = set(), []
    handler = functools.partial(FileHandler, directory=str(folder))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on a free port for the duration; yields the base URL."""
    httpd = server(folder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
