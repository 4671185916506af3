"""`check` sees the run's tokens: the tokenizer file alone tokenizes as the loaded tokenizer does, the shared
encoding gives the engine's pairs, and the token diagnostics catch what a run would reject or get wrong."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from atpdsl.cli import main
from atpdsl.language.compiler import check_text, compile_text
from atpdsl.language.encoding import HFTokenizer, encode_pairs
from atpdsl.language.tokenizer import load_file_tokenizer
from atpdsl.plan import MetricArg, MetricSpec, PromptPair, SlotSpan, TextSpan

TEXTS = ["Once upon a time", " Jack", "Jack", " Sam", "  two  spaces", "héllo wörld ☃", "\n new", "a", " ", "",
         "The cat sat. She", " she", "x" * 50, "<s> hi", "1234 5678", "t1 t2 t63", "when john and mary went"]


def _folders(project_root, stories260k_dir):
    return [stories260k_dir, project_root / "atpdsl" / "zoo" / "induction-2l"]


def test_file_tokenizer_equals_the_loaded_tokenizer(project_root, stories260k_dir):
    from transformers import AutoTokenizer

    for folder in _folders(project_root, stories260k_dir):
        hf = HFTokenizer(AutoTokenizer.from_pretrained(folder))
        raw = load_file_tokenizer(folder / "tokenizer.json")
        for special in (True, False):
            assert raw.encode(TEXTS, special) == hf.encode(TEXTS, special), folder
        assert raw.offsets(TEXTS) == hf.offsets(TEXTS)
        ids = sorted({i for row in raw.encode(TEXTS, True) for i in row})
        assert raw.pieces(ids) == hf.pieces(ids)
        assert raw.unk_id == hf.unk_id


def _pairs_with_slots():
    text = "Once upon a time, there was a little {w} named {n}. One day,"
    out = []
    for w, k, name, a, b in (("girl", "dog", "Lily", " she", " he"), ("boy", "big dog", "Tom", " he", " she")):
        clean, corrupt = text.format(w=w, n=name), text.format(w=k, n=name)
        s, sk = clean.index(w), corrupt.index(k)
        m, mk = clean.index(f" {name}.") + 1, corrupt.index(f" {name}.") + 1
        slots = (SlotSpan("who", TextSpan(s, s + len(w)), TextSpan(sk, sk + len(k))),
                 SlotSpan("name", TextSpan(m, m + len(name)), TextSpan(mk, mk + len(name))))
        out.append(PromptPair(clean, corrupt, (("answer", a), ("wrong", b), ("long", " Jack")), slots, f"t:{w}"))
    return out


def test_check_and_run_encode_alike(stories260k_dir, shared_dir):
    """The same pairs through the check-time tokenizer and the run's tokenizer: identical encodings."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (shared_dir / "data" / "stories260K-pronoun.jsonl").read_text().splitlines()]
    pairs = [PromptPair(r["clean"], r["corrupt"], (("answer", r["answer"]), ("wrong", r["wrong"]),
                                                   ("long", " Jack")), (), f"p:{i}") for i, r in enumerate(rows)]
    specs = [(MetricSpec("logit_diff", (MetricArg("answer"), MetricArg("wrong"))), None),
             (MetricSpec("logit_diff", (MetricArg("answer", sequence=True), MetricArg("long", sequence=True))),
              MetricSpec("prob", (MetricArg("long", first_token=True),)))]
    raw = load_file_tokenizer(stories260k_dir / "tokenizer.json")
    hf = HFTokenizer(AutoTokenizer.from_pretrained(stories260k_dir))
    for metric, eval_metric in specs:
        for ps in (pairs, _pairs_with_slots()):
            a, problems_a = encode_pairs(raw, ps, metric, eval_metric)
            b, problems_b = encode_pairs(hf, ps, metric, eval_metric)
            assert a == b and not problems_a and not problems_b


def _spec(stories, metric, pairs_text, extra=""):
    return f'model "{stories}"\n{pairs_text}\nmetric {metric}\nnodes {{ heads }}\n{extra}'


NAMES = ('pair { clean "Once upon a time, there was a girl named" corrupt "Once upon a time, there was a boy named"'
         ' answer " Jack" wrong " Kate" }\n'
         'pair { clean "Once upon a time, there was a girl named" corrupt "Once upon a time, there was a boy named"'
         ' answer " Sam" wrong " Sue" }')


def test_first_token_that_is_a_word_boundary_or_shared(stories260k_dir):
    r = check_text(_spec(stories260k_dir, "logit_diff(first_token(answer), first_token(wrong))", NAMES),
                   filename="n.atp")
    same = [d for d in r.errors if d.code == "E508"]
    assert [(d.span.line, d.span.column) for d in same] == [(4, 1), (4, 1)]
    assert "['▁']" in same[0].message and "' Jack' vs ' Kate'" in same[0].message and "n.atp:2" in same[0].message
    assert "['▁S']" in same[1].message and "' Sam' vs ' Sue'" in same[1].message
    warned = [d for d in r.diagnostics if d.code == "W503"]
    assert warned and all("'▁'" in d.message for d in warned)


def test_boundary_warning_reaches_the_plan(stories260k_dir):
    pair = ('pair { clean "Once upon a time, there was a girl named" corrupt "Once upon a time, there was a boy'
            ' named" answer " Jack" wrong " she" }')
    plan = compile_text(_spec(stories260k_dir, "logit_diff(first_token(answer), wrong)", pair), filename="w.atp")
    assert len(plan.warnings) == 1
    assert plan.warnings[0].startswith("w.atp:3:1: W503 warning: first_token(' Jack') is the bare word-boundary"
                                       " piece '▁'")


def test_whole_answers_check_clean(stories260k_dir):
    r = check_text(_spec(stories260k_dir, "logit_diff(sequence(answer), sequence(wrong))", NAMES))
    assert r.ok and not r.diagnostics, r.diagnostics


def test_multi_token_answer_and_unequal_lengths(stories260k_dir):
    bad = ('pair { clean "Once upon a time, there was a girl named" corrupt "Once upon a time, there was a dog'
           ' named" answer " she" wrong " he" }')
    r = check_text(_spec(stories260k_dir, "logit_diff(answer, wrong)", NAMES + "\n" + bad), filename="m.atp")
    codes = [(d.code, d.span.line) for d in r.errors]
    assert ("E506", 5) in codes and ("E311", 4) in codes
    e311 = next(d for d in r.errors if d.code == "E311")
    assert "'▁g', 'ir', 'l'" in e311.message and "'▁do', 'g'" in e311.message
    e506 = [d for d in r.errors if d.code == "E506"]
    assert "' Jack'" in e506[0].message and "sequence(answer)" in e506[0].message


def test_prompt_longer_than_the_context(stories260k_dir):
    long = " and then" * 300  # ~600 tokens; stories260K reads 512
    pair = f'pair {{ clean "Once{long} she" corrupt "Once{long} he" answer " was" wrong " had" }}'
    r = check_text(_spec(stories260k_dir, "logit_diff(answer, wrong)", pair), filename="c.atp")
    (d,) = r.errors
    assert d.code == "E312" and (d.span.line, d.span.column) == (2, 1)
    assert "but the model reads at most 512 (max_position_embeddings in its config)" in d.message


def test_cli_check_exits_1_fast_without_torch(stories260k_dir, tmp_path):
    spec = tmp_path / "s.atp"
    spec.write_text(_spec(stories260k_dir, "logit_diff(first_token(answer), first_token(wrong))", NAMES))
    code = ("import sys\nfrom atpdsl.cli import main\nrc = main(['check', '--output-format', 'concise', "
            f"{str(spec)!r}])\nprint('RESULT', rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RESULT 1 []" in out.stdout, out.stdout + out.stderr
    assert "E508" in out.stdout


def test_eval_metric_answers_point_at_the_eval_statement(stories260k_dir):
    r = check_text(_spec(stories260k_dir, "logit_diff(sequence(answer), sequence(wrong))", NAMES,
                         "eval metric prob(answer)\nverify top 2\n"))
    (d, *rest) = r.errors
    assert d.code == "E506" and d.span.line == 6 and all(x.code == "E506" for x in rest)


def test_cli_runs(capsys, stories260k_dir, tmp_path):
    spec = tmp_path / "ok.atp"
    spec.write_text(_spec(stories260k_dir, "logit_diff(sequence(answer), sequence(wrong))", NAMES))
    assert main(["check", str(spec)]) == 0
    assert main(["plan", str(spec)]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("missing", ["tokenizer.json", "weights"])
def test_model_folder_missing_files(tmp_path, stories260k_dir, missing):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(stories260k_dir, folder)
    if missing == "weights":
        (folder / "model.safetensors").unlink()
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    r = check_text(_spec(folder, "logit_diff(answer, wrong)", NAMES.splitlines()[0].replace("Jack", "she")
                         .replace("Kate", "he")), filename="f.atp")
    assert [d.code for d in r.errors] == (["E205"] if missing == "weights" else ["E206"])
    assert r.errors[0].span.line == 1
