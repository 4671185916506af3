"""GradDrop on a constructed cancellation: a node whose direct and indirect effects cancel to first order.

Construction (2-layer tiny GPT-2 in float64, TINY_PAIRS[2], whose last token differs: "she" / "he"): layer-0
neuron N82 reads the she-he embedding difference (so it fires differently at the last position) and writes
s * u, u = the unembedding direction of logit(answer) - logit(wrong). Layer-1 neuron N7 reads u with gain beta
and writes -alpha * u. The secant method sets alpha so that N82's AtP estimate, direct path plus the path
through N7, is 0. N7's GELU makes the real patch nonlinear, so exact patching still finds an effect; GradDrop's
term for layer 1 (N7's layer cut) keeps only the direct path, which is large.

Measured: alpha = -10.47; N82 plain AtP 0 (|AtP| < 1e-9, rank 264 of 264), exact -0.552 (rank 3),
AtP* score 0.874 (rank 3).
"""
from __future__ import annotations

import torch

from engine_support import NodeGroup, make_plan, tm

from atpdsl.engine import execute
from atpdsl.engine.load import wrap_model
from atpdsl.plan import MethodSpec

PAIR = tm.TINY_PAIRS[2]
NODE, J, M = "L0.N82", 82, 7
NODES = (NodeGroup("heads"), NodeGroup("neurons"))


def _loaded(alpha: float, s: float = 3.0, beta: float = 2.0):
    tok = tm.make_tokenizer()
    model = tm.make_gpt2(n_layer=2, d=32, heads=4).double()
    ids = tok([PAIR["answer"], PAIR["wrong"], "she", "he"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        u = model.lm_head.weight[ids[0][0]] - model.lm_head.weight[ids[1][0]]
        u = (u - u.mean()) / (u - u.mean()).norm()
        v = model.transformer.wte.weight[ids[2][0]] - model.transformer.wte.weight[ids[3][0]]
        v = (v - v.mean()) / (v - v.mean()).norm()
        model.transformer.h[0].mlp.c_fc.weight[:, J] = 3.0 * v  # N82 fires on she vs he
        model.transformer.h[0].mlp.c_proj.weight[J] = s * u  # ... and writes the answer direction
        model.transformer.h[1].mlp.c_fc.weight[:, M] = beta * u  # N7 reads it
        model.transformer.h[1].mlp.c_fc.bias[M] = 0.0
        model.transformer.h[1].mlp.c_proj.weight[M] = -alpha * u  # ... and writes it back, scaled
    return wrap_model(model, tok)


def _run(alpha: float, method: MethodSpec):
    return execute(make_plan("tiny", [PAIR], NODES, batch=1, method_spec=method), loaded=_loaded(alpha))


def test_graddrop_finds_a_node_whose_paths_cancel_to_first_order():
    torch.set_num_threads(1)
    atp = lambda a: _run(a, MethodSpec("atp")).by_name()[NODE].estimate  # noqa: E731
    a0, a1 = 0.0, 1.0
    f0, f1 = atp(a0), atp(a1)
    assert abs(f0) > 0.5  # without the cancelling path the node is plainly visible to AtP
    for _ in range(12):  # secant: AtP(alpha) = 0
        a0, a1, f0 = a1, a1 - f1 * (a1 - a0) / (f1 - f0), f1
        f1 = atp(a1)
        if abs(f1) < 1e-10:
            break
    plain = _run(a1, MethodSpec("atp")).by_name()[NODE]
    exact = _run(a1, MethodSpec("exact")).by_name()[NODE]
    star = _run(a1, MethodSpec("atp*", qk_fix=True, graddrop=True)).by_name()[NODE]
    n_nodes = 2 * (4 + 128)
    assert abs(plain.estimate) < 1e-9 and plain.rank > n_nodes - 20  # AtP: ~0, near the bottom
    assert abs(exact.estimate) > 0.3 and exact.rank <= 5  # the real patch matters
    assert star.score > 0.5 and star.rank <= 5  # GradDrop ranks it in the top few
    assert star.estimate == plain.estimate  # the signed estimate stays plain AtP
