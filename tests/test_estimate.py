"""Issue 10: the estimate must predict the leaderboard. A threshold that fits the fold-averaged test
probabilities, Caruana selection and the simpler-candidate rule, the outer loop, the fake rates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from scipy import special

import ensemble
import foldkit.select as select
from foldkit.blend import _logloss, best_threshold, f1_at, nested_threshold_f1
from foldkit.calibrate import (
    apply_platt,
    calibrate_oof,
    fit_platt,
    fold_average,
    fold_mean_oof,
    place_threshold,
    positive_rate,
    rate_threshold,
    simulate,
)
from foldkit.cli import run
from foldkit.ensemble import record_test_rate
from foldkit.report import write_report
from foldkit.select import Candidate, beats, candidates, caruana_weights, choose, outer_loop

# -- 1. the threshold where the submission's probabilities live ------------------------------------


def _submission_f1(ratio: float, seed: int, way: str) -> float:
    """Test F1 of the fold-mean submission with the threshold placed ``way``."""
    y, folds, P, yt, PT = simulate(ratio, seed)
    rows = np.arange(len(y))
    oof = P[rows, folds][:, None]
    if way == "platt":
        oof, params = calibrate_oof(oof, y, folds, "platt")
        test = np.mean([apply_platt(PT[:, f], params[f][0]) for f in range(PT.shape[1])], axis=0)
    else:
        test = PT.mean(axis=1)
    thr, _ = place_threshold(y, oof[:, 0], test, "rate" if way == "rate" else "pooled")
    return f1_at(yt, test, thr)


@pytest.mark.parametrize("ratio", [0.05, 0.2])
def test_calibration_and_rate_matching_beat_the_pooled_oof_threshold_on_the_fold_mean(ratio: float) -> None:
    scores = {
        w: np.mean([_submission_f1(ratio, s, w) for s in range(6)]) for w in ("pooled", "rate", "platt")
    }
    assert scores["platt"] > scores["pooled"] + 0.01, scores
    assert scores["rate"] > scores["pooled"] + 0.005, scores


def test_calibrate_oof_fits_each_fold_model_on_its_own_rows() -> None:
    y, folds, P, _, _ = simulate(0.3, 1, n=900, k=3)
    oof = P[np.arange(len(y)), folds]
    M = np.column_stack([oof, oof**2])
    Pc, params = calibrate_oof(M, y, folds, "platt")
    for f in range(3):
        rows = folds == f
        assert params[f][1] == pytest.approx(fit_platt(M[rows, 1], y[rows]))
        np.testing.assert_allclose(Pc[rows, 0], apply_platt(M[rows, 0], params[f][0]))
    assert _logloss(y, Pc[:, 0]) < _logloss(y, M[:, 0])  # the mixture of calibrations is undone
    same, ident = calibrate_oof(M, y, folds, "none")
    np.testing.assert_array_equal(same, M)
    assert ident[0] == [(1.0, 0.0), (1.0, 0.0)]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_fold_mean_oof_estimates_the_f1_of_the_fold_average(ratio: float) -> None:
    """Single-model OOF under-states what averaging K diverse fold models scores; the shaped OOF,
    told only the fold models' disagreement on unlabelled test images, gets much closer."""
    raw_gap, shaped_gap = [], []
    for seed in range(3):
        y, folds, P, yt, PT = simulate(ratio, seed, own=1.2)
        oof, params = calibrate_oof(P[np.arange(len(y)), folds][:, None], y, folds, "platt")
        per_fold = np.stack([apply_platt(PT[:, f], params[f][0]) for f in range(PT.shape[1])])
        truth = best_threshold(yt, fold_average(per_fold))[1]
        shaped, spread = fold_mean_oof(oof[:, 0], y, per_fold)
        assert spread["disagreement_real"] > 0 and spread["k"] == 5
        raw_gap.append(abs(nested_threshold_f1(y, oof[:, 0], folds)["mean"] - truth))
        shaped_gap.append(abs(nested_threshold_f1(y, shaped, folds)["mean"] - truth))
    assert np.mean(shaped_gap) < 0.5 * np.mean(raw_gap) and np.mean(shaped_gap) < 0.04, (raw_gap, shaped_gap)
    same, _ = fold_mean_oof(oof[:, 0], y, per_fold[:1])  # one fold model: nothing is averaged away
    np.testing.assert_allclose(same, np.clip(oof[:, 0], 1e-7, 1 - 1e-7))


@pytest.mark.parametrize("ratio", [0.05, 0.1])
def test_the_shaped_threshold_fits_the_log_odds_fold_average_not_the_probability_mean(ratio: float) -> None:
    """fold_mean_oof models the fold average in log-odds; on the probability mean of the same fold
    models its threshold is misplaced at low prevalence (one fold model's vote lifts a real image)."""
    log_odds, prob_mean, best = [], [], []
    for seed in range(6):
        y, folds, P, yt, PT = simulate(ratio, seed)
        oof, params = calibrate_oof(P[np.arange(len(y)), folds][:, None], y, folds, "platt")
        per_fold = np.stack([apply_platt(PT[:, f], params[f][0]) for f in range(PT.shape[1])])
        thr, _ = best_threshold(y, fold_mean_oof(oof[:, 0], y, per_fold)[0])
        submission = fold_average(per_fold)
        log_odds.append(f1_at(yt, submission, thr))
        prob_mean.append(f1_at(yt, per_fold.mean(axis=0), thr))
        best.append(best_threshold(yt, submission)[1])
    assert np.mean(log_odds) > np.mean(prob_mean) + 0.01, (log_odds, prob_mean)
    assert np.mean(log_odds) > np.mean(best) - 0.03, (log_odds, best)
    np.testing.assert_allclose(fold_average(np.array([[0.5, 0.9], [0.5, 0.1]])), [0.5, 0.5])
    assert fold_average(np.array([[0.5], [1e-3]]))[0] == pytest.approx(1 / (1 + np.sqrt(999)))


def test_rate_threshold_predicts_that_share_fake() -> None:
    p = np.random.default_rng(0).random(1000)
    for rate in (0.0, 0.05, 0.37, 1.0):
        assert positive_rate(p, rate_threshold(p, rate)) == pytest.approx(rate)


# -- 3. never worse than the best member --------------------------------------------------------------


def _oof(seed: int, n: int = 500, k: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    z = 2 * y - 1
    good = special.expit(1.2 * z + rng.normal(0, 1.0, n))
    other = special.expit(0.8 * z + rng.normal(0, 1.3, n))
    noise = rng.random(n)
    return np.column_stack([good, other, noise]), y, np.arange(n) % k


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("objective", ["logloss", "auc"])
def test_caruana_never_worse_than_the_best_single_model_on_its_objective(seed: int, objective: str) -> None:
    P, y, _ = _oof(seed)
    w = caruana_weights(P, y, objective)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    if objective == "logloss":
        assert _logloss(y, P @ w) <= min(_logloss(y, P[:, j]) for j in range(3)) + 1e-12
    else:
        from foldkit.blend import _auc

        assert _auc(y, P @ w) >= max(_auc(y, P[:, j]) for j in range(3)) - 1e-12
    assert w[2] < 0.2  # the noise column earns (almost) nothing


def test_beats_needs_a_gain_larger_than_its_standard_error() -> None:
    assert beats([0.90, 0.91, 0.92, 0.93], [0.89, 0.90, 0.91, 0.92])  # +0.01 every fold, no noise
    assert not beats([0.95, 0.86, 0.95, 0.86], [0.90, 0.90, 0.90, 0.90])  # +0.005 mean, +-0.045 noise
    assert not beats([0.9] * 4, [0.9] * 4)
    assert beats([0.95, 0.86, 0.95, 0.86], [0.90, 0.90, 0.90, 0.90], z=0.1)  # z: how many SEs


def test_choose_keeps_the_best_single_model_unless_a_blend_wins_beyond_the_noise() -> None:
    P, y, folds = _oof(0)
    cands = candidates(["good", "other", "noise"])
    assert [c.name for c in cands[:3]] == ["single:good", "single:other", "single:noise"]
    assert {"mean", "caruana"} <= {c.name for c in cands}
    chosen, table = choose(P, y, folds, cands)
    assert set(table) == {c.name for c in cands}
    if chosen.kind != "single":
        assert beats(table[chosen.name]["per_fold"], table["single:good"]["per_fold"])
    # a blend of a model with pure noise never earns its place
    only = [Candidate("single:good", "single", 0), Candidate("mean", "mean")]
    assert choose(P[:, [0, 2]], y, folds, only)[0].name == "single:good"


# -- 4. the outer loop --------------------------------------------------------------------------------


def test_outer_loop_scores_each_fold_with_a_choice_made_without_it(monkeypatch) -> None:
    P, y, folds = _oof(1, k=4)
    cands = candidates(["good", "other", "noise"])
    seen: list[set[int]] = []
    real = select.choose

    def spy(P_, y_, folds_, *a, **kw):
        seen.append({int(f) for f in np.unique(folds_)})
        return real(P_, y_, folds_, *a, **kw)

    monkeypatch.setattr(select, "choose", spy)
    outer = outer_loop(P, y, folds, cands)
    assert seen == [{1, 2, 3}, {0, 2, 3}, {0, 1, 3}, {0, 1, 2}]
    for f, (name, score) in enumerate(zip(outer["chosen_per_fold"], outer["per_fold"], strict=True)):
        te = folds == f
        cand = next(c for c in cands if c.name == name)
        blend = select.fit_candidate(P[~te], y[~te], cand)
        thr, _ = best_threshold(y[~te], blend.apply(P[~te]))
        assert score == pytest.approx(f1_at(y[te], blend.apply(P[te]), thr))
    assert outer["mean"] == pytest.approx(np.mean(outer["per_fold"]))
    # the like-for-like baseline: the best single model, chosen on the same K-1 folds
    for name, single, chosen, score in zip(
        outer["single_chosen_per_fold"],
        outer["single_per_fold"],
        outer["chosen_per_fold"],
        outer["per_fold"],
        strict=True,
    ):
        assert name.startswith("single:")
        assert single == score if chosen == name else 0.0 <= single <= 1.0
    assert outer["single_mean"] == pytest.approx(np.mean(outer["single_per_fold"]))
    assert outer_loop(P[folds < 2], y[folds < 2], folds[folds < 2], cands) is None  # 2 folds: no inner CV


# -- report and ensemble.py ---------------------------------------------------------------------------


def _report(tmp_path: Path, oof_rate: float) -> Path:
    P, y, folds = _oof(2)
    info = {"method": "single:good", "weights": {"good": 1.0}, "oof_positive_rate": oof_rate, "estimate": 0.8}
    write_report(tmp_path, y, folds, {"good": P[:, 0]}, P[:, 0], info, 0.5, "demo")
    return tmp_path


def test_test_rate_is_recorded_and_a_gap_over_two_points_warns(tmp_path: Path, caplog) -> None:
    out = _report(tmp_path, 0.40)
    with caplog.at_level(logging.WARNING, logger="foldkit"):
        report = record_test_rate(out, 0.41, 0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert report["summary"]["test_positive_rate"] == pytest.approx(0.41)
    with caplog.at_level(logging.WARNING, logger="foldkit"):
        record_test_rate(out, 0.45, 0.5)
    assert any("45.0% fake" in r.getMessage() and "40.0%" in r.getMessage() for r in caplog.records)
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"]["test_positive_rate"] == pytest.approx(0.45)
    md = (out / "report.md").read_text()
    assert "OOF 40.0% at the submission's threshold; submission 45.0%" in md and "more than 2.0 points" in md
    assert "Threshold applied to the submission: 0.5000\n" in md  # no threshold_fit recorded: no reason
    info = json.loads((out / "report.json").read_text())
    info["blend"]["threshold_fit"] = "foldmean"
    (out / "report.json").write_text(json.dumps(info))
    md = (record_test_rate(out, 0.45, 0.5), (out / "report.md").read_text())[1]
    assert "Threshold applied to the submission: 0.5000 (fitted on OOF scores shaped like the fold" in md


@pytest.mark.parametrize("gain, warned", [(0.05, False), (0.3, True)])
def test_a_large_fold_average_gain_warns_that_the_models_are_weak(
    tmp_path: Path, gain: float, warned: bool
) -> None:
    out = _report(tmp_path, 0.40)
    record_test_rate(
        out, 0.40, 0.5, {"estimate": 0.8 + gain, "estimate_single_fold": 0.8, "fold_mean_gain": gain}
    )
    md = (out / "report.md").read_text()
    assert f"fold-average gain {gain:+.4f}" in md
    assert ("the fold models are weak" in md) == warned and ("--threshold-fit pooled" in md) == warned


def test_test_mode_records_both_fake_rates_and_the_estimate(
    trained_copy: Path, tiny_data: Path, capsys
) -> None:
    argv = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data), "--mode", "test"]
    assert run(ensemble.main, argv) == 0
    report = json.loads((trained_copy / "oof/demo/report.json").read_text())
    s = report["summary"]
    labels = [
        int(line.split()[1])
        for line in (trained_copy / "submissions/demo/prediction.txt").read_text().split("\n")
        if line
    ]
    assert s["test_positive_rate"] == pytest.approx(np.mean(labels), abs=1e-6)
    assert 0.0 <= s["oof_positive_rate"] <= 1.0
    assert s["best_single"]["name"] in report["models"]
    assert s["estimate"] is not None
    # 2 folds: no outer loop, so the estimate's standard error is that of the chosen nested-CV F1s
    per_fold = report["blend"]["nested"][s["method"]]["per_fold"]
    assert s["estimate_se"] == pytest.approx(np.std(per_fold, ddof=1) / np.sqrt(2), abs=1e-5)  # report: 6 dp
    md = (trained_copy / "oof/demo/report.md").read_text()
    assert "Predicted fake rate: OOF" in md and "Best single model" in md
    assert f"± {s['estimate_se']:.4f}" in md
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("estimate (") and f"± {s['estimate_se']:.4f}" in last


def test_closing_lines_name_the_estimate_and_the_best_single_model() -> None:
    from foldkit.report import blend_vs_best, estimate_line

    summary = {"method": "logit", "in_sample_f1": 0.9, "nested_cv_f1": 0.89, "estimate": 0.87}
    summary["best_single"] = {"name": "test_resnet", "mean": 0.88, "per_fold": [0.88] * 5}
    report = {"summary": summary, "models": {"test_resnet": {"overall": {"best_f1": 0.9}}}}
    assert "does not beat it" in blend_vs_best(report) and "estimate 0.8700" in blend_vs_best(report)
    line = estimate_line(report)
    assert (
        line.startswith("estimate (outer loop;") and "0.8700 [logit]" in line and "test_resnet 0.8800" in line
    )
    summary.update(estimate=0.91, estimate_single_fold=0.87, fold_mean_gain=0.04)
    assert "outer loop + fold-average gain" in estimate_line(report)
    # like with like: the fold-average gain is not a win over a single model scored without it
    assert "does not beat it" in blend_vs_best(report) and "estimate 0.9100" in blend_vs_best(report)
    report["blend"] = {"outer": {"mean": 0.89, "single_mean": 0.88}}
    expected = (
        "outer loop: chosen 0.8900 vs best single model test_resnet 0.8800: the ensemble wins by +0.0100"
    )
    assert blend_vs_best(report).endswith(expected)
    assert estimate_line(report).endswith("outer loop: chosen 0.8900 vs best single model test_resnet 0.8800")
    # re-chosen without each fold, the "best single model" may be another model on some folds
    report["blend"]["outer"]["single_chosen_per_fold"] = ["single:a", "single:test_resnet", "single:a"]
    both = "best single model chosen per fold (a on 2 folds, test_resnet on 1 fold) 0.8800"
    assert both in blend_vs_best(report) and estimate_line(report).endswith(both)
    # picked alike on every fold: that model is named, the one its score belongs to
    report["blend"]["outer"]["single_chosen_per_fold"] = ["single:a"] * 3
    assert estimate_line(report).endswith("vs best single model a 0.8800")
    summary["method"] = "single:test_resnet"
    assert "a single model was chosen" in blend_vs_best(report)


def test_uncalibrated_pooled_run_applies_the_oof_threshold_unchanged(
    trained_copy: Path, tiny_data: Path
) -> None:
    argv = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data), "--mode", "test"]
    assert run(ensemble.main, [*argv, "--calibration", "none", "--threshold-fit", "pooled"]) == 0
    report = json.loads((trained_copy / "oof/demo/report.json").read_text())
    assert report["blend"]["calibration"] == "none"
    assert report["blend"]["test_threshold"] == report["blend"]["threshold"]
    assert report["summary"]["estimate"] == pytest.approx(
        min(1.0, report["summary"]["estimate_single_fold"] + report["summary"]["fold_mean_gain"]), abs=1e-5
    )


def test_select_by_logloss_sees_what_f1_cannot() -> None:
    """Model "a" is model "b" with its calibration broken by a monotone map (p_b ** 4): the same
    ranking, so the same F1 on every fold, and F1 cannot tell them apart (the first is kept); by
    held-out log-loss "b" is better on every fold and is chosen."""
    from foldkit.io import FoldkitError
    from foldkit.select import SELECT_SCORES, candidates, choose

    rng = np.random.default_rng(0)
    n, k = 1000, 5
    y = rng.integers(0, 2, n)
    folds = np.arange(n) % k
    p_b = special.expit(np.where(y == 1, 1.5, -1.5) + rng.normal(size=n))
    P = np.column_stack([p_b**4, p_b])
    cands = candidates(["a", "b"], methods=("mean",), caruana=False)
    by_f1, table = choose(P, y, folds, cands, by="f1")
    assert table["single:a"]["per_fold"] == table["single:b"]["per_fold"]
    assert by_f1.name == "single:a"
    by_ll, table = choose(P, y, folds, cands, by="logloss")
    assert by_ll.name == "single:b"
    gain = np.subtract(table["single:b"]["per_fold_neg_logloss"], table["single:a"]["per_fold_neg_logloss"])
    assert len(gain) == k and (gain > 0).all()
    assert set(SELECT_SCORES) == {"f1", "logloss", "logloss+f1"}
    with pytest.raises(FoldkitError, match="select by"):
        choose(P, y, folds, cands, by="auc")


def test_logloss_f1_needs_a_strict_f1_win_too() -> None:
    """Two miscalibrations of one score z (calibrated log-odds 3z): "a" overconfident (5z), "b"
    underconfident (z). Their logit mean is 3z: calibrated, so a better log-loss on every fold, but
    the same ranking, so the same nested-CV F1 as either. ``logloss`` takes the blend; ``logloss+f1``
    keeps the single model: a tie is not a win."""
    rng = np.random.default_rng(1)
    n, k = 1000, 5
    y = rng.integers(0, 2, n)
    folds = np.arange(n) % k
    z = np.where(y == 1, 0.5, -0.5) + rng.normal(scale=0.5, size=n)
    P = np.column_stack([special.expit(5 * z), special.expit(z)])
    cands = candidates(["a", "b"], methods=("logit",), caruana=False)
    by_ll, table = choose(P, y, folds, cands, by="logloss")
    assert by_ll.name == "logit"
    single = max(("single:a", "single:b"), key=lambda c: np.mean(table[c]["per_fold_neg_logloss"]))
    np.testing.assert_allclose(table["logit"]["per_fold"], table[single]["per_fold"], atol=1e-12)
    assert choose(P, y, folds, cands, by="logloss+f1")[0].name == single


def test_default_test_threshold_is_fitted_on_the_fold_mean_shaped_oof(
    trained_copy: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ensemble.py --mode test`` with no --threshold-fit: the applied threshold is the best-F1
    threshold of the OOF shaped like the fold average (``fold_mean_oof``), not the pooled OOF's."""
    import foldkit.calibrate as calibrate

    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = calibrate.fold_mean_oof

    def spy(p_oof: np.ndarray, y: np.ndarray, p_test_folds: np.ndarray, **kw: int):
        out = real(p_oof, y, p_test_folds, **kw)
        seen.append((np.asarray(y), out[0]))
        return out

    monkeypatch.setattr(calibrate, "fold_mean_oof", spy)
    argv = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data), "--mode", "test"]
    assert run(ensemble.main, argv) == 0
    report = json.loads((trained_copy / "oof/demo/report.json").read_text())
    assert report["blend"]["threshold_fit"] == "foldmean" and len(seen) == 1
    y, shaped = seen[0]
    assert report["blend"]["test_threshold"] == pytest.approx(best_threshold(y, shaped)[0], abs=1e-12)
    assert report["summary"]["oof_positive_rate"] == pytest.approx(
        positive_rate(shaped, report["blend"]["test_threshold"]), abs=1e-6
    )


def test_weak_models_note_names_the_foldmean_threshold_only_where_it_was_used() -> None:
    from foldkit.report import weak_models_note

    assert "foldmean threshold" in weak_models_note(0.3, "foldmean") and "--threshold-fit pooled" in (
        weak_models_note(0.3, None)
    )
    assert "foldmean" not in weak_models_note(0.3, "pooled") and "+0.300" in weak_models_note(0.3, "pooled")


def test_ensemble_cli_choices_are_the_library_s() -> None:
    """--threshold-fit and --select-by offer exactly what foldkit.calibrate and foldkit.select accept,
    and their help names the library defaults."""
    from foldkit.calibrate import TEST_THRESHOLD_FITS
    from foldkit.ensemble import THRESHOLD_FIT
    from foldkit.select import SELECT_BY, SELECT_SCORES

    actions = {a.dest: a for a in ensemble.build_parser()._actions}
    assert set(actions["threshold_fit"].choices) == set(TEST_THRESHOLD_FITS)
    assert set(actions["select_by"].choices) == set(SELECT_SCORES)
    assert (
        f"{THRESHOLD_FIT})" in actions["threshold_fit"].help and f"{SELECT_BY})" in actions["select_by"].help
    )


def test_crossfit_calibration_never_fits_a_row_into_its_own_map() -> None:
    """Move one OOF score: the rows calibrated by the same map as it (its part of the fold) stay, so
    that map was fitted without it; the fold's other parts move (their maps saw the row). A whole-fold
    map moves every row of the fold, the row's own included: that is the leak."""
    from foldkit.calibrate import crossfit_oof

    y, folds, P, _, _ = simulate(0.5, 0, n=200, k=5, own=1.5)
    oof = P[np.arange(200), folds][:, None]
    moved_score = oof.copy()
    moved_score[7, 0] = 0.999 if oof[7, 0] < 0.5 else 0.001
    a, b = crossfit_oof(oof, y, folds, "platt"), crossfit_oof(moved_score, y, folds, "platt")
    changed = set(np.flatnonzero(a[:, 0] != b[:, 0]).tolist()) - {7}
    fold = np.flatnonzero(folds == folds[7])
    assert changed and changed < set(fold.tolist())  # only rows of its fold, not all of them
    # the other 4 parts moved; row 7's own part (a fifth of the fold, dealt within its class) did not
    assert abs(len(changed) - len(fold) * 4 / 5) <= 2
    whole = [calibrate_oof(p, y, folds, "platt")[0] for p in (oof, moved_score)]
    assert set(np.flatnonzero(whole[0][:, 0] != whole[1][:, 0]).tolist()) == set(fold.tolist())
    assert np.array_equal(crossfit_oof(oof, y, folds, "none"), oof)


def test_crossfit_estimate_is_not_optimistic_on_small_folds() -> None:
    """10 rows per fold: the nested estimate on whole-fold maps beats the same models' F1 on fresh data
    by ~0.07 (benchmarks/bench_threshold.py --crossfit); cross-fitted it is not optimistic."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_threshold import optimism

    runs = [optimism(50, seed, 1.5) for seed in range(15)]
    own, cross = (float(np.mean([r[w] for r in runs])) for w in ("own", "crossfit"))
    assert own > 0.04 and cross < 0.01  # deterministic seeds: own 0.054, cross-fitted -0.019


def test_the_estimate_with_the_fold_average_gain_never_exceeds_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """outer loop 0.83 + a gain of 0.17 or more is not an F1 of 1.0059: it is capped at 1."""
    from types import SimpleNamespace

    from foldkit.ensemble import _test_threshold

    scores = iter([{"mean": 0.95}, {"mean": 0.75}])  # nested F1: fold-mean-shaped, then as is
    monkeypatch.setattr(select, "nested_scores", lambda *a, **k: next(scores))
    rng = np.random.default_rng(0)
    y, folds = rng.integers(0, 2, 60), np.arange(60) % 3
    fitted = SimpleNamespace(
        threshold=0.5, threshold_fit="pooled", blended=rng.random(60),
        oof=SimpleNamespace(y=y, folds=folds), report={"summary": {"estimate": 0.83}},
    )  # fmt: skip
    _, extra = _test_threshold(fitted, rng.random(40), rng.random((3, 40)))
    assert extra["fold_mean_gain"] == pytest.approx(0.2) and extra["estimate"] == 1.0


def test_crossfit_leaves_a_fold_too_small_to_cross_fit_uncalibrated() -> None:
    """A fold with one row of a class cannot be calibrated without a row's own label (no map would
    see both classes): it is scored as it is. A fold with two of each is cross-fitted in 2 parts."""
    from foldkit.calibrate import crossfit_oof

    P = np.array([[0.2], [0.8], [0.3], [0.6], [0.1], [0.9]])
    y, folds = np.array([0, 1, 0, 1, 0, 1]), np.array([0, 0, 1, 1, 1, 1])
    out = crossfit_oof(P, y, folds, "platt")
    assert np.array_equal(out[:2], P[:2]) and not np.array_equal(out[2:], P[2:])
    assert np.isfinite(out).all()


def test_the_fake_rate_gap_that_warns_grows_on_a_small_test_set(tmp_path: Path, caplog) -> None:
    """On 90 test images one image is 1.1 points: a 5-point gap is noise there (3 binomial SE = 16
    points), and only a real misplacement at 80,000 images."""
    out = _report(tmp_path, 0.40)
    with caplog.at_level(logging.WARNING, logger="foldkit"):
        report = record_test_rate(out, 0.45, 0.5, n_test=90)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert report["summary"]["rate_gap"] == pytest.approx(3 * (0.4 * 0.6 / 90) ** 0.5)
    assert "differ by more than" not in (out / "report.md").read_text()
    with caplog.at_level(logging.WARNING, logger="foldkit"):
        record_test_rate(out, 0.45, 0.5, n_test=80_000)
    assert any("more than 2.0 points apart" in r.getMessage() for r in caplog.records)


def test_a_capped_estimate_and_a_val_mode_estimate_say_so() -> None:
    from foldkit.report import estimate_line

    summary = {"method": "logit", "estimate": 1.0, "estimate_single_fold": 0.95, "fold_mean_gain": 0.06}
    line = estimate_line({"summary": summary})
    assert line.startswith(
        "estimate (outer loop + fold-average gain, capped at 1; expect this test F1): 1.0000"
    )
    val = estimate_line({"summary": {"method": "logit", "estimate": 0.938}})
    assert val.startswith("estimate (outer loop; --mode test adds the fold-average gain of the submission)")


def test_a_weighted_blend_with_all_weight_on_one_model_is_named_so() -> None:
    from foldkit.report import estimate_line, method_label

    report = {"summary": {"method": "caruana", "estimate": 0.96}, "blend": {"weights": {"a": 1.0, "b": 0.0}}}
    assert method_label(report) == "caruana: all weight on a"
    assert estimate_line(report).endswith("0.9600 [caruana: all weight on a]")
    report["blend"]["weights"] = {"a": 0.7, "b": 0.3}
    assert method_label(report) == "caruana"


def test_the_rate_gap_uses_the_oof_rate_the_warning_compares_with(tmp_path: Path, caplog) -> None:
    """--mode test replaces the pooled OOF rate by the fold-mean one (extra): the gap must come from
    the rate the warning compares the submission with, not the one replaced."""
    out = _report(tmp_path, 0.957)
    with caplog.at_level(logging.WARNING, logger="foldkit"):
        report = record_test_rate(out, 0.40, 0.5, {"oof_positive_rate": 0.487}, n_test=90)
    assert report["summary"]["rate_gap"] == pytest.approx(3 * (0.487 * 0.513 / 90) ** 0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # 8.7 points: under 15.8
