"""Statistics of the false-negative diagnostic (atp-star.md section 6), in numpy: random subsets, Welch tests,
per-node upper confidence limits and the permutation test of a node's effect alone against its draws.

Random-subset patching (Kramar et al. 2024, arXiv 2403.00745, section 6 / Algorithm 1 as summarised in
atp-star.md): `samples` subsets of the tested nodes, each node in a subset independently with probability
`inclusion`; y_j is the effect of patching subset j all at once. For node i, Ihat_i = mean(y | i in) -
mean(y | i out), se_i^2 = s_in^2/N_in + s_out^2/N_out (Welch; the paper's test), dof by Welch-Satterthwaite.
atpdsl uses the larger of that se and the pooled one (see `welch`): a group that missed a rare large effect by
chance otherwise gets a near-zero variance and a far too small se.

What Ihat_i estimates is the node's *average marginal effect* m_i = E_S[f(S + i) - f(S)] over random subsets S of
the other nodes. It equals the node's effect alone, f({i}), only when effects add up inside a subset; with
saturation or redundancy it does not (induction-prev: L0.H0.v@5 alone -15.17, in random subsets -13.6). So every
limit here is a limit on m_i; `engine/diagnose.py` checks additivity before it calls it a limit on f({i}).

Per-node upper limits: u_i(a) = |Ihat_i| + se_i * t_{1-a}(dof_i) is a one-sided level-a test of H0 |m_i| >= theta
at the worst-case simple null |m_i| = theta. With a = alpha / n (Bonferroni over the n tested nodes), the limits
hold *simultaneously*: P(some |m_i| > u_i) <= alpha. Because they are simultaneous, any data-chosen subset of
nodes (the suspects) can be measured another way and the rest still keep their limits. Per pair (bounding the
mean over pairs of |effect|), the family is n x pairs tests and a node's limit is the mean of its pair limits.

A node in fewer than 2 draws, or out of fewer than 2, has no variance estimate: its limit is +inf. No scipy: the
Student-t CDF comes from a regularized incomplete beta function (continued fraction), accurate to ~1e-12.

API:
    sample_subsets(n_nodes, samples, inclusion, seed) -> bool [samples, n_nodes]
    welch(masks [k, n], y [k] or [k, P]) -> Welch (arrays [n] or [P, n])
    upper_limits(stats, level) -> ndarray: |Ihat| + se * t quantile (inf where untestable)
    node_limits(masks, y [k, P], confidence, quantity) -> NodeLimits  (simultaneous limits per node)
    permutation_p(included, residual, threshold, seed) -> exact test that a node's effect alone explains its draws
    t_upper_quantile(level, dof) ;  student_t_cdf / student_t_sf(t, dof) ;  betainc(a, b, x)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "QUANTITIES",
    "sample_subsets",
    "Welch",
    "welch",
    "upper_limits",
    "NodeLimits",
    "node_limits",
    "permutation_p",
    "magnitudes",
    "t_upper_quantile",
    "student_t_cdf",
    "student_t_sf",
    "betainc",
]

QUANTITIES = ("abs_mean", "mean_abs")
"""What a limit is about: |mean effect over pairs| (abs_mean) or the mean over pairs of |effect| (mean_abs)."""


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


def t_upper_quantile(level, dof) -> np.ndarray:
    """The t with P(T_dof > t) = level (0 < level < 0.5), elementwise; +inf for dof <= 0 or NaN.

    Bisection on student_t_sf over a bracket that doubles until it holds; accurate to ~1e-9 relative.
    """
    level, dof = np.broadcast_arrays(np.asarray(level, float), np.asarray(dof, float))
    if np.any((level <= 0) | (level >= 0.5)):
        raise ValueError("t_upper_quantile needs 0 < level < 0.5")
    out = np.full(level.shape, np.inf)
    ok = np.isfinite(dof) & (dof > 0)
    if not np.any(ok):
        return out
    lv, df = level[ok], dof[ok]
    lo, hi = np.zeros_like(lv), np.ones_like(lv)
    for _ in range(80):
        short = student_t_sf(hi, df) > lv
        if not np.any(short):
            break
        hi = np.where(short, hi * 4.0, hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        above = student_t_sf(mid, df) > lv
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        if np.all(hi - lo <= 1e-10 * hi):
            break
    out[ok] = hi
    return out


# ------------------------------------------------------------------------------------------- random subsets
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
class Welch:
    """Per-node Welch statistics; arrays [n] for one effect per draw, [P, n] for one per pair and draw."""

    effect: np.ndarray  # Ihat = mean(y | in) - mean(y | out)
    se: np.ndarray  # the larger of Welch's and the pooled standard error (nan where untestable)
    dof: np.ndarray  # Welch-Satterthwaite degrees of freedom (nan where untestable)
    testable: np.ndarray  # bool [n]: at least 2 draws in and 2 out


def _welch_1d(inc: np.ndarray, exc: np.ndarray, n_in, n_out, y: np.ndarray):
    with np.errstate(invalid="ignore", divide="ignore"):
        m_in = inc.T @ y / n_in
        m_out = exc.T @ y / n_out
        ss_in = (((y[:, None] - m_in[None, :]) * inc) ** 2).sum(0)  # two-pass, for accuracy
        ss_out = (((y[:, None] - m_out[None, :]) * exc) ** 2).sum(0)
        a, b = ss_in / (n_in - 1) / n_in, ss_out / (n_out - 1) / n_out
        dof = (a + b) ** 2 / (a**2 / (n_in - 1) + b**2 / (n_out - 1))
        pooled = (ss_in + ss_out) / (n_in + n_out - 2) * (1.0 / n_in + 1.0 / n_out)
        se = np.sqrt(np.maximum(a + b, pooled))
    return m_in - m_out, se, dof


def welch(masks: np.ndarray, y: np.ndarray) -> Welch:
    """Welch statistics of every node from the draws `masks` [k, n] and their effects `y` [k] or [k, P].

    The standard error is the larger of Welch's (the paper's; unequal variances) and the pooled one: under
    additivity both groups have the variance of the other nodes' sum, and a group that missed a rare large effect
    by chance (a node in 20 draws, none with the one node that matters) has a near-zero variance that makes
    Welch's alone far too small."""
    masks = np.asarray(masks, bool)
    y = np.asarray(y, float)
    if masks.ndim != 2:
        raise ValueError(f"masks must be [samples, nodes], got shape {masks.shape}")
    if y.shape[0] != masks.shape[0] or y.ndim not in (1, 2):
        raise ValueError(f"{masks.shape[0]} subsets but effects of shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("patch effects contain NaN or infinity")
    inc = masks.astype(float)
    exc = 1.0 - inc
    n_in, n_out = inc.sum(0), exc.sum(0)
    ok = (n_in >= 2) & (n_out >= 2)
    cols = y[:, None] if y.ndim == 1 else y
    parts = [_welch_1d(inc, exc, n_in, n_out, cols[:, p]) for p in range(cols.shape[1])]
    est, se, dof = (np.stack([part[i] for part in parts]) for i in range(3))
    se = np.where(ok, se, np.nan)
    # zero variance on both sides: dof is 0/0; any finite dof gives the same (degenerate) test
    dof = np.where(ok & ~np.isfinite(dof), 1e9, np.where(ok, dof, np.nan))
    if y.ndim == 1:
        est, se, dof = est[0], se[0], dof[0]
    return Welch(effect=est, se=se, dof=dof, testable=ok)


_DOF_GRID = np.geomspace(1.0, 1e6, 1390)  # neighbours 1% apart


def _quantiles(level: float, dof: np.ndarray) -> np.ndarray:
    """t_{1-level}(dof) for many dofs: exact for a few, else at the grid dof just below each (t falls as dof
    grows, so this errs on the large, conservative side: by under 1% at dof >= 10, up to 16% near dof 1 at
    level 1e-7). Welch dofs are >= 1."""
    dof = np.nan_to_num(np.asarray(dof, float), nan=-1.0)
    if dof.size <= 256:
        return t_upper_quantile(np.full(dof.shape, level), dof)
    idx = np.clip(np.searchsorted(_DOF_GRID, dof, side="right") - 1, 0, len(_DOF_GRID) - 1)
    used, where = np.unique(idx, return_inverse=True)
    q = t_upper_quantile(np.full(used.shape, level), _DOF_GRID[used])[where].reshape(dof.shape)
    return np.where(dof >= 1.0, q, np.inf)


def upper_limits(stats: Welch, level: float) -> np.ndarray:
    """|Ihat| + se * t_{1-level}(dof): each a level-`level` upper limit on |m_i| (inf where untestable)."""
    q = _quantiles(level, stats.dof)
    with np.errstate(invalid="ignore"):
        limit = np.abs(stats.effect) + np.where(stats.se == 0, 0.0, stats.se * q)
    return np.where(np.isfinite(stats.se), limit, np.inf)


@dataclass(frozen=True)
class NodeLimits:
    """Simultaneous upper limits on every tested node's average marginal effect, and the statistics behind them."""

    limits: np.ndarray  # [n] in units of `quantity`; inf where untestable
    effect: np.ndarray  # [n] Ihat of the mean over pairs (signed)
    se: np.ndarray  # [n] its Welch standard error
    dof: np.ndarray  # [n]
    testable: np.ndarray  # [n] bool
    quantity: str
    level: float  # per-test level: alpha / n (abs_mean) or alpha / (n x pairs) (mean_abs)


def node_limits(masks: np.ndarray, y: np.ndarray, confidence: float, quantity: str = "abs_mean") -> NodeLimits:
    """Limits that hold together for all nodes with probability >= confidence (if effects add up).

    `y` [k, P]: each draw's effect per pair. abs_mean limits |mean over pairs|; mean_abs limits the mean over
    pairs of |effect| (a node's limit is the mean of its per-pair limits, each at alpha / (n x P)).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r} (known: {', '.join(QUANTITIES)})")
    y = np.asarray(y, float)
    y = y[:, None] if y.ndim == 1 else y
    n, pairs = np.shape(masks)[1], y.shape[1]
    alpha = 1.0 - confidence
    mean = welch(masks, y.mean(1))
    if quantity == "abs_mean":
        level = alpha / n
        limits = upper_limits(mean, level)
    else:
        level = alpha / (n * pairs)
        limits = upper_limits(welch(masks, y), level).mean(0)
    return NodeLimits(limits=limits, effect=mean.effect, se=mean.se, dof=mean.dof, testable=mean.testable,
                      quantity=quantity, level=level)


def permutation_p(included: np.ndarray, residual: np.ndarray, threshold: float, seed: int,
                  tolerance: float = 0.0, draws: int | None = None) -> float:
    """Two-sided Monte Carlo permutation p-value of D = mean(r | in) - mean(r | out), with r the draws' effects
    minus the node's effect alone where it was included.

    Under additivity r is the sum of the *other* nodes' effects, independent of whether this node was drawn, so
    relabelling which draws hold it gives D's exact null distribution (for any shape of r). The Monte Carlo
    p-value (hits + 1) / (draws + 1) is itself valid; 20 / threshold relabellings (at most 10^6) make a decision at
    `threshold` rarely hinge on the draws, and they stop early once p is sure to exceed it (`draws` fixes their
    number instead, without stopping). 1.0 when |D| is within `tolerance` (rounding) or the node was in no draw,
    or in all."""
    included = np.asarray(included, bool)
    r = np.asarray(residual, float)
    k, n_in = len(r), int(included.sum())
    observed = abs(r[included].mean() - r[~included].mean()) if 0 < n_in < k else 0.0
    if observed <= tolerance:
        return 1.0
    rng = np.random.default_rng(seed)
    total, total_draws = r.sum(), draws or min(10**6, math.ceil(20.0 / threshold))
    hits = done = 0
    chunk = 256  # grows: most nodes are settled within the first few hundred relabellings
    while done < total_draws:
        m = min(chunk, total_draws - done)
        chunk = min(2 * chunk, 8192)
        s_in = rng.permuted(np.broadcast_to(r, (m, k)), axis=1)[:, :n_in].sum(1)  # uniform n_in-subsets
        d = np.abs(s_in / n_in - (total - s_in) / (k - n_in))
        hits += int((d >= observed * (1 - 1e-12)).sum())
        done += m
        if draws is None and (hits + 1) / (total_draws + 1) > threshold:
            break
    return (hits + 1) / (done + 1)


def magnitudes(per_pair: np.ndarray, quantity: str) -> np.ndarray:
    """Per-pair effects [P, m] -> the bounded quantity per node [m]: |mean| (abs_mean) or mean |.| (mean_abs)."""
    per_pair = np.asarray(per_pair, float)
    return np.abs(per_pair.mean(0)) if quantity == "abs_mean" else np.abs(per_pair).mean(0)
