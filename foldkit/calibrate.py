"""Put the threshold where the submission's probabilities live (issue 10).

Each OOF row comes from ONE fold model; each test probability is the AVERAGE of K fold models. When the
fold models differ in scale and bias (they stop at different epochs, see different data), the pooled
OOF is a mixture of K calibrations while the test mean is a narrower distribution of another shape,
and a threshold tuned on the first is misplaced on the second. Two remedies, measured in
docs/benchmarks.md ("The estimate against the real test F1"):

- ``platt``: calibrate each fold model on its own OOF rows (logistic regression on the logit, i.e.
  Platt scaling; temperature scaling is the special case without a bias, which cannot undo a bias
  drift) before anything is blended or averaged, so OOF and test live on one common scale;
- ``foldmean`` (test mode): the K fold models' disagreement on each test image measures the noise
  that the fold average (``fold_average``: the mean of their log-odds) removes; each class of the OOF
  scores is shrunk toward its mean by that much (``fold_mean_oof``), and the threshold and the
  estimate are fitted on these fold-mean-like scores;
- ``rate``: after the OOF threshold is found, place the test threshold so that the test's predicted
  fake rate equals the OOF's at its threshold (assumes the test fake ratio is the training one).

Pure numpy/scipy/sklearn, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special, stats

from foldkit.io import FoldkitError

CALIBRATIONS = ("none", "platt")
THRESHOLD_FITS = ("pooled", "rate")
#: How the test-mode threshold is fitted: also ``foldmean`` (``fold_mean_oof``).
TEST_THRESHOLD_FITS = ("foldmean", *THRESHOLD_FITS)  # the default: foldkit.ensemble.THRESHOLD_FIT
#: Probabilities are clipped before the logit, as in foldkit.blend.
EPS = 1e-7
#: Parts of a fold in ``crossfit_oof``: each part is calibrated by the map fitted on the others
#: (5: each map sees 4/5 of the fold; measured against 2 and 10 in its docstring).
CROSSFIT_PARTS = 5
#: Identity Platt parameters (slope, intercept on the logit).
IDENTITY = (1.0, 0.0)


def _logit(p: np.ndarray) -> np.ndarray:
    return special.logit(np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS))


def fit_platt(p: Any, y: Any) -> tuple[float, float]:
    """(slope, intercept) of ``P(fake) = sigmoid(slope * logit(p) + intercept)`` by maximum likelihood.

    Why sklearn's LogisticRegression with a huge C: an (almost) unregularised 1-feature logistic fit
    is exactly Platt scaling. A one-class fold cannot be fitted and keeps the identity.
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y).astype(np.int64)
    if y.min() == y.max():
        return IDENTITY
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p)[:, None], y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def apply_platt(p: Any, params: tuple[float, float]) -> np.ndarray:
    """Map probabilities through fitted Platt parameters (a monotone map when the slope is > 0)."""
    slope, intercept = params
    return special.expit(slope * _logit(p) + intercept)


def _check_method(method: str) -> None:
    if method not in CALIBRATIONS:
        raise FoldkitError(f"unknown calibration {method!r}; choose from {CALIBRATIONS}")


def calibrate_oof(
    P: np.ndarray, y: np.ndarray, folds: np.ndarray, method: str
) -> tuple[np.ndarray, dict[int, list[tuple[float, float]]]]:
    """Calibrate every (fold, model) block of the OOF matrix on its own rows.

    Returns the calibrated copy of ``P`` and ``{fold: [params per model column]}``, the maps that
    ``calibrate_fold`` applies to that fold model's test predictions.
    """
    _check_method(method)
    P = np.asarray(P, dtype=np.float64)
    out = P.copy()
    params: dict[int, list[tuple[float, float]]] = {}
    for f in np.unique(folds):
        rows = folds == f
        params[int(f)] = [
            fit_platt(P[rows, j], y[rows]) if method == "platt" else IDENTITY for j in range(P.shape[1])
        ]
        for j, ab in enumerate(params[int(f)]):
            out[rows, j] = apply_platt(P[rows, j], ab) if method == "platt" else P[rows, j]
    return out, params


def crossfit_oof(
    P: np.ndarray, y: np.ndarray, folds: np.ndarray, method: str, parts: int = CROSSFIT_PARTS
) -> np.ndarray:
    """``P`` calibrated like ``calibrate_oof`` but without any row's own label: each fold's rows are
    dealt into ``parts`` parts (round-robin within each class, so every part keeps the fold's fake
    ratio), and each part goes through the map fitted on the fold's other parts. What the choice and
    the estimates score. A fold with fewer than 2 rows of a class is scored uncalibrated.

    Why: a fold's map fitted on all its rows has seen the labels it is then scored against, so the
    nested-CV and outer-loop F1 on ``calibrate_oof``'s output are optimistic. Measured on the
    simulation (``benchmarks/bench_threshold.py --crossfit --seeds 200 --own 1.5``; estimate minus
    the same models' F1 on fresh data at 10 / 20 / 80 / 400 rows per fold): whole-fold maps +0.073 /
    +0.027 / +0.004 / +0.001; cross-fitted in 5 parts -0.010 / +0.005 / -0.001 / -0.000, as close
    as no calibration at all (-0.008 / -0.005 / -0.007 / -0.002). In 2 parts the maps, fitted on half
    a fold, were noisy enough to make it pessimistic (-0.019 at 10 rows; -0.010 on a 400-row-per-fold
    trained run whose whole-fold estimate was exact). The submission still uses the maps fitted on
    whole folds (``calibrate_oof``).
    """
    P = np.asarray(P, dtype=np.float64)
    _check_method(method)
    out = P.copy()  # every row is overwritten below, unless uncalibrated (``none``, tiny folds)
    if method == "none":
        return out
    y = np.asarray(y).astype(np.int64)
    for f in np.unique(folds):
        rows = np.flatnonzero(folds == f)
        # as many parts as the rarer class has rows (at most ``parts``): every map then sees both
        # classes; a fold with under 2 of a class cannot be calibrated without the row's own label
        n_parts = min(parts, int(min(np.sum(y[rows] == 0), np.sum(y[rows] == 1))))
        if n_parts < 2:
            continue
        part = np.zeros(len(rows), dtype=np.int64)
        for c in (0, 1):  # dealt round within each class: every part keeps the fold's class balance
            members = np.flatnonzero(y[rows] == c)
            part[members] = np.arange(len(members)) % n_parts
        for q in range(n_parts):
            fit_rows, to_rows = rows[part != q], rows[part == q]
            for j in range(P.shape[1]):
                out[to_rows, j] = apply_platt(P[to_rows, j], fit_platt(P[fit_rows, j], y[fit_rows]))
    return out


def positive_rate(p: Any, threshold: float) -> float:
    """Share of rows predicted fake (``p >= threshold``)."""
    return float(np.mean(np.asarray(p) >= threshold))


def rate_threshold(p: Any, rate: float) -> float:
    """The threshold that predicts a share ``rate`` of ``p`` fake (the top ``round(rate * n)`` values).

    Ties at the cut may add a few more; ``rate`` 0 gives a threshold above every value.
    """
    p = np.asarray(p, dtype=np.float64)
    k = round(float(rate) * p.shape[0])
    if k <= 0:
        return float(np.nextafter(p.max(), np.inf))
    return float(np.sort(p)[::-1][min(k, p.shape[0]) - 1])


def place_threshold(y_fit: Any, p_fit: Any, p_new: Any, mode: str) -> tuple[float, float]:
    """(threshold for ``p_new``, positive rate of ``p_fit`` at its best-F1 threshold).

    ``pooled``: the best-F1 threshold of the fitted scores, applied unchanged; ``rate``: the threshold
    giving ``p_new`` the fitted scores' positive rate.
    """
    from foldkit.blend import best_threshold

    if mode not in THRESHOLD_FITS:
        raise FoldkitError(f"unknown threshold fit {mode!r}; choose from {THRESHOLD_FITS}")
    thr, _ = best_threshold(y_fit, p_fit)
    rate = positive_rate(p_fit, thr)
    return (rate_threshold(p_new, rate) if mode == "rate" else thr), rate


def fold_average(p_folds: Any) -> np.ndarray:
    """The submission's average of K fold models' probabilities ``(K, m)``: the mean of their log-odds.

    Why not the mean of the probabilities: ``fold_mean_oof`` models the fold average as the mean of
    the fold models' logits (signal plus K deviations), and the threshold is placed on that model.
    A probability mean is another distribution, skewed where the fold models disagree: one fold
    model at 0.5 among four at 0.001 lifts a real image to 0.1 (log-odds -2.2, not -5.4), which
    fattens the real class's upper tail exactly where a low-prevalence threshold sits. On four
    benchmark runs at fake ratio 0.1 the foldmean threshold lost 0.002-0.034 F1 to the test's best
    threshold on the probability mean and 0.001-0.004 on the log-odds mean, whose own best F1 was as
    high (docs/benchmarks.md, "The estimate against the real test F1", part 7).
    """
    T = _logit(p_folds)
    return special.expit(T.mean(axis=0))


def fold_mean_oof(
    p_oof: Any, y: Any, p_test_folds: Any, iters: int = 3
) -> tuple[np.ndarray, dict[str, float]]:
    """OOF scores shaped like a K-fold mean: each class's logits shrunk toward the class mean.

    Why: an OOF score is ONE fold model's, ``signal + d`` with ``d`` that model's own deviation; the
    submission averages K models, which removes ``(1 - 1/K)`` of the deviations' variance. That
    variance is measured without labels where it is visible, as the across-fold variance of each test
    image's logits; per class (weighted by an EM posterior of each test image's class under Gaussian
    class models of the fold-mean logits, prior: the OOF fake ratio), since models disagree more on one
    class than the other. Each class keeps its OOF mean and its variance drops by that amount (floor:
    5% of it), i.e. the class distribution is matched, not the rows denoised. ``p_test_folds``: (K, m).

    Returns (shrunk OOF probabilities, {"disagreement_real", "disagreement_fake", "k"}).
    """
    y = np.asarray(y).astype(np.int64)
    x, T = _logit(p_oof), _logit(p_test_folds)
    k = T.shape[0]
    if k < 2 or y.min() == y.max():
        return special.expit(x), {"disagreement_real": 0.0, "disagreement_fake": 0.0, "k": float(k)}
    m, vi = T.mean(axis=0), T.var(axis=0, ddof=1)
    mu = [float(x[y == c].mean()) for c in (0, 1)]
    var = [max(float(x[y == c].var()), 1e-12) for c in (0, 1)]
    prior, after, s2 = float(y.mean()), list(var), [0.0, 0.0]
    for _ in range(iters):
        l1 = stats.norm.logpdf(m, mu[1], np.sqrt(after[1])) + np.log(prior)
        l0 = stats.norm.logpdf(m, mu[0], np.sqrt(after[0])) + np.log(1.0 - prior)
        w1 = special.expit(l1 - l0)
        s2 = [float(np.average(vi, weights=1.0 - w1 + 1e-12)), float(np.average(vi, weights=w1 + 1e-12))]
        after = [max(var[c] - s2[c] * (1.0 - 1.0 / k), 0.05 * var[c]) for c in (0, 1)]
    out = x.copy()
    for c in (0, 1):
        rows = y == c
        out[rows] = mu[c] + np.sqrt(after[c] / var[c]) * (x[rows] - mu[c])
    return special.expit(out), {"disagreement_real": s2[0], "disagreement_fake": s2[1], "k": float(k)}


def simulate(
    ratio: float, seed: int, n: int = 4000, k: int = 5, own: float = 0.8
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The issue's simulation: ``k`` fold models of differing scale and bias over one latent score.

    Returns (y_oof, folds, P_oof (n, k): every model's prediction of every OOF row, y_test,
    P_test (n, k)). The OOF a real run sees is ``P_oof[i, folds[i]]``; the issue's submission was the
    row mean of ``P_test`` (``ensemble.py`` now averages log-odds: ``fold_average``). Used by the
    tests and the threshold benchmark.
    """
    rng = np.random.default_rng(seed)
    scale, bias = rng.uniform(0.5, 2.0, k), rng.normal(0.0, 1.0, k)

    def draw() -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < ratio).astype(np.int64)
        z = 1.5 * (2 * y - 1) + rng.normal(0.0, 1.0, n)
        noise = rng.normal(0.0, own, (n, k))
        return y, special.expit(scale * (z[:, None] + noise) + bias)

    y, P = draw()
    yt, PT = draw()
    return y, np.arange(n) % k, P, yt, PT
