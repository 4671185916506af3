"""Prompt pairs from inline `pair { ... }` blocks; files (pair_files) and templates (templates) have their own
modules, re-exported here."""
from __future__ import annotations

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, error, quote
from atpdsl.language.pair_files import MAX_ROW_ERRORS, PROMPT_FIELDS, display_path, read_pairs_file
from atpdsl.language.templates import DEFAULT_TEMPLATE_COUNT, Placeholder, expand_template, parse_placeholders
from atpdsl.plan import PromptPair

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
