"""The zoo around induction-2l: short names, the prompt-pair generator, the example specs, the trainer.

The trainer runs a few steps only (the shipped weights are checked in test_induction_model.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from atpdsl.zoo import available, zoo_path
from atpdsl.zoo.induction_data import PAIR_FILES, make_pairs, vocab
from atpdsl.zoo.induction_data import main as data_main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
SPECS = ("induction.atp", "induction-prev.atp")


def test_zoo_lists_and_resolves_induction_2l():
    assert "induction-2l" in available()
    folder = zoo_path("induction-2l")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    with pytest.raises(KeyError):
        zoo_path("induction-3l")


def test_example_data_is_what_the_generator_writes(tmp_path):
    assert data_main(["--out", str(tmp_path)]) == 0
    for name in PAIR_FILES.values():
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


@pytest.mark.parametrize("corruption", sorted(PAIR_FILES))
def test_pairs_are_induction_pairs(corruption):
    words = set(vocab())
    records = [json.loads(line) for line in (DATA / PAIR_FILES[corruption]).read_text().splitlines()]
    assert len(records) == 32
    for r in records:
        assert list(r) == ["clean", "corrupt", "answer", "wrong"]
        clean, corrupt = r["clean"].split(), r["corrupt"].split()
        assert len(clean) == len(corrupt) == 21 and set(clean + corrupt) <= words
        assert "<bos>" not in clean                              # the tokenizer prepends it
        first = clean[:16]
        assert clean[16:] == first[:5] and len(set(first)) == 16  # A = 16 distinct tokens, then x1..x5
        assert r["answer"] == first[5] and r["wrong"] not in first
        changed = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
        assert changed == ([5] if corruption == "copy" else [4])   # x6 or x5 (list index = position - 1)
        assert corrupt[changed[0]] == r["wrong"]


def test_both_files_share_clean_prompts_and_generator_rejects_bad_settings():
    copy, prev = make_pairs("copy"), make_pairs("prev")
    assert [p.clean for p in copy] == [p.clean for p in prev]
    with pytest.raises(ValueError, match="p=1"):
        make_pairs("copy", p=1)
    with pytest.raises(ValueError, match="'swap'"):
        make_pairs("swap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n=64"):
        make_pairs("copy", n=64)


@pytest.mark.parametrize("spec", SPECS)
def test_example_specs_compile_against_the_shipped_model_and_data(spec, tmp_path):
    from atpdsl.language.compiler import compile_file

    plan = compile_file(ROOT / "examples" / spec, out_dir=str(tmp_path))
    assert plan.model.is_zoo and plan.model.source in available()
    assert len(plan.pairs) == 32 and plan.method.name == "atp*"
    assert plan.method.qk_fix and plan.method.graddrop
    assert plan.metric.kind == "logit_diff" and [a.field for a in plan.metric.args] == ["answer", "wrong"]
    corruption = "prev" if "prev" in spec else "copy"
    assert plan.pairs[0].clean == make_pairs(corruption)[0].clean
    assert plan.pairs[0].corrupt == make_pairs(corruption)[0].corrupt
    assert {e.format for e in plan.exports} >= {"csv", "json", "graphml", "dot", "html"}


def test_training_is_deterministic_and_saves_a_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atpdsl.zoo.train_induction import TrainConfig, build_tokenizer, save_model, train

    config = TrainConfig(steps=3, batch=8)
    threads = torch.get_num_threads()
    first = train(config, log=None)
    second = train(config, log=None)
    assert torch.get_num_threads() == threads                 # thread pinning is undone
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    save_model(first, build_tokenizer(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == "eager"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "eager"
    ids = AutoTokenizer.from_pretrained(tmp_path)("t1 t2 t3 t1 t2", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, first(ids).logits)


def test_training_script_reports_failed_checks_for_an_untrained_model(tmp_path, capsys):
    from atpdsl.zoo.train_induction import main

    assert main(["--out", str(tmp_path), "--steps", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  layer-1 induction head" in out and "copy-corruption pairs" in out
    assert {"model.safetensors", "README.md", "training.json", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
