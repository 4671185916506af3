"""Check `metric` / `eval metric` statements against the registry's records and the pairs, and lower them to
MetricSpec (the compiler and the token checks share this one lowering)."""
from __future__ import annotations

from collections.abc import Sequence

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, error, guess_hint, quote
from atpdsl.language.pair_files import PROMPT_FIELDS
from atpdsl.plan import MetricArg, MetricSpec, PromptPair, SourceRef
from atpdsl.registry import ARG_FUNCTIONS, LAST, METRICS

__all__ = ["metric_spec", "metric_fields", "check_metric", "GRADIENT_METHODS"]

GRADIENT_METHODS = ("atp", "atp*", "relp")  # methods that differentiate the metric at the clean run


def _where(span) -> SourceRef:
    return SourceRef(span.file, span.line, span.column, span.end_line, span.end_column)


def _arg(arg: n.Arg) -> MetricArg:
    if isinstance(arg, n.ArgCall):
        inner = _arg(arg.arg)
        return MetricArg(inner.field, inner.literal, arg.func.name == "first_token", arg.func.name == "sequence")
    if isinstance(arg, n.ArgLiteral):
        return MetricArg(literal=arg.value.value)
    return MetricArg(field=arg.name.name)


def metric_spec(stmt: n.Metric | None) -> MetricSpec | None:
    """A metric statement lowered (assumes it checked without errors)."""
    if stmt is None:
        return None
    position = stmt.at.name if stmt.at is not None else LAST
    return MetricSpec(stmt.call.func.name, tuple(_arg(a) for a in stmt.call.args or ()), position, _where(stmt.span))


def metric_fields(statements: Sequence[n.Statement]) -> set[str]:
    """Every pair field the metrics read (pairs files must give these as strings)."""
    out: set[str] = set()
    for stmt in statements:
        if isinstance(stmt, n.Metric):
            info = METRICS.get(stmt.call.func.name)
            if not stmt.call.args and info is not None:
                out.update(info.default_args)
            for arg in stmt.call.args or ():
                inner = arg.arg if isinstance(arg, n.ArgCall) else arg
                if isinstance(inner, n.ArgField):
                    out.add(inner.name.name)
    return out


def _arity(stmt: n.Metric) -> list[Diagnostic]:
    call = stmt.call
    func = call.func.name
    info = METRICS.get(func)
    if info is None:
        return [error("E501", f"unknown metric {quote(func)}", call.func.span, guess_hint(func, METRICS, "metrics"))]
    got = len(call.args) if call.args is not None else 0
    if got in info.arities:
        return []
    counts = " or ".join(str(a) for a in info.arities)
    what = "no arguments" if info.arities == (0,) else \
        f"{counts} argument{'s' if info.arities != (1,) else ''}"
    given = "none" if not call.args else str(got)
    return [error("E502", f"{quote(func)} takes {what} ({info.params}), got {given}", call.span,
                  f"e.g. `{info.example}`")]


def _field_problem(name: str, span, pairs: Sequence[PromptPair]) -> Diagnostic | None:
    missing = [p for p in pairs if p.field(name) is None]
    if not missing:
        return None
    common = set.intersection(*(set(k for k, _ in p.fields) for p in pairs))
    where = "any pair" if len(missing) == len(pairs) else \
        f"{len(missing)} of {len(pairs)} pairs (first: {missing[0].origin})"
    hint = guess_hint(name, sorted(common), "fields in every pair") if common else "the pairs have no other fields"
    return error("E503", f"no field {quote(name)} in {where}", span, hint)


def _check_arg(arg: n.Arg, pairs: Sequence[PromptPair] | None) -> list[Diagnostic]:
    if isinstance(arg, n.ArgCall):
        out = []
        if arg.func.name not in ARG_FUNCTIONS:
            out.append(error("E504", f"unknown function {quote(arg.func.name)}", arg.func.span,
                             guess_hint(arg.func.name, ARG_FUNCTIONS, "functions")))
        return out + _check_arg(arg.arg, pairs)
    if isinstance(arg, n.ArgLiteral):
        return [error("E503", "empty answer string", arg.span)] if not arg.value.value else []
    name = arg.name.name
    if name in PROMPT_FIELDS:
        return [error("E503", f"{quote(name)} is a prompt, not an answer field", arg.span,
                      "name a field such as `answer`, or write the answer as a string")]
    if not pairs:
        return []
    found = _field_problem(name, arg.span, pairs)
    return [found] if found else []


def _check_position(at: n.Ident, pairs: Sequence[PromptPair] | None) -> list[Diagnostic]:
    if not pairs:
        return []
    missing = [p for p in pairs if all(s.name != at.name for s in p.slots)]
    if not missing:
        return []
    names = sorted({s.name for p in pairs for s in p.slots})
    if not names:
        return [error("E505", f"position {quote(at.name)} is not a template slot", at.span,
                      "only template pairs have slots; use `at last` for pairs from files and `pair` blocks")]
    if len(missing) == len(pairs):
        return [error("E505", f"position {quote(at.name)} is not a template slot", at.span,
                      guess_hint(at.name, names + [LAST], "positions"))]
    return [error("E505", f"position {quote(at.name)} is missing from {len(missing)} of {len(pairs)} pairs (first:"
                          f" {missing[0].origin})", at.span,
                  "every pair needs the slot: pairs from files and `pair` blocks have none")]


def _check_sequences(stmt: n.Metric) -> list[Diagnostic]:
    """`sequence(...)` continues the prompt (so `at last`), and a compared pair of sides is both or neither."""
    args = stmt.call.args or ()
    seq = [isinstance(a, n.ArgCall) and a.func.name == "sequence" for a in args]
    out = []
    if any(seq) and stmt.at is not None and stmt.at.name != LAST:
        out.append(error("E511", "`sequence(...)` scores the answer after the whole prompt, so it reads `at last`",
                         stmt.at.span, "drop the `at` clause, or use first_token(...) at a slot"))
    info = METRICS.get(stmt.call.func.name)
    if info is not None and info.contrast and len(seq) == 2 and seq[0] != seq[1]:
        out.append(error("E510", f"{quote(stmt.call.func.name)} compares a whole answer with a single token",
                         stmt.call.span, "write sequence(...) around both arguments, or around neither"))
    return out


def check_metric(stmt: n.Metric, pairs: Sequence[PromptPair] | None, method: str | None) -> list[Diagnostic]:
    """Every problem of one metric statement; `pairs` None when they could not be read (no field checks);
    `method` the spec's method (None: the default, "?": not known)."""
    out = _arity(stmt)
    for arg in stmt.call.args or ():
        out.extend(_check_arg(arg, pairs))
    if stmt.at is not None and stmt.at.name != LAST:
        out.extend(_check_position(stmt.at, pairs))
    out.extend(_check_sequences(stmt))
    info = METRICS.get(stmt.call.func.name)
    if info is not None and not info.gradient and not stmt.eval and (method or "atp") in GRADIENT_METHODS:
        # `method` None: the default (atp); "?": unknown (a statement that did not parse), so not judged
        out.append(error("E512", f"metric {quote(info.key)} has zero gradient at the clean run (its minimum), so"
                                 f" every `method {method or 'atp'}` estimate would be 0", stmt.call.func.span,
                         f"attribute with another metric and use `eval metric {info.key}` to verify, or use"
                         " `method exact`"))
    return out
