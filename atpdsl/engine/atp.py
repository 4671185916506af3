"""Attribution patching: per batch a corrupt forward, a clean forward and backward, then per-node estimates.

AtP estimate of node n for one pair = (n(corrupt) - n(clean)) . dM/dn at the clean run, summed over the
node's columns (and positions when summed). AtP* plugs in through `Correction`: extra trace sites and
backward blocks, then an `apply` step that rewrites some estimates (QK fix) or supplies the per-pair
ranking magnitudes (GradDrop).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from atpdsl.engine.context import Accumulator, Context, align, merge_sites
from atpdsl.engine.data import Batch
from atpdsl.engine.metrics import metric_rows
from atpdsl.engine.node_table import block_estimates, unit_values
from atpdsl.engine.trace import Backward, TraceOut, TraceSite, run_trace

__all__ = ["BatchRun", "Correction", "atp_batch", "atp_estimates", "site_delta", "site_estimates", "run_atp", "MAIN"]

MAIN = "main"  # name of the plain backward block


@dataclass(slots=True)
class BatchRun:
    """The two traces of one batch: corrupt (values only) and clean (values, grads per backward block)."""

    batch: Batch
    corrupt: TraceOut
    clean: TraceOut


class Correction(Protocol):
    """An AtP* ingredient plugged into the AtP loop (QK fix, GradDrop)."""

    def sites(self, ctx: Context) -> Sequence[TraceSite]:
        """Extra values to read in both runs (with `order` keys to place them in forward order)."""

    def backwards(self, ctx: Context) -> Sequence[Backward]:
        """Extra backward blocks after the plain one (set retain_graph on all but the last)."""

    def apply(self, ctx: Context, run: BatchRun, est: torch.Tensor) -> torch.Tensor | None:
        """Edit the per-pair estimates [b, N] in place; return per-pair ranking magnitudes or None (|est|)."""

    # Optional: `keep_graph = True` keeps the clean run's graph for `apply` (TraceOut.live, module sites only);
    # `scores(ctx, aggregate, n_pairs) -> Tensor | None` replaces the dataset score after the last batch.


def atp_batch(ctx: Context, batch: Batch, corrections: Sequence[Correction] = ()) -> BatchRun:
    """Run one batch's corrupt forward (no grad) and clean forward + backward blocks."""
    extra: list[TraceSite] = []
    blocks: list[Backward] = []
    for c in corrections:
        extra.extend(c.sites(ctx))
        blocks.extend(c.backwards(ctx))
    keep_graph = any(getattr(c, "keep_graph", False) for c in corrections)
    sites = merge_sites(ctx.sites, extra) if extra else ctx.sites
    main = Backward(MAIN, retain_graph=bool(blocks))
    blocks = [main] + [
        Backward(b.name, b.zero, b.read, retain_graph=(i < len(blocks) - 1) or b.retain_graph)
        for i, b in enumerate(blocks)
    ]
    t0 = time.perf_counter()
    with torch.no_grad():
        corrupt = run_trace(ctx.model, batch.corrupt, sites, last_pos=batch.corrupt_metric_pos)
    t1 = time.perf_counter()
    clean = run_trace(ctx.model, batch.clean, sites, embed=ctx.embed, metric=ctx.metric_fn(batch),
                      last_pos=batch.metric_pos, backwards=blocks, keep_graph=keep_graph)
    t2 = time.perf_counter()
    ctx.add_time("forward", (t1 - t0) + (t2 - t1 - clean.backward_s))
    ctx.add_time("backward", clean.backward_s)
    return BatchRun(batch, corrupt, clean)


def site_delta(ctx: Context, run: BatchRun, key: str) -> torch.Tensor:
    """corrupt - clean at one site on the clean positions (float32), zero where a position has no node value."""
    batch = run.batch
    delta = align(run.corrupt.acts[key], batch).float() - run.clean.acts[key].float()
    # Positions without a node value (left padding, unaligned slot tokens) get delta = 0: no estimate there.
    if batch.cmap is None and bool(batch.real.all()):
        return delta
    return delta * batch.real.unsqueeze(-1)


def site_estimates(ctx: Context, run: BatchRun, si: int, delta: torch.Tensor, grad: torch.Tensor,
                   est: torch.Tensor) -> None:
    """Write the AtP estimates of table site `si`'s blocks into est [b, N] from its delta and a gradient."""
    batch = run.batch
    prod = delta * grad.float()
    for b in ctx.table.blocks_at(si):
        est[:, b.first: b.first + b.size] = block_estimates(b, unit_values(prod, b.layout), batch.real,
                                                            batch.node_pos)


def atp_estimates(ctx: Context, run: BatchRun, block: str = MAIN) -> torch.Tensor:
    """Per-pair AtP estimates [b, N] (float32) from one backward block's gradients."""
    batch = run.batch
    table = ctx.table
    est = torch.zeros((batch.size, table.size), dtype=torch.float32, device=batch.real.device)
    grads = run.clean.grads[block]
    for si, site in enumerate(table.sites):
        site_estimates(ctx, run, si, site_delta(ctx, run, site.name), grads[site.name], est)
    return est


def run_atp(ctx: Context, corrections: Sequence[Correction] = (), *,
            progress: Callable[[str, int, int], None] | None = None, keep_rows: bool = False) -> Accumulator:
    """AtP over every batch, streaming the sums (and per-pair rows when `keep_rows`)."""
    acc = Accumulator(ctx.table.size, keep_rows)
    n = len(ctx.batches)
    spec = ctx.plan.metric
    for i, batch in enumerate(ctx.batches):
        if progress:
            progress("forward", i, n)
        run = atp_batch(ctx, batch, corrections)
        t0 = time.perf_counter()
        est = atp_estimates(ctx, run)
        ctx.add_time("estimate", time.perf_counter() - t0)
        magnitude = None
        try:
            for c in corrections:  # each times itself
                m = c.apply(ctx, run, est)
                if m is not None:
                    magnitude = m
        finally:
            run.clean.live.clear()  # the kept graph, if any, is not needed past the corrections
        t0 = time.perf_counter()
        acc.add(est, magnitude)
        corrupt_rows = metric_rows(spec, run.corrupt.last, batch.answers)
        acc.add_metrics(run.clean.metric, corrupt_rows)
        ctx.add_time("estimate", time.perf_counter() - t0)
        if progress:
            progress("forward", i + 1, n)  # the bar ends at n/n
        if progress:
            progress("backward", i + 1, n)
    return acc
