"""The node table: a plan's node groups expanded to named nodes, grouped by the site that holds them.

Per site, nodes come in blocks (one kind, a list of units, summed or per position). Everything the
engine does per node is vectorized per block: AtP estimates are one strided sum over the site's
`delta * grad` tensor, exact-patch masks are built from the block's unit columns and positions.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from atpdsl.arch import Arch, Geometry, Layout, Site
from atpdsl.errors import EngineError, ModelError
from atpdsl.names import NodeId, NodeKind
from atpdsl.plan import NodeGroup
from atpdsl.engine.data import where_text

__all__ = ["Block", "NodeList", "NodeTable", "WHOLE_KINDS", "SCORED_KINDS", "build_table", "unit_columns",
           "unit_values", "block_estimates"]

SCORED_KINDS = ("heads", "queries", "keys", "values", "neurons", "attn", "mlp", "resid")
WHOLE_KINDS = ("attn", "mlp", "resid")  # one node per layer: no unit index


@dataclass(frozen=True, slots=True)
class Block:
    """Nodes of one kind at one site: `units` x (`positions` or summed), in unit-major order. `group_size`: heads
    per KV group for grouped keys and values, else 0 (the nodes' names and attributes say which heads)."""

    site: int  # index into NodeTable.sites
    kind: str
    layout: Layout
    units: tuple[int, ...]
    per_position: bool
    first: int  # column of the first node in the table
    n_positions: int  # 1 when summed
    group_size: int = 0

    @property
    def size(self) -> int:
        return len(self.units) * self.n_positions

    def locate(self, column: int) -> tuple[int, int | None]:
        """(unit, position index or None) of one of this block's columns."""
        j = column - self.first
        unit = self.units[j // self.n_positions]
        return unit, (j % self.n_positions) if self.per_position else None


class NodeList(Sequence[NodeId]):
    """The table's nodes in column order, made on demand from its blocks: a run may score tens of millions of
    per-position nodes, and a record per node would cost more memory than the model's own backward."""

    __slots__ = ("_table",)

    def __init__(self, table: "NodeTable") -> None:
        self._table = table

    def __len__(self) -> int:
        return self._table.size

    def __getitem__(self, column):  # type: ignore[override]
        if isinstance(column, slice):
            return [self._table.node(c) for c in range(*column.indices(len(self)))]
        column = int(column)
        return self._table.node(column + len(self) if column < 0 else column)

    def __iter__(self) -> Iterator[NodeId]:
        return (self._table.node(c) for c in range(len(self)))


@dataclass(slots=True)
class NodeTable:
    """Every scored node, its site and block; columns of estimate matrices follow the blocks' order. Nodes, their
    attributes and their columns are computed from the blocks (see NodeList)."""

    sites: list[Site]
    blocks: list[Block]
    positions: tuple[str, list[int | str]] | None = None
    _starts: list[int] = field(default_factory=list)
    _lookup: dict[tuple[int, str, bool], Block] = field(default_factory=dict)
    _position_index: dict[int | str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.positions is not None:
            self._position_index.update({p: i for i, p in enumerate(self.positions[1])})

    def add(self, block: Block) -> None:
        """Append a block (its `first` must be the table's size)."""
        if block.first != self.size:
            raise EngineError("internal: a node block out of column order")
        self.blocks.append(block)
        self._starts.append(block.first)
        self._lookup[(self.sites[block.site].layer, block.kind, block.per_position)] = block

    def blocks_at(self, site: int) -> list[Block]:
        return [b for b in self.blocks if b.site == site]

    def block_of(self, column: int) -> Block:
        if not 0 <= column < self.size:
            raise IndexError(column)
        return self.blocks[bisect_right(self._starts, column) - 1]

    @property
    def size(self) -> int:
        return self.blocks[-1].first + self.blocks[-1].size if self.blocks else 0

    @property
    def nodes(self) -> NodeList:
        """Every node in column order (made on demand)."""
        return NodeList(self)

    def node(self, column: int) -> NodeId:
        """The node of one column."""
        block = self.block_of(column)
        unit, p = block.locate(column)
        index = None if block.kind in WHOLE_KINDS else unit
        position = self.positions[1][p] if p is not None and self.positions is not None else None
        return NodeId(self.sites[block.site].layer, NodeKind(block.kind), index, position, block.group_size > 0)

    def attrs(self, column: int) -> tuple[tuple[str, str | int | float | bool], ...]:
        """The extra facts of one column's node: its site, and the heads of a KV group."""
        block = self.block_of(column)
        site = ("site", self.sites[block.site].name)
        if not block.group_size:
            return (site,)
        unit, _ = block.locate(column)
        gs = block.group_size
        return (site, ("heads", ",".join(str(h) for h in range(unit * gs, (unit + 1) * gs))))

    def column_of(self, node: NodeId) -> int | None:
        """The column of a node, None when the table does not score it."""
        block = self._lookup.get((node.layer, node.kind.value, node.position is not None))
        if block is None:
            return None
        unit = 0 if node.kind.value in WHOLE_KINDS else node.index
        at = bisect_left(block.units, unit)
        if at == len(block.units) or block.units[at] != unit:
            return None
        if not block.per_position:
            return block.first + at * block.n_positions
        p = self._position_index.get(node.position)
        return None if p is None else block.first + at * block.n_positions + p


def _units(kind: str, geom: Geometry, layout: Layout, group: NodeGroup) -> tuple[int, ...]:
    if kind in WHOLE_KINDS:
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
            grouped = kind in ("keys", "values") and geom.grouped
            for per_position in (False, True):
                units = wanted.get((site.layer, kind, per_position))
                if not units:
                    continue
                n_positions = len(positions[1]) if per_position and positions else 1
                table.add(Block(si, kind, layout, tuple(sorted(units)), per_position, table.size, n_positions,
                                geom.group_size if grouped else 0))
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
