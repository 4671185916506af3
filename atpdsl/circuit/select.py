"""Choose a circuit's nodes from a run's scores (top K, threshold, cumulative), drop refuted ones, cut edges.

Ranking and verification compare like with like in every `aggregate` mode: a node's ranking score
is a mean of |.| per pair (`mean_abs`, `per_pair`, and GradDrop's score under them) or |mean| over
pairs (`abs_mean`), and its measured counterpart is the same kind of number built from the exact
per-pair effects. `selection_value` is the one number the cut is applied to (see VALUE_DEFINITIONS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import takewhile
from typing import Callable, Sequence

from atpdsl.errors import AtpError
from atpdsl.plan import Selection
from atpdsl.circuit.scored_nodes import ScoredNodes
from atpdsl.circuit.scores import EdgeScore, NodeScore, RunResult

__all__ = [
    "DEFAULT_SELECTION",
    "AGGREGATES",
    "VALUE_DEFINITIONS",
    "DroppedNode",
    "SelectionOutcome",
    "select",
    "candidates",
    "ranked",
    "rank_of",
    "verified_nodes",
    "verified_magnitude",
    "selection_value",
    "describe",
    "EdgeCut",
    "DEFAULT_EDGE_CUT",
    "EdgeCutOutcome",
    "cut_edges",
    "finest_edges",
    "select_edges",
]

DEFAULT_SELECTION = Selection("top", 20)
"""Used when a spec has no `select` line: the 20 best-ranked nodes."""

_TOLERANCE = 1e-12  # relative slack when a cumulative share is compared with F

AGGREGATES = ("mean_abs", "abs_mean", "per_pair")
_MEAN_OF_ABS = ("mean_abs", "per_pair")

VALUE_DEFINITIONS: dict[str, str] = {
    "mean_abs": "selection_value = mean over pairs of |exact effect| for a verified node, else its ranking score "
                "(mean over pairs of |estimate|, or GradDrop's score); the rule picks candidates by ranking score "
                "and a candidate stays in the circuit when selection_value >= the cut",
    "abs_mean": "selection_value = |mean over pairs of the exact effect| for a verified node, else its ranking "
                "score (|mean over pairs of the estimate|, or GradDrop's score); the rule picks candidates by "
                "ranking score and a candidate stays in the circuit when selection_value >= the cut",
}
VALUE_DEFINITIONS["per_pair"] = VALUE_DEFINITIONS["mean_abs"]
"""What `selection_value` means under each aggregate (stored with every export)."""


@dataclass(frozen=True, slots=True)
class DroppedNode:
    """A selected node that exact patching refuted: its measured magnitude missed the cut."""

    node: str
    verified: float
    cut: float


@dataclass(frozen=True, slots=True)
class SelectionOutcome:
    """Which nodes form the circuit and why.

    `cut` is the |score| a node needed to be selected (X for `threshold X`, the smallest selected
    |score| for `top K` and `cumulative F`); verified nodes must also reach it with their measured
    effect, else they are listed in `dropped` and left out of `selected`. A verified node the estimates
    left out but whose measured effect reaches the cut joins the circuit and is listed in `added`:
    exact patching outranks the estimate both ways.
    """

    kind: str
    value: float
    cut: float
    selected: tuple[str, ...]
    dropped: tuple[DroppedNode, ...] = ()
    aggregate: str = "mean_abs"
    added: tuple[str, ...] = ()  # verified nodes below the estimates' cut whose measured effect reaches it
    of_edges: bool = False  # `select edges ...`: kind / value / cut are the edge rule's (on |edge weight|)
    edges: tuple[tuple[str, str, str], ...] = ()  # the circuit's edges (source, target, channel), when of_edges
    dropped_edges: tuple[tuple[str, str, str], ...] = ()  # path patching measured them below the cut

    @property
    def value_definition(self) -> str:
        """What the numbers compared with `cut` are (VALUE_DEFINITIONS[aggregate])."""
        return VALUE_DEFINITIONS.get(self.aggregate, VALUE_DEFINITIONS["mean_abs"])

    @property
    def rule(self) -> str:
        """The rule as a user writes it, e.g. `top 20` or `edges top 30`."""
        return ("edges " if self.of_edges else "") + describe(Selection(self.kind, self.value))


def describe(selection: Selection) -> str:
    """`top 20`, `threshold 0.05`, `cumulative 0.9`."""
    value = selection.value
    text = str(int(value)) if float(value).is_integer() and selection.kind == "top" else f"{value:g}"
    return f"{selection.kind} {text}"


def _magnitude(x: float | None) -> float:
    """|x|, with NaN counted as 0 so it can never be selected or break the sort."""
    if x is None or math.isnan(x):
        return 0.0
    return abs(float(x))


def ranked(nodes: Sequence[NodeScore]) -> Sequence[NodeScore]:
    """Nodes from the largest |score| down; ties in rank order (the forward order), then by name, so every run
    orders them the same. A run's own ScoredNodes are already in that order and are returned as they are."""
    if isinstance(nodes, ScoredNodes):
        return nodes
    return sorted(nodes, key=lambda n: (-_magnitude(n.score), n.rank or math.inf, n.name))


def rank_of(nodes: Sequence[NodeScore]) -> Callable[[NodeScore], int]:
    """A node's rank: the engine's, or for nodes that carry none (a hand-built result) its position in `ranked`
    order, worked out once and only when first needed."""
    order: dict[str, int] = {}

    def rank(node: NodeScore) -> int:
        if node.rank:
            return node.rank
        if not order:
            order.update((n.name, i + 1) for i, n in enumerate(ranked(nodes)))
        return order[node.name]

    return rank


def verified_nodes(nodes: Sequence[NodeScore]) -> list[NodeScore]:
    """The verified nodes, in rank order (a run's ScoredNodes finds them without reading every node)."""
    if isinstance(nodes, ScoredNodes):
        return nodes.verified_in_rank_order()
    return [n for n in ranked(nodes) if n.verified_effect is not None]


def _check_aggregate(aggregate: str) -> None:
    if aggregate not in AGGREGATES:
        raise AtpError(f"unknown aggregate {aggregate!r} (expected {', '.join(AGGREGATES)})")


def verified_magnitude(node: NodeScore, aggregate: str = "mean_abs") -> float | None:
    """The measured counterpart of the node's ranking score, or None when the node was not verified.

    `mean_abs` and `per_pair` rank by a mean of |.| per pair, so this is the mean of |exact effect| per
    pair; `abs_mean` ranks by |mean|, so this is |mean exact effect|. Without per-pair effects (a
    hand-built or old result) a mean-of-|.| aggregate falls back to |mean effect|, which is never
    larger, so a node is never kept on a number larger than the one measured.
    """
    _check_aggregate(aggregate)
    if node.verified_effect is None:
        return None
    if aggregate in _MEAN_OF_ABS and node.verified_per_pair:
        return sum(_magnitude(v) for v in node.verified_per_pair) / len(node.verified_per_pair)
    return _magnitude(node.verified_effect)


def selection_value(node: NodeScore, aggregate: str = "mean_abs") -> float:
    """The number the selection cut is applied to: the measured magnitude when verified, else |score|."""
    measured = verified_magnitude(node, aggregate)
    return _magnitude(node.score) if measured is None else measured


def candidates(nodes: Sequence[NodeScore], selection: Selection) -> tuple[list[NodeScore], float]:
    """The nodes the rule picks from the estimates alone, best first, and the cut they had to reach."""
    order = ranked(nodes)
    kind, value = selection.kind, float(selection.value)
    if kind == "top":
        if value < 0 or not value.is_integer():
            raise AtpError(f"select top {value:g}: K must be a whole number >= 0")
        chosen = order[: int(value)]
    elif kind == "threshold":
        if value < 0 or math.isnan(value):
            raise AtpError(f"select threshold {value:g}: X must be >= 0")
        chosen = list(takewhile(lambda n: _magnitude(n.score) >= value, order))
        return chosen, value
    elif kind == "cumulative":
        if not 0.0 < value <= 1.0:
            raise AtpError(f"select cumulative {value:g}: F must be in (0, 1]")
        total = sum(_magnitude(n.score) for n in order)
        goal = value * total * (1.0 - _TOLERANCE)
        chosen, covered = [], 0.0
        for node in order:
            if total == 0.0 or (chosen and covered >= goal):
                break
            chosen.append(node)
            covered += _magnitude(node.score)
    else:
        raise AtpError(f"unknown selection rule {kind!r} (expected top, threshold or cumulative)")
    cut = _magnitude(chosen[-1].score) if chosen else 0.0
    return chosen, cut


def select(
    result: RunResult, selection: Selection | None = None, *, aggregate: str = "mean_abs",
    edges: Selection | None = None,
) -> SelectionOutcome:
    """Apply a selection rule to a run, then let exact patching correct it both ways.

    A node that was verified stays only if its measured magnitude (see `verified_magnitude`) is at
    least the cut the estimates had to reach; a verified node the estimates missed joins when its
    measured magnitude reaches that cut (`added`): exact patching outranks the estimate it checks.
    With an edge rule (`select edges ...`) the circuit is the best edges instead, and the nodes they
    touch (`select_edges`).
    """
    if edges is not None:
        return select_edges(result, edges, aggregate=aggregate)
    _check_aggregate(aggregate)
    selection = selection or DEFAULT_SELECTION
    chosen, cut = candidates(result.nodes, selection)
    kept: list[str] = []
    dropped: list[DroppedNode] = []
    for node in chosen:
        measured = verified_magnitude(node, aggregate)
        if measured is not None and measured < cut:
            dropped.append(DroppedNode(node.name, measured, cut))
        else:
            kept.append(node.name)
    names = {n.name for n in chosen}
    added = [n.name for n in verified_nodes(result.nodes) if n.name not in names and chosen
             and (verified_magnitude(n, aggregate) or 0.0) >= cut > 0.0]
    return SelectionOutcome(selection.kind, float(selection.value), cut, tuple(kept + added), tuple(dropped),
                            aggregate, added=tuple(added))


# -- edges -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EdgeCut:
    """Which weighted edges a circuit graph keeps (zero-weight edges never are).

    `cumulative F`: the strongest edges that together carry F of the total |weight| (the smallest such
    set); `top K`: the K strongest; `threshold X`: |weight| >= X; `all`: every non-zero edge.
    """

    kind: str = "cumulative"
    value: float = 0.9

    @property
    def rule(self) -> str:
        if self.kind == "all":
            return "all non-zero edges"
        number = str(int(self.value)) if self.kind == "top" else f"{self.value:g}"
        return f"{self.kind} {number} of |weight|" if self.kind == "cumulative" else f"{self.kind} {number} by |weight|"


DEFAULT_EDGE_CUT = EdgeCut("cumulative", 0.9)
"""The graph-level edge cut used unless the spec says otherwise: the edges carrying 90% of |weight|."""


@dataclass(frozen=True, slots=True)
class EdgeCutOutcome:
    """The edges a graph keeps (engine order) and how many it left out, and why."""

    rule: str
    kept: tuple[EdgeScore, ...]
    left_out: int = 0  # weighted, non-zero edges below the cut
    zero: int = 0  # edges whose weight is exactly 0
    unweighted: int = 0  # edges without a weight: kept, the cut cannot rank them


def _strongest(weighted: list[EdgeScore], cut: EdgeCut) -> set[int]:
    """Indices (into `weighted`) of the edges the cut keeps."""
    order = sorted(range(len(weighted)), key=lambda i: (-abs(weighted[i].weight or 0.0),
                                                         weighted[i].source, weighted[i].target))
    mags = [abs(float(weighted[i].weight or 0.0)) for i in order]
    if cut.kind == "all":
        return set(order)
    if cut.kind == "top":
        if cut.value < 0 or not float(cut.value).is_integer():
            raise AtpError(f"edge cut top {cut.value:g}: K must be a whole number >= 0")
        return set(order[: int(cut.value)])
    if cut.kind == "threshold":
        if cut.value < 0 or math.isnan(cut.value):
            raise AtpError(f"edge cut threshold {cut.value:g}: X must be >= 0")
        return {i for i, m in zip(order, mags) if m >= cut.value}
    if cut.kind != "cumulative":
        raise AtpError(f"unknown edge cut {cut.kind!r} (expected cumulative, top, threshold or all)")
    if not 0.0 < cut.value <= 1.0:
        raise AtpError(f"edge cut cumulative {cut.value:g}: F must be in (0, 1]")
    goal, covered, keep = cut.value * sum(mags) * (1.0 - _TOLERANCE), 0.0, set()
    for i, m in zip(order, mags):
        if keep and covered >= goal:
            break
        keep.add(i)
        covered += m
    return keep


def cut_edges(edges: Sequence[EdgeScore], cut: EdgeCut | None = DEFAULT_EDGE_CUT) -> EdgeCutOutcome:
    """Drop zero-weight edges, then keep the edges the cut picks by |weight| (unweighted ones stay)."""
    cut = cut or EdgeCut("all")
    unweighted = [e for e in edges if e.weight is None]
    nonzero = [e for e in edges if e.weight is not None and e.weight != 0.0 and not math.isnan(e.weight)]
    zero = sum(1 for e in edges if e.weight is not None) - len(nonzero)
    keep = _strongest(nonzero, cut)
    chosen = {id(nonzero[i]) for i in keep}
    kept = tuple(e for e in edges if e.weight is None or id(e) in chosen)
    return EdgeCutOutcome(cut.rule, kept, len(nonzero) - len(keep), zero, len(unweighted))


# -- edge-level circuits ----------------------------------------------------------------------------


def finest_edges(edges: Sequence[EdgeScore]) -> list[int]:
    """Indices of the finest weighted edges, strongest |weight| first: a head's q / k / v parts stand in for
    their sum, every other edge is whole (ties broken by names, so every run orders them the same)."""
    parts = {(e.source, e.target) for e in edges if e.channel}
    idx = [i for i, e in enumerate(edges) if e.weight is not None and not math.isnan(e.weight)
           and (e.channel or (e.source, e.target) not in parts)]
    return sorted(idx, key=lambda i: (-abs(edges[i].weight), edges[i].source, edges[i].target, edges[i].channel))


def select_edges(result: RunResult, rule: Selection, *, aggregate: str = "mean_abs") -> SelectionOutcome:
    """The circuit as its best edges (`select edges top K | threshold X | cumulative F`, on |weight| of the finest
    edges; zero-weight edges never count) and the nodes they touch (ranked order; `embed` and `logits` are always
    in the graph). An edge that path patching measured (`verified`) below the cut is dropped, as a node is."""
    _check_aggregate(aggregate)
    order = [i for i in finest_edges(result.edges) if result.edges[i].weight != 0.0]
    pool = [result.edges[i] for i in order]
    chosen = sorted(_strongest(pool, EdgeCut(rule.kind, float(rule.value))))
    cut = float(rule.value) if rule.kind == "threshold" else min((abs(pool[i].weight) for i in chosen), default=0.0)
    kept, dropped = [], []
    for i in chosen:
        e = pool[i]
        (dropped if e.verified is not None and abs(e.verified) < cut else kept).append((e.source, e.target, e.channel))
    touched = {name for s, t, _ in kept for name in (s, t)}
    by_name = result.by_name()
    nodes = tuple(n.name for n in ranked([by_name[name] for name in touched if name in by_name]))
    return SelectionOutcome(rule.kind, float(rule.value), cut, nodes, aggregate=aggregate, of_edges=True,
                            edges=tuple(kept), dropped_edges=tuple(dropped))
