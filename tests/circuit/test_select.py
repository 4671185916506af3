"""Selection rules on hand-built runs: top K, threshold X, cumulative F, and dropping refuted nodes."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic_circuits import ranked_result, score, verified

from atpdsl.errors import AtpError
from atpdsl.circuit.graph import build_graph
from atpdsl.names import parse_node
from atpdsl.plan import Selection
from atpdsl.circuit.scores import NodeScore
from atpdsl.circuit.select import DEFAULT_SELECTION, select


def run_of(values: dict[str, float]):
    """A run whose nodes have the given signed single-pair estimates (score = |estimate|)."""
    return ranked_result([score(name, (v,)) for name, v in values.items()])


FOUR = {"L0.H0": 0.5, "L0.H1": -0.3, "L1.H0": 0.1, "L1.N3": -0.1}


def test_top_k_takes_the_k_largest_magnitudes_in_order():
    out = select(run_of(FOUR), Selection("top", 2))
    assert out.selected == ("L0.H0", "L0.H1")
    assert out.cut == pytest.approx(0.3)
    assert out.rule == "top 2"


def test_top_k_breaks_ties_by_name_and_caps_at_the_node_count():
    out = select(run_of(FOUR), Selection("top", 3))
    assert out.selected == ("L0.H0", "L0.H1", "L1.H0")  # L1.H0 and L1.N3 tie at 0.1: name order
    assert select(run_of(FOUR), Selection("top", 10)).selected == ("L0.H0", "L0.H1", "L1.H0", "L1.N3")
    assert select(run_of(FOUR), Selection("top", 0)).selected == ()


def test_threshold_keeps_magnitudes_at_or_above_x_including_negative_scores():
    out = select(run_of(FOUR), Selection("threshold", 0.3))
    assert out.selected == ("L0.H0", "L0.H1")
    assert out.cut == 0.3
    neg = ranked_result([NodeScore(parse_node("L0.H0"), -0.4, -0.4, "atp"), NodeScore(parse_node("L0.H1"), 0.1, 0.1, "atp")])
    assert select(neg, Selection("threshold", 0.2)).selected == ("L0.H0",)


def test_cumulative_takes_the_smallest_prefix_covering_f():
    run = run_of(FOUR)  # |scores| 0.5 0.3 0.1 0.1, total 1.0
    assert select(run, Selection("cumulative", 0.5)).selected == ("L0.H0",)
    assert select(run, Selection("cumulative", 0.8)).selected == ("L0.H0", "L0.H1")
    assert select(run, Selection("cumulative", 0.81)).selected == ("L0.H0", "L0.H1", "L1.H0")
    assert len(select(run, Selection("cumulative", 1.0)).selected) == 4


def test_cumulative_of_all_zero_scores_selects_nothing():
    assert select(run_of({"L0.H0": 0.0, "L0.H1": 0.0}), Selection("cumulative", 0.9)).selected == ()


@pytest.mark.parametrize(
    "rule, message",
    [
        (Selection("top", -1), "select top -1: K must be a whole number >= 0"),
        (Selection("top", 2.5), "select top 2.5: K must be a whole number >= 0"),
        (Selection("cumulative", 0.0), "select cumulative 0: F must be in (0, 1]"),
        (Selection("cumulative", 1.5), "select cumulative 1.5: F must be in (0, 1]"),
        (Selection("threshold", -0.1), "select threshold -0.1: X must be >= 0"),
        (Selection("best", 3), "unknown selection rule 'best' (expected top, threshold or cumulative)"),
    ],
)
def test_bad_rules_raise_atp_errors_naming_the_value(rule, message):
    with pytest.raises(AtpError) as info:
        select(run_of(FOUR), rule)
    assert str(info.value) == message


def test_no_rule_means_top_20():
    run = run_of({f"L0.N{i}": 1.0 + i for i in range(30)})
    assert DEFAULT_SELECTION == Selection("top", 20)
    assert len(select(run, None).selected) == 20


def test_verified_nodes_below_the_threshold_are_dropped_and_the_graph_says_so():
    scores = verified(
        [score("L0.H0", (0.5, 0.5)), score("L0.H1", (0.4, 0.4)), score("L1.H0", (0.3, 0.3)), score("L1.H1", (0.1, 0.1))],
        {"L0.H0": (0.05, -0.05), "L0.H1": (0.35, 0.25)},
    )
    run = ranked_result(scores)
    out = select(run, Selection("threshold", 0.2))
    assert out.selected == ("L0.H1", "L1.H0")  # L1.H0 was not verified: kept on its estimate
    assert [(d.node, d.verified, d.cut) for d in out.dropped] == [("L0.H0", pytest.approx(0.05), 0.2)]
    G = build_graph(run, out)
    assert "L0.H0" not in G
    assert G.graph["dropped_verified"] == "L0.H0"


def test_top_k_cut_is_the_kth_estimate_and_verification_is_measured_against_it():
    scores = verified(
        [score("L0.H0", (0.9,)), score("L0.H1", (0.6,)), score("L0.H2", (0.5,)), score("L0.H3", (0.05,))],
        {"L0.H0": (0.7,), "L0.H1": (0.4,)},  # L0.H1 measured 0.4 < cut 0.5: refuted
    )
    out = select(ranked_result(scores), Selection("top", 3))
    assert out.cut == 0.5
    assert out.selected == ("L0.H0", "L0.H2")
    assert [d.node for d in out.dropped] == ["L0.H1"]


def test_measured_magnitude_matches_the_aggregate():
    # per-pair effects +0.3 and -0.3: mean |effect| 0.3, but |mean effect| 0
    scores = verified([score("L0.H0", (0.3, -0.3))], {"L0.H0": (0.3, -0.3)})
    run = ranked_result(scores)
    assert select(run, Selection("threshold", 0.25), aggregate="mean_abs").selected == ("L0.H0",)
    assert select(run, Selection("threshold", 0.25), aggregate="abs_mean").selected == ()


# Subnormal magnitudes are excluded: f * total underflows to 0 there and "covers" loses its meaning.
magnitudes = st.lists(st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_subnormal=False), min_size=1,
                      max_size=12)


@settings(max_examples=60, deadline=None)
@given(magnitudes, st.floats(min_value=0.01, max_value=1.0))
def test_cumulative_is_the_minimal_covering_prefix(values, f):
    run = run_of({f"L0.N{i}": v for i, v in enumerate(values)})
    chosen = select(run, Selection("cumulative", f)).selected
    mags = {f"L0.N{i}": v for i, v in enumerate(values)}
    total = sum(values)
    covered = sum(mags[n] for n in chosen)
    if total == 0:
        assert chosen == ()
        return
    assert covered >= f * total * (1 - 1e-9)
    assert sum(mags[n] for n in chosen[:-1]) < f * total * (1 + 1e-9)
    assert all(mags[n] >= max((mags[m] for m in mags if m not in chosen), default=-1) for n in chosen)


@settings(max_examples=60, deadline=None)
@given(magnitudes, st.floats(min_value=0.0, max_value=10.0), st.integers(min_value=0, max_value=15))
def test_threshold_and_top_partition_the_nodes(values, x, k):
    mags = {f"L0.N{i}": v for i, v in enumerate(values)}
    run = run_of(mags)
    above = set(select(run, Selection("threshold", x)).selected)
    assert above == {n for n, v in mags.items() if v >= x}
    top = select(run, Selection("top", k)).selected
    assert len(top) == min(k, len(values))
    rest = [v for n, v in mags.items() if n not in top]
    assert all(mags[n] >= max(rest, default=-math.inf) for n in top)


def aggregated(name: str, est: tuple[float, ...], measured: tuple[float, ...] | None, aggregate: str) -> NodeScore:
    """A node scored as the engine scores it under `aggregate`: mean |est| per pair, or |mean est|."""
    n = len(est)
    score_value = abs(sum(est) / n) if aggregate == "abs_mean" else sum(abs(v) for v in est) / n
    node = NodeScore(parse_node(name), sum(est) / n, score_value, "atp", per_pair=est,
                     per_pair_score=tuple(abs(v) for v in est))
    return node if measured is None else node.with_verification(sum(measured) / len(measured), measured)


HAND = {  # name: (per-pair estimates, per-pair exact effects or None)
    "L0.H0": ((0.6, 0.4), (0.5, -0.5)),    # mean |effect| 0.5, |mean effect| 0
    "L0.H1": ((0.3, 0.3), (0.35, 0.25)),   # 0.3 either way
    "L1.H0": ((0.2, -0.2), None),          # score 0.2 (mean |.|) or 0 (|mean|)
    "L1.H1": ((0.25, 0.25), (0.1, -0.1)),  # mean |effect| 0.1, |mean effect| 0
}


@pytest.mark.parametrize("aggregate, kept, dropped, values", [
    ("mean_abs", ("L0.H0", "L0.H1"), ["L1.H1"], {"L0.H0": 0.5, "L0.H1": 0.3, "L1.H0": 0.2, "L1.H1": 0.1}),
    ("per_pair", ("L0.H0", "L0.H1"), ["L1.H1"], {"L0.H0": 0.5, "L0.H1": 0.3, "L1.H0": 0.2, "L1.H1": 0.1}),
    ("abs_mean", ("L0.H1",), ["L0.H0", "L1.H1"], {"L0.H0": 0.0, "L0.H1": 0.3, "L1.H0": 0.0, "L1.H1": 0.0}),
])
def test_every_aggregate_compares_like_with_like_by_hand(aggregate, kept, dropped, values):
    """threshold 0.25. mean_abs / per_pair: candidates by mean |est| are L0.H0 (.5), L0.H1 (.3), L1.H1 (.25);
    measured mean |effect| .5, .3, .1: L1.H1 is refuted. abs_mean: candidates by |mean est| are the same
    three (L1.H0's |mean| is 0); measured |mean effect| 0, .3, 0: only L0.H1 stays."""
    from atpdsl.circuit.select import selection_value, verified_magnitude

    run = ranked_result([aggregated(n, e, m, aggregate) for n, (e, m) in HAND.items()])
    out = select(run, Selection("threshold", 0.25), aggregate=aggregate)
    assert out.selected == kept and [d.node for d in out.dropped] == dropped and out.aggregate == aggregate
    by_name = run.by_name()
    assert {n: selection_value(by_name[n], aggregate) for n in HAND} == pytest.approx(values)
    assert verified_magnitude(by_name["L1.H0"], aggregate) is None


def test_aggregate_per_pair_and_keep_per_pair_select_the_same_nodes():
    """The reported case: on the same pairs, `aggregate per_pair` (ranking by mean |.|) must not check verified
    nodes against |mean effect| while `keep per_pair` (mean_abs) checks mean |effect|."""
    nodes = [aggregated(n, e, m, "mean_abs") for n, (e, m) in HAND.items()]
    run = ranked_result(nodes)
    for rule in (Selection("top", 3), Selection("threshold", 0.2), Selection("cumulative", 0.9)):
        assert select(run, rule, aggregate="per_pair") == replace(select(run, rule, aggregate="mean_abs"),
                                                                  aggregate="per_pair")


def test_an_unknown_aggregate_is_an_error():
    with pytest.raises(AtpError, match="unknown aggregate 'median'"):
        select(run_of(FOUR), Selection("top", 1), aggregate="median")
