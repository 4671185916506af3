"""Statistics of the false-negative diagnostic (engine/false_negatives.py): the Student-t CDF and quantiles without
scipy, Welch statistics against a direct computation, and the simultaneous coverage of the per-node limits on a
planted additive model (the only setting in which random subsets estimate single-node effects)."""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from atpdsl.engine.false_negatives import (
    betainc,
    node_limits,
    permutation_p,
    sample_subsets,
    student_t_cdf,
    student_t_sf,
    t_upper_quantile,
    upper_limits,
    welch,
)

# Two-sided critical values from standard t tables: (dof, upper-tail cdf, t)
T_TABLE = [
    (1, 0.975, 12.706204736174705),
    (2, 0.95, 2.919985580355516),
    (5, 0.975, 2.570581835636314),
    (10, 0.95, 1.812461122811676),
    (20, 0.99, 2.527977002740410),
    (30, 0.995, 2.749995653567866),
    (120, 0.975, 1.979930405082423),
]


@pytest.mark.parametrize("dof,p,t", T_TABLE)
def test_student_t_cdf_matches_t_table(dof, p, t):
    assert abs(float(student_t_cdf(t, dof)) - p) < 1e-6
    assert abs(float(student_t_cdf(-t, dof)) - (1 - p)) < 1e-6


def test_student_t_cdf_closed_forms_and_mpmath():
    ts = np.array([-40.0, -3.3, -1.0, -0.2, 0.0, 0.05, 0.7, 1.9, 4.4, 25.0])
    # dof 1 (Cauchy), 2 and 3 have closed forms
    np.testing.assert_allclose(student_t_cdf(ts, 1), 0.5 + np.arctan(ts) / np.pi, atol=1e-12)
    np.testing.assert_allclose(student_t_cdf(ts, 2), 0.5 + ts / (2 * np.sqrt(2 + ts**2)), atol=1e-12)
    s3 = ts / np.sqrt(3)
    np.testing.assert_allclose(student_t_cdf(ts, 3), 0.5 + (s3 / (1 + s3**2) + np.arctan(s3)) / np.pi, atol=1e-12)
    # non-integer Welch dof against 30-digit mpmath
    mpmath.mp.dps = 30
    for dof in (1.7, 4.25, 17.3, 93.8, 1e4):
        for t in (-2.5, 0.3, 1.1, 3.7, 8.0):
            x = dof / (dof + t * t)
            tail = 0.5 * mpmath.betainc(dof / 2, 0.5, 0, x, regularized=True)
            want = float(1 - tail) if t > 0 else float(tail)
            assert abs(float(student_t_cdf(t, dof)) - want) < 1e-11, (dof, t)
    # large dof tends to the normal
    assert abs(float(student_t_cdf(1.959963984540054, 1e7)) - 0.975) < 1e-6
    assert float(student_t_sf(np.inf, 3)) == 0.0 and float(student_t_sf(-np.inf, 3)) == 1.0


def test_betainc_values_and_errors():
    mpmath.mp.dps = 30
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 3.0, 0.9), (50.0, 0.5, 0.97), (0.5, 40.0, 0.01), (7.5, 7.5, 0.5)]:
        want = float(mpmath.betainc(a, b, 0, x, regularized=True))
        assert abs(float(betainc(a, b, x)) - want) < 1e-13
    assert float(betainc(2, 3, 0.0)) == 0.0 and float(betainc(2, 3, 1.0)) == 1.0
    with pytest.raises(ValueError):
        betainc(0.0, 1.0, 0.5)
    with pytest.raises(ValueError):
        betainc(1.0, 1.0, 1.5)


def test_sample_subsets():
    m = sample_subsets(40, 300, 0.25, seed=3)
    assert m.shape == (300, 40) and m.dtype == bool
    assert abs(m.mean() - 0.25) < 0.02
    assert np.array_equal(m, sample_subsets(40, 300, 0.25, seed=3))
    assert not np.array_equal(m, sample_subsets(40, 300, 0.25, seed=4))
    for bad in [dict(inclusion=0.0), dict(inclusion=1.0), dict(samples=2), dict(n_nodes=0)]:
        kw = dict(n_nodes=5, samples=50, inclusion=0.1, seed=0) | bad
        with pytest.raises(ValueError):
            sample_subsets(**kw)


@pytest.mark.parametrize("dof,p,t", T_TABLE)
def test_t_upper_quantile_inverts_the_t_table(dof, p, t):
    assert float(t_upper_quantile(1 - p, dof)) == pytest.approx(t, rel=1e-8)


def test_t_upper_quantile_far_tail_and_edges():
    """Bonferroni levels reach 1e-7 and below: the quantile still solves sf(q) = level (mpmath), and the
    grid used for many nodes at once is never below the exact quantile."""
    mpmath.mp.dps = 30
    for level, dof in [(1e-7, 3.0), (1e-6, 17.5), (3e-5, 250.0), (1e-9, 1.0)]:
        q = float(t_upper_quantile(level, dof))
        x = dof / (dof + q * q)
        assert float(0.5 * mpmath.betainc(dof / 2, 0.5, 0, x, regularized=True)) == pytest.approx(level, rel=1e-6)
    assert math.isinf(float(t_upper_quantile(0.01, -1.0)))  # untestable: no dof
    with pytest.raises(ValueError):
        t_upper_quantile(0.5, 3.0)
    from atpdsl.engine.false_negatives import _quantiles

    dof = np.random.default_rng(0).uniform(1.0, 400.0, size=600)
    grid, exact = _quantiles(1e-5, dof), t_upper_quantile(np.full(600, 1e-5), dof)
    assert np.all(grid >= exact * (1 - 1e-9)) and np.all(grid[dof >= 10] <= exact[dof >= 10] * 1.01)


def test_welch_statistics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    masks = rng.random((60, 4)) < 0.4
    y = rng.normal(size=(60, 3))
    one, per_pair = welch(masks, y[:, 0]), welch(masks, y)
    assert per_pair.effect.shape == (3, 4) and one.effect.shape == (4,)
    for p in range(3):
        for i in range(4):
            a, b = y[masks[:, i], p], y[~masks[:, i], p]
            va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
            assert math.isclose(per_pair.effect[p, i], a.mean() - b.mean(), rel_tol=1e-12)
            pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
            se = math.sqrt(max(va + vb, pooled * (1 / len(a) + 1 / len(b))))
            assert math.isclose(per_pair.se[p, i], se, rel_tol=1e-12)
            dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
            assert math.isclose(per_pair.dof[p, i], dof, rel_tol=1e-12)
    np.testing.assert_allclose(one.effect, per_pair.effect[0], rtol=1e-12)
    # the limit is the one-sided test's inversion: P(T > (u - |Ihat|) / se) = level
    u = upper_limits(one, 0.01)
    t = (u - np.abs(one.effect)) / one.se
    np.testing.assert_allclose(student_t_sf(t, one.dof), 0.01, rtol=1e-6)


def test_untestable_nodes_get_infinite_limits_and_bad_input_is_rejected():
    masks = np.zeros((10, 3), bool)
    masks[:5, 0] = True
    masks[:5, 1] = True  # node 2 is never included
    lim = node_limits(masks, np.arange(10.0)[:, None], 0.95)
    assert list(lim.testable) == [True, True, False] and math.isinf(lim.limits[2])
    assert np.all(np.isfinite(lim.limits[:2]))
    with pytest.raises(ValueError, match="subsets but"):
        welch(masks, np.arange(9.0))
    with pytest.raises(ValueError, match="NaN"):
        welch(masks, np.full(10, np.nan))
    with pytest.raises(ValueError, match="confidence"):
        node_limits(masks, np.arange(10.0), 1.0)
    with pytest.raises(ValueError, match="quantity"):
        node_limits(masks, np.arange(10.0), 0.9, "median")


def _planted_additive(seed: int, n: int = 60, pairs: int = 4):
    """Per-pair effects [pairs, n]: small effects (sd 0.02) that vary by pair (sd 0.05), one node at +-2.0."""
    rng = np.random.default_rng(100 + seed)
    eff = rng.normal(0.0, 0.02, size=n)[None, :] + rng.normal(0.0, 0.05, size=(pairs, n))
    eff[:, rng.integers(n)] += 2.0 * (1 if seed % 2 else -1)
    return eff


@pytest.mark.parametrize("quantity", ["abs_mean", "mean_abs"])
def test_limits_hold_simultaneously_on_a_planted_additive_model(quantity):
    """y = sum of the included nodes' per-pair effects (exactly additive, as exact patching of such a model is),
    300 draws at inclusion 0.1, confidence 0.9. Every node's limit must cover its true value in the same run,
    in at least 32 of 40 seeds (nominal 36; P(<= 31 of 40) = 1.5% at exactly 90%). Bonferroni makes it
    conservative: measured 200 of 200 seeds for both quantities. And not vacuous: the planted node's limit stays
    within 20% of its effect (measured at most 1.05x abs_mean, 1.07x mean_abs over 200 seeds)."""
    covered, ratios = 0, []
    for seed in range(40):
        eff = _planted_additive(seed)
        truth = np.abs(eff.mean(0)) if quantity == "abs_mean" else np.abs(eff).mean(0)
        masks = sample_subsets(eff.shape[1], 300, 0.1, seed)
        lim = node_limits(masks, masks.astype(float) @ eff.T, 0.9, quantity)
        covered += bool(np.all(lim.limits >= truth))
        top = int(np.argmax(truth))
        ratios.append(lim.limits[top] / truth[top])
    assert covered >= 32, covered
    assert max(ratios) < 1.2, max(ratios)


def test_mean_abs_limits_are_means_of_per_pair_limits_at_the_split_level():
    rng = np.random.default_rng(5)
    masks = sample_subsets(20, 80, 0.2, 5)
    y = rng.normal(size=(80, 3))
    lim = node_limits(masks, y, 0.9, "mean_abs")
    assert lim.level == pytest.approx(0.1 / (20 * 3))
    np.testing.assert_allclose(lim.limits, upper_limits(welch(masks, y), 0.1 / 60).mean(0), rtol=1e-12)
    # |mean| <= mean |.|: on the same draws the mean_abs limits are never below what |mean| alone needs
    assert np.all(lim.limits >= np.abs(welch(masks, y).effect).mean(0))


def test_permutation_p_matches_full_enumeration_and_holds_its_level():
    """Small enough to enumerate: 8 draws, node in 3, all 56 relabellings give the exact p-value; the Monte
    Carlo one (20000 relabellings) agrees within 0.01. Under the null (r independent of inclusion; a skewed,
    rare-large-effect r as on induction-prev) the test rejects at its threshold (0.02) at most at that rate:
    measured 6 of 400 trials."""
    from itertools import combinations

    r = np.array([0.0, 0.1, -0.2, 3.0, 0.05, 0.0, -0.1, 0.2])
    inc = np.zeros(8, bool)
    inc[[1, 3, 4]] = True
    obs = abs(r[inc].mean() - r[~inc].mean())
    diffs = [abs(r[list(c)].mean() - np.delete(r, list(c)).mean()) for c in combinations(range(8), 3)]
    exact = np.mean(np.array(diffs) >= obs - 1e-12)
    assert permutation_p(inc, r, threshold=1e-3, seed=0, draws=20000) == pytest.approx(exact, abs=0.01)
    assert permutation_p(inc, r, threshold=1e-3, seed=0) > 1e-3  # stopped early: the decision is the same
    rng = np.random.default_rng(0)
    rejections = 0
    for trial in range(400):
        masks = rng.random(200) < 0.1
        resid = 15.0 * (rng.random(200) < 0.19)  # another node's rare large effect
        rejections += permutation_p(masks, resid, threshold=0.02, seed=trial) <= 0.02
    assert rejections <= 16, rejections  # 8 expected at exactly 2%; P(>= 17) = 0.3%


def test_permutation_p_finds_dependence_and_ignores_rounding():
    rng = np.random.default_rng(1)
    inc = rng.random(200) < 0.1
    r = rng.normal(0.0, 0.1, 200) + 1.0 * inc  # the node's effect was not all accounted for
    assert permutation_p(inc, r, threshold=1e-4, seed=1) < 1e-4
    assert permutation_p(inc, np.where(inc, 1e-7, 0.0), threshold=1e-4, seed=1, tolerance=1e-6) == 1.0
    assert permutation_p(np.ones(200, bool), r, threshold=1e-4, seed=1) == 1.0


def test_standard_error_is_the_larger_of_welch_and_pooled():
    """A node whose 20 draws all missed the one large effect has a zero-variance group: Welch alone would give
    se ~0.3; the pooled estimate (valid under additivity: both groups have the other nodes' variance) ~1.3."""
    rng = np.random.default_rng(2)
    masks = np.zeros((200, 1), bool)
    masks[:20, 0] = True
    y = np.where(rng.random(200) < 0.19, -15.0, 0.0)
    y[:20] = 0.0
    stats = welch(masks, y)
    a, b = y[:20], y[20:]
    pooled = math.sqrt(((a.var(ddof=1) * 19) + b.var(ddof=1) * 179) / 198 * (1 / 20 + 1 / 180))
    assert stats.se[0] == pytest.approx(pooled, rel=1e-12) and stats.se[0] > 3 * math.sqrt(b.var(ddof=1) / 180)
