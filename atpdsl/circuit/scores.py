"""What a run produces: per-node scores, verification, the diagnostic bound, edges, timings."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from atpdsl.names import NodeId

__all__ = [
    "SIGN_CONVENTION",
    "SCHEMA_VERSION",
    "NodeScore",
    "EdgeScore",
    "FalseNegativeBound",
    "Suspect",
    "AdditivityCheck",
    "FN_STATUSES",
    "RunResult",
]

SCHEMA_VERSION = 1
SIGN_CONVENTION = (
    "effect = metric on the clean prompt with the node set to its value on the corrupt prompt, "
    "minus the clean metric"
)


@dataclass(frozen=True, slots=True)
class NodeScore:
    """One node's numbers.

    `estimate` is the mean signed effect estimate over pairs; `score` is the ranking score
    (by default the mean of |estimate| per pair, or the GradDrop score for AtP*).
    `per_pair` holds one signed estimate per pair when kept. `verified_effect` is the mean exact
    patching effect (with the evaluation metric when the spec gives one), None when not verified.
    `rank` is 1-based in the ranking by score. `attrs` carries extra scalar facts
    (e.g. `heads` = "2,3" for a KV group). `per_pair_score` holds each pair's ranking magnitude when
    kept (|estimate| for AtP, GradDrop's per-pair score for AtP*), so the ranking can be audited;
    `score` is their mean under `aggregate mean_abs` / `per_pair`.
    """

    node: NodeId
    estimate: float
    score: float
    method: str
    rank: int = 0
    per_pair: tuple[float, ...] | None = None
    verified_effect: float | None = None
    verified_per_pair: tuple[float, ...] | None = None
    attrs: tuple[tuple[str, str | int | float | bool], ...] = ()
    per_pair_score: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        return self.node.name

    def with_verification(self, effect: float, per_pair: tuple[float, ...] | None) -> "NodeScore":
        return replace(self, verified_effect=effect, verified_per_pair=per_pair)


@dataclass(frozen=True, slots=True)
class EdgeScore:
    """An edge along the residual stream; `weight` is its attribution score when computed, `verified`
    the effect measured by path patching when the edge was checked. `channel` is "q", "k" or "v" for the part of
    an edge into a head that enters through that head's own query, key or value input, "" for a whole edge (into
    a head: the sum of its three inputs)."""

    source: str
    target: str
    weight: float | None = None
    verified: float | None = None
    channel: str = ""


def _round_up(x: float) -> str:
    """x rounded *up* to 3 significant digits, so a printed bound is never below the computed one."""
    if x <= 0.0:
        return "0"
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    return f"{math.ceil(x / step - 1e-9) * step:.4g}"


@dataclass(frozen=True, slots=True)
class Suspect:
    """An unverified node the diagnostic patched alone (exact), beside what the random subsets estimated for it.

    `effect` is the signed mean over pairs of its effect alone; `magnitude` is that effect in the bounded
    quantity (|effect| or mean |effect| per pair); `subset_estimate` / `subset_se` are the random-subset
    estimate (signed mean over pairs) and its standard error, None when the node was not in the subset test."""

    node: str
    effect: float
    magnitude: float
    subset_estimate: float | None = None
    subset_se: float | None = None


@dataclass(frozen=True, slots=True)
class AdditivityCheck:
    """The diagnostic's tests of its one assumption, that effects add up inside a random subset.

    Suspects alone: the draws minus each suspect's effect alone must not depend on whether the suspect was drawn
    (exact permutation test); `worst_p` is the smallest p-value (of `worst_node`, whose effect alone and subset
    estimate are given), compared with `p_threshold` (alpha / nodes tested: suspects are chosen among them all).
    Pairs: `pairs` pairs of suspects patched together; `pair_max` is the largest |f(a + b) - f(a) - f(b)|, for
    `pair_nodes`, whose effect together and sum of effects alone (signed means) are `pair_together`, `pair_sum`.
    Splits: `splits` sampled subsets S cut into halves A, B; `split_max` is the largest |f(S) - f(A) - f(B)|,
    `split_share` the sum of those gaps over the sum of |f(S)|. Pair and split gaps (in the bounded quantity)
    fail the check above `split_limit` x the bound that would be stated."""

    suspects_tested: int = 0
    worst_node: str | None = None
    worst_alone: float | None = None
    worst_estimate: float | None = None
    worst_p: float | None = None
    p_threshold: float | None = None
    pairs: int = 0
    pair_max: float | None = None
    pair_nodes: str | None = None
    pair_together: float | None = None
    pair_sum: float | None = None
    splits: int = 0
    split_max: float | None = None
    split_share: float | None = None
    split_limit: float | None = None
    passed: bool = True


FN_STATUSES = ("bounded", "exhaustive", "refused", "untestable")
"""bounded: random-subset limits (assuming additivity, which the checks did not refute) plus nodes patched alone;
exhaustive: every unverified node whose activation changes was patched alone (exact, no assumption);
refused: a check measured interaction between nodes, so no bound is given; untestable: too few samples."""


@dataclass(frozen=True, slots=True)
class FalseNegativeBound:
    """The false-negative diagnostic's result over the unverified nodes: a bound that holds, or why there is none.

    `nodes_tested` counts every unverified node the statement is about; `unchanged` of them have the same
    activation on the clean and the corrupt prompt (their effect is exactly 0) and were left out of patching.
    `quantity` is what is bounded: "abs_mean" = |mean effect over pairs|, "mean_abs" = mean over pairs of
    |effect|. `exact_patches` counts nodes the diagnostic patched alone, `subset_patches` subsets patched at once
    (each over all pairs). `reason` says, with the numbers, why a refused or untestable run has no bound."""

    bound: float
    confidence: float
    samples: int
    nodes_tested: int
    inclusion: float
    status: str = "bounded"
    quantity: str = "abs_mean"
    unchanged: int = 0
    suspects: tuple[Suspect, ...] = ()
    additivity: AdditivityCheck | None = None
    reason: str = ""
    exact_patches: int = 0
    subset_patches: int = 0

    def __post_init__(self) -> None:  # rebuild the nested records from a JSON document's dicts and lists
        suspects = tuple(s if isinstance(s, Suspect) else Suspect(**s) for s in self.suspects)
        object.__setattr__(self, "suspects", suspects)
        if isinstance(self.additivity, dict):
            object.__setattr__(self, "additivity", AdditivityCheck(**self.additivity))
        if self.status not in FN_STATUSES:
            raise ValueError(f"unknown diagnostic status {self.status!r} (known: {', '.join(FN_STATUSES)})")

    @property
    def bounded(self) -> bool:
        """True when the result is a bound (random-subset or exhaustive); False when refused or untestable."""
        return self.status in ("bounded", "exhaustive") and math.isfinite(self.bound)

    @property
    def what(self) -> str:
        """The bounded quantity in words."""
        return "|mean effect| over the pairs" if self.quantity == "abs_mean" else "mean |effect| per pair"

    def _alone(self, limit: int = 3) -> str:
        """The nodes patched alone, largest first: `limit` named, the rest counted."""
        shown = sorted(self.suspects, key=lambda s: -s.magnitude)[:limit]
        more = len(self.suspects) - len(shown)
        text = ", ".join(f"{s.node} {s.effect:+.4g}" for s in shown)
        return text + (f" and {more} more" if more > 0 else "")

    def _unchanged(self) -> str:
        if not self.unchanged:
            return ""
        return (f"; {self.unchanged} of the {self.nodes_tested} unverified nodes have the same activation on the "
                f"clean and the corrupt prompt (effect exactly 0)")

    @property
    def sentence(self) -> str:
        """The result in plain words: true as stated, or an explicit refusal with the reason."""
        if self.status == "exhaustive":
            changed = self.nodes_tested - self.unchanged
            if changed == 0:
                return (f"none of the {self.nodes_tested} unverified nodes changes the metric: each has the same "
                        f"activation on the clean and the corrupt prompt (effect exactly 0)")
            largest = max(self.suspects, key=lambda s: s.magnitude, default=None)
            top = f"; largest: {largest.node} {largest.effect:+.4g}" if largest else ""
            return (f"exact patching of each of the {changed} unverified nodes whose activation changes: none "
                    f"changes the metric by more than {_round_up(self.bound)} ({self.what}{top}){self._unchanged()}")
        if not self.bounded:
            head = ("no bound can be given" if self.status == "refused"
                    else "the diagnostic could not bound the unverified nodes")
            reason = self.reason or (f"with {self.samples} samples at inclusion {self.inclusion:g} some node was "
                                     f"in (or out of) fewer than 2 random subsets; raise samples so that samples x "
                                     f"inclusion is at least 20")
            alone = f"; patched alone: {self._alone()}" if self.suspects else ""
            return f"{head}: {reason}{alone}{self._unchanged()}"
        alone = f"; patched alone (exact): {self._alone()}" if self.suspects else ""
        return (f"with {self.confidence:.0%} confidence no unverified node changes the metric by more than "
                f"{_round_up(self.bound)} ({self.what}; random-subset test of "
                f"{self.nodes_tested - self.unchanged} nodes, {self.samples} samples; it assumes effects add up "
                f"inside a subset, which its checks did not refute){alone}{self._unchanged()}")


@dataclass(frozen=True, slots=True)
class RunResult:
    """Everything `atpdsl run` measured; the graph and exports are built from it."""

    model_id: str
    spec_hash: str
    method: str
    metric: str
    nodes: Sequence[NodeScore]  # sorted by rank: a tuple, or a run's ScoredNodes (made when read)
    n_pairs: int
    clean_metric: float  # mean over pairs
    corrupt_metric: float  # mean over pairs (metric on the corrupt prompt)
    edges: tuple[EdgeScore, ...] = ()
    false_negatives: FalseNegativeBound | None = None
    timings: tuple[tuple[str, float], ...] = ()
    provenance: tuple[tuple[str, str | int | float | bool], ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> Mapping[str, NodeScore]:
        """Nodes by name (a run's ScoredNodes looks each name up instead of building a dict of every node)."""
        lookup = getattr(self.nodes, "by_name", None)
        return lookup() if lookup is not None else {n.name: n for n in self.nodes}
