"""Path patching (`verify edges`): the engine's batched path patches equal a brute force (tests/engine/
test_edges_reference.py: two clean rows, one forward per edge, u's change reaching only v's input) on GPT-2,
parallel GPT-NeoX and grouped-query Llama, for heads' single inputs and whole heads, neurons, logits, per-position
edges across positions and a query / key / value source; and the edge score is its derivative."""
from __future__ import annotations

import math

import pytest
import torch

from engine_support import NodeGroup, make_plan, tm
from test_edges_reference import EdgeReference

from atpdsl.engine.context import make_context
from atpdsl.engine.edges import TargetRow
from atpdsl.engine.load import wrap_model
from atpdsl.engine.path_patching import PathEdge, path_patch
from atpdsl.engine.run import complete_plan
from atpdsl.names import parse_node

SUMMED = [("L0.H1", "L1.H2", "k"), ("embed", "L0.H3", "v"), ("L0.N5", "L1.H0", "q"), ("L0.H2", "L1.H1", ""),
          ("embed", "L0.N3", ""), ("L0.mlp", "logits", ""), ("L0.attn", "L1.N7", ""), ("L1.H3", "logits", "")]
PLACED = [("L0.H2@9", "L1.H1@11", "k"), ("L0.H2@9", "L1.H1@11", "v"), ("L0.N5@11", "L1.H0@11", "q"),
          ("embed", "L1.H3@11", ""), ("L0.H0", "L1.H2@11", "k")]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _check(name: str, pairs, cases, batch: int):
    loaded = wrap_model(tm.BUILDERS[name](), tm.make_tokenizer())
    per_position = any("@" in s or "@" in t for s, t, _ in cases)
    groups = (NodeGroup("heads", per_position=per_position),)
    plan = complete_plan(make_plan("tiny", pairs, groups, batch=batch), loaded)
    ctx = make_context(plan, loaded)
    edges = [PathEdge(parse_node(s), TargetRow(parse_node(t), c)) for s, t, c in cases]
    got = path_patch(ctx, edges)
    worst, biggest = 0.0, 0.0
    for k, pair in enumerate(pairs):
        ref = EdgeReference(loaded.hf, loaded.tokenizer, pair)
        for j, (s, t, c) in enumerate(cases):
            want = ref.patch(s, t, c)
            assert not math.isnan(float(got[k, j])), (s, t, c)
            worst, biggest = max(worst, abs(float(got[k, j]) - want)), max(biggest, abs(want))
    return worst, biggest


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama"])
def test_path_patching_equals_brute_force_summed(name):
    worst, biggest = _check(name, tm.TINY_PAIRS, SUMMED, batch=2)
    assert biggest > 1e-2 and worst < 2e-5, (worst, biggest)


def test_path_patching_of_key_and_query_sources_equals_brute_force():
    """Grouped-query Llama: a KV group's key at one position into each head of its group (through the head's
    query at a later position) and a query into its own head."""
    cases = [("L0.G1.k@8", "L0.H2@11", "k"), ("L0.G1.k@8", "L0.H3@11", "k"), ("L1.H1.q@11", "L1.H1@11", "q"),
             ("L1.G0.v@1", "L1.H0", "v")]
    worst, biggest = _check("llama", tm.TINY_PAIRS[1:], cases, batch=2)
    assert biggest > 1e-3 and worst < 2e-5, (worst, biggest)


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama"])
def test_path_patching_equals_brute_force_across_positions(name):
    worst, biggest = _check(name, tm.TINY_PAIRS[1:], PLACED, batch=2)
    assert biggest > 1e-3 and worst < 2e-5, (worst, biggest)


@pytest.mark.parametrize("per_position", [False, True])
def test_qk_and_norm_fixed_edges_into_the_last_layer_are_exact(per_position):
    """Parallel GPT-NeoX, two layers: after a layer-1 head only the final norm reads its write, and the metric is
    linear in the logits, so with the QK fix (exact softmax) and the norm fix (exact norms) an edge into a
    layer-1 head's query, key or value, and into `logits`, equals its path patch; the plain scores do not."""
    from atpdsl.engine.edge_reads import edge_matrix
    from atpdsl.lowering import replan
    from atpdsl.plan import MethodSpec

    loaded = wrap_model(tm.make_neox(), tm.make_tokenizer())
    at = "@11" if per_position else ""
    names = ["L0.H1" + at, "L0.H2" + at, "L0.mlp" + at, "L1.H0" + at, "L1.H3" + at]
    groups = (NodeGroup("heads", per_position=per_position),)
    fixed = MethodSpec("atp*", qk_fix=True, norm_fix=True)
    plan = complete_plan(make_plan("tiny", tm.TINY_PAIRS[1:], groups, batch=2, method_spec=fixed), loaded)
    nodes = [parse_node(n) for n in names]
    m = edge_matrix(plan, nodes, loaded=loaded)
    plain = edge_matrix(replan(plan, method=MethodSpec("atp")), nodes, loaded=loaded)
    todo = [(i, j) for i, s in enumerate(m.sources) for j, r in enumerate(m.rows)
            if m.linked[i, j] and (r.node.layer == 1 or r.node.name == "logits")]
    edges = [PathEdge(m.sources[i], m.rows[j]) for i, j in todo]
    measured = path_patch(make_context(plan, loaded), edges)  # [pairs, K]
    got = torch.stack([m.per_pair[:, i, j] for i, j in todo], 1)
    first = torch.stack([plain.per_pair[:, i, j] for i, j in todo], 1)
    assert len(todo) >= 12
    assert float((got - measured).abs().max()) < 2e-5
    assert float((first - measured).abs().max()) > 1e-3  # the first-order scores miss what the fixes catch
