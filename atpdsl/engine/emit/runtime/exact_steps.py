"""Exact activation patching (`method exact`'s `clean_forward` and `exact_patch` steps, and `verify`): many
patched copies of the clean batch per forward, one node per copy.

effect(n) = M(clean run with n set to its corrupt-run value) - M(clean run), per pair.
"""
from __future__ import annotations

import torch

from atpdsl.engine.context import metric_reads
from atpdsl.engine.emit.runtime.objects import BatchWork, Context, RunState, Step, TraceOut
from atpdsl.engine.emit.runtime.traces import patched_forward, read_forward
from atpdsl.engine.exact import _refs, changed_columns, chunk_patches, chunk_rows, inputs_of
from atpdsl.engine.metrics import metric_values


def patches_for(ctx: Context, batch, chunk: list, refs) -> list:
    """(module, attr, mask, source) per site touched by a chunk of node columns (atpdsl's chunk_patches)."""
    return [(site.module, site.attr, mask, source) for site, mask, source in chunk_patches(ctx, batch, chunk, refs)]


def exact_effects(ctx: Context, batch, columns: list, refs, spec, eval_: bool = False) -> torch.Tensor:
    """Per-pair exact effects [pairs, len(columns)] of patching each node column on its own (in every model row
    of its pair); nodes whose corrupt value is their clean one have effect exactly 0 and are not run."""
    per_fwd = max(1, chunk_rows(ctx, batch) // batch.n_rows)
    out = torch.zeros((batch.size, len(columns)), dtype=torch.float64)
    reads = metric_reads(batch, eval_)
    changed = changed_columns(ctx, batch, refs)
    slots = [j for j, col in enumerate(columns) if changed[col]]
    columns = [columns[j] for j in slots]
    for lo in range(0, len(columns), per_fwd):
        chunk = list(columns[lo: lo + per_fwd])
        k = len(chunk)
        last = patched_forward(ctx.model, inputs_of(batch, k), patches_for(ctx, batch, chunk, refs),
                               reads.repeat(k).pos)
        values = metric_values(spec, last, reads.repeat(k), refs.clean_logprobs.repeat(k, 1))
        pairs = refs.clean_rows.shape[0]
        out[:, slots[lo: lo + k]] = (values.double().view(k, pairs) - refs.clean_rows.double().view(1, pairs)).T.cpu()
    return out


def verify(ctx: Context, columns: list, *, progress=None, checkpoint=None) -> torch.Tensor:
    """Exact per-pair effects [n_pairs, len(columns)] with the evaluation metric (or the metric)."""
    spec = ctx.plan.eval_metric or ctx.plan.metric
    eval_ = ctx.plan.eval_metric is not None
    needed = sorted({ctx.table.block_of(c).site for c in columns})
    reads = [(s.key, s.module, s.attr, None) for s in (ctx.sites[i] for i in needed)]
    out = []
    for batch in ctx.batches:
        at = metric_reads(batch, eval_)
        corrupt, clean = TraceOut(), TraceOut()
        corrupt.acts, corrupt.last = read_forward(ctx.model, batch.corrupt, reads, at.corrupt_pos)
        clean.acts, clean.last = read_forward(ctx.model, batch.clean, reads, at.pos)
        refs = _refs(corrupt, clean, batch, spec, eval_)
        out.append(exact_effects(ctx, batch, columns, refs, spec, eval_=eval_))
    return torch.cat(out) if out else torch.zeros((0, len(columns)), dtype=torch.float64)


def clean_forward(state: RunState, step: Step, work: BatchWork) -> None:
    """`method exact`: the clean prompts without gradients (the metric's baseline and the clean values)."""
    ctx, batch = state.ctx, work.batch
    clean = TraceOut()
    clean.acts, clean.last = read_forward(ctx.model, batch.clean, ctx.reads, batch.reads.pos)
    work.clean = clean
    work.cache["refs"] = refs = _refs(work.corrupt, clean, batch, ctx.plan.metric)
    work.clean_rows, work.corrupt_rows = refs.clean_rows, refs.corrupt_rows


def exact_patch_step(state: RunState, step: Step, work: BatchWork) -> None:
    """`method exact`: every node patched on its own in the batch's clean run; the effects are its numbers."""
    ctx = state.ctx
    work.est = exact_effects(ctx, work.batch, list(range(ctx.table.size)), work.cache["refs"], ctx.plan.metric)
