"""Time fold assignment and the near-duplicate policy at full competition size.

Why: folds are rebuilt whenever the data changes, on 320,000 merged train+validate names; without
grouping, with subject-regex groups, and with near-duplicate links, each must stay in seconds. Aligned
faces crowd pHash space (20,000 synthetic faces give ~6,800 pairs within 6 bits, not the ~0 of random
hashes), so the pair search and the thumbnail check also run on clustered, face-like hashes. Reading
and fingerprinting the image files is not timed here (it is I/O and decoding, ~1,300 images/s per
core); the fingerprints are made up, so this measures everything after that pass. Run:

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
from foldkit import folds as folds_mod
from foldkit.folds import make_folds
from foldkit.neardup import THUMB_SIDE, Fingerprints, near_dup_pairs, thumb_corr


def fake_index(rows: int, subjects: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Names in the real data's pattern (subject id inside), 3/4 train and 1/4 validate, ~half fake."""
    rng = np.random.default_rng(seed)
    subject = rng.integers(1, subjects + 1, size=rows)
    names = [f"{19070000 + i}_S{s:04d}_L1_E01_C01_cropped.png" for i, s in enumerate(subject)]
    source = np.where(np.arange(rows) < rows * 3 // 4, "train", "validate")
    index = pd.DataFrame(
        {
            "name": names,
            "path": [f"{s}/{n}" for s, n in zip(source, names, strict=True)],
            "label": (rng.random(rows) < 0.5).astype(int),
            "source": source,
        }
    )
    return index, subject


def face_like_fingerprints(subject: np.ndarray, seed: int, copies: float = 0.01) -> Fingerprints:
    """pHashes clustered per subject (each bit of a subject's centre flipped with p=0.08, so many
    same-subject pairs and some cross-subject ones fall within 6 bits), random thumbnails, and a share
    ``copies`` of rows made lightly noised copies of another row (they pass the pixel check)."""
    rng = np.random.default_rng(seed)
    n = len(subject)
    centres = rng.integers(0, 2**63, subject.max() + 1, dtype=np.int64).astype(np.uint64)
    bits = (rng.random((n, 64)) < 0.08).astype(np.uint64) << np.arange(64, dtype=np.uint64)
    phash = centres[subject] ^ np.bitwise_or.reduce(bits, axis=1)
    thumbs = rng.integers(0, 256, (n, THUMB_SIDE**2), dtype=np.uint8)
    dst = rng.choice(n, int(n * copies), replace=False)
    src = rng.integers(0, n, len(dst))
    phash[dst] = phash[src]
    noise = rng.integers(-3, 4, (len(dst), THUMB_SIDE**2))
    thumbs[dst] = np.clip(thumbs[src].astype(int) + noise, 0, 255)
    return Fingerprints(phash, np.arange(n, dtype=np.uint64), thumbs)


def timed(label: str, fn) -> object:
    start = time.perf_counter()
    out = fn()
    print(f"{label:<60} {time.perf_counter() - start:8.2f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=320_000)
    parser.add_argument("--subjects", type=int, default=4_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    index, subject = fake_index(args.rows, args.subjects, args.seed)
    print(f"{args.rows} rows, {args.subjects} subjects")
    timed("make_folds, no groups (StratifiedKFold)", lambda: make_folds(index, Path("."), k=5))
    timed("make_folds, regex groups S\\d+", lambda: make_folds(index, Path("."), k=5, group_regex=r"S\d+"))
    hashes = (
        np.random.default_rng(args.seed).integers(0, 2**63, size=args.rows, dtype=np.int64).astype(np.uint64)
    )
    timed("near_dup_pairs, random 64-bit hashes, d=6", lambda: near_dup_pairs(hashes, 6))
    fp = face_like_fingerprints(subject, args.seed)
    a, b = timed("near_dup_pairs, face-like clustered hashes, d=6", lambda: near_dup_pairs(fp.phash, 6))
    print(f"{'  distinct candidate pairs':<60} {len(a):>10}")
    timed("thumb_corr (pixel check) on every candidate pair", lambda: thumb_corr(fp.thumbs, a, b))
    folds_mod.fingerprint_images = lambda paths, workers=None: fp  # made-up fingerprints, no files
    for label, regex in (("regex groups + near-dup", r"S\d+"), ("near-dup only (no regex)", None)):
        timed(
            f"make_folds, {label}, face-like fingerprints",
            lambda regex=regex: make_folds(index, Path("."), k=5, group_regex=regex, near_dup=True),
        )


if __name__ == "__main__":
    main()
