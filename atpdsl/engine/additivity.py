"""Checks of the false-negative diagnostic's one assumption: that effects add up inside a random subset.

Random-subset patching estimates each node's *average marginal* effect; it equals the effect alone only under
additivity (f(S) = sum of f({i}) for i in S). Three checks can refute it, each aimed at a way it fails:
- suspects alone: with a suspect's effect alone f_i measured exactly, r_j = y_j - f_i [i in S_j] is, under
  additivity, the other nodes' sum, independent of whether i was drawn; an exact permutation test of
  mean(r | in) - mean(r | out) finds a node whose effect is hidden by many others (gating, saturation);
- pairs: suspects patched two at a time, f(a + b) vs f(a) + f(b) (exact, no statistics): redundancy or
  cancellation between the large nodes, which a random subset holds together too rarely to test;
- splits: sampled subsets cut into halves A and B, f(S) vs f(A) + f(B); half the cuts deal the largest subset
  estimates to opposite halves, half are random.
Gaps below NUMERIC_TOLERANCE x (1 + largest |subset effect|) are rounding, not interaction. The checks can refute
additivity; passing them does not prove it (an interaction no check happens to touch stays unseen).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np

from atpdsl.engine.false_negatives import NodeLimits, magnitudes, permutation_p

__all__ = ["NUMERIC_TOLERANCE", "SPLIT_LIMIT", "suspect_check", "pair_check", "split_check"]

PatchSubsets = Callable[[np.ndarray], np.ndarray]  # bool [k, n] -> effects [k, P]

NUMERIC_TOLERANCE = 1e-5
"""Gaps below this x (1 + largest |subset effect|) count as rounding (float32 logits), not as interaction."""

SPLIT_LIMIT = 0.5
"""Pair and split checks fail when a gap exceeds this fraction of the bound the diagnostic would state: an
interaction that large could hide a node's effect alone."""


def suspect_check(masks: np.ndarray, y: np.ndarray, alone: dict[int, np.ndarray], lim: NodeLimits, alpha: float,
                  names: Sequence[str], tol: float, seed: int) -> dict:
    """Permutation test per suspect (see the module docstring) at alpha / n: suspects are chosen among all n
    tested nodes by their estimates, so the family is all n. Returns AdditivityCheck fields (+ `ok`)."""
    threshold = alpha / masks.shape[1]
    tested = [i for i in alone if lim.testable[i]]
    if not tested:
        return dict(suspects_tested=0, p_threshold=threshold, ok=True)
    y_mean = y.mean(1)
    p = [permutation_p(masks[:, i], y_mean - masks[:, i] * alone[i].mean(), threshold, seed + j, tol)
         for j, i in enumerate(tested)]
    w = int(np.argmin(p))
    worst = tested[w]
    return dict(suspects_tested=len(tested), worst_node=names[worst], worst_alone=float(alone[worst].mean()),
                worst_estimate=float(lim.effect[worst]), worst_p=float(p[w]), p_threshold=threshold,
                ok=bool(p[w] > threshold))


def pair_check(alone: dict[int, np.ndarray], n: int, patch: PatchSubsets, quantity: str,
               names: Sequence[str]) -> tuple[np.ndarray, dict]:
    """Every pair of suspects patched together: gaps |f(a + b) - f(a) - f(b)| [pairs] in the bounded quantity,
    and the worst pair (names, its effect together and its effects alone summed: signed means over pairs)."""
    pairs = list(combinations(sorted(alone), 2))
    if not pairs:
        return np.zeros(0), {}
    masks = np.zeros((len(pairs), n), dtype=bool)
    for r, (a, b) in enumerate(pairs):
        masks[r, [a, b]] = True
    together = patch(masks)  # [pairs, P]
    summed = np.stack([alone[a] + alone[b] for a, b in pairs])
    gaps = magnitudes((together - summed).T, quantity)
    w = int(np.argmax(gaps))
    a, b = pairs[w]
    return gaps, dict(pair_nodes=f"{names[a]} + {names[b]}", pair_together=float(together[w].mean()),
                      pair_sum=float(summed[w].mean()))


def _split_rows(masks: np.ndarray, lim: NodeLimits, splits: int, rng) -> list[tuple[int, np.ndarray]]:
    """(draw, bool side per member) for up to `splits` draws of 2+ nodes: first draws holding 2+ of the 8 largest
    subset estimates, those nodes dealt alternately to the two halves; then random draws cut at random."""
    top = np.argsort(-np.abs(np.nan_to_num(lim.effect)), kind="stable")[:8]
    rows, used = [], set()
    for j in np.flatnonzero(masks[:, top].sum(1) >= 2)[: splits // 2]:
        members = np.flatnonzero(masks[j])
        side = rng.permutation(len(members)) < len(members) // 2
        big = [k for k, m in enumerate(members) if m in top]
        for r, k in enumerate(rng.permutation(big)):
            side[k] = r % 2 == 0
        rows.append((int(j), side))
        used.add(int(j))
    for j in rng.permutation(masks.shape[0]):
        if len(rows) >= splits:
            break
        members = int(masks[j].sum())
        if members >= 2 and int(j) not in used:
            rows.append((int(j), rng.permutation(members) < members // 2))
    return rows


def split_check(masks: np.ndarray, y: np.ndarray, lim: NodeLimits, patch: PatchSubsets, splits: int,
                quantity: str, seed: int) -> tuple[np.ndarray, float | None]:
    """Cut sampled subsets into halves A, B and patch both: gaps |f(S) - f(A) - f(B)| [m] in the bounded quantity,
    and their sum over the sum of |f(S)| (the halves patched: 2 m subsets)."""
    rows = _split_rows(masks, lim, splits, np.random.default_rng([seed, 1]))
    if not rows:
        return np.zeros(0), 0.0
    halves = np.zeros((2 * len(rows), masks.shape[1]), dtype=bool)
    for r, (j, side) in enumerate(rows):
        members = np.flatnonzero(masks[j])
        halves[2 * r, members[side]] = True
        halves[2 * r + 1, members[~side]] = True
    parts = patch(halves)  # [2m, P]
    whole = y[[j for j, _ in rows]]
    gaps = magnitudes((whole - parts[0::2] - parts[1::2]).T, quantity)
    size = magnitudes(whole.T, quantity)
    share = float(gaps.sum() / size.sum()) if size.sum() > 0 else None  # None: the subsets changed nothing
    return gaps, share
