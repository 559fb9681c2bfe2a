"""The estimate must predict the leaderboard: per-run seeds, visible EMA decay, fp32 logits, and
checks that can actually fail (submission vs the label file, mixed fold configs, threshold TTA)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shlex
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import train_tiny

import ensemble
import main
from foldkit.cli import run
from foldkit.config import RunConfig
from foldkit.data import read_test
from foldkit.io import FoldkitError
from foldkit.models import create_model, fp32_head
from foldkit.oof import check_fold_configs, load_oof
from foldkit.submission import label_file_names, read_submission, write_submission
from foldkit.train import _log_epoch, _make_trainer, run_seed

BACKBONES = ("test_efficientnet", "test_convnext")


def _ckpt(work: Path, backbone: str, fold: int, name: str = "best.pt") -> dict:
    return torch.load(
        work / f"models/demo/{backbone}/fold{fold}/{name}", map_location="cpu", weights_only=True
    )


# -- 1. diversity: every (backbone, fold) run has its own seed -------------------------------------


def test_run_seed_is_a_stable_mix_of_seed_backbone_and_fold() -> None:
    expected = int(np.random.SeedSequence([42, zlib.crc32(b"test_resnet"), 3]).generate_state(1)[0])
    assert run_seed(42, "test_resnet", 3) == expected  # no salted hash(): the same in every process
    seeds = {run_seed(s, b, f) for s in (42, 43) for b in BACKBONES for f in (0, 1, 2)}
    assert len(seeds) == 12  # every base seed, backbone and fold gives another stream
    assert all(0 <= s < 2**32 for s in seeds)  # fits numpy's and albumentations' seed range


def test_checkpoints_record_their_own_run_seed_and_the_log_names_it(trained: Path) -> None:
    seen = set()
    for backbone in BACKBONES:
        for fold in (0, 1):
            ckpt = _ckpt(trained, backbone, fold)
            assert ckpt["run_seed"] == run_seed(ckpt["config"]["seed"], backbone, fold)
            assert _ckpt(trained, backbone, fold, "last.pt")["run_seed"] == ckpt["run_seed"]
            meta = json.loads((trained / f"oof/demo/{backbone}/fold{fold}.json").read_text())
            assert meta["run_seed"] == ckpt["run_seed"]
            log = (trained / f"models/demo/{backbone}/fold{fold}/train.log").read_text()
            assert f"run seed {ckpt['run_seed']} (base seed {ckpt['config']['seed']})" in log
            seen.add(ckpt["run_seed"])
    assert len(seen) == 4


# -- 2. EMA: the decay in effect is visible --------------------------------------------------------


def test_history_has_an_empty_ema_decay_column_without_ema(trained: Path) -> None:
    history = pd.read_csv(trained / "models/demo/test_efficientnet/fold0/history.csv")
    assert "ema_decay" in history.columns
    assert history.ema_decay.isna().all()


def test_ema_decay_column_is_the_warmed_up_decay_at_the_epochs_last_step(
    tiny_data: Path, tmp_path: Path
) -> None:
    extra = ["--model", "test_efficientnet", "--fold", "0", "--epochs", "2"]
    assert (
        train_tiny(tiny_data, tmp_path, *extra, "--set", "train.ema=true", "--set", "train.ema_decay=0.9995")
        == 0
    )
    history = pd.read_csv(tmp_path / "models/demo/test_efficientnet/fold0/history.csv")
    steps = _ckpt(tmp_path, "test_efficientnet", 0, "last.pt")["step"]
    per_epoch = steps // 2
    ema = timm.utils.ModelEmaV3(torch.nn.Linear(1, 1), decay=0.9995, use_warmup=True)
    expected = [ema.get_decay(per_epoch), ema.get_decay(steps)]
    np.testing.assert_allclose(history.ema_decay, expected, rtol=1e-5)
    assert expected[1] < 0.9995  # the point: a short run never reaches the configured decay
    assert expected[0] < expected[1]
    log = (tmp_path / "models/demo/test_efficientnet/fold0/train.log").read_text()
    assert f"ema_decay {expected[0]:.6f}" in log and f"ema_decay {expected[1]:.6f}" in log


def test_trainer_ema_decay_is_nan_without_ema_and_the_log_line_omits_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = RunConfig(backbones=["test_efficientnet"], pretrained=False, device="cpu")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema=False))
    trainer = _make_trainer(cfg, create_model(cfg, "test_efficientnet"), torch.device("cpu"), 4, 1.0)
    assert trainer.ema is None and np.isnan(trainer.ema_decay())
    caplog.set_level(logging.INFO, logger="foldkit")
    m = {"val_loss": 0.5, "auc": 0.5, "f1_05": 0.5, "best_f1": 0.5, "threshold": 0.5}
    _log_epoch({"backbone": "b", "fold": 0}, 1, 1, 0.5, m, 10.0)
    assert "ema_decay" not in caplog.text
    _log_epoch({"backbone": "b", "fold": 0}, 1, 1, 0.5, m, 10.0, 0.25)
    assert "ema_decay 0.250000" in caplog.text


# -- 3. fp32 logits under autocast -----------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_convnext", "test_vit"])
def test_classifier_head_runs_in_fp32_under_bf16_autocast_with_unchanged_keys(backbone: str) -> None:
    """CPU bf16 autocast stands in for CUDA's (not testable here): the head must stay float32."""
    cfg = RunConfig(backbones=[backbone], pretrained=False, device="cpu")
    torch.manual_seed(0)
    plain = timm.create_model(backbone, pretrained=False, num_classes=1)
    model = create_model(cfg, backbone)
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys
    model.load_state_dict(plain.state_dict())  # and load both ways
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(x).dtype == torch.bfloat16  # what the wrapper exists for
        logits = model(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        reference = torch.nn.functional.linear(
            features.float(), plain.get_classifier().weight, plain.get_classifier().bias
        )
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    ema_copy = copy.deepcopy(model)  # timm's EMA deep-copies: the copy keeps its own fp32 head
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ema_copy(x).dtype == torch.float32
    assert fp32_head(model) is model and type(model.get_classifier()) is type(ema_copy.get_classifier())


# -- 4a. the submission is checked against the label file ------------------------------------------


def test_write_submission_refuses_a_dropped_or_reordered_name(tiny_data: Path, tmp_path: Path) -> None:
    expected = label_file_names(tiny_data)
    assert expected == read_test(tiny_data).name.tolist()
    out = tmp_path / "p.txt"
    for names in (expected[:-1], expected[::-1], [*expected[:-1], expected[0]]):
        with pytest.raises(FoldkitError):
            write_submission(out, names, np.zeros(len(names), int), expected)
        assert not out.exists()
    write_submission(out, expected, np.ones(len(expected), int), expected)
    assert read_submission(out).name.tolist() == expected


def test_write_submission_checks_the_file_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "p.txt"
    with pytest.raises(FoldkitError, match="read back"):
        write_submission(out, ["a b", "c"], np.zeros(2, int), ["a b", "c"])  # a space splits the line
    assert not out.exists()
    out.write_text("old 1\n")
    with pytest.raises(FoldkitError, match="read back"):
        write_submission(out, ["a b", "c"], np.zeros(2, int), ["a b", "c"])
    assert out.read_text() == "old 1\n"  # a failed write leaves the previous submission as it was


def test_names_with_quotes_survive_the_submission(tmp_path: Path) -> None:
    """The format has no quoting: a name that starts with a quote is written and read as it is."""
    names = ['"q.png', "a'b.png", 'x"y.png']
    out = write_submission(tmp_path / "p.txt", names, np.array([1, 0, 1]), names)
    assert out.read_text() == '"q.png 1\na\'b.png 0\nx"y.png 1\n'
    assert read_submission(out).name.tolist() == names


def _drop_first(real):
    return lambda data_dir: real(data_dir).iloc[1:].reset_index(drop=True)


def test_seed_test_mode_checks_against_the_label_file(
    trained: Path, tiny_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr("foldkit.data.read_test", _drop_first(read_test))  # what test() predicts for
    ckpt = trained / "models/demo/test_efficientnet/fold0/best.pt"
    out = tmp_path / "p.txt"
    argv = ["--mode", "test", "--model_name", str(ckpt), "--data-dir", str(tiny_data)]
    assert run(main.main, [*argv, "--prediction_file", str(out)]) == 2
    assert "submission has" in capsys.readouterr().err
    assert not out.exists()


def test_ensemble_test_mode_checks_against_the_label_file(
    trained_copy: Path, tiny_data: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(
        "foldkit.ensemble.read_test", lambda d: read_test(d).iloc[::-1].reset_index(drop=True)
    )
    argv = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data), "--mode", "test"]
    assert run(ensemble.main, argv) == 2
    assert "submission row 1" in capsys.readouterr().err
    assert not (trained_copy / "submissions/demo/prediction.txt").exists()


# -- 4b. folds of one model with different configs are named ----------------------------------------


def _edit_config(work: Path, backbone: str, fold: int, section: str | None, key: str, value) -> None:
    path = work / f"oof/demo/{backbone}/fold{fold}.json"
    meta = json.loads(path.read_text())
    (meta["config"][section] if section else meta["config"])[key] = value
    path.write_text(json.dumps(meta))


def test_folds_with_different_configs_are_warned_by_key_and_fold(
    trained_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="foldkit")
    _edit_config(trained_copy, "test_convnext", 1, "train", "lr", 0.123)
    _edit_config(trained_copy, "test_convnext", 1, "data", "workers", 7)  # harmless: not named
    _edit_config(trained_copy, "test_efficientnet", 0, None, "device", "cuda")  # harmless
    _edit_config(trained_copy, "test_efficientnet", 1, "train", "dist_timeout_s", 60)  # harmless
    oof = load_oof(trained_copy, ["demo"])
    lines = check_fold_configs(oof.models)
    assert len(lines) == 1
    assert lines[0].startswith("test_convnext: train.lr: fold 0 ")
    assert "fold 1 0.123" in lines[0]
    assert "train.lr" in caplog.text and "test_efficientnet" not in caplog.text


def test_odd_folds_get_a_command_that_retrains_them_like_the_others(
    trained_copy: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    """The warning names a command to paste: the odd fold, retrained with a common fold's saved
    config; run as printed, it leaves one config for the model and the warning goes."""
    _edit_config(trained_copy, "test_convnext", 1, "train", "lr", 0.123)  # fold 1 now looks odd
    argv = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data)]
    assert run(ensemble.main, argv) == 0
    err = capsys.readouterr().err
    (command,) = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("python main.py")]
    config = trained_copy / "models/demo/test_convnext/fold0/config.yaml"
    assert command == shlex.join(
        ["python", "main.py", "--config", str(config), "--exp", "demo", "--model", "test_convnext",
         "--data-dir", str(tiny_data), "--work-dir", str(trained_copy), "--fold", "1", "--force"]
    )  # fmt: skip
    assert run(main.main, shlex.split(command)[2:]) == 0
    assert check_fold_configs(load_oof(trained_copy, ["demo"]).models) == []


def test_folds_with_one_config_are_not_warned(trained: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="foldkit")
    oof = load_oof(trained, ["demo"])
    assert check_fold_configs(oof.models) == []
    assert "different configs" not in caplog.text


# -- 4c. test mode names a TTA other than the threshold's ------------------------------------------


def test_seed_test_mode_warns_when_tta_differs_from_the_thresholds(
    trained: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    ckpt = trained / "models/demo/test_efficientnet/fold0/best.pt"
    base = ["--mode", "test", "--model_name", str(ckpt), "--data-dir", str(tiny_data)]
    assert run(main.main, [*base, "--prediction_file", str(tmp_path / "a.txt")]) == 0
    assert "was tuned on TTA" not in capsys.readouterr().err  # the checkpoint's own TTA (hflip)
    assert run(main.main, [*base, "--tta", "vflip", "--prediction_file", str(tmp_path / "b.txt")]) == 0
    err = capsys.readouterr().err
    assert "predicting with TTA ['vflip']" in err and "tuned on TTA ['hflip']" in err
    argv = [*base, "--tta", "vflip", "--threshold", "0.5", "--prediction_file", str(tmp_path / "c.txt")]
    assert run(main.main, argv) == 0
    assert "was tuned on TTA" not in capsys.readouterr().err  # an explicit threshold is the user's own


def test_threshold_tta_warning_unit() -> None:
    assert not main.warn_threshold_tta("x", {"threshold_tta": ["hflip"]}, ["hflip"])
    assert main.warn_threshold_tta("x", {"threshold_tta": ["hflip"]}, ["none"])
    assert not main.warn_threshold_tta("x", {"threshold_tta": []}, ["none"])
    assert main.warn_threshold_tta("x", {}, ["hflip"])  # last.pt: threshold from validation, no TTA
    # the same transforms spelled otherwise: no warning
    assert not main.warn_threshold_tta("x", {"threshold_tta": ["vflip", "hflip"]}, ["hflip", "vflip", "none"])
    assert not main.warn_threshold_tta("x", {"threshold_tta": ["d4"]}, ["rot90", "hflip"])
