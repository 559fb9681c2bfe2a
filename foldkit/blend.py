"""Blend the out-of-fold (OOF) probabilities of several models and pick an F1 threshold, honestly.

Everything here is pure numpy/scipy and does no file I/O, so it can be tested against brute force.

Why the ``nested_*`` functions: the blend weights and the F1 threshold are tuned on the same OOF
predictions they are then scored on, which flatters them. Refitting both on K-1 folds and scoring the
held-out fold gives the number to trust when comparing blend methods (``choose_blend``).

Shapes: ``P`` is (n, m), one column of probabilities per model; ``y`` is (n,) with real=0 / fake=1;
``folds`` is (n,) with the fold id of each row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from foldkit.io import FoldkitError

METHODS = ("mean", "rank", "logit", "weighted")
OBJECTIVES = ("logloss", "auc")
SOLVERS = ("scipy", "hill")
#: Probabilities are clipped to [EPS, 1-EPS] before a logit or a log, so a confident 0/1 stays finite.
EPS = 1e-7
#: Upper bound on the number of greedy additions in hill climbing (Caruana et al. use ~100).
HILL_MAX_STEPS = 100


# --------------------------------------------------------------------------- input checks


def _as_matrix(P: Any) -> np.ndarray:
    """Return ``P`` as a float64 (n, m) matrix of probabilities; a 1-D array is one model."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim == 1:
        P = P[:, None]
    if P.ndim != 2 or P.shape[0] == 0 or P.shape[1] == 0:
        raise FoldkitError(f"expected a non-empty (n, m) matrix of probabilities, got shape {P.shape}")
    if not np.isfinite(P).all():
        raise FoldkitError("probabilities contain NaN or infinity")
    if P.min() < 0.0 or P.max() > 1.0:
        raise FoldkitError(f"probabilities must lie in [0, 1], got range [{P.min():g}, {P.max():g}]")
    return P


def _as_vector(p: Any) -> np.ndarray:
    """Return ``p`` as a float64 (n,) vector of probabilities (or any finite scores)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.shape[0] == 0:
        raise FoldkitError(f"expected a non-empty 1-D array of probabilities, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise FoldkitError("probabilities contain NaN or infinity")
    return p


def _as_labels(y: Any, n: int) -> np.ndarray:
    """Return ``y`` as an int64 0/1 vector of length ``n``."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise FoldkitError(f"labels have shape {y.shape}, expected ({n},)")
    if not ((y == 0) | (y == 1)).all():
        raise FoldkitError("labels must be 0 (real) or 1 (fake)")
    return y.astype(np.int64)


def _as_folds(folds: Any, n: int) -> np.ndarray:
    """Return ``folds`` as an int64 vector of length ``n`` with at least two distinct folds."""
    folds = np.asarray(folds)
    if folds.ndim != 1 or folds.shape[0] != n:
        raise FoldkitError(f"folds have shape {folds.shape}, expected ({n},)")
    if not np.issubdtype(folds.dtype, np.integer):
        if not np.all(np.equal(np.mod(folds, 1), 0)):
            raise FoldkitError("fold ids must be integers")
        folds = folds.astype(np.int64)
    if np.unique(folds).size < 2:
        raise FoldkitError("nested estimates need at least two folds")
    return folds.astype(np.int64)


def _fit_options(fit_kw: dict[str, Any]) -> tuple[str, str]:
    """Validate ``**fit_kw`` forwarded by the nested functions and return (objective, solver)."""
    extra = set(fit_kw) - {"objective", "solver"}
    if extra:
        raise FoldkitError(f"unknown fit_blend options {sorted(extra)}; expected objective, solver")
    objective, solver = fit_kw.get("objective", "logloss"), fit_kw.get("solver", "scipy")
    _check_fit_kw(objective, solver)
    return objective, solver


def _check_fit_kw(objective: str, solver: str) -> None:
    """Fail fast on an unknown or unsupported objective/solver pair."""
    if objective not in OBJECTIVES:
        raise FoldkitError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
    if solver not in SOLVERS:
        raise FoldkitError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    if solver == "scipy" and objective != "logloss":
        raise FoldkitError("solver='scipy' minimises log-loss; use solver='hill' for objective='auc'")


# --------------------------------------------------------------------------- blends


def _rank_against(P: np.ndarray, ref: list[np.ndarray]) -> np.ndarray:
    """Map each column to its mid-rank position in that model's sorted OOF column.

    On the OOF itself this equals ``(rankdata(col, "average") - 0.5) / n``; on new data it is the
    same fixed, monotone transform, which is why the reference is stored rather than re-ranking.
    """
    R = np.empty_like(P)
    for j, r in enumerate(ref):
        # Sorted queries make the binary searches cache-friendly (about 2x faster on 300k rows).
        order = np.argsort(P[:, j])
        q = P[order, j]
        lo = np.searchsorted(r, q, side="left")
        hi = np.searchsorted(r, q, side="right")
        R[order, j] = (lo + hi) / (2.0 * len(r))
    return R


def _fit_rank(P: np.ndarray, orders: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Sorted reference columns and the mid-ranks of ``P`` itself, from one argsort per column.

    The mid-ranks equal ``_rank_against(P, ref)`` but skip the searches, since in the nested loop
    every training blend is applied to its own training rows. ``orders`` (argsorts of the columns)
    lets the caller reuse one global sort across folds.
    """
    n = P.shape[0]
    ref: list[np.ndarray] = []
    R = np.empty_like(P)
    for j in range(P.shape[1]):
        order = orders[j] if orders is not None else np.argsort(P[:, j])
        s = P[order, j]
        cuts = np.flatnonzero(s[1:] != s[:-1]) + 1
        starts = np.r_[0, cuts]
        ends = np.r_[cuts, n]
        lengths = ends - starts
        R[order, j] = (np.repeat(starts, lengths) + np.repeat(ends, lengths)) / (2.0 * n)
        ref.append(s)
    return ref, R


def _restrict_orders(orders: list[np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    """Turn argsorts of full columns into argsorts of the rows ``mask`` keeps, in O(n) per column."""
    pos = np.cumsum(mask) - 1
    return [pos[o[mask[o]]] for o in orders]


@dataclass
class Blend:
    """A fitted blend: ``apply`` maps an (n, m) probability matrix to one (n,) probability in [0, 1]."""

    method: str
    weights: np.ndarray
    ref: list[np.ndarray] = field(default_factory=list)

    def apply(self, P: Any) -> np.ndarray:
        """Blend the columns of ``P`` (same model order as at fit time)."""
        P = _as_matrix(P)
        if P.shape[1] != len(self.weights):
            raise FoldkitError(f"blend was fitted on {len(self.weights)} models, got {P.shape[1]} columns")
        if self.method == "rank" and len(self.ref) != len(self.weights):
            raise FoldkitError("rank blend has no OOF reference for every model")
        if self.method not in METHODS:
            raise FoldkitError(f"unknown blend method {self.method!r}; choose from {METHODS}")
        return self._apply(P)

    def _apply(self, P: np.ndarray) -> np.ndarray:
        """``apply`` without the input checks, for already validated matrices."""
        w = np.asarray(self.weights, dtype=np.float64)
        if self.method == "logit":
            out = special.expit(special.logit(np.clip(P, EPS, 1.0 - EPS)) @ w)
        elif self.method == "rank":
            out = _rank_against(P, self.ref) @ w
        else:
            out = P @ w
        return np.clip(out, 0.0, 1.0)


def _logloss(y: np.ndarray, q: np.ndarray) -> float:
    """Mean binary log-loss with the blend's clipping (``y`` int 0/1)."""
    qc = np.clip(q, EPS, 1.0 - EPS)
    return float(-np.mean(np.log(np.where(y == 1, qc, 1.0 - qc))))


def _auc(y: np.ndarray, q: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank sum (ties averaged); 0.5 when a class is missing."""
    npos = int(y.sum())
    nneg = y.shape[0] - npos
    if npos == 0 or nneg == 0:
        return 0.5
    ranks = stats.rankdata(q)
    return float((ranks[y == 1].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def _fit_scipy(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Minimise log-loss over the simplex with SLSQP (a convex problem, so the optimum is global).

    The result is then compared with the uniform blend and every single model, so the fitted
    weights are never worse in-sample than those trivial candidates despite solver tolerance.
    """
    n, m = P.shape
    pos = y == 1

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        q = P @ w
        inside = (q > EPS) & (q < 1.0 - EPS)
        qc = np.clip(q, EPS, 1.0 - EPS)
        loss = -np.mean(np.log(np.where(pos, qc, 1.0 - qc)))
        dq = np.where(pos, -1.0 / qc, 1.0 / (1.0 - qc)) * inside / n
        return float(loss), P.T @ dq

    w0 = np.full(m, 1.0 / m)
    res = optimize.minimize(
        fun,
        w0,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    w = np.clip(np.nan_to_num(res.x, nan=0.0), 0.0, None)
    w = w / w.sum() if w.sum() > 0 else w0
    candidates = [w, w0, *np.eye(m)]
    return min(candidates, key=lambda c: _logloss(y, P @ c))


def _fit_hill(P: np.ndarray, y: np.ndarray, objective: str, mean_start: bool = True) -> np.ndarray:
    """Caruana ensemble selection with replacement: greedily add the model that most improves the score.

    Starts from the best of {each single model, all models once} (``mean_start=False``: of the single
    models only, Caruana et al.'s own start), so the result is never worse than those starts on the
    objective; stops when no addition improves it.
    """
    score: Callable[[np.ndarray, np.ndarray], float]
    score = _logloss if objective == "logloss" else (lambda yy, q: -_auc(yy, q))
    m = P.shape[1]
    inits = [*np.eye(m), np.ones(m)] if mean_start else list(np.eye(m))
    counts = min(inits, key=lambda c: score(y, P @ c / c.sum())).copy()
    total = P @ counts
    k = counts.sum()
    best = score(y, total / k)
    for _ in range(HILL_MAX_STEPS):
        cand = [score(y, (total + P[:, j]) / (k + 1)) for j in range(m)]
        j = int(np.argmin(cand))
        if not cand[j] < best - 1e-12:
            break
        counts[j] += 1
        total += P[:, j]
        k += 1
        best = cand[j]
    return counts / counts.sum()


def fit_blend(P: Any, y: Any, method: str, objective: str = "logloss", solver: str = "scipy") -> Blend:
    """Fit a blend of the columns of ``P``; only ``weighted`` looks at ``y`` (``rank`` keeps the OOF columns).

    ``objective``/``solver`` only matter for ``weighted`` but are checked for every method so a bad
    pair fails before any work is done.
    """
    P = _as_matrix(P)
    if method not in METHODS:
        raise FoldkitError(f"unknown blend method {method!r}; choose from {METHODS}")
    _check_fit_kw(objective, solver)
    y = _as_labels(y, P.shape[0]) if method == "weighted" else None
    return _fit_apply(P, y, method, objective, solver, apply=False)[0]


def _fit_apply(
    P: np.ndarray,
    y: np.ndarray | None,
    method: str,
    objective: str = "logloss",
    solver: str = "scipy",
    apply: bool = True,
    orders: list[np.ndarray] | None = None,
) -> tuple[Blend, np.ndarray | None]:
    """Fit on validated inputs and, if ``apply``, also return the blend of ``P`` itself (cheaply for rank)."""
    m = P.shape[1]
    uniform = np.full(m, 1.0 / m)
    if method == "rank":
        ref, R = _fit_rank(P, orders)
        blend = Blend("rank", uniform, ref)
        return blend, (np.clip(R @ uniform, 0.0, 1.0) if apply else None)
    if method != "weighted":
        blend = Blend(method, uniform)
    elif m == 1:
        blend = Blend("weighted", np.ones(1))
    else:
        assert y is not None
        weights = _fit_scipy(P, y) if solver == "scipy" else _fit_hill(P, y, objective)
        blend = Blend("weighted", np.asarray(weights, dtype=np.float64))
    return blend, (blend._apply(P) if apply else None)


# --------------------------------------------------------------------------- thresholds


def _sweep(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 of ``p >= t`` at every distinct value ``t`` of ``p`` (descending), in one sort.

    With ``k`` rows predicted positive, ``2TP + FP + FN = k + #positives``, so F1 needs only the
    cumulative TP count at the last index of each run of ties.
    """
    order = np.argsort(-p)  # order within ties is irrelevant
    ps = p[order]
    tp = np.cumsum(y[order])
    npos = tp[-1]
    last = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])
    denom = (last + 1 + npos).astype(np.float64)
    f1 = 2.0 * tp[last] / denom
    return ps[last], f1


def f1_curve(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (thresholds, f1) for every distinct probability, thresholds descending (for plotting)."""
    p = _as_vector(p)
    y = _as_labels(y, p.shape[0])
    return _sweep(y, p)


def best_threshold(y: Any, p: Any) -> tuple[float, float]:
    """Return (threshold, F1) maximising F1 of ``p >= threshold``, by an exact O(n log n) sweep.

    Ties in F1 go to the highest threshold. With no positives every threshold scores 0. The threshold
    sits in the middle of the gap (in log-odds) between the lowest score it takes and the next lower
    one: the same rows on these scores, but new scores (a held-out fold, the fold-averaged test) meet
    the middle of the gap rather than its edge, which matters where the classes are well apart (digits,
    docs/benchmarks.md: the edge is the lowest positive's own score).
    """
    thr, f1 = f1_curve(y, p)
    i = int(np.argmax(f1))
    cut = float(thr[i]) if i + 1 == thr.size else _gap_middle(float(thr[i]), float(thr[i + 1]))
    return cut, float(f1[i])


def _gap_middle(above: float, below: float) -> float:
    """A value in (below, above]: their middle in log-odds for probabilities, else the plain middle;
    ``above`` itself where the two are too close for a value between them."""
    if 0.0 < below < above < 1.0:
        mid = float(special.expit((special.logit(above) + special.logit(below)) / 2.0))
    else:
        mid = (above + below) / 2.0
    return mid if below < mid <= above else above


def f1_at(y: Any, p: Any, thr: float) -> float:
    """F1 of ``p >= thr``; 0.0 when it is undefined (no positives predicted or present)."""
    p = _as_vector(p)
    y = _as_labels(y, p.shape[0])
    pred = p >= thr
    tp = int(np.count_nonzero(pred & (y == 1)))
    denom = int(np.count_nonzero(pred)) + int(y.sum())
    return 2.0 * tp / denom if denom else 0.0


# --------------------------------------------------------------------------- honest estimates


def nested_threshold_f1(y: Any, p: Any, folds: Any) -> dict[str, Any]:
    """F1 of a fixed score when the threshold is fitted on the other folds and applied to each fold.

    Returns {"mean", "per_fold", "thresholds"}, lists in ascending fold-id order.
    """
    p = _as_vector(p)
    y = _as_labels(y, p.shape[0])
    folds = _as_folds(folds, p.shape[0])
    per_fold: list[float] = []
    thresholds: list[float] = []
    for f in np.unique(folds):
        te = folds == f
        thr, _ = best_threshold(y[~te], p[~te])
        thresholds.append(thr)
        per_fold.append(f1_at(y[te], p[te], thr))
    return {"mean": float(np.mean(per_fold)), "per_fold": per_fold, "thresholds": thresholds}


def nested_blend_f1(P: Any, y: Any, folds: Any, method: str, **fit_kw: Any) -> dict[str, Any]:
    """F1 when the blend AND its threshold are fitted on the other folds and scored on each fold.

    Returns {"mean", "per_fold", "thresholds"}, lists in ascending fold-id order; the thresholds are
    on the scale of that fold's blend.
    """
    if method not in METHODS:
        raise FoldkitError(f"unknown blend method {method!r}; choose from {METHODS}")
    objective, solver = _fit_options(fit_kw)
    P = _as_matrix(P)
    y = _as_labels(y, P.shape[0])
    folds = _as_folds(folds, P.shape[0])
    # One sort per column serves every fold's rank reference.
    orders = [np.argsort(P[:, j]) for j in range(P.shape[1])] if method == "rank" else None
    per_fold: list[float] = []
    thresholds: list[float] = []
    for f in np.unique(folds):
        te = folds == f
        y_tr = y[~te]
        sub = _restrict_orders(orders, ~te) if orders is not None else None
        blend, p_tr = _fit_apply(P[~te], y_tr, method, objective, solver, orders=sub)
        assert p_tr is not None
        thr, _ = best_threshold(y_tr, p_tr)
        thresholds.append(thr)
        per_fold.append(f1_at(y[te], blend._apply(P[te]), thr))
    return {"mean": float(np.mean(per_fold)), "per_fold": per_fold, "thresholds": thresholds}


def choose_blend(
    P: Any, y: Any, folds: Any, methods: Iterable[str] = METHODS, **fit_kw: Any
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Pick the blend method with the best nested-CV F1; ties go to the simpler (earlier in METHODS).

    Returns (best method, {method: nested_blend_f1 result}) for every requested method.
    """
    wanted = list(methods)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown or not wanted:
        raise FoldkitError(f"unknown or no blend methods {unknown}; choose from {METHODS}")
    _fit_options(fit_kw)
    P = _as_matrix(P)
    y = _as_labels(y, P.shape[0])
    folds = _as_folds(folds, P.shape[0])
    results = {m: nested_blend_f1(P, y, folds, m, **fit_kw) for m in METHODS if m in wanted}
    best = None
    for m, res in results.items():
        if best is None or res["mean"] > results[best]["mean"]:
            best = m
    assert best is not None
    return best, results
