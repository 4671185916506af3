"""Attribution patching's two batch steps: the corrupt forward and the clean forward + backward, and the
per-node estimates they give.

AtP estimate of node n for one pair = (n(corrupt) - n(clean)) . dM/dn at the clean run, summed over the
node's columns (and positions when summed). The corrections (QK fix, norm fix, GradDrop) are later steps that
rewrite some columns of these estimates in place (atpdsl.engine.corrections).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import torch

from atpdsl.plan import Step
from atpdsl.engine.context import Context, align, merge_sites
from atpdsl.engine.metrics import metric_values
from atpdsl.engine.node_table import block_estimates, unit_values
from atpdsl.engine.finite import check_rows, check_values
from atpdsl.engine.site_check import check_trace
from atpdsl.engine.state import BatchWork, RunState
from atpdsl.engine.trace import Backward, TraceSite, run_trace

__all__ = ["MAIN", "trace_sites", "corrupt_forward", "clean_forward_backward", "site_delta", "site_estimates",
           "atp_estimates"]

MAIN = "main"  # name of the plain backward block


def trace_sites(state: RunState) -> list[TraceSite]:
    """The plan's node sites and every site the steps added, in forward order (computed once)."""
    sites = state.parts.get("sites")
    if sites is None:
        flat = state.ctx.loaded.arch.is_flat  # the steps' extra sites (norm inputs, ...) may see [b * S, W] too
        extra = [replace(s, flat=flat(s.module)) for s in state.extra.sites.values()] if state.extra is not None else []
        sites = merge_sites(state.ctx.sites, extra) if extra else list(state.ctx.sites)
        state.parts["sites"] = sites
    return sites


def corrupt_forward(state: RunState, step: Step, work: BatchWork) -> None:
    """Run the corrupt prompts without gradients, keeping every site's value and the logits at the metric."""
    ctx, batch = state.ctx, work.batch
    with torch.no_grad():
        work.corrupt = run_trace(ctx.model, batch.corrupt, trace_sites(state), last_pos=batch.reads.corrupt_pos)
    if "sites_checked" not in state.parts:  # the first batch: every site has the shape its record promises
        check_trace(ctx, work.corrupt, batch.corrupt, "corrupt")
        state.parts["sites_checked"] = True
    check_values(ctx, batch, work.corrupt.acts, [s.key for s in trace_sites(state)], "corrupt run")


def clean_forward_backward(state: RunState, step: Step, work: BatchWork) -> None:
    """Run the clean prompts keeping the graph, one backward from the metric, then the AtP estimates."""
    ctx, batch = state.ctx, work.batch
    rule = state.parts.get("gradient_rule")  # a context manager changing how gradients flow (RelP), or None
    with (rule() if rule is not None else contextlib.nullcontext()):
        work.clean = run_trace(ctx.model, batch.clean, trace_sites(state), embed=ctx.embed,
                               metric=ctx.metric_fn(batch), last_pos=batch.reads.pos,
                               backwards=[Backward(MAIN, retain_graph=state.keep_graph)],
                               keep_graph=state.keep_graph)
    work.clean_rows = work.clean.metric
    work.corrupt_rows = metric_values(ctx.plan.metric, work.corrupt.last, batch.reads.corrupt())
    keys = [s.key for s in trace_sites(state)]
    check_values(ctx, batch, work.clean.acts, keys, "clean run")
    check_rows(ctx, batch, work.clean_rows, "the metric on the clean prompt")
    check_rows(ctx, batch, work.corrupt_rows, "the metric on the corrupt prompt")
    check_values(ctx, batch, work.clean.grads[MAIN], keys[::-1], "backward pass")
    work.est = atp_estimates(ctx, work)


def site_delta(ctx: Context, work: BatchWork, key: str) -> torch.Tensor:
    """corrupt - clean at one site on the clean positions (float32), zero where a position has no node value."""
    batch = work.batch
    delta = align(work.corrupt.acts[key], batch).float() - work.clean.acts[key].float()
    # Positions without a node value (left padding, unaligned slot tokens) get delta = 0: no estimate there
    # (`where`, not a product: a padded position's value may be NaN, and 0 * NaN is NaN).
    if batch.cmap is None and bool(batch.real.all()):
        return delta
    return torch.where(batch.real.unsqueeze(-1), delta, 0.0)


def site_estimates(ctx: Context, work: BatchWork, si: int, delta: torch.Tensor, grad: torch.Tensor,
                   est: torch.Tensor) -> None:
    """Write the AtP estimates of table site `si`'s blocks into est [b, N] from its delta and a gradient."""
    batch = work.batch
    prod = delta * grad.float()
    if not bool(batch.real.all()):  # padding: its gradient may be NaN, and 0 * NaN is NaN
        prod = torch.where(batch.real.unsqueeze(-1), prod, 0.0)
    for b in ctx.table.blocks_at(si):
        est[:, b.first: b.first + b.size] = block_estimates(b, unit_values(prod, b.layout), batch.real,
                                                            batch.node_pos)


def atp_estimates(ctx: Context, work: BatchWork, block: str = MAIN,
                  sites: Sequence[int] | None = None) -> torch.Tensor:
    """AtP estimates [rows, N] (float32) from one backward block's gradients, one row per model row (a pair's
    estimate is the sum of its rows', `data.pair_sum`, when a metric reads several answers)."""
    batch = work.batch
    table = ctx.table
    est = torch.zeros((batch.n_rows, table.size), dtype=torch.float32, device=batch.real.device)
    grads = work.clean.grads[block]
    for si, site in enumerate(table.sites):
        if sites is None or si in sites:
            site_estimates(ctx, work, si, site_delta(ctx, work, site.name), grads[site.name], est)
    return est
