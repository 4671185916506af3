"""Closed forms: where the metric is exactly linear in a node, AtP equals exact patching; AtP is additive over
heads; patching a whole residual stream reproduces the corrupt run.

Linear construction: the final norm is replaced by the identity and the metric is a logit difference, so
logits are linear in everything written into the last layer's residual stream. In GPT-NeoX with parallel
blocks both the attention write (heads, values, attn) and the MLP write (neurons, mlp) of the last layer reach the
logits only through linear maps; in Llama (sequential) only the last MLP's nodes and the last residual do.
"""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, make_plan, per_pair, stories_pairs, tm, STORIES

from atpdsl.engine import execute
from atpdsl.engine.load import wrap_model


def _linear_model(name: str):
    model = tm.make_neox(n_layer=2) if name == "neox" else tm.make_llama(n_layer=2)
    if name == "neox":
        model.gpt_neox.final_layer_norm = torch.nn.Identity()
    else:
        model.model.norm = torch.nn.Identity()
    return wrap_model(model, tm.make_tokenizer())


LINEAR_NODES = {
    "neox": (NodeGroup("heads", (1, 1)), NodeGroup("values", (1, 1)), NodeGroup("neurons", (1, 1)),
             NodeGroup("attn", (1, 1)), NodeGroup("mlp", (1, 1)), NodeGroup("resid", (1, 1)),
             NodeGroup("heads", (1, 1), (0, 2), True), NodeGroup("neurons", (1, 1), (5, 17), True)),
    "llama": (NodeGroup("neurons", (1, 1)), NodeGroup("mlp", (1, 1)), NodeGroup("resid", (1, 1)),
              NodeGroup("neurons", (1, 1), (3, 40), True)),
}


@pytest.mark.parametrize("name", ["neox", "llama"])
def test_atp_equals_exact_where_metric_is_linear(name):
    torch.set_num_threads(1)
    loaded = _linear_model(name)
    pairs = tm.TINY_PAIRS[1:]
    nodes = LINEAR_NODES[name]
    atp = per_pair(execute(make_plan("tiny", pairs, nodes, batch=2, write_per_pair=True), loaded=loaded))
    exact = per_pair(execute(make_plan("tiny", pairs, nodes, method="exact", batch=2, write_per_pair=True),
                             loaded=loaded))
    assert set(atp) == set(exact)
    worst = max(abs(a - b) for k in atp for a, b in zip(atp[k], exact[k]))
    biggest = max(abs(x) for v in exact.values() for x in v)
    assert biggest > 0.05  # the comparison is not between zeros
    assert worst < 1e-5, worst
    print(f"{name}: {len(atp)} linear nodes, max |AtP - exact| = {worst:.1e} (largest effect {biggest:.2f})")


def test_atp_is_additive_over_heads_and_resid_patch_is_the_corrupt_run():
    """AtP(L.attn) = sum over heads of AtP(L.Hh); patching L.resid everywhere gives M(corrupt) - M(clean)."""
    torch.set_num_threads(1)
    pairs = stories_pairs(6)
    nodes = (NodeGroup("heads"), NodeGroup("attn"), NodeGroup("resid"))
    res = execute(make_plan(STORIES, pairs, nodes, batch=4, write_per_pair=True))
    by = res.by_name()
    for layer in range(5):
        heads = sum(torch.tensor(by[f"L{layer}.H{h}"].per_pair, dtype=torch.float64) for h in range(8))
        attn = torch.tensor(by[f"L{layer}.attn"].per_pair, dtype=torch.float64)
        assert float((heads - attn).abs().max()) < 1e-4
    exact = execute(make_plan(STORIES, pairs, (NodeGroup("resid"),), method="exact", batch=4, write_per_pair=True))
    gap = exact.corrupt_metric - exact.clean_metric
    for node in exact.nodes:
        assert node.estimate == pytest.approx(gap, abs=1e-4), node.name
