"""Plots (one path -> circuit, -heads, -neurons), the self-contained HTML report, and export isolation."""
from __future__ import annotations

import base64
import html
import re
import xml.etree.ElementTree as ET

import pytest
from synthetic_circuits import finished, make_plan, mixed_result, ranked_result, score

import atpdsl.outputs.plots
from atpdsl.outputs import write, write_all
from atpdsl.outputs.jsonio import read_result
from atpdsl.pipeline import finish
from atpdsl.plan import ExportTarget, Selection
from atpdsl.circuit.scores import SIGN_CONVENTION

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fig")
    return finished(make_plan(tmp), mixed_result(edges=True))


def test_png_export_writes_the_circuit_then_heads_and_neurons(res, tmp_path):
    written = write(res, tmp_path / "x.png")
    assert written == [tmp_path / "x.png", tmp_path / "x-heads.png", tmp_path / "x-neurons.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000


def test_svg_export_is_valid_xml_with_text_labels(res, tmp_path):
    written = write(res, tmp_path / "x.svg")
    assert [p.name for p in written] == ["x.svg", "x-heads.svg", "x-neurons.svg"]
    root = ET.parse(written[0]).getroot()
    assert root.tag.endswith("svg")
    text = written[0].read_text()
    assert "L1.H2.q@3" in text and "logits" in text  # labels stay text (searchable)


def test_only_the_figures_the_run_can_fill_are_written(tmp_path):
    neurons_only = ranked_result([score("L0.N1", (0.3,)), score("L1.N4", (-0.2,))])
    res = finished(make_plan(tmp_path, selection=Selection("top", 1)), neurons_only)
    assert [p.name for p in write(res, tmp_path / "n.png")] == ["n.png", "n-neurons.png"]
    heads_only = ranked_result([score("L0.H1", (0.3,))])
    res = finished(make_plan(tmp_path), heads_only)
    assert [p.name for p in write(res, tmp_path / "h.png")] == ["h.png", "h-heads.png"]


def test_html_report_is_self_contained_with_images_and_tables(res, tmp_path):
    path = tmp_path / "r.html"
    write(res, path)
    text = path.read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', text)
    assert len(images) == 3
    assert all(base64.b64decode(i).startswith(PNG) for i in images)
    assert not re.search(r"(src|href)=\"(https?:|//|[^d#])", text)  # nothing to fetch
    assert "<script" not in text
    assert html.escape(res.plan.spec_text, quote=True) in text  # the spec, escaped
    assert html.escape(res.result.false_negatives.sentence) in text
    assert html.escape(SIGN_CONVENTION) in text
    for node in res.selection.selected:
        assert f"<td class=\"l\">{html.escape(node)}</td>" in text or f">{node}<" in text
    table = text.split("Top nodes: verified effect vs estimate", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr") == len(res.result.nodes) + 1  # 23 nodes < TOP_ROWS: all listed
    assert "Dropped after verification" in text and "L1.H3" in text
    assert "Strongest edges in the circuit" in text


def test_a_failing_plot_does_not_lose_the_other_exports(tmp_path, monkeypatch):
    def broken(G):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(atpdsl.outputs.plots, "circuit_figure", broken)
    plan = make_plan(tmp_path, formats=("png", "csv", "graphml", "html"))
    res = finish(plan, mixed_result())
    outcome = {o.format: o for o in res.exports}
    assert outcome["png"].error is not None and "no fonts today" in outcome["png"].error
    assert (tmp_path / "out" / "circuit-heads.png").is_file()  # the other figures still drawn
    for fmt in ("csv", "graphml", "html"):
        assert outcome[fmt].error is None and (tmp_path / "out" / f"circuit.{fmt}").is_file()
    assert "figure could not be drawn: RuntimeError: no fonts today" in (tmp_path / "out" / "circuit.html").read_text()
    # no .json was asked for: one is written anyway, first, so the failed export can be redone
    assert res.exports[0].format == "json" and res.exports[0].requested is False
    saved = tmp_path / "out" / "circuit.result.json"
    run, G = read_result(saved)
    assert run == res.result and set(G) == set(res.graph)
    assert [o.format for o in res.failed] == ["png"]


def test_export_errors_are_messages_not_tracebacks(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    plan = make_plan(tmp_path)
    res = finished(plan, mixed_result())
    outcomes = write_all(res, [ExportTarget(str(blocker / "c.csv"), "csv"), ExportTarget(str(tmp_path / "ok.json"), "json")])
    by_format = {o.format: o for o in outcomes}
    assert by_format["csv"].error.startswith(f"cannot write {str(blocker / 'c.csv')!r}")
    assert "Traceback" not in by_format["csv"].error
    assert by_format["json"].error is None and (tmp_path / "ok.json").is_file()


def test_report_edge_table_lists_each_edge_once_with_its_verified_value(tmp_path):
    from atpdsl.circuit.scores import EdgeScore

    edges = (EdgeScore("embed", "L0.H3", 0.2), EdgeScore("L0.H3", "L1.H1", -0.15, -0.12),
             EdgeScore("L1.H1", "logits", -0.35), EdgeScore("L1.H2", "logits", 0.35))
    from dataclasses import replace

    res = finished(make_plan(tmp_path), replace(mixed_result(), edges=edges))
    text = write(res, tmp_path / "r.html")[0].read_text()
    table = text.split("Strongest edges in the circuit", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<tr class=""><td class="l">([^<]+)</td><td class="l">([^<]+)</td>', table)
    assert len(rows) == len(set(rows)) == res.graph.number_of_edges()
    assert "-0.12" in table and "of 4 attributed edge(s) kept" in text
