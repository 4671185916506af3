"""The `rank` step: combine the batches' per-pair numbers into one score per node and order the nodes.

Aggregates: `mean_abs` = mean over pairs of |estimate| (the paper's ranking score; GradDrop's per-pair score
when the plan has GradDrop), `abs_mean` = |mean over pairs of the estimate| (per GradDrop term with GradDrop),
`per_pair` = ranked by mean_abs, with every node's rank inside each pair's own ranking kept as well.
"""
from __future__ import annotations

import numpy as np
import torch

from atpdsl.errors import EngineError
from atpdsl.plan import Step
from atpdsl.engine.state import BatchWork, RunState

__all__ = ["AGGREGATES", "PAIR_TOP", "rank", "pair_ranks", "pair_rank_extras", "rank_step"]

AGGREGATES = ("mean_abs", "abs_mean", "per_pair")
PAIR_TOP = 20  # names listed per pair in extras["per_pair_ranks"]["top"]


def rank(score: torch.Tensor) -> np.ndarray:
    """Columns by descending score; ties keep table order (forward order). An int64 array, not a list: a run may
    rank tens of millions of nodes."""
    return torch.sort(-score.double(), stable=True).indices.numpy()


def pair_ranks(mags: torch.Tensor) -> torch.Tensor:
    """Per-pair 1-based ranks [n_pairs, N] by descending magnitude (ties: table order, as `rank`)."""
    order = torch.sort(-mags.double(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, mags.shape[1] + 1).expand_as(order).contiguous())
    return ranks


def pair_rank_extras(state: RunState, ranks: torch.Tensor) -> dict:
    """`aggregate per_pair`: every node's rank in each pair's own ranking, and each pair's top names."""
    names = [n.name for n in state.ctx.table.nodes]
    top = []
    for row in ranks:
        best = torch.argsort(row)[:PAIR_TOP].tolist()
        top.append([names[c] for c in best])
    return {
        "pairs": [p.origin for p in state.ctx.pairs],
        "ranks": {name: ranks[:, c].tolist() for c, name in enumerate(names)},
        "top": top,
    }


SAME_METRIC = 1e-6
"""Relative size below which the clean and corrupt metric count as the same (no behaviour to explain)."""


def check_behaviour(state: RunState) -> None:
    """A dataset whose corrupt prompts do not change the metric has nothing to attribute: refuse it with the
    numbers instead of ranking a circuit of zeros (e.g. two answers that resolve to the same token)."""
    acc = state.acc
    if acc.n and acc.largest_gap <= SAME_METRIC * max(1.0, acc.largest_metric):
        raise EngineError(
            f"the corrupt prompts do not change the metric: over {acc.n} pair(s) the largest |clean - corrupt| is "
            f"{acc.largest_gap:.3g} (clean mean {acc.clean_sum / acc.n:+.4g}, corrupt mean {acc.corrupt_sum / acc.n:+.4g}),"
            f" so every effect is 0; check that the answers differ (`atpdsl check` lists each pair's tokens) and that "
            f"the corrupt prompts change what the metric reads")


def rank_step(state: RunState, step: Step, work: BatchWork | None = None) -> None:
    """Mean signed estimate and ranking score per node, and the order by score."""
    acc, aggregate = state.acc, state.plan.method.aggregate
    if aggregate not in AGGREGATES:
        raise EngineError(f"unknown aggregate {aggregate!r} (known: {', '.join(AGGREGATES)})")
    check_behaviour(state)
    n = acc.n
    state.mean = acc.sum_est / n
    state.score = state.mean.abs() if aggregate == "abs_mean" else acc.sum_abs / n
    gd = state.parts.get("graddrop")
    if gd is not None:
        custom = gd.scores(aggregate, n)
        if custom is not None:
            state.score = custom
    state.order = rank(state.score)
    if aggregate == "per_pair":
        mags = acc.per_pair_magnitude()
        ranks = pair_ranks(mags)
        state.parts["pair_ranks"] = ranks
        state.extras["per_pair_ranks"] = pair_rank_extras(state, ranks)
