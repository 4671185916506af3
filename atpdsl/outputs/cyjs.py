"""Cytoscape.js JSON (`.cyjs`) in and out: what Cytoscape desktop imports and cytoscape.js loads.

Shape: `{"format_version", "generated_by", "target_cytoscapejs_version", "data": {graph attributes},
"elements": {"nodes": [{"data": {"id", "name", ...}, "position": {"x", "y"}}], "edges": [{"data":
{"id", "source", "target", ...}}]}}`. Every node and edge attribute is in its `data`; nodes also get
`colour` (hex, the sign and size of the verified effect or else the estimate, as every drawing) and
a layered `position`. Standard JSON: a NaN or infinite number is written as null.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import networkx as nx

from atpdsl.errors import DataError
from atpdsl.outputs.streams import read_text, write_text
from atpdsl.outputs.style import effect_of, hex_colour, layered_positions, node_rgb, top_effect

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.outputs.result import Result

__all__ = ["to_cyjs", "write_cyjs", "export_cyjs", "read_cyjs"]

_DERIVED = ("colour",)  # written for styling, dropped on read


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_cyjs(G: nx.DiGraph) -> dict[str, Any]:
    """The circuit as a Cytoscape.js document (see the module docstring)."""
    positions = layered_positions(G)
    top = top_effect(G)
    nodes = []
    for node, data in G.nodes(data=True):
        x, y = positions[node]
        fields = {k: _clean(v) for k, v in data.items()}
        fields.update(id=str(node), name=str(data.get("name", node)), colour=hex_colour(node_rgb(effect_of(data), top)))
        nodes.append({"data": fields, "position": {"x": 120.0 * x, "y": -100.0 * y}})
    edges = []
    for i, (a, b, data) in enumerate(G.edges(data=True)):
        fields = {k: _clean(v) for k, v in data.items()}
        fields.update(id=f"e{i}", source=str(a), target=str(b))
        edges.append({"data": fields})
    return {
        "format_version": "1.0",
        "generated_by": "atpdsl",
        "target_cytoscapejs_version": "~2.1",
        "data": {k: _clean(v) for k, v in G.graph.items()},
        "elements": {"nodes": nodes, "edges": edges},
    }


def write_cyjs(G: nx.DiGraph, path: str | Path | IO[str]) -> None:
    """Write the circuit graph as Cytoscape.js JSON (atomically when given a path)."""
    write_text(path, json.dumps(to_cyjs(G), indent=1, allow_nan=False))


def export_cyjs(res: "Result", path: str | Path) -> list[Path]:
    """The format registry's writer (see atpdsl.outputs.formats)."""
    write_cyjs(res.graph, path)
    return [Path(path)]


def read_cyjs(path: str | Path | IO[str]) -> nx.DiGraph:
    """Read a graph written by `write_cyjs` (positions and colours dropped)."""
    name = getattr(path, "name", str(path))
    try:
        doc = json.loads(read_text(path))
        G = nx.DiGraph()
        G.graph.update(doc.get("data") or {})
        for node in doc["elements"]["nodes"]:
            data = dict(node["data"])
            key = data.pop("id")
            G.add_node(key, **{k: v for k, v in data.items() if k not in _DERIVED})
        for edge in doc["elements"]["edges"]:
            data = dict(edge["data"])
            a, b = data.pop("source"), data.pop("target")
            data.pop("id", None)
            G.add_edge(a, b, **data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{name}: not a Cytoscape.js file written by atpdsl ({type(error).__name__}: {error})") from None
    return G
