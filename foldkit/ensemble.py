"""The ensemble step: fit a blend and an F1 threshold on OOF, report, and apply both to the test set.

What is fitted on OOF is exactly what is applied to test: the same models (complete ones), the same
TTA (OOF is re-predicted and cached when ``--tta`` differs from the TTA the OOF files were made with),
the same blend object (rank blends map test probabilities through the OOF reference), the same
threshold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from foldkit.blend import METHODS, Blend, best_threshold, choose_blend, fit_blend, nested_threshold_f1
from foldkit.config import from_dict
from foldkit.data import read_test
from foldkit.io import FoldkitError, atomic_write_text
from foldkit.oof import ModelOOF, OOFSet, load_oof
from foldkit.predict import file_sha256, load_checkpoint, predict_checkpoint
from foldkit.report import summary_table, write_report
from foldkit.submission import write_submission
from foldkit.train import amp_dtype, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Options:
    """What ``ensemble.py`` was asked for."""

    data_dir: Path
    work_dir: Path
    exps: list[str]
    blend: str = "auto"  # auto: the method with the best nested-CV F1
    objective: str = "logloss"  # weighted blend: what the weights optimise (logloss or auc)
    solver: str = "scipy"  # weighted blend: scipy (log-loss) or hill (greedy hill climbing)
    tta: list[str] | None = None  # None: the TTA the OOF files were made with
    allow_partial: bool = False
    device: str = "auto"
    batch: int = 256
    workers: int = 0
    prediction_file: Path | None = None

    @property
    def name(self) -> str:
        return "+".join(self.exps)


@dataclass
class Fitted:
    """The OOF-fitted ensemble: everything test inference applies."""

    oof: OOFSet
    blend: Blend
    threshold: float
    tta: list[str]
    report: dict[str, Any]


def _oof_tta(models: Sequence[ModelOOF]) -> list[str]:
    ttas = {tuple(meta.get("tta", [])) for m in models for meta in m.metas.values()}
    if len(ttas) > 1:
        raise FoldkitError(
            f"OOF files were made with different TTA settings {sorted(ttas)}; pass --tta to "
            "re-predict them all alike"
        )
    return list(next(iter(ttas)))


def _tag(tta: Sequence[str]) -> str:
    return "-".join(tta) or "none"


def _images_key(data_dir: Path, df: pd.DataFrame) -> str:
    """Hash of the images' resolved paths, sizes and modification times: a test folder whose files
    were replaced under the same names (a new public/private split) must not reuse old predictions."""
    h = hashlib.sha256(str(Path(data_dir).resolve()).encode("utf-8"))
    for name, rel in zip(df.name, df.path, strict=True):
        st = os.stat(Path(data_dir) / rel)
        h.update(f"\n{name}\t{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read_key(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or corrupt sidecar: a cache miss, not an error
        return None


def cached_probs(
    opts: Options, m: ModelOOF, fold: int, df: pd.DataFrame, images_key: str, tta: list[str], cache: Path
) -> np.ndarray:
    """Probabilities of ``df``'s images from ``m``'s fold checkpoint, cached in ``cache`` (csv + json)
    and reused while the checkpoint, the TTA, the precision and the images (``images_key``, from
    ``_images_key``, computed once per image list by the caller) are unchanged.

    Predicts exactly as ``main.py`` made the OOF: same function, same AMP dtype for the device. The
    dtype comes from the OOF sidecar's config (the checkpoint's own, verified by ``load_oof``), so a
    cache hit never loads the checkpoint.
    """
    ckpt_path = m.checkpoint(opts.work_dir, fold)
    if not ckpt_path.is_file():
        raise FoldkitError(f"{m.key} fold {fold}: checkpoint {ckpt_path} is missing")
    device = resolve_device(opts.device)
    dtype = amp_dtype(from_dict(m.metas[fold]["config"]), device)
    key = {
        "checkpoint_sha256": file_sha256(ckpt_path),
        "tta": list(tta),
        "precision": f"{device.type}:{dtype}",
        "images_sha256": images_key,
        "n": len(df),
    }
    if cache.is_file() and _read_key(cache.with_suffix(".json")) == key:
        cached = pd.read_csv(cache, dtype={"name": str})
        if cached.name.tolist() == df.name.tolist():
            log.info("%s fold %d: reusing %s", m.key, fold, cache)
            return cached.prob.to_numpy(dtype=np.float64)
    probs = predict_checkpoint(
        load_checkpoint(ckpt_path),
        opts.data_dir,
        df.path.tolist(),
        tta,
        opts.batch,
        opts.workers,
        device,
        dtype,
        desc=f"{m.key} fold {fold}",
    )
    table = pd.DataFrame({"name": df.name.to_numpy(), "prob": probs})
    atomic_write_text(cache, table.to_csv(index=False, float_format="%.8f"))
    atomic_write_text(cache.with_suffix(".json"), json.dumps(key, indent=2))
    return probs


def _repredict_oof(opts: Options, oof: OOFSet, tta: list[str]) -> None:
    """Replace ``oof.P`` by predictions made with ``tta`` (cached beside the OOF files)."""
    for fold in range(oof.k):
        rows = np.flatnonzero(oof.folds == fold)
        df = oof.folds_df.iloc[rows]
        images_key = _images_key(opts.data_dir, df)
        for j, m in enumerate(oof.models):
            cache = m.oof_dir / f"fold{fold}.tta-{_tag(tta)}.csv"
            oof.P[rows, j] = cached_probs(opts, m, fold, df, images_key, tta, cache)


def fit(opts: Options) -> Fitted:
    """Load and check OOF, choose and fit the blend, tune the threshold, write the report."""
    oof = load_oof(opts.work_dir, opts.exps, opts.allow_partial)
    made_with = _oof_tta(oof.models)
    tta = made_with if opts.tta is None else list(opts.tta)
    if tta != made_with:
        log.info("OOF files were made with TTA %s; re-predicting them with %s", made_with, tta)
        _repredict_oof(opts, oof, tta)
    methods = METHODS if opts.blend == "auto" else (opts.blend,)
    fit_kw = {"objective": opts.objective, "solver": opts.solver}
    chosen, nested = choose_blend(oof.P, oof.y, oof.folds, methods=methods, **fit_kw)
    blend = fit_blend(oof.P, oof.y, chosen, **fit_kw)
    blended = blend.apply(oof.P)
    threshold, in_sample = best_threshold(oof.y, blended)
    keys = [m.key for m in oof.models]
    info = {
        "method": chosen,
        "weights": dict(zip(keys, map(float, blend.weights), strict=True)),
        "nested": nested,
        "in_sample_f1": float(in_sample),
        "honest": nested_threshold_f1(oof.y, blended, oof.folds),
        "left_out": oof.left_out,
        "tta": tta,
        "folds_hash": oof.folds_hash,
        "weighted_fit": fit_kw,
    }
    model_probs = {key: oof.P[:, j] for j, key in enumerate(keys)}
    out_dir = opts.work_dir / "oof" / opts.name
    report = write_report(out_dir, oof.y, oof.folds, model_probs, blended, info, float(threshold), opts.name)
    print(summary_table(report))
    print(f"report: {out_dir / 'report.md'}")
    return Fitted(oof, blend, float(threshold), tta, report)


def predict_test(opts: Options, fitted: Fitted) -> Path:
    """Fold-mean test probabilities per model -> the OOF-fitted blend -> the tuned threshold ->
    ``submissions/<exp>/prediction.txt`` and ``probs.csv``."""
    test_df = read_test(opts.data_dir)
    images_key = _images_key(opts.data_dir, test_df)
    # every model's OOF shares one TTA (checked in fit); other TTA predictions get their own cache
    suffix = "" if fitted.tta == _oof_tta(fitted.oof.models) else f".tta-{_tag(fitted.tta)}"
    columns = []
    for m in fitted.oof.models:
        per_fold = [
            cached_probs(
                opts, m, fold, test_df, images_key, fitted.tta, m.oof_dir / f"test_fold{fold}{suffix}.csv"
            )
            for fold in range(fitted.oof.k)
        ]
        columns.append(np.mean(per_fold, axis=0))
    T = np.column_stack(columns)
    probs = fitted.blend.apply(T)
    labels = (probs >= fitted.threshold).astype(int)
    out_dir = opts.work_dir / "submissions" / opts.name
    names = test_df.name.tolist()
    pred = write_submission(out_dir / "prediction.txt", names, labels, names)
    table = pd.DataFrame({"name": names, "prob": probs, "label": labels})
    for j, m in enumerate(fitted.oof.models):
        table[f"prob_{m.key}"] = T[:, j]
    atomic_write_text(out_dir / "probs.csv", table.to_csv(index=False, float_format="%.8f"))
    if opts.prediction_file is not None:
        write_submission(opts.prediction_file, names, labels, names)
        print(f"copy: {opts.prediction_file}")
    summary = f"{len(labels)} rows, {labels.mean():.1%} fake, threshold {fitted.threshold:.4f}"
    print(f"submission: {pred} ({summary}, blend {fitted.blend.method})")
    return pred
