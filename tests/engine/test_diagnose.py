"""The diagnostic's procedure (engine/diagnose.py `bound_nodes`) on synthetic models whose every subset effect is
known in closed form: planted additive effects (coverage at the stated confidence), and the ways additivity fails
(redundant copies that saturate, a pair that cancels), where the answer must be a refusal or a bound that covers
the largest effect alone. Also: the exhaustive path, untestable nodes, progress counts, and the sentence."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from atpdsl.circuit.scores import FalseNegativeBound, Suspect
from atpdsl.engine.diagnose import Patcher, Settings, bound_nodes
from atpdsl.engine.false_negatives import magnitudes

SUBSET_TEST = {"exhaustive_up_to": 0}  # force the random-subset path even where patching each node is cheaper


def patcher(subsets, alone) -> Patcher:
    """A Patcher from closed forms: subsets(bool [k, n]) -> [k, P], alone(list) -> [P, m]."""

    def sub(masks, tick):
        tick(len(masks), len(masks))
        return subsets(np.asarray(masks, bool))

    def one(nodes, tick):
        tick(len(nodes), len(nodes))
        return alone(list(nodes))

    return Patcher(sub, one)


def additive(eff: np.ndarray) -> Patcher:
    """Exactly additive per-pair effects eff [P, n]: a subset's effect is the sum of its nodes'."""
    return patcher(lambda m: m.astype(float) @ eff.T, lambda nodes: eff[:, nodes])


def small(seed: int, n: int, pairs: int = 4) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    return rng.normal(0.0, 0.02, size=n)[None, :] + rng.normal(0.0, 0.02, size=(pairs, n))


def planted(seed: int, n: int = 300) -> np.ndarray:
    eff = small(seed, n)
    eff[:, (7 * seed) % n] += 1.5 * (1 if seed % 2 else -1)
    return eff


def redundant(seed: int, n: int = 100, copies: int = 8, e: float = 1.0) -> Patcher:
    """`copies` nodes that each change the metric by e alone and by e together (saturation): in a random subset
    each one's marginal effect is e only when no other copy is drawn."""
    eff = small(seed, n)
    eff[:, :copies] = 0.0

    def alone(nodes):
        out = eff[:, nodes].copy()
        out[:, np.asarray(nodes) < copies] += e
        return out

    return patcher(lambda m: e * m[:, :copies].any(1)[:, None] + m.astype(float) @ eff.T, alone)


def cancelling(seed: int, n: int = 100, e: float = 1.0) -> Patcher:
    """Nodes 0 and 1 change the metric by e each alone and by 0 together."""
    eff = small(seed, n)
    eff[:, :2] = 0.0

    def alone(nodes):
        out = eff[:, nodes].copy()
        out[:, np.asarray(nodes) < 2] += e
        return out

    return patcher(lambda m: e * (m[:, :2].sum(1) == 1)[:, None] + m.astype(float) @ eff.T, alone)


def test_planted_additive_coverage_over_40_seeds():
    """300 nodes, one planted at +-1.5, the rest small (sd ~0.03), 4 pairs, 200 draws at inclusion 0.1,
    confidence 0.95. With no node patched alone (suspects 0) the bound rests on the random-subset limits alone
    and must cover the largest effect in at least 35 of 40 seeds (nominal 38; P(<= 34 of 40) = 1.4% at exactly
    95%); measured 40 of 40 (Bonferroni is conservative). Additive effects pass every additivity check: no
    refusal. With the default 8 suspects the planted node is among them, measured exactly, and sets the bound."""
    covered, refused = 0, 0
    for seed in range(40):
        eff = planted(seed)
        truth = magnitudes(eff, "abs_mean")
        f = bound_nodes(300, additive(eff), Settings(samples=200, confidence=0.95, seed=seed, suspects=0))
        refused += f.status == "refused"
        covered += f.status == "bounded" and f.bound >= truth.max()
    assert refused == 0 and covered >= 35, (covered, refused)
    for seed in range(5):
        eff = planted(seed)
        truth = magnitudes(eff, "abs_mean")
        f = bound_nodes(300, additive(eff), Settings(samples=200, confidence=0.95, seed=seed))
        top = int(np.argmax(truth))
        assert f.status == "bounded" and top in f.alone
        assert f.bound >= truth.max() and f.bound < 1.5 * truth.max()
        assert f.additivity.passed and f.additivity.pairs == 28 and f.additivity.splits == 16
        np.testing.assert_allclose(f.alone[top], eff[:, top])


def test_redundant_copies_are_refused_where_subset_estimates_alone_would_miss_them():
    """8 copies of a node worth 1.0 alone, saturating together: each one's random-subset estimate is ~0.48. The
    limits of the copies without patching them alone fall short of 1.0 in most seeds (the false sentence the old
    diagnostic printed); with suspects and the pair check the run refuses in every seed, naming a pair."""
    short = 0
    for seed in range(20):
        f = bound_nodes(100, redundant(seed), Settings(samples=200, confidence=0.95, seed=seed, **SUBSET_TEST))
        assert f.status == "refused" and math.isinf(f.bound)
        assert f.additivity.pair_max == pytest.approx(1.0, abs=0.1) and "patched together" in f.reason
        short += f.limits.limits[:8].max() < 1.0
    assert short >= 10, short  # measured 19 of 20


def test_cancelling_pair_never_gets_a_false_bound():
    """Nodes worth +1.0 each alone and 0 together: over 20 seeds the run refuses or its bound covers 1.0; the
    pair check measures the cancellation exactly (|f(a + b) - f(a) - f(b)| = 2.0) when both are suspects."""
    for seed in range(20):
        f = bound_nodes(100, cancelling(seed), Settings(samples=200, confidence=0.95, seed=seed, **SUBSET_TEST))
        assert f.status == "refused" or f.bound >= 1.0, (seed, f.status, f.bound)
        if {0, 1} <= set(f.alone):
            assert f.additivity.pair_max == pytest.approx(2.0, abs=0.2) and f.status == "refused"


def test_exhaustive_when_patching_each_node_is_cheaper():
    eff = planted(3, n=50)
    f = bound_nodes(50, additive(eff), Settings(samples=200))
    assert f.status == "exhaustive" and len(f.alone) == 50 and f.rest == 0.0
    assert f.bound == pytest.approx(magnitudes(eff, "abs_mean").max(), rel=1e-12)
    f = bound_nodes(50, additive(eff), Settings(samples=200, quantity="mean_abs"))
    assert f.bound == pytest.approx(np.abs(eff).mean(0).max(), rel=1e-12)
    assert bound_nodes(0, additive(eff[:, :0]), Settings()).status == "exhaustive"
    capped = bound_nodes(50, additive(eff), Settings(samples=200, budget=10, suspects=4))  # budget < 50 nodes
    assert capped.status == "bounded" and len(capped.alone) == 4


def test_mean_abs_bounds_what_opposite_signs_cancel_in_the_mean():
    """A node at +1 in two pairs and -1 in the other two: |mean| 0, mean |.| 1. Only mean_abs must cover 1."""
    eff = small(0, 300)
    eff[:, 5] = [1.0, -1.0, 1.0, -1.0]
    f = bound_nodes(300, additive(eff), Settings(seed=0, quantity="mean_abs"))
    assert f.status == "bounded" and f.bound >= 1.0
    if 5 in f.alone:
        assert magnitudes(f.alone[5][:, None], "mean_abs")[0] == pytest.approx(1.0)


def test_untestable_nodes_are_patched_alone_or_reported():
    eff = small(1, 120)
    few = bound_nodes(120, additive(eff), Settings(samples=60, inclusion=0.05, seed=1, suspects=8, **SUBSET_TEST))
    untestable = int((~few.limits.testable).sum())
    assert untestable > 8 and few.status == "untestable" and "raise samples" in few.reason
    ok = bound_nodes(120, additive(eff), Settings(samples=60, inclusion=0.05, seed=1, suspects=untestable + 2,
                                                  **SUBSET_TEST))
    assert ok.status == "bounded" and set(np.flatnonzero(~ok.limits.testable)) <= set(ok.alone)


def test_settings_are_checked():
    eff = small(0, 10)
    for bad, match in [({"samples": 3}, "at least 4"), ({"inclusion": 1.0}, "inclusion"),
                       ({"confidence": 1.0}, "confidence"), ({"quantity": "max"}, "quantity")]:
        with pytest.raises(ValueError, match=match):
            bound_nodes(10, additive(eff), Settings(**bad))


def test_progress_counts_samples_and_nodes_not_calls():
    calls: list[tuple[str, int, int]] = []
    eff = planted(2)
    bound_nodes(300, additive(eff), Settings(samples=120, seed=2, suspects=5, splits=6),
                progress=lambda phase, done, total: calls.append((phase, done, total)))
    last = {phase: (done, total) for phase, done, total in calls}
    assert last["diagnose"] == (120, 120)
    assert last["suspects"] == (5, 5)
    assert last["additivity"][1] in (10, 12)  # the pair check (10 pairs of 5), then 6 split subsets x 2 halves


def _bound(**kw) -> FalseNegativeBound:
    base = dict(bound=15.1654, confidence=0.95, samples=200, nodes_tested=256, inclusion=0.1)
    return FalseNegativeBound(**(base | kw))


def test_sentences_say_what_was_found_and_round_bounds_up():
    exhaustive = _bound(status="exhaustive", unchanged=156, suspects=(Suspect("L0.H0.v@5", -15.1654, 15.1654),))
    assert exhaustive.bounded and "exact patching of each of the 100 unverified nodes" in exhaustive.sentence
    assert "more than 15.2" in exhaustive.sentence and "L0.H0.v@5 -15.17" in exhaustive.sentence
    assert "156 of the 256 unverified nodes have the same activation" in exhaustive.sentence
    bounded = _bound(bound=14.2101)
    assert "95% confidence" in bounded.sentence and "more than 14.3" in bounded.sentence  # never rounded down
    assert "assumes effects add up" in bounded.sentence
    refused = _bound(bound=math.inf, status="refused", reason="effects do not add up inside random subsets: ...")
    assert not refused.bounded and refused.sentence.startswith("no bound can be given: effects do not add up")
    nothing = _bound(bound=0.0, status="exhaustive", unchanged=256)
    assert "none of the 256 unverified nodes changes the metric" in nothing.sentence
    for b in (exhaustive, bounded, refused, nothing):
        number = re.search(r"more than ([0-9.e+-]+)", b.sentence)
        assert number is None or float(number.group(1)) >= b.bound
    with pytest.raises(ValueError, match="status"):
        _bound(status="maybe")


def test_bound_survives_a_json_round_trip():
    f = bound_nodes(100, redundant(0), Settings(samples=200, seed=0, **SUBSET_TEST))
    b = _bound(bound=math.inf, status="refused", reason=f.reason, additivity=f.additivity,
               suspects=(Suspect("a", 1.0, 1.0, 0.48, 0.05), Suspect("b", -0.5, 0.5)))
    doc = json.loads(json.dumps(dataclasses.asdict(b) | {"bound": None}))
    back = FalseNegativeBound(**(doc | {"bound": math.inf}))
    assert back == b and back.sentence == b.sentence
