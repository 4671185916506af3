"""Attribution patching's two batch steps (`corrupt_forward`, `clean_backward`): the runs whose values and
gradients every estimate reads. AtP estimate of a node for one pair = (its corrupt value - its clean value) .
dM/d(node) at the clean run, summed over the node's columns (and positions when summed)."""
from __future__ import annotations

import torch

from atpdsl.engine.atp import MAIN, atp_estimates
from atpdsl.engine.emit.runtime.objects import BatchWork, Context, RunState, Step, TraceOut
from atpdsl.engine.emit.runtime.traces import forward_backward, read_forward
from atpdsl.engine.metrics import metric_values, pick


def metric_fn(ctx: Context, batch):
    """logits [rows, S, V] -> the metric per pair, read where the batch's metric reads (`batch.reads`)."""
    spec, reads = ctx.plan.metric, batch.reads

    def fn(logits: torch.Tensor) -> torch.Tensor:
        return metric_values(spec, pick(logits, reads.pos), reads)

    return fn


def corrupt_forward(state: RunState, step: Step, work: BatchWork) -> None:
    """Run the corrupt prompts without gradients, keeping every read value and the logits the metric reads."""
    ctx, batch = state.ctx, work.batch
    acts, last = read_forward(ctx.model, batch.corrupt, ctx.reads, batch.reads.corrupt_pos)
    work.corrupt = TraceOut(acts=acts, last=last)


def clean_forward_backward(state: RunState, step: Step, work: BatchWork) -> None:
    """Run the clean prompts keeping the graph, one backward from the metric, then the AtP estimates."""
    ctx, batch = state.ctx, work.batch
    acts, grads, values, last = forward_backward(ctx.model, batch.clean, ctx.reads, ctx.data["embed"],
                                                 metric_fn(ctx, batch), batch.reads.pos, ctx.grad_units)
    work.clean = TraceOut(acts=acts, grads={MAIN: grads}, metric=values, last=last)
    work.clean_rows = values
    work.corrupt_rows = metric_values(ctx.plan.metric, work.corrupt.last, batch.reads.corrupt())
    work.est = atp_estimates(ctx, work)
