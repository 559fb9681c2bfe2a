"""Train every backbone of a config on K folds, leaving checkpoints and out-of-fold predictions.

    python main.py --fold 0                      # every backbone of configs/default.yaml on fold 0
    python main.py --config configs/demo.yaml --fold all --epochs 3
    python main.py --fold 0,2 --model convnext_tiny.fb_in22k_ft_in1k --set train.lr=1e-4
    python main.py                               # the seed's command: defaults on ./data, all folds
    python main.py --batch=4 --mode="test" --model_name 1.pth   # the seed's test command
    python main.py --fold all --save-every 500   # after a crash: the same command continues the run
    python main.py --fold all --devices cuda:0,cuda:1   # one (fold, backbone) job per device at a time
    torchrun --nproc_per_node=4 main.py --fold 0 # one fold on 4 GPUs (DistributedDataParallel)

Artifacts (under --work-dir): folds/, models/<exp>/<backbone>/fold<k>/, oof/<exp>/<backbone>/fold<k>.csv.
Test mode writes --prediction_file (default prediction.txt) as `name label` lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from foldkit import PROJECT_ROOT
from foldkit.cli import HelpFormatter, add_on_bad_image_arg, add_path_args, add_set_arg, run, setup_logging
from foldkit.config import (
    SHORTCUTS,
    RunConfig,
    canonical_tta,
    from_dict,
    get_key,
    load_config,
    parse_override,
)
from foldkit.io import FoldkitError, listed, script
from foldkit.preflight import check_models, preflight
from foldkit.scheduler import follow_parent

log = logging.getLogger("foldkit.main")
_DEFAULTS = RunConfig(pretrained=False)
_NONE_MEANS = {"data.workers": "one per CPU core"}  # what a shortcut's null code default does


def _code_default(key: str) -> object:
    """A config key's code default as --help shows it (a null says what it means)."""
    value = get_key(_DEFAULTS, key)
    return _NONE_MEANS.get(key, "null") if value is None else value


def build_parser() -> argparse.ArgumentParser:
    """Every option of main.py, with its default in --help, in groups a user scans by task."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--config", default="configs/default.yaml", help="YAML config (relative: cwd, then project)"
    )
    add_path_args(p)
    p.add_argument("--exp", default=None, help="experiment name (default: the config file's stem)")
    p.add_argument("--verbose", action="store_true", help="debug-level log lines on the console")
    _add_selection(p.add_argument_group("what to train"))
    _add_settings(p.add_argument_group("settings (on top of the config)"))
    _add_run_control(p.add_argument_group("reruns, resume and parallel jobs"))
    _add_test_mode(p.add_argument_group("test mode (the seed's command)"))
    return p


def _add_selection(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--fold", default="all", help="folds to train: 0 | 0,2 | 0..4 | all")
    g.add_argument(
        "--backbones",
        default=None,
        help="comma-separated timm names, replacing the config's list (default: the config's list)",
    )
    g.add_argument(
        "--model", default=None, help="train only this backbone of the list (default: every backbone)"
    )


def _add_settings(g: argparse._ArgumentGroup) -> None:
    add_set_arg(
        g, "override a config key (dotted, YAML-typed), repeatable: --set train.ema=false (default: none)"
    )
    for name, key in SHORTCUTS.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])  # --img-size first
        g.add_argument(
            *flags,
            dest=name,
            default=None,
            help=f"shortcut for {key} (code default: {_code_default(key)}; the config's value when "
            "not given)",
        )


def _add_run_control(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--refold", action="store_true", help="rebuild folds/folds.csv even if it matches")
    resume = g.add_mutually_exclusive_group()
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
    g.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="N",
        help="also save last.pt every N training batches, for a mid-epoch resume of long epochs "
        "(default: at the end of each epoch only)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="train folds from scratch even when their OOF files are finished and current "
        "(default: skip them)",
    )
    g.add_argument(
        "--devices",
        default=None,
        metavar="DEV,DEV",
        help="train the (fold, backbone) jobs in parallel, one per listed device at a time, each "
        "its own main.py process and log: cuda:0,cuda:1 | cuda:0,cuda:0 | cpu,cpu (default: none, one "
        "job after another in this process)",
    )


def _add_test_mode(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--mode",
        choices=("train", "test"),
        default="train",
        help="train folds, or (seed-compatible) predict the test set with --model_name",
    )
    g.add_argument(
        "--model_name",
        "--model-name",
        dest="model_name",
        default=None,
        help="test mode: a checkpoint written by foldkit (best.pt, last.pt or a copy like 1.pth); "
        "no default, --mode test requires it",
    )
    g.add_argument(
        "--prediction_file",
        "--prediction-file",
        dest="prediction_file",
        default="prediction.txt",
        help="test mode: where to write `name label` lines",
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="test mode: decision threshold (default: the checkpoint's validated best-F1 threshold)",
    )
    g.add_argument(
        "--tta", default=None, help="test mode: TTA (none, hflip, d4, ...; default: the checkpoint's)"
    )
    add_on_bad_image_arg(
        g,
        "test mode: test images that cannot be decoded: error names them all before predicting and "
        "stops; skip predicts them 0 (real) with a warning (default: the checkpoint's data.on_bad_image)",
    )


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


def train(args: argparse.Namespace) -> int:
    """Train mode: every (fold, backbone) pair asked for, after checking data, weights, device and folds."""
    if args.save_every is not None and args.save_every < 1:
        raise FoldkitError(f"--save-every {args.save_every}: expected a number of batches >= 1")
    test_only = [
        f"--{n}" for n in ("model_name", "threshold", "tta", "on_bad_image") if getattr(args, n) is not None
    ]
    test_only += ["--prediction_file"] if args.prediction_file != "prediction.txt" else []
    if test_only:
        hint = "; for training images: --set data.on_bad_image=skip" if args.on_bad_image else ""
        log.warning(
            "train mode ignores the test-mode option(s) %s (add --mode test%s)", ", ".join(test_only), hint
        )
    devices = _check_devices_option(args)
    cfg, backbones, folds, index = preflight(  # before torch is imported: answers in a second
        lambda: config_from_args(args), args.model, args.fold, Path(args.data_dir)
    )
    from foldkit import distributed
    from foldkit.folds import check_group_regex, fold_settings, guard_refold
    from foldkit.train import fit_fold, fold_states

    exp = args.exp or Path(args.config).stem
    rank = distributed.env_rank()
    checks = [lambda: check_group_regex(index.name, cfg.data, args.work_dir, args.refold)]  # names only
    if rank == 0:  # under torchrun the other ranks wait in distributed.init until these exist
        checks.append(lambda: check_models(cfg, backbones, len(index), len(folds)))
    all_checked(checks)  # before the store decodes a single image
    finished: dict[tuple[str, int], list[str]] = {}  # (backbone, fold) -> settings changed since
    if rank == 0:
        guard_refold(args.work_dir, fold_settings(cfg.data), args.refold)
        images, folds_df, meta = shared_artifacts(args, cfg, index, args.refold)
        if not args.force:
            size = distributed.env_world_size()
            finished, unfinished = fold_states(
                cfg, backbones, folds, meta["hash"], args.work_dir, exp, size, args.resume
            )
            refuse_changed_runs(finished, unfinished, args.work_dir, exp)
    if devices:
        current = {job for job, changed in finished.items() if not changed}
        return schedule(args, cfg, backbones, folds, devices, exp, current)
    if distributed.launched():
        distributed.init(cfg.device, cfg.train.dist_timeout_s)
        if rank > 0:  # rank 0 built them: reuse, never rebuild
            images, folds_df, meta = shared_artifacts(args, cfg, index, False)
    results = []
    try:
        for fold in folds:
            for backbone in backbones:
                result = fit_fold(
                    cfg, backbone, fold, folds_df, meta["hash"], args.data_dir, args.work_dir, exp,
                    resume=args.resume, force=args.force, save_every=args.save_every, images=images,
                )  # fmt: skip
                results.append(result)
    finally:
        distributed.shutdown()
    for r in results:
        log.info(
            "done: %s fold %d best epoch %d %s %.4f -> %s%s",
            r["backbone"],
            r["fold"],
            r["best_epoch"],
            "val_loss" if cfg.train.metric in ("loss", "last") else cfg.train.metric,
            -r["score"] if cfg.train.metric in ("loss", "last") else r["score"],  # higher-is-better scores
            r["oof"],
            " (finished before: skipped)" if r.get("skipped") else "",
        )
    return 0


def refuse_changed_runs(
    finished: dict[tuple[str, int], list[str]],
    unfinished: dict[tuple[str, int], list[str]],
    work_dir: Path,
    exp: str,
) -> None:
    """Stop before any training when folds of this run, finished or unfinished (a ``last.pt`` to
    resume), have other settings: all of them named at once, nothing trained with the new settings
    meanwhile. ``--force`` replaces them all; ``--no-resume`` starts the unfinished ones over."""
    sections, ways = [], []
    for what, runs in (("finished", finished), ("unfinished (a last.pt to resume)", unfinished)):
        conflicts = [f"{b} fold {k} ({'; '.join(changed)})" for (b, k), changed in runs.items() if changed]
        if conflicts:
            sections.append(f"{what} with other settings:\n  " + "\n  ".join(listed(conflicts)))
    if not sections:
        return
    if any(finished.values()):
        ways.append("Pass --force to train them again (their best.pt and OOF files are replaced)")
    if any(unfinished.values()):
        ways.append(f"{'or ' if ways else 'Pass '}--no-resume to start the unfinished ones over")
    raise FoldkitError(
        "\n".join(sections) + "\n" + ", ".join(ways) + ", train the new settings under another --exp or "
        "--work-dir to keep both, or run with their saved settings (--config "
        f"{work_dir / 'models' / exp}/<backbone>/fold<k>/config.yaml). Nothing was trained."
    )


def shared_artifacts(
    args: argparse.Namespace, cfg: RunConfig, index: object, refold: bool
) -> tuple[object, object, dict]:
    """The image store (built or reused; bad images stop here) and the folds (built, rebuilt with
    ``refold``, or loaded): what every fold and backbone of the run reads."""
    from foldkit.folds import ensure_folds, fold_settings
    from foldkit.train import open_trainval_images

    images = open_trainval_images(cfg, args.data_dir, args.work_dir, index)
    folds_df, meta = ensure_folds(
        args.data_dir,
        args.work_dir,
        **fold_settings(cfg.data),
        force=refold,
        exclude=images.bad,
        index=index,
    )  # every fold setting of the config's data section, allow_unmatched included
    return images, folds_df, meta


def _check_devices_option(args: argparse.Namespace) -> list[str] | None:
    """The ``--devices`` list, or None; refuses the combinations that cannot mean anything."""
    if not args.devices:
        return None
    from foldkit.scheduler import parse_devices

    devices = parse_devices(args.devices)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FoldkitError("--devices starts its own processes: run it with python, not under torchrun")
    if args.device:
        raise FoldkitError("--devices gives each job its device; leave out --device")
    return devices


def schedule(
    args: argparse.Namespace,
    cfg: RunConfig,
    backbones: list[str],
    folds: list[int],
    devices: list[str],
    exp: str,
    finished: set[tuple[str, int]],
) -> int:
    """``--devices``: every (fold, backbone) job as its own main.py process, one per device entry at a
    time (``foldkit.scheduler``); the folds and the store exist already, so the jobs only read them.
    ``finished`` (backbone, fold) jobs, finished and current, are skipped here, as a plain run skips
    them."""
    from foldkit.scheduler import Job, args_to_argv, check_devices, run_jobs, summarize

    check_devices(devices)
    skip = {"devices", "fold", "model", "refold", "device"}  # each job gets its own
    base = args_to_argv(build_parser(), args, skip)
    if cfg.data.workers is None:  # "one per core" is for one job: the jobs at once share the cores
        base += ["--workers", str(jobs_workers(len(devices)))]
    log_dir = args.work_dir / "logs" / exp
    jobs = [
        Job(k, b, [*base, "--fold", str(k), "--model", b], log_dir / f"{b.replace('/', '_')}-fold{k}.log")
        for k in folds
        for b in backbones
    ]
    done = [j for j in jobs if (j.backbone, j.fold) in finished]
    for job in done:
        log.info("%s: finished (its OOF matches best.pt): skipped; --force trains it again", job.name)
    jobs = [j for j in jobs if j not in done]
    log.info("%d job(s) on %d device slot(s): %s", len(jobs), len(devices), ", ".join(devices))
    summarize(run_jobs(jobs, devices, Path(__file__).resolve(), cfg.device))
    return 0


def all_checked(checks: list[Callable[[], None]]) -> None:
    """Run every set-up check and raise one error naming each problem found: a new user on md5
    names and an offline machine learns both fixes from one run, not one per run."""
    errors: list[FoldkitError] = []
    for check in checks:
        try:
            check()
        except FoldkitError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        parts = [f"problem {i} of {len(errors)}: {exc}" for i, exc in enumerate(errors, 1)]
        raise FoldkitError(f"{len(errors)} problems stop the run before any work.\n\n" + "\n\n".join(parts))


def jobs_workers(slots: int) -> int:
    """DataLoader workers per job when ``slots`` jobs run at once: the cores split between them (two
    efficientnet_b0 jobs on one H200 with 8 workers each ran 2.4x the images/s of one job alone)."""
    return max(1, (os.cpu_count() or 1) // slots)


def resolve_checkpoint(name: str, work_dir: Path, data_dir: Path = Path("data")) -> Path:
    """The path as given; else a clear error listing the checkpoints foldkit wrote under models/."""
    path = Path(name)
    if path.is_file():
        return path
    found = sorted((work_dir / "models").rglob("best.pt"))  # last.pt: unfinished or last-epoch weights
    folders = ["--data-dir", str(data_dir), "--work-dir", str(work_dir)]
    train = shlex.join(["python", script("main.py"), *folders])
    listing = "\n  ".join(listed([str(f) for f in found])) or f"(none: train first with {train})"
    raise FoldkitError(
        f"--model_name {name}: file not found. Best checkpoints under {work_dir / 'models'}:\n  {listing}"
    )


def warn_threshold_tta(name: str, ckpt: dict, tta: list[str]) -> bool:
    """Warn (and return True) when test mode's TTA is not the one the checkpoint's threshold was tuned
    on: TTA shifts the probabilities, so the threshold no longer sits where F1 peaked. A checkpoint
    without ``threshold_tta`` (e.g. last.pt) has the per-epoch validation threshold, made without TTA.
    """
    tuned, used = canonical_tta(ckpt.get("threshold_tta", [])), canonical_tta(tta)
    if used == tuned:
        return False
    log.warning(
        "%s: predicting with TTA %s, but its threshold %.4f was tuned on TTA %s; the F1-optimal "
        "threshold differs between them (use --tta %s, or pass --threshold)",
        name, used, float(ckpt.get("threshold", 0.5)), tuned, ",".join(tuned),
    )  # fmt: skip
    return True


def test(args: argparse.Namespace) -> int:
    """The seed's test mode: one checkpoint predicts the test set; `name label` lines in file order."""
    import numpy as np

    from foldkit.data import read_test
    from foldkit.predict import load_checkpoint, parse_tta, predict_checkpoint
    from foldkit.store import BAD_IMAGE_LABEL, open_images
    from foldkit.submission import label_file_names, write_submission
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
    ckpt = load_checkpoint(resolve_checkpoint(args.model_name, args.work_dir, args.data_dir))
    cfg = from_dict(ckpt["config"], f"{args.model_name}: ")
    test_df = read_test(args.data_dir)
    device = resolve_device(args.device or "auto")
    tta = parse_tta(args.tta) if args.tta else cfg.tta
    if args.threshold is None:
        warn_threshold_tta(args.model_name, ckpt, tta)
    batch = int(args.batch) if args.batch else cfg.train.batch_size
    workers = int(args.workers) if args.workers is not None else cfg.data.workers  # None: every core
    # every test image decoded once before the model loads: a bad one is named with its label-file
    # line now, not when its batch comes up. No store: the seed's command writes nothing but its
    # prediction file (--work-dir defaults to the project folder, which may be read-only); that
    # costs one more decode of the test set
    size = tuple(ckpt["store_size"]) if ckpt.get("store_size") else None
    on_bad = args.on_bad_image or cfg.data.on_bad_image
    images = open_images(args.data_dir, args.work_dir, test_df, "test", False, size, workers, on_bad)
    source = images.source(test_df.path.tolist())
    probs = predict_checkpoint(
        ckpt, None, None, tta, batch, workers, device, amp_dtype(cfg, device), desc="test", source=source
    )
    threshold = args.threshold if args.threshold is not None else float(ckpt.get("threshold", 0.5))
    # float64: a float32 comparison would round the threshold, which sits mid-gap between two OOF
    # probabilities (foldkit.blend.best_threshold), possibly onto the lower one
    labels = (np.asarray(probs, dtype=np.float64) >= threshold).astype(int)
    bad = test_df.path.isin(images.bad).to_numpy()
    if bad.any():
        labels[bad] = BAD_IMAGE_LABEL
        shown = ", ".join(listed(test_df.name[bad].tolist(), 5))
        log.warning("%d unreadable test image(s) predicted %d (real): %s", bad.sum(), BAD_IMAGE_LABEL, shown)
    expected = label_file_names(args.data_dir)  # the label file itself, not the list predicted for
    out = write_submission(args.prediction_file, test_df.name.tolist(), labels, expected)
    print(
        f"wrote {out} ({len(labels)} rows, {labels.mean():.1%} fake at threshold {threshold:.4f}, tta {tta})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run train or (seed-compatible) test mode."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    follow_parent()  # a --devices job ends with its scheduler, even one killed with SIGKILL
    # torchrun's variables read here rather than through foldkit.distributed, which imports torch:
    # --help and the preflight errors answer before torch is loaded
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and rank > 0:  # torchrun: rank 0 logs for the run; the others only their errors
        logging.getLogger("foldkit").setLevel(logging.ERROR)
    try:
        return test(args) if args.mode == "test" else train(args)
    except KeyboardInterrupt:
        if args.mode != "test" and rank == 0:
            log.warning(
                "stopped; the same command resumes: finished folds are skipped, the interrupted one "
                "continues from its last.pt"
            )
        raise
    except FoldkitError as exc:
        if world == 1:
            raise
        named = FoldkitError(f"rank {rank} of {world}: {exc}")  # torchrun then stops the other ranks
        named.exit_code = exc.exit_code
        raise named from exc


if __name__ == "__main__":
    sys.exit(run(main))
