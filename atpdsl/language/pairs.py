"""Prompt pairs from inline blocks, JSONL/CSV files and templates, with diagnostics for bad input."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, cap_list, did_you_mean, error, quote, warning
from atpdsl.plan import PromptPair, SlotSpan, TextSpan
from atpdsl.registry import PAIR_FILE_TYPES, SEED, TEMPLATE_COUNT
from atpdsl.language.span import Source, Span

__all__ = [
    "PROMPT_FIELDS",
    "DEFAULT_TEMPLATE_COUNT",
    "MAX_ROW_ERRORS",
    "Placeholder",
    "parse_placeholders",
    "display_path",
    "inline_pair",
    "read_pairs_file",
    "expand_template",
]

PROMPT_FIELDS = ("clean", "corrupt")
DEFAULT_TEMPLATE_COUNT = 16
MAX_ROW_ERRORS = 5  # per file, then one "... and N more" diagnostic


def display_path(spec_name: str, written: str) -> str:
    """How messages name a file the spec refers to: relative to where the spec was named from."""
    if os.path.isabs(written) or spec_name.startswith("<"):
        return written
    return os.path.normpath(os.path.join(os.path.dirname(spec_name), written))


def inline_pair(pair: n.Pair) -> tuple[PromptPair | None, list[Diagnostic]]:
    """A `pair { ... }` block as a PromptPair (None when it lacks a prompt)."""
    diags: list[Diagnostic] = []
    seen: dict[str, n.Field] = {}
    for f in pair.fields:
        if f.name.name in seen:
            diags.append(error("E306", f"duplicate field {quote(f.name.name)} in pair", f.name.span,
                               f"the first is on line {seen[f.name.name].span.line}"))
        else:
            seen[f.name.name] = f
    keyword = pair.span.source.span(pair.span.start, pair.span.start + len("pair"))
    for name in PROMPT_FIELDS:
        if name not in seen:
            diags.append(error("E305", f"pair has no {quote(name)} prompt", keyword,
                               f'add `{name} "..."` to the block'))
        elif not seen[name].value.value:
            diags.append(error("E309", f"the {quote(name)} prompt is empty", seen[name].value.span))
    if diags:
        return None, diags
    fields = tuple((k, f.value.value) for k, f in seen.items() if k not in PROMPT_FIELDS)
    origin = f"{pair.span.file}:{pair.span.line}"
    return PromptPair(seen["clean"].value.value, seen["corrupt"].value.value, fields, (), origin), []


# ------------------------------------------------------------------ files

def _scalar(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _rows_jsonl(text: str, source: Source) -> tuple[list[tuple[int, dict]], list[Diagnostic]]:
    rows, diags = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            diags.append(error("E303", f"invalid JSON: {e.msg}", source.span(_line_offset(text, number) + e.pos)))
            continue
        if not isinstance(value, dict):
            diags.append(error("E303", f"expected a JSON object per line, got {type(value).__name__}",
                               source.line_span(number)))
            continue
        rows.append((number, value))
    return rows, diags


def _line_offset(text: str, number: int) -> int:
    lines = text.splitlines(keepends=True)
    return sum(len(s) for s in lines[: number - 1])


def _rows_json(text: str, source: Source) -> tuple[list[tuple[int, dict]], list[Diagnostic]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [error("E303", f"invalid JSON: {e.msg}", source.span(e.pos))]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        return [], [error("E303", "expected a JSON list of objects", source.span(0))]
    # Line numbers of list items are not kept by json; number them by position instead.
    return [(k + 1, v) for k, v in enumerate(value)], []


def _rows_csv(text: str, source: Source, delimiter: str) -> tuple[list[tuple[int, dict]], list[Diagnostic]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        if reader.fieldnames is None:
            return [], []
        for row in reader:
            rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    except csv.Error as e:
        return rows, [error("E303", f"malformed CSV: {e}", source.line_span(reader.line_num or 1))]
    return rows, []


@dataclass(frozen=True, slots=True)
class _FileRows:
    source: Source
    rows: list[tuple[int, dict]]
    columns: list[str]


def _read_rows(stmt: n.PairsFrom, base_dir: Path) -> tuple[_FileRows | None, list[Diagnostic]]:
    written = stmt.path.value
    shown = display_path(stmt.span.file, written)
    ext = Path(written).suffix.lower().lstrip(".")
    if ext not in PAIR_FILE_TYPES:
        exts = cap_list([f".{e}" for e in PAIR_FILE_TYPES])
        return None, [error("E302", f"unsupported pairs file type {quote('.' + ext) if ext else '(no extension)'}",
                            stmt.path.span, f"use {exts}")]
    path = (base_dir / written).expanduser()
    if not path.exists():
        return None, [error("E301", f"pairs file not found: {quote(written)}", stmt.path.span,
                            f"paths are relative to the spec's folder ({base_dir})")]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, [error("E303", f"pairs file {quote(written)} is not UTF-8 text", stmt.path.span)]
    except OSError as e:
        return None, [error("E301", f"cannot read pairs file {quote(written)}: {e.strerror or e}", stmt.path.span)]
    source = Source(shown, text, str(path))
    if ext in ("jsonl", "ndjson"):
        rows, diags = _rows_jsonl(text, source)
    elif ext == "json":
        rows, diags = _rows_json(text, source)
    else:
        rows, diags = _rows_csv(text, source, "\t" if ext == "tsv" else ",")
    columns: list[str] = []
    for _, row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return _FileRows(source, rows, columns), diags


def read_pairs_file(stmt: n.PairsFrom, base_dir: Path) -> tuple[list[PromptPair], list[Diagnostic]]:
    """Read `pairs from "file"`: JSONL, JSON list, CSV or TSV; `mapping` renames columns to fields.

    Every column becomes a field under its own name; `field = "column"` also fills `field` from `column`.
    """
    data, diags = _read_rows(stmt, base_dir)
    if data is None:
        return [], diags
    written = stmt.path.value
    mapping: dict[str, str] = {}
    for entry in stmt.mapping:
        if entry.field.name in mapping:
            diags.append(error("E306", f"field {quote(entry.field.name)} is mapped twice", entry.field.span))
            continue
        if data.rows and entry.column.value not in data.columns:
            guess = did_you_mean(entry.column.value, data.columns)
            diags.append(error("E304", f"{quote(written)} has no column {quote(entry.column.value)}",
                               entry.column.span,
                               f"did you mean {quote(guess)}?" if guess else "",
                               f"its columns are {cap_list([quote(c) for c in data.columns], conj='and')}"))
            continue
        mapping[entry.field.name] = entry.column.value
    if not data.rows:
        if not diags:
            diags.append(error("E308", f"pairs file {quote(written)} has no pairs", stmt.path.span))
        return [], diags
    if any(d.code == "E304" for d in diags):
        return [], diags

    def column_of(field: str) -> str:
        return mapping.get(field, field)

    for name in PROMPT_FIELDS:
        if column_of(name) not in data.columns:
            cols = cap_list([quote(c) for c in data.columns], conj="and")
            diags.append(error("E304", f"{quote(written)} has no {quote(name)} column", stmt.path.span,
                               f"its columns are {cols}",
                               f'map one: pairs from "{written}" {{ {name} = "COLUMN" }}'))
    if any(d.code == "E304" for d in diags):
        return [], diags

    pairs: list[PromptPair] = []
    row_errors: list[Diagnostic] = []
    for number, row in data.rows:
        values = {k: s for k, v in row.items() if (s := _scalar(v)) is not None}
        for field, column in mapping.items():
            if column in values:
                values[field] = values[column]
        problems = [name for name in PROMPT_FIELDS if not values.get(name)]
        if problems:
            what = " and ".join(quote(p) for p in problems)
            row_errors.append(error("E305", f"row has no {what} prompt (missing, empty or not a string)",
                                    data.source.line_span(number)))
            continue
        fields = tuple((k, v) for k, v in values.items() if k not in PROMPT_FIELDS)
        pairs.append(PromptPair(values["clean"], values["corrupt"], fields, (), f"{data.source.name}:{number}"))
    diags.extend(row_errors[:MAX_ROW_ERRORS])
    if len(row_errors) > MAX_ROW_ERRORS:
        diags.append(error("E305", f"... and {len(row_errors) - MAX_ROW_ERRORS} more rows of {quote(written)}"
                                   " without prompts", stmt.path.span))
    return pairs, diags


# ------------------------------------------------------------------ templates

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
    out: list[str] = []
    for v in values:
        if v.value not in out:
            out.append(v.value)
    return out


def expand_template(t: n.Template, default_seed: int) -> tuple[list[PromptPair], list[Diagnostic], list[str]]:
    """Draw a template's pairs. Returns pairs, diagnostics and the position names its slots give.

    Each pair draws one value per slot (values of different slots differ), then the corrupt prompt
    redraws each `corrupt` slot from its list (or the slot's own) avoiding every clean value.
    A slot used twice in `text` names its positions `slot`, `slot_2`, ... unless labelled `{label:slot}`.
    """
    diags: list[Diagnostic] = []
    keyword = t.span.source.span(t.span.start, t.span.start + len("template"))
    texts = [i for i in t.items if isinstance(i, n.TemplateText)]
    slots: dict[str, n.TemplateSlot] = {}
    corrupts: dict[str, n.TemplateCorrupt] = {}
    fields: dict[str, n.Field] = {}
    count: n.TemplateCount | None = None
    seed: n.TemplateSeed | None = None
    for item in t.items:
        if isinstance(item, n.TemplateText) and item is not texts[0]:
            diags.append(error("E105", "duplicate `text` in template", item.span,
                               f"the first is on line {texts[0].span.line}"))
        elif isinstance(item, n.TemplateSlot):
            if item.name.name in slots:
                diags.append(error("E409", f"slot {quote(item.name.name)} is defined twice", item.name.span,
                                   f"the first is on line {slots[item.name.name].span.line}"))
            elif not item.values:
                diags.append(error("E404", f"slot {quote(item.name.name)} has no values", item.span))
            else:
                slots[item.name.name] = item
        elif isinstance(item, n.TemplateCorrupt):
            if item.name.name in corrupts:
                diags.append(error("E409", f"slot {quote(item.name.name)} is corrupted twice", item.name.span))
            elif item.values is not None and not item.values:
                diags.append(error("E404", f"corrupt values for {quote(item.name.name)} are empty", item.span))
            else:
                corrupts[item.name.name] = item
        elif isinstance(item, n.TemplateCount):
            if count is not None:
                diags.append(error("E105", "duplicate `count` in template", item.span))
            elif not TEMPLATE_COUNT.accepts(item.value.value):
                diags.append(error("E106", f"`count` must be {TEMPLATE_COUNT.describe()}, got {item.value.text}",
                                   item.value.span))
            else:
                count = item
        elif isinstance(item, n.TemplateSeed):
            if seed is not None:
                diags.append(error("E105", "duplicate `seed` in template", item.span))
            elif not SEED.accepts(item.value.value):
                diags.append(error("E106", f"`seed` must be {SEED.describe()}, got {item.value.text}",
                                   item.value.span))
            else:
                seed = item
        elif isinstance(item, n.Field):
            name = item.name.name
            if name == "clean":
                diags.append(error("E401", "a template's clean prompt is its `text`", item.name.span,
                                   'write `text "..."` with `{slot}` placeholders'))
            elif name in fields:
                diags.append(error("E306", f"duplicate field {quote(name)} in template", item.name.span))
            else:
                fields[name] = item
    if not texts:
        diags.append(error("E401", "template has no `text`", keyword,
                           'add `text "... {slot} ..."`: the clean prompt with placeholders'))
        return [], diags, []
    text = texts[0].text
    parts, problems = parse_placeholders(text.value)
    for start, end, problem in problems:
        diags.append(error("E410", problem, _inner_span(text, start, end)))
    holders = [p for p in parts if isinstance(p, Placeholder)]
    if not holders and not problems:
        diags.append(error("E402", "template text has no `{slot}` placeholder", text.span,
                           "the corrupt prompt changes a slot, so the text needs at least one"))
    text_broken = bool(problems)
    used_slots: set[str] = set()
    occurrences: list[_Occurrence] = []
    seen_per_slot: dict[str, int] = {}
    names: dict[str, Placeholder] = {}
    for p in holders:
        span = _inner_span(text, p.start, p.end)
        if p.corrupt:
            diags.append(error("E410", f"`{{{p.slot}.corrupt}}` is only allowed in fields; the text is the clean"
                                       " prompt", span))
            continue
        if p.slot not in slots:
            guess = did_you_mean(p.slot, slots)
            text_broken = True
            diags.append(error("E402", f"template text uses {quote('{' + p.slot + '}')}, but no slot"
                                       f" {quote(p.slot)} is defined", span,
                               f"did you mean {quote(guess)}?" if guess else f'add `slot {p.slot} ["...", ...]`'))
            continue
        used_slots.add(p.slot)
        seen_per_slot[p.slot] = seen_per_slot.get(p.slot, 0) + 1
        k = seen_per_slot[p.slot]
        name = p.label or (p.slot if k == 1 else f"{p.slot}_{k}")
        if name in names:
            diags.append(error("E409", f"position name {quote(name)} is used twice in the template text", span,
                               "label the occurrence: `{label:slot}`"))
            continue
        names[name] = p
        occurrences.append(_Occurrence(p.slot, name))
    for f in fields.values():
        fparts, fproblems = parse_placeholders(f.value.value)
        for start, end, problem in fproblems:
            diags.append(error("E410", problem, _inner_span(f.value, start, end)))
        for p in fparts:
            if isinstance(p, Placeholder):
                if p.label is not None:
                    diags.append(error("E410", "labels (`{label:slot}`) belong in `text`, not in fields",
                                       _inner_span(f.value, p.start, p.end)))
                elif p.slot not in slots:
                    guess = did_you_mean(p.slot, slots)
                    diags.append(error("E402", f"field {quote(f.name.name)} uses {quote('{' + p.slot + '}')}, but"
                                               f" no slot {quote(p.slot)} is defined",
                                       _inner_span(f.value, p.start, p.end),
                                       f"did you mean {quote(guess)}?" if guess else ""))
                else:
                    used_slots.add(p.slot)
    for name, slot in slots.items():
        if name not in used_slots and not text_broken:
            diags.append(warning("W403", f"slot {quote(name)} is never used", slot.name.span))
    if not corrupts:
        example = next(iter(slots), "SLOT")
        diags.append(error("E406", "template has no `corrupt` line", keyword,
                           f"say which slot the corrupt prompt changes, e.g. `corrupt {example}`"))
    for name, c in corrupts.items():
        if name not in slots:
            guess = did_you_mean(name, slots)
            diags.append(error("E405", f"`corrupt` names {quote(name)}, which is not a slot", c.name.span,
                               f"did you mean {quote(guess)}?" if guess else
                               f"slots: {cap_list([quote(s) for s in slots], conj='and')}"))
        elif not any(o.slot == name for o in occurrences) and not text_broken:
            diags.append(error("E405", f"corrupt slot {quote(name)} does not appear in the text", c.name.span))
    if any(d.is_error for d in diags):
        return [], diags, [o.name for o in occurrences]

    total = int(count.value.value) if count else DEFAULT_TEMPLATE_COUNT
    rng = random.Random(int(seed.value.value) if seed else default_seed)
    values = {name: _unique(s.values) for name, s in slots.items()}
    corrupt_pool = {name: _unique(c.values) if c.values is not None else values[name] for name, c in corrupts.items()}
    origin = f"{t.span.file}:{t.span.line}"
    pairs: list[PromptPair] = []
    for index in range(total):
        clean_vals: dict[str, str] = {}
        for name in slots:
            cands = [v for v in values[name] if v not in clean_vals.values()]
            if not cands:
                diags.append(error("E407", f"slot {quote(name)} has no value left that differs from the other"
                                           " slots' values", slots[name].span,
                                   "values of different slots are distinct; add values or use one slot twice"))
                return [], diags, [o.name for o in occurrences]
            clean_vals[name] = cands[rng.randrange(len(cands))]
        corrupt_vals = dict(clean_vals)
        for name in corrupts:
            taken = set(clean_vals.values()) | {corrupt_vals[s] for s in corrupts if s != name}
            cands = [v for v in corrupt_pool[name] if v not in taken]
            if not cands:
                diags.append(error("E407", f"corrupt slot {quote(name)} has no value that differs from every clean"
                                           " slot value", corrupts[name].span,
                                   f"give it values of its own: `corrupt {name} [\"...\"]`"))
                return [], diags, [o.name for o in occurrences]
            corrupt_vals[name] = cands[rng.randrange(len(cands))]
        pairs.append(_fill(parts, occurrences, clean_vals, corrupt_vals, fields, f"{origin}#{index + 1}"))
    return pairs, diags, [o.name for o in occurrences]


def _fill(parts: list[str | Placeholder], occurrences: list[_Occurrence], clean_vals: dict[str, str],
          corrupt_vals: dict[str, str], fields: dict[str, n.Field], origin: str) -> PromptPair:
    clean: list[str] = []
    corrupt: list[str] = []
    spans: list[SlotSpan] = []
    holder_index = 0
    for part in parts:
        if isinstance(part, str):
            clean.append(part)
            corrupt.append(part)
            continue
        occ = occurrences[holder_index]
        holder_index += 1
        c0, n0 = sum(map(len, clean)), sum(map(len, corrupt))
        clean.append(clean_vals[occ.slot])
        corrupt.append(corrupt_vals[occ.slot])
        spans.append(SlotSpan(occ.name, TextSpan(c0, c0 + len(clean_vals[occ.slot])),
                              TextSpan(n0, n0 + len(corrupt_vals[occ.slot]))))
    out_fields = []
    for name, f in fields.items():
        fparts, _ = parse_placeholders(f.value.value)
        out_fields.append((name, "".join(
            p if isinstance(p, str) else (corrupt_vals if p.corrupt else clean_vals)[p.slot] for p in fparts
        )))
    return PromptPair("".join(clean), "".join(corrupt), tuple(out_fields), tuple(spans), origin)
