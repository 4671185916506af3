"""Evaluation of atpdsl's attribution methods against exact activation patching, on three tasks and two real
models (issue 10, item 6): AtP, AtP* (GradDrop per layer and per sublayer), AtP* + norm fix, and Relevance
Patching (RelP, atpdsl.engine.relp), per task: Pearson with exact patching per node kind, the worst rank of the
true top 10 (per pair and aggregated over pairs) and the cost of verifying them (benchmarks/eval_metrics.py).

Tasks (benchmarks/eval_tasks.py): stories260K pronoun pairs, heads / queries / keys / neurons per position;
SmolLM2-135M IOI and induction pairs, 270 heads + 30 MLP outputs summed over positions. Ground truth: the
engine's `method exact` on every node of every pair. RelP runs as `method atp` inside `relp_context`, so this
script does not depend on how `method relp` is wired into the engine.

Run: .venv/bin/python benchmarks/eval_methods.py [--quick] [--threads 1] [--ablation] [--markdown PATH]
     [--json PATH] [--tasks stories,ioi,induction] [--methods AtP,RelP,...] [--stories-pairs 20]
     [--smollm2-pairs 10]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "engine"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import eval_metrics as M
import eval_tasks as T
import torch
from engine_support import NodeGroup, make_plan

from atpdsl.engine import execute
from atpdsl.engine.load import load_model
from atpdsl.engine.relp import ALL_RULES, PAPER_RULES, RelpRules, relp_context
from atpdsl.errors import AtpError
from atpdsl.plan import MethodSpec

PER_PAIR = "per_pair"
METHODS: dict[str, tuple[MethodSpec, RelpRules | None]] = {
    "AtP": (MethodSpec("atp", aggregate=PER_PAIR), None),
    "AtP* layer": (MethodSpec("atp*", qk_fix=True, graddrop=True, aggregate=PER_PAIR), None),
    "AtP* sublayer": (MethodSpec("atp*", qk_fix=True, graddrop=True, graddrop_mode="sublayer",
                                 aggregate=PER_PAIR), None),
    "AtP+QK+norm": (MethodSpec("atp*", qk_fix=True, norm_fix=True, aggregate=PER_PAIR), None),
    "AtP*+norm layer": (MethodSpec("atp*", qk_fix=True, graddrop=True, norm_fix=True, aggregate=PER_PAIR), None),
    "AtP*+norm sublayer": (MethodSpec("atp*", qk_fix=True, graddrop=True, graddrop_mode="sublayer",
                                      norm_fix=True, aggregate=PER_PAIR), None),
    "RelP": (MethodSpec("atp", aggregate=PER_PAIR), PAPER_RULES),
    "RelP+AH": (MethodSpec("atp", aggregate=PER_PAIR), ALL_RULES),
}
DEFAULT_METHODS = tuple(METHODS)
# Rule ablations (--ablation): one or two of RelP's rules alone.
ABLATION = {
    "RelP[LN]": RelpRules(True, False, False, False),
    "RelP[identity]": RelpRules(False, True, False, False),
    "RelP[half]": RelpRules(False, False, True, False),
    "RelP[AH]": RelpRules(False, False, False, True),
    "RelP[LN+AH]": RelpRules(True, False, False, True),
}
METHODS.update({name: (MethodSpec("atp", aggregate=PER_PAIR), rules) for name, rules in ABLATION.items()})


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_truth(plan, loaded) -> tuple[M.Truth, float, object]:
    t0 = time.perf_counter()
    res = execute(replace(plan, method=MethodSpec("exact", aggregate=PER_PAIR), batch=1), loaded=loaded)
    truth = M.Truth({n.name: n.per_pair for n in res.nodes}, {n.name: n.node.kind.value for n in res.nodes},
                    res.n_pairs)
    return truth, time.perf_counter() - t0, res


def run_method(name: str, plan, loaded, truth: M.Truth) -> M.Score:
    spec, rules = METHODS[name]
    t0 = time.perf_counter()
    if rules is None:
        res = execute(replace(plan, method=spec), loaded=loaded)
    else:
        with relp_context(loaded, rules):
            res = execute(replace(plan, method=spec), loaded=loaded)
    seconds = time.perf_counter() - t0
    return M.score(name, res, truth, M.method_cost(spec, plan.nodes, loaded.geom.n_layers), seconds)


def evaluate(task: T.TaskSpec, loaded, methods: list[str]) -> tuple[list[M.Score], dict]:
    nodes = tuple(NodeGroup(k, per_position=task.per_position) for k in task.kinds)
    plan = make_plan(task.model, list(task.pairs), nodes, batch=len(task.pairs), write_per_pair=True)
    log(f"[{task.name}] exact patching of every node ...")
    truth, exact_s, exact_res = run_truth(plan, loaded)
    info = {"nodes": len(truth.per_pair), "pairs": truth.n_pairs, "exact_s": exact_s,
            "clean": exact_res.clean_metric, "corrupt": exact_res.corrupt_metric}
    log(f"[{task.name}] {info['nodes']} nodes x {info['pairs']} pairs exact in {exact_s:.0f} s; clean "
        f"{info['clean']:+.2f}, corrupt {info['corrupt']:+.2f}")
    scores, failed = [], []
    for name in methods:
        try:
            scores.append(run_method(name, plan, loaded, truth))
        except AtpError as err:  # reported in the table, not a crash: the other methods still count
            failed.append(f"{name}: {type(err).__name__}: {err}")
            log(f"[{task.name}] {name} failed: {err}")
            continue
        log(f"[{task.name}] {name}: {scores[-1].seconds:.1f} s")
    info["truth"], info["failed"] = truth, failed
    return scores, info


def _fmt(r: float) -> str:
    return "  n/a" if math.isnan(r) else f"{r:5.3f}"


def table(task: T.TaskSpec, scores: list[M.Score], info: dict, markdown: bool) -> str:
    kinds = [k for k in scores[0].pearson if k != "all"]
    head = (["method", "cost"] + [f"r {k}" for k in kinds] + ["r all", "r all, top 10 verified",
            "worst rank/pair mean [min-max]", "x less/pair", "worst rank agg.", "x less agg."])
    rows = []
    atp = next((s for s in scores if s.method == "AtP"), None)
    base = atp.seconds if atp is not None else None
    if not markdown and base:
        head.insert(2, "timed")
    for s in scores:
        pw = s.pair_worst
        row = [s.method, f"{s.cost:.2f}"] + [_fmt(s.pearson[k]) for k in kinds] + [
            _fmt(s.pearson["all"]), _fmt(s.verified_r), f"{sum(pw) / len(pw):.1f} [{min(pw)}-{max(pw)}]",
            f"{s.pair_less:.1f}",
            str(s.dataset_worst), f"{s.dataset_less:.1f}"]
        if not markdown and base:
            row.insert(2, f"{atp.cost * s.seconds / base:.1f}")
        rows.append(row)
    title = (f"{task.name} ({task.about}): {info['nodes']} nodes, {info['pairs']} pairs, mean metric clean "
             f"{info['clean']:+.2f} / corrupt {info['corrupt']:+.2f}; exhaustive = {scores[0].exhaustive} "
             f"forward-equivalents per pair")
    notes = [f"not run: {f}" for f in info.get("failed", [])]
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""] * bool(notes) + notes
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [title, "  " + "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    if base:
        lines.insert(1, "  (timed: AtP's cost x the method's wall time / AtP's in this run, a noisy stand-in for its "
                        "cost)")
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows] + ["  " + n for n in notes]
    return "\n".join(lines) + "\n"


def top_nodes(truth: M.Truth, scores: list[M.Score], markdown: bool, count: int = 5) -> str:
    """The `count` nodes with the largest mean |exact effect|: mean exact effect and each method's mean estimate."""
    means = {n: sum(v) / len(v) for n, v in truth.per_pair.items()}
    dataset = truth.dataset
    best = sorted(dataset, key=lambda n: -dataset[n])[:count]
    head = ["node", "exact"] + [s.method for s in scores]
    rows = [[n, f"{means[n]:+.3f}"] + [f"{s.means[n]:+.3f}" for s in scores] for n in best]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  largest nodes by mean |exact effect|: mean exact effect and each method's mean estimate",
             "  " + "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    return "\n".join(lines + ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]) + "\n"


def tasks_for(names: list[str], stories_pairs: int, smollm2_pairs: int, models: dict) -> list[T.TaskSpec]:
    out = []
    if "stories" in names:
        out.append(T.stories_pronoun(stories_pairs))
    if "ioi" in names or "induction" in names:
        smol = [t for t in T.smollm2_tasks(models[T.SMOLLM2], smollm2_pairs)
                if ("ioi" in names and "IOI" in t.name) or ("induction" in names and "induction" in t.name)]
        out += smol
    return out


def load(path: Path, models: dict):
    if path not in models:
        plan = make_plan(path, [{"clean": "a", "corrupt": "b", "answer": "a", "wrong": "b"}], ())
        models[path] = load_model(plan.model)
    return models[path]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 stories pairs, 2 SmolLM2 pairs per task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", default="stories,ioi,induction")
    ap.add_argument("--stories-pairs", type=int, default=20)
    ap.add_argument("--smollm2-pairs", type=int, default=10)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--ablation", action="store_true", help="also run RelP's rules one (or two) at a time")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables as markdown here")
    ap.add_argument("--json", type=Path, default=None, help="also write every measured number as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.tasks.split(",")
    methods = args.methods.split(",") + (list(ABLATION) if args.ablation else [])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown} (known: {', '.join(METHODS)})")
    stories_pairs, smollm2_pairs = (4, 2) if args.quick else (args.stories_pairs, args.smollm2_pairs)
    models: dict = {}
    if "ioi" in names or "induction" in names:
        if not (T.SMOLLM2 / "config.json").is_file():
            sys.exit(f"SmolLM2 is not built at {T.SMOLLM2} (see ../shared/models/smollm2/build.py)")
        load(T.SMOLLM2, models)
    t_start = time.perf_counter()
    text, md, raw = [], [], []
    for task in tasks_for(names, stories_pairs, smollm2_pairs, models):
        scores, info = evaluate(task, load(task.model, models), methods)
        text.append(table(task, scores, info, markdown=False) + top_nodes(info["truth"], scores, False))
        md.append(table(task, scores, info, markdown=True) + "\n" + top_nodes(info["truth"], scores, True))
        print(text[-1], flush=True)
        raw.append({"task": task.name, "model": str(task.model), "pairs": list(task.pairs), "kinds": list(task.kinds),
                    **{k: v for k, v in info.items() if k != "truth"}, "scores": [s.to_json() for s in scores]})
    log(f"total {time.perf_counter() - t_start:.0f} s with {args.threads} thread(s)")
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1))
        log(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.write_text("\n".join(md))
        log(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
