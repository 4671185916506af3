"""The intervention plan: everything the engine executes, as plain JSON-able data (no torch)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from atpdsl.arch import Geometry

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
    "EdgeSettings",
    "ExportTarget",
    "Step",
    "STEP_SCOPES",
    "Plan",
    "SourceRef",
]


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
    attention: str = "eager"  # eager | sdpa | auto (eager only where a step reads the pattern)
    where: SourceRef | None = None
    trust_remote_code: bool = False  # only ever True from the CLI flag --trust-remote-code
    memory: int | None = None  # budget in bytes per device (`memory "80GB"`); None: the device's own
    remote: bool = False  # run on NDIF (atpdsl.engine.remote)
    offload: str | None = None  # folder for weights beyond the budget (device auto, accelerate)


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
    """A metric argument: a pair field name or a string literal, optionally `first_token(...)` (read only the
    answer's first token) or `sequence(...)` (every token, teacher-forced after the prompt)."""

    field: str | None = None
    literal: str | None = None
    first_token: bool = False
    sequence: bool = False

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
    """`logit_diff(a, b)`, `logprob(a)`, `prob(a)`, `kl`, `loss`, read at `position` (registry.METRICS).

    `position` is "last" or the name of a template slot (the metric reads the slot's last token). With
    `sequence(...)` arguments the metric is over whole answers: the sum of their teacher-forced token
    log-probabilities after the prompt (so `logit_diff` is the difference of two such sums).
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
    """`verify top K`: exactly patch the K best-ranked nodes.

    `verify until confident { budget B }` (adaptive): verify in ranking order, diagnose, patch the suspects,
    and repeat until the diagnostic's bound is below the selection cut or B exact patches are spent; `top`
    is then the first round's size.
    """

    top: int
    adaptive: bool = False
    budget: int | None = None


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    """`select edges top K | threshold X | cumulative F [{ ig_steps N }]` and `verify edges top K`: the circuit as
    its best edges (None: the selected nodes and every edge between them), path patching of the K strongest
    edges, and integrated gradients over N steps for the edge scores (0: the clean gradient, EAP)."""

    selection: Selection | None = None
    verify: int = 0
    ig_steps: int = 0


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


STEP_SCOPES = ("batch", "run")
"""A step runs once per batch of pairs ("batch"), or once after every batch has run ("run")."""


@dataclass(frozen=True, slots=True)
class Step:
    """One unit of work the engine runs, in the order the plan lists it.

    `kind` names its implementation (atpdsl.lowering.STEP_KINDS); `scope` is "batch" (once per batch, in
    order, before the next batch starts) or "run" (once, after every batch). `cost` is in forward-equivalents
    of one batch (a run-scope step that works batch by batch, such as `verify`, counts its cost per batch too),
    so a plan's total is the sum of its steps' costs times the number of batches. `params` are the step's own
    settings (e.g. a GradDrop term's layer).
    """

    kind: str
    name: str
    scope: str
    cost: float
    description: str
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str, default: Any = None) -> Any:
        """One of the step's params, or `default`."""
        for k, v in self.params:
            if k == key:
                return v
        return default


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
    steps: tuple[Step, ...] = ()
    sites: tuple[str, ...] = ()  # module sites in forward order, when the model config is known
    extras: tuple[tuple[str, Any], ...] = field(default=())
    warnings: tuple[str, ...] = ()  # check's warnings (`file:line:col: W... message`), for the run's outputs
    geometry: Geometry | None = None  # the model's sizes, when its config was on disk at compile time
    edges: EdgeSettings | None = None  # `select edges`, `verify edges` (atpdsl.engine.edge_reads, path_patching)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the whole plan."""
        return asdict(self)
