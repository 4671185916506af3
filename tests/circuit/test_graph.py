"""The circuit graph: nodes and attributes, residual-stream edges, edge attributions, provenance."""
from __future__ import annotations

import networkx as nx
import pytest
from synthetic_circuits import make_plan, mixed_result, ranked_result, score

from atpdsl.circuit.graph import build_graph, n_layers_of, residual_edges, stage
from atpdsl.names import parse_node
from atpdsl.plan import Selection
from atpdsl.circuit.scores import SCHEMA_VERSION, SIGN_CONVENTION, EdgeScore
from atpdsl.circuit.select import EdgeCut, select


def circuit(run, rule=Selection("top", 100), plan=None) -> nx.DiGraph:
    return build_graph(run, select(run, rule), plan)


def edges_between(names: list[str], heads: dict[str, str] | None = None) -> set[tuple[str, str]]:
    """The unweighted edges the residual rule draws between these nodes (endpoints added)."""
    scores = [score(n, (0.1 * (i + 1),), attrs=(("heads", heads[n]),) if heads and n in heads else ())
              for i, n in enumerate(names)]
    G = circuit(ranked_result(scores))
    return set(G.edges)


def test_nodes_are_the_selection_plus_embed_and_logits_with_their_numbers():
    run = mixed_result()
    plan = make_plan()
    G = build_graph(run, select(run, plan.selection), plan)
    assert set(G) == {"embed", "logits", "L1.H2", "L0.H3", "L1.H1", "L0.H2", "L1.H2.q@3"}
    assert G.nodes["L1.H1"] == {
        "name": "L1.H1", "layer": 1, "kind": "heads", "stage": 6, "index": 1,
        "estimate": pytest.approx(-0.4), "score": pytest.approx(0.4), "method": "atp*", "rank": 4,
        "verified": True, "verified_effect": pytest.approx(-0.4),
        "selection_value": pytest.approx(0.4),  # mean |exact effect| per pair: (0.35 + 0.4 + 0.45) / 3
    }
    q = G.nodes["L1.H2.q@3"]
    assert (q["kind"], q["index"], q["position"], q["stage"], q["verified"]) == ("queries", 2, "3", 5, False)
    assert "verified_effect" not in q
    assert G.nodes["embed"] == {"name": "embed", "layer": -1, "kind": "embed", "stage": 0}
    assert G.nodes["logits"] == {"name": "logits", "layer": 2, "kind": "logits", "stage": 9}


def test_every_attribute_is_a_plain_scalar():
    run = mixed_result(edges=True)
    G = circuit(run, plan=make_plan())
    values = list(G.graph.values())
    values += [v for _, d in G.nodes(data=True) for v in d.values()]
    values += [v for *_, d in G.edges(data=True) for v in d.values()]
    assert values and all(type(v) in (str, int, float, bool) for v in values)


def test_kv_group_nodes_carry_their_heads():
    G = circuit(mixed_result())
    assert G.nodes["L1.G0.k"]["heads"] == "0,1"
    assert G.nodes["L1.G0.k"]["grouped"] is True


def test_graph_attributes_hold_the_provenance():
    run = mixed_result()
    plan = make_plan()
    G = build_graph(run, select(run, plan.selection), plan)
    g = G.graph
    assert g["schema_version"] == SCHEMA_VERSION
    assert g["spec_hash"] == "sha256:0123abcd" and g["spec_text"] == plan.spec_text
    assert (g["model_id"], g["model_revision"], g["seed"]) == ("zoo/induction-2l", "v1", 7)
    assert g["metric"] == "logit_diff(answer, wrong) at last"
    assert g["sign_convention"] == SIGN_CONVENTION
    assert (g["method"], g["corrections"], g["aggregate"]) == ("atp*", "qk_fix, graddrop per layer", "mean_abs")
    assert g["selection"] == "top 6" and g["dropped_verified"] == "L1.H3"
    assert g["fn_bound"] == 0.0123 and g["fn_confidence"] == 0.9
    assert g["diagnostic"] == run.false_negatives.sentence
    assert g["selection_cut"] == pytest.approx(0.3) and g["selection_aggregate"] == "mean_abs"
    assert g["selection_value_definition"].startswith("selection_value = mean over pairs of |exact effect|")
    assert g["version_networkx"] == nx.__version__
    assert g["device"] == "cpu" and g["edge_rule"] == "residual"


def test_residual_rule_follows_read_and_write_points():
    names = ["L0.H1", "L0.N2", "L0.resid", "L1.H0", "L1.mlp"]
    got = edges_between(names)
    inner = {
        ("L0.H1", "L0.N2"), ("L0.H1", "L0.resid"), ("L0.H1", "L1.H0"), ("L0.H1", "L1.mlp"),
        ("L0.N2", "L0.resid"), ("L0.N2", "L1.H0"), ("L0.N2", "L1.mlp"),
        ("L0.resid", "L1.H0"), ("L0.resid", "L1.mlp"),
        ("L1.H0", "L1.mlp"),
    }
    ends = {("embed", n) for n in names} | {(n, "logits") for n in names} | {("embed", "logits")}
    assert got == inner | ends


def test_heads_of_one_layer_are_not_connected_and_queries_feed_their_own_head():
    got = edges_between(["L1.H0", "L1.H1", "L1.H0.q", "L1.H1.k", "L1.attn"])
    assert ("L1.H0", "L1.H1") not in got and ("L1.H1", "L1.H0") not in got
    assert ("L1.H0.q", "L1.H0") in got and ("L1.H0.q", "L1.H1") not in got
    assert ("L1.H1.k", "L1.H1") in got and ("L1.H1.k", "L1.attn") in got


def test_kv_group_feeds_the_heads_it_serves():
    got = edges_between(["L1.G0.k", "L1.H0", "L1.H1", "L1.H2"], heads={"L1.G0.k": "0,1"})
    assert {("L1.G0.k", "L1.H0"), ("L1.G0.k", "L1.H1")} <= got
    assert ("L1.G0.k", "L1.H2") not in got


def test_edges_never_run_to_an_earlier_position():
    got = edges_between(["L0.H1@5", "L1.H0@3", "L1.H2@7", "L1.H3@-1"])
    assert ("L0.H1@5", "L1.H0@3") not in got
    assert ("L0.H1@5", "L1.H2@7") in got
    assert ("L0.H1@5", "L1.H3@-1") in got  # -1 counts from the end: order unknown, so connected


def test_computed_edge_attributions_replace_the_residual_rule_and_are_cut_at_90_percent():
    run = mixed_result(edges=True)
    G = circuit(run, Selection("top", 6))
    assert G.graph["edge_rule"] == "attribution"
    # in the graph: |weights| 0.35, 0.2, 0.15, 0.05 (total 0.75; 90% = 0.675); 0.35 + 0.2 = 0.55 falls short,
    # + 0.15 = 0.70 covers it, so the 0.05 edge is left out. L0.N0 -> logits has an end outside the graph.
    assert {(a, b): d for a, b, d in G.edges(data=True)} == {
        ("embed", "L0.H3"): {"weight": 0.2},
        ("L0.H3", "L1.H1"): {"weight": -0.15},
        ("L1.H1", "logits"): {"weight": -0.35},
    }
    g = G.graph
    assert (g["n_edges_computed"], g["n_edges_kept"], g["n_edges_left_out"], g["n_edges_zero"]) == (4, 3, 1, 0)
    assert g["edge_cut"] == "cumulative 0.9 of |weight|"
    every = build_graph(run, select(run, Selection("top", 6)), edge_cut=None)
    assert ("L1.H2.q@3", "L1.H2") in every.edges and every.graph["n_edges_left_out"] == 0


def test_zero_weight_edges_are_never_in_the_graph_and_verified_edges_carry_their_measurement():
    run = ranked_result([score("L0.H1", (0.5,)), score("L1.H0", (0.4,))],
                        edges=(EdgeScore("L0.H1", "L1.H0", 0.0), EdgeScore("embed", "L0.H1", 0.3, -0.25),
                               EdgeScore("L1.H0", "logits", -0.1)))
    G = build_graph(run, select(run, Selection("top", 2)), edge_cut=None)
    assert ("L0.H1", "L1.H0") not in G.edges and G.graph["n_edges_zero"] == 1
    assert G.edges["embed", "L0.H1"] == {"weight": 0.3, "verified_weight": -0.25}
    top1 = build_graph(run, select(run, Selection("top", 2)), edge_cut=EdgeCut("top", 1))
    assert set(top1.edges) == {("embed", "L0.H1")} and top1.graph["n_edges_left_out"] == 1
    above = build_graph(run, select(run, Selection("top", 2)), edge_cut=EdgeCut("threshold", 0.1))
    assert set(above.edges) == {("embed", "L0.H1"), ("L1.H0", "logits")}


def test_unweighted_computed_edges_have_no_weight_attribute():
    run = ranked_result([score("L0.H1", (0.5,)), score("L1.H0", (0.4,))],
                        edges=(EdgeScore("L0.H1", "logits", None), EdgeScore("embed", "L0.H1", 0.3)))
    G = circuit(run)
    assert dict(G.edges[("L0.H1", "logits")]) == {}
    assert G.edges[("embed", "L0.H1")]["weight"] == 0.3


def test_stage_orders_sublayers_and_endpoints():
    ids = [parse_node(n) for n in ["embed", "L0.H0.q", "L0.H0", "L0.N3", "L0.resid", "L1.G0.v", "L1.attn", "logits"]]
    rows = [stage(n, 2) for n in ids]
    assert rows == sorted(rows) and rows == [0, 1, 2, 3, 4, 5, 6, 9]


def test_layer_count_comes_from_provenance_when_given():
    run = ranked_result([score("L0.H1", (0.5,))], provenance=(("n_layers", 6),))
    assert n_layers_of(run) == 6
    assert n_layers_of(ranked_result([score("L2.H1", (0.5,))])) == 3


def test_residual_edges_takes_node_ids_directly():
    a, b = parse_node("L0.mlp"), parse_node("L1.attn")
    assert residual_edges([a, b]) == [(a, b)]
