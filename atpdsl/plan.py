"""The intervention plan: everything the engine executes, as plain JSON-able data (no torch)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ModelRef",
    "TextSpan",
    "SlotSpan",
    "PromptPair",
    "MetricArg",
    "MetricSpec",
    "NodeGroup",
    "MethodSpec",
    "Selection",
    "Verification",
    "Diagnosis",
    "ExportTarget",
    "Pass",
    "Plan",
    "SourceRef",
    "graddrop_cost",
    "norm_fix_cost",
    "NORM_FIX_KINDS",
]


def graddrop_cost(n_layers: int, mode: str = "layer") -> float:
    """Backward-pass equivalents of all GradDrop terms as the engine runs them: gradients above a cut are
    shared with the plain backward, so term l recomputes only layers < l (per sublayer: < l, plus layer l's
    attention for the MLP cut)."""
    if mode == "layer":
        return sum(range(n_layers)) / n_layers
    return sum(2 * layer + 0.5 for layer in range(n_layers)) / n_layers


NORM_FIX_KINDS = frozenset({"heads", "values", "neurons", "attn", "mlp", "resid"})
"""Node kinds whose change reaches the residual stream linearly (values through the clean pattern): the ones the
norm fix rewrites. Queries and keys join them when the QK fix is on (their exact head-output change)."""

NORM_FIX_PAIR_COST = 0.5
"""Forward-equivalents of the norm fix per (MLP layer, later norm) pair, divided by the layer count: two
[tokens, d] x [d, neurons] matmuls, against a forward's ~(3 d neurons + 4 d^2) per layer with neurons ~ 4 d."""


def norm_fix_cost(n_layers: int, graddrop: bool = False, mode: str = "layer") -> float:
    """Forward-equivalents of the norm fix as the engine runs it, dominated by the neurons: each MLP layer's writes
    against every later norm; with GradDrop each term also redoes the norms between a lower layer and its cut
    (the norms above a cut reuse the plain pass's contributions)."""
    readers = sorted([2 * m for m in range(n_layers)] + [2 * m + 1 for m in range(n_layers)] + [2 * n_layers])
    writes = [2 * m + 2 for m in range(n_layers)]
    pairs = sum(1 for w in writes for r in readers if r >= w)
    if graddrop:
        cuts = ([2 * l + 2 for l in range(n_layers)] if mode == "layer"
                else [c for l in range(n_layers) for c in (2 * l + 1, 2 * l + 2)])
        pairs += sum(1 for c in cuts for w in writes if w < c for r in readers if w <= r < c)
    return NORM_FIX_PAIR_COST * pairs / n_layers


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a plan item came from in the spec, so model-time errors can point at the spec line."""

    file: str
    line: int
    column: int
    end_line: int = 0
    end_column: int = 0


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model to load and how. `source` is a hub id, a local folder (absolute), or a zoo name."""

    source: str
    is_zoo: bool = False
    revision: str | None = None
    dtype: str = "float32"  # float32 | float16 | bfloat16 | float64
    device: str = "cpu"
    attention: str = "eager"
    where: SourceRef | None = None
    trust_remote_code: bool = False  # only ever True from the CLI flag --trust-remote-code


@dataclass(frozen=True, slots=True)
class TextSpan:
    """A half-open character range [start, end) in a prompt string."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SlotSpan:
    """A named template slot located in both prompts of a pair (character offsets)."""

    name: str
    clean: TextSpan
    corrupt: TextSpan


@dataclass(frozen=True, slots=True)
class PromptPair:
    """One clean/corrupt pair with its named fields (`answer`, `wrong`, and any others from a file)."""

    clean: str
    corrupt: str
    fields: tuple[tuple[str, str], ...] = ()
    slots: tuple[SlotSpan, ...] = ()
    origin: str = ""  # e.g. "spec.atp:5" or "pairs.jsonl:12", for error messages

    def field(self, name: str) -> str | None:
        """The value of a named field, or None."""
        for key, value in self.fields:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class MetricArg:
    """A metric argument: a pair field name or a string literal, optionally `first_token(...)`."""

    field: str | None = None
    literal: str | None = None
    first_token: bool = False

    def text(self, pair: PromptPair) -> str:
        """The answer text this argument denotes for one pair."""
        if self.literal is not None:
            return self.literal
        value = pair.field(self.field or "")
        if value is None:
            raise KeyError(self.field)
        return value


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """`logit_diff(a, b)`, `logprob(a)`, `prob(a)`, `kl`, `loss`, read at `position`.

    `position` is "last" or the name of a template slot (the metric reads the slot's last token).
    """

    kind: str
    args: tuple[MetricArg, ...] = ()
    position: str = "last"
    where: SourceRef | None = None


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """One line of a `nodes { ... }` block. `layers` is inclusive; None means every layer."""

    kind: str  # a NodeKind value: heads queries keys values neurons attn mlp resid
    layers: tuple[int, int] | None = None
    heads: tuple[int, ...] | None = None  # or neuron indices for `neurons`
    per_position: bool = False
    where: SourceRef | None = None


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """`atp`, `atp*` (with its corrections) or `exact`."""

    name: str  # atp | atp* | exact
    qk_fix: bool = False
    graddrop: bool = False
    graddrop_mode: str = "layer"  # layer | sublayer
    norm_fix: bool = False  # atpdsl extension: exact norms on each node's own write (engine/normfix.py)
    aggregate: str = "mean_abs"  # mean_abs | abs_mean | per_pair


@dataclass(frozen=True, slots=True)
class Selection:
    """`select top K | threshold X | cumulative F`."""

    kind: str  # top | threshold | cumulative
    value: float


@dataclass(frozen=True, slots=True)
class Verification:
    """`verify top K`: exactly patch the K best-ranked nodes."""

    top: int


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """`diagnose false_negatives { samples N confidence P }`."""

    samples: int = 200
    confidence: float = 0.95
    inclusion: float = 0.1  # probability that a node is in a random subset


@dataclass(frozen=True, slots=True)
class ExportTarget:
    """One `export "path.ext"`; `path` is already resolved (against the spec folder or --out)."""

    path: str
    format: str  # csv json graphml gexf dot png svg html


@dataclass(frozen=True, slots=True)
class Pass:
    """One step the engine runs per batch, with its cost in forward-equivalent passes."""

    name: str
    cost: float
    description: str


@dataclass(frozen=True, slots=True)
class Plan:
    """A checked spec compiled into what the engine does, in order."""

    spec_file: str
    spec_text: str
    spec_hash: str
    model: ModelRef
    pairs: tuple[PromptPair, ...]
    metric: MetricSpec
    nodes: tuple[NodeGroup, ...]
    method: MethodSpec
    eval_metric: MetricSpec | None = None
    batch: int = 8
    seed: int = 0
    selection: Selection | None = None
    verification: Verification | None = None
    diagnosis: Diagnosis | None = None
    exports: tuple[ExportTarget, ...] = ()
    write_per_pair: bool = False
    passes: tuple[Pass, ...] = ()
    sites: tuple[str, ...] = ()  # module sites in forward order, when the model config is known
    extras: tuple[tuple[str, Any], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the whole plan."""
        return asdict(self)
