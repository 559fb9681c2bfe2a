"""Time fold assignment and the near-duplicate pair search at full competition size.

Why: folds are rebuilt whenever the data changes, on 320,000 merged train+validate names; without
grouping, with subject-regex groups, and the phash pair search must each stay in seconds. Run:

    .venv/bin/python benchmarks/bench_folds.py --rows 320000 --subjects 4000 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

# Run as a script from anywhere, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from foldkit.folds import make_folds, near_dup_pairs


def fake_index(rows: int, subjects: int, seed: int) -> pd.DataFrame:
    """Names in the real data's pattern (subject id inside), 3/4 train and 1/4 validate, ~half fake."""
    rng = np.random.default_rng(seed)
    subject = rng.integers(1, subjects + 1, size=rows)
    names = [f"{19070000 + i}_S{s:04d}_L1_E01_C01_cropped.png" for i, s in enumerate(subject)]
    source = np.where(np.arange(rows) < rows * 3 // 4, "train", "validate")
    return pd.DataFrame(
        {
            "name": names,
            "path": [f"{s}/{n}" for s, n in zip(source, names, strict=True)],
            "label": (rng.random(rows) < 0.5).astype(int),
            "source": source,
        }
    )


def timed(label: str, fn) -> None:
    start = time.perf_counter()
    fn()
    print(f"{label:<44} {time.perf_counter() - start:8.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=320_000)
    parser.add_argument("--subjects", type=int, default=4_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    index = fake_index(args.rows, args.subjects, args.seed)
    print(f"{args.rows} rows, {args.subjects} subjects")
    timed("make_folds, no groups (StratifiedKFold)", lambda: make_folds(index, Path("."), k=5))
    timed("make_folds, regex groups S\\d+", lambda: make_folds(index, Path("."), k=5, group_regex=r"S\d+"))
    hashes = (
        np.random.default_rng(args.seed).integers(0, 2**63, size=args.rows, dtype=np.int64).astype(np.uint64)
    )
    timed("near_dup_pairs, random 64-bit hashes, d=6", lambda: near_dup_pairs(hashes, 6))


if __name__ == "__main__":
    main()
