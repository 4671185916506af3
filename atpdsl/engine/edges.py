"""Edge attribution (EAP): how much each upstream node's write reaches the metric through each downstream reader.

Definition (one prompt pair, clean run, the plan's metric M):

    edge(u -> v) = (write_u(x_corrupt) - write_u(x_clean)) . dM/d(input of v, through v's block only)

`write_u` is what u adds to the residual stream: a head's z slice times its slice of the output projection,
a neuron's activation times its down-projection column, an attention or MLP block's output, the embedding
output (`embed`), the whole residual after a layer (`resid`). The input of v is the residual stream entering
v's block, taken only through that block's branch (its input norm), never through the skip path: the
attention block's input norm for attention-side nodes (heads, queries, keys, values, attn), the MLP block's
input norm for neurons and `mlp`, the final norm for `logits`. These are the "reader blocks"
`L{m}.attn-in`, `L{m}.mlp-in` and `logits`. The branch-only gradient is read by replacing each norm's input
with a clone (the clone has one consumer, the norm, so its gradient is that branch's alone).

The residual stream is a sum and position-wise, so the product is taken position by position and summed
(a write at position p reaches later positions only through attention inside a reader block, which the
block's branch gradient at p already carries, to first order), and because the
gradient at a write point is the sum of the branch gradients of every later reader, a node's products over
all later reader blocks add up to its node AtP estimate (`EdgeMatrix.totals`; tests/engine/test_edges.py
checks this to 1e-5 on GPT-2, parallel GPT-NeoX and grouped-query Llama).

Targets get block-level weights: every node reading one block (all heads, queries, keys, values and `attn`
of layer m; all neurons and `mlp` of layer m) shares that block's input gradient, so edges into them carry
the same weight. `L{m}.resid` reads everything downstream of its point: its in-edge weight is the sum over
the reader blocks after layer m (= u's write times the full gradient there). Queries, keys and values write
nothing to the residual stream: each has one out-edge, to its own head (or the heads of its KV group, each
edge carrying the group's whole estimate), or to its layer's `attn` when none of those heads is in the node
set, weighted by its plain AtP estimate.

Order: an edge runs from u to v only when u writes at or before the point v reads (`Reader.point`):
attention then MLP inside a sequential layer; in a parallel-residual layer (GPT-NeoX) the attention and the
MLP read the same point, so there is no edge between them; never from later to earlier. Positions: a
per-position node counts only its own position; between two per-position nodes an edge exists only at the
same position; a summed node pairs with a per-position one at that node's position. A per-position target
gets its block's input gradient at its position (block-level, like every target).

Cost per batch: one corrupt forward (reads only) and one clean forward with one backward, through the
engine's one generic trace (`trace.run_trace`, norm inputs patched with clones); then per source site one
matmul of the stacked reader gradients [2L+1, b, S, d] (held for the batch) onto the source's columns.
Edge weight = mean over pairs of the per-pair edge score (signed, same convention as node estimates).
The weights are plain first-order products: AtP*'s QK fix and GradDrop, and the norm fix, do not apply to edges.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from atpdsl.errors import EngineError
from atpdsl.circuit.graph import EDGE_SEMANTICS
from atpdsl.names import NodeId, NodeKind
from atpdsl.plan import NodeGroup, Plan
from atpdsl.circuit.scores import EdgeScore
from atpdsl.engine.context import Context, align
from atpdsl.engine.data import Batch, encode_pairs, make_batches, node_positions
from atpdsl.engine.load import Loaded, load_model
from atpdsl.engine.node_table import build_table, unit_columns, unit_values
from atpdsl.engine.trace import Backward, TraceSite, run_trace

__all__ = ["Reader", "EdgeMatrix", "edge_matrix", "edge_scores", "weighted_edges", "readers", "write_matrix",
           "EDGE_SEMANTICS"]

Progress = Callable[[str, int, int], None]


_ATTN_SIDE = (NodeKind.HEAD, NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE, NodeKind.ATTN)
_MLP_SIDE = (NodeKind.NEURON, NodeKind.MLP)
_QKV = (NodeKind.QUERY, NodeKind.KEY, NodeKind.VALUE)
_EMBED = NodeId(-1, NodeKind.EMBED)
_STAGE_ATTN_IN, _STAGE_MLP_IN = 5, 40  # between the arch.STAGES of the layer's sites


@dataclass(frozen=True, slots=True)
class Reader:
    """A block that reads the residual stream: `L{m}.attn-in`, `L{m}.mlp-in` or `logits`.

    `point` is the residual point it reads (2m before layer m's attention, 2m+1 after it; 2L at the end);
    `module` is its input norm.
    """

    name: str
    module: str
    layer: int
    point: int


def readers(loaded: Loaded) -> list[Reader]:
    """Every reader block of the model in forward order (EngineError for an architecture without norms listed)."""
    arch = loaded.arch
    if not (arch.attn_norm and arch.mlp_norm):
        raise EngineError(f"edge attribution does not know the block input norms of {arch.name} models "
                          f"(add attn_norm and mlp_norm to its entry in atpdsl/arch.py)")
    norms = (arch.attn_norm, arch.mlp_norm)
    parallel = loaded.parallel
    n = loaded.geom.n_layers
    out = []
    for m in range(n):
        out.append(Reader(f"L{m}.attn-in", norms[0].format(layer=m), m, 2 * m))
        out.append(Reader(f"L{m}.mlp-in", norms[1].format(layer=m), m, 2 * m if parallel else 2 * m + 1))
    out.append(Reader("logits", loaded.arch.final_norm, n, 2 * n))
    return out


def write_point(kind: NodeKind | str, layer: int, parallel: bool) -> int:
    """The residual point a node of `kind` in `layer` writes at (q/k/v: their attention's)."""
    kind = NodeKind(kind)
    if kind is NodeKind.EMBED:
        return 0
    if kind in _ATTN_SIDE:
        return 2 * layer + (2 if parallel else 1)
    return 2 * layer + 2


def _write_point(node: NodeId, parallel: bool) -> int:
    return write_point(node.kind, node.layer, parallel)


def _read_point(node: NodeId, parallel: bool) -> int:
    if node.kind is NodeKind.LOGITS:
        return 10**9  # after everything
    if node.kind in _ATTN_SIDE:
        return 2 * node.layer
    if node.kind in _MLP_SIDE:
        return 2 * node.layer + (0 if parallel else 1)
    return 2 * node.layer + 2  # resid


@dataclass(frozen=True)
class EdgeMatrix:
    """Per-pair products of every source's write with every reader block's branch gradient.

    `sources`: `embed` then the requested nodes (table order). `per_pair` [n_pairs, n_sources, n_readers]:
    summed over the source's positions (its own when per position), 0 where the reader is not after the
    source and for q/k/v (no residual write). `at` [n_sources, n_readers, P]: the mean over pairs at each
    per-position node position (None without per-position nodes). `qkv` [n_pairs, n_sources]: plain AtP
    estimates of the q/k/v sources (0 elsewhere).
    """

    sources: tuple[NodeId, ...]
    readers: tuple[Reader, ...]
    per_pair: torch.Tensor
    qkv: torch.Tensor
    at: torch.Tensor | None
    positions: tuple[int | str, ...]
    parallel: bool
    group_size: int
    seconds: float = 0.0

    @property
    def mean(self) -> torch.Tensor:
        """[n_sources, n_readers]: mean over pairs."""
        return self.per_pair.mean(0)

    def totals(self) -> torch.Tensor:
        """[n_pairs, n_sources]: each source's products summed over every reader block (= its node AtP)."""
        return self.per_pair.sum(-1)


def _groups(nodes: Sequence[NodeId]) -> tuple[NodeGroup, ...]:
    """Node groups that cover exactly the requested (layer, kind, units), per position or summed."""
    wanted: dict[tuple[int, str, bool], set[int]] = {}
    for n in nodes:
        if n.kind in (NodeKind.EMBED, NodeKind.LOGITS):
            continue
        units = wanted.setdefault((n.layer, n.kind.value, n.position is not None), set())
        if n.index is not None:
            units.add(n.index)
    groups = []
    for (layer, kind, per_position), units in sorted(wanted.items()):
        heads = tuple(sorted(units)) if kind not in ("attn", "mlp", "resid") else None
        groups.append(NodeGroup(kind, (layer, layer), heads, per_position))
    return tuple(groups)


def write_matrix(module: torch.nn.Module, cols: torch.Tensor) -> torch.Tensor:
    """[d_model, k]: a linear output projection restricted to its input columns `cols`. It maps a change at those
    inputs to the write into the residual stream, and (transposed) the gradient at the output back to them."""
    weight = module.weight
    if isinstance(module, torch.nn.Linear):
        return _f(weight[:, cols])
    if type(module).__name__ == "Conv1D":  # GPT-2: y = x @ W + b, W [in, out]
        return _f(weight[cols, :].T)
    raise EngineError(f"edge attribution: cannot project through {type(module).__name__} (expected a linear layer)")


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half and bfloat16 values are upcast; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(slots=True)
class _Setup:
    ctx: Context
    readers: list[Reader]
    cols: list[int]  # table column of each requested node (sources 1..)
    sources: list[NodeId]
    parallel: bool


def _setup(plan: Plan, loaded: Loaded, nodes: Sequence[NodeId]) -> _Setup:
    pairs = encode_pairs(loaded.tokenizer, plan.pairs, plan.metric, plan.eval_metric)
    if not pairs:
        raise EngineError("the plan has no prompt pairs")
    groups = _groups(nodes)
    positions = node_positions(pairs) if any(g.per_position for g in groups) else None
    table = build_table(loaded.arch, loaded.geom, groups, positions)
    batches = make_batches(pairs, plan.batch, loaded.pad_id, loaded.device, positions)
    sites = [TraceSite(key=s.name, module=s.module, attr=s.attr, order=s.order,
                       grad=any(k in ("queries", "keys", "values") for k in s.kinds)) for s in table.sites]
    ctx = Context(plan=plan, loaded=loaded, pairs=pairs, batches=batches, table=table, sites=sites)
    index = {n: i for i, n in enumerate(table.nodes)}
    cols, sources, seen = [], [_EMBED], set()
    for n in nodes:
        if n.kind in (NodeKind.EMBED, NodeKind.LOGITS) or n in seen:
            continue
        if n not in index:
            raise EngineError(f"edge attribution: node {n.name} is not in the model's node table")
        seen.add(n)
    for c, n in enumerate(table.nodes):  # table (forward) order
        if n in seen:
            cols.append(c)
            sources.append(n)
    return _Setup(ctx, readers(loaded), cols, sources, loaded.parallel)


def _per_position(vals: torch.Tensor, node_pos: torch.Tensor | None) -> torch.Tensor | None:
    """[R, b, S, u] -> [R, b, P, u] at the batch's node positions."""
    if node_pos is None:
        return None
    R, b, _, u = vals.shape
    idx = node_pos.view(1, b, -1, 1).expand(R, b, node_pos.shape[1], u)
    return vals.gather(2, idx)


def _edge_batch(st: _Setup, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One batch: (per-pair products [b, n_src, R], q/k/v estimates [b, n_src], per-position [b, n_src, R, P])."""
    ctx, loaded = st.ctx, st.ctx.loaded
    table = ctx.table
    n_layers = loaded.geom.n_layers
    emb = TraceSite("edges.embed", loaded.arch.embed, "output", grad=False, order=(-1, 0))
    reads = [TraceSite(f"edges.{r.name}", r.module, "input",
                       order=(r.layer, 0 if r.layer == n_layers else
                              (_STAGE_ATTN_IN if r.name.endswith("attn-in") else _STAGE_MLP_IN)))
             for r in st.readers]
    write_sites = [emb] + list(ctx.sites)
    clean_sites = sorted(write_sites + reads, key=lambda s: s.order)
    with torch.no_grad():
        corrupt = run_trace(ctx.model, batch.corrupt, write_sites)
    clone = {s.key: (lambda x: x.clone()) for s in reads}
    clean = run_trace(ctx.model, batch.clean, clean_sites, embed=ctx.embed, metric=ctx.metric_fn(batch),
                      patches=clone, backwards=[Backward()])
    grads = clean.grads["main"]
    G = torch.stack([_f(grads[s.key]) for s in reads])  # [R, b, S, d]
    R, b = G.shape[0], batch.size
    n_src = len(st.sources)
    P = batch.node_pos.shape[1] if batch.node_pos is not None else 0
    prod = torch.zeros((b, n_src, R), dtype=torch.float64)
    qkv = torch.zeros((b, n_src), dtype=torch.float64)
    at = torch.zeros((b, n_src, R, P), dtype=torch.float64) if P else None
    real = batch.real.unsqueeze(-1)

    def delta(key: str) -> torch.Tensor:
        return (_f(align(corrupt.acts[key], batch)) - _f(clean.acts[key])) * real

    def put(per_unit: torch.Tensor, columns: Sequence[tuple[int, int, int | None]],
            out: torch.Tensor, out_at: torch.Tensor | None) -> None:
        """Scatter a site's per-unit products [R, b, S, u] into rows `out` [b, n_src, R] (and `out_at`) for
        (source, unit, position index or None) columns."""
        tot = per_unit.sum(2).cpu().double()  # [R, b, u]
        pp = _per_position(per_unit, batch.node_pos)
        pp = None if pp is None else pp.cpu().double()  # [R, b, P, u]
        for src, ui, pos in columns:
            if pos is None:
                out[:, src] = tot[:, :, ui].T
                if out_at is not None:
                    out_at[:, src] = pp[:, :, :, ui].permute(1, 0, 2)
            else:  # a per-position node: its own position only
                out[:, src] = pp[:, :, pos, ui].T
                if out_at is not None:
                    out_at[:, src, :, pos] = pp[:, :, pos, ui].T

    d_emb = delta(emb.key)
    put((d_emb.unsqueeze(0) * G).sum(-1, keepdim=True), [(0, 0, None)], prod, at)
    src_of = {c: i + 1 for i, c in enumerate(st.cols)}
    for si, site in enumerate(table.sites):
        blocks = [bl for bl in table.blocks_at(si)
                  if any(c in src_of for c in range(bl.first, bl.first + bl.size))]
        if not blocks:
            continue
        d = delta(site.name)
        for bl in blocks:
            columns = []
            for c in range(bl.first, bl.first + bl.size):
                if c in src_of:
                    unit, pos = bl.locate(c)
                    columns.append((src_of[c], bl.units.index(unit), pos))
            if bl.kind in ("queries", "keys", "values"):  # no residual write: their own AtP estimate
                per_unit = unit_values(d * _f(grads[site.name]), bl.layout)[..., list(bl.units)]
                put(per_unit.unsqueeze(0), columns, qkv.unsqueeze(-1), None)
                continue
            if bl.kind in ("heads", "neurons"):
                cols = unit_columns(bl).to(d.device)
                module = (site.module if site.attr == "input"
                          else loaded.arch.neuron_proj.format(layer=site.layer))
                proj = G @ write_matrix(loaded.hf.get_submodule(module), cols)  # [R, b, S, k]
                per_unit = (d[..., cols].unsqueeze(0) * proj).unflatten(-1, (len(bl.units), bl.layout.width)).sum(-1)
            else:  # attn, mlp, resid: the whole vector is the write
                per_unit = (d.unsqueeze(0) * G).sum(-1, keepdim=True)
            put(per_unit, columns, prod, at)
    # A reader before the source's write sees none of it.
    points = torch.tensor([r.point for r in st.readers])
    valid = torch.stack([points >= _write_point(s, st.parallel) for s in st.sources])  # [n_src, R]
    valid[[i for i, s in enumerate(st.sources) if s.kind in _QKV]] = False
    prod *= valid
    if at is not None:
        at *= valid.unsqueeze(-1)
    return prod, qkv, at


def edge_matrix(plan: Plan, nodes: Sequence[NodeId], *, loaded: Loaded | None = None,
                progress: Progress | None = None) -> EdgeMatrix:
    """The per-pair products of `embed` and every node in `nodes` with every reader block (see module docstring)."""
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(plan.model)
    st = _setup(plan, loaded, nodes)
    rows, qkv_rows, at_sum = [], [], None
    n = len(st.ctx.batches)
    for i, batch in enumerate(st.ctx.batches):
        prod, qkv, at = _edge_batch(st, batch)
        rows.append(prod)
        qkv_rows.append(qkv)
        if at is not None:
            at_sum = at.sum(0) if at_sum is None else at_sum + at.sum(0)
        if progress:
            progress("edges", i + 1, n)
    per_pair = torch.cat(rows)
    positions = tuple(st.ctx.table.positions[1]) if st.ctx.table.positions else ()
    return EdgeMatrix(
        sources=tuple(st.sources),
        readers=tuple(st.readers),
        per_pair=per_pair,
        qkv=torch.cat(qkv_rows),
        at=None if at_sum is None else at_sum / per_pair.shape[0],
        positions=positions,
        parallel=st.parallel,
        group_size=loaded.geom.group_size,
        seconds=time.perf_counter() - t0,
    )


def _reads_of(m: EdgeMatrix, target: NodeId) -> list[int]:
    """The reader blocks whose products make up an edge into `target`."""
    names = [r.name for r in m.readers]
    if target.kind is NodeKind.LOGITS:
        return [names.index("logits")]
    if target.kind in _ATTN_SIDE:
        return [names.index(f"L{target.layer}.attn-in")]
    if target.kind in _MLP_SIDE:
        return [names.index(f"L{target.layer}.mlp-in")]
    return [i for i, r in enumerate(m.readers) if r.point >= 2 * target.layer + 2]  # resid: all downstream


def _qkv_heads(source: NodeId, group_size: int) -> tuple[int, ...]:
    if source.grouped:
        return tuple(range(source.index * group_size, (source.index + 1) * group_size))
    return (source.index,)


def _same_place(a: NodeId, b: NodeId) -> bool:
    return a.position is None or b.position is None or a.position == b.position


def weighted_edges(m: EdgeMatrix, targets: Sequence[NodeId]) -> list[EdgeScore]:
    """EdgeScores between the matrix's sources and `targets` (+ logits), by the rules of the module docstring."""
    logits = NodeId(10**6, NodeKind.LOGITS)
    wanted = set(targets)
    tgts = [t for t in m.sources if t in wanted] + [logits]  # table (forward) order
    # reader blocks making up each target's input: one matmul gives every (source, target) weight
    pick = torch.zeros((len(m.readers), len(tgts)), dtype=torch.float64)
    for k, t in enumerate(tgts):
        pick[_reads_of(m, t), k] = 1.0
    summed = (m.mean @ pick).tolist()  # [n_src, n_tgt]
    at_pos: list[list[float]] | None = None
    if m.at is not None:
        pos_index = {p: j for j, p in enumerate(m.positions)}
        cols = torch.tensor([pos_index.get(t.position, 0) for t in tgts])
        at_pos = (m.at[:, :, cols] * pick).sum(1).tolist()  # a summed source at each per-position target's place
    qkv_mean = m.qkv.mean(0).tolist()
    out: list[EdgeScore] = []
    for si, s in enumerate(m.sources):
        if s.kind in _QKV:
            heads = [t for t in tgts if t.kind is NodeKind.HEAD and t.layer == s.layer
                     and t.index in _qkv_heads(s, m.group_size) and _same_place(s, t)]
            if not heads:
                heads = [t for t in tgts if t.kind is NodeKind.ATTN and t.layer == s.layer and _same_place(s, t)]
            out.extend(EdgeScore(s.name, t.name, qkv_mean[si]) for t in heads)
            continue
        w_src = _write_point(s, m.parallel)
        for k, t in enumerate(tgts):
            if t == s or not _same_place(s, t):
                continue
            if t.kind is NodeKind.RESID:
                if not (w_src <= 2 * t.layer + 2 and (s.kind is not NodeKind.RESID or s.layer < t.layer)):
                    continue
            elif t.kind is not NodeKind.LOGITS and _read_point(t, m.parallel) < w_src:
                continue
            if t.position is not None and s.position is None:
                weight = at_pos[si][k]
            else:
                weight = summed[si][k]
            out.append(EdgeScore(s.name, t.name, weight))
    return out


def edge_scores(plan: Plan, nodes: Sequence[NodeId], *, loaded: Loaded | None = None,
                progress: Progress | None = None) -> tuple[EdgeScore, ...]:
    """Weighted edges among `nodes` plus `embed` and `logits` (mean over the plan's pairs; module docstring).

    Head, query, key, value and attn targets of one layer share the attention block's input gradient (and
    neuron and mlp targets the MLP block's), so they get the block-level weight.
    """
    m = edge_matrix(plan, nodes, loaded=loaded, progress=progress)
    return tuple(weighted_edges(m, nodes))
