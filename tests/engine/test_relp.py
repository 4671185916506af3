"""Relevance Patching (atpdsl.engine.relp) against an independent explicit-forward reference
(tests/engine/relp_reference.py), and properties that could fail: relevance conservation where every rule is on
and the model has no biases, RelP = AtP where every rule is exact, unchanged forward values, a clean exit, and a
clear refusal of unsupported architectures."""
from __future__ import annotations

from dataclasses import replace

import pytest
import relp_reference as RR
import torch
import torch_reference as R
from engine_support import (
    STORIES,
    NodeGroup,
    make_plan,
    per_pair,
    stories_pairs,
    tiny_folder,
    tm,
)
from torch import nn
from transformers import AutoModelForCausalLM

from atpdsl.engine import execute
from atpdsl.engine.load import load_model, wrap_model
from atpdsl.engine.relp import ALL_RULES, PAPER_RULES, RelpRules, relp_context
from atpdsl.errors import EngineError
from atpdsl.names import NodeKind, parse_node
from atpdsl.plan import MethodSpec

KIND = {NodeKind.HEAD: "heads", NodeKind.QUERY: "queries", NodeKind.KEY: "keys", NodeKind.VALUE: "values",
        NodeKind.NEURON: "neurons", NodeKind.ATTN: "attn", NodeKind.MLP: "mlp", NodeKind.RESID: "resid"}
EVERY_NODE = (tuple(NodeGroup(k) for k in KIND.values())
              + tuple(NodeGroup(k, per_position=True) for k in KIND.values()))
RULE_SETS = {
    "paper": PAPER_RULES, "all": ALL_RULES, "LN only": RelpRules(True, False, False, False),
    "identity only": RelpRules(False, True, False, False), "half only": RelpRules(False, False, True, False),
    "none": RelpRules(False, False, False, False),
}


def ref_rules(rules: RelpRules) -> RR.Rules:
    return RR.Rules(rules.norm, rules.activation, rules.gate, rules.attention)


def worst_vs_reference(ours: dict[str, tuple[float, ...]], refs: list[RR.PairRelp]) -> float:
    """max |engine - reference| over every node and pair (positions counted from the end when negative)."""
    worst = 0.0
    for name, values in ours.items():
        node = parse_node(name)
        unit = node.index or 0
        kind = KIND[node.kind]
        for ref, value in zip(refs, values, strict=True):
            if node.position is None:
                expected = ref.summed[kind][node.layer, unit]
            else:
                pos = node.position % ref.per_position[kind].shape[1]
                expected = ref.per_position[kind][node.layer, pos, unit]
            worst = max(worst, abs(value - float(expected)))
    return worst


def tiny_mistral(root: str):
    """A tiny random Mistral (Llama layout; tiny_models has no builder for it), saved under root."""
    from pathlib import Path

    from transformers import MistralConfig, MistralForCausalLM

    folder = Path(root) / "mistral"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        cfg = MistralConfig(vocab_size=tm.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128, head_dim=8,
                            pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False,
                            initializer_range=0.2)
        tm.save_model(MistralForCausalLM(cfg).eval(), tm.make_tokenizer(), folder)
    return folder


def tiny(name: str, root: str):
    """(reference model, engine Loaded, tokenizer, folder) for a tiny architecture."""
    folder = tiny_mistral(root) if name == "mistral" else tiny_folder(name, root)
    model, _ = R.load_model(folder)
    tok = tm.make_tokenizer()  # the saved folders' tokenizers load differently per model_type in transformers 5
    return model, wrap_model(AutoModelForCausalLM.from_pretrained(folder), tok), tok, folder


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2", "neox", "neox_seq"])
def test_method_relp_equals_reference(name, tmp_path_factory):
    """`method relp` through the engine (every node kind, summed and per position, a left-padded batch of two)
    equals the explicit-forward reference with the paper's rules."""
    torch.set_num_threads(1)
    model, loaded, tok, folder = tiny(name, str(tmp_path_factory.getbasetemp()))
    pairs = tm.TINY_PAIRS[1:]
    plan = make_plan(folder, pairs, EVERY_NODE, method="relp", batch=2, write_per_pair=True)
    ours = per_pair(execute(plan, loaded=loaded))
    assert len(ours) > 100 and "L1.resid@11" in ours
    refs = [RR.relp_pair(model, tok, p, ref_rules(PAPER_RULES)) for p in pairs]
    assert worst_vs_reference(ours, refs) <= 1e-5


def hook_estimates(loaded, pair: dict, rules: RelpRules) -> dict[tuple[str, int], torch.Tensor]:
    """(kind, layer) -> [T, units] estimates from relp_context on the plain Hugging Face model: sites read with
    torch hooks at the architecture's node sites (atpdsl.arch templates), no nnsight, no engine."""
    hf, geom = loaded.hf, loaded.geom
    ids = {which: i for which, i in zip(("clean", "corrupt"), R.encode_pair(loaded.tokenizer, pair))}
    a, b = R.first_token(loaded.tokenizer, pair["answer"]), R.first_token(loaded.tokenizer, pair["wrong"])
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = [hf.get_input_embeddings().register_forward_hook(lambda m, a_, out: out.detach().requires_grad_(True))]
    for kind in KIND.values():
        t = loaded.arch.template(kind)
        for layer in range(geom.n_layers):
            module, key = hf.get_submodule(t.path(layer)), (kind, layer)
            if t.attr == "input":
                handles.append(module.register_forward_pre_hook(lambda m, args, k=key: seen.__setitem__(k, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, k=key: seen.__setitem__(k, out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            hf(input_ids=ids["corrupt"], use_cache=False)
        corrupt = {k: v.detach() for k, v in seen.items()}
        with relp_context(loaded, rules):
            logits = hf(input_ids=ids["clean"], use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    keys = list(seen)
    grads = torch.autograd.grad(logits[0, -1, a] - logits[0, -1, b], [seen[k] for k in keys], allow_unused=True)
    out = {}
    for key, g in zip(keys, grads):
        prod = (corrupt[key] - seen[key].detach()) * (torch.zeros_like(corrupt[key]) if g is None else g)
        lay = loaded.arch.template(key[0]).resolve(geom)
        out[key] = torch.stack([prod[0, :, lo:hi].sum(-1) for lo, hi in map(lay.columns, range(lay.count))], -1)
    return out


@pytest.mark.parametrize("rules", list(RULE_SETS), ids=list(RULE_SETS))
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2", "neox", "neox_seq"])
def test_relp_rules_equal_reference(name, rules, tmp_path_factory):
    """Each rule alone, the paper's three, all four and none: relp_context on the model = the reference, at every
    node of every kind and position."""
    torch.set_num_threads(1)
    model, loaded, tok, _ = tiny(name, str(tmp_path_factory.getbasetemp()))
    for pair in tm.TINY_PAIRS[1:]:
        ours = hook_estimates(loaded, pair, RULE_SETS[rules])
        ref = RR.relp_pair(model, tok, pair, ref_rules(RULE_SETS[rules]))
        assert len(ours) == len(KIND) * loaded.geom.n_layers
        worst = max(float((v.double() - ref.per_position[kind][layer]).abs().max())
                    for (kind, layer), v in ours.items())
        assert worst <= 1e-5, (pair["clean"], worst)


def test_rules_change_the_estimates(tmp_path_factory):
    """The reference comparison above is not vacuous: each rule moves the estimates away from plain AtP."""
    model, _, tok, _ = tiny("llama", str(tmp_path_factory.getbasetemp()))
    pair = tm.TINY_PAIRS[1]
    atp = RR.relp_pair(model, tok, pair, RR.Rules(False, False, False, False))
    for rules in (RR.Rules(True, False, False, False), RR.Rules(False, True, False, False),
                  RR.Rules(False, False, True, False), RR.Rules(False, False, False, True)):
        other = RR.relp_pair(model, tok, pair, rules)
        moved = max(float((other.per_position[k] - atp.per_position[k]).abs().max()) for k in atp.per_position)
        assert moved > 1e-2, rules


def test_stories_relp_equals_reference():
    """stories260K (real Llama, GQA), 4 pronoun pairs of different lengths in one padded batch: `method relp`
    through the engine, and all four rules through relp_context on the model, against the reference."""
    torch.set_num_threads(1)
    model, tok = R.load_model(STORIES)
    pairs = stories_pairs(4)
    nodes = tuple(NodeGroup(k) for k in KIND.values()) + (NodeGroup("heads", per_position=True),
                                                          NodeGroup("neurons", (0, 0), per_position=True))
    plan = make_plan(STORIES, pairs, nodes, method="relp", batch=4, write_per_pair=True)
    loaded = load_model(plan.model)
    ours = per_pair(execute(plan, loaded=loaded))
    refs = [RR.relp_pair(model, tok, p, ref_rules(PAPER_RULES)) for p in pairs]
    assert max(abs(v) for vals in ours.values() for v in vals) > 1.0
    assert worst_vs_reference(ours, refs) <= 2e-5  # |estimates| up to ~6.6: float32 rounding
    for pair in pairs[:2]:
        hooks = hook_estimates(loaded, pair, ALL_RULES)
        ref = RR.relp_pair(model, tok, pair, ref_rules(ALL_RULES))
        worst = max(float((v.double() - ref.per_position[k][layer]).abs().max()) for (k, layer), v in hooks.items())
        assert worst <= 2e-5


def relevance_per_cut(loaded, pair: dict, rules: RelpRules) -> tuple[float, list[float]]:
    """(metric, [sum of activation * coefficient over the embeddings and every layer's residual output])."""
    hf, tok = loaded.hf, loaded.tokenizer
    ids, _ = R.encode_pair(tok, pair)
    a, b = R.first_token(tok, pair["answer"]), R.first_token(tok, pair["wrong"])
    cuts: list[torch.Tensor] = []

    def start(module, args, out):  # parameters are frozen: the graph starts at the embeddings
        leaf = out.detach().requires_grad_(True)
        cuts.append(leaf)
        return leaf

    def layer_out(module, args, out):
        cuts.append(out[0] if isinstance(out, tuple) else out)

    handles = [hf.get_input_embeddings().register_forward_hook(start)]
    handles += [layer.register_forward_hook(layer_out) for layer in hf.model.layers]
    try:
        with relp_context(loaded, rules):
            logits = hf(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    metric = logits[0, -1, a] - logits[0, -1, b]
    grads = torch.autograd.grad(metric, cuts)
    return float(metric.detach()), [float((x.detach() * g).sum()) for x, g in zip(cuts, grads)]


@pytest.mark.parametrize("source", ["tiny-llama", "stories260K"])
def test_relevance_is_conserved_with_every_rule(source, tmp_path_factory):
    """With all four rules a bias-free Llama is, coefficients frozen, homogeneous of degree one in any residual
    cut (the half rule turns the degree-two product back into degree one), so the relevance sum(x * c) over the
    embeddings and over every layer's output equals the metric (logit difference: no bias in lm_head)."""
    torch.set_num_threads(1)
    if source == "stories260K":
        loaded, pair = load_model(make_plan(STORIES, stories_pairs(1), ()).model), stories_pairs(1)[0]
    else:
        loaded, pair = tiny("llama", str(tmp_path_factory.getbasetemp()))[1], tm.TINY_PAIRS[0]
    metric, sums = relevance_per_cut(loaded, pair, ALL_RULES)
    assert len(sums) == loaded.geom.n_layers + 1
    assert abs(metric) > 0.1
    for s in sums:
        assert s == pytest.approx(metric, rel=1e-4, abs=1e-4)
    # Without the AH-rule the softmax is not homogeneous and conservation fails at the embeddings.
    metric2, sums2 = relevance_per_cut(loaded, pair, PAPER_RULES)
    assert metric2 == pytest.approx(metric, abs=1e-6)
    assert abs(sums2[0] - metric) > 1e-2


def exact_rules_gpt2() -> nn.Module:
    """A tiny GPT-2 on which every rule is exact: linear activation, identity norms."""
    model = tm.make_gpt2()
    model.config.activation_function = "linear"
    from transformers.activations import ACT2FN

    for block in model.transformer.h:
        block.mlp.act = ACT2FN["linear"]
        block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
    model.transformer.ln_f = nn.Identity()
    return model


def test_relp_equals_atp_where_every_rule_is_exact():
    """No norms and a linear MLP: the identity rule's ratio is the derivative, so RelP (paper rules) = AtP for
    every node; with the real GELU back in the same model the neurons' estimates differ."""
    torch.set_num_threads(1)
    loaded = wrap_model(exact_rules_gpt2(), tm.make_tokenizer())
    plan = make_plan("tiny-gpt2", tm.TINY_PAIRS[1:], EVERY_NODE, batch=2, write_per_pair=True)
    atp = per_pair(execute(plan, loaded=loaded))
    relp = per_pair(execute(replace(plan, method=MethodSpec("relp")), loaded=loaded))
    assert max(abs(a - b) for k in atp for a, b in zip(atp[k], relp[k])) <= 1e-6
    assert max(abs(v) for vals in atp.values() for v in vals) > 0.1
    from transformers.activations import ACT2FN

    for block in loaded.hf.transformer.h:
        block.mlp.act = ACT2FN["gelu_new"]
    loaded = wrap_model(loaded.hf, tm.make_tokenizer())
    atp = per_pair(execute(plan, loaded=loaded))
    relp = per_pair(execute(replace(plan, method=MethodSpec("relp")), loaded=loaded))
    assert max(abs(a - b) for k in atp for a, b in zip(atp[k], relp[k])) > 1e-2


@pytest.mark.parametrize("name", ["llama", "gpt2", "neox"])
def test_values_unchanged_and_model_restored(name, tmp_path_factory):
    """Inside the context the logits are bit-identical (grad on); afterwards AtP is exactly what it was."""
    torch.set_num_threads(1)
    _, loaded, tok, folder = tiny(name, str(tmp_path_factory.getbasetemp()))
    ids, _ = R.encode_pair(tok, tm.TINY_PAIRS[0])
    emb = loaded.hf.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    try:
        before = loaded.hf(input_ids=ids).logits
        with relp_context(loaded, ALL_RULES):
            inside = loaded.hf(input_ids=ids).logits
            assert loaded.hf.config._attn_implementation != "eager"
            assert inside.requires_grad
    finally:
        handle.remove()
    assert torch.equal(before, inside)
    assert loaded.hf.config._attn_implementation == "eager"
    plan = make_plan(folder, tm.TINY_PAIRS[1:], (NodeGroup("heads"), NodeGroup("neurons")), write_per_pair=True)
    first = per_pair(execute(plan, loaded=loaded))
    execute(replace(plan, method=MethodSpec("relp")), loaded=loaded)
    assert per_pair(execute(plan, loaded=loaded)) == first


def test_unsupported_architecture_is_refused(tmp_path_factory):
    loaded = wrap_model(tm.make_gemma(), tm.make_tokenizer())
    with pytest.raises(EngineError, match="not implemented for Gemma"), relp_context(loaded):
        pass
    assert not loaded.hf.model.layers[0].input_layernorm._forward_hooks


def test_rules_act_only_inside_a_whole_model_forward(tmp_path_factory):
    """A norm called on its own inside the context keeps its plain backward (edge computations rely on it); the
    same norm inside a model forward gets the LN-rule."""
    _, loaded, _, _ = tiny("llama", str(tmp_path_factory.getbasetemp()))
    norm = loaded.hf.model.norm
    x = torch.randn(1, 3, loaded.geom.hidden, requires_grad=True)
    (plain,) = torch.autograd.grad(norm(x).sum(), x)
    with relp_context(loaded, PAPER_RULES):
        (alone,) = torch.autograd.grad(norm(x).sum(), x)
    assert torch.equal(plain, alone)
    rstd = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert not torch.allclose(plain, norm.weight.detach() * rstd, atol=1e-4)  # the LN-rule would give this
