"""NaN or infinity stops the run with the pair, the run and the first site where it appears."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine_support import STORIES, NodeGroup, make_plan, stories_pairs, tm

from atpdsl.engine import execute
from atpdsl.engine.load import load_model, wrap_model
from atpdsl.errors import EngineError
from atpdsl.plan import ModelRef


def _poison(module: torch.nn.Module, row: int = 1):
    """A forward hook that writes NaN into one pair's output at its last position (a real token)."""

    def hook(mod, args, out):
        if out.shape[0] > row:
            out = out.clone()
            out[row, -1, 0] = float("nan")
        return out

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("method", ["atp", "exact"])
def test_nan_in_an_activation_names_the_pair_the_run_and_the_site(method):
    model, tok = tm.make_llama(), tm.make_tokenizer()
    loaded = wrap_model(model, tok)
    plan = make_plan("tiny", tm.TINY_PAIRS[:3], (NodeGroup("heads"), NodeGroup("mlp")), method=method, batch=3)
    handle = _poison(model.model.layers[1].mlp.up_proj)  # read first at the MLP node (down_proj's output)
    try:
        with pytest.raises(EngineError) as err:
            execute(plan, loaded=loaded)
    finally:
        handle.remove()
    text = str(err.value)
    assert "pairs.jsonl:2" in text and "corrupt run" in text and "model.layers.1.mlp.down_proj.output" in text, text


def test_clean_nan_only_in_the_clean_run_is_reported_for_the_clean_run():
    model, tok = tm.make_llama(), tm.make_tokenizer()
    loaded = wrap_model(model, tok)
    plan = make_plan("tiny", tm.TINY_PAIRS[:2], (NodeGroup("heads"),), batch=2)
    calls = {"n": 0}

    def hook(mod, args, out):  # the corrupt run is the first forward, the clean run the second
        calls["n"] += 1
        if calls["n"] == 2:
            out = out.clone()
            out[0, -1, :] = float("inf")
        return out

    handle = model.model.layers[0].self_attn.o_proj.register_forward_hook(hook)
    try:
        with pytest.raises(EngineError, match=r"pairs\.jsonl:1: the clean run has a NaN or infinity first at "
                                              r"model\.layers\.0\.post_attention_layernorm\.input"):
            execute(plan, loaded=loaded)
    finally:
        handle.remove()


@pytest.mark.needs("stories260K")
def test_float64_with_left_padding_stops_with_the_cause_instead_of_nan_scores():
    plan = make_plan(STORIES, stories_pairs(8), (NodeGroup("heads"),), batch=8)
    plan = replace(plan, model=ModelRef(str(STORIES), dtype="float64"))
    with pytest.raises(EngineError, match=r"float64 .* padding .*`batch 1`"):
        execute(plan, loaded=load_model(plan.model))
    one = execute(replace(plan, pairs=plan.pairs[:2], batch=1), loaded=load_model(plan.model))  # no padding: fine
    assert all(n.estimate == n.estimate for n in one.nodes) and one.clean_metric > 0


def test_corrupt_prompts_that_change_nothing_are_refused_with_the_numbers():
    """Clean and corrupt the same prompt: every effect would be 0, so the run stops instead of ranking zeros."""
    model, tok = tm.make_llama(), tm.make_tokenizer()
    same = [dict(p, corrupt=p["clean"]) for p in tm.TINY_PAIRS[:3]]
    plan = make_plan("tiny", same, (NodeGroup("heads"),), batch=2)
    with pytest.raises(EngineError, match=r"do not change the metric: over 3 pair\(s\) the largest \|clean - corrupt\| "
                                          r"is 0 .*answers differ"):
        execute(plan, loaded=wrap_model(model, tok))
    fine = execute(make_plan("tiny", tm.TINY_PAIRS[:3], (NodeGroup("heads"),), batch=2), loaded=wrap_model(model, tok))
    assert fine.clean_metric != fine.corrupt_metric
