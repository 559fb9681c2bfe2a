"""The run configuration: one dataclass tree, loaded from YAML, overridden from the command line.

Precedence is code defaults < YAML file < ``--set key=value`` / CLI shortcuts. Unknown keys are
rejected with the closest valid key, values are type-checked, and the resolved config is saved as
plain data beside every artifact and inside every checkpoint (``to_dict`` / ``from_dict``).

The shape follows litgpt's grouped dataclasses: each field has a comment saying what it is for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from foldkit.io import FoldkitError, atomic_write_text


class ConfigError(FoldkitError):
    """A bad config key or value; names the key and, for typos, the closest valid key.

    ``problems``: each problem on its own (without the file), so a caller can merge the problems of
    one file into one error instead of showing only the first and making the user rerun per typo.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def _combined(where: str, problems: list[str]) -> ConfigError:
    """One error for every problem of one source (a YAML file, the command line)."""
    if len(problems) == 1:
        return ConfigError(f"{where}{problems[0]}", problems)
    lines = "\n  ".join(problems)
    return ConfigError(f"{where}{len(problems)} config problems:\n  {lines}", problems)


#: Largest ``data.hamming`` the config and the fold builder accept (one rule for both). pHashes of
#: unrelated images differ in ~32 of 64 bits, so a wider radius no longer means "similar"; the pair
#: search splits the hash into ``hamming + 1`` chunks, which also stops working well near 32.
MAX_HAMMING = 31


@dataclass
class DataConfig:
    img_size: int = 112  # side of the square network input; images are resized to it
    k: int = 5  # number of folds
    fold_seed: int = 42  # seed of the fold split (kept apart from the training seed on purpose)
    group_regex: str | None = r"S\d+"  # identity key in the file name; null: every image its own group
    allow_unmatched: bool = False  # accept a group_regex that matches under 90% of the names (the
    # names it misses become groups of their own); off, that is an error: such names carry no subject
    near_dup: bool = False  # also group duplicates: identical pixels always; pHash near-duplicates only
    # after a pixel check, never across two regex groups (docs/DESIGN-notes.md, near-duplicate policy)
    hamming: int = 6  # pHash candidates: at most this many of 64 bits differ (0..MAX_HAMMING)
    near_dup_min_corr: float = 0.99  # pixel check: min correlation of the 16x16 grey thumbnails
    near_dup_max_group: int = 16  # a near-dup link never makes a group without a regex key larger
    workers: int | None = None  # DataLoader worker processes; null: one per CPU core; 0: main process
    prefetch_factor: int = 4  # batches each worker prepares ahead (workers > 0 only)
    cache: bool = True  # decode every image once into a uint8 memmap store (foldkit.store) and train
    # from it; false: decode the image files in every epoch (the slow path, kept for comparison)
    store_size: int | None = None  # side the store keeps images at; null: their native size (112 for
    # the seed data). Workers augment at this size, the device resizes to img_size
    on_bad_image: str = "error"  # error: stop naming every unreadable image; skip: leave them out of
    # training (reported) and give test images the fallback label


@dataclass
class AugmentConfig:
    """The artefact-robust set deepfake winners used (DFDC 1st place): geometry, colour, and
    compression/blur/downscale so the model cannot lean on one camera's or codec's artefacts."""

    hflip: float = 0.5
    affine: float = 0.5  # probability of a small shift/scale/rotate
    rotate: float = 10.0  # degrees, for the affine
    scale: float = 0.1  # +- relative scale, for the affine
    color: float = 0.5  # brightness/contrast/hue/saturation jitter
    to_gray: float = 0.05
    blur: float = 0.1  # Gaussian blur
    downscale: float = 0.1  # downscale-then-upscale (resampling artefacts)
    jpeg: float = 0.3  # JPEG recompression
    jpeg_quality: list[int] = field(default_factory=lambda: [60, 100])
    noise: float = 0.1  # Gaussian sensor noise
    dropout: float = 0.3  # coarse dropout (cut-out), DFDC's strongest regulariser
    dropout_holes: int = 4


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-4  # peak AdamW learning rate after warmup
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to min_lr
    min_lr: float = 1e-6
    grad_clip: float | None = 1.0  # max grad norm; null: no clipping
    accum_steps: int = 1  # gradient accumulation steps per optimiser step
    amp: str = "auto"  # auto (bf16 on GPUs with bf16 tensor cores, else fp16), bf16, fp16, none; CPU: none
    channels_last: bool = True  # NHWC tensors: faster convolutions on GPUs and, measured, on CPUs too
    compile: bool = False  # torch.compile the model
    # torch.compile's mode when compile is on: reduce-overhead records CUDA graphs, one launch for the
    # step's many kernels, for small models whose step is bound by the host launching them
    compile_mode: str = "default"
    ema: bool = True  # keep an EMA of the weights; validate and save the EMA weights
    ema_decay: float = 0.999
    label_smoothing: float = 0.0  # targets become y*(1-s) + s/2
    pos_weight: float | str | None = None  # BCE pos_weight; null: 1.0; 'balanced': n_real/n_fake
    drop_rate: float | None = None  # head dropout, passed to timm when set
    drop_path_rate: float | None = None  # stochastic depth, passed to timm when set
    metric: str = "loss"  # model selection and early stopping: loss (validation log-loss; measured
    # best, docs/benchmarks.md), auc, f1 (best-threshold F1: the noisiest, and it flatters the OOF),
    # last (no selection: the full schedule's final weights, the final EMA with ema: true)
    patience: int | None = None  # epochs without improvement before stopping; null: never
    max_train_batches: int | None = None  # cap batches per epoch (smoke tests only)
    # Under torchrun (DDP) batch_size is per process: the global batch is batch_size x processes x
    # accum_steps, and lr is not rescaled for it (scale it yourself, README "Several GPUs").
    sync_bn: bool = False  # DDP: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)
    dist_timeout_s: float = 1800.0  # DDP: seconds a collective (and the start, while rank 0 builds the
    # folds and image store) may wait for the other ranks before failing instead of hanging


@dataclass
class RunConfig:
    backbones: list[str] = field(default_factory=lambda: ["tf_efficientnet_b0.ns_jft_in1k"])
    pretrained: bool = True  # load timm's pretrained weights (hub or local cache); never silently skipped
    pretrained_file: str | dict[str, str] | None = None  # local weights: a path, {backbone: path}, or
    # a path with a {backbone} placeholder; used instead of the hub
    tta: list[str] = field(default_factory=lambda: ["hflip"])  # none, hflip, vflip, d4, or a list
    seed: int = 42  # training seed (python, numpy, torch, loader workers, albumentations)
    device: str = "auto"  # auto (cuda if available), cuda, cuda:1, cpu
    deterministic: bool = True  # torch deterministic algorithms (CPU runs are then bit-reproducible)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        validate(self)


#: CLI shortcuts -> dotted config keys.
SHORTCUTS = {
    "epochs": "train.epochs",
    "batch": "train.batch_size",
    "lr": "train.lr",
    "img_size": "data.img_size",
    "device": "device",
    "workers": "data.workers",
    "seed": "seed",
}

_CHOICES = {
    "train.amp": ("auto", "bf16", "fp16", "none"),
    "train.metric": ("f1", "auc", "loss", "last"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "data.on_bad_image": ("error", "skip"),
}
TTA_NAMES = ("none", "hflip", "vflip", "d4", "rot90")


def canonical_tta(names: Sequence[str]) -> list[str]:
    """One spelling per set of TTA transforms, so that lists meaning the same predictions compare
    equal (``vflip,hflip`` and ``hflip,vflip``; nothing and ``none``; ``hflip,rot90`` and ``d4``,
    which ttach builds alike): the ensemble re-predicts its OOF only for a TTA that differs."""
    unknown = [n for n in names if n not in TTA_NAMES]
    if unknown:
        raise FoldkitError(f"unknown TTA {unknown}; choose from {', '.join(TTA_NAMES)}")
    chosen = set(names) - {"none"}
    if "d4" in chosen or chosen == {"hflip", "rot90"}:
        return ["d4"]  # tta_transforms: d4 alone, whatever else is listed
    return [n for n in ("hflip", "vflip", "rot90") if n in chosen] or ["none"]


def validate(cfg: RunConfig) -> None:
    """Check value ranges and choices that types alone cannot express; every problem in one error."""
    problems = config_problems(cfg)
    if problems:
        raise _combined("", problems)


def config_problems(cfg: RunConfig) -> list[str]:
    """Every range and choice problem of ``cfg``, each naming its key (``validate`` raises them)."""
    problems = []
    if not cfg.backbones:
        problems.append("backbones: at least one timm model name is needed")
    for key, choices in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
    if cfg.train.metric == "last" and cfg.train.patience is not None:
        problems.append(
            "train.patience: metric 'last' keeps the final epoch, so there is nothing to stop early on "
            "(add --set train.patience=null)"
        )
    if isinstance(cfg.train.pos_weight, str) and cfg.train.pos_weight != "balanced":
        problems.append(f"train.pos_weight: {cfg.train.pos_weight!r} is not a number or 'balanced'")
    for name in cfg.tta:
        if name not in TTA_NAMES:
            problems.append(f"tta: {name!r} is not one of {', '.join(TTA_NAMES)}")
    for key, ok in _range_checks(cfg).items():
        if not ok:
            problems.append(f"{key}: {get_key(cfg, key)!r} is out of range")
    return problems


def _range_checks(cfg: RunConfig) -> dict[str, bool]:
    """Key -> whether its value is in range."""
    tc, aug = cfg.train, cfg.augment
    checks = {
        "data.k": cfg.data.k >= 2,
        "data.img_size": cfg.data.img_size >= 16,
        "data.workers": cfg.data.workers is None or cfg.data.workers >= 0,
        "data.prefetch_factor": cfg.data.prefetch_factor >= 1,
        "data.store_size": cfg.data.store_size is None or 16 <= cfg.data.store_size <= 4096,
        "data.hamming": 0 <= cfg.data.hamming <= MAX_HAMMING,
        "data.near_dup_min_corr": 0 < cfg.data.near_dup_min_corr <= 1,
        "data.near_dup_max_group": cfg.data.near_dup_max_group >= 1,
        "seed": cfg.seed >= 0,
        "data.fold_seed": 0 <= cfg.data.fold_seed < 2**32,  # numpy's and sklearn's seed range
        "device": re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) is not None,
        "train.epochs": tc.epochs >= 1,
        "train.batch_size": tc.batch_size >= 1,  # 1 trains where BatchNorm sees >1 pixel (train.py)
        "train.accum_steps": tc.accum_steps >= 1,
        "train.lr": math.isfinite(tc.lr) and tc.lr > 0,
        "train.min_lr": math.isfinite(tc.min_lr) and 0 <= tc.min_lr <= tc.lr,
        "train.weight_decay": tc.weight_decay >= 0,
        # within the schedule; with epochs itself out of range that one error is the one to read
        "train.warmup_epochs": 0 <= tc.warmup_epochs <= max(tc.epochs, 1),
        "train.grad_clip": tc.grad_clip is None or tc.grad_clip > 0,
        "train.ema_decay": 0 < tc.ema_decay < 1,
        "train.label_smoothing": 0 <= tc.label_smoothing < 1,
        "train.patience": tc.patience is None or tc.patience >= 1,
        "train.max_train_batches": tc.max_train_batches is None or tc.max_train_batches >= 1,
        "train.dist_timeout_s": math.isfinite(tc.dist_timeout_s) and tc.dist_timeout_s > 0,
        "augment.jpeg_quality": len(aug.jpeg_quality) == 2
        and 1 <= aug.jpeg_quality[0] <= aug.jpeg_quality[1] <= 100,
        "augment.dropout_holes": aug.dropout_holes >= 1,
        "augment.scale": 0 <= aug.scale < 1,
        "augment.rotate": math.isfinite(aug.rotate) and 0 <= aug.rotate <= 180,  # degrees, either way
    }
    for name in ("hflip", "affine", "color", "to_gray", "blur", "downscale", "jpeg", "noise", "dropout"):
        checks[f"augment.{name}"] = 0 <= getattr(aug, name) <= 1  # probabilities
    return checks


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


#: Names other tools (and habit) use for a config key, by the last part of the dotted key: difflib
#: alone matches spelling, so ``train.learning_rate`` came out as ``train.drop_rate``.
_SYNONYMS = {
    **dict.fromkeys(("learning_rate", "learnrate", "lr", "base_lr", "max_lr", "peak_lr"), "train.lr"),
    **dict.fromkeys(("bs", "batch", "batchsize", "train_batch_size"), "train.batch_size"),
    **dict.fromkeys(("epoch", "n_epochs", "num_epochs", "max_epochs"), "train.epochs"),
    **dict.fromkeys(("size", "image_size", "imgsize", "input_size", "resolution"), "data.img_size"),
    **dict.fromkeys(("num_workers", "n_workers", "worker"), "data.workers"),
    **dict.fromkeys(("folds", "n_folds", "num_folds", "n_splits", "kfold", "k_folds"), "data.k"),
    **dict.fromkeys(("wd", "decay"), "train.weight_decay"),
    **dict.fromkeys(("warmup", "warmup_epoch"), "train.warmup_epochs"),
    **dict.fromkeys(
        ("accumulate", "grad_accum", "accumulation_steps", "gradient_accumulation_steps"), "train.accum_steps"
    ),
    **dict.fromkeys(("clip_grad", "max_grad_norm", "gradient_clip"), "train.grad_clip"),
    **dict.fromkeys(("early_stopping", "early_stop"), "train.patience"),
    **dict.fromkeys(("mixed_precision", "precision", "fp16"), "train.amp"),
    **dict.fromkeys(("smoothing",), "train.label_smoothing"),
    **dict.fromkeys(("model", "models", "model_name", "backbone", "arch"), "backbones"),
    **dict.fromkeys(("gpu", "gpus", "cuda"), "device"),
    **dict.fromkeys(("random_seed", "manual_seed"), "seed"),
}


def suggest_key(key: str, valid: list[str]) -> str | None:
    """The valid key ``key`` most likely meant: a known synonym of its last part, the same name in
    another section (``train.img_size``), else the closest spelling."""
    leaf = key.rsplit(".", 1)[-1].lower().replace("-", "_")
    if key == "data.seed":  # the folds' seed lives in data; the top-level seed is the training one
        return "data.fold_seed"
    if _SYNONYMS.get(leaf) in valid:
        return _SYNONYMS[leaf]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown_text(key: str, valid: list[str]) -> str:
    close = suggest_key(key, valid)
    hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown config key '{key}'{hint}"


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    return ConfigError(f"{where}{_unknown_text(key, valid)}")


_SCALARS: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int->float allowed); raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit type {_type_name(tp)}")
    if tp is type(None) and value is None:
        return None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:  # --set backbones=a,b
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [_coerce(v, item_tp, key) for v in value]
    elif origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if isinstance(value, dict):
            return {_coerce(k, k_tp, key): _coerce(v, v_tp, key) for k, v in value.items()}
    elif tp in (int, float) and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-3` is a string; a numeric field still means the number.
        with contextlib.suppress(ValueError):
            return tp(value)
    elif tp in _SCALARS and isinstance(value, _SCALARS[tp]) and (tp is bool or not isinstance(value, bool)):
        return float(value) if tp is float else value  # (a YAML true is a bool, never a number)
    raise ConfigError(f"{key}: {value!r} does not fit type {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from ``data``; each unknown key or bad value is appended to
    ``problems`` (and left at its default) instead of raised, so one error can name them all."""
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            problems.append(_unknown_text(full, _all_keys()))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:  # a section whose keys are all commented out: YAML reads it as null
                value = {}
            if not isinstance(value, dict):
                problems.append(f"{full}: expected a mapping of its keys, got {value!r}")
                continue
            kwargs[key] = tp(**_build(tp, value, f"{full}.", problems))
            continue
        try:
            kwargs[key] = _coerce(value, tp, full)
        except ConfigError as exc:
            problems.append(str(exc))
    return kwargs


def from_dict(data: dict[str, Any], where: str = "") -> RunConfig:
    """Build a validated RunConfig from nested plain data (YAML or a checkpoint's ``config``).

    Every unknown key, badly typed value and out-of-range value is reported in one error (prefixed by
    ``where``): fixing a config one typo per run wastes the user's time. A refused value is left at
    its default, so the range checks still run on everything else.
    """
    problems: list[str] = []
    kwargs = _build(RunConfig, dict(data or {}), "", problems)
    try:
        cfg = RunConfig(**kwargs)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise _combined(where, problems)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested data (only str/int/float/bool/None/list/dict), safe for YAML and weights_only."""
    return dataclasses.asdict(cfg)


#: Config keys that never change which model a fold is: they decide how fast batches are made (the
#: store or the files: the same pixels, byte-identical OOF on the CPU), where the run ran, how long
#: ranks wait for each other, or which other backbones the run trained. A
#: resumed run may change them (``foldkit.resume``), and a model's folds may differ in them without
#: being called a mix (``foldkit.oof``). ``device`` is here because ``main.py --devices`` gives each
#: job its own (``--device cpu``, ``cuda:1``): a later plain run (``device: auto``) must neither retrain
#: those folds nor refuse to resume them. ``train.epochs`` is deliberately not here: the cosine
#: schedule's length is derived from it, so a resumed run with other epochs would follow neither
#: schedule.
HARMLESS_KEYS = frozenset(
    {"data.workers", "data.prefetch_factor", "data.cache", "backbones", "train.dist_timeout_s", "device"}
)


#: The settings that make the folds. Their effect is the folds hash every OOF file records, so a
#: finished fold is judged by the hash, not by these values: ``--refold`` with new settings retrains
#: it (other folds), and settings that give the very same folds leave it finished.
FOLD_KEYS = frozenset(
    f"data.{k}"
    for k in ("k", "fold_seed", "group_regex", "allow_unmatched", "near_dup", "hamming",
              "near_dup_min_corr", "near_dup_max_group")
)  # fmt: skip


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (``to_dict``) as ``{"train.lr": 0.001, ...}``: how configs are compared
    and how their differences are named."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested ``data``, creating sections; the type check happens in ``from_dict``."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def get_key(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` where the value is YAML (``3``, ``1e-3``, ``true``, ``[a, b]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in _all_keys():
        raise _unknown(key, _all_keys(), "--set: ")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse {raw!r}: {exc}") from exc
    return key, _coerce(value, _key_type(key), key)  # checked now, so a later override cannot mask it


def _key_type(dotted: str) -> Any:
    cls: Any = RunConfig
    for part in dotted.split("."):
        cls = _field_types(cls)[part]
    return cls


def load_config(path: str | Path | None, overrides: list[tuple[str, Any]] = ()) -> RunConfig:
    """Code defaults < YAML at ``path`` < ``overrides`` (dotted key, value) pairs."""
    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        where = f"{path}: "
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    cfg = from_dict(data, where)  # validates the file's own keys before any override hides them
    merged = to_dict(cfg)
    for key, value in overrides:
        set_key(merged, key, value)
    return from_dict(merged, "command line: " if overrides else where)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    return atomic_write_text(path, dump_yaml(cfg))
