"""A finished run as the outputs see it: plan, engine numbers, selection, circuit graph, exports.

It lives here, below the pipeline, so that loading a saved result (`jsonio.load_result`) needs no
import of `atpdsl.pipeline`. It is data only: writing it is the writers' job (`writer.write`,
`jsonio.dumps`), so nothing here imports them back (no import cycle). The pipeline's Result adds
`export()` and `to_json()` on top of it. Importing this module is light.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from atpdsl.circuit.scores import RunResult
from atpdsl.circuit.select import SelectionOutcome
from atpdsl.plan import Plan

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

    from atpdsl.outputs.table import Table
    from atpdsl.outputs.writer import ExportOutcome

__all__ = ["Result"]


@dataclass(frozen=True, eq=False)
class Result:
    """A finished run: the plan, the engine's numbers, the selection, the circuit graph, the exports.

    `plan` is None for a result loaded from a file whose plan could not be rebuilt.
    `timings` are the pipeline's own phases (compile, execute, select, graph, export), in seconds;
    the engine's phases are in `result.timings`.
    """

    plan: Plan | None
    result: RunResult
    graph: "nx.DiGraph"
    selection: SelectionOutcome
    exports: tuple["ExportOutcome", ...] = ()
    timings: tuple[tuple[str, float], ...] = ()
    plan_dict: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def scores(self) -> "Table":
        """Every scored node, one row each (see atpdsl.outputs.table.SCORE_COLUMNS)."""
        from atpdsl.outputs.table import scores_table

        return scores_table(self.result, self.selection)

    @property
    def edges(self) -> "Table":
        """Every computed edge attribution (empty when the run computed none)."""
        from atpdsl.outputs.table import edges_table

        return edges_table(self.result, self.graph.edges)

    @property
    def failed(self) -> tuple["ExportOutcome", ...]:
        """The exports that could not be written."""
        return tuple(e for e in self.exports if e.error is not None)

    @property
    def all_timings(self) -> tuple[tuple[str, float], ...]:
        """Engine phases then pipeline phases, for `--profile`."""
        return tuple(self.result.timings) + tuple(self.timings)
