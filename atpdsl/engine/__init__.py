"""The engine: runs a Plan on a model through nnsight and returns a RunResult.

Structure (torch and nnsight are imported lazily, on the first `execute`):

- `load.py`     ModelRef -> `Loaded`: transformers model (eager attention, eval, frozen parameters) wrapped
                in `nnsight.TransformersModel`, its tokenizer, config, `arch.Arch` and `arch.Geometry`.
- `data.py`     pairs -> token ids (equal lengths, or aligned through template slots), answer tokens,
                metric positions; left-padded `Batch`es with attention mask and mask-derived position ids.
- `nodes.py`    the plan's node groups -> `NodeTable`: every node, grouped per site into `Block`s (one kind,
                its units, summed or per position). Per-node work is vectorized per block.
- `trace.py`    `run_trace`: THE one generic nnsight trace. Driven by data: `TraceSite`s (module path,
                input/output, optional `.source` ops and tuple element) read in forward order, optional patch
                functions per site, a metric on the logits, and `Backward` blocks (`with metric.backward()`),
                each reading gradients in reverse order and optionally zeroing some (GradDrop).
- `context.py`  `Context` (one run's shared state), `align` (corrupt values onto clean positions),
                `Accumulator` (streaming per-node sums over batches).
- `atp.py`      AtP per batch: corrupt trace (no grad) + clean trace with one backward, then
                `atp_estimates` = sum over a node's columns of (corrupt - clean) * grad.
- `exact.py`    exact activation patching: K patched copies of the clean batch per forward (`method exact`,
                `verify top K`, and random node subsets for the false-negative diagnostic); nodes whose corrupt
                value equals the clean one are not run (effect 0).
- `atpstar.py`  AtP*: the QK fix and GradDrop as one `atp.Correction` on the kept clean graph, and `diagnose`
                (the false-negative bound); the math lives in qkfix.py, graddrop.py, false_negatives.py.
- `run.py`      `execute(plan)`: the above in order, ranking (aggregate mean_abs / abs_mean / per_pair),
                verification and its summary, the diagnostic, timings, provenance.
- `emit.py`     `emit_python(plan)`: the same AtP as a standalone nnsight program.

Extending:
- A new site or node kind: one `SiteTemplate` row in `atpdsl/arch.py` (module path, input/output, layout
  of units in the last dimension) and the kind in `nodes.SCORED_KINDS`; AtP, exact patching and
  verification then work unchanged.
- A correction (atp.Correction, as atpstar.AtpStar): extra `TraceSite`s (`order=(layer, stage)`), extra
  `Backward` blocks (run_trace supports `zero={site keys}` to cut gradients inside nnsight backward blocks),
  or `keep_graph = True` to get the clean run's graph-attached values in `apply(ctx, run, est)`, which edits
  the per-pair estimates and may return per-pair ranking magnitudes; optional `scores(ctx, aggregate, n)`.
  `run._corrections` builds them from the plan's MethodSpec (atpstar.corrections_for).
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
    """A standalone nnsight program equivalent to the plan's AtP run (prints one JSON line per node)."""
    from atpdsl.engine.emit import emit_python as _emit

    return _emit(plan)
