"""Source positions and spans (atpdsl/span.py)."""
from atpdsl.language.span import Source, Span


def test_position_is_one_based_line_and_column():
    src = Source("s.atp", "ab\ncd\n\nef")
    assert src.position(0) == (1, 1)
    assert src.position(1) == (1, 2)
    assert src.position(3) == (2, 1)
    assert src.position(7) == (4, 1)
    assert src.position(999) == (4, 3)  # clamped to the end


def test_span_has_exclusive_end_and_file():
    src = Source("s.atp", "model \"x\"\n")
    span = src.span(6, 9)
    assert (span.line, span.column, span.end_line, span.end_column) == (1, 7, 1, 10)
    assert span.file == "s.atp"
    assert str(span) == "s.atp:1:7"
    assert src.text[span.start:span.end] == '"x"'


def test_line_and_line_span():
    src = Source("d.jsonl", "{}\n{\"a\": 1}\n")
    assert src.line(2) == '{"a": 1}'
    assert src.line(5) == ""
    span = src.line_span(2)
    assert (span.line, span.column, span.end_column) == (2, 1, 9)


def test_spans_compare_by_position_not_source():
    a = Span(Source("a", "x"), 1, 1, 1, 2, 0, 1)
    b = Span(Source("b", "y"), 1, 1, 1, 2, 0, 1)
    assert a == b
    assert a.to(Span(a.source, 2, 3, 2, 5, 10, 12)).end == 12
