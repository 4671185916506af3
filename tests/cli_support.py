"""Helpers for tests that drive the command line with inputs a user could hand it (tests/test_bad_inputs.py,
tests/engine/test_load.py, tests/test_exit_codes.py): write a spec, run `atpdsl` in-process or apart, and check
that a failure is a clean one (exit 1, the input named, no traceback, no "internal error")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from atpdsl.cli.app import main

__all__ = ["ZOO_PAIR", "METRIC", "TAIL", "TINY_PAIR", "write_spec", "run_cli", "assert_clean_failure"]

ZOO_PAIR = 'pair { clean "t1 t2 t3 t4 t1 t2 t3" corrupt "t1 t2 t3 t5 t1 t2 t3" answer "t4" wrong "t5" }\n'
METRIC = "metric logit_diff(answer, wrong) at last\n"
TAIL = "nodes { heads }\nmethod atp\n"
TINY_PAIR = ('pair { clean "the cat sat on the mat and the dog sat on the" '
             'corrupt "the dog sat on the mat and the cat sat on the" answer "mat" wrong "park" }\n')
_CLI = "import sys\nfrom atpdsl.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def write_spec(tmp: Path, body: str, *, model: str = 'model zoo "induction-2l"\n', name: str = "s.atp",
               encoding: str = "utf-8") -> Path:
    """Write a spec: the model line, then `body`."""
    path = tmp / name
    path.write_text(model + body, encoding=encoding, errors="surrogatepass")
    return path


def run_cli(argv: list[str], capsys, *, apart: bool, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Exit code and output of `atpdsl ARGV`: in this process, or apart (for what may block) with a 60 s limit."""
    if not apart:
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out + err
    try:
        done = subprocess.run([sys.executable, "-c", _CLI, *argv], capture_output=True, text=True, timeout=60,
                              env=env, errors="replace")
    except subprocess.TimeoutExpired:
        pytest.fail(f"`atpdsl {' '.join(argv)[:200]}` did not return within 60 s")
    return done.returncode, done.stdout + done.stderr


def assert_clean_failure(code: int, text: str, words: list[str], what: str) -> None:
    """Exit 1, every word of `words` in the message, no traceback, no "internal error"."""
    assert "Traceback" not in text, f"{what}: traceback\n{text[-3000:]}"
    assert "internal error" not in text, f"{what}: exit 3 for a user's input\n{text[-2000:]}"
    assert code == 1, f"{what}: exit {code}, wanted 1\n{text[-2000:]}"
    missing = [w for w in words if w not in text]
    assert not missing, f"{what}: the message does not name {missing}\n{text[-2000:]}"
