"""Choose a circuit's nodes from a run's scores (top K, threshold, cumulative) and drop refuted ones."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from atpdsl.errors import AtpError
from atpdsl.plan import Selection
from atpdsl.circuit.scores import NodeScore, RunResult

__all__ = [
    "DEFAULT_SELECTION",
    "DroppedNode",
    "SelectionOutcome",
    "select",
    "candidates",
    "ranked",
    "verified_magnitude",
    "describe",
]

DEFAULT_SELECTION = Selection("top", 20)
"""Used when a spec has no `select` line: the 20 best-ranked nodes."""

_TOLERANCE = 1e-12  # relative slack when a cumulative share is compared with F


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
    effect, else they are listed in `dropped` and left out of `selected`.
    """

    kind: str
    value: float
    cut: float
    selected: tuple[str, ...]
    dropped: tuple[DroppedNode, ...] = ()

    @property
    def rule(self) -> str:
        """The rule as a user writes it, e.g. `top 20`."""
        return describe(Selection(self.kind, self.value))


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


def ranked(nodes: Sequence[NodeScore]) -> list[NodeScore]:
    """Nodes from the largest |score| down; ties broken by name so every run orders them the same."""
    return sorted(nodes, key=lambda n: (-_magnitude(n.score), n.name))


def verified_magnitude(node: NodeScore, aggregate: str = "mean_abs") -> float | None:
    """The measured counterpart of the node's score, or None when the node was not verified.

    Scores aggregate as the mean of |estimate| per pair by default, so the like-for-like measured
    number is the mean of |effect| per pair when the per-pair effects were kept; otherwise (and
    for `abs_mean`) it is |mean effect|.
    """
    if node.verified_effect is None:
        return None
    if aggregate == "mean_abs" and node.verified_per_pair:
        return sum(_magnitude(v) for v in node.verified_per_pair) / len(node.verified_per_pair)
    return _magnitude(node.verified_effect)


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
        chosen = [n for n in order if _magnitude(n.score) >= value]
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
    result: RunResult, selection: Selection | None = None, *, aggregate: str = "mean_abs"
) -> SelectionOutcome:
    """Apply a selection rule to a run, then drop verified nodes whose measured effect misses the cut.

    A node that was verified stays only if its measured magnitude (see `verified_magnitude`) is at
    least the cut the estimates had to reach: exact patching outranks the estimate it checks.
    Nodes are never added on the strength of verification alone.
    """
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
    return SelectionOutcome(selection.kind, float(selection.value), cut, tuple(kept), tuple(dropped))
