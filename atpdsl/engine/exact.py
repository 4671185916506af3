"""Exact activation patching: many patched copies of the clean batch per forward, one node per copy.

effect(n) = M(clean run with n set to its corrupt-run value) - M(clean run), per pair. A chunk of K
nodes runs as one forward of K copies of the batch; at each site the copies whose node lives there take
the corrupt values on that node's columns and positions (`torch.where` with a prebuilt mask).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from atpdsl.memory import rows_per_patch
from atpdsl.plan import MetricSpec, Step
from atpdsl.engine.context import Context, align, metric_reads
from atpdsl.engine.data import Batch
from atpdsl.engine.finite import check_rows, check_values
from atpdsl.engine.metrics import MetricInput, metric_values
from atpdsl.engine.node_table import block_estimates, unit_values
from atpdsl.engine.state import BatchWork, RunState
from atpdsl.engine.trace import TraceOut, TraceSite, run_trace

__all__ = ["BatchRefs", "batch_refs", "changed_columns", "exact_effects", "subset_effects", "clean_forward",
           "exact_patch_step", "chunk_rows"]


class BatchRefs:
    """What patching one batch needs: corrupt site values (aligned), clean metric rows and log-probs, and the
    clean site values (to skip nodes whose corrupt value is their clean value: their effect is exactly 0)."""

    def __init__(self, corrupt: dict[str, torch.Tensor], clean_rows: torch.Tensor, corrupt_rows: torch.Tensor,
                 clean_logprobs: torch.Tensor, clean: dict[str, torch.Tensor] | None = None):
        self.corrupt = corrupt
        self.clean_rows = clean_rows
        self.corrupt_rows = corrupt_rows
        self.clean_logprobs = clean_logprobs
        self.clean = clean or {}


def batch_refs(ctx: Context, batch: Batch, sites: Sequence[TraceSite], spec: MetricSpec, eval_: bool) -> BatchRefs:
    """Corrupt forward (site values) and clean forward (metric values) without gradients."""
    reads = metric_reads(batch, eval_)
    with torch.no_grad():
        corrupt = run_trace(ctx.model, batch.corrupt, sites, last_pos=reads.corrupt_pos)
        clean = run_trace(ctx.model, batch.clean, sites, last_pos=reads.pos)
    return _refs(corrupt, clean, batch, spec, eval_)


def _refs(corrupt: TraceOut, clean: TraceOut, batch: Batch, spec: MetricSpec, eval_: bool = False) -> BatchRefs:
    reads = metric_reads(batch, eval_)
    clean_lp = torch.log_softmax(MetricInput(clean.last, reads).position_logits(), -1)  # kl's reference
    clean_rows = metric_values(spec, clean.last, reads, clean_lp)
    corrupt_rows = metric_values(spec, corrupt.last, reads.corrupt(), clean_lp)
    aligned = {k: align(v, batch) for k, v in corrupt.acts.items()}
    return BatchRefs(aligned, clean_rows, corrupt_rows, clean_lp, clean.acts)


def changed_columns(ctx: Context, batch: Batch, refs: BatchRefs) -> torch.Tensor:
    """Bool [N]: table columns whose corrupt value differs from the clean one in some pair of the batch (at the
    node's position, or anywhere for summed nodes). Patching any other node changes nothing: its effect is 0.
    Columns at sites without clean values count as changed."""
    out = torch.ones(ctx.table.size, dtype=torch.bool)
    real = batch.real
    for si, site in enumerate(ctx.sites):
        if site.key not in refs.clean or site.key not in refs.corrupt:
            continue
        diff = (refs.corrupt[site.key] != refs.clean[site.key]) & real.unsqueeze(-1)
        for blk in ctx.table.blocks_at(si):
            hits = block_estimates(blk, unit_values(diff.float(), blk.layout), real, batch.node_pos)
            out[blk.first: blk.first + blk.size] = (hits > 0).any(0).cpu()
    return out


def chunk_rows(ctx: Context, batch: Batch) -> int:
    """How many patched rows one forward may hold (bounded activation memory; the memory plan counts the same)."""
    g = ctx.loaded.geom
    vocab = int(ctx.loaded.config.get("vocab_size") or 50257)  # as atpdsl.memory_sizes
    return rows_per_patch(g.hidden, g.mlp, g.n_heads, g.n_layers, vocab, batch.clean["input_ids"].shape[1],
                          batch.n_rows)


def chunk_patches(ctx: Context, batch: Batch, chunk: Sequence[int],
                  refs: BatchRefs) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
    """(site, mask, source) per table site a chunk of node columns touches: copy j of the batch takes the corrupt
    value on node chunk[j]'s columns (and at its position, for a per-position node). Masks are [k*b, S, W]."""
    table, b, real = ctx.table, batch.n_rows, batch.real
    by_site: dict[int, list[tuple[int, int]]] = {}
    for copy, col in enumerate(chunk):
        by_site.setdefault(table.block_of(col).site, []).append((copy, col))
    out = []
    for si in sorted(by_site):
        site = ctx.sites[si]
        src = refs.corrupt[site.key]
        cols = torch.zeros((len(chunk), src.shape[-1]), dtype=torch.bool, device=src.device)
        where = torch.zeros((len(chunk), b, src.shape[1]), dtype=torch.bool, device=src.device)
        for copy, col in by_site[si]:
            blk = table.block_of(col)
            unit, p = blk.locate(col)
            c0, c1 = blk.layout.columns(unit)
            cols[copy, c0:c1] = True
            if p is None:
                where[copy] = real
            else:
                onehot = torch.zeros_like(real)
                onehot[torch.arange(b, device=onehot.device), batch.node_pos[:, p]] = True
                where[copy] = onehot & real
        mask = (where.unsqueeze(-1) & cols[:, None, None, :]).reshape(len(chunk) * b, src.shape[1], src.shape[-1])
        out.append((site, mask, src.repeat(len(chunk), 1, 1)))
    return out


def exact_effects(ctx: Context, batch: Batch, columns: Sequence[int], refs: BatchRefs, spec: MetricSpec,
                  eval_: bool = False, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Per-pair exact effects [pairs, len(columns)] of patching each node column on its own (in every model row
    of its pair)."""
    b = batch.n_rows
    per_fwd = max(1, chunk_rows(ctx, batch) // b)
    out = torch.zeros((batch.size, len(columns)), dtype=torch.float64)
    reads = metric_reads(batch, eval_)
    changed = changed_columns(ctx, batch, refs)
    slots = [j for j, col in enumerate(columns) if changed[col]]  # the others' effect is exactly 0
    skipped = len(columns) - len(slots)
    columns = [columns[j] for j in slots]
    if progress and not columns:
        progress(skipped)
    for lo in range(0, len(columns), per_fwd):
        chunk = list(columns[lo: lo + per_fwd])
        k = len(chunk)
        placed = chunk_patches(ctx, batch, chunk, refs)
        sites = [site for site, _, _ in placed]
        patches = {site.key: _patcher(mask, source) for site, mask, source in placed}
        out[:, slots[lo: lo + k]] = _effects(ctx, inputs_of(batch, k), sites, patches, spec, reads, refs, k)
        if progress:
            progress(skipped + lo + k)
    return out


def _site_mask(ctx: Context, batch: Batch, si: int, subsets: torch.Tensor, width: int) -> torch.Tensor | None:
    """Patch mask [k, b, S, W] at table site `si`: copy j patches every node of row j of `subsets` [k, N] there."""
    table = ctx.table
    k, b, seq = subsets.shape[0], batch.n_rows, batch.real.shape[1]
    device = batch.real.device
    out = torch.zeros((k, b, seq, width), dtype=torch.bool, device=device)
    hit = False
    for blk in table.blocks_at(si):
        sub = subsets[:, blk.first: blk.first + blk.size].to(device)
        if not bool(sub.any()):
            continue
        hit = True
        sub = sub.reshape(k, len(blk.units), blk.n_positions).float()
        if blk.per_position:
            onehot = torch.zeros((blk.n_positions, b, seq), dtype=torch.float32, device=device)
            rows = torch.arange(b, device=device)
            for p in range(blk.n_positions):
                onehot[p, rows, batch.node_pos[:, p]] = 1.0
            onehot = onehot * batch.real.float()
            at = torch.einsum("kup,pbs->kbsu", sub, onehot) > 0  # [k, b, S, units]
        else:
            at = (sub[..., 0][:, None, None, :] > 0) & batch.real[None, :, :, None]
        cols = torch.zeros((len(blk.units), width), dtype=torch.float32, device=device)
        for i, unit in enumerate(blk.units):
            c0, c1 = blk.layout.columns(unit)
            cols[i, c0:c1] = 1.0
        out |= torch.einsum("kbsu,uw->kbsw", at.float(), cols) > 0
    return out if hit else None


def subset_effects(ctx: Context, batch: Batch, subsets: torch.Tensor, refs: BatchRefs, spec: MetricSpec,
                   eval_: bool = False) -> torch.Tensor:
    """Per-pair effects [pairs, k] of patching, for each row of `subsets` (bool [k, N] over table columns), every
    node of that row at once (the false-negative diagnostic's random subsets); many rows per forward."""
    b = batch.n_rows
    k_all = subsets.shape[0]
    per_fwd = max(1, chunk_rows(ctx, batch) // b)
    out = torch.zeros((batch.size, k_all), dtype=torch.float64)
    reads = metric_reads(batch, eval_)
    for lo in range(0, k_all, per_fwd):
        chunk = subsets[lo: lo + per_fwd]
        k = chunk.shape[0]
        sites, patches = [], {}
        for si, site in enumerate(ctx.sites):
            if site.key not in refs.corrupt:
                continue
            src = refs.corrupt[site.key]
            mask = _site_mask(ctx, batch, si, chunk, src.shape[-1])
            if mask is None:
                continue
            sites.append(site)
            patches[site.key] = _patcher(mask.reshape(k * b, src.shape[1], src.shape[-1]), src.repeat(k, 1, 1))
        out[:, lo: lo + k] = _effects(ctx, inputs_of(batch, k), sites, patches, spec, reads, refs, k)
    return out


def inputs_of(batch: Batch, copies: int) -> dict[str, torch.Tensor]:
    """The clean inputs of `copies` stacked copies of the batch."""
    return {name: t.repeat(copies, 1) for name, t in batch.clean.items()}


def _effects(ctx: Context, inputs: dict, sites: list, patches: dict, spec: MetricSpec, reads, refs: BatchRefs,
             k: int) -> torch.Tensor:
    """One patched forward of k copies: per-pair metric changes [pairs, k] against the clean run."""
    with torch.no_grad():
        res = run_trace(ctx.model, inputs, sites, patches=patches, last_pos=reads.repeat(k).pos, keep=False)
    values = metric_values(spec, res.last, reads.repeat(k), refs.clean_logprobs.repeat(k, 1))
    pairs = refs.clean_rows.shape[0]
    return (values.double().view(k, pairs) - refs.clean_rows.double().view(1, pairs)).T.cpu()


def _patcher(mask: torch.Tensor, source: torch.Tensor):
    def patch(value: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, source.to(value.dtype), value)

    return patch


def clean_forward(state: RunState, step: Step, work: BatchWork) -> None:
    """`method exact`: the clean prompts without gradients (the metric's baseline and the clean site values),
    after the corrupt forward; together they are the batch's patching references."""
    ctx, batch = state.ctx, work.batch
    spec = ctx.plan.metric
    with torch.no_grad():
        clean = run_trace(ctx.model, batch.clean, ctx.sites, last_pos=batch.reads.pos)
    work.clean = clean
    work.cache["refs"] = refs = _refs(work.corrupt, clean, batch, spec)
    work.clean_rows, work.corrupt_rows = refs.clean_rows, refs.corrupt_rows
    check_values(ctx, batch, clean.acts, [s.key for s in ctx.sites], "clean run")
    check_rows(ctx, batch, refs.clean_rows, "the metric on the clean prompt")
    check_rows(ctx, batch, refs.corrupt_rows, "the metric on the corrupt prompt")


def exact_patch_step(state: RunState, step: Step, work: BatchWork) -> None:
    """`method exact`: every node patched on its own in the batch's clean run; the effects are its numbers."""
    ctx = state.ctx
    table = ctx.table
    total = len(ctx.batches) * table.size
    base = state.parts.get("exact_done", 0)

    def tick(n: int) -> None:
        state.report("exact", base + n, total)

    work.est = exact_effects(ctx, work.batch, list(range(table.size)), work.cache["refs"], ctx.plan.metric,
                             progress=tick)
    check_rows(ctx, work.batch, work.est, "an exact patching effect")
    state.parts["exact_done"] = base + table.size
