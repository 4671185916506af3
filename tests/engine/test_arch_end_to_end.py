"""OPT, GPT-J and Phi-3 end to end on tiny random models, for every method: AtP and exact patching against the
independent plain-PyTorch reference (tests/torch_reference.py), AtP against exact patching where the metric is
linear in the node, AtP* (QK fix and GradDrop, per layer and per sublayer) and the norm fix against their
brute-force references, verification against the reference's exact patches; and what cannot apply refused by
the architecture record (test_arch_check.py checks the same refusals through `atpdsl check`).

`pytest -s` prints the measured differences.
"""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, make_plan, per_pair, tiny_folder, tm
import normfix_reference as NR
import torch_reference as R  # tests/ is on sys.path once engine_support is imported
from test_engine_parity import ARCH_NODES, assert_close, reference_atp

from atpdsl.arch import support_problems
from atpdsl.engine import execute
from atpdsl.engine.load import load_model, wrap_model
from atpdsl.engine.run import complete_plan
from atpdsl.names import parse_node
from atpdsl.plan import MethodSpec, ModelRef, Verification

NEW = ("opt", "gptj", "phi3")
PAIR = tm.TINY_PAIRS[0]
PER_POSITION = tuple(NodeGroup(k, per_position=True) for k in ("heads", "queries", "keys", "values", "neurons",
                                                                "attn", "mlp"))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def run(plan, loaded):
    """execute() with the plan's steps lowered for the loaded model (make_plan builds plans without steps)."""
    return execute(complete_plan(plan, loaded), loaded=loaded)


def _star(mode: str = "layer", qk: bool = True, gd: bool = True, norm: bool = False) -> MethodSpec:
    return MethodSpec("atp*", qk_fix=qk, graddrop=gd, graddrop_mode=mode, norm_fix=norm)


@pytest.mark.parametrize("name", NEW)
def test_atp_and_exact_equal_the_reference(name, tmp_path_factory):
    """Loaded from a saved folder as a user's run would: every node kind, summed and per position, AtP vs the hooks
    reference; then exact patching of one node of every kind on a left-padded batch (13 + 12 tokens)."""
    folder = tiny_folder(name, str(tmp_path_factory.getbasetemp()))
    model, tok = R.load_model(folder)
    loaded = load_model(ModelRef(str(folder)))
    pairs = tm.TINY_PAIRS[1:]
    ours = per_pair(run(make_plan(folder, pairs, ARCH_NODES, batch=2, write_per_pair=True), loaded))
    grouped = name == "phi3"
    assert ("L0.G1.k" in ours) == grouped and "L1.H3@11" in ours
    worst = assert_close(ours, reference_atp(model, tok, pairs, ours), 2e-5)
    biggest = max(abs(x) for v in ours.values() for x in v)
    exact_nodes = tuple(NodeGroup(k, (l, l), u) for k, l, u in [
        ("heads", 1, (0,)), ("queries", 0, (1,)), ("keys", 1, (1,)), ("values", 0, (0,)), ("neurons", 0, (3,)),
        ("neurons", 1, (10,)), ("attn", 1, None), ("mlp", 0, None), ("resid", 0, None)])
    ex = per_pair(run(make_plan(folder, tm.TINY_PAIRS, exact_nodes, method="exact", batch=2, write_per_pair=True),
                      loaded))
    ids = [parse_node(n) for n in ex if not n.endswith("resid")]
    per = [R.exact_patches(model, tok, p, R.logit_diff(tok), ids) for p in tm.TINY_PAIRS]
    ref = {n.name: [per[i][j] for i in range(len(tm.TINY_PAIRS))] for j, n in enumerate(ids)}
    worst_exact = assert_close({k: ex[k] for k in ref}, ref, 2e-5)
    # patching a whole layer output everywhere reproduces the corrupt run on equal-length pairs
    resid = run(make_plan(folder, pairs, (NodeGroup("resid", (1, 1)),), method="exact", batch=2), loaded)
    assert resid.nodes[0].estimate == pytest.approx(resid.corrupt_metric - resid.clean_metric, abs=1e-5)
    assert max(abs(x) for v in ref.values() for x in v) > 1e-2
    print(f"{name}: AtP max diff {worst:.1e} (largest {biggest:.2f}), exact max diff {worst_exact:.1e}")


def _linear(name: str):
    """The model with its final norm replaced by the identity: logits are linear in the last layer's writes."""
    model = tm.BUILDERS[name](n_layer=2)
    if name == "opt":
        model.model.decoder.final_layer_norm = torch.nn.Identity()
    elif name == "gptj":
        model.transformer.ln_f = torch.nn.Identity()
    else:
        model.model.norm = torch.nn.Identity()
    return model


LINEAR = {  # nodes whose every path to the logits is linear (GPT-J: parallel blocks, so attention's too)
    "opt": (NodeGroup("neurons", (1, 1)), NodeGroup("mlp", (1, 1)), NodeGroup("resid", (1, 1)),
            NodeGroup("neurons", (1, 1), (3, 40), True)),
    "gptj": (NodeGroup("heads", (1, 1)), NodeGroup("values", (1, 1)), NodeGroup("neurons", (1, 1)),
             NodeGroup("attn", (1, 1)), NodeGroup("mlp", (1, 1)), NodeGroup("resid", (1, 1)),
             NodeGroup("heads", (1, 1), (0, 2), True)),
    "phi3": (NodeGroup("neurons", (1, 1)), NodeGroup("mlp", (1, 1)), NodeGroup("resid", (1, 1)),
             NodeGroup("neurons", (1, 1), (3, 40), True)),
}


@pytest.mark.parametrize("name", NEW)
def test_atp_equals_exact_where_the_metric_is_linear(name):
    loaded = wrap_model(_linear(name), tm.make_tokenizer())
    pairs = tm.TINY_PAIRS[1:]
    atp = per_pair(run(make_plan("tiny", pairs, LINEAR[name], batch=2, write_per_pair=True), loaded))
    exact = per_pair(run(make_plan("tiny", pairs, LINEAR[name], method="exact", batch=2, write_per_pair=True), loaded))
    assert set(atp) == set(exact)
    worst = max(abs(a - b) for k in atp for a, b in zip(atp[k], exact[k]))
    biggest = max(abs(x) for v in exact.values() for x in v)
    assert biggest > 0.05 and worst < 1e-5, (worst, biggest)
    print(f"{name}: {len(atp)} linear nodes, max |AtP - exact| = {worst:.1e} (largest effect {biggest:.2f})")


def _sharp(name: str, n_layer: int = 3):
    return tm.sharpen(tm.BUILDERS[name](n_layer=n_layer), 3.0)


def _reference_kind(node) -> str:
    kind = node.kind.value
    return ("group_" + kind) if kind in ("keys", "values") and node.grouped else kind


@pytest.mark.parametrize("mode", ["layer", "sublayer"])
@pytest.mark.parametrize("name", NEW)
def test_atp_star_equals_the_reference(name, mode):
    """QK fix + GradDrop through execute(): score = sum_t |estimate_t| / (n_terms - 1) (graddrop_reference, terms
    QK-fixed), estimate = the QK-fixed estimate for queries / keys (qk_fix_reference), plain AtP for the rest."""
    model, tok = _sharp(name), tm.make_tokenizer()
    mf = R.logit_diff(tok)
    _, ref_score = R.graddrop_reference(model, tok, PAIR, mf, mode=mode, qk_fix=True)
    cache = R.pair_cache(model, tok, PAIR, mf)
    fixed = [R.qk_fix_reference(cache, layer) for layer in range(3)]
    plain = R.atp_from_cache(cache)
    res = run(make_plan("tiny", [PAIR], PER_POSITION, batch=1, method_spec=_star(mode)), wrap_model(model, tok))
    assert res.method == "atp*"
    worst_score = worst_est = moved = 0.0
    for n in res.nodes:
        node, unit = n.node, n.node.index or 0
        kind = _reference_kind(node)
        worst_score = max(worst_score, abs(n.score - float(ref_score[kind][node.layer, node.position, unit])))
        if kind in ("queries", "keys", "group_keys"):
            ref = float(fixed[node.layer][kind][node.position, unit])
            moved = max(moved, abs(ref - float(plain[kind][node.layer, node.position, unit])))
        else:
            ref = float(plain[kind][node.layer, node.position, unit])
        worst_est = max(worst_est, abs(n.estimate - ref))
    assert worst_score <= 2e-6 and worst_est <= 2e-6, (worst_score, worst_est)
    assert moved > 1e-2  # the QK fix really changed some query / key estimate
    print(f"{name} per {mode}: score max diff {worst_score:.1e}, estimate max diff {worst_est:.1e}, "
          f"QK fix moved an estimate by {moved:.2f}")


def test_phi3_norm_fix_equals_the_brute_force_reference():
    """The norm fix on Phi-3 (RMSNorm, fused qkv with GQA), per-position nodes of every kind, with the QK fix."""
    model, tok = _sharp("phi3"), tm.make_tokenizer()
    nodes = tuple(NodeGroup(k, per_position=True) for k in ("heads", "queries", "keys", "values", "neurons", "attn",
                                                             "mlp", "resid"))
    res = run(make_plan("tiny", [PAIR], nodes, batch=1, method_spec=_star(gd=False, norm=True)), wrap_model(model, tok))
    ref = NR.norm_fixed(model, tok, PAIR, R.logit_diff(tok), [n.node for n in res.nodes])
    plain = run(make_plan("tiny", [PAIR], nodes, batch=1, method_spec=_star(gd=False)),
                wrap_model(model, tok)).by_name()
    worst = max(abs(n.estimate - r) for n, r in zip(res.nodes, ref))
    moved = max(abs(n.estimate - plain[n.name].estimate) for n in res.nodes)
    assert worst <= 2e-6 and moved > 1e-2, (worst, moved)
    print(f"phi3 norm fix: max diff {worst:.1e}; the fix moved estimates by up to {moved:.2f}")


@pytest.mark.parametrize("name", NEW)
def test_verification_equals_the_references_exact_patches(name):
    """`verify top 5` after AtP: each verified node's effect is the reference's exact patch, averaged over pairs."""
    model, tok = tm.BUILDERS[name](n_layer=2), tm.make_tokenizer()
    nodes = (NodeGroup("heads"), NodeGroup("neurons", (1, 1), (0, 11)), NodeGroup("mlp"))
    res = run(make_plan("tiny", tm.TINY_PAIRS, nodes, batch=2, verification=Verification(5)), wrap_model(model, tok))
    verified = [n for n in res.nodes if n.verified_effect is not None]
    assert len(verified) == 5
    per = [R.exact_patches(model, tok, p, R.logit_diff(tok), [n.node for n in verified]) for p in tm.TINY_PAIRS]
    worst = max(abs(n.verified_effect - sum(row[j] for row in per) / len(per)) for j, n in enumerate(verified))
    assert worst <= 2e-5, worst


def test_post_norm_opt_runs_atp_and_exact_and_refuses_what_needs_pre_norm():
    """OPT-350m's layout (norms after the residual add): AtP and exact patching need no block structure and equal
    the reference; GradDrop, the norm fix and edges are refused by the record for this config."""
    model, tok = tm.make_opt(n_layer=2, pre_norm=False), tm.make_tokenizer()
    loaded = wrap_model(model, tok)
    pairs = tm.TINY_PAIRS[1:]
    nodes = (NodeGroup("heads"), NodeGroup("neurons"), NodeGroup("mlp"), NodeGroup("keys"))
    ours = per_pair(run(make_plan("tiny", pairs, nodes, batch=2, write_per_pair=True), loaded))
    assert_close(ours, reference_atp(model, tok, pairs, ours), 2e-5)
    exact = per_pair(run(make_plan("tiny", pairs, nodes[-2:], method="exact", batch=2, write_per_pair=True), loaded))
    ids = [parse_node(n) for n in exact]
    per = [R.exact_patches(model, tok, p, R.logit_diff(tok), ids) for p in pairs]
    assert_close(exact, {n.name: [row[j] for row in per] for j, n in enumerate(ids)}, 2e-5)
    problems = {p.subject for p in support_problems(loaded.arch, loaded.config, "atp*",
                                                    corrections=["qk_fix", "graddrop", "norm_fix"],
                                                    features=["edges"])}
    assert problems == {"graddrop", "norm_fix", "edges"}


@pytest.mark.parametrize("name,refused", [("gptj", {"norm_fix", "edges"}), ("opt", {"norm_fix"}), ("phi3", set())])
def test_what_each_record_refuses(name, refused):
    loaded = wrap_model(tm.BUILDERS[name](n_layer=1), tm.make_tokenizer())
    got = {p.subject for p in support_problems(loaded.arch, loaded.config, "atp*",
                                               corrections=["qk_fix", "graddrop", "norm_fix"], features=["edges"])}
    assert got == refused
