"""GEXF 1.3 in and out (Gephi): networkx's writer plus a layered layout, colours and the graph attributes.

GEXF has no graph-level attributes, so they travel as JSON in `<meta><description>`, which Gephi
shows as the graph's description and `read_gexf` turns back into `G.graph`. The `<graph>` element
carries no `name` (the GEXF schema has no such attribute), and the root no `xsi:schemaLocation` (the
normative RelaxNG schema allows no foreign attribute there). Node colour is the verified effect's sign
and size where the node was verified, else the estimate's (atpdsl.outputs.style.effect_of).
tests/outputs/test_schemas.py validates the output against the official GEXF 1.3 XSD with xmllint.
"""
from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import IO, TYPE_CHECKING

import networkx as nx
from networkx.readwrite.gexf import GEXFWriter

from atpdsl.outputs.streams import binary_sink, read_bytes
from atpdsl.outputs.style import effect_of, layered_positions, node_rgb, top_abs, top_effect

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.outputs.result import Result

__all__ = ["write_gexf", "export_gexf", "read_gexf", "VERSION"]

VERSION = "1.3"
_NS = "http://gexf.net/1.3"
_READER_KEYS = ("mode", "node_default", "edge_default")


def _with_viz(G: nx.DiGraph) -> nx.DiGraph:
    """A copy carrying Gephi's `viz` data (position by layer, colour by sign, size by score)."""
    H = G.copy()
    positions = layered_positions(G)
    top, top_score = top_effect(G), top_abs(G, "score")
    for node, data in H.nodes(data=True):
        r, g, b = node_rgb(effect_of(data), top)
        x, y = positions[node]
        size = 10.0 + 30.0 * abs(data.get("score", 0.0)) / top_score
        data["viz"] = {
            "color": {"r": r, "g": g, "b": b, "a": 1.0},
            "size": size,
            "position": {"x": 100.0 * x, "y": 100.0 * y, "z": 0.0},
        }
        data["label"] = data.get("name", str(node))
    return H


def write_gexf(G: nx.DiGraph, path: str | Path | IO[bytes]) -> None:
    """Write the circuit graph as GEXF 1.3 with layout hints and the graph attributes in the meta block."""
    writer = GEXFWriter(encoding="utf-8", prettyprint=True, version=VERSION)
    writer.add_graph(_with_viz(G))
    for key in ("xmlns:xsi", "xsi:schemaLocation"):  # networkx misspells the xsi namespace; the RelaxNG
        writer.xml.attrib.pop(key, None)  # schema (normative for 1.3) allows no foreign attribute here
    graph = writer.xml.find("graph")
    if graph is not None:
        graph.attrib.pop("name", None)  # not in the GEXF schema
    meta = writer.xml.find("meta")
    if meta is None:  # pragma: no cover - networkx always writes one
        meta = ET.SubElement(writer.xml, "meta")
    ET.SubElement(meta, "description").text = json.dumps(G.graph, sort_keys=True)
    with binary_sink(path) as f:
        writer.write(f)


def export_gexf(res: "Result", path: str | Path) -> list[Path]:
    """The format registry's writer (see atpdsl.outputs.formats)."""
    write_gexf(res.graph, path)
    return [Path(path)]


def read_gexf(path: str | Path | IO[bytes]) -> nx.DiGraph:
    """Read a circuit graph written by `write_gexf`; layout and colour data are dropped."""
    raw = read_bytes(path)
    G = nx.read_gexf(io.BytesIO(raw), version=VERSION)
    for key in _READER_KEYS:
        G.graph.pop(key, None)
    for _, data in G.nodes(data=True):
        data.pop("viz", None)
        if data.get("label") == data.get("name"):
            data.pop("label", None)
    for _, _, data in G.edges(data=True):
        data.pop("id", None)
    description = ET.fromstring(raw).find(f"{{{_NS}}}meta/{{{_NS}}}description")
    if description is not None and description.text:
        G.graph.update(json.loads(description.text))
    return nx.DiGraph(G)
