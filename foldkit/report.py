"""OOF evaluation report: per-model and blend metrics as JSON, Markdown and PNG plots.

Why: one folder that shows whether the blend beats its parts, how stable each model is across folds,
and how much the tuned threshold flatters the in-sample F1 (compare it with the nested-CV F1).
Every file goes through ``foldkit.io`` atomic writes, so an interrupted run never leaves a
half-written report that looks complete; ``report.json`` is written last.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    roc_auc_score,
)

from foldkit.blend import best_threshold, f1_at, f1_curve
from foldkit.io import FoldkitError, atomic_path, atomic_write_text, read_json_artifact, script

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt

PLOTS = (
    "f1_threshold.png",
    "pr_curve.png",
    "per_fold_scores.png",
    "prob_hist.png",
    "confusion.png",
    "correlation.png",
)
#: Keys whose floats are applied to new predictions, so they are written unrounded.
EXACT_KEYS = frozenset({"threshold", "thresholds", "best_threshold", "weights", "platt"})  # recomputable
DIGITS = 6
_BLEND_KEYS = frozenset({"method", "weights", "nested", "honest", "in_sample_f1", "left_out"})
MAX_CURVE_POINTS = 2000


# --------------------------------------------------------------------------- metrics


def metrics(y: Any, p: Any, threshold: float | None = None) -> dict[str, Any]:
    """Threshold-free and threshold-dependent scores of one probability vector.

    AUC is None when only one class is present (it is undefined, and NaN is not valid JSON).
    """
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(p, dtype=np.float64)
    thr, best = best_threshold(y, p)
    both = 0 < int(y.sum()) < y.shape[0]
    pred05 = (p >= 0.5).astype(np.int64)
    out: dict[str, Any] = {
        "n": int(y.shape[0]),
        "f1_05": f1_at(y, p, 0.5),
        "best_f1": best,
        "best_threshold": thr,
        "auc": float(roc_auc_score(y, p)) if both else None,
        "logloss": float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1])),
        "accuracy": float(accuracy_score(y, pred05)),
    }
    if threshold is not None:
        out["threshold"] = float(threshold)
        out["f1_at_threshold"] = f1_at(y, p, threshold)
        out["accuracy_at_threshold"] = float(accuracy_score(y, (p >= threshold).astype(np.int64)))
    return out


def model_table(y: Any, folds: Any, model_probs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model: {"overall": metrics, "per_fold": {fold id: metrics on that fold}}."""
    y = np.asarray(y)
    folds = np.asarray(folds)
    table: dict[str, dict[str, Any]] = {}
    for name, p in model_probs.items():
        p = np.asarray(p, dtype=np.float64)
        per_fold = {int(f): metrics(y[folds == f], p[folds == f]) for f in np.unique(folds)}
        table[name] = {"overall": metrics(y, p), "per_fold": per_fold}
    return table


def _correlations(model_probs: Mapping[str, np.ndarray]) -> dict[str, dict[str, dict[str, Any]]]:
    """Pearson (on probabilities) and Spearman correlation of model OOF predictions, as nested dicts."""
    if not model_probs:
        return {"pearson": {}, "spearman": {}}
    df = pd.DataFrame(dict(model_probs))
    return {
        kind: {a: {b: float(v) for b, v in row.items()} for a, row in df.corr(method=kind).iterrows()}
        for kind in ("pearson", "spearman")
    }


# --------------------------------------------------------------------------- JSON helpers


def _plain(obj: Any, exact: bool = False) -> Any:
    """Convert to JSON-safe python: str keys, lists, python scalars, rounded finite floats, None for NaN.

    Floats under EXACT_KEYS stay unrounded; anything else unknown becomes its ``str``.
    """
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, exact or str(k) in EXACT_KEYS) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v, exact) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return obj if exact else round(obj, DIGITS)
    return str(obj)  # paths, enums, ...: a readable string beats a crash at the end of a long run


def _check_inputs(
    y: Any, folds: Any, model_probs: Mapping[str, Any], blended: Any
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Arrays of one length, 0/1 labels, probabilities in [0, 1]; raise FoldkitError otherwise."""
    y = np.asarray(y)
    n = y.shape[0]
    if y.ndim != 1 or n == 0 or not ((y == 0) | (y == 1)).all():
        raise FoldkitError("report needs a non-empty 1-D vector of 0/1 labels")
    folds = np.asarray(folds).astype(np.int64)
    probs = {str(k): np.asarray(v, dtype=np.float64) for k, v in model_probs.items()}
    blended = np.asarray(blended, dtype=np.float64)
    for name, arr in [("folds", folds), ("blended", blended), *probs.items()]:
        if arr.shape != (n,):
            raise FoldkitError(f"{name} has shape {arr.shape}, expected ({n},) like the labels")
        if name != "folds" and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise FoldkitError(f"{name} must hold finite probabilities in [0, 1]")
    return y.astype(np.int64), folds, probs, blended


# --------------------------------------------------------------------------- report


def _blend_section(
    y: np.ndarray, folds: np.ndarray, blended: np.ndarray, blend_info: Mapping[str, Any], threshold: float
) -> dict[str, Any]:
    """Blend metrics at the chosen threshold, plus what ``choose_blend`` found (nested and honest F1)."""
    method = str(blend_info.get("method", "mean"))
    nested = dict(blend_info.get("nested") or {})
    honest = blend_info.get("honest")
    in_sample = blend_info.get("in_sample_f1")
    return {
        "method": method,
        "weights": dict(blend_info.get("weights") or {}),
        "threshold": float(threshold),
        "in_sample_f1": float(in_sample) if in_sample is not None else f1_at(y, blended, threshold),
        "nested_cv_f1": nested[method]["mean"] if method in nested else None,
        "honest_threshold_f1": honest["mean"] if honest else None,
        "f1_05": f1_at(y, blended, 0.5),
        "overall": metrics(y, blended, threshold),
        "per_fold": {
            int(f): metrics(y[folds == f], blended[folds == f], threshold) for f in np.unique(folds)
        },
        "nested": nested,
        "honest": honest,
        "left_out": [str(s) for s in blend_info.get("left_out") or []],
        # Anything else the caller recorded (TTA, folds hash, ...) is kept for provenance.
        **{k: v for k, v in blend_info.items() if k not in _BLEND_KEYS},
    }


def write_report(
    out_dir: Path,
    y: Any,
    folds: Any,
    model_probs: Mapping[str, Any],
    blended: Any,
    blend_info: Mapping[str, Any],
    threshold: float,
    exp: str,
) -> dict[str, Any]:
    """Write report.json, report.md and the PNG plots to ``out_dir``; return the dict in report.json."""
    out_dir = Path(out_dir)
    y, folds, probs, blended = _check_inputs(y, folds, model_probs, blended)
    blend = _blend_section(y, folds, blended, blend_info, threshold)
    report: dict[str, Any] = {
        "exp": str(exp),
        "n": int(y.shape[0]),
        "n_fake": int(y.sum()),
        "fake_ratio": float(y.mean()),
        "folds": [int(f) for f in np.unique(folds)],
        "summary": {
            **{
                k: blend[k]
                for k in (
                    "method",
                    "threshold",
                    "in_sample_f1",
                    "nested_cv_f1",
                    "honest_threshold_f1",
                    "f1_05",
                )
            },
            # issue 10: the outer-loop estimate, the best single model beside it, the predicted fake rates
            "estimate": blend.get("estimate", blend["nested_cv_f1"]),
            "estimate_se": blend.get("estimate_se"),
            "best_single": blend.get("best_single"),
            "oof_positive_rate": blend.get("oof_positive_rate"),
            "test_positive_rate": None,  # filled in by ensemble.py --mode test (add_test_rate)
        },
        "models": model_table(y, folds, probs),
        "blend": blend,
        "correlation": _correlations(probs),
    }
    report = _plain(report)
    report["plots"] = _write_plots(out_dir, y, probs, blended, report)
    atomic_write_text(out_dir / "report.md", _render_markdown(report, out_dir))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


# --------------------------------------------------------------------------- markdown


def _fmt(x: Any, digits: int = 4) -> str:
    """A number for a table cell; an em dash for a missing one."""
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def method_label(report: dict[str, Any]) -> str:
    """The chosen method, and when a weighted blend put all its weight on one model, that model: a
    "caruana" of weights 1 / 0 is the single model under another name, and reads like an ensemble."""
    method = str(report["summary"]["method"])
    weights = (report.get("blend") or {}).get("weights") or {}
    used = [name for name, w in weights.items() if w > 0]
    if method.startswith("single:") or len(weights) < 2 or len(used) != 1:
        return method
    return f"{method}: all weight on {used[0]}"


def _md_summary(report: dict[str, Any]) -> list[str]:
    """Headline numbers first: what was chosen and how much to trust it."""
    s, b = report["summary"], report["blend"]
    lines = [
        f"# OOF report: {report['exp']}",
        "",
        f"- **Blend method:** `{method_label(report)}`",
        f"- **Threshold:** {_fmt(s['threshold'])} (predict fake if p >= threshold; the best F1 of the "
        "pooled OOF blend; the submission's own threshold, once `--mode test` has run, is below)",
        f"- **In-sample F1** (blend and threshold fitted and scored on all OOF): {_fmt(s['in_sample_f1'])}",
        f"- **Nested-CV F1** (blend and threshold refitted without each fold): {_fmt(s['nested_cv_f1'])}",
        f"- Threshold-only nested F1 of this blend: {_fmt(s['honest_threshold_f1'])}",
        f"- Blend F1 at 0.5: {_fmt(s['f1_05'])}; AUC {_fmt(b['overall']['auc'])}",
        *_md_estimate(s, b),
        f"- Rows: {report['n']}, fake ratio {_fmt(report['fake_ratio'])}, folds {len(report['folds'])}",
    ]
    if b["left_out"]:
        lines.append(f"- Left out (incomplete OOF): {', '.join(b['left_out'])}")
    lines.append(
        "- Note: each fold's best epoch was chosen on that fold's own holdout, so OOF scores lean "
        "slightly optimistic; the estimate (outer loop) is the fairer guide to the leaderboard."
    )
    return [*lines, ""]


#: A fold-average gain above this is a warning: the fold models are weak and noisy, and the Gaussian
#: model behind the gain (and the foldmean threshold) is off by several points there (measured: +0.05
#: or less where the models learn the task, +0.4 where they are near chance; docs/benchmarks.md).
WEAK_GAIN = 0.1
WEAK_MODELS_NOTE = (
    "the fold models are weak: averaging them is estimated to add {gain:+.3f} F1, and where single fold "
    "models are this noisy the estimate{what} rest on a rough model of their disagreement (measured off "
    "by 0.07 to 0.17 F1; docs/benchmarks.md): train models that learn the task (more data or epochs){how}"
)


def weak_models_note(gain: float, threshold_fit: str | None) -> str:
    """``WEAK_MODELS_NOTE`` for this run: the foldmean threshold is named only where it was used."""
    foldmean = threshold_fit in (None, "foldmean")
    what = " and the foldmean threshold" if foldmean else ""
    how = ", or compare --threshold-fit pooled" if foldmean else ""
    return WEAK_MODELS_NOTE.format(gain=gain, what=what, how=how)


def _capped(s: dict[str, Any]) -> bool:
    """Whether the test-mode estimate was capped at 1 (``foldkit.ensemble._test_threshold``)."""
    return s["estimate_single_fold"] + s["fold_mean_gain"] > 1


def _se(s: dict[str, Any]) -> str:
    """`` ± SE``: the outer loop's fold-to-fold standard error, when known (in test mode it is that of
    the outer-loop term; the fold-average gain is a model, not a sample)."""
    return "" if s.get("estimate_se") is None else f" ± {s['estimate_se']:.4f}"


# why the submission's threshold differs from the OOF blend's (ensemble.py --threshold-fit)
_THRESHOLD_FITS = {
    "foldmean": " (fitted on OOF scores shaped like the fold-averaged test probabilities: it moves "
    "with how much the fold models disagree on the test images)",
    "rate": " (where the test probabilities predict the OOF's fake rate)",
    "pooled": " (the OOF blend's threshold as is)",
}


def _md_estimate(s: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The estimate, the best single model next to it, and the two predicted fake rates."""
    single = s.get("best_single") or {}
    if s.get("estimate_single_fold") is not None:  # after --mode test with the foldmean threshold
        lines = [
            f"- **Estimate** (of the submission's F1): {_fmt(s['estimate'])} = outer loop "
            f"{_fmt(s['estimate_single_fold'])}{_se(s)} + fold-average gain {s['fold_mean_gain']:+.4f} (the "
            "fold models' disagreement on the test images, removed by averaging them)"
            + (", capped at 1" if _capped(s) else ""),
        ]
    else:
        lines = [
            f"- **Estimate** (outer loop: the whole choice made without each fold, scored on it): "
            f"{_fmt(s.get('estimate'))}{_se(s)}",
        ]
    if (s.get("fold_mean_gain") or 0.0) > WEAK_GAIN:
        lines.append("- **Warning**: " + weak_models_note(s["fold_mean_gain"], b.get("threshold_fit")))
    if single:
        lines.append(f"- Best single model: `{single['name']}`, nested-CV F1 {_fmt(single['mean'])}")
    if b.get("test_threshold") is not None:
        how = _THRESHOLD_FITS.get(b.get("threshold_fit"), "")
        lines.append(f"- Threshold applied to the submission: {_fmt(b['test_threshold'])}{how}")
    rates = (s.get("oof_positive_rate"), s.get("test_positive_rate"))
    if rates[0] is not None:
        test = (
            "not measured by this run (--mode test measures it)"
            if rates[1] is None
            else f"{100 * rates[1]:.1f}%"
        )
        at = "the threshold above" if rates[1] is None else "the submission's threshold"
        lines.append(f"- Predicted fake rate: OOF {100 * rates[0]:.1f}% at {at}; submission {test}")
        gap = s.get("rate_gap", RATE_GAP)
        if rates[1] is not None and abs(rates[1] - rates[0]) > gap:
            lines.append(f"- **Warning:** the two fake rates differ by more than {100 * gap:.1f} points")
    return lines


def _md_outer(report: dict[str, Any]) -> list[str]:
    """Per held-out fold: what the outer loop chose without it and how that scored, next to the best
    single model chosen the same way, and the fixed best single model (its nested-CV scores)."""
    outer = report["blend"].get("outer")
    if not outer:
        return []
    single = outer.get("best_single") or {}
    picked = outer.get("single_chosen_per_fold") or []
    rows = []
    for i, (f, c, v) in enumerate(
        zip(report["folds"], outer["chosen_per_fold"], outer["per_fold"], strict=True)
    ):
        alone = (
            f"{_fmt(outer['single_per_fold'][i])} ({picked[i].removeprefix('single:')})" if picked else "—"
        )
        rows.append([str(f), c, _fmt(v), alone, _fmt(single["per_fold"][i]) if single else "—"])
    means = [_fmt(outer["mean"]), _fmt(outer.get("single_mean")), _fmt(single.get("mean"))]
    rows.append(["**mean**", f"(all folds: `{outer['chosen']}`)", *means])
    fixed = f"fixed best single ({single.get('name', '—')}), nested CV"
    header = ["held-out fold", "chosen without it", "F1", "best single model chosen without it", fixed]
    return ["## Outer loop (the estimate)", "", *_md_table(header, rows)]


def _md_models(report: dict[str, Any]) -> list[str]:
    """One row per model plus the blend: F1@0.5, best F1 @ threshold, AUC, log-loss, accuracy."""
    rows = []
    entries = [(name, t["overall"]) for name, t in report["models"].items()]
    entries.append((f"**blend ({report['blend']['method']})**", report["blend"]["overall"]))
    for name, m in entries:
        rows.append(
            [
                name,
                _fmt(m["f1_05"]),
                f"{_fmt(m['best_f1'])} @ {_fmt(m['best_threshold'])}",
                _fmt(m["auc"]),
                _fmt(m["logloss"]),
                _fmt(m["accuracy"]),
            ]
        )
    header = ["model", "F1@0.5", "best F1 @ thr", "AUC", "log-loss", "accuracy@0.5"]
    return ["## Models (all OOF rows)", "", *_md_table(header, rows)]


def _md_folds(report: dict[str, Any]) -> list[str]:
    """Best F1 on each fold by model, and the blend at the chosen threshold."""
    folds = [str(f) for f in report["folds"]]
    rows = [
        [name, *(_fmt(t["per_fold"][f]["best_f1"]) for f in folds)] for name, t in report["models"].items()
    ]
    b = report["blend"]
    rows.append(["blend (best F1)", *(_fmt(b["per_fold"][f]["best_f1"]) for f in folds)])
    rows.append(["blend @ threshold", *(_fmt(b["per_fold"][f]["f1_at_threshold"]) for f in folds)])
    nested = b["nested"].get(b["method"])
    if nested:
        rows.append(["blend nested-CV", *(_fmt(v) for v in nested["per_fold"])])
    return ["## Per-fold F1", "", *_md_table(["model", *(f"fold {f}" for f in folds)], rows)]


def _md_methods_weights(report: dict[str, Any]) -> list[str]:
    """Blend methods compared by nested-CV F1, then the chosen blend's weights."""
    b = report["blend"]
    lines = ["## Blend methods and single models (nested CV)", ""]
    if b["nested"]:
        rows = [
            [f"**{m}**" if m == b["method"] else m, _fmt(r["mean"]), " / ".join(map(_fmt, r["per_fold"]))]
            for m, r in b["nested"].items()
        ]
        lines += _md_table(["candidate", "nested-CV F1", "per fold"], rows)
    else:
        lines += ["No nested comparison was run.", ""]
    lines += ["## Weights", ""]
    if b["weights"]:
        lines += _md_table(["model", "weight"], [[k, _fmt(v)] for k, v in b["weights"].items()])
    else:
        lines += ["No weights recorded.", ""]
    return lines


def _md_correlation(report: dict[str, Any]) -> list[str]:
    """Pearson and Spearman correlation of model OOF predictions."""
    lines = ["## Correlation of OOF predictions", ""]
    for kind in ("pearson", "spearman"):
        mat = report["correlation"][kind]
        if not mat:
            continue
        names = list(mat)
        rows = [[a, *(_fmt(mat[a][b], 3) for b in names)] for a in names]
        lines += [f"{kind.capitalize()}:", "", *_md_table(["", *names], rows)]
    return lines


def _render_markdown(report: dict[str, Any], out_dir: Path | None = None) -> str:
    """The readable report; plots are linked only if they exist in ``out_dir`` (when given)."""
    lines = [
        *_md_summary(report),
        *_md_models(report),
        *_md_folds(report),
        *_md_outer(report),
        *_md_methods_weights(report),
        *_md_correlation(report),
        "## Plots",
        "",
    ]
    for name in report.get("plots", []):
        if out_dir is None or (Path(out_dir) / name).is_file():
            lines += [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})", ""]
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """A short fixed-width table for the terminal: models, then the blend with its threshold and F1s."""
    b = report["blend"]
    names = list(report["models"])
    blend_name = f"blend [{method_label(report)}]"
    width = max(len(s) for s in [*names, blend_name, "model"])
    lines = [f"{'model':<{width}}  {'F1@0.5':>7}  {'best F1':>7}  {'AUC':>7}  {'thr':>7}  {'nested':>7}"]
    for name in names:
        m = report["models"][name]["overall"]
        cells = (m["f1_05"], m["best_f1"], m["auc"], m["best_threshold"], None)
        lines.append(f"{name:<{width}}  " + "  ".join(f"{_fmt(c):>7}" for c in cells))
    cells = (b["f1_05"], b["in_sample_f1"], b["overall"]["auc"], b["threshold"], b["nested_cv_f1"])
    lines.append("-" * len(lines[0]))
    lines.append(f"{blend_name:<{width}}  " + "  ".join(f"{_fmt(c):>7}" for c in cells))
    lines.append("(blend: best F1 = in-sample F1 at the chosen threshold; nested = nested-CV F1)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> None:
    """Write a figure atomically as PNG and free it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def _thin(*arrays: np.ndarray) -> list[np.ndarray]:
    """Keep at most MAX_CURVE_POINTS evenly spaced points (plus the ends) so plots stay fast and small."""
    n = len(arrays[0])
    if n <= MAX_CURVE_POINTS:
        return list(arrays)
    idx = np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).astype(np.int64))
    return [a[idx] for a in arrays]


def _colors(k: int) -> list[Any]:
    """Distinct colours for k models."""
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def _plot_f1_threshold(
    path: Path, y: np.ndarray, probs: dict[str, np.ndarray], blended: np.ndarray, report: dict[str, Any]
) -> None:
    """F1 against threshold: the blend in bold with the chosen threshold marked, each model faintly.

    Drawn as steps (F1 at ``thr[i]`` holds down to the next lower score, where the mid-gap threshold
    of ``best_threshold`` sits), not as lines between the points."""
    b = report["blend"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for color, (name, p) in zip(_colors(len(probs)), probs.items(), strict=True):
        t, f = _thin(*f1_curve(y, p))
        ax.plot(t, f, color=color, lw=0.9, alpha=0.35, label=name, drawstyle="steps-post")
    t, f = _thin(*f1_curve(y, blended))
    ax.plot(t, f, color="black", lw=2, label=f"blend ({b['method']})", drawstyle="steps-post")
    thr = b["threshold"]
    ax.axvline(thr, color="red", ls="--", lw=1)
    ax.plot(
        [thr],
        [b["overall"]["f1_at_threshold"]],
        "o",
        color="red",
        label=f"threshold {thr:.4f}: F1 {b['overall']['f1_at_threshold']:.4f}",
    )
    ax.set(
        xlabel="threshold (fake if p >= threshold)",
        ylabel="F1",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"{report['exp']}: F1 vs threshold",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def _plot_pr(
    path: Path, y: np.ndarray, probs: dict[str, np.ndarray], blended: np.ndarray, report: dict[str, Any]
) -> None:
    """Precision-recall curves of the blend and each model, with average precision in the legend."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    if y.sum() > 0:
        curves = [*zip(probs.items(), _colors(len(probs)), strict=True), (("blend", blended), "black")]
        for (name, p), color in curves:
            prec, rec, _ = precision_recall_curve(y, p)
            prec, rec = _thin(prec, rec)
            lw, alpha = (2.0, 1.0) if name == "blend" else (0.9, 0.5)
            ax.plot(
                rec,
                prec,
                color=color,
                lw=lw,
                alpha=alpha,
                label=f"{name} (AP {average_precision_score(y, p):.4f})",
            )
        ax.legend(fontsize=7, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no positives: precision-recall undefined", ha="center")
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"{report['exp']}: precision-recall",
    )
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_per_fold(path: Path, report: dict[str, Any]) -> None:
    """Best F1 per fold, grouped by fold, one bar per model and the blend; nested-CV F1 as crosses."""
    folds = [str(f) for f in report["folds"]]
    series = {name: [t["per_fold"][f]["best_f1"] for f in folds] for name, t in report["models"].items()}
    series["blend"] = [report["blend"]["per_fold"][f]["best_f1"] for f in folds]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(folds) + 0.25 * len(series)), 4.5))
    x = np.arange(len(folds))
    width = 0.8 / len(series)
    colors = [*_colors(len(series) - 1), "black"]
    for i, ((name, vals), color) in enumerate(zip(series.items(), colors, strict=True)):
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=name, color=color, alpha=0.85)
    nested = report["blend"]["nested"].get(report["blend"]["method"])
    if nested:  # over the blend's own bar, the last of each group
        at = x - 0.4 + width * (len(series) - 0.5)
        ax.plot(at, nested["per_fold"], "rx", ms=9, mew=2, label="blend nested-CV")
    values = [v for vals in series.values() for v in vals]
    ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.03) + 1e-9)
    ax.set_xticks(x, [f"fold {f}" for f in folds])
    ax.set(ylabel="best F1", title=f"{report['exp']}: best F1 per fold")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def _plot_hist(path: Path, y: np.ndarray, blended: np.ndarray, report: dict[str, Any]) -> None:
    """Blended probabilities by true class, with the threshold line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bins = np.linspace(0, 1, 51)
    n_real = int((y == 0).sum())
    ax.hist(blended[y == 0], bins=bins, alpha=0.55, color="tab:blue", label=f"real (0), n={n_real}")
    ax.hist(blended[y == 1], bins=bins, alpha=0.55, color="tab:red", label=f"fake (1), n={int(y.sum())}")
    ax.axvline(report["blend"]["threshold"], color="black", ls="--", label="threshold")
    ax.set(xlabel="blended probability", ylabel="rows", title=f"{report['exp']}: blended probabilities")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_confusion(path: Path, y: np.ndarray, blended: np.ndarray, report: dict[str, Any]) -> None:
    """Confusion matrix of the blend at the chosen threshold, counts annotated."""
    thr = report["blend"]["threshold"]
    cm = confusion_matrix(y, (blended >= thr).astype(np.int64), labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            f"{v}",
            ha="center",
            va="center",
            fontsize=12,
            color="white" if v > cm.max() / 2 else "black",
        )
    ax.set_xticks([0, 1], ["real (0)", "fake (1)"])
    ax.set_yticks([0, 1], ["real (0)", "fake (1)"])
    f1 = report["blend"]["overall"]["f1_at_threshold"]
    ax.set(xlabel="predicted", ylabel="true", title=f"{report['exp']}: threshold {thr:.4f}, F1 {f1:.4f}")
    _save(fig, path)


def _plot_correlation(path: Path, report: dict[str, Any]) -> None:
    """Heatmap of the Pearson correlation of model OOF predictions."""
    mat = report["correlation"]["pearson"]
    names = list(mat)
    values = np.array([[np.nan if mat[a][b] is None else mat[a][b] for b in names] for a in names])
    values = values.astype(np.float64).reshape(len(names), len(names))
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    if names:
        lowest = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
        im = ax.imshow(values, cmap="viridis", vmin=min(0.0, lowest), vmax=1.0)
        fig.colorbar(im, ax=ax, fraction=0.046)
        if len(names) <= 15:
            for (i, j), v in np.ndenumerate(values):
                ax.text(
                    j,
                    i,
                    "" if np.isnan(v) else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v < 0.7 else "black",
                )
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no models", ha="center")
    ax.set_title(f"{report['exp']}: Pearson correlation of OOF predictions")
    _save(fig, path)


def _write_plots(
    out_dir: Path, y: np.ndarray, probs: dict[str, np.ndarray], blended: np.ndarray, report: dict[str, Any]
) -> list[str]:
    """Draw every plot in PLOTS into ``out_dir``; return the file names written."""
    _plot_f1_threshold(out_dir / "f1_threshold.png", y, probs, blended, report)
    _plot_pr(out_dir / "pr_curve.png", y, probs, blended, report)
    _plot_per_fold(out_dir / "per_fold_scores.png", report)
    _plot_hist(out_dir / "prob_hist.png", y, blended, report)
    _plot_confusion(out_dir / "confusion.png", y, blended, report)
    _plot_correlation(out_dir / "correlation.png", report)
    return [name for name in PLOTS if (out_dir / name).is_file()]


def _like_for_like(report: dict[str, Any]) -> tuple[float, float, str]:
    """(chosen, best single, how) scored alike: the outer loop's pair when there is one; else the
    estimate without the fold-average gain (which a single model's nested CV does not include either)
    against the best single model's nested CV."""
    s, outer = report["summary"], report.get("blend", {}).get("outer") or {}
    if outer.get("mean") is not None and outer.get("single_mean") is not None:
        return float(outer["mean"]), float(outer["single_mean"]), "outer loop"
    chosen = s.get("estimate_single_fold", s["estimate"])
    return float(chosen), float(s["best_single"]["mean"]), "without the fold-average gain"


def _single_label(report: dict[str, Any]) -> str:
    """The best single model as ``_like_for_like`` scores it: in the outer loop it is chosen again
    without each fold, so it may be another model on some folds; then all of them are named."""
    outer = report.get("blend", {}).get("outer") or {}
    picked = [str(n).removeprefix("single:") for n in outer.get("single_chosen_per_fold") or []]
    if outer.get("single_mean") is None or not picked:
        return str(report["summary"]["best_single"]["name"])
    if len(set(picked)) == 1:  # the outer loop's own pick, which the number next to it scores
        return picked[0]
    counts = {n: picked.count(n) for n in dict.fromkeys(picked)}
    return "chosen per fold (" + ", ".join(f"{n} on {c} fold{'s' * (c > 1)}" for n, c in counts.items()) + ")"


def blend_vs_best(report: dict[str, Any]) -> str:
    """One line comparing the blend with the best single model, both as pooled OOF F1 at their own
    tuned thresholds: the claim a competitor cares about is "the ensemble beats my best model", and
    the line says so plainly when it does not."""
    s = report["summary"]
    if s.get("best_single") and s.get("estimate") is not None:  # issue 10: both out of sample
        chosen, single, where = _like_for_like(report)
        gap = chosen - single
        if str(s["method"]).startswith("single:"):
            verdict = "a single model was chosen (no blend beat it beyond the noise)"
        else:
            verdict = (
                f"the ensemble wins by {gap:+.4f}" if gap > 0 else "the ensemble does not beat it"
                if gap < 0 else "a tie: the ensemble does not beat it"
            )  # fmt: skip
        return (
            f"chosen [{s['method']}] estimate {_fmt(s['estimate'])}; {where}: chosen {_fmt(chosen)} vs "
            f"best single model {_single_label(report)} {_fmt(single)}: {verdict}"
        )
    name, best = max(((n, m["overall"]["best_f1"]) for n, m in report["models"].items()), key=lambda t: t[1])
    gap = s["in_sample_f1"] - best
    verdict = (
        f"the blend wins by {gap:+.4f}"
        if gap > 0
        else "the blend does not beat it"
        if gap < 0
        else "a tie: the blend does not beat it"
    )
    return (
        f"blend [{s['method']}] OOF F1 {_fmt(s['in_sample_f1'])} (nested-CV {_fmt(s['nested_cv_f1'])}) vs "
        f"best single model {name} {_fmt(best)}: {verdict}"
    )


#: Smallest gap between the OOF's and the submission's predicted fake rates that is worth a warning.
RATE_GAP = 0.02


def rate_gap(oof_rate: float, n_test: int | None) -> float:
    """How far the submission's fake rate may sit from the OOF's before it is worth a warning:
    ``RATE_GAP``, or three binomial standard errors of a rate over ``n_test`` images when that is
    wider (90 test images at 50%: 16 points, which noise alone can give; 80,000: 0.5, so
    ``RATE_GAP`` rules)."""
    if not n_test:
        return RATE_GAP
    return max(RATE_GAP, 3.0 * math.sqrt(max(oof_rate * (1.0 - oof_rate), 1e-12) / n_test))


def add_test_rate(
    out_dir: Path,
    test_rate: float,
    threshold: float,
    extra: dict[str, Any] | None = None,
    n_test: int | None = None,
) -> dict[str, Any]:
    """Record the submission's predicted fake rate over ``n_test`` readable images (and the threshold
    it used) in report.json and report.md, atomically, with the gap to the OOF rate worth a warning
    (``rate_gap``); ``extra`` summary keys (the fold-mean estimate) too. Returns the report."""
    path = Path(out_dir) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FoldkitError(f"{path}: cannot read the OOF report to add the test fake rate: {exc}") from exc
    report["summary"]["test_positive_rate"] = _plain(float(test_rate))
    report["blend"]["test_positive_rate"] = _plain(float(test_rate))
    report["blend"]["test_threshold"] = float(threshold)
    for key, value in (extra or {}).items():
        report["summary"][key] = _plain(value)
    oof_rate = report["summary"].get("oof_positive_rate")
    report["summary"]["rate_gap"] = rate_gap(oof_rate, n_test) if oof_rate is not None else RATE_GAP
    atomic_write_text(path.with_name("report.md"), _render_markdown(report, out_dir))
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def estimate_line(report: dict[str, Any]) -> str:
    """The closing line of ensemble.py: the number to expect on the test set, and what it beats."""
    s = report["summary"]
    if s.get("estimate_single_fold") is not None:  # test mode: the submission's own estimate
        capped = ", capped at 1" if _capped(s) else ""
        how = f"outer loop + fold-average gain{capped}; expect this test F1"
    else:  # val mode: the fold models are averaged on the test set only by --mode test
        how = "outer loop; --mode test adds the fold-average gain of the submission"
    line = f"estimate ({how}): {_fmt(s.get('estimate'))}{_se(s)} [{method_label(report)}]"
    if not s.get("best_single"):
        return line
    chosen, single, where = _like_for_like(report)  # never the estimate against another kind of score
    best = f"best single model {_single_label(report)} {_fmt(single)}"
    return f"{line}; {where}: chosen {_fmt(chosen)} vs {best}"


def main(argv: list[str] | None = None) -> int:
    """``python -m foldkit.report oof/<exp>/report.json``: print the terminal summary of a report."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m foldkit.report", description="Print the summary of an OOF report.json"
    )
    parser.add_argument("report", type=Path, help="oof/<exp>/report.json, or its folder oof/<exp>")
    args = parser.parse_args(argv)
    from foldkit.cli import run

    return run(lambda _: _print_report(args.report))


def _make_report_command(path: Path) -> str:
    """The ``ensemble.py`` command that writes ``path``: with its experiment and work folder when the
    path has the ``<work-dir>/oof/<exp>/report.json`` layout."""
    words = ["python", script("ensemble.py"), "--mode", "val"]
    if path.parent.parent.name == "oof":
        words += ["--exp", path.parent.name, "--work-dir", str(path.parent.parent.parent)]
    return shlex.join(words)


def _print_report(path: Path) -> int:
    """The summary of ``path`` (a report.json, its folder, or the report.md beside it)."""
    if path.is_dir() or path.suffix == ".md":
        path = (path if path.is_dir() else path.parent) / "report.json"
    make = _make_report_command(path)
    if not path.is_file():
        raise FoldkitError(f"{path} not found (make it with {make})")
    again = f"make it again with {make}"
    report = read_json_artifact(path, again)
    try:
        print(summary_table(report))
        print(blend_vs_best(report))
    except (KeyError, TypeError, ValueError) as exc:  # valid JSON, but not (all of) a foldkit report
        raise FoldkitError(f"{path} is not a whole foldkit report (missing or odd: {exc}); {again}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
