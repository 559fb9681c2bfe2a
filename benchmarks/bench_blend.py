"""Time the blending and threshold steps on OOF-sized synthetic data.

Why: ``choose_blend`` runs K fits per method on the full OOF table, and must stay in seconds at
competition scale (hundreds of thousands of rows, ~10 models). Run:

    .venv/bin/python benchmarks/bench_blend.py --rows 320000 --models 10 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import special

# Run as a script from anywhere, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from foldkit.blend import METHODS, best_threshold, choose_blend, fit_blend


def make_data(rows: int, models: int, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated noisy probabilities: a shared noise term plus model-specific noise of varying strength."""
    rng = np.random.default_rng(seed)
    y = (rng.random(rows) < 0.5).astype(np.int64)
    signal = np.where(y == 1, 1.0, -1.0)
    shared = rng.normal(size=rows)
    strength = np.linspace(0.6, 2.0, models)
    logits = (
        signal[:, None] * strength[None, :]
        + 0.8 * shared[:, None]
        + rng.normal(size=(rows, models)) * rng.uniform(0.8, 1.5, size=models)
    )
    P = special.expit(logits)
    P = np.round(P, 4)  # realistic ties, as from float16/rounded CSVs
    fold_ids = rng.integers(0, folds, size=rows)
    return P, y, fold_ids


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time over ``repeats`` runs (least disturbed by other processes) and the last result."""
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    """Parse arguments, time each step, print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=320_000)
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="repeats per cheap step (best time is reported)")
    args = ap.parse_args()

    P, y, folds = make_data(args.rows, args.models, args.folds, args.seed)
    rows: list[tuple[str, float, str]] = []
    for method in METHODS:
        sec, blend = timed(lambda m=method: fit_blend(P, y, m), args.repeats)
        rows.append((f"fit_blend[{method}]", sec, ""))
        sec, _ = timed(lambda b=blend: b.apply(P), args.repeats)
        rows.append((f"apply[{method}]", sec, ""))
    sec, blend = timed(lambda: fit_blend(P, y, "weighted", solver="hill"), 1)
    rows.append(("fit_blend[weighted, hill, logloss]", sec, ""))
    sec, _ = timed(lambda: fit_blend(P, y, "weighted", objective="auc", solver="hill"), 1)
    rows.append(("fit_blend[weighted, hill, auc]", sec, ""))
    sec, (thr, f1) = timed(lambda: best_threshold(y, P[:, -1]), args.repeats)
    rows.append(("best_threshold", sec, f"thr={thr:.4f} f1={f1:.4f}"))
    sec, (best, res) = timed(lambda: choose_blend(P, y, folds), 1)
    detail = " ".join(f"{m}={r['mean']:.4f}" for m, r in res.items())
    rows.append(("choose_blend (4 methods, scipy)", sec, f"best={best} {detail}"))
    total = sec + timed(lambda: best_threshold(y, fit_blend(P, y, best).apply(P)), 1)[0]
    rows.append(("choose_blend + final fit + best_threshold", total, ""))

    print(f"rows={args.rows} models={args.models} folds={args.folds} seed={args.seed}")
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'seconds':>8}  notes")
    for name, sec, note in rows:
        print(f"{name:<{width}}  {sec:8.3f}  {note}")


if __name__ == "__main__":
    main()
