"""Where should the threshold sit? The issue-10 simulation, measured (docs/benchmarks.md).

    python benchmarks/bench_threshold.py --seeds 20
    python benchmarks/bench_threshold.py --crossfit --seeds 200 --own 1.5   # the estimate's optimism

Five fold models of differing scale and bias (``foldkit.calibrate.simulate``): each OOF row comes from
one of them, each test probability is their mean. For each fake ratio it prints the submission's test
F1 (mean over seeds) with the threshold placed six ways, and at the best test threshold (oracles):
pooled (the OOF best-F1 threshold as is), rate (the test threshold that predicts the OOF's fake rate),
platt (each fold model Platt-calibrated on its own OOF before averaging), platt+rate, platt+foldmean
(the threshold fitted on OOF shaped like a fold mean, ``foldkit.calibrate.fold_mean_oof``). These
average the fold models' probabilities, as the issue's simulation did; ``logodds+foldmean`` is what
``ensemble.py --mode test`` does now: the same shaped threshold on the calibrated fold models'
log-odds mean (``foldkit.calibrate.fold_average``). Oracles: ``oracle`` on the raw probability mean
(the pooled and rate ways' submission), ``oracle_platt`` on the calibrated probability mean,
``oracle_logodds`` on the calibrated log-odds mean.

``--crossfit``: how optimistic the nested estimate is when each fold's Platt map has seen the labels
it is scored against. Per fold f: the threshold fitted on the other folds' calibrated OOF, the F1 of
fold f's calibrated OOF at it (the estimate), against the F1 of the same fold model, through its
whole-fold map, at the threshold the whole-fold maps give, on fresh rows (what the estimate claims).
Estimates: ``own`` (``calibrate_oof``: the map fitted on the fold's own rows, as before), ``crossfit``
(``crossfit_oof``: each half of the fold through the other half's map), ``none`` (no calibration).
"""

from __future__ import annotations

import argparse

import numpy as np

from foldkit.blend import best_threshold, f1_at
from foldkit.calibrate import (
    apply_platt,
    calibrate_oof,
    crossfit_oof,
    fold_average,
    fold_mean_oof,
    place_threshold,
    simulate,
)

WAYS = ("pooled", "rate", "platt", "platt+rate", "platt+foldmean", "logodds+foldmean")
ORACLES = ("oracle", "oracle_platt", "oracle_logodds")


def one(ratio: float, seed: int, own: float) -> dict[str, float]:
    """Test F1 of every way, and the oracle, on one simulated run."""
    y, folds, P, yt, PT = simulate(ratio, seed, own=own)
    oof = P[np.arange(len(y)), folds]
    cal, params = calibrate_oof(oof[:, None], y, folds, "platt")
    per_fold = np.stack([apply_platt(PT[:, f], params[f][0]) for f in range(PT.shape[1])])
    test_cal = per_fold.mean(axis=0)
    out = {"oracle": best_threshold(yt, PT.mean(axis=1))[1]}
    out["oracle_platt"] = best_threshold(yt, test_cal)[1]
    test_logodds = fold_average(per_fold)  # the submission ensemble.py writes
    out["oracle_logodds"] = best_threshold(yt, test_logodds)[1]
    shaped, _ = fold_mean_oof(cal[:, 0], y, per_fold)
    shaped_thr, _ = best_threshold(y, shaped)
    out["platt+foldmean"] = f1_at(yt, test_cal, shaped_thr)
    out["logodds+foldmean"] = f1_at(yt, test_logodds, shaped_thr)
    for way in WAYS[:-2]:
        o, t = (cal[:, 0], test_cal) if way.startswith("platt") else (oof, PT.mean(axis=1))
        thr, _ = place_threshold(y, o, t, "rate" if way.endswith("rate") else "pooled")
        out[way] = f1_at(yt, t, thr)
    return out


def optimism(n: int, seed: int, own: float, k: int = 5) -> dict[str, float]:
    """Estimate minus fresh-data F1, per way, on one simulated run of ``n`` OOF rows (mean over folds)."""
    y, folds, P, yt, PT = simulate(0.5, seed, n=n, k=k, own=own)
    oof = P[np.arange(n), folds][:, None]
    whole, params = calibrate_oof(oof, y, folds, "platt")
    scored = {"own": whole, "crossfit": crossfit_oof(oof, y, folds, "platt"), "none": oof.astype(float)}
    out = {}
    for way, cal in scored.items():
        gaps = []
        for f in range(k):
            te = folds == f
            thr, _ = best_threshold(y[~te], cal[~te, 0])
            real_thr = thr if way == "none" else best_threshold(y[~te], whole[~te, 0])[0]
            fresh = PT[:, f] if way == "none" else apply_platt(PT[:, f], params[f][0])
            gaps.append(f1_at(y[te], cal[te, 0], thr) - f1_at(yt, fresh, real_thr))
        out[way] = float(np.mean(gaps))
    return out


def main_crossfit(seeds: int, own: float) -> None:
    ways = ("own", "crossfit", "none")
    print(f"{'rows/fold':>10}  " + "  ".join(f"{w:>10}" for w in ways) + "   (estimate - fresh F1, mean)")
    for per_fold in (10, 20, 80, 400):
        runs = [optimism(5 * per_fold, s, own) for s in range(seeds)]
        print(f"{per_fold:>10}  " + "  ".join(f"{np.mean([r[w] for r in runs]):>+10.4f}" for w in ways))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--own", type=float, default=0.8, help="each fold model's own noise (sd, latent units)")
    p.add_argument("--crossfit", action="store_true", help="the estimate's optimism from own-label maps")
    args = p.parse_args()
    if args.crossfit:
        return main_crossfit(args.seeds, args.own)
    print(f"{'fake ratio':>10}  " + "  ".join(f"{w:>10}" for w in (*WAYS, *ORACLES)))
    for ratio in (0.05, 0.1, 0.2, 0.5):
        runs = [one(ratio, s, args.own) for s in range(args.seeds)]
        cells = [np.mean([r[w] for r in runs]) for w in (*WAYS, *ORACLES)]
        print(f"{ratio:>10}  " + "  ".join(f"{c:>10.4f}" for c in cells))


if __name__ == "__main__":
    main()
