"""Check a parsed spec: every name, number, file, slot and model fact, reporting all errors at once."""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, cap_list, did_you_mean, error, quote, warning
from atpdsl.errors import ModelError
from atpdsl.language.pairs import PROMPT_FIELDS, expand_template, inline_pair, read_pairs_file
from atpdsl.plan import PromptPair
from atpdsl.registry import (
    AGGREGATES, ARG_FUNCTIONS, BATCH, DIAGNOSE_SETTINGS, DIAGNOSE_TARGETS, ENDPOINT_KINDS, EXPORT_FORMATS,
    GRADDROP_MODES, KEEP_OPTIONS, LAST, METHOD_SETTINGS, METHODS, METRICS, MODEL_SETTINGS, NODE_KINDS, SEED,
    SELECT_KINDS, STATEMENTS, SWITCHES, VERIFY_KINDS, VERIFY_TOP, SettingInfo,
)
from atpdsl.language.span import Span

__all__ = ["ModelInfo", "CheckResult", "check", "resolve_model", "group_indices", "MAX_INDICES"]

MIN_DRAWS_PER_NODE = 20  # random subsets each node should be in (and out of) for the diagnostic to bound it
MAX_INDICES = 1_000_000  # an index range larger than this is a typo, not a request
_DEVICE = re.compile(r"^(cpu|mps|auto|cuda(:[0-9]+)?)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model as resolved at check time; `config` and `geometry` only when config.json was readable."""

    source: str  # absolute folder, hub id, or zoo name
    is_zoo: bool
    folder: Path | None
    config: Mapping[str, Any] | None
    geometry: Any | None  # atpdsl.arch.Geometry
    arch: Any | None  # atpdsl.arch.Arch


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
    def ok(self) -> bool:
        """Whether the spec has no errors (warnings allowed)."""
        return not self.errors


def _head(stmt: Any, word: str | None = None) -> Span:
    """The span of a statement's keyword, where messages about the whole statement point."""
    word = word or getattr(stmt, "keyword", "")
    span = stmt.span
    return span.source.span(span.start, span.start + len(word.split()[0]))


def _one_of(names: Iterable[str]) -> str:
    return cap_list([quote(x) for x in names])


def _guess_hint(word: str, candidates: Iterable[str], what: str) -> str:
    candidates = list(candidates)
    guess = did_you_mean(word, candidates)
    if guess is not None and guess != word:
        return f"did you mean {quote(guess)}?"
    return f"{what}: {_one_of(candidates)}"


def group_indices(group: n.Group) -> set[int] | None:
    """The indices a node group names (None: all); assumes the checker accepted the ranges."""
    if group.indices is None:
        return None
    out: set[int] = set()
    for r in group.indices:
        lo, hi = r.bounds
        out.update(range(lo, hi + 1))
    return out


# ------------------------------------------------------------------ model

def _read_config(folder: Path, shown: str) -> tuple[dict | None, str | None]:
    path = folder / "config.json"
    if not path.is_file():
        return None, f"no config.json in model folder {quote(shown)}"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"cannot read config.json of {quote(shown)}: {e}"
    if not isinstance(value, dict):
        return None, f"config.json of {quote(shown)} is not a JSON object"
    return value, None


def _cached_hub_config(repo: str, revision: str | None) -> dict | None:
    """config.json of a hub model already in the local cache, without any download."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json", revision=revision)
        if isinstance(found, str) and os.path.isfile(found):
            value = json.loads(Path(found).read_text(encoding="utf-8"))
            return value if isinstance(value, dict) else None
    except Exception:  # noqa: BLE001 - the cache is optional; any failure means "not known offline"
        return None
    return None


def resolve_model(stmt: n.Model, base_dir: Path, revision: str | None = None
                  ) -> tuple[ModelInfo | None, list[Diagnostic]]:
    """Find the model a `model` statement names and read its config when it is on disk."""
    from atpdsl.arch import arch_for_config, geometry  # pure Python, no torch

    written = stmt.source.value
    span = stmt.source.span
    config: dict | None = None
    folder: Path | None = None
    diags: list[Diagnostic] = []
    if stmt.zoo:
        from atpdsl.zoo import available, zoo_path

        names = available()
        if written not in names:
            if not names:
                return None, [error("E202", f"unknown zoo model {quote(written)}", span,
                                    "this installation ships no zoo models")]
            return None, [error("E202", f"unknown zoo model {quote(written)}", span,
                                _guess_hint(written, names, "zoo models"))]
        folder = zoo_path(written)
        config, problem = _read_config(folder, f"zoo {written}")
        source = written
    else:
        if not written.strip():
            return None, [error("E201", "empty model name", span,
                                'give a hub id such as "EleutherAI/pythia-70m" or a local folder')]
        looks_local = written.startswith(("/", "./", "../", "~", ".\\", "..\\")) or written in (".", "..")
        path = (base_dir / os.path.expanduser(written))
        if path.is_dir():
            folder = path.resolve()
            config, problem = _read_config(folder, written)
            source = str(folder)
        elif looks_local or path.exists() or not _HUB_ID.match(written):
            what = "is not a folder" if path.exists() else "not found"
            return None, [error("E201", f"model folder {what}: {quote(written)}", span,
                                f"paths are relative to the spec's folder ({base_dir})"
                                if not os.path.isabs(written) else "",
                                "a hub id looks like `org/name`" if not looks_local else "")]
        else:
            source = written
            problem = None
            config = _cached_hub_config(written, revision)
            first = written.split("/")[0]
            if "/" in written and (base_dir / first).is_dir():
                diags.append(warning("W201", f"no folder {quote(written)} here, so it is taken as a hub id", span,
                                     f"write {quote('./' + written)} for a local folder"))
    if problem is not None:
        return None, [error("E203", problem, span, "a model folder holds config.json and the weights"
                                                   " (save_pretrained writes both)")]
    geom = arch = None
    if config is not None:
        try:
            arch = arch_for_config(config)
            geom = geometry(config)
        except ModelError as e:
            return None, diags + [error("E204", str(e), span)]
        except (TypeError, ValueError, ArithmeticError) as e:
            return None, diags + [error("E204", f"model config has unusable sizes: {e}", span)]
    return ModelInfo(source, stmt.zoo, folder, config, geom, arch), diags


# ------------------------------------------------------------------ the checker

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
        self.pairs_failed = False

    def add(self, d: Diagnostic | Iterable[Diagnostic]) -> None:
        if isinstance(d, Diagnostic):
            self.diags.append(d)
        else:
            self.diags.extend(d)

    # -- settings blocks
    def settings(self, block: str, settings: tuple[n.Setting, ...], table: Mapping[str, SettingInfo]
                 ) -> dict[str, Any]:
        """Validate `{ key value ... }` against a table; returns key -> normalized value."""
        out: dict[str, Any] = {}
        first: dict[str, n.Setting] = {}
        for s in settings:
            key = s.key.name
            info = table.get(key)
            if info is None:
                self.add(error("E103", f"unknown {block} setting {quote(key)}", s.key.span,
                               _guess_hint(key, table, f"{block} settings")))
                continue
            if key in first:
                self.add(error("E105", f"duplicate setting {quote(key)}", s.key.span,
                               f"the first is on line {first[key].span.line}"))
                continue
            first[key] = s
            value = self.setting_value(info, s)
            if value is not None:
                out[key] = value
        return out

    def setting_value(self, info: SettingInfo, s: n.Setting) -> Any:
        key = info.key
        v = s.value
        if s.per is not None:
            if info.kind != "graddrop":
                self.add(error("E104", f"{quote(key)} takes a value, not `per ...`", s.span))
                return None
            if s.per.name not in GRADDROP_MODES:
                self.add(error("E104", f"`graddrop per` takes `layer` or `sublayer`, got {quote(s.per.name)}",
                               s.per.span, _guess_hint(s.per.name, GRADDROP_MODES, "modes")))
                return None
            return (True, s.per.name)
        assert v is not None  # the grammar gives a setting either a value or `per`
        text = v.text if isinstance(v, n.Word) else v.value if isinstance(v, n.Str) else None
        if info.kind in ("switch", "graddrop"):
            if isinstance(v, n.Word) and v.text in SWITCHES:
                return (SWITCHES[v.text], "layer") if info.kind == "graddrop" else SWITCHES[v.text]
            allowed = "`on`, `off`, `per layer` or `per sublayer`" if info.kind == "graddrop" else "`on` or `off`"
            self.add(error("E104", f"{quote(key)} is {allowed}, got {_shown(v)}", v.span))
            return None
        if info.kind == "number":
            assert info.bound is not None
            if not isinstance(v, n.Num) or not info.bound.accepts(v.value):
                self.add(error("E106", f"{quote(key)} must be {info.bound.describe()}, got {_shown(v)}", v.span))
                return None
            return v.value
        if text is None:
            self.add(error("E104", f"{quote(key)} takes a word or a string, got {_shown(v)}", v.span))
            return None
        if info.kind == "choice":
            if text not in info.choices:
                self.add(error("E104", f"unknown {key} {quote(text)}", v.span,
                               _guess_hint(text, info.choices, "expected one of")))
                return None
            return text
        if info.kind == "device":
            if not _DEVICE.match(text):
                self.add(error("E104", f"unknown device {quote(text)}", v.span,
                               'expected cpu, cuda, cuda:N, mps or auto (quote it: device "cuda:1")'))
                return None
            return text
        if not text:
            self.add(error("E104", f"{quote(key)} is empty", v.span))
            return None
        return text

    # -- statements
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

    def first(self, kind: type) -> Any:
        found = self.spec.of(kind)
        return found[0] if found else None

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

    def seed_value(self) -> int:
        stmt = self.first(n.Seed)
        if stmt is not None and SEED.accepts(stmt.value.value):
            return int(stmt.value.value)
        return 0

    def check_pairs(self) -> None:
        for stmt in self.spec.statements:
            if isinstance(stmt, n.Pair):
                pair, diags = inline_pair(stmt)
            elif isinstance(stmt, n.PairsFrom):
                got, diags = read_pairs_file(stmt, self.base_dir)
                self.pairs.extend(got)
                pair = None
            elif isinstance(stmt, n.Template):
                got, diags, _ = expand_template(stmt, self.seed_value())
                self.pairs.extend(got)
                pair = None
            else:
                continue
            if pair is not None:
                self.pairs.append(pair)
            if any(d.is_error for d in diags):
                self.pairs_failed = True
            self.add(diags)

    def check_metric(self, stmt: n.Metric) -> None:
        call = stmt.call
        func = call.func.name
        info = METRICS.get(func)
        if info is None:
            self.add(error("E501", f"unknown metric {quote(func)}", call.func.span,
                           _guess_hint(func, METRICS, "metrics")))
        else:
            got = len(call.args) if call.args is not None else 0
            if got != info.arity:
                what = f"{info.arity} argument{'s' if info.arity != 1 else ''}" if info.arity else "no arguments"
                example = {"logit_diff": "logit_diff(answer, wrong)", "logprob": "logprob(answer)",
                           "prob": "prob(answer)"}.get(func, func)
                given = "none" if call.args is None or not call.args else str(got)
                self.add(error("E502", f"{quote(func)} takes {what} ({info.params}), got {given}", call.span,
                               f"e.g. `{example}`"))
        for arg in call.args or ():
            self.check_arg(arg)
        if stmt.at is not None and stmt.at.name != LAST:
            self.check_position(stmt.at)

    def check_arg(self, arg: n.Arg) -> None:
        if isinstance(arg, n.ArgCall):
            fname = arg.func.name
            if fname not in ARG_FUNCTIONS:
                self.add(error("E504", f"unknown function {quote(fname)}", arg.func.span,
                               _guess_hint(fname, ARG_FUNCTIONS, "functions")))
            self.check_arg(arg.arg)
        elif isinstance(arg, n.ArgLiteral):
            if not arg.value.value:
                self.add(error("E503", "empty answer string", arg.span))
        else:
            name = arg.name.name
            if name in PROMPT_FIELDS:
                self.add(error("E503", f"{quote(name)} is a prompt, not an answer field", arg.span,
                               "name a field such as `answer`, or write the answer as a string"))
                return
            if not self.pairs or self.pairs_failed:
                return
            missing = [p for p in self.pairs if p.field(name) is None]
            if missing:
                common = set.intersection(*(set(k for k, _ in p.fields) for p in self.pairs))
                where = "any pair" if len(missing) == len(self.pairs) else \
                    f"{len(missing)} of {len(self.pairs)} pairs (first: {missing[0].origin})"
                hint = _guess_hint(name, sorted(common), "fields in every pair") if common else \
                    "the pairs have no other fields"
                self.add(error("E503", f"no field {quote(name)} in {where}", arg.span, hint))

    def check_position(self, at: n.Ident) -> None:
        if not self.pairs or self.pairs_failed:
            return
        missing = [p for p in self.pairs if all(s.name != at.name for s in p.slots)]
        if not missing:
            return
        names = sorted({s.name for p in self.pairs for s in p.slots})
        if not names:
            self.add(error("E505", f"position {quote(at.name)} is not a template slot", at.span,
                           "only template pairs have slots; use `at last` for pairs from files and `pair` blocks"))
        elif len(missing) == len(self.pairs):
            self.add(error("E505", f"position {quote(at.name)} is not a template slot", at.span,
                           _guess_hint(at.name, names + [LAST], "positions")))
        else:
            self.add(error("E505", f"position {quote(at.name)} is missing from {len(missing)} of {len(self.pairs)}"
                                   f" pairs (first: {missing[0].origin})", at.span,
                           "every pair needs the slot: pairs from files and `pair` blocks have none"))

    def check_nodes(self) -> None:
        stmt = self.first(n.Nodes)
        if stmt is None:
            return
        if not stmt.groups:
            self.add(error("E608", "empty `nodes` block", _head(stmt),
                           "list node kinds, e.g. `nodes { heads  neurons layers 0..3 }`"))
            return
        geom = self.model.geometry if self.model else None
        arch = self.model.arch if self.model else None
        good: list[n.Group] = []
        for g in stmt.groups:
            if self.check_group(g, geom, arch):
                good.append(g)
        self.check_overlaps(good)

    def check_group(self, g: n.Group, geom: Any, arch: Any) -> bool:
        kind = g.kind.name
        info = NODE_KINDS.get(kind)
        if info is None:
            if kind in ENDPOINT_KINDS:
                self.add(error("E601", f"{quote(kind)} is a graph endpoint, not a node kind to score", g.kind.span,
                               f"node kinds: {_one_of(NODE_KINDS)}"))
                return False
            guess = did_you_mean(kind, list(NODE_KINDS) + ["layers"])
            if guess == "layers":
                hint = "did you mean `layers`? write it after the node kind: `heads layers 0..3`"
            elif guess is not None:
                hint = f"did you mean {quote(guess)}?"
            else:
                hint = f"node kinds: {_one_of(NODE_KINDS)}"
            self.add(error("E601", f"unknown node kind {quote(kind)}", g.kind.span, hint))
            return False
        ok = True
        for extra in g.layers[1:]:
            self.add(error("E105", "`layers` is given twice in one node group", extra.span))
            ok = False
        for extra in g.per_position[1:]:
            self.add(error("E105", "`per position` is given twice in one node group", extra))
            ok = False
        if g.layers:
            r = g.layers[0]
            lo, hi = r.bounds
            if lo > hi:
                self.add(error("E602", f"layer range {lo}..{hi} is reversed", r.span, f"write {hi}..{lo}"))
                ok = False
            elif geom is not None and hi >= geom.n_layers:
                self.add(error("E603", f"layer {hi} is out of range: the model has {geom.n_layers} layers"
                                       f" (0..{geom.n_layers - 1})", r.hi.span if r.hi else r.lo.span))
                ok = False
        if g.indices is not None:
            if info.unit is None:
                self.add(error("E606", f"{quote(kind)} nodes have no index: each layer has one", g.indices[0].span,
                               "drop the numbers, or use `heads`/`neurons` for parts of a layer"))
                return False
            unit, count = self.unit_count(kind, geom)
            total = 0
            for r in g.indices:
                lo, hi = r.bounds
                if lo > hi:
                    self.add(error("E607", f"index range {lo}..{hi} is reversed", r.span, f"write {hi}..{lo}"))
                    ok = False
                    continue
                total += hi - lo + 1
                if count is not None and hi >= count:
                    self.add(error("E604", f"{unit} {hi} is out of range: the model has {count} {unit}s"
                                           f" (0..{count - 1})", r.hi.span if r.hi else r.lo.span))
                    ok = False
            if total > MAX_INDICES:
                self.add(error("E607", f"{total} indices in one group is too many (at most {MAX_INDICES})",
                               g.indices[0].span.to(g.indices[-1].span)))
                ok = False
        if arch is not None and kind not in arch.kinds:
            self.add(error("E609", f"{arch.name} models have no {quote(kind)} nodes", g.kind.span,
                           f"this architecture has {_one_of(arch.kinds)}"))
            ok = False
        return ok

    @staticmethod
    def unit_count(kind: str, geom: Any) -> tuple[str, int | None]:
        """What a kind's indices count, and how many the model has (None when unknown)."""
        if kind == "neurons":
            return "neuron", geom.mlp if geom else None
        if kind in ("keys", "values") and geom is not None and geom.grouped:
            return "KV group", geom.n_kv_heads
        return "head", geom.n_heads if geom else None

    def check_overlaps(self, groups: list[n.Group]) -> None:
        for k, g in enumerate(groups):
            for h in groups[:k]:
                if h.kind.name != g.kind.name or bool(h.per_position) != bool(g.per_position):
                    continue
                ga = g.layers[0].bounds if g.layers else None
                ha = h.layers[0].bounds if h.layers else None
                if ga is not None and ha is not None and (ga[1] < ha[0] or ha[1] < ga[0]):
                    continue
                gi, hi = group_indices(g), group_indices(h)
                if gi is not None and hi is not None and not (gi & hi):
                    continue
                hints = [f"the earlier group is at {h.span.line}:{h.span.column}"]
                if h.indices is None and g.indices is not None and h.layers and not g.layers:
                    idx = ", ".join(f"{r.lo.text}..{r.hi.text}" if r.hi else r.lo.text for r in g.indices)
                    lay = h.layers[0]
                    lay_text = f"{lay.lo.text}..{lay.hi.text}" if lay.hi else lay.lo.text
                    hints.append(f"to pick {g.kind.name} {idx} in layers {lay_text}, write"
                                 f" `{g.kind.name} {idx} layers {lay_text}`")
                self.add(error("E605", f"these {quote(g.kind.name)} nodes overlap an earlier group", g.span, *hints))
                break

    def check_method(self) -> None:
        stmt = self.first(n.Method)
        if stmt is not None:
            name = stmt.full_name
            info = METHODS.get(name)
            if info is None:
                span = stmt.name.span
                if stmt.star:
                    span = span.source.span(span.start, span.source.text.index("*", span.end) + 1)
                self.add(error("E701", f"unknown method {quote(name)}", span, _guess_hint(name, METHODS, "methods")))
            elif stmt.settings and not info.settings:
                belongs = any(s.key.name in METHOD_SETTINGS for s in stmt.settings)
                self.add(error("E702", f"`method {name}` takes no settings", stmt.settings[0].key.span,
                               "qk_fix, graddrop and norm_fix belong to `method atp*`" if belongs else ""))
            elif info.settings:
                self.settings("method", stmt.settings, METHOD_SETTINGS)
        for stmt in self.spec.of(n.Aggregate)[:1]:
            if stmt.value.name not in AGGREGATES:
                self.add(error("E703", f"unknown aggregate {quote(stmt.value.name)}", stmt.value.span,
                               _guess_hint(stmt.value.name, AGGREGATES, "expected one of")))
        for stmt in self.spec.of(n.Keep)[:1]:
            if stmt.value.name not in KEEP_OPTIONS:
                self.add(error("E704", f"unknown `keep` option {quote(stmt.value.name)}", stmt.value.span,
                               _guess_hint(stmt.value.name, KEEP_OPTIONS, "expected")))

    def check_numbers(self) -> None:
        for stmt in self.spec.of(n.Batch)[:1]:
            if not BATCH.accepts(stmt.value.value):
                self.add(error("E106", f"`batch` must be {BATCH.describe()}, got {stmt.value.text}", stmt.value.span))
        for stmt in self.spec.of(n.Seed)[:1]:
            if not SEED.accepts(stmt.value.value):
                self.add(error("E106", f"`seed` must be {SEED.describe()}, got {stmt.value.text}", stmt.value.span))
        for stmt in self.spec.of(n.Select)[:1]:
            info = SELECT_KINDS.get(stmt.kind.name)
            if info is None:
                self.add(error("E801", f"unknown selection {quote(stmt.kind.name)}", stmt.kind.span,
                               _guess_hint(stmt.kind.name, SELECT_KINDS, "expected")))
            elif not info.bound.accepts(stmt.value.value):
                self.add(error("E106", f"`select {info.key}` needs {info.bound.describe()}, got {stmt.value.text}",
                               stmt.value.span))
        for stmt in self.spec.of(n.Verify)[:1]:
            if stmt.kind.name not in VERIFY_KINDS:
                self.add(error("E802", f"`verify` takes `top K`, got {quote(stmt.kind.name)}", stmt.kind.span))
            elif not VERIFY_TOP.accepts(stmt.value.value):
                self.add(error("E106", f"`verify top` needs {VERIFY_TOP.describe()}, got {stmt.value.text}",
                               stmt.value.span))
        for stmt in self.spec.of(n.Diagnose)[:1]:
            if stmt.target.name not in DIAGNOSE_TARGETS:
                self.add(error("E805", f"unknown diagnosis {quote(stmt.target.name)}", stmt.target.span,
                               _guess_hint(stmt.target.name, DIAGNOSE_TARGETS, "expected")))
            else:
                values = self.settings("diagnose", stmt.settings, DIAGNOSE_SETTINGS)
                samples = float(values.get("samples", 200))
                inclusion = float(values.get("inclusion", 0.1))
                if samples * min(inclusion, 1 - inclusion) < MIN_DRAWS_PER_NODE:
                    self.add(warning(
                        "W502", f"{samples:g} samples at inclusion {inclusion:g} put each node in (or out of) about "
                        f"{samples * min(inclusion, 1 - inclusion):.3g} subsets: too few to bound anything",
                        stmt.span, f"use samples x inclusion >= {MIN_DRAWS_PER_NODE}, e.g. "
                        f"`samples {math.ceil(MIN_DRAWS_PER_NODE / min(inclusion, 1 - inclusion))}`"))

    def check_exports(self) -> None:
        seen: dict[str, n.Export] = {}
        for stmt in self.spec.of(n.Export):
            written = stmt.path.value
            name = Path(written).name
            ext = Path(written).suffix.lower().lstrip(".")
            if not written.strip() or not name or written.endswith(("/", "\\")):
                self.add(error("E803", f"export path {quote(written)} names no file", stmt.path.span,
                               'e.g. `export "out/circuit.graphml"`'))
                continue
            if ext not in EXPORT_FORMATS:
                shown = f"unknown export format {quote('.' + ext)}" if ext else \
                    f"export path {quote(written)} has no extension"
                guess = did_you_mean(ext, EXPORT_FORMATS) if ext else None
                self.add(error("E803", shown, stmt.path.span,
                               f"did you mean {quote('.' + guess)}?" if guess else "",
                               f"the extension picks the format: {_one_of('.' + e for e in EXPORT_FORMATS)}"))
                continue
            if self.out_dir is not None:
                key = name
                where = "under --out"
            else:
                key = os.path.normpath(str(self.base_dir / written))
                where = ""
            if key in seen:
                self.add(error("E804", f"{quote(written)} is exported twice{(' ' + where) if where else ''}",
                               stmt.path.span, f"the first is on line {seen[key].span.line}"))
            else:
                seen[key] = stmt

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
        for stmt in self.spec.of(n.Metric):
            self.check_metric(stmt)
        evals = [m for m in self.spec.of(n.Metric) if m.eval]
        if evals and not self.spec.of(n.Verify):
            self.add(warning("W501", "`eval metric` is only used by `verify`, and there is none", _head(evals[0]),
                             "add `verify top K`"))
        self.check_nodes()
        self.check_method()
        self.check_numbers()
        self.check_exports()
        self.check_required()


def _shown(v: n.Value) -> str:
    if isinstance(v, n.Num):
        return v.text
    if isinstance(v, n.Str):
        return f'"{v.value}"'
    return quote(v.text)


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
