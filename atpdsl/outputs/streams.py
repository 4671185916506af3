"""Every writer and reader takes a path or an open file: the one place that tells them apart."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["write_text", "read_text", "read_bytes", "binary_sink"]


def write_text(path: str | Path | IO[str], text: str) -> None:
    """Write UTF-8 text to a path, or to an open text file."""
    if hasattr(path, "write"):
        path.write(text)
    else:
        Path(path).write_text(text, encoding="utf-8")


def read_text(path: str | Path | IO[str]) -> str:
    """UTF-8 text from a path, or the rest of an open text file."""
    return path.read() if hasattr(path, "read") else Path(path).read_text(encoding="utf-8")


def read_bytes(path: str | Path | IO[bytes]) -> bytes:
    """Bytes from a path, or the rest of an open binary file."""
    return path.read() if hasattr(path, "read") else Path(path).read_bytes()


@contextmanager
def binary_sink(path: str | Path | IO[bytes]) -> Iterator[IO[bytes]]:
    """An open binary file to write to: the given one (left open), or the path opened and closed here."""
    if hasattr(path, "write"):
        yield path
    else:
        with open(path, "wb") as f:
            yield f
