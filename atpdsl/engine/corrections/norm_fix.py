"""The norm fix as a plan step (atpdsl's addition to AtP*, `norm_fix on`): exact norms on each node's own write.

The inputs and output gradients of every norm that reads the residual stream (each block's input norm and the
final norm) are read in the clean run, and the columns of heads, values, neurons, attn, mlp and resid nodes (and
queries and keys on top of the QK fix) are rewritten with the closed-form exact-norm estimates of
engine/normfix.py; each closed form is checked against the model's own norm output on the first batch. Under
GradDrop each term redoes it with the term's gradients, for the nodes below the cut only and, per node, only for
the norms below the cut: the contributions of the norms above it are the plain pass's, kept as suffix sums.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from atpdsl.arch import STAGES
from atpdsl.errors import EngineError
from atpdsl.lowering import NORM_FIX_KINDS
from atpdsl.plan import Step
from atpdsl.engine.atp import MAIN, site_delta
from atpdsl.engine.corrections.shared import (
    NORM_STAGE, PATTERN_STAGE, PATTERN_TOLERANCE, check_supported, heads_view,
)
from atpdsl.engine.node_table import block_estimates, unit_columns
from atpdsl.engine.normfix import (
    NormBlock, NormMap, NormReader, center_columns, norm_inputs, norm_map, rank1_change, stack_norms, write_change,
)
from atpdsl.engine.state import BatchWork, ExtraSites, RunState

__all__ = ["NormFix", "prepare_norm_fix", "norm_fix_step", "NORM_SUFFIX_LIMIT"]

NORM_SUFFIX_LIMIT = 1 << 26
"""Largest per-block cache (elements) of main-pass norm-fix contributions that GradDrop terms reuse."""

GradOf = Callable[[str], "torch.Tensor | None"]


@dataclass(slots=True)
class NormFix:
    """The norm fix of one run (built once by `prepare_norm_fix`)."""

    state: RunState
    keep_suffix: bool  # GradDrop is on: keep the main pass's per-reader contributions for its terms
    readers: list[NormReader] = field(default_factory=list)
    blocks: list[NormBlock] = field(default_factory=list)
    stack: NormMap | None = None
    v_layout: object = None
    checked: bool = False

    @property
    def where(self) -> dict[str, tuple[int, str]]:
        """Reader output site key -> (layer, side): where each reader's gradient sits for GradDrop."""
        return {r.out_key: r.where for r in self.readers}

    def setup(self, extra: ExtraSites, qk) -> None:
        """Reader norms (input values, output gradients) and the node blocks whose writes they read."""
        from atpdsl.engine.edges import readers as reader_blocks, write_matrix, write_point

        ctx = self.state.ctx
        loaded = ctx.loaded
        dtype = torch.promote_types(loaded.dtype, torch.float32)
        all_readers = reader_blocks(loaded)
        norms = [norm_map(loaded.hf.get_submodule(r.module), dtype) for r in all_readers]
        self.stack = stack_norms(norms)
        self.v_layout = loaded.arch.template("values").resolve(loaded.geom)
        qk_layers = {q.layer for q in qk.layers} if qk is not None else set()
        for b in ctx.table.blocks:
            nb = self._block(b, extra, qk_layers, all_readers, write_matrix, write_point, dtype)
            if nb is not None:
                self.blocks.append(nb)
        if not self.blocks:
            return  # no node writes to the residual stream (only queries / keys): nothing to fix
        for r, norm in zip(all_readers, norms):
            kind = r.name.rsplit(".", 1)[-1]
            stage = NORM_STAGE[kind]
            in_key = extra.add(f"{r.module}.input", r.module, "input", (r.layer, stage), grad=False)
            out_key = extra.add(f"{r.module}.output", r.module, "output", (r.layer, stage + 1))
            side = "mlp" if kind == "mlp-in" else "attn"
            self.readers.append(NormReader(r.name, r.point, in_key, out_key, (r.layer, side), norm))

    def _block(self, b, extra: ExtraSites, qk_layers: set[int], all_readers, write_matrix, write_point,
               dtype) -> NormBlock | None:
        """The norm-fix record of one node block, or None for a block the fix leaves alone."""
        ctx = self.state.ctx
        loaded = ctx.loaded
        arch, geom = loaded.arch, loaded.geom
        site = ctx.table.sites[b.site]
        layer = site.layer
        if b.kind not in NORM_FIX_KINDS and not (b.kind in ("queries", "keys") and layer in qk_layers):
            return None  # queries and keys: only on top of the QK fix, which gives their heads' output changes
        columns = cols = centered = pattern_key = unit_heads = qk_layer = v_key = None
        if b.kind in ("heads", "neurons", "values", "queries", "keys"):
            cols = unit_columns(b).to(loaded.device)
            if b.kind == "neurons":
                module = site.module if site.attr == "input" else arch.neuron_proj.format(layer=layer)
                columns = write_matrix(loaded.hf.get_submodule(module), cols)
            else:
                out_cols = cols if b.kind == "heads" else torch.arange(geom.n_heads * geom.head_dim)
                columns = write_matrix(loaded.hf.get_submodule(arch.template("heads").path(layer)),
                                       out_cols.to(loaded.device))
            columns = columns.detach().to(dtype)
        if b.kind == "values":
            attn = arch.template("heads").path(layer).rsplit(".", 1)[0]
            pattern_key = extra.add(f"{attn}.output.1", attn, "output", (layer, PATTERN_STAGE), 1, grad=False)
        if b.kind in ("values", "keys", "queries"):
            rep = 1 if b.kind == "queries" or not geom.grouped else geom.group_size
            unit_heads = torch.tensor([[u * rep + r for r in range(rep)] for u in b.units], device=loaded.device)
        if b.kind in ("queries", "keys"):
            vt = arch.template("values")
            qk_layer = layer
            v_key = extra.add(f"{vt.path(layer)}.{vt.attr}", vt.path(layer), vt.attr, (layer, STAGES["values"]),
                              grad=False)
        point = write_point(b.kind, layer, loaded.parallel)
        first = next(i for i, r in enumerate(all_readers) if r.point >= point)  # readers come in forward order
        if b.kind == "neurons" and b.layout.width == 1:
            centered = center_columns(self.stack, columns)
        return NormBlock(b, site.name, cols, columns, centered, first, pattern_key, unit_heads, qk_layer, v_key)

    def check(self, work: BatchWork) -> None:
        """Each reader norm's closed form must give the model's own output (first batch only)."""
        if self.checked:
            return
        tol = PATTERN_TOLERANCE.get(self.state.ctx.loaded.dtype, 1e-4)
        acts = work.clean.acts
        for r in self.readers:
            out = acts[r.out_key].to(r.norm.gain.dtype)
            diff = float((r.norm(acts[r.in_key].to(r.norm.gain.dtype)) - out).abs().max())
            if not diff <= tol * max(1.0, float(out.abs().max())):
                raise EngineError(f"norm fix: the closed form of {r.name}'s norm differs from the model's own output "
                                  f"(max |diff| {diff:.3g}); this norm variant is not modelled: use `norm_fix off`")
        self.checked = True

    def _inputs(self, work: BatchWork, nb: NormBlock):
        """A block's writes (they do not depend on the gradients: computed once per batch)."""
        cache = work.cache.setdefault("norm_inputs", {})
        got = cache.get(nb.block.first)
        if got is not None:
            return got
        ctx = self.state.ctx
        deltas = work.cache.setdefault("deltas", {})
        if nb.key not in deltas:
            deltas[nb.key] = site_delta(ctx, work, nb.key)
        dtype = self.stack.gain.dtype
        delta = deltas[nb.key].to(dtype)
        if nb.cols is not None:
            delta = delta[..., nb.cols]
        acts = work.clean.acts
        pattern = acts[nb.pattern_key].to(dtype) if nb.pattern_key is not None else None
        fix = v = None
        if nb.qk_layer is not None:
            fix = self.state.parts["qk"].prepared(work)[nb.qk_layer]
            v = heads_view(acts[nb.v_key], self.v_layout).repeat_interleave(ctx.loaded.geom.group_size, 1)
        got = norm_inputs(nb, delta, pattern, fix, v)
        if self.keep_suffix:
            cache[nb.block.first] = got
        return got

    def write(self, work: BatchWork, grad_of: GradOf, est: torch.Tensor, only: set[str] | None = None,
              above: Callable[[tuple[int, str]], bool] | None = None) -> None:
        """Overwrite the fixed blocks' columns of est [b, N] (those at sites in `only`, or all) using the reader
        output gradients `grad_of(key)` (None: no gradient reaches that reader).

        Main pass (`above` None) with GradDrop on: keep each block's per-reader contributions as suffix sums (when
        small enough, NORM_SUFFIX_LIMIT), so that a GradDrop term (`above(where)` says whether a reader lies above
        its cut) recomputes only the readers below the cut and takes those above it, whose gradients are the main
        ones, from the cache."""
        batch = work.batch
        acts = work.clean.acts
        dtype = self.stack.gain.dtype
        readers = self.readers
        x = torch.stack([acts[r.in_key].to(dtype) for r in readers])  # [R, b, S, d]
        grads = [grad_of(r.out_key) for r in readers]
        h = torch.stack([torch.zeros_like(x[0]) if g is None else g.to(dtype) for g in grads])
        keep = above is None and self.keep_suffix
        top = len(readers)
        if above is not None:  # the longest suffix of readers above the cut (in a parallel layer the MLP's norm can
            while top > 0 and above(readers[top - 1].where):  # be cut after an uncut one)
                top -= 1
        suffixes = work.cache.setdefault("norm_suffix", {})
        for nb in self.blocks:
            if only is not None and nb.key not in only:
                continue
            read_pos, payload, finish = self._inputs(work, nb)
            k = nb.first_reader
            cached = suffixes.get(nb.block.first) if above is not None else None
            stop = max(k, top) if cached is not None else len(readers)
            change = self._change(nb, x[k:stop, :, read_pos], h[k:stop, :, read_pos], payload, k, stop,
                                  sum_readers=not keep)
            if keep:
                suffix = change.flip(0).cumsum(0).flip(0)  # readers i.. of the block
                if suffix.numel() <= NORM_SUFFIX_LIMIT:
                    suffixes[nb.block.first] = suffix  # by block: q, k and v can share one site
                change = suffix[0]
            elif cached is not None and stop - k < cached.shape[0]:
                change = change + cached[stop - k]
            b = nb.block
            est[:, b.first: b.first + b.size] = block_estimates(b, finish(change).float(), batch.real, batch.node_pos)

    def _change(self, nb: NormBlock, x: torch.Tensor, h: torch.Tensor, payload: torch.Tensor, start: int,
                stop: int, sum_readers: bool) -> torch.Tensor:
        """Readers start..stop-1's h . (n(x + write) - n(x)) per write: [b, P, U] or, kept per reader, [R', b, P, U]."""
        st = self.stack
        if stop <= start:
            return x.new_zeros(payload.shape[:3])
        norm = NormMap(st.centered, st.gain[start:stop], None, st.eps[start:stop])
        if nb.centered is not None:  # neurons: rank-1 writes along fixed columns; payload = their changes
            cw, ww = nb.centered
            return rank1_change(norm, x, h, cw, ww, payload, sum_readers)
        return write_change(norm, x, h, payload, sum_readers)  # payload = explicit writes [b, P, U, d]


def prepare_norm_fix(state: RunState, step: Step) -> None:
    """Build the run's norm fix and add the sites it reads."""
    check_supported(state.ctx, "norm_fix")
    fix = NormFix(state, keep_suffix=any(s.kind == "graddrop_term" for s in state.steps))
    fix.setup(state.extra, state.parts.get("qk"))
    state.parts["norm"] = fix


def norm_fix_step(state: RunState, step: Step, work: BatchWork) -> None:
    """Rewrite the norm-fixed columns of the batch's estimates with the plain backward's reader gradients."""
    fix: NormFix = state.parts["norm"]
    if not fix.blocks:
        return
    fix.check(work)
    fix.write(work, work.clean.grads[MAIN].get, work.est)
