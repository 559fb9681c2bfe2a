"""Does the OOF report's estimate predict the submission's real test F1? (issue 10)

    python benchmarks/bench_estimate.py --ratio 0.5 --root /tmp/bench_est      # synthetic, fake ratio 0.5
    python benchmarks/bench_estimate.py --ratio 0.1 --root /tmp/bench_est
    python benchmarks/bench_estimate.py --digits --root /tmp/bench_est         # load_digits 3 vs 8
    python benchmarks/bench_estimate.py --ratio 0.5 --root /tmp/bench_est --stage score \
        --repo /tmp/old                                                                # old ensemble code

Each case makes its data with a truth file outside the data folders (``foldkit.synthetic --truth``, or
the digits writer below), trains ``configs/demo.yaml`` on every fold exactly as ``make demo`` does
(``foldkit.folds``, ``foldkit.store``, ``main.py --fold all``), runs ``ensemble.py --mode test`` and
scores ``prediction.txt`` against the truth. It prints the report's estimate next to that real test
F1, and the best single model's outer-loop F1 next to the chosen ensemble's.

``--repo`` runs another checkout's ``ensemble.py`` (e.g. ``git worktree add /tmp/old HEAD``) on the
same trained models: the "before" figures. ``--set key=value`` is passed to ``main.py`` (e.g.
``train.metric=loss``); give each variant its own ``--tag`` so it trains into its own folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"


def write_digits(
    out: Path, truth: Path, size: int = 112, copies: int = 6, seed: int = 0, noise: float = 12.0
) -> None:
    """``load_digits`` 3 (real, 0) vs 8 (fake, 1) as ``size`` px PNGs in the seed's layout.

    Why copies: the two classes hold ~360 8x8 images, too few for 5 folds x 2 models and a test set
    whose F1 means anything; each source digit gets ``copies`` jittered upscales (shift, scale,
    grey-level noise of sd ``noise``: raise it to make the task hard). Copies of one digit share the
    subject key ``S<id>`` in their names, so ``group_regex`` keeps them in one fold, and test digits
    are sources never seen in train/validate (the split is random, so the test's fake ratio differs
    from the training one, as it may on a leaderboard).
    """
    import cv2
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    keep = np.flatnonzero((y == 3) | (y == 8))
    rng = np.random.default_rng(seed)
    rng.shuffle(keep)
    n = len(keep)
    splits = {
        "train": keep[: n * 3 // 5],
        "validate": keep[n * 3 // 5 : n * 4 // 5],
        "test": keep[n * 4 // 5 :],
    }
    truth_lines = []
    for split, idx in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for src in idx:
            img = (X[src].reshape(8, 8) / 16.0 * 255.0).astype(np.float32)
            for c in range(copies):
                big = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
                shift = rng.uniform(-0.08, 0.08, 2) * size
                scale = rng.uniform(0.85, 1.1)
                M = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-12, 12), scale)
                M[:, 2] += shift
                big = cv2.warpAffine(big, M, (size, size), borderValue=0)
                big = np.clip(big + rng.normal(0, noise, big.shape), 0, 255).astype(np.uint8)
                name = f"D{src:04d}_S{src:04d}_C{c}.png"
                cv2.imwrite(str(out / split / name), np.repeat(big[:, :, None], 3, axis=2))
                label = int(y[src] == 8)
                lines.append(f"{name} {label}" if split != "test" else name)
                if split == "test":
                    truth_lines.append(f"{name} {label}")
        (out / split / f"{split}_label.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    truth.write_text("\n".join(truth_lines) + "\n", encoding="utf-8")


def run(argv: list[str], cwd: Path = ROOT) -> float:
    """Run ``python argv`` (this interpreter) in ``cwd``, failing loudly; its wall seconds."""
    start = time.perf_counter()
    print("+ python " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, *argv], cwd=cwd, check=True)
    return time.perf_counter() - start


def read_labels(path: Path) -> dict[str, int]:
    """``name label`` lines -> {name: label}."""
    out = {}
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            name, label = line.split()
            out[name] = int(label)
    return out


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Binary F1 of 0/1 predictions (sklearn's definition)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred))


def score(work: Path, truth: Path) -> dict[str, float]:
    """The report's estimate, the submission's real test F1, and (new reports) the outer-loop table."""
    truth_labels = read_labels(truth)
    pred = read_labels(work / "submissions/demo/prediction.txt")
    names = list(truth_labels)
    y = np.array([truth_labels[n] for n in names])
    p = np.array([pred[n] for n in names])
    report = json.loads((work / "oof/demo/report.json").read_text(encoding="utf-8"))
    s = report["summary"]
    out = {
        "estimate": s.get("estimate", s.get("nested_cv_f1")),
        "test_f1": f1(y, p),
        "test_fake_ratio": float(y.mean()),
        "oof_positive_rate": s.get("oof_positive_rate"),
        "test_positive_rate": s.get("test_positive_rate", float(p.mean())),
    }
    outer = report.get("blend", {}).get("outer")
    if outer:
        out["chosen"] = outer["chosen"]
        out["outer_chosen"] = outer["mean"]
        out["outer_best_single"] = outer.get("single_mean")
        out["nested_fixed_best_single"] = outer["best_single"]["mean"]
        out["best_single"] = outer["best_single"]["name"]
    # Every single model on test at its own OOF threshold (what "the better backbone alone" would score).
    import pandas as pd

    probs = pd.read_csv(work / "submissions/demo/probs.csv", dtype={"name": str}).set_index("name").loc[names]
    for col in [c for c in probs.columns if c.startswith("prob_")]:
        thr = report["models"][col[5:]]["overall"]["best_threshold"]
        out[f"test_f1[{col[5:]} @ own OOF thr]"] = f1(y, (probs[col].to_numpy() >= thr).astype(int))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, default=0.5, help="fake ratio of the synthetic data")
    p.add_argument("--digits", action="store_true", help="load_digits 3 vs 8 instead of synthetic faces")
    p.add_argument("--root", type=Path, default=Path("/tmp/bench_est"), help="data and work folders go here")
    p.add_argument("--digits-noise", type=float, default=12.0, help="grey-level noise sd of the digits")
    p.add_argument("--n-trainval", type=int, default=2000, help="as make demo: 3/4 train, 1/4 validate")
    p.add_argument("--n-test", type=int, default=2000, help="test images (more: a less noisy real F1)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (a replicate)")
    p.add_argument("--tag", default="", help="suffix of the work folder, one per training variant")
    p.add_argument("--set", action="append", default=[], help="main.py --set override, repeatable")
    p.add_argument(
        "--stage",
        choices=("all", "train", "score"),
        default="all",
        help="train: no ensemble; score: no training",
    )
    p.add_argument("--ensemble-arg", action="append", default=[], help="passed to ensemble.py, repeatable")
    p.add_argument(
        "--train-repo", type=Path, default=ROOT, help="checkout whose folds, store and main.py train"
    )
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose ensemble.py runs (before/after)")
    args = p.parse_args()
    case = (
        (f"digits{'' if args.digits_noise == 12.0 else f'_n{args.digits_noise:g}'}")
        if args.digits
        else f"r{args.ratio:g}"
    )
    if (args.n_trainval, args.n_test) != (2000, 2000):  # other sizes: other data, never mixed up
        case += f"_n{args.n_trainval}_t{args.n_test}"
    if args.data_seed:
        case += f"_s{args.data_seed}"
    data, work, truth = (
        args.root / f"data_{case}",
        args.root / f"work_{case}{args.tag}",
        args.root / f"truth_{case}.txt",
    )
    paths = ["--data-dir", str(data), "--work-dir", str(work)]
    if args.stage in ("all", "train"):
        if not (data / "test" / "test_label.txt").is_file():
            if args.digits:
                write_digits(data, truth, noise=args.digits_noise)
            else:
                n_tr, n_va = args.n_trainval * 3 // 4, args.n_trainval // 4
                run(["-m", "foldkit.synthetic", "--out", str(data), "--n-train", str(n_tr), "--n-validate",
                     str(n_va), "--n-test", str(args.n_test), "--seed", str(args.data_seed),
                     "--fake-ratio", str(args.ratio), "--truth", str(truth)])  # fmt: skip
        run(["-m", "foldkit.folds", "--config", CONFIG, *paths], cwd=args.train_repo)
        run(["-m", "foldkit.store", *paths], cwd=args.train_repo)
        sets = [w for s in args.set for w in ("--set", s)]
        t = run(["main.py", "--config", CONFIG, *paths, "--fold", "all", *sets], cwd=args.train_repo)
        print(f"training: {t:.0f} s")
    if args.stage == "train":
        return 0
    run(
        [str(args.repo / "ensemble.py"), "--mode", "test", "--exp", "demo", *paths, *args.ensemble_arg],
        cwd=args.repo,
    )
    result = score(work, truth)
    print(f"\n== {case}{args.tag} ({args.repo}) ==")
    for k, v in result.items():
        print(f"{k:>40}: {v:.4f}" if isinstance(v, float) else f"{k:>40}: {v}")
    if result["estimate"] is not None:
        print(f"{'estimate - test F1':>40}: {result['estimate'] - result['test_f1']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
