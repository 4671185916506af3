"""Diagnostics: what went wrong where, did-you-mean hints, and concise/full/json rendering."""
from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from atpdsl.language.span import Span

__all__ = [
    "guess_hint",
    "Severity",
    "Diagnostic",
    "error",
    "warning",
    "did_you_mean",
    "cap_list",
    "quote",
    "render",
    "render_concise",
    "render_full",
    "render_json",
    "summary",
    "OUTPUT_FORMATS",
    "MAX_SHOWN",
]

OUTPUT_FORMATS = ("concise", "full", "json")
MAX_SHOWN = 50  # diagnostics rendered before "... and N more"


class Severity(str, Enum):
    """How bad a diagnostic is."""

    ERROR = "error"
    """The spec cannot be compiled."""
    WARNING = "warning"
    """The spec compiles, but probably not as meant."""


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding: a stable `code` (E..., W...), a message, where, and hints on what to do."""

    code: str
    severity: Severity
    message: str
    span: Span | None
    hints: tuple[str, ...] = ()

    @property
    def is_error(self) -> bool:
        """Whether this diagnostic stops compilation."""
        return self.severity is Severity.ERROR

    @property
    def location(self) -> str:
        """`file:line:col`, or the file alone when there is no span."""
        return str(self.span) if self.span is not None else "<spec>"

    def to_dict(self) -> dict:
        """A JSON-able dict (the `--output-format json` shape)."""
        s = self.span
        return {
            "code": self.code,
            "severity": self.severity.value,
            "message": self.message,
            "file": s.file if s else None,
            "line": s.line if s else None,
            "column": s.column if s else None,
            "end_line": s.end_line if s else None,
            "end_column": s.end_column if s else None,
            "hints": list(self.hints),
        }


def error(code: str, message: str, span: Span | None, *hints: str) -> Diagnostic:
    """An error diagnostic."""
    return Diagnostic(code, Severity.ERROR, message, span, tuple(h for h in hints if h))


def warning(code: str, message: str, span: Span | None, *hints: str) -> Diagnostic:
    """A warning diagnostic."""
    return Diagnostic(code, Severity.WARNING, message, span, tuple(h for h in hints if h))


def quote(word: object) -> str:
    """How messages quote a name or keyword: in backticks, as ruff does."""
    return f"`{word}`"


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The closest candidate to a misspelled word, or None (difflib ratio >= cutoff)."""
    pool = sorted(set(candidates))
    matches = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    if not matches:
        lowered = {c.lower(): c for c in pool}
        if word.lower() in lowered:
            return lowered[word.lower()]
        return None
    return matches[0]


def cap_list(items: Sequence[str], limit: int = 8, conj: str = "or") -> str:
    """Join items for a message, capped: `a, b or c`, `a, b, ... and 5 more`."""
    items = list(items)
    if not items:
        return "nothing"
    if len(items) > limit:
        return ", ".join(items[:limit]) + f", ... and {len(items) - limit} more"
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def _sorted(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    def key(d: Diagnostic) -> tuple:
        s = d.span
        return (s.file, s.line, s.column, d.code) if s else ("", 0, 0, d.code)

    return sorted(diagnostics, key=key)


def _capped(diagnostics: Iterable[Diagnostic]) -> tuple[list[Diagnostic], int]:
    items = _sorted(diagnostics)
    return items[:MAX_SHOWN], max(0, len(items) - MAX_SHOWN)


def render_concise(diagnostics: Iterable[Diagnostic]) -> str:
    """One line per diagnostic, ruff-style: `spec.atp:3:5: E601 message [help: hint]`."""
    shown, more = _capped(diagnostics)
    lines = []
    for d in shown:
        level = "" if d.is_error else "warning: "
        hint = "".join(f" [help: {h}]" for h in d.hints)
        lines.append(f"{d.location}: {d.code} {level}{d.message}{hint}")
    if more:
        lines.append(f"... and {more} more")
    return "\n".join(lines)


def _snippet(span: Span) -> list[str]:
    """The source line with carets under the span (Lark's caret rule: expandtabs before)."""
    text = span.source.line(span.line)
    width = len(str(span.end_line if span.end_line > span.line else span.line))
    gutter = " " * width
    before = text[: span.column - 1].expandtabs()
    if span.end_line == span.line:
        length = max(1, len(text[span.column - 1 : span.end_column - 1].expandtabs()))
    else:
        length = max(1, len(text[span.column - 1 :].rstrip().expandtabs()))
    return [
        f"{gutter} |",
        f"{span.line:>{width}} | {text.expandtabs()}".rstrip(),
        f"{gutter} | {' ' * len(before)}{'^' * length}",
    ]


def render_full(diagnostics: Iterable[Diagnostic]) -> str:
    """Each diagnostic with its source line and carets, then its hints (rustc/ruff style)."""
    shown, more = _capped(diagnostics)
    blocks = []
    for d in shown:
        lines = [f"{d.severity.value}[{d.code}]: {d.message}"]
        if d.span is not None:
            width = len(str(d.span.line))
            lines.append(f"{' ' * width}--> {d.location}")
            lines.extend(_snippet(d.span))
            pad = " " * width
        else:
            pad = " "
        for h in d.hints:
            lines.append(f"{pad} = help: {h}")
        blocks.append("\n".join(lines))
    if more:
        blocks.append(f"... and {more} more")
    return "\n\n".join(blocks)


def render_json(diagnostics: Iterable[Diagnostic]) -> str:
    """Every diagnostic as a JSON list (not capped: machines read it)."""
    return json.dumps([d.to_dict() for d in _sorted(diagnostics)], indent=2)


def summary(diagnostics: Sequence[Diagnostic]) -> str:
    """`Found 2 errors and 1 warning.`"""
    errors = sum(1 for d in diagnostics if d.is_error)
    warnings = len(diagnostics) - errors
    parts = []
    if errors:
        parts.append(f"{errors} error{'s' if errors != 1 else ''}")
    if warnings:
        parts.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
    return f"Found {' and '.join(parts)}." if parts else "No problems found."


def render(diagnostics: Iterable[Diagnostic], output_format: str = "full") -> str:
    """Render in one of OUTPUT_FORMATS."""
    if output_format == "concise":
        return render_concise(diagnostics)
    if output_format == "json":
        return render_json(diagnostics)
    if output_format == "full":
        return render_full(diagnostics)
    raise ValueError(f"unknown output format {output_format!r} (expected {', '.join(OUTPUT_FORMATS)})")


def guess_hint(word: str, candidates: Iterable[str], what: str) -> str:
    """A help line for an unknown word: the closest candidate, else the (capped) list of what is known."""
    candidates = list(candidates)
    guess = did_you_mean(word, candidates)
    if guess is not None and guess != word:
        return f"did you mean {quote(guess)}?"
    return f"{what}: {cap_list([quote(x) for x in candidates])}"
