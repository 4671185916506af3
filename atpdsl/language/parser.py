"""Parse .atp text with Lark into the frozen syntax tree (builder.py), turning syntax errors into diagnostics
(syntax_errors.py)."""
from __future__ import annotations

import functools
from pathlib import Path

from lark import Lark, Tree
from lark.exceptions import UnexpectedInput

from atpdsl.errors import AtpError
from atpdsl.language import syntax as n
from atpdsl.language.builder import Builder as _Builder
from atpdsl.language.builder import decode_string
from atpdsl.language.diagnostics import Diagnostic
from atpdsl.language.grammar import cached_parser
from atpdsl.language.span import Source
from atpdsl.language.syntax_errors import chunks as _chunks
from atpdsl.language.syntax_errors import syntax_error

__all__ = ["GRAMMAR_NAME", "grammar_candidates", "grammar_path", "get_parser", "parse", "decode_string"]

GRAMMAR_NAME = "atp.lark"

def grammar_candidates() -> tuple[Path, Path]:
    """Where the grammar may be: inside the installed package first, then the checkout's grammar/."""
    package = Path(__file__).resolve().parent.parent
    return package / "grammar" / GRAMMAR_NAME, package.parent / "grammar" / GRAMMAR_NAME


def grammar_path() -> Path:
    """The grammar file in use: package data in a wheel, grammar/atp.lark in a checkout."""
    for candidate in grammar_candidates():
        if candidate.is_file():
            return candidate
    looked = " and ".join(str(c) for c in grammar_candidates())
    raise AtpError(f"the .atp grammar is missing (looked for {looked}); reinstall atpdsl")


@functools.lru_cache(maxsize=1)
def get_parser() -> Lark:
    """The LALR parser, loaded once per process (tables cached on disk: language/grammar.py)."""
    return cached_parser(grammar_path().read_text(encoding="utf-8"))


def _completed_prefix(e: UnexpectedInput, builder: _Builder) -> tuple[list[n.Statement], int]:
    """The statements the failed parse had already completed, and the offset where they end.

    They are final (an LALR parser never undoes a reduction), so only the text after them needs
    statement-by-statement re-parsing. Reads Lark's parser state; any surprise there means (no statements, 0).
    """
    try:
        stack = e.interactive_parser.parser_state.value_stack  # type: ignore[union-attr]
        done = [v for v in stack[:1] if isinstance(v, Tree) and v.data.startswith("__start_star")]
        if not done:
            return [], 0
        items = [c for c in done[0].children if isinstance(c, Tree)]
        if not items:
            return [], 0
        end = max(c.meta.end_pos for c in items)
        return list(builder.transform(Tree("start", items))), end
    except Exception:  # noqa: BLE001 - only speed is lost: every piece is then re-parsed
        builder.problems.clear()
        return [], 0


def parse(text: str, name: str = "<string>", path: str | None = None) -> tuple[n.Spec, list[Diagnostic]]:
    """Parse a spec. Returns the tree of every statement that parsed and a diagnostic per syntax error.

    After a syntax error the text after the statements that parsed is re-parsed statement by statement, so
    each broken statement gets its own diagnostic and the good ones are still checked.
    """
    source = Source(name, text, path)
    parser = get_parser()
    builder = _Builder(source)
    try:
        tree = parser.parse(text)
    except UnexpectedInput as first:
        statements, resume = _completed_prefix(first, builder)
        diagnostics: list[Diagnostic] = list(builder.problems)
        syntax: list[Diagnostic] = []
        for start, end in _chunks(text):
            if end <= resume:
                continue
            start = max(start, resume)
            try:
                piece = parser.parse(text[start:end])  # alone: re-reading the prefix made recovery quadratic
            except UnexpectedInput as e:
                syntax.append(syntax_error(e, source, start, end, parser.terminals))
                continue
            chunk = _Builder(source, start)
            statements.extend(chunk.transform(piece))
            diagnostics.extend(chunk.problems)
        if not syntax:
            syntax.append(syntax_error(first, source, 0, len(text), parser.terminals))
        return n.Spec(tuple(statements), source), syntax + diagnostics
    statements = builder.transform(tree)
    return n.Spec(tuple(statements), source), list(builder.problems)
