"""Crash-safe training: a run SIGKILLed mid-epoch and resumed ends with the OOF of an uninterrupted
run; finished folds are skipped; incompatible or unsafe checkpoints are refused; NaN and OOM stop a
fold with one clear message and leave the last good checkpoint alone."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TRAIN_ARGS, train_tiny
from torch import nn

import main
from foldkit import PROJECT_ROOT
from foldkit.cli import run
from foldkit.io import FoldkitError
from foldkit.predict import load_checkpoint
from foldkit.resume import (
    check_compatible,
    config_changes,
    load_module_state,
    module_state,
    resume_changes,
    rng_state,
    set_rng_state,
)

RUN = "models/demo/test_efficientnet/fold0"
OOF = "oof/demo/test_efficientnet/fold0.csv"
# 20 training images at batch 4: 5 optimizer steps per epoch. Dropout and drop path make the torch
# RNG matter, EMA makes its state matter: a resume that lost either would not match.
RESUME_ARGS = [
    "--model", "test_efficientnet", "--fold", "0", "--epochs", "3", "--batch", "4",
    "--set", "train.drop_rate=0.3", "--set", "train.drop_path_rate=0.2",
    "--set", "train.ema=true", "--set", "train.ema_decay=0.9",
]  # fmt: skip
KILL_AT = 8  # optimizer step 8 = epoch 2, batch 3


def _main_subprocess(
    data: Path, work: Path, *extra: str, kill_at: int | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FOLDKIT_TEST_KILL_AT_STEP"}
    if kill_at is not None:
        env["FOLDKIT_TEST_KILL_AT_STEP"] = str(kill_at)
    argv = [*TRAIN_ARGS, *RESUME_ARGS, "--data-dir", str(data), "--work-dir", str(work), *extra]
    return subprocess.run(
        [sys.executable, "main.py", *argv], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def uninterrupted(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("uninterrupted")
    assert train_tiny(tiny_data, work, *RESUME_ARGS) == 0
    return work


@pytest.mark.parametrize("save_every", [None, 2])
def test_sigkilled_run_resumes_to_the_uninterrupted_oof(
    tiny_data: Path, uninterrupted: Path, tmp_path: Path, save_every: int | None
) -> None:
    extra = [] if save_every is None else ["--save-every", str(save_every)]
    killed = _main_subprocess(tiny_data, tmp_path, *extra, kill_at=KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / OOF).exists()
    killed_log = (tmp_path / RUN / "train.log").read_text(encoding="utf-8")
    assert "epoch 1/3" in killed_log
    last = load_checkpoint(tmp_path / RUN / "last.pt")
    # without --save-every the last save is epoch 1's end; with 2, batch 2 of epoch 2 (step 7)
    expected = (2, 0, 5) if save_every is None else (2, 2, 7)
    assert (last["progress"]["epoch"], last["progress"]["batch"], last["step"]) == expected

    resumed = _main_subprocess(tiny_data, tmp_path, *extra)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path / RUN / 'last.pt'} at epoch {expected[0]}, batch {expected[1]}" in (
        resumed.stderr
    )
    assert "best.pt restored" not in resumed.stderr  # both were saved: nothing to mend
    _assert_same_run(tmp_path, uninterrupted)
    assert load_checkpoint(tmp_path / RUN / "last.pt")["step"] == 15
    # the resumed run appends to train.log: the killed run's epochs stay in it
    log_text = (tmp_path / RUN / "train.log").read_text(encoding="utf-8")
    assert log_text.startswith(killed_log) and "resuming from" in log_text and "epoch 3/3" in log_text


def test_worker_count_never_changes_the_run(tiny_data: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """``data.workers`` is a harmless key: with persistent workers the validation loader makes one
    iterator, without them one per pass. Neither may draw from the global torch RNG (dropout's
    stream), or the same run would train other weights with another worker count (and a resumed run
    would differ from the one it replaces)."""
    assert load_checkpoint(uninterrupted / RUN / "last.pt")["config"]["data"]["workers"] == 0
    assert train_tiny(tiny_data, tmp_path, *RESUME_ARGS, "--workers", "1") == 0
    _assert_same_run(tmp_path, uninterrupted)


def _assert_same_run(a: Path, b: Path) -> None:
    """Same OOF bytes, same history (train_loss: the partial epoch's running loss was carried over)
    and the same final weights: the OOF alone comes from the best epoch, which may predate the kill."""
    assert (a / OOF).read_bytes() == (b / OOF).read_bytes()
    ha, hb = (pd.read_csv(w / RUN / "history.csv").drop(columns="img_s") for w in (a, b))
    pd.testing.assert_frame_equal(ha, hb)
    la, lb = (load_checkpoint(w / RUN / "last.pt") for w in (a, b))
    for key in ("model", "raw_model"):
        assert all(torch.equal(la[key][k], lb[key][k]) for k in la[key]), key


def test_finished_fold_is_skipped_and_force_retrains_it(tiny_data: Path, trained_copy: Path, capsys) -> None:
    oof = trained_copy / OOF
    before, mtime = oof.read_bytes(), oof.stat().st_mtime_ns
    assert train_tiny(tiny_data, trained_copy, "--model", "test_efficientnet", "--fold", "0") == 0
    assert "test_efficientnet fold 0: finished (its OOF matches best.pt): skipped" in capsys.readouterr().err
    assert oof.stat().st_mtime_ns == mtime
    assert train_tiny(tiny_data, trained_copy, "--model", "test_efficientnet", "--fold", "0", "--force") == 0
    err = capsys.readouterr().err
    assert ": skipped;" not in err and "resuming from" not in err and "epoch 1/1" in err
    assert oof.stat().st_mtime_ns != mtime and oof.read_bytes() == before


def test_unfinished_fold_resumes_with_harmless_changes_and_refuses_others(
    tiny_data: Path, trained_copy: Path, capsys
) -> None:
    oof = trained_copy / OOF
    before = oof.read_bytes()
    oof.unlink()  # as if killed while writing the OOF: training done, OOF missing
    args = ["--model", "test_efficientnet", "--fold", "0"]
    assert train_tiny(tiny_data, trained_copy, *args, "--lr", "0.5", "--set", "train.ema=true") == 2
    err = capsys.readouterr().err
    assert "train.lr 0.003 -> 0.5" in err and "train.ema False -> True" in err and "--no-resume" in err
    assert not oof.exists()
    assert train_tiny(tiny_data, trained_copy, *args, "--workers", "1") == 0  # workers: harmless
    err = capsys.readouterr().err
    assert "resuming from" in err and "at epoch 2, batch 0" in err
    assert oof.read_bytes() == before
    oof.unlink()
    assert train_tiny(tiny_data, trained_copy, *args, "--lr", "0.5", "--no-resume") == 0
    assert load_checkpoint(trained_copy / RUN / "best.pt")["config"]["train"]["lr"] == 0.5


def test_other_folds_hash_or_run_is_refused_naming_it(tmp_path: Path) -> None:
    ckpt = {"config": {"seed": 1, "data": {"workers": 0}}, "folds_hash": "a" * 64, "backbone": "x", "fold": 0}
    check_compatible(
        tmp_path / "last.pt", resume_changes(ckpt, {"seed": 1, "data": {"workers": 4}}, "a" * 64, "x", 0)
    )
    with pytest.raises(FoldkitError, match=r"folds hash aaaaaaaaaaaa -> bbbbbbbbbbbb.*--no-resume"):
        check_compatible(tmp_path / "last.pt", resume_changes(ckpt, ckpt["config"], "b" * 64, "x", 0))
    with pytest.raises(FoldkitError, match=r"seed 1 -> 2; run x fold 0 -> y fold 1"):
        check_compatible(
            tmp_path / "last.pt", resume_changes(ckpt, {"seed": 2, "data": {"workers": 0}}, "a" * 64, "y", 1)
        )
    assert config_changes({"train": {"epochs": 3}}, {"train": {"epochs": 5}}) == ["train.epochs 3 -> 5"]


class _FakeCompiled(nn.Module):
    """What torch.compile returns, structurally: the model under ``_orig_mod``, so every key of its
    state dict carries the ``_orig_mod.`` prefix (compiling itself is too slow for a unit test)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


def test_compile_prefix_never_breaks_loading() -> None:
    torch.manual_seed(0)
    src = _FakeCompiled(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    assert all(k.startswith("_orig_mod.") for k in src.state_dict())
    saved = module_state(src)
    assert all(not k.startswith("_orig_mod.") for k in saved)
    plain, compiled = (
        nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)),
        _FakeCompiled(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))),
    )
    load_module_state(plain, src.state_dict())  # prefixed keys into a plain model
    load_module_state(compiled, saved)  # plain keys into a compiled one
    for state in (plain.state_dict(), module_state(compiled)):
        assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave cached gaussians in both states
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def _patch_train_forward(monkeypatch: pytest.MonkeyPatch, effect) -> None:
    """Make every model fit_fold builds apply ``effect(call number, output)`` to training forwards."""
    import foldkit.train

    real = foldkit.train.create_model

    def create(cfg, backbone, *args, **kwargs):
        model = real(cfg, backbone, *args, **kwargs)
        calls = [0]

        def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            if not module.training:
                return output
            calls[0] += 1
            return effect(calls[0], output)

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(foldkit.train, "create_model", create)


def test_nan_loss_stops_the_fold_naming_it_and_keeps_the_last_good_checkpoint(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # batch 16 of 20 images: one step per epoch, so the second training forward is epoch 2's
    _patch_train_forward(monkeypatch, lambda n, out: out * float("nan") if n >= 2 else out)
    args = ["--model", "test_efficientnet", "--fold", "0", "--epochs", "3"]
    assert train_tiny(tiny_data, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert (
        "test_efficientnet fold 0: the training loss became nan in epoch 2, between optimizer steps 2 and 2"
        in err
    )
    assert "as they were. Try a lower train.lr or train.grad_clip.\n" in err  # fp32: no AMP advice
    last = load_checkpoint(tmp_path / RUN / "last.pt")
    assert last["progress"]["epoch"] == 2 and last["step"] == 1
    for name in ("last.pt", "best.pt"):
        weights = load_checkpoint(tmp_path / RUN / name)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not (tmp_path / OOF).exists()


def _fp16(monkeypatch: pytest.MonkeyPatch, overflow: Callable[[int], bool] | None = None) -> None:
    """Train as under fp16 on a GPU: a GradScaler that skips overflowed steps (autocast stays off on
    the CPU, so the arithmetic is fp32's). ``overflow(n)``: the n-th training forward outputs inf."""
    import foldkit.train

    monkeypatch.setattr(foldkit.train, "amp_dtype", lambda cfg, device: torch.float16)
    if overflow is not None:
        _patch_train_forward(monkeypatch, lambda n, out: out * float("inf") if overflow(n) else out)


def test_an_fp16_overflow_is_skipped_not_a_stop(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """One batch's loss overflows: GradScaler skips its step, the epoch's loss leaves it out, the fold
    finishes (stopping would stop it for good: a resume replays the same batch)."""
    _fp16(monkeypatch, lambda n: n == 3)
    args = ["--model", "test_efficientnet", "--fold", "0", "--epochs", "2", "--batch", "4"]
    assert train_tiny(tiny_data, tmp_path, *args) == 0
    err = capsys.readouterr().err
    assert (
        "test_efficientnet fold 0: the fp16 loss overflowed on 4 of 20 images in epoch 1, between "
        "optimizer steps 1 and 5; the loss scaler skipped those steps" in err
    )
    history = pd.read_csv(tmp_path / RUN / "history.csv")
    assert np.isfinite(history.train_loss).all() and len(history) == 2
    last = load_checkpoint(tmp_path / RUN / "last.pt")
    assert last["scaler"]["scale"] == 2.0**15  # halved once, by the overflowed step
    assert (tmp_path / OOF).is_file()


@pytest.mark.parametrize("resume_fp16", [True, False])
def test_an_fp16_overflow_before_a_mid_epoch_save_is_resumed_with_its_count(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, resume_fp16: bool
) -> None:
    """The saved progress carries the overflowed images: the resumed epoch's loss is the uninterrupted
    one's (a resume that lost the count would divide by all 20 images, not 16), also where the
    resumed run is not fp16 (``amp: auto`` on another GPU)."""
    import foldkit.train

    real_amp = foldkit.train.amp_dtype
    _fp16(monkeypatch)
    state = {"overflow": True, "interrupt": False}

    def effect(n: int, out: torch.Tensor) -> torch.Tensor:
        if state["interrupt"] and n == 4:  # epoch 1, batch 4: after the save at batch 2
            raise KeyboardInterrupt
        return out * float("inf") if state["overflow"] and n == 1 else out

    _patch_train_forward(monkeypatch, effect)
    args = [*RESUME_ARGS, "--epochs", "2", "--save-every", "2"]
    assert train_tiny(tiny_data, tmp_path / "a", *args) == 0
    state["interrupt"] = True
    assert train_tiny(tiny_data, tmp_path / "b", *args) == 130
    assert load_checkpoint(tmp_path / "b" / RUN / "last.pt")["progress"]["dropped"] == 4
    state.update(overflow=False, interrupt=False)  # the resumed process starts its count afresh
    if not resume_fp16:
        monkeypatch.setattr(foldkit.train, "amp_dtype", real_amp)
    capsys.readouterr()
    assert train_tiny(tiny_data, tmp_path / "b", *args) == 0
    err = capsys.readouterr().err
    assert "overflowed" not in err
    switched = "last.pt was trained in fp16, the rest of the run trains in fp32 (train.amp auto on this"
    assert (switched in err) != resume_fp16  # said where amp resolved otherwise
    ha, hb = (pd.read_csv(tmp_path / w / RUN / "history.csv").drop(columns="img_s") for w in ("a", "b"))
    pd.testing.assert_frame_equal(ha, hb)


def test_an_fp16_loss_overflowing_batch_after_batch_stops_the_fold(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import foldkit.train

    _fp16(monkeypatch, lambda n: n > 5)
    monkeypatch.setattr(foldkit.train, "_OVERFLOW_STOP", 8)  # 25 in use; 5 batches an epoch here
    args = ["--model", "test_efficientnet", "--fold", "0", "--epochs", "3", "--batch", "4"]
    assert train_tiny(tiny_data, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert (
        "test_efficientnet fold 0: the training loss overflowed (inf/NaN) in 8 batches in a row in epoch "
        "3, between optimizer steps 11 and 15" in err
    )  # the count runs on across epochs: 5 in epoch 2, 10 by the read at the end of epoch 3
    assert "or --set train.amp=none" in err  # the CPU has no native bf16 to suggest
    assert load_checkpoint(tmp_path / RUN / "last.pt")["progress"]["epoch"] == 3
    # epoch 2 trained on no batch at all: its loss is not a number, not 0
    assert np.isnan(pd.read_csv(tmp_path / RUN / "history.csv").train_loss[1])
    assert not (tmp_path / OOF).exists()


def test_a_lone_fp16_overflow_in_a_short_read_window_is_skipped_too(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """--save-every 4 reads the loss at batch 4 and again at batch 5: batch 5 alone overflowing is one
    batch, not a diverged run."""
    _fp16(monkeypatch, lambda n: n == 5)
    args = ["--model", "test_efficientnet", "--fold", "0", "--epochs", "2", "--batch", "4"]
    args += ["--save-every", "4"]
    assert train_tiny(tiny_data, tmp_path, *args) == 0
    assert "the fp16 loss overflowed on 4 of 4 images in epoch 1" in capsys.readouterr().err
    assert (tmp_path / OOF).is_file()


def test_an_fp16_overflow_that_reached_a_batchnorm_stops_the_fold_naming_it(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An overflow before a BatchNorm leaves its running statistics inf/NaN for good: the loss
    scaler's skip cannot mend that, so the fold stops at that read, naming the buffers."""
    import foldkit.train

    _fp16(monkeypatch)
    real = foldkit.train.create_model

    def create(cfg, backbone, *args, **kwargs):
        model = real(cfg, backbone, *args, **kwargs)
        calls = [0]

        def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            calls[0] += module.training
            return output * float("inf") if module.training and calls[0] == 3 else output

        model.conv_stem.register_forward_hook(hook)  # the convolution before bn1
        return model

    monkeypatch.setattr(foldkit.train, "create_model", create)
    args = ["--model", "test_efficientnet", "--fold", "0", "--epochs", "2", "--batch", "4"]
    assert train_tiny(tiny_data, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert "the fp16 loss overflowed on 4 of 20 images in epoch 1" in err
    assert "test_efficientnet fold 0: the weights became NaN/inf in epoch 1, by optimizer step 5 (bn1." in err
    assert not (tmp_path / OOF).exists()


def test_out_of_memory_names_the_batch_and_the_way_out(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def oom(n: int, out: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _patch_train_forward(monkeypatch, oom)
    assert train_tiny(tiny_data, tmp_path, "--model", "test_efficientnet", "--fold", "0") == 2
    err = capsys.readouterr().err
    assert "test_efficientnet fold 0: CUDA out of memory at batch size 16" in err
    assert "--batch 8 --set train.accum_steps=2" in err


class _Payload:
    """Unpickling this runs ``open(path, 'w')``: a stand-in for any code a pickle can smuggle in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoint_with_a_pickled_callable_is_refused_not_run(
    tiny_data: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "1.pth"
    torch.save({"model": {}, "config": {}, "backbone": "x", "payload": _Payload(marker)}, evil)
    with pytest.raises(FoldkitError, match=r"1\.pth: refused, not loaded: it holds a pickled Python object"):
        load_checkpoint(evil)
    argv = [
        "--mode",
        "test",
        "--model_name",
        str(evil),
        "--data-dir",
        str(tiny_data),
        "--work-dir",
        str(tmp_path),
    ]
    assert run(main.main, argv) == 2
    err = capsys.readouterr().err
    assert "1.pth: refused, not loaded" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    # the file really is armed: a plain (unsafe) load runs the payload
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    assert not marker.exists()


def test_save_every_must_be_positive(tiny_data: Path, tmp_path: Path, capsys) -> None:
    assert train_tiny(tiny_data, tmp_path, "--save-every", "0") == 2
    assert "--save-every 0" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_resume_flags_are_in_help() -> None:
    text = main.build_parser().format_help()
    for flag in ("--resume", "--no-resume", "--save-every", "--force"):
        assert flag in text


def test_unreadable_images_are_left_out_of_training_and_validation(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # The store records an undecodable image in ``bad`` (on_bad_image: skip; a real corrupt file is
    # tested end to end in test_store): stand in for it here, on the untouched tiny data set.
    import foldkit.train
    from foldkit.data import read_trainval

    real = foldkit.train.open_images

    def open_images(data_dir, work_dir, index, *args, **kwargs):
        store = real(data_dir, work_dir, index, *args, **kwargs)
        store.meta["bad"] = {index.path.iloc[0]: "cannot identify image file"}
        return store

    monkeypatch.setattr(foldkit.train, "open_images", open_images)
    assert (
        train_tiny(tiny_data, tmp_path, "--model", "test_efficientnet", "--set", "data.on_bad_image=skip")
        == 0
    )
    err = capsys.readouterr().err
    bad = read_trainval(tiny_data).name.iloc[0]
    folds = pd.read_csv(tmp_path / "folds/folds.csv", dtype={"name": str})
    assert "leaving 1 unreadable image(s) out of the folds" in err and bad not in set(folds.name)
    oof = pd.concat(pd.read_csv(p, dtype={"name": str}) for p in (tmp_path / "oof/demo").rglob("fold*.csv"))
    assert bad not in set(oof.name) and len(oof) == len(folds)
    # fit_fold's own guard, for callers whose folds still list it: dropped from train and validation
    from foldkit.train import _drop_bad

    full = read_trainval(tiny_data).assign(fold=0)
    store = open_images(tiny_data, tmp_path, read_trainval(tiny_data), "trainval", True)
    train_df, val_df = _drop_bad(store, full.iloc[5:], full.iloc[:5], "test_efficientnet fold 0")
    assert bad not in set(val_df.name) and len(val_df) == 4 and len(train_df) == len(full) - 5
    assert "leaving out 1 unreadable image(s) (0 train, 1 validation)" in capsys.readouterr().err


def test_interrupted_accumulating_run_resumes_at_an_accumulation_boundary(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # 5 batches per epoch, accum 2: optimizer steps after batches 2, 4, 5; --save-every 3 saves at
    # the first step at or after batch 3 (batch 4), never mid-accumulation.
    args = [*RESUME_ARGS, "--set", "train.accum_steps=2", "--save-every", "3"]
    assert train_tiny(tiny_data, tmp_path / "a", *args) == 0
    armed = [True]

    def interrupt(n: int, out: torch.Tensor) -> torch.Tensor:
        if armed[0] and n == 10:  # epoch 2, batch 5: after the save at batch 4
            raise KeyboardInterrupt
        return out

    _patch_train_forward(monkeypatch, interrupt)
    assert train_tiny(tiny_data, tmp_path / "b", *args) == 130
    assert "stopped; the same command resumes" in capsys.readouterr().err
    last = load_checkpoint(tmp_path / "b" / RUN / "last.pt")
    assert (last["progress"]["epoch"], last["progress"]["batch"], last["step"]) == (2, 4, 5)
    armed[0] = False
    assert train_tiny(tiny_data, tmp_path / "b", *args) == 0
    _assert_same_run(tmp_path / "b", tmp_path / "a")


def test_a_stop_between_the_last_and_the_best_save_is_mended_on_resume(
    tiny_data: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The best epoch saves last.pt first, then best.pt. A run stopped between the two resumes with
    best.pt restored from last.pt: its OOF comes from the best epoch, as the uninterrupted run's."""
    import foldkit.train

    best_epoch = load_checkpoint(uninterrupted / RUN / "best.pt")["epoch"]
    real, armed = foldkit.train._save_checkpoint, [True]

    def save(path: Path, payload: dict) -> None:
        if armed[0] and path.name == "best.pt" and payload["epoch"] == best_epoch:
            raise KeyboardInterrupt
        real(path, payload)

    monkeypatch.setattr(foldkit.train, "_save_checkpoint", save)
    assert train_tiny(tiny_data, tmp_path, *RESUME_ARGS) == 130
    last, best = load_checkpoint(tmp_path / RUN / "last.pt"), tmp_path / RUN / "best.pt"
    assert last["epoch"] == last["progress"]["best_epoch"] == best_epoch  # last.pt came first
    assert not best.exists() or load_checkpoint(best)["epoch"] < best_epoch
    armed[0] = False
    capsys.readouterr()
    assert train_tiny(tiny_data, tmp_path, *RESUME_ARGS) == 0
    assert load_checkpoint(best)["epoch"] == best_epoch
    _assert_same_run(tmp_path, uninterrupted)
    restored = f"best.pt restored from last.pt (epoch {best_epoch}, the best epoch it records)"
    assert restored in capsys.readouterr().err


def test_best_to_restore_only_where_last_names_an_epoch_best_pt_lacks(tmp_path: Path) -> None:
    from foldkit.resume import best_to_restore

    last = {"epoch": 2, "score": 0.5, "model": {"w": torch.ones(1)}, "step": 10, "rng": {}, "optimizer": {},
            "progress": {"epoch": 3, "batch": 0, "best_epoch": 2}}  # fmt: skip
    best = tmp_path / "best.pt"
    assert best_to_restore(last, best) == {"epoch": 2, "score": 0.5, "model": {"w": torch.ones(1)}}  # none
    best.write_bytes(b"PK\x03\x04 cut short")  # unreadable: restored, not a failed resume
    assert best_to_restore(last, best) is not None
    torch.save({"epoch": 2, "model": {}, "config": {}}, best)
    assert best_to_restore(last, best) is None  # right already
    torch.save({"epoch": 1, "model": {}, "config": {}}, best)
    assert best_to_restore(last, best) is not None
    mid_epoch = {**last, "progress": {**last["progress"], "best_epoch": 1}}
    assert best_to_restore(mid_epoch, best) is None  # the best epoch is older: best.pt was saved then
    assert best_to_restore({k: v for k, v in last.items() if k != "score"}, best) is None  # a mid-epoch save


def test_a_key_added_later_counts_as_its_default_and_the_process_count_must_match(tmp_path: Path) -> None:
    from foldkit.config import RunConfig, to_dict

    current = to_dict(RunConfig(pretrained=False))
    saved = to_dict(RunConfig(pretrained=False))
    del saved["train"]["sync_bn"]  # a checkpoint from before the key existed
    assert config_changes(saved, current) == []
    saved["train"]["sync_bn"] = True
    assert config_changes(saved, current) == ["train.sync_bn True -> False"]
    ckpt = {"config": current, "folds_hash": "h", "backbone": "b", "fold": 0, "world_size": 2}
    check_compatible(tmp_path / "last.pt", resume_changes(ckpt, current, "h", "b", 0, world_size=2))
    with pytest.raises(FoldkitError, match=r"--nproc_per_node x nodes\) 2 -> 1"):
        check_compatible(tmp_path / "last.pt", resume_changes(ckpt, current, "h", "b", 0))
