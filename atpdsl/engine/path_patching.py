"""Exact path patching of edges: `verify edges top K`.

effect(u -> v, input c) = M(clean run in which only v's input c sees u's corrupt write) - M(clean run), per pair.

u's write (corrupt - clean, at u's own position when per position) is added to the clean residual stream at the
input of v's block, and only v's own input reads it: for a head, its query, key or value (or all three, the
whole edge) are recomputed from the block's norm of x + dw_u through the projection's rows, and the head's
output is recomputed from them with eager attention (every other head, and the head's other inputs, stay
clean; per position only the head's output at its own query changes); a neuron's own value from the MLP on the
norm of x + dw_u; a query, key or value node its projection columns; `attn`, `mlp` and `logits` their input
norm's input (the skip path stays clean). A query, key or value source has no residual write: its corrupt value
replaces the matching input of its own head only. Everything downstream of v runs for real, so the number
includes every nonlinearity (the norm, the softmax, later layers): the ground truth the edge scores estimate.

Batched like node verification (atpdsl.engine.exact): one clean forward holds many patched copies of the
batch, each copy patching one edge at one site. `L{m}.resid` targets and neurons of architectures whose MLP
module is not known are not path-patched (NaN).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from atpdsl.errors import EngineError
from atpdsl.names import NodeId, NodeKind
from atpdsl.engine.context import Context, merge_sites, metric_reads
from atpdsl.engine.edge_attention import head_outputs, per_head, rotate_queries, visible
from atpdsl.engine.edge_products import source_writes, sources_of
from atpdsl.engine.edge_sites import add_edge_sites
from atpdsl.engine.edge_targets import CHANNEL_KIND, Places
from atpdsl.engine.edges import QKV, TargetRow, reader_index
from atpdsl.engine.exact import BatchRefs, batch_refs, chunk_rows, inputs_of
from atpdsl.engine.metrics import metric_values
from atpdsl.engine.state import ExtraSites
from atpdsl.engine.trace import TraceSite, run_trace

__all__ = ["PathEdge", "path_patch", "verify_edges_step", "Z_TOLERANCE"]

Z_TOLERANCE = 1e-3
"""Largest relative gap (first batch) between a head's output recomputed from its clean q, k, v and the model's
own: a larger one means an attention variant the recomputation does not model."""


@dataclass(frozen=True, slots=True)
class PathEdge:
    """An edge to path-patch: a source and a target row (a head's row with channel "" patches all three inputs)."""

    source: NodeId
    row: TargetRow


@dataclass(slots=True)
class _Patch:
    """One copy's patch: at site `key`, `value` [rows, S, W] where `mask` [rows, S, W] is True."""

    key: str
    value: torch.Tensor
    mask: torch.Tensor


class _Batch:
    """One batch's clean and corrupt reads and what every patch of it shares."""

    def __init__(self, ctx: Context, sites, src, refs: BatchRefs, batch, cache: dict, check: bool) -> None:
        loaded = ctx.loaded
        self.ctx, self.loaded, self.sites, self.refs, self.batch, self.check = ctx, loaded, sites, refs, batch, check
        self.places = Places(batch, list(ctx.table.positions[1]) if ctx.table.positions else [])
        real = batch.real.unsqueeze(-1)
        keys = [site.name for site in src.table.sites] + [sites.embed_key]
        deltas = {k: (refs.corrupt[k].float() - refs.clean[k].float()) * real for k in keys}
        self.W, _ = source_writes(loaded, src, deltas, deltas[sites.embed_key], self.places, cache)
        self.index = {n: i for i, n in enumerate(src.nodes)}
        self.tables = None if sites.rotary is None else tuple(refs.clean[k] for k in sites.rotary)
        from atpdsl.engine.rotary import rotary_function

        self.rotate = rotary_function(loaded)
        self.seen = visible(batch.clean["attention_mask"])
        self.layouts = {c: loaded.arch.template(k).resolve(loaded.geom) for c, k in CHANNEL_KIND.items()}
        self.rep = loaded.geom.group_size
        self.checked: set[int] = set()

    def at(self, position) -> torch.Tensor:
        """Bool [rows, S] of a node's positions (every real one when summed)."""
        real = self.batch.real
        if position is None:
            return real
        one = torch.zeros_like(real)
        one[torch.arange(real.shape[0]), self.places.rows_at(position)] = True
        return one & real

    def normed(self, row: TargetRow, source: NodeId) -> torch.Tensor:
        """The target block's norm output when its input is x + dw_u (the clean input elsewhere)."""
        r = reader_index(self.sites.blocks, row.node)
        x = self.refs.clean[self.sites.in_keys[r]]
        module = self.loaded.hf.get_submodule(self.sites.blocks[r].module)
        with torch.no_grad():
            return module(x + self.W[:, self.index[source]].to(x.dtype))

    def projected(self, layer: int, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """q / k / v projection outputs (site layout) of a norm output y."""
        out = {}
        for c, kind in CHANNEL_KIND.items():
            t = self.loaded.arch.template(kind)
            with torch.no_grad():
                out[c] = self.loaded.hf.get_submodule(t.path(layer))(y)
        return out

    def _clean_qkv(self, layer: int) -> dict[str, torch.Tensor]:
        a = self.sites.attn[layer]
        return {"q": self.refs.clean[a.q], "k": self.refs.clean[a.k], "v": self.refs.clean[a.v]}

    def head_output(self, layer: int, head: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """z of one head [rows, S, d] from q / k / v projection outputs (site layout, pre-rotary)."""
        g = head // self.rep
        q = per_head(inputs["q"], self.layouts["q"])[:, head: head + 1]
        k = per_head(inputs["k"], self.layouts["k"])[:, g: g + 1]
        v = per_head(inputs["v"], self.layouts["v"])[:, g: g + 1]
        q = rotate_queries(self.rotate, q, self.tables)
        k = rotate_queries(self.rotate, k, self.tables)
        return head_outputs(q, k, v, self.sites.attn[layer].scale, self.seen)[:, 0]

    def check_heads(self, layer: int) -> None:
        """On the first batch: each head's output recomputed from the clean q, k, v is the model's own."""
        if not self.check or layer in self.checked:
            return
        self.checked.add(layer)
        z = per_head(self.refs.clean[self.sites.attn[layer].z], self.loaded.arch.template("heads").resolve(
            self.loaded.geom))
        for h in range(self.loaded.geom.n_heads):
            ours = self.head_output(layer, h, self._clean_qkv(layer))
            rows = self.batch.real.unsqueeze(-1)
            gap = float(((ours - z[:, h].double()) * rows).abs().max()) / max(float(z.abs().max()), 1e-12)
            if not gap <= Z_TOLERANCE:
                raise EngineError(f"path patching: head {h} of layer {layer} recomputed from its q, k, v differs "
                                  f"from the model's (relative gap {gap:.3g}); this attention variant is not modelled")

    # ------------------------------------------------------------------------------------------- patches
    def head_patch(self, edge: PathEdge) -> _Patch:
        t, s, c = edge.row.node, edge.source, edge.row.channel
        self.check_heads(t.layer)
        inputs = dict(self._clean_qkv(t.layer))
        if s.kind in QKV:
            ch = {NodeKind.QUERY: "q", NodeKind.KEY: "k", NodeKind.VALUE: "v"}[s.kind]
            cols = slice(*self.layouts[ch].columns(s.index))
            where = self.at(s.position).unsqueeze(-1)
            new = inputs[ch].clone()
            corrupt = self.refs.corrupt[getattr(self.sites.attn[t.layer], ch)]
            new[..., cols] = torch.where(where, corrupt[..., cols], new[..., cols])
            inputs[ch] = new
        else:
            patched = self.projected(t.layer, self.normed(edge.row, s))
            for ch in (("q", "k", "v") if c == "" else (c,)):
                inputs[ch] = patched[ch]
        z = self.head_output(t.layer, t.index, inputs)
        key = self.sites.attn[t.layer].z
        value = self.refs.clean[key].clone()
        lo, hi = self.loaded.arch.template("heads").resolve(self.loaded.geom).columns(t.index)
        mask = torch.zeros_like(value, dtype=torch.bool)
        mask[..., lo:hi] = self.at(t.position).unsqueeze(-1)
        value[..., lo:hi] = z.to(value.dtype)
        return _Patch(key, value, mask)

    def node_patch(self, edge: PathEdge) -> _Patch:
        """A query / key / value node target: its projection columns from the norm of x + dw_u."""
        t = edge.row.node
        ch = {NodeKind.QUERY: "q", NodeKind.KEY: "k", NodeKind.VALUE: "v"}[t.kind]
        value = self.projected(t.layer, self.normed(edge.row, edge.source))[ch]
        key = getattr(self.sites.attn[t.layer], ch)
        mask = torch.zeros_like(value, dtype=torch.bool)
        lo, hi = self.layouts[ch].columns(t.index)
        mask[..., lo:hi] = self.at(t.position).unsqueeze(-1)
        return _Patch(key, value, mask)

    def neuron_patch(self, edge: PathEdge) -> _Patch | None:
        """A neuron target: its value from the MLP run on the norm of x + dw_u (None without an MLP module)."""
        t = edge.row.node
        tmpl = self.loaded.arch.template("neurons")
        site_module = self.loaded.hf.get_submodule(tmpl.path(t.layer))
        mlp = self.loaded.hf.get_submodule(tmpl.path(t.layer).rsplit(".", 1)[0])
        if "MLP" not in type(mlp).__name__:
            return None
        caught = {}
        if tmpl.attr == "input":
            hook = site_module.register_forward_pre_hook(lambda m, a: caught.__setitem__("v", a[0]))
        else:
            hook = site_module.register_forward_hook(lambda m, a, o: caught.__setitem__("v", o))
        try:
            with torch.no_grad():
                mlp(self.normed(edge.row, edge.source))
        finally:
            hook.remove()
        key = f"{tmpl.path(t.layer)}.{tmpl.attr}"
        value = caught["v"].view(self.refs.clean[key].shape)
        mask = torch.zeros_like(value, dtype=torch.bool)
        mask[..., t.index] = self.at(t.position)
        return _Patch(key, value, mask)

    def block_patch(self, edge: PathEdge) -> _Patch | None:
        """attn / mlp / logits targets: their norm's input takes x + dw_u (attn at one position: not patched)."""
        t = edge.row.node
        if t.kind is NodeKind.RESID or edge.source.kind in QKV or (t.kind is NodeKind.ATTN and t.position is not None):
            return None
        r = reader_index(self.sites.blocks, t)
        key = self.sites.in_keys[r]
        x = self.refs.clean[key]
        dw = self.W[:, self.index[edge.source]].to(x.dtype)
        mask = self.at(t.position).unsqueeze(-1).expand_as(x)
        return _Patch(key, x + dw, mask)

    def patch(self, edge: PathEdge) -> _Patch | None:
        kind = edge.row.node.kind
        if kind is NodeKind.HEAD:
            return self.head_patch(edge)
        if kind in QKV:
            return self.node_patch(edge) if edge.source.kind not in QKV else None
        if kind is NodeKind.NEURON:
            return self.neuron_patch(edge) if edge.source.kind not in QKV else None
        return self.block_patch(edge)


def _reference_sites(ctx: Context, sources: Sequence[NodeId]):
    """Sites both reference runs read: the sources' node sites and what the edges' patches need."""
    loaded = ctx.loaded
    src = sources_of(loaded, sources, ctx.table.positions)
    base = [TraceSite(key=s.name, module=s.module, attr=s.attr, order=s.order, flat=s.flat) for s in src.table.sites]
    extra = ExtraSites({s.key for s in base})
    sites = add_edge_sites(loaded, extra)
    tmpl = loaded.arch.template("neurons")
    for layer in range(loaded.geom.n_layers):
        extra.add(f"{tmpl.path(layer)}.{tmpl.attr}", tmpl.path(layer), tmpl.attr, (layer, 50), grad=False)
    flat = loaded.arch.is_flat
    merged = merge_sites(base, [replace(s, flat=flat(s.module), grad=False) for s in extra.sites.values()])
    return src, sites, merged


def path_patch(ctx: Context, edges: Sequence[PathEdge], *, progress: Callable[[int, int], None] | None = None
               ) -> torch.Tensor:
    """Per-pair path-patching effects [n_pairs, len(edges)] (NaN for edges that cannot be path-patched), with the
    evaluation metric when the plan has one."""
    spec = ctx.plan.eval_metric or ctx.plan.metric
    eval_ = ctx.plan.eval_metric is not None
    src, sites, reads = _reference_sites(ctx, sorted({e.source for e in edges if e.source.kind is not NodeKind.EMBED}))
    out, cache = [], {}
    for i, batch in enumerate(ctx.batches):
        refs = batch_refs(ctx, batch, reads, spec, eval_=eval_)
        work = _Batch(ctx, sites, src, refs, batch, cache, check=i == 0)
        patches = [work.patch(e) for e in edges]
        out.append(_run_patches(ctx, batch, refs, patches, spec, eval_, reads))
        if progress:
            progress(i + 1, len(ctx.batches))
    return torch.cat(out) if out else torch.zeros((0, len(edges)), dtype=torch.float64)


def _run_patches(ctx: Context, batch, refs: BatchRefs, patches: list[_Patch | None], spec, eval_: bool,
                 reads: Sequence[TraceSite]) -> torch.Tensor:
    """[pairs, K]: each patch in its own copy of the clean batch, many copies per forward."""
    b = batch.n_rows
    out = torch.full((batch.size, len(patches)), float("nan"), dtype=torch.float64)
    live = [j for j, p in enumerate(patches) if p is not None]
    per_fwd = max(1, chunk_rows(ctx, batch) // b)
    metric = metric_reads(batch, eval_)
    by_key = {s.key: s for s in reads}
    for lo in range(0, len(live), per_fwd):
        chunk = live[lo: lo + per_fwd]
        k = len(chunk)
        sites, fns = [], {}
        for key in dict.fromkeys(patches[j].key for j in chunk):
            base = refs.clean[key]
            value = base.repeat(k, *([1] * (base.dim() - 1)))
            mask = torch.zeros_like(value, dtype=torch.bool)
            for copy, j in enumerate(chunk):
                if patches[j].key == key:
                    value[copy * b:(copy + 1) * b] = patches[j].value.to(value.dtype)
                    mask[copy * b:(copy + 1) * b] = patches[j].mask
            sites.append(by_key[key])
            fns[key] = _replacer(mask, value)
        sites.sort(key=lambda s: s.order)
        with torch.no_grad():
            res = run_trace(ctx.model, inputs_of(batch, k), sites, patches=fns, last_pos=metric.repeat(k).pos,
                            keep=False)
        values = metric_values(spec, res.last, metric.repeat(k), refs.clean_logprobs.repeat(k, 1))
        pairs = refs.clean_rows.shape[0]
        out[:, chunk] = (values.double().view(k, pairs) - refs.clean_rows.double().view(1, pairs)).T.cpu()
    return out


def _replacer(mask: torch.Tensor, value: torch.Tensor):
    """A patch function: `value` where `mask` is True, the run's own value elsewhere."""
    def patch(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, value.to(x.dtype), x)

    return patch


def verify_edges_step(state, step, work=None) -> None:
    """Path-patch the `top` strongest edges (their finest parts: a head's q / k / v parts, every other whole edge,
    and the whole edge into each head one of whose parts is checked) and record the effects on the edges."""
    from atpdsl.circuit.select import finest_edges
    from atpdsl.names import parse_node

    edges = list(state.edges)
    picked = finest_edges(edges)[: int(step.param("top"))]
    heads = {(edges[i].source, edges[i].target) for i in picked if edges[i].channel}
    picked += [i for i, e in enumerate(edges) if not e.channel and (e.source, e.target) in heads]
    if not picked:
        return
    todo = [PathEdge(parse_node(edges[i].source), TargetRow(parse_node(edges[i].target), edges[i].channel))
            for i in picked]

    def tick(done: int, total: int) -> None:
        state.report("verify edges", done, total)

    effects = path_patch(state.ctx, todo, progress=tick).mean(0)
    skipped = []
    for i, value in zip(picked, effects.tolist()):
        if math.isnan(value):  # this kind of edge is not path-patched
            skipped.append(f"{edges[i].source}->{edges[i].target}")
            continue
        edges[i] = replace(edges[i], verified=float(value))
    state.edges = tuple(edges)
    state.extras["edge_verification"] = {"checked": len(picked) - len(skipped), "not_path_patched": skipped}
