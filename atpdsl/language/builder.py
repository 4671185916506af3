"""Reshape Lark's parse tree into the frozen syntax tree (language/syntax.py), decoding string literals."""
from __future__ import annotations

from lark import Token, Tree

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, Severity
from atpdsl.language.files import lone_surrogate
from atpdsl.language.span import Source, Span

__all__ = ["Builder", "decode_string"]


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


class Builder:
    """Reshape the Lark tree into `atpdsl.language.syntax`; no checks here (they belong to the checker).

    One method per grammar rule, called as `rule(meta, children)` bottom-up by `transform` (a plain walk:
    Lark's Transformer machinery cost a quarter of the time of checking 10,000 pairs).
    """

    def __init__(self, source: Source, base: int = 0) -> None:
        self.source = source
        self.problems: list[Diagnostic] = []  # found while building (lone surrogates in strings)
        # a piece parsed alone (error recovery) starts at offset `base` of the source: shift its positions
        self.base = base
        self.line0, self.column0 = source.position(base) if base else (1, 1)

    def transform(self, tree: Tree):
        """The syntax object for a Lark tree (a rule without a method keeps its Tree)."""
        cls = type(self)

        def walk(node: Tree):
            children = [walk(c) if isinstance(c, Tree) else c for c in node.children]
            method = getattr(cls, node.data, None)
            if method is None or node.data.startswith("_"):
                return Tree(node.data, children, node.meta)
            return method(self, node.meta, children)

        return walk(tree)

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

    def batch_word(self, meta, children):
        return self._ident(children[0])

    def seed(self, meta, children):
        return n.Seed(children[0], self._span(meta))

    def select(self, meta, children):
        return n.Select(self._ident(children[0]), children[1], self._span(meta))

    def verify_word(self, meta, children):
        return self._ident(children[0])

    def verify(self, meta, children):
        kind, value, settings = children
        return n.Verify(self._ident(kind), value, settings or (), self._span(meta))

    def select_edges(self, meta, children):
        target, kind, value, settings = children
        return n.SelectEdges(self._ident(target), self._ident(kind), value, settings or (), self._span(meta))

    def select_edges_word(self, meta, children):
        target, kind = children
        return n.SelectEdges(self._ident(target), self._ident(kind), None, (), self._span(meta))

    def verify_edges(self, meta, children):
        target, kind, value = children
        return n.VerifyEdges(self._ident(target), self._ident(kind), value, self._span(meta))

    def diagnose(self, meta, children):
        target, settings = children
        return n.Diagnose(self._ident(target), settings or (), self._span(meta))

    def export(self, meta, children):
        return n.Export(self._str(children[0]), self._span(meta))
