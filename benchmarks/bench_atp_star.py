"""AtP* benchmark on stories260K and the pronoun pairs: wall time against plain AtP, and the cost of verified
recall against exhaustive exact patching (not a test; prints ratios from one run).

1. Wall time: one `execute` of AtP, AtP + QK fix, AtP* (GradDrop per layer) and AtP* (per sublayer) on all
   20 pairs in one batch, per-position heads / queries / keys / neurons (18,240 nodes); median of interleaved
   rounds. Target: AtP* / AtP <= 1 + L/2 (L = 5 layers).
2. Cost of verified recall (the paper's figure of merit): forward-equivalent passes until all of the true top 10
   (by |exact effect|) are verified, walking down a method's ranking: method cost + one forward per node
   verified. Per pair (each pair's own ranking: `aggregate per_pair`) and for the dataset (mean |.| over pairs).
   Method costs in forward-equivalents: corrupt forward 1 + clean forward 1 + backward 2; QK fix 0.05 per layer
   (the compiler's figure); GradDrop 2 x the backward-equivalents of its terms as the engine runs them
   (atpdsl.plan.graddrop_cost: gradients above a cut are shared, so term l only recomputes layers below l).
   Exhaustive exact patching: 2 + one forward per node (every node; also shown: only the nodes whose value
   changes between the prompts, which is what the engine actually runs). Target: >= 200x less than exhaustive.

Run: .venv/bin/python benchmarks/bench_atp_star.py [--pairs 20] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "engine"))

import torch  # noqa: E402

from engine_support import STORIES, NodeGroup, make_plan, stories_pairs, with_  # noqa: E402

from atpdsl.compiler import QK_FIX_COST_PER_LAYER  # noqa: E402
from atpdsl.engine import execute  # noqa: E402
from atpdsl.plan import graddrop_cost  # noqa: E402
from atpdsl.engine.load import load_model  # noqa: E402
from atpdsl.plan import MethodSpec  # noqa: E402

NODES = tuple(NodeGroup(k, per_position=True) for k in ("heads", "queries", "keys", "neurons"))
METHODS = {
    "AtP": MethodSpec("atp", aggregate="per_pair"),
    "AtP+QK": MethodSpec("atp*", qk_fix=True, aggregate="per_pair"),
    "AtP* layer": MethodSpec("atp*", qk_fix=True, graddrop=True, aggregate="per_pair"),
    "AtP* sublayer": MethodSpec("atp*", qk_fix=True, graddrop=True, graddrop_mode="sublayer", aggregate="per_pair"),
}
TOP = 10


def method_cost(m: MethodSpec, n_layers: int) -> float:
    cost = 4.0
    if m.qk_fix:
        cost += QK_FIX_COST_PER_LAYER * n_layers
    if m.graddrop:
        cost += 2.0 * graddrop_cost(n_layers, m.graddrop_mode)
    return cost


MISS_MIN_EFFECT = 0.2  # a missed node must change the metric by at least this much when patched
MISS_RATIO = 0.1  # ...while plain AtP estimates less than this fraction of it
MISS_SHOWN = 3


def worst_rank(truth: dict[str, float], ranks: dict[str, int]) -> int:
    top = sorted(truth, key=lambda n: -abs(truth[n]))[:TOP]
    return max(ranks[n] for n in top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = stories_pairs(args.pairs)
    plan = make_plan(STORIES, pairs, NODES, batch=len(pairs), write_per_pair=True)
    loaded = load_model(plan.model)
    n_layers = loaded.geom.n_layers

    # ---- 1. wall time
    loop_phases = ("forward", "backward", "estimate", "qk_fix", "graddrop")
    times: dict[str, list[float]] = {k: [] for k in METHODS}
    loops: dict[str, list[float]] = {k: [] for k in METHODS}
    for _ in range(args.rounds + 1):
        for name, m in METHODS.items():
            t0 = time.perf_counter()
            res = execute(with_(plan, method=with_(m, aggregate="mean_abs"), write_per_pair=False), loaded=loaded)
            times[name].append(time.perf_counter() - t0)
            loops[name].append(sum(v for k, v in res.timings if k in loop_phases))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # first round warms up
    loop = {k: statistics.median(v[1:]) for k, v in loops.items()}
    print(f"stories260K, {len(pairs)} pairs in one batch, {args.threads} thread(s), L = {n_layers}, {len(NODES)} node "
          f"kinds per position; median of {args.rounds} interleaved rounds:")
    print(f"  {'method':14s} {'attribution':>12s} {'ratio':>7s} {'whole execute':>14s} {'ratio':>7s}")
    for k in METHODS:
        print(f"  {k:14s} {loop[k] * 1000:9.1f} ms {loop[k] / loop['AtP']:7.2f} {med[k] * 1000:11.1f} ms "
              f"{med[k] / med['AtP']:7.2f}")
    print("  (attribution = the engine's forward + backward + estimate + qk_fix + graddrop phases; whole execute adds"
          " tokenizing, ranking and building one NodeScore per node)")
    print(f"  target: AtP* / AtP <= 1 + L/2 = {1 + n_layers / 2:.1f}")

    # ---- 2. cost of verified recall
    t0 = time.perf_counter()
    exact = execute(with_(plan, method=MethodSpec("exact", aggregate="per_pair"), batch=1), loaded=loaded)
    exact_s = time.perf_counter() - t0
    names = [n.name for n in exact.nodes]
    n_nodes = len(names)
    per_pair_truth = [{n.name: n.per_pair[p] for n in exact.nodes} for p in range(len(pairs))]
    dataset_truth = {n.name: n.score for n in exact.nodes}  # mean |effect| over pairs
    changed = [sum(1 for v in t.values() if v != 0.0) for t in per_pair_truth]
    exhaustive = 2 + n_nodes
    exhaustive_changed = 2 + statistics.mean(changed)
    print(f"\nexact patching of all {n_nodes} nodes on {len(pairs)} pairs: {exact_s:.1f} s; nodes whose value changes "
          f"per pair: {min(changed)}-{max(changed)} (mean {statistics.mean(changed):.0f})")
    print(f"cost of verified recall of the true top {TOP} (forward-equivalents: method + verified nodes), "
          f"exhaustive = {exhaustive} ({exhaustive_changed:.0f} counting only changed nodes):")
    print(f"  {'method':14s} {'cost':>6s} {'per pair: worst rank mean [min-max]':>38s} {'x less':>8s}"
          f" {'dataset: worst rank':>20s} {'x less':>8s}")
    results = {}
    for name, m in METHODS.items():
        res = results[name] = execute(with_(plan, method=m), loaded=loaded)
        pr = res.extras["per_pair_ranks"]["ranks"]
        worst = [worst_rank(per_pair_truth[p], {k: v[p] for k, v in pr.items()}) for p in range(len(pairs))]
        cost = method_cost(m, n_layers)
        pair_cost = [cost + w for w in worst]
        ranks = {n.name: n.rank for n in res.nodes}
        dw = worst_rank(dataset_truth, ranks)
        print(f"  {name:14s} {cost:6.2f} {statistics.mean(worst):14.1f} [{min(worst)}-{max(worst)}]"
              f"{'':12s} {exhaustive / statistics.mean(pair_cost):8.1f} {dw:20d} {exhaustive / (cost + dw):8.1f}")
    print(f"  {'exhaustive':14s} {exhaustive:6d}  (x1; {exhaustive / exhaustive_changed:.2f} if only changed nodes "
          f"are patched)")
    print("  target: >= 200x less than exhaustive")

    # ---- 3. cancellation: the (node, pair) that plain AtP misses worst, and where each method ranks it
    atp_est = {n.name: n.per_pair for n in results["AtP"].nodes}
    missed = [(abs(per_pair_truth[p][k]), k, p) for k in names for p in range(len(pairs))
              if abs(per_pair_truth[p][k]) >= MISS_MIN_EFFECT and abs(atp_est[k][p]) < MISS_RATIO * abs(per_pair_truth[p][k])]
    print(f"\nnodes plain AtP misses (|exact| >= {MISS_MIN_EFFECT}, |AtP| < {MISS_RATIO:.0%} of it): {len(missed)}")
    for _, k, p in sorted(missed, reverse=True)[:MISS_SHOWN]:
        ranks = ", ".join(f"{name} {res.extras['per_pair_ranks']['ranks'][k][p]}" for name, res in results.items())
        true_rank = 1 + sum(abs(v) > abs(per_pair_truth[p][k]) for v in per_pair_truth[p].values())
        print(f"  {k} in pair {p}: exact {per_pair_truth[p][k]:+.3f} (true rank {true_rank}), AtP {atp_est[k][p]:+.3f};"
              f" rank under {ranks} (of {n_nodes})")


if __name__ == "__main__":
    main()
