"""The run: build the context from the plan's data, run the steps in the plan's order (batch-scope steps once
per batch, then the run-scope steps, as atpdsl does), and print one JSON line per node, then one for the run."""
from __future__ import annotations

import json
import sys

import torch

from atpdsl.arch.sites import Layout
from atpdsl.engine.context import Accumulator
from atpdsl.engine.data import make_batches, pair_sum
from atpdsl.engine.emit.runtime.loading import load_model, make_pairs
from atpdsl.engine.emit.runtime.objects import BatchWork, Context, Plan, RunState, Site, Step
from atpdsl.engine.node_table import Block, NodeTable
from atpdsl.plan import MethodSpec, MetricArg, MetricSpec


def metric_spec(data: dict | None) -> MetricSpec | None:
    """A metric of the plan's data as atpdsl's MetricSpec."""
    if data is None:
        return None
    return MetricSpec(data["kind"], tuple(MetricArg(**a) for a in data["args"]), data["position"])


def node_table(plan: dict) -> NodeTable:
    """The node table: blocks of nodes per site, in table order (the nodes and their names follow from them)."""
    sites = [Site(s["module"], s["attr"], s["layer"]) for s in plan["node_sites"]]
    positions = None if plan["positions"] is None else (plan["positions"]["mode"], plan["positions"]["names"])
    table = NodeTable(sites=sites, blocks=[], positions=positions)
    for b in plan["blocks"]:
        table.add(Block(b["site"], b["kind"], Layout(*b["layout"]), tuple(b["units"]), b["per_position"], b["first"],
                        b["n_positions"], b["group_size"]))
    return table


def build_context(plan: dict) -> Context:
    """Load the model, check and batch the pairs, and build the node table."""
    loaded = load_model(plan["model"], plan["geometry"])
    pairs = make_pairs(plan["pairs"], loaded.tokenizer)
    table = node_table(plan)
    spec = Plan(metric_spec(plan["metric"]), metric_spec(plan["eval_metric"]), MethodSpec(**plan["method"]),
                plan["batch"])
    batches = make_batches(pairs, plan["batch"], plan["pad_id"], loaded.device, table.positions)
    reads = [tuple(r) for r in plan["reads"]]
    return Context(spec, loaded, pairs, batches, table, table.sites, reads, plan["grad_units"], plan["data"])


def count(state: RunState, step: Step) -> None:
    """Record one run of a step."""
    kind, scope, runs = state.runs.get(step.name, (step.kind, step.scope, 0))
    state.runs[step.name] = (kind, scope, runs + 1)


def fold(state: RunState, work: BatchWork) -> None:
    """Add a finished batch to the run: its per-pair numbers, ranking magnitudes, metric rows and sums."""
    est = work.est
    if work.batch.per_pair > 1 and est.shape[0] == work.batch.n_rows:  # per model row: a pair's is their sum
        est = pair_sum(work.batch, est)
    state.acc.add(est, work.magnitude)
    if work.clean_rows is not None and work.corrupt_rows is not None:
        state.acc.add_metrics(work.clean_rows, work.corrupt_rows)
    for name, value in work.sums.items():
        state.sums[name] = value.clone() if name not in state.sums else state.sums[name] + value


def run(plan: dict, step_functions: dict, prepare: dict) -> RunState:
    """Every step of the plan, in order: each kind's preparation once, the batch-scope steps per batch, then the
    run-scope steps."""
    torch.manual_seed(plan["seed"])
    ctx = build_context(plan)
    steps = [Step(s["kind"], s["name"], s["scope"], s["params"]) for s in plan["steps"]]
    state = RunState(ctx, steps, Accumulator(ctx.table.size, plan["keep_rows"]))
    for step in steps:
        if step.kind in prepare and step.kind not in state.parts.get("prepared", ()):
            prepare[step.kind](state, step)
            state.parts.setdefault("prepared", set()).add(step.kind)
    for batch in ctx.batches:
        work = BatchWork(batch)
        for step in steps:
            if step.scope == "batch":
                step_functions[step.kind](state, step, work)
                count(state, step)
        fold(state, work)
    for step in steps:
        if step.scope == "run":
            step_functions[step.kind](state, step, None)
            count(state, step)
    return state


def report(state: RunState, left_out: list) -> None:
    """One JSON line per node in rank order (estimate: mean signed estimate over pairs; score: the ranking
    score; verified_effect: mean exact effect, for verified nodes), then the steps that ran."""
    names = state.ctx.table.nodes
    mean, score = state.mean.tolist(), state.score.tolist()
    for rank, col in enumerate(state.order, start=1):
        line = {"node": names[col].name, "rank": rank, "estimate": mean[col], "score": score[col]}
        if col in state.verified:
            line["verified_effect"] = float(state.verified[col].mean())
        print(json.dumps(line))
    acc = state.acc
    steps = [{"kind": k, "name": name, "scope": s, "runs": r} for name, (k, s, r) in state.runs.items()]
    print(json.dumps({"pairs": acc.n, "clean_metric": acc.clean_sum / acc.n, "corrupt_metric": acc.corrupt_sum / acc.n,
                      "steps": steps, "left_out": [s["name"] for s in left_out]}))


def main(plan: dict, step_functions: dict, prepare: dict) -> None:
    """Run the plan and print its numbers (a note on stderr names the plan's steps this program leaves out)."""
    for s in plan["left_out"]:
        print(f"note: this program leaves out the plan's step {s['name']!r}: {s['why']}", file=sys.stderr)
    report(run(plan, step_functions, prepare), plan["left_out"])
