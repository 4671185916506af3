"""Small models the project trains and ships, found by short name (`model zoo "induction-2l"`)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["ZOO_DIR", "available", "zoo_path"]

ZOO_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the shipped models: folders beside this file holding a config.json."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def zoo_path(name: str) -> Path:
    """The folder of a shipped model; KeyError when there is none of that name."""
    path = ZOO_DIR / name
    if not (path / "config.json").is_file():
        raise KeyError(name)
    return path
