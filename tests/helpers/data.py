"""Data for the tests: a real HTTP server on 127.0.0.1 serving a folder, zips, tiny word corpora, the shared
real WikiText-2 text (tests that read it skip when it is absent; it is never copied into the project)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import numpy as np

SHARED_WIKITEXT2_VALID = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "valid.txt"
CUT_PREFIX = "/cut/"  # GET /cut/<file>: announces the whole file, sends half, closes the connection


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        if not self.path.startswith(CUT_PREFIX):
            return super().do_GET()
        body = (Path(self.directory) / self.path[len(CUT_PREFIX) :]).read_bytes()
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


def write_word_corpus(folder: Path, seed: int = 0) -> Path:
    """wiki.{train,valid,test}.tokens with a Zipf-ish vocabulary of 150 words, headings and empty lines."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(150)]
    probs = 1 / np.arange(1, 151)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n_lines in (("train", 400), ("valid", 40), ("test", 40)):
        lines = []
        for i in range(n_lines):
            if i % 10 == 0:
                lines += [" ", f" = {words[i % 150]} = ", " "]
            lines.append(" " + " ".join(rng.choice(words, size=20, p=probs / probs.sum())) + " ")
        (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n")
    return folder
