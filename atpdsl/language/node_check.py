"""Check a `nodes { ... }` block: known kinds, layer and index ranges against the model's sizes (or sane caps
when the model is not on disk), no group overlapping another."""
from __future__ import annotations

from typing import Any

from atpdsl.language import syntax as n
from atpdsl.language.diagnostics import Diagnostic, cap_list, did_you_mean, error, quote
from atpdsl.registry import ENDPOINT_KINDS, NODE_KINDS

__all__ = ["group_indices", "check_nodes", "MAX_INDICES", "MAX_LAYER", "MAX_INDEX"]

MAX_INDICES = 1_000_000  # an index range larger than this is a typo, not a request
MAX_LAYER = 100_000  # no model is this deep: a larger layer is a typo (and would make costing hang)
MAX_INDEX = 100_000_000  # no layer has this many heads or neurons


def _one_of(names) -> str:
    return cap_list([quote(x) for x in names])


def group_indices(group: n.Group) -> set[int] | None:
    """The indices a node group names (None: all); assumes the checker accepted the ranges."""
    if group.indices is None:
        return None
    out: set[int] = set()
    for r in group.indices:
        lo, hi = r.bounds
        out.update(range(lo, hi + 1))
    return out


def _unknown_kind(g: n.Group) -> Diagnostic:
    kind = g.kind.name
    if kind in ENDPOINT_KINDS:
        return error("E601", f"{quote(kind)} is a graph endpoint, not a node kind to score", g.kind.span,
                     f"node kinds: {_one_of(NODE_KINDS)}")
    guess = did_you_mean(kind, list(NODE_KINDS) + ["layers"])
    if guess == "layers":
        hint = "did you mean `layers`? write it after the node kind: `heads layers 0..3`"
    elif guess is not None:
        hint = f"did you mean {quote(guess)}?"
    else:
        hint = f"node kinds: {_one_of(NODE_KINDS)}"
    return error("E601", f"unknown node kind {quote(kind)}", g.kind.span, hint)


def _layer_problems(g: n.Group, geom: Any) -> list[Diagnostic]:
    out = [error("E105", "`layers` is given twice in one node group", extra.span) for extra in g.layers[1:]]
    out += [error("E105", "`per position` is given twice in one node group", extra) for extra in g.per_position[1:]]
    if g.layers:
        r = g.layers[0]
        lo, hi = r.bounds
        where = r.hi.span if r.hi else r.lo.span
        hi_shown = (r.hi or r.lo).shown
        if lo > hi:
            out.append(error("E602", f"layer range {lo}..{hi} is reversed", r.span, f"write {hi}..{lo}"))
        elif geom is not None and hi >= geom.n_layers:
            out.append(error("E603", f"layer {hi_shown} is out of range: the model has {geom.n_layers} layers"
                                     f" (0..{geom.n_layers - 1})", where))
        elif hi > MAX_LAYER:
            out.append(error("E603", f"layer {hi_shown} is out of range: no model has more than {MAX_LAYER} layers",
                             where))
    return out


def unit_count(kind: str, geom: Any) -> tuple[str, int | None]:
    """What a kind's indices count, and how many the model has (None when unknown)."""
    if kind == "neurons":
        return "neuron", geom.mlp if geom else None
    if kind in ("keys", "values") and geom is not None and geom.grouped:
        return "KV group", geom.n_kv_heads
    return "head", geom.n_heads if geom else None


def _index_problems(g: n.Group, unit_named: str | None, geom: Any) -> list[Diagnostic]:
    if g.indices is None:
        return []
    if unit_named is None:
        return [error("E606", f"{quote(g.kind.name)} nodes have no index: each layer has one", g.indices[0].span,
                      "drop the numbers, or use `heads`/`neurons` for parts of a layer")]
    unit, count = unit_count(g.kind.name, geom)
    out: list[Diagnostic] = []
    total = 0
    for r in g.indices:
        lo, hi = r.bounds
        if lo > hi:
            out.append(error("E607", f"index range {lo}..{hi} is reversed", r.span, f"write {hi}..{lo}"))
            continue
        total += hi - lo + 1
        if count is not None and hi >= count:
            out.append(error("E604", f"{unit} {(r.hi or r.lo).shown} is out of range: the model has {count} {unit}s"
                                     f" (0..{count - 1})",
                             r.hi.span if r.hi else r.lo.span))
    if total > MAX_INDICES:
        out.append(error("E607", f"{total} indices in one group is too many (at most {MAX_INDICES})",
                         g.indices[0].span.to(g.indices[-1].span)))
    elif count is None:  # sizes unknown offline: only a sanity cap
        for r in g.indices:
            if r.bounds[1] >= MAX_INDEX:
                out.append(error("E604", f"{unit} {(r.hi or r.lo).shown} is out of range: no layer has {MAX_INDEX}"
                                         f" {unit}s",
                                 r.hi.span if r.hi else r.lo.span))
    return out


def _check_group(g: n.Group, geom: Any, arch: Any) -> list[Diagnostic]:
    info = NODE_KINDS.get(g.kind.name)
    if info is None:
        return [_unknown_kind(g)]
    out = _layer_problems(g, geom) + _index_problems(g, info.unit, geom)
    if arch is not None and g.kind.name not in arch.kinds:
        out.append(error("E609", f"{arch.name} models have no {quote(g.kind.name)} nodes", g.kind.span,
                         f"this architecture has {_one_of(arch.kinds)}"))
    return out


def _overlaps(groups: list[n.Group]) -> list[Diagnostic]:
    out = []
    for k, g in enumerate(groups):
        for h in groups[:k]:
            if h.kind.name != g.kind.name or bool(h.per_position) != bool(g.per_position):
                continue
            ga = g.layers[0].bounds if g.layers else None
            ha = h.layers[0].bounds if h.layers else None
            if ga is not None and ha is not None and (ga[1] < ha[0] or ha[1] < ga[0]):
                continue
            gi, hi = group_indices(g), group_indices(h)
            if gi is not None and hi is not None and not (gi & hi):
                continue
            hints = [f"the earlier group is at {h.span.line}:{h.span.column}"]
            if h.indices is None and g.indices is not None and h.layers and not g.layers:
                idx = ", ".join(f"{r.lo.text}..{r.hi.text}" if r.hi else r.lo.text for r in g.indices)
                lay = h.layers[0]
                lay_text = f"{lay.lo.text}..{lay.hi.text}" if lay.hi else lay.lo.text
                hints.append(f"to pick {g.kind.name} {idx} in layers {lay_text}, write"
                             f" `{g.kind.name} {idx} layers {lay_text}`")
            out.append(error("E605", f"these {quote(g.kind.name)} nodes overlap an earlier group", g.span, *hints))
            break
    return out


def check_nodes(stmt: n.Nodes, head: Any, geom: Any, arch: Any) -> list[Diagnostic]:
    """Every problem of a nodes block (`head`: the span of its keyword)."""
    if not stmt.groups:
        return [error("E608", "empty `nodes` block", head, "list node kinds, e.g. `nodes { heads  neurons layers 0..3 }`")]
    out: list[Diagnostic] = []
    good: list[n.Group] = []
    for g in stmt.groups:
        found = _check_group(g, geom, arch)
        out.extend(found)
        if not any(d.is_error for d in found):
            good.append(g)
    return out + _overlaps(good)
