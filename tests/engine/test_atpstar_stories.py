"""AtP* on stories260K (5-layer Llama, GQA) and the pronoun pairs, against exact patching of every node.

Nodes per position: heads, queries, keys (KV groups), neurons: 18,240 for the first 3 pairs (their tokens
end alike, so positions count from the end), exact patching of every node of each pair (~5 s a pair; nodes whose
corrupt value equals the clean one, before the changed word, have effect 0 and are skipped).

Per pair, the paper's single-pair question: walking down a method's ranking of that pair, how deep must one go to
reach all of the pair's true top 10 (by |exact effect|)? Measured worst rank among the true top 10, pairs 0-2:
    AtP                 [274, 443, 352]  mean 356
    AtP + QK fix        [272, 439, 348]  mean 353
    AtP* (per layer)    [162, 223, 211]  mean 199  (0.56 of AtP)
    AtP* (per sublayer) [169, 216, 200]  mean 195
    AtP* + norm fix     [47, 46, 48]     mean 47   (0.24 of AtP* per layer)
The deepest true-top-10 node is a layer-0 neuron at the changed word (L0.N64). Its effect is curvature, not
cancellation: its write is most of the residual stream there, so the norms that read it rescale the stream when
it is patched (engine/normfix.py; bench_atp_star.py section 4 shows the curve). GradDrop lifts it from rank
274-443 to 162-223, the norm fix to about 45. The margins asserted below (AtP* <= 0.7 x AtP, AtP* + norm fix
<= 0.4 x AtP*) are well clear of the measured 0.56 and 0.24. Pearson(per-pair estimate, exact effect) over these pairs: queries (2,280)
AtP 0.671 -> QK fix 0.933; KV-group keys (1,140) 0.920 -> 0.992 (also asserted).
"""
from __future__ import annotations

import json

import pytest
import torch

from engine_support import PRONOUN, STORIES, NodeGroup, Verification, make_plan, pearson, stories_pairs, with_

from atpdsl.engine import execute
from atpdsl.engine.load import load_model
from atpdsl.plan import MethodSpec

NODES = tuple(NodeGroup(k, per_position=True) for k in ("heads", "queries", "keys", "neurons"))


def _star(**kw) -> MethodSpec:
    return MethodSpec("atp*", qk_fix=True, graddrop=True, aggregate="per_pair", **kw)


@pytest.fixture(scope="module")
def stories():
    torch.set_num_threads(1)
    pairs = stories_pairs(3)
    plan = make_plan(STORIES, pairs, NODES, batch=1, write_per_pair=True,
                     method_spec=MethodSpec("exact", aggregate="per_pair"))
    loaded = load_model(plan.model)
    exact = execute(plan, loaded=loaded)
    return loaded, plan, exact


def _worst_ranks(truth: dict[str, list[int]], ranks: dict[str, list[int]], n_pairs: int) -> list[int]:
    out = []
    for p in range(n_pairs):
        top = [name for name, r in truth.items() if r[p] <= 10]
        assert len(top) == 10
        out.append(max(ranks[name][p] for name in top))
    return out


def test_atp_star_reaches_the_true_top_10_much_sooner_than_atp(stories):
    loaded, plan, exact = stories
    truth = exact.extras["per_pair_ranks"]["ranks"]
    worst = {}
    for name, method in (("atp", MethodSpec("atp", aggregate="per_pair")), ("layer", _star()),
                         ("sublayer", _star(graddrop_mode="sublayer")), ("layer+norm", _star(norm_fix=True))):
        res = execute(with_(plan, method=method, batch=3), loaded=loaded)
        worst[name] = _worst_ranks(truth, res.extras["per_pair_ranks"]["ranks"], 3)
    mean = {k: sum(v) / len(v) for k, v in worst.items()}
    print("worst rank of the true top 10 per pair:", worst)
    assert mean["layer"] <= 0.7 * mean["atp"], worst
    assert mean["sublayer"] <= 0.7 * mean["atp"], worst
    assert mean["layer+norm"] <= 0.4 * mean["layer"], worst  # the norm fix finds L0.N64 (see the docstring)


def test_qk_fix_tracks_exact_patching_on_queries_and_keys(stories):
    loaded, plan, exact = stories
    plain = execute(with_(plan, method=MethodSpec("atp"), batch=3), loaded=loaded).by_name()
    fixed = execute(with_(plan, method=MethodSpec("atp*", qk_fix=True), batch=3), loaded=loaded).by_name()
    truth = exact.by_name()
    for kind, before, after in (("queries", 0.75, 0.9), ("keys", 0.95, 0.98)):
        names = [n.name for n in exact.nodes if n.node.kind.value == kind]
        ex = [v for name in names for v in truth[name].per_pair]
        a = [v for name in names for v in plain[name].per_pair]
        q = [v for name in names for v in fixed[name].per_pair]
        r_plain, r_fix = pearson(a, ex), pearson(q, ex)
        print(f"{kind}: Pearson AtP {r_plain:.3f} -> QK fix {r_fix:.3f} over {len(ex)} node-pairs")
        assert r_plain < before and r_fix > after, (kind, r_plain, r_fix)


def test_aggregates_verification_and_the_json_result(stories, tmp_path):
    """per_pair: per-pair ranks of every node from the per-pair GradDrop scores; abs_mean with GradDrop: a last-
    layer node's score is |mean estimate| (its terms are AtP or 0); verification summary; all of it survives
    the JSON result document."""
    loaded, plan, _ = stories
    small = with_(plan, nodes=(NodeGroup("heads"), NodeGroup("neurons", (3, 4))), batch=3)
    per_pair = execute(with_(small, method=_star(), verification=Verification(8)), loaded=loaded)
    ranks = per_pair.extras["per_pair_ranks"]
    assert ranks["pairs"] == [p.origin for p in small.pairs] and len(ranks["top"]) == 3
    for p in range(3):
        order = sorted(ranks["ranks"], key=lambda name: ranks["ranks"][name][p])
        assert order[:20] == ranks["top"][p]
        assert sorted(ranks["ranks"][name][p] for name in ranks["ranks"]) == list(range(1, len(order) + 1))
    for node in per_pair.nodes:
        assert dict(node.attrs)["best_pair_rank"] == min(ranks["ranks"][node.name])
    last = [n for n in per_pair.nodes if n.node.layer == 4]
    for n in last:  # mean_abs / per_pair score of a last-layer node = mean |plain estimate|
        assert n.score == pytest.approx(sum(abs(v) for v in n.per_pair) / 3, rel=1e-6, abs=1e-9)
    abs_mean = execute(with_(small, method=MethodSpec("atp*", qk_fix=True, graddrop=True, aggregate="abs_mean")),
                       loaded=loaded).by_name()
    for n in last:
        assert abs_mean[n.name].score == pytest.approx(abs(n.estimate), rel=1e-6, abs=1e-9)
    lower = [n for n in per_pair.nodes if n.node.layer < 4]
    assert all(abs_mean[n.name].score <= n.score * (1 + 1e-6) + 1e-9 for n in lower)  # |mean| <= mean |.| per term
    ver = per_pair.extras["verification"]
    verified = [n for n in per_pair.nodes if n.verified_effect is not None]
    assert ver["top"] == 8 == len(verified) and ver["rule"] == "top 20"
    assert ver["exceeding"] == len(ver["exceeding_ranks"]) == sum(r["exceeds"] for r in ver["nodes"])
    assert [r["rank"] for r in ver["nodes"]] == [n.rank for n in verified]

    from atpdsl.pipeline import run

    spec = f"""
model "{STORIES}"
pairs from "{PRONOUN}"
metric logit_diff(answer, wrong) at last
nodes {{ heads layers 0..4 }}
method atp* {{ qk_fix on graddrop on }}
aggregate per_pair
batch 10
select top 5
verify top 5
diagnose false_negatives {{ samples 100 confidence 0.9 }}
"""
    result = run(None, text=spec, out_dir=tmp_path)
    doc = json.loads(result.to_json())
    assert {"per_pair_ranks", "verification", "diagnosis", "atp_star"} <= set(doc["extras"])
    assert doc["extras"]["atp_star"]["graddrop_terms"] == ["L0", "L1", "L2", "L3", "L4"]
    assert len(doc["extras"]["per_pair_ranks"]["ranks"]["L4.H2"]) == 20
    assert doc["false_negatives"]["nodes_tested"] == 35
    rows = {r["node"]: r for r in doc["scores"]["rows"]}
    assert rows["L4.H2"]["attrs"]["best_pair_rank"] == 1


def test_qk_fix_on_template_slots_of_different_lengths(stories):
    """Clean "a little girl" vs corrupt "a boy": the slot tokenizes to different lengths, so corrupt values are
    moved onto clean positions (and left-padding differs); the corrupt q / k are re-rotated at the clean
    positions, as an exact patch of the projection output is. Measured, queries and keys at the two slots
    (3 pairs): every node with |exact| > 0.1 within 5% of exact (L4.G0.k@who -0.350 vs -0.362)."""
    from atpdsl.language.compiler import compile_text

    loaded, _, _ = stories
    spec = f"""
model "{STORIES}"
template {{
    text    "Once upon a time, there was a {{who}} named {{name}}. One day,"
    slot    who  ["little girl"]
    corrupt who  ["boy"]
    slot    name ["Lily", "Sue", "Mia"]
    answer  " she"
    wrong   " he"
    count   3
    seed    1
}}
metric logit_diff(answer, wrong) at last
nodes {{ queries per position
        keys per position }}
method atp* {{ qk_fix on graddrop off }}
batch 3
"""
    plan = compile_text(spec, base_dir=".")
    assert any(len(p.clean) != len(p.corrupt) for p in plan.pairs)
    star = execute(plan, loaded=loaded)
    assert star.extras["positions"] == {"mode": "slots", "names": ["name", "who"]}
    exact = execute(with_(plan, method=MethodSpec("exact")), loaded=loaded).by_name()
    plain = execute(with_(plan, method=MethodSpec("atp")), loaded=loaded).by_name()
    keys = [n for n in star.nodes if abs(exact[n.name].estimate) > 0.1 and n.node.kind.value == "keys"]
    assert len(keys) >= 3
    for n in keys:
        assert abs(n.estimate - exact[n.name].estimate) < 0.05 * abs(exact[n.name].estimate), n.name
    err = lambda est: sum(abs(est[n.name].estimate - exact[n.name].estimate) for n in star.nodes)  # noqa: E731
    assert err(star.by_name()) < 0.5 * err(plain)
