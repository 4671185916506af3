"""The executor: run a plan's steps in order, batch-scope steps once per batch, then the run-scope steps.

Each step kind is a record in `atpdsl.lowering.STEP_KINDS` naming its implementation `run(state, step, work)`
(work is the batch's BatchWork, None for run-scope steps) and optionally `prepare(state, step)`, called once per
kind before the first batch, in the plan's order (to add trace sites or build what every batch reuses). The executor does nothing a
step does not say: what runs is exactly the plan's list, and `RunState.records` lists what ran, with timings.
"""
from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable

from atpdsl.errors import EngineError
from atpdsl.lowering import STEP_KINDS
from atpdsl.engine.context import Accumulator, Context
from atpdsl.engine.data import pair_sum
from atpdsl.engine.state import BatchWork, ExtraSites, Progress, RunState, SpillList

__all__ = ["implementation", "preparation", "prepare_steps", "run_batch", "execute_steps", "fold", "new_state"]


@functools.cache
def _resolve(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def implementation(kind: str) -> Callable:
    """The engine function that runs a step kind."""
    record = STEP_KINDS.get(kind)
    if record is None:
        raise EngineError(f"the plan has a step of unknown kind {kind!r} (known: {', '.join(STEP_KINDS)})")
    return _resolve(record.impl)


def preparation(kind: str) -> Callable | None:
    """A step kind's optional `prepare(state, step)`, run once before the first batch."""
    record = STEP_KINDS[kind]
    return _resolve(record.prepare) if record.prepare else None


def fold(state: RunState, work: BatchWork, last: bool = False) -> None:
    """Add a finished batch to the run: its per-pair numbers, ranking magnitudes, metric rows, sums and kept items
    (the `last` batch's stay in memory: the run steps read them next, so writing them to disk would only cost)."""
    if work.est is None:
        raise EngineError("a batch finished without estimates: the plan has no scoring step")
    est = work.est
    if work.batch.per_pair > 1 and est.shape[0] == work.batch.n_rows:  # per model row: a pair's is their sum
        est = pair_sum(work.batch, est)
    state.acc.add(est, work.magnitude)
    if work.clean_rows is not None and work.corrupt_rows is not None:
        state.acc.add_metrics(work.clean_rows, work.corrupt_rows)
    for name, value in work.sums.items():
        state.sums[name] = value.clone() if name not in state.sums else state.sums[name] + value
    for name, item in work.kept.items():
        state.kept.setdefault(name, SpillList()).append(item, in_memory=last)


def _record(work: BatchWork) -> dict:
    """What a checkpoint stores of a finished batch: everything `fold` adds to the run."""
    return {"est": work.est, "magnitude": work.magnitude, "clean_rows": work.clean_rows,
            "corrupt_rows": work.corrupt_rows, "sums": work.sums,
            "kept": {k: v.to_record() for k, v in work.kept.items()}}


def _replay(state: RunState, batch, record: dict) -> BatchWork:
    """A stored batch as the work `fold` takes (kept items rebuilt by their step kind's `from_record`)."""
    from atpdsl.engine.edge_reads import EdgeReads

    kept = {k: EdgeReads.from_record(batch, v) for k, v in record["kept"].items()}
    return BatchWork(batch, est=record["est"], magnitude=record["magnitude"], clean_rows=record["clean_rows"],
                     corrupt_rows=record["corrupt_rows"], sums=record["sums"], kept=kept)


def prepare_steps(state: RunState) -> None:
    """Run each step kind's `prepare` once, in the plan's order (before any batch)."""
    prepared: set[str] = set()
    for step in state.steps:
        prep = preparation(step.kind)
        if prep is not None and step.kind not in prepared:
            prep(state, step)
            prepared.add(step.kind)


def run_batch(state: RunState, batch, kinds: set[str] | None = None, tick: Callable[[], None] | None = None
              ) -> BatchWork:
    """Run one batch's batch-scope steps (only those of `kinds` when given) and return its work, not yet folded.
    The caller frees the clean graph (`work.clean.live.clear()`) when done with it."""
    work = BatchWork(batch)
    for step in state.steps:
        if step.scope != "batch" or (kinds is not None and step.kind not in kinds):
            continue
        t0 = time.perf_counter()
        implementation(step.kind)(state, step, work)
        state.record(step, time.perf_counter() - t0)
        if tick is not None:
            tick()
    return work


def execute_steps(state: RunState) -> None:
    """Run every step of the plan (see the module docstring)."""
    prepare_steps(state)
    batches = state.ctx.batches
    n_batch_steps = sum(1 for s in state.steps if s.scope == "batch")
    total, done = len(batches) * n_batch_steps, [0]

    def tick() -> None:
        done[0] += 1
        state.report("score", done[0], total)

    cp = state.checkpoint
    resumed = cp.saved_batches() if cp is not None else 0
    for i, batch in enumerate(batches):
        if i < resumed:  # ran in an earlier, interrupted process: its steps count, their time is not this run's
            fold(state, _replay(state, batch, cp.load_batch(i)))
            for step in state.steps:
                if step.scope == "batch":
                    state.record(step, 0.0)
            done[0] += n_batch_steps
            continue
        work = None
        try:
            work = run_batch(state, batch, tick=tick)
        finally:
            if work is not None and work.clean is not None:
                work.clean.live.clear()  # frees the clean graph kept for the corrections
        fold(state, work, last=i == len(batches) - 1)
        if cp is not None:
            cp.save_batch(i, _record(work))
        work = None  # else the last batch's traces (and its reads, when kept on disk) live through the run steps
    if cp is not None:
        cp.resumed_batches = min(resumed, len(batches))
    for step in state.steps:
        if step.scope == "run":
            t0 = time.perf_counter()
            implementation(step.kind)(state, step, None)
            state.record(step, time.perf_counter() - t0)


def new_state(ctx: Context, *, progress: Progress | None = None) -> RunState:
    """A fresh RunState for a context's plan (per-pair rows kept when the plan asks for them)."""
    plan = ctx.plan
    keep = (plan.write_per_pair or plan.method.aggregate == "per_pair"
            or (plan.method.name == "exact" and plan.verification is not None))
    return RunState(ctx, plan.steps, Accumulator(ctx.table.size, keep), progress=progress,
                    extra=ExtraSites({s.key for s in ctx.sites}))
