"""`pairs from "file"`: JSON lines, a JSON list, CSV or TSV into prompt pairs, each bad row named by file:line.

Rules: a UTF-8 byte-order mark is accepted; a field the spec uses (the prompts, the metric's fields) must be a
string in every row (`"answer": 7` is an error naming the row and the field, not the text "7"); a CSV row
must have exactly as many values as the header has columns, and the header no column twice.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, cap_list, did_you_mean, error, quote
from atpdsl.language.files import FileProblem, lone_surrogate, path_problem, read_bytes, decode_utf8
from atpdsl.language.span import Source, Span
from atpdsl.plan import PromptPair
from atpdsl.registry import PAIR_FILE_TYPES

__all__ = ["PROMPT_FIELDS", "MAX_ROW_ERRORS", "display_path", "read_pairs_file"]

PROMPT_FIELDS = ("clean", "corrupt")
MAX_ROW_ERRORS = 5  # per file, then one "... and N more" diagnostic


def display_path(spec_name: str, written: str) -> str:
    """How messages name a file the spec refers to: relative to where the spec was named from."""
    import os

    if os.path.isabs(written) or spec_name.startswith("<"):
        return written
    return os.path.normpath(os.path.join(os.path.dirname(spec_name), written))


@dataclass(frozen=True, slots=True)
class _Rows:
    source: Source
    rows: list[tuple[int, int, dict]]  # (row number in origins, 1-based line it starts on, its values)
    columns: list[str]


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _rows_jsonl(source: Source) -> tuple[list[tuple[int, int, dict]], list[Diagnostic]]:
    rows, diags = [], []
    for number, line in enumerate(source.text.split("\n"), start=1):  # "\n" only: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            diags.append(error("E303", f"invalid JSON: {e.msg}", source.span(source.line_offset(number) + e.pos)))
            continue
        if not isinstance(value, dict):
            diags.append(error("E303", f"expected a JSON object per line, got {_json_type(value)}",
                               source.line_span(number)))
            continue
        rows.append((number, number, value))
    return rows, diags


def _rows_json(source: Source) -> tuple[list[tuple[int, int, dict]], list[Diagnostic]]:
    """A JSON list of objects: row k (1-based) in origins, errors at the line its object starts on."""
    text = source.text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [error("E303", f"invalid JSON: {e.msg}", source.span(e.pos))]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        return [], [error("E303", "expected a JSON list of objects", source.span(0))]
    decoder = json.JSONDecoder()
    rows: list[tuple[int, int, dict]] = []
    pos = text.index("[") + 1
    for k, item in enumerate(value, start=1):
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        rows.append((k, source.position(pos)[0], item))
        pos = end
    return rows, []


def _rows_csv(source: Source, delimiter: str) -> tuple[list[tuple[int, int, dict]], list[str], list[Diagnostic]]:
    reader = csv.reader(io.StringIO(source.text, newline=""), delimiter=delimiter, strict=True)
    diags: list[Diagnostic] = []
    try:
        header = next(reader, None)
        if header is None:
            return [], [], []
        seen: dict[str, int] = {}
        for k, name in enumerate(header):
            if name in seen:
                return [], header, [error("E303", f"the header names column {quote(name)} twice (columns"
                                                  f" {seen[name] + 1} and {k + 1})", source.line_span(1))]
            seen[name] = k
        rows = []
        start = reader.line_num + 1
        for values in reader:
            if len(values) != len(header) and any(v.strip() for v in values):
                what = "more" if len(values) > len(header) else "fewer"
                diags.append(error("E303", f"row has {len(values)} values, {what} than the header's {len(header)}"
                                           " columns", source.line_span(start),
                                   "quote values that contain the delimiter: \"a, b\""
                                   if what == "more" else "give every column a value (empty is allowed)"))
            elif any(v.strip() for v in values):
                rows.append((start, start, dict(zip(header, values))))
            start = reader.line_num + 1
    except csv.Error as e:
        return [], [], [error("E303", f"malformed CSV: {e}", source.line_span(reader.line_num or 1))]
    return rows, header, diags


def _read_rows(stmt: n.PairsFrom, base_dir: Path) -> tuple[_Rows | None, list[Diagnostic]]:
    written = stmt.path.value
    shown = display_path(stmt.span.file, written)
    ext = Path(written).suffix.lower().lstrip(".")
    problem = path_problem(written)
    if problem is not None:
        return None, [error("E301", f"pairs file path {problem}", stmt.path.span)]
    if ext not in PAIR_FILE_TYPES:
        exts = cap_list([f".{e}" for e in PAIR_FILE_TYPES])
        return None, [error("E302", f"unsupported pairs file type {quote('.' + ext) if ext else '(no extension)'}",
                            stmt.path.span, f"use {exts}")]
    path = (base_dir / written).expanduser()
    try:
        data = read_bytes(path, "pairs file", quote(written))
    except FileProblem as e:
        hint = f"paths are relative to the spec's folder ({base_dir})" if "not found" in e.message else ""
        return None, [error("E301", e.message, stmt.path.span, hint)]
    try:
        text = decode_utf8(data, f"pairs file {quote(written)}")
    except FileProblem as e:
        source = Source(shown, e.text or "", str(path))
        return None, [error("E303", e.message, source.span(e.offset or 0), "save the file as UTF-8")]
    source = Source(shown, text, str(path))
    columns: list[str] = []
    if ext in ("jsonl", "ndjson"):
        rows, diags = _rows_jsonl(source)
    elif ext == "json":
        rows, diags = _rows_json(source)
    else:
        rows, columns, diags = _rows_csv(source, "\t" if ext == "tsv" else ",")
    seen = set(columns)
    for _, _, row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return _Rows(source, rows, columns), diags


def _text(value: object) -> str | None:
    """An unused field's value as text (numbers and booleans too); None for lists, objects and null."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _row_values(row: dict, mapping: dict[str, str], needed: set[str], source: Source, number: int
                ) -> tuple[dict[str, str] | None, Diagnostic | None]:
    """A row's fields as strings, or the error of its first needed field that is not a string."""
    for field in sorted(needed, key=lambda f: (f not in PROMPT_FIELDS, f)):
        column = mapping.get(field, field)
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            named = quote(field) if column == field else f"{quote(field)} (column {quote(column)})"
            shown = json.dumps(value)
            shown = shown if len(shown) <= 30 else shown[:27] + "..."
            return None, error("E310", f"field {named} is {_json_type(value)} ({shown}), not a string",
                               source.line_span(number), f'write it as a JSON string: "{column}": "..."')
    values: dict[str, str] = {}
    for key, value in row.items():
        text = _text(value)
        if text is None:
            continue
        bad = lone_surrogate(text)
        if bad is not None and (key in needed or key in mapping.values()):
            return None, error("E310", f"field {quote(key)} contains a lone surrogate {bad}, which no tokenizer can"
                                       " encode", source.line_span(number))
        values[key] = text
    for field, column in mapping.items():
        if column in values:
            values[field] = values[column]
    return values, None


def _mapping(stmt: n.PairsFrom, data: _Rows, diags: list[Diagnostic]) -> dict[str, str]:
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
    return mapping


def read_pairs_file(stmt: n.PairsFrom, base_dir: Path, needed: Iterable[str] = (), with_spans: bool = False):
    """Read `pairs from "file"`; `mapping` renames columns to fields; `needed` names the metric's fields.

    Every column becomes a field under its own name; `field = "column"` also fills `field` from `column`.
    Returns (pairs, diagnostics), or with `with_spans` (pairs, diagnostics, the span of each pair's row).
    """
    pairs, diags, spans = _read_pairs(stmt, base_dir, needed)
    return (pairs, diags, spans) if with_spans else (pairs, diags)


def _read_pairs(stmt: n.PairsFrom, base_dir: Path, needed: Iterable[str]
                ) -> tuple[list[PromptPair], list[Diagnostic], list[Span]]:
    data, diags = _read_rows(stmt, base_dir)
    if data is None:
        return [], diags, []
    written = stmt.path.value
    mapping = _mapping(stmt, data, diags)
    if not data.rows:
        if not diags:
            diags.append(error("E308", f"pairs file {quote(written)} has no pairs", stmt.path.span))
        return [], diags, []
    if any(d.code == "E304" for d in diags):
        return [], diags, []
    for name in PROMPT_FIELDS:
        if mapping.get(name, name) not in data.columns:
            cols = cap_list([quote(c) for c in data.columns], conj="and")
            diags.append(error("E304", f"{quote(written)} has no {quote(name)} column", stmt.path.span,
                               f"its columns are {cols}",
                               f'map one: pairs from "{written}" {{ {name} = "COLUMN" }}'))
    if any(d.code == "E304" for d in diags):
        return [], diags, []
    needed_set = set(PROMPT_FIELDS) | set(needed)
    pairs: list[PromptPair] = []
    spans: list[Span] = []
    row_errors: list[Diagnostic] = []
    for number, line, row in data.rows:
        values, problem = _row_values(row, mapping, needed_set, data.source, line)
        if problem is None:
            assert values is not None
            missing = [name for name in PROMPT_FIELDS if not values.get(name)]
            if missing:
                what = " and ".join(quote(p) for p in missing)
                problem = error("E305", f"row has no {what} prompt (missing or empty)", data.source.line_span(line))
        if problem is not None:
            row_errors.append(problem)
            continue
        assert values is not None
        fields = tuple((k, v) for k, v in values.items() if k not in PROMPT_FIELDS)
        pairs.append(PromptPair(values["clean"], values["corrupt"], fields, (), f"{data.source.name}:{number}"))
        spans.append(data.source.line_span(line))
    diags.extend(row_errors[:MAX_ROW_ERRORS])
    hidden = row_errors[MAX_ROW_ERRORS:]
    if hidden:
        what = "rows of {} without prompts" if all(d.code == "E305" for d in hidden) else "bad rows in {}"
        diags.append(error(hidden[0].code, f"... and {len(hidden)} more {what.format(quote(written))}",
                           stmt.path.span))
    return pairs, diags, spans
