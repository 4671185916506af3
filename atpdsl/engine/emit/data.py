"""The plan's data for the emitted program, taken from the engine's own preparation (atpdsl.engine.emit.prepare):
pairs as token ids, the node table, the sites each trace reads and the gradients it keeps (in the order the
backward reaches them), the steps, and what each correction's setup found. Plain lists, dicts and scalars only.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from atpdsl.arch import STAGES, Layout
from atpdsl.plan import MetricSpec
from atpdsl.engine.atp import trace_sites
from atpdsl.engine.context import merge_sites
from atpdsl.engine.edges import readers, write_matrix
from atpdsl.engine.emit.prepare import LEFT_OUT, Prepared
from atpdsl.engine.emit.source import IntRange
from atpdsl.engine.trace import TraceSite

__all__ = ["program_data"]

PATTERN_MADE = 25
"""Where an attention pattern is made inside its layer (arch.STAGES numbering: after q, k and v, before the output
projection), although its module hands it out after the output projection has run: its gradient comes earlier."""


def _layout(layout: Layout) -> list[int]:
    return [layout.count, layout.width, layout.start, layout.stride, layout.offset]


def _ints(values) -> list[int] | IntRange:
    """A list of ints, written as a range when it is a long run of consecutive numbers."""
    values = list(values)
    if len(values) > 8 and values == list(range(values[0], values[0] + len(values))):
        return IntRange(values[0], values[0] + len(values))
    return values


def _metric(spec: MetricSpec | None) -> dict | None:
    if spec is None:
        return None
    args = [{"field": a.field, "literal": a.literal, "first_token": a.first_token, "sequence": a.sequence}
            for a in spec.args]
    return {"kind": spec.kind, "args": args, "position": spec.position}


def _pairs(prep: Prepared) -> list[dict]:
    """Each pair as atpdsl encoded it (language/encoding.py's EncodedPair), with its prompts' text."""
    out = []
    for p, text in zip(prep.state.ctx.pairs, prep.plan.pairs):
        out.append({
            "origin": p.origin, "clean_text": text.clean, "corrupt_text": text.corrupt, "clean": list(p.clean),
            "corrupt": list(p.corrupt), "cmap": _ints(p.cmap), "metric_pos": p.metric_pos,
            "corrupt_metric_pos": p.corrupt_metric_pos, "eval_pos": p.eval_pos, "corrupt_eval_pos": p.corrupt_eval_pos,
            "answers": list(p.answers), "eval_answers": list(p.eval_answers),
            "slot_last": [[n, t] for n, t in p.slot_last], "tails": [list(t) for t in p.tails],
            "reads": [[r.row, r.clean_pos, r.corrupt_pos, r.token, r.arg] for r in p.reads],
            "eval_reads": [[r.row, r.clean_pos, r.corrupt_pos, r.token, r.arg] for r in p.eval_reads],
            "resolved": [[a.arg, a.text, list(a.ids), a.use] for a in p.resolved],
            "eval_resolved": [[a.arg, a.text, list(a.ids), a.use] for a in p.eval_resolved]})
    return out


def _blocks(prep: Prepared) -> list[dict]:
    """Node blocks as the engine's node table holds them (the program names nodes from them as the engine does)."""
    return [{"site": b.site, "kind": b.kind, "layout": _layout(b.layout), "units": _ints(b.units),
             "per_position": b.per_position, "first": b.first, "n_positions": b.n_positions,
             "group_size": b.group_size} for b in prep.state.ctx.table.blocks]


def _made(site: TraceSite, patterns: set[str]) -> tuple[int, int]:
    """When the tensor a site reads is made (forward order); its gradient arrives in the reverse order."""
    return (site.order[0], PATTERN_MADE) if site.key in patterns else site.order


def _grad_units(sites: list[TraceSite], wanted: set[str], patterns: set[str]) -> list[list[str]]:
    """The wanted keys grouped by the tensor they read, in the order the backward reaches those tensors."""
    units: dict[tuple, list[str]] = {}
    made: dict[tuple, tuple] = {}
    for i, s in enumerate(sites):
        if s.key in wanted:
            tensor = (s.module, s.source, s.attr, s.item)
            units.setdefault(tensor, []).append(s.key)
            made.setdefault(tensor, (_made(s, patterns), i))
    return [units[t] for t in sorted(units, key=lambda t: made[t], reverse=True)]


def _qk(prep: Prepared) -> dict | None:
    qk = prep.state.parts.get("qk")
    if qk is None:
        return None
    index = {id(b): i for i, b in enumerate(prep.state.ctx.table.blocks)}
    attention = prep.loaded.arch.template("heads").path(0).rsplit(".", 1)[0]
    layers = [{"layer": q.layer, "q_key": q.q_key, "k_key": q.k_key, "pattern_key": q.pattern_key, "scale": q.scale,
               "q_blocks": [index[id(b)] for b in q.q_blocks], "k_blocks": [index[id(b)] for b in q.k_blocks]}
              for q in qk.layers]
    return {"rotary_keys": None if qk.rotary_keys is None else list(qk.rotary_keys), "attention": attention,
            "q_layout": _layout(qk.q_layout), "k_layout": _layout(qk.k_layout), "layers": layers}


def _write_module(prep: Prepared, kind: str, site) -> str | None:
    """The module whose weight turns a fixed block's change into its residual write (as the norm fix's setup)."""
    arch = prep.loaded.arch
    if kind == "neurons":
        return site.module if site.attr == "input" else arch.neuron_proj.format(layer=site.layer)
    if kind in ("heads", "values", "queries", "keys"):
        return arch.template("heads").path(site.layer)
    return None


def _norm(prep: Prepared) -> dict | None:
    fix = prep.state.parts.get("norm")
    if fix is None:
        return None
    table, geom, hf = prep.state.ctx.table, prep.loaded.geom, prep.loaded.hf
    modules = {r.name: r.module for r in readers(prep.loaded)}
    index = {id(b): i for i, b in enumerate(table.blocks)}
    blocks = []
    for nb in fix.blocks:
        module = _write_module(prep, nb.block.kind, table.sites[nb.block.site])
        own = nb.block.kind in ("heads", "neurons")
        if (module is None) != (nb.columns is None) or module is not None and tuple(write_matrix(
                hf.get_submodule(module), nb.cols if own else _all_heads(geom)).shape) != tuple(nb.columns.shape):
            raise RuntimeError(f"internal: the norm fix's write matrix of {table.sites[nb.block.site].name} is not the "
                              f"emitted one; this is a bug in atpdsl")
        blocks.append({"block": index[id(nb.block)], "key": nb.key, "write_module": module, "own_columns": own,
                       "all_columns": geom.n_heads * geom.head_dim, "centered": nb.centered is not None,
                       "first_reader": nb.first_reader, "pattern_key": nb.pattern_key,
                       "unit_heads": None if nb.unit_heads is None else nb.unit_heads.tolist(),
                       "qk_layer": nb.qk_layer, "v_key": nb.v_key})
    rd = [{"name": r.name, "module": modules[r.name], "point": r.point, "in_key": r.in_key, "out_key": r.out_key,
           "where": list(r.where)} for r in fix.readers]
    return {"keep_suffix": fix.keep_suffix, "v_layout": _layout(fix.v_layout), "readers": rd, "blocks": blocks}


def _all_heads(geom) -> torch.Tensor:
    return torch.arange(geom.n_heads * geom.head_dim)


def _graddrop(prep: Prepared, sites: list[TraceSite], wanted: set[str], patterns: set[str]) -> dict | None:
    gd = prep.state.parts.get("graddrop")
    if gd is None:
        return None
    arch = prep.loaded.arch
    cuts, extra = [], {}
    for term in gd.terms:
        keys = []
        for side in sorted(term.sides):
            t = arch.template(side)
            key = f"{t.path(term.layer)}.{t.attr}"
            extra.setdefault(key, TraceSite(key=key, module=t.path(term.layer), attr=t.attr,
                                            order=(term.layer, STAGES[side])))
            keys.append(key)
        cuts.append(keys)
    have = {s.key for s in sites}
    merged = merge_sites(sites, [s for k, s in extra.items() if k not in have])
    places = [list(gd.places[i]) for i in range(len(prep.state.ctx.table.sites))]
    return {"mode": gd.mode, "terms": [{"layer": t.layer, "sides": sorted(t.sides)} for t in gd.terms],
            "places": places, "cut_writes": cuts, "reads": _reads(merged),
            "grad_units": _grad_units(merged, wanted | set(extra), patterns)}


def _reads(sites: list[TraceSite]) -> list[list]:
    return [[s.key, s.module, s.attr, s.item] for s in sites]


def program_data(prep: Prepared) -> dict:
    """Everything the program needs of the plan, as plain data."""
    state, loaded, plan = prep.state, prep.loaded, prep.plan
    ctx, parts = state.ctx, state.parts
    qk, norm = parts.get("qk"), parts.get("norm")
    qk_patterns = {q.pattern_key for q in qk.layers} if qk is not None else set()
    patterns = qk_patterns | ({nb.pattern_key for nb in norm.blocks if nb.pattern_key} if norm is not None else set())
    values = {s.name for s in ctx.table.sites} | patterns
    wanted = {s.name for s in ctx.table.sites} | qk_patterns  # the gradients the steps read
    if qk is not None:
        values |= {q.q_key for q in qk.layers} | {q.k_key for q in qk.layers} | set(qk.rotary_keys or ())
    if norm is not None:
        values |= {r.in_key for r in norm.readers} | {r.out_key for r in norm.readers}
        values |= {nb.v_key for nb in norm.blocks if nb.v_key}
        wanted |= {r.out_key for r in norm.readers}
    sites = [s for s in trace_sites(state) if s.key in values]
    model = {"source": prep.location, "revision": None if prep.local else plan.model.revision,
             "dtype": plan.model.dtype, "device": plan.model.device,
             "trust_remote_code": bool(plan.model.trust_remote_code), "parallel": loaded.parallel}
    return {
        "spec_file": plan.spec_file, "model": model, "geometry": asdict(loaded.geom), "method": asdict(plan.method),
        "metric": _metric(plan.metric), "eval_metric": _metric(plan.eval_metric), "batch": int(plan.batch),
        "seed": int(plan.seed), "pad_id": loaded.pad_id, "keep_rows": state.acc.keep_rows, "pairs": _pairs(prep),
        "positions": None if ctx.table.positions is None else {"mode": ctx.table.positions[0],
                                                               "names": list(ctx.table.positions[1])},
        "node_sites": [{"module": s.module, "attr": s.attr, "layer": s.layer} for s in ctx.table.sites],
        "blocks": _blocks(prep), "reads": _reads(sites), "grad_units": _grad_units(sites, wanted, patterns),
        "steps": [{"kind": s.kind, "name": s.name, "scope": s.scope, "params": dict(s.params)} for s in prep.kept],
        "left_out": [{"kind": s.kind, "name": s.name, "why": LEFT_OUT[s.kind]} for s in prep.left_out],
        "data": {"embed": loaded.arch.embed, "vocab_size": int(loaded.config.get("vocab_size") or 50000),
                 "qk_fix": _qk(prep), "norm_fix": _norm(prep),
                 "graddrop": _graddrop(prep, sites, wanted, patterns)},
    }
