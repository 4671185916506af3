"""The attributed edges of a circuit graph: which of the run's edges the graph holds and what each carries.

An edge into a head is one graph edge u -> head whose `weight` is the sum of its parts through the head's query,
key and value inputs; the parts are the attributes `weight_q`, `weight_k`, `weight_v` (and `verified_weight_q`
... where path patching measured them). Node-level circuits keep the strongest whole edges between their nodes
(`EdgeCut`); edge-level circuits (`select edges ...`) keep exactly the chosen edges, and say through which inputs
a chosen head edge runs (`selected_inputs`).
"""
from __future__ import annotations

import networkx as nx

from atpdsl.circuit.scores import EdgeScore, RunResult
from atpdsl.circuit.select import EdgeCut, SelectionOutcome, cut_edges, finest_edges

__all__ = ["EDGE_SEMANTICS", "add_attributed_edges", "add_selected_edges", "describe_edges"]

EDGE_SEMANTICS = (
    "weight(u->v) = mean over pairs of (write_u(corrupt) - write_u(clean)) . dM/d(v's own input), at the clean run "
    "(through v's block's input norm only, never the skip path): a head's own query, key and value inputs "
    "(weight_q, weight_k, weight_v; weight is their sum; a per-position head reads keys and values from earlier "
    "positions through its own query only), a neuron's own input rows, a q/k/v node's projection columns, the "
    "block input of attn / mlp / logits, every later block's input for L.resid; q/k/v -> own head(s) carry the "
    "q/k/v node's share through that head; a node's out-edges into every head, neuron and logits sum to its node "
    "AtP estimate; verified_weight = exact path patching (u's change reaching only v's input)"
)
"""What a weighted edge means (the graph attribute `edge_semantics` when the run computed edge attributions)."""


def _parts(result: RunResult) -> dict[tuple[str, str], dict[str, float]]:
    """Each head edge's q / k / v parts (and their path-patched values) as graph attributes."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for e in result.edges:
        if e.channel and e.weight is not None:
            attrs = out.setdefault((e.source, e.target), {})
            attrs[f"weight_{e.channel}"] = float(e.weight)
            if e.verified is not None:
                attrs[f"verified_weight_{e.channel}"] = float(e.verified)
    return out


def _add(G: nx.DiGraph, edge: EdgeScore, parts: dict[tuple[str, str], dict[str, float]], **extra) -> None:
    data: dict[str, float | str] = {} if edge.weight is None else {"weight": float(edge.weight)}
    if edge.verified is not None:
        data["verified_weight"] = float(edge.verified)
    data.update(parts.get((edge.source, edge.target), {}))
    data.update(extra)
    G.add_edge(edge.source, edge.target, **data)


def add_attributed_edges(G: nx.DiGraph, result: RunResult, edge_cut: EdgeCut | None) -> None:
    """The run's whole edges between graph nodes, after the edge cut; the counts go into the graph attributes."""
    inside = [e for e in result.edges if not e.channel and e.source in G and e.target in G]
    outcome = cut_edges(inside, edge_cut)
    parts = _parts(result)
    for edge in outcome.kept:
        _add(G, edge, parts)
    G.graph.update(
        edge_cut=outcome.rule,
        n_edges_computed=len(inside),
        n_edges_kept=len(outcome.kept),
        n_edges_left_out=int(outcome.left_out),
        n_edges_zero=int(outcome.zero),
    )


def add_selected_edges(G: nx.DiGraph, result: RunResult, outcome: SelectionOutcome) -> None:
    """An edge-level circuit's chosen edges (a head edge once, with the inputs it was chosen through)."""
    inputs: dict[tuple[str, str], list[str]] = {}
    for source, target, channel in outcome.edges:
        inputs.setdefault((source, target), []).append(channel)
    parts = _parts(result)
    for e in result.edges:
        if not e.channel and (e.source, e.target) in inputs and e.source in G and e.target in G:
            chosen = ",".join(c for c in inputs[(e.source, e.target)] if c)
            _add(G, e, parts, **({"selected_inputs": chosen} if chosen else {}))
    finest = finest_edges(result.edges)
    weighted = [i for i in finest if result.edges[i].weight != 0.0]
    G.graph.update(
        edge_cut=outcome.rule,
        n_edges_computed=len(finest),
        n_edges_kept=len(outcome.edges),
        n_edges_left_out=len(weighted) - len(outcome.edges) - len(outcome.dropped_edges),
        n_edges_zero=len(finest) - len(weighted),
        n_edges_dropped_verified=len(outcome.dropped_edges),
    )


def describe_edges(G: nx.DiGraph) -> str:
    """One line for summaries: how many edges the graph keeps and how many the cut left out."""
    if G.graph.get("edge_rule") != "attribution":
        return f"{G.number_of_edges()} residual-stream edge(s), unweighted"
    text = (f"{G.graph.get('n_edges_kept', G.number_of_edges())} of {G.graph.get('n_edges_computed', '?')} "
            f"attributed edge(s) kept ({G.graph.get('edge_cut', 'no cut')})")
    left, zero = G.graph.get("n_edges_left_out", 0), G.graph.get("n_edges_zero", 0)
    if left or zero:
        text += f"; {left} weaker edge(s) left out" + (f", {zero} zero-weight edge(s) dropped" if zero else "")
        text += " (all are in the -edges.csv and JSON exports)"
    return text
