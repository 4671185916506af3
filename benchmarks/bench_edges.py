"""Per-target edges: their cost against the block-level edges they replaced, and how well each edge-scoring method
ranks edges against exact path patching (not a test; prints tables from one run).

1. cost (stories260K, the 20 pronoun pairs, heads and neurons summed over positions, `select top 200`, `method
   atp`, batch 8): the CPU and wall time of the engine's edge steps (`edge_reads` on every batch + `edges`) in
   this tree against the block-level edges of commit BASELINE (extracted with `git archive` into a temporary
   folder and run in a subprocess); rounds interleave the two; medians and ratios are printed. Target <= 1.5.
   CPU time (one thread) is the steadier number on a shared machine.
2. induction (zoo induction-2l, heads per position; copy and prev corruptions, 32 pairs): every in-edge of the
   two induction heads at the last position (L1.H0@21, L1.H1@21) is path-patched; for each head, the strongest
   measured in-edge, the previous-token head's edge into its key, and where each method ranks the strongest edge
   among the head's in-edges (the must-hold: within the top 3).
3. ranking quality: Spearman correlation of each method's edge scores with the path-patched effects, and how
   many of the 10 strongest measured edges are among each method's 10 strongest estimates, over the union of
   every method's 30 strongest edges (all path-patched): EAP, EAP-IG (4 and 16 steps), and AtP* edges (QK fix +
   norm fix), on the induction tasks and on stories260K's pronoun task (the 40 best-ranked heads and neurons).

Run: .venv/bin/python benchmarks/bench_edges.py [--section cost|induction|quality|all] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
PRONOUN = ROOT.parent / "shared" / "data" / "stories260K-pronoun.jsonl"
BASELINE = "d3c0bfe"  # the last commit with block-level edges

COST_SPEC = f'''model "{STORIES}"
pairs from "{PRONOUN}"
metric logit_diff(answer, wrong) at last
nodes {{ heads ; neurons }}
method atp
batch 8
select top 200
'''
INDUCTION = '''model zoo "induction-2l"
pairs from "{root}/examples/data/induction-{task}.jsonl"
metric logit_diff(answer, wrong) at last
nodes {{ heads per position }}
method {method}
batch 32
'''
FIXED = "atp* { qk_fix on  norm_fix on  graddrop off }"


# ------------------------------------------------------------------------------------------------------- cost
def cost_worker(rounds: int, threads: int) -> None:
    """Print the edge steps' CPU and wall seconds per run as JSON (run inside the tree under test): the steps'
    functions are wrapped, so the numbers cover exactly `edge_reads` (every batch) and `edges`."""
    import time

    import torch

    import atpdsl
    from atpdsl.engine import edge_reads

    torch.set_num_threads(threads)
    spent = {"cpu": 0.0, "wall": 0.0}

    def timed(fn):
        def run(*args, **kwargs):
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["cpu"] += time.process_time() - c0
                spent["wall"] += time.perf_counter() - w0
        return run

    edge_reads.edge_reads_step = timed(edge_reads.edge_reads_step)
    edge_reads.edges_step = timed(edge_reads.edges_step)
    out = []
    for _ in range(rounds + 1):  # the first run warms caches up and is dropped
        spent.update(cpu=0.0, wall=0.0)
        c0 = time.process_time()
        atpdsl.run(text=COST_SPEC, write_exports=False)
        out.append(dict(spent, run=time.process_time() - c0))
    print(json.dumps(out[1:]))


def _worker(tree: Path, rounds: int, threads: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rounds", str(rounds),
           "--threads", str(threads)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the cost worker failed in {tree}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost(rounds: int, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        archive = subprocess.run(["git", "archive", BASELINE], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        new, old = [], []
        for _ in range(rounds):  # interleaved: one run of each per round
            new += _worker(ROOT, 1, threads)
            old += _worker(base, 1, threads)
    print(f"## cost: edge reads + edges on stories260K, 200 selected nodes, {threads} thread(s), {rounds} rounds")
    for what, label in (("cpu", "edge steps, CPU"), ("wall", "edge steps, wall"), ("run", "whole run, CPU")):
        n, o = (statistics.median(x[what] for x in runs) for runs in (new, old))
        print(f"{label:>16}: per-target (this tree) median {n:.3f} s, block-level ({BASELINE}) median {o:.3f} s, "
              f"ratio {n / o:.2f}" + ("  (target <= 1.5)" if what == "cpu" else ""))


# ------------------------------------------------------------------------------------------- shared helpers
def _setup(spec: str):
    from atpdsl.engine.context import make_context
    from atpdsl.engine.load import load_model
    from atpdsl.engine.run import complete_plan
    from atpdsl.language.compiler import compile_text

    plan = compile_text(spec, base_dir=str(ROOT))
    loaded = load_model(plan.model)
    plan = complete_plan(plan, loaded)
    return plan, loaded, make_context(plan, loaded)


def _methods(plan):
    """(label, plan, integration steps) for each edge-scoring method."""
    from atpdsl.lowering import replan
    from atpdsl.plan import MethodSpec

    plain = replan(plan, method=MethodSpec("atp"))
    fixed = replan(plan, method=MethodSpec("atp*", qk_fix=True, norm_fix=True))
    return [("EAP", plain, 0), ("EAP-IG 4", plain, 4), ("EAP-IG 16", plain, 16), ("AtP* edges", fixed, 0)]


def _scores(plan, loaded, nodes):
    """label -> EdgeMatrix for every method."""
    from atpdsl.engine.edge_reads import edge_matrix

    return {label: edge_matrix(p, nodes, loaded=loaded, ig_steps=steps, keep_pairs=False)
            for label, p, steps in _methods(plan)}


def _rank_of(values: list[float], k: int) -> int:
    """1-based rank of entry k by |value| (ties broken by position)."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    return order.index(k) + 1


# --------------------------------------------------------------------------------------------------- induction
def induction() -> None:
    from atpdsl.engine.path_patching import PathEdge, path_patch
    from atpdsl.names import parse_node

    for task in ("copy", "prev"):
        plan, loaded, ctx = _setup(INDUCTION.format(root=ROOT, task=task, method="atp"))
        nodes = list(ctx.table.nodes)
        mats = _scores(plan, loaded, nodes)
        ref = mats["EAP"]
        print(f"\n## induction-2l, {task} corruption: in-edges of the induction heads at the last position")
        print("| head | strongest measured in-edge | measured | " + " | ".join(f"{m} (rank)" for m in mats) + " |")
        print("|---|---|---|" + "---|" * len(mats))
        prev_rows = []
        for head in ("L1.H0@21", "L1.H1@21"):
            t = parse_node(head)
            cand = [(i, j) for j, r in enumerate(ref.rows) if r.node == t for i in range(len(ref.sources))
                    if ref.linked[i, j]]
            measured = path_patch(ctx, [PathEdge(ref.sources[i], ref.rows[j]) for i, j in cand]).mean(0).tolist()
            top = max(range(len(cand)), key=lambda k: abs(measured[k]))
            i, j = cand[top]
            cells = []
            for m in mats.values():
                est = [float(m.mean[a, b]) for a, b in cand]
                cells.append(f"{est[top]:+.3f} ({_rank_of(est, top)})")
            name = f"{ref.sources[i].name} ({ref.rows[j].channel or 'whole'})"
            print(f"| {head} | {name} | {measured[top]:+.3f} | " + " | ".join(cells) + " |")
            prev = [k for k, (a, b) in enumerate(cand)
                    if ref.sources[a].name.startswith("L0.H0@") and ref.rows[b].channel == "k"]
            k = max(prev, key=lambda x: abs(measured[x]))
            a, b = cand[k]
            prev_rows.append((head, ref.sources[a].name, measured[k], [float(m.mean[a, b]) for m in mats.values()]))
        print(f"\nstrongest previous-token head (L0.H0) edge into each induction head's key: measured | "
              f"{' | '.join(mats)}")
        for head, src, meas, ests in prev_rows:
            print(f"  {src} -> {head} (k): {meas:+.3f} | " + " | ".join(f"{e:+.3f}" for e in ests))


# ----------------------------------------------------------------------------------------------------- quality
def _spearman(a: list[float], b: list[float]) -> float:
    import torch

    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        return t.argsort().argsort().double()

    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _quality_rows(task: str, spec: str, pick) -> list[str]:
    from atpdsl.engine.path_patching import PathEdge, path_patch

    plan, loaded, ctx = _setup(spec)
    nodes = pick(plan, loaded, ctx)
    mats = _scores(plan, loaded, nodes)
    ref = mats["EAP"]
    pool: set[tuple[int, int]] = set()
    for m in mats.values():
        live = [(i, j) for i in range(len(m.sources)) for j in range(len(m.rows)) if m.linked[i, j]]
        live.sort(key=lambda e: -abs(float(m.mean[e])))
        pool.update(live[:30])
    pool_list = sorted(pool)
    measured = path_patch(ctx, [PathEdge(ref.sources[i], ref.rows[j]) for i, j in pool_list]).mean(0).tolist()
    best = set(sorted(range(len(pool_list)), key=lambda k: -abs(measured[k]))[:10])
    rows = []
    for label, m in mats.items():
        est = [float(m.mean[e]) for e in pool_list]
        top = set(sorted(range(len(pool_list)), key=lambda k: -abs(est[k]))[:10])
        rows.append(f"| {task} | {label} | {len(pool_list)} | {_spearman(est, measured):.3f} | "
                    f"{_spearman([abs(x) for x in est], [abs(x) for x in measured]):.3f} | {len(top & best)}/10 |")
    return rows


def _stories_nodes(plan, loaded, ctx):
    from atpdsl.engine import execute

    res = execute(plan, loaded=loaded)
    return [n.node for n in res.nodes[:40]]


def quality() -> None:
    print("\n## ranking quality against path patching (union of each method's 30 strongest edges)")
    print("| task | method | edges | Spearman (signed) | Spearman (abs) | top-10 overlap |")
    print("|---|---|---|---|---|---|")
    def every(plan, loaded, ctx):
        return list(ctx.table.nodes)

    for task in ("copy", "prev"):
        for row in _quality_rows(f"induction {task}", INDUCTION.format(root=ROOT, task=task, method="atp"), every):
            print(row)
    for row in _quality_rows("stories260K pronoun", COST_SPEC.replace("select top 200\n", ""), _stories_nodes):
        print(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=("cost", "induction", "quality", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        cost_worker(args.rounds, args.threads)
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.section in ("cost", "all"):
        cost(args.rounds, args.threads)
    if args.section in ("induction", "all"):
        induction()
    if args.section in ("quality", "all"):
        quality()


if __name__ == "__main__":
    main()
