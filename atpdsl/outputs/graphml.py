"""GraphML in and out (Gephi, Cytoscape, yEd): networkx's writer with readable key ids and xs:boolean.

Key ids are the attribute names, so other tools show them as written. Booleans are written as
`true`/`false` (XML Schema's spelling, which strict readers require; networkx writes `True`).
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import networkx as nx
from networkx.readwrite.graphml import GraphMLWriter

from atpdsl.outputs.streams import binary_sink

__all__ = ["write_graphml", "read_graphml"]

_READER_KEYS = ("node_default", "edge_default")  # networkx adds these on read; we never write them


class _Writer(GraphMLWriter):
    """networkx's pure-Python GraphML writer, spelling booleans the XML Schema way."""

    def add_data(self, name: str, element_type: Any, value: Any, scope: str = "all", default: Any = None) -> Any:
        element = super().add_data(name, element_type, value, scope, default)
        if element_type is bool:
            element.text = str(value).lower()  # networkx passes str(value): "True" / "False"
        return element


def write_graphml(G: nx.DiGraph, path: str | Path | IO[bytes]) -> None:
    """Write the circuit graph as GraphML."""
    writer = _Writer(encoding="utf-8", prettyprint=True, named_key_ids=True)
    writer.add_graph_element(G)
    with binary_sink(path) as f:
        writer.dump(f)


def read_graphml(path: str | Path | IO[bytes]) -> nx.DiGraph:
    """Read a circuit graph written by `write_graphml` (node keys are the node names)."""
    G = nx.read_graphml(path)
    for key in _READER_KEYS:
        G.graph.pop(key, None)
    return nx.DiGraph(G)
