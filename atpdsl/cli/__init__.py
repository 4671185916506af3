"""The command line: `atpdsl check|plan|run|show|export` (argument parsing in app, the subcommands' work in commands)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """The `atpdsl` entry point (see atpdsl.cli.app.main); `--version` alone answers without importing rich."""
    if (sys.argv[1:] if argv is None else list(argv)) == ["--version"]:
        from atpdsl.version import __version__

        print(f"atpdsl {__version__}")
        return 0
    from atpdsl.cli.app import main as _main

    return _main(argv)
