"""Edge scores from kept reads: each source's write times each target row's own input gradient, per pair.

Per batch: the sources' writes into the residual stream [U, rows, S, d] (from the node sites' differences and
the output projections), the target rows' gradients [T, rows, S, d] (atpdsl.engine.edge_targets, averaged over
the gradient passes: one, or one per integrated-gradients step), one batched product per reader point over the
sources written before it; queries, keys and values (no residual write) against their heads' own projection-space
gradients. Positions decide which edges exist (atpdsl.engine.edges.linked, `reach`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from atpdsl.errors import EngineError
from atpdsl.names import NodeId, NodeKind
from atpdsl.engine.data import pair_sum
from atpdsl.engine.edge_fixes import apply_fixes
from atpdsl.engine.edge_sites import EdgeSites
from atpdsl.engine.edge_targets import PassTargets, Places
from atpdsl.engine.edges import (
    EMBED_NODE, QKV, EdgeMatrix, TargetRow, link_matrix, node_groups, qkv_heads, reach, read_point, target_rows,
    wide, write_matrix, write_point,
)
from atpdsl.engine.load import Loaded
from atpdsl.engine.node_table import build_table

__all__ = ["Sources", "sources_of", "source_writes", "matrix_from_reads"]


@dataclass(slots=True)
class Sources:
    """The selected nodes as edge sources: a node table covering them, `embed` first then table order."""

    table: object
    cols: list[int]
    nodes: list[NodeId]


def sources_of(loaded: Loaded, nodes: Sequence[NodeId], positions) -> Sources:
    """Sources in table (forward) order; EngineError for a node the model's table does not have."""
    table = build_table(loaded.arch, loaded.geom, node_groups(nodes), positions)
    index = {n: i for i, n in enumerate(table.nodes)}
    seen = set()
    for n in nodes:
        if n.kind in (NodeKind.EMBED, NodeKind.LOGITS):
            continue
        if n not in index:
            raise EngineError(f"edge attribution: node {n.name} is not in the model's node table")
        seen.add(n)
    cols, out = [], [EMBED_NODE]
    for c, n in enumerate(table.nodes):
        if n in seen:
            cols.append(c)
            out.append(n)
    return Sources(table, cols, out)


def _position_mask(targets: Places, nodes: Sequence[NodeId], shape: tuple[int, int]) -> torch.Tensor:
    """[rows, n, S]: 1 where each node has a value (every position when summed, its own when per position)."""
    rows, seq = shape
    mask = torch.ones((rows, len(nodes), seq), device=targets.batch.real.device)
    for i, node in enumerate(nodes):
        if node.position is not None:
            mask[:, i] = 0.0
            mask[torch.arange(rows), i, targets.rows_at(node.position)] = 1.0
    return mask


def _block_writes(loaded: Loaded, site, bl, units: list[int], d: torch.Tensor, cache: dict) -> torch.Tensor:
    """[rows, n, S, d]: the residual writes of a heads / neurons block's units (one einsum through the output
    projection's columns, stacked once per block and kept in `cache`)."""
    key = (site.name, bl.kind, tuple(units))
    mats = cache.get(key)
    if mats is None:
        module = site.module if site.attr == "input" else loaded.arch.neuron_proj.format(layer=site.layer)
        mod = loaded.hf.get_submodule(module)
        mats = cache[key] = torch.stack([write_matrix(mod, torch.arange(*bl.layout.columns(u))).T for u in units])
    cols = torch.cat([torch.arange(*bl.layout.columns(u)) for u in units])
    sel = d[..., cols].unflatten(-1, (len(units), -1))  # [rows, S, n, w]
    return torch.einsum("rsnw,nwd->rnsd", sel, mats.to(d.dtype))


def source_writes(loaded: Loaded, src: Sources, deltas: dict, d_emb: torch.Tensor, targets: Places, cache: dict,
                  live: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Residual writes [rows, U, S, d] (zero for q/k/v; only at the positions `live` when given) and each q/k/v
    source's own columns' change [rows, S, dh] (every position)."""
    dtype = torch.promote_types(wide(d_emb).dtype, loaded.dtype)
    cut = (lambda x: x) if live is None else (lambda x: x[:, live])  # the positions kept
    W = torch.zeros((d_emb.shape[0], len(src.nodes), *cut(d_emb).shape[1:]), dtype=dtype, device=d_emb.device)
    W[:, 0] = cut(d_emb)
    own: dict[int, torch.Tensor] = {}
    where = {c: i + 1 for i, c in enumerate(src.cols)}
    for si, site in enumerate(src.table.sites):
        full = deltas[site.name].to(dtype)
        d = cut(full)
        for bl in src.table.blocks_at(si):
            picked = [(where[c], bl.locate(c)[0]) for c in range(bl.first, bl.first + bl.size) if c in where]
            if not picked:
                continue
            idx = [i for i, _ in picked]
            mask = None
            if bl.per_position:
                mask = _position_mask(targets, [src.nodes[i] for i in idx], full.shape[:2]).to(dtype).unsqueeze(-1)
            if bl.kind in ("queries", "keys", "values"):
                for n, (i, unit) in enumerate(picked):
                    part = full[..., slice(*bl.layout.columns(unit))]
                    own[i] = part if mask is None else part * mask[:, n]
                continue
            if mask is not None:
                mask = mask[:, :, live] if live is not None else mask
            if bl.kind in ("heads", "neurons"):
                write = _block_writes(loaded, site, bl, [u for _, u in picked], d, cache)
            else:  # attn, mlp, resid: the whole vector is the write
                write = d.unsqueeze(1).expand(-1, len(idx), -1, -1)
            at = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else idx
            W[:, at] = write if mask is None else write * mask
    return W, own


def _live_positions(deltas: dict, d_emb: torch.Tensor) -> torch.Tensor:
    """Bool [S]: positions where the embedding or some node site changes between the prompts in some row."""
    live = d_emb.ne(0).any(-1).any(0)
    for d in deltas.values():
        live |= d.ne(0).any(-1).any(0)
    return live


def _qkv_grad(targets: PassTargets, source: NodeId, row: TargetRow) -> torch.Tensor:
    """[rows, S, dh]: the gradient a q/k/v source meets through a head row, or through `attn` (its heads)."""
    if row.node.kind is NodeKind.HEAD:
        (piece,) = targets.head_pieces(source.layer, [row.node.index], row.channel, row.node.position)
        return piece.grad
    channel = {NodeKind.QUERY: "q", NodeKind.KEY: "k", NodeKind.VALUE: "v"}[source.kind]
    if row.node.position is None:  # every head of the unit, every query: the projection's own gradient
        return targets.node_piece(NodeId(source.layer, source.kind, source.index)).grad
    heads = qkv_heads(source, targets.loaded.geom.group_size)
    return sum(p.grad for p in targets.head_pieces(source.layer, heads, channel, row.node.position))


@dataclass(slots=True)
class _Plan:
    """What is fixed across batches: sources, rows, order links, the per-point groups and q/k/v links."""

    src: Sources
    rows: list[TargetRow]
    order: torch.Tensor  # bool [U, T]
    groups: list[tuple[int, list[int]]]  # (sources written before it: a prefix, row indices) per reader point
    qkv_links: list[tuple[int, int]]
    cache: dict = field(default_factory=dict)  # stacked output-projection columns per source block


def _plan(loaded: Loaded, src: Sources, targets: Sequence[NodeId]) -> _Plan:
    rows = target_rows(targets)
    parallel = loaded.parallel
    order = link_matrix(src.nodes, rows, parallel, loaded.geom.group_size)
    by_point: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        by_point.setdefault(10**9 if r.node.kind is NodeKind.RESID else read_point(r.node, parallel), []).append(j)
    writes = [write_point(s.kind, s.layer, parallel) for s in src.nodes]
    if any(a > b for a, b in zip(writes, writes[1:])):
        raise EngineError("internal: edge sources are not in forward order")
    groups = []
    for point, cols in sorted(by_point.items()):
        first = sum(1 for w in writes if w <= point)
        if first:
            groups.append((first, cols))
    qkv_links = [(i, j) for i, s in enumerate(src.nodes) if s.kind in QKV for j in range(len(rows)) if order[i, j]]
    return _Plan(src, rows, order, groups, qkv_links)


def _place_links(pl: _Plan, targets: PassTargets) -> torch.Tensor:
    """bool [U, T]: edges whose positions meet in some row of this batch (per-position nodes)."""
    out = torch.ones_like(pl.order)
    pos = targets.batch.node_pos
    if pos is None:
        return out
    same = (pos[:, :, None] == pos[:, None, :]).any(0).cpu()  # [P, P]: positions i and j coincide in some row
    before = (pos[:, :, None] <= pos[:, None, :]).any(0).cpu()
    index = targets.pos_index
    srcs = [(i, index[s.position]) for i, s in enumerate(pl.src.nodes) if s.position is not None]
    rows = [(j, index[r.node.position], reach(r) == "upto") for j, r in enumerate(pl.rows)
            if r.node.position is not None]
    if srcs and rows:
        si, sp = (torch.tensor(x) for x in zip(*srcs))
        rj, rp, upto = (torch.tensor(x) for x in zip(*rows))
        meet = torch.where(upto[None, :], before[sp][:, rp], same[sp][:, rp])
        out[si[:, None], rj[None, :]] = meet
    return out


def _batch_scores(loaded: Loaded, pl: _Plan, passes: list[PassTargets], deltas: dict, d_emb: torch.Tensor,
                  blocks: bool, fixes: tuple[bool, bool] = (False, False)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row scores [rows, U, T] (and reader-block products [rows, U, R]) for one batch."""
    live = _live_positions(deltas, d_emb)  # where some source's change is not 0: elsewhere every product is 0
    W, own = source_writes(loaded, pl.src, deltas, d_emb, passes[0], pl.cache, live)  # [rows, U, S', d]
    n_rows, U, T = d_emb.shape[0], len(pl.src.nodes), len(pl.rows)
    out = torch.zeros((n_rows, U, T), dtype=torch.float64, device=d_emb.device)
    flat = W.flatten(2)  # [rows, U, S'*d]
    for first, cols in pl.groups:
        G = sum(p.residual([pl.rows[j] for j in cols], live) for p in passes) / len(passes)  # [t, rows, S', d]
        g = G.flatten(2).permute(1, 2, 0).to(flat.dtype)  # [rows, S'*d, t]
        out[:, :first, torch.tensor(cols)] = (flat[:, :first] @ g).double()
        if not any(fixes):  # the fixes read every row again; without them no later group reads this layer's split
            for p in passes:
                p.release_splits()
    for i, j in pl.qkv_links:
        grad = sum(_qkv_grad(p, pl.src.nodes[i], pl.rows[j]) for p in passes) / len(passes)
        out[:, i, j] = (own[i] * grad).sum((1, 2)).double()
    if (any(fixes) and len(passes) == 1) or blocks:
        W, _ = source_writes(loaded, pl.src, deltas, d_emb, passes[0], pl.cache)  # every position
    if any(fixes) and len(passes) == 1:
        apply_fixes(pl, passes[0], W, out, *fixes)
    reader_products = None
    if blocks:
        G = sum(p.reads.G for p in passes) / len(passes)  # [R, rows, S, d]
        reader_products = torch.einsum("rusd,krsd->ruk", W.double(), G.double())
        points = torch.tensor([r.point for r in passes[0].sites.blocks])
        writes = torch.tensor([write_point(s.kind, s.layer, loaded.parallel) if s.kind not in QKV else 10**9
                               for s in pl.src.nodes])
        reader_products *= (points[None, :] >= writes[:, None]).to(reader_products.dtype)
    return out, reader_products


def matrix_from_reads(loaded: Loaded, sites: EdgeSites, nodes: Sequence[NodeId], reads: Iterable, positions,
                      *, keep_pairs: bool = False, check: bool = True, fixes: tuple[bool, bool] = (False, False)
                      ) -> EdgeMatrix:
    """The EdgeMatrix of `embed` and `nodes` (sources) against `nodes` and `logits` (targets) from kept reads
    (atpdsl.engine.edge_reads.EdgeReads, one per batch); `fixes` = (QK fix, norm fix) for the edges
    (atpdsl.engine.edge_fixes; plain gradient passes only)."""
    from atpdsl.engine.rotary import rotary_function

    src = sources_of(loaded, nodes, positions)
    pl = _plan(loaded, src, [n for n in src.nodes[1:]])
    rotate = rotary_function(loaded)
    names = list(positions[1]) if positions else []
    total = torch.zeros(pl.order.shape, dtype=torch.float64)
    place = torch.zeros_like(pl.order) if any(s.position is not None for s in src.nodes) else torch.ones_like(pl.order)
    pairs, blocks, n_pairs, steps = [], [], 0, 0
    for k, r in enumerate(reads):
        passes = [PassTargets(loaded, sites, p, r.batch, names, r.tables, rotate, check=check and k == 0,
                              mats=pl.cache)
                  for p in r.passes]
        steps = max(steps, len(r.passes) if r.ig else 0)
        scores, reader_products = _batch_scores(loaded, pl, passes, r.deltas, r.d_emb, keep_pairs, fixes)
        per_pair = pair_sum(r.batch, scores).cpu()
        total += per_pair.sum(0)
        n_pairs += per_pair.shape[0]
        place |= _place_links(pl, passes[0])
        if keep_pairs:
            pairs.append(per_pair)
            blocks.append(pair_sum(r.batch, reader_products).cpu())
    return EdgeMatrix(
        sources=tuple(src.nodes), rows=tuple(pl.rows), total=total, linked=pl.order & place, n_pairs=n_pairs,
        readers=tuple(sites.blocks), per_pair=torch.cat(pairs) if keep_pairs else None,
        blocks=torch.cat(blocks) if keep_pairs else None, ig_steps=steps,
    )
