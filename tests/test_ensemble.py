"""ensemble.py on tiny training artifacts: report, submission, cache reuse, and refusals by name."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special

import ensemble
import main
from foldkit import PROJECT_ROOT
from foldkit.calibrate import apply_platt
from foldkit.cli import run
from foldkit.data import read_test
from foldkit.io import FoldkitError
from foldkit.submission import read_submission

PNGS = ["f1_threshold.png", "pr_curve.png", "per_fold_scores.png", "prob_hist.png", "confusion.png"]


def _ensemble(work: Path, data: Path, *extra: str) -> int:
    return run(ensemble.main, ["--exp", "demo", "--work-dir", str(work), "--data-dir", str(data), *extra])


def test_val_mode_writes_report_and_no_submission(trained_copy: Path, tiny_data: Path, capsys) -> None:
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 0
    out_dir = trained_copy / "oof/demo"
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["models"]) == {"test_efficientnet", "test_convnext"}
    method = report["blend"]["method"]
    assert method in ("mean", "rank", "logit", "weighted", "caruana") or method.startswith("single:")
    md = (out_dir / "report.md").read_text()
    for png in PNGS:
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert not (trained_copy / "submissions/demo").exists()
    out = capsys.readouterr().out
    assert "test_convnext" in out and "blend" in out


def test_test_mode_writes_a_valid_submission_from_the_oof_fitted_blend(
    trained_copy: Path, tiny_data: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "prediction.txt"
    argv = ["--mode", "test", "--blend", "mean", "--calibration", "none", "--prediction_file", str(copy)]
    assert _ensemble(trained_copy, tiny_data, *argv) == 0
    sub = read_submission(trained_copy / "submissions/demo/prediction.txt")
    assert sub.name.tolist() == read_test(tiny_data).name.tolist()
    assert set(sub.label) <= {0, 1}
    assert copy.read_bytes() == (trained_copy / "submissions/demo/prediction.txt").read_bytes()
    record = json.loads((trained_copy / "submissions/demo/ensemble.json").read_text())
    assert record["options"]["blend"] == "mean" and record["options"]["calibration"] == "none"
    assert record["options"]["exps"] == ["demo"] and record["method"] == "mean"
    assert sorted(record["models"]) == ["test_convnext", "test_efficientnet"]
    report = json.loads((trained_copy / "oof/demo/report.json").read_text())
    assert record["threshold"] == pytest.approx(report["blend"]["test_threshold"])
    probs = pd.read_csv(trained_copy / "submissions/demo/probs.csv", dtype={"name": str})
    # each fold's two models blended (the mean blend, as fitted), then the folds' log-odds mean
    fold_probs = [
        [pd.read_csv(trained_copy / f"oof/demo/{bb}/test_fold{k}.csv").prob for k in (0, 1)]
        for bb in ("test_efficientnet", "test_convnext")
    ]
    per_fold = np.mean(fold_probs, axis=0)  # (K, n): the mean blend within each fold
    log_odds = special.logit(np.clip(per_fold, 1e-7, 1 - 1e-7))
    np.testing.assert_allclose(probs.prob, special.expit(log_odds.mean(axis=0)), atol=2e-7)
    per_model = probs[["prob_test_efficientnet", "prob_test_convnext"]].to_numpy().T
    model_log_odds = special.logit(np.clip(fold_probs, 1e-7, 1 - 1e-7)).mean(axis=1)
    np.testing.assert_allclose(per_model, special.expit(model_log_odds), atol=2e-7)
    # the default: each fold model through the Platt map fitted on its own OOF rows, recorded per fold
    assert _ensemble(trained_copy, tiny_data, "--mode", "test", "--blend", "mean") == 0
    platt = json.loads((trained_copy / "oof/demo/report.json").read_text())["blend"]["platt"]
    assert set(platt) == {"0", "1"}
    assert any(v != [1.0, 0.0] for fold in platt.values() for v in fold.values())  # not all identity
    calibrated = [
        [apply_platt(fold_probs[j][k], platt[str(k)][bb]) for k in (0, 1)]
        for j, bb in enumerate(("test_efficientnet", "test_convnext"))
    ]
    log_odds = special.logit(np.clip(np.mean(calibrated, axis=0), 1e-7, 1 - 1e-7))
    probs = pd.read_csv(trained_copy / "submissions/demo/probs.csv", dtype={"name": str})
    np.testing.assert_allclose(probs.prob, special.expit(log_odds.mean(axis=0)), atol=2e-7)
    report = json.loads((trained_copy / "oof/demo/report.json").read_text())
    threshold = report["blend"]["test_threshold"]  # the one applied (default --threshold-fit foldmean)
    # probs.csv keeps 8 decimals
    assert (probs.prob[probs.label == 1] >= threshold - 1e-8).all()
    assert (probs.prob[probs.label == 0] < threshold + 1e-8).all()
    assert report["summary"]["test_positive_rate"] == pytest.approx(probs.label.mean(), abs=1e-6)
    for bb in ("test_efficientnet", "test_convnext"):
        for k in (0, 1):
            cached = pd.read_csv(trained_copy / f"oof/demo/{bb}/test_fold{k}.csv", dtype={"name": str})
            assert cached.name.tolist() == sub.name.tolist()


def test_test_predictions_are_cached_and_reused(trained_copy: Path, tiny_data: Path, monkeypatch) -> None:
    assert _ensemble(trained_copy, tiny_data, "--mode", "test") == 0
    first = (trained_copy / "submissions/demo/prediction.txt").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr("foldkit.ensemble.predict_checkpoint", refuse)
    assert _ensemble(trained_copy, tiny_data, "--mode", "test") == 0
    assert (trained_copy / "submissions/demo/prediction.txt").read_bytes() == first
    # a test image replaced under the same name invalidates the cache (new public/private split)
    image = tiny_data / read_test(tiny_data).path.iloc[0]
    original = image.read_bytes()
    try:
        image.write_bytes(original)  # same name, new file times
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
        with pytest.raises(AssertionError, match="cache should have been used"):
            _ensemble(trained_copy, tiny_data, "--mode", "test")
    finally:
        image.write_bytes(original)


def test_checkpoint_changed_after_its_oof_is_refused(trained_copy: Path, tiny_data: Path, capsys) -> None:
    best = trained_copy / "models/demo/test_convnext/fold0/best.pt"
    best.write_bytes(best.read_bytes() + b"\0")
    assert _ensemble(trained_copy, tiny_data, "--mode", "test") == 2
    err = capsys.readouterr().err
    assert "do not match their checkpoints" in err and "test_convnext fold 0" in err
    assert not (trained_copy / "submissions").exists()
    # the hint retrains that model's fold like its sound folds; run as printed, the ensemble works
    (command,) = [ln.split(" with ", 1)[1].rstrip(")") for ln in err.splitlines() if "retrain those" in ln]
    config = trained_copy / "models/demo/test_convnext/fold1/config.yaml"
    assert command == shlex.join(
        ["python", "main.py", "--config", str(config), "--exp", "demo", "--model", "test_convnext",
         "--data-dir", str(tiny_data), "--work-dir", str(trained_copy), "--fold", "0"]
    )  # fmt: skip
    assert run(main.main, shlex.split(command)[2:]) == 0
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 0


def test_backbone_never_trained_is_named(trained_copy: Path, tiny_data: Path, capsys) -> None:
    shutil.rmtree(trained_copy / "oof/demo/test_convnext")
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 2
    assert "test_convnext (no fold)" in capsys.readouterr().err
    assert _ensemble(trained_copy, tiny_data, "--mode", "val", "--allow-partial") == 0
    report = json.loads((trained_copy / "oof/demo/report.json").read_text())
    assert set(report["models"]) == {"test_efficientnet"}


def test_weighted_blend_options_reach_the_fit(trained_copy: Path, tiny_data: Path) -> None:
    argv = ["--mode", "val", "--blend", "weighted", "--blend-objective", "auc", "--blend-solver", "hill"]
    assert _ensemble(trained_copy, tiny_data, *argv) == 0
    blend = json.loads((trained_copy / "oof/demo/report.json").read_text())["blend"]
    assert blend["method"] == "weighted"
    assert blend["weighted_fit"] == {"objective": "auc", "solver": "hill"}
    assert sum(blend["weights"].values()) == pytest.approx(1.0)


def test_missing_fold_is_named_and_allow_partial_leaves_the_model_out(
    trained_copy: Path, tiny_data: Path, capsys
) -> None:
    (trained_copy / "oof/demo/test_convnext/fold1.csv").unlink()
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 2
    assert "test_convnext fold 1" in capsys.readouterr().err
    assert not (trained_copy / "oof/demo/report.json").exists()
    assert _ensemble(trained_copy, tiny_data, "--mode", "test", "--allow-partial") == 0
    report = json.loads((trained_copy / "oof/demo/report.json").read_text())
    assert set(report["models"]) == {"test_efficientnet"}
    assert "test_convnext" in json.dumps(report["blend"])


def test_mixed_folds_hashes_are_refused(trained_copy: Path, tiny_data: Path, capsys) -> None:
    meta_path = trained_copy / "oof/demo/test_convnext/fold0.json"
    meta = json.loads(meta_path.read_text())
    meta["folds_hash"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    assert _ensemble(trained_copy, tiny_data, "--mode", "test") == 2
    err = capsys.readouterr().err
    assert "different folds" in err and "test_convnext fold 0" in err
    assert not (trained_copy / "submissions").exists()


def test_duplicate_oof_row_is_refused(trained_copy: Path, tiny_data: Path, capsys) -> None:
    path = trained_copy / "oof/demo/test_efficientnet/fold0.csv"
    df = pd.read_csv(path, dtype={"name": str})
    pd.concat([df, df.iloc[:1]]).to_csv(path, index=False)
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 2
    assert "more than once" in capsys.readouterr().err


def test_other_tta_repredicts_oof_too(trained_copy: Path, tiny_data: Path) -> None:
    assert _ensemble(trained_copy, tiny_data, "--mode", "test", "--tta", "none") == 0
    for k in (0, 1):
        assert (trained_copy / f"oof/demo/test_convnext/fold{k}.tta-none.csv").is_file()
        assert (trained_copy / f"oof/demo/test_convnext/test_fold{k}.tta-none.csv").is_file()
    assert json.loads((trained_copy / "oof/demo/report.json").read_text())["blend"]["tta"] == ["none"]


def test_the_oofs_tta_spelled_otherwise_reuses_the_oof(trained_copy: Path, tiny_data: Path, caplog) -> None:
    """``none,hflip`` builds the transforms of the OOF files' ``hflip``: no re-prediction, no new cache."""
    assert json.loads((trained_copy / "oof/demo/test_convnext/fold0.json").read_text())["tta"] == ["hflip"]
    with caplog.at_level(logging.INFO, logger="foldkit"):
        assert _ensemble(trained_copy, tiny_data, "--mode", "val", "--tta", "none,hflip") == 0
    assert "re-predicting" not in caplog.text
    assert not list(trained_copy.glob("oof/demo/*/*.tta-*"))
    assert json.loads((trained_copy / "oof/demo/report.json").read_text())["blend"]["tta"] == ["hflip"]


def test_unknown_experiment_and_tta_exit_2(trained: Path, tiny_data: Path, capsys) -> None:
    assert (
        run(ensemble.main, ["--exp", "nope", "--work-dir", str(trained), "--data-dir", str(tiny_data)]) == 2
    )
    assert "nope" in capsys.readouterr().err
    assert _ensemble(trained, tiny_data, "--tta", "spin") == 2


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "ensemble.py", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    for option in (
        "--mode",
        "--data-dir",
        "--work-dir",
        "--exp",
        "--blend",
        "--tta",
        "--prediction_file",
        "--allow-partial",
    ):
        assert option in out.stdout


@pytest.mark.slow
def test_whole_toolkit_from_the_command_line(tmp_path: Path) -> None:
    """As a user runs it: synthetic data -> folds -> main.py -> ensemble.py -> the seed's test mode."""
    data, work = tmp_path / "data", tmp_path / "work"

    def sh(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    sh(
        "-m",
        "foldkit.synthetic",
        "--out",
        str(data),
        "--n-train",
        "60",
        "--n-validate",
        "20",
        "--n-test",
        "16",
        "--seed",
        "5",
        "--size",
        "48",
    )
    sh(
        "-m",
        "foldkit.folds",
        "--data-dir",
        str(data),
        "--work-dir",
        str(work),
        "--k",
        "3",
        "--group-regex",
        r"S\d+",
    )
    sh(
        "main.py",
        "--config",
        "configs/demo.yaml",
        "--data-dir",
        str(data),
        "--work-dir",
        str(work),
        "--set",
        "data.k=3",
        "--epochs",
        "2",
        "--img-size",
        "32",
        "--batch",
        "16",
    )
    out = sh(
        "ensemble.py", "--mode", "test", "--exp", "demo", "--data-dir", str(data), "--work-dir", str(work)
    )
    assert "submission:" in out.stdout
    sub = read_submission(work / "submissions/demo/prediction.txt")
    assert sub.name.tolist() == read_test(data).name.tolist()
    shutil.copy(work / "models/demo/test_resnet/fold2/best.pt", tmp_path / "1.pth")
    seed = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "main.py"),
            "--batch=4",
            "--mode=test",
            "--model_name",
            "1.pth",
            "--data-dir",
            str(data),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert seed.returncode == 0, seed.stderr[-3000:]
    assert len((tmp_path / "prediction.txt").read_text().splitlines()) == 16


def test_several_experiments_blend_together(trained_copy: Path, tiny_data: Path) -> None:
    """``--exp a,b`` blends every model of both, names them exp/backbone, and writes under a+b."""
    for sub in ("models", "oof"):
        shutil.copytree(trained_copy / sub / "demo", trained_copy / sub / "demo2")
    argv = [
        "--exp",
        "demo,demo2",
        "--work-dir",
        str(trained_copy),
        "--data-dir",
        str(tiny_data),
        "--mode",
        "test",
    ]
    assert run(ensemble.main, argv) == 0
    report = json.loads((trained_copy / "oof/demo+demo2/report.json").read_text())
    assert set(report["models"]) == {
        f"{e}/{b}" for e in ("demo", "demo2") for b in ("test_efficientnet", "test_convnext")
    }
    sub = read_submission(trained_copy / "submissions/demo+demo2/prediction.txt")
    assert sub.name.tolist() == read_test(tiny_data).name.tolist()


def test_blend_choices_are_the_blend_modules_methods() -> None:
    from foldkit.blend import METHODS

    assert tuple(METHODS) == ensemble.BLEND_METHODS


def test_nothing_trained_says_train_first_with_the_real_command(
    tmp_path: Path, tiny_data: Path, capsys
) -> None:
    assert (
        run(ensemble.main, ["--mode", "test", "--work-dir", str(tmp_path), "--data-dir", str(tiny_data)]) == 2
    )
    err = capsys.readouterr().err
    assert "nothing is trained" in err and "foldkit.folds" not in err
    command = f"python main.py --config configs/default.yaml --data-dir {tiny_data} --work-dir {tmp_path}"
    assert f"{command} --fold all" in err


def test_hints_name_main_py_by_its_path_outside_the_project(
    tmp_path: Path, tiny_data: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from another folder, a pasted ``python main.py`` would not find the script."""
    monkeypatch.chdir(tmp_path)
    argv = ["--mode", "test", "--work-dir", str(tmp_path / "w"), "--data-dir", str(tiny_data)]
    assert run(ensemble.main, argv) == 2
    hint = shlex.split(re.search(r"train first:\n  (python .*)\n", capsys.readouterr().err).group(1))
    assert hint[1] == str(PROJECT_ROOT / "main.py") and Path(hint[1]).is_file()
    assert hint[2:4] == ["--config", "configs/default.yaml"]  # main.py finds it in the project
    with pytest.raises(FoldkitError, match=r"first with python /\S+/main\.py --data-dir d --work-dir w"):
        main.resolve_checkpoint("1.pth", Path("w"), Path("d"))


def test_unknown_experiment_names_the_trained_ones(trained: Path, tiny_data: Path, capsys) -> None:
    argv = ["--work-dir", str(trained), "--data-dir", str(tiny_data)]  # --exp default, but only demo exists
    assert run(ensemble.main, argv) == 2
    err = capsys.readouterr().err
    assert "no OOF predictions for experiment 'default'" in err
    assert "trained there: demo (pass --exp demo)" in err


def test_missing_fold_hint_is_a_command_that_trains_exactly_that_fold(
    trained_copy: Path, tiny_data: Path, capsys
) -> None:
    import main

    (trained_copy / "oof/demo/test_convnext/fold1.csv").unlink()
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 2
    err = capsys.readouterr().err
    hint = re.search(r"train them with (python main\.py .*), or pass --allow-partial", err)
    assert hint, err
    words = shlex.split(hint.group(1))
    saved = str(trained_copy / "models/demo/test_convnext/fold0/config.yaml")  # the resolved config
    assert words[2:] == [
        "--config", saved, "--exp", "demo", "--data-dir", str(tiny_data), "--work-dir", str(trained_copy),
        "--fold", "1", "--model", "test_convnext",
    ]  # fmt: skip
    assert run(main.main, words[2:]) == 0  # pasted as is: it trains what is missing, nothing else
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 0


def test_allow_partial_is_offered_only_where_a_model_has_every_fold(
    trained_copy: Path, tiny_data: Path, capsys
) -> None:
    for csv in trained_copy.glob("oof/demo/*/fold1.csv"):
        csv.unlink()  # no model has every fold: --allow-partial would only fail next
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 2
    err = capsys.readouterr().err
    assert "missing OOF predictions" in err and "--allow-partial" not in err


def test_hint_names_the_shipped_config_when_the_run_used_it_unchanged(
    trained_copy: Path, tiny_data: Path
) -> None:
    from foldkit.config import load_config, to_dict
    from foldkit.ensemble import Options, config_arg, train_command

    shipped = to_dict(load_config(PROJECT_ROOT / "configs/demo.yaml"))
    for sidecar in (trained_copy / "oof/demo").glob("*/fold*.json"):
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "config": shipped}))
    assert config_arg(trained_copy, "demo") == "configs/demo.yaml"
    opts = Options(tiny_data, trained_copy, ["demo"])
    folders = f"--data-dir {tiny_data} --work-dir {trained_copy}"
    assert (
        train_command(opts, "demo", "0,2")
        == f"python main.py --config configs/demo.yaml {folders} --fold 0,2"
    )


def test_hint_for_runs_started_but_never_finished_names_their_saved_config(
    trained_copy: Path, tiny_data: Path
) -> None:
    """No OOF yet (every fold stopped before its end): the hint's config is a started run's resolved
    one, which main.py resumes; the shipped demo.yaml has other settings, which it would refuse."""
    from foldkit.ensemble import config_arg

    shutil.rmtree(trained_copy / "oof")
    saved = trained_copy / "models/demo/test_convnext/fold0/config.yaml"
    assert config_arg(trained_copy, "demo") == str(saved)
    for path in (trained_copy / "models/demo").glob("*/fold*/config.yaml"):
        path.write_text((PROJECT_ROOT / "configs/demo.yaml").read_text())  # started with it unchanged
    assert config_arg(trained_copy, "demo") == "configs/demo.yaml"
    shutil.rmtree(trained_copy / "models")
    assert config_arg(trained_copy, "demo") == "configs/demo.yaml"  # nothing started: the shipped one


def test_lost_folds_json_is_named_with_the_retrain_command(
    trained_copy: Path, tiny_data: Path, capsys
) -> None:
    shutil.rmtree(trained_copy / "folds")
    assert _ensemble(trained_copy, tiny_data, "--mode", "val") == 2
    err = capsys.readouterr().err
    assert f"{trained_copy / 'folds/folds.json'} is missing" in err and "foldkit.folds" not in err
    assert f"--exp demo --data-dir {tiny_data} --work-dir {trained_copy} --fold all" in err


def test_fold_pipelines_blend_each_fold_and_keep_rank_scores_in_the_oof_range() -> None:
    from foldkit.blend import fit_blend
    from foldkit.calibrate import fold_average
    from foldkit.ensemble import fold_pipelines

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    P = np.clip(0.5 * y[:, None] + rng.random((400, 2)) * 0.5, 0.01, 0.99)
    top = np.array([0.999, 0.999])  # one test image above every OOF score of both models
    folds_cal = [[np.r_[top[j], 0.5] if f == 0 else np.r_[0.3, 0.5] for f in range(3)] for j in range(2)]
    rank = fit_blend(P, y, "rank")
    oof = rank.apply(P)
    per_fold = fold_pipelines(rank, folds_cal, oof)
    assert per_fold.shape == (3, 2)
    assert per_fold[0, 0] == pytest.approx(oof.max()) and oof.max() < 1.0  # not exactly 1
    unclipped = np.stack([rank.apply(np.column_stack([c[f] for c in folds_cal])) for f in range(3)])
    assert unclipped[0, 0] == 1.0
    assert fold_average(per_fold)[0] < fold_average(unclipped)[0] - 0.1  # one fold no longer outvotes
    mean = fit_blend(P, y, "mean")  # a probability blend is left as it is, beyond the OOF range too
    np.testing.assert_allclose(fold_pipelines(mean, folds_cal, mean.apply(P))[0], [0.999, 0.5])


def test_test_mode_warns_about_test_names_also_in_train(
    trained_copy: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    """The test set often arrives after training: ensemble.py, which reads it, says what main.py says."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    name = (data / "train/train_label.txt").read_text().split()[0]
    shutil.copy(data / "train" / name, data / "test" / name)
    with open(data / "test/test_label.txt", "a", encoding="utf-8") as fh:
        fh.write(f"{name}\n")
    assert _ensemble(trained_copy, data, "--mode", "test") == 0
    assert f"1 of 13 test names also appear in train/validate (e.g. {name})" in capsys.readouterr().err


def test_test_mode_without_a_test_label_file_lists_the_folder_once(
    trained_copy: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "test/test_label.txt").unlink()
    assert _ensemble(trained_copy, data, "--mode", "test") == 0
    assert capsys.readouterr().err.count("test_label.txt; indexing the") == 1
    assert len((trained_copy / "submissions/demo/prediction.txt").read_text().splitlines()) == 12


def test_an_experiment_listed_twice_is_refused(trained_copy: Path, tiny_data: Path, capsys) -> None:
    assert _ensemble(trained_copy, tiny_data, "--exp", "demo,demo") == 2
    assert "--exp lists 'demo' more than once" in capsys.readouterr().err
    assert not (trained_copy / "oof/demo+demo").exists()
