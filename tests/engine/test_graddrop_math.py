"""GradDrop: hook vs autograd.Function cutting, the zero / plain-AtP terms, and the scoring rule."""
from __future__ import annotations


import pytest
import torch

import tiny_models as tm
import torch_reference as R

from atpdsl.engine.graddrop import (
    DropGradient,
    graddrop_score,
    n_terms,
    term_sites,
    zero_and_atp_terms,
)

ATTN_SIDE = ("heads", "queries", "keys", "values", "group_keys", "group_values", "attn")
MLP_SIDE = ("neurons", "mlp")
PAIR = tm.TINY_PAIRS[0]


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(1)
    return tm.make_tokenizer()


@pytest.fixture(scope="module")
def models():
    return {
        "llama": tm.make_llama(n_layer=3),
        "gpt2": tm.make_gpt2(n_layer=3),
        "neox": tm.make_neox(n_layer=3, parallel=True),
    }


def test_drop_gradient_is_identity_forward_and_zero_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = DropGradient.apply(x)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad((y * 3 + x).sum(), [x])
    assert torch.equal(g, torch.ones_like(x))  # only the skip path (the `+ x`) carries gradient


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("mode", ["layer", "sublayer"])
def test_hook_and_function_cutting_agree(arch, mode, models, tok):
    model = models[arch]
    mf = R.logit_diff(tok)
    _, by_hook = R.graddrop_grads(model, tok, PAIR, mf, mode, "hook")
    _, by_fn = R.graddrop_grads(model, tok, PAIR, mf, mode, "function")
    assert len(by_hook) == len(by_fn) == n_terms(3, mode)
    worst, scale = 0.0, 0.0
    for gh, gf in zip(by_hook, by_fn):
        assert gh.keys() == gf.keys()
        for key in gh:
            worst = max(worst, float((gh[key] - gf[key]).abs().max()))
            scale = max(scale, float(gh[key].abs().max()))
    assert worst <= 1e-6, worst
    assert scale > 1e-2


@pytest.mark.parametrize("arch,parallel", [("llama", False), ("gpt2", False), ("neox", True)])
@pytest.mark.parametrize("mode", ["layer", "sublayer"])
def test_zero_term_and_plain_atp_terms(arch, parallel, mode, models, tok):
    model = models[arch]
    mf = R.logit_diff(tok)
    terms, score = R.graddrop_reference(model, tok, PAIR, mf, mode=mode)
    cache = R.pair_cache(model, tok, PAIR, mf)
    plain = R.atp_from_cache(cache)
    n_layers = 3
    checked = 0
    for kind, est in terms.items():  # est [n_terms, L, T, U]
        side = "attn" if kind in ATTN_SIDE else "mlp"
        for m in range(n_layers):
            zero, same = zero_and_atp_terms(m, side, n_layers, mode, parallel)
            assert (est[zero, m] == 0).all(), (kind, m, zero)
            for j in same:
                assert torch.allclose(est[j, m], plain[kind][m], rtol=1e-5, atol=1e-7), (kind, m, j)
                checked += 1
            others = [j for j in range(est.shape[0]) if j != zero and j not in same]
            if others and kind in ("heads", "neurons") and m < n_layers - 1:
                # the rule is not vacuous: some later-layer cut changes the estimate
                assert any(not torch.allclose(est[j, m], plain[kind][m], atol=1e-6) for j in others)
    assert checked > 0
    # Nodes of the last term's block act only directly: their score is exactly |AtP|. Per sublayer with
    # sequential blocks that is the last MLP only (last-layer attention nodes also reach the logits via it).
    for kind in terms:
        if mode == "sublayer" and not parallel and kind in ATTN_SIDE:
            continue
        assert torch.allclose(score[kind][n_layers - 1], plain[kind][n_layers - 1].abs(), rtol=1e-5, atol=1e-7)


def test_parallel_fact_fails_for_sequential_blocks(models, tok):
    """Sanity: with sequential blocks, cutting layer m's MLP does change layer m's attention-side gradients."""
    mf = R.logit_diff(tok)
    terms, _ = R.graddrop_reference(models["llama"], tok, PAIR, mf, mode="sublayer", kinds=("heads",))
    plain = R.atp_from_cache(R.pair_cache(models["llama"], tok, PAIR, mf), ("heads",))
    assert not torch.allclose(terms["heads"][1, 0], plain["heads"][0], atol=1e-6)


def test_scoring_rule():
    est = torch.tensor([[1.0, -2.0], [-3.0, 0.0], [0.0, 4.0]])
    assert torch.equal(graddrop_score(est), torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="at least 2 terms"):
        graddrop_score(torch.ones(1, 3))
    assert term_sites(2, "layer") == [((0, "attn"), (0, "mlp")), ((1, "attn"), (1, "mlp"))]
    assert term_sites(2, "sublayer") == [((0, "attn"),), ((0, "mlp"),), ((1, "attn"),), ((1, "mlp"),)]
    assert n_terms(5, "sublayer") == 10
    with pytest.raises(ValueError, match="'layer' or 'sublayer'"):
        n_terms(3, "block")
    assert zero_and_atp_terms(2, "mlp", 4, "sublayer") == (5, [0, 1, 2, 3, 4])
    assert zero_and_atp_terms(2, "attn", 4, "sublayer", parallel=True) == (4, [0, 1, 2, 3, 5])


def test_score_with_reference_matches_rule(models, tok):
    """graddrop_reference's score equals graddrop_score over its per-term estimates."""
    mf = R.logit_diff(tok)
    terms, score = R.graddrop_reference(models["gpt2"], tok, PAIR, mf, mode="layer", kinds=("heads", "neurons"))
    for kind in terms:
        assert torch.allclose(score[kind], graddrop_score(terms[kind]))


def test_graddrop_with_qk_fix_uses_each_terms_pattern_gradient(models, tok):
    """AtP* per-term query / key estimates: the QK fix with G from that term; term m is 0 and terms l < m equal
    the plain QK fix (gradients above the cut are unchanged)."""
    mf = R.logit_diff(tok)
    model = models["llama"]
    terms, score = R.graddrop_reference(model, tok, PAIR, mf, mode="layer", qk_fix=True,
                                        kinds=("queries", "keys", "group_keys"))
    cache = R.pair_cache(model, tok, PAIR, mf)
    for m in range(3):
        plain_fix = R.qk_fix_reference(cache, m)
        for kind in terms:
            assert (terms[kind][m, m] == 0).all()
            for j in range(m):
                assert torch.allclose(terms[kind][j, m], plain_fix[kind].float(), rtol=1e-5, atol=1e-7)
    assert float(score["queries"].abs().max()) > 1e-3
