"""AtP*'s QK fix and atpdsl's norm fix carried over to edges (`method atp* { qk_fix on  norm_fix on }`).

A plain edge score is first order everywhere between u's write and the metric. Two places break that most
(Kramár et al. 2024, arXiv 2403.00745, section 3, for the softmax; atpdsl.engine.normfix for the norms):

- norm fix: the target's input norm is taken exactly. The score is seed_v . (norm(x + dw_u) - norm(x)) with x
  the clean input of v's block and seed_v the gradient of v's own input at the norm's output (a head's q / k / v
  rows, a neuron's input rows, a block's norm-output gradient; every later block's for `L{m}.resid`);
- QK fix: an edge into a head's query or key changes that head's attention pattern. The head's query (key) is
  recomputed from norm(x + dw_u) through the projection and the rotary embedding, the pattern rows of the
  head's queries (all of them, or its own position's) are recomputed by an exact softmax, and the head's
  output changes by dz = (A' - A) v. The score is then dM/dz . dz, or with the norm fix on too, dz's write into
  the residual stream taken exactly through every later block's norm: sum_r h_r . (norm_r(x_r + D) - norm_r(x_r)),
  D = dz W_O (h_r the norm's output gradient), as the node norm fix does for a head's own write. With both on, an
  edge into a head's value is scored the same way (its dz = A dv is exact given the pattern).

Both need the clean gradient (they replace plain EAP's first-order products; with integrated gradients they are
not applied). Query, key and value sources keep their plain shares.
"""
from __future__ import annotations

import torch

from atpdsl.errors import EngineError
from atpdsl.names import NodeKind
from atpdsl.engine.edge_attention import head_outputs, per_head, rotate_queries, visible
from atpdsl.engine.edge_targets import CHANNEL_KIND, PassTargets
from atpdsl.engine.edges import QKV, TargetRow, read_point, reader_index, write_matrix, write_point
from atpdsl.engine.normfix import norm_map

__all__ = ["apply_fixes"]

_WIDE = torch.float64


class _Norms:
    """Exact norm differences norm_r(x_r + D) - norm_r(x_r) in float64 for the run's reader blocks."""

    def __init__(self, targets: PassTargets) -> None:
        self.t = targets
        self.maps: dict[int, object] = {}

    def change(self, reader: int, writes: torch.Tensor) -> torch.Tensor:
        """[rows, k, S, d] writes D -> [rows, k, S, d] changes of the reader's norm output."""
        norm = self.maps.get(reader)
        if norm is None:
            module = self.t.loaded.hf.get_submodule(self.t.sites.blocks[reader].module)
            try:
                norm = self.maps[reader] = norm_map(module, _WIDE)
            except EngineError:
                raise EngineError(f"norm fix for edges: cannot model the norm {type(module).__name__}; use "
                                  f"`norm_fix off`") from None
        x = self.t.reads.X[reader].to(_WIDE).unsqueeze(1)  # [rows, 1, S, d]
        return norm(x + writes.to(_WIDE)) - norm(x)


def _norm_fixed(pl, t: PassTargets, W: torch.Tensor, norms: _Norms, out: torch.Tensor) -> None:
    """Every residual-writing source's edges with the target's input norm taken exactly."""
    rows = pl.rows
    seeds, blocks = t.seeds(rows)
    for i in blocks:  # attn / mlp / logits / resid: the norm-output gradient of each reader it takes
        node = rows[i].node
        readers = ([r for r, b in enumerate(t.sites.blocks) if b.point >= 2 * node.layer + 2]
                   if node.kind is NodeKind.RESID else [reader_index(t.sites.blocks, node)])
        for r in readers:
            seeds.setdefault(r, []).append((i, t.only_at(t.reads.H[r], node.position)))
    fixed = torch.zeros_like(out)
    for r, items in seeds.items():
        first = _prefix(pl, t.sites.blocks[r].point, t.loaded.parallel)
        if not first:
            continue
        change = norms.change(r, W[:, :first])  # [rows, k, S, d]
        seed = torch.stack([y for _, y in items]).to(_WIDE)  # [n, rows, S, d]
        cols = torch.tensor([i for i, _ in items])
        fixed[:, :first].index_add_(2, cols, torch.einsum("rksd,nrsd->rkn", change, seed).to(fixed.dtype))
    qkv = torch.tensor([s.kind in QKV for s in pl.src.nodes])
    out[:, ~qkv] = fixed[:, ~qkv]


def _prefix(pl, point: int, parallel: bool) -> int:
    """How many sources (forward order) write at or before a residual point."""
    return sum(1 for s in pl.src.nodes if s.kind in QKV or write_point(s.kind, s.layer, parallel) <= point)


def _head_rows(pl, channels: tuple[str, ...]) -> list[int]:
    return [j for j, r in enumerate(pl.rows) if r.node.kind is NodeKind.HEAD and r.channel in channels]


def _patched_inputs(t: PassTargets, layer: int, W: torch.Tensor, first: int, channel: str) -> torch.Tensor:
    """[rows, k, units, S, d]: the rotated query (or key) each of the first `first` sources' writes produce."""
    x = t.reads.X[2 * layer]
    norm = t.loaded.hf.get_submodule(t.sites.blocks[2 * layer].module)
    proj = t.loaded.hf.get_submodule(t.loaded.arch.template(CHANNEL_KIND[channel]).path(layer))
    n_rows, seq = x.shape[0], x.shape[1]
    shifted = (x.unsqueeze(1) + W[:, :first].to(x.dtype)).reshape(n_rows * first, seq, -1)
    with torch.no_grad():
        out = proj(norm(shifted.to(t.loaded.dtype)))
    heads = per_head(out, t.layouts[channel])  # [rows * k, units, S, d]
    if channel != "v":
        tables = None if t.tables is None else tuple(x.repeat_interleave(first, dim=0) for x in t.tables)
        heads = rotate_queries(t.rotate, heads, tables)
    return heads.reshape(n_rows, first, *heads.shape[1:])


def _head_change(t: PassTargets, row: TargetRow, new: torch.Tensor) -> torch.Tensor:
    """[rows, k, S, d]: head output change when its query (key) is replaced by `new` [rows, k, S, d], at its
    query rows (all, or its position's)."""
    a = t.sites.attn[row.node.layer]
    vals, h, g = t.reads.values, row.node.index, row.node.index // t.rep
    q = rotate_queries(t.rotate, per_head(vals[a.q], t.layouts["q"]), t.tables)[:, h].unsqueeze(1)
    k = rotate_queries(t.rotate, per_head(vals[a.k], t.layouts["k"]), t.tables)[:, g].unsqueeze(1)
    v = per_head(vals[a.v], t.layouts["v"])[:, g].unsqueeze(1)
    seen = visible(t.batch.clean["attention_mask"])  # [rows, 1, S, S]
    q2, k2, v2 = (q.expand_as(new), k.expand_as(new), v.expand_as(new))
    q2, k2, v2 = (new if row.channel == c else x for c, x in (("q", q2), ("k", k2), ("v", v2)))
    change = head_outputs(q2, k2, v2, a.scale, seen) - head_outputs(q, k, v, a.scale, seen)  # [rows, k, S, dh]
    if row.node.position is None:
        return change
    keep = torch.zeros(change.shape[0], change.shape[2], dtype=change.dtype)
    keep[torch.arange(keep.shape[0]), t.rows_at(row.node.position)] = 1.0
    return change * keep[:, None, :, None]


def _qk_fixed(pl, t: PassTargets, W: torch.Tensor, norms: _Norms | None, out: torch.Tensor) -> None:
    """Edges into heads' queries and keys with the head's pattern recomputed exactly, and with the norm fix on
    also into values, the head's output change then taken through every later norm (see the module docstring)."""
    parallel = t.loaded.parallel
    for j in _head_rows(pl, ("q", "k") if norms is None else ("q", "k", "v")):
        row = pl.rows[j]
        layer = row.node.layer
        first = _prefix(pl, read_point(row.node, parallel), parallel)
        if not first:
            continue
        unit = row.node.index if row.channel == "q" else row.node.index // t.rep
        new = _patched_inputs(t, layer, W, first, row.channel)[:, :, unit]  # [rows, k, S, d]
        dz = _head_change(t, row, new)  # [rows, k, S, dh]
        if norms is None:
            gz = per_head(t.reads.grads[t.sites.attn[layer].z], t.loaded.arch.template("heads").resolve(
                t.loaded.geom))[:, row.node.index].unsqueeze(1)
            score = (dz * gz.to(_WIDE)).sum((-1, -2))
        else:
            mod = t.loaded.hf.get_submodule(t.loaded.arch.template("heads").path(layer))
            cols = torch.arange(*t.loaded.arch.template("heads").resolve(t.loaded.geom).columns(row.node.index))
            D = dz @ write_matrix(mod, cols).T.to(_WIDE)  # [rows, k, S, d]
            w = write_point(NodeKind.HEAD, layer, parallel)
            score = sum((norms.change(r, D) * t.reads.H[r].to(_WIDE).unsqueeze(1)).sum((-1, -2))
                        for r, b in enumerate(t.sites.blocks) if b.point >= w)
        keep = torch.tensor([s.kind not in QKV for s in pl.src.nodes[:first]])
        out[:, :first, j] = torch.where(keep, score.to(out.dtype), out[:, :first, j])


def apply_fixes(pl, targets: PassTargets, W: torch.Tensor, out: torch.Tensor, qk: bool, norm: bool) -> None:
    """Rewrite a batch's per-row scores `out` [rows, U, T] with the fixed ones (one gradient pass only)."""
    norms = _Norms(targets) if norm else None
    if norm:
        _norm_fixed(pl, targets, W, norms, out)
    if qk:
        _qk_fixed(pl, targets, W, norms, out)
