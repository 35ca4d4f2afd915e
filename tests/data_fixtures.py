"""Helpers for the data tests: a real HTTP server on 127.0.0.1 serving a folder, and tiny corpora."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

CUT_PREFIX = "/cut/"  # GET /cut/<file>: announces the whole file, sends half, closes the connection


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        if not self.path.startswith(CUT_PREFIX):
            return super().do_GET()
        body = (Path(self.directory) / self.path[len(CUT_PREFIX):]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True

    def log_message(self, *args):  # keep test output quiet
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``folder`` over HTTP on an ephemeral port; yield (base URL, list of requested paths)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
    server.requests = []
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_zip(path: Path, member: str, content: bytes) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, content)
    return path


def cache_files(data_dir: Path) -> list[Path]:
    """Every file under ``data_dir`` (caches, leftovers), for 'nothing was left behind' checks."""
    return sorted(p for p in data_dir.rglob("*") if p.is_file()) if data_dir.exists() else []
