"""The clean backward that reduces each node site to its estimates as the gradient reaches it (atpdsl.engine.atp's
`_streamed`) gives the same numbers as the path that keeps every site's value and gradient, for every node kind,
per position and summed, padded batches, grouped-query attention and flat sites, with the edges' kept differences
unchanged; and it holds less: the peak of a run measured in a fresh process (resident memory) is below the kept
path's (tests/engine/test_memory_measured.py compares both with the memory plan)."""
from __future__ import annotations

import pytest
import torch

from engine_support import NodeGroup, first_batch, make_plan, tiny_folder, tm

import atpdsl.engine.atp as atp
from atpdsl.engine.context import make_context
from atpdsl.engine.load import load_model

ALL_KINDS = ("heads", "queries", "keys", "values", "neurons", "attn", "mlp", "resid")
SAME_LENGTH = [tm.TINY_PAIRS[1], {"clean": "the dog sat on the mat and the cat sat on the",
                                  "corrupt": "the cat sat on the mat and the dog sat on the", "answer": "park",
                                  "wrong": "mat"}]
PADDED = [dict(p) for p in tm.TINY_PAIRS] + [{"clean": "the cat sat on the mat . she", "corrupt":
                                               "the dog sat on the mat . he", "answer": "was", "wrong": "is"}]


def _batch(plan, stream: bool, monkeypatch):
    monkeypatch.setattr(atp, "streams", lambda kinds: stream)
    calls = []
    real = atp._streamed
    monkeypatch.setattr(atp, "_streamed", lambda state, work: (calls.append(1), real(state, work)))
    ctx = make_context(plan, load_model(plan.model))
    state, work = first_batch(ctx, {"corrupt_forward", "clean_backward", "edge_reads"})
    work.clean.live.clear()
    assert bool(calls) == stream
    return work


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "opt", "phi3"])
@pytest.mark.parametrize("per_position", [False, True], ids=["summed", "per_position"])
def test_streamed_estimates_equal_kept(tmp_path_factory, monkeypatch, arch, per_position):
    folder = tiny_folder(arch, str(tmp_path_factory.mktemp(arch)), n_layer=2)
    pairs = SAME_LENGTH if per_position else PADDED  # per-position nodes need one length; summed: padding
    nodes = tuple(NodeGroup(k, per_position=per_position) for k in ALL_KINDS)
    plan = make_plan(folder, pairs, nodes, batch=len(pairs))
    streamed = _batch(plan, True, monkeypatch)
    kept = _batch(plan, False, monkeypatch)
    assert torch.equal(streamed.est, kept.est)
    assert torch.equal(streamed.clean.metric, kept.clean.metric)
    edge_reads = streamed.kept["edge_reads"], kept.kept["edge_reads"]
    assert set(edge_reads[0].deltas) == set(edge_reads[1].deltas)
    for key, delta in edge_reads[0].deltas.items():
        assert torch.equal(delta, edge_reads[1].deltas[key]), key
    assert torch.equal(edge_reads[0].passes[0].H, edge_reads[1].passes[0].H)


def test_streamed_run_keeps_no_node_site(tmp_path_factory, monkeypatch):
    """Without edges to feed (GPT-J's record has none), no node site's value, difference or gradient outlives the
    backward."""
    folder = tiny_folder("gptj", str(tmp_path_factory.mktemp("gptj")), n_layer=2)
    plan = make_plan(folder, tm.TINY_PAIRS, (NodeGroup("heads"), NodeGroup("neurons")))
    ctx = make_context(plan, load_model(plan.model))
    state, work = first_batch(ctx, {"corrupt_forward", "clean_backward"})
    assert [s.kind for s in state.steps if s.scope == "batch"] == ["corrupt_forward", "clean_backward"]
    names = {s.name for s in ctx.table.sites}
    assert not names & set(work.clean.acts) and not names & set(work.clean.grads["main"])
    assert not names & set(work.corrupt.acts) and "deltas" not in work.cache
    assert work.est.abs().sum() > 0
