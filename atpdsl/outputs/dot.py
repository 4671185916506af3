"""Graphviz DOT in and out: a layered drawing (one rank per row) that also carries every attribute.

Drawing: bottom to top (`rankdir=BT`), one `rank=same` row per stage (see atpdsl.circuit.graph.stage),
fill colour by the sign of the estimate (blue raises the metric, red lowers it; deeper = larger),
node width by score, edge width and colour by the sign and size of its weight when it has one.
Data: every graph, node and edge attribute is written as `atp_<name>="<value>"` (Graphviz keeps
unknown attributes and ignores them; the prefix avoids its own `layer`, `rank`, `weight`), and
`atp__types` on the graph records each attribute's type so `read_dot` restores ints, floats and
booleans exactly. No pydot/pygraphviz needed: the writer is plain text and `read_dot` parses the
DOT subset the writer produces (plus comments, `subgraph` blocks and attribute defaults).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import IO, Any, Iterator

import networkx as nx

from atpdsl.errors import DataError
from atpdsl.outputs.streams import read_text, write_text
from atpdsl.outputs.style import ENDPOINT, hex_colour, node_rgb, row_order, top_abs

__all__ = ["to_dot", "write_dot", "read_dot", "parse_dot"]

_PREFIX = "atp_"
_TYPES_KEY = "atp__types"
_SHAPES = {
    "heads": "box",
    "attn": "box",
    "queries": "hexagon",
    "keys": "hexagon",
    "values": "hexagon",
    "neurons": "ellipse",
    "mlp": "ellipse",
    "resid": "octagon",
    "embed": "invhouse",
    "logits": "house",
}
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str"}


def _quote(value: Any) -> str:
    """A DOT double-quoted string; backslash, quote and line breaks escaped so each statement is one line."""
    text = value if isinstance(value, str) else _text(value)
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{text}"'


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _attrs(pairs: dict[str, Any]) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in pairs.items()) + "]"


def _data(data: dict[str, Any]) -> dict[str, Any]:
    return {f"{_PREFIX}{k}": v for k, v in data.items()}


def _record_types(types: dict[str, str], data: dict[str, Any]) -> None:
    for key, value in data.items():
        types.setdefault(key, _TYPE_NAMES.get(type(value), "str"))


def _label(node: str, data: dict[str, Any]) -> str:
    if "estimate" not in data:
        return str(data.get("name", node))
    text = f"{data.get('name', node)}\n{data['estimate']:+.3g}"
    if "verified_effect" in data:
        text += f" (exact {data['verified_effect']:+.3g})"
    return text


def to_dot(G: nx.DiGraph) -> str:
    """The circuit as DOT text (see the module docstring for what is drawn and what is carried)."""
    types: dict[str, dict[str, str]] = {"graph": {}, "node": {}, "edge": {}}
    _record_types(types["graph"], G.graph)
    for _, data in G.nodes(data=True):
        _record_types(types["node"], data)
    for _, _, data in G.edges(data=True):
        _record_types(types["edge"], data)
    top_est, top_score = top_abs(G), top_abs(G, "score")
    top_weight = max((abs(d["weight"]) for *_, d in G.edges(data=True) if "weight" in d), default=0.0) or 1.0
    title = f"atpdsl circuit - {G.graph.get('model_id', '')} - {G.graph.get('metric', '')}"
    legend = "blue: patching the node raises the metric; red: lowers it; width: score"
    graph_attrs = {
        "rankdir": "BT",
        "newrank": "true",
        "nodesep": "0.25",
        "ranksep": "0.5",
        "labelloc": "t",
        "fontname": "Helvetica",
        "label": f"{title}\n{legend}",
        **_data(G.graph),
        _TYPES_KEY: json.dumps(types, sort_keys=True),
    }
    lines = [
        f"// {title}",
        "digraph circuit {",
        f"  graph {_attrs(graph_attrs)};",
        '  node [style="filled", fontname="Helvetica", fontsize="10"];',
        '  edge [arrowsize="0.6"];',
    ]
    for node, data in G.nodes(data=True):
        rgb = node_rgb(data.get("estimate"), top_est)
        dark = sum(rgb) < 380 and rgb != ENDPOINT
        visual = {
            "label": _label(node, data),
            "shape": _SHAPES.get(str(data.get("kind", "")), "box"),
            "fillcolor": hex_colour(rgb),
            "fontcolor": "white" if dark else "black",
            "width": f"{0.6 + 1.6 * abs(float(data.get('score', 0.0))) / top_score:.3f}",
        }
        if data.get("verified"):
            visual["penwidth"] = "2"
        lines.append(f"  {_quote(node)} {_attrs({**visual, **_data(data)})};")
    for row, members in row_order(G).items():
        lines.append(f"  subgraph row_{row} {{ rank=same; " + " ".join(f"{_quote(n)};" for n in members) + " }")
    for a, b, data in G.edges(data=True):
        if "weight" in data:
            w = float(data["weight"])
            visual = {
                "color": hex_colour(node_rgb(w, top_weight)),
                "penwidth": f"{0.5 + 3.5 * abs(w) / top_weight:.3f}",
            }
        else:
            visual = {"color": "#9a9a9a"}
        lines.append(f"  {_quote(a)} -> {_quote(b)} {_attrs({**visual, **_data(data)})};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(G: nx.DiGraph, path: str | Path | IO[str]) -> None:
    """Write DOT text (render with `dot -Tsvg file.dot -o file.svg`)."""
    write_text(path, to_dot(G))


# -- reading ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r'(?P<space>\s+)|(?P<comment>//[^\n]*|/\*.*?\*/|\#[^\n]*)'
    r'|(?P<string>"(?:[^"\\]|\\.)*")|(?P<arrow>->|--)|(?P<punct>[{}\[\];,=])'
    r'|(?P<id>[A-Za-z_\x80-\uffff][A-Za-z_0-9\x80-\uffff]*|-?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?))',
    re.S | re.M,
)
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n", "r": "\r"}


def _tokens(text: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise DataError(f"cannot read DOT at character {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind in ("space", "comment"):
            continue
        value = m.group()
        if kind == "string":
            value = re.sub(r"\\(.)", lambda e: _UNESCAPE.get(e.group(1), "\\" + e.group(1)), value[1:-1], flags=re.S)
            kind = "id"
        yield kind, value


class _Parser:
    """Recursive descent over DOT statements: enough of the grammar for what `to_dot` writes."""

    def __init__(self, text: str) -> None:
        self.toks = list(_tokens(text))
        self.i = 0
        self.graph: dict[str, str] = {}
        self.nodes: dict[str, dict[str, str]] = {}
        self.edges: dict[tuple[str, str], dict[str, str]] = {}

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        if self.i >= len(self.toks):
            raise DataError(f"DOT ended early (expected {expected or 'more'})")
        value = self.toks[self.i][1]
        if expected is not None and value != expected:
            raise DataError(f"DOT: expected {expected!r}, found {value!r}")
        self.i += 1
        return value

    def parse(self) -> None:
        if self.peek() == "strict":
            self.take()
        if self.take() not in ("digraph", "graph"):
            raise DataError("DOT: expected 'digraph'")
        if self.peek() != "{":
            self.take()
        self.block()

    def block(self) -> None:
        self.take("{")
        while self.peek() != "}":
            self.statement()
            if self.peek() in (";", ","):
                self.take()
        self.take("}")

    def attr_list(self) -> dict[str, str]:
        attrs: dict[str, str] = {}
        while self.peek() == "[":
            self.take("[")
            while self.peek() != "]":
                key = self.take()
                self.take("=")
                attrs[key] = self.take()
                if self.peek() in (",", ";"):
                    self.take()
            self.take("]")
        return attrs

    def statement(self) -> None:
        word = self.peek()
        if word in ("graph", "node", "edge"):
            self.take()
            attrs = self.attr_list()
            if word == "graph":
                self.graph.update(attrs)
            return
        if word == "subgraph" or word == "{":
            if word == "subgraph":
                self.take()
                if self.peek() != "{":
                    self.take()
            self.block()
            return
        first = self.take()
        if self.peek() == "=":
            self.take()
            self.graph[first] = self.take()
            return
        chain = [first]
        while self.peek() in ("->", "--"):
            self.take()
            chain.append(self.take())
        attrs = self.attr_list()
        for name in chain:
            self.nodes.setdefault(name, {})
        if len(chain) == 1:
            self.nodes[first].update(attrs)
        for a, b in zip(chain, chain[1:]):
            self.edges.setdefault((a, b), {}).update(attrs)


def _convert(value: str, kind: str | None) -> Any:
    if kind == "str":
        return value
    if kind == "bool" or (kind is None and value in ("true", "false")):
        return value == "true"
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    for cast in (int, float):  # untyped (hand-edited) values: the narrowest type that reads them
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _restore(attrs: dict[str, str], types: dict[str, str]) -> dict[str, Any]:
    return {
        key[len(_PREFIX):]: _convert(value, types.get(key[len(_PREFIX):]))
        for key, value in attrs.items()
        if key.startswith(_PREFIX) and key != _TYPES_KEY
    }


def parse_dot(text: str) -> nx.DiGraph:
    """A circuit graph from DOT text; only `atp_*` attributes come back (the drawing ones are dropped)."""
    parser = _Parser(text)
    parser.parse()
    types = json.loads(parser.graph.get(_TYPES_KEY, "{}") or "{}")
    G = nx.DiGraph()
    G.graph.update(_restore(parser.graph, types.get("graph", {})))
    for name, attrs in parser.nodes.items():
        G.add_node(name, **_restore(attrs, types.get("node", {})))
    for (a, b), attrs in parser.edges.items():
        G.add_edge(a, b, **_restore(attrs, types.get("edge", {})))
    return G


def read_dot(path: str | Path | IO[str]) -> nx.DiGraph:
    """Read a circuit graph written by `write_dot`."""
    return parse_dot(read_text(path))
