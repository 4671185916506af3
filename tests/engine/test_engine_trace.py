"""The generic trace runner: the in-trace backward path equals the fast path, GradDrop-style backward blocks
(zeroed block writes) equal the hooks reference, and `.source` sites (post-rotary q/k) read the right tensors."""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, make_plan, per_pair, stories_pairs, STORIES, tm
import torch_reference as R  # noqa: I001

from atpdsl.engine import execute, trace
from atpdsl.engine.context import make_context, merge_sites
from atpdsl.engine.load import load_model, wrap_model
from atpdsl.engine.trace import Backward, TraceSite, run_trace
from atpdsl.plan import ModelRef


def test_in_trace_backward_equals_fast_path(monkeypatch):
    torch.set_num_threads(1)
    loaded = load_model(ModelRef(str(STORIES)))
    plan = make_plan(STORIES, stories_pairs(6), (NodeGroup("heads"), NodeGroup("neurons"), NodeGroup("keys"),
                                                  NodeGroup("attn"), NodeGroup("mlp"), NodeGroup("resid")),
                     batch=4, write_per_pair=True)
    fast = per_pair(execute(plan, loaded=loaded))
    monkeypatch.setattr(trace, "FAST_BACKWARD", False)
    slow = per_pair(execute(plan, loaded=loaded))
    assert max(abs(a - b) for k in fast for a, b in zip(fast[k], slow[k])) < 1e-6


@pytest.fixture(scope="module")
def llama_pair():
    torch.set_num_threads(1)
    model = tm.make_llama(n_layer=2)
    tok = tm.make_tokenizer()
    return model, tok, tm.TINY_PAIRS[0]


def test_graddrop_blocks_equal_reference(llama_pair):
    """Backward blocks that zero a layer's block writes (GradDrop terms) give the reference's gradients."""
    model, tok, p = llama_pair
    _, ref_grads = R.graddrop_grads(model, tok, p, R.logit_diff(tok), mode="layer")
    loaded = wrap_model(model, tok)
    plan = make_plan("tiny", [p], (NodeGroup("heads"), NodeGroup("neurons"), NodeGroup("attn"), NodeGroup("mlp")),
                     batch=1)
    ctx = make_context(plan, loaded)
    batch = ctx.batches[0]
    key = {(s.layer, k): s.name for s in ctx.table.sites for k in s.kinds}
    blocks = [Backward("main", retain_graph=True)] + [
        Backward(f"drop{l}", zero=frozenset({key[(l, "attn")], key[(l, "mlp")]}), retain_graph=l < 1)
        for l in range(2)]
    out = run_trace(loaded.model, batch.clean, ctx.sites, embed=ctx.embed, metric=ctx.metric_fn(batch),
                    backwards=blocks)
    site_of = {"heads": "z", "neurons": "neuron", "attn": "attn_out", "mlp": "mlp_out"}
    worst = 0.0
    for l in range(2):
        for (layer, kind), k in key.items():
            ours = out.grads[f"drop{l}"][k][0]
            ref = ref_grads[l][(layer, site_of[kind])][0]
            worst = max(worst, float((ours - ref).abs().max()))
        assert float(out.grads[f"drop{l}"][key[(l, "attn")]].abs().max()) == 0.0  # a cut write's own grad is 0
    assert worst < 1e-5, worst
    below = float((out.grads["drop1"][key[(0, "heads")]] - out.grads["main"][key[(0, "heads")]]).abs().max())
    assert below > 1e-4  # cutting layer 1 changes layer 0's gradients (the test is not vacuous)


def test_source_sites_read_post_rotary_queries_and_keys(llama_pair):
    """Extra sites under `.source` (as the QK fix adds them) merge into forward order and give the reference's
    post-rotary q, k and their gradients."""
    model, tok, p = llama_pair
    cache = R.pair_cache(model, tok, p, R.logit_diff(tok))
    loaded = wrap_model(model, tok)
    ctx = make_context(make_plan("tiny", [p], (NodeGroup("heads"),), batch=1), loaded)
    extra = [TraceSite(f"{n}{l}", f"model.layers.{l}.self_attn", "output", ("apply_rotary_pos_emb_0",), i,
                       order=(l, 20)) for l in range(2) for i, n in enumerate("qk")]
    sites = merge_sites(ctx.sites, extra)
    assert [s.key for s in sites][:3] == ["q0", "k0", ctx.sites[0].key]
    batch = ctx.batches[0]
    out = run_trace(loaded.model, batch.clean, sites, embed=ctx.embed, metric=ctx.metric_fn(batch),
                    backwards=[Backward()])
    for l in range(2):
        for n in "qk":
            assert torch.allclose(out.acts[f"{n}{l}"], cache.clean[(l, n)], atol=1e-6)
            assert torch.allclose(out.grads["main"][f"{n}{l}"], cache.grad[(l, n)], atol=1e-6)
