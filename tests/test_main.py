"""main.py end to end on tiny data: the exact files it leaves, OOF integrity, determinism, seed mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_tiny

import main
from foldkit import PROJECT_ROOT, preflight
from foldkit.cli import run
from foldkit.config import from_dict
from foldkit.data import read_test
from foldkit.folds import load_folds

BACKBONES = ["test_efficientnet", "test_convnext"]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_leaves_exactly_the_contracted_files(trained: Path) -> None:
    expected = {"folds/folds.csv", "folds/folds.json"}
    expected |= {f"store/trainval-32x32/{f}" for f in (".lock", "images.u8", "index.csv", "store.json")}
    for bb in BACKBONES:
        for k in (0, 1):
            run_dir = f"models/demo/{bb}/fold{k}"
            expected |= {
                f"{run_dir}/{f}"
                for f in ("best.pt", "last.pt", "config.yaml", "history.csv", "train.log", ".lock")
            }
            expected |= {f"oof/demo/{bb}/fold{k}.csv", f"oof/demo/{bb}/fold{k}.json"}
    assert _files(trained) == expected


def test_oof_covers_each_holdout_name_exactly_once(trained: Path) -> None:
    folds_df, _ = load_folds(trained)
    for bb in BACKBONES:
        for k in (0, 1):
            oof = pd.read_csv(trained / f"oof/demo/{bb}/fold{k}.csv", dtype={"name": str})
            assert list(oof.columns) == ["name", "label", "fold", "prob"]
            holdout = folds_df[folds_df.fold == k]
            assert sorted(oof.name) == sorted(holdout.name)
            assert oof.name.is_unique
            assert (oof.fold == k).all()
            assert oof.prob.between(0, 1).all() and oof.prob.notna().all()
            labels = dict(zip(holdout.name, holdout.label, strict=True))
            assert [labels[n] for n in oof.name] == oof.label.tolist()


def test_checkpoint_loads_weights_only_with_config_and_folds_hash(trained: Path) -> None:
    _, meta = load_folds(trained)
    ckpt = torch.load(
        trained / "models/demo/test_convnext/fold1/best.pt", map_location="cpu", weights_only=True
    )
    assert ckpt["folds_hash"] == meta["hash"]
    assert ckpt["backbone"] == "test_convnext" and ckpt["fold"] == 1 and ckpt["epoch"] == 1
    assert ckpt["metric"] == "loss" and 0 <= ckpt["threshold"] <= 1  # configs/demo.yaml selects on loss
    cfg = from_dict(ckpt["config"])
    assert cfg.data.k == 2 and cfg.data.img_size == 32 and cfg.train.epochs == 1
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    last = torch.load(
        trained / "models/demo/test_convnext/fold1/last.pt", map_location="cpu", weights_only=True
    )
    assert {"optimizer", "scheduler", "raw_model", "step"} <= set(last)
    history = pd.read_csv(trained / "models/demo/test_convnext/fold1/history.csv")
    assert list(history.epoch) == [1]
    assert {"train_loss", "val_loss", "auc", "f1_05", "best_f1", "threshold", "img_s"} <= set(history.columns)
    assert "epoch 1/1" in (trained / "models/demo/test_convnext/fold1/train.log").read_text()


def test_same_seed_gives_identical_oof(tiny_data: Path, trained: Path, tmp_path: Path) -> None:
    assert train_tiny(tiny_data, tmp_path, "--model", "test_efficientnet", "--fold", "0") == 0
    a = (trained / "oof/demo/test_efficientnet/fold0.csv").read_bytes()
    b = (tmp_path / "oof/demo/test_efficientnet/fold0.csv").read_bytes()
    assert a == b


def test_seed_style_test_mode_writes_prediction_txt(
    tiny_data: Path, trained: Path, tmp_path: Path, monkeypatch
) -> None:
    shutil.copy(trained / "models/demo/test_efficientnet/fold0/best.pt", tmp_path / "1.pth")
    monkeypatch.chdir(tmp_path)
    argv = ["--batch=4", "--mode=test", "--model_name", "1.pth", "--data-dir", str(tiny_data)]
    assert run(main.main, argv) == 0
    lines = (tmp_path / "prediction.txt").read_text().splitlines()
    expected = read_test(tiny_data).name.tolist()
    assert [line.split(" ")[0] for line in lines] == expected
    assert {line.split(" ")[1] for line in lines} <= {"0", "1"}
    assert run(main.main, [*argv, "--prediction_file", "other.txt", "--threshold", "0"]) == 0
    assert {line.split(" ")[1] for line in (tmp_path / "other.txt").read_text().splitlines()} == {"1"}


def test_test_mode_missing_checkpoint_lists_the_ones_written(trained: Path, tiny_data: Path, capsys) -> None:
    argv = [
        "--mode",
        "test",
        "--model_name",
        "nope.pth",
        "--work-dir",
        str(trained),
        "--data-dir",
        str(tiny_data),
    ]
    assert run(main.main, argv) == 2
    err = capsys.readouterr().err
    assert "nope.pth" in err and "best.pt" in err and "last.pt" not in err
    for fold in range(2):  # every backbone's best checkpoints are named (4 of them: none left out)
        for backbone in ("test_efficientnet", "test_convnext"):
            assert str(trained / f"models/demo/{backbone}/fold{fold}/best.pt") in err


def test_a_file_that_is_no_checkpoint_is_called_that(tmp_path: Path) -> None:
    """A report or a text file given as --model_name: not a torch file, not "a pickled object"."""
    from foldkit.io import FoldkitError
    from foldkit.predict import load_checkpoint

    for name, text in (("report.json", '{"exp": "demo"}'), ("notes.txt", "hello")):
        (tmp_path / name).write_text(text)
        with pytest.raises(FoldkitError, match=rf"{name}: not a torch checkpoint \(it starts with"):
            load_checkpoint(tmp_path / name)
    torch.save({"model": {}}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:40])
    with pytest.raises(FoldkitError, match=r"cut\.pt: cannot be loaded as a checkpoint \(\w+Error"):
        load_checkpoint(tmp_path / "cut.pt")


def test_help_lists_every_option_with_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "main.py", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    for option in (
        "--config",
        "--data-dir",
        "--work-dir",
        "--exp",
        "--fold",
        "--backbones",
        "--model",
        "--set",
        "--epochs",
        "--batch",
        "--lr",
        "--img-size",
        "--device",
        "--workers",
        "--seed",
        "--mode",
        "--model_name",
        "--prediction_file",
    ):
        assert option in out.stdout
    assert "configs/default.yaml" in out.stdout and "prediction.txt" in out.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "train.epoch=3"], "did you mean 'train.epochs'"),
        (["--set", "train.epochs=many"], "train.epochs"),
        (["--model", "resnet50"], "not in the config's backbones"),
        (["--fold", "7"], "folds must be in 0..1"),
        (["--fold", "0..3"], "folds must be in 0..1"),
        (["--device", "cuda:0"], "CUDA is not available"),
        (["--set", "augment.jpeg_quality=[50]"], "augment.jpeg_quality"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tiny_data: Path, tmp_path: Path, capsys, argv, message) -> None:
    assert train_tiny(tiny_data, tmp_path, *argv) == 2
    assert message in capsys.readouterr().err
    assert _files(tmp_path) == set()


def test_pretrained_unavailable_stops_with_offline_options(tiny_data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "main.py",
        "--config",
        "configs/demo.yaml",
        "--set",
        "pretrained=true",
        "--data-dir",
        str(tiny_data),
        "--work-dir",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "will not silently train from scratch" in out.stderr
    assert (
        "pretrained_file" in out.stderr
        and "HF_HUB_OFFLINE" in out.stderr
        and "pretrained=false" in out.stderr
    )
    assert _files(tmp_path) == set()


def test_pretrained_file_missing_is_named(tiny_data: Path, tmp_path: Path, capsys) -> None:
    argv = ["--set", "pretrained=true", "--set", "pretrained_file=/nowhere/{backbone}.safetensors"]
    assert train_tiny(tiny_data, tmp_path, *argv) == 2
    assert "/nowhere/test_efficientnet.safetensors" in capsys.readouterr().err


def test_oof_probabilities_are_not_constant(trained: Path) -> None:
    probs = pd.read_csv(trained / "oof/demo/test_convnext/fold0.csv").prob.to_numpy()
    assert np.ptp(probs) > 0


def test_parse_folds_accepts_lists_ranges_and_all() -> None:
    assert preflight.parse_folds("all", 5) == [0, 1, 2, 3, 4]
    assert preflight.parse_folds("0..4", 5) == [0, 1, 2, 3, 4]
    assert preflight.parse_folds("3,1,1", 5) == [1, 3]
    assert preflight.parse_folds("0,2..3", 5) == [0, 2, 3]


def test_seed_test_mode_rejects_unknown_tta(trained: Path, tiny_data: Path, tmp_path: Path, capsys) -> None:
    ckpt = trained / "models/demo/test_efficientnet/fold0/best.pt"
    argv = [
        "--mode",
        "test",
        "--model_name",
        str(ckpt),
        "--data-dir",
        str(tiny_data),
        "--tta",
        "spin",
        "--prediction_file",
        str(tmp_path / "p.txt"),
    ]
    assert run(main.main, argv) == 2
    assert "unknown TTA" in capsys.readouterr().err
    assert not (tmp_path / "p.txt").exists()


def test_best_checkpoint_threshold_is_tuned_on_the_tta_oof(trained: Path) -> None:
    from foldkit.blend import best_threshold

    ckpt = torch.load(
        trained / "models/demo/test_convnext/fold0/best.pt", map_location="cpu", weights_only=True
    )
    oof = pd.read_csv(trained / "oof/demo/test_convnext/fold0.csv")
    assert ckpt["threshold_tta"] == ["hflip"]
    assert ckpt["threshold"] == pytest.approx(
        best_threshold(oof.label.to_numpy(), oof.prob.to_numpy())[0], abs=1e-7
    )


def test_refold_with_other_settings_is_refused_while_oof_depends_on_it(
    trained_copy: Path, tiny_data: Path, capsys
) -> None:
    before = (trained_copy / "folds/folds.csv").read_bytes()
    assert train_tiny(tiny_data, trained_copy, "--set", "data.fold_seed=7") == 2
    err = capsys.readouterr().err
    assert "seed 42 -> 7" in err and "demo" in err and "--refold" in err
    assert (trained_copy / "folds/folds.csv").read_bytes() == before


def test_ema_accumulation_early_stop_and_workers_are_deterministic(tiny_data: Path, tmp_path: Path) -> None:
    extra = [
        "--model",
        "test_efficientnet",
        "--fold",
        "0",
        "--epochs",
        "3",
        "--workers",
        "2",
        "--set",
        "train.ema=true",
        "--set",
        "train.ema_decay=0.9",
        "--set",
        "train.accum_steps=2",
        "--set",
        "train.patience=1",
        "--set",
        "train.metric=loss",
        "--set",
        "train.pos_weight=balanced",
    ]
    for run_dir in ("a", "b"):
        assert train_tiny(tiny_data, tmp_path / run_dir, *extra) == 0
    a, b = (tmp_path / d / "oof/demo/test_efficientnet/fold0.csv" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    last = torch.load(tmp_path / "a/models/demo/test_efficientnet/fold0/last.pt", weights_only=True)
    assert "ema" in last and last["step"] >= 1


@pytest.mark.parametrize("metric, kept", [("loss", 1), ("last", 3)])
def test_metric_last_keeps_the_final_weights_where_loss_would_not(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metric: str, kept: int
) -> None:
    """Validation loss made to rise every epoch: ``loss`` keeps epoch 1, ``last`` the final (EMA)
    weights, which are then exactly last.pt's eval weights."""
    import foldkit.train as train_mod

    real, calls = train_mod.epoch_metrics, []

    def rising(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        calls.append(1)
        return {**real(y, p), "val_loss": float(len(calls))}

    monkeypatch.setattr(train_mod, "epoch_metrics", rising)
    extra = ["--backbones", "test_efficientnet", "--fold", "0", "--epochs", "3", "--set", "train.ema=true",
             "--set", f"train.metric={metric}"]  # fmt: skip
    assert train_tiny(tiny_data, tmp_path, *extra) == 0
    fold = tmp_path / "models/demo/test_efficientnet/fold0"
    best = torch.load(fold / "best.pt", weights_only=True)
    last = torch.load(fold / "last.pt", weights_only=True)
    assert best["epoch"] == kept and best["val"]["val_loss"] == kept
    same = all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    assert same == (kept == 3)


def test_metric_last_refuses_patience(tmp_path: Path) -> None:
    from foldkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"nothing to stop early on.*patience=null"):
        from_dict({"train": {"metric": "last", "patience": 2}})


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell on an offline machine: no HF_HUB_OFFLINE, an unresolvable hub, an empty cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": "https://hub.invalid", "HF_HOME": str(tmp_path / "hf-home")}


def test_missing_data_folder_is_one_line_exit_2_before_any_hub_wait(tmp_path: Path) -> None:
    start = time.perf_counter()
    out = subprocess.run(  # the seed's bare command, from a folder without ./data, default config
        [sys.executable, str(PROJECT_ROOT / "main.py"), "--work-dir", str(tmp_path / "work")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_offline_env(tmp_path),
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: data folder not found: {(tmp_path / 'data').resolve()} (pass --data-dir DIR, the folder "
        "holding train/ validate/ test/ and their label files)"
    ]
    assert seconds < 10, f"{seconds:.1f} s"  # measured 0.3 s: nothing slow runs before this check
    assert not (tmp_path / "work").exists()


def test_every_cheap_problem_is_reported_in_one_run(tmp_path: Path, capsys) -> None:
    assert train_tiny(tmp_path / "no-data", tmp_path, "--model", "resnet50", "--fold", "7") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 problems stop this run:")
    assert "not in the config's backbones" in err and "folds must be in 0..1" in err
    assert f"data folder not found: {(tmp_path / 'no-data').resolve()}" in err
    assert _files(tmp_path) == set()


def test_unreachable_hub_fails_in_seconds_naming_every_backbone(tiny_data: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    cmd = [sys.executable, "main.py", "--data-dir", str(tiny_data), "--work-dir", str(tmp_path / "w")]
    out = subprocess.run(
        [*cmd, "--fold", "0"], cwd=PROJECT_ROOT, capture_output=True, text=True, env=_offline_env(tmp_path)
    )
    seconds = time.perf_counter() - start
    assert out.returncode == 2
    assert "Retrying" not in out.stderr and "Name or service not known" not in out.stderr
    backbones = ["tf_efficientnet_b3.ns_jft_in1k", "convnext_tiny.fb_in22k_ft_in1k"]  # default.yaml
    for backbone in backbones:
        assert (
            f"  {backbone}: not in the local Hugging Face cache, and https://hub.invalid is unreachable"
            in (out.stderr)
        )
    assert f"for b in {backbones}" in out.stderr  # one download command fetches both
    # torch + timm imports take ~5 s here; the hub's own retries took 52 s before the probe
    assert seconds < 30, f"{seconds:.1f} s"
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback needs a machine without CUDA")
def test_device_auto_on_cpu_warns_with_an_epoch_estimate(caplog: pytest.LogCaptureFixture) -> None:
    from foldkit.config import load_config

    overrides = [("device", "auto"), ("data.img_size", 32), ("backbones", ["test_efficientnet"])]
    cfg = load_config(PROJECT_ROOT / "configs/demo.yaml", overrides)
    preflight.check_models(cfg, cfg.backbones, n_images=1000, n_folds=5)
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    message = record.getMessage()
    assert "device 'auto' found no CUDA GPU: training on the CPU" in message
    assert "per epoch of 1000 images (test_efficientnet " in message and "x 5 fold(s)" in message
    assert "--device cuda" in message
    caplog.clear()
    preflight.check_models(
        load_config(PROJECT_ROOT / "configs/demo.yaml", overrides[1:]), ["test_efficientnet"], 1000, 5
    )
    assert not caplog.records  # device: cpu in the config is a choice, not a fallback


def test_test_names_shared_with_train_are_warned_before_training(
    tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train_names = [line.split()[0] for line in (data / "train/train_label.txt").read_text().splitlines()]
    for name in train_names[:2]:
        shutil.copy(data / "train" / name, data / "test" / name)
    with (data / "test/test_label.txt").open("a") as fh:
        fh.write("".join(f"{name}\n" for name in train_names[:2]))
    problems: list[str] = []
    assert len(preflight.check_data(data, problems)) == 40 and problems == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        f"2 of 14 test names also appear in train/validate (e.g. {train_names[0]}" in w for w in warnings
    )


def test_hub_probe_answers_within_its_timeout() -> None:
    import socket

    from foldkit.models import reachable

    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"https://127.0.0.1:{server.getsockname()[1]}"
        assert reachable(url, timeout=2)
    start = time.perf_counter()
    assert not reachable(url, timeout=2)  # closed now: refused at once
    assert not reachable("https://hub.invalid", timeout=1)  # no such name
    assert not reachable("not a url", timeout=1)
    assert time.perf_counter() - start < 4


class _SameBatchLoader:
    """``n`` copies of one fixed batch, with the sampler hook train_epoch calls."""

    class _Sampler:
        def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
            pass

    batch_sampler = _Sampler()

    def __init__(self, n: int) -> None:
        self.n = n
        gen = torch.Generator().manual_seed(0)
        self.batch = (torch.randn(4, 3, generator=gen), torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.arange(4))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


@pytest.mark.parametrize("n_batches", [3, 5])
def test_a_last_partial_accumulation_group_steps_with_a_full_sized_gradient(n_batches: int) -> None:
    """accum_steps 2 over an odd number of batches: the last group holds one batch. Its step must get
    that batch's mean gradient like every other step, not half of it (the loss divided by 2 anyway)."""
    from foldkit.config import RunConfig
    from foldkit.resume import Progress
    from foldkit.train import _make_trainer

    cfg = RunConfig(pretrained=False)
    cfg.train.accum_steps, cfg.train.grad_clip, cfg.train.ema, cfg.train.channels_last = 2, None, False, False
    cfg.train.lr = 0.0  # the weights stay put: every step sees the same gradient
    model = torch.nn.Linear(3, 1)
    trainer = _make_trainer(cfg, model, torch.device("cpu"), (n_batches + 1) // 2, 1.0)
    grads, apply = [], trainer._apply_gradients

    def record() -> None:
        grads.append(model.weight.grad.clone())
        apply()

    trainer._apply_gradients = record
    trainer.train_epoch(_SameBatchLoader(n_batches), Progress())
    assert len(grads) == (n_batches + 1) // 2
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_train_mode_says_it_ignores_test_mode_options(tiny_data: Path, tmp_path: Path, capsys) -> None:
    argv = ["--data-dir", str(tiny_data), "--work-dir", str(tmp_path), "--fold", "9", "--threshold", "0.3"]
    assert run(main.main, [*argv, "--on-bad-image", "skip"]) == 2  # fold 9: stops in preflight
    err = capsys.readouterr().err
    assert "ignores the test-mode option(s) --threshold, --on_bad_image (add --mode test; for training" in err
