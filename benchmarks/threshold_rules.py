"""Where should the submission's threshold sit? Threshold rules on bench_estimate.py's trained runs.

    python benchmarks/threshold_rules.py --root /tmp/bench_est r0.1_n8000_t20000 r0.5 digits ...

Each CASE is a work folder ``ROOT/work_CASE`` made by ``benchmarks/bench_estimate.py`` (its data in
``ROOT/data_<CASE without a --tag>``, e.g. ``--data r0.5`` for ``r0.5_cur``; truth in
``ROOT/truth_<data>.txt``). ``ensemble.py --mode test`` runs once in this process with its defaults,
with ``foldkit.calibrate.fold_mean_oof`` watched to get the calibrated OOF, the K fold models'
calibrated test scores and the fold-mean-shaped OOF; then every rule below places a threshold on the
same submission probabilities, and each is scored against the test labels:

- foldmean, pooled, rate: ``--threshold-fit``'s three fits;
- foldmean_bag: the median of foldmean's threshold over 200 bootstrap resamples of the OOF rows;
- fm+pooled: the log-odds mean of the foldmean and pooled thresholds (a hedge);
- bin10, bin20: OOF shaped by score bin (the test images' across-fold variance as a function of their
  fold-mean score, looked up at each OOF row's own score) instead of by class;
- conf0.9, conf0.99: foldmean with each class's disagreement measured only on test images whose class
  posterior passes the cut.

It also prints the label-free class disagreements next to the ones the test labels give, and with
``--tails`` the class tails of the shaped OOF against the test's fold average (log-odds and
probability mean, split by the test labels). The figures
of docs/benchmarks.md ("The estimate against the real test F1", parts 5 and 7) come from this script;
the submission probabilities are whatever the checked-out ``ensemble.py`` writes (part 5: the
probability mean of the fold models, part 7: their log-odds mean).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ensemble  # noqa: E402
import foldkit.calibrate as cal  # noqa: E402
from foldkit.blend import best_threshold, f1_at  # noqa: E402
from foldkit.cli import run  # noqa: E402


def _lg(p: np.ndarray) -> np.ndarray:
    return special.logit(np.clip(p, 1e-7, 1 - 1e-7))


def _shrink(x: np.ndarray, y: np.ndarray, removable: list[np.ndarray] | list[float]) -> np.ndarray:
    """Each class's logits shrunk toward the class mean by its removable variance (per row or one)."""
    out = x.copy()
    for c in (0, 1):
        r = y == c
        mu, var = x[r].mean(), x[r].var()
        rem = removable[c][r] if isinstance(removable[c], np.ndarray) else removable[c]
        out[r] = mu + np.sqrt(np.maximum(1 - rem / var, 0.05)) * (x[r] - mu)
    return special.expit(out)


def bin_shape(p_oof: np.ndarray, y: np.ndarray, T: np.ndarray, bins: int) -> np.ndarray:
    """OOF shaped with the disagreement as a function of the score (quantile bins of the fold mean)."""
    x, L = _lg(p_oof), _lg(T)
    m, v = L.mean(0), L.var(0, ddof=1)
    edges = np.quantile(m, np.linspace(0, 1, bins + 1))
    pts = [
        (m[s].mean(), v[s].mean()) for a, b in itertools.pairwise(edges) if (s := (m >= a) & (m <= b)).any()
    ]
    s2 = np.interp(x, [c for c, _ in pts], [w for _, w in pts]) * (1 - 1 / L.shape[0])
    return _shrink(x, y, [s2, s2])


def conf_shape(p_oof: np.ndarray, y: np.ndarray, T: np.ndarray, cut: float) -> np.ndarray:
    """fold_mean_oof with each class's disagreement from test images whose class posterior passes ``cut``."""
    x, L = _lg(p_oof), _lg(T)
    k, m, vi = L.shape[0], L.mean(0), L.var(0, ddof=1)
    mu, var = [x[y == c].mean() for c in (0, 1)], [x[y == c].var() for c in (0, 1)]
    prior, after, s2 = y.mean(), list(var), [0.0, 0.0]
    for _ in range(3):
        l1 = stats.norm.logpdf(m, mu[1], np.sqrt(after[1])) + np.log(prior)
        l0 = stats.norm.logpdf(m, mu[0], np.sqrt(after[0])) + np.log(1 - prior)
        w1 = special.expit(l1 - l0)
        sure = (w1 < 1 - cut, w1 > cut)  # none may pass with near-chance models: then all, weighted
        s2 = [
            vi[sure[c]].mean() if sure[c].any() else np.average(vi, weights=w1 if c else 1 - w1)
            for c in (0, 1)
        ]
        after = [max(var[c] - s2[c] * (1 - 1 / k), 0.05 * var[c]) for c in (0, 1)]
    return _shrink(x, y, [s2[c] * (1 - 1 / k) for c in (0, 1)])


def rules(y: np.ndarray, p_oof: np.ndarray, T: np.ndarray, shaped: np.ndarray, probs: np.ndarray) -> dict:
    """Every rule's threshold for the submission probabilities ``probs``."""
    rng = np.random.default_rng(0)
    out = {"foldmean": best_threshold(y, shaped)[0], "pooled": best_threshold(y, p_oof)[0]}
    out["rate"] = cal.rate_threshold(probs, cal.positive_rate(p_oof, out["pooled"]))
    boot = [best_threshold(y[i], shaped[i])[0] for i in (rng.integers(0, len(y), len(y)) for _ in range(200))]
    out["foldmean_bag"] = float(special.expit(np.median(_lg(np.array(boot)))))
    out["fm+pooled"] = float(special.expit(_lg(np.array([out["foldmean"], out["pooled"]])).mean()))
    for b in (10, 20):
        out[f"bin{b}"] = best_threshold(y, bin_shape(p_oof, y, T, b))[0]
    for cut in (0.9, 0.99):
        out[f"conf{cut}"] = best_threshold(y, conf_shape(p_oof, y, T, cut))[0]
    return out


def one_case(root: Path, case: str, data: str, tails: bool = False) -> tuple[str, dict[str, float]]:
    """Run ensemble.py --mode test on one case and score every rule against its test labels.

    Returns (a printable line, each rule's loss against the test's best threshold)."""
    seen, real = [], cal.fold_mean_oof

    def watch(p_oof: np.ndarray, y: np.ndarray, p_test_folds: np.ndarray, **kw: int) -> tuple:
        result = real(p_oof, y, p_test_folds, **kw)
        seen.append((np.asarray(p_oof), np.asarray(y), np.asarray(p_test_folds), result))
        return result

    cal.fold_mean_oof = watch
    try:
        argv = ["--exp", "demo", "--mode", "test", "--work-dir", str(root / f"work_{case}")]
        with contextlib.redirect_stdout(io.StringIO()):
            run(ensemble.main, [*argv, "--data-dir", str(root / f"data_{data}")])
    finally:
        cal.fold_mean_oof = real
    p_oof, y, T, (shaped, spread) = seen[-1]
    truth = pd.read_csv(
        root / f"truth_{data}.txt", sep=" ", header=None, names=["name", "label"], dtype={"name": str}
    )
    probs = pd.read_csv(root / f"work_{case}/submissions/demo/probs.csv", dtype={"name": str}).set_index(
        "name"
    )
    yt, p = truth.label.to_numpy(), probs.loc[truth.name].prob.to_numpy()
    best = best_threshold(yt, p)
    vt = _lg(T).var(0, ddof=1)  # T is in the test label file's order, as the truth file is
    if tails:
        line_tails = _tails(y, shaped, yt, T)
    placed = rules(y, p_oof, T, shaped, p)
    scores = " ".join(f"{k}={f1_at(yt, p, v):.4f}@{v:.3f}" for k, v in placed.items())
    line = (
        f"{case} {scores} | best={best[1]:.4f}@{best[0]:.3f} | disagreement real/fake label-free "
        f"{spread['disagreement_real']:.2f}/{spread['disagreement_fake']:.2f}, "
        f"from the labels {vt[yt == 0].mean():.2f}/{vt[yt == 1].mean():.2f}"
    )
    if tails:
        line += "\n" + line_tails
    return line, {k: best[1] - f1_at(yt, p, v) for k, v in placed.items()}


def _tails(y: np.ndarray, shaped: np.ndarray, yt: np.ndarray, T: np.ndarray) -> str:
    """Log-odds quantiles of the real class's upper tail and the fake class's lower tail: the shaped
    OOF against the test set's fold average, averaged in log-odds and in probability; and the best
    test F1 each average can reach."""
    qs = (0.9, 0.95, 0.99, 0.995)
    rows = {
        "shaped OOF": (shaped, y),
        "test, log-odds mean": (cal.fold_average(T), yt),
        "test, probability mean": (T.mean(axis=0), yt),
    }
    out = []
    for name, (p, lab) in rows.items():
        real = np.quantile(_lg(p[lab == 0]), qs)
        fake = np.quantile(_lg(p[lab == 1]), [1 - q for q in qs])
        out.append(
            f"  {name:>22}: real q{'/'.join(f'{q:g}' for q in qs)} {' '.join(f'{v:6.2f}' for v in real)}"
            f" | fake q{'/'.join(f'{1 - q:.3g}' for q in qs)} {' '.join(f'{v:6.2f}' for v in fake)}"
        )
    means = (("log-odds", cal.fold_average(T)), ("probability", T.mean(axis=0)))
    best = {k: best_threshold(yt, v) for k, v in means}
    out.append("  best test F1: " + ", ".join(f"{k} mean {f:.4f}@{t:.3f}" for k, (t, f) in best.items()))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+", help="work_CASE folders under --root")
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_est"))
    parser.add_argument("--tails", action="store_true", help="also print each class's tail quantiles")
    args = parser.parse_args()
    losses: dict[str, list[float]] = {}
    for case in args.cases:
        data = case.split("_cur")[0].split("_ema")[0]
        data = data.removesuffix("_loss").removesuffix("_last")
        line, loss = one_case(args.root, case, data, args.tails)
        print(line, flush=True)
        for rule, v in loss.items():
            losses.setdefault(rule, []).append(v)
    print(f"loss against each case's best test threshold, over {len(args.cases)} cases:")
    for rule, v in losses.items():
        print(f"  {rule:>13}: mean {np.mean(v):.4f}  worst {max(v):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
