"""`execute(plan)`: load, score every node (AtP or exact), verify the top K, and build the RunResult."""
from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence

import torch

from atpdsl import __version__
from atpdsl.errors import EngineError
from atpdsl.plan import Plan
from atpdsl.circuit.scores import SIGN_CONVENTION, NodeScore, RunResult
from atpdsl.engine.atp import Correction, run_atp
from atpdsl.engine.context import Context, make_context
from atpdsl.engine.exact import batch_refs, exact_effects, run_exact_all
from atpdsl.engine.load import Loaded, load_model
from atpdsl.engine.metrics import describe

__all__ = ["execute", "verify", "rank"]

Progress = Callable[[str, int, int], None]
AGGREGATES = ("mean_abs", "abs_mean", "per_pair")


def _scores(sum_est: torch.Tensor, sum_abs: torch.Tensor, n: int, aggregate: str) -> tuple[torch.Tensor, torch.Tensor]:
    mean = sum_est / n
    score = mean.abs() if aggregate == "abs_mean" else sum_abs / n
    return mean, score


def rank(score: torch.Tensor) -> list[int]:
    """Columns by descending score; ties keep table order (forward order)."""
    values = score.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def verify(ctx: Context, columns: Sequence[int], *, progress: Progress | None = None) -> torch.Tensor:
    """Exact per-pair effects [n_pairs, len(columns)] with the evaluation metric (or the metric)."""
    spec = ctx.plan.eval_metric or ctx.plan.metric
    eval_ = ctx.plan.eval_metric is not None
    needed = sorted({ctx.table.block_of(c).site for c in columns})
    sites = [ctx.sites[i] for i in needed]
    out = []
    t0 = time.perf_counter()
    n = len(ctx.batches)
    for i, batch in enumerate(ctx.batches):
        refs = batch_refs(ctx, batch, sites, spec, eval_=eval_)
        out.append(exact_effects(ctx, batch, columns, refs, spec, eval_=eval_))
        if progress:
            progress("verify", i + 1, n)
    ctx.add_time("verify", time.perf_counter() - t0)
    return torch.cat(out) if out else torch.zeros((0, len(columns)), dtype=torch.float64)


PAIR_TOP = 20  # names listed per pair in extras["per_pair_ranks"]["top"]


def _pair_ranks(mags: torch.Tensor) -> torch.Tensor:
    """Per-pair 1-based ranks [n_pairs, N] by descending magnitude (ties: table order, as `rank`)."""
    order = torch.sort(-mags.double(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, mags.shape[1] + 1).expand_as(order).contiguous())
    return ranks


def _pair_rank_extras(ctx: Context, ranks: torch.Tensor) -> dict:
    """`aggregate per_pair`: every node's rank in each pair's own ranking, and each pair's top names."""
    names = [n.name for n in ctx.table.nodes]
    top = []
    for row in ranks:
        best = torch.argsort(row)[:PAIR_TOP].tolist()
        top.append([names[c] for c in best])
    return {
        "pairs": [p.origin for p in ctx.pairs],
        "ranks": {name: ranks[:, c].tolist() for c, name in enumerate(names)},
        "top": top,
    }


def verification_summary(plan: Plan, nodes: Sequence[NodeScore]) -> dict:
    """How many verified nodes reach the selection cut with their measured effect, and their ranks."""
    from atpdsl.circuit.select import DEFAULT_SELECTION, candidates, describe as describe_rule, verified_magnitude

    selection = plan.selection or DEFAULT_SELECTION
    _, cut = candidates(nodes, selection)
    rows = []
    for node in nodes:
        if node.verified_effect is None:
            continue
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


def _corrections(ctx: Context, progress: Progress | None = None) -> list[Correction]:
    """The AtP* corrections a plan asks for (none for plain AtP)."""
    from atpdsl.engine.atpstar import corrections_for

    return list(corrections_for(ctx, progress=progress))


def _provenance(plan: Plan, loaded: Loaded) -> tuple[tuple[str, str | int | float | bool], ...]:
    import nnsight
    import transformers

    return (
        ("model_id", plan.model.source),
        ("model_location", loaded.location),
        ("revision", plan.model.revision or ""),
        ("architecture", loaded.arch.name),
        ("dtype", plan.model.dtype),
        ("device", str(loaded.device)),
        ("seed", plan.seed),
        ("trust_remote_code", bool(plan.model.trust_remote_code)),
        ("atpdsl", __version__),
        ("torch", torch.__version__),
        ("nnsight", getattr(nnsight, "__version__", "?")),
        ("transformers", transformers.__version__),
        ("python", platform.python_version()),
        ("sign_convention", SIGN_CONVENTION),
    )


def execute(plan: Plan, *, progress: Progress | None = None, loaded: Loaded | None = None) -> RunResult:
    """Run a plan: `method atp` / `atp*` / `exact`, then `verify top K`. `loaded` reuses a loaded model."""
    t_start = time.perf_counter()
    method = plan.method.name
    if method not in ("atp", "atp*", "exact"):
        raise EngineError(f"unknown method {method!r} (known: atp, atp*, exact)")
    if plan.method.aggregate not in AGGREGATES:
        raise EngineError(f"unknown aggregate {plan.method.aggregate!r} (known: {', '.join(AGGREGATES)})")
    if method != "exact" and plan.metric.kind == "kl":
        raise EngineError(
            "metric kl has zero gradient at the clean run (its minimum), so every AtP estimate would be 0; "
            "attribute with logit_diff, logprob, prob or loss and use kl as `eval metric`, or use `method exact`"
        )
    torch.manual_seed(plan.seed)
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(plan.model)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx = make_context(plan, loaded)
    ctx.timings["load"] = load_s
    ctx.timings["tokenize"] = time.perf_counter() - t0
    n = len(ctx.pairs)
    keep = plan.write_per_pair or plan.method.aggregate == "per_pair"
    exact_rows = torch.zeros(0)
    if method == "exact":
        exact_rows, clean_sum, corrupt_sum = run_exact_all(ctx, progress=progress)
        sum_est, sum_abs = exact_rows.sum(0), exact_rows.abs().sum(0)
        rows = exact_rows if keep else None
        label = "exact"
    else:
        corr = _corrections(ctx, progress) if method == "atp*" else []
        acc = run_atp(ctx, corr, progress=progress, keep_rows=keep)
        sum_est, sum_abs = acc.sum_est, acc.sum_abs
        clean_sum, corrupt_sum = acc.clean_sum, acc.corrupt_sum
        rows = acc.per_pair()
        label = "atp*" if corr else "atp"
    mean, score = _scores(sum_est, sum_abs, n, plan.method.aggregate)
    if method != "exact":
        for c in corr:
            custom = c.scores(ctx, plan.method.aggregate, n) if hasattr(c, "scores") else None
            if custom is not None:
                score = custom
    order = rank(score)
    verified: dict[int, torch.Tensor] = {}
    if plan.verification is not None and plan.verification.top > 0:
        top = order[: plan.verification.top]
        if method == "exact" and plan.eval_metric is None:
            effects = exact_rows[:, top]  # already exact with this metric
        else:
            effects = verify(ctx, top, progress=progress)
        verified = {c: effects[:, j] for j, c in enumerate(top)}
    nodes = []
    table = ctx.table
    means, scores = mean.tolist(), score.tolist()
    columns = rows.T.tolist() if rows is not None else None
    pair_ranks = None
    if plan.method.aggregate == "per_pair":
        mags = exact_rows.abs() if method == "exact" else acc.per_pair_magnitude()
        pair_ranks = _pair_ranks(mags)
    for r, col in enumerate(order, start=1):
        attrs = table.attrs[col]
        if pair_ranks is not None:
            attrs = attrs + (("best_pair_rank", int(pair_ranks[:, col].min())),)
        ns = NodeScore(
            node=table.nodes[col],
            estimate=means[col],
            score=scores[col],
            method=label,
            rank=r,
            per_pair=tuple(columns[col]) if columns is not None else None,
            attrs=attrs,
        )
        if col in verified:
            eff = verified[col]
            ns = ns.with_verification(float(eff.mean()), tuple(eff.tolist()))
        nodes.append(ns)
    false_negatives, diagnosis = None, None
    if plan.diagnosis is not None:
        from atpdsl.engine.atpstar import diagnose

        d = plan.diagnosis
        unverified = [c for c in order if c not in verified]
        false_negatives, diagnosis = diagnose(ctx, unverified, samples=d.samples, confidence=d.confidence,
                                              inclusion=d.inclusion, seed=plan.seed, progress=progress)
    ctx.timings["total"] = time.perf_counter() - t_start
    timing_order = ("load", "tokenize", "forward", "backward", "estimate", "qk_fix", "norm_fix", "graddrop", "exact", "verify",
                    "diagnose", "total")
    timings = tuple((k, round(ctx.timings[k], 6)) for k in timing_order if k in ctx.timings)
    extras = {
        "aggregate": plan.method.aggregate,
        "sign_convention": SIGN_CONVENTION,
        "positions": None if table.positions is None else {"mode": table.positions[0],
                                                           "names": [str(p) for p in table.positions[1]]},
        "sites": [s.name for s in table.sites],
        "eval_metric": describe(plan.eval_metric) if plan.eval_metric else None,
        "batches": len(ctx.batches),
    }
    if label == "atp*":
        m = plan.method
        extras["atp_star"] = {"qk_fix": m.qk_fix, "norm_fix": m.norm_fix, "graddrop": m.graddrop,
                              "graddrop_mode": m.graddrop_mode if m.graddrop else None,
                              "graddrop_terms": [t.name for c in corr for t in getattr(c, "terms", [])]}
    if pair_ranks is not None:
        extras["per_pair_ranks"] = _pair_rank_extras(ctx, pair_ranks)
    if verified:
        extras["verification"] = verification_summary(plan, nodes)
    if diagnosis is not None:
        extras["diagnosis"] = diagnosis
    return RunResult(
        model_id=plan.model.source,
        spec_hash=plan.spec_hash,
        method=label,
        metric=describe(plan.metric),
        nodes=tuple(nodes),
        n_pairs=n,
        clean_metric=clean_sum / n,
        corrupt_metric=corrupt_sum / n,
        false_negatives=false_negatives,
        timings=timings,
        provenance=_provenance(plan, loaded),
        extras=extras,
    )
