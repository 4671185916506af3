"""`atpdsl plan`'s tables: what a plan scores, how, in which steps and at what cost (rich, imported only here)."""
from __future__ import annotations

import io
import json
import os
from collections import Counter

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from atpdsl.costs import cost_basis
from atpdsl.lowering import workload_of
from atpdsl.plan import Plan

__all__ = ["print_plan", "plan_text"]


def _fmt_cost(x: float) -> str:
    return f"{x:g}"


def _origins(plan: Plan) -> str:
    """Where the pairs came from, e.g. `20 from data.jsonl, 2 inline, 16 from the template at spec.atp:9`."""
    counts: Counter[str] = Counter()
    for p in plan.pairs:
        if "#" in p.origin:
            counts["from the template at " + p.origin.split("#")[0]] += 1
        elif p.origin.rsplit(":", 1)[0].endswith(".atp") or p.origin.rsplit(":", 1)[0] == plan.spec_file:
            counts["inline"] += 1
        else:
            counts["from " + p.origin.rsplit(":", 1)[0]] += 1
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _metric_text(m) -> str:
    if m is None:
        return "-"
    args = []
    for a in m.args:
        inner = a.field if a.field is not None else json.dumps(a.literal)
        args.append(f"first_token({inner})" if a.first_token else inner)
    call = f"{m.kind}({', '.join(args)})" if args else m.kind
    return f"{call} at {m.position}"


def _shown(path: str) -> str:
    """A path as the plan shows it: relative to the working folder when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return rel if not rel.startswith("..") and os.path.isabs(path) else path


def _model_text(plan: Plan, extras: dict) -> str:
    facts = []
    if "model_type" in extras:
        facts.append(str(extras["model_type"]))
    if "n_layers" in extras:
        facts.append(f"{extras['n_layers']} layers")
    desc = f"zoo {plan.model.source}" if plan.model.is_zoo else _shown(plan.model.source)
    return desc + (f" ({', '.join(facts)})" if facts else "")


def _method_text(plan: Plan) -> str:
    method = plan.method
    how = method.name
    if method.name == "atp*":
        parts = [f"qk_fix {'on' if method.qk_fix else 'off'}",
                 f"graddrop {'per ' + method.graddrop_mode if method.graddrop else 'off'}"]
        if method.norm_fix:
            parts.append("norm_fix on")
        how += f" ({', '.join(parts)})"
    how += f", aggregate {method.aggregate}"
    if plan.write_per_pair:
        how += ", keep per_pair"
    return how


def _about(plan: Plan, extras: dict, batches: int) -> Table:
    """What the plan scores and how: model, pairs, metric, method, seed, selection, verification, diagnostic."""
    about = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    about.add_column(style="bold")
    about.add_column()
    model = plan.model
    about.add_row("model", _model_text(plan, extras))
    settings = f"dtype {model.dtype}, device {model.device}, attention {model.attention}"
    if model.revision:
        settings += f", revision {model.revision}"
    about.add_row("", settings)
    about.add_row("pairs", f"{len(plan.pairs)} ({_origins(plan)}); batch {plan.batch} -> {batches} batch"
                           f"{'es' if batches != 1 else ''}")
    about.add_row("metric", _metric_text(plan.metric))
    if plan.eval_metric is not None:
        about.add_row("eval metric", _metric_text(plan.eval_metric))
    about.add_row("method", _method_text(plan))
    about.add_row("seed", str(plan.seed))
    if plan.selection is not None:
        about.add_row("select", f"{plan.selection.kind} {plan.selection.value:g}")
    if plan.verification is not None:
        about.add_row("verify", f"top {plan.verification.top}")
    if plan.diagnosis is not None:
        d = plan.diagnosis
        about.add_row("diagnose", f"false_negatives: {d.samples} samples, confidence {d.confidence:g},"
                                  f" inclusion {d.inclusion:g}")
    return about


def _nodes(plan: Plan) -> Table:
    groups = Table(title="nodes", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("kind", "layers", "indices", "positions", "line"):
        groups.add_column(col)
    for g in plan.nodes:
        if g.layers is None:
            layers = "all"
        else:
            layers = str(g.layers[0]) if g.layers[0] == g.layers[1] else f"{g.layers[0]}..{g.layers[1]}"
        if g.heads is None:
            idx = "all"
        else:
            idx = ", ".join(str(i) for i in g.heads[:8]) + (f", … ({len(g.heads)})" if len(g.heads) > 8 else "")
        groups.add_row(g.kind, layers, idx, "per position" if g.per_position else "summed",
                       str(g.where.line) if g.where else "")
    return groups


def _steps(plan: Plan, batches: int) -> Table:
    basis = cost_basis(plan.model.device, workload_of(plan) is not None)
    steps = Table(title=f"steps, in the order they run (cost in forward-equivalents per batch; {basis})",
                  box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, show_footer=True)
    steps.add_column("step", footer="total")
    steps.add_column("runs")
    total = sum(st.cost for st in plan.steps)
    steps.add_column("cost", justify="right", footer=_fmt_cost(total))
    steps.add_column("what", footer=f"x {batches} batch{'es' if batches != 1 else ''} ="
                                    f" {_fmt_cost(total * batches)} forward-equivalents")
    for st in plan.steps:
        steps.add_row(st.name, "each batch" if st.scope == "batch" else "once", _fmt_cost(st.cost), st.description)
    return steps


def _sites_and_exports(plan: Plan, console: Console) -> None:
    if plan.sites:
        shown = list(plan.sites[:12])
        console.print(Text(f"sites in forward order ({len(plan.sites)})", style="bold"))
        for s in shown:
            console.print(f"  {s}")
        if len(plan.sites) > len(shown):
            console.print(f"  … and {len(plan.sites) - len(shown)} more")
    else:
        console.print("sites: unknown until the model's config.json can be read")
    if plan.exports:
        exports = Table(title="exports", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        exports.add_column("format")
        exports.add_column("path")
        for e in plan.exports:
            exports.add_row(e.format, _shown(e.path))
        console.print(exports)


def _memory(plan: Plan, console: Console) -> None:
    """The memory plan (atpdsl.memory): each part of the peak on one device, the budget and the batch that fits."""
    from atpdsl.memory import format_bytes

    mem = dict(plan.extras).get("memory")
    if not mem:
        console.print("memory: unknown until the model's config.json can be read")
        return
    budget = format_bytes(mem["budget"]) if mem["budget"] else "unknown"
    each = f" (each of {mem['devices']} devices)" if mem.get("devices", 1) > 1 else ""
    table = Table(title=f"memory per device{each}: device {mem['device']}, budget {budget} ({mem['budget_source']}),"
                        f" attention {mem['attention']}", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False,
                  show_footer=True)
    table.add_column("part", footer="peak")
    table.add_column("size", justify="right", footer=format_bytes(mem["peak"]))
    fit = mem.get("largest_batch")
    fits = "" if fit is None else (f"; largest batch that fits: {fit}" if fit else "; no batch fits")
    table.add_column("what", footer=f"during the {mem['phase']}; batch {mem['batch']}, {mem['tokens']} positions"
                                    f"{fits}")
    for name, size, what in mem["parts"]:
        table.add_row(name, format_bytes(size), what)
    console.print(table)
    for note in mem.get("notes", ()):
        console.print(f"note: {note}")


def print_plan(plan: Plan, console: Console) -> None:
    """Print a plan as readable tables: what is scored, how, in which steps, and what it costs."""
    extras = dict(plan.extras)
    batches = extras.get("batches", 0)
    console.print(Text(f"Plan for {_shown(plan.spec_file)}", style="bold"))
    console.print(f"spec sha256 {plan.spec_hash[:16]}…")
    console.print(_about(plan, extras, batches))
    console.print(_nodes(plan))
    if "node_count" in extras:
        console.print(f"{extras['node_count']} nodes (per-position groups count once per token position)")
    console.print(_steps(plan, batches))
    _memory(plan, console)
    _sites_and_exports(plan, console)


def plan_text(plan: Plan, width: int = 100) -> str:
    """The plan as `atpdsl plan` prints it, without colour (for tests and logs)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, highlight=False, force_terminal=False,
                      soft_wrap=False)
    print_plan(plan, console)
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())
