"""The false-negative diagnostic through the engine: random subsets of the unverified nodes patched together.

Model: a 2-layer tiny GPT-NeoX (parallel blocks) with the final norm removed, nodes = the last layer's heads and
neurons (132), so every node's effect enters the logits linearly and subset effects are exactly additive (the
diagnostic's assumption). One neuron, L1.N13, is planted: its output weights x6 give it a mean effect of -1.444,
next largest |effect| 0.260 (L1.N115). 3 pairs, 200 subsets, inclusion 0.1, confidence 0.95.

Measured: with L1.N13 unverified the bound covers its effect for 19 of 20 seeds (the nominal 95%); with it
verified (`verify top 1`) the bound is 0.41-0.48 (seeds 0-3) against a largest remaining effect of 0.260, a
third of the planted effect, so the planted node is ruled out of the rest.
"""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, Verification, make_plan, tm, with_

from atpdsl.engine import execute
from atpdsl.engine.atpstar import diagnose
from atpdsl.engine.context import make_context
from atpdsl.engine.load import wrap_model
from atpdsl.errors import EngineError
from atpdsl.plan import Diagnosis, MethodSpec

NODES = (NodeGroup("heads", (1, 1)), NodeGroup("neurons", (1, 1)))
PLANTED = "L1.N13"


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    model = tm.make_neox(n_layer=2)
    model.gpt_neox.final_layer_norm = torch.nn.Identity()
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight[:, 13] *= 6.0
    loaded = wrap_model(model, tm.make_tokenizer())
    plan = make_plan("tiny", tm.TINY_PAIRS, NODES, batch=3)
    exact = {n.name: n.estimate for n in execute(with_(plan, method=MethodSpec("exact")), loaded=loaded).nodes}
    return loaded, plan, exact


def test_bound_covers_a_planted_unverified_node(planted):
    loaded, plan, exact = planted
    effect = abs(exact[PLANTED])
    assert effect > 5 * max(abs(v) for k, v in exact.items() if k != PLANTED)
    ctx = make_context(plan, loaded)
    everything = list(range(ctx.table.size))
    covered = sum(diagnose(ctx, everything, samples=200, confidence=0.95, inclusion=0.1, seed=seed)[0].bound >= effect
                  for seed in range(20))
    assert covered >= 17, covered  # 95% nominal; P(<= 16 of 20) = 1.6% if it holds


def test_bound_is_tight_once_the_planted_node_is_verified(planted):
    """Through execute(): `verify top 1` takes the planted node out of the tested set; RunResult.false_negatives
    carries the bound, extras["diagnosis"] the per-node summary."""
    loaded, plan, exact = planted
    run = with_(plan, method=MethodSpec("atp*", qk_fix=True, graddrop=True), verification=Verification(1),
                diagnosis=Diagnosis(samples=200, confidence=0.95, inclusion=0.1))
    res = execute(run, loaded=loaded)
    assert res.nodes[0].name == PLANTED and res.nodes[0].verified_effect == pytest.approx(exact[PLANTED], abs=1e-5)
    rest = max(abs(v) for k, v in exact.items() if k != PLANTED)
    fn = res.false_negatives
    assert fn is not None and fn.nodes_tested == len(exact) - 1 and fn.samples == 200 and fn.confidence == 0.95
    assert rest <= fn.bound <= 2.0 * rest, (fn.bound, rest)  # covers the rest, within 2x of it (measured 1.7x)
    assert fn.bound < abs(exact[PLANTED]) / 2.5
    summary = res.extras["diagnosis"]
    assert summary["untestable"] == 0 and summary["largest_subsample_estimate"]["node"] != PLANTED


def test_diagnostic_errors_are_engine_errors(planted):
    loaded, plan, _ = planted
    ctx = make_context(plan, loaded)
    with pytest.raises(EngineError, match="every node is verified"):
        diagnose(ctx, [], samples=50, confidence=0.9, inclusion=0.1, seed=0)
    with pytest.raises(EngineError, match="at least 4 samples"):
        diagnose(ctx, [0, 1], samples=2, confidence=0.9, inclusion=0.1, seed=0)


def test_subset_patching_equals_single_node_patching(planted):
    """exact.subset_effects: a one-node subset is that node's exact effect, and (the model being additive here) a
    subset's effect is the sum of its nodes' effects, with many subsets per forward."""
    from atpdsl.engine.exact import batch_refs, exact_effects, subset_effects

    loaded, plan, _ = planted
    ctx = make_context(plan, loaded)
    batch = ctx.batches[0]
    refs = batch_refs(ctx, batch, ctx.sites, plan.metric, eval_=False)
    n = ctx.table.size
    single = exact_effects(ctx, batch, list(range(n)), refs, plan.metric)  # [b, n]
    masks = torch.zeros((n + 2, n), dtype=torch.bool)
    masks[:n] = torch.eye(n, dtype=torch.bool)
    masks[n, ::3] = True
    masks[n + 1, 1::2] = True
    got = subset_effects(ctx, batch, masks, refs, plan.metric)  # [b, n + 2]
    assert float((got[:, :n] - single).abs().max()) < 1e-5
    want = torch.stack([single[:, ::3].sum(1), single[:, 1::2].sum(1)], 1)
    assert float((got[:, n:] - want).abs().max()) < 1e-4
    assert float(want.abs().max()) > 0.5
