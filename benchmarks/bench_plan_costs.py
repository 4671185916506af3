"""Does `atpdsl plan` cost what `atpdsl run` spends? Predicted against measured, step by step.

For each model (stories260K; SmolLM2-135M, a 30-layer Llama, when built) and each method variant, the spec is
compiled (the plan's step costs, in forward-equivalents per batch) and run; the engine records every step's wall
time. The measured cost of a step is its seconds per batch divided by the corrupt forward's seconds per batch
(one forward of the batch: the unit). The table prints both and their ratio; a step whose prediction is off by
more than 30% is flagged. The last column per variant is the whole run against plain AtP (corrupt forward +
clean forward + backward), predicted and measured, in the same run.

    .venv/bin/python benchmarks/bench_plan_costs.py [--models stories,smollm2] [--pairs 8] [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_tasks import SMOLLM2, STORIES, smollm2_tasks, stories_pronoun  # noqa: E402

from atpdsl.engine import execute  # noqa: E402
from atpdsl.engine.load import load_model  # noqa: E402
from atpdsl.engine.run import complete_plan  # noqa: E402
from atpdsl.lowering import replan  # noqa: E402
from atpdsl.plan import Diagnosis, MethodSpec, MetricArg, MetricSpec, ModelRef, NodeGroup, Plan, PromptPair, Verification  # noqa: E402,E501

TOLERANCE = 0.30
VARIANTS = {
    "atp": dict(method=MethodSpec("atp")),
    "atp*": dict(method=MethodSpec("atp*", qk_fix=True, graddrop=True)),
    "atp* sublayer + norm fix": dict(method=MethodSpec("atp*", qk_fix=True, graddrop=True, graddrop_mode="sublayer",
                                                       norm_fix=True)),
    "atp + verify + diagnose": dict(method=MethodSpec("atp"), verification=Verification(10),
                                    diagnosis=Diagnosis(samples=40, confidence=0.9, inclusion=0.2)),
    "exact": dict(method=MethodSpec("exact")),
}


@dataclass
class Measured:
    variant: str
    steps: list[tuple[str, float, float, float]]  # name, predicted, measured (forward-equivalents per batch), spread
    total_predicted: float
    total_measured: float


def _plan(model: Path, pairs: list[dict], nodes: tuple[NodeGroup, ...], batch: int, **kw) -> Plan:
    pp = tuple(PromptPair(p["clean"], p["corrupt"], (("answer", p["answer"]), ("wrong", p["wrong"])), origin=f"p{i}")
               for i, p in enumerate(pairs))
    metric = MetricSpec("logit_diff", (MetricArg("answer"), MetricArg("wrong")))
    return Plan(spec_file="bench", spec_text="", spec_hash="bench", model=ModelRef(str(model)), pairs=pp,
                metric=metric, nodes=nodes, method=kw.pop("method"), batch=batch, **kw)


def _measure(plan: Plan, loaded, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step name over `repeats` runs (the first run warms up and is not counted), and each
    step's spread: (max - min) / median of its time in forward units, run by run."""
    execute(plan, loaded=loaded)
    runs = []
    for _ in range(repeats):
        res = execute(plan, loaded=loaded)
        runs.append({name: seconds for name, seconds in res.timings})
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratios = {k: [r[k] / r["corrupt forward"] for r in runs] for k in runs[0]}
    spread = {k: (max(v) - min(v)) / statistics.median(v) if statistics.median(v) > 0 else 0.0
              for k, v in ratios.items()}
    return median, spread


def measure(model: Path, pairs: list[dict], nodes: tuple[NodeGroup, ...], repeats: int, loaded=None,
            variants: tuple[str, ...] = tuple(VARIANTS)) -> list[Measured]:
    loaded = loaded or load_model(ModelRef(str(model)))
    out = []
    for name, kw in VARIANTS.items():
        if name not in variants:
            continue
        plan = complete_plan(_plan(model, pairs, nodes, len(pairs), **dict(kw)), loaded)
        if name == "exact":
            plan = replan(plan, nodes=tuple(g for g in nodes if not g.per_position))
        seconds, spread = _measure(plan, loaded, repeats)
        unit = seconds["corrupt forward"]
        rows = [(s.name, s.cost, seconds.get(s.name, 0.0) / unit, spread.get(s.name, 0.0)) for s in plan.steps]
        total_pred = sum(s.cost for s in plan.steps)
        total_meas = sum(seconds.get(s.name, 0.0) for s in plan.steps) / unit
        out.append(Measured(name, rows, total_pred, total_meas))
    return out


def report(title: str, results: list[Measured]) -> None:
    print(f"\n{title}")
    atp = next((m for m in results if m.variant == "atp"), None)
    plain = ("corrupt forward", "clean forward + backward")
    atp_pred = sum(p for n, p, _, _ in atp.steps if n in plain) if atp else 0.0
    atp_meas = sum(m for n, _, m, _ in atp.steps if n in plain) if atp else 0.0
    for m in results:
        if atp is not None:
            print(f"  {m.variant}: whole run predicted {m.total_predicted / atp_pred:.2f}x AtP, measured "
                  f"{m.total_measured / atp_meas:.2f}x AtP")
        else:
            print(f"  {m.variant}")
        for name, pred, meas, spread in m.steps:
            if pred == 0 and meas < 0.05:
                continue
            ratio = pred / meas if meas > 0 else float("inf")
            flag = "" if abs(ratio - 1) <= TOLERANCE else "   <- off by more than 30%"
            print(f"    {name:28s} predicted {pred:8.3f}  measured {meas:8.3f} (spread {spread:4.0%})  ratio "
                  f"{ratio:5.2f}{flag}")
        off = [n for n, p, me, _ in m.steps if me > 0 and abs(p / me - 1) > TOLERANCE]
        print(f"    within 30%: {len(m.steps) - len(off)} of {len(m.steps)} steps")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories,smollm2")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = tuple(v.strip() for v in args.variants.split(","))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.pairs} pairs in one batch, median of "
          f"{args.repeats} runs after a warm-up; costs in forward-equivalents per batch")
    t0 = time.perf_counter()
    if "stories" in args.models:
        task = stories_pronoun(args.pairs)
        nodes = (NodeGroup("heads"), NodeGroup("queries", per_position=True), NodeGroup("keys", per_position=True),
                 NodeGroup("neurons"))
        report("stories260K (5 layers)", measure(STORIES, list(task.pairs), nodes, args.repeats, variants=chosen))
    if "smollm2" in args.models:
        if not (SMOLLM2 / "config.json").is_file():
            print(f"\nSmolLM2-135M: not built at {SMOLLM2} (run ../shared/models/smollm2/build.py {SMOLLM2})")
        else:
            loaded = load_model(ModelRef(str(SMOLLM2)))
            task = smollm2_tasks(loaded, args.pairs)[0]  # IOI
            nodes = (NodeGroup("heads"), NodeGroup("queries", per_position=True),
                     NodeGroup("keys", per_position=True), NodeGroup("mlp"))
            report("SmolLM2-135M (30 layers)", measure(SMOLLM2, list(task.pairs), nodes, args.repeats, loaded,
                                                           variants=chosen))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
