"""Hardening: a device change never retrains a finished fold; a retrain says why, loudly; corrupt JSON
artifacts stop with exit 2 naming the file and the way out; batches and training splits of one image
are refused clearly; image names pandas would read as missing values survive the OOF."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_tiny

import ensemble
from foldkit.cli import run
from foldkit.config import load_config, parse_override, to_dict
from foldkit.folds import load_folds
from foldkit.io import FoldkitError, read_json_artifact
from foldkit.oof import ModelOOF, _model_column
from foldkit.resume import check_compatible, config_changes, resume_changes

OOF = "oof/demo/test_efficientnet/fold0.csv"
SIDECAR = "oof/demo/test_efficientnet/fold0.json"
ONE_FOLD = ["--model", "test_efficientnet", "--fold", "0"]


def test_device_is_harmless_for_resume_and_for_finished_folds(tmp_path: Path) -> None:
    cpu = to_dict(load_config(None, [parse_override("device=cpu")]))
    auto = to_dict(load_config(None, [parse_override("device=auto")]))
    assert config_changes(cpu, auto) == []
    ckpt = {"config": cpu, "folds_hash": "h", "backbone": "b", "fold": 0}
    check_compatible(
        tmp_path / "last.pt", resume_changes(ckpt, auto, "h", "b", 0)
    )  # a --devices run resumes plainly


def test_finished_fold_trained_on_another_device_is_skipped(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    # ``trained`` ran with the demo config's device: cpu, as a --devices cpu job would
    oof = trained_copy / OOF
    mtime = oof.stat().st_mtime_ns
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD, "--device", "auto") == 0
    err = capsys.readouterr().err
    assert "test_efficientnet fold 0: finished (its OOF matches best.pt): skipped" in err
    assert "training it again" not in err
    assert oof.stat().st_mtime_ns == mtime


def test_retraining_a_finished_fold_warns_naming_the_folds_change(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    sidecar = trained_copy / SIDECAR
    sidecar.write_text(sidecar.read_text().replace('"folds_hash": "', '"folds_hash": "0000'))
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "finished on other folds" in x]
    assert " WARNING test_efficientnet fold 0: finished on other folds (folds hash 0000" in line
    assert "training it again" in line
    # a fresh (not resumed) run starts a new train.log: one epoch 1 line, not the old run's too
    log_text = (trained_copy / "models/demo/test_efficientnet/fold0/train.log").read_text()
    assert log_text.count("epoch 1/1") == 1


def test_a_finished_fold_with_other_settings_is_kept_until_force(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    """A changed setting on the command line must not throw a finished fold away unasked: the run
    stops (exit 2) naming the change and the ways on, and every file of the fold is left as it was;
    --force trains it again."""
    fold_dir = trained_copy / "models/demo/test_efficientnet/fold0"
    files = [trained_copy / OOF, trained_copy / SIDECAR, *sorted(fold_dir.iterdir())]
    before = {f: f.read_bytes() for f in files}
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD, "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "finished with other settings:\n  test_efficientnet fold 0 (train.epochs 1 -> 2)" in err
    assert "Pass --force" in err and f"--config {trained_copy / 'models/demo'}/<backbone>" in err
    assert {f: f.read_bytes() for f in files} == before
    # fit_fold itself refuses too (a direct caller), naming this fold's own saved config
    from foldkit.config import load_config, parse_override
    from foldkit.folds import load_folds
    from foldkit.train import fit_fold

    folds_df, meta = load_folds(trained_copy)
    cfg = load_config("configs/demo.yaml", [parse_override(o) for o in ("train.epochs=2", "data.img_size=32",
                      "train.batch_size=16", "data.k=2", "train.warmup_epochs=0")])  # fmt: skip
    with pytest.raises(FoldkitError, match=r"is finished with other settings \(train.epochs 1 -> 2\)"):
        fit_fold(cfg, "test_efficientnet", 0, folds_df, meta["hash"], tiny_data, trained_copy, "demo")
    assert {f: f.read_bytes() for f in files} == before
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD, "--epochs", "2", "--force") == 0
    assert "epoch 2/2" in (fold_dir / "train.log").read_text()


def test_corrupt_folds_json_stops_main_naming_it_and_refold(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    meta = trained_copy / "folds/folds.json"
    meta.write_text(meta.read_text()[:20])
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD) == 2
    err = capsys.readouterr().err
    assert f"error: {meta} is unreadable" in err and "--refold" in err and "Traceback" not in err


def test_truncated_oof_sidecar_stops_main_and_ensemble_naming_it(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    sidecar = trained_copy / SIDECAR
    sidecar.write_text(sidecar.read_text()[:30])
    # other fold settings: main.py's refold guard reads every sidecar to see who used the folds
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD, "--set", "data.fold_seed=7") == 2
    err = capsys.readouterr().err
    assert f"error: {sidecar} is unreadable" in err and "--refold" in err
    argv = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data)]
    assert run(ensemble.main, argv) == 2
    err = capsys.readouterr().err
    assert f"error: {sidecar} is unreadable" in err and "--model test_efficientnet --fold 0" in err
    assert "--allow-partial" in err


def test_json_artifact_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "folds.json"
    path.write_text("[]")
    with pytest.raises(FoldkitError, match=r"folds\.json is unreadable \(not a JSON object\); do this"):
        read_json_artifact(path, "do this")


def test_batch_of_one_that_breaks_batchnorm_is_a_clear_error(tiny_data: Path, tmp_path: Path, capsys) -> None:
    """At 32 px the demo net's last BatchNorm sees 1x1 pixels: one image per batch cannot train.
    Whether a batch of one trains depends on the model and size, so it is explained, not refused
    up front (a checkpoint trained with batch 1 at a larger size stays usable)."""
    assert train_tiny(tiny_data, tmp_path, *ONE_FOLD, "--batch", "1") == 2
    err = capsys.readouterr().err
    assert "BatchNorm got one value per channel" in err and "train.batch_size 1 is too small" in err
    assert "Traceback" not in err
    from foldkit.config import RunConfig, from_dict, to_dict

    cfg = to_dict(RunConfig(pretrained=False))
    cfg["train"]["batch_size"] = 1
    assert from_dict(cfg).train.batch_size == 1  # an old checkpoint's config still loads


def test_training_split_of_one_image_is_a_clear_error(tiny_data: Path, trained: Path, tmp_path: Path) -> None:
    from foldkit.train import fit_fold

    folds_df, meta = load_folds(trained)
    folds_df = folds_df.assign(fold=np.where(np.arange(len(folds_df)) == 0, 1, 0))  # one image outside fold 0
    overrides = ["data.k=2", "data.img_size=32", "train.batch_size=16", "train.epochs=1"]
    cfg = load_config("configs/demo.yaml", [parse_override(o) for o in overrides])
    with pytest.raises(FoldkitError, match=r"test_efficientnet fold 0: only 1 training image\(s\)"):
        fit_fold(cfg, "test_efficientnet", 0, folds_df, meta["hash"], tiny_data, tmp_path, "demo")


def test_training_split_too_small_for_every_rank_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun with W processes each rank needs a batch of 2: 3 images on 2 ranks would give
    both an epoch of no steps (EpochBatchSampler's length is 0), so it is refused up front."""
    from foldkit import distributed
    from foldkit.dataset import EpochBatchSampler
    from foldkit.train import _check_train_size

    assert len(EpochBatchSampler(3, 16, True, 0, drop_last=True, rank=0, world_size=2)) == 0
    assert len(EpochBatchSampler(4, 16, True, 0, drop_last=True, rank=1, world_size=2)) == 1
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    folds = pd.DataFrame({"name": list("abcdefgh")})
    with pytest.raises(FoldkitError, match=r"only 3 training image\(s\).*at least 4 \(2 processes"):
        _check_train_size(folds.iloc[:3], "b fold 0", folds)
    _check_train_size(folds.iloc[:4], "b fold 0", folds)


def test_oof_names_that_look_like_missing_values_survive(tmp_path: Path) -> None:
    names = ["NA", "null", "None", "x"]
    csv = tmp_path / "fold0.csv"
    pd.DataFrame({"name": names, "label": [0, 1, 0, 1], "fold": 0, "prob": [0.1, 0.2, 0.3, 0.4]}).to_csv(
        csv, index=False
    )
    model = ModelOOF("demo", "b", "b", tmp_path, {0: csv})
    folds_df = pd.DataFrame({"name": names[::-1], "label": [1, 0, 1, 0], "fold": 0})
    np.testing.assert_allclose(_model_column(model, folds_df), [0.4, 0.3, 0.2, 0.1])


def test_a_missing_probability_is_named_with_its_file_and_line(trained_copy: Path) -> None:
    """A blank or nan prob is a damaged file, not an image without a prediction: say which line."""
    from foldkit.oof import load_oof

    csv = trained_copy / "oof/demo/test_convnext/fold1.csv"
    lines = csv.read_text().splitlines()
    name = lines[2].split(",")[0]
    lines[2] = ",".join([*lines[2].split(",")[:3], "nan"])
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(FoldkitError) as err:
        load_oof(trained_copy, ["demo"])
    expected = f"{csv}:3: 1 row(s) with a missing label, fold or prob value, e.g. {name}"
    assert str(err.value).startswith(expected)


def test_folds_that_trained_experiments_use_are_not_rebuilt_unasked(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    """main.py and python -m foldkit.folds share the guard: other fold settings with OOF files on the
    current folds stop with exit 2, naming the experiment and the flag that rebuilds them anyway."""
    from foldkit import folds

    meta = trained_copy / "folds/folds.json"
    made = meta.read_bytes()
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD, "--set", "data.group_regex=null") == 2
    err = capsys.readouterr().err
    assert "other fold settings (group_regex 'S\\\\d+' -> None) and experiment(s) demo" in err
    assert "Pass --refold" in err
    argv = ["--config", "configs/demo.yaml", "--data-dir", str(tiny_data), "--work-dir", str(trained_copy)]
    argv += ["--k", "2"]  # as the tiny runs trained (TRAIN_ARGS)
    assert folds.main([*argv, "--group-regex", "null"]) == 2
    err = capsys.readouterr().err
    assert "experiment(s) demo were trained on it" in err and "Pass --force" in err
    assert meta.read_bytes() == made
    assert folds.main(argv) == 0  # the settings they were made with: reused
    assert meta.read_bytes() == made
    assert folds.main([*argv, "--group-regex", "null", "--force"]) == 0
    assert json.loads(meta.read_text())["group_regex"] is None
    # the ensemble then names the cause (other folds), not folds "missing" under the new settings
    ens = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data)]
    assert run(ensemble.main, ens) == 2
    err = capsys.readouterr().err
    assert "OOF files were made with folds" in err and "missing OOF" not in err


def test_refold_retrains_a_finished_fold_and_same_folds_leave_it_finished(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    """Fold settings are judged by the folds they make (the hash every OOF records): --refold with
    settings that give the same folds leaves a finished fold finished; other folds retrain it."""
    oof = trained_copy / OOF
    made = oof.read_bytes()
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD, "--set", "data.fold_seed=7", "--refold") == 0
    err = capsys.readouterr().err
    assert "test_efficientnet fold 0: finished (its OOF matches best.pt): skipped" in err
    assert oof.read_bytes() == made
    assert train_tiny(tiny_data, trained_copy, *ONE_FOLD, "--set", "data.group_regex=null", "--refold") == 0
    err = capsys.readouterr().err
    assert (
        "test_efficientnet fold 0: finished on other folds (folds hash" in err and "Pass --force" not in err
    )


def test_allow_partial_leaves_out_a_model_still_on_the_old_folds(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    """After a refold, a model retrained on the new folds blends while another still on the old ones
    is left out under --allow-partial (and named); without it the run says the folds changed."""
    args = ["--set", "data.group_regex=null", "--refold"]
    assert train_tiny(tiny_data, trained_copy, "--model", "test_efficientnet", *args) == 0
    capsys.readouterr()
    ens = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(tiny_data)]
    assert run(ensemble.main, ens) == 2
    assert "OOF files come from different folds" in capsys.readouterr().err
    assert run(ensemble.main, [*ens, "--allow-partial"]) == 0
    err = capsys.readouterr().err
    assert "left out (made on other folds than folds.csv's): test_convnext" in err
    report = json.loads((trained_copy / "oof/demo/report.json").read_text())
    assert report["summary"]["method"] == "single:test_efficientnet"


def test_fold_all_with_a_changed_setting_trains_nothing_before_refusing(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    """Fold 0 unfinished, fold 1 finished: --fold all with other epochs must not train fold 0 with the
    new settings and then stop at fold 1; every finished conflict is named before anything trains."""
    fold0 = trained_copy / "models/demo/test_efficientnet/fold0"
    (trained_copy / OOF).unlink()  # fold 0 is now unfinished
    log_before = (fold0 / "train.log").read_text()
    assert train_tiny(tiny_data, trained_copy, "--model", "test_efficientnet", "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "test_efficientnet fold 1 (train.epochs 1 -> 2)" in err and "Nothing was trained." in err
    # fold 0's last.pt (epochs 1) is named too, in its own section, with its own way on
    assert "unfinished (a last.pt to resume) with other settings:\n  test_efficientnet fold 0 (train" in err
    assert "Pass --force" in err and "or --no-resume to start the unfinished ones over" in err
    assert (fold0 / "train.log").read_text() == log_before


def test_an_unfinished_fold_with_other_settings_is_refused_before_earlier_folds_train(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    """Fold 0 never started, fold 1 unfinished (a last.pt of epochs 1): --fold all --epochs 2 used to
    train fold 0 with the new settings, then stop at fold 1's checkpoint of the old ones, leaving the
    folds of one experiment on two settings. Now it stops before anything trains; --no-resume is the
    way named to start fold 1 over."""
    models = trained_copy / "models/demo/test_efficientnet"
    shutil.rmtree(models / "fold0")
    for f in (OOF, SIDECAR, OOF.replace("fold0", "fold1")):
        (trained_copy / f).unlink()
    before = (models / "fold1/last.pt").read_bytes()
    assert train_tiny(tiny_data, trained_copy, "--model", "test_efficientnet", "--epochs", "2") == 2
    err = capsys.readouterr().err
    section = "unfinished (a last.pt to resume) with other settings:\n  test_efficientnet fold 1 (train"
    assert section in err
    assert "Pass --no-resume to start the unfinished ones over" in err and "--force" not in err
    assert "Nothing was trained." in err and "finished with other settings" not in err
    assert not (models / "fold0").exists()
    assert (models / "fold1/last.pt").read_bytes() == before
    # with the old settings it resumes: no refusal up front
    assert train_tiny(tiny_data, trained_copy, "--model", "test_efficientnet", "--fold", "1") == 0
    assert "resuming from" in capsys.readouterr().err


class _BadImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> None:
        raise FoldkitError("data/x.png: cannot decode image: truncated\nsecond line")


def test_an_error_raised_in_a_loader_worker_prints_its_own_message(capsys) -> None:
    """torch re-raises a worker's exception with the worker's traceback as its message; the user
    sees what foldkit said, not 20 lines of traceback."""

    def main(argv: list[str] | None) -> int:
        for _ in torch.utils.data.DataLoader(_BadImages(), num_workers=1):
            pass
        return 0

    assert run(main, []) == 2
    err = capsys.readouterr().err
    assert err == "error: data/x.png: cannot decode image: truncated\nsecond line (in a data loader worker)\n"

    def ranked(argv: list[str] | None) -> int:  # main.py names the rank under torchrun
        try:
            return main(argv)
        except FoldkitError as exc:
            raise FoldkitError(f"rank 1 of 2: {exc}") from exc

    assert run(ranked, []) == 2
    assert capsys.readouterr().err.startswith("error: rank 1 of 2: data/x.png: cannot decode image")


def test_a_batch_that_leaves_out_much_of_a_small_split_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    """200 training images at batch 128 train on 128 per epoch: said once per fold, not silently."""
    from foldkit.train import _warn_dropped

    with caplog.at_level(logging.WARNING, logger="foldkit"):
        _warn_dropped(256_000 + 100, 128, "b fold 0")  # 100 of 256,100: nothing to say
        assert not caplog.records
        _warn_dropped(100, 128, "b fold 0")  # one partial batch: kept, all 100 train
        assert not caplog.records
        _warn_dropped(200, 128, "b fold 0")
    assert "b fold 0: batch 128 leaves out 72 of the 200 training images every epoch" in caplog.text


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Lustre mounted noflock answers flock with ENOSYS: the fold and store locks go without, said
    once each, instead of a traceback."""
    import errno
    import fcntl

    from foldkit.resume import fold_lock
    from foldkit.store import _build_lock

    def no_flock(fh: object, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr("foldkit.io._NO_FLOCK_SAID", [])
    with caplog.at_level(logging.WARNING, logger="foldkit"), fold_lock(tmp_path, "b fold 0"):
        pass
    with _build_lock(tmp_path / "store") as held:
        assert held is None
    assert caplog.text.count("this file system has no file locking") == 1  # once per process


def test_ensemble_help_states_the_values_of_its_code_defaults() -> None:
    """--help names foldkit.select.NOISE_Z and foldkit.ensemble.THRESHOLD_FIT with their values; a
    changed constant must change the help too."""
    from foldkit.ensemble import THRESHOLD_FIT
    from foldkit.select import NOISE_Z

    text = " ".join(ensemble.build_parser().format_help().split())
    assert f"foldkit.select.NOISE_Z, {NOISE_Z})" in text
    assert f"foldkit.ensemble.THRESHOLD_FIT, {THRESHOLD_FIT})" in text
