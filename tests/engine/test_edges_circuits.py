"""Edge-level circuits: `select edges ...` and `verify edges top K` from the spec text to the plan, the selection
of the finest edges (a head's q / k / v parts) and the graph it builds, and a whole run on the zoo model whose
verified edges are the path patches of the same edges and whose files keep the parts."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
from synthetic_circuits import ranked_result, score

from atpdsl.circuit.graph import build_graph, describe_selection
from atpdsl.circuit.scores import EdgeScore
from atpdsl.circuit.select import finest_edges, select
from atpdsl.language.compiler import check_text, compile_text
from atpdsl.plan import EdgeSettings, Selection

HEAD = '''model zoo "induction-2l"
pair {{ clean "t1 t2 t3 t4 t5 t6 t7 t8 t1 t2 t3" corrupt "t1 t2 t9 t4 t5 t6 t7 t8 t1 t2 t3" answer " t4" wrong " t9" }}
metric {metric}
nodes {{ heads }}
method {method}
'''


def _check(extra: str, method: str = "atp", metric: str = "logit_diff(answer, wrong) at last"):
    return check_text(HEAD.format(method=method, metric=metric) + extra, base_dir=".")


def test_edge_statements_compile_to_the_plan_and_its_steps():
    plan = compile_text(HEAD.format(method="atp", metric="logit_diff(answer, wrong) at last")
                        + "select edges cumulative 0.8 { ig_steps 6 }\nverify edges top 7\nselect top 5\n",
                        base_dir=".")
    assert plan.edges == EdgeSettings(Selection("cumulative", 0.8), 7, 6)
    assert plan.selection == Selection("top", 5)
    kinds = [s.kind for s in plan.steps]
    assert kinds.index("clean_backward") < kinds.index("edge_ig") < kinds.index("edges")
    assert kinds.index("edge_reads") < kinds.index("edges") < kinds.index("verify_edges")
    assert dict(plan.steps[kinds.index("edge_ig")].params) == {"steps": 6}
    assert compile_text(HEAD.format(method="atp", metric="logit_diff(answer, wrong) at last"), base_dir=".").edges \
        is None


@pytest.mark.parametrize("text,code,words", [
    ("select edgse top 3", "E001", "expected a number"),
    ("select edges tpo 3", "E807", "did you mean `top`"),
    ("verify edges best 3", "E807", "`verify edges top 20`"),
    ("select edges top 0", "E106", "positive integer"),
    ("select edges cumulative 1.5", "E106", "(0, 1]"),
    ("verify edges top 0", "E106", "positive integer"),
    ("select edges top 3 { ig_step 4 }", "E103", "did you mean `ig_steps`"),
    ("select edges top 3 { ig_steps 0 }", "E106", "1 to 1000"),
    ("select edges top 3\nselect edges top 4", "E101", "duplicate `select edges`"),
    ("select edges top", "E106", "needs a number"),
    ("select edges none 3", "E106", "takes no number"),
    ("select edges none\nverify edges top 3", "E808", "`select edges none`"),
])
def test_edge_statement_mistakes_are_reported_with_their_place(text, code, words):
    errors = _check(text + "\n").errors
    assert [e.code for e in errors] == [code], [(e.code, e.message) for e in errors]
    shown = errors[0].message + " " + " ".join(errors[0].hints)
    assert words in shown and errors[0].span.line >= 6


@pytest.mark.parametrize("method,metric,why", [
    ("exact", "logit_diff(answer, wrong) at last", "scores nodes only"),
    ("atp", "kl", "zero gradient"),
])
def test_edges_need_a_run_that_computes_them(method, metric, why):
    errors = _check("verify edges top 3\n", method=method, metric=metric).errors
    e808 = [e for e in errors if e.code == "E808"]
    assert len(e808) == 1 and why in e808[0].message


def test_select_edges_none_plans_and_runs_no_edges_and_the_same_node_scores(tmp_path):
    """`select edges none`: no edge reads in the passes and no edge step; the node scores are those of the default
    run (which computes edges from the same passes); the graph falls back to the residual-stream order."""
    import torch

    import atpdsl

    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[2]
    base = ('model zoo "induction-2l"\npairs from "' + str(root) + '/examples/data/induction-prev.jsonl"\n'
            "metric logit_diff(answer, wrong) at last\nnodes { heads per position }\nmethod atp\nbatch 16\n"
            "select top 6\n")
    off = compile_text(base + "select edges none\n", base_dir=".")
    on = compile_text(base, base_dir=".")
    assert off.edges is None and dict(off.extras)["edges_allowed"] is False
    assert [s.kind for s in off.steps] == [s.kind for s in on.steps if s.kind not in ("edge_reads", "edges")]
    assert {"edge_reads", "edges"} <= {s.kind for s in on.steps}
    res_off = atpdsl.run(text=base + "select edges none\n", out_dir=tmp_path / "off")
    res_on = atpdsl.run(text=base, out_dir=tmp_path / "on")
    assert not res_off.result.edges and res_on.result.edges
    # the same estimates and selection (to float32 rounding: without edges nothing reads the pattern, so `attention
    # auto` takes sdpa instead of eager)
    estimates_off = {n.name: n.estimate for n in res_off.result.nodes}
    estimates_on = {n.name: n.estimate for n in res_on.result.nodes}
    assert estimates_off.keys() == estimates_on.keys()
    assert [estimates_off[k] for k in estimates_on] == pytest.approx(list(estimates_on.values()), abs=1e-5)
    assert res_off.selection.selected == res_on.selection.selected
    assert res_off.graph.graph["edge_rule"] == "residual"


def _run_with_edges():
    nodes = [score(n, (v,)) for n, v in (("L0.H0", 0.9), ("L0.H1", 0.5), ("L1.H0", 0.4), ("L1.N3", 0.2))]
    edges = (
        EdgeScore("embed", "L0.H0", 0.6, None, ""), EdgeScore("embed", "L0.H0", 0.5, None, "v"),
        EdgeScore("embed", "L0.H0", 0.1, None, "k"), EdgeScore("embed", "L0.H0", 0.0, None, "q"),
        EdgeScore("L0.H0", "L1.H0", -0.3, None, ""), EdgeScore("L0.H0", "L1.H0", -0.4, None, "k"),
        EdgeScore("L0.H0", "L1.H0", 0.1, None, "v"), EdgeScore("L0.H0", "L1.H0", 0.0, None, "q"),
        EdgeScore("L1.H0", "logits", 0.35, None, ""), EdgeScore("L0.H1", "L1.N3", 0.05, None, ""),
        EdgeScore("L1.N3", "logits", 0.0, None, ""),
    )
    return replace(ranked_result(nodes), edges=edges)


def test_edge_selection_takes_the_finest_edges_and_the_nodes_they_touch():
    run = _run_with_edges()
    order = [(run.edges[i].source, run.edges[i].target, run.edges[i].channel) for i in finest_edges(run.edges)]
    assert order[:3] == [("embed", "L0.H0", "v"), ("L0.H0", "L1.H0", "k"), ("L1.H0", "logits", "")]
    assert ("embed", "L0.H0", "") not in order  # its parts stand in for the sum
    out = select(run, None, edges=Selection("top", 3))
    assert out.of_edges and out.rule == "edges top 3" and out.cut == pytest.approx(0.35)
    assert set(out.edges) == set(order[:3]) and out.selected == ("L0.H0", "L1.H0")  # rank order, no endpoints
    assert select(run, None, edges=Selection("threshold", 0.1)).edges == tuple(sorted(
        [("embed", "L0.H0", "v"), ("L0.H0", "L1.H0", "k"), ("L1.H0", "logits", ""), ("embed", "L0.H0", "k"),
         ("L0.H0", "L1.H0", "v")], key=lambda e: order.index(e)))
    assert len(select(run, None, edges=Selection("cumulative", 0.6)).edges) == 2  # 0.9 of total 1.5
    assert "3 edge(s) touching 2 node(s)" in describe_selection(out)


def test_a_verified_edge_below_the_cut_is_dropped_and_the_graph_keeps_exactly_the_chosen_edges():
    run = _run_with_edges()
    edges = list(run.edges)
    edges[5] = replace(edges[5], verified=-0.01)  # L0.H0 -> L1.H0 through k: path patching says ~0
    out = select(replace(run, edges=tuple(edges)), None, edges=Selection("top", 3))
    assert out.dropped_edges == (("L0.H0", "L1.H0", "k"),)
    assert out.selected == ("L0.H0", "L1.H0")  # both still touched by a kept edge
    G = build_graph(replace(run, edges=tuple(edges)), out)
    assert set(G.edges) == {("embed", "L0.H0"), ("L1.H0", "logits")}
    data = G.edges["embed", "L0.H0"]
    assert data["weight"] == 0.6 and data["weight_v"] == 0.5 and data["weight_k"] == 0.1
    assert data["selected_inputs"] == "v" and G.graph["n_edges_kept"] == 2
    assert G.graph["n_edges_dropped_verified"] == 1 and G.graph["edge_cut"] == "edges top 3"


def test_a_run_selects_and_verifies_edges_and_its_files_keep_them(tmp_path):
    import torch

    import atpdsl
    from atpdsl.engine.context import make_context
    from atpdsl.engine.edges import TargetRow
    from atpdsl.engine.load import load_model
    from atpdsl.engine.path_patching import PathEdge, path_patch
    from atpdsl.names import parse_node
    from atpdsl.outputs.jsonio import load_result

    torch.set_num_threads(1)
    spec = ('model zoo "induction-2l"\npairs from "examples/data/induction-prev.jsonl"\n'
            "metric logit_diff(answer, wrong) at last\nnodes { heads per position }\nmethod atp\nbatch 16\n"
            "select edges top 6 { ig_steps 2 }\nverify edges top 4\n"
            'export "r.json"\nexport "r.csv"\nexport "r.graphml"\nexport "r.gexf"\n')
    root = Path(__file__).resolve().parents[2]
    res = atpdsl.run(text=spec.replace('"examples/', f'"{root}/examples/'), out_dir=tmp_path)
    assert res.selection.of_edges and len(res.selection.edges) == 6
    assert res.result.extras["edge_ig_steps"] == 2
    verified = [e for e in res.result.edges if e.verified is not None]
    assert 4 <= len(verified) <= 8
    chosen = {(s, t, c) for s, t, c in res.selection.edges}
    assert {(u, v) for u, v, _ in chosen} == set(res.graph.edges)
    loaded = load_model(res.plan.model)
    measured = path_patch(make_context(res.plan, loaded), [
        PathEdge(parse_node(e.source), TargetRow(parse_node(e.target), e.channel)) for e in verified]).mean(0)
    assert max(abs(float(m) - e.verified) for m, e in zip(measured, verified)) < 1e-6
    back = load_result(tmp_path / "r.json")
    assert back.selection == res.selection and back.result.edges == res.result.edges
    with open(tmp_path / "r-edges.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["channel"] for r in rows} == {"", "q", "k", "v"}
    assert not res.failed and "weight_k" in (tmp_path / "r.graphml").read_text()
    _validate("--schema", "graphml-1.0/graphml.xsd", tmp_path / "r.graphml")  # the edges' parts keep files valid
    _validate("--relaxng", "gexf-1.3/gexf.rng", tmp_path / "r.gexf")


def _validate(option: str, schema: str, document) -> None:
    """xmllint against the vendored schema (tests/outputs/schemas); without xmllint: skip, or fail under CI=true."""
    import os
    import shutil
    import subprocess

    tool = shutil.which("xmllint")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("xmllint is not installed and CI=true: install libxml2-utils")
        pytest.skip("xmllint is not installed (apt-get install libxml2-utils)")
    schemas = Path(__file__).resolve().parents[1] / "outputs" / "schemas"
    done = subprocess.run([tool, "--noout", "--nonet", option, str(schemas / schema), str(document)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "validates" in done.stderr, done.stderr
