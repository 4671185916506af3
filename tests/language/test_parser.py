"""The Lark front end: grammar location, tree shape, syntax-error diagnostics (atpdsl/parser.py)."""
from pathlib import Path

import pytest

from atpdsl.language import syntax as n
from atpdsl.language.parser import _chunks, decode_string, get_parser, grammar_candidates, grammar_path, parse


def codes(text):
    return [(d.code, d.span.line, d.span.column) for d in parse(text, "t.atp")[1]]


def test_grammar_is_found_in_the_checkout(project_root):
    packaged, checkout = grammar_candidates()
    assert packaged == project_root / "atpdsl" / "grammar" / "atp.lark"
    assert checkout == project_root / "grammar" / "atp.lark"
    assert grammar_path() == checkout  # an editable install has no atpdsl/grammar/


def test_parser_is_strict_lalr_with_positions():
    p = get_parser()
    assert p.options.parser == "lalr"
    assert p.options.strict is True
    assert p.options.propagate_positions is True
    assert get_parser() is p  # built once


def test_shared_specs_parse_without_errors(shared_dir):
    for spec in sorted((shared_dir / "specs").glob("*.atp")):
        tree, diags = parse(spec.read_text(), str(spec))
        assert diags == [], spec
        assert isinstance(tree.statements[0], n.Model)


def test_tree_shape_of_every_statement():
    text = '''
model zoo "induction-2l" { dtype float16  device cuda:1  revision "main"  attention eager }
pair { clean "a" corrupt "b" answer "c" }
pairs from "p.csv" { clean = "prompt" }
template { text "x {s}" slot s ["1", "2",] corrupt s ["3"] count 4 seed 5 answer "{s}" }
metric logit_diff(first_token(answer), " no") at s
eval metric kl
nodes { heads 0, 2..3 layers 1..2 per position ; mlp }
method atp* { qk_fix off  graddrop per sublayer }
aggregate abs_mean
keep per_pair
batch 4
seed 7
select cumulative 0.9
verify top 3
diagnose false_negatives { samples 10 confidence 0.9 inclusion 0.2 }
export "out/x.csv"
'''
    tree, diags = parse(text, "t.atp")
    assert diags == []
    kinds = [type(s).__name__ for s in tree.statements]
    assert kinds == ["Model", "Pair", "PairsFrom", "Template", "Metric", "Metric", "Nodes", "Method", "Aggregate",
                     "Keep", "Batch", "Seed", "Select", "Verify", "Diagnose", "Export"]
    model = tree.statements[0]
    assert model.zoo and model.source.value == "induction-2l"
    assert [(s.key.name, getattr(s.value, "text", getattr(s.value, "value", None))) for s in model.settings] == [
        ("dtype", "float16"), ("device", "cuda:1"), ("revision", "main"), ("attention", "eager")]
    template = tree.statements[3]
    slot = next(i for i in template.items if isinstance(i, n.TemplateSlot))
    assert [v.value for v in slot.values] == ["1", "2"]  # trailing comma allowed
    metric = tree.statements[4]
    assert isinstance(metric.call.args[0], n.ArgCall) and metric.call.args[0].func.name == "first_token"
    assert metric.call.args[1].value.value == " no"
    assert metric.at.name == "s" and not metric.eval
    assert tree.statements[5].eval and tree.statements[5].call.args is None
    heads, mlp = tree.statements[6].groups
    assert [r.bounds for r in heads.indices] == [(0, 0), (2, 3)]
    assert heads.layers[0].bounds == (1, 2) and len(heads.per_position) == 1
    assert mlp.indices is None and mlp.layers == ()
    method = tree.statements[7]
    assert method.full_name == "atp*"
    assert method.settings[1].per.name == "sublayer"
    assert tree.statements[12].value.value == 0.9
    assert tree.statements[10].value.is_int


def test_keywords_are_plain_field_names_inside_pairs():
    tree, diags = parse('pair { clean "a" corrupt "b" text "c" seed "d" count "e" slot "f" model "g" per "h" }')
    assert diags == []
    assert [f.name.name for f in tree.statements[0].fields] == [
        "clean", "corrupt", "text", "seed", "count", "slot", "model", "per"]


def test_spans_point_at_the_source():
    text = 'model "m"\n\nmetric  prob(answer)\n'
    tree, _ = parse(text, "t.atp")
    metric = tree.statements[1]
    assert (metric.span.line, metric.span.column) == (3, 1)
    arg = metric.call.args[0]
    assert text[arg.span.start:arg.span.end] == "answer"
    assert (arg.span.line, arg.span.column, arg.span.end_column) == (3, 14, 20)


def test_decode_string():
    assert decode_string(r'"a\nb\t\"q\" \\ \u00e9"') == 'a\nb\t"q" \\ é'
    assert decode_string(r'"C:\data\x"') == r"C:\data\x"  # unknown escapes stay as written


def test_comments_and_semicolons():
    tree, diags = parse('# c\nmodel "m"; # trailing\nbatch 2;;seed 1 # end')
    assert diags == [] and len(tree.statements) == 3


def test_numbers_and_ranges_lex_apart():
    tree, diags = parse("nodes { heads layers 0..4 }\nselect threshold 1e-3\nseed -1")
    assert diags == []
    assert tree.statements[0].groups[0].layers[0].bounds == (0, 4)
    assert tree.statements[1].value.value == pytest.approx(1e-3)
    assert tree.statements[2].value.value == -1 and tree.statements[2].value.is_int


def test_every_broken_statement_gets_its_own_error_and_good_ones_survive():
    text = 'model "m"\nbatch\npair { clean "a" corrupt }\nseed 3\nselect top\n'
    tree, diags = parse(text, "t.atp")
    assert [(d.code, d.span.line) for d in diags] == [("E001", 3), ("E001", 3), ("E004", 5)]
    # `batch` followed by `pair` is reported at `pair`; both broken statements are dropped
    assert [type(s).__name__ for s in tree.statements] == ["Model", "Seed"]


def test_chunks_split_at_statements_and_misspellings():
    text = 'model "m"\nmodle "x"\nmetric\n  logit_diff(a, b)\npair { clean "a"\nbatch 3'
    starts = [text[a:b].split()[0] for a, b in _chunks(text)]
    assert starts == ["model", "modle", "metric", "pair", "batch"]


@pytest.mark.parametrize("text, expected", [
    ('modle "x"', [("E001", 1, 1)]),
    ('model "x', [("E003", 1, 7)]),
    ('nodes { heads', [("E004", 1, 7)]),
    ("batch 8 @", [("E002", 1, 9)]),
    ("}", [("E001", 1, 1)]),
    ("", []),
    ("# only a comment", []),
])
def test_syntax_error_codes(text, expected):
    assert codes(text) == expected


def test_syntax_messages_say_what_was_expected():
    (d,) = parse('metric logit_diff(answer wrong)', "t.atp")[1]
    assert d.message == "unexpected name `wrong`, expected `(`, `)` or `,`"
    assert d.hints == ("separate arguments with `,`",)
    (d,) = parse('modle "x"', "t.atp")[1]
    assert d.message == "unexpected name `modle`, expected a statement"
    assert d.hints == ("did you mean `model`?",)


def test_grammar_file_is_the_documented_one(project_root):
    text = (project_root / "grammar" / "atp.lark").read_text()
    assert "start:" in text and "%ignore COMMENT" in text
    assert Path(grammar_path()).read_text() == text
