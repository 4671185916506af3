"""The checks after ranking, as run-scope steps: `verify` (exact patching of the best-ranked nodes),
`verify_adaptive` (verify until the diagnostic is confident) and `diagnose` (what the unverified nodes could hide).

Verified effects use the evaluation metric when the plan has one, else the metric; they are per pair, so every
aggregate can compare like with like (atpdsl.circuit.select).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from atpdsl.plan import Plan, Step
from atpdsl.engine.context import Context
from atpdsl.engine.exact import batch_refs, exact_effects
from atpdsl.engine.finite import check_rows
from atpdsl.engine.state import BatchWork, RunState

__all__ = ["verify", "verify_step", "verify_adaptive_step", "diagnose_step", "bounded_quantity"]

Progress = Callable[[str, int, int], None]


def verify(ctx: Context, columns: Sequence[int], *, progress: Progress | None = None, checkpoint=None
           ) -> torch.Tensor:
    """Exact per-pair effects [n_pairs, len(columns)] with the evaluation metric (or the metric); with a
    checkpoint, each batch's effects are stored as they finish and reused by a resumed run."""
    spec = ctx.plan.eval_metric or ctx.plan.metric
    eval_ = ctx.plan.eval_metric is not None
    needed = sorted({ctx.table.block_of(c).site for c in columns})
    sites = [ctx.sites[i] for i in needed]
    out = []
    total = len(ctx.batches) * len(columns)
    for i, batch in enumerate(ctx.batches):
        def tick(done: int, base: int = i * len(columns)) -> None:
            if progress:
                progress("verify", base + done, total)

        def compute(batch=batch, tick=tick) -> torch.Tensor:
            refs = batch_refs(ctx, batch, sites, spec, eval_=eval_)
            effects = exact_effects(ctx, batch, columns, refs, spec, eval_=eval_, progress=tick)
            check_rows(ctx, batch, effects, "a verified node's exact effect")
            return effects

        if checkpoint is None:
            out.append(compute())
        else:
            out.append(checkpoint.memo("verify", ("verify", i, tuple(columns)), compute))
    return torch.cat(out) if out else torch.zeros((0, len(columns)), dtype=torch.float64)


def verify_step(state: RunState, step: Step, work: BatchWork | None = None) -> None:
    """Exact effects of the `top` best-ranked nodes (reused from `method exact` when they are already measured)."""
    top = state.order[: int(step.param("top"))].tolist()
    rows = state.acc.per_pair() if state.plan.method.name == "exact" and state.plan.eval_metric is None else None
    effects = rows[:, top] if rows is not None else verify(state.ctx, top, progress=state.progress,
                                                           checkpoint=state.checkpoint)
    state.verified.update({c: effects[:, j] for j, c in enumerate(top)})


def bounded_quantity(plan: Plan) -> str:
    """What the diagnostic bounds: the same kind of number the selection compares with its cut (|mean effect|
    under `aggregate abs_mean`, else the mean of |effect| per pair)."""
    return "abs_mean" if plan.method.aggregate == "abs_mean" else "mean_abs"


def _selection_cut(state: RunState):
    """cut_fn(verified effects) -> the cut the plan's selection needs, with those effects measured."""
    from atpdsl.circuit.select import DEFAULT_SELECTION, candidates
    from atpdsl.engine.result import node_scores

    selection = state.plan.selection or DEFAULT_SELECTION

    def cut_fn(verified: dict[int, torch.Tensor]) -> float:
        state.verified.update(verified)
        return candidates(node_scores(state), selection)[1]

    return cut_fn


def verify_adaptive_step(state: RunState, step: Step, work: BatchWork | None = None) -> None:
    """Verify until the diagnostic's bound is below the selection cut or the budget of exact patches is spent."""
    from atpdsl.engine.adaptive import adaptive_verify

    plan = state.plan
    out = adaptive_verify(state.ctx, state.order.tolist(), cut_fn=_selection_cut(state),
                          budget=int(step.param("budget")),
                          first=int(step.param("first")), diagnosis=plan.diagnosis, seed=plan.seed,
                          quantity=bounded_quantity(plan), progress=state.progress)
    state.verified.update(out.verified)
    summary = {**(out.diagnosis or {}), "adaptive": out.to_dict()}
    if out.bound is not None:
        state.diagnosis = (out.bound, summary)
    else:
        state.extras["adaptive_verification"] = out.to_dict()  # every node verified: no bound to state


def diagnose_step(state: RunState, step: Step, work: BatchWork | None = None) -> None:
    """Bound what the unverified nodes could still change (engine/diagnose.py: exhaustive, or random subsets with
    suspects patched alone and additivity checks)."""
    from atpdsl.engine.diagnose import diagnose

    d = state.plan.diagnosis
    unverified = [c for c in state.order.tolist() if c not in state.verified]
    state.diagnosis = diagnose(state.ctx, unverified, samples=d.samples, confidence=d.confidence,
                               inclusion=d.inclusion, seed=state.plan.seed, quantity=bounded_quantity(state.plan),
                               progress=state.progress)
