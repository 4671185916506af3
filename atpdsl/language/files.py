"""Reading the files a spec names, safely: paths checked before use, regular files only, exact decode errors.

A spec can name any path, so every path is checked for what the operating system would choke on (a NUL, a lone
surrogate, a component over 255 bytes) before it is used, and a file is opened without blocking and refused
unless it is a regular file: `/dev/zero` or a FIFO must give an error, not a command that never returns.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

__all__ = ["NAME_MAX", "PATH_MAX", "FileProblem", "path_problem", "read_bytes", "decode_utf8", "read_text",
           "lone_surrogate"]

NAME_MAX = 255  # bytes in one path component (Linux, macOS, Windows)
PATH_MAX = 4096  # bytes in a whole path (Linux)


class FileProblem(Exception):
    """A file that cannot be used, with a message that names it and says why (no traceback material)."""

    def __init__(self, message: str, offset: int | None = None, text: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset  # character offset of the problem in `text`, when it is inside the file
        self.text = text  # the file decoded with replacement characters, so the offset can be shown


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in a string (a `\\ud800` escape no file system or tokenizer can hold), as `\\uXXXX`."""
    found = _SURROGATE.search(text)
    return None if found is None else f"\\u{ord(found.group()):04x}"


def path_problem(written: str) -> str | None:
    """Why a path cannot name a file on this system (None when it can); checked before any file call."""
    if "\x00" in written:
        return "contains a NUL character"
    try:
        encoded = os.fsencode(os.path.expanduser(written))
    except UnicodeEncodeError:  # a surrogate outside the file system's escape range
        return f"contains a lone surrogate {lone_surrogate(written)}, which no file name can hold"
    for part in encoded.split(b"/"):
        if len(part) > NAME_MAX:
            shown = os.fsdecode(part)
            shown = shown[:20] + "..." if len(shown) > 20 else shown
            return f"has a component of {len(part)} bytes ({shown!r}); at most {NAME_MAX} are allowed"
    if len(encoded) > PATH_MAX:
        return f"is {len(encoded)} bytes long; at most {PATH_MAX} are allowed"
    return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_bytes(path: Path, what: str, shown: str | None = None) -> bytes:
    """The bytes of a regular file; FileProblem for anything else (opened non-blocking, so a FIFO cannot hang).

    Messages name the file as `shown` (default: the path) and start with `what` ("pairs file", "spec file").
    """
    problem = path_problem(str(path))
    if problem is not None:
        raise FileProblem(f"{what} path {problem}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileProblem(f"{what} not found: {shown or path}") from None
    except IsADirectoryError:
        raise FileProblem(f"{what} is a folder, not a file: {shown or path}") from None
    except OSError as e:
        raise FileProblem(f"cannot read {what} {shown or path}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{what} {shown or path} is {_kind(info.st_mode)}, not a regular file")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise FileProblem(f"cannot read {what} {shown or path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def decode_utf8(data: bytes, what: str) -> str:
    """UTF-8 text without a leading byte-order mark (Excel and Notepad write one); FileProblem naming the line
    and byte of the first invalid byte otherwise."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        text = data.decode("utf-8", errors="replace")
        offset = len(data[:e.start].decode("utf-8", errors="replace"))
        raise FileProblem(f"{what} is not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, byte"
                          f" {e.start - line_start + 1} of the line (file offset {e.start})", offset, text) from None


def read_text(path: Path, what: str, shown: str | None = None) -> str:
    """A regular UTF-8 text file's contents (see read_bytes and decode_utf8)."""
    return decode_utf8(read_bytes(path, what, shown), f"{what} {shown or path}")
