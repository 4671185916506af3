"""The AtP* false-negative diagnostic (atp-star.md section 6): random-subset patching and a Welch/union bound.

Procedure: draw `samples` random subsets of the unverified nodes (each node in a subset independently with
probability `inclusion`), patch each whole subset at once and record its effect y_j. For node i:
i+ / s+ / N+ = mean / sample std / count of y over draws containing i, i- / s- / N- over the others,
Ihat_i = i+ - i-. Welch test of H0_i: |I_i| >= theta against |I_i| < theta at the worst-case simple null
|I_i| = theta: t_i = (theta - |Ihat_i|) / se_i, se_i^2 = s+^2/N+ + s-^2/N-, Welch-Satterthwaite dof,
p_i = P(T_dof > t_i). Union (Bonferroni) over nodes: p(theta) = min(1, sum_i p_i). The bound is the smallest theta
with p(theta) <= alpha = 1 - confidence (bisection; p is decreasing in theta): with that confidence no tested node
changes the metric by more than the bound. Assumes roughly additive effects inside a subset.

A node that appears in fewer than 2 draws, or is missing from fewer than 2, has no variance estimate: the bound is
then +inf (more samples or another inclusion probability are needed). No scipy: the Student-t CDF comes from a
regularized incomplete beta function (continued fraction), accurate to ~1e-12.

API:
    sample_subsets(n_nodes, samples, inclusion, seed) -> bool ndarray [samples, n_nodes]
    bound_from_draws(masks [k, n] bool, effects [k], confidence) -> DiagnosticStats
    run_diagnostic(patch_effects, n_nodes, samples, confidence, inclusion, seed) -> FalseNegativeBound
        patch_effects(masks bool [k, n]) -> float array [k]: the metric change with every node of each row patched
    student_t_cdf(t, dof) -> ndarray ;  betainc(a, b, x) -> ndarray (regularized incomplete beta)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from atpdsl.circuit.scores import FalseNegativeBound

__all__ = [
    "sample_subsets",
    "bound_from_draws",
    "run_diagnostic",
    "DiagnosticStats",
    "student_t_cdf",
    "student_t_sf",
    "betainc",
]


# --------------------------------------------------------------------------------------- special functions
def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, iters: int = 300) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz), elementwise."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = h * d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return h


def betainc(a, b, x) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1 (elementwise, broadcasting)."""
    a, b, x = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float), np.asarray(x, float))
    if np.any(a <= 0) or np.any(b <= 0):
        raise ValueError("betainc needs a > 0 and b > 0")
    if np.any((x < 0) | (x > 1)):
        raise ValueError("betainc needs 0 <= x <= 1")
    lgam = np.vectorize(math.lgamma)
    out = np.empty_like(x)
    inner = (x > 0) & (x < 1)
    out[x <= 0] = 0.0
    out[x >= 1] = 1.0
    if np.any(inner):
        ai, bi, xi = a[inner], b[inner], x[inner]
        log_front = lgam(ai + bi) - lgam(ai) - lgam(bi) + ai * np.log(xi) + bi * np.log1p(-xi)
        front = np.exp(log_front)
        direct = xi < (ai + 1.0) / (ai + bi + 2.0)
        res = np.empty_like(xi)
        if np.any(direct):
            res[direct] = front[direct] * _betacf(ai[direct], bi[direct], xi[direct]) / ai[direct]
        flip = ~direct
        if np.any(flip):
            res[flip] = 1.0 - front[flip] * _betacf(bi[flip], ai[flip], 1.0 - xi[flip]) / bi[flip]
        out[inner] = res
    return out


def student_t_sf(t, dof) -> np.ndarray:
    """P(T > t) for Student's t with `dof` (> 0, real) degrees of freedom; +-inf t allowed."""
    t, dof = np.broadcast_arrays(np.asarray(t, float), np.asarray(dof, float))
    if np.any(dof <= 0):
        raise ValueError("student_t_sf needs dof > 0")
    out = np.empty_like(t)
    fin = np.isfinite(t)
    out[~fin] = np.where(t[~fin] > 0, 0.0, 1.0)
    if np.any(fin):
        tf, df = t[fin], dof[fin]
        # tail(|t|) = P(T > |t|) = I_{dof/(dof+t^2)}(dof/2, 1/2) / 2
        x = df / (df + tf * tf)
        tail = 0.5 * betainc(df / 2.0, np.full_like(df, 0.5), x)
        out[fin] = np.where(tf > 0, tail, 1.0 - tail)
    return out


def student_t_cdf(t, dof) -> np.ndarray:
    """P(T <= t) for Student's t with real `dof` > 0."""
    return 1.0 - student_t_sf(t, dof)


# ------------------------------------------------------------------------------------------- the diagnostic
def sample_subsets(n_nodes: int, samples: int, inclusion: float, seed: int) -> np.ndarray:
    """Random subsets as a bool array [samples, n_nodes]: each node in each draw independently with p=inclusion."""
    if n_nodes < 1:
        raise ValueError(f"need at least one node to sample subsets of, got {n_nodes}")
    if samples < 4:
        raise ValueError(f"the diagnostic needs at least 4 samples, got {samples}")
    if not 0.0 < inclusion < 1.0:
        raise ValueError(f"inclusion must be strictly between 0 and 1, got {inclusion}")
    rng = np.random.default_rng(seed)
    return rng.random((samples, n_nodes)) < inclusion


@dataclass(frozen=True)
class DiagnosticStats:
    """The bound and the per-node statistics behind it."""

    bound: float
    confidence: float
    samples: int
    nodes_tested: int
    inclusion: float  # observed fraction of node slots included
    effect: np.ndarray  # [n] Ihat = i+ - i-
    se: np.ndarray  # [n] Welch standard error (nan if untestable)
    dof: np.ndarray  # [n] Welch-Satterthwaite degrees of freedom (nan if untestable)
    untestable: int  # nodes with < 2 draws in or out

    def combined_p(self, theta: float) -> float:
        """Union bound p(theta) = min(1, sum_i P(T_i > (theta - |Ihat_i|) / se_i))."""
        return _combined_p(theta, self.effect, self.se, self.dof)


def _welch(masks: np.ndarray, y: np.ndarray):
    """Per-node Ihat, se and dof (nan where a side has fewer than 2 draws)."""
    inc = masks.astype(float)
    exc = 1.0 - inc
    n_in, n_out = inc.sum(0), exc.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        m_in = inc.T @ y / n_in
        m_out = exc.T @ y / n_out
        # two-pass variances for accuracy
        r_in = (y[:, None] - m_in[None, :]) * inc
        r_out = (y[:, None] - m_out[None, :]) * exc
        v_in = (r_in**2).sum(0) / (n_in - 1)
        v_out = (r_out**2).sum(0) / (n_out - 1)
        a, b = v_in / n_in, v_out / n_out
        se = np.sqrt(a + b)
        dof = (a + b) ** 2 / (a**2 / (n_in - 1) + b**2 / (n_out - 1))
    ok = (n_in >= 2) & (n_out >= 2)
    est = np.where(n_in >= 1, m_in, np.nan) - np.where(n_out >= 1, m_out, np.nan)
    se = np.where(ok, se, np.nan)
    dof = np.where(ok, dof, np.nan)
    # zero variance on both sides: dof is 0/0; any finite dof gives the same (degenerate) test
    dof = np.where(ok & ~np.isfinite(dof), 1e9, dof)
    return est, se, dof, ok


def _combined_p(theta: float, est: np.ndarray, se: np.ndarray, dof: np.ndarray) -> float:
    gap = theta - np.abs(est)
    zero = se == 0
    p = np.empty_like(gap)
    p[zero] = np.where(gap[zero] > 0, 0.0, 1.0)
    nz = ~zero
    if np.any(nz):
        p[nz] = student_t_sf(gap[nz] / se[nz], dof[nz])
    return float(min(1.0, p.sum()))


def bound_from_draws(masks: np.ndarray, effects: np.ndarray, confidence: float) -> DiagnosticStats:
    """The smallest theta such that, at `confidence`, no node in the draws has |effect| >= theta."""
    masks = np.asarray(masks, bool)
    y = np.asarray(effects, float).reshape(-1)
    if masks.ndim != 2:
        raise ValueError(f"masks must be [samples, nodes], got shape {masks.shape}")
    if masks.shape[0] != y.shape[0]:
        raise ValueError(f"{masks.shape[0]} subsets but {y.shape[0]} effects")
    if not np.all(np.isfinite(y)):
        raise ValueError("patch effects contain NaN or infinity")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    alpha = 1.0 - confidence
    est, se, dof, ok = _welch(masks, y)
    k, n = masks.shape
    base = dict(confidence=confidence, samples=k, nodes_tested=n, inclusion=float(masks.mean()),
                effect=est, se=se, dof=dof, untestable=int((~ok).sum()))
    if not ok.all():
        return DiagnosticStats(bound=math.inf, **base)
    lo = 0.0
    if _combined_p(lo, est, se, dof) <= alpha:  # only possible with zero-variance draws
        return DiagnosticStats(bound=0.0, **base)
    scale = float(np.max(np.abs(est)) + np.max(se)) or 1.0
    hi = scale
    while _combined_p(hi, est, se, dof) > alpha:
        hi *= 2.0
        if hi > 1e300:
            return DiagnosticStats(bound=math.inf, **base)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _combined_p(mid, est, se, dof) <= alpha:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-10 * hi:
            break
    return DiagnosticStats(bound=hi, **base)


def run_diagnostic(patch_effects: Callable[[np.ndarray], np.ndarray], n_nodes: int, samples: int,
                   confidence: float, inclusion: float, seed: int) -> FalseNegativeBound:
    """Sample subsets, ask `patch_effects` for their metric changes, and bound the missed effects."""
    masks = sample_subsets(n_nodes, samples, inclusion, seed)
    effects = np.asarray(patch_effects(masks), float).reshape(-1)
    if effects.shape[0] != samples:
        raise ValueError(f"patch_effects returned {effects.shape[0]} effects for {samples} subsets")
    stats = bound_from_draws(masks, effects, confidence)
    return FalseNegativeBound(bound=stats.bound, confidence=confidence, samples=samples, nodes_tested=n_nodes,
                              inclusion=inclusion)
