"""Syntax errors as diagnostics: where a statement starts (so one error does not hide the next), what was
expected, and hints (did you mean, quotes, commas)."""
from __future__ import annotations

import functools

from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from atpdsl.language.diagnostics import Diagnostic, Severity, cap_list, did_you_mean, quote
from atpdsl.language.span import Source
from atpdsl.registry import STATEMENTS

__all__ = ["chunks", "syntax_error"]

# Words that begin a top-level statement (`eval metric` begins with `eval`).
_STATEMENT_WORDS = frozenset(k.split()[0] for k in STATEMENTS)
# Statement words that never appear at the start of a line inside a block (`seed` does, in templates).
_TOP_ONLY = _STATEMENT_WORDS - {"seed"}


def _scan(text: str, start: int = 0, stop: int | None = None):
    """Yield (kind, start, end) for words, braces and newlines in text[start:stop], skipping strings and comments."""
    i, size = start, len(text) if stop is None else stop
    while i < size:
        c = text[i]
        if c == "#":
            j = text.find("\n", i)
            i = size if j < 0 else j
        elif c == '"':
            j = i + 1
            while j < size and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            i = j + 1 if j < size and text[j] == '"' else j
        elif c in "{}\n":
            yield c, i, i + 1
            i += 1
        elif c.isalpha() or c == "_":
            j = i + 1
            while j < size and (text[j].isalnum() or text[j] == "_"):
                j += 1
            yield "word", i, j
            i = j
        else:
            i += 1


def chunks(text: str) -> list[tuple[int, int]]:
    """Split a spec into statement-sized pieces so one syntax error does not hide the next.

    A piece starts at a statement keyword outside braces, at a line-initial word close to one
    (a misspelled statement), or at a line-initial statement keyword inside an unclosed block.
    """
    starts = [0]
    depth = 0
    line_start = True
    previous = ""
    for kind, i, j in _scan(text):
        if kind == "\n":
            line_start = True
            continue
        if kind == "{":
            depth += 1
        elif kind == "}":
            depth = max(0, depth - 1)
        else:
            word = text[i:j]
            boundary = False
            if depth == 0:
                if word in _STATEMENT_WORDS and not (word == "metric" and previous == "eval"):
                    boundary = True
                elif line_start and word not in _STATEMENT_WORDS and did_you_mean(word, _STATEMENT_WORDS, 0.75):
                    boundary = True
            elif line_start and word in _TOP_ONLY:
                boundary = True
                depth = 0
            if boundary and i > starts[-1]:
                starts.append(i)
            previous = word
        line_start = False
    bounds = starts + [len(text)]
    return [(bounds[k], bounds[k + 1]) for k in range(len(starts))]


_TERMINALS: list = []  # the parser's terminals, given by `syntax_error`'s caller


@functools.lru_cache(maxsize=1)
def _terminal_words() -> dict[str, str]:
    """Terminal name -> how messages describe it."""
    out: dict[str, str] = {}
    for term in _TERMINALS:
        if isinstance(term.pattern, PatternStr):
            out[term.name] = quote(term.pattern.value)
    out.update({
        "NAME": "a name",
        "STRING": "a string",
        "INT": "an integer",
        "DECIMAL": "a number",
        "$END": "end of file",
    })
    return out


def _keyword_of(term_name: str) -> str | None:
    words = _terminal_words()
    desc = words.get(term_name, "")
    if desc.startswith("`") and desc[1:-1].isidentifier():
        return desc[1:-1]
    return None


def _describe_expected(expected: set[str]) -> str:
    names = set(expected) - {"SEMICOLON"}  # separators are optional: never worth suggesting
    keywords = {t: _keyword_of(t) for t in names}
    statement_terms = {t for t, k in keywords.items() if k in _STATEMENT_WORDS}
    if len(statement_terms) >= len(_STATEMENT_WORDS) - 1:
        names -= statement_terms | {"$END"}  # "a statement" covers stopping there too
        tail = ["a statement"]
    else:
        tail = []
    if "INT" in names and "DECIMAL" in names:
        names -= {"INT", "DECIMAL"}
        tail.insert(0, "a number")
    words = _terminal_words()
    specific = sorted(words.get(t, t) for t in names if t not in ("NAME", "STRING", "INT", "DECIMAL", "$END"))
    general = [words[t] for t in ("STRING", "INT", "DECIMAL", "NAME") if t in names]
    parts = specific + general + tail
    if "$END" in names:
        parts.append("end of file")
    return cap_list(parts, limit=8)


def _describe_token(tok: Token) -> str:
    text = str(tok)
    if tok.type == "$END":
        return "end of file"
    if tok.type == "NAME":
        return f"name {quote(text)}"
    if tok.type == "STRING":
        return f"string {text if len(text) <= 30 else text[:27] + '...'}"
    if tok.type in ("INT", "DECIMAL"):
        return f"number {text}"
    if text.isidentifier():
        return f"keyword {quote(text)}"
    return quote(text)


def _unclosed_brace(text: str, start: int, end: int) -> int | None:
    """Offset of the innermost `{` left open in text[start:end], or None."""
    stack: list[int] = []
    for kind, i, _ in _scan(text, start, end):
        if kind == "{":
            stack.append(i)
        elif kind == "}" and stack:
            stack.pop()
    return stack[-1] if stack else None


def _next_word(text: str, end: int) -> tuple[str, int] | None:
    for kind, i, j in _scan(text, end):
        if kind == "word":
            return text[i:j], i
    return None


def _last_token_end(text: str, end: int) -> int:
    k = end
    while k > 0 and text[k - 1].isspace():
        k -= 1
    return max(k - 1, 0)


def _acceptable(e: UnexpectedInput) -> set[str]:
    """The terminals that could have come next.

    The parser's own answer (`accepts()` replays reductions) is exact; the error's `expected` set comes
    from an LALR state whose lookaheads may be merged with other contexts, so it is the fallback.
    """
    ip = getattr(e, "interactive_parser", None)
    if ip is not None:
        try:
            return set(ip.accepts())
        except Exception:  # noqa: BLE001 - only a better message is lost
            pass
    return set(getattr(e, "expected", None) or getattr(e, "allowed", None) or ())


def syntax_error(e: UnexpectedInput, source: Source, start: int, end: int, terminals=()) -> Diagnostic:
    """A friendly diagnostic for a Lark error in the piece text[start:end], which was parsed alone (Lark's
    positions count from `start`); `terminals`: the parser's, for naming what was expected."""
    if terminals and not _TERMINALS:
        _TERMINALS.extend(terminals)
    text = source.text
    if isinstance(e, UnexpectedCharacters):
        at = start + e.pos_in_stream
        char = text[at] if at < len(text) else ""
        span = source.span(at)
        if char == '"':
            return Diagnostic("E003", Severity.ERROR, "unterminated string", span,
                              ('a string ends with `"` on the same line',))
        shown = repr(char) if not char.isprintable() or char.isspace() else quote(char)
        message = f"unexpected character {shown}"
        allowed = _acceptable(e)
        if allowed - {"SEMICOLON"}:
            message += f", expected {_describe_expected(allowed)}"
        return Diagnostic("E002", Severity.ERROR, message, span)
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        expected = _acceptable(e)
        brace = _unclosed_brace(text, start, end)
        following = _next_word(text, end) if end < len(text) else None
        if brace is not None:
            where = f"before {quote(following[0])} on line {source.position(following[1])[0]}" if following else \
                "before the end of the file"
            return Diagnostic("E004", Severity.ERROR, "`{` is never closed", source.span(brace),
                              (f"add `}}` {where}",))
        if following is not None:
            word, at = following
            return Diagnostic("E001", Severity.ERROR,
                              f"unexpected keyword {quote(word)}, expected {_describe_expected(expected)}",
                              source.span(at, at + len(word)))
        return Diagnostic("E004", Severity.ERROR, f"unexpected end of file, expected {_describe_expected(expected)}",
                          source.span(_last_token_end(text, end)))
    assert isinstance(e, UnexpectedToken)  # the only UnexpectedInput left (internal invariant)
    tok = e.token
    tok_start = start + (tok.start_pos or 0)
    span = source.span(tok_start, max(start + (tok.end_pos or 0), tok_start + 1))
    expected = _acceptable(e)
    hints: list[str] = []
    if tok.type == "NAME" or str(tok).isidentifier():
        candidates = [k for k in (_keyword_of(t) for t in expected) if k]
        guess = did_you_mean(str(tok), candidates)
        if guess and guess != str(tok):
            hints.append(f"did you mean {quote(guess)}?")
    if "STRING" in expected and tok.type == "NAME" and not hints:
        hints.append(f'strings are written in double quotes: "{tok}"')
    if "COMMA" in expected and tok.type in ("NAME", "STRING"):
        hints.append("separate arguments with `,`")
    message = f"unexpected {_describe_token(tok)}, expected {_describe_expected(expected)}"
    return Diagnostic("E001", Severity.ERROR, message, span, tuple(hints))
