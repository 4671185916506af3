"""Run a spec end to end: compile -> execute -> select -> graph -> exports, and load saved results.

Importing this module is light (no torch, no networkx, no matplotlib): each step imports what it
needs when it runs, so `import atpdsl` stays fast.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

from atpdsl.circuit.scores import RunResult
from atpdsl.errors import AtpError
from atpdsl.outputs.result import Result as OutputsResult
from atpdsl.plan import Plan

__all__ = ["Result", "Progress", "run", "run_plan", "finish", "load", "compile_spec", "execute_plan"]

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total), called by the engine as its loops advance."""


@dataclass(frozen=True, eq=False)
class Result(OutputsResult):
    """A finished run (atpdsl.outputs.result.Result) that can also write itself: `export()` and `to_json()`."""

    def export(self, path: str | Path, fmt: str | None = None) -> list[Path]:
        """Write one export (format from the extension unless `fmt` is given); returns the files written."""
        from atpdsl.outputs.writer import write

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


def execute_plan(plan: Plan, progress: Progress | None = None, *, fresh: bool = False) -> RunResult:
    """Run the engine on a plan (imports torch and nnsight): every step the plan lists, edges included. A run
    that writes exports resumes from the state an interrupted run of the same plan left (`fresh`: start over)."""
    from atpdsl.engine import execute

    return execute(plan, progress=progress, fresh=fresh)


def _discard_state(plan: Plan, run_result: RunResult) -> None:
    """Every output is written: the run's checkpoint is no longer needed."""
    from atpdsl.engine.checkpoint import discard

    location = dict(run_result.provenance).get("model_location")
    if location is not None:
        discard(plan, str(location))


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
    edge_rule = plan.edges.selection if plan is not None and plan.edges is not None else None
    outcome = select(run_result, plan.selection if plan is not None else None, aggregate=aggregate, edges=edge_rule)
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
        if not result.failed:
            _discard_state(plan, run_result)
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

    saved = load_result(path)
    return Result(**{f.name: getattr(saved, f.name) for f in fields(saved)})
