"""Choose the ensemble honestly: every single model is a candidate, the simpler one wins ties within
the noise, and the estimate comes from an outer loop around the whole choice (issue 10).

Why: the old chooser reported the best of four nested-CV means (the winner's curse), never considered
"one model alone", and a blend that won by less than the fold-to-fold noise could still lose to its
best member on the test set. Here:

- candidates are each single model, the blend methods of ``foldkit.blend`` and Caruana ensemble
  selection (greedy forward selection with replacement from the best single model);
- ``choose`` scores every candidate by nested CV (blend and threshold refitted without each fold)
  and walks from the simplest up: a more complex candidate replaces the incumbent only when its mean
  paired per-fold gain exceeds the standard error of that gain;
- ``outer_loop`` runs that whole choice on K-1 folds and scores the held-out fold: the estimate.

Pure numpy/scipy, no I/O. Shapes as in ``foldkit.blend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from foldkit.blend import METHODS, Blend, _fit_hill, _logloss, f1_at, fit_blend
from foldkit.calibrate import place_threshold
from foldkit.io import FoldkitError

#: How many standard errors of its paired per-fold gain a more complex candidate must win by (the
#: issue's rule; 0.5 was measured too and was no better: docs/benchmarks.md).
NOISE_Z = 1.0
#: Which per-fold score the simplicity rule compares (``choose``), and its key in a nested table.
#: ``logloss+f1``: a log-loss win of NOISE_Z standard errors and a strictly higher mean F1 (a blend that
#: only recalibrates its best member ties it on F1; on 7 benchmark runs it was the one rule never below
#: the best single model in the outer loop: docs/benchmarks.md).
SELECT_BY = "logloss+f1"
#: Mean F1 differences up to this are ties (rounding), not wins, for ``logloss+f1``.
F1_TIE = 1e-9
SELECT_SCORES = {"f1": "per_fold", "logloss": "per_fold_neg_logloss", "logloss+f1": "per_fold_neg_logloss"}
#: Complexity rank of each candidate kind: singles are simplest, fitted weights the most complex.
COMPLEXITY = {"single": 0, "mean": 1, "rank": 2, "logit": 3, "caruana": 4, "weighted": 5}


@dataclass(frozen=True)
class Candidate:
    """One way to turn the model columns into a score: a single column, a blend method, or Caruana."""

    name: str
    kind: str  # "single", "caruana" or one of foldkit.blend.METHODS
    column: int = -1  # the model column, for kind "single"

    @property
    def complexity(self) -> int:
        return COMPLEXITY[self.kind]


def candidates(keys: list[str], methods: tuple[str, ...] = METHODS, caruana: bool = True) -> list[Candidate]:
    """Every single model, then the given blend methods and Caruana (blends only with 2+ models)."""
    out = [Candidate(f"single:{k}", "single", j) for j, k in enumerate(keys)]
    if len(keys) > 1:
        out += [Candidate(m, m) for m in methods]
        out += [Candidate("caruana", "caruana")] if caruana else []
    return out


def caruana_weights(P: np.ndarray, y: np.ndarray, objective: str = "logloss") -> np.ndarray:
    """Caruana et al. (2004) ensemble selection: start from the best single model, then repeatedly add
    (with replacement) the model whose addition most improves the objective; stop when none does.

    The greedy loop is ``foldkit.blend``'s hill climb (``solver="hill"``), started here from the single
    models only. Starting from the best single model means the result is never worse than it on the
    objective (on the rows it was fitted on).
    """
    return _fit_hill(P, y, objective, mean_start=False)


def fit_candidate(P: np.ndarray, y: np.ndarray, cand: Candidate, **fit_kw: Any) -> Blend:
    """The fitted ``Blend`` of a candidate (a single model is a one-hot weighted blend)."""
    if cand.kind == "single":
        return Blend("weighted", np.eye(P.shape[1])[cand.column])
    if cand.kind == "caruana":
        return Blend("weighted", caruana_weights(P, y, fit_kw.get("objective", "logloss")))
    return fit_blend(P, y, cand.kind, **fit_kw)


def nested_scores(
    P: np.ndarray, y: np.ndarray, folds: np.ndarray, cand: Candidate, mode: str = "pooled", **fit_kw: Any
) -> dict[str, Any]:
    """F1 of ``cand`` on each fold when its blend and threshold are fitted on the other folds.

    ``mode`` is how the threshold reaches the held-out fold (``foldkit.calibrate.place_threshold``):
    the held-out fold plays the test set. Returns {"mean", "per_fold", "thresholds",
    "per_fold_neg_logloss"} in fold order.
    """
    per_fold, thresholds, neg_logloss = [], [], []
    for f in np.unique(folds):
        score, thr, ll = _fit_score(P, y, folds == f, cand, mode, **fit_kw)
        per_fold.append(score)
        thresholds.append(thr)
        neg_logloss.append(-ll)
    return {
        "mean": float(np.mean(per_fold)),
        "per_fold": per_fold,
        "thresholds": thresholds,
        "per_fold_neg_logloss": neg_logloss,
    }


def beats(challenger: list[float], incumbent: list[float], z: float | None = None) -> bool:
    """Whether the challenger's mean paired per-fold gain exceeds ``z`` (default ``NOISE_Z``) standard
    errors of that gain across folds."""
    d = np.asarray(challenger) - np.asarray(incumbent)
    se = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    return bool(d.mean() > (NOISE_Z if z is None else z) * se)


def choose(
    P: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    cands: list[Candidate],
    mode: str = "pooled",
    z: float | None = None,
    by: str | None = None,
    **fit_kw: Any,
) -> tuple[Candidate, dict[str, dict[str, Any]]]:
    """Nested-CV scores of every candidate and the one chosen by the simplicity rule.

    The incumbent starts as the best single model (the best candidate of the lowest complexity); each
    more complex candidate, in order of complexity, replaces it only if it ``beats`` it by ``z``
    standard errors (default ``NOISE_Z``) of the per-fold ``by`` score (default ``SELECT_BY``): ``f1``
    (nested-CV F1 at the placed threshold), ``logloss`` (held-out log-loss, a smooth score: a
    threshold's F1 jumps with a few rows, so its fold-to-fold noise hides or fakes gains;
    docs/benchmarks.md) or ``logloss+f1`` (that log-loss win and a strictly higher mean F1).
    """
    if not cands:
        raise FoldkitError("no ensemble candidates to choose from")
    by = SELECT_BY if by is None else by
    if by not in SELECT_SCORES:
        raise FoldkitError(f"select by {by!r}: expected one of {', '.join(SELECT_SCORES)}")
    table = {c.name: nested_scores(P, y, folds, c, mode, **fit_kw) for c in cands}
    key = SELECT_SCORES[by]
    ordered = sorted(cands, key=lambda c: c.complexity)  # stable: METHODS order within a rank
    simplest = [c for c in ordered if c.complexity == ordered[0].complexity]
    incumbent = max(simplest, key=lambda c: float(np.mean(table[c.name][key])))
    for c in ordered:
        if c.complexity > incumbent.complexity and _wins(table[c.name], table[incumbent.name], by, z):
            incumbent = c
    return incumbent, table


def _wins(challenger: dict[str, Any], incumbent: dict[str, Any], by: str, z: float | None) -> bool:
    """The simplicity rule for one pair of nested-CV rows: ``beats`` on the ``by`` score; with
    ``logloss+f1`` the challenger's mean nested-CV F1 (the submission's score) must also be higher."""
    key = SELECT_SCORES[by]
    if not beats(challenger[key], incumbent[key], z):
        return False
    f1_gain = float(np.mean(challenger["per_fold"])) - float(np.mean(incumbent["per_fold"]))
    return by != "logloss+f1" or f1_gain > F1_TIE


def _fit_score(
    P: np.ndarray, y: np.ndarray, te: np.ndarray, cand: Candidate, mode: str, **fit_kw: Any
) -> tuple[float, float, float]:
    """Fit ``cand`` and its threshold on the rows outside ``te``; (F1 on ``te``, threshold, log-loss
    on ``te``)."""
    blend = fit_candidate(P[~te], y[~te], cand, **fit_kw)
    p_te = blend._apply(P[te])
    thr, _ = place_threshold(y[~te], blend._apply(P[~te]), p_te, mode)
    return f1_at(y[te], p_te, thr), thr, _logloss(y[te], p_te)


def outer_loop(
    P: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    cands: list[Candidate],
    mode: str = "pooled",
    z: float | None = None,
    by: str | None = None,
    **fit_kw: Any,
) -> dict[str, Any] | None:
    """The estimate: for each fold, ``choose`` on the other folds (its own nested CV inside them), fit
    the choice and its threshold there, and score the held-out fold, which took no part in the choice.

    The same loop scores "the best single model" chosen the same way (the single candidate with the
    best inner nested-CV score that ``choose`` ranks by: ``by``, held-out log-loss by default), so the
    ensemble's estimate has a like-for-like baseline. Returns {"mean",
    "per_fold", "chosen_per_fold", "thresholds", "single_mean", "single_per_fold",
    "single_chosen_per_fold"}; None with fewer than 3 folds (the inner nested CV needs two).
    """
    ids = np.unique(folds)
    if ids.size < 3:
        return None
    out: dict[str, list] = {k: [] for k in ("per_fold", "chosen_per_fold", "thresholds")}
    out.update(single_per_fold=[], single_chosen_per_fold=[])
    key = SELECT_SCORES[SELECT_BY if by is None else by]  # how ``choose`` ranks the single models
    for f in ids:
        te = folds == f
        cand, table = choose(P[~te], y[~te], folds[~te], cands, mode, z, by, **fit_kw)
        score, thr, _ = _fit_score(P, y, te, cand, mode, **fit_kw)
        out["per_fold"].append(score)
        out["chosen_per_fold"].append(cand.name)
        out["thresholds"].append(thr)
        singles = [c for c in cands if c.kind == "single"]
        if singles:
            single = max(singles, key=lambda c: float(np.mean(table[c.name][key])))
            same = single == cand
            out["single_per_fold"].append(score if same else _fit_score(P, y, te, single, mode, **fit_kw)[0])
            out["single_chosen_per_fold"].append(single.name)
    single_mean = float(np.mean(out["single_per_fold"])) if out["single_per_fold"] else None
    return {"mean": float(np.mean(out["per_fold"])), **out, "single_mean": single_mean}


def best_single(table: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The single model with the best nested-CV F1 (its own outer-loop score: nothing is chosen)."""
    singles = {k: v for k, v in table.items() if k.startswith("single:")}
    if not singles:
        return None
    name = max(singles, key=lambda k: singles[k]["mean"])
    return {"name": name.removeprefix("single:"), **singles[name]}
