"""The shipped induction-2l model: it loads offline, has the promised circuit, and these are its facts.

Never retrains: every test reads atpdsl/zoo/induction-2l/. The head-patching numbers below are the
ground truth (exact activation patching, plain PyTorch hooks) that engine tests of AtP / AtP* can
compare against; the same numbers are in induction-2l/training.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from atpdsl.zoo import zoo_path
from atpdsl.zoo.induction_data import PAIR_FILES
from atpdsl.zoo.induction_eval import (
    CopyEval, HeadEffects, encode_pairs, evaluate_copying, head_effects, qkv_effect,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
FOLDER = zoo_path("induction-2l")

# Measured on the shipped weights (torch 2.13 CPU); mean over the 32 pairs of each example file.
# metric = logit(answer) - logit(wrong) at the last position; effect = patched - clean.
EXPECTED = {
    "copy": {"clean": 15.92, "corrupt": -15.78,
             "exact": ((-0.00, -0.12), (-22.39, -9.97)),
             "atp": ((-0.01, -0.11), (-10.75, -5.96))},
    "prev": {"clean": 15.92, "corrupt": 0.69,
             "exact": ((-15.16, -0.44), (-9.67, -6.45)),
             "atp": ((-1.18, -0.27), (1.39, 1.63))},
}

# Per-position q/k/v nodes (positions count <bos> as 0; x6 sits at 6, the last position is 20):
# (corruption, layer, head, kind, position) -> (exact, plain AtP). Under `prev` the effect enters at
# the previous-token head's value at 5 and reaches layer 1 through the keys at 6, where plain AtP sees
# almost nothing (saturated attention): the QK-fix case. Under `copy` it rides the layer-1 values at 6.
EXPECTED_QKV = {
    ("prev", 0, 0, "v", 5): (-15.17, -1.18),
    ("prev", 1, 0, "k", 6): (-9.63, -0.10),
    ("prev", 1, 1, "k", 6): (-6.38, 0.06),
    ("prev", 1, 0, "q", 20): (0.00, 0.00),
    ("copy", 1, 0, "v", 6): (-22.39, -10.75),
    ("copy", 1, 1, "v", 6): (-9.98, -5.96),
    ("copy", 1, 0, "k", 6): (0.01, 0.00),
}


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(one_thread):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FOLDER).eval()  # no attn_implementation: config says eager


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def copying(model) -> CopyEval:
    return evaluate_copying(model)


@pytest.fixture(scope="module")
def batches(tokenizer) -> dict[str, tuple[torch.Tensor, ...]]:
    out = {}
    for corruption, name in PAIR_FILES.items():
        records = [json.loads(line) for line in (DATA / name).read_text().splitlines()]
        out[corruption] = encode_pairs(tokenizer, records)
    return out


@pytest.fixture(scope="module")
def effects(model, batches) -> dict[str, HeadEffects]:
    return {corruption: head_effects(model, *batch) for corruption, batch in batches.items()}


def test_folder_loads_offline_with_eager_attention(model, tokenizer):
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config._attn_implementation == "eager"
    assert model.config.num_hidden_layers == 2 and model.config.num_attention_heads == 2
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    config = json.loads((FOLDER / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_tokenizer_prepends_bos_and_keeps_answers_single_tokens(tokenizer):
    assert tokenizer("t5 t17 t63")["input_ids"] == [2, 8, 20, 66]
    assert tokenizer("t5", add_special_tokens=False)["input_ids"] == [8]
    assert tokenizer(" t5", add_special_tokens=False)["input_ids"] == [8]
    assert tokenizer("t5 oops")["input_ids"] == [2, 8, 1]            # unknown word -> <unk>
    assert tokenizer.decode([2, 8, 20], skip_special_tokens=True) == "t5 t17"
    assert tokenizer.bos_token_id == 2 and tokenizer.pad_token_id == 0


def test_weights_are_small_and_match_the_model_card():
    weights = FOLDER / "model.safetensors"
    assert weights.stat().st_size < 1_000_000
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    card = (FOLDER / "README.md").read_text()
    assert re.search(r"sha256 `([0-9a-f]{64})`", card).group(1) == digest


def test_second_copy_is_predicted_and_first_copy_is_at_chance(copying):
    assert copying.loss_second_copy < 0.01 * copying.loss_first_copy
    assert copying.loss_second_copy < 0.005
    assert copying.loss_first_copy == pytest.approx(copying.log_vocab, abs=0.25)
    assert copying.accuracy_second_copy > 0.999


def test_layer1_heads_are_induction_heads(copying):
    assert min(copying.induction[1]) > 0.9                  # both: 0.977, 0.998
    assert max(copying.induction[0]) < 0.05


def test_layer0_head0_is_the_previous_token_head(copying):
    assert copying.prev_token[0][0] > 0.8                    # 0.948
    assert copying.prev_token[0][1] < 0.5                    # 0.315: diffuse
    assert max(copying.prev_token[1]) < 0.1


def test_all_circuit_checks_pass(copying):
    failed = {name: measured for name, (ok, measured) in copying.checks().items() if not ok}
    assert not failed


def test_recorded_head_patching_numbers(effects):
    for corruption, want in EXPECTED.items():
        got = effects[corruption]
        assert got.clean_metric == pytest.approx(want["clean"], abs=0.05), corruption
        assert got.corrupt_metric == pytest.approx(want["corrupt"], abs=0.05), corruption
        for field in ("exact", "atp"):
            for layer in range(2):
                assert getattr(got, field)[layer] == pytest.approx(want[field][layer], abs=0.05), (corruption, field)


def test_copy_corruption_acts_through_both_induction_heads(effects):
    e = effects["copy"]
    assert e.clean_metric > 10 and e.corrupt_metric < -10
    assert e.exact[1][0] < -5 and e.exact[1][1] < -5          # -22.4, -10.0
    assert max(abs(x) for x in e.exact[0]) < 0.5              # layer 0 is bypassed
    # plain AtP ranks them right and has the right sign, but underestimates (about half)
    assert e.atp[1][0] < 0 and e.atp[1][1] < 0
    assert abs(e.atp[1][0]) < abs(e.exact[1][0]) and abs(e.atp[1][1]) < abs(e.exact[1][1])


def test_prev_corruption_needs_the_previous_token_head_and_fools_plain_atp(effects):
    e = effects["prev"]
    assert e.clean_metric > 10 and abs(e.corrupt_metric) < 2
    assert e.exact[0][0] < -10                                # -15.2: almost the whole effect
    assert abs(e.exact[0][0]) > 5 * abs(e.atp[0][0])          # plain AtP: -1.2 (13x too small)
    # layer-1 heads: patching hurts, yet plain AtP says it helps (saturated attention)
    for head in range(2):
        assert e.exact[1][head] < -5 and e.atp[1][head] > 0


def test_recorded_qkv_numbers_show_where_plain_atp_fails(model, batches):
    for (corruption, layer, head, kind, position), want in EXPECTED_QKV.items():
        got = qkv_effect(model, *batches[corruption], layer=layer, head=head, kind=kind, position=position)
        assert got == pytest.approx(want, abs=0.05), (corruption, layer, head, kind, position)
    for head in range(2):
        exact, atp = EXPECTED_QKV[("prev", 1, head, "k", 6)]
        assert abs(exact) > 20 * abs(atp)


def test_patching_one_head_equals_patching_its_value_when_the_pattern_is_unchanged(model, batches, effects):
    # Under `copy` the layer-1 attention pattern barely moves, so patching L1.H0's output everywhere and
    # patching its value at the corrupted position alone must agree: two hook sites, one answer.
    exact_value, _ = qkv_effect(model, *batches["copy"], layer=1, head=0, kind="v", position=6)
    assert exact_value == pytest.approx(effects["copy"].exact[1][0], abs=0.1)


def test_training_record_matches_measurement(copying, effects):
    record = json.loads((FOLDER / "training.json").read_text())
    assert record["eval"]["prev_token"][0][0] == pytest.approx(copying.prev_token[0][0], abs=1e-4)
    for corruption, e in effects.items():
        saved = record["head_patching"][corruption]
        for field in ("exact", "atp"):
            flat_saved = [x for row in saved[field] for x in row]
            flat_now = [x for row in getattr(e, field) for x in row]
            assert flat_saved == pytest.approx(flat_now, abs=1e-3), (corruption, field)
