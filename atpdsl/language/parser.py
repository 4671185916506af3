"""Parse .atp text with Lark into the frozen syntax tree, turning syntax errors into diagnostics."""
from __future__ import annotations

import functools
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from atpdsl.language import syntax as n
from atpdsl.language.files import lone_surrogate
from atpdsl.language.grammar import cached_parser
from atpdsl.language.diagnostics import Diagnostic, Severity, cap_list, did_you_mean, quote
from atpdsl.errors import AtpError
from atpdsl.registry import STATEMENTS
from atpdsl.language.span import Source, Span

__all__ = ["GRAMMAR_NAME", "grammar_candidates", "grammar_path", "get_parser", "parse", "decode_string"]

GRAMMAR_NAME = "atp.lark"

# Words that begin a top-level statement (`eval metric` begins with `eval`).
_STATEMENT_WORDS = frozenset(k.split()[0] for k in STATEMENTS)
# Statement words that never appear at the start of a line inside a block (`seed` does, in templates).
_TOP_ONLY = _STATEMENT_WORDS - {"seed"}


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


def decode_string(token_text: str) -> str:
    """The value of a string literal: quotes removed, `\\n \\t \\r \\" \\\\ \\uXXXX` decoded (a surrogate pair
    `\\ud83d\\ude00` into one character; a lone surrogate stays, and the parser reports it).

    Other backslash pairs are kept as written, so Windows-like paths survive.
    """
    body = token_text[1:-1]
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    simple = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
            if nxt == "u" and i + 6 <= len(body):
                digits = body[i + 2 : i + 6]
                if all(ch in "0123456789abcdefABCDEF" for ch in digits):
                    code = int(digits, 16)
                    low = body[i + 8 : i + 12] if body[i + 6 : i + 8] == "\\u" else ""
                    if 0xD800 <= code < 0xDC00 and len(low) == 4 and all(ch in "0123456789abcdefABCDEF" for ch in low) \
                            and 0xDC00 <= int(low, 16) < 0xE000:  # a surrogate pair, as JSON writes non-BMP characters
                        out.append(chr(0x10000 + ((code - 0xD800) << 10) + (int(low, 16) - 0xDC00)))
                        i += 12
                        continue
                    out.append(chr(code))
                    i += 6
                    continue
        out.append(c)
        i += 1
    return "".join(out)


@v_args(meta=True)
class _Builder(Transformer):
    """Reshape the Lark tree into `atpdsl.language.syntax`; no checks here (they belong to the checker)."""

    def __init__(self, source: Source, base: int = 0) -> None:
        super().__init__()
        self.source = source
        self.problems: list[Diagnostic] = []  # found while building (lone surrogates in strings)
        # a piece parsed alone (error recovery) starts at offset `base` of the source: shift its positions
        self.base = base
        self.line0, self.column0 = source.position(base) if base else (1, 1)

    # -- helpers
    def _at(self, line: int, column: int) -> tuple[int, int]:
        return line + self.line0 - 1, column + (self.column0 - 1 if line == 1 else 0)

    def _make(self, line: int, column: int, end_line: int, end_column: int, start: int, end: int) -> Span:
        if self.base:
            (line, column), (end_line, end_column) = self._at(line, column), self._at(end_line, end_column)
            start, end = start + self.base, end + self.base
        return Span(self.source, line, column, end_line, end_column, start, end)

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return self.source.span(0, 0)
        return self._make(meta.line, meta.column, meta.end_line, meta.end_column, meta.start_pos, meta.end_pos)

    def _tspan(self, tok: Token) -> Span:
        return self._make(tok.line, tok.column, tok.end_line, tok.end_column, tok.start_pos, tok.end_pos)

    def _ident(self, tok: Token) -> n.Ident:
        return n.Ident(str(tok), self._tspan(tok))

    def _num(self, tok: Token) -> n.Num:
        text = str(tok)
        value: int | float
        if any(c in text for c in ".eE"):
            value = float(text)
        elif len(text.lstrip("-")) > 4000:
            value = 10**4000  # past int()'s digit limit: still an int, and too big for any bound
        else:
            value = int(text)
        return n.Num(value, text, self._tspan(tok))

    def _str(self, tok: Token) -> n.Str:
        value = decode_string(str(tok))
        span = self._tspan(tok)
        bad = lone_surrogate(value)
        if bad is not None:
            self.problems.append(Diagnostic("E005", Severity.ERROR, f"string holds a lone surrogate {bad}, which no"
                                            " file name, file or tokenizer can hold", span,
                                            ("write the character itself, or a surrogate pair such as"
                                             " \\ud83d\\ude00",)))
        return n.Str(value, span)

    # -- leaves
    def text(self, meta, children):
        return self._str(children[0])

    def integer(self, meta, children):
        return self._num(children[0])

    def decimal(self, meta, children):
        return self._num(children[0])

    def word(self, meta, children):
        return n.Word(str(children[0]), self._span(meta))

    def qualified_word(self, meta, children):
        return n.Word(f"{children[0]}:{children[1]}", self._span(meta))

    def string_list(self, meta, children):
        return tuple(self._str(c) for c in children if c is not None)

    # -- blocks
    def start(self, meta, children):
        return [c for c in children if c is not None]

    def settings(self, meta, children):
        return tuple(children)

    def setting(self, meta, children):
        return n.Setting(self._ident(children[0]), children[1], None, self._span(meta))

    def setting_per(self, meta, children):
        return n.Setting(self._ident(children[0]), None, self._ident(children[1]), self._span(meta))

    def model(self, meta, children):
        zoo, source, settings = children
        return n.Model(self._str(source), zoo is not None, settings or (), self._span(meta))

    def pair_field(self, meta, children):
        return n.Field(self._ident(children[0]), self._str(children[1]), self._span(meta))

    template_field = pair_field

    def pair(self, meta, children):
        return n.Pair(tuple(children), self._span(meta))

    def map_entry(self, meta, children):
        return n.MapEntry(self._ident(children[0]), self._str(children[1]), self._span(meta))

    def mapping(self, meta, children):
        return tuple(children)

    def pairs_from(self, meta, children):
        path, mapping = children
        return n.PairsFrom(self._str(path), mapping or (), self._span(meta))

    def template_text(self, meta, children):
        return n.TemplateText(self._str(children[0]), self._span(meta))

    def template_slot(self, meta, children):
        return n.TemplateSlot(self._ident(children[0]), children[1], self._span(meta))

    def template_corrupt(self, meta, children):
        return n.TemplateCorrupt(self._ident(children[0]), children[1], self._span(meta))

    def template_count(self, meta, children):
        return n.TemplateCount(children[0], self._span(meta))

    def template_seed(self, meta, children):
        return n.TemplateSeed(children[0], self._span(meta))

    def template(self, meta, children):
        return n.Template(tuple(children), self._span(meta))

    # -- metric
    def arg_literal(self, meta, children):
        return n.ArgLiteral(self._str(children[0]), self._span(meta))

    def arg_field(self, meta, children):
        return n.ArgField(self._ident(children[0]), self._span(meta))

    def arg_call(self, meta, children):
        return n.ArgCall(self._ident(children[0]), children[1], self._span(meta))

    def arguments(self, meta, children):
        return tuple(c for c in children if c is not None)

    def call(self, meta, children):
        return n.Call(self._ident(children[0]), children[1], self._span(meta))

    def at(self, meta, children):
        return self._ident(children[0])

    def metric(self, meta, children):
        return n.Metric(children[0], children[1], False, self._span(meta))

    def eval_metric(self, meta, children):
        return n.Metric(children[0], children[1], True, self._span(meta))

    # -- nodes
    def range(self, meta, children):
        lo, hi = children
        return n.Range(self._num(lo), self._num(hi) if hi is not None else None, self._span(meta))

    def index_list(self, meta, children):
        return tuple(children)

    def layers(self, meta, children):
        return ("layers", children[0])

    def per_position(self, meta, children):
        return ("per", self._span(meta))

    def group(self, meta, children):
        kind, indices, *options = children
        layers = tuple(v for k, v in options if k == "layers")
        per = tuple(v for k, v in options if k == "per")
        return n.Group(self._ident(kind), indices, layers, per, self._span(meta))

    def nodes(self, meta, children):
        return n.Nodes(tuple(children), self._span(meta))

    # -- the rest
    def method(self, meta, children):
        name, star, settings = children
        return n.Method(self._ident(name), star is not None, settings or (), self._span(meta))

    def aggregate(self, meta, children):
        return n.Aggregate(self._ident(children[0]), self._span(meta))

    def keep(self, meta, children):
        return n.Keep(self._ident(children[0]), self._span(meta))

    def batch(self, meta, children):
        return n.Batch(children[0], self._span(meta))

    def seed(self, meta, children):
        return n.Seed(children[0], self._span(meta))

    def select(self, meta, children):
        return n.Select(self._ident(children[0]), children[1], self._span(meta))

    def verify_word(self, meta, children):
        return self._ident(children[0])

    def verify(self, meta, children):
        kind, value, settings = children
        return n.Verify(self._ident(kind), value, settings or (), self._span(meta))

    def diagnose(self, meta, children):
        target, settings = children
        return n.Diagnose(self._ident(target), settings or (), self._span(meta))

    def export(self, meta, children):
        return n.Export(self._str(children[0]), self._span(meta))


# ---------------------------------------------------------------- syntax errors

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


def _chunks(text: str) -> list[tuple[int, int]]:
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


@functools.lru_cache(maxsize=1)
def _terminal_words() -> dict[str, str]:
    """Terminal name -> how messages describe it."""
    out: dict[str, str] = {}
    for term in get_parser().terminals:
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


def _syntax_error(e: UnexpectedInput, source: Source, start: int, end: int) -> Diagnostic:
    """A friendly diagnostic for a Lark error in the piece text[start:end], which was parsed alone (Lark's
    positions count from `start`)."""
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
                syntax.append(_syntax_error(e, source, start, end))
                continue
            chunk = _Builder(source, start)
            statements.extend(chunk.transform(piece))
            diagnostics.extend(chunk.problems)
        if not syntax:
            syntax.append(_syntax_error(first, source, 0, len(text)))
        return n.Spec(tuple(statements), source), syntax + diagnostics
    statements = builder.transform(tree)
    return n.Spec(tuple(statements), source), list(builder.problems)
