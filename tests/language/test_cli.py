"""The command line: exit codes, output formats, dispatch, no tracebacks (atpdsl/cli/app.py)."""
import importlib
import json
import re
import subprocess
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
    p.write_text('model "gpt2"\npair { clean "a" }\nmetric kl method exact\nnodes { head }\n')
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


def _steps_table(out: str) -> str:
    """The plan's steps table, from its title to the end of the output."""
    assert "steps, in the order they run" in out, out
    return out[out.index("steps, in the order they run"):]


def _step_rows(out: str, name: str) -> list[int]:
    """Numbers of the steps table's lines that start the row of the step called `name`."""
    pattern = re.compile(rf"^ ?{re.escape(name)} {{2,}}")
    return [i for i, line in enumerate(_steps_table(out).splitlines()) if pattern.match(line)]


def _step_line(out: str, name: str) -> str:
    """The steps table's line for the step called `name`."""
    rows = _step_rows(out, name)
    assert rows, f"no step {name!r} in:\n{out}"
    return _steps_table(out).splitlines()[rows[0]]


def test_plan_prints_tables(capsys, spec):
    from atpdsl.language.compiler import compile_file

    plan = compile_file(spec)
    total = sum(step.cost for step in plan.steps)
    code, out, _ = run(capsys, "plan", spec)
    assert code == 0
    words = " ".join(out.split())  # rich wraps long cells at the console's width
    for word in ("Plan for", "logit_diff(answer, wrong) at last", "atp* (qk_fix on, graddrop per layer)",
                 "graddrop", f"x 3 batches = {total * 3:g} forward-equivalents", "model.layers.0.self_attn.o_proj.input"):
        assert word in words, word
    for step in plan.steps:  # every step the engine will run, in order, with its own cost
        assert f" {step.cost:g} " in _step_line(out, step.name) + " "
    rows = [_step_rows(out, step.name)[0] for step in plan.steps]
    assert rows == sorted(rows)


def test_plan_shows_the_norm_fix(capsys, project_root):
    from atpdsl.language.compiler import compile_file

    spec = project_root / "examples" / "pronoun-neurons.atp"
    norm = [step for step in compile_file(spec).steps if "norm" in step.name]
    code, out, _ = run(capsys, "plan", str(spec))
    assert code == 0 and norm
    assert "atp* (qk_fix on, graddrop per layer, norm_fix on)" in out
    assert f" {norm[0].cost:g} " in _step_line(out, norm[0].name) + " "


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


# ------------------------------------------------------------------ start-up cost, threads, progress

@pytest.mark.parametrize("entry", ["atpdsl.cli", "atpdsl.cli.app"])
@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["run", "--help"]])
def test_version_and_help_do_not_import_rich_or_torch(entry, argv):
    code = (f"import sys\nfrom {entry} import main\nrc = main({argv!r})\n"
            "print(rc, sorted(m for m in ('rich', 'torch', 'lark', 'networkx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []"
    if argv == ["--version"]:
        assert done.stdout.splitlines()[0] == f"atpdsl {__version__}"


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "2000"])
def test_bad_thread_counts_are_usage_errors(capsys, value):
    code, _, err = run(capsys, "run", "x.atp", "--threads", value)
    assert code == 2 and "--threads" in err and "usage: atpdsl run" in err


def _fake_commands(monkeypatch, seen):
    import torch

    fake = types.ModuleType("atpdsl.cli.commands")

    def cmd_run(args):
        seen.update(threads=torch.get_num_threads(), note=args.threads_note, log=args.log)
        return 0

    fake.cmd_run = cmd_run
    monkeypatch.setitem(sys.modules, "atpdsl.cli.commands", fake)


def test_threads_are_set_for_the_run_and_restored(capsys, monkeypatch):
    import torch

    seen = {}
    _fake_commands(monkeypatch, seen)
    before = torch.get_num_threads()
    assert run(capsys, "run", "x.atp", "--threads", "3", "--log", "r.log")[0] == 0
    assert seen == {"threads": 3, "note": "threads: 3 thread(s), as --threads asked", "log": "r.log"}
    assert torch.get_num_threads() == before


def test_default_threads_follow_the_cores(capsys, monkeypatch):
    import torch

    from atpdsl.cli import threads

    seen = {}
    _fake_commands(monkeypatch, seen)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    assert run(capsys, "run", "x.atp")[0] == 0
    assert seen["threads"] == 1 and "2 usable core(s)" in seen["note"]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("cores, load, omp, expected", [
    (1, 0.0, "", 1), (2, 0.0, "", 1), (8, 0.0, "", 4), (8, 6.2, "", 2), (8, 30.0, "", 1), (16, 3.4, "", 4),
    (8, 0.0, "3", None)])
def test_choose_threads(cores, load, omp, expected):
    from atpdsl.cli.threads import choose_threads

    env = {"OMP_NUM_THREADS": omp} if omp else {}
    choice = choose_threads(None, torch_default=4, cores=cores, load=load, environ=env)
    assert choice.threads == expected, choice
    assert choose_threads(5, torch_default=4, cores=cores, load=load, environ=env).threads == 5


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_count_units_with_an_eta_from_the_first_unit(tmp_path):
    import io

    from rich.console import Console

    from atpdsl.cli.progress import ProgressBars

    clock, stream = _Clock(), io.StringIO()
    with ProgressBars(Console(file=stream, width=200), log=tmp_path / "run.log", every=10.0, clock=clock,
                      header="threads: 1") as bars:
        bars("forward", 0, 2)
        clock.now += 3.0
        bars("forward", 1, 2)
        clock.now += 3.0
        bars("forward", 2, 2)
        clock.now += 2.0  # the verify phase starts when forward ended: its first report is already 1 unit
        bars("verify", 1, 20)
        for done in range(2, 21):
            clock.now += 2.0
            bars("verify", done, 20)
    lines = stream.getvalue().splitlines()
    assert lines == (tmp_path / "run.log").read_text().splitlines()  # the log gets exactly what stderr got
    assert lines[0] == "threads: 1"
    assert lines[1:4] == ["[   0:00] forward passes: 0/2 batches, 0:00 spent, eta -:--",
                          "[   0:03] forward passes: 1/2 batches, 0:03 spent, eta 0:03",
                          "[   0:06] forward passes: 2/2 batches, 0:06 spent, done"]
    # ETA from the first unit: 2 s for 1 node, 19 to go
    assert lines[4] == "[   0:08] verifying (exact patching): 1/20 nodes, 0:02 spent, eta 0:38"
    # then at most one line per 10 s, and the end of the phase
    assert lines[5:] == ["[   0:18] verifying (exact patching): 6/20 nodes, 0:12 spent, eta 0:28",
                         "[   0:28] verifying (exact patching): 11/20 nodes, 0:22 spent, eta 0:18",
                         "[   0:38] verifying (exact patching): 16/20 nodes, 0:32 spent, eta 0:08",
                         "[   0:46] verifying (exact patching): 20/20 nodes, 0:40 spent, done"]


def test_quiet_progress_still_writes_the_log_and_a_bad_log_path_is_an_error(tmp_path):
    import io

    from rich.console import Console

    from atpdsl.cli.progress import ProgressBars

    stream = io.StringIO()
    with ProgressBars(Console(file=stream), enabled=False, log=tmp_path / "q.log") as bars:
        bars("diagnose", 1, 1)
    assert stream.getvalue() == ""
    assert "false-negative diagnostic: 1/1 samples" in (tmp_path / "q.log").read_text()
    with pytest.raises(AtpError, match="cannot write the log file"):
        with ProgressBars(Console(file=stream), log=tmp_path / "no" / "such" / "dir.log"):
            pass


def test_terminal_bars_show_phases_in_the_order_they_start():
    import io

    from rich.console import Console

    from atpdsl.cli.progress import ProgressBars

    stream = io.StringIO()
    console = Console(file=stream, width=150, force_terminal=True, color_system=None)
    with ProgressBars(console) as bars:
        assert not bars.plain
        for phase, total in (("forward", 2), ("backward", 2), ("graddrop", 5), ("verify", 12), ("diagnose", 200)):
            for done in range(1, total + 1):
                bars(phase, done, total)
    final = stream.getvalue().split("\x1b[2K")[-6:]  # the last redraw: one line per phase
    text = "".join(final)
    order = [text.index(label) for label in ("forward passes", "backward passes", "GradDrop terms",
                                             "verifying (exact patching)", "false-negative diagnostic")]
    assert order == sorted(order)
    for count in ("2/2 batches", "5/5 terms", "12/12 nodes", "200/200 samples"):
        assert count in text


def test_a_phase_that_grows_after_its_end_goes_on_reporting():
    """Adaptive verification adds nodes after a round ends: the new total is reported, the repeated end is not."""
    import io

    from rich.console import Console

    from atpdsl.cli.progress import ProgressBars

    clock, stream = _Clock(), io.StringIO()
    with ProgressBars(Console(file=stream, width=200), clock=clock) as bars:
        for done, total in ((0, 2), (1, 2), (2, 2), (2, 2), (3, 5), (5, 5)):
            clock.now += 1.0
            bars("verify", done, total)
    counts = [line.split(": ")[1].split(",")[0] for line in stream.getvalue().splitlines()]
    assert counts == ["0/2 nodes", "1/2 nodes", "2/2 nodes", "3/5 nodes", "5/5 nodes"]
