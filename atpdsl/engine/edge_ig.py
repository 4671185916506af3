"""Integrated gradients for edges (EAP-IG; Hanna, Pezzelle & Belinkov 2024, arXiv 2403.17806,
after Sundararajan et al. 2017): the `edge_ig` batch step.

EAP scores an edge with the gradient at the clean run. EAP-IG averages that gradient along the straight path from
the clean to the corrupt input embeddings (here: the embedding output, each clean position moved toward its
aligned corrupt value; unaligned positions stay clean):

    edge(u -> v) = (write_u(corrupt) - write_u(clean)) . (1/N) sum_k dM/d(v's input) at e_clean + a_k (e_corrupt - e_clean)

with the midpoint rule a_k = (k - 1/2) / N, k = 1..N. Each step is one forward and one backward over the batch
with the embedding patched, reading the same sites as the clean pass; the edge step averages the target rows'
gradients over the steps (atpdsl.engine.edge_products). Node estimates and their ranking stay plain AtP.
"""
from __future__ import annotations

import contextlib

from atpdsl.plan import Step
from atpdsl.engine.atp import MAIN, site_delta, trace_sites
from atpdsl.engine.edge_sites import KEPT, EdgeSites, PassReads, pass_reads
from atpdsl.engine.state import BatchWork, RunState
from atpdsl.engine.trace import Backward, run_trace

__all__ = ["IG_CACHE", "ig_points", "integration_passes", "edge_ig_step"]

IG_CACHE = "edge_ig"
"""BatchWork.cache key under which the integration steps' passes wait for the `edge_reads` step."""


def ig_points(steps: int) -> list[float]:
    """The interpolation points a_k = (k - 1/2) / steps (midpoint rule on [0, 1])."""
    if steps < 1:
        raise ValueError(f"integrated gradients need at least one step, got {steps}")
    return [(k - 0.5) / steps for k in range(1, steps + 1)]


def integration_passes(state: RunState, sites: EdgeSites, work: BatchWork, steps: int) -> list[PassReads]:
    """One PassReads per integration step for this batch (after its corrupt and clean passes)."""
    ctx, batch = state.ctx, work.batch
    d_emb = site_delta(ctx, work, sites.embed_key)
    rule = state.parts.get("gradient_rule")
    out = []
    for a in ig_points(steps):
        def move(value, a=a):
            return value + a * d_emb.to(value.dtype)

        with (rule() if rule is not None else contextlib.nullcontext()):
            trace = run_trace(ctx.model, batch.clean, trace_sites(state), embed=ctx.embed,
                              patches={sites.embed_key: move}, metric=ctx.metric_fn(batch),
                              last_pos=batch.metric_pos, backwards=[Backward(MAIN)])
        out.append(pass_reads(ctx.loaded, sites, trace.acts, trace.grads[MAIN]))
    return out


def edge_ig_step(state: RunState, step: Step, work: BatchWork) -> None:
    """Run the batch's integration steps; the edges use them in place of the clean pass (the kept reads' passes
    are replaced when the `edge_reads` step ran first, else that step takes them from the batch's cache)."""
    passes = integration_passes(state, state.parts["edge_reads"], work, int(step.param("steps")))
    reads = work.kept.get(KEPT)
    if reads is None:
        work.cache[IG_CACHE] = passes
    else:
        reads.passes, reads.ig = passes, True
