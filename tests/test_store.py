"""The decoded-image store and the uint8 data path: build, reuse, rebuild, bad images, same pixels."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from foldkit import store as store_mod
from foldkit.data import DataError, load_rgb, read_test, read_trainval
from foldkit.dataset import EpochBatchSampler, ImageDataset, make_loader
from foldkit.device_transforms import DeviceLoader, DeviceTransform
from foldkit.io import FoldkitError
from foldkit.predict import eval_loader
from foldkit.store import FileSource, StoreSource, ensure_store, main


@pytest.fixture
def data(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny data set (tests here change images)."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


def test_build_holds_exactly_the_decoded_pixels(data: Path, tmp_path: Path) -> None:
    index = read_trainval(data)
    store = ensure_store(data, tmp_path / "w", index, "trainval", workers=2)
    assert store.path == tmp_path / "w/store/trainval-32x32"
    assert {p.name for p in store.path.iterdir()} == {".lock", "images.u8", "index.csv", "store.json"}
    assert store.shape == (len(index), 32, 32, 3) and store.bad == set()
    assert (store.path / "images.u8").stat().st_size == len(index) * 32 * 32 * 3
    src = store.source(index.path.tolist()[::-1])  # any order of paths maps to the right rows
    for i, rel in enumerate(index.path.tolist()[::-1]):
        np.testing.assert_array_equal(src.read(i), load_rgb(data / rel))


def test_parallel_and_serial_builds_are_byte_identical(data: Path, tmp_path: Path) -> None:
    index = read_trainval(data)
    a = ensure_store(data, tmp_path / "a", index, "trainval", workers=1)
    b = ensure_store(data, tmp_path / "b", index, "trainval", workers=2)
    assert (a.path / "images.u8").read_bytes() == (b.path / "images.u8").read_bytes()


def test_reused_when_nothing_changed(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = read_trainval(data)
    first = ensure_store(data, tmp_path, index, "trainval")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store was rebuilt although nothing changed")

    monkeypatch.setattr(store_mod, "_fill", fail)
    again = ensure_store(data, tmp_path, index, "trainval")
    assert again.meta["key"] == first.meta["key"]


def test_rebuilt_when_an_image_is_replaced(data: Path, tmp_path: Path) -> None:
    index = read_trainval(data)
    first = ensure_store(data, tmp_path, index, "trainval")
    target = data / index.path[3]
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a new mtime whatever the clock's resolution
    second = ensure_store(data, tmp_path, index, "trainval")
    assert second.meta["key"] != first.meta["key"]
    assert (second.source([index.path[3]]).read(0) == 200).all()


def test_reused_when_only_a_label_changes(data: Path, tmp_path: Path) -> None:
    """The store holds pixels: a relabel (or a label file saved with CRLF) must not re-decode it."""
    index = read_trainval(data)
    first = ensure_store(data, tmp_path, index, "trainval")
    label_path = data / "train/train_label.txt"
    lines = label_path.read_text().splitlines()
    name, label = lines[0].split()
    lines[0] = f"{name} {1 - int(label)}"
    label_path.write_text("\r\n".join(lines) + "\r\n")
    again = ensure_store(data, tmp_path, read_trainval(data), "trainval")
    assert again.meta["key"] == first.meta["key"] and again.ident == first.ident


def test_reused_after_chmod_and_a_copy_that_keeps_mtimes(data: Path, tmp_path: Path) -> None:
    """Metadata-only changes (sharing the data with chmod, moving it with cp -a / rsync -a) must not
    re-decode 400,000 images: the key is path, size and mtime, not ctime or inode."""
    index = read_trainval(data)
    first = ensure_store(data, tmp_path, index, "trainval")
    for rel in index.path:
        os.chmod(data / rel, 0o444)
    copy = tmp_path / "copied"
    shutil.copytree(data, copy)  # copy2: contents and mtimes kept, new inodes and ctimes
    again = ensure_store(copy, tmp_path, read_trainval(copy), "trainval")
    assert again.meta["key"] == first.meta["key"] and again.ident == first.ident


def test_rebuilt_at_another_size(data: Path, tmp_path: Path) -> None:
    index = read_trainval(data)
    small = ensure_store(data, tmp_path, index, "trainval")
    big = ensure_store(data, tmp_path, index, "trainval", size=(48, 48))
    assert big.path != small.path and big.shape[1:3] == (48, 48)


def _break_images(data: Path) -> dict[str, str]:
    """Four kinds of bad file in the train split; returns {file name: expected problem text}."""
    lines = (data / "train/train_label.txt").read_text().split("\n")
    names = [line.split()[0] for line in lines[:4]]
    paths = [data / "train" / n for n in names]
    raw = paths[0].read_bytes()
    paths[0].write_bytes(raw[: len(raw) // 2])  # truncated PNG
    paths[1].write_bytes(b"")  # zero bytes
    paths[2].write_bytes(b"just some text, not an image\n")
    Image.new("RGB", (5000, 2)).save(paths[3])  # absurd size
    return {
        names[0]: "cannot decode image",
        names[1]: "empty file",
        names[2]: "cannot decode image",
        names[3]: "absurd image size 5000x2",
    }


def test_bad_images_are_all_named_with_their_label_line(data: Path, tmp_path: Path) -> None:
    expected = _break_images(data)
    index = read_trainval(data)
    with pytest.raises(DataError) as err:
        ensure_store(data, tmp_path, index, "trainval", workers=2)
    text = str(err.value)
    for lineno, (name, problem) in enumerate(expected.items(), start=1):
        line = next(s for s in text.splitlines() if name in s)
        assert f"train_label.txt:{lineno})" in line and problem in line
    assert not list((tmp_path / "store").rglob("store.json")), "a failed build must not look current"
    assert not list((tmp_path / "store").rglob("images.u8*")), "no partial store file is left behind"


def test_bad_images_cli_exit_2_and_skip_mode(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    expected = _break_images(data)
    assert main(["--data-dir", str(data), "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in expected)
    assert main(["--data-dir", str(data), "--work-dir", str(tmp_path), "--on-bad-image", "skip"]) == 0
    store = ensure_store(data, tmp_path, read_trainval(data), "trainval", on_bad_image="skip")
    assert {Path(p).name for p in store.bad} == set(expected)
    # the skip build's store, reused under error, stops as a fresh build would: each file named
    capsys.readouterr()
    assert main(["--data-dir", str(data), "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for lineno, (name, problem) in enumerate(expected.items(), start=1):
        line = next(s for s in err.splitlines() if name in s)
        assert f"train_label.txt:{lineno})" in line and problem in line and "recorded when" in line


def test_cli_builds_every_split_and_reports(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--data-dir", str(data), "--work-dir", str(tmp_path), "--img-size", "40"]) == 0
    out = capsys.readouterr().out
    assert "trainval: 40 images at 40x40" in out and "test: 12 images at 40x40" in out
    assert "images/s" in out and "GiB" in out and str(tmp_path / "store/test-40x40") in out
    assert "peak memory of one process" in out
    assert len(read_test(data)) == 12


def test_cli_builds_without_the_unix_only_resource_module(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows has no ``resource``: the store command still builds, only the peak-memory line goes."""
    monkeypatch.setitem(sys.modules, "resource", None)  # what a missing module looks like to import
    assert main(["--data-dir", str(data), "--work-dir", str(tmp_path), "--img-size", "40"]) == 0
    out = capsys.readouterr().out
    assert "trainval: 40 images at 40x40" in out and "peak memory" not in out


def test_store_source_pickles_without_its_pixels(data: Path, tmp_path: Path) -> None:
    index = read_trainval(data)
    src = ensure_store(data, tmp_path, index, "trainval").source(index.path.tolist())
    first = src.read(0)
    clone = pickle.loads(pickle.dumps(src))
    assert clone._images is None and len(pickle.dumps(src)) < 4096
    np.testing.assert_array_equal(clone.read(0), first)


def test_store_and_files_give_the_same_batches(data: Path, tmp_path: Path) -> None:
    """The uint8 path from the store equals the uint8 path from the PNG files, batch for batch."""
    index = read_trainval(data)
    paths = index.path.tolist()
    from_store = ensure_store(data, tmp_path, index, "trainval").source(paths)
    from_files = FileSource(data, paths, (32, 32))
    device = torch.device("cpu")
    outs = []
    for src in (from_store, from_files):
        dl = eval_loader(src, 48, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 16, 0, device)
        outs.append(torch.cat([x for x, _, _ in dl]))
    assert outs[0].shape == (len(paths), 3, 48, 48)
    assert torch.equal(outs[0], outs[1])


def test_device_transform_resizes_and_normalises() -> None:
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    same = DeviceTransform(8, mean, std, torch.device("cpu"))(images)
    ref = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-5)
    assert same.is_contiguous()
    half = DeviceTransform(4, mean, std, torch.device("cpu"))(images)  # shrinking by 2: area = 2x2 mean
    pooled = torch.nn.functional.avg_pool2d(ref, 2)
    torch.testing.assert_close(half, pooled, rtol=1e-5, atol=1e-5)
    big = DeviceTransform(16, mean, std, torch.device("cpu"), channels_last=True)(images)
    assert big.shape == (2, 3, 16, 16) and big.is_contiguous(memory_format=torch.channels_last)
    up = torch.nn.functional.interpolate(ref, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(big, up, rtol=1e-5, atol=1e-5)
    # a non-square batch, normalised in its NHWC rows (channel order must survive the tiling)
    wide = torch.randint(0, 256, (2, 6, 10, 3), dtype=torch.uint8)
    wide_ref = (wide.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    for cl in (False, True):
        out = DeviceTransform(12, mean, std, torch.device("cpu"), channels_last=cl)(wide)
        expect = torch.nn.functional.interpolate(
            wide_ref, size=(12, 12), mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        DeviceTransform(8, mean, std, torch.device("cpu"))(images.float())


def test_cpu_transform_keeps_big_batches_in_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU DeviceTransform (and only a CPU one) raises glibc's thresholds; after that a freed 64 MiB
    tensor's memory is reused, not unmapped and page-faulted afresh (glibc's own accounting: bytes in
    mmapped blocks stay flat)."""
    import ctypes

    from foldkit import device_transforms, hostmem

    calls: list[int] = []
    monkeypatch.setattr(device_transforms, "reuse_freed_memory", lambda: calls.append(1) or True)
    DeviceTransform(8, (0.5,) * 3, (0.5,) * 3, torch.device("meta"))
    assert calls == []
    DeviceTransform(8, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    assert calls == [1]
    if not hostmem.reuse_freed_memory():
        pytest.skip("not glibc, or a glibc that refuses an mmap threshold over 32 MiB")
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
        pytest.skip("no mallinfo2")

    class MallInfo2(ctypes.Structure):
        names = (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
        )
        _fields_ = [(f, ctypes.c_size_t) for f in (*names, "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    mapped = libc.mallinfo2().hblkhd
    big = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    assert libc.mallinfo2().hblkhd - mapped < 1 << 20  # served from the heap, not a fresh mapping
    del big
    again = torch.empty(64 << 20, dtype=torch.uint8)
    assert libc.mallinfo2().hblkhd - mapped < 1 << 20
    assert again.numel() == 64 << 20


def test_sampler_is_a_pure_function_of_seed_and_epoch() -> None:
    s = EpochBatchSampler(10, 4, shuffle=True, seed=7)
    s.set_epoch(1)
    e1 = list(s)
    assert [len(b) for b in e1] == [4, 4, 2]
    assert sorted(i for b in e1 for i, _ in b) == list(range(10))
    s.set_epoch(1)
    assert list(s) == e1
    s.set_epoch(2)
    assert list(s) != e1
    s.set_epoch(1, start_batch=1)
    assert list(s) == e1[1:]  # a resumed epoch continues with the very next batch
    assert len(EpochBatchSampler(10, 4, True, 7, drop_last=True)) == 2
    assert all(len({seed for _, seed in b}) == 1 for b in e1)  # one seed per batch


def _augmented_epoch(data: Path, workers: int, epoch: int) -> torch.Tensor:
    from foldkit.augment import train_transform
    from foldkit.config import AugmentConfig

    index = read_trainval(data)
    src = FileSource(data, index.path.tolist(), (32, 32))
    ds = ImageDataset(src, index.label, train_transform(AugmentConfig(affine=1.0, dropout=1.0), seed=3))
    dl = make_loader(ds, 8, shuffle=True, workers=workers, seed=5)
    assert dl.persistent_workers == (workers > 0)
    dl.batch_sampler.set_epoch(epoch)
    batches = [
        x
        for x, _, _ in DeviceLoader(
            dl, DeviceTransform(32, (0,) * 3, (1,) * 3, torch.device("cpu")), torch.device("cpu")
        )
    ]
    return torch.cat(batches)


def test_augmented_batches_do_not_depend_on_workers(data: Path) -> None:
    main_process = _augmented_epoch(data, 0, epoch=2)
    assert torch.equal(main_process, _augmented_epoch(data, 2, epoch=2))
    assert not torch.equal(main_process, _augmented_epoch(data, 0, epoch=3))


class _ThreadProbe(torch.utils.data.Dataset):
    """Each batch reports how many threads OpenCV may use in the process that made it."""

    def __len__(self) -> int:
        return 4

    def __getitems__(self, keys: list) -> tuple:
        import cv2

        return (torch.tensor([cv2.getNumThreads()]),)


def test_loader_workers_and_store_pool_run_opencv_single_threaded(data: Path, tmp_path: Path) -> None:
    """OpenCV's own pool in every worker would oversubscribe the cores the workers already fill; the
    setting is made before the workers fork, after the parent has used OpenCV's pool (the case that
    once deadlocked when it was made inside the workers)."""
    import cv2

    try:
        cv2.setNumThreads(2)
        image = np.zeros((1024, 1024, 3), np.uint8)
        cv2.GaussianBlur(cv2.resize(image, (2048, 2048)), (9, 9), 0)  # the parent's pool runs
        (threads,) = next(iter(make_loader(_ThreadProbe(), 4, shuffle=False, workers=0, seed=0)))
        assert threads.tolist() == [2]  # no workers: the main process keeps its threads
        (threads,) = next(iter(make_loader(_ThreadProbe(), 4, shuffle=False, workers=1, seed=0)))
        assert threads.tolist() == [1]
        cv2.setNumThreads(2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(store_mod, "_CHUNK", 8)  # several tasks, so the pool really forks
            ensure_store(data, tmp_path / "w", read_trainval(data), "trainval", workers=2)
        assert cv2.getNumThreads() == 1  # the store pool's workers inherit it
        cv2.setNumThreads(2)  # a spawned worker (macOS, Python 3.14's Linux default) inherits nothing
        loader = make_loader(_ThreadProbe(), 4, shuffle=False, workers=1, seed=0)
        cv2.setNumThreads(2)
        loader.worker_init_fn(0)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(-1)


def test_uint8_items_on_the_wire(data: Path, tmp_path: Path) -> None:
    index = read_trainval(data)
    src = ensure_store(data, tmp_path, index, "trainval").source(index.path.tolist())
    image, label, i = ImageDataset(src, index.label)[(5, 0)]
    assert image.dtype == torch.uint8 and image.shape == (32, 32, 3) and i == 5
    assert label.item() == index.label[5]
    frame = pd.DataFrame({"path": index.path})
    assert store_mod.native_size(data, frame) == (32, 32)
    assert isinstance(src, StoreSource)


def test_store_and_png_paths_give_the_same_oof(
    tiny_data: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Training from the store and from the PNG files (data.cache=false) are the same run on CPU,
    so switching data.cache never retrains a finished fold (a harmless key)."""
    from conftest import train_tiny

    args = ("--model", "test_efficientnet", "--fold", "0", "--set", "data.cache=false")
    assert train_tiny(tiny_data, tmp_path, *args) == 0
    assert not (tmp_path / "store").exists()
    oof = "oof/demo/test_efficientnet/fold0.csv"
    assert (tmp_path / oof).read_bytes() == (trained / oof).read_bytes()
    capsys.readouterr()
    assert train_tiny(tiny_data, tmp_path, *args[:4]) == 0  # the default, data.cache=true
    assert "test_efficientnet fold 0: finished (its OOF matches best.pt): skipped" in capsys.readouterr().err


def _step(trainer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = trainer.criterion(trainer.model(x).float().reshape(-1), y)
    loss.backward()
    trainer._optimizer_step()


def test_warm_up_leaves_weights_buffers_and_grads_untouched() -> None:
    """The GPU warm-up runs full training steps (optimizer and EMA included) but must not train:
    a run with it continues exactly like one without, mid-run (optimizer state present) too."""
    import timm

    from foldkit.config import RunConfig
    from foldkit.train import _make_trainer, warm_up

    cfg = RunConfig(backbones=["test_resnet"], pretrained=False, device="cpu")
    cfg.data.img_size, cfg.train.batch_size = 32, 4
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=1)
    twin = timm.create_model("test_resnet", num_classes=1)
    twin.load_state_dict(model.state_dict())
    a, b = (
        _make_trainer(cfg, m, torch.device("cpu"), steps_per_epoch=2, pos_weight=1.0) for m in (model, twin)
    )
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0.0, 1.0, 1.0, 0.0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert warm_up(a) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert all(p.grad is None for p in model.parameters()) and not a.optimizer.state
    for trainer in (a, b):
        _step(trainer, x, y)
    warm_up(a)  # now with optimizer state and a moved EMA to restore
    for trainer in (a, b):
        _step(trainer, x, y)
    for sa, sb in ((model, twin), (a.ema.module, b.ema.module)):
        for k, v in sa.state_dict().items():
            assert torch.equal(v, sb.state_dict()[k]), k
    assert a.step == b.step == 2
    exp_avg = [s["exp_avg"] for s in a.optimizer.state.values()]
    assert all(torch.equal(e, f["exp_avg"]) for e, f in zip(exp_avg, b.optimizer.state.values(), strict=True))


def test_unreadable_test_image_is_named_or_gets_the_fallback_label(
    data: Path, trained_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    """By default a bad test image stops test inference naming it, before the report is rewritten
    (the last report and submission stay as they were, in step); with ``--on-bad-image skip`` the
    submission still lists every name and the bad one gets the stated fallback (0, real)."""
    import ensemble
    from foldkit.cli import run

    argv = ["--exp", "demo", "--work-dir", str(trained_copy), "--data-dir", str(data), "--mode", "test"]
    assert run(ensemble.main, argv) == 0
    submission = trained_copy / "submissions/demo/prediction.txt"
    outputs = [*(trained_copy / "oof/demo").glob("report.*"), submission]
    made = {p: p.read_bytes() for p in outputs}
    test = read_test(data)
    bad = data / test.path.iloc[2]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert run(ensemble.main, argv) == 2
    err = capsys.readouterr().err
    assert f"{bad} (" in err and "ensemble.py --on-bad-image skip" in err
    assert {p: p.read_bytes() for p in made} == made, "a failed test run must leave its outputs alone"
    assert run(ensemble.main, [*argv, "--on-bad-image", "skip"]) == 0
    lines = (trained_copy / "submissions/demo/prediction.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == test.name.tolist()
    assert lines[2] == f"{test.name.iloc[2]} 0"
    probs = pd.read_csv(trained_copy / "submissions/demo/probs.csv")
    assert (probs.filter(like="prob").iloc[2] == 0).all()  # every model's noise on it is dropped
    assert probs.readable.tolist() == [int(i != 2) for i in range(len(test))]  # and said why
    # what the models said on the blank image never reaches the threshold: change it, same threshold
    record = trained_copy / "submissions/demo/ensemble.json"
    threshold = json.loads(record.read_text())["threshold"]
    for cache in (trained_copy / "oof/demo").glob("*/test_fold*.csv"):
        table = pd.read_csv(cache, dtype={"name": str}, keep_default_na=False)
        table.loc[2, "prob"] = 0.999 if table.prob[2] < 0.5 else 0.001
        cache.write_text(table.to_csv(index=False, float_format="%.8f"))
    assert run(ensemble.main, [*argv, "--on-bad-image", "skip"]) == 0
    assert json.loads(record.read_text())["threshold"] == threshold
    assert "1 unreadable test image(s) predicted 0 (real)" in capsys.readouterr().err
    assert run(ensemble.main, [*argv, "--on-bad-image", "error"]) == 2  # explicit: no silent fallback
    err = capsys.readouterr().err
    assert f"{bad} (" in err and "(recorded when the store was built with skip)" in err
    assert run(ensemble.main, argv) == 2  # the checkpoints' own policy (error) refuses them too
    store_argv = ["--data-dir", str(data), "--work-dir", str(trained_copy), "--img-size", "24"]
    assert main([*store_argv, "--on-bad-image", "skip"]) == 0  # a store of another size records it too
    bad.write_bytes((data / test.path.iloc[3]).read_bytes())  # mended: both stores' records are stale
    assert run(ensemble.main, argv) == 0
    assert "unreadable test image" not in capsys.readouterr().err


def test_every_models_test_store_is_checked_before_the_report_is_rewritten(
    data: Path, trained_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two experiments blended, with other store sizes and bad-image policies: the second one's
    store must be checked up front too, not after the report was written from the first."""
    from conftest import train_tiny

    import ensemble
    from foldkit.cli import run

    small = ("--exp", "small", "--model", "test_efficientnet", "--set", "data.store_size=24")
    assert train_tiny(data, trained_copy, *small, "--set", "data.on_bad_image=skip") == 0
    argv = ["--exp", "small,demo", "--work-dir", str(trained_copy), "--data-dir", str(data), "--mode", "test"]
    assert run(ensemble.main, [*argv, "--allow-partial"]) == 0
    outputs = [*(trained_copy / "oof/small+demo").glob("report.*")]
    outputs.append(trained_copy / "submissions/small+demo/prediction.txt")
    made = {p: p.read_bytes() for p in outputs}
    bad = data / read_test(data).path.iloc[0]
    bad.write_bytes(bad.read_bytes()[:100])
    capsys.readouterr()
    assert run(ensemble.main, [*argv, "--allow-partial"]) == 2  # small's store skips it, demo's stops
    assert f"{bad} (" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in made} == made


def test_skipped_test_image_gets_the_fallback_without_a_store(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``data.cache: false`` with skip: the bad test file is never decoded again and gets the
    fallback label, as it does with the store."""
    from conftest import train_tiny

    import ensemble
    from foldkit.cli import run

    work = tmp_path / "w"
    args = ("--model", "test_efficientnet", "--set", "data.cache=false", "--set", "data.on_bad_image=skip")
    assert train_tiny(data, work, *args) == 0
    test = read_test(data)
    bad = data / test.path.iloc[1]
    bad.write_bytes(bad.read_bytes()[:100])
    argv = ["--exp", "demo", "--work-dir", str(work), "--data-dir", str(data), "--mode", "test"]
    argv.append("--allow-partial")  # only one of the config's two backbones was trained
    assert run(ensemble.main, argv) == 0
    lines = (work / "submissions/demo/prediction.txt").read_text().splitlines()
    assert len(lines) == len(test) and lines[1] == f"{test.name.iloc[1]} 0"
    assert "1 unreadable test image(s) predicted 0 (real)" in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["true", "false"])
def test_main_names_bad_images_before_folds_or_training(
    data: Path, tmp_path: Path, cache: str, capsys
) -> None:
    """With the store or without it (a full decode check), bad images stop main.py before any fold or
    model is made, each named with its label-file line."""
    from conftest import train_tiny

    expected = _break_images(data)
    work = tmp_path / "w"
    assert (
        train_tiny(data, work, "--model", "test_efficientnet", "--fold", "0", "--set", f"data.cache={cache}")
        == 2
    )
    err = capsys.readouterr().err
    for lineno, name in enumerate(expected, start=1):
        assert f"{name} ({data / 'train/train_label.txt'}:{lineno}):" in err
    assert not work.exists() or not any(p.is_file() for p in work.rglob("*")), "nothing may be written"


def test_skip_leaves_bad_images_out_of_folds_training_and_oof(data: Path, tmp_path: Path) -> None:
    from conftest import train_tiny

    from foldkit.folds import load_folds

    expected = _break_images(data)
    work = tmp_path / "w"
    assert (
        train_tiny(
            data, work, "--model", "test_efficientnet", "--fold", "0", "--set", "data.on_bad_image=skip"
        )
        == 0
    )
    folds, _ = load_folds(work)
    assert len(folds) == len(read_trainval(data)) - len(expected)
    assert not set(expected) & set(folds.name)
    oof = pd.read_csv(work / "oof/demo/test_efficientnet/fold0.csv", dtype={"name": str})
    assert not set(expected) & set(oof.name) and len(oof) == (folds.fold == 0).sum()


def test_ensemble_tta_reuses_the_store_that_skipped_bad_images(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Re-predicting the OOF with another TTA reads main.py's trainval store as it is: opened with the
    label files' index, not folds.csv's (which lacks the skipped images and would rebuild it)."""
    from conftest import train_tiny

    import ensemble
    from foldkit.cli import run

    _break_images(data)
    work = tmp_path / "w"
    assert train_tiny(data, work, "--model", "test_efficientnet", "--set", "data.on_bad_image=skip") == 0
    store = next((work / "store").glob("trainval-*/images.u8"))
    built = store.stat().st_mtime_ns
    capsys.readouterr()
    argv = ["--exp", "demo", "--work-dir", str(work), "--data-dir", str(data), "--allow-partial"]
    assert run(ensemble.main, [*argv, "--tta", "none"]) == 0
    err = capsys.readouterr().err
    assert "reusing the image store" in err and "building the image store" not in err
    assert store.stat().st_mtime_ns == built


def test_device_area_resize_matches_opencv_inter_area() -> None:
    """112 -> 64 is not an integer factor: torch's adaptive 'area' pool differs from OpenCV by up to
    ~56 grey levels there; the device resize must match INTER_AREA (what the CPU path used)."""
    import cv2

    from foldkit.device_transforms import area_resize

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (112, 112, 3)).astype(np.float32)
    ref = cv2.resize(img, (64, 48), interpolation=cv2.INTER_AREA)
    out = area_resize(torch.from_numpy(img).permute(2, 0, 1)[None], (48, 64))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_warm_up_draws_no_random_numbers() -> None:
    """Dropout in the warm-up step must not shift the RNG stream the epochs (and a resume) rely on."""
    import timm

    from foldkit.config import RunConfig
    from foldkit.train import _make_trainer, warm_up

    cfg = RunConfig(backbones=["test_resnet"], pretrained=False, device="cpu")
    cfg.data.img_size, cfg.train.batch_size, cfg.train.drop_rate = 32, 4, 0.5
    model = timm.create_model("test_resnet", num_classes=1, drop_rate=0.5)
    trainer = _make_trainer(cfg, model, torch.device("cpu"), steps_per_epoch=2, pos_weight=1.0)
    torch.manual_seed(7)
    warm_up(trainer)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


def test_compile_mode_reaches_torch_compile(monkeypatch) -> None:
    """train.compile_mode=reduce-overhead (CUDA graphs for host-bound small models) is what
    torch.compile is asked for; compile off compiles nothing."""
    import timm

    from foldkit.config import RunConfig
    from foldkit.train import _make_trainer

    seen: list[str | None] = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    cfg = RunConfig(backbones=["test_resnet"], pretrained=False, device="cpu")
    model = timm.create_model("test_resnet", num_classes=1)
    _make_trainer(cfg, model, torch.device("cpu"), steps_per_epoch=2, pos_weight=1.0)
    assert seen == []
    cfg.train.compile, cfg.train.compile_mode = True, "reduce-overhead"
    _make_trainer(cfg, model, torch.device("cpu"), steps_per_epoch=2, pos_weight=1.0)
    assert seen == ["reduce-overhead"]


def test_a_killed_builds_temporary_file_is_removed_by_the_next_run(data: Path, tmp_path: Path) -> None:
    """A build killed with SIGKILL leaves .images.u8.*.tmp, as large as the store. Every build holds
    the store's lock, so the next run that gets the lock (one that reuses the store too) knows such a
    file is dead and removes it; while a build holds the lock, its temporary file is left alone."""
    index = read_trainval(data)
    store = ensure_store(data, tmp_path, index, "trainval")
    dead = store.path / ".images.u8.abc.tmp"
    dead.write_bytes(b"\0" * 1000)
    with open(store.path / ".lock") as fh:  # a build in progress: its file must stay
        fcntl.flock(fh, fcntl.LOCK_EX)
        ensure_store(data, tmp_path, index, "trainval")
        assert dead.exists()
    ensure_store(data, tmp_path, index, "trainval")  # reused, and the lock is free
    assert not dead.exists()


def test_a_second_run_waits_for_a_build_in_progress_then_reuses_it(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="foldkit")
    index = read_trainval(data)
    folder = tmp_path / "store/trainval-32x32"
    folder.mkdir(parents=True)
    result: list = []
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # the other run's build
        waiter = threading.Thread(
            target=lambda: result.append(ensure_store(data, tmp_path, index, "trainval"))
        )
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not (folder / "store.json").exists()
        key = store_mod.store_key(data, index, (32, 32))
        built = store_mod._build(data, folder, index, (32, 32), key, 1, "error")
    waiter.join(10)
    assert "waiting for another run that is building the image store" in caplog.text
    assert "building the image store" not in caplog.text.replace("that is building the image store", "")
    assert result[0].ident == built.ident


def test_a_rebuild_by_another_run_cannot_shift_an_open_stores_rows(data: Path, tmp_path: Path) -> None:
    """A run holds its store open across folds; another run rebuilds it for changed data (one image
    added at the top of the label file: every row moves). The first run's sources keep reading the
    file they opened; a worker that must map the file anew (spawn) refuses the new one."""
    index = read_trainval(data)
    opened = ensure_store(data, tmp_path, index, "trainval")
    before = opened.source(index.path.tolist()).read_many(range(len(index))).copy()
    label_path = data / "train/train_label.txt"
    Image.fromarray(np.full((32, 32, 3), 77, np.uint8)).save(data / "train/new.png")
    label_path.write_text("new.png 1\n" + label_path.read_text())
    rebuilt = ensure_store(data, tmp_path, read_trainval(data), "trainval")
    assert rebuilt.ident != opened.ident and rebuilt.shape[0] == len(index) + 1
    source = opened.source(index.path.tolist())  # made after the rebuild, as the next fold's is
    np.testing.assert_array_equal(source.read_many(range(len(index))), before)
    spawned = pickle.loads(pickle.dumps(source))
    with pytest.raises(FoldkitError, match="not the image store this run opened: another run rebuilt"):
        spawned.read(0)


def test_a_build_the_disk_cannot_hold_stops_before_decoding(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = shutil._ntuple_diskusage(10**9, 10**9, 1000)
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: full)
    monkeypatch.setattr(store_mod, "_fill", lambda *a, **k: pytest.fail("decoded although it cannot fit"))
    with pytest.raises(FoldkitError, match=r"the image store needs 0.00 GiB .* but only 0.00 GiB are free"):
        ensure_store(data, tmp_path, read_trainval(data), "trainval")
    assert not (tmp_path / "store").exists(), "nothing is left behind"


def test_an_image_over_pils_pixel_limit_is_named_not_a_traceback(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL refuses an image over twice ``MAX_IMAGE_PIXELS`` with DecompressionBombError, which is not
    an OSError: the native-size sampling and the build must both treat it as a bad image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # a bomb: over 3000 pixels; 32x32 is 1024
    index = read_trainval(data)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / index.path[0])
    with pytest.raises(FoldkitError, match=r"train_label.txt:1\): cannot decode image: Image size"):
        ensure_store(data, tmp_path, index, "trainval")
    store = ensure_store(data, tmp_path, index, "trainval", on_bad_image="skip")
    assert store.size == (32, 32) and store.bad == {index.path[0]}


def test_seed_test_mode_checks_every_test_image_before_predicting(
    data: Path, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``main.py --mode test`` named only the first bad test image, without its line, when its batch
    came up (with workers: inside a worker's traceback). Now all are named up front, nothing is
    written; ``--on-bad-image skip`` predicts them 0, as ensemble.py does."""
    import main
    from foldkit.cli import run

    shutil.copy(trained / "models/demo/test_efficientnet/fold0/best.pt", tmp_path / "1.pth")
    monkeypatch.chdir(tmp_path)
    test = read_test(data)
    for i in (2, 5):
        bad = data / test.path.iloc[i]
        bad.write_bytes(bad.read_bytes()[:60])
    work = tmp_path / "w"  # nothing but prediction.txt may be written: the project folder may be read-only
    argv = ["--batch=4", "--mode=test", "--model_name", "1.pth", "--data-dir", str(data), "--workers", "2"]
    argv += ["--work-dir", str(work)]
    assert run(main.main, argv) == 2
    err = capsys.readouterr().err
    for i in (2, 5):
        assert f"{data / test.path.iloc[i]} ({data / 'test/test_label.txt'}:{i + 1}): cannot decode" in err
    assert "Traceback" not in err and not (tmp_path / "prediction.txt").exists()
    assert run(main.main, [*argv, "--on-bad-image", "skip"]) == 0
    lines = (tmp_path / "prediction.txt").read_text().splitlines()
    assert [line.split(" ")[0] for line in lines] == test.name.tolist()
    assert lines[2].split(" ")[1] == lines[5].split(" ")[1] == "0"
    err = capsys.readouterr().err
    assert f"2 unreadable test image(s) predicted 0 (real): {test.name.iloc[2]}, {test.name.iloc[5]}" in err
    assert not work.exists()


def test_a_run_waiting_on_a_build_that_failed_and_cleaned_up_builds_itself(
    data: Path, tmp_path: Path
) -> None:
    """A failed first build removes its lock file and folder while a second run waits on that lock:
    the waiter wakes to a missing folder and must build there, not crash on it."""
    index = read_trainval(data)
    folder = tmp_path / "store/trainval-32x32"
    folder.mkdir(parents=True)
    result: list = []
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        run = lambda: result.append(ensure_store(data, tmp_path, index, "trainval"))  # noqa: E731
        waiter = threading.Thread(target=run)
        waiter.start()
        time.sleep(0.5)
        store_mod._remove_empty(folder)  # what the failed build does, still holding the lock
        assert not folder.exists()
    waiter.join(10)
    assert result and result[0].shape[0] == len(index)


def test_a_lock_on_a_removed_lock_file_is_taken_again(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed build removes its lock file while run B waits on it; run C then locks a new one and
    builds. B's lock on the removed file must not count: it waits for C and reuses C's store instead
    of building beside it (and deleting C's files)."""
    index = read_trainval(data)
    folder = tmp_path / "store/trainval-32x32"
    folder.mkdir(parents=True)
    got: dict[str, object] = {}
    builds: list[int] = []
    fill = store_mod._fill

    def slow_fill(*args: object, **kwargs: object) -> object:
        builds.append(1)
        time.sleep(1.0)  # C is still building when A lets B go
        return fill(*args, **kwargs)

    monkeypatch.setattr(store_mod, "_fill", slow_fill)

    def run(name: str) -> None:
        got[name] = ensure_store(data, tmp_path, index, "trainval", workers=1)

    b, c = (threading.Thread(target=run, args=(n,)) for n in "bc")
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # run A, whose build fails
        b.start()
        time.sleep(0.3)
        store_mod._remove_empty(folder)
        c.start()
        time.sleep(0.3)
    b.join(10)
    c.join(10)
    assert len(builds) == 1, "B built beside C"
    assert got["b"].ident == got["c"].ident == store_mod._open(folder).ident


def test_without_flock_only_an_old_temporary_file_is_taken_for_dead(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where fcntl is missing (Windows) no lock tells a live build from a dead one: a temporary file
    is removed only when untouched for 10 minutes, as a build writes continuously."""
    index = read_trainval(data)
    store = ensure_store(data, tmp_path, index, "trainval")
    dead, live = store.path / ".images.u8.abc.tmp", store.path / ".images.u8.def.tmp"
    for f in (dead, live):
        f.write_bytes(b"\0" * 1000)
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl now raises ImportError
    ensure_store(data, tmp_path, index, "trainval")
    assert not dead.exists() and live.exists()


def test_a_file_where_the_store_folder_should_be_is_an_error_not_a_hang(data: Path, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store/trainval-32x32").write_text("not a folder")
    with pytest.raises(FoldkitError, match=r"cannot use .*trainval-32x32 for the image store"):
        ensure_store(data, tmp_path, read_trainval(data), "trainval")


@pytest.mark.parametrize(
    ("dtype", "advice"),
    [(torch.float16, "fp16 overflows past 65,504: predict on the CPU (--device cpu)"), (None, "diverged")],
)
def test_nan_predictions_are_named_with_advice_for_the_precision(
    data: Path, dtype: torch.dtype | None, advice: str
) -> None:
    """A model that outputs inf is named, with fp16's own way out under fp16 (on the CPU autocast is
    off, so the dtype only chooses the message)."""
    from foldkit.predict import predict_probs

    index = read_trainval(data)
    src = FileSource(data, index.path.tolist(), (32, 32))
    dl = eval_loader(src, 32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), 16, 0, torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(1))
    model(torch.zeros(1, 3, 32, 32))
    torch.nn.init.constant_(model[1].bias, float("nan"))
    with pytest.raises(FoldkitError, match=f"validate: the model produced NaN/inf for {len(index)} of"):
        try:
            predict_probs(model, dl, torch.device("cpu"), (), dtype, desc="validate")
        except FoldkitError as exc:
            assert advice in str(exc)
            raise
