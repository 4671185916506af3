"""GraphML in and out (Gephi, Cytoscape, yEd): valid against the GraphML 1.0 schema.

Three things networkx's writer gets wrong for strict readers are fixed here:
- key ids are unique across domains (`graph_method`, `node_method`; networkx names a key by its
  attribute alone, so a graph and a node attribute of one name would share an id); every key keeps
  the plain attribute name in `attr.name`, which is what tools show;
- node ids are XML name tokens: `@` (not allowed) is written as `:` (`L1.H2.q@3` -> `L1.H2.q:3`),
  the exact name stays in the `name` attribute and `read_graphml` restores it;
- booleans are `true`/`false` (XML Schema's spelling; networkx writes `True`).
tests/outputs/test_schemas.py validates the output against the official XSD with xmllint.
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import networkx as nx
from networkx.readwrite.graphml import GraphMLWriter

from atpdsl.outputs.streams import binary_sink

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.outputs.result import Result

__all__ = ["write_graphml", "export_graphml", "read_graphml", "xml_id"]

_READER_KEYS = ("node_default", "edge_default")  # networkx adds these on read; we never write them


def xml_id(name: str) -> str:
    """A node name as an XML name token (`@` is not allowed there; node names never hold `:`)."""
    return name.replace("@", ":")


class _Writer(GraphMLWriter):
    """networkx's pure-Python GraphML writer with domain-unique key ids and XML Schema booleans."""

    def get_key(self, name: str, attr_type: str, scope: str, default: Any) -> str:
        keys_key = (name, attr_type, scope)
        if keys_key in self.keys:
            return self.keys[keys_key]
        new_id = f"{scope}_{name}"
        if new_id in self.keys.values():  # one name with two types in one domain
            new_id = f"{new_id}_{attr_type}"
        self.keys[keys_key] = new_id
        key = self.myElement("key", **{"id": new_id, "for": scope, "attr.name": name, "attr.type": attr_type})
        if default is not None:
            element = self.myElement("default")
            element.text = str(default)
            key.append(element)
        self.xml.insert(0, key)
        return new_id

    def add_data(self, name: str, element_type: Any, value: Any, scope: str = "all", default: Any = None) -> Any:
        element = super().add_data(name, element_type, value, scope, default)
        if element_type is bool:
            element.text = str(value).lower()  # networkx passes str(value): "True" / "False"
        return element


def write_graphml(G: nx.DiGraph, path: str | Path | IO[bytes]) -> None:
    """Write the circuit graph as GraphML (atomically when given a path)."""
    H = nx.relabel_nodes(G, {n: xml_id(str(n)) for n in G}, copy=True)
    writer = _Writer(encoding="utf-8", prettyprint=True)
    writer.add_graph_element(H)
    with binary_sink(path) as f:
        writer.dump(f)


def export_graphml(res: "Result", path: str | Path) -> list[Path]:
    """The format registry's writer (see atpdsl.outputs.formats)."""
    write_graphml(res.graph, path)
    return [Path(path)]


def read_graphml(path: str | Path | IO[bytes]) -> nx.DiGraph:
    """Read a circuit graph written by `write_graphml` (node keys are the node names again)."""
    G = nx.read_graphml(path)
    for key in _READER_KEYS:
        G.graph.pop(key, None)
    names = {n: str(d.get("name", n)) for n, d in G.nodes(data=True)}
    return nx.DiGraph(nx.relabel_nodes(G, names, copy=True))
