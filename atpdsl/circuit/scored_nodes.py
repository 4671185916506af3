"""A run's scored nodes in rank order, kept as columns and made into NodeScore records only when read.

A run with per-position neurons scores tens of millions of nodes (SmolLM2-135M at 512 tokens: 23.7M); a record per
node would take several GB, more than the model's own forward and backward. The columns take a few bytes per node,
and every consumer that reads `RunResult.nodes` gets the same NodeScore records as from a tuple.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from atpdsl.circuit.scores import NodeScore
from atpdsl.names import NodeId, NodeNameError, parse_node

__all__ = ["NodeColumns", "ScoredNodes"]

Attrs = tuple[tuple[str, str | int | float | bool], ...]


@dataclass(frozen=True, slots=True)
class NodeColumns:
    """Per-column numbers of a run (column = the node table's order). `per_pair` / `per_pair_score`: [pairs,
    columns] or None; `best_pair_rank`: [columns] or None (aggregate per_pair); `verified`: column -> (mean exact
    effect, per-pair effects); `node`, `attrs`, `column_of`: the node table's lookups."""

    estimate: np.ndarray
    score: np.ndarray
    method: str
    node: Callable[[int], NodeId]
    attrs: Callable[[int], Attrs]
    column_of: Callable[[NodeId], int | None]
    per_pair: np.ndarray | None = None
    per_pair_score: np.ndarray | None = None
    best_pair_rank: np.ndarray | None = None
    verified: Mapping[int, tuple[float, tuple[float, ...]]] | None = None


class ScoredNodes(Sequence[NodeScore]):
    """NodeScore records in rank order (rank r at index r - 1), made on demand from NodeColumns."""

    __slots__ = ("_cols", "_order", "_positions")

    def __init__(self, columns: NodeColumns, order: np.ndarray) -> None:
        self._cols = columns
        self._order = np.asarray(order, dtype=np.int64)
        self._positions: np.ndarray | None = None  # column -> index in rank order, built on first lookup

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._record(r) for r in range(*i.indices(len(self)))]
        r = int(i)
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(i)
        return self._record(r)

    def __iter__(self) -> Iterator[NodeScore]:
        return (self._record(r) for r in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ScoredNodes({len(self)} nodes)"

    def _record(self, r: int) -> NodeScore:
        c, cols = int(self._order[r]), self._cols
        attrs = cols.attrs(c)
        if cols.best_pair_rank is not None:
            attrs = attrs + (("best_pair_rank", int(cols.best_pair_rank[c])),)
        per_pair = tuple(cols.per_pair[:, c].tolist()) if cols.per_pair is not None else None
        per_pair_score = tuple(cols.per_pair_score[:, c].tolist()) if cols.per_pair_score is not None else None
        ns = NodeScore(node=cols.node(c), estimate=float(cols.estimate[c]), score=float(cols.score[c]),
                       method=cols.method, rank=r + 1, per_pair=per_pair, attrs=attrs, per_pair_score=per_pair_score)
        measured = cols.verified.get(c) if cols.verified else None
        return ns if measured is None else ns.with_verification(measured[0], measured[1])

    def find(self, name: str) -> NodeScore | None:
        """The record of the node with this name, None when the run did not score it."""
        try:
            column = self._cols.column_of(parse_node(name))
        except NodeNameError:
            return None
        return None if column is None else self._record(self._position_of(column))

    def _position_of(self, column: int) -> int:
        if self._positions is None:
            positions = np.empty(len(self._order), dtype=np.int64)
            positions[self._order] = np.arange(len(self._order))
            self._positions = positions
        return int(self._positions[column])

    def verified_in_rank_order(self) -> list[NodeScore]:
        """The verified nodes' records, best-ranked first (without reading the others)."""
        return [self._record(r) for r in sorted(self._position_of(c) for c in (self._cols.verified or {}))]

    def by_name(self) -> "NamedScores":
        """A read-only mapping name -> NodeScore that looks names up instead of building a dict of every node."""
        return NamedScores(self)


class NamedScores(Mapping[str, NodeScore]):
    """ScoredNodes by name (see ScoredNodes.by_name)."""

    __slots__ = ("_nodes",)

    def __init__(self, nodes: ScoredNodes) -> None:
        self._nodes = nodes

    def __getitem__(self, name: str) -> NodeScore:
        found = self._nodes.find(name)
        if found is None:
            raise KeyError(name)
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._nodes.find(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (n.name for n in self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)
