"""Check the edge statements: `select edges top K | threshold X | cumulative F [{ ig_steps N }] | none` and
`verify edges top K` (E807 for an unknown rule, E808 when the run computes no edges to select or verify), and turn
them into the plan's EdgeSettings."""
from __future__ import annotations

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, error, guess_hint, quote
from atpdsl.language.model_check import ModelInfo
from atpdsl.language.settings_check import check_settings
from atpdsl.plan import EdgeSettings, Selection
from atpdsl.registry import EDGE_SETTINGS, SELECT_KINDS, VERIFY_TOP

__all__ = ["check_edges", "edge_settings", "edges_off", "EDGE_METHODS", "NO_EDGES"]

EDGE_METHODS = ("atp", "atp*", "relp")
"""The methods whose runs attribute edges (they read gradients); `exact` patches nodes only."""


NO_EDGES = "none"
"""`select edges none`: the run computes no edges (no reads kept during the passes, no edge step)."""


def edges_off(spec: n.Spec) -> bool:
    """Whether the spec asks for no edges (`select edges none`)."""
    select = next(iter(spec.of(n.SelectEdges)), None)
    return select is not None and select.kind.name == NO_EDGES and select.value is None


def _select(stmt: n.SelectEdges) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    info = SELECT_KINDS.get(stmt.kind.name)
    if stmt.kind.name == NO_EDGES or stmt.value is None:
        if stmt.kind.name != NO_EDGES:
            out.append(error("E106", f"`select edges {stmt.kind.name}` needs a number", stmt.kind.span,
                             f"e.g. `select edges {stmt.kind.name} 20`, or `select edges none` for no edges"))
        elif stmt.value is not None:
            out.append(error("E106", "`select edges none` takes no number", stmt.value.span,
                             "`select edges none` computes no edges; `select edges top K` keeps the K best"))
        return out
    if info is None:
        out.append(error("E807", f"unknown edge selection {quote(stmt.kind.name)}", stmt.kind.span,
                         guess_hint(stmt.kind.name, SELECT_KINDS, "expected")))
    elif not info.bound.accepts(stmt.value.value):
        out.append(error("E106", f"`select edges {info.key}` needs {info.bound.describe(stmt.value.value)}, got "
                                 f"{stmt.value.shown}", stmt.value.span))
    out.extend(check_settings("select edges", stmt.settings, EDGE_SETTINGS)[1])
    return out


def _verify(stmt: n.VerifyEdges) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    if stmt.kind.name != "top":
        out.append(error("E807", f"`verify edges` takes `top K`, got {quote(stmt.kind.name)}", stmt.kind.span,
                         "e.g. `verify edges top 20`"))
    elif not VERIFY_TOP.accepts(stmt.value.value):
        out.append(error("E106", f"`verify edges top` needs {VERIFY_TOP.describe(stmt.value.value)}, got "
                                 f"{stmt.value.shown}", stmt.value.span))
    return out


def _why_no_edges(spec: n.Spec, model: ModelInfo | None) -> str | None:
    """Why a run of this spec computes no edges (None when it does, or when that is not known yet)."""
    method = next(iter(spec.of(n.Method)), None)
    name = method.full_name if method is not None else "atp"
    if name not in EDGE_METHODS:
        return f"`method {name}` scores nodes only (edges need a gradient method: {', '.join(EDGE_METHODS)})"
    metric = next((m for m in spec.of(n.Metric) if not m.eval), None)
    if metric is not None and metric.call.func.name == "kl":
        return "the metric `kl` has a zero gradient at the clean run, so no edge can be attributed"
    if model is not None and model.arch is not None:
        from atpdsl.arch import support_problems  # pure Python, no torch

        problems = support_problems(model.arch, model.config or {}, name, features=("edges",))
        if problems:
            return problems[0].message
    return None


def check_edges(spec: n.Spec, model: ModelInfo | None) -> list[Diagnostic]:
    """Every diagnostic of the spec's edge statements (the first of each; duplicates are E101 elsewhere)."""
    stmts: list[n.SelectEdges | n.VerifyEdges] = spec.of(n.SelectEdges)[:1] + spec.of(n.VerifyEdges)[:1]
    out: list[Diagnostic] = []
    for stmt in stmts:
        out.extend(_select(stmt) if isinstance(stmt, n.SelectEdges) else _verify(stmt))
    why = _why_no_edges(spec, model) if stmts and not edges_off(spec) else None
    verify = next(iter(spec.of(n.VerifyEdges)), None)
    if edges_off(spec) and verify is not None:
        out.append(error("E808", "`verify edges`: this run computes no edges: the spec says `select edges none`",
                         verify.span, "drop one of the two statements"))
    elif why is not None:
        out.append(error("E808", f"`{stmts[0].keyword}`: this run computes no edges: {why}", stmts[0].span))
    return out


def edge_settings(spec: n.Spec) -> EdgeSettings | None:
    """The plan's edge settings from a checked spec's edge statements (None without any)."""
    select = next(iter(spec.of(n.SelectEdges)), None)
    verify = next(iter(spec.of(n.VerifyEdges)), None)
    if (select is None and verify is None) or edges_off(spec):
        return None
    rule = Selection(select.kind.name, select.value.value) if select is not None else None
    values = check_settings("select edges", select.settings, EDGE_SETTINGS)[0] if select is not None else {}
    return EdgeSettings(rule, int(verify.value.value) if verify is not None else 0, int(values.get("ig_steps", 0)))
