"""GEXF in and out (Gephi): networkx's writer plus a layered layout, colours and the graph attributes.

GEXF has no graph-level attributes, so they travel as JSON in `<meta><description>`, which Gephi
shows as the graph's description and `read_gexf` turns back into `G.graph`.
"""
from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import IO

import networkx as nx
from networkx.readwrite.gexf import GEXFWriter

from atpdsl.outputs.streams import binary_sink, read_bytes
from atpdsl.outputs.style import layered_positions, node_rgb, top_abs

__all__ = ["write_gexf", "read_gexf"]

_NS = "http://www.gexf.net/1.2draft"
_READER_KEYS = ("mode", "node_default", "edge_default")


def _with_viz(G: nx.DiGraph) -> nx.DiGraph:
    """A copy carrying Gephi's `viz` data (position by layer, colour by sign, size by score)."""
    H = G.copy()
    positions = layered_positions(G)
    top, top_score = top_abs(G), top_abs(G, "score")
    for node, data in H.nodes(data=True):
        r, g, b = node_rgb(data.get("estimate"), top)
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
    """Write the circuit graph as GEXF 1.2 with layout hints and the graph attributes in the meta block."""
    writer = GEXFWriter(encoding="utf-8", prettyprint=True, version="1.2draft")
    writer.add_graph(_with_viz(G))
    meta = writer.xml.find("meta")
    if meta is None:  # pragma: no cover - networkx always writes one
        meta = ET.SubElement(writer.xml, "meta")
    ET.SubElement(meta, "description").text = json.dumps(G.graph, sort_keys=True)
    with binary_sink(path) as f:
        writer.write(f)


def read_gexf(path: str | Path | IO[bytes]) -> nx.DiGraph:
    """Read a circuit graph written by `write_gexf`; layout and colour data are dropped."""
    raw = read_bytes(path)
    G = nx.read_gexf(io.BytesIO(raw), version="1.2draft")
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
