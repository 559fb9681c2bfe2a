"""Blend methods, the F1 threshold sweep and the nested estimates, checked against brute force."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy import special, stats
from sklearn.metrics import f1_score, log_loss

from foldkit.blend import (
    METHODS,
    Blend,
    best_threshold,
    choose_blend,
    f1_at,
    f1_curve,
    fit_blend,
    nested_blend_f1,
    nested_threshold_f1,
)
from foldkit.io import FoldkitError


def make_oof(n: int = 600, m: int = 4, k: int = 5, seed: int = 0, noise_col: bool = False):
    """Correlated probabilities of m models of varying quality, optionally one pure-noise model last."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    sig = np.where(y == 1, 1.0, -1.0)
    shared = rng.normal(size=n)
    strength = np.linspace(0.5, 2.0, m)
    logits = sig[:, None] * strength + 0.7 * shared[:, None] + rng.normal(size=(n, m))
    P = special.expit(logits)
    if noise_col:
        P[:, -1] = rng.random(n)
    folds = rng.integers(0, k, size=n)
    folds[:k] = np.arange(k)  # every fold present
    return P, y, folds


def brute_f1(y: np.ndarray, p: np.ndarray) -> tuple[float, set[float]]:
    """Best F1 over every distinct value with sklearn, and the set of thresholds reaching it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = {float(t): f1_score(y, (p >= t).astype(int), zero_division=0) for t in np.unique(p)}
    best = max(scores.values())
    return best, {t for t, s in scores.items() if abs(s - best) <= 1e-12}


# --------------------------------------------------------------------------- blend methods


def test_mean_logit_and_given_weights_match_numpy() -> None:
    P, _, _ = make_oof(seed=1)
    m = P.shape[1]
    np.testing.assert_allclose(fit_blend(P, None, "mean").apply(P), P.mean(axis=1), atol=1e-12)
    lg = np.log(P / (1 - P))
    expected_logit = 1 / (1 + np.exp(-lg.mean(axis=1)))
    np.testing.assert_allclose(fit_blend(P, None, "logit").apply(P), expected_logit, atol=1e-12)
    w = np.random.default_rng(2).random(m)
    w /= w.sum()
    np.testing.assert_allclose(Blend("weighted", w).apply(P), (P * w).sum(axis=1), atol=1e-12)
    np.testing.assert_allclose(Blend("logit", w).apply(P), special.expit((lg * w).sum(axis=1)), atol=1e-12)
    for method in ("mean", "logit", "rank"):
        np.testing.assert_allclose(fit_blend(P, None, method).weights, np.full(m, 1 / m))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_matches_rankdata_on_oof(seed: int) -> None:
    P, _, _ = make_oof(n=300, seed=seed)
    P = np.round(P, 2)  # plenty of ties
    n = P.shape[0]
    expected = ((stats.rankdata(P, axis=0) - 0.5) / n).mean(axis=1)
    blend = fit_blend(P, None, "rank")
    np.testing.assert_allclose(blend.apply(P), expected, atol=1e-12)
    assert all(np.array_equal(r, np.sort(P[:, j])) for j, r in enumerate(blend.ref))


def test_rank_applies_fixed_oof_transform_to_new_data() -> None:
    P, _, _ = make_oof(n=200, m=2, seed=3)
    blend = fit_blend(P, None, "rank")
    test = np.array([[0.0, 0.0], [1.0, 1.0], [P[5, 0], P[5, 1]]])
    out = blend.apply(test)
    assert out[0] == 0.0 and out[1] == 1.0
    assert out[2] == pytest.approx(blend.apply(P)[5])
    # Monotone in each column: raising a probability never lowers the blended rank.
    grid = np.linspace(0, 1, 101)
    ranks = blend.apply(np.column_stack([grid, np.full_like(grid, 0.5)]))
    assert np.all(np.diff(ranks) >= 0)


@pytest.mark.parametrize(("solver", "objective"), [("scipy", "logloss"), ("hill", "logloss")])
@pytest.mark.parametrize("seed", [0, 4])
def test_weighted_beats_mean_and_every_single_model(solver: str, objective: str, seed: int) -> None:
    P, y, _ = make_oof(n=800, m=5, seed=seed)
    blend = fit_blend(P, y, "weighted", objective=objective, solver=solver)
    assert blend.weights.shape == (5,)
    assert np.all(blend.weights >= 0) and blend.weights.sum() == pytest.approx(1.0, abs=1e-12)
    fitted = log_loss(y, blend.apply(P))
    assert fitted <= log_loss(y, P.mean(axis=1)) + 1e-9
    for j in range(P.shape[1]):
        assert fitted <= log_loss(y, P[:, j]) + 1e-9
    np.testing.assert_allclose(blend.apply(P), P @ blend.weights, atol=1e-12)


def test_hill_auc_objective_not_worse_than_best_model() -> None:
    from sklearn.metrics import roc_auc_score

    P, y, _ = make_oof(n=800, m=4, seed=5)
    blend = fit_blend(P, y, "weighted", objective="auc", solver="hill")
    assert np.all(blend.weights >= 0) and blend.weights.sum() == pytest.approx(1.0)
    auc = roc_auc_score(y, blend.apply(P))
    assert auc >= max(roc_auc_score(y, P[:, j]) for j in range(4)) - 1e-12
    assert auc >= roc_auc_score(y, P.mean(axis=1)) - 1e-12


def test_scipy_solver_weights_near_optimal() -> None:
    """Compare with a dense grid on the 2-model simplex: the convex optimum is found."""
    P, y, _ = make_oof(n=500, m=2, seed=6)
    blend = fit_blend(P, y, "weighted")
    grid = np.linspace(0, 1, 2001)
    Q = np.outer(P[:, 0], grid) + np.outer(P[:, 1], 1 - grid)
    losses = -np.mean(np.where(y[:, None] == 1, np.log(Q), np.log1p(-Q)), axis=0)
    assert log_loss(y, blend.apply(P)) <= losses.min() + 1e-9


def test_bad_inputs_raise() -> None:
    P, y, folds = make_oof(n=50)
    with pytest.raises(FoldkitError):
        fit_blend(P, y, "median")
    with pytest.raises(FoldkitError):
        fit_blend(P, y, "weighted", objective="auc")  # scipy minimises log-loss only
    with pytest.raises(FoldkitError):
        fit_blend(P * 2, y, "mean")
    with pytest.raises(FoldkitError):
        fit_blend(P, None, "mean").apply(P[:, :2])
    with pytest.raises(FoldkitError):
        best_threshold(y, P[:-1, 0])
    with pytest.raises(FoldkitError):
        nested_threshold_f1(y, P[:, 0], np.zeros(50, dtype=int))
    with pytest.raises(FoldkitError):
        choose_blend(P, y, folds, methods=("mean", "vote"))


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 400])
def test_best_threshold_matches_brute_force(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed * 100 + n)
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    decimals = [1, 2, 6][seed % 3]  # coarse rounding gives many ties
    p = np.round(rng.random(n) * 0.5 + 0.5 * y * rng.random(n), decimals)
    thr, f1 = best_threshold(y, p)
    best, argbest = brute_f1(y, p)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1_at(y, p, thr) == pytest.approx(best, abs=1e-12)
    # the highest best data value, and the threshold in the middle of the gap below it (log-odds)
    top = max(argbest)
    assert ((p >= thr) == (p >= top)).all()
    below = np.unique(p[p < top])
    if below.size:
        inside = 0 < below[-1] < top < 1  # log-odds for probabilities strictly inside (0, 1)
        mid = (
            special.expit((special.logit(top) + special.logit(below[-1])) / 2)
            if inside
            else (top + below[-1]) / 2
        )
        assert below[-1] < thr <= top and thr == pytest.approx(mid, abs=1e-12)
    else:
        assert thr == top


def test_threshold_of_separated_classes_sits_mid_gap() -> None:
    """Classes far apart: any cut in the gap scores F1 1, and new scores meet its middle, not the lowest
    positive's own score (where half the positives of a slightly shifted test set would fall below)."""
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.01, 0.02, 0.05, 0.95, 0.97, 0.99])
    thr, f1 = best_threshold(y, p)
    assert f1 == 1.0 and thr == pytest.approx(0.5, abs=1e-12)  # logit(0.95) = -logit(0.05)
    assert f1_at(y, p - 0.2, thr) == 1.0  # the test set's scores 0.2 lower: still all right


@pytest.mark.parametrize("label", [0, 1])
def test_best_threshold_single_class(label: int) -> None:
    rng = np.random.default_rng(label)
    p = rng.random(30)
    y = np.full(30, label)
    thr, f1 = best_threshold(y, p)
    best, _ = brute_f1(y, p)
    assert f1 == pytest.approx(best, abs=1e-12) and f1_at(y, p, thr) == pytest.approx(best, abs=1e-12)
    assert f1 == (1.0 if label else 0.0)


def test_best_threshold_single_distinct_value() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.full(5, 0.3)
    thr, f1 = best_threshold(y, p)
    assert thr == 0.3
    assert f1 == pytest.approx(f1_score(y, np.ones(5, dtype=int)))
    thresholds, curve = f1_curve(y, p)
    assert thresholds.tolist() == [0.3] and curve.shape == (1,)


def test_f1_curve_is_the_whole_sweep() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200), 2)
    thresholds, curve = f1_curve(y, p)
    assert np.all(np.diff(thresholds) < 0)
    np.testing.assert_array_equal(np.sort(thresholds), np.unique(p))
    expected = [f1_score(y, (p >= t).astype(int), zero_division=0) for t in thresholds]
    np.testing.assert_allclose(curve, expected, atol=1e-12)


def test_f1_at_matches_sklearn() -> None:
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 100)
    p = rng.random(100)
    for thr in (0.0, 0.3, 0.5, 0.99, 1.5):
        assert f1_at(y, p, thr) == pytest.approx(f1_score(y, (p >= thr).astype(int), zero_division=0))


# --------------------------------------------------------------------------- nested estimates


def test_nested_threshold_uses_other_folds() -> None:
    P, y, folds = make_oof(n=500, seed=9)
    p = P[:, 2]
    res = nested_threshold_f1(y, p, folds)
    assert set(res) == {"mean", "per_fold", "thresholds"}
    assert len(res["per_fold"]) == len(res["thresholds"]) == 5
    f = 3
    tr, te = folds != f, folds == f
    thr, _ = best_threshold(y[tr], p[tr])
    assert res["thresholds"][f] == thr
    assert res["per_fold"][f] == pytest.approx(f1_at(y[te], p[te], thr))
    assert res["mean"] == pytest.approx(np.mean(res["per_fold"]))


@pytest.mark.parametrize("method", METHODS)
def test_nested_blend_refits_blend_and_threshold(method: str) -> None:
    P, y, folds = make_oof(n=500, seed=10)
    res = nested_blend_f1(P, y, folds, method)
    assert len(res["per_fold"]) == len(res["thresholds"]) == 5
    f = 1
    tr, te = folds != f, folds == f
    blend = fit_blend(P[tr], y[tr], method)
    thr, _ = best_threshold(y[tr], blend.apply(P[tr]))
    assert res["thresholds"][f] == pytest.approx(thr, abs=1e-12)
    assert res["per_fold"][f] == pytest.approx(f1_at(y[te], blend.apply(P[te]), thr))


def test_nested_blend_hill_solver_passes_options() -> None:
    P, y, folds = make_oof(n=300, seed=11)
    res = nested_blend_f1(P, y, folds, "weighted", solver="hill", objective="auc")
    assert len(res["per_fold"]) == 5
    with pytest.raises(FoldkitError):
        nested_blend_f1(P, y, folds, "weighted", solver="annealing")
    with pytest.raises(FoldkitError):
        nested_blend_f1(P, y, folds, "weighted", steps=3)


# --------------------------------------------------------------------------- choose_blend


def test_choose_blend_returns_every_method_and_ignores_noise_model() -> None:
    P, y, folds = make_oof(n=3000, m=4, seed=12, noise_col=True)
    best, results = choose_blend(P, y, folds)
    assert best in METHODS
    assert list(results) == list(METHODS)
    assert all(len(r["per_fold"]) == 5 for r in results.values())
    assert results[best]["mean"] == max(r["mean"] for r in results.values())
    weights = fit_blend(P, y, "weighted").weights
    assert weights[-1] < 0.02
    hill = fit_blend(P, y, "weighted", solver="hill").weights
    assert hill[-1] < 0.05


def test_choose_blend_single_model_and_ties_prefer_simpler() -> None:
    P, y, folds = make_oof(n=400, m=1, seed=13)
    best, results = choose_blend(P, y, folds)
    assert set(results) == set(METHODS)
    assert results["mean"] == results["weighted"]
    # One model: every method is a monotone map of the same column, so all score alike.
    means = {m: r["mean"] for m, r in results.items()}
    assert max(means.values()) - min(means.values()) < 1e-9
    assert best == "mean"
    best2, _ = choose_blend(P, y, folds, methods=("weighted", "mean"))
    assert best2 == "mean"


def test_choose_blend_speed_moderate() -> None:
    rng = np.random.default_rng(14)
    n, m = 100_000, 5
    y = rng.integers(0, 2, n)
    P = special.expit((2 * y - 1)[:, None] * np.linspace(0.5, 1.5, m) + rng.normal(size=(n, m)))
    folds = rng.integers(0, 5, n)
    t0 = time.perf_counter()
    choose_blend(P, y, folds)
    best_threshold(y, P[:, 0])
    assert time.perf_counter() - t0 < 30
