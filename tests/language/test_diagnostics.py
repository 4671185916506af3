"""Rendering and hints (atpdsl/diagnostics.py)."""
import json

import pytest

from atpdsl.language import diagnostics as dg
from atpdsl.language.diagnostics import Diagnostic, Severity, cap_list, did_you_mean, error, render, summary, warning
from atpdsl.language.span import Source


@pytest.fixture
def src():
    return Source("s.atp", 'model "m"\n\theads  layers 0..9\n')


def test_concise_is_one_line_each_ruff_style(src):
    d = error("E603", "layer 9 is out of range", src.span(25, 26), "the model has 4 layers")
    w = warning("W501", "unused", src.span(0, 5))
    assert dg.render_concise([d, w]) == (
        "s.atp:1:1: W501 warning: unused\n"
        "s.atp:2:16: E603 layer 9 is out of range [help: the model has 4 layers]"
    )


def test_full_has_source_line_and_carets_with_tabs_expanded(src):
    d = error("E601", "unknown node kind `heads`", src.span(11, 16), "did you mean it?")
    assert dg.render_full([d]) == (
        "error[E601]: unknown node kind `heads`\n"
        " --> s.atp:2:2\n"
        "  |\n"
        "2 |         heads  layers 0..9\n"
        "  |         ^^^^^\n"
        "  = help: did you mean it?"
    )


def test_full_multiline_span_underlines_to_end_of_first_line():
    src = Source("s.atp", "nodes {\n  heads\n}\n")
    d = error("E608", "x", src.span(0, len(src.text)))
    assert dg.render_full([d]).splitlines()[4] == "  | ^^^^^^^"


def test_json_is_machine_readable_and_sorted(src):
    a = error("E2", "b", src.span(11, 16))
    b = error("E1", "a", src.span(0, 5), "h")
    out = json.loads(dg.render_json([a, b]))
    assert [x["code"] for x in out] == ["E1", "E2"]
    assert out[0] == {"code": "E1", "severity": "error", "message": "a", "file": "s.atp", "line": 1, "column": 1,
                      "end_line": 1, "end_column": 6, "hints": ["h"]}


def test_render_caps_long_lists(src):
    many = [error("E1", f"m{i}", src.span(0, 1)) for i in range(dg.MAX_SHOWN + 3)]
    assert dg.render_concise(many).splitlines()[-1] == "... and 3 more"
    assert len(json.loads(dg.render_json(many))) == dg.MAX_SHOWN + 3


def test_render_rejects_unknown_format(src):
    with pytest.raises(ValueError, match="unknown output format"):
        render([], "xml")


def test_diagnostic_without_span_renders():
    d = Diagnostic("E1", Severity.ERROR, "m", None, ("h",))
    assert dg.render_concise([d]) == "<spec>: E1 m [help: h]"
    assert "= help: h" in dg.render_full([d])


def test_did_you_mean_and_cap_list():
    assert did_you_mean("head", ["heads", "keys"]) == "heads"
    assert did_you_mean("HEADS", ["heads"]) == "heads"
    assert did_you_mean("zzz", ["heads"]) is None
    assert cap_list(["a"]) == "a"
    assert cap_list(["a", "b", "c"]) == "a, b or c"
    assert cap_list(list("abcdefghij"), limit=3) == "a, b, c, ... and 7 more"


def test_summary_counts(src):
    e, w = error("E1", "x", None), warning("W1", "y", None)
    assert summary([e, e, w]) == "Found 2 errors and 1 warning."
    assert summary([]) == "No problems found."
