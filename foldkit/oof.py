"""Find and check the out-of-fold predictions that ``main.py`` left, as one aligned matrix.

A blend is only as honest as its inputs: every model must cover every merged train+validate image
exactly once, and every file must come from the same folds (the folds hash), or the threshold and
weights fitted here would not mean what they claim.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from foldkit.config import FOLD_KEYS, HARMLESS_KEYS, flatten
from foldkit.folds import load_folds
from foldkit.io import FoldkitError, read_json_artifact, script
from foldkit.predict import file_sha256

log = logging.getLogger(__name__)


@dataclass
class ModelOOF:
    """One model (experiment + backbone) and its per-fold OOF files."""

    exp: str
    backbone: str
    key: str  # name shown in reports: the backbone, or exp/backbone when several experiments
    oof_dir: Path
    files: dict[int, Path] = field(default_factory=dict)
    metas: dict[int, dict] = field(default_factory=dict)

    def checkpoint(self, work_dir: Path, fold: int) -> Path:
        return work_dir / "models" / self.exp / self.oof_dir.name / f"fold{fold}" / "best.pt"


@dataclass
class OOFSet:
    """Aligned OOF probabilities: row i of ``P`` is ``names[i]`` in folds.csv order."""

    names: np.ndarray
    y: np.ndarray
    folds: np.ndarray
    P: np.ndarray  # (n, m)
    models: list[ModelOOF]
    folds_hash: str
    k: int
    left_out: list[str]
    folds_df: pd.DataFrame


def discover(work_dir: Path, exps: list[str], several: bool) -> list[ModelOOF]:
    """Every ``oof/<exp>/<backbone>/`` folder holding ``fold<k>.csv`` files."""
    models = []
    for exp in exps:
        root = work_dir / "oof" / exp
        if not root.is_dir():
            raise FoldkitError(
                f"no OOF predictions for experiment '{exp}': {root} does not exist "
                f"(train first: python {shlex.quote(script('main.py'))} --config "
                f"{shlex.quote(f'configs/{exp}.yaml')})"
            )
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            files = {int(f.stem[4:]): f for f in sub.glob("fold*.csv") if f.stem[4:].isdigit()}
            if not files:
                continue
            metas = {k: _read_meta(f.with_suffix(".json"), exp, sub.name, k) for k, f in files.items()}
            backbone = next(iter(metas.values())).get("backbone", sub.name)
            key = f"{exp}/{backbone}" if several else backbone
            models.append(ModelOOF(exp, backbone, key, sub, dict(sorted(files.items())), metas))
        if not any(m.exp == exp for m in models):
            raise FoldkitError(f"experiment '{exp}': no fold<k>.csv files under {root}")
    return models


def _read_meta(path: Path, exp: str, backbone: str, fold: int) -> dict:
    """An OOF sidecar; a missing or unreadable one (truncated by a full disk or a copy) is an error
    naming the file and the way to make it again, never a JSONDecodeError traceback."""
    if not path.is_file():
        raise FoldkitError(f"{path}: missing (every OOF file has a sidecar recording its folds hash)")
    return read_json_artifact(
        path,
        f"train that fold again to rewrite it and its csv (main.py --config CONFIG --exp {exp} --model "
        f"{backbone} --fold {fold}, the timm name if this folder's '_' stands for a '/': a finished run "
        f"only predicts its OOF again), or delete it and {path.with_suffix('.csv').name} and pass "
        "--allow-partial to blend without this model",
    )


def check_hashes(models: list[ModelOOF], current: str) -> None:
    """All OOF files must share one folds hash, and it must be the current folds.csv's."""
    seen: dict[str, list[str]] = {}
    for m in models:
        for k, meta in m.metas.items():
            seen.setdefault(meta.get("folds_hash", "?"), []).append(f"{m.key} fold {k}")
    if len(seen) > 1:
        parts = [f"{h[:12]}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}" for h, v in seen.items()]
        raise FoldkitError(
            "OOF files come from different folds (folds hash) and cannot be blended:\n  " + "\n  ".join(parts)
        )
    (only,) = seen or {current: []}
    if only != current:
        raise FoldkitError(
            f"OOF files were made with folds {only[:12]}, but folds/folds.csv is now {current[:12]} (the "
            "data or the fold settings changed since; every experiment of this --work-dir shares its "
            "folds): retrain this experiment on the current folds, or, to keep it as it was, run it "
            "from a --work-dir of its own with the data it was trained on"
        )


def fold_config_differences(m: ModelOOF) -> list[str]:
    """``key: fold 0 a, fold 1 b`` for every config key on which this model's folds disagree.

    Why: a model's folds are averaged at test time and its OOF column is scored as one model; folds
    trained with other learning rates, epochs or image sizes make that column a mix of models whose
    blend weights and threshold belong to none of them. Harmless keys (``HARMLESS_KEYS``) are
    left out; a sidecar without a config (older foldkit) is not compared.
    """
    flat = _fold_configs(m)
    keys = sorted({key for cfg in flat.values() for key in cfg})
    out = []
    for key in keys:
        values = {k: cfg.get(key) for k, cfg in flat.items()}
        if len({repr(v) for v in values.values()}) > 1:
            out.append(f"{key}: " + ", ".join(f"fold {k} {v!r}" for k, v in values.items()))
    return out


def _fold_configs(m: ModelOOF) -> dict[int, dict[str, Any]]:
    """Fold -> its flattened config without the harmless keys (a sidecar without one: left out)."""
    return {
        k: {key: v for key, v in flatten(meta["config"]).items() if key not in _NOT_COMPARED}
        for k, meta in sorted(m.metas.items())
        if "config" in meta
    }


#: Keys on which a model's folds may differ: the harmless ones, and the fold settings (one folds hash
#: is checked for every fold, and the hash is what those settings decide).
_NOT_COMPARED = HARMLESS_KEYS | FOLD_KEYS


def odd_folds(m: ModelOOF) -> tuple[list[int], int | None]:
    """The folds of ``m`` trained with another config than most of its folds (ties: the lowest
    fold's config counts as the common one), and a fold trained with the common one."""
    signature = {k: repr(sorted(cfg.items())) for k, cfg in _fold_configs(m).items()}
    if len(set(signature.values())) < 2:
        return [], None
    common = max(signature.values(), key=list(signature.values()).count)  # first of the most frequent
    odd = [k for k, sig in signature.items() if sig != common]
    return odd, next(k for k, sig in signature.items() if sig == common)


def check_fold_configs(models: list[ModelOOF], retrain: Callable[..., str] | None = None) -> list[str]:
    """Warn, naming model, keys and folds, when one model's folds were trained with different configs.
    A warning, not a refusal: a deliberate change (e.g. more epochs on one fold) stays possible, but
    never silent. ``retrain(model, odd folds, a common fold)``: the command that retrains the odd
    folds like the others (ensemble.py knows the data and work folders). Returns the warned lines."""
    lines = [f"{m.key}: {d}" for m in models for d in fold_config_differences(m)]
    if lines:
        odd = [(m, *odd_folds(m)) for m in models] if retrain else []
        commands = [retrain(m, folds, like, force=True) for m, folds, like in odd if folds]
        how = "\n  ".join(commands) if commands else "python main.py --fold K, with the other folds' config"
        log.warning(
            "folds of one model were trained with different configs and are blended as one model:\n  %s\n"
            "retrain the odd folds like the others:\n  %s",
            "\n  ".join(lines),
            how,
        )
    return lines


#: Missing-value spellings still read as NaN in the numeric columns of an OOF csv (names never).
_NUMERIC_NA = {col: ["", "nan", "NaN", "NA", "null", "None"] for col in ("label", "fold", "prob")}


def _model_column(m: ModelOOF, folds_df: pd.DataFrame) -> np.ndarray:
    """This model's probabilities aligned to folds.csv; errors name file and problem."""
    parts = []
    for k, path in m.files.items():
        # names as written: pandas would read an image called NA, null or None as a missing value
        df = pd.read_csv(path, dtype={"name": str}, keep_default_na=False, na_values=_NUMERIC_NA)
        missing = {"name", "label", "fold", "prob"} - set(df.columns)
        if missing:
            raise FoldkitError(f"{path}: missing columns {sorted(missing)}")
        parts.append(df.assign(_file=str(path), _k=k))
    df = pd.concat(parts, ignore_index=True)
    blank = df[df[["label", "fold", "prob"]].isna().any(axis=1)]
    if len(blank):  # a row whose value is missing, before rows missing altogether are looked for
        row = int(blank.index[0] - df.index[df._file == blank._file.iloc[0]][0]) + 2  # + header, 1-based
        raise FoldkitError(
            f"{blank._file.iloc[0]}:{row}: {len(blank)} row(s) with a missing label, fold or prob value, "
            f"e.g. {blank.name.iloc[0]}; retrain the fold or restore the file"
        )
    dup = df[df.name.duplicated(keep=False)]
    if len(dup):
        raise FoldkitError(
            f"{m.key}: {dup.name.nunique()} images predicted more than once, e.g. "
            f"{dup.name.iloc[0]} in {sorted(set(dup._file))[:3]}"
        )
    expected = folds_df.set_index("name")
    extra = df[~df.name.isin(expected.index)]
    if len(extra):
        raise FoldkitError(
            f"{extra._file.iloc[0]}: {len(extra)} names not in folds.csv, e.g. {extra.name.iloc[0]}"
        )
    df = df.set_index("name").reindex(expected.index)
    lost = df.prob.isna()
    if lost.any():
        raise FoldkitError(f"{m.key}: {int(lost.sum())} images have no OOF prediction, e.g. {lost.idxmax()}")
    wrong = (df.fold.to_numpy() != expected.fold.to_numpy()) | (df._k.to_numpy() != expected.fold.to_numpy())
    if wrong.any():
        raise FoldkitError(
            f"{m.key}: {int(wrong.sum())} images sit in a fold other than folds.csv's, "
            f"e.g. {df.index[wrong][0]}"
        )
    p = df.prob.to_numpy(dtype=np.float64)
    if not ((p >= 0) & (p <= 1)).all():
        raise FoldkitError(f"{m.key}: probabilities outside [0, 1]")
    return p


def _absent_backbones(models: list[ModelOOF], exps: list[str], several: bool) -> list[str]:
    """Backbones an experiment's configs list but that have no OOF folder at all (never trained)."""
    absent = []
    for exp in exps:
        have = {m.backbone for m in models if m.exp == exp}
        listed = {
            b
            for m in models
            if m.exp == exp
            for meta in m.metas.values()
            for b in meta.get("config", {}).get("backbones", [])
        }
        absent += [f"{exp}/{b}" if several else b for b in sorted(listed - have)]
    return absent


def check_checkpoints(
    models: list[ModelOOF], work_dir: Path, retrain: Callable[..., str] | None = None
) -> None:
    """Each OOF file must come from the best.pt that test inference will use: a retrain that was
    interrupted, or a copied-in checkpoint, would otherwise fit on one model and predict with another.
    ``retrain(model, stale folds, a sound fold)`` names the command that retrains them like the others."""
    stale, folds = [], {}
    for m in models:
        for k, meta in m.metas.items():
            ckpt = m.checkpoint(work_dir, k)
            if not ckpt.is_file():
                stale.append(f"{m.key} fold {k} (no {ckpt})")
            elif meta.get("checkpoint_sha256") != file_sha256(ckpt):
                stale.append(f"{m.key} fold {k} ({ckpt} changed since its OOF file was written)")
            else:
                continue
            folds.setdefault(m.key, (m, []))[1].append(k)
    if not stale:
        return
    how = "python main.py --fold K"
    if retrain is not None:
        sound = {key: [k for k in m.metas if k not in bad] for key, (m, bad) in folds.items()}
        how = " and ".join(retrain(m, bad, (sound[m.key] or bad)[0]) for m, bad in folds.values())
    raise FoldkitError(
        f"OOF files do not match their checkpoints: {'; '.join(stale)}\n(retrain those folds with {how})"
    )


def load_oof(
    work_dir: Path,
    exps: list[str],
    allow_partial: bool = False,
    retrain: Callable[..., str] | None = None,
) -> OOFSet:
    """Load, check and align every complete model of ``exps``; name what is missing (exit 2), or with
    ``allow_partial`` leave incomplete models out and say which."""
    folds_df, meta = load_folds(work_dir)
    k, current = int(meta["k"]), meta["hash"]
    several = len(exps) > 1
    models = discover(work_dir, exps, several)
    if allow_partial:  # models still on older folds are left out, as incomplete ones are
        old = [m.key for m in models if any(v.get("folds_hash") != current for v in m.metas.values())]
        if old:
            log.warning("left out (made on other folds than folds.csv's): %s", ", ".join(old))
        if old and len(old) == len(models):
            check_hashes(models, current)  # every model is on other folds: say which, and the way out
        models = [m for m in models if m.key not in old]
    else:
        check_hashes(models, current)  # first: after a refold, folds "missing" under the new k mislead
    gaps = {m.key: [f for f in range(k) if f not in m.files] for m in models}
    absent = _absent_backbones(models, exps, several)
    missing = [f"{key} fold {f}" for key, fs in gaps.items() for f in fs] + [f"{b} (no fold)" for b in absent]
    complete = [m for m in models if not gaps[m.key]]
    left_out = [m.key for m in models if gaps[m.key]] + absent
    if missing and not allow_partial:
        partial = ", or pass --allow-partial" if complete else ""  # it needs one model with every fold
        how = f"train them with python main.py --fold K{partial}"
        raise FoldkitError(f"missing OOF predictions: {', '.join(missing)}\n({how})")
    if left_out:
        log.warning("left out (incomplete): %s", ", ".join(missing))
    if not complete:
        raise FoldkitError("no model has OOF predictions for every fold: " + ", ".join(missing))
    check_checkpoints(complete, work_dir, retrain)
    check_fold_configs(complete, retrain)
    P = np.column_stack([_model_column(m, folds_df) for m in complete])
    y, folds = folds_df.label.to_numpy().astype(int), folds_df.fold.to_numpy()
    return OOFSet(folds_df.name.to_numpy(), y, folds, P, complete, current, k, left_out, folds_df)
