"""Per-target edges: each edge into a head is the sum of its parts through the head's own query, key and value,
each equal to a plain-PyTorch computation (tests/engine/test_edges_reference.py: the derivative of the metric
when u's change reaches only that input) on GPT-2, parallel GPT-NeoX and grouped-query Llama, summed nodes
with left padding and per-position nodes across positions; the rows of one block add up to the block's
gradient; q / k / v nodes split their estimate over their heads; different heads get different edges."""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, make_plan, per_pair, tm
from test_edges_reference import EdgeReference

from atpdsl.engine import execute
from atpdsl.engine.edge_reads import edge_matrix
from atpdsl.engine.edges import QKV, weighted_edges
from atpdsl.engine.load import wrap_model
from atpdsl.names import NodeKind, parse_node


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _loaded(name: str):
    builder = tm.make_neox if name == "neox_seq" else tm.BUILDERS[name]
    return wrap_model(builder(**({"parallel": False} if name == "neox_seq" else {})), tm.make_tokenizer())


def _compare(loaded, pairs, names, batch):
    """Worst |engine - reference| over every existing (source, row) of every pair, and the largest value."""
    nodes = [parse_node(n) for n in names]
    plan = make_plan("tiny", pairs, (NodeGroup("heads"),), batch=batch)
    m = edge_matrix(plan, nodes, loaded=loaded)
    worst = biggest = 0.0
    checked = 0
    for k, pair in enumerate(pairs):
        ref = EdgeReference(loaded.hf, loaded.tokenizer, pair)
        for i, s in enumerate(m.sources):
            for j, row in enumerate(m.rows):
                if not m.linked[i, j] or (row.node.position is not None and row.node.kind is not NodeKind.HEAD):
                    continue
                got = float(m.per_pair[k, i, j])
                want = ref.score(s.name, row.node.name, row.channel)
                worst, biggest, checked = max(worst, abs(got - want)), max(biggest, abs(want)), checked + 1
    return worst, biggest, checked, m


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama"])
def test_per_target_edges_equal_plain_pytorch_summed_nodes(name):
    """Three pairs in batches of two (left padding): heads' q / k / v parts, neurons, mlp, attn and logits."""
    names = ["L0.H1", "L0.H3", "L0.N5", "L0.mlp", "L0.attn", "L1.H0", "L1.H1", "L1.H2", "L1.N7", "L1.mlp"]
    worst, biggest, checked, _ = _compare(_loaded(name), tm.TINY_PAIRS, names, batch=2)
    assert checked > 60 and biggest > 1e-2 and worst < 1e-5, (worst, biggest, checked)


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama"])
def test_per_target_edges_equal_plain_pytorch_across_positions(name):
    """Per-position heads: a layer-0 head at position j reaches a layer-1 head at a later position p through
    that head's key and value as seen from query p (and its query only at p itself)."""
    names = ["L0.H1@3", "L0.H2@9", "L0.H2@11", "L0.N5@11", "L1.H0@11", "L1.H3@11", "L1.H1@9", "L0.H0"]
    worst, biggest, checked, m = _compare(_loaded(name), tm.TINY_PAIRS[1:], names, batch=2)
    assert checked > 20 and biggest > 1e-3 and worst < 1e-5, (worst, biggest, checked)
    rows = {(r.node.name, r.channel): j for j, r in enumerate(m.rows)}
    src = {s.name: i for i, s in enumerate(m.sources)}
    assert m.linked[src["L0.H1@3"], rows[("L1.H0@11", "k")]] and not m.linked[src["L0.H1@3"], rows[("L1.H0@11", "q")]]
    assert not m.linked[src["L0.H2@11"], rows[("L1.H1@9", "v")]]  # never from a later position


@pytest.mark.parametrize("name,unit", [("neox", "H"), ("llama", "G")])
def test_query_key_value_sources_and_targets_equal_plain_pytorch(name, unit):
    """A key at one position feeds each head of its group at later positions with that head's share; a query
    and a value feed their own head (a summed head: through every query); as targets, their input is their own
    projection columns."""
    names = [f"L0.{unit}1.k@8", "L0.H1.q@11", f"L1.{unit}0.v", "L0.H2@11", "L0.H3@11", "L0.H1@11", "L1.H0", "L1.H1"]
    worst, biggest, _, m = _compare(_loaded(name), tm.TINY_PAIRS[1:], names, batch=2)
    qkv = sum(1 for i, s in enumerate(m.sources) if s.kind in QKV for j in range(len(m.rows)) if m.linked[i, j])
    assert qkv >= (4 if unit == "G" else 3) and biggest > 1e-3 and worst < 1e-5, (worst, biggest, qkv)


@pytest.mark.parametrize("name", ["gpt2", "neox", "neox_seq", "llama"])
def test_rows_of_a_block_add_up_to_its_gradient_and_out_edges_to_node_atp(name):
    """Every head's three inputs of a layer add up to the attention block's input gradient and every neuron to
    the MLP's, so a node's edges into all heads, neurons and logits add up to its node AtP estimate; a q / k / v
    node's shares through its heads add up to its own estimate."""
    loaded = _loaded(name)
    g = loaded.geom
    groups = (NodeGroup("heads"), NodeGroup("neurons"), NodeGroup("attn"), NodeGroup("keys", (1, 1)),
              NodeGroup("queries", (0, 0), (1,)), NodeGroup("values", (0, 0)))
    plan = make_plan("tiny", tm.TINY_PAIRS, groups, batch=2, write_per_pair=True)
    res = execute(plan, loaded=loaded)
    pp = per_pair(res)
    m = edge_matrix(plan, [n.node for n in res.nodes], loaded=loaded)
    into = [j for j, r in enumerate(m.rows) if r.node.kind in (NodeKind.HEAD, NodeKind.NEURON, NodeKind.LOGITS)]
    worst = worst_block = 0.0
    for i, s in enumerate(m.sources[1:], start=1):
        ref = torch.tensor(pp[s.name], dtype=torch.float64)
        got = (m.per_pair[:, i, into] * m.linked[i, into]).sum(-1)
        worst = max(worst, float((got - ref).abs().max()))
        if s.kind not in QKV:
            worst_block = max(worst_block, float((m.totals()[:, i] - ref).abs().max()))
    for layer in range(g.n_layers):
        for side, kinds in ((2 * layer, (NodeKind.HEAD,)), (2 * layer + 1, (NodeKind.NEURON,))):
            cols = [j for j, r in enumerate(m.rows) if r.node.kind in kinds and r.node.layer == layer]
            for i, s in enumerate(m.sources):
                if s.kind in QKV or not m.linked[i, cols].any():
                    continue
                worst_block = max(worst_block, float((m.per_pair[:, i, cols].sum(-1) - m.blocks[:, i, side]).abs().max()))
    assert worst < 1e-5 and worst_block < 1e-5, (worst, worst_block)


def test_edges_into_different_heads_of_one_layer_differ():
    """Grouped-query Llama: from one source, the edges into the four layer-1 heads (two of them sharing a KV
    group) all differ, and so do their key parts within a group."""
    loaded = _loaded("llama")
    plan = make_plan("tiny", tm.TINY_PAIRS, (NodeGroup("heads"),), batch=3)
    nodes = [parse_node(n) for n in ("L0.N5", "L0.H2", "L1.H0", "L1.H1", "L1.H2", "L1.H3")]
    edges = weighted_edges(edge_matrix(plan, nodes, loaded=loaded))
    for source in ("embed", "L0.N5", "L0.H2"):
        whole = [e.weight for e in edges if e.source == source and e.target.startswith("L1.H") and not e.channel]
        keys = [e.weight for e in edges if e.source == source and e.target in ("L1.H0", "L1.H1") and e.channel == "k"]
        assert len(whole) == 4 and len(keys) == 2
        for vals in (whole, keys):
            gaps = [abs(a - b) for i, a in enumerate(vals) for b in vals[i + 1:]]
            assert min(gaps) > 1e-6 * max(abs(v) for v in vals), (source, vals)
    parts = {(e.source, e.target, e.channel): e.weight for e in edges}
    for t in ("L1.H0", "L1.H3"):
        assert parts[("L0.N5", t, "")] == pytest.approx(sum(parts[("L0.N5", t, c)] for c in "qkv"), abs=1e-9)
