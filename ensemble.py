"""Blend the out-of-fold predictions, tune the F1 threshold, and write the submission.

    python ensemble.py --mode val                     # OOF report: oof/<exp>/report.md (+ .json, PNGs)
    python ensemble.py --mode test                    # + submissions/<exp>/prediction.txt, probs.csv
    python ensemble.py --mode test --exp demo --data-dir data/demo --tta d4 --prediction_file prediction.txt
    python ensemble.py --mode val --exp default,big --blend weighted --allow-partial

Each fold model is Platt-calibrated on its own OOF; the ensemble (default: chosen among every single
model, the blend methods and Caruana selection, the simpler one unless the other wins by more than
the fold-to-fold noise) and its weights are fitted on OOF and applied to the test predictions, and
the submission's threshold is fitted on OOF scores shaped like the fold-averaged test probabilities
(--threshold-fit foldmean). The closing line is the estimate with its standard error: the outer loop
(the whole choice made without each fold and scored on it), in test mode plus the fold-average gain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from foldkit.cli import HelpFormatter, add_on_bad_image_arg, add_path_args, run, setup_logging
from foldkit.config import TTA_NAMES
from foldkit.io import FoldkitError

#: foldkit.blend.METHODS, spelled out so that --help needs neither scipy nor torch (a test keeps the
#: two equal): every heavy module is imported after the arguments are read.
BLEND_METHODS = ("mean", "rank", "logit", "weighted")


def build_parser() -> argparse.ArgumentParser:
    """Every option of ensemble.py, with its default in --help, in groups a user scans by task."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--mode",
        choices=("val", "test"),
        default="val",
        help="val: OOF report only; test: report + submission",
    )
    add_path_args(p)
    p.add_argument("--exp", default="default", help="experiment(s) to blend, comma-separated")
    p.add_argument("--verbose", action="store_true", help="debug-level log lines on the console")
    _add_blend(p.add_argument_group("blend and model choice"))
    _add_threshold(p.add_argument_group("calibration and threshold"))
    _add_inference(p.add_argument_group("test predictions"))
    return p


def _add_blend(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--blend",
        choices=("auto", *BLEND_METHODS),
        default="auto",
        help="blend method; auto: every single model, these blends and Caruana selection are candidates, "
        "and the simplest one stays unless another wins (see --select-by)",
    )
    g.add_argument(
        "--blend-objective",
        "--blend_objective",
        dest="objective",
        choices=("logloss", "auc"),
        default="logloss",
        help="weighted blend: what the weights optimise (auc needs --blend-solver hill)",
    )
    g.add_argument(
        "--blend-solver",
        "--blend_solver",
        dest="solver",
        choices=("scipy", "hill"),
        default="scipy",
        help="weighted blend: scipy (SLSQP on log-loss) or hill (greedy hill climbing, Caruana)",
    )
    g.add_argument(
        "--noise-z",
        "--noise_z",
        dest="noise_z",
        type=float,
        default=None,
        help="blend auto: a more complex candidate replaces a simpler one only if its nested-CV gain "
        "exceeds this many standard errors across folds (default: foldkit.select.NOISE_Z, 1.0)",
    )
    g.add_argument(
        "--select-by",
        "--select_by",
        dest="select_by",
        choices=("f1", "logloss", "logloss+f1"),
        default=None,
        help="blend auto: the per-fold score of that comparison, F1 at the placed threshold, held-out "
        "log-loss (smoother; docs/benchmarks.md), or logloss+f1: that log-loss win and a strictly higher "
        "mean F1 (default: foldkit.select.SELECT_BY, logloss+f1)",
    )
    g.add_argument(
        "--allow-partial",
        "--allow_partial",
        dest="allow_partial",
        action="store_true",
        help="blend only models with every fold, naming those left out",
    )


def _add_threshold(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--calibration",
        choices=("platt", "none"),
        default="platt",
        help="calibrate each fold model on its own OOF before blending and fold-averaging (issue 10: "
        "the threshold then fits the averaged test probabilities; docs/benchmarks.md)",
    )
    g.add_argument(
        "--threshold-fit",
        "--threshold_fit",
        dest="threshold_fit",
        choices=("foldmean", "pooled", "rate"),
        default=None,
        help="foldmean: fitted on OOF scores shaped like the fold average the submission is (the least "
        "F1 lost on average over docs/benchmarks.md's eight runs, 0.003, at most 0.009); pooled: the "
        "best-F1 threshold of the calibrated OOF, as is; rate: "
        "the test threshold predicts the OOF's fake rate at it (better when the test's fake ratio is "
        "the training one, much worse when not) (default: foldkit.ensemble.THRESHOLD_FIT, foldmean)",
    )


def _add_inference(g: argparse._ArgumentGroup) -> None:
    add_on_bad_image_arg(
        g,
        "test images that cannot be decoded: error names them all and stops (also those a store "
        "recorded earlier with skip); skip predicts them 0 (real), the fallback, with a warning "
        "(default: each checkpoint's data.on_bad_image)",
    )
    g.add_argument(
        "--tta",
        default=None,
        help=f"TTA for test (and OOF, re-predicted if it differs): {', '.join(TTA_NAMES)} or a "
        "comma list; default: the TTA the OOF files were made with",
    )
    g.add_argument(
        "--prediction_file",
        "--prediction-file",
        dest="prediction_file",
        type=Path,
        default=None,
        help="test mode: also write a copy of prediction.txt here (default: no copy)",
    )
    g.add_argument("--device", default="auto", help="inference device for test predictions")
    g.add_argument("--batch", type=int, default=256, help="inference batch size")
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers for inference (default: one per CPU core)",
    )


def tta_names(text: str) -> list[str]:
    """``--tta hflip,vflip`` -> checked names, before torch is imported (the same check as
    foldkit.predict.parse_tta, which needs ttach)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TTA_NAMES]
    if unknown:
        raise FoldkitError(f"unknown TTA {unknown}; choose from {', '.join(TTA_NAMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Fit the ensemble on OOF (and write the report); in test mode also write the submission."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    tta = None if args.tta is None else tta_names(args.tta)
    from foldkit.ensemble import THRESHOLD_FIT, Options, fit, predict_test  # after the arguments: pandas

    exps = [e.strip() for e in args.exp.split(",") if e.strip()]
    twice = sorted({e for e in exps if exps.count(e) > 1})
    if twice:  # its models would be blended with themselves, into oof/a+a
        raise FoldkitError(f"--exp lists {', '.join(map(repr, twice))} more than once")
    opts = Options(
        args.data_dir,
        args.work_dir,
        exps,
        args.blend,
        args.objective,
        args.solver,
        tta,
        args.allow_partial,
        args.device,
        args.batch,
        args.workers,
        args.prediction_file,
        calibration=args.calibration,
        threshold_fit=args.threshold_fit or THRESHOLD_FIT,
        noise_z=args.noise_z,
        select_by=args.select_by,
        on_bad_image=args.on_bad_image,
    )
    fitted = fit(opts, check_test=args.mode == "test")
    if args.mode == "test":
        predict_test(opts, fitted)
    from foldkit.report import estimate_line

    print(estimate_line(fitted.report))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
