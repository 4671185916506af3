"""The command line: exit codes, output formats, dispatch, no tracebacks (atpdsl/cli/app.py)."""
import importlib
import json
import sys
import types

import pytest

from atpdsl import __version__
from atpdsl.cli import app as cli
from atpdsl.errors import AtpError


@pytest.fixture
def spec(shared_dir):
    return str(shared_dir / "specs" / "pronoun.atp")


@pytest.fixture
def bad(tmp_path):
    p = tmp_path / "bad.atp"
    p.write_text('model "gpt2"\npair { clean "a" }\nmetric kl\nnodes { head }\n')
    return str(p)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert (code, out.strip()) == (0, f"atpdsl {__version__}")
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for word in ("check", "plan", "run", "show", "export", "examples:", "atpdsl plan spec.atp --emit python",
                 "exit codes"):
        assert word in out
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0 and "--emit" in out and "(default: full)" in out


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["check"], ["plan", "x.atp", "--emit", "rust"],
                                  ["check", "x.atp", "--output-format", "xml"]])
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage:" in err


def test_check_ok(capsys, shared_dir):
    specs = sorted(str(p) for p in (shared_dir / "specs").glob("*.atp"))
    code, out, _ = run(capsys, "check", *specs)
    assert code == 0
    assert out.splitlines() == [f"{specs[0]}: ok (2 pairs)", f"{specs[1]}: ok (20 pairs)"]


def test_check_bad_full(capsys, bad):
    code, out, _ = run(capsys, "check", bad)
    assert code == 1
    assert f"error[E305]: pair has no `corrupt` prompt\n --> {bad}:2:1\n  |\n2 | pair {{ clean \"a\" }}\n  | ^^^^" in out
    assert "error[E601]: unknown node kind `head`" in out and "= help: did you mean `heads`?" in out
    assert out.rstrip().endswith("Found 2 errors.")


def test_check_bad_concise_and_json(capsys, bad):
    code, out, _ = run(capsys, "check", bad, "--output-format", "concise")
    assert code == 1
    assert out.splitlines() == [
        f"{bad}:2:1: E305 pair has no `corrupt` prompt [help: add `corrupt \"...\"` to the block]",
        f"{bad}:4:9: E601 unknown node kind `head` [help: did you mean `heads`?]",
        "Found 2 errors.",
    ]
    code, out, _ = run(capsys, "check", bad, "--output-format", "json")
    assert code == 1
    assert [(d["code"], d["line"], d["column"]) for d in json.loads(out)] == [("E305", 2, 1), ("E601", 4, 9)]


def test_check_missing_file_is_exit_1(capsys, tmp_path):
    code, _, err = run(capsys, "check", str(tmp_path / "nope.atp"))
    assert code == 1 and "error: spec file not found" in err


def test_plan_prints_tables(capsys, spec):
    code, out, _ = run(capsys, "plan", spec)
    assert code == 0
    for word in ("Plan for", "logit_diff(answer, wrong) at last", "atp* (qk_fix on, graddrop per layer)",
                 "graddrop", "x 3 batches = 126 forward-equivalents", "model.layers.0.self_attn.o_proj.input"):
        assert word in out, word


def test_plan_shows_the_norm_fix(capsys, project_root):
    code, out, _ = run(capsys, "plan", str(project_root / "examples" / "pronoun-neurons.atp"))
    assert code == 0
    for word in ("atp* (qk_fix on, graddrop per layer, norm_fix on)", "norm fix", "6.5", "exact block-input and final"):
        assert word in out, word


def test_plan_json_and_errors(capsys, spec, bad):
    code, out, _ = run(capsys, "plan", spec, "--json")
    assert code == 0 and json.loads(out)["method"]["name"] == "atp*"
    code, out, err = run(capsys, "plan", bad)
    assert code == 1 and "error[E305]" in err and out == ""
    code, out, err = run(capsys, "plan", bad, "--output-format", "json")
    assert code == 1 and len(json.loads(out)) == 2


def test_emit_python_calls_the_engine_emitter(capsys, spec, monkeypatch):
    fake = types.ModuleType("atpdsl.engine.emit")
    fake.emit_python = lambda plan: f"# program for {len(plan.pairs)} pairs\n"
    monkeypatch.setitem(sys.modules, "atpdsl.engine.emit", fake)
    code, out, _ = run(capsys, "plan", spec, "--emit", "python")
    assert (code, out) == (0, "# program for 20 pairs\n")


def test_emit_python_missing_is_a_clear_error(capsys, spec, monkeypatch):
    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "atpdsl.engine.emit":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    code, _, err = run(capsys, "plan", spec, "--emit", "python")
    assert code == 1 and "atpdsl.engine.emit is not built yet" in err


def test_run_show_export_dispatch_to_commands(capsys, monkeypatch, spec):
    seen = {}
    fake = types.ModuleType("atpdsl.cli.commands")
    for name in ("cmd_run", "cmd_show", "cmd_export"):
        def command(args, name=name):
            seen[name] = vars(args)
            return 0
        setattr(fake, name, command)
    monkeypatch.setitem(sys.modules, "atpdsl.cli.commands", fake)
    assert run(capsys, "run", spec, "--out", "o", "--quiet", "--json", "--profile", "--trust-remote-code",
               "--output-format", "concise")[0] == 0
    assert {k: seen["cmd_run"][k] for k in ("spec", "out", "quiet", "json", "profile", "trust_remote_code",
                                            "output_format")} == {
        "spec": spec, "out": "o", "quiet": True, "json": True, "profile": True, "trust_remote_code": True,
        "output_format": "concise"}
    assert run(capsys, "show", "r.json")[0] == 0 and seen["cmd_show"]["result"] == "r.json"
    assert run(capsys, "export", "r.json", "--to", "gexf", "--out", "g.gexf")[0] == 0
    assert (seen["cmd_export"]["to"], seen["cmd_export"]["out"]) == ("gexf", "g.gexf")


def test_missing_engine_is_reported(capsys, monkeypatch, spec):
    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "atpdsl.cli.commands":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    code, _, err = run(capsys, "run", spec)
    assert code == 1 and "the engine is not built yet" in err


def test_atp_errors_from_commands_exit_1(capsys, monkeypatch):
    fake = types.ModuleType("atpdsl.cli.commands")

    def cmd_show(args):
        raise AtpError("no such result: r.json")

    fake.cmd_show = cmd_show
    monkeypatch.setitem(sys.modules, "atpdsl.cli.commands", fake)
    code, _, err = run(capsys, "show", "r.json")
    assert code == 1 and err.strip() == "error: no such result: r.json"


def test_internal_errors_exit_3_without_traceback_unless_debug(capsys, monkeypatch, spec):
    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "check", boom)
    code, out, err = run(capsys, "check", spec)
    assert code == 3
    assert err.splitlines() == ["internal error: ZeroDivisionError: division by zero",
                                "this is a bug in atpdsl; rerun with --debug for the traceback and report it"]
    for argv in (["--debug", "check", spec], ["check", spec, "--debug"]):
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code == 3 and "Traceback" in err and "ZeroDivisionError" in err


def test_plan_text_has_no_colour(spec):
    from atpdsl.language.compiler import compile_file

    text = cli.plan_text(compile_file(spec), width=90)
    assert "\x1b[" not in text and max(len(line) for line in text.splitlines()) <= 90
