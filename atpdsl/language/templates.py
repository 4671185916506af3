"""Templates: `template { text "... {slot} ..." slot NAME [values] corrupt NAME ... }` into prompt pairs."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, cap_list, did_you_mean, error, quote, warning
from atpdsl.plan import PromptPair, SlotSpan, TextSpan
from atpdsl.registry import SEED, TEMPLATE_COUNT
from atpdsl.language.span import Span

__all__ = ["DEFAULT_TEMPLATE_COUNT", "Placeholder", "parse_placeholders", "expand_template"]

DEFAULT_TEMPLATE_COUNT = 16

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_INNER = re.compile(r"^\s*(?:([A-Za-z_]\w*)\s*:\s*)?([A-Za-z_]\w*)(\.corrupt)?\s*$")


@dataclass(frozen=True, slots=True)
class Placeholder:
    """`{slot}`, `{label:slot}` or (in fields) `{slot.corrupt}` at [start, end) of the decoded text."""

    slot: str
    label: str | None
    corrupt: bool
    start: int
    end: int


def parse_placeholders(text: str) -> tuple[list[str | Placeholder], list[tuple[int, int, str]]]:
    """Split template text into literal strings and placeholders; also (start, end, problem) triples."""
    parts: list[str | Placeholder] = []
    problems: list[tuple[int, int, str]] = []
    literal: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        literal.append(text[pos : m.start()])
        pos = m.end()
        tok = m.group(0)
        if tok in ("{{", "}}"):
            literal.append(tok[0])
            continue
        if tok in ("{", "}"):
            problems.append((m.start(), m.end(), f"unmatched {quote(tok)} (write {quote(tok * 2)} for a literal"
                                                 " brace)"))
            literal.append(tok)
            continue
        inner = _INNER.match(m.group(1))
        if inner is None:
            problems.append((m.start(), m.end(), f"bad placeholder {quote(tok)}: expected `{{slot}}` or"
                                                 " `{label:slot}`"))
            continue
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(Placeholder(inner.group(2), inner.group(1), bool(inner.group(3)), m.start(), m.end()))
    literal.append(text[pos:])
    if "".join(literal):
        parts.append("".join(literal))
    return parts, problems


def _inner_span(s: n.Str, start: int, end: int) -> Span:
    """The span of value[start:end] inside a string literal (the whole literal if it has escapes)."""
    src = s.span.source
    raw = src.text[s.span.start + 1 : s.span.end - 1]
    if raw == s.value:
        return src.span(s.span.start + 1 + start, s.span.start + 1 + end)
    return s.span


@dataclass(frozen=True, slots=True)
class _Occurrence:
    slot: str
    name: str


def _unique(values: tuple[n.Str, ...]) -> list[str]:
    """The distinct values in first-seen order (a dict, not a list scan: long value lists stay linear)."""
    return list(dict.fromkeys(v.value for v in values))


@dataclass
class _Items:
    """A template's items by kind, the first of each kept (later duplicates are diagnosed)."""

    texts: list[n.TemplateText] = field(default_factory=list)
    slots: dict[str, n.TemplateSlot] = field(default_factory=dict)
    corrupts: dict[str, n.TemplateCorrupt] = field(default_factory=dict)
    fields: dict[str, n.Field] = field(default_factory=dict)
    count: n.TemplateCount | None = None
    seed: n.TemplateSeed | None = None


def _number_item(item: n.TemplateCount | n.TemplateSeed, kept, word: str, bound) -> tuple[bool, Diagnostic | None]:
    """Whether a `count`/`seed` line is kept, or the error it gets (duplicate, out of range)."""
    if kept is not None:
        return False, error("E105", f"duplicate `{word}` in template", item.span)
    if not bound.accepts(item.value.value):
        return False, error("E106", f"`{word}` must be {bound.describe()}, got {item.value.shown}", item.value.span)
    return True, None


def _collect(t: n.Template, diags: list[Diagnostic]) -> _Items:
    got = _Items(texts=[i for i in t.items if isinstance(i, n.TemplateText)])
    for item in t.items:
        problem: Diagnostic | None = None
        if isinstance(item, n.TemplateText) and item is not got.texts[0]:
            problem = error("E105", "duplicate `text` in template", item.span,
                            f"the first is on line {got.texts[0].span.line}")
        elif isinstance(item, n.TemplateSlot):
            name = item.name.name
            if name in got.slots:
                problem = error("E409", f"slot {quote(name)} is defined twice", item.name.span,
                                f"the first is on line {got.slots[name].span.line}")
            elif not item.values:
                problem = error("E404", f"slot {quote(name)} has no values", item.span)
            else:
                got.slots[name] = item
        elif isinstance(item, n.TemplateCorrupt):
            name = item.name.name
            if name in got.corrupts:
                problem = error("E409", f"slot {quote(name)} is corrupted twice", item.name.span)
            elif item.values is not None and not item.values:
                problem = error("E404", f"corrupt values for {quote(name)} are empty", item.span)
            else:
                got.corrupts[name] = item
        elif isinstance(item, n.TemplateCount):
            keep, problem = _number_item(item, got.count, "count", TEMPLATE_COUNT)
            got.count = item if keep else got.count
        elif isinstance(item, n.TemplateSeed):
            keep, problem = _number_item(item, got.seed, "seed", SEED)
            got.seed = item if keep else got.seed
        elif isinstance(item, n.Field):
            name = item.name.name
            if name == "clean":
                problem = error("E401", "a template's clean prompt is its `text`", item.name.span,
                                'write `text "..."` with `{slot}` placeholders')
            elif name in got.fields:
                problem = error("E306", f"duplicate field {quote(name)} in template", item.name.span)
            else:
                got.fields[name] = item
        if problem is not None:
            diags.append(problem)
    return got


def _text_positions(text: n.Str, slots: dict[str, n.TemplateSlot], diags: list[Diagnostic]
                    ) -> tuple[list[str | Placeholder], list[_Occurrence], set[str], bool]:
    """The text's parts, its slot occurrences with their position names, the slots it uses, and whether it is
    broken (bad placeholders or unknown slots: then unused-slot warnings would mislead)."""
    parts, problems = parse_placeholders(text.value)
    for start, end, problem in problems:
        diags.append(error("E410", problem, _inner_span(text, start, end)))
    holders = [p for p in parts if isinstance(p, Placeholder)]
    if not holders and not problems:
        diags.append(error("E402", "template text has no `{slot}` placeholder", text.span,
                           "the corrupt prompt changes a slot, so the text needs at least one"))
    broken = bool(problems)
    used: set[str] = set()
    occurrences: list[_Occurrence] = []
    seen_per_slot: dict[str, int] = {}
    names: set[str] = set()
    for p in holders:
        span = _inner_span(text, p.start, p.end)
        if p.corrupt:
            diags.append(error("E410", f"`{{{p.slot}.corrupt}}` is only allowed in fields; the text is the clean"
                                       " prompt", span))
            continue
        if p.slot not in slots:
            guess = did_you_mean(p.slot, slots)
            broken = True
            diags.append(error("E402", f"template text uses {quote('{' + p.slot + '}')}, but no slot"
                                       f" {quote(p.slot)} is defined", span,
                               f"did you mean {quote(guess)}?" if guess else f'add `slot {p.slot} ["...", ...]`'))
            continue
        used.add(p.slot)
        seen_per_slot[p.slot] = seen_per_slot.get(p.slot, 0) + 1
        k = seen_per_slot[p.slot]
        name = p.label or (p.slot if k == 1 else f"{p.slot}_{k}")
        if name in names:
            diags.append(error("E409", f"position name {quote(name)} is used twice in the template text", span,
                               "label the occurrence: `{label:slot}`"))
            continue
        names.add(name)
        occurrences.append(_Occurrence(p.slot, name))
    return parts, occurrences, used, broken


def _field_slots(fields: dict[str, n.Field], slots: dict[str, n.TemplateSlot], used: set[str],
                 diags: list[Diagnostic]) -> None:
    """Check the placeholders of the answer fields; the slots they use join `used`."""
    for f in fields.values():
        fparts, fproblems = parse_placeholders(f.value.value)
        for start, end, problem in fproblems:
            diags.append(error("E410", problem, _inner_span(f.value, start, end)))
        for p in fparts:
            if not isinstance(p, Placeholder):
                continue
            if p.label is not None:
                diags.append(error("E410", "labels (`{label:slot}`) belong in `text`, not in fields",
                                   _inner_span(f.value, p.start, p.end)))
            elif p.slot not in slots:
                guess = did_you_mean(p.slot, slots)
                diags.append(error("E402", f"field {quote(f.name.name)} uses {quote('{' + p.slot + '}')}, but"
                                           f" no slot {quote(p.slot)} is defined", _inner_span(f.value, p.start, p.end),
                                   f"did you mean {quote(guess)}?" if guess else ""))
            else:
                used.add(p.slot)


def _slot_use(items: _Items, keyword: Span, occurrences: list[_Occurrence], used: set[str], broken: bool,
              diags: list[Diagnostic]) -> None:
    """Unused slots, the `corrupt` line(s): present, naming slots that the text uses."""
    for name, slot in items.slots.items():
        if name not in used and not broken:
            diags.append(warning("W403", f"slot {quote(name)} is never used", slot.name.span))
    if not items.corrupts:
        example = next(iter(items.slots), "SLOT")
        diags.append(error("E406", "template has no `corrupt` line", keyword,
                           f"say which slot the corrupt prompt changes, e.g. `corrupt {example}`"))
    for name, c in items.corrupts.items():
        if name not in items.slots:
            guess = did_you_mean(name, items.slots)
            diags.append(error("E405", f"`corrupt` names {quote(name)}, which is not a slot", c.name.span,
                               f"did you mean {quote(guess)}?" if guess else
                               f"slots: {cap_list([quote(s) for s in items.slots], conj='and')}"))
        elif not any(o.slot == name for o in occurrences) and not broken:
            diags.append(error("E405", f"corrupt slot {quote(name)} does not appear in the text", c.name.span))


def _draw(items: _Items, fill: "_Filler", rng: random.Random, origin: str, diags: list[Diagnostic]
          ) -> list[PromptPair]:
    """The template's pairs (empty, with an E407 diagnostic, when a slot runs out of distinct values)."""
    total = int(items.count.value.value) if items.count else DEFAULT_TEMPLATE_COUNT
    values = {name: _Pool(_unique(s.values)) for name, s in items.slots.items()}
    corrupt_pool = {name: _Pool(_unique(c.values)) if c.values is not None else values[name]
                    for name, c in items.corrupts.items()}
    pairs: list[PromptPair] = []
    for index in range(total):
        clean_vals: dict[str, str] = {}
        for name in items.slots:
            value = values[name].draw(rng, set(clean_vals.values()))
            if value is None:
                diags.append(error("E407", f"slot {quote(name)} has no value left that differs from the other"
                                           " slots' values", items.slots[name].span,
                                   "values of different slots are distinct; add values or use one slot twice"))
                return []
            clean_vals[name] = value
        corrupt_vals = dict(clean_vals)
        for name in items.corrupts:
            taken = set(clean_vals.values()) | {corrupt_vals[s] for s in items.corrupts if s != name}
            value = corrupt_pool[name].draw(rng, taken)
            if value is None:
                diags.append(error("E407", f"corrupt slot {quote(name)} has no value that differs from every clean"
                                           " slot value", items.corrupts[name].span,
                                   f"give it values of its own: `corrupt {name} [\"...\"]`"))
                return []
            corrupt_vals[name] = value
        pairs.append(fill(clean_vals, corrupt_vals, f"{origin}#{index + 1}"))
    return pairs


def expand_template(t: n.Template, default_seed: int) -> tuple[list[PromptPair], list[Diagnostic], list[str]]:
    """Draw a template's pairs. Returns pairs, diagnostics and the position names its slots give.

    Each pair draws one value per slot (values of different slots differ), then the corrupt prompt
    redraws each `corrupt` slot from its list (or the slot's own) avoiding every clean value.
    A slot used twice in `text` names its positions `slot`, `slot_2`, ... unless labelled `{label:slot}`.
    """
    diags: list[Diagnostic] = []
    keyword = t.span.source.span(t.span.start, t.span.start + len("template"))
    items = _collect(t, diags)
    if not items.texts:
        diags.append(error("E401", "template has no `text`", keyword,
                           'add `text "... {slot} ..."`: the clean prompt with placeholders'))
        return [], diags, []
    parts, occurrences, used, broken = _text_positions(items.texts[0].text, items.slots, diags)
    _field_slots(items.fields, items.slots, used, diags)
    _slot_use(items, keyword, occurrences, used, broken, diags)
    positions = [o.name for o in occurrences]
    if any(d.is_error for d in diags):
        return [], diags, positions
    rng = random.Random(int(items.seed.value.value) if items.seed else default_seed)
    fill = _Filler(parts, occurrences, items.fields)
    return _draw(items, fill, rng, f"{t.span.file}:{t.span.line}", diags), diags, positions


class _Pool:
    """A slot's distinct values, drawn from uniformly among those not taken.

    Same draws as `cands = [v for v in values if v not in taken]; cands[rng.randrange(len(cands))]`, in
    time proportional to the few taken values rather than to every value (a 10,000-value slot made
    templates quadratic).
    """

    def __init__(self, values: list[str]) -> None:
        self.values = values
        self.index = {v: i for i, v in enumerate(values)}

    def draw(self, rng: random.Random, taken: set[str]) -> str | None:
        skip = sorted(self.index[v] for v in taken if v in self.index)
        size = len(self.values) - len(skip)
        if size <= 0:
            return None
        k = rng.randrange(size)
        for position in skip:  # the k-th value not taken: step over each taken position at or before it
            if position <= k:
                k += 1
        return self.values[k]


class _Filler:
    """Fills a template's text and fields for one draw; fields' placeholders are parsed once, not per pair."""

    def __init__(self, parts: list[str | Placeholder], occurrences: list[_Occurrence],
                 fields: dict[str, n.Field]) -> None:
        self.parts = parts
        self.occurrences = occurrences
        self.fields = [(name, parse_placeholders(f.value.value)[0]) for name, f in fields.items()]

    def __call__(self, clean_vals: dict[str, str], corrupt_vals: dict[str, str], origin: str) -> PromptPair:
        clean: list[str] = []
        corrupt: list[str] = []
        spans: list[SlotSpan] = []
        c0 = n0 = 0  # running lengths: summing the pieces per placeholder was quadratic in the text
        holder_index = 0
        for part in self.parts:
            if isinstance(part, str):
                clean.append(part)
                corrupt.append(part)
                c0 += len(part)
                n0 += len(part)
                continue
            occ = self.occurrences[holder_index]
            holder_index += 1
            cv, kv = clean_vals[occ.slot], corrupt_vals[occ.slot]
            clean.append(cv)
            corrupt.append(kv)
            spans.append(SlotSpan(occ.name, TextSpan(c0, c0 + len(cv)), TextSpan(n0, n0 + len(kv))))
            c0 += len(cv)
            n0 += len(kv)
        out_fields = tuple((name, "".join(
            p if isinstance(p, str) else (corrupt_vals if p.corrupt else clean_vals)[p.slot] for p in fparts
        )) for name, fparts in self.fields)
        return PromptPair("".join(clean), "".join(corrupt), out_fields, tuple(spans), origin)
