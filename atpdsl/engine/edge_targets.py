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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from atpdsl.errors import EngineError
from atpdsl.names import NodeId, NodeKind
from atpdsl.engine.data import Batch
from atpdsl.engine.edge_attention import AttnSplit, per_head, rotate_queries
from atpdsl.engine.edge_sites import EdgeSites, PassReads
from atpdsl.engine.edges import TargetRow, reader_index
from atpdsl.engine.load import Loaded
from atpdsl.engine.normfix import norm_map

__all__ = ["Piece", "Places", "PassTargets", "read_matrix", "SPLIT_TOLERANCE", "split_tolerance", "CHANNEL_KIND"]

SPLIT_TOLERANCE = 1e-3
"""Largest relative gap accepted (first batch) between the heads' key / value shares summed and the gradient the
model's own backward gives at the projection: a larger gap means an attention variant the split does not model.
In half precision the model's own gradient carries its rounding, so the bound widens (split_tolerance)."""


def split_tolerance(dtype: torch.dtype) -> float:
    """SPLIT_TOLERANCE, or 8 roundings of `dtype` when that is larger (bfloat16: 0.0625; float16: 0.0078). A
    variant the split does not model (another scaling, no rotary) misses by tens of percent."""
    return max(SPLIT_TOLERANCE, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else SPLIT_TOLERANCE

CHANNEL_KIND = {"q": "queries", "k": "keys", "v": "values"}
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


class Places:
    """Where a batch's per-position nodes sit: each model row's padded position for a position name."""

    def __init__(self, batch: Batch, positions: Sequence[int | str]) -> None:
        self.batch = batch
        self.pos_index = {p: i for i, p in enumerate(positions)}

    def rows_at(self, position: int | str) -> torch.Tensor:
        """[rows]: the padded position of a per-position node in each model row."""
        if self.batch.node_pos is None or position not in self.pos_index:
            raise EngineError(f"internal: per-position node at {position!r} without its position index")
        return self.batch.node_pos[:, self.pos_index[position]]

    def only_at(self, x: torch.Tensor, position: int | str | None) -> torch.Tensor:
        """x [rows, S, ...] kept at one per-position node's position (all of it when summed)."""
        if position is None:
            return x
        rows = self.rows_at(position)
        keep = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        keep[torch.arange(x.shape[0], device=x.device), rows] = 1.0
        return x * keep.view(*keep.shape, *([1] * (x.dim() - 2)))


class PassTargets(Places):
    """Target rows' gradients for one batch and gradient pass (computed on demand, cached per layer)."""

    def __init__(self, loaded: Loaded, sites: EdgeSites, reads: PassReads, batch: Batch,
                 positions: Sequence[int | str], tables, rotate, check: bool = False, mats: dict | None = None) -> None:
        super().__init__(batch, positions)
        self.loaded, self.sites, self.reads = loaded, sites, reads
        self.tables, self.rotate, self.check = tables, rotate, check
        geom, arch = loaded.geom, loaded.arch
        self.layouts = {c: arch.template(k).resolve(geom) for c, k in CHANNEL_KIND.items()}
        self.rep = geom.group_size
        self._splits: dict[int, AttnSplit] = {}
        self._summed: dict[tuple[int, str], torch.Tensor] = {}
        self._mats: dict = {} if mats is None else mats  # projection rows, shareable across batches
        self._norms: dict[int, object] = {}
        self._placed: dict[tuple[int, str, int, int | str], torch.Tensor] = {}
        self._checked: set[type] = set()

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
                self._check_split(layer)
        return got

    def release_splits(self) -> None:
        """Drop the attention splits made so far (each holds float64 [rows, heads, S, S] pattern tensors: at long
        prompts, every layer's together was gigabytes); the shares already taken from them stay."""
        self._splits.clear()

    def _check_split(self, layer: int) -> None:
        """The heads' shares summed per KV group must equal the model's own gradient at the key and value
        projections (an attention variant the split does not model fails here, on the first batch)."""
        for channel in ("k", "v"):
            share, model = self._summed_share(layer, channel), self._node_grad(layer, channel)
            ours = share.unflatten(1, (-1, self.rep)).sum(2)
            gap = float((ours - model).abs().max()) / max(float(model.abs().max()), 1e-12)
            if not gap <= split_tolerance(self.reads.grads[self.sites.attn[layer].k].dtype):
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
            return [Piece(layer, channel, unit(h), self.only_at(share[:, h], position)) for h in heads]
        missing = [h for h in heads if (layer, channel, h, position) not in self._placed]
        if missing:
            self.prefetch([(layer, channel, h, position) for h in missing])
        return [Piece(layer, channel, unit(h), self._placed[(layer, channel, h, position)]) for h in heads]

    def prefetch(self, wanted: Iterable[tuple[int, str, int, int | str]]) -> None:
        """Compute the per-query key / value shares of many (layer, channel, head, position) at once."""
        groups: dict[tuple[int, str], list[tuple[int, int | str]]] = {}
        for layer, channel, head, position in wanted:
            if channel in ("k", "v") and position is not None and (layer, channel, head, position) not in self._placed:
                groups.setdefault((layer, channel), []).append((head, position))
        for (layer, channel), items in groups.items():
            split = self.split(layer)
            idx = torch.tensor([h for h, _ in items], device=share_device(self.reads))
            rows = torch.stack([self.rows_at(p) for _, p in items], dim=1)
            got = split.keys_at(idx, rows) if channel == "k" else split.values_at(idx, rows)
            for i, (h, p) in enumerate(items):
                self._placed[(layer, channel, h, p)] = got[:, i]

    def node_piece(self, node: NodeId) -> Piece:
        """A query, key or value node's own input: the gradient at its columns (at its position when per position)."""
        channel = _NODE_CHANNEL[node.kind]
        g = self._node_grad(node.layer, channel)[:, node.index]
        return Piece(node.layer, channel, node.index, self.only_at(g, node.position))

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
            t = self.loaded.arch.template(CHANNEL_KIND[piece.channel])
            cols = torch.arange(*self.layouts[piece.channel].columns(piece.unit))
            got = self._mats[key] = read_matrix(self.loaded.hf.get_submodule(t.path(piece.layer)), cols)
        return got

    def _neuron_inputs(self, layer: int, nodes: Sequence[NodeId], live: torch.Tensor | None = None
                       ) -> torch.Tensor | None:
        """[n, rows, S, d] at the MLP norm's output: each neuron's gradient through its own input rows (None when
        the architecture's MLP input projections are not known); only at the positions `live` when given."""
        mlp = self.sites.mlp[layer]
        if not mlp.pieces:
            return None
        width = self.loaded.geom.mlp
        units = torch.tensor([n.index for n in nodes])
        grads, rows = [], []
        for key, module in zip(mlp.pieces, mlp.modules):
            g = self.reads.grads[key]
            for offset in range(0, g.shape[-1], width):
                cols = units + offset
                mat = (module, offset, tuple(units.tolist()))
                if mat not in self._mats:
                    self._mats[mat] = read_matrix(self.loaded.hf.get_submodule(module), cols)
                grads.append(g[..., cols])
                rows.append(self._mats[mat])
        picked = torch.stack(grads, -1)  # [rows, S, n, pieces]
        picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
        for i, node in enumerate(nodes):
            if node.position is not None:
                picked[:, :, i] = self.only_at(picked[:, :, i], node.position)
        if live is not None:
            picked = picked[:, live]
        return torch.einsum("rsnp,npd->nrsd", picked, torch.stack(rows, 1).to(picked.dtype))

    def _block(self, row: TargetRow) -> torch.Tensor:
        """[rows, S, d]: a row that takes block branch gradients (attn, mlp, logits, resid; neurons without rows)."""
        node, G = row.node, self.reads.G
        if node.kind is NodeKind.RESID:
            points = [i for i, r in enumerate(self.sites.blocks) if r.point >= 2 * node.layer + 2]
        else:
            points = [reader_index(self.sites.blocks, node)]
        whole = self.sites.whole
        if whole is not None and not set(points) <= whole:
            raise EngineError(f"internal: the edges did not keep the block gradient {node.name} takes")
        g = G[points].sum(0)
        return self.only_at(g, node.position)

    def seeds(self, rows: Sequence[TargetRow], live: torch.Tensor | None = None
              ) -> tuple[dict[int, list[tuple[int, torch.Tensor]]], list[int]]:
        """Each row's gradient at its block norm's output, grouped by reader ({reader: [(row index, [rows, S, d])]}),
        and the rows a block gradient covers instead (attn, mlp, logits, resid; neurons without known rows); only
        at the positions `live` [S] when given."""
        seeds: dict[int, list[tuple[int, torch.Tensor]]] = {}
        blocks: list[int] = []
        heads = range(self.loaded.geom.n_heads)
        self.prefetch([(r.node.layer, r.channel, r.node.index, r.node.position) for r in rows
                       if r.node.kind is NodeKind.HEAD] +
                      [(r.node.layer, c, h, r.node.position) for r in rows if r.node.kind is NodeKind.ATTN
                       for c in ("k", "v") for h in heads])
        neurons: dict[int, list[int]] = {}
        summed: dict[tuple[int, str], list[int]] = {}
        for i, row in enumerate(rows):
            node = row.node
            if node.kind is NodeKind.NEURON and self.sites.mlp[node.layer].pieces:
                neurons.setdefault(node.layer, []).append(i)
                continue
            if node.kind is NodeKind.HEAD and node.position is None:
                summed.setdefault((node.layer, row.channel), []).append(i)
                continue
            pieces = self.pieces(row)
            if pieces:
                y = sum((p.grad if live is None else p.grad[:, live]) @ self._matrix(p).to(p.grad.dtype)
                        for p in pieces)
                seeds.setdefault(reader_index(self.sites.blocks, node), []).append((i, y))
            else:
                blocks.append(i)
        for layer, idx in neurons.items():
            ys = self._neuron_inputs(layer, [rows[i].node for i in idx], live)
            seeds.setdefault(2 * layer + 1, []).extend(zip(idx, ys))
        for (layer, channel), idx in summed.items():
            ys = self._summed_heads(layer, channel, [rows[i].node.index for i in idx], live)
            seeds.setdefault(2 * layer, []).extend(zip(idx, ys))
        return seeds, blocks

    def _summed_heads(self, layer: int, channel: str, heads: list[int], live: torch.Tensor | None) -> torch.Tensor:
        """[n, rows, S, d] at the attention norm's output: summed heads' own `channel` inputs (one einsum)."""
        share = self._summed_share(layer, channel)[:, heads]  # [rows, n, S, dh]
        if live is not None:
            share = share[:, :, live]
        units = heads if channel == "q" else [h // self.rep for h in heads]
        key = ("stack", channel, layer, tuple(units))
        if key not in self._mats:
            self._mats[key] = torch.stack([self._matrix(Piece(layer, channel, u, share)) for u in units])
        return torch.einsum("rnsk,nkd->nrsd", share, self._mats[key].to(share.dtype))

    def residual(self, rows: Sequence[TargetRow], live: torch.Tensor | None = None) -> torch.Tensor:
        """[len(rows), b, S, d]: each row's gradient in the residual stream at its block's input (only at the
        positions `live` [S] when given: the products elsewhere are 0)."""
        out: list[torch.Tensor | None] = [None] * len(rows)
        seeds, blocks = self.seeds(rows, live)
        for i in blocks:
            g = self._block(rows[i])
            out[i] = g if live is None else g[:, live]
        for r, items in seeds.items():
            back = self._norm_back(r, torch.stack([y for _, y in items]), live)
            for j, (i, _) in enumerate(items):
                out[i] = back[j]
        return torch.stack(out) if out else self.reads.G[:0]

    def _norm_back(self, reader: int, seeds: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """Gradients at a norm's output [T, rows, S, d] pulled back through the norm at its clean input: the closed
        form of atpdsl.engine.normfix.norm_map (checked against autograd on the first batch), else autograd."""
        x = self.reads.X[reader] if live is None else self.reads.X[reader][:, live]
        module = self.loaded.hf.get_submodule(self.sites.blocks[reader].module)
        norm = self._norms.get(reader, False)
        if norm is False:
            try:
                norm = norm_map(module, seeds.dtype)
            except EngineError:
                norm = None
            self._norms[reader] = norm
        if norm is None:
            return _autograd_back(module, x, seeds, self.loaded.dtype)
        c = norm.center(x.to(seeds.dtype))
        scale = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + norm.eps)  # [rows, S, 1]
        gain = norm.gain.to(seeds.device, seeds.dtype)
        # J^T y = P(s (g*y) - s^3 c (c . (g*y)) / d), P the centering (identity for RMSNorm): 3 passes over y
        dots = (seeds * (gain * c)).sum(-1, keepdim=True)
        got = norm.center(seeds * (gain * scale) - dots * (scale.pow(3) * c / x.shape[-1]))
        if self.check and type(module) not in self._checked:  # once per norm class, on the first batch
            self._checked.add(type(module))
            want = _autograd_back(module, x, seeds[:1], self.loaded.dtype)
            gap = float((want - got[:1]).abs().max()) / max(float(want.abs().max()), 1e-12)
            if not gap <= split_tolerance(self.loaded.dtype):
                raise EngineError(f"per-target edges: the closed form of {type(module).__name__} differs from the "
                                  f"module's own backward (relative gap {gap:.3g})")
        return got


def _autograd_back(module: torch.nn.Module, x: torch.Tensor, seeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The norm's vector-Jacobian products by autograd on its input repeated once per seed."""
    xs = x.detach().to(dtype).unsqueeze(0).expand(seeds.shape[0], *x.shape).reshape(-1, *x.shape[1:])
    xs = xs.clone().requires_grad_(True)
    with torch.enable_grad():
        y = module(xs)
        (g,) = torch.autograd.grad(y, xs, seeds.reshape(-1, *seeds.shape[2:]).to(y.dtype))
    return g.view_as(seeds).to(seeds.dtype)


def share_device(reads: PassReads) -> torch.device:
    return reads.G.device
