"""Exit codes exactly as the README states them, for every subcommand.

One table: for check, plan, run, show, export, --version and --help, a case that works (0), a bad spec or
input (1), a bad command line (2) and an internal error (3, provoked by making a function the command calls
raise ZeroDivisionError, which stands for a bug in atpdsl).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from atpdsl.cli import app
from atpdsl.cli.app import main

ROOT = Path(__file__).resolve().parent.parent
GOOD = ('model zoo "induction-2l"\n'
        'pair { clean "t1 t2 t3 t4 t1 t2 t3" corrupt "t1 t2 t3 t5 t1 t2 t3" answer "t4" wrong "t5" }\n'
        "metric logit_diff(answer, wrong) at last\nnodes { heads }\nmethod atp\n"
        'export "out/r.json"\n')
BAD = 'model zoo "induction-2l"\npair { clean "t1" }\nmetric kl\nnodes { head }\n'

README_CODES = {0: "ok", 1: "a problem with the spec or its inputs", 2: "a bad command line", 3: "an internal error"}


def test_the_readme_states_these_codes():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"Exit codes: (.*?)\n\(", readme, flags=re.S)
    assert stated, "README.md lost its exit-code statement"
    text = " ".join(stated.group(1).split())
    assert text == ", ".join(f"{code} {meaning}" for code, meaning in README_CODES.items())
    assert (app.EXIT_OK, app.EXIT_ERRORS, app.EXIT_USAGE, app.EXIT_INTERNAL) == (0, 1, 2, 3)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A good spec, a bad one, and a result written by a real run of the good one."""
    tmp = tmp_path_factory.mktemp("codes")
    (tmp / "good.atp").write_text(GOOD)
    (tmp / "bad.atp").write_text(BAD)
    assert main(["run", str(tmp / "good.atp"), "--out", str(tmp / "o"), "--quiet"]) == 0
    return {"good": str(tmp / "good.atp"), "bad": str(tmp / "bad.atp"), "result": str(tmp / "o" / "r.json"),
            "tmp": str(tmp), "missing": str(tmp / "missing.json")}


def _boom(*args, **kwargs):
    raise ZeroDivisionError("a bug in atpdsl")


# (command, case, argv with {placeholders}, expected exit code, "module:function" made to raise or None)
TABLE = [
    ("check", "ok", ["check", "{good}"], 0, None),
    ("check", "bad spec", ["check", "{bad}"], 1, None),
    ("check", "missing spec", ["check", "{tmp}/nope.atp"], 1, None),
    ("check", "no spec", ["check"], 2, None),
    ("check", "bad option value", ["check", "{good}", "--output-format", "xml"], 2, None),
    ("check", "internal", ["check", "{good}"], 3, "atpdsl.language.compiler:check_file"),
    ("plan", "ok", ["plan", "{good}"], 0, None),
    ("plan", "ok json", ["plan", "{good}", "--json"], 0, None),
    ("plan", "bad spec", ["plan", "{bad}"], 1, None),
    ("plan", "two specs", ["plan", "{good}", "{good}"], 2, None),
    ("plan", "bad emit", ["plan", "{good}", "--emit", "rust"], 2, None),
    ("plan", "internal", ["plan", "{good}"], 3, "atpdsl.language.compiler:build_plan"),
    ("run", "ok", ["run", "{good}", "--out", "{tmp}/o2", "--quiet"], 0, None),
    ("run", "bad spec", ["run", "{bad}", "--quiet"], 1, None),
    ("run", "unwritable log", ["run", "{good}", "--out", "{tmp}/o3", "--log", "{tmp}/no/such/dir/run.log"], 1,
     None),
    ("run", "no spec", ["run"], 2, None),
    ("run", "bad threads", ["run", "{good}", "--threads", "0"], 2, None),
    ("run", "unknown option", ["run", "{good}", "--bogus"], 2, None),
    ("run", "internal", ["run", "{good}", "--quiet"], 3, "atpdsl.pipeline:execute_plan"),
    ("show", "ok", ["show", "{result}"], 0, None),
    ("show", "missing result", ["show", "{missing}"], 1, None),
    ("show", "no result", ["show"], 2, None),
    ("show", "two results", ["show", "{result}", "{result}"], 2, None),
    ("show", "internal", ["show", "{result}"], 3, "atpdsl.pipeline:load"),
    ("export", "ok", ["export", "{result}", "--to", "csv", "--out", "{tmp}/x.csv"], 0, None),
    ("export", "missing result", ["export", "{missing}", "--to", "csv", "--out", "{tmp}/y.csv"], 1, None),
    ("export", "unwritable target", ["export", "{result}", "--out", "{good}/x.csv"], 1, None),
    ("export", "unknown format", ["export", "{result}", "--to", "pdf"], 2, None),
    ("export", "unknown extension", ["export", "{result}", "--out", "{tmp}/x.pdf"], 2, None),
    ("export", "no format", ["export", "{result}"], 2, None),
    ("export", "format contradicts --out", ["export", "{result}", "--to", "csv", "--out", "{tmp}/x.gexf"], 2, None),
    ("export", "internal", ["export", "{result}", "--to", "csv", "--out", "{tmp}/z.csv"], 3,
     "atpdsl.outputs.writer:write"),
    ("--version", "ok", ["--version"], 0, None),
    ("--version", "unknown top-level option", ["--verbose"], 2, None),
    ("--help", "ok", ["--help"], 0, None),
    ("--help", "of a command", ["export", "--help"], 0, None),
    ("(none)", "no command", [], 2, None),
    ("(none)", "unknown command", ["frobnicate"], 2, None),
]


@pytest.mark.parametrize("command, case, argv, expected, broken", TABLE,
                         ids=[f"{c}:{k}" for c, k, *_ in TABLE])
def test_exit_code(command, case, argv, expected, broken, files, capsys, monkeypatch):
    if broken is not None:
        module, name = broken.split(":")
        monkeypatch.setattr(f"{module}.{name}", _boom)
    code = main([a.format(**files) for a in argv])
    out, err = capsys.readouterr()
    assert code == expected, f"atpdsl {' '.join(argv)} ({case}) exited {code}, wanted {expected}\n{out}{err}"
    assert "Traceback" not in out + err
    if expected == 1:
        assert "error" in (out + err).lower()
    if expected == 2:
        assert "usage: atpdsl" in err
    if expected == 3:
        assert err.splitlines()[:1] == ["internal error: ZeroDivisionError: a bug in atpdsl"]
