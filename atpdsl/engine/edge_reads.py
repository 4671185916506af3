"""Edges inside the run: the `edge_reads` batch step keeps what the edges need from the AtP passes themselves (the
node sites' corrupt - clean differences, and per gradient pass the reader blocks' norm inputs and branch gradients
and each layer's attention and projection reads: atpdsl.engine.edge_sites), and the `edges` run step, once the
circuit's candidate nodes are known, turns the kept reads into per-target edge scores (atpdsl.engine.edges has the
math, atpdsl.engine.edge_products the products).

The run keeps the reads like every kept item (atpdsl.engine.state.SpillList: in memory up to a limit, then in a
temporary folder removed when the run ends), so the edges never need a second pass over the model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from atpdsl.names import NodeId
from atpdsl.plan import Plan, Step
from atpdsl.engine.atp import MAIN, corrupt_forward, clean_forward_backward, site_delta
from atpdsl.engine.context import make_context
from atpdsl.engine.data import Batch
from atpdsl.engine.edge_ig import IG_CACHE, integration_passes
from atpdsl.engine.edge_products import matrix_from_reads
from atpdsl.engine.edge_sites import KEPT, EdgeSites, PassReads, add_edge_sites, pass_reads
from atpdsl.engine.edges import EdgeMatrix, node_groups, weighted_edges
from atpdsl.engine.load import Loaded, load_model
from atpdsl.engine.state import BatchWork, ExtraSites, RunState

__all__ = ["EDGE_LIMIT", "KEPT", "EdgeReads", "prepare_edge_reads", "edge_reads_step", "edges_step", "edge_matrix",
           "candidate_nodes"]

EDGE_LIMIT = 200
"""Edges are attributed among at most this many nodes."""


@dataclass(slots=True)
class EdgeReads:
    """One batch's reads: node sites' differences [rows, S, w] by site key, the embedding's difference, the rotary
    tables (None without rotary), and one PassReads per gradient pass (`ig`: the passes are integration steps)."""

    batch: Batch
    deltas: dict[str, torch.Tensor]
    d_emb: torch.Tensor
    tables: tuple[torch.Tensor, torch.Tensor] | None
    passes: list[PassReads]
    ig: bool = False

    def to_record(self) -> dict[str, Any]:
        """The tensors a checkpoint stores (the batch is the run's own)."""
        return {"deltas": self.deltas, "d_emb": self.d_emb, "tables": self.tables, "ig": self.ig,
                "passes": [p.to_record() for p in self.passes]}

    @classmethod
    def from_record(cls, batch: Batch, record: dict[str, Any]) -> "EdgeReads":
        tables = record["tables"]
        return cls(batch, record["deltas"], record["d_emb"], None if tables is None else tuple(tables),
                   [PassReads.from_record(p) for p in record["passes"]], bool(record["ig"]))

    @property
    def nbytes(self) -> int:
        tensors = [self.d_emb, *self.deltas.values(), *(self.tables or ())]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(p.nbytes for p in self.passes)


def take_reads(ctx, sites: EdgeSites, work: BatchWork) -> EdgeReads:
    """One batch's reads from its corrupt and clean traces (and the integration steps' passes, when run)."""
    deltas = work.cache.setdefault("deltas", {})
    for site in ctx.table.sites:
        if site.name not in deltas:
            deltas[site.name] = site_delta(ctx, work, site.name)
    ig = work.cache.get(IG_CACHE)
    passes = ig if ig else [pass_reads(ctx.loaded, sites, work.clean.acts, work.clean.grads[MAIN])]
    tables = None if sites.rotary is None else tuple(work.clean.acts[k].detach() for k in sites.rotary)
    return EdgeReads(work.batch, {s.name: deltas[s.name] for s in ctx.table.sites},
                     site_delta(ctx, work, sites.embed_key), tables, passes, bool(ig))


def prepare_edge_reads(state: RunState, step: Step) -> None:
    """Add every site the edges read to the sites both runs read."""
    state.parts["edge_reads"] = add_edge_sites(state.ctx.loaded, state.extra, state.ctx.table)


def edge_reads_step(state: RunState, step: Step, work: BatchWork) -> None:
    """Keep this batch's reads for the `edges` step."""
    work.kept[KEPT] = take_reads(state.ctx, state.parts["edge_reads"], work)


def candidate_nodes(state: RunState, result) -> tuple[list[NodeId], str | None]:
    """The nodes edges are computed among, and why some were left out (None when none was).

    Node selection (the default): the selected nodes, none at all beyond EDGE_LIMIT. Edge selection (`select
    edges ...`): the selected nodes when the spec selects nodes too, else every scored node; beyond EDGE_LIMIT
    the EDGE_LIMIT best-ranked of them."""
    from atpdsl.circuit.select import ranked, select

    plan = state.plan
    edge_rule = plan.edges.selection if plan.edges is not None else None
    if edge_rule is not None and plan.selection is None:
        names = [n.name for n in ranked(result.nodes)]
    else:
        names = list(select(result, plan.selection, aggregate=plan.method.aggregate).selected)
    by_name = result.by_name()
    if len(names) <= EDGE_LIMIT:
        return [by_name[n].node for n in names], None
    if edge_rule is None:
        return [], f"{len(names)} nodes selected (edges only up to {EDGE_LIMIT})"
    kept = [by_name[n].node for n in ranked([by_name[n] for n in names])[:EDGE_LIMIT]]
    return kept, f"edges among the {EDGE_LIMIT} best-ranked of {len(names)} candidate nodes"


def edges_step(state: RunState, step: Step, work: BatchWork | None = None) -> None:
    """Edge scores among the candidate nodes (see `candidate_nodes`), from the kept reads."""
    from atpdsl.engine.result import build_result

    try:
        nodes, note = candidate_nodes(state, build_result(state))
        if note is not None:
            state.extras["edges_skipped" if not nodes else "edges_note"] = note
        if not nodes:
            return
        m = matrix_from_reads(state.ctx.loaded, state.parts["edge_reads"], nodes, state.kept.get(KEPT, ()),
                              state.ctx.table.positions, fixes=edge_fixes(state.plan.method))
        state.edges = tuple(weighted_edges(m))
        if m.ig_steps:
            state.extras["edge_ig_steps"] = m.ig_steps
    finally:
        kept = state.kept.pop(KEPT, None)
        if kept is not None:
            kept.close()


def edge_fixes(method) -> tuple[bool, bool]:
    """(QK fix, norm fix) for the edges: what `method atp* { ... }` switches on."""
    return (method.name == "atp*" and method.qk_fix, method.name == "atp*" and method.norm_fix)


def edge_matrix(plan: Plan, nodes: Sequence[NodeId], *, loaded: Loaded | None = None, ig_steps: int = 0,
                keep_pairs: bool = True, progress: Callable[[str, int, int], None] | None = None) -> EdgeMatrix:
    """The EdgeMatrix of `embed` and `nodes` on a plan's pairs, on its own (a corrupt forward and a clean forward +
    backward per batch over just these nodes' sites, plus `ig_steps` integration steps; the QK and norm fixes
    when the plan's method switches them on): for tests and studies."""
    from atpdsl.engine.context import Accumulator

    loaded = loaded or load_model(plan.model)
    ctx = make_context(replace(plan, nodes=node_groups(nodes)), loaded)
    state = RunState(ctx, (), Accumulator(ctx.table.size, False), extra=ExtraSites({s.key for s in ctx.sites}))
    sites = add_edge_sites(loaded, state.extra, ctx.table)
    if keep_pairs:
        sites.whole = None  # the reader-block products (EdgeMatrix.blocks) take every block's gradient
    reads = []
    for i, batch in enumerate(ctx.batches):
        work = BatchWork(batch)
        corrupt_forward(state, None, work)
        clean_forward_backward(state, None, work)
        if ig_steps:
            work.cache[IG_CACHE] = integration_passes(state, sites, work, ig_steps)
        reads.append(take_reads(ctx, sites, work))
        if progress:
            progress("edges", i + 1, len(ctx.batches))
    return matrix_from_reads(loaded, sites, nodes, reads, ctx.table.positions, keep_pairs=keep_pairs,
                             fixes=edge_fixes(plan.method))
