"""The OOF report: metrics against sklearn, files written atomically and complete, tables readable."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import special
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from foldkit.blend import best_threshold, choose_blend, fit_blend, nested_threshold_f1
from foldkit.io import FoldkitError
from foldkit.report import PLOTS, metrics, model_table, summary_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_case(n: int = 600, m: int = 3, k: int = 4, seed: int = 0):
    """Random OOF data plus a blend_info built the way the pipeline builds it."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.45).astype(int)
    logits = (2 * y - 1)[:, None] * np.linspace(0.6, 1.8, m) + rng.normal(size=(n, m))
    P = np.round(special.expit(logits), 4)
    folds = rng.integers(0, k, n)
    folds[:k] = np.arange(k)
    names = [f"model_{chr(97 + j)}" for j in range(m)]
    method, nested = choose_blend(P, y, folds)
    blend = fit_blend(P, y, method)
    blended = blend.apply(P)
    thr, f1 = best_threshold(y, blended)
    info = {
        "method": method,
        "weights": dict(zip(names, blend.weights.tolist(), strict=True)),
        "nested": nested,
        "in_sample_f1": f1,
        "honest": nested_threshold_f1(y, blended, folds),
        "left_out": ["model_broken"],
        "tta": ["none", "hflip"],
        "folds_hash": "abc123",
    }
    return y, folds, dict(zip(names, P.T, strict=True)), blended, info, thr


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.random(300) * 0.6 + 0.4 * y, 0, 1)
    m = metrics(y, p, threshold=0.37)
    assert m["f1_05"] == pytest.approx(f1_score(y, p >= 0.5))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["logloss"] == pytest.approx(log_loss(y, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5))
    thr, best = best_threshold(y, p)
    assert m["best_f1"] == best and m["best_threshold"] == thr
    assert m["f1_at_threshold"] == pytest.approx(f1_score(y, p >= 0.37))
    assert m["accuracy_at_threshold"] == pytest.approx(accuracy_score(y, p >= 0.37))
    assert "f1_at_threshold" not in metrics(y, p)


def test_metrics_single_class_has_no_auc() -> None:
    m = metrics(np.ones(10, dtype=int), np.linspace(0.1, 0.9, 10))
    assert m["auc"] is None and m["best_f1"] == 1.0


def test_model_table_per_fold() -> None:
    y, folds, probs, *_ = make_case(n=300, seed=2)
    table = model_table(y, folds, probs)
    assert list(table) == list(probs)
    for name, entry in table.items():
        assert set(entry["per_fold"]) == {0, 1, 2, 3}
        f = 2
        expected = metrics(y[folds == f], probs[name][folds == f])
        assert entry["per_fold"][f] == expected
        assert entry["overall"] == metrics(y, probs[name])


def test_write_report_files_json_and_markdown(tmp_path: Path) -> None:
    y, folds, probs, blended, info, thr = make_case()
    out = tmp_path / "reports" / "exp1"
    report = write_report(out, y, folds, probs, blended, info, thr, "exp1")

    assert sorted(p.name for p in out.iterdir()) == sorted(["report.json", "report.md", *PLOTS])
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name

    loaded = json.loads((out / "report.json").read_text())
    assert loaded == report  # the returned dict is exactly what was written
    for key in ("exp", "n", "fake_ratio", "summary", "models", "blend", "correlation", "plots"):
        assert key in loaded
    assert loaded["n"] == len(y) and loaded["fake_ratio"] == pytest.approx(y.mean(), abs=1e-6)
    b = loaded["blend"]
    assert b["method"] == info["method"] and b["threshold"] == thr  # thresholds are kept exact
    assert b["in_sample_f1"] == pytest.approx(info["in_sample_f1"], abs=1e-6)
    assert b["nested_cv_f1"] == pytest.approx(info["nested"][info["method"]]["mean"], abs=1e-6)
    assert b["f1_05"] == pytest.approx(f1_score(y, blended >= 0.5), abs=1e-6)
    assert set(b["nested"]) == set(info["nested"]) and b["left_out"] == ["model_broken"]
    assert b["tta"] == ["none", "hflip"] and b["folds_hash"] == "abc123"  # extra info kept
    assert set(loaded["models"]) == set(probs)
    assert set(loaded["models"]["model_a"]["per_fold"]) == {"0", "1", "2", "3"}
    for kind in ("pearson", "spearman"):
        mat = loaded["correlation"][kind]
        assert set(mat) == set(probs) and mat["model_a"]["model_a"] == pytest.approx(1.0)
    np.testing.assert_allclose(
        loaded["correlation"]["pearson"]["model_a"]["model_b"],
        np.corrcoef(probs["model_a"], probs["model_b"])[0, 1],
        atol=1e-6,
    )

    md = (out / "report.md").read_text()
    summary_pos = md.index("Blend method")
    assert summary_pos < md.index("## Models") < md.index("## Per-fold") < md.index("## Blend methods")
    assert "Nested-CV F1" in md[: md.index("## Models")] and "In-sample F1" in md[: md.index("## Models")]
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == sorted(PLOTS)
    assert all((out / name).is_file() for name in linked)
    for name in probs:
        assert name in md


def test_report_json_is_plain_python(tmp_path: Path) -> None:
    y, folds, probs, blended, info, thr = make_case(n=200, m=2, seed=3)
    report = write_report(tmp_path, y, folds, probs, blended, info, np.float64(thr), "plain")

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            assert all(isinstance(k, str) for k in obj)
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
        else:
            assert obj is None or type(obj) in (bool, int, float, str), type(obj)

    walk(report)
    json.dumps(report, allow_nan=False)


def test_summary_table_mentions_every_model(tmp_path: Path) -> None:
    y, folds, probs, blended, info, thr = make_case(n=300, m=4, seed=4)
    report = write_report(tmp_path, y, folds, probs, blended, info, thr, "sum")
    table = summary_table(report)
    for name in probs:
        assert name in table
    last = [line for line in table.splitlines() if line.startswith("blend")][-1]
    assert info["method"] in last and f"{thr:.4f}" in last
    assert f"{report['blend']['nested_cv_f1']:.4f}" in last


def test_single_model_report_and_overwrite(tmp_path: Path) -> None:
    """One model, no nested info: still a complete report; a second run replaces the files."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 120)
    p = np.clip(0.3 * rng.random(120) + 0.5 * y, 0, 1)
    folds = np.arange(120) % 3
    info = {"method": "mean", "weights": {"only": 1.0}}
    for _ in range(2):
        report = write_report(tmp_path, y, folds, {"only": p}, p, info, 0.5, "single")
    assert report["blend"]["nested_cv_f1"] is None
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["report.json", "report.md", *PLOTS])
    assert "only" in summary_table(report)


def test_write_report_rejects_mismatched_lengths(tmp_path: Path) -> None:
    y, folds, probs, blended, info, thr = make_case(n=100, m=2, seed=6)
    with pytest.raises(FoldkitError):
        write_report(tmp_path, y, folds, probs, blended[:-1], info, thr, "bad")
    assert list(tmp_path.iterdir()) == []


def test_report_cli_prints_summary_and_blend_vs_best_model(tmp_path: Path, capsys) -> None:
    from foldkit.report import main as report_main

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    folds = np.arange(300) % 3
    good = np.clip(y * 0.6 + rng.random(300) * 0.4, 0, 1)
    noise = rng.random(300)
    probs = {"good": good, "noise": noise}
    blended = (good + noise) / 2
    info = {
        "method": "mean",
        "weights": {"good": 0.5, "noise": 0.5},
        "nested": {},
        "in_sample_f1": 0.9,
        "honest": {"mean": 0.8, "per_fold": [0.8] * 3, "thresholds": [0.5] * 3},
        "left_out": [],
    }
    write_report(tmp_path, y, folds, probs, blended, info, 0.5, "t")
    assert report_main([str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "noise" in out
    last = out.strip().splitlines()[-1]
    best = json.loads((tmp_path / "report.json").read_text())["models"]["good"]["overall"]["best_f1"]
    assert last.startswith("blend [mean] OOF F1 0.9000") and f"vs best single model good {best:.4f}" in last
    assert ("the blend wins by" in last) == (best < 0.9) and ("does not beat it" in last) == (best > 0.9)
    assert report_main([str(tmp_path / "missing.json")]) == 2


def test_blend_vs_best_names_the_best_model_and_says_when_the_blend_loses() -> None:
    from foldkit.report import blend_vs_best

    report = {
        "summary": {"method": "weighted", "in_sample_f1": 0.85, "nested_cv_f1": 0.84},
        "models": {"a": {"overall": {"best_f1": 0.80}}, "b": {"overall": {"best_f1": 0.88}}},
    }
    assert blend_vs_best(report).endswith("vs best single model b 0.8800: the blend does not beat it")
    report["summary"]["in_sample_f1"] = 0.90
    assert blend_vs_best(report).endswith("vs best single model b 0.8800: the blend wins by +0.0200")


def test_report_cli_takes_the_json_its_folder_or_the_md_and_names_a_bad_file(
    trained_copy: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    import ensemble
    from foldkit.cli import run
    from foldkit.report import main

    argv = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data)]
    assert run(ensemble.main, argv) == 0
    folder = trained_copy / "oof/demo"
    capsys.readouterr()
    outputs = []
    for given in (folder / "report.json", folder, folder / "report.md"):
        assert main([str(given)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] and "estimate" in outputs[0]
    (folder / "report.json").write_text("{")
    assert main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'report.json'} is unreadable" in err and "Traceback" not in err
    (folder / "report.json").write_text("{}")
    assert main([str(folder)]) == 2
    assert "is not a whole foldkit report (missing or odd: " in capsys.readouterr().err
    assert main([str(tmp_path / "nothing")]) == 2
    assert "not found (make it with python ensemble.py --mode val)" in capsys.readouterr().err
    assert main([str(tmp_path / "w/oof/demo/report.json")]) == 2  # the layout names experiment and folder
    want = f"make it with python ensemble.py --mode val --exp demo --work-dir {tmp_path / 'w'})"
    assert want in capsys.readouterr().err


def test_platt_parameters_are_kept_exact_in_report_json() -> None:
    """report.json's calibration maps are what the submission can be recomputed from: not rounded."""
    from foldkit.report import _plain

    slope = 1.234567891234
    out = _plain({"blend": {"platt": {"0": {"m": [slope, -0.000000123456789]}}}, "auc": slope})
    assert out["blend"]["platt"]["0"]["m"] == [slope, -0.000000123456789] and out["auc"] == 1.234568
