"""Build the circuit graph: selected nodes plus `embed` and `logits`, edges along the residual stream.

Every attribute is a str, int, float or bool, never None and never nested, so the graph writes to
GraphML, GEXF, DOT and JSON unchanged and reads back equal. Missing facts are left out rather
than set to None (a head has `index`, `L3.mlp` has none; only verified nodes have
`verified_effect`). Lists are comma-joined strings (`dropped_verified = "L0.H1,L2.N7"`).

Edges. When the run computed edge attributions (`RunResult.edges`), the graph holds those whose two
ends are in the graph, less zero-weight edges: for a node-level circuit the strongest ones, cut at graph level by
`EdgeCut` (by default those carrying 90% of the total |weight|), for an edge-level circuit (`select edges ...`)
exactly the chosen ones (atpdsl.circuit.edge_graph). The graph attributes say how many were left out
(`n_edges_left_out`, `n_edges_zero`) and `-edges.csv` / the JSON keep every edge. `weight` is the edge's
attribution (signed, same convention as the node estimates), `verified_weight` the path-patching effect where
measured; an edge into a head also carries its parts through the head's query, key and value (`weight_q`,
`weight_k`, `weight_v`). Otherwise the graph connects along the residual stream,
unweighted: an edge runs from A to B when A writes the residual stream at or before the point B
reads it (layer L's attention and its q/k/v read before layer L's attention and write after it,
its neurons/MLP read after its attention and write after the layer, `L.resid` is the point after
layer L), except between two nodes at the very same points. `embed` feeds every node and every
node feeds `logits`. A query, key or value also feeds its own head (or, for a KV group, the heads
in its `heads` attribute) and its layer's `attn`. Between per-position nodes at two integer
positions of the same sign, no edge runs from a later position to an earlier one (causal attention).
What a weighted edge means is stated in the graph attribute `edge_semantics` (EDGE_SEMANTICS).
"""
from __future__ import annotations

import math
import platform
from importlib import metadata
from typing import Any, Iterable

import networkx as nx

from atpdsl.names import NodeId, NodeKind, parse_node
from atpdsl.plan import Plan
from atpdsl.circuit.scores import SCHEMA_VERSION, SIGN_CONVENTION, NodeScore, RunResult
from atpdsl.circuit.edge_graph import EDGE_SEMANTICS, add_attributed_edges, add_selected_edges, describe_edges
from atpdsl.circuit.select import DEFAULT_EDGE_CUT, EdgeCut, SelectionOutcome, rank_of, selection_value

__all__ = [
    "EDGE_SEMANTICS",
    "EMBED",
    "LOGITS",
    "NODE_FIELDS",
    "build_graph",
    "describe_selection",
    "describe_edges",
    "stage",
    "residual_edges",
    "n_layers_of",
    "graph_attributes",
    "package_versions",
    "ScalarAttr",
]

EMBED = "embed"
LOGITS = "logits"

ScalarAttr = str | int | float | bool

NODE_FIELDS: dict[str, type] = {
    "name": str,
    "layer": int,
    "kind": str,
    "index": int,
    "position": str,
    "grouped": bool,
    "stage": int,
    "estimate": float,
    "score": float,
    "method": str,
    "rank": int,
    "verified": bool,
    "verified_effect": float,
    "selection_value": float,
}
"""Node attributes the graph may carry and their types (position is a string: `7`, `-1`, `name`).

`verified_effect` is present only on verified nodes; `index` only on heads, q/k/v and neurons;
`position` only on per-position nodes; `grouped` only on KV-group keys/values. Scalar facts from
`NodeScore.attrs` (e.g. `heads = "2,3"` on a KV group) are added under their own names.
"""

_ATTN_INPUTS = (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE)
_ATTN_OUTPUTS = (NodeKind.HEAD, NodeKind.ATTN)
_MLP_PARTS = (NodeKind.NEURON, NodeKind.MLP)


def n_layers_of(result: RunResult) -> int:
    """The model's layer count when the engine recorded it, else one more than the deepest scored layer."""
    prov = dict(result.provenance)
    for key in ("n_layers", "num_layers", "num_hidden_layers"):
        value = prov.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    layers = [n.node.layer for n in result.nodes if n.node.kind not in (NodeKind.EMBED, NodeKind.LOGITS)]
    return max(layers, default=-1) + 1


def stage(node: NodeId, n_layers: int) -> int:
    """The node's row in a layered drawing, bottom (embed, 0) to top (logits).

    Layer L uses rows 4L+1 (queries/keys/values), 4L+2 (heads, attn), 4L+3 (neurons, mlp) and
    4L+4 (resid); logits sit at 4*n_layers+1, above every layer.
    """
    kind = node.kind
    if kind is NodeKind.EMBED:
        return 0
    if kind is NodeKind.LOGITS:
        return 4 * n_layers + 1
    if kind in _ATTN_INPUTS:
        return 4 * node.layer + 1
    if kind in _ATTN_OUTPUTS:
        return 4 * node.layer + 2
    if kind in _MLP_PARTS:
        return 4 * node.layer + 3
    return 4 * node.layer + 4


def _read_write(node: NodeId) -> tuple[float, float]:
    """Where on the residual stream a node reads and writes (point 2L is before layer L's attention)."""
    kind, layer = node.kind, node.layer
    if kind is NodeKind.EMBED:
        return -1.0, 0.0
    if kind is NodeKind.LOGITS:
        return math.inf, math.inf
    if kind in _ATTN_INPUTS or kind in _ATTN_OUTPUTS:
        return 2.0 * layer, 2.0 * layer + 1
    if kind in _MLP_PARTS:
        return 2.0 * layer + 1, 2.0 * layer + 2
    return 2.0 * layer + 2, 2.0 * layer + 2  # resid


def _causal(a: NodeId, b: NodeId) -> bool:
    """False only when both positions are integers of the same sign and `a` is later than `b`."""
    pa, pb = a.position, b.position
    if isinstance(pa, int) and isinstance(pb, int) and (pa < 0) == (pb < 0):
        return pa <= pb
    return True


def _feeds_head(a: NodeId, b: NodeId, heads_of: dict[NodeId, tuple[int, ...]]) -> bool:
    """A query/key/value feeds its own head's output and its layer's attention output."""
    if a.kind not in _ATTN_INPUTS or b.layer != a.layer:
        return False
    if b.kind is NodeKind.ATTN:
        return True
    if b.kind is not NodeKind.HEAD:
        return False
    if a.grouped:
        return b.index in heads_of.get(a, ())
    return b.index == a.index


def residual_edges(
    nodes: Iterable[NodeId], heads_of: dict[NodeId, tuple[int, ...]] | None = None
) -> list[tuple[NodeId, NodeId]]:
    """The unweighted edges between nodes (endpoints included), by the rule in this module's docstring."""
    heads_of = heads_of or {}
    items = list(nodes)
    where = {n: _read_write(n) for n in items}
    edges = []
    for a in items:
        read_a, write_a = where[a]
        for b in items:
            if a == b:
                continue
            read_b, _ = where[b]
            upstream = write_a <= read_b and where[a] != where[b]  # two `resid`s of one layer: no edge
            if (upstream or _feeds_head(a, b, heads_of)) and _causal(a, b):
                edges.append((a, b))
    return edges


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, read from installed metadata (imports nothing)."""
    versions = {"python": platform.python_version()}
    for package in ("atpdsl", "torch", "nnsight", "transformers", "networkx", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _scalar(value: Any) -> ScalarAttr:
    """A value coerced to a type every export format accepts (numpy scalars included)."""
    # exact builtin types: writers reject subclasses (torch's TorchVersion is a str, numpy's float64 a float)
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if hasattr(value, "item"):
        return _scalar(value.item())
    return str(value)


def _corrections(plan: Plan | None) -> str:
    if plan is None:
        return ""
    m = plan.method
    parts = [p for p, on in (("qk_fix", m.qk_fix), (f"graddrop per {m.graddrop_mode}", m.graddrop),
                             ("norm_fix", m.norm_fix)) if on]
    return ", ".join(parts) if parts else "none"


def graph_attributes(result: RunResult, outcome: SelectionOutcome, plan: Plan | None = None) -> dict[str, ScalarAttr]:
    """Provenance and settings stored on the graph: enough to tell where a circuit came from."""
    attrs: dict[str, ScalarAttr] = {
        "schema_version": SCHEMA_VERSION,
        "model_id": result.model_id,
        "spec_hash": result.spec_hash,
        "method": result.method,
        "metric": result.metric,
        "sign_convention": SIGN_CONVENTION,
        "n_pairs": int(result.n_pairs),
        "clean_metric": float(result.clean_metric),
        "corrupt_metric": float(result.corrupt_metric),
        "selection": outcome.rule,
        "selection_cut": float(outcome.cut),
        "selection_aggregate": outcome.aggregate,
        "selection_value_definition": outcome.value_definition,
        "n_selected": len(outcome.selected),
        "dropped_verified": ",".join(d.node for d in outcome.dropped),
        "added_verified": ",".join(outcome.added),
        "edge_rule": "attribution" if result.edges else "residual",
    }
    if result.edges:
        attrs["edge_semantics"] = EDGE_SEMANTICS
    if plan is not None:
        attrs.update(
            spec_file=plan.spec_file,
            spec_text=plan.spec_text,
            seed=int(plan.seed),
            aggregate=plan.method.aggregate,
            qk_fix=bool(plan.method.qk_fix),
            graddrop=bool(plan.method.graddrop),
            graddrop_mode=plan.method.graddrop_mode,
            norm_fix=bool(plan.method.norm_fix),
            corrections=_corrections(plan),
            model_dtype=plan.model.dtype,
        )
        if plan.model.revision:
            attrs["model_revision"] = plan.model.revision
    bound = result.false_negatives
    if bound is not None:
        if bound.bounded:  # an unbounded result has no number to store (graph formats and JSON lack inf)
            attrs["fn_bound"] = float(bound.bound)
        attrs.update(
            fn_confidence=float(bound.confidence),
            fn_samples=int(bound.samples),
            fn_nodes_tested=int(bound.nodes_tested),
            fn_inclusion=float(bound.inclusion),
            diagnostic=bound.sentence,
        )
    for package, version in package_versions().items():
        attrs[f"version_{package}"] = str(version)
    for key, value in result.provenance:
        if value is None:
            continue
        value = _scalar(value)
        if attrs.get(key) == value or attrs.get(f"version_{key}") == value:
            continue  # the engine's copy of a fact already stated
        attrs.setdefault(key if key not in attrs else f"provenance_{key}", value)
    return attrs


def _node_attributes(score: NodeScore, rank: int, n_layers: int, aggregate: str) -> dict[str, ScalarAttr]:
    node = score.node
    attrs: dict[str, ScalarAttr] = {
        "name": score.name,
        "layer": int(node.layer),
        "kind": node.kind.value,
        "stage": stage(node, n_layers),
    }
    if node.index is not None:
        attrs["index"] = int(node.index)
    if node.position is not None:
        attrs["position"] = str(node.position)
    if node.grouped:
        attrs["grouped"] = True
    attrs.update(
        estimate=float(score.estimate),
        score=float(score.score),
        method=score.method,
        rank=int(score.rank or rank),
        verified=score.verified_effect is not None,
    )
    if score.verified_effect is not None:
        attrs["verified_effect"] = float(score.verified_effect)
    attrs["selection_value"] = float(selection_value(score, aggregate))
    for key, value in score.attrs:
        if key not in attrs and value is not None:
            attrs[key] = _scalar(value)
    return attrs


def _heads_of(score: NodeScore) -> tuple[int, ...]:
    """The heads a KV group serves, from its `heads` attribute ("2,3")."""
    text = str(dict(score.attrs).get("heads", ""))
    return tuple(int(h) for h in text.replace(" ", "").split(",") if h.lstrip("-").isdigit())


def _unify_types(G: nx.DiGraph) -> None:
    """Make each extra attribute one type across nodes (GraphML and GEXF declare one type per key)."""
    kinds: dict[str, set[type]] = {}
    for _, data in G.nodes(data=True):
        for key, value in data.items():
            kinds.setdefault(key, set()).add(type(value))
    mixed = {k for k, types in kinds.items() if len(types) > 1 and k not in NODE_FIELDS}
    for _, data in G.nodes(data=True):
        for key in mixed & data.keys():
            data[key] = str(data[key])


def build_graph(result: RunResult, outcome: SelectionOutcome, plan: Plan | None = None,
                edge_cut: EdgeCut | None = DEFAULT_EDGE_CUT) -> nx.DiGraph:
    """The circuit: the selected nodes (in rank order) plus `embed` and `logits`, with provenance.

    Node keys are the stable short names (`L3.H5@7`). Edges follow the rule in the module
    docstring: computed edge attributions (cut by `edge_cut`; None keeps every non-zero edge) when
    the run has them, else the residual stream.
    """
    n_layers = n_layers_of(result)
    scores = result.by_name()
    rank = rank_of(result.nodes)
    G = nx.DiGraph()
    G.graph.update(graph_attributes(result, outcome, plan))
    G.graph["n_layers"] = n_layers
    embed, logits = parse_node(EMBED), parse_node(LOGITS)
    G.add_node(EMBED, name=EMBED, layer=-1, kind=NodeKind.EMBED.value, stage=stage(embed, n_layers))
    ids: dict[NodeId, str] = {embed: EMBED}
    heads_of: dict[NodeId, tuple[int, ...]] = {}
    for name in outcome.selected:
        score = scores.get(name)
        if score is None:
            raise KeyError(f"selected node {name!r} is not in the run's scores")
        G.add_node(name, **_node_attributes(score, rank(score), n_layers, outcome.aggregate))
        ids[score.node] = name
        if score.node.grouped:
            heads_of[score.node] = _heads_of(score)
    G.add_node(LOGITS, name=LOGITS, layer=n_layers, kind=NodeKind.LOGITS.value, stage=stage(logits, n_layers))
    ids[logits] = LOGITS
    _unify_types(G)
    if result.edges and outcome.of_edges:
        add_selected_edges(G, result, outcome)
    elif result.edges:
        add_attributed_edges(G, result, edge_cut)
    else:
        for a, b in residual_edges(ids, heads_of):
            G.add_edge(ids[a], ids[b])
    return G


def describe_selection(outcome: SelectionOutcome) -> str:
    """One line for summaries: the rule, how many nodes (and edges), what verification removed."""
    text = f"{outcome.rule}: {len(outcome.selected)} node(s)"
    if outcome.of_edges:
        text = f"{outcome.rule}: {len(outcome.edges)} edge(s) touching {len(outcome.selected)} node(s)"
        if outcome.dropped_edges:
            text += (f"; {len(outcome.dropped_edges)} edge(s) dropped after path patching (measured |effect| below "
                     f"{outcome.cut:.3g})")
    if outcome.dropped:
        names = ", ".join(d.node for d in outcome.dropped)
        text += f"; dropped after verification (measured |effect| below {outcome.cut:.3g}): {names}"
    return text
