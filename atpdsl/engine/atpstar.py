"""AtP* in the engine: the QK fix, GradDrop and the norm fix as one `atp.Correction`, and the false-negative
diagnostic.

QK fix (qkfix.py): per layer with query or key nodes, the clean and corrupt post-rotary q / k are rebuilt from
the projection outputs the engine already reads (the rotation is the model's own `apply_rotary_pos_emb` with
the clean run's cos / sin, so a corrupt value lands on its clean position even when template slots shift
positions), the pattern and its gradient G = dM/dA are read at the attention module's output (item 1), and
query / key columns are rewritten with the exact-softmax estimates. On the first batch the pattern rebuilt
from q, k, the scale and the attention mask is checked against the model's own (EngineError if it differs:
an attention variant the fix does not model).

GradDrop (graddrop.py): term t cuts the gradient into some block writes of layer l. Every gradient above the
cut is the plain one, so a term only recomputes the gradients below it: `torch.autograd.grad` from the
residual stream just below the cut, seeded with the plain backward's gradient just above it (the skip path),
plus the uncut block of the same layer when attention and MLP run in parallel. Term l costs a backward through
layers < l only, about (L - 1) / 2 full backwards for all L terms instead of L. Nodes at the cut get 0; nodes
above it keep their (QK-fixed) plain estimate. Per pair: score = sum_t |estimate_t| / (n_terms - 1)
(/ n_terms for `resid` nodes, which no term cuts, so that a direct-only node scores |AtP| either way).

Norm fix (normfix.py; atpdsl's addition, `norm_fix on`): the inputs and output gradients of every norm that
reads the residual stream (each block's input norm and the final norm) are read in the clean run, and the
columns of heads, values, neurons, attn, mlp and resid nodes are rewritten with the closed-form exact-norm
estimates (the norms' closed forms are checked against the model's own outputs on the first batch). Under
GradDrop each term redoes it with the term's gradients, for the nodes below the cut only and, per node, only
for the norms below the cut: the contributions of the norms above it are the plain pass's, kept as suffix sums.

All three run on the clean trace's graph kept by `run_trace(keep_graph=True)` (module sites only, no `.source`).

Diagnostic: `diagnose(ctx, unverified, ...)` patches random subsets of the unverified nodes (many patched
copies per forward, `exact.subset_effects`) and bounds what they could still hide (false_negatives.py).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atpdsl.arch import STAGES, Layout
from atpdsl.errors import EngineError
from atpdsl.plan import NORM_FIX_KINDS
from atpdsl.circuit.scores import FalseNegativeBound
from atpdsl.engine.atp import MAIN, BatchRun, site_delta, site_estimates
from atpdsl.engine.context import Context, align
from atpdsl.engine.graddrop import n_terms as count_terms
from atpdsl.engine.node_table import Block, block_estimates, unit_columns
from atpdsl.engine.normfix import (
    NormBlock, NormMap, NormReader, center_columns, norm_inputs, norm_map, rank1_change, stack_norms, write_change,
)
from atpdsl.engine.qkfix import QKFix, reduce_groups
from atpdsl.engine.trace import TraceSite

__all__ = ["AtpStar", "Term", "corrections_for", "diagnose", "PATTERN_TOLERANCE"]

Progress = Callable[[str, int, int], None]

ATTN_SIDE = frozenset({"queries", "keys", "values", "heads", "attn"})
MLP_SIDE = frozenset({"neurons", "mlp"})
PATTERN_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
"""Largest |rebuilt pattern - model pattern| accepted on the first batch, per model dtype."""

# Per architecture (Arch.name): the module whose output is the rotary (cos, sin), None without rotary. The residual
# stream between attention and MLP (sequential blocks) is the input of the architecture's `mlp_norm`.
_ROTARY = {"GPT-2": None, "GPT-NeoX": "gpt_neox.rotary_emb"}
for _name in ("Llama", "Qwen2", "Mistral", "Gemma"):
    _ROTARY[_name] = "model.rotary_emb"

# Stages (arch.STAGES numbering) of the extra sites; only their relative order matters.
_PATTERN_STAGE, _MID_STAGE = 32, 40
_NORM_STAGE = {"attn-in": 5, "mlp-in": _MID_STAGE, "logits": 0}  # a reader norm's input; its output is + 1
NORM_SUFFIX_LIMIT = 1 << 26
"""Largest per-block cache (elements) of main-pass norm-fix contributions that GradDrop terms reuse."""


@dataclass(frozen=True, slots=True)
class Term:
    """One GradDrop term: the block writes of `layer` whose gradient is cut (`sides` among attn, mlp)."""

    layer: int
    sides: frozenset[str]
    frontier: tuple[tuple[str, str], ...]  # (live tensor key, main-gradient key seeding it)

    @property
    def name(self) -> str:
        return f"L{self.layer}" if len(self.sides) == 2 else f"L{self.layer}.{next(iter(self.sides))}"


@dataclass(slots=True)
class _QKLayer:
    """What the QK fix needs for one layer."""

    layer: int
    q_key: str
    k_key: str
    pattern_key: str
    scale: float
    q_blocks: list[Block]
    k_blocks: list[Block]


def _heads(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, S, W] projection output -> [B, units, S, width] per-head vectors (the layout's unit slices)."""
    seg = x[..., layout.start: layout.start + layout.count * layout.stride].unflatten(-1, (layout.count, layout.stride))
    return seg[..., layout.offset: layout.offset + layout.width].transpose(1, 2)


def _side(kinds: Sequence[str]) -> str:
    if "resid" in kinds:
        return "out"
    return "attn" if set(kinds) <= ATTN_SIDE else "mlp"


@dataclass
class AtpStar:
    """The AtP* correction: QK fix and/or GradDrop (see the module docstring)."""

    ctx: Context
    qk_fix: bool
    graddrop: bool
    mode: str = "layer"
    norm_fix: bool = False
    progress: Progress | None = None
    keep_graph: bool = True  # the correction runs on the cached clean graph (atp.atp_batch reads this)
    terms: list[Term] = field(default_factory=list)
    qk_layers: list[_QKLayer] = field(default_factory=list)
    _sites: list[TraceSite] = field(default_factory=list)
    _site_where: dict[int, tuple[int, str]] = field(default_factory=dict)  # table site -> (layer, side)
    _checked: bool = False
    _norms_checked: bool = False
    _batches_done: int = 0
    term_sums: torch.Tensor | None = None  # [n_terms, N] float64: signed per-term sums over pairs
    norm_readers: list[NormReader] = field(default_factory=list)
    norm_blocks: list[NormBlock] = field(default_factory=list)
    norm_stack: NormMap | None = None
    _norm_suffix: dict[int, torch.Tensor] = field(default_factory=dict)  # this batch's main-pass suffix sums
    _norm_inputs: dict[int, tuple] = field(default_factory=dict)  # this batch's writes per block (norm_inputs)

    def __post_init__(self) -> None:
        ctx = self.ctx
        loaded, table = ctx.loaded, ctx.table
        arch, geom = loaded.arch, loaded.geom
        if arch.name not in _ROTARY or not arch.mlp_norm:
            raise EngineError(f"AtP* (qk_fix / graddrop / norm_fix) does not know the residual layout of {arch.name} models "
                              f"(supported: {', '.join(sorted(_ROTARY))}); use `method atp`")
        self.parallel = loaded.parallel
        have = {s.key for s in ctx.sites}
        extra: dict[str, TraceSite] = {}

        def add(key: str, module: str, attr: str, order: tuple[int, int], item: int | None = None,
                grad: bool = True) -> str:
            if key not in have and key not in extra:
                extra[key] = TraceSite(key=key, module=module, attr=attr, item=item, grad=grad, order=order)
            return key

        for si, site in enumerate(table.sites):
            self._site_where[si] = (site.layer, _side(site.kinds))
        # ---- QK fix
        if self.qk_fix:
            rotary = _ROTARY[arch.name]
            per_layer: dict[int, tuple[list[Block], list[Block]]] = {}
            for b in table.blocks:
                if b.kind in ("queries", "keys"):
                    qs, ks = per_layer.setdefault(table.sites[b.site].layer, ([], []))
                    (qs if b.kind == "queries" else ks).append(b)
            qt, kt = arch.template("queries"), arch.template("keys")
            self.q_layout, self.k_layout = qt.resolve(geom), kt.resolve(geom)
            if per_layer and rotary is not None:
                self.rotary_keys = (add(f"{rotary}.output.0", rotary, "output", (0, 0), 0, False),
                                    add(f"{rotary}.output.1", rotary, "output", (0, 1), 1, False))
                self.apply_rotary = self._rotary_fn()
            else:
                self.rotary_keys = None
            for layer, (qs, ks) in sorted(per_layer.items()):
                attn = arch.template("heads").path(layer).rsplit(".", 1)[0]
                q_key = add(f"{qt.path(layer)}.{qt.attr}", qt.path(layer), qt.attr, (layer, 10), grad=False)
                k_key = add(f"{kt.path(layer)}.{kt.attr}", kt.path(layer), kt.attr, (layer, 11), grad=False)
                p_key = add(f"{attn}.output.1", attn, "output", (layer, _PATTERN_STAGE), 1)
                module = loaded.hf.get_submodule(attn)
                scale = float(getattr(module, "scaling", geom.head_dim ** -0.5))
                self.qk_layers.append(_QKLayer(layer, q_key, k_key, p_key, scale, qs, ks))
        # ---- GradDrop
        if self.graddrop:
            n_layers = geom.n_layers
            try:
                n = count_terms(n_layers, self.mode)
            except ValueError as err:
                raise EngineError(f"graddrop: {err}") from None
            if n < 2:
                raise EngineError(f"graddrop per {self.mode} needs at least 2 terms, but the model has {n_layers} "
                                  f"layer; use `graddrop per sublayer` or `graddrop off`")
            rt = arch.template("resid")
            resid = [add(f"{rt.path(l)}.{rt.attr}", rt.path(l), rt.attr, (l, 60)) for l in range(n_layers)]
            for l in range(n_layers):
                # the residual stream below layer l (layer l-1's output), seeded with the gradient the skip path
                # carries past the cut; nothing to seed for layer 0 (no node lies below it)
                skip = lambda seed: ((resid[l - 1], seed),) if l > 0 else ()  # noqa: E731
                if self.mode == "layer":
                    self.terms.append(Term(l, frozenset({"attn", "mlp"}), skip(resid[l])))
                elif self.parallel:
                    for cut, keep in (("attn", "mlp"), ("mlp", "attn")):
                        t = arch.template(keep)
                        w = add(f"{t.path(l)}.{t.attr}", t.path(l), t.attr, (l, 31 if keep == "attn" else 51))
                        self.terms.append(Term(l, frozenset({cut}), skip(resid[l]) + ((w, resid[l]),)))
                else:
                    mod = arch.mlp_norm.format(layer=l)
                    mid = add(f"{mod}.input", mod, "input", (l, _MID_STAGE))
                    self.terms.append(Term(l, frozenset({"attn"}), skip(mid)))
                    self.terms.append(Term(l, frozenset({"mlp"}), ((mid, resid[l]),)))
            self.term_sums = torch.zeros((len(self.terms), table.size), dtype=torch.float64)
            # sum_t |estimate_t| / (n_terms - 1): one term is the node's own cut (0), so a node with a direct effect
            # only scores |AtP|. A residual-stream node (a layer's output) has no cut term: divide by n_terms.
            self.divisor = torch.full((table.size,), float(len(self.terms) - 1))
            for b in table.blocks:
                if self._site_where[b.site][1] == "out":
                    self.divisor[b.first: b.first + b.size] = float(len(self.terms))
        # ---- norm fix
        if self.norm_fix:
            self._norm_setup(add)
        self._sites = list(extra.values())
        self.pattern_where = {q.pattern_key: (q.layer, "attn") for q in self.qk_layers}
        self.norm_where = {r.out_key: r.where for r in self.norm_readers}

    # ------------------------------------------------------------------------------------- norm fix
    def _norm_setup(self, add: Callable[..., str]) -> None:
        """Reader norms (input values, output gradients) and the node blocks whose writes they read."""
        from atpdsl.engine.edges import readers, write_matrix, write_point

        loaded, table = self.ctx.loaded, self.ctx.table
        arch, geom = loaded.arch, loaded.geom
        dtype = torch.promote_types(loaded.dtype, torch.float32)
        all_readers = readers(loaded)
        norms = [norm_map(loaded.hf.get_submodule(r.module), dtype) for r in all_readers]
        self.norm_stack = stack_norms(norms)
        self.v_layout = arch.template("values").resolve(geom)
        qk_of = {q.layer: q for q in self.qk_layers}
        blocks = []
        for b in table.blocks:
            site = table.sites[b.site]
            layer = site.layer
            if b.kind not in NORM_FIX_KINDS and not (b.kind in ("queries", "keys") and layer in qk_of):
                continue  # queries and keys: only on top of the QK fix, which gives their heads' output changes
            columns = cols = centered = pattern_key = unit_heads = qk_layer = v_key = None
            if b.kind in ("heads", "neurons", "values", "queries", "keys"):
                cols = unit_columns(b).to(loaded.device)
                if b.kind == "neurons":
                    module = site.module if site.attr == "input" else arch.neuron_proj.format(layer=layer)
                    columns = write_matrix(loaded.hf.get_submodule(module), cols)
                else:
                    heads = arch.template("heads")
                    out_cols = cols if b.kind == "heads" else torch.arange(geom.n_heads * geom.head_dim)
                    columns = write_matrix(loaded.hf.get_submodule(heads.path(layer)), out_cols.to(loaded.device))
                columns = columns.detach().to(dtype)
            if b.kind == "values":
                attn = arch.template("heads").path(layer).rsplit(".", 1)[0]
                pattern_key = add(f"{attn}.output.1", attn, "output", (layer, _PATTERN_STAGE), 1, grad=False)
            if b.kind in ("values", "keys", "queries"):
                rep = 1 if b.kind == "queries" or not geom.grouped else geom.group_size
                unit_heads = torch.tensor([[u * rep + r for r in range(rep)] for u in b.units], device=loaded.device)
            if b.kind in ("queries", "keys"):
                vt = arch.template("values")
                qk_layer = layer
                v_key = add(f"{vt.path(layer)}.{vt.attr}", vt.path(layer), vt.attr, (layer, STAGES["values"]),
                            grad=False)
            point = write_point(b.kind, layer, self.parallel)
            first = next(i for i, r in enumerate(all_readers) if r.point >= point)  # readers come in forward order
            if b.kind == "neurons" and b.layout.width == 1:
                centered = center_columns(self.norm_stack, columns)
            blocks.append(NormBlock(b, site.name, cols, columns, centered, first, pattern_key, unit_heads, qk_layer,
                                    v_key))
        if not blocks:
            return  # no node writes to the residual stream (only queries / keys): nothing to fix
        for r, norm in zip(all_readers, norms):
            kind = r.name.rsplit(".", 1)[-1]
            stage = _NORM_STAGE[kind]
            in_key = add(f"{r.module}.input", r.module, "input", (r.layer, stage), grad=False)
            out_key = add(f"{r.module}.output", r.module, "output", (r.layer, stage + 1))
            side = "mlp" if kind == "mlp-in" else "attn"
            self.norm_readers.append(NormReader(r.name, r.point, in_key, out_key, (r.layer, side), norm))
        self.norm_blocks = blocks

    def _check_norms(self, run: BatchRun) -> None:
        """Each reader norm's closed form must give the model's own output (first batch only)."""
        tol = PATTERN_TOLERANCE.get(self.ctx.loaded.dtype, 1e-4)
        acts = run.clean.acts
        for r in self.norm_readers:
            out = acts[r.out_key].to(r.norm.gain.dtype)
            diff = float((r.norm(acts[r.in_key].to(r.norm.gain.dtype)) - out).abs().max())
            if not diff <= tol * max(1.0, float(out.abs().max())):
                raise EngineError(f"norm fix: the closed form of {r.name}'s norm differs from the model's own output "
                                  f"(max |diff| {diff:.3g}); this norm variant is not modelled: use `norm_fix off`")

    def _norm_write(self, run: BatchRun, grad_of: Callable[[str], torch.Tensor | None], est: torch.Tensor,
                    only: set[str] | None = None, deltas: dict[str, torch.Tensor] | None = None,
                    term: Term | None = None, qk: dict[int, QKFix] | None = None) -> None:
        """Overwrite the norm-fixed blocks' columns of est [b, N] (those at sites in `only`, or all) using the
        reader-output gradients `grad_of(key)` (None: no gradient reaches that reader).

        Main pass with GradDrop on: keep each block's per-reader contributions as suffix sums (when small enough,
        `NORM_SUFFIX_LIMIT`), so that a term (`term`) recomputes only the readers below its cut and takes the
        readers above it, whose gradients are the main ones, from the cache."""
        batch = run.batch
        acts = run.clean.acts
        deltas = {} if deltas is None else deltas
        dtype = self.norm_stack.gain.dtype
        readers = self.norm_readers
        x = torch.stack([acts[r.in_key].to(dtype) for r in readers])  # [R, b, S, d]
        grads = [grad_of(r.out_key) for r in readers]
        h = torch.stack([torch.zeros_like(x[0]) if g is None else g.to(dtype) for g in grads])
        keep = term is None and self.graddrop
        above = len(readers)
        if term is not None:  # the longest suffix of readers above the cut (in a parallel layer the MLP's norm can
            while above > 0 and self.place(*readers[above - 1].where, term) == "above":  # be cut after an uncut one)
                above -= 1
        for nb in self.norm_blocks:
            if only is not None and nb.key not in only:
                continue
            inputs = self._norm_inputs.get(nb.block.first)  # the writes do not depend on the gradients
            if inputs is None:
                if nb.key not in deltas:
                    deltas[nb.key] = site_delta(self.ctx, run, nb.key)
                delta = deltas[nb.key].to(dtype)
                if nb.cols is not None:
                    delta = delta[..., nb.cols]
                pattern = acts[nb.pattern_key].to(dtype) if nb.pattern_key is not None else None
                fix = v = None
                if nb.qk_layer is not None:
                    fix = qk[nb.qk_layer]
                    v = _heads(acts[nb.v_key], self.v_layout).repeat_interleave(self.ctx.loaded.geom.group_size, 1)
                inputs = norm_inputs(nb, delta, pattern, fix, v)
                if self.graddrop:
                    self._norm_inputs[nb.block.first] = inputs
            read_pos, payload, finish = inputs
            k = nb.first_reader
            cached = self._norm_suffix.get(nb.block.first) if term is not None else None
            stop = max(k, above) if cached is not None else len(readers)
            change = self._norm_change(nb, x[k:stop, :, read_pos], h[k:stop, :, read_pos], payload, k, stop,
                                       sum_readers=not keep)
            if keep:
                suffix = change.flip(0).cumsum(0).flip(0)  # readers i.. of the block
                if suffix.numel() <= NORM_SUFFIX_LIMIT:
                    self._norm_suffix[nb.block.first] = suffix  # by block: q, k and v can share one site
                change = suffix[0]
            elif cached is not None and stop - k < cached.shape[0]:
                change = change + cached[stop - k]
            b = nb.block
            est[:, b.first: b.first + b.size] = block_estimates(b, finish(change).float(), batch.real, batch.node_pos)

    def _norm_change(self, nb: NormBlock, x: torch.Tensor, h: torch.Tensor, payload: torch.Tensor, start: int,
                     stop: int, sum_readers: bool) -> torch.Tensor:
        """Readers start..stop-1's h . (n(x + write) - n(x)) per write: [b, P, U] or, kept per reader, [R', b, P, U]."""
        st = self.norm_stack
        if stop <= start:
            return x.new_zeros(payload.shape[:3])
        norm = NormMap(st.centered, st.gain[start:stop], None, st.eps[start:stop])
        if nb.centered is not None:  # neurons: rank-1 writes along fixed columns; payload = their changes
            cw, ww = nb.centered
            return rank1_change(norm, x, h, cw, ww, payload, sum_readers)
        return write_change(norm, x, h, payload, sum_readers)  # payload = explicit writes [b, P, U, d]

    # ------------------------------------------------------------------------------------ Correction API
    def sites(self, ctx: Context) -> Sequence[TraceSite]:
        return self._sites

    def backwards(self, ctx: Context) -> Sequence:
        return ()

    def apply(self, ctx: Context, run: BatchRun, est: torch.Tensor) -> torch.Tensor | None:
        try:
            t0 = time.perf_counter()
            qk = {q.layer: self._qk_prepare(run, q) for q in self.qk_layers}
            self._checked = True
            main = run.clean.grads[MAIN]
            for q in self.qk_layers:
                self._qk_write(run, q, qk[q.layer], main[q.pattern_key], est)
            t1 = time.perf_counter()
            ctx.add_time("qk_fix", t1 - t0)
            if self.norm_blocks:
                if not self._norms_checked:
                    self._check_norms(run)
                    self._norms_checked = True
                self._norm_suffix.clear()
                self._norm_inputs.clear()
                self._norm_write(run, main.get, est, qk=qk)
                ctx.add_time("norm_fix", time.perf_counter() - t1)
                t1 = time.perf_counter()
            if not self.graddrop:
                return None
            total = torch.zeros_like(est)
            for j, est_j in enumerate(self.term_estimates(run, est, qk)):
                total += est_j.abs()
                self.term_sums[j] += est_j.double().sum(0).cpu()
            ctx.add_time("graddrop", time.perf_counter() - t1)
            self._batches_done += 1
            if self.progress:
                self.progress("graddrop", self._batches_done, len(ctx.batches))
            return total / self.divisor.to(total.device)
        finally:
            run.clean.live.clear()  # frees the clean graph
            self._norm_suffix.clear()
            self._norm_inputs.clear()

    def scores(self, ctx: Context, aggregate: str, n_pairs: int) -> torch.Tensor | None:
        """`aggregate abs_mean` with GradDrop: sum_t |mean over pairs of estimate_t| / (n_terms - 1)."""
        if self.graddrop and aggregate == "abs_mean" and self.term_sums is not None:
            return (self.term_sums / n_pairs).abs().sum(0) / self.divisor.double()
        return None

    # --------------------------------------------------------------------------------------- GradDrop
    def place(self, layer: int, side: str, term: Term) -> str:
        """Where a value at (layer, side) sits relative to a term's cut: "above", "cut" or "below"."""
        if layer > term.layer or side == "out" and layer == term.layer:
            return "above"
        if layer < term.layer:
            return "below"
        if side in term.sides:
            return "cut"
        if self.parallel:
            return "above"  # the other branch of a parallel layer reads the layer's input, not the cut write
        return "below" if side == "attn" else "above"  # sequential: attention feeds the (cut) MLP

    def term_gradients(self, run: BatchRun, j: int) -> tuple[dict[str, torch.Tensor], set[str]]:
        """Term j's recomputed gradients (sites below its cut) and the keys whose gradient it cuts to 0."""
        term = self.terms[j]
        table = self.ctx.table
        grad_keys = [(table.sites[si].name, where) for si, where in self._site_where.items()]
        grad_keys += list(self.pattern_where.items()) + list(self.norm_where.items())
        below = [k for k, (layer, side) in grad_keys if self.place(layer, side, term) == "below"]
        cut = {k for k, (layer, side) in grad_keys if self.place(layer, side, term) == "cut"}
        if not below or not term.frontier:
            return {k: None for k in below}, cut
        live, main = run.clean.live, run.clean.grads[MAIN]
        outs = [live[k] for k, _ in term.frontier]
        seeds = [main[g] for _, g in term.frontier]
        got = torch.autograd.grad(outs, [live[k] for k in below], seeds, retain_graph=True, allow_unused=True)
        return dict(zip(below, got)), cut

    def term_estimates(self, run: BatchRun, est: torch.Tensor, qk: dict[int, QKFix] | None = None):
        """Per-term per-pair estimates [b, N], one term at a time (QK-fixed when the fix is on)."""
        if qk is None:
            qk = {q.layer: self._qk_prepare(run, q) for q in self.qk_layers}
        table = self.ctx.table
        index = {site.name: si for si, site in enumerate(table.sites)}
        deltas: dict[str, torch.Tensor] = {}
        for j in range(len(self.terms)):
            grads, cut = self.term_gradients(run, j)
            est_j = est.clone()
            for key in cut:
                if key in index:
                    for b in table.blocks_at(index[key]):
                        est_j[:, b.first: b.first + b.size] = 0.0
            for key, g in grads.items():
                si = index.get(key)
                if si is None:
                    continue
                if key not in deltas:
                    deltas[key] = site_delta(self.ctx, run, key)
                if g is None:
                    g = torch.zeros_like(run.clean.acts[key])
                site_estimates(self.ctx, run, si, deltas[key], g, est_j)
            for q in self.qk_layers:
                if q.pattern_key in grads:
                    g = grads[q.pattern_key]
                    if g is None:
                        g = torch.zeros_like(run.clean.acts[q.pattern_key])
                    self._qk_write(run, q, qk[q.layer], g, est_j)
                elif q.pattern_key in cut:
                    for b in q.q_blocks + q.k_blocks:
                        est_j[:, b.first: b.first + b.size] = 0.0
            todo = {nb.key for nb in self.norm_blocks if nb.key in grads}
            if todo:  # nodes below the cut: their readers' gradients are this term's (0 at the cut)
                main = run.clean.grads[MAIN]

                def grad_of(key: str, grads=grads, cut=cut, main=main) -> torch.Tensor | None:
                    if key in grads:
                        return grads[key]
                    return None if key in cut else main[key]

                self._norm_write(run, grad_of, est_j, todo, deltas, term=self.terms[j], qk=qk)
            yield est_j

    # ---------------------------------------------------------------------------------------- QK fix
    def _rotary_fn(self):
        module = self.ctx.loaded.hf.get_submodule(self.ctx.loaded.arch.template("heads").path(0).rsplit(".", 1)[0])
        fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
        if fn is None:
            raise EngineError(f"QK fix: cannot find apply_rotary_pos_emb next to {type(module).__name__}; "
                              f"use `qk_fix off`")
        return fn

    def _qk_prepare(self, run: BatchRun, q: _QKLayer) -> QKFix:
        """The layer's post-rotary q / k (clean, and corrupt on clean positions) and its prepared QK fix."""
        batch = run.batch
        geom = self.ctx.loaded.geom
        real = batch.real.unsqueeze(-1)
        pre = {}
        for name, key in (("q", q.q_key), ("k", q.k_key)):
            clean = run.clean.acts[key]
            corrupt = torch.where(real, align(run.corrupt.acts[key], batch), clean)  # no node value: no change
            pre[name] = (clean, corrupt)
        q_clean, q_corrupt = (_heads(x, self.q_layout) for x in pre["q"])
        k_clean, k_corrupt = (_heads(x, self.k_layout) for x in pre["k"])
        if self.rotary_keys is not None:
            cos, sin = (run.clean.acts[k] for k in self.rotary_keys)  # clean positions for both runs
            q_clean, k_clean = self.apply_rotary(q_clean, k_clean, cos, sin)
            q_corrupt, k_corrupt = self.apply_rotary(q_corrupt, k_corrupt, cos, sin)
        rep = geom.n_heads // geom.n_kv_heads
        if rep > 1:
            k_clean, k_corrupt = k_clean.repeat_interleave(rep, dim=1), k_corrupt.repeat_interleave(rep, dim=1)
        am = batch.clean["attention_mask"].bool()
        s = am.shape[1]
        visible = torch.ones(s, s, dtype=torch.bool, device=am.device).tril()[None, None] & am[:, None, None, :]
        fix = QKFix(q_clean, k_clean, q.scale, visible,
                    q_corrupt=q_corrupt if q.q_blocks else None,
                    k_corrupt=k_corrupt if q.k_blocks else None,
                    per_key=any(b.per_position for b in q.k_blocks),
                    all_keys=any(not b.per_position for b in q.k_blocks))
        if not self._checked:
            self._check_pattern(run, q, fix)
        return fix

    def _check_pattern(self, run: BatchRun, q: _QKLayer, fix: QKFix) -> None:
        """The pattern rebuilt from q, k, scale and mask must be the model's own (first batch only)."""
        tol = PATTERN_TOLERANCE.get(self.ctx.loaded.dtype, 1e-4)
        rows = fix.vis.any(-1, keepdim=True)  # query rows that see some key (fully padded rows do not matter)
        model = run.clean.acts[q.pattern_key].double()
        diff = float(((fix.pattern - model) * rows).abs().max())
        if not diff <= tol:
            raise EngineError(
                f"QK fix: the attention pattern rebuilt from q, k, the scale {q.scale:g} and the attention mask "
                f"differs from the model's own at layer {q.layer} (max |diff| {diff:.3g} > {tol:g}); this "
                f"attention variant (e.g. sliding windows, soft-capping, q/k norms) is not modelled: use `qk_fix off`"
            )

    def _qk_write(self, run: BatchRun, q: _QKLayer, fix: QKFix, grad_pattern: torch.Tensor,
                  est: torch.Tensor) -> None:
        """Overwrite the layer's query / key columns of est [b, N] with QK-fixed estimates for `grad_pattern`."""
        batch = run.batch
        geom = self.ctx.loaded.geom
        if q.q_blocks:
            per_unit = fix.queries(grad_pattern).float().transpose(1, 2)  # [B, T, H]
            for b in q.q_blocks:
                est[:, b.first: b.first + b.size] = block_estimates(b, per_unit, batch.real, batch.node_pos)
        per_pos = [b for b in q.k_blocks if b.per_position]
        summed = [b for b in q.k_blocks if not b.per_position]
        if per_pos:
            kf = fix.keys(grad_pattern).float()  # [B, H, S], one head's view of a key
            if geom.grouped:
                kf = reduce_groups(kf, geom.n_kv_heads)  # the KV group's key, seen by all its heads
            per_unit = kf.transpose(1, 2)
            for b in per_pos:
                est[:, b.first: b.first + b.size] = block_estimates(b, per_unit, batch.real, batch.node_pos)
        if summed:
            ak = fix.all_keys(grad_pattern).float()  # [B, H]
            if geom.grouped:
                ak = ak.view(ak.shape[0], geom.n_kv_heads, -1).sum(-1)
            for b in summed:
                est[:, b.first: b.first + b.size] = ak[:, list(b.units)]


def corrections_for(ctx: Context, progress: Progress | None = None) -> list[AtpStar]:
    """The AtP* correction a plan's `method atp* { ... }` asks for (empty when both parts are off)."""
    m = ctx.plan.method
    if not (m.qk_fix or m.graddrop or m.norm_fix):
        return []
    return [AtpStar(ctx, qk_fix=m.qk_fix, graddrop=m.graddrop, mode=m.graddrop_mode, norm_fix=m.norm_fix,
                    progress=progress)]


# ------------------------------------------------------------------------------------------- diagnostic
def diagnose(ctx: Context, columns: Sequence[int], *, samples: int, confidence: float, inclusion: float,
             seed: int, progress: Progress | None = None) -> tuple[FalseNegativeBound, dict]:
    """Bound the effect any of `columns` (the unverified nodes) could have: random subsets patched together.

    Each draw's effect is the mean over pairs of M(clean, subset patched) - M(clean), with the evaluation
    metric when the plan has one (as verification). Returns the bound and a JSON-able summary.
    """
    from atpdsl.engine.exact import batch_refs, subset_effects
    from atpdsl.engine.false_negatives import bound_from_draws, sample_subsets

    if not columns:
        raise EngineError("diagnose false_negatives: every node is verified, so nothing is left to bound")
    spec = ctx.plan.eval_metric or ctx.plan.metric
    eval_ = ctx.plan.eval_metric is not None
    try:
        masks = sample_subsets(len(columns), samples, inclusion, seed)
    except ValueError as err:
        raise EngineError(f"diagnose false_negatives: {err}") from None
    t0 = time.perf_counter()
    n_pairs = len(ctx.pairs)
    total = np.zeros(samples, dtype=np.float64)
    table_masks = np.zeros((samples, ctx.table.size), dtype=bool)
    table_masks[:, np.asarray(columns)] = masks
    needed = sorted({ctx.table.block_of(c).site for c in columns})
    sites = [ctx.sites[i] for i in needed]
    for i, batch in enumerate(ctx.batches):
        refs = batch_refs(ctx, batch, sites, spec, eval_=eval_)
        eff = subset_effects(ctx, batch, torch.from_numpy(table_masks), refs, spec, eval_=eval_)  # [b, samples]
        total += eff.sum(0).numpy()
        if progress:
            progress("diagnose", i + 1, len(ctx.batches))
    effects = total / n_pairs
    try:
        stats = bound_from_draws(masks, effects, confidence)
    except ValueError as err:
        raise EngineError(f"diagnose false_negatives: {err}") from None
    ctx.add_time("diagnose", time.perf_counter() - t0)
    bound = FalseNegativeBound(bound=stats.bound, confidence=confidence, samples=samples, nodes_tested=len(columns),
                               inclusion=inclusion)
    effect = np.nan_to_num(stats.effect)
    worst = int(np.argmax(np.abs(effect)))
    summary = {
        "untestable": stats.untestable,
        "observed_inclusion": stats.inclusion,
        "largest_subsample_estimate": {"node": ctx.table.nodes[columns[worst]].name, "effect": float(effect[worst])},
        "draw_effects": {"mean": float(effects.mean()), "std": float(effects.std()),
                         "max_abs": float(np.abs(effects).max())},
    }
    return bound, summary
