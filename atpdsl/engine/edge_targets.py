"""Each edge target's own input gradient, for one batch and one gradient pass.

A target row is a node and, for a head, one of its inputs (`q`, `k`, `v`). Its gradient lives in two places:

- in the projection's output space (`pieces`): for a head's query the gradient at its own query columns; for
  its key or value the head's own share (atpdsl.engine.edge_attention), through every query (a summed head) or
  through its own query only (a per-position head); for a query, key or value node the gradient at its columns;
- in the residual stream, at the input of the block that reads it (`residual`): the pieces pulled back through
  their projection rows and through the block's input norm at its clean input. A neuron's input is its rows of
  the MLP's input projections; `attn`, `mlp` and `logits` take their block's branch gradient (an `attn` node at
  one position: the sum of its heads at that position); `L{m}.resid` the sum of every later block's.

Summed over all heads and inputs, the rows of one attention block give back the block's branch gradient (the
norm's output feeds only the q / k / v projections), and so do all neurons of an MLP: the invariant
tests/engine/test_edges_targets.py checks.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from atpdsl.errors import EngineError
from atpdsl.names import NodeId, NodeKind
from atpdsl.engine.data import Batch
from atpdsl.engine.edge_attention import AttnSplit, per_head, rotate_queries
from atpdsl.engine.edge_sites import EdgeSites, PassReads
from atpdsl.engine.edges import TargetRow, reader_index
from atpdsl.engine.load import Loaded

__all__ = ["Piece", "PassTargets", "read_matrix", "SPLIT_TOLERANCE"]

SPLIT_TOLERANCE = 1e-3
"""Largest relative gap accepted (first batch) between the heads' key / value shares summed and the gradient the
model's own backward gives at the projection: a larger gap means an attention variant the split does not model."""

_CHANNEL_KIND = {"q": "queries", "k": "keys", "v": "values"}
_NODE_CHANNEL = {NodeKind.QUERY: "q", NodeKind.KEY: "k", NodeKind.VALUE: "v"}


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a row's input: the gradient `grad` [rows, S, d_head] at the columns of `unit` of a q / k / v
    projection (`channel`) in `layer`."""

    layer: int
    channel: str
    unit: int
    grad: torch.Tensor


def read_matrix(module: torch.nn.Module, cols: torch.Tensor) -> torch.Tensor:
    """[k, d]: the rows of an input projection that produce output columns `cols` (pulls a gradient at those
    outputs back to the projection's input)."""
    weight = module.weight
    if isinstance(module, torch.nn.Linear):
        w = weight[cols, :]
    elif type(module).__name__ == "Conv1D":  # GPT-2: y = x @ W + b, W [in, out]
        w = weight[:, cols].T
    else:
        raise EngineError(f"edge attribution: cannot read through {type(module).__name__} (expected a linear layer)")
    return w.to(torch.promote_types(w.dtype, torch.float32))


class PassTargets:
    """Target rows' gradients for one batch and gradient pass (computed on demand, cached per layer)."""

    def __init__(self, loaded: Loaded, sites: EdgeSites, reads: PassReads, batch: Batch,
                 positions: Sequence[int | str], tables, rotate, check: bool = False) -> None:
        self.loaded, self.sites, self.reads, self.batch = loaded, sites, reads, batch
        self.pos_index = {p: i for i, p in enumerate(positions)}
        self.tables, self.rotate, self.check = tables, rotate, check
        geom, arch = loaded.geom, loaded.arch
        self.layouts = {c: arch.template(k).resolve(geom) for c, k in _CHANNEL_KIND.items()}
        self.rep = geom.group_size
        self._splits: dict[int, AttnSplit] = {}
        self._summed: dict[tuple[int, str], torch.Tensor] = {}
        self._mats: dict[tuple[str, int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ positions
    def rows_at(self, position: int | str) -> torch.Tensor:
        """[rows]: the padded position of a per-position node in each model row."""
        if self.batch.node_pos is None or position not in self.pos_index:
            raise EngineError(f"internal: per-position node at {position!r} without its position index")
        return self.batch.node_pos[:, self.pos_index[position]]

    def _only_at(self, x: torch.Tensor, position: int | str | None) -> torch.Tensor:
        """x [rows, S, ...] kept at one per-position node's position (all of it when summed)."""
        if position is None:
            return x
        rows = self.rows_at(position)
        keep = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        keep[torch.arange(x.shape[0], device=x.device), rows] = 1.0
        return x * keep.view(*keep.shape, *([1] * (x.dim() - 2)))

    # ------------------------------------------------------------------------------------- attention side
    def split(self, layer: int) -> AttnSplit:
        got = self._splits.get(layer)
        if got is None:
            a = self.sites.attn[layer]
            vals, grads = self.reads.values, self.reads.grads
            q = rotate_queries(self.rotate, per_head(vals[a.q], self.layouts["q"]), self.tables)
            v = per_head(vals[a.v], self.layouts["v"]).repeat_interleave(self.rep, dim=1)
            gz = per_head(grads[a.z], self.loaded.arch.template("heads").resolve(self.loaded.geom))
            got = self._splits[layer] = AttnSplit(vals[a.pattern], v, gz, q, a.scale, self.rotate, self.tables)
            if self.check:
                self._check_split(layer, got)
        return got

    def _check_split(self, layer: int, split: AttnSplit) -> None:
        """The heads' shares summed per KV group must equal the model's own gradient at the key and value
        projections (an attention variant the split does not model fails here, on the first batch)."""
        for channel, share in (("k", split.keys()), ("v", split.values())):
            model = self._node_grad(layer, channel)
            ours = share.unflatten(1, (-1, self.rep)).sum(2)
            gap = float((ours - model).abs().max()) / max(float(model.abs().max()), 1e-12)
            if not gap <= SPLIT_TOLERANCE:
                raise EngineError(
                    f"per-head edges: layer {layer}'s {channel} gradients split over heads do not add up to the "
                    f"model's own (relative gap {gap:.3g}); this attention variant is not modelled (the edge step "
                    f"supports eager attention with the architecture's own scaling and rotary)")

    def _node_grad(self, layer: int, channel: str) -> torch.Tensor:
        """[rows, units, S, d]: the model's gradient at a q / k / v projection's units."""
        a = self.sites.attn[layer]
        key = {"q": a.q, "k": a.k, "v": a.v}[channel]
        g = self.reads.grads[key]
        return per_head(g.to(torch.promote_types(g.dtype, torch.float32)), self.layouts[channel])

    def _summed_share(self, layer: int, channel: str) -> torch.Tensor:
        got = self._summed.get((layer, channel))
        if got is None:
            split = self.split(layer)
            got = self._node_grad(layer, "q") if channel == "q" else split.keys() if channel == "k" else split.values()
            self._summed[(layer, channel)] = got
        return got

    def head_pieces(self, layer: int, heads: Sequence[int], channel: str, position: int | str | None
                    ) -> list[Piece]:
        """One piece per head: its own `channel` input, through every query or through its position's only."""
        unit = (lambda h: h) if channel == "q" else (lambda h: h // self.rep)
        if position is None or channel == "q":
            share = self._summed_share(layer, channel)
            return [Piece(layer, channel, unit(h), self._only_at(share[:, h], position)) for h in heads]
        split = self.split(layer)
        idx = torch.tensor(list(heads), device=share_device(self.reads))
        rows = self.rows_at(position).unsqueeze(1).expand(-1, len(heads))
        got = split.keys_at(idx, rows) if channel == "k" else split.values_at(idx, rows)
        return [Piece(layer, channel, unit(h), got[:, i]) for i, h in enumerate(heads)]

    def node_piece(self, node: NodeId) -> Piece:
        """A query, key or value node's own input: the gradient at its columns (at its position when per position)."""
        channel = _NODE_CHANNEL[node.kind]
        g = self._node_grad(node.layer, channel)[:, node.index]
        return Piece(node.layer, channel, node.index, self._only_at(g, node.position))

    def pieces(self, row: TargetRow) -> list[Piece]:
        """The projection-space parts of an attention-side row (empty for the rows a block gradient covers)."""
        node = row.node
        if node.kind is NodeKind.HEAD:
            return self.head_pieces(node.layer, [node.index], row.channel, node.position)
        if node.kind in _NODE_CHANNEL:
            return [self.node_piece(node)]
        if node.kind is NodeKind.ATTN and node.position is not None:
            heads = range(self.loaded.geom.n_heads)
            return [p for c in ("q", "k", "v") for p in self.head_pieces(node.layer, heads, c, node.position)]
        return []

    # ----------------------------------------------------------------------------------- residual stream
    def _matrix(self, piece: Piece) -> torch.Tensor:
        key = (piece.channel, piece.layer, piece.unit)
        got = self._mats.get(key)
        if got is None:
            t = self.loaded.arch.template(_CHANNEL_KIND[piece.channel])
            cols = torch.arange(*self.layouts[piece.channel].columns(piece.unit))
            got = self._mats[key] = read_matrix(self.loaded.hf.get_submodule(t.path(piece.layer)), cols)
        return got

    def _neuron_input(self, node: NodeId) -> torch.Tensor | None:
        """[rows, S, d] at the MLP norm's output: a neuron's gradient through its own input rows."""
        mlp = self.sites.mlp[node.layer]
        if not mlp.pieces:
            return None
        width, total = self.loaded.geom.mlp, None
        for key, module in zip(mlp.pieces, mlp.modules):
            g = self.reads.grads[key]
            cols = torch.arange(node.index, g.shape[-1], width)
            part = g[..., cols].to(torch.promote_types(g.dtype, torch.float32)) @ read_matrix(
                self.loaded.hf.get_submodule(module), cols)
            total = part if total is None else total + part
        return self._only_at(total, node.position)

    def _block(self, row: TargetRow) -> torch.Tensor:
        """[rows, S, d]: a row that takes block branch gradients (attn, mlp, logits, resid; neurons without rows)."""
        node, G = row.node, self.reads.G
        if node.kind is NodeKind.RESID:
            points = [i for i, r in enumerate(self.sites.blocks) if r.point >= 2 * node.layer + 2]
            g = G[points].sum(0)
        else:
            g = G[reader_index(self.sites.blocks, node)]
        return self._only_at(g, node.position)

    def residual(self, rows: Sequence[TargetRow]) -> torch.Tensor:
        """[len(rows), b, S, d]: each row's gradient in the residual stream at its block's input."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        by_norm: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for i, row in enumerate(rows):
            node = row.node
            pieces = self.pieces(row)
            if pieces:
                y = sum(p.grad @ self._matrix(p) for p in pieces)
            elif node.kind is NodeKind.NEURON:
                y = self._neuron_input(node)
            else:
                y = None
            if y is None:
                out[i] = self._block(row)
            else:
                by_norm.setdefault(reader_index(self.sites.blocks, node), []).append((i, y))
        for r, items in by_norm.items():
            back = self._norm_back(r, torch.stack([y for _, y in items]))
            for j, (i, _) in enumerate(items):
                out[i] = back[j]
        return torch.stack(out) if out else self.reads.G[:0]

    def _norm_back(self, reader: int, seeds: torch.Tensor) -> torch.Tensor:
        """Gradients at a norm's output [T, rows, S, d] pulled back through the norm at its clean input."""
        x = self.reads.X[reader]
        norm = self.loaded.hf.get_submodule(self.sites.blocks[reader].module)
        xs = x.detach().to(self.loaded.dtype).unsqueeze(0).expand(seeds.shape[0], *x.shape).reshape(-1, *x.shape[1:])
        xs = xs.clone().requires_grad_(True)
        with torch.enable_grad():
            y = norm(xs)
            (g,) = torch.autograd.grad(y, xs, seeds.reshape(-1, *seeds.shape[2:]).to(y.dtype))
        return g.view_as(seeds).to(seeds.dtype)


def share_device(reads: PassReads) -> torch.device:
    return reads.G.device
