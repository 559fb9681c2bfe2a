"""Train every backbone of a config on K folds, leaving checkpoints and out-of-fold predictions.

    python main.py --fold 0                      # every backbone of configs/default.yaml on fold 0
    python main.py --config configs/demo.yaml --fold all --epochs 3
    python main.py --fold 0,2 --model convnext_tiny.fb_in22k_ft_in1k --set train.lr=1e-4
    python main.py                               # the seed's command: defaults on ./data, all folds
    python main.py --batch=4 --mode="test" --model_name 1.pth   # the seed's test command
    python main.py --fold all --save-every 500   # after a crash: the same command continues the run

Artifacts (under --work-dir): folds/, models/<exp>/<backbone>/fold<k>/, oof/<exp>/<backbone>/fold<k>.csv.
Test mode writes --prediction_file (default prediction.txt) as `name label` lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldkit import PROJECT_ROOT
from foldkit.cli import HelpFormatter, add_path_args, run, setup_logging
from foldkit.config import SHORTCUTS, RunConfig, from_dict, get_key, load_config, parse_override
from foldkit.io import FoldkitError

if TYPE_CHECKING:  # torch and timm load only after the arguments are read: --help answers at once
    from torch import nn

log = logging.getLogger("foldkit.main")
_DEFAULTS = RunConfig(pretrained=False)
_MAX_LISTED = 20
_NONE_MEANS = {"data.workers": "one per CPU core"}  # what a shortcut's null code default does


def _code_default(key: str) -> object:
    """A config key's code default as --help shows it (a null says what it means)."""
    value = get_key(_DEFAULTS, key)
    return _NONE_MEANS.get(key, "null") if value is None else value


def build_parser() -> argparse.ArgumentParser:
    """Every option of main.py, with its default in --help."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--config", default="configs/default.yaml", help="YAML config (relative: cwd, then project)"
    )
    add_path_args(p)
    p.add_argument("--exp", default=None, help="experiment name (default: the config file's stem)")
    p.add_argument("--fold", default="all", help="folds to train: 0 | 0,2 | 0..4 | all")
    p.add_argument(
        "--backbones",
        default=None,
        help="comma-separated timm names, replacing the config's list (default: the config's list)",
    )
    p.add_argument(
        "--model", default=None, help="train only this backbone of the list (default: every backbone)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, YAML-typed), repeatable: --set train.ema=false (default: none)",
    )
    for name, key in SHORTCUTS.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])  # --img-size first
        p.add_argument(
            *flags,
            dest=name,
            default=None,
            help=f"shortcut for {key} (code default: {_code_default(key)}; the config's value when "
            "not given)",
        )
    p.add_argument("--refold", action="store_true", help="rebuild folds/folds.csv even if it matches")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=True,
        help="continue an unfinished fold from its last.pt (settings must match; default: on)",
    )
    resume.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="train unfinished folds from scratch, replacing their checkpoints (default: resume)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="N",
        help="also save last.pt every N training batches, for a mid-epoch resume of long epochs "
        "(default: at the end of each epoch only)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="train folds from scratch even when their OOF files are finished and current "
        "(default: skip them)",
    )
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
        help="test mode: a checkpoint written by foldkit (best.pt, last.pt or a copy like 1.pth); "
        "no default, --mode test requires it",
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
    p.add_argument("--verbose", action="store_true", help="debug-level log lines on the console")
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
    from foldkit.folds import fold_settings, settings_changes  # the rule ensure_folds rebuilds by

    old = json.loads(meta_path.read_text(encoding="utf-8"))
    changed = settings_changes(old, fold_settings(cfg.data))
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


def select_backbones(cfg: RunConfig, model: str | None) -> list[str]:
    """The config's backbones, or only ``--model`` (which must be one of them)."""
    if model and model not in cfg.backbones:
        raise FoldkitError(f"--model {model!r} is not in the config's backbones: {', '.join(cfg.backbones)}")
    return [model] if model else list(cfg.backbones)


def _collect(problems: list[str], check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``, or None with its problem(s) appended to ``problems``."""
    from foldkit.data import DataError

    try:
        return check(*args)
    except DataError as exc:
        problems.extend(exc.problems)
    except FoldkitError as exc:
        problems.append(str(exc))
    return None


def check_data(data_dir: Path, problems: list[str]) -> int | None:
    """Number of train+validate images, or None with the label files' problems appended.

    The test split is not needed to train, so its problems (and test names that also appear in
    train/validate) are warnings now rather than a surprise in ``ensemble.py --mode test`` hours later.
    """
    from foldkit.data import DataError, label_file, read_test, read_trainval, warn_test_overlap

    if not data_dir.is_dir():
        problems.append(
            f"data folder not found: {data_dir.resolve()} (pass --data-dir DIR, the folder holding "
            "train/ validate/ test/ and their label files)"
        )
        return None
    trainval = _collect(problems, read_trainval, data_dir)
    if (data_dir / "test").is_dir() or label_file(data_dir, "test").is_file():
        try:
            test = read_test(data_dir)
        except DataError as exc:
            log.warning("the test split cannot be read; ensemble.py --mode test will stop on this:\n%s", exc)
        else:
            if trainval is not None:
                warn_test_overlap(trainval, test)
    return None if trainval is None else len(trainval)


def preflight(args: argparse.Namespace) -> tuple[RunConfig, list[str], list[int], int]:
    """Check everything cheap before anything slow (importing torch, the hub, hashing images): config,
    ``--model``, ``--fold``, an explicit device, the data folder and label files. Every problem found
    goes into one error, so one run shows them all. Returns (config, backbones, folds, image count)."""
    problems: list[str] = []
    cfg = _collect(problems, config_from_args, args)
    backbones = folds = None
    if cfg is not None:
        backbones = _collect(problems, select_backbones, cfg, args.model)
        folds = _collect(problems, parse_folds, args.fold, cfg.data.k)
        if cfg.device not in ("auto", "cpu"):  # only an explicit GPU request needs torch to check
            from foldkit.train import resolve_device

            _collect(problems, resolve_device, cfg.device)
    n_images = check_data(Path(args.data_dir), problems)
    if len(problems) == 1:
        raise FoldkitError(problems[0])
    if problems:
        more = [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
        raise FoldkitError(
            "\n  ".join([f"{len(problems)} problems stop this run:", *problems[:_MAX_LISTED], *more])
        )
    return cfg, backbones, folds, n_images


def time_batch(model: nn.Module, img_size: int, n: int) -> float:
    """Seconds for one forward+backward pass of ``n`` random images, after a 2-image warm-up."""
    import torch

    model.train()
    model(torch.randn(2, 3, img_size, img_size)).sum().backward()  # first-call allocations
    x = torch.randn(n, 3, img_size, img_size)
    start = time.perf_counter()
    model(x).sum().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def warn_cpu_fallback(cfg: RunConfig, models: dict[str, nn.Module], n_images: int, n_folds: int) -> None:
    """``device: auto`` found no GPU: say so loudly, with an epoch time measured on one small batch,
    before a GPU recipe quietly runs for days on the CPU."""
    n = min(cfg.train.batch_size, 8)
    k = cfg.data.k
    train_n, val_n = n_images * (k - 1) // k, n_images // k
    per_epoch = {
        b: time_batch(m, cfg.data.img_size, n) / n * (train_n + val_n / 3) for b, m in models.items()
    }  # validation is forward only: about a third of a training step
    epoch = sum(per_epoch.values())
    log.warning(
        "device 'auto' found no CUDA GPU: training on the CPU. Measured on one batch of %d images at "
        "%d px: about %s per epoch of %d images (%s), %s for %d epoch(s) x %d fold(s). Pass --device "
        "cuda to insist on a GPU (it stops when there is none), or --device cpu to train on the CPU "
        "without this warning.",
        n,
        cfg.data.img_size,
        _duration(epoch),
        n_images,
        ", ".join(f"{b} {_duration(s)}" for b, s in per_epoch.items()),
        _duration(epoch * cfg.train.epochs * n_folds),
        cfg.train.epochs,
        n_folds,
    )


def check_models(cfg: RunConfig, backbones: list[str], n_images: int, n_folds: int) -> None:
    """Build every backbone once, so missing weights stop the run before any work (naming every
    backbone whose weights are missing, not just the first); warn on an automatic CPU fallback."""
    from foldkit.models import PretrainedUnavailable, create_model
    from foldkit.train import resolve_device

    device = resolve_device(cfg.device)
    cpu_fallback = cfg.device == "auto" and device.type == "cpu"
    models, missing = {}, {}
    for backbone in backbones:
        try:
            model = create_model(cfg, backbone)
        except PretrainedUnavailable as exc:
            missing.update(exc.failures)
            continue
        if cpu_fallback:
            models[backbone] = model
    if missing:
        raise PretrainedUnavailable(missing)
    if cpu_fallback:
        warn_cpu_fallback(cfg, models, n_images, n_folds)


def train(args: argparse.Namespace) -> int:
    """Train mode: every (fold, backbone) pair asked for, after checking data, weights, device and folds."""
    if args.save_every is not None and args.save_every < 1:
        raise FoldkitError(f"--save-every {args.save_every}: expected a number of batches >= 1")
    cfg, backbones, folds, n_images = preflight(args)  # before torch is imported: answers in a second
    from foldkit.folds import ensure_folds, fold_settings
    from foldkit.train import fit_fold, open_trainval_images

    exp = args.exp or Path(args.config).stem
    check_models(cfg, backbones, n_images, len(folds))
    guard_refold(args.work_dir, cfg, args.refold)
    images = open_trainval_images(cfg, args.data_dir, args.work_dir)  # bad images stop here, named
    folds_df, meta = ensure_folds(
        args.data_dir, args.work_dir, **fold_settings(cfg.data), force=args.refold, exclude=images.bad
    )  # every fold setting of the config's data section, allow_unmatched included
    results = []
    for fold in folds:
        for backbone in backbones:
            result = fit_fold(
                cfg, backbone, fold, folds_df, meta["hash"], args.data_dir, args.work_dir, exp,
                resume=args.resume, force=args.force, save_every=args.save_every, images=images,
            )  # fmt: skip
            results.append(result)
    for r in results:
        log.info(
            "done: %s fold %d best epoch %d %s %.4f -> %s%s",
            r["backbone"],
            r["fold"],
            r["best_epoch"],
            cfg.train.metric,
            r["score"],
            r["oof"],
            " (finished before: skipped)" if r.get("skipped") else "",
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
    workers = int(args.workers) if args.workers is not None else cfg.data.workers  # None: every core
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
