"""Write a file so that a reader only ever sees the old file or the whole new one.

Each file is written to a temporary name in its own folder, flushed and fsynced, then renamed
over the target (`os.replace` is atomic within one file system) and the folder is fsynced. Any
error (a full disk, an interrupted writer, Ctrl-C) removes the temporary file and leaves the old
file untouched. Export paths get `~` expanded, and a symlink at the path is followed only when it
stays inside the target's folder.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from atpdsl.outputs.formats import ExportError

__all__ = ["export_path", "replacing", "write_bytes", "write_text", "path_problem"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def path_problem(path: str | Path) -> str | None:
    """Why `path` cannot be an export target, or None: a symlink out of its folder, a folder in the way."""
    try:
        p = Path(os.path.expanduser(str(path)))
        if p.is_symlink():
            folder = p.parent.resolve()
            target = p.resolve()
            if target.parent != folder and folder not in target.parents:
                return f"{str(path)!r} is a symlink to {str(target)!r}, outside its folder: refusing to follow it"
        if p.is_dir():
            return f"{str(path)!r} is a folder"
    except (OSError, ValueError, RuntimeError) as error:
        return f"{str(path)!r} cannot be used: {error}"
    return None


def export_path(path: str | Path) -> Path:
    """The file to write for `path`: `~` expanded, a symlink inside its folder followed, else an error."""
    problem = path_problem(path)
    if problem is not None:
        raise ExportError(f"cannot export to {problem}")
    p = Path(os.path.expanduser(str(path)))
    return p.resolve() if p.is_symlink() else p


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. a platform without folder handles: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


@contextmanager
def replacing(path: str | Path) -> Iterator[IO[bytes]]:
    """An open binary file whose contents replace `path` only if the `with` block completes."""
    target = export_path(path)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:200]}.", suffix=".part", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
        tmp = None
        _fsync_folder(target.parent)
    except (OSError, ValueError, UnicodeError) as error:
        raise ExportError(f"cannot write {str(path)!r}: {_describe(error)}; the previous file (if any) is unchanged") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` atomically; returns the file written."""
    with replacing(path) as f:
        f.write(data)
    return export_path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Replace `path` with UTF-8 `text` atomically; returns the file written."""
    return write_bytes(path, text.encode("utf-8"))
