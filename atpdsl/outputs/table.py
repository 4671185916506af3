"""The scores table: one row per scored node (stable columns), and the edges table; CSV in and out."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from atpdsl.circuit.scores import NodeScore, RunResult
from atpdsl.circuit.select import SelectionOutcome, rank_of, ranked, selection_value, verified_nodes

__all__ = [
    "SCORE_COLUMNS",
    "EDGE_COLUMNS",
    "PAIR_COLUMNS",
    "Table",
    "scores_table",
    "score_rows",
    "shown_rows",
    "write_rows_csv",
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
    "selection_value",
    "decision",
)
"""The scores table's columns, in order. Users parse these: add columns at the end, never rename.

`selection_value` is the number the selection cut is applied to (the measured magnitude for a verified
node, else the ranking score; see atpdsl.circuit.select.VALUE_DEFINITIONS); `decision` is `kept`,
`dropped_verified` (a candidate whose measured magnitude missed the cut), `added_verified` (left out by the
estimates, but its measured magnitude reaches the cut) or `not_selected`."""

EDGE_COLUMNS: tuple[str, ...] = ("source", "target", "weight", "in_circuit", "verified_weight", "channel")
PAIR_COLUMNS: tuple[str, ...] = ("node", "pair", "estimate", "verified_effect", "score")
"""Per-pair rows: `score` is that pair's ranking magnitude (|estimate| for AtP, GradDrop's for AtP*)."""

_TYPES: dict[str, type] = {
    "layer": int,
    "index": int,
    "estimate": float,
    "score": float,
    "rank": int,
    "verified_effect": float,
    "in_circuit": bool,
    "weight": float,
    "verified_weight": float,
    "pair": int,
    "selection_value": float,
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
        buffer = io.StringIO()
        _write_rows(buffer, self.columns, self.rows, extra or {})
        text = buffer.getvalue()
        if path is not None:
            from atpdsl.outputs.atomic import write_text

            write_text(path, text)
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


def _decisions(result: RunResult, selection: SelectionOutcome | Iterable[str]) -> tuple[dict[str, str], str]:
    """Each node's decision and the aggregate its selection value follows."""
    if isinstance(selection, SelectionOutcome):
        decision = {name: "kept" for name in selection.selected}
        decision.update({d.node: "dropped_verified" for d in selection.dropped})
        decision.update({name: "added_verified" for name in getattr(selection, "added", ())})
        return decision, selection.aggregate
    aggregate = result.extras.get("aggregate", "mean_abs") if isinstance(result.extras, dict) else "mean_abs"
    return {name: "kept" for name in selection}, str(aggregate)


def scores_table(result: RunResult, selection: SelectionOutcome | Iterable[str] = ()) -> Table:
    """Every scored node in the engine's rank order: the circuit's numbers and those that missed it.

    `selection` is the SelectionOutcome (or just the names in the circuit). `rank` is the engine's
    rank, or the position by |score| when the engine left it 0.
    """
    return Table(SCORE_COLUMNS, score_rows(result, selection))


def score_rows(result: RunResult, selection: SelectionOutcome | Iterable[str] = (),
               nodes: Iterable[NodeScore] | None = None) -> Iterator[dict[str, Any]]:
    """The scores table's rows one at a time (the CSV writer streams them: a run may score millions of nodes);
    `nodes`: only these of the result's nodes (the summaries show a few)."""
    decision, aggregate = _decisions(result, selection)
    rank = rank_of(result.nodes)
    for score in result.nodes if nodes is None else nodes:
        node = score.node
        yield {
            "node": score.name,
            "layer": node.layer,
            "kind": node.kind.value,
            "index": node.index,
            "position": None if node.position is None else str(node.position),
            "estimate": float(score.estimate),
            "score": float(score.score),
            "method": score.method,
            "rank": rank(score),
            "verified_effect": None if score.verified_effect is None else float(score.verified_effect),
            "in_circuit": decision.get(score.name) in ("kept", "added_verified"),
            "selection_value": float(selection_value(score, aggregate)),
            "decision": decision.get(score.name, "not_selected"),
        }


def shown_rows(result: RunResult, selection: SelectionOutcome, top: int, verified: bool = False
               ) -> list[dict[str, Any]]:
    """The rows a summary shows, in rank order, without making every node's row: the `top` best-ranked, the
    circuit's nodes and (with `verified`) every verified node."""
    by_name = result.by_name()
    picked = {n.name: n for n in result.nodes[:top]}
    picked.update((name, by_name[name]) for name in selection.selected if name in by_name)
    if verified:
        picked.update((n.name, n) for n in verified_nodes(result.nodes))
    return list(score_rows(result, selection, ranked(list(picked.values()))))


def write_rows_csv(path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]], *,
                   extra: dict[str, str] | None = None) -> Path:
    """Write rows as CSV to `path` atomically, one row at a time (as Table.to_csv writes them)."""
    from atpdsl.outputs.atomic import export_path
    from atpdsl.outputs.streams import text_sink

    with text_sink(path) as text:
        _write_rows(text, columns, rows, extra or {})
    return export_path(path)


def _write_rows(out: Any, columns: Sequence[str], rows: Iterable[dict[str, Any]], extra: dict[str, str]) -> None:
    """The header and one line per row; `extra` adds constant columns at the end."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, *extra])
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns] + list(extra.values()))


def edges_table(result: RunResult, in_circuit: Iterable[tuple[str, str]] = ()) -> Table:
    """Every computed edge, in the engine's order; `in_circuit` marks those the graph kept."""
    members = set(in_circuit)
    rows = [
        {
            "source": e.source,
            "target": e.target,
            "weight": None if e.weight is None else float(e.weight),
            "in_circuit": (e.source, e.target) in members,
            "verified_weight": None if e.verified is None else float(e.verified),
            "channel": e.channel or None,
        }
        for e in result.edges
    ]
    return Table(EDGE_COLUMNS, rows)


def pairs_table(result: RunResult) -> Table:
    """Per-pair signed estimates, ranking scores and (where verified) measured effects, one row per node and pair."""
    rows = []
    for score in ranked(result.nodes):
        if not score.per_pair:
            continue
        verified = score.verified_per_pair or ()
        magnitudes = score.per_pair_score or ()
        for i, value in enumerate(score.per_pair):
            rows.append(
                {
                    "node": score.name,
                    "pair": i,
                    "estimate": float(value),
                    "verified_effect": float(verified[i]) if i < len(verified) else None,
                    "score": float(magnitudes[i]) if i < len(magnitudes) else None,
                }
            )
    return Table(PAIR_COLUMNS, rows)
