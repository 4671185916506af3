"""Every export reads back to the same nodes, edges and attributes; DOT renders; JSON rebuilds the run."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
from synthetic_circuits import finished, make_plan, mixed_result

from atpdsl.errors import DataError
from atpdsl.outputs import ExportError, format_of, write
from atpdsl.outputs.csvio import read_csv
from atpdsl.outputs.dot import to_dot
from atpdsl.outputs.gexf import read_gexf, write_gexf
from atpdsl.outputs.graphml import read_graphml, write_graphml
from atpdsl.outputs.jsonio import load_result, read_result
from atpdsl.outputs.table import Table
from atpdsl.pipeline import finish
from atpdsl.plan import Selection
from atpdsl.circuit.scores import SIGN_CONVENTION


@pytest.fixture(params=["residual", "attribution"])
def res(request, tmp_path):
    """A finished hand-built run (exports not written), with and without edge attributions."""
    return finished(make_plan(tmp_path), mixed_result(edges=request.param == "attribution"))


def same_value(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return type(a) is type(b) and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return type(a) is type(b) and a == b


def assert_same_graph(G: nx.DiGraph, H: nx.DiGraph) -> None:
    """Same nodes, edges and attributes (with their types); floats within rounding."""
    assert set(H) == set(G)
    assert set(H.edges) == set(G.edges)
    for items_g, items_h in (
        ([(k, G.graph[k]) for k in G.graph], [(k, H.graph.get(k)) for k in G.graph]),
        *[(sorted(G.nodes[n].items()), sorted(H.nodes[n].items())) for n in G],
        *[(sorted(G.edges[e].items()), sorted(H.edges[e].items())) for e in G.edges],
    ):
        assert [k for k, _ in items_g] == [k for k, _ in items_h]
        bad = [(k, a, b) for (k, a), (_, b) in zip(items_g, items_h) if not same_value(a, b)]
        assert not bad
    assert set(H.graph) == set(G.graph)


def test_graphml_round_trip(res, tmp_path):
    path = tmp_path / "c.graphml"
    write_graphml(res.graph, path)
    assert_same_graph(res.graph, read_graphml(path))
    text = path.read_text()
    assert '<data key="node_verified">true</data>' in text and '<data key="node_verified">false</data>' in text
    assert ">True<" not in text and ">False<" not in text  # xs:boolean spelling for strict readers
    buffer = io.BytesIO()  # file handles work too
    write_graphml(res.graph, buffer)
    buffer.seek(0)
    assert_same_graph(res.graph, read_graphml(buffer))


def test_gexf_round_trip_and_gephi_layout_hints(res, tmp_path):
    path = tmp_path / "c.gexf"
    write_gexf(res.graph, path)
    assert_same_graph(res.graph, read_gexf(path))
    ns = {"g": "http://gexf.net/1.3", "viz": "http://gexf.net/1.3/viz"}
    root = ET.parse(path).getroot()
    assert json.loads(root.find("g:meta/g:description", ns).text)["spec_hash"] == "sha256:0123abcd"
    positions = root.findall(".//viz:position", ns)
    assert len(positions) == res.graph.number_of_nodes()
    plain = nx.read_gexf(path)  # other tools (networkx, Gephi) read it without our reader
    assert set(plain) == set(res.graph)


def test_dot_is_layered_coloured_by_sign_and_sized_by_score(res):
    text = to_dot(res.graph)
    assert 'rankdir="BT"' in text and 'size="7.5,10"' in text
    assert text.count("rank=same") == len({d["stage"] for _, d in res.graph.nodes(data=True)})
    lines = {line.split(" [", 1)[0].strip(): line for line in text.splitlines() if line.startswith('  "')}
    blue, red = lines['"L1.H2"'], lines['"L1.H1"']  # estimates +0.6 and -0.4 (L1.H1 verified -0.4)
    assert 'fillcolor="#2166ac"' in blue  # the largest |effect| gets the full colour
    fill = red.split('fillcolor="#')[1][:6]
    r, g, b = (int(fill[i:i + 2], 16) for i in (0, 2, 4))
    assert r > g and r > b
    assert "exact -0.4" in red and "(est -0.4)" in red and 'penwidth="2.5"' in red
    width = {n: float(line.split('width="')[1].split('"')[0]) for n, line in lines.items() if 'width="' in line}
    assert width['"L1.H2"'] > width['"L0.H2"']  # score 0.6 > 0.3


def test_dot_renders_with_graphviz(res, tmp_path):
    dot = shutil.which("dot")
    if dot is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Graphviz `dot` is not installed, and CI=true: install graphviz")
        pytest.skip("Graphviz `dot` is not installed (install graphviz; CI fails here)")
    path = tmp_path / "c.dot"
    write(res, path)
    done = subprocess.run([dot, "-Tsvg", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "Error" not in done.stderr, done.stderr
    svg = ET.fromstring(done.stdout)
    titles = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")}
    assert set(res.graph) <= titles


def test_json_rebuilds_the_run_and_the_graph(res, tmp_path):
    path = tmp_path / "c.json"
    write(res, path)
    run, G = read_result(path)
    assert run == res.result
    assert_same_graph(res.graph, G)
    loaded = load_result(path)
    assert loaded.plan == res.plan
    assert loaded.selection == res.selection
    assert loaded.scores == res.scores
    assert loaded.timings == res.timings


def test_json_document_fields(res, tmp_path):
    path = tmp_path / "c.json"
    write(res, path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "atpdsl-result" and doc["schema_version"] == 1
    assert doc["sign_convention"] == SIGN_CONVENTION
    assert (doc["spec_hash"], doc["model_id"], doc["model_revision"]) == ("sha256:0123abcd", "zoo/induction-2l", "v1")
    assert doc["selection"]["aggregate"] == "mean_abs" and "selection_value" in doc["selection"]["value_definition"]
    assert doc["timings"]["engine"] == {"load": 0.5, "forward": 0.25, "backward": 0.125, "verify": 0.0625}
    assert set(doc["timings"]["pipeline"]) == {"select", "graph"}
    assert doc["diagnostic"].startswith("with 90% confidence")
    rows = {r["node"]: r for r in doc["scores"]["rows"]}
    assert rows["L1.H1"]["per_pair"] == pytest.approx([-0.4, -0.32, -0.48])
    assert rows["L1.H1"]["verified_per_pair"] == [-0.35, -0.4, -0.45]
    assert rows["L1.G0.k"]["attrs"] == {"heads": "0,1"}
    assert doc["selection"]["dropped"] == [{"node": "L1.H3", "verified": pytest.approx(0.02 / 3), "cut": 0.3}]
    assert doc["graph"]["directed"] is True and "edges" in doc["graph"]  # node-link with edges="edges"


def test_json_reader_names_bad_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="cannot read result file .*nope.json"):
        read_result(missing)
    other = tmp_path / "other.json"
    other.write_text('{"nodes": []}')
    with pytest.raises(DataError, match="other.json: not an atpdsl result"):
        read_result(other)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(DataError, match="broken.json: not a JSON file"):
        read_result(broken)
    newer = tmp_path / "newer.json"
    newer.write_text('{"format": "atpdsl-result", "schema_version": 99}')
    with pytest.raises(DataError, match="newer than this atpdsl reads"):
        read_result(newer)


def test_csv_round_trip_and_columns(res, tmp_path):
    path = tmp_path / "c.csv"
    written = write(res, path)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:13] == ["node", "layer", "kind", "index", "position", "estimate", "score", "method", "rank",
                           "verified_effect", "in_circuit", "selection_value", "decision"]
    assert header[-1] == "sign_convention"
    assert read_csv(path) == res.scores
    if res.result.edges:
        assert written == [path, tmp_path / "c-edges.csv"]
        assert read_csv(tmp_path / "c-edges.csv") == res.edges
        flags = {(r["source"], r["target"]): r["in_circuit"] for r in res.edges}
        assert flags[("L0.H3", "L1.H1")] is True and flags[("L0.N0", "logits")] is False
        assert all(r["weight"] is None or abs(r["weight"]) > 0 for r in res.edges if r["in_circuit"])
    else:
        assert written == [path]


def test_per_pair_csv_when_the_spec_keeps_pairs(tmp_path):
    res = finished(make_plan(tmp_path, aggregate="per_pair"), mixed_result())
    written = write(res, tmp_path / "p.csv")
    pairs = read_csv(tmp_path / "p-pairs.csv")
    assert written[-1] == tmp_path / "p-pairs.csv"
    assert len(pairs) == 3 * len(res.result.nodes)
    first = [r for r in pairs if r["node"] == "L1.H1"]
    assert [r["pair"] for r in first] == [0, 1, 2]
    assert [r["verified_effect"] for r in first] == [-0.35, -0.4, -0.45]


def test_table_api():
    t = Table(("node", "score"), [{"node": "a", "score": 1.0}, {"node": "b", "score": None}])
    assert len(t) == 2 and t.column("score") == [1.0, None] and t.row("b")["score"] is None
    assert t.to_csv() == "node,score\na,1.0\nb,\n"
    with pytest.raises(KeyError, match="no column 'x'"):
        t.column("x")


def test_unknown_extension_is_an_atp_error(res, tmp_path):
    with pytest.raises(ExportError, match=r"unknown extension '\.xlsx'"):
        write(res, tmp_path / "c.xlsx")
    assert format_of("x.GV") == "dot" and format_of("x.cyjs") == "cyjs"


def test_exports_create_parent_folders(res, tmp_path):
    target = tmp_path / "deep" / "er" / "c.graphml"
    write(res, target)
    assert target.is_file()


def test_selection_with_nothing_selected_still_exports(tmp_path):
    res = finished(make_plan(tmp_path, selection=Selection("threshold", 99.0)), mixed_result())
    assert set(res.graph) == {"embed", "logits"}
    for ext in ("graphml", "gexf", "dot", "json", "cyjs"):
        write(res, tmp_path / f"empty.{ext}")
    assert_same_graph(res.graph, read_graphml(tmp_path / "empty.graphml"))


def test_an_unbounded_diagnostic_is_written_as_standard_json(tmp_path):
    """A diagnostic that could not bound anything is `null` in the JSON (JSON has no Infinity) and reads back."""
    from dataclasses import replace

    run = mixed_result()
    run = replace(run, false_negatives=replace(run.false_negatives, bound=math.inf))
    res = finished(make_plan(tmp_path), run)
    path = tmp_path / "c.json"
    write(res, path)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads(path.read_text(), parse_constant=no_constants)
    assert doc["false_negatives"]["bound"] is None
    assert "could not bound" in doc["false_negatives"]["sentence"]
    assert "inf" not in doc["false_negatives"]["sentence"]
    back, _ = read_result(path)
    assert math.isinf(back.false_negatives.bound) and not back.false_negatives.bounded


def test_a_twenty_node_circuit_renders_on_one_page_with_edges_cut(tmp_path):
    """Graphviz lays the 20-node study out by layer within 7.5 x 10 inches (96 dpi PNG: 720 x 960 pixels)."""
    import struct

    from synthetic_circuits import twenty_node_result

    dot = shutil.which("dot")
    if dot is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Graphviz `dot` is not installed, and CI=true: install graphviz")
        pytest.skip("Graphviz `dot` is not installed (install graphviz; CI fails here)")
    res = finished(make_plan(tmp_path, selection=Selection("top", 20)), twenty_node_result())
    g = res.graph.graph
    assert g["n_edges_kept"] < g["n_edges_computed"] and g["n_edges_zero"] > 0
    kept = sorted((abs(d["weight"]) for *_, d in res.graph.edges(data=True)), reverse=True)
    every = sorted((abs(e.weight) for e in res.result.edges if e.source in res.graph and e.target in res.graph),
                   reverse=True)
    assert sum(kept) >= 0.9 * sum(every) > sum(kept[:-1])  # the smallest set carrying 90% of |weight|
    assert all(w > 0 for w in kept)
    write(res, tmp_path / "c.dot")
    done = subprocess.run([dot, "-Tpng", str(tmp_path / "c.dot"), "-o", str(tmp_path / "c.png")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
    width, height = struct.unpack(">II", (tmp_path / "c.png").read_bytes()[16:24])
    assert width <= 7.5 * 96 + 2 and height <= 10 * 96 + 2
