"""benchmarks/run.py's bookkeeping: the data path alone, and the ratios a GPU sweep reports."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_run", None)


def test_loader_alone_times_the_training_data_path(bench, tiny_data: Path, tmp_path: Path) -> None:
    """--loader on the CPU: store, augmentations in a worker, device transform; both variants report
    a rate over the asked batches, past the start-up burst, and leave no worker behind."""
    args = bench.parse_args(
        ["--loader", "--data-dir", str(tiny_data), "--work-dir", str(tmp_path), "--batch", "8",
         "--loader-batches", "3", "--set", "augment.hflip=1.0"]
    )  # fmt: skip
    for augment in (True, False):
        result = bench.loader_alone(args, 1, augment)
        assert result["batches"] == 3 and result["augment"] is augment
        assert result["img_s"] > 0
        assert not multiprocessing.active_children(), "the loader's workers must stop with it"
    assert (tmp_path / "store").is_dir()  # the store main.py would read, built once
    bad = bench.parse_args(["--loader", "--data-dir", str(tiny_data), "--work-dir", str(tmp_path),
                            "--set", "augment.hflip=2"])  # fmt: skip
    with pytest.raises(Exception, match=r"augment\.hflip"):  # the default config, with --set checked
        bench.loader_alone(bad, 0)


def test_worker_sweep_holds_the_loop_against_both_ceilings(bench, monkeypatch, tmp_path: Path) -> None:
    """A compiled loop is reported against the eager bare step and against the bare step compiled
    alike (--bare-compile): the second is the fair ceiling for a CUDA-graph loop."""
    modes = []

    def bare(backbone, size, batch, extras=frozenset(), ema_kind="cached", compile_mode=None, **_):
        modes.append((compile_mode, bool(extras)))
        if compile_mode:
            return {"img_s": 10000.0 if extras else 16000.0, "peak_gib": 1.0}
        return {"img_s": 3200.0 if extras else 4000.0, "peak_gib": 1.0}

    def loop(tree, args, backbone, size, tag, extra):
        return {"epoch1_img_s": 8400.0, "epoch2_img_s": 8000.0, "wall_s": 1.0}

    monkeypatch.setattr(bench, "bare_step", bare)
    monkeypatch.setattr(bench, "main_py_run", loop)
    monkeypatch.setattr(bench, "loader_alone", lambda args, workers, augment=True: {"img_s": 9000.0})
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *_: "test card")
    out_file = tmp_path / "sweep.json"
    args = bench.parse_args(
        ["--gpu", "--sweep-workers", "16", "--bare-compile", "reduce-overhead", "--data-dir", "D",
         "--work-dir", str(tmp_path), "--out", str(out_file), "--set", "train.compile=true"]
    )  # fmt: skip
    out = bench.worker_sweep(args)
    assert modes == [(None, False), (None, True), ("reduce-overhead", True), ("reduce-overhead", False)]
    run = out["workers 16"]
    assert run["of_ceiling"] == 2.0 and run["of_recipe_ceiling"] == 2.5
    assert run["of_compiled_recipe_ceiling"] == 0.8 and run["of_compiled_ceiling"] == 0.5
    assert out["loader alone 16"]["img_s"] == 9000.0
    assert json.loads(out_file.read_text())["workers 16"]["of_compiled_ceiling"] == 0.5  # saved per run


def test_no_pin_turns_pinning_off_however_it_is_passed() -> None:
    """profile_step.py --no-pin: foldkit's loaders pass ``pin`` positionally (train) and may pass it
    by name; either way the loader is made unpinned, every other argument untouched."""
    spec = importlib.util.spec_from_file_location("bench_profile", ROOT / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []

    def make_loader(dataset, size, shuffle, workers, seed, pin=False, drop_last=False, prefetch_factor=4):
        seen.append((dataset, size, shuffle, workers, seed, pin, drop_last, prefetch_factor))

    unpinned = module._unpinned(make_loader)
    unpinned("ds", 8, True, 2, 7, True, True, 3)
    unpinned("ds", 8, False, 2, 0, pin=True, prefetch_factor=5)
    assert seen == [("ds", 8, True, 2, 7, False, True, 3), ("ds", 8, False, 2, 0, False, False, 5)]


def test_a_failing_loader_measurement_does_not_cost_the_loops(bench, monkeypatch, tmp_path: Path) -> None:
    def broken(args, workers, augment=True):
        raise RuntimeError("no store")

    monkeypatch.setattr(bench, "bare_step", lambda *a, **k: {"img_s": 4000.0, "peak_gib": 1.0})
    monkeypatch.setattr(
        bench, "main_py_run", lambda *a: {"epoch1_img_s": 3000.0, "epoch2_img_s": 2800.0, "wall_s": 1.0}
    )
    monkeypatch.setattr(bench, "loader_alone", broken)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *_: "test card")
    args = bench.parse_args(["--gpu", "--sweep-workers", "8", "--data-dir", "D", "--work-dir", str(tmp_path)])
    out = bench.worker_sweep(args)
    assert out["loader alone 8"] == {"error": "RuntimeError: no store"}
    assert out["workers 8"]["of_ceiling"] == 0.7


def test_steps_compare_times_the_trainer_against_the_bare_step(bench, tmp_path: Path) -> None:
    """--steps-compare on the CPU: main.py's own trainer step and the bare step with the same extras,
    each timed in every round, and their ratio; it needs no data."""
    args = bench.parse_args(
        ["--steps-compare", "--backbone", "test_efficientnet", "--img-size", "32", "--batch", "2",
         "--steps", "2", "--rounds", "2", "--out", str(tmp_path / "steps.json")]
    )  # fmt: skip
    out = bench.step_compare(args)
    for side in ("bare+recipe", "trainer"):
        assert len(out[side]["ms_per_step"]) == 2 and out[side]["median_ms"] > 0
    assert out["trainer_over_bare"] == round(out["trainer"]["median_ms"] / out["bare+recipe"]["median_ms"], 3)
    with pytest.raises(SystemExit):  # every other mode still needs its data
        bench.parse_args(["--loader"])
