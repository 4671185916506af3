"""The node table: a plan's node groups expanded to named nodes, grouped by the site that holds them.

Per site, nodes come in blocks (one kind, a list of units, summed or per position). Everything the
engine does per node is vectorized per block: AtP estimates are one strided sum over the site's
`delta * grad` tensor, exact-patch masks are built from the block's unit columns and positions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from atpdsl.arch import Arch, Geometry, Layout, Site
from atpdsl.errors import EngineError, ModelError
from atpdsl.names import NodeId, NodeKind
from atpdsl.plan import NodeGroup
from atpdsl.engine.data import where_text

__all__ = ["Block", "NodeTable", "SCORED_KINDS", "build_table", "unit_columns", "unit_values", "block_estimates"]

SCORED_KINDS = ("heads", "queries", "keys", "values", "neurons", "attn", "mlp", "resid")


@dataclass(frozen=True, slots=True)
class Block:
    """Nodes of one kind at one site: `units` x (`positions` or summed), in unit-major order."""

    site: int  # index into NodeTable.sites
    kind: str
    layout: Layout
    units: tuple[int, ...]
    per_position: bool
    first: int  # column of the first node in the table
    n_positions: int  # 1 when summed

    @property
    def size(self) -> int:
        return len(self.units) * self.n_positions

    def locate(self, column: int) -> tuple[int, int | None]:
        """(unit, position index or None) of one of this block's columns."""
        j = column - self.first
        unit = self.units[j // self.n_positions]
        return unit, (j % self.n_positions) if self.per_position else None


@dataclass(slots=True)
class NodeTable:
    """Every scored node, its site and block; columns of estimate matrices follow `nodes`."""

    sites: list[Site]
    blocks: list[Block]
    nodes: list[NodeId] = field(default_factory=list)
    attrs: list[tuple[tuple[str, str | int | float | bool], ...]] = field(default_factory=list)
    positions: tuple[str, list[int | str]] | None = None

    def blocks_at(self, site: int) -> list[Block]:
        return [b for b in self.blocks if b.site == site]

    def block_of(self, column: int) -> Block:
        for b in self.blocks:
            if b.first <= column < b.first + b.size:
                return b
        raise IndexError(column)

    @property
    def size(self) -> int:
        return len(self.nodes)


def _units(kind: str, geom: Geometry, layout: Layout, group: NodeGroup) -> tuple[int, ...]:
    if kind in ("attn", "mlp", "resid"):
        return (0,)
    if group.heads is None:
        return tuple(range(layout.count))
    bad = [u for u in group.heads if not 0 <= u < layout.count]
    if bad:
        what = {"neurons": "neuron", "keys": "KV group", "values": "KV group"}.get(kind, "head")
        if kind in ("keys", "values") and not geom.grouped:
            what = "head"
        extra = ""
        if what == "KV group":
            extra = f" (grouped-query attention: {kind} are indexed by KV group, {geom.group_size} heads each)"
        raise ModelError(
            f"{where_text(group.where)}{kind} {', '.join(map(str, bad))}: the model has {layout.count} "
            f"{what}s per layer (0..{layout.count - 1}){extra}"
        )
    return tuple(sorted(set(group.heads)))


def build_table(arch: Arch, geom: Geometry, groups: Sequence[NodeGroup],
                positions: tuple[str, list[int | str]] | None) -> NodeTable:
    """Expand node groups into a NodeTable (ModelError for kinds or indices the model lacks)."""
    wanted: dict[tuple[int, str, bool], set[int]] = {}
    for g in groups:
        if g.kind not in SCORED_KINDS:
            raise EngineError(f"{where_text(g.where)}cannot score {g.kind!r} nodes (scored: {', '.join(SCORED_KINDS)})")
        template = arch.template(g.kind)
        lo, hi = g.layers if g.layers is not None else (0, geom.n_layers - 1)
        if lo < 0 or hi >= geom.n_layers or lo > hi:
            raise ModelError(
                f"{where_text(g.where)}{g.kind} layers {lo}..{hi}: the model has {geom.n_layers} layers "
                f"(0..{geom.n_layers - 1})"
            )
        layout = template.resolve(geom)
        units = _units(g.kind, geom, layout, g)
        for layer in range(lo, hi + 1):
            wanted.setdefault((layer, g.kind, g.per_position), set()).update(units)
    if any(pp for (_, _, pp) in wanted) and positions is None:
        raise EngineError("per-position nodes need position names (internal: positions not given)")
    by_layer: dict[int, set[str]] = {}
    for layer, kind, _ in wanted:
        by_layer.setdefault(layer, set()).add(kind)
    sites = arch.site_list(by_layer)
    sites.sort(key=lambda s: s.order)
    table = NodeTable(sites=sites, blocks=[], positions=positions)
    for si, site in enumerate(sites):
        for kind in site.kinds:
            layout = arch.template(kind).resolve(geom)
            for per_position in (False, True):
                units = wanted.get((site.layer, kind, per_position))
                if not units:
                    continue
                pos_names = positions[1] if per_position and positions else [None]
                block = Block(si, kind, layout, tuple(sorted(units)), per_position, table.size, len(pos_names))
                table.blocks.append(block)
                nk = NodeKind(kind)
                grouped = kind in ("keys", "values") and geom.grouped
                for u in block.units:
                    attrs: list[tuple[str, str | int | float | bool]] = [("site", site.name)]
                    if grouped:
                        gs = geom.group_size
                        attrs.append(("heads", ",".join(str(h) for h in range(u * gs, (u + 1) * gs))))
                    for p in pos_names:
                        index = None if kind in ("attn", "mlp", "resid") else u
                        table.nodes.append(NodeId(site.layer, nk, index, p, grouped))
                        table.attrs.append(tuple(attrs))
    return table


def unit_columns(block: Block) -> torch.Tensor:
    """The block's units' columns in its site tensor, unit after unit."""
    return torch.cat([torch.arange(*block.layout.columns(u)) for u in block.units])


def unit_values(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Sum a [b, S, W] tensor over each unit's columns: [b, S, count]."""
    seg = x[..., layout.start: layout.start + layout.count * layout.stride]
    seg = seg.unflatten(-1, (layout.count, layout.stride))
    if layout.offset or layout.width != layout.stride:
        seg = seg[..., layout.offset: layout.offset + layout.width]
    return seg.sum(-1)


def block_estimates(block: Block, per_unit: torch.Tensor, real: torch.Tensor,
                    node_pos: torch.Tensor | None) -> torch.Tensor:
    """A block's per-pair estimates [b, block.size] from per-unit values [b, S, count] that are already zero at
    positions without a node value (`real` False); summed blocks add every position."""
    if len(block.units) != per_unit.shape[-1]:
        per_unit = per_unit[..., list(block.units)]
    if not block.per_position:
        return per_unit.sum(1)
    if node_pos is None:
        raise EngineError("internal: per-position nodes without position indices")
    idx = node_pos.unsqueeze(-1).expand(-1, -1, per_unit.shape[-1])
    at = per_unit.gather(1, idx)  # [b, P, u]
    return at.transpose(1, 2).reshape(per_unit.shape[0], -1)
