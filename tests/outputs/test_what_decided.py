"""Outputs show what decided: the selection value everywhere, verified nodes drawn by their exact effect,
per-pair estimates and ranking scores exported with `keep per_pair`."""
from __future__ import annotations

import json
import re

import pytest
from synthetic_circuits import finished, make_plan, ranked_result, score, verified

from atpdsl.outputs import write
from atpdsl.outputs.csvio import read_csv
from atpdsl.outputs.graphml import read_graphml
from atpdsl.plan import Selection


@pytest.fixture
def res(tmp_path):
    """The node the figures once drew by its estimate's sign: L0.N134 estimated +0.167 but measured -0.278; L4.H2 estimated big, measured tiny."""
    scores = verified(
        [score("L0.N134", (0.2, 0.134)), score("L4.H2", (0.5, 0.4)), score("L1.H0", (-0.3, -0.1)),
         score("L2.N7", (0.05, 0.01))],
        {"L0.N134": (-0.3, -0.256), "L4.H2": (0.01, 0.004)},
    )
    return finished(make_plan(tmp_path, selection=Selection("top", 3), aggregate="per_pair"), ranked_result(scores))


def rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def test_a_verified_node_is_drawn_with_its_exact_effect_everywhere(res, tmp_path):
    assert "L0.N134" in res.selection.selected and res.graph.nodes["L0.N134"]["estimate"] > 0
    write(res, tmp_path / "c.dot")
    line = next(x for x in (tmp_path / "c.dot").read_text().splitlines() if x.startswith('  "L0.N134" ['))
    r, g, b = rgb(line.split('fillcolor="')[1][:7])
    assert r > b and "exact -0.278" in line and "(est +0.167)" in line
    write(res, tmp_path / "c.gexf")
    node = (tmp_path / "c.gexf").read_text().split('<node id="L0.N134"')[1].split("</node>")[0]
    colour = dict(re.findall(r'(\w)="(\d+)"', node.split("<viz:color")[1].split("/>")[0]))
    assert int(colour["r"]) > int(colour["b"])
    write(res, tmp_path / "c.cyjs")
    nodes = json.loads((tmp_path / "c.cyjs").read_text())["elements"]["nodes"]
    r, g, b = rgb(next(n for n in nodes if n["data"]["id"] == "L0.N134")["data"]["colour"])
    assert r > b
    from atpdsl.outputs.plots import circuit_figure

    ax = circuit_figure(res.graph).axes[0]
    text = next(t for t in ax.texts if t.get_text().startswith("L0.N134"))
    face = text.get_bbox_patch().get_facecolor()
    assert face[0] > face[2] and "exact -0.278 (est +0.167)" in text.get_text()


def test_the_selection_value_and_its_definition_are_in_every_output(res, tmp_path):
    # top 3 by mean |estimate|: L4.H2 .45, L1.H0 .2, L0.N134 .167 (cut); L4.H2 measured .007 < cut: dropped
    assert res.selection.cut == pytest.approx(0.167) and [d.node for d in res.selection.dropped] == ["L4.H2"]
    expected = {"L4.H2": 0.007, "L1.H0": 0.2, "L0.N134": 0.278, "L2.N7": 0.03}
    table = {r["node"]: r for r in res.scores.rows}
    assert {n: table[n]["selection_value"] for n in expected} == pytest.approx(expected)
    assert {n: table[n]["decision"] for n in expected} == {"L4.H2": "dropped_verified", "L1.H0": "kept",
                                                          "L0.N134": "kept", "L2.N7": "not_selected"}
    write(res, tmp_path / "c.csv")
    rows = {r["node"]: r for r in read_csv(tmp_path / "c.csv")}
    assert rows["L4.H2"]["selection_value"] == pytest.approx(0.007) and rows["L4.H2"]["decision"] == "dropped_verified"
    write(res, tmp_path / "c.json")
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["selection"]["aggregate"] == "per_pair"
    assert doc["selection"]["value_definition"].startswith("selection_value = mean over pairs of |exact effect|")
    assert {r["node"]: r["selection_value"] for r in doc["scores"]["rows"]} == pytest.approx(expected)
    write(res, tmp_path / "c.graphml")
    G = read_graphml(tmp_path / "c.graphml")
    assert G.nodes["L0.N134"]["selection_value"] == pytest.approx(0.278)
    assert G.graph["selection_value_definition"] == doc["selection"]["value_definition"]
    assert G.graph["selection_cut"] == pytest.approx(0.167)
    write(res, tmp_path / "c.html")
    page = (tmp_path / "c.html").read_text()
    assert "selection value" in page and "dropped verified" in page and "0.007" in page


def test_keep_per_pair_exports_per_pair_estimates_and_ranking_scores(tmp_path):
    graddrop = score("L1.H0", (-0.3, -0.1))
    from dataclasses import replace

    graddrop = replace(graddrop, per_pair_score=(0.42, 0.17), score=0.295)  # GradDrop's own per-pair scores
    run = ranked_result([graddrop, score("L0.H1", (0.2, -0.4))])
    res = finished(make_plan(tmp_path, aggregate="per_pair"), run)
    written = write(res, tmp_path / "p.csv")
    assert written[-1] == tmp_path / "p-pairs.csv"
    pairs = [r for r in read_csv(tmp_path / "p-pairs.csv") if r["node"] == "L1.H0"]
    assert [(r["pair"], r["estimate"], r["score"]) for r in pairs] == [(0, -0.3, 0.42), (1, -0.1, 0.17)]
    write(res, tmp_path / "p.json")
    rows = {r["node"]: r for r in json.loads((tmp_path / "p.json").read_text())["scores"]["rows"]}
    assert rows["L1.H0"]["per_pair_score"] == [0.42, 0.17] and rows["L1.H0"]["per_pair"] == [-0.3, -0.1]
    from atpdsl.outputs.jsonio import read_result

    back, _ = read_result(tmp_path / "p.json")
    assert back.by_name()["L1.H0"].per_pair_score == (0.42, 0.17)
