"""Run a spec end to end: compile -> execute (+ edges) -> select -> graph -> exports, and load saved results.

Importing this module is light (no torch, no networkx, no matplotlib): each step imports what it
needs when it runs, so `import atpdsl` stays fast.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from atpdsl.errors import AtpError
from atpdsl.plan import Plan
from atpdsl.circuit.scores import RunResult
from atpdsl.circuit.select import SelectionOutcome

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

    from atpdsl.outputs import ExportOutcome
    from atpdsl.outputs.table import Table

__all__ = [
    "Result", "Progress", "run", "run_plan", "finish", "load", "compile_spec", "execute_plan", "add_edges",
    "wants_edges", "EDGE_LIMIT",
]

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total), called by the engine as its loops advance."""


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

        return scores_table(self.result, self.selection.selected)

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

    def export(self, path: str | Path, fmt: str | None = None) -> list[Path]:
        """Write one export (format from the extension unless `fmt` is given); returns the files written."""
        from atpdsl.outputs import write

        return write(self, path, fmt)

    def to_json(self) -> str:
        """The JSON result document (what a `.json` export holds)."""
        from atpdsl.outputs.jsonio import dumps

        return dumps(self)


def compile_spec(spec: str | Path | None = None, *, text: str | None = None, out_dir: str | Path | None = None) -> Plan:
    """Parse, check and compile a spec file (or spec text) into a Plan; raises SpecError."""
    from atpdsl.language import compiler

    out = None if out_dir is None else str(out_dir)
    if text is not None:
        if spec is not None:
            raise AtpError("give either a spec path or text=, not both")
        return compiler.compile_text(text, filename="<string>", base_dir=".", out_dir=out)
    if spec is None:
        raise AtpError("no spec: give a path to a .atp file or text=")
    path = Path(spec)
    if not path.is_file():
        raise AtpError(f"spec file not found: {str(spec)!r}")
    return compiler.compile_file(path, out_dir=out)


EDGE_LIMIT = 200
"""Edge attributions are computed when at most this many nodes are selected (and the method is atp or atp*)."""


def wants_edges(plan: Plan) -> bool:
    """Whether a run of this plan computes edge attributions among its selected nodes (a `kl` metric is
    refused by the engine before any model loads, so it gets none)."""
    from atpdsl.language.compiler import computes_edges

    return computes_edges(plan.method, plan.metric.kind)


def execute_plan(plan: Plan, progress: Progress | None = None) -> RunResult:
    """Run the engine on a plan (imports torch and nnsight), then edge attributions among the selected nodes.

    The model is loaded once and shared by both steps. Edges come only for `method atp` / `atp*` with at
    most EDGE_LIMIT selected nodes; otherwise `RunResult.edges` stays empty and the graph falls back to
    unweighted residual-stream edges.
    """
    from atpdsl.engine import execute

    if not wants_edges(plan):
        return execute(plan, progress=progress)
    from atpdsl.engine.load import load_model

    t0 = time.perf_counter()
    loaded = load_model(plan.model)
    load_s = time.perf_counter() - t0
    run_result = execute(plan, progress=progress, loaded=loaded)
    timings = dict(run_result.timings)
    timings["load"] = timings.get("load", 0.0) + load_s
    if "total" in timings:
        timings["total"] += load_s
    run_result = replace(run_result, timings=tuple(timings.items()))
    return add_edges(plan, run_result, loaded=loaded, progress=progress)


def add_edges(plan: Plan, run_result: RunResult, *, loaded: Any = None, progress: Progress | None = None) -> RunResult:
    """The run result with edge attributions among the nodes the plan's selection keeps (see EDGE_LIMIT).

    `loaded` is the engine's loaded model (`atpdsl.engine.load.Loaded`), reused when given. The selection
    is the one `finish` makes (same rule, same scores), so every computed edge has both ends in the graph.
    """
    from atpdsl.circuit.select import select

    if not wants_edges(plan):
        return run_result
    outcome = select(run_result, plan.selection, aggregate=plan.method.aggregate)
    if len(outcome.selected) > EDGE_LIMIT:
        return run_result
    from atpdsl.engine.edges import edge_scores

    by_name = run_result.by_name()
    nodes = [by_name[name].node for name in outcome.selected]
    t0 = time.perf_counter()
    edges = edge_scores(plan, nodes, loaded=loaded, progress=progress)
    seconds = time.perf_counter() - t0
    timings = [(k, v) for k, v in run_result.timings if k != "total"]
    timings.append(("edges", round(seconds, 6)))
    total = dict(run_result.timings).get("total")
    if total is not None:
        timings.append(("total", round(total + seconds, 6)))
    return replace(run_result, edges=edges, timings=tuple(timings))


def finish(
    plan: Plan | None,
    run_result: RunResult,
    *,
    write_exports: bool = True,
    timings: tuple[tuple[str, float], ...] = (),
) -> Result:
    """Select, build the graph and write the plan's exports: everything after the engine.

    Exports never stop each other: a failing one is recorded in `Result.exports` (see
    `Result.failed`) and the others, the JSON result first, are still written.
    """
    from atpdsl.circuit.graph import build_graph
    from atpdsl.circuit.select import select

    clock = list(timings)
    t0 = time.perf_counter()
    aggregate = plan.method.aggregate if plan is not None else "mean_abs"
    outcome = select(run_result, plan.selection if plan is not None else None, aggregate=aggregate)
    t1 = time.perf_counter()
    graph = build_graph(run_result, outcome, plan)
    t2 = time.perf_counter()
    clock += [("select", t1 - t0), ("graph", t2 - t1)]
    result = Result(plan, run_result, graph, outcome, timings=tuple(clock))
    if write_exports and plan is not None and plan.exports:
        from atpdsl.outputs import write_all

        outcomes = write_all(result, plan.exports, spec_file=plan.spec_file)
        clock.append(("export", time.perf_counter() - t2))
        result = replace(result, exports=outcomes, timings=tuple(clock))
    return result


def run_plan(plan: Plan, *, progress: Progress | None = None, write_exports: bool = True) -> Result:
    """Execute a compiled plan and finish it (selection, graph, exports)."""
    t0 = time.perf_counter()
    run_result = execute_plan(plan, progress)
    return finish(plan, run_result, write_exports=write_exports, timings=(("execute", time.perf_counter() - t0),))


def run(
    spec: str | Path | None = None,
    *,
    text: str | None = None,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    write_exports: bool = True,
) -> Result:
    """Run a spec: `atpdsl.run("spec.atp")` or `atpdsl.run(text=...)`.

    Returns a `Result` with `.graph` (networkx.DiGraph), `.scores` (a Table), `.plan` and
    `.result` (the engine's RunResult). Writes the spec's exports (under `out_dir` when given)
    unless `write_exports=False`; a failed export is reported in `.failed` and as a
    RuntimeWarning, never raised, so nothing computed is lost. Raises SpecError for a bad spec and other AtpErrors for bad input.
    """
    t0 = time.perf_counter()
    plan = compile_spec(spec, text=text, out_dir=out_dir)
    t1 = time.perf_counter()
    run_result = execute_plan(plan, progress)
    t2 = time.perf_counter()
    result = finish(plan, run_result, write_exports=write_exports, timings=(("compile", t1 - t0), ("execute", t2 - t1)))
    for failure in result.failed:
        warnings.warn(f"export {failure.path} failed: {failure.error}", RuntimeWarning, stacklevel=2)
    return result


def load(path: str | Path) -> Result:
    """A saved `.json` result, ready to show or export again (no model is loaded)."""
    from atpdsl.outputs.jsonio import load_result

    return load_result(path)
