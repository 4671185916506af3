"""What a run produces: per-node scores, verification, the diagnostic bound, edges, timings."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from atpdsl.names import NodeId

__all__ = [
    "SIGN_CONVENTION",
    "SCHEMA_VERSION",
    "NodeScore",
    "EdgeScore",
    "FalseNegativeBound",
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
    (e.g. `heads` = "2,3" for a KV group).
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

    @property
    def name(self) -> str:
        return self.node.name

    def with_verification(self, effect: float, per_pair: tuple[float, ...] | None) -> "NodeScore":
        return replace(self, verified_effect=effect, verified_per_pair=per_pair)


@dataclass(frozen=True, slots=True)
class EdgeScore:
    """An edge along the residual stream; `weight` is its attribution score when computed."""

    source: str
    target: str
    weight: float | None = None


@dataclass(frozen=True, slots=True)
class FalseNegativeBound:
    """The false-negative diagnostic's result over the unverified nodes."""

    bound: float
    confidence: float
    samples: int
    nodes_tested: int
    inclusion: float

    @property
    def bounded(self) -> bool:
        """False when some unverified node was (almost) never in, or never out of, a random subset."""
        return math.isfinite(self.bound)

    @property
    def sentence(self) -> str:
        """The result in plain words."""
        if not self.bounded:
            return (
                f"the diagnostic could not bound the {self.nodes_tested} unverified nodes: with "
                f"{self.samples} samples at inclusion {self.inclusion:g} some node was in (or out of) fewer "
                f"than 2 random subsets; raise samples so that samples x inclusion is at least 20"
            )
        return (
            f"with {self.confidence:.0%} confidence no unverified node changes the metric "
            f"by more than {self.bound:.3g}"
        )


@dataclass(frozen=True, slots=True)
class RunResult:
    """Everything `atpdsl run` measured; the graph and exports are built from it."""

    model_id: str
    spec_hash: str
    method: str
    metric: str
    nodes: tuple[NodeScore, ...]  # sorted by rank
    n_pairs: int
    clean_metric: float  # mean over pairs
    corrupt_metric: float  # mean over pairs (metric on the corrupt prompt)
    edges: tuple[EdgeScore, ...] = ()
    false_negatives: FalseNegativeBound | None = None
    timings: tuple[tuple[str, float], ...] = ()
    provenance: tuple[tuple[str, str | int | float | bool], ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, NodeScore]:
        return {n.name: n for n in self.nodes}
