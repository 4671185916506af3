"""One record per export format: the registry drives `write`, `write_all`, `atpdsl export` and the checker."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_circuits import finished, make_plan, mixed_result

from atpdsl.outputs import ExportError, format_of, write, write_all
from atpdsl.outputs.formats import EXPORT_FORMATS, ExportFormat, lookup, planned_files, register, unregister
from atpdsl.plan import ExportTarget

ROOT = Path(__file__).resolve().parents[2]


def export_shout(res, path):
    """A test format: the circuit's node names in capitals, one per line."""
    from atpdsl.outputs.atomic import write_text

    write_text(path, "\n".join(n.upper() for n in res.selection.selected) + "\n")
    return [Path(path)]


@pytest.fixture
def shout():
    fmt = register(ExportFormat("shout", "node names, loudly", f"{__name__}:export_shout", aliases=("yell",), order=40))
    yield fmt
    unregister("shout")


def test_a_new_format_is_one_record_and_its_writer(shout, tmp_path):
    res = finished(make_plan(tmp_path), mixed_result())
    assert EXPORT_FORMATS["yell"] is shout and format_of("x.YELL") == "shout"
    assert write(res, tmp_path / "c.shout") == [tmp_path / "c.shout"]
    assert (tmp_path / "c.shout").read_text().split() == [n.upper() for n in res.selection.selected]
    outcomes = write_all(res, [ExportTarget(str(tmp_path / "d.yell"), "yell")])
    assert [(o.format, o.error) for o in outcomes] == [("json", None), ("shout", None)]  # the JSON result first
    assert (tmp_path / "d.yell").read_text().startswith("L1.H2")
    with pytest.raises(ValueError, match="already taken"):
        register(ExportFormat("other", "clash", "x:y", aliases=("yell",)))


def test_atpdsl_export_uses_the_same_registry_aliases_included(shout, tmp_path, capsys):
    from atpdsl.cli.app import main

    res = finished(make_plan(tmp_path), mixed_result())
    write(res, tmp_path / "r.json")
    assert main(["export", str(tmp_path / "r.json"), "--out", str(tmp_path / "c.gv")]) == 0
    assert (tmp_path / "c.gv").read_text().startswith("digraph circuit {")
    assert main(["export", str(tmp_path / "r.json"), "--to", "yell"]) == 0
    assert (tmp_path / "r.shout").is_file()
    assert main(["export", str(tmp_path / "r.json"), "--to", "cyjs"]) == 0
    assert json.loads((tmp_path / "r.cyjs").read_text())["elements"]["nodes"]
    capsys.readouterr()
    assert main(["export", str(tmp_path / "r.json"), "--to", "xlsx"]) != 0
    assert "unknown export format 'xlsx'" in capsys.readouterr().err


def test_records_know_their_companions_and_readers():
    assert [p.name for p in planned_files("out/x.csv", "csv")] == ["x.csv", "x-edges.csv", "x-pairs.csv"]
    assert [p.name for p in planned_files("x.png", "png")] == ["x.png", "x-heads.png", "x-neurons.png"]
    assert lookup("GV").name == "dot" and lookup(".htm").name == "html"
    from atpdsl.outputs.formats import load_reader

    with pytest.raises(ExportError, match="dot files are not read back"):
        load_reader("dot")
    assert load_reader("graphml").__name__ == "read_graphml"


def test_cyjs_round_trip_and_shape(tmp_path):
    from atpdsl.outputs.cyjs import read_cyjs

    res = finished(make_plan(tmp_path), mixed_result(edges=True))
    write(res, tmp_path / "c.cyjs")
    doc = json.loads((tmp_path / "c.cyjs").read_text())
    assert doc["format_version"] == "1.0" and set(doc["elements"]) == {"nodes", "edges"}
    assert all(set(n) == {"data", "position"} and "id" in n["data"] for n in doc["elements"]["nodes"])
    G = read_cyjs(tmp_path / "c.cyjs")
    assert set(G) == set(res.graph) and set(G.edges) == set(res.graph.edges)
    assert G.nodes["L1.H1"] == res.graph.nodes["L1.H1"] and G.graph == res.graph.graph


def test_the_format_registry_imports_nothing_heavy():
    code = ("import sys, atpdsl.outputs, atpdsl.outputs.formats; "
            "print(sorted(m for m in ('torch', 'networkx', 'matplotlib', 'atpdsl.pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(path: Path) -> set[str]:
    """atpdsl modules a file imports anywhere (functions included), typing-only blocks excepted."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("atpdsl"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("atpdsl")}
    return found


def test_outputs_and_circuit_have_no_import_cycle_and_never_import_the_pipeline():
    modules = {}
    for path in (ROOT / "atpdsl").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = {m for m in _imports(path)}
    mine = [m for m in modules if m.startswith(("atpdsl.outputs", "atpdsl.circuit"))]
    for m in mine:
        assert "atpdsl.pipeline" not in modules[m], m
    for start in mine:  # depth-first from each module: is `start` reachable from itself?
        stack, seen = list(modules.get(start, ())), set()
        while stack:
            m = stack.pop()
            assert m != start, f"import cycle through {start}"
            if m in seen or not m.startswith(("atpdsl.outputs", "atpdsl.circuit")):
                continue
            seen.add(m)
            stack.extend(modules.get(m, ()))


def test_the_checker_can_ask_for_every_export_problem_before_the_run(tmp_path):
    from atpdsl.outputs.writer import export_problems

    (tmp_path / "link.gexf").symlink_to("/etc/hostname")
    targets = [(str(tmp_path / "r.csv"), "csv"), (str(tmp_path / "r-pairs.csv"), "csv"),
               (str(tmp_path / "link.gexf"), "gexf"), (str(tmp_path / "r.json"), "json"),
               (str(tmp_path / "r.manifest.json"), "json"), (str(tmp_path / "ok.graphml"), "graphml")]
    problems = export_problems(targets, spec_file=str(tmp_path / "r.atp"))
    assert sorted(i for i, _ in problems) == [1, 2, 4]
    text = dict(problems)
    assert "would overwrite the companion 'r-pairs.csv'" in text[1]
    assert "outside its folder" in text[2]
    assert "would be overwritten by the run's 'r.manifest.json'" in text[4]  # r.json's manifest
    assert export_problems([(str(tmp_path / "a.json"), "json"), (str(tmp_path / "a.png"), "png")]) == []
