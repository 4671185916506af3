"""The checker: names, numbers, model facts, overlaps, all errors at once (atpdsl/checker.py)."""
import json

import pytest

from atpdsl.language.compiler import check_text

GOLDEN = "tests/golden/check"


def check(body, base_dir=GOLDEN, model='model "model"', **kw):
    text = f'{model}\npairs from "data/pairs.jsonl"\nmetric logit_diff(answer, wrong)\n{body}'
    return check_text(text, filename="t.atp", base_dir=base_dir, **kw)


def codes(result):
    return [d.code for d in result.diagnostics]


def test_local_model_folder_is_resolved_with_its_geometry(project_root):
    r = check("")
    assert r.ok
    assert r.model.source == str(project_root / GOLDEN / "model")
    assert r.model.geometry.n_layers == 4 and r.model.geometry.n_kv_heads == 2
    assert r.model.arch.name == "Llama"


def test_hub_id_is_accepted_offline_without_geometry():
    r = check("nodes { heads layers 0..40 }", model='model "EleutherAI/pythia-70m"')
    assert r.ok, r.diagnostics
    assert r.model.source == "EleutherAI/pythia-70m" and r.model.config is None
    # the model's depth is unknown, so a large layer is not an error yet


def test_hub_like_path_next_to_a_folder_of_that_name_warns():
    r = check("", model='model "data/other"')
    assert r.ok and codes(r) == ["W201", "W504"]  # W504: a hub model not in the cache: tokens not checked
    assert r.diagnostics[0].hints == ("write `./data/other` for a local folder",)


def test_zoo_model_has_geometry():
    r = check("", model='model zoo "induction-2l"')
    assert r.model.is_zoo and r.model.source == "induction-2l"
    assert r.model.geometry.n_layers == 2
    # its tokenizer knows t0..t63 only: the golden pairs' answers are outside its vocabulary
    assert {d.code for d in r.errors} == {"E507"}


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 2}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text('{"clean": "a", "corrupt": "b", "answer": "x", "wrong": "y"}\n')
    r = check("", base_dir=tmp_path, model='model "m"')
    assert codes(r) == ["E204"]
    assert "unsupported model_type 'mamba'" in r.diagnostics[0].message


def test_config_with_unusable_sizes(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 0,
                                                            "n_embd": 8}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text('{"clean": "a", "corrupt": "b", "answer": "x", "wrong": "y"}\n')
    r = check("", base_dir=tmp_path, model='model "m"')
    assert codes(r) == ["E204"]


def test_bad_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{nope")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text('{"clean": "a", "corrupt": "b", "answer": "x", "wrong": "y"}\n')
    r = check("", base_dir=tmp_path, model='model "m"')
    assert codes(r) == ["E203"]


@pytest.mark.parametrize("nodes, expected", [
    ("heads 0..3 layers 3", []),
    ("values 0, 1 per position", []),  # 2 KV groups
    ("queries 3", []),  # queries count heads, not groups
    ("neurons 31 layers 0..3", []),
    ("neurons 32", ["E604"]),
    ("values 2", ["E604"]),
    ("heads layers 4", ["E603"]),
    ("heads 3..1", ["E607"]),
    ("resid layers 1 ; attn ; mlp layers 0..3", []),
    ("heads layers 0..1 layers 2", ["E105"]),
    ("heads per position per position", ["E105"]),
    ("heads layers 0..1 ; heads layers 2..3", []),
    ("heads layers 0..1 ; heads layers 1..3", ["E605"]),
    ("heads 0 ; heads 1", []),
    ("heads 0..2 ; heads 2", ["E605"]),
    ("heads ; heads per position", []),  # summed and per position are different nodes
    ("neurons 0..999999999999", ["E604", "E607"]),
])
def test_node_groups_against_the_model(nodes, expected):
    r = check(f"nodes {{ {nodes} }}")
    assert codes(r) == expected, r.diagnostics


def test_huge_index_range_without_a_model_is_refused():
    r = check("nodes { neurons 0..999999999999 }", model='model "gpt2"')
    assert codes(r) == ["E607"]
    assert r.diagnostics[0].message == "1000000000000 indices in one group is too many (at most 1000000)"


@pytest.mark.parametrize("body, expected", [
    ("method atp*", []),
    ("method atp* { qk_fix off graddrop per sublayer }", []),
    ("method atp* { graddrop on graddrop off }", ["E105"]),
    ("method atp* { qk_fix per layer }", ["E104"]),
    ("method atp* { grad_drop on }", ["E103"]),
    ("method exact { graddrop on }", ["E702"]),
    ("method atp* { norm_fix on graddrop off }", []),
    ("method atp { norm_fix on }", ["E702"]),
    ("method atp* { norm_fix per layer }", ["E104"]),
    ("method exakt", ["E701"]),
    ("method exact*", ["E701"]),
    ("aggregate per_pair keep per_pair", []),
    ("batch 2.0", ["E106"]),
    ("select threshold 0", []),
    ("select top 0", ["E106"]),
    ("verify top 1e3", ["E106"]),
    ("diagnose false_negatives", []),
    ("diagnose false_negatives { samples 0 inclusion 1 }", ["E106", "E106"]),
    ("diagnose false_negatives { samples \"ten\" }", ["E106"]),
    ('model "model" { device "cuda:3" revision "v1" attention eager dtype bf16 }', ["E101"]),
    ("export \"a.CSV\" export \"b.png\" export \"c.svg\" export \"d.html\" export \"e.gexf\" export \"f.dot\"", []),
    ("export \"\"", ["E803"]),
    ("export \"out/\"", ["E803"]),
    ("eval metric prob(answer) verify top 3", []),
    ("metric kl", ["E101"]),
    ("metric kl()", ["E101"]),
])
def test_statements(body, expected):
    r = check(body)
    assert codes(r) == expected, r.diagnostics


def test_only_known_attentions_are_accepted():
    r = check("", model='model "model" { attention flash }')
    assert codes(r) == ["E104"], r.diagnostics
    assert check("", model='model "model" { attention sdpa }').ok
    assert check("", model='model "model" { device auto }').ok


def test_model_settings_accepted():
    r = check("", model='model "model" { device "cuda:3" revision "v1" attention eager dtype bf16 }')
    assert r.ok, r.diagnostics


def test_exports_collide_by_name_under_out_dir(tmp_path):
    body = 'export "a/x.csv"\nexport "b/x.csv"\n'
    assert check(body).ok
    r = check(body, out_dir=tmp_path)
    assert codes(r) == ["E804"]
    assert r.diagnostics[0].message == "`b/x.csv` is exported twice under --out"


def test_metric_fields_must_exist_in_every_pair(tmp_path):
    text = ('model "gpt2"\npair { clean "a" corrupt "b" answer "x" }\npair { clean "c" corrupt "d" other "y" }\n'
            "metric logprob(answer)\n")
    r = check_text(text, filename="t.atp")
    assert codes(r) == ["E503"]
    assert r.diagnostics[0].message == "no field `answer` in 1 of 2 pairs (first: t.atp:3)"


def test_metric_literals_and_first_token_need_no_fields():
    text = 'model "gpt2"\npair { clean "a" corrupt "b" }\nmetric logit_diff(first_token(" yes"), " no")\n'
    assert check_text(text).ok
    text = 'model "gpt2"\npair { clean "a" corrupt "b" }\nmetric prob(first_token(first_token(" yes")))\n'
    assert codes(check_text(text)) == ["E001"]  # one level only: no recursion to blow up
    text = 'model "gpt2"\npair { clean "a" corrupt "b" }\nmetric prob("")\n'
    assert codes(check_text(text)) == ["E503"]


def test_metric_position_names_a_slot_of_every_pair():
    tpl = 'template { text "x {s}" slot s ["1", "2"] corrupt s count 2 answer "{s}" }\n'
    ok = check_text('model "gpt2"\n' + tpl + "metric prob(answer) at s\n")
    assert ok.ok, ok.diagnostics
    mixed = check_text('model "gpt2"\n' + tpl + 'pair { clean "a" corrupt "b" answer "c" }\nmetric prob(answer) at s\n',
                       filename="t.atp")
    assert codes(mixed) == ["E505"]
    assert mixed.diagnostics[0].message == "position `s` is missing from 1 of 3 pairs (first: t.atp:3)"


def test_all_errors_are_reported_at_once_in_source_order():
    r = check_text(
        'model "gpt2" { dtype flaot }\npair { clean "a" }\nmetric logit_dif(x)\nnodes { head }\nmethod atp* { qk_fix 1 }'
        '\nbatch 0\nselect bottom 3\nverify most 2\ndiagnose false_negatives { confidence 2 }\nexport "x.xls"\n',
        filename="t.atp")
    assert [(d.code, d.span.line) for d in r.diagnostics] == [
        ("E104", 1), ("E305", 2), ("E501", 3), ("E601", 4), ("E104", 5), ("E106", 6), ("E801", 7), ("E802", 8),
        ("E106", 9), ("E803", 10)]


def test_missing_statements_are_not_claimed_after_a_syntax_error():
    r = check_text('modle "gpt2"\npair { clean "a" corrupt "b" }\nmetric kl\n')
    assert codes(r) == ["E001"]
    r = check_text('pair { clean "a" corrupt "b" }\n')
    assert codes(r) == ["E102", "E102"]


def test_result_properties():
    r = check("eval metric kl")
    assert r.ok and [d.code for d in r.diagnostics] == ["W501"] and r.errors == []
    assert len(r.pairs) == 2
