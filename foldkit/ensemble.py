"""The ensemble step: fit a blend and an F1 threshold on OOF, report, and apply both to the test set.

What is fitted on OOF is exactly what is applied to test: the same models (complete ones), the same
TTA (OOF is re-predicted and cached when ``--tta`` differs from the TTA the OOF files were made with),
the same blend object (rank blends map test probabilities through the OOF reference), the same
threshold.
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from foldkit import PROJECT_ROOT
from foldkit.config import canonical_tta, from_dict, load_config, to_dict
from foldkit.data import files_hash, read_test, read_trainval, warn_test_overlap
from foldkit.io import FoldkitError, atomic_write_text, script
from foldkit.submission import label_file_names, submission_text

# torch, timm, scipy, sklearn and matplotlib load where they are first needed, after check_trained: a
# run with nothing to blend (or a wrong --exp) answers in a second, not after seconds of imports.
if TYPE_CHECKING:
    from foldkit.blend import Blend
    from foldkit.oof import ModelOOF, OOFSet

log = logging.getLogger(__name__)

#: The default test threshold fit (``foldkit.calibrate.TEST_THRESHOLD_FITS``): fitted on OOF scores
#: shaped like the fold average the submission is (``fold_mean_oof``; the log-odds mean of the fold
#: pipelines, ``fold_average``); on the eight benchmark runs whose fold models learn the task it lost the
#: least test F1 against each run's best threshold of the three fits (0.003 on average, worst 0.009,
#: against pooled's 0.011 and rate's 0.020); with near-chance fold models the estimate is rough (a warning
#: says so: report.WEAK_GAIN; docs/benchmarks.md, "The estimate against the real test F1", part 7).
THRESHOLD_FIT = "foldmean"


def predict_checkpoint(*args: Any, **kwargs: Any) -> np.ndarray:
    """``foldkit.predict.predict_checkpoint``, imported on first use (a module attribute, so tests can
    replace it)."""
    from foldkit.predict import predict_checkpoint as predict

    return predict(*args, **kwargs)


@dataclass
class Options:
    """What ``ensemble.py`` was asked for."""

    data_dir: Path
    work_dir: Path
    exps: list[str]
    blend: str = "auto"  # auto: choose among singles, blends and Caruana (foldkit.select.choose)
    objective: str = "logloss"  # weighted blend: what the weights optimise (logloss or auc)
    solver: str = "scipy"  # weighted blend: scipy (log-loss) or hill (greedy hill climbing)
    tta: list[str] | None = None  # None: the TTA the OOF files were made with
    allow_partial: bool = False
    device: str = "auto"
    batch: int = 256
    workers: int | None = None  # DataLoader workers for inference; None: one per CPU core
    prediction_file: Path | None = None
    calibration: str = "platt"  # per fold model on its own OOF before averaging (foldkit.calibrate)
    threshold_fit: str = THRESHOLD_FIT  # foldmean: fitted on fold-mean-like OOF; pooled: the OOF
    # threshold as is; rate: the test threshold predicts the OOF fake rate (foldkit.calibrate)
    noise_z: float | None = None  # a more complex candidate must win by this many standard errors of
    # its paired per-fold gain; None: foldkit.select.NOISE_Z
    select_by: str | None = None  # the per-fold score of that gain, f1, logloss, logloss+f1; None:
    # foldkit.select.SELECT_BY
    on_bad_image: str | None = None  # test images that cannot be decoded: error or skip (the fallback
    # label); None: what each checkpoint's config says (data.on_bad_image)
    stores: dict = field(default_factory=dict, repr=False)  # image stores opened so far, by (split, size)
    # the test label file as this run read it (open_test_images); fit() starts without it
    test_index: pd.DataFrame | None = field(default=None, repr=False, compare=False)

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
    calibration: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # fold -> per model
    threshold_fit: str = THRESHOLD_FIT
    oof_positive_rate: float = 0.0
    blended: np.ndarray | None = None  # the chosen blend of the (calibrated) OOF


def _fold_files(work_dir: Path, exp: str, suffix: str) -> list[Path]:
    """``oof/<exp>/<backbone>/fold<k><suffix>`` files (not the ``.tta-*`` caches), sorted."""
    files = (work_dir / "oof" / exp).glob(f"*/fold*{suffix}")
    return sorted(f for f in files if f.name[4 : -len(suffix)].isdigit())


def trained_experiments(work_dir: Path) -> list[str]:
    """Experiments with at least one OOF file under ``<work_dir>/oof``."""
    root = work_dir / "oof"
    exps = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return sorted(e for e in exps if _fold_files(work_dir, e, ".csv"))


def _resolved(path: Path) -> dict:
    """The config the YAML at ``path`` resolves to with no overrides, as plain JSON values (what an
    OOF sidecar records)."""
    return json.loads(json.dumps(to_dict(load_config(path))))


def _same_config(path: Path, recorded: dict) -> bool:
    """Whether the YAML at ``path``, with no overrides, resolves to the ``recorded`` config."""
    try:
        return _resolved(path) == recorded
    except FoldkitError:
        return False


def _recorded_configs(work_dir: Path, exp: str) -> Iterator[tuple[dict, Path]]:
    """(resolved config, the run's saved ``config.yaml``) for ``exp``'s runs: the finished folds first
    (their OOF sidecars), then every started one (its saved config, which ``main.py`` resumes with)."""
    for sidecar in _fold_files(work_dir, exp, ".json"):
        recorded = (_read_key(sidecar) or {}).get("config")
        if isinstance(recorded, dict):
            yield recorded, work_dir / "models" / exp / sidecar.parent.name / sidecar.stem / "config.yaml"
    for saved in sorted((work_dir / "models" / exp).glob("*/fold*/config.yaml")):
        try:
            recorded = _resolved(saved)
        except FoldkitError:
            continue
        yield recorded, saved


def config_arg(work_dir: Path, exp: str) -> str:
    """The ``--config`` that retrains ``exp`` as it was trained.

    The OOF sidecars record the resolved config, not the command: the shipped ``configs/<exp>.yaml``
    when it resolves to that config, else a trained run's saved ``config.yaml`` (the resolved config,
    overrides included). No fold finished: a started run's saved ``config.yaml`` alike (``main.py``
    resumes an unfinished fold only with its own settings). Nothing started: ``configs/<exp>.yaml``
    if it exists, else the default.
    """
    shipped = f"configs/{exp}.yaml"
    for recorded, saved in _recorded_configs(work_dir, exp):
        if (PROJECT_ROOT / shipped).is_file() and _same_config(PROJECT_ROOT / shipped, recorded):
            return shipped
        if saved.is_file():
            return str(saved)
    return shipped if (PROJECT_ROOT / shipped).is_file() else "configs/default.yaml"


def train_command(opts: Options, exp: str, fold: str = "all", model: str | None = None) -> str:
    """The ``main.py`` command that trains ``exp`` (its config, this data and work folder), to paste."""
    config = config_arg(opts.work_dir, exp)
    words = ["python", script("main.py"), "--config", config]
    words += ["--exp", exp] if Path(config).stem != exp else []
    words += ["--data-dir", str(opts.data_dir), "--work-dir", str(opts.work_dir), "--fold", fold]
    words += ["--model", model] if model else []
    return shlex.join(words)


def retrain_command(opts: Options, m: ModelOOF, folds: list[int], like: int, force: bool = False) -> str:
    """The ``main.py`` command that retrains ``m``'s ``folds`` with fold ``like``'s saved config (the
    resolved one, overrides included), to paste. ``force``: the folds are finished with other settings,
    which ``main.py`` replaces only when told to."""
    config = m.checkpoint(opts.work_dir, like).with_name("config.yaml")
    words = ["python", script("main.py"), "--config", str(config), "--exp", m.exp, "--model", m.backbone]
    words += ["--data-dir", str(opts.data_dir), "--work-dir", str(opts.work_dir)]
    return shlex.join([*words, "--fold", ",".join(map(str, folds)), *(["--force"] if force else [])])


def _gaps(work_dir: Path, exp: str, k: int) -> dict[str, list[int]]:
    """Backbone -> folds without an OOF file, over every backbone trained or listed in the config."""
    done: dict[str, set[int]] = {}
    for csv in _fold_files(work_dir, exp, ".csv"):  # what load_oof finds; the sidecar names the backbone
        meta = _read_key(csv.with_suffix(".json")) or {}
        done.setdefault(meta.get("backbone", csv.parent.name), set()).add(int(csv.stem[4:]))
        for backbone in (meta.get("config") or {}).get("backbones", []):
            done.setdefault(backbone, set())
    return {b: sorted(set(range(k)) - have) for b, have in sorted(done.items()) if set(range(k)) - have}


def _missing_commands(opts: Options) -> list[str]:
    """One command per experiment with missing OOF folds, naming those folds (and the backbone when
    only one lacks them); ``--fold K`` when the gaps cannot be told."""
    k = (_read_key(opts.work_dir / "folds" / "folds.json") or {}).get("k")
    commands = []
    for exp in opts.exps:
        gaps = _gaps(opts.work_dir, exp, k) if isinstance(k, int) else {}
        if gaps:
            folds = ",".join(str(f) for f in sorted({f for fs in gaps.values() for f in fs}))
            commands.append(train_command(opts, exp, folds, next(iter(gaps)) if len(gaps) == 1 else None))
    return commands or [train_command(opts, e, "K") for e in opts.exps]


def check_trained(opts: Options) -> None:
    """Before loading OOF: every experiment asked for was trained, and its folds are still there;
    else say what to run (the real command: config, data and work folders)."""
    oof_root = opts.work_dir / "oof"
    trained = trained_experiments(opts.work_dir)
    absent = [e for e in opts.exps if e not in trained]
    if absent and not trained:
        raise FoldkitError(
            f"nothing is trained under {opts.work_dir} yet ({oof_root} holds no OOF predictions); "
            f"train first:\n  {train_command(opts, absent[0])}\nthen run ensemble.py again"
        )
    if absent:
        raise FoldkitError(
            f"no OOF predictions for experiment {', '.join(map(repr, absent))} under {oof_root}; "
            f"trained there: {', '.join(trained)} (pass --exp {trained[0]}), or train it:\n"
            f"  {train_command(opts, absent[0])}"
        )
    folds_json = opts.work_dir / "folds" / "folds.json"
    if not folds_json.is_file():
        raise FoldkitError(
            f"{folds_json} is missing, but the OOF files of {', '.join(opts.exps)} were made from "
            f"it: restore {folds_json.parent}, or retrain:\n  "
            + "\n  ".join(train_command(opts, e) for e in opts.exps)
        )


def _real_commands(message: str, opts: Options) -> str:
    """Replace the generic ``python main.py --fold K`` hints of ``foldkit.oof``'s errors by commands
    for these experiments (config, data and work folders), so the hint can be pasted as is."""
    if "python main.py --fold K" in message:
        message = message.replace("python main.py --fold K", " and ".join(_missing_commands(opts)))
    if "retrain with the current folds" in message:
        every = " and ".join(train_command(opts, e) for e in opts.exps)
        message = message.replace(
            "retrain with the current folds", f"retrain with the current folds ({every})"
        )
    return message


def _oof_tta(models: Sequence[ModelOOF]) -> list[str]:
    ttas = {tuple(canonical_tta(meta.get("tta", []))) for m in models for meta in m.metas.values()}
    if len(ttas) > 1:
        raise FoldkitError(
            f"OOF files were made with different TTA settings {sorted(ttas)}; pass --tta to "
            "re-predict them all alike"
        )
    return list(next(iter(ttas)))


def _tag(tta: Sequence[str]) -> str:
    return "-".join(tta) or "none"


def _images_key(data_dir: Path, df: pd.DataFrame) -> str:
    """``files_hash`` of the images (paths, sizes and modification times), salted with the resolved
    data folder and the names in order: a test folder whose files were replaced under the same names
    (a new public/private split) must not reuse old predictions."""
    salt = str(Path(data_dir).resolve()) + "\n" + "\t".join(df.name) + "\n"  # names hold no whitespace
    return files_hash(data_dir, df.path.tolist(), salt)


def _read_key(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or corrupt sidecar: a cache miss, not an error
        return None


def _source(opts: Options, ckpt: dict, index: pd.DataFrame, split: str, paths: list[str]) -> Any:
    """``paths`` as a source at the size the checkpoint trained on: from the split's image store
    (built once, then shared by every model and fold), or the files when the run had no store."""
    from foldkit.store import open_images

    cfg = from_dict(ckpt["config"])
    size = tuple(ckpt["store_size"]) if ckpt.get("store_size") else None
    key = (split, size, cfg.data.cache)
    if key not in opts.stores:
        opts.stores[key] = open_images(
            opts.data_dir, opts.work_dir, index, split, cfg.data.cache, size, opts.workers,
            (split == "test" and opts.on_bad_image) or cfg.data.on_bad_image,  # the option: test only
        )  # fmt: skip
    return opts.stores[key].source(paths)


def _checkpoint(opts: Options, m: ModelOOF, fold: int) -> Path:
    """``m``'s fold checkpoint, or an error with the command that retrains it."""
    ckpt_path = m.checkpoint(opts.work_dir, fold)
    if not ckpt_path.is_file():
        raise FoldkitError(
            f"{m.key} fold {fold}: checkpoint {ckpt_path} is missing; retrain it:\n  "
            + train_command(opts, m.exp, str(fold), m.backbone)
        )
    return ckpt_path


def open_test_images(opts: Options, oof: OOFSet) -> None:
    """Test mode, before anything is written: read the test label file and decode every test image
    into each store (size, cache) the models predict from, so a bad test input stops the run with
    the OOF report and the previous submission left as they were, not a report that disowns the
    submission. Under ``error`` a store also refuses the images it recorded earlier with skip."""
    from foldkit.predict import load_checkpoint

    test_df = opts.test_index = read_test(opts.data_dir)
    warn_test_overlap(oof.folds_df, test_df)  # the test set is often added after training
    for m in oof.models:  # fold 0 stands for every fold: one run trains a model's folds alike
        ckpt = load_checkpoint(_checkpoint(opts, m, 0), mmap=True)  # settings only: weights stay on disk
        _source(opts, ckpt, test_df, "test", test_df.path.tolist())


def _test_bad(opts: Options) -> set[str]:
    """Test image paths that the test stores (or file sets) this run opened could not decode."""
    return set().union(*(images.bad for (split, *_), images in opts.stores.items() if split == "test"))


def cached_probs(
    opts: Options,
    m: ModelOOF,
    fold: int,
    df: pd.DataFrame,
    images_key: str,
    tta: list[str],
    cache: Path,
    index: pd.DataFrame,
    split: str,
) -> np.ndarray:
    """Probabilities of ``df``'s images from ``m``'s fold checkpoint, cached in ``cache`` (csv + json)
    and reused while the checkpoint, the TTA, the precision and the images (``images_key``, from
    ``_images_key``, computed once per image list by the caller) are unchanged.

    Predicts exactly as ``main.py`` made the OOF: same function, same AMP dtype for the device. The
    dtype comes from the OOF sidecar's config (the checkpoint's own, verified by ``load_oof``), so a
    cache hit never loads the checkpoint.
    """
    from foldkit.predict import file_sha256, load_checkpoint
    from foldkit.train import amp_dtype, resolve_device

    ckpt_path = _checkpoint(opts, m, fold)
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
        cached = pd.read_csv(cache, dtype={"name": str}, keep_default_na=False)  # NA, null: names
        if cached.name.tolist() == df.name.tolist():
            log.info("%s fold %d: reusing %s", m.key, fold, cache)
            return cached.prob.to_numpy(dtype=np.float64)
    ckpt = load_checkpoint(ckpt_path)
    probs = predict_checkpoint(
        ckpt,
        None,
        None,
        tta,
        opts.batch,
        opts.workers,
        device,
        dtype,
        desc=f"{m.key} fold {fold}",
        source=_source(opts, ckpt, index, split, df.path.tolist()),
    )
    table = pd.DataFrame({"name": df.name.to_numpy(), "prob": probs})
    atomic_write_text(cache, table.to_csv(index=False, float_format="%.8f"))
    atomic_write_text(cache.with_suffix(".json"), json.dumps(key, indent=2))
    return probs


def _repredict_oof(opts: Options, oof: OOFSet, tta: list[str]) -> None:
    """Replace ``oof.P`` by predictions made with ``tta`` (cached beside the OOF files). The images
    come from the trainval store ``main.py`` built, opened with its index (the label files), not
    folds.csv's: with ``on_bad_image: skip`` that lacks the bad rows and would rebuild the store."""
    index = read_trainval(opts.data_dir)
    for fold in range(oof.k):
        rows = np.flatnonzero(oof.folds == fold)
        df = oof.folds_df.iloc[rows]
        images_key = _images_key(opts.data_dir, df)
        for j, m in enumerate(oof.models):
            cache = m.oof_dir / f"fold{fold}.tta-{_tag(tta)}.csv"
            oof.P[rows, j] = cached_probs(opts, m, fold, df, images_key, tta, cache, index, "trainval")


def _choose(
    opts: Options, P: np.ndarray, y: np.ndarray, folds: np.ndarray, keys: list[str]
) -> dict[str, Any]:
    """Candidates, nested-CV table, the chosen candidate and the outer-loop estimate (foldkit.select).

    ``--blend auto`` chooses among every single model, the blend methods and Caruana selection;
    a named ``--blend`` is the only candidate, and the single models are still scored for the report.
    """
    from foldkit.select import Candidate, best_single, candidates, choose, nested_scores, outer_loop

    fit_kw = {"objective": opts.objective, "solver": opts.solver}
    mode = "rate" if opts.threshold_fit == "rate" else "pooled"  # foldmean needs the test predictions
    cands = candidates(keys) if opts.blend == "auto" else [Candidate(opts.blend, opts.blend)]
    chosen, table = choose(P, y, folds, cands, mode, opts.noise_z, opts.select_by, **fit_kw)
    for single in candidates(keys)[: len(keys)]:
        if single.name not in table:
            table[single.name] = nested_scores(P, y, folds, single, mode, **fit_kw)
    outer = outer_loop(P, y, folds, cands, mode, opts.noise_z, opts.select_by, **fit_kw)
    single = best_single(table)
    if outer is not None:
        outer = {**outer, "chosen": chosen.name, "best_single": single}
    per_fold = outer["per_fold"] if outer is not None else table[chosen.name]["per_fold"]
    estimate = float(np.mean(per_fold))
    # its fold-to-fold standard error: how far the estimate itself may be from the truth by chance
    se = float(np.std(per_fold, ddof=1) / np.sqrt(len(per_fold))) if len(per_fold) > 1 else None
    return {"chosen": chosen, "nested": table, "outer": outer, "estimate": estimate, "estimate_se": se,
            "best_single": single}  # fmt: skip


def fit(opts: Options, check_test: bool = False) -> Fitted:
    """Load and check OOF, calibrate, choose and fit the ensemble, tune the threshold, estimate it with
    the outer loop, write the report. ``check_test`` (test mode): the test inputs are read and decoded
    first (``open_test_images``), so bad test data stops the run before the report is rewritten."""
    check_trained(opts)
    opts.test_index = None  # read afresh by this run's open_test_images
    from foldkit.blend import best_threshold, nested_threshold_f1
    from foldkit.calibrate import calibrate_oof, crossfit_oof, positive_rate
    from foldkit.oof import load_oof
    from foldkit.report import summary_table, write_report
    from foldkit.select import fit_candidate

    try:
        oof = load_oof(opts.work_dir, opts.exps, opts.allow_partial, functools.partial(retrain_command, opts))
    except FoldkitError as exc:
        raise FoldkitError(_real_commands(str(exc), opts)) from exc
    if check_test:
        open_test_images(opts, oof)
    made_with = _oof_tta(oof.models)
    tta = made_with if opts.tta is None else canonical_tta(opts.tta)
    if tta != made_with:
        log.info("OOF files were made with TTA %s; re-predicting them with %s", made_with, tta)
        _repredict_oof(opts, oof, tta)
    keys = [m.key for m in oof.models]
    P, calibration = calibrate_oof(oof.P, oof.y, oof.folds, opts.calibration)
    # the choice and every estimate score rows calibrated without their own labels; the blend and
    # threshold the submission uses are fitted on the whole-fold maps it applies to the test
    scored = crossfit_oof(oof.P, oof.y, oof.folds, opts.calibration)
    choice = _choose(opts, scored, oof.y, oof.folds, keys)
    fit_kw = {"objective": opts.objective, "solver": opts.solver}
    blend = fit_candidate(P, oof.y, choice["chosen"], **fit_kw)
    blended = blend.apply(P)
    threshold, in_sample = best_threshold(oof.y, blended)
    oof_rate = positive_rate(blended, threshold)
    info = {
        "method": choice["chosen"].name,
        "weights": dict(zip(keys, map(float, blend.weights), strict=True)),
        "nested": choice["nested"],
        "in_sample_f1": float(in_sample),
        "honest": nested_threshold_f1(oof.y, blend.apply(scored), oof.folds),
        "estimate": choice["estimate"],
        "estimate_se": choice["estimate_se"],
        "outer": choice["outer"],
        "best_single": choice["best_single"],
        "oof_positive_rate": oof_rate,
        "calibration": opts.calibration,
        # fold -> model -> (slope, intercept): with the cached test_fold<k>.csv files, the submission's
        # probabilities can be recomputed by hand (blend each fold, then fold_average)
        "platt": {str(f): dict(zip(keys, map(list, ps), strict=True)) for f, ps in calibration.items()},
        "threshold_fit": opts.threshold_fit,
        "left_out": oof.left_out,
        "tta": tta,
        "folds_hash": oof.folds_hash,
        "weighted_fit": fit_kw,
    }
    model_probs = {key: P[:, j] for j, key in enumerate(keys)}
    out_dir = opts.work_dir / "oof" / opts.name
    report = write_report(out_dir, oof.y, oof.folds, model_probs, blended, info, float(threshold), opts.name)
    print(summary_table(report))
    print(f"report: {out_dir / 'report.md'}")
    return Fitted(
        oof, blend, float(threshold), tta, report, calibration, opts.threshold_fit, oof_rate, blended
    )


def _fallback_for_bad(
    test_df: pd.DataFrame, ok: np.ndarray, probs: np.ndarray, labels: np.ndarray, model_probs: np.ndarray
) -> None:
    """Test images that could not be decoded (``on_bad_image: skip``; not ``ok``, ``_readable``) get
    the fallback label ``BAD_IMAGE_LABEL`` (real) and probability 0 (each model's too), so the
    submission still lists every name; the models' output on their blank rows is noise (and took no
    part in the threshold)."""
    from foldkit.store import BAD_IMAGE_LABEL

    rows = np.flatnonzero(~ok)
    if len(rows):
        labels[rows], probs[rows], model_probs[rows] = BAD_IMAGE_LABEL, 0.0, 0.0
        shown = ", ".join(test_df.name.iloc[rows[:5]])
        log.warning(
            "%d unreadable test image(s) predicted %d (real), the fallback: %s",
            len(rows),
            BAD_IMAGE_LABEL,
            shown,
        )


def _readable(opts: Options, test_df: pd.DataFrame) -> np.ndarray:
    """Per test row: decoded. Which failed: those the test stores (or file sets) this run opened
    recorded, all current; older stores of other sizes may record since-fixed files."""
    return ~test_df.path.isin(_test_bad(opts)).to_numpy()


def predict_test(opts: Options, fitted: Fitted) -> Path:
    """Each fold's calibrated models through the OOF-fitted blend -> the K fold pipelines' log-odds
    mean -> the tuned threshold -> ``submissions/<exp>/prediction.txt`` and ``probs.csv``."""
    from foldkit.calibrate import fold_average
    from foldkit.report import method_label

    if opts.test_index is None:  # fit() ran without check_test
        open_test_images(opts, fitted.oof)
    test_df = opts.test_index
    assert test_df is not None  # open_test_images read it
    images_key = _images_key(opts.data_dir, test_df)
    # every model's OOF shares one TTA (checked in fit); other TTA predictions get their own cache
    suffix = "" if fitted.tta == _oof_tta(fitted.oof.models) else f".tta-{_tag(fitted.tta)}"
    columns, folds_cal = [], []
    for j, m in enumerate(fitted.oof.models):
        per_fold = [
            cached_probs(
                opts,
                m,
                fold,
                test_df,
                images_key,
                fitted.tta,
                m.oof_dir / f"test_fold{fold}{suffix}.csv",
                test_df,
                "test",
            )
            for fold in range(fitted.oof.k)
        ]
        folds_cal.append(_calibrated(fitted, j, per_fold))
        columns.append(fold_average(folds_cal[-1]))
    T = np.column_stack(columns)  # each model's fold average, for probs.csv
    per_fold = fold_pipelines(fitted.blend, folds_cal, fitted.blended)
    probs = fold_average(per_fold)
    ok = _readable(opts, test_df)  # a blank unreadable image must not move the threshold
    threshold, extra = (
        _test_threshold(fitted, probs[ok], per_fold[:, ok]) if ok.any() else (fitted.threshold, {})
    )
    labels = (probs >= threshold).astype(int)
    _fallback_for_bad(test_df, ok, probs, labels, T)
    names = test_df.name.tolist()
    text = submission_text(names, labels, label_file_names(opts.data_dir))  # checked before any write
    out = opts.work_dir / "oof" / opts.name
    # the fake rate of the images the models saw: a skipped unreadable one's fallback 0 says nothing
    fitted.report = record_test_rate(
        out, float(labels[ok].mean()) if ok.any() else 0.0, threshold, extra, int(ok.sum())
    )
    out_dir = opts.work_dir / "submissions" / opts.name
    pred = atomic_write_text(out_dir / "prediction.txt", text)
    table = pd.DataFrame({"name": names, "prob": probs, "label": labels})
    for j, m in enumerate(fitted.oof.models):
        table[f"prob_{m.key}"] = T[:, j]
    table["readable"] = ok.astype(int)  # 0: could not be decoded, its 0 probabilities are the fallback
    atomic_write_text(out_dir / "probs.csv", table.to_csv(index=False, float_format="%.8f"))
    record = json.dumps(run_record(opts, fitted, threshold), indent=2, default=str)
    atomic_write_text(out_dir / "ensemble.json", record + "\n")
    if opts.prediction_file is not None:
        atomic_write_text(opts.prediction_file, text)
        print(f"copy: {opts.prediction_file}")
    summary = f"{len(labels)} rows, {labels.mean():.1%} fake, threshold {threshold:.4f}"
    print(f"submission: {pred} ({summary}, {method_label(fitted.report)})")
    return pred


def run_record(opts: Options, fitted: Fitted, threshold: float) -> dict[str, Any]:
    """What made the submission, saved beside it (``ensemble.json``): every option as resolved, the
    command, the chosen ensemble and its threshold, the models and folds. The report holds the
    numbers; this lets the same submission be made again."""
    import sys
    from dataclasses import fields

    from foldkit import __version__
    from foldkit.select import NOISE_Z, SELECT_BY

    options = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name != "stores"}
    options["noise_z"] = NOISE_Z if opts.noise_z is None else opts.noise_z  # the defaults, as applied
    options["select_by"] = opts.select_by or SELECT_BY
    return {
        "foldkit_version": __version__,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "options": options,
        "tta": list(fitted.tta),
        "method": fitted.report["summary"]["method"],
        "threshold": float(threshold),
        "models": [m.key for m in fitted.oof.models],
        "folds_hash": fitted.oof.folds_hash,
    }


def fold_pipelines(
    blend: Blend, folds_cal: list[list[np.ndarray]], oof_blended: np.ndarray | None
) -> np.ndarray:
    """(K, m): fold k's calibrated models (``folds_cal[model][k]``) through the OOF-fitted blend, as
    each OOF row of fold k was made; the submission is their log-odds mean (``fold_average``).

    A rank blend maps a test score beyond every OOF score to exactly 0 or 1, log-odds +-16 after
    clipping, where the OOF's own mid-ranks stop at +-log(2n): one such fold would outvote the other
    K-1 in the log-odds mean, so rank scores are kept within the range of the blended OOF.
    """
    k = len(folds_cal[0])
    per_fold = np.stack([blend.apply(np.column_stack([c[f] for c in folds_cal])) for f in range(k)])
    if blend.method == "rank" and oof_blended is not None:
        per_fold = np.clip(per_fold, oof_blended.min(), oof_blended.max())
    return per_fold


def _test_threshold(fitted: Fitted, probs: np.ndarray, per_fold: np.ndarray) -> tuple[float, dict[str, Any]]:
    """The threshold applied to the submission, and what the report learns from the test predictions.

    The chosen blend of each fold's models gives K scores per test image (``per_fold``, (K, m));
    ``probs`` is their log-odds mean (``foldkit.calibrate.fold_average``). Their spread shapes
    fold-mean-like OOF scores (``foldkit.calibrate.fold_mean_oof``), and the estimate moves by the
    nested-CV gain those show over the single-model OOF (the outer loop cannot see it: each OOF row
    has one model). Threshold: ``rate`` predicts the OOF fake rate; ``foldmean`` is fitted on the
    fold-mean-like OOF; ``pooled`` is the OOF threshold as is.
    """
    from foldkit.blend import best_threshold
    from foldkit.calibrate import fold_mean_oof, positive_rate, rate_threshold
    from foldkit.report import WEAK_GAIN, weak_models_note
    from foldkit.select import Candidate, nested_scores

    threshold, extra = fitted.threshold, {}
    if fitted.threshold_fit == "rate":
        threshold = rate_threshold(probs, fitted.oof_positive_rate)
    if fitted.blended is None or len(per_fold) < 2:
        return threshold, extra
    y, folds = fitted.oof.y, fitted.oof.folds
    shaped, spread = fold_mean_oof(fitted.blended, y, per_fold)
    mode, one = ("rate" if fitted.threshold_fit == "rate" else "pooled"), Candidate("score", "single", 0)
    gain = (
        nested_scores(shaped[:, None], y, folds, one, mode)["mean"]
        - nested_scores(fitted.blended[:, None], y, folds, one, mode)["mean"]
    )
    single = fitted.report["summary"].get("estimate_single_fold", fitted.report["summary"]["estimate"])
    # an F1 estimate above 1 (a big gain on an already high estimate) says nothing more than 1
    extra = {"estimate": min(1.0, single + gain), "estimate_single_fold": single, "fold_mean_gain": gain}
    extra["fold_disagreement"] = spread
    if gain > WEAK_GAIN:
        log.warning(weak_models_note(gain, fitted.threshold_fit))  # report.md says it too
    if fitted.threshold_fit == "foldmean":
        threshold, _ = best_threshold(y, shaped)
        extra["oof_positive_rate"] = positive_rate(shaped, threshold)
    return float(threshold), extra


def _calibrated(fitted: Fitted, column: int, per_fold: list[np.ndarray]) -> list[np.ndarray]:
    """Each fold model's test probabilities through the Platt map fitted on its own OOF rows."""
    from foldkit.calibrate import IDENTITY, apply_platt

    return [
        apply_platt(p, fitted.calibration.get(fold, [IDENTITY] * (column + 1))[column])
        for fold, p in enumerate(per_fold)
    ]


def record_test_rate(
    out_dir: Path,
    test_rate: float,
    threshold: float,
    extra: dict[str, Any] | None = None,
    n_test: int | None = None,
) -> dict[str, Any]:
    """Add the submission's predicted fake rate (and the threshold it used) to the report; warn when it
    is more than ``foldkit.report.rate_gap`` from the OOF's at its threshold: then the threshold does
    not sit where the submission's probabilities live (or the test's fake ratio differs)."""
    from foldkit.report import add_test_rate

    report = add_test_rate(out_dir, test_rate, threshold, extra, n_test)
    oof_rate, gap = report["summary"].get("oof_positive_rate"), report["summary"]["rate_gap"]
    if oof_rate is not None and abs(test_rate - oof_rate) > gap:
        log.warning(
            "the submission predicts %.1f%% fake, the OOF %.1f%% at its threshold (more than %.1f points "
            "apart): the threshold may be misplaced on the fold-averaged test probabilities, or the test "
            "fake ratio differs; see %s",
            100 * test_rate, 100 * oof_rate, 100 * gap, out_dir / "report.md",
        )  # fmt: skip
    return report
