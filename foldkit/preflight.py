"""Everything ``main.py`` checks before the slow work, so a run fails in seconds, in the right order.

Cheap checks first and all at once (config, ``--model``, ``--fold``, an explicit device, the data folder
and the label files: one error lists every problem), before torch is even imported; then the models
(missing pretrained weights named for every backbone within seconds), a loud warning with an epoch
estimate when ``device: auto`` falls back to the CPU. (The guard that refuses to rebuild folds that
trained OOF files depend on is ``foldkit.folds.guard_refold``, shared with ``python -m foldkit.folds``.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldkit.config import RunConfig
from foldkit.io import FoldkitError, listed

if TYPE_CHECKING:  # torch loads only when a check needs it: --help and argument errors stay instant
    import pandas as pd
    from torch import nn

log = logging.getLogger("foldkit.main")


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


def check_data(data_dir: Path, problems: list[str]) -> pd.DataFrame | None:
    """The train+validate index (handed on, so the label files are read once), or None with the
    label files' problems appended.

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
    return trainval


def preflight(
    load_config: Callable[[], RunConfig], model: str | None, fold: str, data_dir: Path
) -> tuple[RunConfig, list[str], list[int], pd.DataFrame]:
    """Check everything cheap before anything slow (importing torch, the hub, hashing images): config,
    ``--model``, ``--fold``, an explicit device, the data folder and label files. Every problem found
    goes into one error, so one run shows them all. Returns (config, backbones, folds, train+validate
    index)."""
    problems: list[str] = []
    cfg = _collect(problems, load_config)
    backbones = folds = None
    if cfg is not None:
        backbones = _collect(problems, select_backbones, cfg, model)
        folds = _collect(problems, parse_folds, fold, cfg.data.k)
        if cfg.device not in ("auto", "cpu"):  # only an explicit GPU request needs torch to check
            from foldkit.train import resolve_device

            _collect(problems, resolve_device, cfg.device)
    index = check_data(Path(data_dir), problems)
    if len(problems) == 1:
        raise FoldkitError(problems[0])
    if problems:
        raise FoldkitError("\n  ".join([f"{len(problems)} problems stop this run:", *listed(problems)]))
    return cfg, backbones, folds, index


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
