"""The scores table: one row per scored node (stable columns), and the edges table; CSV in and out."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from atpdsl.circuit.scores import RunResult
from atpdsl.circuit.select import ranked

__all__ = [
    "SCORE_COLUMNS",
    "EDGE_COLUMNS",
    "PAIR_COLUMNS",
    "Table",
    "scores_table",
    "edges_table",
    "pairs_table",
]

SCORE_COLUMNS: tuple[str, ...] = (
    "node",
    "layer",
    "kind",
    "index",
    "position",
    "estimate",
    "score",
    "method",
    "rank",
    "verified_effect",
    "in_circuit",
)
"""The scores table's columns, in order. Users parse these: add columns at the end, never rename."""

EDGE_COLUMNS: tuple[str, ...] = ("source", "target", "weight", "in_circuit")
PAIR_COLUMNS: tuple[str, ...] = ("node", "pair", "estimate", "verified_effect")

_TYPES: dict[str, type] = {
    "layer": int,
    "index": int,
    "estimate": float,
    "score": float,
    "rank": int,
    "verified_effect": float,
    "in_circuit": bool,
    "weight": float,
    "pair": int,
}
"""How CSV text turns back into values; columns not listed stay strings. Empty cells are None."""


class Table:
    """A small column-ordered table of dict rows (the project does not depend on pandas)."""

    __slots__ = ("columns", "rows")

    def __init__(self, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
        self.columns = tuple(columns)
        self.rows = [dict(row) for row in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and self.columns == other.columns and self.rows == other.rows

    def __repr__(self) -> str:
        return f"Table({len(self.rows)} rows: {', '.join(self.columns)})"

    def column(self, name: str) -> list[Any]:
        """One column's values, in row order."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r} (columns: {', '.join(self.columns)})")
        return [row.get(name) for row in self.rows]

    def row(self, node: str) -> dict[str, Any]:
        """The row whose `node` column is `node`."""
        for row in self.rows:
            if row.get("node") == node:
                return row
        raise KeyError(f"no row for node {node!r}")

    def to_csv(self, path: str | Path | None = None, *, extra: dict[str, str] | None = None) -> str:
        """Write CSV (to `path` when given) and return the text; `extra` adds constant columns at the end.

        None becomes an empty cell, booleans `true`/`false`, floats their shortest exact repr.
        """
        extra = extra or {}
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*self.columns, *extra])
        for row in self.rows:
            writer.writerow([_cell(row.get(c)) for c in self.columns] + list(extra.values()))
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_csv(cls, path: str | Path, *, drop: Sequence[str] = ()) -> "Table":
        """Read a CSV written by `to_csv`, restoring the known columns' types; `drop` skips columns."""
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return cls((), [])
            keep = [i for i, c in enumerate(header) if c not in drop]
            columns = [header[i] for i in keep]
            rows = [{header[i]: _parse(header[i], r[i] if i < len(r) else "") for i in keep} for r in reader]
        return cls(columns, rows)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse(column: str, text: str) -> Any:
    if text == "":
        return None
    kind = _TYPES.get(column)
    if kind is bool:
        return text.lower() == "true"
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def scores_table(result: RunResult, in_circuit: Iterable[str] = ()) -> Table:
    """Every scored node in the engine's rank order: the circuit's numbers and those that missed it.

    `rank` is the engine's rank, or the position by |score| when the engine left it 0.
    """
    members = set(in_circuit)
    order = {n.name: i + 1 for i, n in enumerate(ranked(result.nodes))}
    rows = []
    for score in result.nodes:
        node = score.node
        rows.append(
            {
                "node": score.name,
                "layer": node.layer,
                "kind": node.kind.value,
                "index": node.index,
                "position": None if node.position is None else str(node.position),
                "estimate": float(score.estimate),
                "score": float(score.score),
                "method": score.method,
                "rank": int(score.rank or order[score.name]),
                "verified_effect": None if score.verified_effect is None else float(score.verified_effect),
                "in_circuit": score.name in members,
            }
        )
    return Table(SCORE_COLUMNS, rows)


def edges_table(result: RunResult, in_circuit: Iterable[tuple[str, str]] = ()) -> Table:
    """Every computed edge, in the engine's order; `in_circuit` marks those the graph kept."""
    members = set(in_circuit)
    rows = [
        {
            "source": e.source,
            "target": e.target,
            "weight": None if e.weight is None else float(e.weight),
            "in_circuit": (e.source, e.target) in members,
        }
        for e in result.edges
    ]
    return Table(EDGE_COLUMNS, rows)


def pairs_table(result: RunResult) -> Table:
    """Per-pair signed estimates (and measured effects where verified), one row per node and pair."""
    rows = []
    for score in ranked(result.nodes):
        if not score.per_pair:
            continue
        verified = score.verified_per_pair or ()
        for i, value in enumerate(score.per_pair):
            rows.append(
                {
                    "node": score.name,
                    "pair": i,
                    "estimate": float(value),
                    "verified_effect": float(verified[i]) if i < len(verified) else None,
                }
            )
    return Table(PAIR_COLUMNS, rows)
