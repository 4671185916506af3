"""How the evaluation scores a method against exact patching (used by benchmarks/eval_methods.py).

- Pearson: over every (node, pair) of a node kind, the method's signed per-pair estimate against the exact
  per-pair effect (and over all kinds together).
- Worst rank of the true top 10: per pair, the 10 nodes with the largest |exact effect| in that pair, and the
  deepest of their ranks in the method's own ranking of that pair (its per-pair ranking magnitudes, GradDrop's
  where it ranks); aggregated, the true top 10 by mean |exact effect| over pairs, ranked by the method's
  dataset score (mean over pairs of the ranking magnitude).
- Pearson after `verify top 10`: the same over all kinds once the method's 10 best-ranked nodes (dataset
  ranking) carry their exact effects, as atpdsl reports verified nodes; costs 10 exact patches per pair more.
- Cost of verified recall (Kramar et al. 2024's figure of merit), in forward-equivalents of a batch: the
  method's own attribution steps as atpdsl's plan counts them (corrupt forward, clean forward + backward, QK
  fix, norm fix, GradDrop terms) plus one exact patch per node walking down its ranking until the true top 10
  are verified, against exhaustive patching (2 + one forward per node).
"""
from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from atpdsl.lowering import lower_steps
from atpdsl.plan import MethodSpec, NodeGroup

TOP = 10


ATTRIBUTION_STEPS = frozenset({"corrupt_forward", "clean_backward", "qk_fix", "norm_fix", "graddrop_term"})


def method_cost(spec: MethodSpec, groups: Sequence[NodeGroup], n_layers: int) -> float:
    """Forward-equivalents per batch of a method's attribution steps as atpdsl's plan counts them
    (atpdsl.lowering.lower_steps with the large-model limits of atpdsl.costs: no per-operation overheads).
    RelP runs as `method atp` inside relp_context here and costs what AtP costs (two forwards, one backward)."""
    steps = lower_steps(spec, groups, n_layers=n_layers, nodes=None, verification=None, diagnosis=None)
    return sum(s.cost for s in steps if s.kind in ATTRIBUTION_STEPS)


def pearson(a: list[float], b: list[float]) -> float:
    """Pearson correlation in float64 (nan when either side is constant)."""
    x = torch.tensor(a, dtype=torch.float64)
    y = torch.tensor(b, dtype=torch.float64)
    if x.numel() < 2 or float(x.std()) == 0.0 or float(y.std()) == 0.0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def worst_rank(truth: dict[str, float], ranks: dict[str, int], top: int = TOP) -> int:
    """The deepest rank, in `ranks`, of the `top` nodes with the largest |truth|."""
    best = sorted(truth, key=lambda n: -abs(truth[n]))[:top]
    return max(ranks[n] for n in best)


@dataclass(frozen=True)
class Truth:
    """Exact patching of every node: per-pair effects and the dataset's mean |effect|."""

    per_pair: dict[str, tuple[float, ...]]
    kinds: dict[str, str]  # node name -> kind
    n_pairs: int

    @functools.cached_property
    def dataset(self) -> dict[str, float]:
        """Node name -> mean |exact effect| over pairs (computed once)."""
        return {n: statistics.fmean(abs(v) for v in vals) for n, vals in self.per_pair.items()}

    def pair(self, p: int) -> dict[str, float]:
        return {n: vals[p] for n, vals in self.per_pair.items()}


@dataclass(frozen=True)
class Score:
    """One method on one task."""

    method: str
    cost: float
    pearson: dict[str, float]  # kind (and "all") -> r
    pair_worst: tuple[int, ...]  # per pair: worst rank of that pair's true top 10
    dataset_worst: int
    exhaustive: int  # forward-equivalents per pair of patching every node
    seconds: float
    means: dict[str, float]  # node name -> mean signed estimate over pairs
    verified_r: float  # Pearson over all nodes once the method's own top 10 are verified (their values exact)

    @property
    def pair_less(self) -> float:
        """How many times cheaper than exhaustive the verified recall is, per pair (mean cost over pairs)."""
        return self.exhaustive / statistics.fmean(self.cost + w for w in self.pair_worst)

    @property
    def dataset_less(self) -> float:
        return self.exhaustive / (self.cost + self.dataset_worst)

    def to_json(self) -> dict:
        """Everything measured, without the per-node means (for --json)."""
        out = asdict(self)
        del out["means"]
        return out


def score(method: str, result, truth: Truth, cost: float, seconds: float) -> Score:
    """Score a RunResult executed with aggregate per_pair and write_per_pair against the exact truth."""
    estimates = {n.name: n.per_pair for n in result.nodes}
    pair_ranks = result.extras["per_pair_ranks"]["ranks"]
    kinds = sorted(set(truth.kinds.values()))
    r = {}
    for kind in kinds + ["all"]:
        names = [n for n in truth.per_pair if kind == "all" or truth.kinds[n] == kind]
        est = [v for n in names for v in estimates[n]]
        ref = [v for n in names for v in truth.per_pair[n]]
        r[kind] = pearson(est, ref)
    pair_worst = tuple(worst_rank(truth.pair(p), {n: ranks[p] for n, ranks in pair_ranks.items()})
                       for p in range(truth.n_pairs))
    dataset_worst = worst_rank(truth.dataset, {n.name: n.rank for n in result.nodes})
    means = {n: statistics.fmean(v) for n, v in estimates.items()}
    top = {n.name for n in result.nodes if n.rank <= TOP}
    shown = {n: (truth.per_pair[n] if n in top else estimates[n]) for n in truth.per_pair}
    verified_r = pearson([v for n in truth.per_pair for v in shown[n]],
                         [v for n in truth.per_pair for v in truth.per_pair[n]])
    return Score(method, cost, r, pair_worst, dataset_worst, 2 + len(truth.per_pair), seconds, means, verified_r)
