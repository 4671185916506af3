"""What users can type, keyed by the word they type: statements, metrics, node kinds, settings, formats."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "StatementInfo", "STATEMENTS",
    "MetricInfo", "METRICS", "register_metric", "metric_problem", "ARG_FUNCTIONS",
    "NodeKindInfo", "NODE_KINDS", "ENDPOINT_KINDS",
    "Bound", "SettingInfo", "MODEL_SETTINGS", "METHOD_SETTINGS", "DIAGNOSE_SETTINGS",
    "DTYPES", "ATTENTIONS", "SWITCHES", "GRADDROP_MODES",
    "MethodInfo", "METHODS", "AGGREGATES", "KEEP_OPTIONS",
    "SelectInfo", "SELECT_KINDS", "VERIFY_KINDS", "VERIFY_UNTIL", "VERIFY_SETTINGS", "VERIFY_BUDGET_DEFAULT",
    "DIAGNOSE_TARGETS", "EDGE_SETTINGS", "MAX_COUNT",
    "FormatInfo", "EXPORT_FORMATS", "PAIR_FILE_TYPES",
    "BATCH", "SEED", "TEMPLATE_COUNT", "VERIFY_TOP", "LAST",
]

LAST = "last"
"""The default metric position: the last token of the clean prompt."""


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """A top-level statement: its keyword, whether it may appear more than once, its syntax."""

    keyword: str
    repeatable: bool
    syntax: str
    doc: str


STATEMENTS: dict[str, StatementInfo] = {
    s.keyword: s
    for s in (
        StatementInfo("model", False, 'model "hub-id-or-folder" [{ dtype … device … revision "…" attention … memory "…"'
                      ' remote on|off offload "…" }]'
                      ' | model zoo "name"', "the model to analyse"),
        StatementInfo("pair", True, 'pair { clean "…" corrupt "…" answer "…" wrong "…" }', "one prompt pair"),
        StatementInfo("pairs", True, 'pairs from "file.jsonl|.csv" [{ field = "column" … }]', "pairs from a file"),
        StatementInfo("template", True, 'template { text "…{slot}…" slot NAME [values] corrupt NAME [values]'
                      " count N seed N FIELD \"…\" }", "pairs generated from a template"),
        StatementInfo("metric", False, "metric EXPR [at last|SLOT]", "what the circuit explains"),
        StatementInfo("eval metric", False, "eval metric EXPR [at last|SLOT]", "the metric `verify` reports"),
        StatementInfo("nodes", False, "nodes { KIND [INDICES] [layers A..B] [per position] … }", "what to score"),
        StatementInfo("method", False, "method atp | atp* [{ qk_fix on|off graddrop on|off|per layer|per sublayer norm_fix on|off }]"
                      " | exact | relp", "how to score"),
        StatementInfo("aggregate", False, "aggregate mean_abs|abs_mean|per_pair", "how pair scores combine"),
        StatementInfo("keep", False, "keep per_pair", "write each pair's estimates too"),
        StatementInfo("batch", False, "batch N | batch auto", "pairs per forward pass (auto: the most that fit the"
                      " memory budget)"),
        StatementInfo("seed", False, "seed N", "random seed"),
        StatementInfo("select", False, "select top K | threshold X | cumulative F", "which nodes form the circuit"),
        StatementInfo("verify", False, "verify top K | verify until confident [{ budget B }]",
                      "exactly patch the K best-ranked nodes, or verify adaptively until the diagnostic is confident"),
        StatementInfo("select edges", False, "select edges top K | threshold X | cumulative F [{ ig_steps N }] | none",
                      "the circuit as its best edges and the nodes they touch"),
        StatementInfo("verify edges", False, "verify edges top K", "exact path patching of the K strongest edges"),
        StatementInfo("diagnose", False, "diagnose false_negatives [{ samples N confidence P inclusion p }]",
                      "bound the effect of nodes missed"),
        StatementInfo("export", True, 'export "path.ext"', "write the circuit or scores"),
    )
}


@dataclass(frozen=True, slots=True)
class MetricInfo:
    """A metric function: one record holding what users may write and the code that computes it.

    `arities`: the argument counts it takes; `default_args`: the fields it reads when written without
    arguments; `impl`: its implementation as `module:function`, imported only when a run needs it (so `check`
    and `plan` stay free of torch), called as `fn(MetricInput) -> Tensor[pairs]` (atpdsl.engine.metrics);
    `contrast`: its two sides are compared, so two sides that resolve to the same tokens make it identically 0;
    `gradient`: it has a useful gradient at the clean run (`kl` sits at its minimum there, so AtP reads 0).
    """

    key: str
    arities: tuple[int, ...]
    params: str
    doc: str
    impl: str
    example: str
    default_args: tuple[str, ...] = ()
    contrast: bool = False
    gradient: bool = True

    @property
    def arity(self) -> int:
        """The largest argument count (the one messages show)."""
        return max(self.arities)


METRICS: dict[str, MetricInfo] = {}


def register_metric(info: MetricInfo) -> MetricInfo:
    """Add a metric record (tests and extensions add their own this way); returns it."""
    METRICS[info.key] = info
    return info


for _info in (
    MetricInfo("logit_diff", (2,), "the answer and the wrong answer",
               "logit(a) - logit(b) at the position; with sequence(a), sequence(b): log P(a) - log P(b) of the"
               " whole answers", "atpdsl.engine.metrics:logit_diff", "logit_diff(answer, wrong)", contrast=True),
    MetricInfo("logprob", (1,), "the answer", "log-probability of a at the position (of the whole answer with"
               " sequence(a))", "atpdsl.engine.metrics:logprob", "logprob(answer)"),
    MetricInfo("prob", (1,), "the answer", "probability of a at the position (of the whole answer with"
               " sequence(a))", "atpdsl.engine.metrics:prob", "prob(answer)"),
    MetricInfo("kl", (0,), "no arguments", "KL divergence from the clean run's output distribution",
               "atpdsl.engine.metrics:kl", "kl", gradient=False),
    MetricInfo("loss", (0, 1), "no arguments, or the answer",
               "cross-entropy of the answer (the field `answer` when none is given)", "atpdsl.engine.metrics:loss",
               "loss", default_args=("answer",)),
):
    register_metric(_info)

def metric_problem(kind: str, n_args: int) -> str | None:
    """Why a metric call cannot run (unknown name, wrong argument count), from its record alone; None if it can."""
    info = METRICS.get(kind)
    if info is None:
        return f"unknown metric {kind!r} (known: {', '.join(METRICS)})"
    if n_args not in info.arities:
        return f"{kind} takes {' or '.join(map(str, info.arities))} argument(s), got {n_args}"
    return None


ARG_FUNCTIONS: dict[str, str] = {
    "first_token": "use the first token of an answer that tokenizes to several tokens",
    "sequence": "use every token of the answer: the sum of their log-probabilities, each predicted after the"
                " prompt and the answer's earlier tokens (teacher forcing)",
}


@dataclass(frozen=True, slots=True)
class NodeKindInfo:
    """A node kind in `nodes { … }`; `unit` names what its indices count (None: whole blocks)."""

    key: str
    unit: str | None
    doc: str


NODE_KINDS: dict[str, NodeKindInfo] = {
    k.key: k
    for k in (
        NodeKindInfo("heads", "head", "attention head outputs (input of the output projection)"),
        NodeKindInfo("queries", "head", "query vectors per head"),
        NodeKindInfo("keys", "head", "key vectors per head (per KV group with grouped-query attention)"),
        NodeKindInfo("values", "head", "value vectors per head (per KV group with grouped-query attention)"),
        NodeKindInfo("neurons", "neuron", "MLP neurons after the nonlinearity"),
        NodeKindInfo("attn", None, "a layer's whole attention output"),
        NodeKindInfo("mlp", None, "a layer's whole MLP output"),
        NodeKindInfo("resid", None, "the residual stream after a layer"),
    )
}
ENDPOINT_KINDS = ("embed", "logits")


MAX_COUNT = 10**9
"""The largest count a spec may ask for (batch, top K, budget): more is a typo, and the number must stay exact
as a float in the plan's JSON."""
MAX_FLOAT_INT = 2**53  # integers beyond this lose precision as floats (and 10**400 overflows them)


@dataclass(frozen=True, slots=True)
class Bound:
    """A numeric range a setting must fall in, with the phrase messages use."""

    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def accepts(self, value: int | float) -> bool:
        """Whether a number is allowed (never NaN or infinite, nor an integer too large for a float)."""
        if not isinstance(value, int) and not math.isfinite(value):
            return False
        if isinstance(value, int) and abs(value) > MAX_FLOAT_INT:
            return False
        if self.integer and not isinstance(value, int):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def describe(self, value: int | float | None = None) -> str:
        """E.g. `a positive integer`, `a number in (0, 1)`; a count's cap only when `value` is past it."""
        if self.integer:
            if self.lo == 1 and self.hi is None:
                return "a positive integer"
            if self.lo == 1 and self.hi == MAX_COUNT:
                past = isinstance(value, (int, float)) and value > MAX_COUNT
                return f"a positive integer (at most {_fmt(self.hi)})" if past else "a positive integer"
            if self.lo == 0 and self.hi is None:
                return "a non-negative integer"
            if self.hi is not None:
                return f"an integer from {_fmt(self.lo)} to {_fmt(self.hi)}"
            return "an integer"
        if self.lo is not None and self.hi is not None:
            left = "(" if self.lo_open else "["
            right = ")" if self.hi_open else "]"
            return f"a number in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"
        if self.lo is not None:
            return f"a number {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        return "a number"


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else str(x)


BATCH = Bound(True, 1, MAX_COUNT)
SEED = Bound(True, 0, 2**32 - 1)
TEMPLATE_COUNT = Bound(True, 1, 100_000)
VERIFY_TOP = Bound(True, 1, MAX_COUNT)

DTYPES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}
ATTENTIONS = ("auto", "eager", "sdpa")  # auto: eager where a step reads the pattern (QK fix, edges), else sdpa
SWITCHES = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}
GRADDROP_MODES = ("layer", "sublayer")


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """A `key value` setting inside a statement's `{ … }` block.

    `kind`: choice (a word from `choices`), string, device, switch (on/off), number (within `bound`),
    graddrop (on/off or `per layer|sublayer`).
    """

    key: str
    kind: str
    doc: str
    default: str
    choices: tuple[str, ...] = ()
    bound: Bound | None = None


MODEL_SETTINGS: dict[str, SettingInfo] = {
    s.key: s
    for s in (
        SettingInfo("dtype", "choice", "weights and activations dtype", "float32", tuple(DTYPES)),
        SettingInfo("device", "device", "cpu, cuda, cuda:N, mps or auto", "cpu"),
        SettingInfo("revision", "string", "hub revision (branch, tag or commit)", "none"),
        SettingInfo("attention", "choice", "attention implementation (auto: eager only where a step reads the"
                    " pattern)", "auto", ATTENTIONS),
        SettingInfo("memory", "string", 'memory budget per device, e.g. "80GB" (default: the device\'s own when'
                    " known)", "the device's"),
        SettingInfo("remote", "switch", "run on NDIF (nnsight's remote service; a hub id, NDIF_API_KEY)", "off"),
        SettingInfo("offload", "string", "folder for weights beyond the memory budget (device auto)", "none"),
    )
}

METHOD_SETTINGS: dict[str, SettingInfo] = {
    s.key: s
    for s in (
        SettingInfo("qk_fix", "switch", "exact softmax for patched queries and keys", "on"),
        SettingInfo("graddrop", "graddrop", "one extra backward per layer (or sublayer) with its gradient dropped",
                    "on, per layer"),
        SettingInfo("norm_fix", "switch", "exact norms on each node's own write (atpdsl extension, not in the paper)",
                    "off"),
    )
}

DIAGNOSE_SETTINGS: dict[str, SettingInfo] = {
    s.key: s
    for s in (
        SettingInfo("samples", "number", "random subsets patched", "200", bound=Bound(True, 1, 1_000_000)),
        SettingInfo("confidence", "number", "confidence of the bound", "0.95",
                    bound=Bound(False, 0, 1, lo_open=True, hi_open=True)),
        SettingInfo("inclusion", "number", "probability that a node is in a subset", "0.1",
                    bound=Bound(False, 0, 1, lo_open=True, hi_open=True)),
    )
}


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """A scoring method and the settings its block takes."""

    key: str
    settings: tuple[str, ...]
    doc: str


METHODS: dict[str, MethodInfo] = {
    m.key: m
    for m in (
        MethodInfo("atp", (), "attribution patching: 2 forwards + 1 backward per batch"),
        MethodInfo("atp*", ("qk_fix", "graddrop", "norm_fix"), "AtP with the QK fix and GradDrop (Kramár et al. 2024)"),
        MethodInfo("exact", (), "activation patching, one forward per node: the ground truth"),
        MethodInfo("relp", (), "Relevance Patching (Jafari et al. 2025, arXiv 2508.21258): AtP with layer-wise"
                   " relevance propagation coefficients in place of gradients; 2 forwards + 1 backward per batch"),
    )
}

AGGREGATES: dict[str, str] = {
    "mean_abs": "mean over pairs of |estimate| (the paper's ranking score)",
    "abs_mean": "|mean over pairs of the estimate|",
    "per_pair": "keep every pair's estimate; rank by mean_abs",
}
KEEP_OPTIONS: dict[str, str] = {"per_pair": "write each pair's estimate into the JSON results"}


@dataclass(frozen=True, slots=True)
class SelectInfo:
    """A circuit selection rule and the number it takes."""

    key: str
    bound: Bound
    doc: str


SELECT_KINDS: dict[str, SelectInfo] = {
    s.key: s
    for s in (
        SelectInfo("top", Bound(True, 1, MAX_COUNT), "the K best-ranked nodes"),
        SelectInfo("threshold", Bound(False, 0, None), "nodes whose score is at least X"),
        SelectInfo("cumulative", Bound(False, 0, 1, lo_open=True), "the best nodes carrying a fraction F of the"
                   " total score"),
    )
}
VERIFY_KINDS: dict[str, str] = {
    "top": "`verify top K`: exactly patch the K best-ranked nodes",
    "until": "`verify until confident [{ budget B }]`: verify in ranking order, diagnose, patch the suspects, and"
             " repeat until the bound is below the selection cut or B exact patches are spent",
}
VERIFY_UNTIL = ("confident",)
VERIFY_BUDGET_DEFAULT = 200
VERIFY_SETTINGS: dict[str, SettingInfo] = {
    s.key: s
    for s in (
        SettingInfo("budget", "number", "most exact patches adaptive verification may spend", str(VERIFY_BUDGET_DEFAULT),
                    bound=Bound(True, 1, MAX_COUNT)),
    )
}
DIAGNOSE_TARGETS: dict[str, str] = {"false_negatives": "bound the effect of unverified nodes (AtP* section 6)"}
EDGE_SETTINGS: dict[str, SettingInfo] = {
    s.key: s
    for s in (
        SettingInfo("ig_steps", "number", "integrated gradients over N steps between the clean and the corrupt input "
                    "for the edge scores (EAP-IG); without it the clean gradient (EAP)", "off",
                    bound=Bound(True, 1, 1000)),
    )
}


@dataclass(frozen=True, slots=True)
class FormatInfo:
    """An export format, chosen by the file extension."""

    ext: str
    doc: str


def _export_formats():
    """The export formats' records, keyed by every extension a user may type (`csv`, `dot`, `gv`, ...): the one
    table lives in atpdsl.outputs.formats (cheap to import), and this is that same dict, so a format registered
    there is known to `check` at once."""
    from atpdsl.outputs.formats import EXPORT_FORMATS as records

    return records


EXPORT_FORMATS = _export_formats()

PAIR_FILE_TYPES: dict[str, str] = {
    "jsonl": "JSON lines, one object per pair",
    "ndjson": "JSON lines, one object per pair",
    "json": "a JSON list of objects",
    "csv": "comma-separated with a header row",
    "tsv": "tab-separated with a header row",
}
