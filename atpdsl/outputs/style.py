"""Shared look of every drawing: colour by sign (blue raises the metric, red lowers it), layered layout.

A verified node is drawn with its measured effect (sign and size), an unverified one with its AtP
estimate: `effect_of` is the one place that chooses, so figures, DOT, GEXF and the report agree.
"""
from __future__ import annotations

from typing import Any, Mapping

import networkx as nx

__all__ = ["POSITIVE", "NEGATIVE", "ENDPOINT", "effect_of", "node_rgb", "hex_colour", "layered_positions",
           "row_order", "row_label", "top_abs", "top_effect"]

POSITIVE = (33, 102, 172)
"""Blue: patching the node (corrupt value into the clean run) raises the metric."""
NEGATIVE = (178, 24, 43)
"""Red: patching the node lowers the metric."""
ENDPOINT = (190, 190, 190)
"""Grey: `embed` and `logits`, which carry no score."""

_KIND_ORDER = {"queries": 0, "keys": 1, "values": 2, "heads": 3, "attn": 4, "neurons": 5, "mlp": 6, "resid": 7}


def effect_of(data: Mapping[str, Any]) -> float | None:
    """The signed number a node is drawn with: its verified (exact) effect when it has one, else its estimate."""
    for key in ("verified_effect", "estimate"):
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def top_abs(G: nx.DiGraph, key: str = "estimate") -> float:
    """The largest |value| of a node attribute (1.0 when there is none), to scale colours and sizes."""
    values = [abs(float(d[key])) for _, d in G.nodes(data=True) if isinstance(d.get(key), (int, float))]
    return max(values, default=0.0) or 1.0


def top_effect(G: nx.DiGraph) -> float:
    """The largest |effect_of| over the nodes (1.0 when none), to scale colours."""
    values = [abs(e) for _, d in G.nodes(data=True) if (e := effect_of(d)) is not None]
    return max(values, default=0.0) or 1.0


def node_rgb(effect: Any, top: float) -> tuple[int, int, int]:
    """The node's fill: white blended toward blue or red by |effect| / top (at least a light tint)."""
    if not isinstance(effect, (int, float)) or isinstance(effect, bool):
        return ENDPOINT
    base = POSITIVE if effect >= 0 else NEGATIVE
    t = 0.2 + 0.8 * min(1.0, abs(float(effect)) / (top or 1.0))
    return tuple(round(255 + (c - 255) * t) for c in base)  # type: ignore[return-value]


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def row_order(G: nx.DiGraph) -> dict[int, list[str]]:
    """Nodes grouped by `stage` (bottom to top), each row sorted by kind, index, position, name."""
    rows: dict[int, list[str]] = {}
    for node, data in G.nodes(data=True):
        rows.setdefault(int(data.get("stage", 0)), []).append(node)

    def key(node: str) -> tuple[int, int, str, str]:
        d = G.nodes[node]
        return (_KIND_ORDER.get(d.get("kind", ""), 9), int(d.get("index", -1)), str(d.get("position", "")), str(node))

    return {s: sorted(rows[s], key=key) for s in sorted(rows)}


def layered_positions(G: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """x, y per node: y is the row (only rows in use, so no gaps), x centres each row on 0."""
    positions = {}
    for y, (_, row) in enumerate(row_order(G).items()):
        for i, node in enumerate(row):
            positions[node] = (i - (len(row) - 1) / 2.0, float(y))
    return positions


def row_label(stage: int, n_layers: int) -> str:
    """A drawing row's name: `embed`, `L3 q/k/v`, `L3 attention`, `L3 MLP`, `L3 resid`, `logits`."""
    if stage == 0:
        return "embed"
    if stage >= 4 * n_layers + 1:
        return "logits"
    layer, part = divmod(stage - 1, 4)
    return f"L{layer} " + ("q/k/v", "attention", "MLP", "resid")[part]
