"""`execute(plan)`: load the model, encode the pairs, run the plan's steps in order, and build the RunResult."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from atpdsl.circuit.scores import RunResult
from atpdsl.errors import EngineError
from atpdsl.lowering import edges_allowed, same_program, steps_for
from atpdsl.plan import Plan
from atpdsl.engine.checkpoint import Checkpoint
from atpdsl.engine.context import make_context
from atpdsl.engine.load import Loaded, load_model
from atpdsl.engine.placement import check_attention, check_fits, memory_guard
from atpdsl.engine.result import build_result
from atpdsl.engine.state import Progress
from atpdsl.engine.steps import execute_steps, new_state
from atpdsl.engine.workload import with_workload

__all__ = ["execute", "complete_plan"]


def complete_plan(plan: Plan, loaded: Loaded) -> Plan:
    """The plan whose steps this run executes.

    A plan without steps (built by hand) gets them lowered for the loaded model; a plan compiled without the
    model's config (a hub id offline: the depth, and with it GradDrop's terms, were only estimated) is lowered
    again with the real sizes. A plan whose steps do not say what its settings ask for (changed with
    `dataclasses.replace` instead of `atpdsl.lowering.replan`) is refused: the plan must be the program."""
    plan = with_workload(plan, loaded)  # the costs follow the loaded model (atpdsl.engine.workload)
    edges_ok = bool(dict(plan.extras).get("edges_allowed", True)) and edges_allowed(loaded.arch, loaded.config,
                                                                                    plan.method.name)
    expected = steps_for(plan, loaded.geom, edges_ok)
    if not plan.steps or plan.geometry is None:
        return replace(plan, steps=expected, geometry=loaded.geom)
    if plan.geometry != loaded.geom:
        raise EngineError(f"the plan was compiled for a model of sizes {plan.geometry} but {loaded.location} has "
                          f"{loaded.geom}; compile the spec again")
    if not same_program(plan.steps, expected):
        raise EngineError("the plan's steps do not match its settings (changed with dataclasses.replace?); "
                          "use atpdsl.lowering.replan(plan, ...), which lowers the steps again")
    return plan


def _check_method(plan: Plan) -> None:
    if plan.method.name not in ("atp", "atp*", "exact", "relp"):
        raise EngineError(f"unknown method {plan.method.name!r} (known: atp, atp*, exact, relp)")
    if plan.method.name != "exact" and plan.metric.kind == "kl":
        raise EngineError(
            "metric kl has zero gradient at the clean run (its minimum), so every AtP estimate would be 0; "
            "attribute with logit_diff, logprob, prob or loss and use kl as `eval metric`, or use `method exact`"
        )


def execute(plan: Plan, *, progress: Progress | None = None, loaded: Loaded | None = None,
            fresh: bool = False) -> RunResult:
    """Run a plan's steps (see atpdsl.engine.steps) and return its RunResult. `loaded` reuses a loaded model.

    A plan with exports keeps a checkpoint beside them (atpdsl.engine.checkpoint) and resumes from one left by an
    interrupted run of the same plan, reporting `progress("resumed", batches, total)`; `fresh` ignores it."""
    t_start = time.perf_counter()
    _check_method(plan)
    torch.manual_seed(plan.seed)
    t0 = time.perf_counter()
    if loaded is None:
        check_fits(plan)  # the memory plan against the device, before any weight is loaded (engine.placement)
        loaded = load_model(plan.model)
    load_s = time.perf_counter() - t0
    checkpoint = Checkpoint.open(plan, loaded.location, fresh=fresh)  # keyed by the plan as compiled
    plan = complete_plan(plan, loaded)
    check_attention(plan, loaded.hf)  # sdpa only where no step reads the pattern (engine.placement)
    t0 = time.perf_counter()
    ctx = make_context(plan, loaded)
    ctx.timings["load"] = load_s
    ctx.timings["tokenize"] = time.perf_counter() - t0
    state = new_state(ctx, progress=progress)
    state.checkpoint = checkpoint
    if checkpoint.enabled:
        ctx.memo = checkpoint.memo
    resumed = state.checkpoint.saved_batches()
    if resumed and progress is not None:
        progress("resumed", min(resumed, len(ctx.batches)), len(ctx.batches))
    if plan.method.name == "relp":
        from atpdsl.engine.relp import relp_context

        state.parts["gradient_rule"] = lambda: relp_context(loaded)
    try:
        with memory_guard(plan, loaded.device):  # out of memory: a MemoryPlanError with the numbers (exit 1)
            execute_steps(state)
    finally:
        for kept in state.kept.values():
            kept.close()
    ctx.timings["total"] = time.perf_counter() - t_start
    return build_result(state)
