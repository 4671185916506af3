"""Compile a checked spec into a Plan: resolved paths, pairs, nodes, method and per-batch cost (no torch)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from atpdsl.language import syntax as n
from atpdsl.language.checker import CheckResult, check, group_indices
from atpdsl.language.diagnostics import render_concise
from atpdsl.errors import AtpError, SpecError
from atpdsl.language.parser import parse
from atpdsl.plan import (
    Diagnosis, ExportTarget, MetricArg, MetricSpec, MethodSpec, ModelRef, NodeGroup, Pass, Plan, Selection,
    NORM_FIX_KINDS, SourceRef, Verification, graddrop_cost, norm_fix_cost,
)
from atpdsl.registry import DIAGNOSE_SETTINGS, DTYPES, LAST, SWITCHES

__all__ = [
    "check_text",
    "check_file",
    "build_plan",
    "compile_text",
    "compile_file",
    "read_spec",
    "node_count",
    "QK_FIX_COST_PER_LAYER",
]

QK_FIX_COST_PER_LAYER = 0.05
"""Forward-equivalents of one layer's attention-pattern recomputation (small next to a forward)."""


def read_spec(path: str | Path) -> str:
    """A spec file's text; AtpError naming the file when it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AtpError(f"spec file not found: {p}") from None
    except IsADirectoryError:
        raise AtpError(f"spec path is a folder, not a file: {p}") from None
    except UnicodeDecodeError:
        raise AtpError(f"spec file is not UTF-8 text: {p}") from None
    except OSError as e:
        raise AtpError(f"cannot read spec file {p}: {e.strerror or e}") from None


def check_text(text: str, *, filename: str = "<string>", base_dir: str | Path = ".",
               out_dir: str | Path | None = None, path: str | None = None) -> CheckResult:
    """Parse and check spec text; every problem comes back as a diagnostic (never raises for bad specs)."""
    spec, syntax = parse(text, filename, path)
    return check(spec, base_dir=base_dir, out_dir=out_dir, parse_diagnostics=syntax)


def check_file(path: str | Path, *, out_dir: str | Path | None = None) -> CheckResult:
    """Parse and check a spec file; paths in it resolve against its folder."""
    text = read_spec(path)
    p = Path(path)
    return check_text(text, filename=str(path), base_dir=p.resolve().parent, out_dir=out_dir, path=str(p.resolve()))


def _where(span: Any) -> SourceRef:
    return SourceRef(span.file, span.line, span.column, span.end_line, span.end_column)


def _arg(arg: n.Arg) -> MetricArg:
    if isinstance(arg, n.ArgCall):
        inner = _arg(arg.arg)
        return MetricArg(inner.field, inner.literal, True)
    if isinstance(arg, n.ArgLiteral):
        return MetricArg(literal=arg.value.value)
    return MetricArg(field=arg.name.name)


def _metric(stmt: n.Metric | None) -> MetricSpec | None:
    if stmt is None:
        return None
    position = stmt.at.name if stmt.at is not None else LAST
    return MetricSpec(stmt.call.func.name, tuple(_arg(a) for a in stmt.call.args or ()), position,
                      _where(stmt.span))


def _settings(settings: tuple[n.Setting, ...]) -> dict[str, Any]:
    """Setting values as the checker accepted them (raw words, strings, numbers or `per X`)."""
    out: dict[str, Any] = {}
    for s in settings:
        if s.key.name in out:
            continue
        if s.per is not None:
            out[s.key.name] = ("per", s.per.name)
        elif isinstance(s.value, n.Word):
            out[s.key.name] = s.value.text
        elif isinstance(s.value, n.Str):
            out[s.key.name] = s.value.value
        elif isinstance(s.value, n.Num):
            out[s.key.name] = s.value.value
    return out


def _model(result: CheckResult, stmt: n.Model) -> ModelRef:
    values = _settings(stmt.settings)
    assert result.model is not None  # checked: a spec without errors resolved its model
    return ModelRef(
        source=result.model.source,
        is_zoo=result.model.is_zoo,
        revision=values.get("revision"),
        dtype=DTYPES[values.get("dtype", "float32")],
        device=values.get("device", "cpu"),
        attention=values.get("attention", "eager"),
        where=_where(stmt.span),
    )


def _method(stmt: n.Method | None, aggregate: str) -> MethodSpec:
    if stmt is None:
        return MethodSpec("atp", aggregate=aggregate)
    name = stmt.full_name
    if name != "atp*":
        return MethodSpec(name, aggregate=aggregate)
    values = _settings(stmt.settings)
    qk_fix = SWITCHES[values["qk_fix"]] if "qk_fix" in values else True
    graddrop, mode = True, "layer"
    if "graddrop" in values:
        g = values["graddrop"]
        if isinstance(g, tuple):
            mode = g[1]
        else:
            graddrop = SWITCHES[g]
    norm_fix = SWITCHES[values["norm_fix"]] if "norm_fix" in values else False
    return MethodSpec("atp*", qk_fix=qk_fix, graddrop=graddrop, graddrop_mode=mode, norm_fix=norm_fix,
                      aggregate=aggregate)


def _groups(stmt: n.Nodes | None) -> tuple[NodeGroup, ...]:
    if stmt is None:
        return (NodeGroup("heads"),)  # the documented default: every head, summed over positions
    out = []
    for g in stmt.groups:
        indices = group_indices(g)
        out.append(NodeGroup(
            kind=g.kind.name,
            layers=g.layers[0].bounds if g.layers else None,
            heads=tuple(sorted(indices)) if indices is not None else None,
            per_position=bool(g.per_position),
            where=_where(g.span),
        ))
    return tuple(out)


def node_count(groups: tuple[NodeGroup, ...], geom: Any) -> int | None:
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


def computes_edges(method: MethodSpec, metric_kind: str) -> bool:
    """Whether a run computes edge attributions among its selected nodes: gradient methods only, and not
    for `kl`, whose gradient at the clean run is zero."""
    return method.name in ("atp", "atp*") and metric_kind != "kl"


def _passes(method: MethodSpec, groups: tuple[NodeGroup, ...], n_layers: int | None, nodes: int | None,
            verification: Verification | None, diagnosis: Diagnosis | None,
            metric_kind: str = "logit_diff") -> tuple[Pass, ...]:
    """What the engine runs per batch, costed in forward-equivalent passes."""
    layers = n_layers if n_layers is not None else max((g.layers[1] + 1 for g in groups if g.layers), default=1)
    depth_note = "" if n_layers is not None else " (model depth unknown offline: estimated from the node groups)"
    per_position = any(g.per_position for g in groups)
    passes: list[Pass] = [Pass("corrupt forward", 1.0, "run the corrupt prompts; cache node activations")]
    if method.name == "exact":
        passes.append(Pass("clean forward", 1.0, "run the clean prompts: the metric's baseline"))
        count = float(nodes) if nodes is not None else 0.0
        what = f"{nodes} nodes" if nodes is not None else "node count unknown until the model config is read"
        if per_position:
            what += "; per-position nodes once per token position"
        passes.append(Pass("patched forwards", count, f"one clean forward per node with it set to its corrupt"
                                                      f" value ({what})"))
    else:
        passes.append(Pass("clean forward", 1.0, "run the clean prompts, keeping the graph for the backward"))
        passes.append(Pass("backward", 2.0, "gradient of the metric at every node (AtP)"))
        if method.name == "atp*" and method.qk_fix and any(g.kind in ("queries", "keys") for g in groups):
            passes.append(Pass("qk fix", round(QK_FIX_COST_PER_LAYER * layers, 6),
                               f"exact softmax for patched queries and keys: one attention-pattern recomputation"
                               f" per layer x {layers}{depth_note}"))
        fixed = NORM_FIX_KINDS | ({"queries", "keys"} if method.qk_fix else set())
        if method.name == "atp*" and method.norm_fix and any(g.kind in fixed for g in groups):
            passes.append(Pass("norm fix", round(norm_fix_cost(layers, method.graddrop, method.graddrop_mode), 6),
                               f"exact block-input and final norms on every node's own write, per layer x {layers}"
                               f"{' and per GradDrop term' if method.graddrop else ''}{depth_note}"))
        if method.name == "atp*" and method.graddrop:
            drops = layers * (2 if method.graddrop_mode == "sublayer" else 1)
            unit = "sublayer (attention and MLP apart)" if method.graddrop_mode == "sublayer" else "layer"
            passes.append(Pass("graddrop", round(2.0 * graddrop_cost(layers, method.graddrop_mode), 6),
                               f"{drops} extra backward terms, one per {unit} with its gradient dropped; each"
                               f" recomputes only the layers below its cut{depth_note}"))
    if computes_edges(method, metric_kind):
        passes.append(Pass("edges", 4.0, "edge attribution among the selected nodes: corrupt forward, clean forward"
                                         " and one backward reading every block's input gradient"))
    if verification is not None:
        passes.append(Pass("verify", float(verification.top),
                           f"exact patching of the {verification.top} best-ranked nodes, one forward each"))
    if diagnosis is not None:
        passes.append(Pass("diagnose", float(diagnosis.samples),
                           f"{diagnosis.samples} forwards with random node subsets patched (inclusion"
                           f" {diagnosis.inclusion}) to bound false negatives at confidence {diagnosis.confidence}"))
    return tuple(passes)


def build_plan(result: CheckResult) -> Plan:
    """Turn a checked spec into a Plan; SpecError if the check found errors."""
    if not result.ok:
        raise SpecError(result.errors, render_concise(result.errors))
    spec = result.spec
    first = lambda kind: next(iter(spec.of(kind)), None)  # noqa: E731 - local shorthand
    model_stmt = first(n.Model)
    metrics = spec.of(n.Metric)
    metric = _metric(next(m for m in metrics if not m.eval))
    eval_metric = _metric(next((m for m in metrics if m.eval), None))
    aggregate_stmt = first(n.Aggregate)
    aggregate = aggregate_stmt.value.name if aggregate_stmt else "mean_abs"
    method = _method(first(n.Method), aggregate)
    groups = _groups(first(n.Nodes))
    batch_stmt, seed_stmt = first(n.Batch), first(n.Seed)
    select_stmt, verify_stmt, diagnose_stmt = first(n.Select), first(n.Verify), first(n.Diagnose)
    selection = Selection(select_stmt.kind.name, select_stmt.value.value) if select_stmt else None
    verification = Verification(int(verify_stmt.value.value)) if verify_stmt else None
    diagnosis = None
    if diagnose_stmt is not None:
        values = _settings(diagnose_stmt.settings)
        defaults = {k: (int(v.default) if v.bound and v.bound.integer else float(v.default))
                    for k, v in DIAGNOSE_SETTINGS.items()}
        defaults.update(values)
        diagnosis = Diagnosis(samples=int(defaults["samples"]), confidence=float(defaults["confidence"]),
                              inclusion=float(defaults["inclusion"]))
    exports = []
    for stmt in spec.of(n.Export):
        written = stmt.path.value
        target = (result.out_dir / Path(written).name) if result.out_dir is not None else \
            (result.base_dir / written).resolve()
        exports.append(ExportTarget(str(target), Path(written).suffix.lower().lstrip(".")))
    info = result.model
    geom = info.geometry if info else None
    n_layers = geom.n_layers if geom is not None else None
    nodes = node_count(groups, geom)
    sites: tuple[str, ...] = ()
    if info is not None and info.arch is not None and geom is not None:
        sites = tuple(info.arch.sites(groups, geom.n_layers))
    batch = int(batch_stmt.value.value) if batch_stmt else 8
    extras: list[tuple[str, Any]] = [("pair_count", len(result.pairs)),
                                     ("batches", math.ceil(len(result.pairs) / batch) if result.pairs else 0)]
    if info is not None and info.config is not None:
        extras.append(("model_type", str(info.config.get("model_type"))))
    if n_layers is not None:
        extras.append(("n_layers", n_layers))
    if nodes is not None:
        extras.append(("node_count", nodes))
    text = spec.source.text
    return Plan(
        spec_file=spec.source.path or spec.source.name,
        spec_text=text,
        spec_hash=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        model=_model(result, model_stmt),
        pairs=result.pairs,
        metric=metric,
        nodes=groups,
        method=method,
        eval_metric=eval_metric,
        batch=batch,
        seed=int(seed_stmt.value.value) if seed_stmt else 0,
        selection=selection,
        verification=verification,
        diagnosis=diagnosis,
        exports=tuple(exports),
        write_per_pair=bool(spec.of(n.Keep)) or aggregate == "per_pair",
        passes=_passes(method, groups, n_layers, nodes, verification, diagnosis, metric.kind),
        sites=sites,
        extras=tuple(extras),
    )


def compile_text(text: str, *, filename: str = "<string>", base_dir: str | Path = ".",
                 out_dir: str | Path | None = None) -> Plan:
    """Compile spec text to a Plan; SpecError with every diagnostic when it has errors."""
    return build_plan(check_text(text, filename=filename, base_dir=base_dir, out_dir=out_dir))


def compile_file(path: str | Path, *, out_dir: str | Path | None = None) -> Plan:
    """Compile a spec file to a Plan (paths resolve against its folder; exports go under out_dir if given)."""
    return build_plan(check_file(path, out_dir=out_dir))
