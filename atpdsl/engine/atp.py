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
from atpdsl.engine import trace
from atpdsl.engine.placement import remote_of
from atpdsl.engine.trace import Backward, TraceSite, run_trace
from atpdsl.engine.trace_stream import run_streamed
from atpdsl.lowering import streams

__all__ = ["MAIN", "trace_sites", "corrupt_sites", "corrupt_forward", "clean_forward_backward", "site_delta",
           "site_estimates", "atp_estimates"]

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


def corrupt_sites(state: RunState) -> list[TraceSite]:
    """The sites the corrupt run reads: every traced site but those the steps read only on the clean prompt."""
    clean_only = state.extra.clean_only if state.extra is not None else set()
    return [s for s in trace_sites(state) if s.key not in clean_only]


def corrupt_forward(state: RunState, step: Step, work: BatchWork) -> None:
    """Run the corrupt prompts without gradients, keeping the value of every site a step reads on the corrupt
    prompt and the logits at the metric."""
    ctx, batch = state.ctx, work.batch
    sites = corrupt_sites(state)
    with torch.no_grad():
        work.corrupt = run_trace(ctx.model, batch.corrupt, sites, last_pos=batch.reads.corrupt_pos)
    if "corrupt_checked" not in state.parts:  # the first batch: every site has the shape its record promises
        check_trace(ctx, work.corrupt, batch.corrupt, "corrupt")
        state.parts["corrupt_checked"] = True
    check_values(ctx, batch, work.corrupt.acts, [s.key for s in sites], "corrupt run")


def clean_forward_backward(state: RunState, step: Step, work: BatchWork) -> None:
    """Run the clean prompts keeping the graph, one backward from the metric, then the AtP estimates (reduced site
    by site as the backward passes when no later batch step reads the node sites: `_streamed`)."""
    ctx, batch = state.ctx, work.batch
    rule = state.parts.get("gradient_rule")  # a context manager changing how gradients flow (RelP), or None
    kinds = {s.kind for s in state.steps}  # streamed only inside a plan that says what else reads the batch
    stream = (step is not None and "clean_backward" in kinds and streams(kinds) and not state.keep_graph
              and rule is None and not remote_of(ctx.model) and trace.FAST_BACKWARD)
    with (rule() if rule is not None else contextlib.nullcontext()):
        if stream:
            _streamed(state, work)
        else:
            work.clean = run_trace(ctx.model, batch.clean, trace_sites(state), embed=ctx.embed,
                                   metric=ctx.metric_fn(batch), last_pos=batch.reads.pos,
                                   backwards=[Backward(MAIN, retain_graph=state.keep_graph)],
                                   keep_graph=state.keep_graph)
    work.clean_rows = work.clean.metric
    work.corrupt_rows = metric_values(ctx.plan.metric, work.corrupt.last, batch.reads.corrupt())
    if "clean_checked" not in state.parts:  # the first batch: the sites read only here have their shapes too
        check_trace(ctx, work.clean, batch.clean, "clean")
        state.parts["clean_checked"] = True
    keys = [s.key for s in trace_sites(state)]
    if not stream:
        check_values(ctx, batch, work.clean.acts, keys, "clean run")
    check_rows(ctx, batch, work.clean_rows, "the metric on the clean prompt")
    check_rows(ctx, batch, work.corrupt_rows, "the metric on the corrupt prompt")
    if not stream:
        check_values(ctx, batch, work.clean.grads[MAIN], keys[::-1], "backward pass")
        work.est = atp_estimates(ctx, work)


def _streamed(state: RunState, work: BatchWork) -> None:
    """The clean forward + backward with each node site reduced to its estimates as soon as its value and gradient
    are known: the value becomes corrupt - clean at once (the corrupt value is dropped), the gradient meets it in a
    hook as the backward passes, so the batch never holds every site's value and gradient (atpdsl.memory). Sites a
    step reads (the edges' extra sites) are kept as usual; the node sites' differences too when the edges keep
    them. Same numbers as `atp_estimates` on the kept tensors: the same operations on the same tensors."""
    ctx, batch = state.ctx, work.batch
    index = {site.name: si for si, site in enumerate(ctx.table.sites)}
    keep = frozenset(state.extra.sites) | frozenset(state.extra.shared) if state.extra is not None else frozenset()
    est = torch.zeros((batch.n_rows, ctx.table.size), dtype=torch.float32, device=batch.real.device)
    edges = any(s.kind == "edge_reads" for s in state.steps)
    deltas = work.cache.setdefault("deltas", {}) if edges else None  # the edges keep them
    pending: dict[str, torch.Tensor] = {}

    def on_value(key: str, value: torch.Tensor) -> None:
        if key in index:
            corrupt = work.corrupt.acts[key] if key in keep else work.corrupt.acts.pop(key)
            pending[key] = _delta(align(corrupt, batch), value, batch)
            if deltas is not None:
                deltas[key] = pending[key]

    def on_grad(key: str, grad: torch.Tensor) -> None:  # in backward order: the first bad gradient is named
        check_values(ctx, batch, {key: grad}, [key], "backward pass")
        if key in index:
            site_estimates(ctx, work, index[key], pending.pop(key), grad, est)

    def check_forward(held: dict[str, torch.Tensor]) -> None:  # every value the forward made, in forward order
        check_values(ctx, batch, {**pending, **held}, [s.key for s in trace_sites(state)], "clean run")

    work.clean = run_streamed(ctx.model, batch.clean, trace_sites(state), embed=ctx.embed,
                              metric=ctx.metric_fn(batch), last_pos=batch.reads.pos, on_value=on_value,
                              on_grad=on_grad, keep=keep, before_backward=check_forward, block=MAIN)
    work.est = est


def _delta(corrupt_aligned: torch.Tensor, clean: torch.Tensor, batch) -> torch.Tensor:
    delta = corrupt_aligned.float() - clean.float()
    # Positions without a node value (left padding, unaligned slot tokens) get delta = 0: no estimate there
    # (`where`, not a product: a padded position's value may be NaN, and 0 * NaN is NaN).
    if batch.cmap is None and bool(batch.real.all()):
        return delta
    return torch.where(batch.real.unsqueeze(-1), delta, 0.0)


def site_delta(ctx: Context, work: BatchWork, key: str) -> torch.Tensor:
    """corrupt - clean at one site on the clean positions (float32), zero where a position has no node value."""
    return _delta(align(work.corrupt.acts[key], work.batch), work.clean.acts[key], work.batch)


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
