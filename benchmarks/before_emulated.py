"""The "before" test F1 where e7cc0ad's ensemble.py cannot run its test mode on today's checkpoints.

    git worktree add /tmp/old e7cc0ad
    python benchmarks/bench_estimate.py --ratio 0.1 --n-trainval 8000 --n-test 20000 --stage score \\
        --repo /tmp/old          # writes e7cc0ad's OOF report, then stops: it cannot read train.sync_bn
    python benchmarks/before_emulated.py --root /tmp/bench_est r0.1_n8000_t20000
    python benchmarks/bench_estimate.py ... --stage score   # today's code again (rewrites the report)

e7cc0ad's test mode averaged each model's raw (uncalibrated) fold probabilities, applied its OOF
blend (mean, weighted or logit, as its report.json records) and its pooled OOF threshold. This does
the same on the per-fold test predictions that today's ensemble.py cached (``test_fold<k>.csv``,
raw probabilities) and scores it against the truth file; it prints the old estimate (nested-CV F1)
beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special
from sklearn.metrics import f1_score


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case", help="work_CASE (and data_CASE, truth_CASE.txt) under --root")
    p.add_argument("--root", type=Path, default=Path("/tmp/bench_est"))
    args = p.parse_args()
    work = args.root / f"work_{args.case}"
    report = json.loads((work / "oof/demo/report.json").read_text(encoding="utf-8"))
    blend = report["blend"]
    if blend["method"] not in ("mean", "weighted", "logit"):
        raise SystemExit(f"{blend['method']}: not emulated here")
    truth = pd.read_csv(args.root / f"truth_{args.case}.txt", sep=" ", header=None, names=["name", "label"],
                        dtype={"name": str})  # fmt: skip
    columns = []
    for model in blend["weights"]:
        folds = sorted((work / "oof/demo" / model).glob("test_fold[0-9].csv"))
        probs = [pd.read_csv(f, dtype={"name": str}).set_index("name").loc[truth.name].prob for f in folds]
        columns.append(np.mean(probs, axis=0))
    w = np.array(list(blend["weights"].values()))
    if blend["method"] == "logit":
        p_test = special.expit(
            np.column_stack([special.logit(np.clip(c, 1e-7, 1 - 1e-7)) for c in columns]) @ w
        )
    else:  # mean and weighted are weighted sums of the probabilities
        p_test = np.column_stack(columns) @ w
    real = f1_score(truth.label, (p_test >= blend["threshold"]).astype(int))
    estimate = report["summary"].get("nested_cv_f1")
    print(f"{args.case}: before ({blend['method']}, threshold {blend['threshold']:.4f}): test F1 {real:.4f}, "
          f"estimate {estimate:.4f}, estimate - real {estimate - real:+.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
