"""AtP*'s corrections, prepared from the plan's data: the QK fix, the norm fix and GradDrop's terms are atpdsl's
own classes (copied above); only what atpdsl reads from its architecture records comes in as data, and
GradDrop's gradients below a cut come from a traced backward in which the cut block writes pass no gradient."""
from __future__ import annotations

import sys

import torch

from atpdsl.arch.sites import Layout
from atpdsl.engine.corrections.graddrop_terms import GradDrop, Term
from atpdsl.engine.corrections.norm_fix import NormFix
from atpdsl.engine.corrections.qk_fix import QkFix, QkLayer
from atpdsl.engine.edges import write_matrix
from atpdsl.engine.emit.runtime.atp_steps import metric_fn
from atpdsl.engine.emit.runtime.objects import BatchWork, RunState, Step
from atpdsl.engine.emit.runtime.traces import forward_backward
from atpdsl.engine.node_table import unit_columns
from atpdsl.engine.normfix import NormBlock, NormReader, center_columns, norm_map, stack_norms


def model_rotary(hf, attention: str):
    """The model's own `apply_rotary_pos_emb(q, k, cos, sin)`, from the module that defines its attention."""
    fn = getattr(sys.modules.get(type(hf.get_submodule(attention)).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        raise RuntimeError(f"QK fix: cannot find apply_rotary_pos_emb beside {attention}")
    return fn


def prepare_qk_fix(state: RunState, step: Step) -> None:
    """The QK fix of this run: per layer with query or key nodes, its sites, scale and node blocks."""
    data, blocks = state.ctx.data["qk_fix"], state.ctx.table.blocks
    fix = QkFix(state, q_layout=Layout(*data["q_layout"]), k_layout=Layout(*data["k_layout"]))
    if data["rotary_keys"] is not None:
        fix.rotary_keys = tuple(data["rotary_keys"])
        fix.apply_rotary = model_rotary(state.ctx.loaded.hf, data["attention"])
    for q in data["layers"]:
        fix.layers.append(QkLayer(q["layer"], q["q_key"], q["k_key"], q["pattern_key"], q["scale"],
                                  [blocks[i] for i in q["q_blocks"]], [blocks[i] for i in q["k_blocks"]]))
    state.parts["qk"] = fix


def prepare_norm_fix(state: RunState, step: Step) -> None:
    """The norm fix of this run: the reader norms in closed form and each fixed block's write matrix."""
    ctx = state.ctx
    data, loaded = ctx.data["norm_fix"], ctx.loaded
    dtype = torch.promote_types(loaded.dtype, torch.float32)
    fix = NormFix(state, keep_suffix=data["keep_suffix"], v_layout=Layout(*data["v_layout"]))
    norms = [norm_map(loaded.hf.get_submodule(r["module"]), dtype) for r in data["readers"]]
    fix.stack = stack_norms(norms)
    for r, norm in zip(data["readers"], norms):
        fix.readers.append(NormReader(r["name"], r["point"], r["in_key"], r["out_key"], tuple(r["where"]), norm))
    for nb in data["blocks"]:
        block = ctx.table.blocks[nb["block"]]
        cols = columns = centered = None
        if nb["write_module"] is not None:
            cols = unit_columns(block).to(loaded.device)
            out_cols = cols if nb["own_columns"] else torch.arange(nb["all_columns"])
            columns = write_matrix(loaded.hf.get_submodule(nb["write_module"]), out_cols.to(loaded.device))
            columns = columns.detach().to(dtype)
        if nb["centered"]:
            centered = center_columns(fix.stack, columns)
        heads = None if nb["unit_heads"] is None else torch.tensor(nb["unit_heads"], device=loaded.device)
        fix.blocks.append(NormBlock(block, nb["key"], cols, columns, centered, nb["first_reader"],
                                    nb["pattern_key"], heads, nb["qk_layer"], nb["v_key"]))
    state.parts["norm"] = fix


class TracedGradDrop(GradDrop):
    """GradDrop whose term gradients come from one traced backward per term, with the gradient arriving at
    the term's cut block writes set to zeros (the paper's definition; atpdsl takes the same gradients from
    the clean graph it keeps, recomputing only the layers below the cut)."""

    def gradients(self, work: BatchWork, term: Term) -> tuple:
        keys = self._grad_keys()
        below = [k for k, (layer, side) in keys if self.place(layer, side, term) == "below"]
        cut = {k for k, (layer, side) in keys if self.place(layer, side, term) == "cut"}
        if not below:
            return {}, cut
        ctx, batch = self.state.ctx, work.batch
        data = ctx.data["graddrop"]
        zero = frozenset(data["cut_writes"][self.terms.index(term)])
        wanted = set(below)
        units = [u for u in data["grad_units"] if (zero | wanted) & set(u)]
        _, grads, _, _ = forward_backward(ctx.model, batch.clean, data["reads"], ctx.data["embed"],
                                          metric_fn(ctx, batch), batch.reads.pos, units, zero)
        return {k: grads.get(k) for k in below}, cut


def prepare_graddrop(state: RunState, step: Step) -> None:
    """GradDrop's terms (the block writes each one cuts) and the divisor of its per-pair score."""
    ctx = state.ctx
    data, table = ctx.data["graddrop"], ctx.table
    gd = TracedGradDrop(state, mode=data["mode"], parallel=ctx.loaded.parallel)
    gd.places = {i: tuple(p) for i, p in enumerate(data["places"])}
    gd.terms = [Term(t["layer"], frozenset(t["sides"]), ()) for t in data["terms"]]
    gd.divisor = torch.full((table.size,), float(len(gd.terms) - 1))
    for b in table.blocks:
        if gd.places[b.site][1] == "out":  # no term cuts a layer's output: a direct-only node scores |AtP|
            gd.divisor[b.first: b.first + b.size] = float(len(gd.terms))
    state.parts["graddrop"] = gd

