"""The .atp grammar's LALR tables, cached on disk so a command starts in milliseconds, not ~250 ms.

The tables are built by Lark from grammar/atp.lark and saved with `Lark.save` under the user cache folder
(`$ATPDSL_CACHE_DIR`, else `$XDG_CACHE_HOME/atpdsl`, else `~/.cache/atpdsl`), in a file named by the hash of
the grammar text, the Lark version, the parser options and the Python version. Writes are atomic (a temporary
file renamed into place); an unreadable, corrupt or unwritable cache only costs the rebuild.
"""
from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from lark import Lark

__all__ = ["PARSER_OPTIONS", "cache_dir", "cache_file", "build_parser", "cached_parser"]

PARSER_OPTIONS = {"parser": "lalr", "strict": True, "propagate_positions": True, "maybe_placeholders": True}


def cache_dir() -> Path:
    """The folder the parser tables are cached in (not created here)."""
    explicit = os.environ.get("ATPDSL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "atpdsl"


def cache_file(grammar_text: str) -> Path:
    """The cache file for one grammar text under this Lark and Python version."""
    import lark

    key = "\n".join([grammar_text, lark.__version__, repr(sorted(PARSER_OPTIONS.items())),
                     f"{sys.version_info[0]}.{sys.version_info[1]}"])
    return cache_dir() / f"grammar-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:24]}.lark"


def build_parser(grammar_text: str) -> Lark:
    """The LALR parser built from the grammar text (the slow path)."""
    return Lark(grammar_text, **PARSER_OPTIONS)


def _trusted(folder: Path) -> bool:
    """Whether a cache folder is ours alone: a pickle from a folder others can write could run their code."""
    try:
        info = folder.stat()
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        return False
    return True


def _load_cached(path: Path) -> Lark | None:
    if not path.is_file() or not _trusted(path.parent):
        return None
    try:
        with open(path, "rb") as f:
            return Lark.load(f)
    except Exception:  # noqa: BLE001 - a corrupt or foreign cache file only means a rebuild
        return None


def _save_cached(parser: Lark, path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted(path.parent):
            return
        fd, tmp = tempfile.mkstemp(prefix=".grammar-", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            parser.save(f)
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 - an unwritable cache (full disk, read-only) is not the user's problem
        try:
            os.unlink(tmp)
        except OSError:
            pass


def cached_parser(text: str) -> Lark:
    """The LALR parser for a grammar text: from the cache when a matching one is there, else built (and cached
    for next time)."""
    path = cache_file(text)
    parser = _load_cached(path)
    if parser is None:
        parser = build_parser(text)
        _save_cached(parser, path)
    return parser
