"""CSV in and out: the scores table (one row per scored node), plus edges and per-pair files.

`x.csv` holds `SCORE_COLUMNS` plus a constant `sign_convention` column (so the file states its
convention without a comment line that would trip CSV readers). Beside it, `x-edges.csv` when the
run computed edge attributions (every edge, `in_circuit` marking those the graph kept), and
`x-pairs.csv` (one row per node and pair: estimate, ranking score, measured effect) when the spec
keeps per-pair numbers (`keep per_pair` or `aggregate per_pair`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from atpdsl.circuit.scores import SIGN_CONVENTION
from atpdsl.outputs.table import SCORE_COLUMNS, Table, edges_table, pairs_table, score_rows, write_rows_csv

if TYPE_CHECKING:  # pragma: no cover
    from atpdsl.outputs.result import Result

__all__ = ["write_csv", "export_csv", "read_csv", "companion", "wants_pairs"]


def companion(path: str | Path, suffix: str) -> Path:
    """`out/x.csv` -> `out/x-edges.csv` for suffix `edges`."""
    p = Path(path)
    return p.with_name(f"{p.stem}-{suffix}{p.suffix}")


def wants_pairs(res: "Result") -> bool:
    """Whether the spec asked for per-pair numbers in the exports."""
    plan = res.plan
    if plan is None:
        return any(n.per_pair for n in res.result.nodes)
    return plan.write_per_pair or plan.method.aggregate == "per_pair"


def write_csv(res: "Result", path: str | Path) -> list[Path]:
    """Write the scores table and its companions (each file atomically); returns every file written."""
    path = Path(path)
    write_rows_csv(path, SCORE_COLUMNS, score_rows(res.result, res.selection),
                   extra={"sign_convention": SIGN_CONVENTION})
    written = [path]
    if res.result.edges:
        edges = companion(path, "edges")
        edges_table(res.result, res.graph.edges).to_csv(edges)
        written.append(edges)
    if wants_pairs(res):
        pairs = companion(path, "pairs")
        pairs_table(res.result).to_csv(pairs)
        written.append(pairs)
    return written


export_csv = write_csv
"""The format registry's writer (see atpdsl.outputs.formats)."""


def read_csv(path: str | Path) -> Table:
    """Read a table written by `write_csv` (scores, edges or pairs), values typed again."""
    return Table.from_csv(path, drop=("sign_convention",))
