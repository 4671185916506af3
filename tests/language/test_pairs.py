"""Prompt pairs from blocks, files and templates (atpdsl/pairs.py)."""
import json
import re

import pytest

from atpdsl.language.compiler import check_text
from atpdsl.language.pairs import parse_placeholders, Placeholder


def checked(text, tmp_path=None, **kw):
    return check_text('model "EleutherAI/pythia-70m"\nmetric kl  method exact\n' + text, filename="t.atp",
                      base_dir=tmp_path or ".", **kw)


def test_inline_pair_fields_and_origin():
    r = checked('pair { clean "a b" corrupt "a c" answer " x" note "n" }')
    assert r.ok, r.diagnostics
    (p,) = r.pairs
    assert (p.clean, p.corrupt, p.fields, p.origin) == ("a b", "a c", (("answer", " x"), ("note", "n")), "t.atp:3")


def test_jsonl_csv_tsv_json_files_read_alike(tmp_path):
    rows = [{"clean": "c1", "corrupt": "k1", "answer": "a1", "n": 3}, {"clean": "c2", "corrupt": "k2", "answer": "a2",
                                                                      "n": 4}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.csv").write_text("clean,corrupt,answer,n\nc1,k1,a1,3\nc2,k2,a2,4\n")
    (tmp_path / "p.tsv").write_text("clean\tcorrupt\tanswer\tn\nc1\tk1\ta1\t3\nc2\tk2\ta2\t4\n")
    seen = []
    for name in ("p.jsonl", "p.json", "p.csv", "p.tsv"):
        r = checked(f'pairs from "{name}"', tmp_path)
        assert r.ok, r.diagnostics
        seen.append([(p.clean, p.corrupt, p.fields) for p in r.pairs])
        assert r.pairs[1].origin == f"{name}:{2 if name != 'p.csv' and name != 'p.tsv' else 3}"
    assert all(s == seen[0] for s in seen)
    assert seen[0][0] == ("c1", "k1", (("answer", "a1"), ("n", "3")))


def test_mapping_fills_fields_from_columns(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,counterfactual,target\nA,B,t\n")
    r = checked('pairs from "p.csv" { clean = "prompt"  corrupt = "counterfactual"  answer = "target" }', tmp_path)
    assert r.ok, r.diagnostics
    (p,) = r.pairs
    assert (p.clean, p.corrupt, p.field("answer")) == ("A", "B", "t")


def test_row_errors_are_capped_per_file(tmp_path):
    lines = [json.dumps({"clean": "c", "corrupt": "k"})] + [json.dumps({"clean": "c"})] * 8
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    r = checked('pairs from "p.jsonl"', tmp_path)
    msgs = [(d.code, d.span.file, d.span.line) for d in r.errors]
    assert msgs[:5] == [("E305", "p.jsonl", k) for k in range(2, 7)]
    assert r.errors[5].message == "... and 3 more rows of `p.jsonl` without prompts"
    assert len(r.errors) == 6


def test_folder_as_pairs_file_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    r = checked('pairs from "d.jsonl"', tmp_path)
    assert [d.code for d in r.errors] == ["E301"]


TEMPLATE = '''
template {
    text    "When {a} and {b} went out, {s2:b} gave it to"
    slot    a ["Mary", "Anna", "Sue"]
    slot    b ["John", "Tom", "Bob"]
    corrupt b ["Mark", "Paul"]
    count   20
    seed    3
    answer  " {a}"
    wrong   " {b}"
    flipped "{b.corrupt}"
}
'''


def test_template_expansion_is_deterministic_and_slots_locate_values():
    first = checked(TEMPLATE).pairs
    again = checked(TEMPLATE).pairs
    assert first == again and len(first) == 20
    for p in first:
        by_name = {s.name: s for s in p.slots}
        assert list(by_name) == ["a", "b", "s2"]
        a, b = p.clean[by_name["a"].clean.start:by_name["a"].clean.end], \
            p.clean[by_name["b"].clean.start:by_name["b"].clean.end]
        assert p.field("answer") == " " + a and p.field("wrong") == " " + b
        assert p.clean[by_name["s2"].clean.start:by_name["s2"].clean.end] == b
        cb = p.corrupt[by_name["b"].corrupt.start:by_name["b"].corrupt.end]
        assert cb in ("Mark", "Paul") and p.field("flipped") == cb
        assert p.corrupt[by_name["s2"].corrupt.start:by_name["s2"].corrupt.end] == cb
        assert p.corrupt[by_name["a"].corrupt.start:by_name["a"].corrupt.end] == a
        assert a != b
        assert p.corrupt == p.clean.replace(b, cb)
        assert re.fullmatch(r"t\.atp:4#\d+", p.origin)
    assert len({p.clean for p in first}) > 3  # it does vary


def test_template_seed_defaults_to_the_spec_seed():
    base = TEMPLATE.replace("    seed    3\n", "")
    a = checked(base + "seed 3\n").pairs
    b = checked(TEMPLATE).pairs
    c = checked(base + "seed 4\n").pairs
    assert [p.clean for p in a] == [p.clean for p in b]
    assert [p.clean for p in a] != [p.clean for p in c]


def test_repeated_slot_positions_are_numbered():
    r = checked('template { text "{x} {x} {x}" slot x ["p", "q"] corrupt x count 2 }')
    assert r.ok, r.diagnostics
    p = r.pairs[0]
    assert [s.name for s in p.slots] == ["x", "x_2", "x_3"]
    assert [(s.clean.start, s.clean.end) for s in p.slots] == [(0, 1), (2, 3), (4, 5)]


def test_literal_braces():
    parts, problems = parse_placeholders("a {{b}} {c}")
    assert problems == [] and parts == ["a {b} ", Placeholder("c", None, False, 8, 11)]
    r = checked('template { text "{{x}} {y}" slot y ["1", "2"] corrupt y count 1 }')
    assert r.pairs[0].clean in ("{x} 1", "{x} 2")


def test_docs_template_example_compiles(project_root):
    doc = (project_root / "docs" / "language.md").read_text()
    block = re.search(r"```\n(template \{.*?\n\})\n```", doc, re.S).group(1)
    r = checked(block)
    assert r.ok, r.diagnostics
    assert len(r.pairs) == 16 and [s.name for s in r.pairs[0].slots] == ["a", "b", "s2"]


@pytest.mark.parametrize("body, code", [
    ('text "{a}" slot a ["x"] corrupt a count 1', "E407"),  # corrupt has no other value
    ('text "{a} {b}" slot a ["x"] slot b ["x"] corrupt a ["y"] count 1', "E407"),
    ('text "{a}" slot a [] corrupt a', "E404"),
    ('text "{a.corrupt}" slot a ["x", "y"] corrupt a', "E410"),
    ('text "{a} {n:a} {n:a}" slot a ["x", "y"] corrupt a', "E409"),
    ('text "{a}" slot a ["x", "y"] corrupt a answer "{q}"', "E402"),
    ('text "{a}" clean "x" slot a ["x", "y"] corrupt a', "E401"),
    ('text "{a}" text "{a}" slot a ["x", "y"] corrupt a', "E105"),
    ('text "plain" slot a ["x", "y"] corrupt a', "E402"),
    ('text "{a}" slot a ["x", "y"] corrupt a count 100001', "E106"),
    ('text "{a}" slot a ["x", "y"] corrupt a seed 1.5', "E106"),
])
def test_template_errors(body, code):
    r = checked("template { " + body + " }")
    assert code in [d.code for d in r.errors], r.diagnostics
