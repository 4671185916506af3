"""Graphviz DOT: a layered drawing of the circuit that fits a page (render with `dot -Tpng x.dot -o x.png`).

Bottom to top (`rankdir=BT`), one `rank=same` row per stage (atpdsl.circuit.graph.stage: q/k/v,
attention, MLP, resid of each layer), fill colour by the sign and size of the node's effect (the
verified effect where exact patching measured one, else the estimate: blue raises the metric, red
lowers it), a thick outline on verified nodes, edge colour by sign and width by |weight|. The
drawing is scaled to fit 7.5 x 10 inches (`size`), so a 20-node circuit prints on one page.
Tooltips (shown by SVG viewers) carry each node's and edge's numbers. DOT is a drawing format:
there is no reader; the JSON result is the round-trip format.
"""
from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import networkx as nx

from atpdsl.outputs.streams import write_text
from atpdsl.outputs.style import ENDPOINT, effect_of, hex_colour, node_rgb, row_label, row_order, top_abs, top_effect

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.outputs.result import Result

__all__ = ["to_dot", "write_dot", "export_dot", "PAGE"]

PAGE = (7.5, 10.0)
"""Inches the drawing is scaled down to fit (a US letter or A4 page with margins)."""

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


def _quote(value: Any) -> str:
    """A DOT double-quoted string; quotes and backslashes escaped, line breaks as Graphviz's centred `\\n`."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{text}"'


def _attrs(pairs: dict[str, Any]) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in pairs.items()) + "]"


def _node_label(node: str, data: dict[str, Any]) -> str:
    """The name, then the verified effect (the estimate beside it) or the estimate alone."""
    name = str(data.get("name", node))
    if "verified_effect" in data:
        return f"{name}\nexact {data['verified_effect']:+.3g}\n(est {data['estimate']:+.3g})"
    if "estimate" in data:
        return f"{name}\nest {data['estimate']:+.3g}"
    return name


def _tooltip(data: dict[str, Any], keys: tuple[str, ...]) -> str:
    return "; ".join(f"{k} {data[k]:+.4g}" if isinstance(data[k], float) else f"{k} {data[k]}"
                     for k in keys if k in data)


def _node_line(node: str, data: dict[str, Any], top_eff: float, top_score: float) -> str:
    rgb = node_rgb(effect_of(data), top_eff)
    visual = {
        "label": _node_label(node, data),
        "shape": _SHAPES.get(str(data.get("kind", "")), "box"),
        "fillcolor": hex_colour(rgb),
        "fontcolor": "white" if sum(rgb) < 380 and rgb != ENDPOINT else "black",
        "width": f"{0.5 + 0.9 * abs(float(data.get('score', 0.0))) / top_score:.2f}",
        "tooltip": _tooltip(data, ("name", "estimate", "verified_effect", "score", "selection_value", "rank")),
    }
    if data.get("verified"):
        visual["penwidth"] = "2.5"
    return f"  {_quote(node)} {_attrs(visual)};"


def _edge_line(a: str, b: str, data: dict[str, Any], top_weight: float) -> str:
    if "weight" not in data:
        return f'  {_quote(a)} -> {_quote(b)} [color="#9a9a9a80"];'
    w = float(data.get("verified_weight", data["weight"]))
    share = abs(w) / top_weight
    visual = {
        "color": hex_colour(node_rgb(w, top_weight)),
        "penwidth": f"{0.4 + 4.6 * min(1.0, share):.2f}",
        "arrowsize": f"{0.4 + 0.4 * min(1.0, share):.2f}",
        "tooltip": f"{a} -> {b}: " + _tooltip(data, ("weight", "verified_weight")),
    }
    if "verified_weight" in data:
        visual["style"] = "bold"
    return f"  {_quote(a)} -> {_quote(b)} {_attrs(visual)};"


def _rows(G: nx.DiGraph) -> list[str]:
    """One `rank=same` row per stage, each with a grey row label, stacked in order by invisible edges
    (without them Graphviz may put two rows that share no edge side by side)."""
    n_layers = int(G.graph.get("n_layers", 0))
    lines, labels = [], []
    for row, members in row_order(G).items():
        label = f"row {row}"
        labels.append(label)
        lines.append(f"  {_quote(label)} [shape=\"plaintext\", style=\"\", fontcolor=\"#777777\", "
                     f"label={_quote(row_label(row, n_layers))}];")
        lines.append(f"  subgraph row_{row} {{ rank=same; " + " ".join(f"{_quote(n)};" for n in [label, *members]) + " }")
    lines += [f"  {_quote(a)} -> {_quote(b)} [style=\"invis\"];" for a, b in zip(labels, labels[1:])]
    return lines


def _title(G: nx.DiGraph) -> str:
    title = f"atpdsl circuit - {G.graph.get('model_id', '')} - {G.graph.get('metric', '')}"
    legend = "blue raises the metric, red lowers it (exact effect where verified, thick outline)"
    if G.graph.get("edge_rule") == "attribution":
        legend += f"\nedges: {G.graph.get('n_edges_kept', G.number_of_edges())} of " \
                  f"{G.graph.get('n_edges_computed', '?')} kept ({G.graph.get('edge_cut', '')}), width |weight|"
    return f"{title}\n{legend}"


def to_dot(G: nx.DiGraph) -> str:
    """The circuit as DOT text (see the module docstring for what is drawn)."""
    top_eff, top_score = top_effect(G), top_abs(G, "score")
    weights = [abs(float(d.get("verified_weight", d["weight"]))) for *_, d in G.edges(data=True) if "weight" in d]
    top_weight = max(weights, default=0.0) or 1.0
    graph_attrs = {
        "rankdir": "BT", "newrank": "true", "splines": "true", "size": f"{PAGE[0]:g},{PAGE[1]:g}",
        "nodesep": "0.12", "ranksep": "0.3", "labelloc": "t", "fontname": "Helvetica", "fontsize": "11",
        "label": _title(G),
    }
    lines = [
        "digraph circuit {",
        f"  graph {_attrs(graph_attrs)};",
        '  node [style="filled", fontname="Helvetica", fontsize="9", height="0.3", margin="0.05,0.02"];',
        '  edge [arrowsize="0.5"];',
    ]
    lines += [_node_line(node, data, top_eff, top_score) for node, data in G.nodes(data=True)]
    lines += _rows(G)
    lines += [_edge_line(a, b, data, top_weight) for a, b, data in G.edges(data=True)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(G: nx.DiGraph, path: str | Path | IO[str]) -> None:
    """Write DOT text (atomically when given a path)."""
    write_text(path, to_dot(G))


def export_dot(res: "Result", path: str | Path) -> list[Path]:
    """The format registry's writer (see atpdsl.outputs.formats)."""
    write_dot(res.graph, path)
    return [Path(path)]
