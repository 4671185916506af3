"""The pipeline and the run/show/export commands, with the compiler and engine replaced by hand-built ones.

The end-to-end test at the bottom uses the real front end and engine on a shipped zoo model once
both are present.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic_circuits import make_plan, mixed_result

import atpdsl
import atpdsl.outputs.report
from atpdsl.cli import commands
from atpdsl import pipeline
from atpdsl.errors import ModelError, SpecError
from atpdsl.outputs.gexf import read_gexf

ALL = ("json", "csv", "graphml", "gexf", "dot")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Replace the compiler and the engine; the engine reports progress like the real one."""
    calls: dict[str, object] = {}

    def compile_spec(spec=None, *, text=None, out_dir=None):
        calls["compile"] = (spec, text, out_dir)
        return make_plan(Path(out_dir) if out_dir else tmp_path, formats=calls.get("formats", ALL))

    def execute_plan(plan, progress=None, *, fresh=False):
        calls["plan"] = plan
        for phase, total in (("forward", 3), ("backward", 3), ("verify", 5)):
            for done in range(1, total + 1):
                if progress:
                    progress(phase, done, total)
        return mixed_result(edges=calls.get("edges", False))

    monkeypatch.setattr(pipeline, "compile_spec", compile_spec)
    monkeypatch.setattr(pipeline, "execute_plan", execute_plan)
    return calls


def run_args(**kw) -> argparse.Namespace:
    base = dict(spec="circuit.atp", out=None, quiet=False, json=False, profile=False, trust_remote_code=False,
                output_format="full")
    base.update(kw)
    return argparse.Namespace(**base)


def test_api_run_returns_graph_scores_plan_and_result(fake, tmp_path):
    res = atpdsl.run(text="model zoo \"x\"", out_dir=tmp_path / "o")
    assert fake["compile"] == (None, 'model zoo "x"', tmp_path / "o")
    assert set(res.graph) >= {"embed", "logits", "L1.H2"}
    assert res.scores.columns[:3] == ("node", "layer", "kind") and len(res.scores) == len(res.result.nodes)
    assert res.plan is fake["plan"] and res.result.model_id == "zoo/induction-2l"
    assert [o.error for o in res.exports] == [None] * len(ALL)
    assert (tmp_path / "o" / "out" / "circuit.gexf").is_file()
    assert [k for k, _ in res.timings] == ["compile", "execute", "select", "graph", "export"]
    assert res.export(tmp_path / "again.gexf") == [tmp_path / "again.gexf"]
    assert json.loads(res.to_json())["spec_hash"] == "sha256:0123abcd"


def test_api_run_warns_about_a_failed_export(fake, tmp_path, monkeypatch):
    import atpdsl.outputs.report

    monkeypatch.setattr(atpdsl.outputs.report, "render_html", lambda res: 1 / 0)
    fake["formats"] = ("json", "html")
    with pytest.warns(RuntimeWarning, match="circuit.html failed: ZeroDivisionError"):
        res = atpdsl.run("circuit.atp")
    assert [o.format for o in res.failed] == ["html"]


def test_cmd_run_prints_progress_summary_and_exports(fake, tmp_path, capsys):
    assert commands.cmd_run(run_args()) == 0
    out, err = capsys.readouterr()
    assert "Circuit: 5 node(s) by top 6 from 22 scored" in out
    for node in ("L1.H2", "L0.H3", "L1.H1", "L0.H2", "L1.H2.q@3"):
        assert node in out
    assert "dropped after verification (below the cut 0.3): L1.H3 (measured 0.00667)" in out
    assert "diagnostic: with 90% confidence no unverified node changes the metric by more than 0.0123" in out
    assert f"wrote {tmp_path}/out/circuit.json" in out.replace("\n", "")
    assert "forward passes" in err and "3/3" in err and "verifying (exact patching)" in err and "5/5" in err


def test_cmd_run_json_puts_only_the_result_on_stdout(fake, capsys):
    assert commands.cmd_run(run_args(json=True, quiet=True, profile=True)) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["format"] == "atpdsl-result" and doc["selection"]["selected"][0] == "L1.H2"
    assert "timings" in err and "forward" in err  # --profile goes to stderr under --json


def test_cmd_run_quiet_prints_nothing(fake, capsys):
    assert commands.cmd_run(run_args(quiet=True)) == 0
    assert capsys.readouterr() == ("", "")


def test_cmd_run_profile_lists_pipeline_and_engine_phases(fake, capsys):
    assert commands.cmd_run(run_args(profile=True)) == 0
    out = capsys.readouterr().out
    table = out.split("timings", 1)[1]
    for phase in ("compile", "execute", "  load", "  forward", "  backward", "  verify", "select", "graph", "export"):
        assert phase in table


def test_cmd_run_passes_out_and_trust_remote_code(fake, tmp_path, capsys):
    assert commands.cmd_run(run_args(out=str(tmp_path / "elsewhere"), trust_remote_code=True, quiet=True)) == 0
    assert fake["compile"][2] == str(tmp_path / "elsewhere")
    assert fake["plan"].model.trust_remote_code is True
    assert (tmp_path / "elsewhere" / "out" / "circuit.csv").is_file()


def test_cmd_run_failed_export_exits_1_and_keeps_the_rest(fake, tmp_path, capsys, monkeypatch):
    import atpdsl.outputs.plots

    monkeypatch.setattr(atpdsl.outputs.plots, "circuit_figure", lambda G: 1 / 0)
    fake["formats"] = ("png", "csv")
    assert commands.cmd_run(run_args()) == 1
    out, err = capsys.readouterr()
    assert "error: export" in err and "circuit.png failed" in err and "ZeroDivisionError" in err
    assert "Traceback" not in err
    assert "atpdsl export" in err and "circuit.result.json" in err.replace("\n", "")
    assert (tmp_path / "out" / "circuit.csv").is_file() and (tmp_path / "out" / "circuit.result.json").is_file()


def test_cmd_run_reports_spec_and_model_errors_without_traceback(monkeypatch, capsys):
    from atpdsl.language.diagnostics import Diagnostic, Severity

    def bad_spec(spec=None, **kw):
        raise SpecError([Diagnostic("E100", Severity.ERROR, "unknown metric 'logitdiff'", None)])

    monkeypatch.setattr(pipeline, "compile_spec", bad_spec)
    assert commands.cmd_run(run_args(output_format="concise")) == 1
    err = capsys.readouterr().err
    assert "unknown metric 'logitdiff'" in err and "Found 1 error." in err

    assert commands.cmd_run(run_args(output_format="json")) == 1
    assert json.loads(capsys.readouterr().out)[0]["message"] == "unknown metric 'logitdiff'"

    def no_model(spec=None, **kw):
        raise ModelError("model folder '/nope' not found")

    monkeypatch.setattr(pipeline, "compile_spec", no_model)
    assert commands.cmd_run(run_args()) == 1
    err = capsys.readouterr().err
    assert "error: model folder '/nope' not found" in err and "Traceback" not in err


def test_show_prints_the_summary_again(fake, tmp_path, capsys):
    assert commands.cmd_run(run_args(quiet=True)) == 0
    assert commands.cmd_show(argparse.Namespace(result=str(tmp_path / "out" / "circuit.json"))) == 0
    out = capsys.readouterr().out
    assert "Circuit: 5 node(s) by top 6" in out and "diagnostic: with 90% confidence" in out
    assert commands.cmd_show(argparse.Namespace(result=str(tmp_path / "missing.json"))) == 1
    assert "error: cannot read result file" in capsys.readouterr().err


def test_export_converts_a_saved_result_without_rerunning(fake, tmp_path, capsys, monkeypatch):
    fake["edges"] = True
    assert commands.cmd_run(run_args(quiet=True)) == 0
    saved = tmp_path / "out" / "circuit.json"
    res = pipeline.load(saved)
    monkeypatch.setattr(pipeline, "execute_plan", lambda *a, **k: pytest.fail("export must not run the model"))

    assert commands.cmd_export(argparse.Namespace(result=str(saved), to="gexf", out=None)) == 0
    assert f"wrote {tmp_path}/out/circuit.gexf" in capsys.readouterr().out.replace("\n", "")
    G = read_gexf(tmp_path / "out" / "circuit.gexf")
    assert set(G.edges) == set(res.graph.edges) and G.graph["spec_hash"] == "sha256:0123abcd"

    folder = tmp_path / "converted"
    folder.mkdir()
    assert commands.cmd_export(argparse.Namespace(result=str(saved), to="dot", out=str(folder))) == 0
    assert (folder / "circuit.dot").is_file()
    assert commands.cmd_export(argparse.Namespace(result=str(saved), to=None, out=str(tmp_path / "x.graphml"))) == 0
    assert (tmp_path / "x.graphml").is_file()
    assert commands.cmd_export(argparse.Namespace(result=str(saved), to="csv", out=str(tmp_path / "named"))) == 0
    assert (tmp_path / "named.csv").is_file() and (tmp_path / "named-edges.csv").is_file()

    assert commands.cmd_export(argparse.Namespace(result=str(saved), to="gexf", out=str(tmp_path / "x.csv"))) == 1
    assert "--to gexf does not match --out" in capsys.readouterr().err
    assert commands.cmd_export(argparse.Namespace(result=str(saved), to="xlsx", out=None)) == 1
    assert "unknown export format 'xlsx'" in capsys.readouterr().err


def test_progress_bars_show_counts_and_never_break_the_run():
    from rich.console import Console

    stream = io.StringIO()
    with commands.ProgressBars(Console(file=stream, width=120), enabled=True) as bars:
        for i in range(1, 5):
            bars("forward", i, 4)
        bars("custom phase", 1, 2)
        bars._progress.update = None  # a broken display
        bars("backward", 1, 1)
    text = stream.getvalue()
    assert "forward passes" in text and "4/4" in text and "custom phase" in text
    off = commands.ProgressBars(Console(file=io.StringIO()), enabled=False)
    with off:
        off("forward", 1, 1)


def test_import_atpdsl_stays_light():
    code = "import sys, atpdsl; atpdsl.run; print(sorted(m for m in ('torch', 'networkx', 'matplotlib', 'nnsight') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert "run" in atpdsl.__all__


def test_end_to_end_through_the_cli_on_the_zoo_model(tmp_path, capsys):
    from atpdsl.cli.app import main
    from atpdsl.outputs.graphml import read_graphml

    spec = tmp_path / "e2e.atp"
    spec.write_text(
        'model zoo "induction-2l"\n'
        'pair { clean "t1 t2 t3 t4 t5 t6 t7 t8 t1 t2 t3" corrupt "t1 t2 t9 t4 t5 t6 t7 t8 t1 t2 t3" '
        'answer " t4" wrong " t9" }\n'
        "metric logit_diff(answer, wrong) at last\n"
        "nodes { heads }\nmethod atp\nselect top 3\nverify top 2\n"
        'export "out/e2e.json"\nexport "out/e2e.graphml"\n'
    )
    assert main(["run", str(spec), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    res = pipeline.load(tmp_path / "o" / "e2e.json")
    sel = res.selection
    assert len(sel.selected) - len(sel.added) + len(sel.dropped) == 3
    assert [n.rank for n in res.result.nodes] == list(range(1, len(res.result.nodes) + 1))
    G = read_graphml(tmp_path / "o" / "e2e.graphml")
    assert set(G) == set(res.graph) and G.graph["model_id"] == res.result.model_id
    assert main(["show", str(tmp_path / "o" / "e2e.json")]) == 0
    assert "Circuit:" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "o" / "e2e.json"), "--to", "gexf"]) == 0
    assert (tmp_path / "o" / "e2e.gexf").is_file()


def test_cli_says_when_positions_count_from_the_end(tmp_path, shared_dir, capsys):
    """inline.atp's prompts differ in length: the run must say that @-k positions count from the end."""
    from atpdsl.cli.app import main

    code = main(["run", str(shared_dir / "specs" / "inline.atp"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "count from the end" in " ".join(out.split())
