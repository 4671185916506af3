"""The plain-PyTorch reference itself: eager parity, AtP = derivative of the patch, patch identities, stories260K."""
from __future__ import annotations


import pytest
import torch

import tiny_models as tm
import torch_reference as R
from engine_support import STORIES, stories_pairs

from atpdsl.names import NodeId, NodeKind, parse_node

PAIR = tm.TINY_PAIRS[0]  # prompts differ first at token 8
KIND_OF = {NodeKind.HEAD: "heads", NodeKind.NEURON: "neurons", NodeKind.QUERY: "queries", NodeKind.ATTN: "attn",
           NodeKind.MLP: "mlp"}


def _kind(node: NodeId) -> str:
    if node.kind in (NodeKind.KEY, NodeKind.VALUE):
        return ("group_" if node.grouped else "") + node.kind.value
    return KIND_OF[node.kind]


def _atp_of(res: R.PairAtP, node: NodeId) -> float:
    per = res.per_position[_kind(node)][node.layer]  # [T, U]
    col = per[:, node.index or 0]
    return float(col.sum() if node.position is None else col[node.position])


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(1)
    return tm.make_tokenizer()


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not hasattr(m, "_atp_reference")
               for m in model.modules())


@pytest.mark.parametrize("arch", sorted(tm.BUILDERS))
def test_reference_attention_reproduces_eager_and_restores_the_model(arch, tok):
    model = tm.BUILDERS[arch]()
    ids, _ = R.encode_pair(tok, PAIR)
    with torch.no_grad():
        want = model(ids).logits
    with R._installed(model) as ref, torch.no_grad():
        got = R._run(ref, ids, True)
        assert model.config._attn_implementation == R.ATTN_NAME
        rec = dict(ref.record)
    assert (got - want).abs().max() <= 1e-6
    assert model.config._attn_implementation == "eager" and _no_hooks(model)
    d = R.dims(model)
    t = ids.shape[1]
    assert rec[(0, "z")].shape == (1, t, d.n_heads * d.head_dim)
    assert rec[(0, "q")].shape == (1, d.n_heads, t, d.head_dim)
    assert rec[(0, "k")].shape == (1, d.n_kv_heads, t, d.head_dim)
    assert rec[(0, "k_rep")].shape == (1, d.n_heads, t, d.head_dim)
    assert rec[(0, "neuron")].shape == (1, t, d.n_neurons)
    assert rec[(0, "pattern")].shape == (1, d.n_heads, t, t)
    # z really is pattern @ v_rep, per head
    z = (rec[(0, "pattern")] @ rec[(0, "v_rep")]).transpose(1, 2).reshape(1, t, -1)
    assert torch.allclose(z, rec[(0, "z")], atol=1e-6)
    R.atp_scores(model, tok, [PAIR], R.logit_diff(tok), kinds=("heads",))
    assert _no_hooks(model)


NODES = ["L0.H1", "L1.N3@-1", "L1.H2.q@-1", "L1.H0.k@8", "L1.G1.k@8", "L0.H3.v", "L0.G0.v@8", "L0.attn",
         "L1.mlp@-1", "L0.N7"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_atp_is_the_derivative_of_the_interpolated_patch(arch, tok):
    """In float64, AtP equals the central difference of M(clean + alpha (corrupt - clean)) at alpha = 0."""
    model = tm.to_float64(tm.BUILDERS[arch](n_layer=2))
    mf = R.logit_diff(tok)
    res = R.atp_scores(model, tok, [PAIR], mf)[0]
    nodes = [parse_node(n) for n in NODES]
    eps = 1e-4
    up = R.exact_patches(model, tok, PAIR, mf, nodes, alpha=eps)
    down = R.exact_patches(model, tok, PAIR, mf, nodes, alpha=-eps)
    nonzero = 0
    for node, u, dn in zip(nodes, up, down):
        fd = (u - dn) / (2 * eps)
        atp = _atp_of(res, node)
        assert abs(fd - atp) <= 1e-6 + 1e-5 * abs(atp), (node.name, fd, atp)
        nonzero += abs(atp) > 1e-4
    assert nonzero >= 7


def test_patch_identities_on_gqa_llama(tok):
    model = tm.make_llama(n_layer=2)
    mf = R.logit_diff(tok)
    d = R.dims(model)
    heads = [NodeId(1, NodeKind.HEAD, h) for h in range(d.n_heads)]
    neurons = [NodeId(0, NodeKind.NEURON, n) for n in range(d.n_neurons)]
    all_heads = R.exact_patches(model, tok, PAIR, mf, heads, together=True)[0]
    attn = R.exact_patch(model, tok, PAIR, mf, parse_node("L1.attn"))
    assert abs(all_heads - attn) < 1e-5 and abs(attn) > 1e-3
    all_neurons = R.exact_patches(model, tok, PAIR, mf, neurons, together=True)[0]
    mlp = R.exact_patch(model, tok, PAIR, mf, parse_node("L0.mlp"))
    assert abs(all_neurons - mlp) < 1e-5 and abs(mlp) > 1e-3
    # a KV group = every head's view of it (heads 2g, 2g+1 under repeat_interleave)
    group = R.exact_patch(model, tok, PAIR, mf, parse_node("L0.G1.k@8"))
    both = R.exact_patches(model, tok, PAIR, mf, [parse_node("L0.H2.k@8"), parse_node("L0.H3.k@8")],
                           together=True)[0]
    one = R.exact_patch(model, tok, PAIR, mf, parse_node("L0.H2.k@8"))
    assert abs(group - both) < 1e-6 and abs(group - one) > 1e-6
    # causal: nothing before the first differing token (8) can change
    assert R.exact_patch(model, tok, PAIR, mf, parse_node("L0.H1@7")) == 0.0
    # AtP of a group = sum of its heads' views (the gradient of k is the sum over repeat_kv copies)
    atp = R.atp_scores(model, tok, [PAIR], mf, kinds=("keys", "group_keys", "values", "group_values"))[0]
    for kind in ("keys", "values"):
        per_head = atp.per_position[kind]  # [L, T, H]
        grouped = per_head.view(*per_head.shape[:2], d.n_kv_heads, -1).sum(-1)
        assert torch.allclose(grouped, atp.per_position["group_" + kind], atol=1e-6)


def test_unequal_lengths_are_rejected(tok):
    with pytest.raises(ValueError, match="different lengths"):
        R.encode_pair(tok, {"clean": "the cat sat", "corrupt": "the cat"})


@pytest.fixture(scope="module")
def stories():
    torch.set_num_threads(1)
    model, stok = R.load_model(STORIES)
    pairs = stories_pairs()
    return model, stok, pairs


def test_stories260k_head_atp_matches_exact_patching(stories):
    """Summed over the 20 pronoun pairs (measured: AtP / exact L4.H2 -67.71 / -68.09, L4.H0 -48.97 / -48.34,
    L1.H2 -11.15 / -16.41; the nnsight recipe in docs/nnsight-llama.md reports the same numbers), and per pair
    the 40 head estimates correlate with exact patching (pair 0: Pearson 0.985)."""
    model, stok, pairs = stories
    mf = R.logit_diff(stok)
    res = R.atp_scores(model, stok, pairs, mf, kinds=("heads",))
    node = parse_node("L4.H2")
    atp = sum(float(r.summed["heads"][4, 2]) for r in res)
    exact = sum(R.exact_patch(model, stok, p, mf, node) for p in pairs)
    assert abs(atp - (-67.71)) < 0.05 and abs(exact - (-68.09)) < 0.05
    assert abs(atp - exact) / abs(exact) < 0.02
    ex = torch.tensor(R.exact_patches(model, stok, pairs[0], mf,
                                      [NodeId(l, NodeKind.HEAD, h) for l in range(5) for h in range(8)]))
    est = res[0].summed["heads"].flatten()
    assert torch.corrcoef(torch.stack([est, ex]))[0, 1] > 0.97
