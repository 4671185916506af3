"""Every writer and reader takes a path or an open file: the one place that tells them apart.

Paths are written atomically (atpdsl.outputs.atomic): an interrupted or failing write leaves the
old file as it was. Open files are written as given and left open.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from atpdsl.outputs.atomic import replacing
from atpdsl.outputs.atomic import write_text as _write_text

__all__ = ["write_text", "read_text", "read_bytes", "binary_sink", "text_sink"]


def write_text(path: str | Path | IO[str], text: str) -> None:
    """Write UTF-8 text to a path (atomically), or to an open text file."""
    if hasattr(path, "write"):
        path.write(text)
    else:
        _write_text(path, text)


def read_text(path: str | Path | IO[str]) -> str:
    """UTF-8 text from a path, or the rest of an open text file."""
    return path.read() if hasattr(path, "read") else Path(path).read_text(encoding="utf-8")


def read_bytes(path: str | Path | IO[bytes]) -> bytes:
    """Bytes from a path, or the rest of an open binary file."""
    return path.read() if hasattr(path, "read") else Path(path).read_bytes()


@contextmanager
def binary_sink(path: str | Path | IO[bytes]) -> Iterator[IO[bytes]]:
    """An open binary file to write to: the given one (left open), or an atomic replacement of the path."""
    if hasattr(path, "write"):
        yield path
    else:
        with replacing(path) as f:
            yield f


@contextmanager
def text_sink(path: str | Path | IO[str]) -> Iterator[IO[str]]:
    """An open UTF-8 text file to write to piece by piece: the given one (left open), or an atomic replacement of
    the path (written only if the `with` block completes)."""
    if hasattr(path, "write"):
        yield path
        return
    with replacing(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        yield text
        text.flush()
        text.detach()
