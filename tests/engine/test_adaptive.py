"""Adaptive verification (engine/adaptive.py) on the planted additive tiny model of test_atpstar_diagnostic.py:
a node the ranking puts last is found by the diagnosis's suspects, the loop stops for the reason it reports, and
it never spends more exact patches than its budget. Ground truth: `method exact` (every node patched alone)."""
from __future__ import annotations

import json

import pytest
import torch

from engine_support import NodeGroup, make_plan, planted_neuron_model, tm, with_

from atpdsl.engine import execute
from atpdsl.engine.adaptive import STOP_REASONS, adaptive_verify
from atpdsl.engine.context import make_context
from atpdsl.errors import EngineError
from atpdsl.plan import Diagnosis, MethodSpec

PLANTED = "L1.N13"


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    loaded = planted_neuron_model()
    plan = make_plan("tiny", tm.TINY_PAIRS, (NodeGroup("heads", (1, 1)), NodeGroup("neurons", (1, 1))), batch=3)
    exact = {n.name: n.estimate for n in execute(with_(plan, method=MethodSpec("exact")), loaded=loaded).nodes}
    ctx = make_context(plan, loaded)
    names = [n.name for n in ctx.table.nodes]
    worst_first = sorted(range(len(names)), key=lambda c: abs(exact[names[c]]))  # the planted node comes last
    return ctx, names, exact, worst_first


def test_a_node_ranked_last_is_found_and_the_loop_stops_below_the_cut(planted):
    """Ranking reversed (planted node last), cut 0.5 (planted |effect| 1.444, every other < 0.27), budget 60:
    round 1 verifies 4 nodes, its diagnosis patches the suspects (the planted node among them); a later round
    bounds the rest below the cut. Measured: 4 rounds (bounds 1.11, 0.63, 0.54, 0.49), 32 exact patches."""
    ctx, names, exact, order = planted
    calls = []
    out = adaptive_verify(ctx, order, cut_fn=lambda verified: 0.5, budget=60, first=4,
                          diagnosis=Diagnosis(samples=200, confidence=0.95, inclusion=0.1), seed=0,
                          progress=lambda phase, done, total: calls.append(phase))
    found = {names[c]: float(v.mean()) for c, v in out.verified.items()}
    assert found[PLANTED] == pytest.approx(exact[PLANTED], abs=1e-5)
    assert all(found[n] == pytest.approx(exact[n], abs=1e-5) for n in found)
    assert out.stop == "bound below cut" and out.bound.bounded and out.bound.bound < 0.5
    assert out.bound.bound >= max(abs(exact[n]) for n in names if n not in found)  # and it holds
    assert out.exact_patches == len(out.verified) <= 60 and len(out.rounds) >= 2
    levels = [1 - 0.05 / 2 ** (i + 1) for i in range(len(out.rounds))]  # alpha spent over the rounds
    assert [r.confidence for r in out.rounds] == pytest.approx(levels)
    assert out.bound.confidence == 0.95 and "95% confidence" in out.bound.sentence
    assert {"verify", "diagnose", "suspects"} <= set(calls)
    record = json.loads(json.dumps(out.to_dict()))
    assert record["stop"] == out.stop and record["exact_patches"] == out.exact_patches


def test_the_budget_is_never_exceeded(planted):
    ctx, names, exact, order = planted
    out = adaptive_verify(ctx, order, cut_fn=lambda verified: 0.01, budget=6, first=4,
                          diagnosis=Diagnosis(samples=100, confidence=0.9, inclusion=0.1), seed=1)
    assert out.stop == "budget spent" and out.exact_patches == len(out.verified) <= 6
    assert out.stop in STOP_REASONS


def test_everything_verified_and_bad_settings(planted):
    ctx, names, exact, order = planted
    out = adaptive_verify(ctx, order[:5], cut_fn=lambda verified: 0.5, budget=50, first=5)
    assert out.stop == "all verified" and out.bound is None and len(out.verified) == 5
    with pytest.raises(EngineError, match="budget"):
        adaptive_verify(ctx, order, cut_fn=lambda verified: 0.5, budget=0, first=4)
