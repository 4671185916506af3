"""Check a parsed spec: every name, number, file, slot, model fact and token, reporting all errors at once.

The statement checks live beside this module (model_check, metric_check, token_check, node_check,
export_check); this one walks the spec, validates `{ key value }` settings against the registry and collects
what compilation needs (model facts, pairs).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atpdsl.language import syntax as n
from atpdsl.language.checker_memory import model_setting_problems, remote_method_problems
from atpdsl.language.diagnostics import Diagnostic, error, guess_hint, quote, warning
from atpdsl.language.edge_check import check_edges
from atpdsl.language.export_check import check_exports
from atpdsl.language.metric_check import check_metric, metric_fields
from atpdsl.language.model_check import ModelInfo, resolve_model
from atpdsl.language.node_check import MAX_INDICES, check_nodes, group_indices
from atpdsl.language.pairs import expand_template, inline_pair, read_pairs_file
from atpdsl.language.settings_check import check_settings
from atpdsl.language.span import Span
from atpdsl.language.token_check import token_diagnostics
from atpdsl.plan import PromptPair
from atpdsl.registry import (
    AGGREGATES, BATCH, DIAGNOSE_SETTINGS, DIAGNOSE_TARGETS, KEEP_OPTIONS, METHOD_SETTINGS, METHODS, MODEL_SETTINGS,
    SEED, SELECT_KINDS, STATEMENTS, VERIFY_KINDS, VERIFY_SETTINGS, VERIFY_TOP, VERIFY_UNTIL,
)

__all__ = ["ModelInfo", "CheckResult", "check", "resolve_model", "group_indices", "MAX_INDICES"]

MIN_DRAWS_PER_NODE = 20  # random subsets each node should be in (and out of) for the diagnostic to bound it


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A checked spec: its diagnostics plus what checking had to read anyway (model facts, pairs)."""

    spec: n.Spec
    diagnostics: tuple[Diagnostic, ...]
    base_dir: Path
    out_dir: Path | None
    model: ModelInfo | None
    pairs: tuple[PromptPair, ...]

    @property
    def errors(self) -> list[Diagnostic]:
        """The diagnostics that stop compilation."""
        return [d for d in self.diagnostics if d.is_error]

    @property
    def warnings(self) -> list[Diagnostic]:
        """The diagnostics that do not stop compilation (the plan carries them into the run's outputs)."""
        return [d for d in self.diagnostics if not d.is_error]

    @property
    def ok(self) -> bool:
        """Whether the spec has no errors (warnings allowed)."""
        return not self.errors


def _head(stmt: Any, word: str | None = None) -> Span:
    """The span of a statement's keyword, where messages about the whole statement point."""
    word = word or getattr(stmt, "keyword", "")
    span = stmt.span
    return span.source.span(span.start, span.start + len(word.split()[0]))


class _Checker:
    """Walks a spec once, collecting diagnostics and the facts compilation needs."""

    def __init__(self, spec: n.Spec, base_dir: Path, out_dir: Path | None, parse_failed: bool) -> None:
        self.spec = spec
        self.base_dir = base_dir
        self.out_dir = out_dir
        self.parse_failed = parse_failed
        self.diags: list[Diagnostic] = []
        self.model: ModelInfo | None = None
        self.pairs: list[PromptPair] = []
        self.pair_spans: list[Span | None] = []
        self.pairs_failed = False

    def add(self, d: Diagnostic | Iterable[Diagnostic]) -> None:
        if isinstance(d, Diagnostic):
            self.diags.append(d)
        else:
            self.diags.extend(d)

    def settings(self, block: str, settings: tuple[n.Setting, ...], table: Mapping[str, Any]) -> dict[str, Any]:
        values, diags = check_settings(block, settings, table)
        self.add(diags)
        return values

    def first(self, kind: type) -> Any:
        found = self.spec.of(kind)
        return found[0] if found else None

    def duplicates(self) -> None:
        first: dict[str, Any] = {}
        for stmt in self.spec.statements:
            word = stmt.keyword
            if STATEMENTS[word].repeatable:
                continue
            if word in first:
                self.add(error("E101", f"duplicate {quote(word)} statement", _head(stmt, word),
                               f"the first is on line {first[word].span.line}; a spec has one {quote(word)}"))
            else:
                first[word] = stmt

    def check_model(self) -> None:
        stmt = self.first(n.Model)
        if stmt is None:
            return
        values = self.settings("model", stmt.settings, MODEL_SETTINGS)
        if stmt.zoo and "revision" in values:
            rev = next(s for s in stmt.settings if s.key.name == "revision")
            self.add(error("E104", "zoo models have no revisions", rev.key.span))
        model, diags = resolve_model(stmt, self.base_dir, values.get("revision"))
        self.model = model
        self.add(diags)
        self.add(model_setting_problems(stmt, values, model))
        self.add(remote_method_problems(stmt, self.first(n.Method)))

    def seed_value(self) -> int:
        stmt = self.first(n.Seed)
        if stmt is not None and SEED.accepts(stmt.value.value):
            return int(stmt.value.value)
        return 0

    def check_pairs(self) -> None:
        needed = metric_fields(self.spec.statements)
        for stmt in self.spec.statements:
            if isinstance(stmt, n.Pair):
                pair, diags = inline_pair(stmt)
                got, spans = ([pair], [stmt.span]) if pair is not None else ([], [])
            elif isinstance(stmt, n.PairsFrom):
                got, diags, spans = read_pairs_file(stmt, self.base_dir, needed, with_spans=True)
            elif isinstance(stmt, n.Template):
                got, diags, _ = expand_template(stmt, self.seed_value())
                spans = [_head(stmt)] * len(got)
            else:
                continue
            self.pairs.extend(got)
            self.pair_spans.extend(spans)
            if any(d.is_error for d in diags):
                self.pairs_failed = True
            self.add(diags)

    def check_metrics(self) -> None:
        method = self.first(n.Method)
        name = method.full_name if method is not None else None
        pairs = self.pairs if self.pairs and not self.pairs_failed else None
        used = {id(m) for m in ([m for m in self.spec.of(n.Metric) if not m.eval][:1]
                                + [m for m in self.spec.of(n.Metric) if m.eval][:1])}
        for stmt in self.spec.of(n.Metric):
            # the method decides whether a metric may drive it: unknown when its statement did not parse
            known = name if not self.parse_failed or method is not None else "?"
            self.add(check_metric(stmt, pairs, known if id(stmt) in used else "?"))
        evals = [m for m in self.spec.of(n.Metric) if m.eval]
        if evals and not self.spec.of(n.Verify):
            self.add(warning("W501", "`eval metric` is only used by `verify`, and there is none", _head(evals[0]),
                             "add `verify top K`"))

    def check_tokens(self, metric_errors: bool) -> None:
        """The token checks, when the pairs and metrics they read checked clean."""
        if metric_errors or self.pairs_failed or self.parse_failed or self.model is None or not self.pairs:
            return  # (a parse error may be a string no tokenizer can take: a lone surrogate)
        found = token_diagnostics(self.spec, self.model, self.pairs, self.pair_spans)
        if any(d.is_error for d in self.diags):  # "not checked" matters only for a spec that is otherwise fine
            found = [d for d in found if d.code != "W504"]
        self.add(found)

    def check_method(self) -> None:
        stmt = self.first(n.Method)
        if stmt is not None:
            name = stmt.full_name
            info = METHODS.get(name)
            if info is None:
                span = stmt.name.span
                if stmt.star:
                    span = span.source.span(span.start, span.source.text.index("*", span.end) + 1)
                self.add(error("E701", f"unknown method {quote(name)}", span, guess_hint(name, METHODS, "methods")))
            elif stmt.settings and not info.settings:
                belongs = any(s.key.name in METHOD_SETTINGS for s in stmt.settings)
                self.add(error("E702", f"`method {name}` takes no settings", stmt.settings[0].key.span,
                               "qk_fix, graddrop and norm_fix belong to `method atp*`" if belongs else ""))
            elif info.settings:
                self.check_support(stmt, name, self.settings("method", stmt.settings, METHOD_SETTINGS))
            else:
                self.check_support(stmt, name, {})
        for stmt in self.spec.of(n.Aggregate)[:1]:
            if stmt.value.name not in AGGREGATES:
                self.add(error("E703", f"unknown aggregate {quote(stmt.value.name)}", stmt.value.span,
                               guess_hint(stmt.value.name, AGGREGATES, "expected one of")))
        for stmt in self.spec.of(n.Keep)[:1]:
            if stmt.value.name not in KEEP_OPTIONS:
                self.add(error("E704", f"unknown `keep` option {quote(stmt.value.name)}", stmt.value.span,
                               guess_hint(stmt.value.name, KEEP_OPTIONS, "expected")))

    def check_support(self, stmt: n.Method, name: str, values: Mapping[str, Any]) -> None:
        """E705: what the model's architecture record cannot run with this method (atpdsl.arch.support_problems)."""
        if self.model is None or self.model.arch is None:
            return
        from atpdsl.arch import support_problems  # pure Python, no torch

        graddrop, mode = values.get("graddrop", (True, "layer"))  # the compiler's defaults for `method atp*`
        on = {"qk_fix": values.get("qk_fix", True), "graddrop": graddrop, "norm_fix": values.get("norm_fix", False)}
        spans = {s.key.name: s.key.span for s in stmt.settings}
        for p in support_problems(self.model.arch, self.model.config or {}, name,
                                  corrections=[k for k, v in on.items() if v], graddrop_mode=mode):
            self.add(error("E705", p.message, spans.get(p.subject, stmt.name.span), p.hint))

    def check_numbers(self) -> None:
        for stmt in self.spec.of(n.Batch)[:1]:
            if isinstance(stmt.value, n.Ident):
                if stmt.value.name != "auto":
                    self.add(error("E106", f"`batch` must be a positive integer or `auto`, got {quote(stmt.value.name)}",
                                   stmt.value.span))
            elif not BATCH.accepts(stmt.value.value):
                self.add(error("E106", f"`batch` must be {BATCH.describe(stmt.value.value)}, got {stmt.value.shown}", stmt.value.span))
        for stmt in self.spec.of(n.Seed)[:1]:
            if not SEED.accepts(stmt.value.value):
                self.add(error("E106", f"`seed` must be {SEED.describe()}, got {stmt.value.shown}", stmt.value.span))
        for stmt in self.spec.of(n.Select)[:1]:
            info = SELECT_KINDS.get(stmt.kind.name)
            if info is None:
                self.add(error("E801", f"unknown selection {quote(stmt.kind.name)}", stmt.kind.span,
                               guess_hint(stmt.kind.name, SELECT_KINDS, "expected")))
            elif not info.bound.accepts(stmt.value.value):
                self.add(error("E106", f"`select {info.key}` needs {info.bound.describe(stmt.value.value)}, got {stmt.value.shown}",
                               stmt.value.span))
        for stmt in self.spec.of(n.Verify)[:1]:
            self.check_verify(stmt)
        for stmt in self.spec.of(n.Diagnose)[:1]:
            self.check_diagnose(stmt)

    def check_verify(self, stmt: n.Verify) -> None:
        kind, value = stmt.kind.name, stmt.value
        if kind not in VERIFY_KINDS:
            self.add(error("E802", f"`verify` takes `top K` or `until confident`, got {quote(kind)}", stmt.kind.span,
                           guess_hint(kind, VERIFY_KINDS, "expected")))
        elif kind == "top":
            if not isinstance(value, n.Num):
                self.add(error("E802", f"`verify top` needs a number, got {quote(value.name)}", value.span,
                               "e.g. `verify top 12`"))
            elif not VERIFY_TOP.accepts(value.value):
                self.add(error("E106", f"`verify top` needs {VERIFY_TOP.describe(value.value)}, got {value.shown}", value.span))
            if stmt.settings:
                self.add(error("E702", "`verify top K` takes no settings", stmt.settings[0].key.span,
                               "`budget` belongs to `verify until confident`"))
        else:
            if not isinstance(value, n.Ident) or value.name not in VERIFY_UNTIL:
                shown = value.shown if isinstance(value, n.Num) else quote(value.name)
                self.add(error("E802", f"`verify until` takes `confident`, got {shown}", value.span,
                               "e.g. `verify until confident { budget 200 }`"))
            self.settings("verify", stmt.settings, VERIFY_SETTINGS)

    def check_diagnose(self, stmt: n.Diagnose) -> None:
        if stmt.target.name not in DIAGNOSE_TARGETS:
            self.add(error("E805", f"unknown diagnosis {quote(stmt.target.name)}", stmt.target.span,
                           guess_hint(stmt.target.name, DIAGNOSE_TARGETS, "expected")))
            return
        values = self.settings("diagnose", stmt.settings, DIAGNOSE_SETTINGS)
        samples = float(values.get("samples", 200))
        inclusion = float(values.get("inclusion", 0.1))
        if samples * min(inclusion, 1 - inclusion) < MIN_DRAWS_PER_NODE:
            self.add(warning(
                "W502", f"{samples:g} samples at inclusion {inclusion:g} put each node in (or out of) about "
                f"{samples * min(inclusion, 1 - inclusion):.3g} subsets: too few to bound anything",
                stmt.span, f"use samples x inclusion >= {MIN_DRAWS_PER_NODE}, e.g. "
                f"`samples {math.ceil(MIN_DRAWS_PER_NODE / min(inclusion, 1 - inclusion))}`"))

    def check_required(self) -> None:
        if self.parse_failed:
            return  # a statement with a syntax error may be the one that looks missing
        start = self.spec.source.span(0, 0)
        if self.first(n.Model) is None:
            self.add(error("E102", "missing `model` statement", start,
                           'e.g. `model "EleutherAI/pythia-70m"` or `model zoo "induction-2l"`'))
        if not any(isinstance(s, (n.Pair, n.PairsFrom, n.Template)) for s in self.spec.statements):
            self.add(error("E307", "no prompt pairs", start,
                           'add `pair { clean "..." corrupt "..." }`, `pairs from "file.jsonl"` or `template { ... }`'))
        if not any(isinstance(s, n.Metric) and not s.eval for s in self.spec.statements):
            self.add(error("E102", "missing `metric` statement", start, "e.g. `metric logit_diff(answer, wrong)`"))

    def run(self) -> None:
        self.duplicates()
        self.check_model()
        self.check_pairs()
        before = len(self.diags)
        self.check_metrics()
        metric_errors = any(d.is_error for d in self.diags[before:])
        nodes = self.first(n.Nodes)
        if nodes is not None:
            self.add(check_nodes(nodes, _head(nodes), self.model.geometry if self.model else None,
                                 self.model.arch if self.model else None))
        self.check_method()
        self.check_numbers()
        self.add(check_edges(self.spec, self.model))
        self.add(check_exports(self.spec.of(n.Export), self.base_dir, self.out_dir))
        self.check_required()
        self.check_tokens(metric_errors)


def check(spec: n.Spec, *, base_dir: str | Path = ".", out_dir: str | Path | None = None,
          parse_diagnostics: Iterable[Diagnostic] = ()) -> CheckResult:
    """Check a parsed spec; never raises for bad input. Parse diagnostics are carried along."""
    parse_diagnostics = list(parse_diagnostics)
    checker = _Checker(spec, Path(base_dir).resolve(), Path(out_dir).resolve() if out_dir is not None else None,
                       parse_failed=any(d.is_error for d in parse_diagnostics))
    checker.run()
    return CheckResult(
        spec=spec,
        diagnostics=tuple(parse_diagnostics + checker.diags),
        base_dir=checker.base_dir,
        out_dir=checker.out_dir,
        model=checker.model,
        pairs=tuple(checker.pairs),
    )
