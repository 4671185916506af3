"""Lower a spec's method, nodes and checks into the typed steps the engine runs (no torch).

The list `lower_steps` returns is the program: `atpdsl plan` prints it, `engine.execute` runs exactly these
steps in this order (batch-scope steps once per batch, then the run-scope steps) and records each one it ran,
and `--emit python` writes them out as plain nnsight code. Each step kind is one record in STEP_KINDS naming
its engine implementation by a lazily imported path, so this module never needs torch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from atpdsl import costs
from atpdsl.arch import Geometry
from atpdsl.plan import Diagnosis, EdgeSettings, MethodSpec, NodeGroup, Plan, Step, Verification

__all__ = ["StepKind", "STEP_KINDS", "STREAMING_KINDS", "streams", "NORM_FIX_KINDS", "QK_KINDS", "lower_steps",
           "computes_edges", "graddrop_terms", "plan_total", "node_count", "steps_for", "workload_of",
           "workload_extra", "plan_workload", "vocab_size", "rows_per_pair", "edge_sources", "relower", "replan", "same_program",
           "edges_allowed"]

NORM_FIX_KINDS = frozenset({"heads", "values", "neurons", "attn", "mlp", "resid"})
"""Node kinds whose change reaches the residual stream linearly (values through the clean pattern): the ones the
norm fix rewrites. Queries and keys join them when the QK fix is on (their exact head-output change)."""

QK_KINDS = frozenset({"queries", "keys"})


@dataclass(frozen=True, slots=True)
class StepKind:
    """A kind of step: where it runs and which engine function implements it (`module:function`)."""

    key: str
    scope: str
    impl: str
    doc: str
    prepare: str | None = None  # `module:function(state, step)` run once before the first batch


STEP_KINDS: dict[str, StepKind] = {
    k.key: k
    for k in (
        StepKind("corrupt_forward", "batch", "atpdsl.engine.atp:corrupt_forward",
                 "run the corrupt prompts and keep the node values"),
        StepKind("clean_forward", "batch", "atpdsl.engine.exact:clean_forward",
                 "run the clean prompts without gradients: the metric's baseline"),
        StepKind("clean_backward", "batch", "atpdsl.engine.atp:clean_forward_backward",
                 "run the clean prompts keeping the graph, then one backward from the metric"),
        StepKind("qk_fix", "batch", "atpdsl.engine.corrections.qk_fix:qk_fix_step",
                 "exact softmax for patched queries and keys", "atpdsl.engine.corrections.qk_fix:prepare_qk_fix"),
        StepKind("norm_fix", "batch", "atpdsl.engine.corrections.norm_fix:norm_fix_step",
                 "exact block-input and final norms on every node's own write",
                 "atpdsl.engine.corrections.norm_fix:prepare_norm_fix"),
        StepKind("graddrop_term", "batch", "atpdsl.engine.corrections.graddrop_terms:graddrop_term_step",
                 "one GradDrop term: the backward below one cut block write",
                 "atpdsl.engine.corrections.graddrop_terms:prepare_graddrop"),
        StepKind("edge_reads", "batch", "atpdsl.engine.edge_reads:edge_reads_step",
                 "keep the reader blocks' gradients and the node sites' differences for the edges",
                 "atpdsl.engine.edge_reads:prepare_edge_reads"),
        StepKind("exact_patch", "batch", "atpdsl.engine.exact:exact_patch_step",
                 "one patched forward per node"),
        StepKind("rank", "run", "atpdsl.engine.ranking:rank_step", "combine the batches' scores and rank the nodes"),
        StepKind("verify", "run", "atpdsl.engine.verification:verify_step",
                 "exact patching of the best-ranked nodes"),
        StepKind("verify_adaptive", "run", "atpdsl.engine.verification:verify_adaptive_step",
                 "verify, diagnose and patch the suspects until the bound is below the cut or the budget is spent"),
        StepKind("diagnose", "run", "atpdsl.engine.verification:diagnose_step",
                 "random node subsets patched to bound what the unverified nodes could hide"),
        StepKind("edges", "run", "atpdsl.engine.edge_reads:edges_step",
                 "edge attribution among the selected nodes, from the kept reads"),
        StepKind("edge_ig", "batch", "atpdsl.engine.edge_ig:edge_ig_step",
                 "integrated gradients for the edges: one forward + backward per step between clean and corrupt"),
        StepKind("verify_edges", "run", "atpdsl.engine.path_patching:verify_edges_step",
                 "exact path patching of the strongest edges"),
    )
}


STREAMING_KINDS = frozenset({"corrupt_forward", "clean_backward", "edge_reads"})
"""Batch steps that read no node site's clean value or gradient after the clean backward (the edges keep only the
node sites' differences): with only these (and any run-scope steps), the clean backward reduces each node site to
its estimates as the gradient reaches it (atpdsl.engine.atp) instead of holding every site's value and gradient."""


def streams(kinds: Sequence[str] | frozenset[str]) -> bool:
    """Whether the clean backward may reduce each site to its estimates at once (no later batch step reads it)."""
    return all(k in STREAMING_KINDS or (k in STEP_KINDS and STEP_KINDS[k].scope == "run") for k in kinds)


def computes_edges(method: MethodSpec, metric_kind: str, arch_allows: bool = True) -> bool:
    """Whether a run computes edge attributions among its selected nodes: gradient methods only, not for `kl`,
    whose gradient at the clean run is zero, and not where the architecture record refuses edges (e.g. a norm
    shared by attention and MLP, or post-norm blocks)."""
    return method.name in ("atp", "atp*", "relp") and metric_kind != "kl" and arch_allows


def edges_allowed(arch, config, method: str) -> bool:
    """Whether the architecture record (atpdsl.arch) lets this model have edges with this method."""
    if arch is None or config is None:
        return True
    if config.get("_atpdsl_remote"):  # NDIF: the edges read weights outside a trace (atpdsl.engine.remote)
        return False
    from atpdsl.arch import support_problems

    return not support_problems(arch, config, method, features=("edges",))


def graddrop_terms(n_layers: int, mode: str) -> list[tuple[int, str]]:
    """GradDrop's terms in order: (layer, "layer") per layer, or (layer, "attn") and (layer, "mlp") per sublayer."""
    if mode == "layer":
        return [(layer, "layer") for layer in range(n_layers)]
    return [(layer, side) for layer in range(n_layers) for side in ("attn", "mlp")]


def _rounded(cost: float) -> float:
    """A cost to 3 significant digits (the cost model is good to tens of percent, not better)."""
    return float(f"{cost:.3g}")


def _step(kind: str, name: str, cost: float, description: str, **params) -> Step:
    return Step(kind, name, STEP_KINDS[kind].scope, _rounded(cost), description, tuple(params.items()))


def _layers_with(groups: Sequence[NodeGroup], kinds: frozenset[str], n_layers: int) -> int:
    """How many layers hold nodes of these kinds."""
    found: set[int] = set()
    for g in groups:
        if g.kind in kinds:
            lo, hi = g.layers if g.layers is not None else (0, n_layers - 1)
            found.update(range(max(lo, 0), min(hi, n_layers - 1) + 1))
    return len(found)


def _atp_star_steps(method: MethodSpec, groups: Sequence[NodeGroup], n_layers: int, note: str,
                    w: costs.Workload | None) -> list[Step]:
    kinds = {g.kind for g in groups}
    qk_layers = _layers_with(groups, QK_KINDS, n_layers) if method.qk_fix else 0
    steps: list[Step] = []
    if qk_layers:
        steps.append(_step("qk_fix", "qk fix", costs.qk_fix_cost(w, qk_layers),
                           f"exact softmax for patched queries and keys: one attention-pattern recomputation in each"
                           f" of {qk_layers} layer(s){note}"))
    fixed = NORM_FIX_KINDS | (QK_KINDS if method.qk_fix else frozenset())
    norm = method.norm_fix and bool(kinds & fixed)
    if norm:
        steps.append(_step("norm_fix", "norm fix", costs.norm_fix_cost(w, n_layers, kinds=kinds & fixed),
                           f"exact block-input and final norms on every node's own write, {n_layers} layers{note}"))
    if method.graddrop:
        for layer, side in graddrop_terms(n_layers, method.graddrop_mode):
            cost = costs.graddrop_term_cost(w, layer, side, n_layers, sites_below=2 * layer)
            if norm:
                cost += costs.norm_fix_cost(w, n_layers, below=2 * layer + (2 if side in ("layer", "mlp") else 1),
                                            kinds=kinds & fixed)
            where = f"L{layer}" if side == "layer" else f"L{layer}.{side}"
            cut = "both block writes" if side == "layer" else f"the {side} write"
            steps.append(_step("graddrop_term", f"graddrop {where}", cost,
                               f"gradient into {cut} of layer {layer} cut; recompute only the layers below it"
                               f"{' (QK- and norm-fixed)' if qk_layers and norm else ''}{note}",
                               layer=layer, side=side))
    return steps


def _check_steps(method: MethodSpec, verification: Verification | None, diagnosis: Diagnosis | None,
                 reuse_exact: bool, w: costs.Workload | None) -> list[Step]:
    steps: list[Step] = []
    if verification is not None and verification.adaptive:
        budget = verification.budget or 200
        samples = diagnosis.samples if diagnosis is not None else 200
        steps.append(_step("verify_adaptive", "verify until confident",
                           costs.patched_cost(w, budget + int(samples * (1 + costs.DIAGNOSE_EXTRA))),
                           f"verify in ranking order, diagnose, patch the suspects; at most {budget} exact patches",
                           budget=budget, first=verification.top))
    elif verification is not None and not reuse_exact:
        steps.append(_step("verify", "verify", costs.patched_cost(w, verification.top),
                           f"exact patching of the {verification.top} best-ranked nodes, one forward each",
                           top=verification.top))
    elif verification is not None:
        steps.append(_step("verify", "verify", 0.0,
                           f"the {verification.top} best-ranked nodes: their exact effects are already measured",
                           top=verification.top))
    if diagnosis is not None and not (verification is not None and verification.adaptive):
        steps.append(_step("diagnose", "diagnose",
                           costs.patched_cost(w, int(diagnosis.samples * (1 + costs.DIAGNOSE_EXTRA))),
                           f"{diagnosis.samples} forwards with random node subsets patched (inclusion"
                           f" {diagnosis.inclusion}) to bound false negatives at confidence {diagnosis.confidence}"))
    return steps


def _exact_steps(nodes: int | None, patches: int, per_position: bool, sites: int,
                 w: costs.Workload | None) -> list[Step]:
    what = f"{nodes} nodes" if nodes is not None else "node count unknown until the model config is read"
    if per_position:
        what += "; per-position nodes once per token position"
    return [_step("clean_forward", "clean forward", costs.forward_cost(w, sites),
                  "run the clean prompts: the metric's baseline"),
            _step("exact_patch", "patched forwards", costs.patched_cost(w, patches, references=0),
                  f"one clean forward per node with it set to its corrupt value ({what})")]


def _edges_cost(method: MethodSpec, groups: Sequence[NodeGroup], layers: int, w: costs.Workload | None,
                sources: int = 20) -> float:
    """The edges step: products of the selected nodes (the default selection's 20) with every reader, and under
    `atp*` the QK and norm fixes again (atpdsl.engine.edge_reads.edge_fixes)."""
    star = method.name == "atp*"
    qk = _layers_with(groups, QK_KINDS, layers) if star and method.qk_fix else 0
    fixed = NORM_FIX_KINDS | (QK_KINDS if qk else frozenset())
    norm = frozenset(g.kind for g in groups) & fixed if star and method.norm_fix else None
    return costs.edge_products_cost(w, 2 * layers + 1, sources, qk, norm or None)


def _ranked_nodes(groups: Sequence[NodeGroup], nodes: int | None, w: costs.Workload | None) -> int:
    """Nodes ranked (and patched by exact patching): per-position groups once per position when it is known."""
    if w is None:
        return nodes or 0
    summed = node_count([g for g in groups if not g.per_position], w.geom) or 0
    return summed + (node_count([g for g in groups if g.per_position], w.geom) or 0) * w.positions


def _streamed_cost(steps: list[Step], w: costs.Workload | None, sites: int) -> list[Step]:
    """The clean backward costed as streamed when the engine streams it (`streams`)."""
    if w is None or not streams([s.kind for s in steps]):
        return steps
    cost = _rounded(costs.clean_backward_cost(w, sites, streamed=True))
    return [replace(s, cost=cost) if s.kind == "clean_backward" else s for s in steps]


def lower_steps(method: MethodSpec, groups: Sequence[NodeGroup], *, n_layers: int | None, nodes: int | None,
                verification: Verification | None, diagnosis: Diagnosis | None,
                metric_kind: str = "logit_diff", eval_metric: bool = False, edges_ok: bool = True,
                edge_settings: EdgeSettings | None = None, workload: costs.Workload | None = None,
                edge_sources: int = 20) -> tuple[Step, ...]:
    """The steps a run of this spec executes, in order, each with its cost per batch.

    `eval_metric`: the spec has an `eval metric` (exact patching's own effects are then not the verified ones).
    `n_layers` is None when the model's config is not on disk (a hub id offline): the depth is then estimated
    from the node groups, and the engine lowers again with the real depth once the config is read. `workload`
    (the model's sizes and the batch's shape, atpdsl.costs) makes the costs follow the model; without it they
    are their large-model limits. `edge_sources`: the nodes the edges are computed among (the selection's K).
    """
    layers = n_layers if n_layers is not None else max((g.layers[1] + 1 for g in groups if g.layers), default=1)
    note = "" if n_layers is not None else " (model depth unknown offline: estimated from the node groups)"
    sites = 2 * layers * len({g.kind for g in groups})
    workload = replace(workload, sites=sites) if workload is not None else None
    ranked = _ranked_nodes(groups, nodes, workload)
    steps = [_step("corrupt_forward", "corrupt forward", costs.forward_cost(workload, sites),
                   "run the corrupt prompts; keep the node values")]
    if method.name == "exact":
        steps += _exact_steps(nodes, ranked, any(g.per_position for g in groups), sites, workload)
    else:
        rule = "relp" if method.name == "relp" else "gradient"
        what = ("relevance (LRP rules) at every node (RelP)" if rule == "relp" else "gradient of the metric at every"
                " node (AtP)")
        steps.append(_step("clean_backward", "clean forward + backward", costs.clean_backward_cost(workload, sites),
                           f"run the clean prompts keeping the graph, then one backward: {what}", rule=rule))
        if method.name == "atp*":
            steps.extend(_atp_star_steps(method, groups, layers, note, workload))
    edges = computes_edges(method, metric_kind, edges_ok)
    es = edge_settings or EdgeSettings()
    if edges:
        if es.ig_steps:  # before the reads, which then take the integrated gradients instead of the clean ones
            steps.append(_step("edge_ig", "edge integrated gradients", es.ig_steps * costs.clean_backward_cost(workload),
                               f"integrated gradients for the edges: {es.ig_steps} forward + backward passes between"
                               f" the corrupt and the clean input", steps=es.ig_steps))
        steps.append(_step("edge_reads", "edge reads", costs.edge_reads_cost(workload, 2 * layers + 1),
                           "keep this batch's reader-block gradients and node differences for the edges"))
    steps.append(_step("rank", "rank", costs.rank_cost(workload, ranked),
                       f"combine the batches ({method.aggregate}) and rank the nodes"))
    steps.extend(_check_steps(method, verification, diagnosis, method.name == "exact" and not eval_metric, workload))
    if edges:
        steps.append(_step("edges", "edges", _edges_cost(method, groups, layers, workload, edge_sources),
                           "edge attribution among the selected nodes (at most 200), from the kept reads"))
        if es.verify:
            steps.append(_step("verify_edges", "verify edges", costs.patched_cost(workload, es.verify),
                               f"exact path patching of the {es.verify} strongest edges", top=es.verify))
    return tuple(_streamed_cost(steps, workload, sites))


def node_count(groups: Sequence[NodeGroup], geom: Geometry | None) -> int | None:
    """Nodes scored per position-summed unit (None without model sizes); per-position groups count once."""
    if geom is None:
        return None
    total = 0
    for g in groups:
        lo, hi = g.layers if g.layers is not None else (0, geom.n_layers - 1)
        layers = max(0, min(hi, geom.n_layers - 1) - lo + 1)
        if g.heads is not None:
            units = len(g.heads)
        elif g.kind == "neurons":
            units = geom.mlp
        elif g.kind in ("keys", "values"):
            units = geom.n_kv_heads
        elif g.kind in ("heads", "queries"):
            units = geom.n_heads
        else:
            units = 1
        total += layers * units
    return total


def workload_of(plan: Plan, geom: Geometry | None = None) -> costs.Workload | None:
    """The batch shape the plan's costs follow: the model's sizes and the plan's `workload` extra (positions per
    batch, model rows per pair, vocabulary; written by the compiler or the engine), None without either."""
    geom = geom or plan.geometry
    shape = dict(plan.extras).get("workload")
    if geom is None or not shape:
        return None
    pairs = max(1, min(plan.batch, len(plan.pairs) or plan.batch))
    return costs.Workload(geom, rows=pairs * int(shape["rows_per_pair"]), positions=int(shape["positions"]),
                          vocab=int(shape["vocab"]), device=str(plan.model.device))


def vocab_size(config: Mapping | None) -> int | None:
    """The vocabulary a model's config declares (a multimodal config keeps it under `text_config`)."""
    config = config or {}
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(vocab) if vocab else None


def rows_per_pair(plan: Plan) -> int:
    """Model rows each pair takes: one per `sequence(...)` answer of the metric, at least one."""
    return max(1, sum(1 for a in plan.metric.args if a.sequence))


def plan_workload(plan: Plan, lengths: Sequence[int], config: Mapping | None) -> dict[str, int] | None:
    """The plan's `workload` extra from each pair's token count and the model's config; None without a vocabulary
    or pairs (the costs then stay at their large-model limits)."""
    vocab = vocab_size(config)
    if not vocab or not plan.pairs:
        return None
    return workload_extra(lengths, plan.batch, rows_per_pair(plan), vocab)


def workload_extra(lengths: Sequence[int], batch: int, rows_per_pair: int, vocab: int) -> dict[str, int]:
    """The plan's `workload` extra from each pair's token count (in pair order): positions per batch is the mean
    over batches of the batch's longest pair (every row is padded to it)."""
    batch = max(1, batch)
    longest = [max(lengths[i: i + batch]) for i in range(0, len(lengths), batch)] or [1]
    return {"positions": max(1, round(sum(longest) / len(longest))), "rows_per_pair": max(1, rows_per_pair),
            "vocab": max(1, vocab)}


def edge_sources(plan: Plan) -> int:
    """How many nodes the edges are computed among: the selection's K (`select top K`), else 20 (the default
    selection; a threshold's count is only known after ranking), at most the engine's limit of 200."""
    sel = plan.selection
    return min(200, int(sel.value)) if sel is not None and sel.kind == "top" and sel.value >= 1 else 20


def steps_for(plan: Plan, geom: Geometry | None = None, edges_ok: bool | None = None) -> tuple[Step, ...]:
    """The steps a plan's own settings lower to, for the model sizes `geom` (default: the plan's); `edges_ok`
    whether the architecture allows edges (default: the compiler's answer, kept in the plan's extras)."""
    geom = geom or plan.geometry
    if edges_ok is None:
        edges_ok = bool(dict(plan.extras).get("edges_allowed", True))
    return lower_steps(plan.method, plan.nodes, n_layers=geom.n_layers if geom else None,
                       nodes=node_count(plan.nodes, geom), verification=plan.verification,
                       diagnosis=plan.diagnosis, metric_kind=plan.metric.kind, eval_metric=plan.eval_metric is not None,
                       edges_ok=edges_ok, edge_settings=plan.edges, workload=workload_of(plan, geom),
                       edge_sources=edge_sources(plan))


def relower(plan: Plan, geom: Geometry | None = None) -> Plan:
    """The plan with its steps lowered from its own settings (and `geom` when given)."""
    geom = geom or plan.geometry
    return replace(plan, steps=steps_for(plan, geom), geometry=geom)


def replan(plan: Plan, **changes) -> Plan:
    """The plan with some fields changed and its steps lowered again, so that they still say what runs
    (`dataclasses.replace` alone keeps the old steps, which `execute` then refuses)."""
    return relower(replace(plan, **changes))


def same_program(a: Sequence[Step], b: Sequence[Step]) -> bool:
    """Whether two step lists run the same work (kinds and params, in order; costs and wording aside)."""
    return [(s.kind, s.params) for s in a] == [(s.kind, s.params) for s in b]


def plan_total(steps: Sequence[Step], batches: int) -> float:
    """The plan's total cost in forward-equivalents."""
    return sum(s.cost for s in steps) * max(batches, 1)
