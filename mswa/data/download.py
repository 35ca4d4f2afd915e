"""Downloads for the dataset loaders: a URL (http(s), or file:// for a local mirror) fetched into a temporary
file, checked for truncation.

The caller verifies the content (checksums, zip CRCs) and keeps only what it derives from it, in a
verified cache (``mswa.data.cache``).
"""

from __future__ import annotations

import http.client
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from mswa.atomic import temporary_sibling
from mswa.data.corpus import DataError

BLOCK_BYTES = 1 << 20


@contextmanager
def downloaded(url: str, final: Path) -> Iterator[Path]:
    """Download ``url`` into a temporary file beside ``final`` and yield it once complete.

    The file is deleted on exit: the caller verifies its content and keeps what it derives from it.
    """
    with temporary_sibling(final) as temp:
        _fetch(url, temp)
        yield temp


def _fetch(url: str, destination: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
            announced = _announced_length(response)
            with tqdm(total=announced, unit="B", unit_scale=True, desc=f"downloading {Path(url).name}") as bar:
                while block := response.read(BLOCK_BYTES):
                    out.write(block)
                    bar.update(len(block))
    except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, timeouts, full disk
        raise DataError(f"downloading {url} failed ({error}); check the URL and the network, then rerun") from error
    received = destination.stat().st_size
    if announced is not None and received != announced:
        raise DataError(
            f"download of {url} is truncated ({received:,} of {announced:,} bytes, connection closed early); rerun to download it again"
        )


def _announced_length(response) -> int | None:
    """Content-Length: what an HTTP server, or the file behind a file:// URL (a local mirror), says it sends."""
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None
