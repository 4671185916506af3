"""Edges inside the run: the `edge_reads` batch step keeps what the edges need from the AtP passes themselves
(each reader block's branch gradient and every node site's corrupt - clean difference), and the `edges` run step,
once the circuit's nodes are selected, turns the kept reads into edge weights (atpdsl.engine.edges has the math).

Kept reads stay in memory up to EDGE_MEMORY_LIMIT bytes; beyond that each batch's reads go to a temporary folder
that is removed when the run ends, so the edges never need a second pass over the model.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atpdsl.errors import EngineError
from atpdsl.names import NodeId, NodeKind
from atpdsl.plan import Plan, Step
from atpdsl.engine.atp import MAIN, corrupt_forward, clean_forward_backward, site_delta
from atpdsl.engine.context import make_context
from atpdsl.engine.data import Batch
from atpdsl.engine.edges import (
    EMBED, QKV, EdgeMatrix, Reader, node_groups, per_position, readers, weighted_edges, write_matrix, write_point,
)
from atpdsl.engine.load import Loaded, load_model
from atpdsl.engine.node_table import build_table, unit_columns, unit_values
from atpdsl.engine.state import BatchWork, ExtraSites, RunState

__all__ = ["EDGE_LIMIT", "EDGE_MEMORY_LIMIT", "EdgeReads", "ReadStore", "prepare_edge_reads", "edge_reads_step",
           "edges_step", "edge_matrix"]

EDGE_LIMIT = 200
"""Edges are attributed when at most this many nodes are selected."""

EDGE_MEMORY_LIMIT = 1 << 30
"""Bytes of kept reads held in memory before later batches' reads are written to a temporary folder."""

_STAGE = {"attn-in": 5, "mlp-in": 40}  # reader norms' input stage inside a layer (arch.STAGES numbering)


@dataclass(slots=True)
class EdgeReads:
    """One batch's reads: reader branch gradients G [R, b, S, d], node sites' differences [b, S, w] by site key,
    the embedding's difference, and the plain gradients at query / key / value sites (their own estimates)."""

    batch: Batch
    G: torch.Tensor
    deltas: dict[str, torch.Tensor]
    d_emb: torch.Tensor
    grads: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        tensors = [self.G, self.d_emb, *self.deltas.values(), *self.grads.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(slots=True)
class ReadStore:
    """The kept reads of every batch, in memory or (past the limit) in a temporary folder."""

    limit: int = EDGE_MEMORY_LIMIT
    held: list[EdgeReads | Path] = field(default_factory=list)
    bytes_in_memory: int = 0
    folder: Path | None = None

    def add(self, reads: EdgeReads) -> None:
        size = reads.nbytes
        if self.bytes_in_memory + size <= self.limit:
            self.held.append(reads)
            self.bytes_in_memory += size
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="atpdsl-edges-"))
        path = self.folder / f"batch-{len(self.held)}.pt"
        torch.save({"G": reads.G, "deltas": reads.deltas, "d_emb": reads.d_emb, "grads": reads.grads}, path)
        self.held.append((path, reads.batch))

    def __iter__(self):
        for item in self.held:
            if isinstance(item, EdgeReads):
                yield item
            else:
                path, batch = item
                data = torch.load(path, weights_only=True)
                yield EdgeReads(batch, data["G"], data["deltas"], data["d_emb"], data["grads"])

    def close(self) -> None:
        self.held.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


@dataclass(slots=True)
class _Readers:
    """The run's reader blocks and the sites that read their norms' inputs and output gradients."""

    blocks: list[Reader]
    in_keys: list[str]
    out_keys: list[str]
    embed_key: str
    store: ReadStore = field(default_factory=ReadStore)


def _add_reader_sites(loaded: Loaded, extra: ExtraSites) -> _Readers:
    blocks = readers(loaded)
    n_layers = loaded.geom.n_layers
    in_keys, out_keys = [], []
    for r in blocks:
        stage = 0 if r.layer == n_layers else _STAGE[r.name.rsplit(".", 1)[-1]]
        in_keys.append(extra.add(f"{r.module}.input", r.module, "input", (r.layer, stage), grad=False))
        out_keys.append(extra.add(f"{r.module}.output", r.module, "output", (r.layer, stage + 1)))
    embed = loaded.arch.embed
    embed_key = extra.add(f"{embed}.output", embed, "output", (-1, 0), grad=False)
    return _Readers(blocks, in_keys, out_keys, embed_key)


def _branch_gradients(loaded: Loaded, rd: _Readers, work: BatchWork) -> torch.Tensor:
    """[R, b, S, d]: each reader norm's output gradient pulled back through the norm at its clean input."""
    main = work.clean.grads[MAIN]
    outs, ins = [], []
    for r, in_key, out_key in zip(rd.blocks, rd.in_keys, rd.out_keys):
        x = work.clean.acts[in_key].detach().requires_grad_(True)
        with torch.enable_grad():
            outs.append(loaded.hf.get_submodule(r.module)(x))
        ins.append(x)
    seeds = [main[k] for k in rd.out_keys]
    got = torch.autograd.grad(outs, ins, seeds, allow_unused=True)
    return torch.stack([_f(g if g is not None else torch.zeros_like(x)) for g, x in zip(got, ins)])


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def take_reads(state_ctx, rd: _Readers, work: BatchWork) -> EdgeReads:
    """One batch's reads (see EdgeReads) from its corrupt and clean traces."""
    ctx = state_ctx
    deltas = work.cache.setdefault("deltas", {})
    for site in ctx.table.sites:
        if site.name not in deltas:
            deltas[site.name] = site_delta(ctx, work, site.name)
    main = work.clean.grads[MAIN]
    qkv = {s.name: main[s.name] for s in ctx.table.sites if any(k in ("queries", "keys", "values") for k in s.kinds)}
    return EdgeReads(work.batch, _branch_gradients(ctx.loaded, rd, work),
                     {s.name: deltas[s.name] for s in ctx.table.sites}, site_delta(ctx, work, rd.embed_key), qkv)


def prepare_edge_reads(state: RunState, step: Step) -> None:
    """Add the reader norms' inputs and outputs and the embedding to the sites both runs read."""
    state.parts["edge_reads"] = _add_reader_sites(state.ctx.loaded, state.extra)


def edge_reads_step(state: RunState, step: Step, work: BatchWork) -> None:
    """Keep this batch's reads for the `edges` step."""
    rd: _Readers = state.parts["edge_reads"]
    rd.store.add(take_reads(state.ctx, rd, work))


# ---------------------------------------------------------------------------------------------- products
@dataclass(slots=True)
class _Sources:
    """The selected nodes as edge sources: a node table covering just them, and their order (embed first)."""

    table: object
    cols: list[int]
    sources: list[NodeId]


def _sources(loaded: Loaded, nodes: Sequence[NodeId], positions) -> _Sources:
    table = build_table(loaded.arch, loaded.geom, node_groups(nodes), positions)
    index = {n: i for i, n in enumerate(table.nodes)}
    seen = set()
    for n in nodes:
        if n.kind in (NodeKind.EMBED, NodeKind.LOGITS):
            continue
        if n not in index:
            raise EngineError(f"edge attribution: node {n.name} is not in the model's node table")
        seen.add(n)
    cols, sources = [], [EMBED]
    for c, n in enumerate(table.nodes):  # table (forward) order
        if n in seen:
            cols.append(c)
            sources.append(n)
    return _Sources(table, cols, sources)


def _scatter(per_unit: torch.Tensor, columns, out: torch.Tensor, out_at: torch.Tensor | None,
             node_pos: torch.Tensor | None) -> None:
    """A site's per-unit products [R, b, S, u] into rows `out` [b, n_src, R] (and `out_at`) for
    (source, unit, position index or None) columns."""
    tot = per_unit.sum(2).cpu().double()  # [R, b, u]
    pp = per_position(per_unit, node_pos)
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


def _products(loaded: Loaded, src: _Sources, rd_blocks: list[Reader], reads: EdgeReads):
    """One batch: (per-pair products [b, n_src, R], q/k/v estimates [b, n_src], per-position [b, n_src, R, P])."""
    batch, G = reads.batch, reads.G
    R, b, n_src = G.shape[0], batch.size, len(src.sources)
    P = batch.node_pos.shape[1] if batch.node_pos is not None else 0
    prod = torch.zeros((b, n_src, R), dtype=torch.float64)
    qkv = torch.zeros((b, n_src), dtype=torch.float64)
    at = torch.zeros((b, n_src, R, P), dtype=torch.float64) if P else None
    _scatter((_f(reads.d_emb).unsqueeze(0) * G).sum(-1, keepdim=True), [(0, 0, None)], prod, at, batch.node_pos)
    src_of = {c: i + 1 for i, c in enumerate(src.cols)}
    for si, site in enumerate(src.table.sites):
        blocks = [bl for bl in src.table.blocks_at(si) if any(c in src_of for c in range(bl.first, bl.first + bl.size))]
        if not blocks:
            continue
        d = _f(reads.deltas[site.name])
        for bl in blocks:
            columns = []
            for c in range(bl.first, bl.first + bl.size):
                if c in src_of:
                    unit, pos = bl.locate(c)
                    columns.append((src_of[c], bl.units.index(unit), pos))
            if bl.kind in ("queries", "keys", "values"):  # no residual write: their own AtP estimate
                per_unit = unit_values(d * _f(reads.grads[site.name]), bl.layout)[..., list(bl.units)]
                _scatter(per_unit.unsqueeze(0), columns, qkv.unsqueeze(-1), None, batch.node_pos)
                continue
            if bl.kind in ("heads", "neurons"):
                cols = unit_columns(bl).to(d.device)
                module = site.module if site.attr == "input" else loaded.arch.neuron_proj.format(layer=site.layer)
                proj = G @ write_matrix(loaded.hf.get_submodule(module), cols)  # [R, b, S, k]
                per_unit = (d[..., cols].unsqueeze(0) * proj).unflatten(-1, (len(bl.units), bl.layout.width)).sum(-1)
            else:  # attn, mlp, resid: the whole vector is the write
                per_unit = (d.unsqueeze(0) * G).sum(-1, keepdim=True)
            _scatter(per_unit, columns, prod, at, batch.node_pos)
    points = torch.tensor([r.point for r in rd_blocks])  # a reader before the source's write sees none of it
    valid = torch.stack([points >= write_point(s.kind, s.layer, loaded.parallel) for s in src.sources])
    valid[[i for i, s in enumerate(src.sources) if s.kind in QKV]] = False
    prod *= valid
    if at is not None:
        at *= valid.unsqueeze(-1)
    return prod, qkv, at


def matrix_from_reads(loaded: Loaded, nodes: Sequence[NodeId], rd_blocks: list[Reader], reads: Sequence[EdgeReads],
                      positions) -> EdgeMatrix:
    """The EdgeMatrix of `embed` and `nodes` from kept reads (atpdsl.engine.edges)."""
    src = _sources(loaded, nodes, positions)
    rows, qkv_rows, at_sum = [], [], None
    for r in reads:
        prod, qkv, at = _products(loaded, src, rd_blocks, r)
        rows.append(prod)
        qkv_rows.append(qkv)
        if at is not None:
            at_sum = at.sum(0) if at_sum is None else at_sum + at.sum(0)
    per_pair = torch.cat(rows)
    return EdgeMatrix(
        sources=tuple(src.sources), readers=tuple(rd_blocks), per_pair=per_pair, qkv=torch.cat(qkv_rows),
        at=None if at_sum is None else at_sum / per_pair.shape[0],
        positions=tuple(positions[1]) if positions else (), parallel=loaded.parallel,
        group_size=loaded.geom.group_size,
    )


def edges_step(state: RunState, step: Step, work: BatchWork | None = None) -> None:
    """Edge weights among the nodes the plan's selection keeps (none when more than EDGE_LIMIT are kept)."""
    from atpdsl.circuit.select import select
    from atpdsl.engine.result import build_result

    rd: _Readers = state.parts["edge_reads"]
    try:
        result = build_result(state)
        outcome = select(result, state.plan.selection, aggregate=state.plan.method.aggregate)
        if len(outcome.selected) > EDGE_LIMIT:
            state.extras["edges_skipped"] = f"{len(outcome.selected)} nodes selected (edges only up to {EDGE_LIMIT})"
            return
        by_name = result.by_name()
        nodes = [by_name[name].node for name in outcome.selected]
        m = matrix_from_reads(state.ctx.loaded, nodes, rd.blocks, list(rd.store), state.ctx.table.positions)
        state.edges = tuple(weighted_edges(m, nodes))
    finally:
        rd.store.close()


def edge_matrix(plan: Plan, nodes: Sequence[NodeId], *, loaded: Loaded | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> EdgeMatrix:
    """The EdgeMatrix of `embed` and `nodes` on a plan's pairs, on its own (a corrupt forward and a clean forward +
    backward per batch over just these nodes' sites): for tests and for studying edges outside a run."""
    from atpdsl.engine.context import Accumulator

    loaded = loaded or load_model(plan.model)
    groups = node_groups(nodes)
    from dataclasses import replace

    ctx = make_context(replace(plan, nodes=groups), loaded)
    state = RunState(ctx, (), Accumulator(ctx.table.size, False), extra=ExtraSites({s.key for s in ctx.sites}))
    rd = _add_reader_sites(loaded, state.extra)
    reads = []
    for i, batch in enumerate(ctx.batches):
        work = BatchWork(batch)
        corrupt_forward(state, None, work)
        clean_forward_backward(state, None, work)
        reads.append(take_reads(ctx, rd, work))
        if progress:
            progress("edges", i + 1, len(ctx.batches))
    return matrix_from_reads(loaded, nodes, rd.blocks, reads, ctx.table.positions)
