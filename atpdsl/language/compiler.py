"""Compile a checked spec into a Plan: resolved paths, pairs, nodes, method and per-batch cost (no torch)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from atpdsl.language import syntax as n
from atpdsl.language.checker import CheckResult, check, group_indices
from atpdsl.language.diagnostics import render_concise
from atpdsl.language.edge_check import edge_settings, edges_off
from atpdsl.language.export_check import export_path
from atpdsl.outputs.formats import format_of
from atpdsl.language.metric_check import metric_spec
from atpdsl.errors import AtpError, SpecError
from atpdsl.language.parser import parse
from atpdsl.plan import (
    Diagnosis, ExportTarget, MethodSpec, ModelRef, NodeGroup, Plan, Selection,
    SourceRef, Verification,
)
from atpdsl.lowering import edges_allowed, lower_steps, node_count, plan_workload, steps_for, vocab_size
from atpdsl.language.checker_memory import pair_lengths, with_memory_plan
from atpdsl.memory import parse_size
from atpdsl.registry import DIAGNOSE_SETTINGS, DTYPES, SWITCHES, VERIFY_BUDGET_DEFAULT

__all__ = [
    "check_text",
    "check_file",
    "build_plan",
    "compile_text",
    "compile_file",
    "read_spec",
    "node_count",
]

def read_spec(path: str | Path) -> str:
    """A spec file's text; AtpError naming the file when it cannot be read (never blocks: see language.files)."""
    from atpdsl.language.files import FileProblem, read_text

    try:
        return read_text(Path(path), "spec file", str(path))
    except FileProblem as e:
        raise AtpError(e.message) from None


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


_metric = metric_spec  # the one lowering of a metric statement (language/metric_check.py)


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
        attention=values.get("attention", "auto"),
        where=_where(stmt.span),
        memory=parse_size(values["memory"]) if "memory" in values else None,
        remote=SWITCHES.get(str(values.get("remote", "off")), False),
        offload=values.get("offload"),
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


def _verification(stmt: n.Verify | None, selection: Selection | None) -> Verification | None:
    """`verify top K`, or `verify until confident { budget B }` (its first round: the selection's K, or 20)."""
    if stmt is None:
        return None
    if stmt.kind.name == "top":
        return Verification(int(stmt.value.value))
    budget = int(_settings(stmt.settings).get("budget", VERIFY_BUDGET_DEFAULT))
    first = int(selection.value) if selection is not None and selection.kind == "top" else 20
    return Verification(min(first, budget), adaptive=True, budget=budget)


def _diagnosis(stmt: n.Diagnose | None) -> Diagnosis | None:
    """`diagnose false_negatives { ... }` with the registry's defaults for the settings it leaves out."""
    if stmt is None:
        return None
    values = {k: (int(v.default) if v.bound and v.bound.integer else float(v.default))
              for k, v in DIAGNOSE_SETTINGS.items()}
    values.update(_settings(stmt.settings))
    return Diagnosis(samples=int(values["samples"]), confidence=float(values["confidence"]),
                     inclusion=float(values["inclusion"]))


def _extras(result: CheckResult, batch: int, n_layers: int | None, nodes: int | None) -> list[tuple[str, Any]]:
    """What the plan's summary shows beside its steps: pair and batch counts, and the model's sizes if known."""
    info = result.model
    extras: list[tuple[str, Any]] = [("pair_count", len(result.pairs)),
                                     ("batches", math.ceil(len(result.pairs) / batch) if result.pairs else 0)]
    if info is not None and info.config is not None:
        extras.append(("model_type", str(info.config.get("model_type"))))
    if n_layers is not None:
        extras.append(("n_layers", n_layers))
    if nodes is not None:
        extras.append(("node_count", nodes))
    return extras


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
    batch_stmt, seed_stmt, edge_plan = first(n.Batch), first(n.Seed), edge_settings(spec)
    select_stmt, verify_stmt, diagnose_stmt = first(n.Select), first(n.Verify), first(n.Diagnose)
    selection = Selection(select_stmt.kind.name, select_stmt.value.value) if select_stmt else None
    verification = _verification(verify_stmt, selection)
    diagnosis = _diagnosis(diagnose_stmt)
    exports = [ExportTarget(str(export_path(s.path.value, result.base_dir, result.out_dir)),
                            format_of(s.path.value)) for s in spec.of(n.Export)]
    info = result.model
    geom = info.geometry if info else None
    n_layers = geom.n_layers if geom is not None else None
    nodes = node_count(groups, geom)
    sites: tuple[str, ...] = ()
    if info is not None and info.arch is not None and geom is not None:
        sites = tuple(info.arch.sites(groups, geom.n_layers))
    batch = 8 if batch_stmt is None or isinstance(batch_stmt.value, n.Ident) else int(batch_stmt.value.value)
    extras = _extras(result, batch, n_layers, nodes)
    edges_ok = edges_allowed(info.arch if info else None, info.config if info else None, method.name) and not \
        _model(result, model_stmt).remote and not edges_off(spec)  # NDIF: edges read weights not here
    extras.append(("edges_allowed", edges_ok))
    text = spec.source.text
    plan = Plan(
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
        steps=lower_steps(method, groups, n_layers=n_layers, nodes=nodes, verification=verification,
                          diagnosis=diagnosis, metric_kind=metric.kind, eval_metric=eval_metric is not None,
                          edges_ok=edges_ok, edge_settings=edge_plan),
        sites=sites,
        extras=tuple(extras),
        geometry=geom, edges=edge_plan,
        warnings=tuple(render_concise([d]) for d in result.warnings),
    )
    return _with_workload(result, with_memory_plan(result, plan))  # memory plan, `batch auto` (checker_memory)


def _with_workload(result: CheckResult, plan: Plan) -> Plan:
    """The plan with its batch shape in the extras (`workload`: positions from the prompts' token lengths, or a
    character estimate without a tokenizer file) and its steps costed for it; unchanged without the model's
    config (the costs then stay at their large-model limits until the engine lowers with the real model)."""
    from dataclasses import replace

    config = result.model.config if result.model is not None else None
    if plan.geometry is None or vocab_size(config) is None or not plan.pairs:
        return plan
    shape = plan_workload(plan, pair_lengths(result)[0], config)
    extras = tuple((k, v) for k, v in plan.extras if k != "workload")
    plan = replace(plan, extras=extras + (("workload", shape),))
    return replace(plan, steps=steps_for(plan))


def compile_text(text: str, *, filename: str = "<string>", base_dir: str | Path = ".",
                 out_dir: str | Path | None = None) -> Plan:
    """Compile spec text to a Plan; SpecError with every diagnostic when it has errors."""
    return build_plan(check_text(text, filename=filename, base_dir=base_dir, out_dir=out_dir))


def compile_file(path: str | Path, *, out_dir: str | Path | None = None) -> Plan:
    """Compile a spec file to a Plan (paths resolve against its folder; exports go under out_dir if given)."""
    return build_plan(check_file(path, out_dir=out_dir))
