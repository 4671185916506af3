"""Turn a run's final state into its RunResult: one NodeScore per node in rank order, the checks' summaries, the
steps that ran with their timings, and the provenance of every number."""
from __future__ import annotations

import platform
from collections.abc import Sequence

import numpy as np
import torch

from atpdsl.version import __version__
from atpdsl.circuit.scored_nodes import NodeColumns, ScoredNodes
from atpdsl.circuit.scores import SIGN_CONVENTION, NodeScore, RunResult
from atpdsl.plan import Plan
from atpdsl.engine.load import Loaded
from atpdsl.engine.metrics import describe
from atpdsl.engine.state import RunState

__all__ = ["build_result", "node_scores", "provenance", "executed_steps", "verification_summary"]


def node_scores(state: RunState) -> ScoredNodes:
    """Every node's numbers in rank order (per-pair rows when the plan keeps them), as columns that make each
    NodeScore when it is read."""
    table, acc = state.ctx.table, state.acc
    keep = state.plan.write_per_pair or state.plan.method.aggregate == "per_pair"
    ranks = state.parts.get("pair_ranks")
    verified = {int(c): (float(eff.mean()), tuple(eff.tolist())) for c, eff in state.verified.items()}
    columns = NodeColumns(
        estimate=_array(state.mean), score=_array(state.score), method=_label(state.plan), node=table.node,
        attrs=table.attrs, column_of=table.column_of,
        per_pair=_array(acc.per_pair()) if keep else None,
        per_pair_score=_array(acc.per_pair_magnitude()) if keep else None,  # |estimate|, or GradDrop's
        best_pair_rank=ranks.min(dim=0).values.numpy() if ranks is not None else None, verified=verified)
    return ScoredNodes(columns, state.order)


def _array(x: torch.Tensor) -> np.ndarray:
    """The tensor as a float64 numpy array: a view when it already is float64 on the CPU (a run's columns do not
    change after ranking), else a copy. NodeScore numbers are read from it as Python floats."""
    return x.detach().to("cpu", torch.float64).numpy()


def _label(plan: Plan) -> str:
    m = plan.method
    if m.name == "atp*" and not (m.qk_fix or m.graddrop or m.norm_fix):
        return "atp"  # every correction off: plain AtP
    return m.name


def provenance(plan: Plan, loaded: Loaded) -> tuple[tuple[str, str | int | float | bool], ...]:
    """Where the numbers come from: model, revision, dtype, device, seed and every package version."""
    import nnsight
    import transformers

    return (
        ("model_id", plan.model.source),
        ("model_location", loaded.location),
        ("revision", plan.model.revision or ""),
        ("architecture", loaded.arch.name),
        ("n_layers", loaded.geom.n_layers),
        ("dtype", plan.model.dtype),
        ("device", str(loaded.device)),
        ("threads", torch.get_num_threads()),
        ("seed", plan.seed),
        ("trust_remote_code", bool(plan.model.trust_remote_code)),
        ("atpdsl", __version__),
        ("torch", torch.__version__),
        ("nnsight", getattr(nnsight, "__version__", "?")),
        ("transformers", transformers.__version__),
        ("python", platform.python_version()),
        ("sign_convention", SIGN_CONVENTION),
    )


def executed_steps(state: RunState) -> list[dict]:
    """The steps that ran, in plan order, and how often (their times are in the result's timings)."""
    return [{"kind": r.kind, "name": r.name, "scope": r.scope, "runs": r.runs} for r in state.records.values()]


def _extras(state: RunState, nodes: list[NodeScore]) -> dict:
    plan, table = state.plan, state.ctx.table
    extras = {
        "aggregate": plan.method.aggregate,
        "sign_convention": SIGN_CONVENTION,
        "positions": None if table.positions is None else {"mode": table.positions[0],
                                                           "names": [str(p) for p in table.positions[1]]},
        "sites": [s.name for s in table.sites],
        "eval_metric": describe(plan.eval_metric) if plan.eval_metric else None,
        "batches": len(state.ctx.batches),
        "steps": executed_steps(state),
    }
    gd = state.parts.get("graddrop")
    if plan.method.name == "atp*" and _label(plan) == "atp*":
        m = plan.method
        extras["atp_star"] = {"qk_fix": m.qk_fix, "norm_fix": m.norm_fix, "graddrop": m.graddrop,
                              "graddrop_mode": m.graddrop_mode if m.graddrop else None,
                              "graddrop_terms": [t.name for t in gd.terms] if gd is not None else []}
    if state.verified:
        extras["verification"] = verification_summary(plan, nodes)
    if state.diagnosis is not None:
        extras["diagnosis"] = state.diagnosis[1]
    extras["resolved_tokens"] = _resolved(state)
    extras["warnings"] = list(plan.warnings)
    extras.update(state.extras)
    return extras


def _resolved(state: RunState) -> list[dict]:
    """Every pair's answer tokens as the metric reads them (ids and pieces), for the outputs."""
    from atpdsl.language.encoding import as_tokenizer
    from atpdsl.language.resolved import resolved_rows

    ctx = state.ctx
    encoded = {p.index: p for p in ctx.pairs}
    return resolved_rows(as_tokenizer(ctx.loaded.tokenizer), state.plan,
                         [encoded.get(i) for i in range(len(state.plan.pairs))])


def build_result(state: RunState) -> RunResult:
    """The RunResult of the state as it stands (the `edges` step builds one to select from)."""
    plan, acc = state.plan, state.acc
    nodes = node_scores(state)
    timings = tuple((r.name, round(r.seconds, 6)) for r in state.records.values())
    timings = tuple(state.ctx.timings.items()) + timings
    return RunResult(
        model_id=plan.model.source,
        spec_hash=plan.spec_hash,
        method=_label(plan),
        metric=describe(plan.metric),
        nodes=nodes,
        n_pairs=acc.n,
        clean_metric=acc.clean_sum / acc.n,
        corrupt_metric=acc.corrupt_sum / acc.n,
        edges=state.edges,
        false_negatives=state.diagnosis[0] if state.diagnosis is not None else None,
        timings=tuple((k, round(v, 6)) for k, v in timings),
        provenance=provenance(plan, state.ctx.loaded),
        extras=_extras(state, nodes),
    )


def verification_summary(plan: Plan, nodes: Sequence[NodeScore]) -> dict:
    """How many verified nodes reach the selection cut with their measured effect, and their ranks."""
    from atpdsl.circuit.select import (DEFAULT_SELECTION, candidates, describe as describe_rule, verified_magnitude,
                                       verified_nodes)

    selection = plan.selection or DEFAULT_SELECTION
    _, cut = candidates(nodes, selection)
    rows = []
    for node in verified_nodes(nodes):
        measured = verified_magnitude(node, plan.method.aggregate)
        rows.append({"node": node.name, "rank": node.rank, "estimate": node.estimate, "score": node.score,
                     "verified_effect": node.verified_effect, "measured": measured,
                     "exceeds": bool(measured is not None and measured >= cut)})
    ranks = [r["rank"] for r in rows if r["exceeds"]]
    return {
        "top": len(rows),
        "rule": describe_rule(selection),
        "cut": cut,
        "exceeding": len(ranks),
        "exceeding_ranks": ranks,
        "deepest_exceeding_rank": max(ranks) if ranks else None,
        "nodes": rows,
    }
