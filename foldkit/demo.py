"""``make demo``: the whole story on a CPU in minutes, each stage a real command, timed.

    python -m foldkit.demo --data-dir data/demo --work-dir demo --n-trainval 2000

Stages: synthetic data (``foldkit.synthetic``), folds and the decoded-image store (``foldkit.folds``,
``foldkit.store``), training every backbone on every fold (``main.py``), and the ensemble with its
OOF report and submission (``ensemble.py --mode test``). Each runs as the user would run it, in its
own process; the demo then prints how long each took and one line comparing the blend with the best
single model.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from foldkit import PROJECT_ROOT
from foldkit.cli import HelpFormatter, run
from foldkit.io import FoldkitError

CONFIG = "configs/demo.yaml"


def stages(data_dir: Path, work_dir: Path, n_trainval: int, seed: int) -> list[tuple[str, list[str]]]:
    """(name, argv) of every stage; argv is run with this Python from the project root."""
    paths = ["--data-dir", str(data_dir), "--work-dir", str(work_dir)]
    n_train, n_validate = n_trainval * 3 // 4, n_trainval // 4
    return [
        (
            "data",
            ["-m", "foldkit.synthetic", "--out", str(data_dir), "--n-train", str(n_train),
             "--n-validate", str(n_validate), "--n-test", str(n_validate), "--seed", str(seed)],
        ),
        ("folds", ["-m", "foldkit.folds", "--config", CONFIG, *paths]),
        ("store", ["-m", "foldkit.store", *paths]),
        ("training", ["main.py", "--config", CONFIG, *paths, "--fold", "all"]),
        ("ensemble", ["ensemble.py", "--mode", "test", "--exp", "demo", *paths]),
    ]  # fmt: skip


def run_stage(name: str, argv: list[str]) -> float:
    """Run one stage in its own process (output passes through); its wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=PROJECT_ROOT, check=False)
    if done.returncode != 0:
        raise FoldkitError(
            f"demo stage '{name}' failed (exit status {done.returncode}): python {' '.join(argv)}"
        )
    return time.perf_counter() - start


def summary(times: dict[str, float], work_dir: Path) -> str:
    """The closing lines: seconds per stage, the machine, the blend against the best single model."""
    from foldkit.report import blend_vs_best

    total = sum(times.values())
    parts = ", ".join(f"{name} {sec:.0f} s" for name, sec in times.items())
    report = json.loads((work_dir / "oof/demo/report.json").read_text(encoding="utf-8"))
    return "\n".join(
        [
            f"demo timings: {parts}; total {total / 60:.1f} min ({platform.machine()}, {_cores()} cores)",
            blend_vs_best(report),
            f"  OOF report:  {work_dir / 'oof/demo/report.md'}  (plots beside it)",
            f"  submission:  {work_dir / 'submissions/demo/prediction.txt'}  (+ probs.csv)",
            f"  checkpoints: {work_dir / 'models/demo'}/<backbone>/fold<k>/",
        ]
    )


def _cores() -> int:
    from foldkit.store import resolve_workers

    return resolve_workers(None)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m foldkit.demo", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data/demo"), help="where the synthetic data goes"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("demo"), help="where folds/ models/ oof/ go")
    parser.add_argument(
        "--n-trainval",
        type=int,
        default=2000,
        help="train + validate images (3/4 + 1/4); test: a quarter more",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args(argv)
    if args.n_trainval < 40:
        raise FoldkitError(f"--n-trainval {args.n_trainval}: at least 40 images are needed for 5 folds")
    data_dir, work_dir = args.data_dir.resolve(), args.work_dir.resolve()
    times = {
        name: run_stage(name, cmd) for name, cmd in stages(data_dir, work_dir, args.n_trainval, args.seed)
    }
    print()
    print(summary(times, work_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit status 2 when a stage fails."""
    return run(_main, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
