"""Train every backbone of a config on K folds, leaving checkpoints and out-of-fold predictions.

    python main.py --fold 0                      # every backbone of configs/default.yaml on fold 0
    python main.py --config configs/demo.yaml --fold all --epochs 3
    python main.py --fold 0,2 --model convnext_tiny.fb_in22k_ft_in1k --set train.lr=1e-4
    python main.py                               # the seed's command: defaults on ./data, all folds
    python main.py --batch=4 --mode="test" --model_name 1.pth   # the seed's test command

Artifacts (under --work-dir): folds/, models/<exp>/<backbone>/fold<k>/, oof/<exp>/<backbone>/fold<k>.csv.
Test mode writes --prediction_file (default prediction.txt) as `name label` lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from foldkit import PROJECT_ROOT
from foldkit.cli import add_path_args, run, setup_logging
from foldkit.config import SHORTCUTS, RunConfig, from_dict, get_key, load_config, parse_override
from foldkit.io import FoldkitError

log = logging.getLogger("foldkit.main")
_DEFAULTS = RunConfig(pretrained=False)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the shortcuts' None (their help text states the real default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Every option of main.py, with its default in --help."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    p.add_argument(
        "--config", default="configs/default.yaml", help="YAML config (relative: cwd, then project)"
    )
    add_path_args(p)
    p.add_argument("--exp", default=None, help="experiment name (default: the config file's stem)")
    p.add_argument("--fold", default="all", help="folds to train: 0 | 0,2 | 0..4 | all")
    p.add_argument(
        "--backbones", default=None, help="comma-separated timm names, replacing the config's list"
    )
    p.add_argument("--model", default=None, help="train only this backbone of the list")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, YAML-typed), repeatable: --set train.ema=false",
    )
    for name, key in SHORTCUTS.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])  # --img-size first
        p.add_argument(
            *flags,
            dest=name,
            default=None,
            help=f"shortcut for {key} (code default: "
            f"{get_key(_DEFAULTS, key)}; the config's value when not given)",
        )
    p.add_argument("--refold", action="store_true", help="rebuild folds/folds.csv even if it matches")
    p.add_argument(
        "--mode",
        choices=("train", "test"),
        default="train",
        help="train folds, or (seed-compatible) predict the test set with --model_name",
    )
    p.add_argument(
        "--model_name",
        "--model-name",
        dest="model_name",
        default=None,
        help="test mode: a checkpoint written by foldkit (best.pt, last.pt or a copy like 1.pth)",
    )
    p.add_argument(
        "--prediction_file",
        "--prediction-file",
        dest="prediction_file",
        default="prediction.txt",
        help="test mode: where to write `name label` lines",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="test mode: decision threshold (default: the checkpoint's validated best-F1 threshold)",
    )
    p.add_argument(
        "--tta", default=None, help="test mode: TTA (none, hflip, d4, ...; default: the checkpoint's)"
    )
    p.add_argument("--verbose", action="store_true")
    return p


def resolve_config_path(text: str) -> Path:
    """A relative config path is looked up in the current folder, then in the project."""
    path = Path(text)
    if path.is_file() or path.is_absolute():
        return path
    return PROJECT_ROOT / path if (PROJECT_ROOT / path).is_file() else path


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < YAML < --set < shortcuts / --backbones."""
    overrides = [parse_override(text) for text in args.overrides]
    for name, key in SHORTCUTS.items():
        value = getattr(args, name)
        if value is not None:
            overrides.append(parse_override(f"{key}={value}"))
    if args.backbones:
        overrides.append(("backbones", [b.strip() for b in args.backbones.split(",") if b.strip()]))
    return load_config(resolve_config_path(args.config), overrides)


def parse_folds(text: str, k: int) -> list[int]:
    """``0``, ``0,2``, ``1..3`` (inclusive) or ``all`` -> sorted unique fold numbers in 0..k-1."""
    if text.strip() == "all":
        return list(range(k))
    folds: set[int] = set()
    try:
        for part in (t.strip() for t in text.split(",") if t.strip()):
            lo, _, hi = part.partition("..")
            folds.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise FoldkitError(f"--fold {text!r}: expected 0, 0,2, 0..4 or all") from None
    if not folds or not all(0 <= f < k for f in folds):
        raise FoldkitError(f"--fold {text!r}: folds must be in 0..{k - 1}")
    return sorted(folds)


def guard_refold(work_dir: Path, cfg: RunConfig, refold: bool) -> None:
    """Refuse to silently rebuild folds with other settings while trained OOF files depend on them
    (they would all become unusable); ``--refold`` or another ``--work-dir`` says it is meant."""
    meta_path = work_dir / "folds" / "folds.json"
    if refold or not meta_path.is_file():
        return
    old = json.loads(meta_path.read_text(encoding="utf-8"))
    d = cfg.data
    wanted = {
        "k": d.k,
        "seed": d.fold_seed,
        "group_regex": d.group_regex,
        "near_dup": d.near_dup,
        "hamming": d.hamming,
    }
    changed = [
        f"{key} {old.get(key)!r} -> {v!r}"
        for key, v in wanted.items()
        if old.get(key) != v and (key != "hamming" or d.near_dup)
    ]
    if not changed:
        return
    users = sorted(
        {
            p.parent.parent.name
            for p in (work_dir / "oof").glob("*/*/fold*.json")
            if json.loads(p.read_text(encoding="utf-8")).get("folds_hash") == old.get("hash")
        }
    )
    if users:
        raise FoldkitError(
            f"{meta_path} was made with other fold settings ({'; '.join(changed)}) and experiment(s) "
            f"{', '.join(users)} were trained on it; rebuilding would make their OOF files unusable. "
            "Pass --refold to rebuild anyway, or use another --work-dir."
        )


def train(args: argparse.Namespace) -> int:
    """Train mode: every (fold, backbone) pair asked for, after checking weights, device and folds."""
    from foldkit.folds import ensure_folds
    from foldkit.models import create_model
    from foldkit.train import fit_fold, resolve_device

    cfg = config_from_args(args)
    exp = args.exp or Path(args.config).stem
    backbones = cfg.backbones
    if args.model:
        if args.model not in backbones:
            raise FoldkitError(
                f"--model {args.model!r} is not in the config's backbones: {', '.join(backbones)}"
            )
        backbones = [args.model]
    folds = parse_folds(args.fold, cfg.data.k)
    resolve_device(cfg.device)
    for backbone in backbones:  # fail before any work when a model or its weights cannot be had
        create_model(cfg, backbone)
    guard_refold(args.work_dir, cfg, args.refold)
    folds_df, meta = ensure_folds(
        args.data_dir,
        args.work_dir,
        k=cfg.data.k,
        seed=cfg.data.fold_seed,
        group_regex=cfg.data.group_regex,
        near_dup=cfg.data.near_dup,
        hamming=cfg.data.hamming,
        force=args.refold,
    )
    results = []
    for fold in folds:
        for backbone in backbones:
            results.append(
                fit_fold(cfg, backbone, fold, folds_df, meta["hash"], args.data_dir, args.work_dir, exp)
            )
    for r in results:
        log.info(
            "done: %s fold %d best epoch %d %s %.4f -> %s",
            r["backbone"],
            r["fold"],
            r["best_epoch"],
            cfg.train.metric,
            r["score"],
            r["oof"],
        )
    return 0


def resolve_checkpoint(name: str, work_dir: Path) -> Path:
    """The path as given; else a clear error listing the checkpoints foldkit wrote under models/."""
    path = Path(name)
    if path.is_file():
        return path
    found = sorted((work_dir / "models").rglob("*.pt"))[:10]
    listing = "\n  ".join(str(f) for f in found) or "(none: train first with python main.py)"
    raise FoldkitError(
        f"--model_name {name}: file not found. Checkpoints under {work_dir / 'models'}:\n  {listing}"
    )


def test(args: argparse.Namespace) -> int:
    """The seed's test mode: one checkpoint predicts the test set; `name label` lines in file order."""
    from foldkit.data import read_test
    from foldkit.predict import load_checkpoint, parse_tta, predict_checkpoint
    from foldkit.submission import write_submission
    from foldkit.train import amp_dtype, resolve_device

    if not args.model_name:
        raise FoldkitError("--mode test needs --model_name CHECKPOINT")
    ignored = [
        f"--{n}"
        for n in ("overrides", "backbones", "model", "epochs", "lr", "img_size", "seed")
        if getattr(args, n)
    ] + (["--config"] if args.config != "configs/default.yaml" else [])
    if ignored:
        log.warning("test mode uses the checkpoint's own config; ignoring %s", ", ".join(ignored))
    ckpt = load_checkpoint(resolve_checkpoint(args.model_name, args.work_dir))
    cfg = from_dict(ckpt["config"], f"{args.model_name}: ")
    test_df = read_test(args.data_dir)
    device = resolve_device(args.device or "auto")
    tta = parse_tta(args.tta) if args.tta else cfg.tta
    batch = int(args.batch) if args.batch else cfg.train.batch_size
    workers = int(args.workers) if args.workers is not None else min(cfg.data.workers, 4)
    probs = predict_checkpoint(
        ckpt,
        args.data_dir,
        test_df.path.tolist(),
        tta,
        batch,
        workers,
        device,
        amp_dtype(cfg, device),
        desc="test",
    )
    threshold = args.threshold if args.threshold is not None else float(ckpt.get("threshold", 0.5))
    labels = (probs >= threshold).astype(int)
    out = write_submission(args.prediction_file, test_df.name.tolist(), labels, test_df.name.tolist())
    print(
        f"wrote {out} ({len(labels)} rows, {labels.mean():.1%} fake at threshold {threshold:.4f}, tta {tta})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run train or (seed-compatible) test mode."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return test(args) if args.mode == "test" else train(args)


if __name__ == "__main__":
    sys.exit(run(main))
