"""Integrated gradients for edges (EAP-IG): the engine's scores equal the mean of the plain-PyTorch reference's
scores at the midpoint inputs between clean and corrupt (tests/engine/test_edges_reference.py), on parallel
GPT-NeoX and grouped-query Llama with left padding, and differ from plain EAP's."""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, make_plan, tm
from test_edges_reference import EdgeReference

from atpdsl.engine.edge_ig import ig_points
from atpdsl.engine.edge_reads import edge_matrix
from atpdsl.engine.load import wrap_model
from atpdsl.names import NodeKind, parse_node


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_ig_points_are_the_midpoint_rule():
    assert ig_points(4) == [0.125, 0.375, 0.625, 0.875]
    with pytest.raises(ValueError):
        ig_points(0)


@pytest.mark.parametrize("name", ["neox", "llama"])
def test_ig_edge_scores_equal_the_reference_averaged_over_steps(name):
    loaded = wrap_model(tm.BUILDERS[name](), tm.make_tokenizer())
    names = ["L0.H1", "L0.N5", "L0.mlp", "L1.H0", "L1.H2", "L1.N7"]
    plan = make_plan("tiny", tm.TINY_PAIRS, (NodeGroup("heads"),), batch=2)
    steps = 3
    m = edge_matrix(plan, [parse_node(n) for n in names], loaded=loaded, ig_steps=steps)
    plain = edge_matrix(plan, [parse_node(n) for n in names], loaded=loaded)
    assert m.ig_steps == steps and plain.ig_steps == 0
    worst = biggest = moved = 0.0
    for k, pair in enumerate(tm.TINY_PAIRS):
        ref = EdgeReference(loaded.hf, loaded.tokenizer, pair)
        for i, s in enumerate(m.sources):
            for j, row in enumerate(m.rows):
                if not m.linked[i, j] or (s.kind is NodeKind.EMBED and row.node.layer > 0 and k):
                    continue
                want = sum(ref.score(s.name, row.node.name, row.channel, a) for a in ig_points(steps)) / steps
                got = float(m.per_pair[k, i, j])
                worst, biggest = max(worst, abs(got - want)), max(biggest, abs(want))
                moved = max(moved, abs(got - float(plain.per_pair[k, i, j])))
    assert biggest > 1e-2 and worst < 1e-5 and moved > 1e-3, (worst, biggest, moved)
