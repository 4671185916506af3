"""The false-negative diagnostic: bound what the unverified nodes could still change, or say why it cannot.

Steps (statistics in false_negatives.py, additivity checks in additivity.py):
1. Leave out unchanged nodes: a node whose activation is the same on the clean and the corrupt prompt (in every
   pair) has effect exactly 0 when patched (`exact.changed_columns`); it needs no test.
2. If the changed nodes are no more than `samples` (and the single-patch budget), patch each alone: an exact
   answer for no more patched copies than the random-subset test would cost ("exhaustive").
3. Otherwise random-subset patching gives simultaneous upper limits u_i on every node's *average marginal*
   effect (Bonferroni over the nodes, so they hold together at the stated confidence).
4. Suspects, patched alone: untestable nodes, then alternately the highest limits and the largest subset
   estimates. Their exact effects replace their limits: bound = max(measured suspects, u of the rest). The
   limits being simultaneous, choosing the suspects from the same data costs no confidence.
5. Additivity, the assumption that turns a limit on m_i into one on the effect alone, is checked three ways
   (additivity.py: suspects alone, suspect pairs, split subsets). A failed check gives no bound ("refused", with
   the numbers); untestable nodes beyond those patched alone give "untestable".

Sound: exhaustive results are exact. A "bounded" result holds at the stated confidence if effects add up inside
random subsets and the t approximation holds at the Bonferroni level; the checks can refute additivity (and then
refuse) but not prove it.

API:
    diagnose(ctx, unverified_columns, *, samples, confidence, inclusion, seed, ...) -> (FalseNegativeBound, dict)
    run_diagnosis(ctx, unverified_columns, settings, ...) -> DiagnosisRun (also the per-pair effects measured alone)
    bound_nodes(n, patcher, settings, names, progress) -> Finding   (the procedure, on any Patcher)
    Progress phases: "diagnose" (subsets drawn), "suspects" (nodes patched alone), "additivity" (check subsets)
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from atpdsl.errors import EngineError
from atpdsl.circuit.scores import AdditivityCheck, FalseNegativeBound, Suspect
from atpdsl.engine.context import Context
from atpdsl.engine.exact import batch_refs, changed_columns, chunk_rows, exact_effects, subset_effects
from atpdsl.engine.additivity import NUMERIC_TOLERANCE, SPLIT_LIMIT, pair_check, split_check, suspect_check
from atpdsl.engine.false_negatives import QUANTITIES, NodeLimits, magnitudes, node_limits, sample_subsets

__all__ = ["Settings", "Patcher", "Finding", "DiagnosisRun", "bound_nodes", "run_diagnosis", "diagnose",
           "engine_patcher", "changed_among"]

Progress = Callable[[str, int, int], None]
Tick = Callable[[int, int], None]  # (done, total) inside one patcher call


@dataclass(frozen=True, slots=True)
class Settings:
    """How one diagnosis runs. `suspects`: most nodes patched alone after the subset test (only those whose limit
    reaches `floor`); `splits`: subsets cut in halves for the additivity check; `exhaustive_up_to`: patch every
    changed node alone when there are at most this many (None: `samples`); `budget`: most nodes patched alone."""

    samples: int = 200
    confidence: float = 0.95
    inclusion: float = 0.1
    seed: int = 0
    quantity: str = "abs_mean"
    suspects: int = 8
    floor: float = 0.0
    splits: int = 16
    split_limit: float = SPLIT_LIMIT
    exhaustive_up_to: int | None = None
    budget: int | None = None


@dataclass(frozen=True, slots=True)
class Patcher:
    """How the procedure measures (exact patching in the engine, a synthetic model in tests).

    subsets(masks bool [k, n], tick) -> effects [k, P] of patching each row's nodes at once, per pair;
    alone(nodes, tick) -> effects [P, len(nodes)] of patching each node on its own. `tick(done, total)` reports
    progress inside a call in rows or nodes measured on every pair."""

    subsets: Callable[[np.ndarray, Tick], np.ndarray]
    alone: Callable[[list[int], Tick], np.ndarray]


@dataclass(frozen=True)
class Finding:
    """What `bound_nodes` found, in node indices 0..n-1."""

    status: str
    bound: float
    alone: dict[int, np.ndarray]  # node -> per-pair effects [P] patched alone
    limits: NodeLimits | None = None
    additivity: AdditivityCheck | None = None
    reason: str = ""
    subset_patches: int = 0
    split_gaps: np.ndarray | None = None  # [splits] |f(S) - f(A) - f(B)| in the bounded quantity

    @property
    def rest(self) -> float:
        """The bound over the nodes *not* patched alone (valid on its own: the limits are simultaneous)."""
        if self.status == "exhaustive":
            return 0.0
        if self.status != "bounded" or self.limits is None:
            return float("inf")
        return float(np.delete(self.limits.limits, list(self.alone)).max(initial=0.0))


def _phase(progress: Progress | None, phase: str) -> Tick:
    def tick(done: int, total: int) -> None:
        if progress:
            progress(phase, done, total)

    return tick


def _exhaustive(n: int, patcher: Patcher, s: Settings, progress: Progress | None) -> Finding:
    effects = patcher.alone(list(range(n)), _phase(progress, "suspects"))
    alone = {i: effects[:, i] for i in range(n)}
    return Finding("exhaustive", float(magnitudes(effects, s.quantity).max()), alone)


def _choose_suspects(lim: NodeLimits, s: Settings) -> tuple[list[int], int]:
    """Nodes to patch alone, and how many untestable nodes did not fit. Untestable nodes first (they have no
    limit); then, alternately, the highest limits reaching the floor (they set the bound) and the largest subset
    estimates (saturation and redundancy hide part of a large node's effect: its estimate is low but precise, so
    its limit need not be high; measuring it alone is the additivity check with the most power)."""
    cap = max(0, s.suspects if s.budget is None else min(s.suspects, s.budget))
    limits = np.nan_to_num(lim.limits, posinf=np.finfo(float).max)
    untestable = [int(i) for i in np.flatnonzero(~lim.testable)]
    by_limit = [int(i) for i in np.argsort(-limits, kind="stable")
                if lim.testable[i] and lim.limits[i] >= s.floor and lim.limits[i] > 0]
    by_estimate = [int(i) for i in np.argsort(-np.abs(np.nan_to_num(lim.effect)), kind="stable")
                   if lim.testable[i] and lim.effect[i] != 0]
    chosen = untestable[:cap]
    for pair in zip(by_limit, by_estimate):
        for i in pair:
            if len(chosen) < cap and i not in chosen:
                chosen.append(i)
    for i in by_limit[len(by_estimate):] + by_estimate[len(by_limit):]:
        if len(chosen) < cap and i not in chosen:
            chosen.append(i)
    return chosen, max(0, len(untestable) - len(chosen))


def _refusal(check: dict, bound: float, s: Settings, limit: float) -> str:
    """Why no bound: the exact checks first (a measured gap is certain), then the statistical one."""
    head = "effects do not add up inside random subsets: "
    tail = "; verify the nodes patched alone (`verify until confident`) and diagnose the rest, or lower `inclusion`"
    if check.get("pair_max") is not None and check["pair_max"] > limit:
        return (f"{head}{check['pair_nodes']} patched together change the metric by {check['pair_together']:+.4g}, "
                f"their effects alone sum to {check['pair_sum']:+.4g} (gap {check['pair_max']:.3g}, over "
                f"{s.split_limit:g} x the {bound:.3g} the subset test would state), so one node's effect can hide "
                f"another's inside a subset{tail}")
    if check.get("split_max") is not None and check["split_max"] > limit:
        return (f"{head}cut into two halves, a sampled subset's effect differs from the sum of its halves' by "
                f"{check['split_max']:.3g}, over {s.split_limit:g} x the {bound:.3g} the subset test would state, "
                f"so a node's effect alone can hide inside a subset{tail}")
    return (f"{head}{check['worst_node']} changes the metric by {check['worst_alone']:+.4g} alone, yet the random "
            f"subsets, less that effect, still depend on whether it was drawn (subset estimate "
            f"{check['worst_estimate']:+.4g}; permutation p = {check['worst_p']:.2g} < {check['p_threshold']:.2g}, a "
            f"p-value that additive effects give any of the tested nodes with probability under "
            f"{1 - s.confidence:.0%}){tail}")


def _checks(masks, y, lim: NodeLimits, alone: dict[int, np.ndarray], patcher: Patcher, s: Settings,
            names: Sequence[str], bound: float, progress: Progress | None) -> tuple[dict, bool, np.ndarray, int, float]:
    """The three additivity checks (additivity.py): AdditivityCheck fields, passed, split gaps, subsets patched,
    and the largest gap accepted (split_limit x bound, or rounding)."""
    tol = NUMERIC_TOLERANCE * (1.0 + float(np.abs(y).max()))
    check = suspect_check(masks, y, alone, lim, 1.0 - s.confidence, names, tol, s.seed)
    ok = check.pop("ok")

    def patch_pairs(rows: np.ndarray) -> np.ndarray:
        return patcher.subsets(rows, _phase(progress, "additivity"))

    pair_gaps, worst_pair = pair_check(alone, masks.shape[1], patch_pairs, s.quantity, names)
    gaps, share = (split_check(masks, y, lim, patch_pairs, s.splits, s.quantity, s.seed) if s.splits > 0
                   else (np.zeros(0), 0.0))
    check.update(pairs=len(pair_gaps), pair_max=float(pair_gaps.max()) if len(pair_gaps) else None,
                 **worst_pair, splits=len(gaps), split_max=float(gaps.max()) if len(gaps) else None,
                 split_share=share if len(gaps) else None, split_limit=s.split_limit)
    worst_gap = max(pair_gaps.max(initial=0.0), gaps.max(initial=0.0))
    limit = max(s.split_limit * bound, tol)
    return check, bool(ok and worst_gap <= limit), gaps, len(pair_gaps) + 2 * len(gaps), limit


def _subset_test(n: int, patcher: Patcher, s: Settings, names: Sequence[str], progress: Progress | None) -> Finding:
    masks = sample_subsets(n, s.samples, s.inclusion, s.seed)
    y = np.asarray(patcher.subsets(masks, _phase(progress, "diagnose")), float)
    lim = node_limits(masks, y, s.confidence, s.quantity)
    chosen, left = _choose_suspects(lim, s)
    effects = patcher.alone(chosen, _phase(progress, "suspects")) if chosen else np.zeros((y.shape[1], 0))
    alone = {i: effects[:, j] for j, i in enumerate(chosen)}
    rest = np.delete(lim.limits, chosen)
    bound = float(max(rest.max(initial=0.0), magnitudes(effects, s.quantity).max(initial=0.0)))
    check, ok, gaps, extra, limit = _checks(masks, y, lim, alone, patcher, s, names, bound, progress)
    additivity = AdditivityCheck(**check, passed=ok)
    patches = s.samples + extra
    if not ok:
        return Finding("refused", float("inf"), alone, lim, additivity, _refusal(check, bound, s, limit), patches, gaps)
    if left:
        untestable = int((~lim.testable).sum())
        reason = (f"with {s.samples} samples at inclusion {s.inclusion:g}, {untestable} nodes were in (or out of) "
                  f"fewer than 2 random subsets and {left} of them could not be patched alone; raise samples so "
                  f"that samples x inclusion is at least 20")
        return Finding("untestable", float("inf"), alone, lim, additivity, reason, patches, gaps)
    return Finding("bounded", bound, alone, lim, additivity, "", patches, gaps)


def bound_nodes(n: int, patcher: Patcher, settings: Settings, names: Sequence[str] | None = None,
                progress: Progress | None = None) -> Finding:
    """The diagnostic's procedure over n changed nodes (see the module docstring)."""
    s = settings
    if s.quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {s.quantity!r} (known: {', '.join(QUANTITIES)})")
    if s.samples < 4:
        raise ValueError(f"the diagnostic needs at least 4 samples, got {s.samples}")
    if not 0.0 < s.inclusion < 1.0:
        raise ValueError(f"inclusion must be strictly between 0 and 1, got {s.inclusion}")
    if not 0.0 < s.confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {s.confidence}")
    if n == 0:
        return Finding("exhaustive", 0.0, {})
    limit = s.samples if s.exhaustive_up_to is None else s.exhaustive_up_to
    if s.budget is not None:
        limit = min(limit, s.budget)
    if n <= limit:
        return _exhaustive(n, patcher, s, progress)
    return _subset_test(n, patcher, s, list(names) if names is not None else [str(i) for i in range(n)], progress)


# ----------------------------------------------------------------------------------------------- the engine
@dataclass(frozen=True)
class DiagnosisRun:
    """A diagnosis through the engine: the bound, a JSON-able summary, and every node patched alone (table
    column -> per-pair exact effects [n_pairs]) so a caller can count them as verified."""

    bound: FalseNegativeBound
    summary: dict
    measured: dict[int, torch.Tensor] = field(default_factory=dict)
    rest: float = float("inf")  # the bound over the unverified nodes not in `measured`

    def without_measured(self) -> FalseNegativeBound:
        """The statement about the nodes left once `measured` counts as verified (simultaneous limits let the
        rest keep theirs; exhaustive: only unchanged nodes are left, bound 0)."""
        b = self.bound
        if not b.bounded:
            return replace(b, nodes_tested=b.nodes_tested - len(self.measured))
        return replace(b, bound=self.rest, nodes_tested=b.nodes_tested - len(self.measured), suspects=())


def _metric(ctx: Context):
    return ctx.plan.eval_metric or ctx.plan.metric, ctx.plan.eval_metric is not None


def _sites(ctx: Context, columns: Sequence[int]):
    return [ctx.sites[i] for i in sorted({ctx.table.block_of(c).site for c in columns})]


def changed_among(ctx: Context, columns: Sequence[int]) -> np.ndarray:
    """Bool [len(columns)]: which columns' activation differs between clean and corrupt in some pair."""
    spec, eval_ = _metric(ctx)
    sites = _sites(ctx, columns)
    out = torch.zeros(len(columns), dtype=torch.bool)
    index = torch.as_tensor(list(columns), dtype=torch.long)
    for batch in ctx.batches:
        refs = batch_refs(ctx, batch, sites, spec, eval_=eval_)
        out |= changed_columns(ctx, batch, refs)[index]
    return out.numpy()


def engine_patcher(ctx: Context, columns: Sequence[int]) -> Patcher:
    """Exact patching of `columns` (node i of the procedure is table column columns[i]) over every batch."""
    spec, eval_ = _metric(ctx)
    sites = _sites(ctx, columns)
    cols = torch.as_tensor(list(columns), dtype=torch.long)
    n_pairs, n_batches = len(ctx.pairs), len(ctx.batches)

    def subsets(masks: np.ndarray, tick: Tick) -> np.ndarray:
        k = masks.shape[0]
        table_masks = torch.zeros((k, ctx.table.size), dtype=torch.bool)
        table_masks[:, cols] = torch.from_numpy(np.asarray(masks, bool))
        out = np.zeros((k, n_pairs))
        first = 0
        for bi, batch in enumerate(ctx.batches):
            refs = batch_refs(ctx, batch, sites, spec, eval_=eval_)
            step = max(1, chunk_rows(ctx, batch) // batch.size)
            for lo in range(0, k, step):
                eff = subset_effects(ctx, batch, table_masks[lo: lo + step], refs, spec, eval_=eval_)  # [b, m]
                out[lo: lo + eff.shape[1], first: first + batch.size] = eff.T.numpy()
                tick((bi * k + lo + eff.shape[1]) // n_batches, k)
            first += batch.size
        return out

    def alone(nodes: list[int], tick: Tick) -> np.ndarray:
        m = len(nodes)
        chosen = [int(columns[i]) for i in nodes]
        rows = []
        for bi, batch in enumerate(ctx.batches):
            refs = batch_refs(ctx, batch, sites, spec, eval_=eval_)
            rows.append(exact_effects(ctx, batch, chosen, refs, spec, eval_=eval_,
                                      progress=lambda d, base=bi * m: tick((base + d) // n_batches, m)))
        return torch.cat(rows).numpy() if rows else np.zeros((n_pairs, m))

    return _memoized(ctx, columns, Patcher(subsets=subsets, alone=alone))


def _memoized(ctx: Context, columns: Sequence[int], patcher: Patcher) -> Patcher:
    """The patcher with every call's answer kept in the run's checkpoint (`ctx.memo`), so a resumed run gets the
    same answers to the same questions without patching again."""
    memo = ctx.memo
    if memo is None:
        return patcher
    cols = tuple(int(c) for c in columns)

    def subsets(masks: np.ndarray, tick: Tick) -> np.ndarray:
        m = np.ascontiguousarray(np.asarray(masks, bool))
        key = ("subsets", cols, m.shape, hashlib.sha256(m.tobytes()).hexdigest())
        return memo("diagnose", key, lambda: patcher.subsets(masks, tick))

    def alone(nodes: list[int], tick: Tick) -> np.ndarray:
        return memo("diagnose", ("alone", cols, tuple(int(n) for n in nodes)), lambda: patcher.alone(nodes, tick))

    return Patcher(subsets=subsets, alone=alone)


def _suspects(finding: Finding, names: Sequence[str], quantity: str, keep: int) -> tuple[Suspect, ...]:
    """Nodes patched alone, largest first (an exhaustive run keeps only the `keep` largest)."""
    lim = finding.limits
    rows = []
    for i, per_pair in finding.alone.items():
        est = se = None
        if lim is not None and lim.testable[i]:
            est, se = float(lim.effect[i]), float(lim.se[i])
        rows.append(Suspect(names[i], float(per_pair.mean()), float(magnitudes(per_pair[:, None], quantity)[0]),
                            est, se))
    rows.sort(key=lambda r: -r.magnitude)
    return tuple(rows[:keep] if finding.status == "exhaustive" else rows)


def _summary(finding: Finding, bound: FalseNegativeBound, names: Sequence[str]) -> dict:
    """The JSON-able details behind the sentence (extras["diagnosis"])."""
    lim = finding.limits
    out = {"status": bound.status, "quantity": bound.quantity, "tested": bound.nodes_tested - bound.unchanged,
           "unchanged": bound.unchanged, "exact_patches": bound.exact_patches,
           "subset_patches": bound.subset_patches, "untestable": 0,
           "suspects": [asdict(s) for s in bound.suspects],
           "additivity": None if bound.additivity is None else asdict(bound.additivity)}
    if lim is not None:
        effect = np.nan_to_num(lim.effect)
        top = np.argsort(-np.abs(effect), kind="stable")[:5]
        out["untestable"] = int((~lim.testable).sum())
        out["largest_subsample_estimate"] = {"node": names[top[0]], "effect": float(effect[top[0]])}
        out["largest_subset_estimates"] = [
            {"node": names[i], "estimate": float(effect[i]),
             "se": float(lim.se[i]) if np.isfinite(lim.se[i]) else None,
             "limit": float(lim.limits[i]) if np.isfinite(lim.limits[i]) else None} for i in top]
        out["split_gaps"] = [float(g) for g in (finding.split_gaps if finding.split_gaps is not None else [])]
    return out


def run_diagnosis(ctx: Context, columns: Sequence[int], settings: Settings, *,
                  progress: Progress | None = None) -> DiagnosisRun:
    """Diagnose the unverified table `columns` (module docstring); errors are EngineErrors."""
    if not columns:
        raise EngineError("diagnose false_negatives: every node is verified, so nothing is left to bound")
    t0 = time.perf_counter()
    changed = changed_among(ctx, columns)
    tested = [int(c) for c, ch in zip(columns, changed) if ch]
    names = [ctx.table.nodes[c].name for c in tested]
    try:
        finding = bound_nodes(len(tested), engine_patcher(ctx, tested), settings, names, progress)
    except ValueError as err:
        raise EngineError(f"diagnose false_negatives: {err}") from None
    ctx.add_time("diagnose", time.perf_counter() - t0)
    bound = FalseNegativeBound(
        bound=finding.bound, confidence=settings.confidence, samples=settings.samples, nodes_tested=len(columns),
        inclusion=settings.inclusion, status=finding.status, quantity=settings.quantity,
        unchanged=len(columns) - len(tested), suspects=_suspects(finding, names, settings.quantity, settings.suspects),
        additivity=finding.additivity, reason=finding.reason, exact_patches=len(finding.alone),
        subset_patches=finding.subset_patches)
    measured = {tested[i]: torch.from_numpy(np.asarray(v, dtype=np.float64)) for i, v in finding.alone.items()}
    return DiagnosisRun(bound, _summary(finding, bound, names), measured, finding.rest)


def diagnose(ctx: Context, unverified_columns: Sequence[int], *, samples: int, confidence: float, inclusion: float,
             seed: int, quantity: str = "abs_mean", progress: Progress | None = None,
             **settings) -> tuple[FalseNegativeBound, dict]:
    """Bound what the unverified nodes could change (or say why not): the bound and a JSON-able summary.

    Extra keyword settings (suspects, splits, exhaustive_up_to, budget, floor) are `Settings` fields."""
    s = Settings(samples=samples, confidence=confidence, inclusion=inclusion, seed=seed, quantity=quantity,
                 **settings)
    run = run_diagnosis(ctx, unverified_columns, s, progress=progress)
    return run.bound, run.summary
