"""The command line: `atpdsl check|plan|run|show|export` (argument parsing in app, the subcommands' work in commands)."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The `atpdsl` entry point (see atpdsl.cli.app.main)."""
    from atpdsl.cli.app import main as _main

    return _main(argv)
