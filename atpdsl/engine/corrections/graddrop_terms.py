"""GradDrop's terms as plan steps (AtP*, Kramár et al. 2024, section 4): one step per cut block write.

Term t cuts the gradient into some block writes of layer l. Every gradient above the cut is the plain one, so a
term only recomputes the gradients below it: `torch.autograd.grad` from the residual stream just below the cut,
seeded with the plain backward's gradient just above it (the skip path), plus the uncut block of the same layer
when attention and MLP run in parallel. Term l costs a backward through layers < l only. Nodes at the cut get 0;
nodes above it keep their (QK-fixed, norm-fixed) plain estimate; nodes below it get the term's estimate, QK- and
norm-fixed again with the term's gradients when the plan has those fixes. Per pair:
score = sum_t |estimate_t| / (n_terms - 1) (/ n_terms for `resid` nodes, which no term cuts, so that a
direct-only node scores |AtP| either way). The signed estimate stays the plain one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atpdsl.errors import EngineError
from atpdsl.plan import Step
from atpdsl.engine.atp import MAIN, site_delta, site_estimates
from atpdsl.engine.corrections.shared import MID_STAGE, check_supported, site_places
from atpdsl.engine.data import pair_sum
from atpdsl.engine.graddrop import n_terms as count_terms
from atpdsl.engine.state import BatchWork, ExtraSites, RunState

__all__ = ["Term", "GradDrop", "prepare_graddrop", "graddrop_term_step", "TERM_SUMS"]

TERM_SUMS = "graddrop_terms"
"""The name of GradDrop's signed per-term sums over pairs [n_terms, N] among the run's sums."""


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
class GradDrop:
    """GradDrop of one run: its terms, the divisor of the per-pair score, and the signed per-term sums."""

    state: RunState
    mode: str
    terms: list[Term] = field(default_factory=list)
    divisor: torch.Tensor | None = None
    parallel: bool = False
    places: dict[int, tuple[int, str]] = field(default_factory=dict)

    def setup(self, extra: ExtraSites) -> None:
        ctx = self.state.ctx
        loaded, table = ctx.loaded, ctx.table
        arch, n_layers = loaded.arch, loaded.geom.n_layers
        self.parallel = loaded.parallel
        self.places = site_places(ctx)
        try:
            n = count_terms(n_layers, self.mode)
        except ValueError as err:
            raise EngineError(f"graddrop: {err}") from None
        if n < 2:
            raise EngineError(f"graddrop per {self.mode} needs at least 2 terms, but the model has {n_layers} "
                              f"layer; use `graddrop per sublayer` or `graddrop off`")
        rt = arch.template("resid")
        resid = [extra.add(f"{rt.path(l)}.{rt.attr}", rt.path(l), rt.attr, (l, 60)) for l in range(n_layers)]
        for l in range(n_layers):
            # the residual stream below layer l (layer l-1's output), seeded with the gradient the skip path carries
            # past the cut; nothing to seed for layer 0 (no node lies below it)
            skip = lambda seed: ((resid[l - 1], seed),) if l > 0 else ()  # noqa: E731
            if self.mode == "layer":
                self.terms.append(Term(l, frozenset({"attn", "mlp"}), skip(resid[l])))
            elif self.parallel:
                for cut, keep in (("attn", "mlp"), ("mlp", "attn")):
                    t = arch.template(keep)
                    w = extra.add(f"{t.path(l)}.{t.attr}", t.path(l), t.attr, (l, 31 if keep == "attn" else 51))
                    self.terms.append(Term(l, frozenset({cut}), skip(resid[l]) + ((w, resid[l]),)))
            else:
                mod = arch.mlp_norm.format(layer=l)
                mid = extra.add(f"{mod}.input", mod, "input", (l, MID_STAGE))
                self.terms.append(Term(l, frozenset({"attn"}), skip(mid)))
                self.terms.append(Term(l, frozenset({"mlp"}), ((mid, resid[l]),)))
        self.divisor = torch.full((table.size,), float(len(self.terms) - 1))
        for b in table.blocks:
            if self.places[b.site][1] == "out":
                self.divisor[b.first: b.first + b.size] = float(len(self.terms))

    def term_index(self, step: Step) -> int:
        """The term a plan step names (its layer and side)."""
        layer, side = step.param("layer"), step.param("side")
        sides = frozenset({"attn", "mlp"}) if side == "layer" else frozenset({side})
        for j, t in enumerate(self.terms):
            if t.layer == layer and t.sides == sides:
                return j
        raise EngineError(f"the plan's step {step.name!r} names no GradDrop term of this model")

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

    def _grad_keys(self) -> list[tuple[str, tuple[int, str]]]:
        parts = self.state.parts
        keys = [(self.state.ctx.table.sites[si].name, where) for si, where in self.places.items()]
        if parts.get("qk") is not None:
            keys += list(parts["qk"].pattern_where.items())
        if parts.get("norm") is not None:
            keys += list(parts["norm"].where.items())
        return keys

    def gradients(self, work: BatchWork, term: Term) -> tuple[dict[str, torch.Tensor | None], set[str]]:
        """The term's recomputed gradients (sites below its cut) and the keys whose gradient it cuts to 0."""
        keys = self._grad_keys()
        below = [k for k, (layer, side) in keys if self.place(layer, side, term) == "below"]
        cut = {k for k, (layer, side) in keys if self.place(layer, side, term) == "cut"}
        if not below or not term.frontier:
            return {k: None for k in below}, cut
        live, main = work.clean.live, work.clean.grads[MAIN]
        outs = [live[k] for k, _ in term.frontier]
        seeds = [main[g] for _, g in term.frontier]
        got = torch.autograd.grad(outs, [live[k] for k in below], seeds, retain_graph=True, allow_unused=True)
        return dict(zip(below, got)), cut

    def estimates(self, work: BatchWork, term: Term) -> torch.Tensor:
        """Term `term`'s per-pair estimates [b, N] (QK- and norm-fixed when the plan has those fixes)."""
        ctx = self.state.ctx
        table = ctx.table
        index = {site.name: si for si, site in enumerate(table.sites)}
        deltas = work.cache.setdefault("deltas", {})
        grads, cut = self.gradients(work, term)
        est = work.est.clone()  # the plain (QK- and norm-fixed) estimates: nodes above the cut keep them
        for key in cut:
            if key in index:
                for b in table.blocks_at(index[key]):
                    est[:, b.first: b.first + b.size] = 0.0
        for key, g in grads.items():
            si = index.get(key)
            if si is None:
                continue
            if key not in deltas:
                deltas[key] = site_delta(ctx, work, key)
            site_estimates(ctx, work, si, deltas[key], g if g is not None else torch.zeros_like(work.clean.acts[key]),
                           est)
        self._refix_qk(work, grads, cut, est)
        self._refix_norm(work, grads, cut, est, term)
        return est

    def _refix_qk(self, work: BatchWork, grads: dict, cut: set[str], est: torch.Tensor) -> None:
        qk = self.state.parts.get("qk")
        if qk is None:
            return
        prepared = qk.prepared(work)
        for q in qk.layers:
            if q.pattern_key in grads:
                g = grads[q.pattern_key]
                qk.write(work, q, prepared[q.layer], g if g is not None else torch.zeros_like(work.clean.acts[q.pattern_key]),
                         est)
            elif q.pattern_key in cut:
                for b in q.q_blocks + q.k_blocks:
                    est[:, b.first: b.first + b.size] = 0.0

    def _refix_norm(self, work: BatchWork, grads: dict, cut: set[str], est: torch.Tensor, term: Term) -> None:
        norm = self.state.parts.get("norm")
        if norm is None or not norm.blocks:
            return
        todo = {nb.key for nb in norm.blocks if nb.key in grads}
        if not todo:
            return
        main = work.clean.grads[MAIN]

        def grad_of(key: str) -> torch.Tensor | None:  # nodes below the cut: their readers' gradients are this term's
            if key in grads:
                return grads[key]
            return None if key in cut else main[key]

        norm.write(work, grad_of, est, todo, above=lambda where: self.place(*where, term) == "above")

    def add(self, work: BatchWork, j: int, est: torch.Tensor) -> None:
        """Fold term j's estimates (per model row) into the batch's per-pair ranking magnitude and its signed per-term
        sums (the batch's `sums["graddrop_terms"]` [n_terms, N], which the run adds up)."""
        est = pair_sum(work.batch, est)  # a pair's estimate before its absolute value
        if work.magnitude is None:
            work.magnitude = torch.zeros_like(est)
            work.sums[TERM_SUMS] = torch.zeros((len(self.terms), est.shape[1]), dtype=torch.float64)
        work.magnitude += est.abs()
        work.sums[TERM_SUMS][j] += est.double().sum(0).cpu()
        done = work.cache["graddrop_terms"] = work.cache.get("graddrop_terms", 0) + 1
        if done == len(self.terms):  # every term is in: the per-pair score
            work.magnitude = work.magnitude / self.divisor.to(work.magnitude.device)

    def scores(self, aggregate: str, n_pairs: int) -> torch.Tensor | None:
        """`aggregate abs_mean` with GradDrop: sum_t |mean over pairs of estimate_t| / (n_terms - 1)."""
        term_sums = self.state.sums.get(TERM_SUMS)
        if aggregate == "abs_mean" and term_sums is not None:
            return (term_sums / n_pairs).abs().sum(0) / self.divisor.double()
        return None


def prepare_graddrop(state: RunState, step: Step) -> None:
    """Build the run's GradDrop terms, add the residual sites they cut at, and keep the clean graph."""
    check_supported(state.ctx, "graddrop", state.plan.method.graddrop_mode)
    gd = GradDrop(state, mode=state.plan.method.graddrop_mode)
    gd.setup(state.extra)
    state.parts["graddrop"] = gd
    state.keep_graph = True


def graddrop_term_step(state: RunState, step: Step, work: BatchWork) -> None:
    """One term: its estimates from the gradients below its cut, folded into the batch's ranking magnitude."""
    gd: GradDrop = state.parts["graddrop"]
    j = gd.term_index(step)
    gd.add(work, j, gd.estimates(work, gd.terms[j]))
