"""What a default `atpdsl run` costs against the engine's AtP alone: the edges ride on the AtP passes.

A default spec (`method atp`, `select top 20`, no verify or diagnose) runs the steps corrupt forward, clean
forward + backward, edge reads, rank and edges. This times `execute` of that plan against `execute` of the same
plan without its edge steps (plain AtP), interleaved, in one process, on stories260K and on a random 30-layer,
d=576 Llama-shaped model (SmolLM2-135M's shape), and prints the ratio of medians. Target: <= 1.25.

`--floor` also times the same pair of plans with `select threshold` above every score: no node is selected, so
the edges read every site the default run reads (the clean pass's extra sites and the `edge reads` step) and
compute nothing from them. Its ratio is what the edges cost before any edge score is computed.

    .venv/bin/python benchmarks/bench_default_run.py [--repeats 5] [--threads 1] [--pairs 16] [--steps] [--floor]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from atpdsl.engine import execute
from atpdsl.engine.load import load_model, wrap_model
from atpdsl.engine.run import complete_plan
from atpdsl.plan import MethodSpec, MetricArg, MetricSpec, ModelRef, NodeGroup, Plan, PromptPair, Selection

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
PRONOUN = ROOT.parent / "shared" / "data" / "stories260K-pronoun.jsonl"


def _plan(source: str, pairs: list[dict], batch: int, selection: Selection = Selection("top", 20)) -> Plan:
    pp = tuple(PromptPair(p["clean"], p["corrupt"], (("answer", p["answer"]), ("wrong", p["wrong"])), origin=f"p{i}")
               for i, p in enumerate(pairs))
    return Plan(spec_file="bench", spec_text="", spec_hash="bench", model=ModelRef(source), pairs=pp,
                metric=MetricSpec("logit_diff", (MetricArg("answer"), MetricArg("wrong"))),
                nodes=(NodeGroup("heads"), NodeGroup("mlp")), method=MethodSpec("atp"), batch=batch,
                selection=selection)


def _random_llama():
    """A random-weight Llama with SmolLM2-135M's sizes and a word-level tokenizer (no download)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models as tm
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tm.make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
                      attn_implementation="eager")
    torch.manual_seed(0)
    return wrap_model(LlamaForCausalLM(cfg).eval(), tok), tm.TINY_PAIRS


STEP_SECONDS: dict[str, list[float]] = {}
"""Each step's seconds per run of the default plan (the engine's own timings), for `--steps`."""


def _time(plan: Plan, loaded, repeats: int) -> tuple[float, float]:
    """Median seconds of execute() with and without the edge steps, interleaved after one warm-up each."""
    plan = complete_plan(plan, loaded)
    plain = complete_plan(replace(plan, steps=(), extras=(("edges_allowed", False),)), loaded)
    assert [s.kind for s in plain.steps] == [s.kind for s in plan.steps if s.kind not in ("edge_reads", "edges")]
    execute(plan, loaded=loaded)
    execute(plain, loaded=loaded)
    with_edges, without = [], []
    for _ in range(repeats):
        for target, out in ((plan, with_edges), (plain, without)):
            t0 = time.perf_counter()
            res = execute(target, loaded=loaded)
            out.append(time.perf_counter() - t0)
            for name, seconds in res.timings:
                STEP_SECONDS.setdefault(("" if target is plan else "AtP alone: ") + name, []).append(seconds)
    return statistics.median(with_edges), statistics.median(without)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", action="store_true", help="also print each step's median time in both plans")
    ap.add_argument("--floor", action="store_true", help="also time the plans with no node selected (reads only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats, medians")
    cases = []
    if STORIES.is_dir():
        rows = [json.loads(x) for x in PRONOUN.read_text().splitlines() if x.strip()][: args.pairs]
        cases.append(("stories260K (5 layers)", load_model(ModelRef(str(STORIES))), rows))
    loaded, pairs = _random_llama()
    cases.append(("random Llama L30 d576 (SmolLM2 shape)", loaded, (list(pairs) * args.pairs)[: args.pairs]))
    for name, loaded, rows in cases:
        # the complete_plan check needs the plan's own source; the random model is in memory
        source = str(STORIES) if "stories" in name else "in-memory"
        variants = [(name, "default run", _plan(source, rows, len(rows)))]
        if args.floor:
            nothing = _plan(source, rows, len(rows), Selection("threshold", 1e30))
            assert not execute(complete_plan(nothing, loaded), loaded=loaded).edges  # nothing selected, no edge
            variants.append(("  reads only (no node selected)", "with edges ", nothing))
        for label, what, plan in variants:
            STEP_SECONDS.clear()
            full, plain = _time(plan, loaded, args.repeats)
            print(f"{label:40s} {what} {full * 1e3:9.1f} ms   AtP alone {plain * 1e3:9.1f} ms   "
                  f"ratio {full / plain:.3f}")
            if args.steps:
                for step, seconds in STEP_SECONDS.items():
                    print(f"    {step:45s} {statistics.median(seconds) * 1e3:9.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
