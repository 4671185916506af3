"""The engine: runs a Plan's steps on a model through nnsight and returns a RunResult.

torch and nnsight are imported lazily, on the first `execute`. The plan is the program: `atpdsl.lowering`
lowers a spec into typed steps, each naming its implementation here; `steps.execute_steps` runs them in order
and records what ran.

- `load.py`        ModelRef -> `Loaded`: the transformers model (eager attention, eval, frozen parameters) in
                   `nnsight.TransformersModel`, its tokenizer, config, architecture record (atpdsl.arch) and sizes.
- `data.py`        pairs -> token ids, answer tokens, metric positions; left-padded `Batch`es.
- `node_table.py`  the plan's node groups -> `NodeTable`: every node, grouped per site into blocks.
- `trace.py`       `run_trace`: the one generic nnsight trace, driven by `TraceSite` records.
- `context.py`     `Context` (one run's shared inputs), `align`, `Accumulator` (streaming sums over batches).
- `state.py`       `RunState` (the run as its steps advance it) and `BatchWork` (what one batch's steps share).
- `steps.py`       the executor: prepare each step kind once, run batch-scope steps per batch (with a checkpoint
                   after each), then run-scope steps.
- `atp.py`         the corrupt forward and the clean forward + backward steps, and AtP estimates.
- `corrections/`   AtP*'s QK fix, norm fix and GradDrop terms as steps (math in qkfix.py, normfix.py, graddrop.py).
- `exact.py`       exact activation patching (many patched copies per forward), and `method exact`'s steps.
- `ranking.py`     the `rank` step (aggregates), `verification.py` the `verify`, `verify_adaptive` and `diagnose`
                   steps (the diagnostic's procedure in diagnose.py and false_negatives.py).
- `edges.py`       edge attribution math; `edge_reads.py` its steps (reads kept from the AtP passes themselves).
- `checkpoint.py`  a killed run resumes from its state folder with the same numbers.
- `result.py`      the final state -> RunResult; `run.py` `execute(plan)`; `emit.py` `--emit python`.

Extending: a new step kind is one record in `atpdsl.lowering.STEP_KINDS` (its implementation and optional
`prepare` by import path) plus its function here; a new architecture is one record in `atpdsl.arch`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from atpdsl.plan import Plan
    from atpdsl.circuit.scores import RunResult

__all__ = ["execute", "emit_python"]


def execute(plan: "Plan", *, progress: Callable[[str, int, int], None] | None = None, **kwargs) -> "RunResult":
    """Run a compiled Plan and return its RunResult (nodes sorted by score, rank 1 = best)."""
    from atpdsl.engine.run import execute as _execute

    return _execute(plan, progress=progress, **kwargs)


def emit_python(plan: "Plan") -> str:
    """A standalone plain-nnsight program that runs the plan's steps (every method) and prints one JSON line per node."""
    from atpdsl.engine.emit import emit_python as _emit

    return _emit(plan)
