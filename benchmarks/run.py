"""Data-path benchmarks: is the model fed as fast as it can eat?

    # CPU: images/s of the eval pipeline, the old PNG path against the store + uint8 path
    python benchmarks/run.py --quick --data-dir D --work-dir W

    # GPU (one call, about five minutes): bare model step vs main.py's own loop, old vs new path
    python benchmarks/run.py --gpu --data-dir D --work-dir W [--old-tree PATH] [--out results.json]

    # GPU: efficientnet_b0's loop with CUDA graphs (any main.py setting: --set, repeatable), against
    # the eager bare step and the bare step compiled alike (--bare-compile)
    python benchmarks/run.py --gpu --sweep-workers 16 --epochs 3 --data-dir D --work-dir W \
        --bare-compile reduce-overhead --set train.compile=true --set train.compile_mode=reduce-overhead

    # any device: the training data path alone (no model), with and without the augmentations
    python benchmarks/run.py --loader --data-dir D --work-dir W --workers 16

    # any device: main.py's trainer step against the bare step with the same extras, one process
    python benchmarks/run.py --steps-compare [--img-size 32 --batch 4]

``--quick`` prints ``store_vs_png=RATIO`` on its own line (the eval pipeline at the stored size, 112 px,
batches ready for the model). ``--gpu`` runs, for ``tf_efficientnet_b3`` at 224 px and
``efficientnet_b0`` at 112 px (batch 128, bf16, channels_last, ``pretrained=false``):

1. the model's bare training step on random GPU tensors (forward + backward + fused AdamW): the
   ceiling; and the same with the default recipe's extras (dropout, drop path, clipping, EMA), for
   b3 also each extra alone and timm's ``ModelEmaV3`` against foldkit's ``CachedEma``;
2. ``main.py --fold 0 --epochs 2`` on D as a user runs it (the store path), train images/s of
   epoch 1 and 2 from its ``history.csv`` and the one-time warm-up from its ``train.log``; for b3
   also a lean run without the recipe's extras (the loop against the plain ceiling);
3. with ``--pair`` (the default): two b0 jobs on the one GPU at once, as ``main.py --devices
   cuda:0,cuda:0`` runs them, against one job alone run twice;
4. with ``--old-tree``: the same command in a checkout of the code before the uint8 path (float32
   resized in the workers, workers re-spawned per epoch, a host sync per step).

It also records the peak GPU memory of each bare step (and of ``convnext_tiny``, the default config's
second backbone) and the store build. Results go to ``--out`` as JSON and to the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing the package
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from foldkit.cli import add_set_arg  # noqa: E402
from foldkit.config import RunConfig  # noqa: E402
from foldkit.data import load_rgb, read_trainval  # noqa: E402
from foldkit.store import ensure_store  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# --quick: the eval pipeline on the CPU
# --------------------------------------------------------------------------------------------------


class LegacyPngDataset(torch.utils.data.Dataset):
    """The pre-store eval path, kept here only to measure against: decode the PNG in the worker,
    resize (cv2, area/linear) and normalise to float32 CHW there."""

    def __init__(self, data_dir: Path, paths: list[str], size: int) -> None:
        import albumentations as A
        import cv2

        self.data_dir, self.paths = data_dir, paths
        self.transform = A.Compose(
            [
                A.Resize(size, size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
                A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.transform(image=load_rgb(self.data_dir / self.paths[i]))["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _rate(batches: Any, n: int) -> float:
    start = time.perf_counter()
    seen = sum(len(b[0] if isinstance(b, list | tuple) else b) for b in batches)
    assert seen == n, (seen, n)
    return n / (time.perf_counter() - start)


def quick(args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of both eval paths at the stored size and at 224 px, same worker count."""
    from foldkit.predict import eval_loader

    index = read_trainval(args.data_dir).iloc[: args.n]
    paths = index.path.tolist()
    t0 = time.perf_counter()
    store = ensure_store(args.data_dir, args.work_dir, index, "bench", workers=args.workers or None)
    build = time.perf_counter() - t0
    device = torch.device("cpu")
    out: dict[str, Any] = {"images": len(paths), "workers": args.workers, "store_build_s": round(build, 2)}
    for size in (store.size[0], 224):
        png = torch.utils.data.DataLoader(
            LegacyPngDataset(args.data_dir, paths, size), batch_size=256, num_workers=args.workers
        )
        # channels_last as predict_checkpoint uses it (train.channels_last, true in every config)
        uint8 = eval_loader(store.source(paths), size, MEAN, STD, 256, args.workers, device, True)
        _rate(uint8, len(paths))  # warm the page cache and the workers once
        out[f"png_{size}px"] = round(_rate(png, len(paths)), 1)
        out[f"store_{size}px"] = round(_rate(uint8, len(paths)), 1)
        png_rate, store_rate = out[f"png_{size}px"], out[f"store_{size}px"]
        print(f"{size} px: old PNG path {png_rate:.0f} img/s, store + uint8 {store_rate:.0f} img/s")
    out["store_vs_png"] = round(out[f"store_{store.size[0]}px"] / out[f"png_{store.size[0]}px"], 2)
    print(f"store_vs_png={out['store_vs_png']}")
    return out


# --------------------------------------------------------------------------------------------------
# --gpu
# --------------------------------------------------------------------------------------------------


RECIPE = frozenset({"drop", "clip", "ema"})


def _random_batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random channels_last batch and 0/1 targets: what every bare step trains on."""
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    return x, (torch.rand(batch, device=device) > 0.5).float()


def _default_config(overrides: list[str]) -> RunConfig:
    """configs/default.yaml with ``KEY=VALUE`` overrides, checked as main.py checks them."""
    from foldkit.config import load_config, parse_override

    return load_config(ROOT / "configs" / "default.yaml", [parse_override(o) for o in overrides])


def _bare(
    backbone: str,
    size: int,
    batch: int,
    extras: frozenset[str] = frozenset(),
    ema_kind: str = "cached",
    compile_mode: str | None = None,
    device: torch.device | None = None,
) -> Callable[[int], None]:
    """The bare training step as a function of the step number, on fixed random tensors: forward +
    backward + AdamW (fused on CUDA), under bf16 autocast on CUDA, channels_last, with ``extras``."""
    import timm
    import timm.utils

    from foldkit.ema import CachedEma

    device = device or torch.device("cuda")
    cuda = device.type == "cuda"
    drop = {"drop_rate": 0.3, "drop_path_rate": 0.2} if "drop" in extras else {}
    model = timm.create_model(backbone, pretrained=False, num_classes=1, **drop).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    # the forward compiled; the EMA and clipping see the module itself, as in main.py
    net = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    ema_cls = CachedEma if ema_kind == "cached" else timm.utils.ModelEmaV3
    ema = ema_cls(model, decay=0.9995, use_warmup=True) if "ema" in extras else None
    x, y = _random_batch(batch, size, device)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(net(x).float().reshape(-1), y)
        loss.backward()
        if "clip" in extras:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=i)

    return step


def bare_step(
    backbone: str,
    size: int,
    batch: int,
    extras: frozenset[str] = frozenset(),
    ema_kind: str = "cached",
    steps: int = 30,
    warmup: int = 10,
    compile_mode: str | None = None,
) -> dict[str, float]:
    """Images/s and peak memory of forward + backward + fused AdamW on GPU tensors (bf16,
    channels_last). ``extras``: any of configs/default.yaml's training extras, ``drop`` (dropout 0.3,
    drop path 0.2), ``clip`` (grad-norm clipping) and ``ema`` (weight EMA: ``ema_kind`` timm's
    ``ModelEmaV3`` or foldkit's ``CachedEma``), so each one's cost can be told apart. ``compile_mode``:
    the model ``torch.compile``d in that mode, as ``train.compile`` does in main.py (the warm-up
    steps compile it and, for reduce-overhead, record its CUDA graphs)."""
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats()
    step = _bare(backbone, size, batch, extras, ema_kind, compile_mode)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        step(i)
    torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del step
    if compile_mode is not None:
        torch._dynamo.reset()  # its graphs and CUDA-graph pools go with the model, not on to the next run
    torch.cuda.empty_cache()
    return {"img_s": round(rate, 1), "peak_gib": round(peak, 2)}


def _trainer(backbone: str, size: int, batch: int, device: torch.device) -> Callable[[int], None]:
    """main.py's own training step (``foldkit.train._Trainer`` from configs/default.yaml: its model,
    criterion, scaler, clipping, optimizer, schedule and EMA) on fixed random tensors, as a function
    of the step number like ``_bare``'s."""
    import foldkit.train as ft
    from foldkit.models import create_model

    sets = ["pretrained=false", f"data.img_size={size}", f"train.batch_size={batch}", f"device={device}"]
    cfg = _default_config(sets)
    trainer = ft._make_trainer(cfg, create_model(cfg, backbone), device, 1000, 1.0, backbone)
    trainer.model.train()
    x, y = _random_batch(batch, size, device)

    def step(_: int) -> None:  # train_epoch's step without its loop
        trainer.forward_backward(x, y)
        trainer._optimizer_step()

    return step


def step_compare(args: argparse.Namespace) -> dict[str, Any]:
    """main.py's trainer step against the bare step with the same extras (``RECIPE``), in one process,
    alternated ``--rounds`` times: is what the loop runs per step slower than the bare step, before any
    data path? Any device (on the CPU a small --img-size and --batch make the host's part dominate)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    steps = {
        "bare+recipe": _bare(args.backbone, args.img_size, args.batch, RECIPE, device=device),
        "trainer": _trainer(args.backbone, args.img_size, args.batch, device),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds + 1):  # round 0 warms up (cudnn's search, the allocator)
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for i in range(args.steps):
                step(r * args.steps + i)
            _sync(device)
            if r > 0:
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    out: dict[str, Any] = {"device": str(device), "backbone": args.backbone, "img_size": args.img_size}
    out.update(batch=args.batch, steps=args.steps, rounds=args.rounds)
    for name, ms in times.items():
        out[name] = {"ms_per_step": [round(m, 2) for m in ms], "median_ms": round(float(np.median(ms)), 2)}
        print(f"{name}: {out[name]['median_ms']:.2f} ms a step (rounds: {out[name]['ms_per_step']})")
    out["trainer_over_bare"] = round(out["trainer"]["median_ms"] / out["bare+recipe"]["median_ms"], 3)
    print(f"trainer_over_bare={out['trainer_over_bare']}")
    return out


def components(backbone: str, size: int, batch: int) -> dict[str, dict[str, float]]:
    """The bare step with each recipe extra alone, then all of them, timm's EMA against foldkit's;
    the plain step again at the end shows how much the machine drifted meanwhile."""
    variants: list[tuple[str, frozenset[str], str]] = [
        ("plain", frozenset(), "cached"),
        ("+drop", frozenset({"drop"}), "cached"),
        ("+clip", frozenset({"clip"}), "cached"),
        ("+ema timm", frozenset({"ema"}), "timm"),
        ("+ema cached", frozenset({"ema"}), "cached"),
        ("recipe, timm ema", RECIPE, "timm"),
        ("recipe, cached ema", RECIPE, "cached"),
        ("plain again", frozenset(), "cached"),
    ]
    out = {}
    for name, extras, ema_kind in variants:
        out[name] = bare_step(backbone, size, batch, extras, ema_kind)
        print(f"bare {backbone} {size} {name}: {out[name]}", flush=True)
    return out


def main_py_run(
    tree: Path, args: argparse.Namespace, backbone: str, size: int, tag: str, extra: list[str]
) -> dict:
    """``main.py --fold 0 --epochs 2`` in ``tree`` on the benchmark data; epoch rates from history.csv."""
    work = Path(args.work_dir) / tag
    cmd = [
        sys.executable, str(tree / "main.py"), "--config", "configs/default.yaml",
        "--data-dir", str(args.data_dir), "--work-dir", str(work), "--fold", "0", "--epochs", "2",
        "--backbones", backbone, "--img-size", str(size), "--batch", str(args.batch),
        "--workers", str(os.cpu_count()), "--set", "pretrained=false", "--set", "data.near_dup=false", *extra,
        *(word for text in args.overrides for word in ("--set", text)),
    ]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return {"error": proc.returncode, "wall_s": round(wall, 1)}
    history = next(work.glob("models/*/*/fold0/history.csv")).read_text().splitlines()
    header = history[0].split(",")
    rates = [float(row.split(",")[header.index("img_s")]) for row in history[1:]]
    result = {"epoch1_img_s": rates[0], "epoch2_img_s": rates[1], "wall_s": round(wall, 1)}
    if len(rates) > 2:
        result["later_img_s"] = rates[2:]
    log = next(work.glob("models/*/*/fold0/train.log")).read_text()
    if (m := re.search(r"warm-up .*?: ([\d.]+) s", log)) is not None:
        result["warmup_s"] = float(m.group(1))
    return result


def _save(result: dict, path: Path | None) -> None:
    """Write what is measured so far: a run cut short by a time limit still leaves its figures."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def _ratios(run: dict, ceiling: float, recipe_ceiling: float) -> dict:
    if "epoch2_img_s" in run:
        run["of_ceiling"] = round(run["epoch2_img_s"] / ceiling, 3)
        run["of_recipe_ceiling"] = round(run["epoch2_img_s"] / recipe_ceiling, 3)
        run["epoch2_over_epoch1"] = round(run["epoch2_img_s"] / run["epoch1_img_s"], 3)
    return run


def pair_on_one_gpu(args: argparse.Namespace, backbone: str, size: int, single: dict) -> dict:
    """Two ``main.py`` jobs on one GPU at once (what ``--devices cuda:0,cuda:0`` does), each with
    half the CPU cores' workers, against the same job alone run twice in a row."""
    from concurrent.futures import ThreadPoolExecutor

    half = ["--workers", str(max(1, (os.cpu_count() or 2) // 2))]
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(main_py_run, ROOT, args, backbone, size, f"pair{i}-{backbone}", half) for i in (1, 2)
        ]
        runs = [job.result() for job in jobs]
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"pair_wall_s": round(wall, 1), "runs": runs}
    if "wall_s" in single and all("epoch2_img_s" in r for r in runs):
        out["sequential_wall_s"] = round(2 * single["wall_s"], 1)
        out["pair_over_sequential"] = round(wall / (2 * single["wall_s"]), 3)
        out["pair_epoch2_img_s"] = round(sum(r["epoch2_img_s"] for r in runs), 1)
        out["pair_epoch2_over_single"] = round(out["pair_epoch2_img_s"] / single["epoch2_img_s"], 3)
    return out


def loader_alone(args: argparse.Namespace, workers: int, augment: bool = True) -> dict[str, Any]:
    """Images/s of main.py's training data path without a model: the store, configs/default.yaml's
    CPU augmentations (with ``--set`` applied) in ``workers`` workers, uint8 batches pinned on CUDA
    and copied, normalised on the device at the store's size, channels_last (``foldkit.train._loaders``'
    parts). The most a training loop can take in; ``augment=False``: the workers only copy rows.

    Steady state only: the first ``workers * (prefetch_factor + 1)`` batches (the start-up burst of
    batches prepared in parallel) are taken untimed, then ``--loader-batches`` are timed from there;
    the images are repeated as needed so that one pass holds both (no epoch reset in the window)."""
    from foldkit.augment import train_transform
    from foldkit.dataset import ImageDataset, make_loader
    from foldkit.device_transforms import DeviceLoader, DeviceTransform

    cfg = _default_config(args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = read_trainval(args.data_dir)
    store = ensure_store(args.data_dir, args.work_dir, index, "trainval", workers=workers or None)
    prefetch = cfg.data.prefetch_factor
    skip, n = workers * (prefetch + 1) + 1, max(2, args.loader_batches)
    reps = -(-(skip + n + 1) * args.batch // len(index))  # ceil: one pass covers skip + n batches
    paths, labels = index.path.tolist() * reps, index.label.tolist() * reps
    transform = train_transform(cfg.augment, 0) if augment else None
    ds = ImageDataset(store.source(paths), labels, transform)
    loader = make_loader(ds, args.batch, True, workers, 0, device.type == "cuda", True, prefetch)
    batches = iter(DeviceLoader(loader, DeviceTransform(store.size[0], MEAN, STD, device, True), device))
    for _ in range(skip):
        next(batches)
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    _sync(device)
    rate = n * args.batch / (time.perf_counter() - start)
    del batches  # the workers stop with the iterator
    return {"img_s": round(rate, 1), "workers": workers, "augment": augment, "batches": n}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """efficientnet_b0 at 112 px (a host-bound step on a fast GPU): main.py's loop with several
    DataLoader worker counts, ``--epochs`` each, against the bare step measured in the same call."""
    backbone, size = "efficientnet_b0", 112
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count()}
    out["main_py_set"] = list(args.overrides)
    for name, extras in (("bare", frozenset()), ("bare+recipe", RECIPE)):
        out[name] = bare_step(backbone, size, args.batch, extras)
        print(name, out[name], flush=True)
    if args.bare_compile is not None:  # the ceilings of a compiled loop: the bare steps compiled alike
        for name, extras in (("bare+recipe compiled", RECIPE), ("bare compiled", frozenset())):
            out[name] = bare_step(backbone, size, args.batch, extras, compile_mode=args.bare_compile)
            print(name, args.bare_compile, out[name], flush=True)
            _save(out, args.out)
    for workers in args.sweep_workers:
        try:  # a ceiling beside the loop: its failure must not cost the loop's measurement
            out[f"loader alone {workers}"] = loader_alone(args, workers)
        except Exception as exc:
            out[f"loader alone {workers}"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("loader alone", out[f"loader alone {workers}"], flush=True)
        extra = ["--workers", str(workers), "--epochs", str(args.epochs)]
        run = main_py_run(ROOT, args, backbone, size, f"sweep{workers}-{backbone}", extra)
        out[f"workers {workers}"] = _ratios(run, out["bare"]["img_s"], out["bare+recipe"]["img_s"])
        if args.bare_compile is not None and "epoch2_img_s" in run:  # the recipe's: what the loop runs
            run["of_compiled_recipe_ceiling"] = round(
                run["epoch2_img_s"] / out["bare+recipe compiled"]["img_s"], 3
            )
            run["of_compiled_ceiling"] = round(run["epoch2_img_s"] / out["bare compiled"]["img_s"], 3)
        print("workers", workers, out[f"workers {workers}"], flush=True)
        _save(out, args.out)
    return out


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the data-path issue asks to measure on a GPU, in one call: the bare step and its
    recipe's parts, then main.py as a user runs it, the most telling runs first (a run cut short
    by a time limit keeps what it measured)."""
    out: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "main_py_set": list(args.overrides),
    }
    print(out, flush=True)
    cases = [("tf_efficientnet_b3", 224), ("efficientnet_b0", 112)]
    out[f"bare parts {cases[0][0]} {cases[0][1]}"] = components(*cases[0], args.batch)
    _save(out, args.out)
    for backbone, size in cases:
        for name, extras in (("bare", frozenset()), ("bare+recipe", RECIPE)):
            out[f"{name} {backbone} {size}"] = bare_step(backbone, size, args.batch, extras)
            print(name, backbone, size, out[f"{name} {backbone} {size}"], flush=True)
        _save(out, args.out)
    if args.convnext:
        out["bare convnext_tiny 224"] = bare_step("convnext_tiny", 224, args.batch)
    start = time.perf_counter()
    lean = ["--set", "train.ema=false", "--set", "train.grad_clip=null"]
    lean += ["--set", "train.drop_rate=null", "--set", "train.drop_path_rate=null"]
    runs = [("new", ROOT, b, s, []) for b, s in cases] + [("lean", ROOT, *cases[0], lean)]
    runs += [("old", Path(args.old_tree).resolve(), b, s, []) for b, s in cases] if args.old_tree else []
    for tag, tree, backbone, size, extra in runs:
        if tag == "lean" and args.pair:
            key = f"{cases[1][0]} {cases[1][1]}"
            out[f"pair {key}"] = pair_on_one_gpu(args, *cases[1], out.get(f"new {key}", {}))
            print("pair", key, out[f"pair {key}"], flush=True)
            _save(out, args.out)
        if tag in ("old", "lean") and time.perf_counter() - start > args.budget:
            print(f"skipping {tag} {backbone}: over --budget", flush=True)
            continue
        key = f"{backbone} {size}"
        run = main_py_run(tree, args, backbone, size, f"{tag}-{backbone}", extra)
        out[f"{tag} {key}"] = _ratios(run, out[f"bare {key}"]["img_s"], out[f"bare+recipe {key}"]["img_s"])
        print(tag, key, out[f"{tag} {key}"], flush=True)
        _save(out, args.out)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--quick", action="store_true", help="CPU: eval pipeline, old PNG path vs store + uint8"
    )
    mode.add_argument("--gpu", action="store_true", help="GPU: bare step vs main.py's loop, old vs new")
    mode.add_argument(
        "--steps-compare",
        action="store_true",
        help="any device: main.py's trainer step against the bare step with the same extras, alternated",
    )
    mode.add_argument(
        "--loader",
        action="store_true",
        help="any device: the training data path alone (store, augmentations, device transform), "
        "with and without the augmentations, at --workers",
    )
    p.add_argument(
        "--data-dir", type=Path, help="data in the seed's layout (foldkit.synthetic); all but --steps-compare"
    )
    p.add_argument("--work-dir", type=Path, help="scratch folder (stores, runs); all but --steps-compare")
    p.add_argument("--n", type=int, default=3000, help="--quick: images to read")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="--quick: DataLoader workers for both paths; --loader: its workers (0: the main process)",
    )
    p.add_argument(
        "--loader-batches",
        type=int,
        default=60,
        help="--loader, --sweep-workers: batches the loader alone is timed on, after its start-up burst",
    )
    p.add_argument("--batch", type=int, default=128, help="--gpu, --loader, --steps-compare: batch size")
    p.add_argument("--backbone", default="efficientnet_b0", help="--steps-compare: the model")
    p.add_argument("--img-size", type=int, default=112, help="--steps-compare: input side")
    p.add_argument("--steps", type=int, default=30, help="--steps-compare: steps per round and side")
    p.add_argument("--rounds", type=int, default=3, help="--steps-compare: timed rounds per side")
    p.add_argument("--old-tree", type=Path, default=None, help="--gpu: a checkout of the pre-store code")
    p.add_argument(
        "--sweep-workers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="--gpu: instead of the full set, efficientnet_b0's main.py loop at these worker counts",
    )
    p.add_argument("--epochs", type=int, default=3, help="--sweep-workers: epochs per run")
    p.add_argument(
        "--bare-compile",
        default=None,
        metavar="MODE",
        help="--sweep-workers: also the bare steps (with the recipe's extras, then plain) torch.compile'd "
        "in MODE (reduce-overhead: CUDA graphs), the ceilings of a loop run with --set train.compile=true",
    )
    p.add_argument(
        "--pair",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--gpu: also two efficientnet_b0 jobs on the one GPU at once (--devices cuda:0,cuda:0)",
    )
    p.add_argument(
        "--convnext", action="store_true", help="--gpu: also the bare step of convnext_tiny at 224 px"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=240,
        help="--gpu: seconds of main.py runs before the old path is skipped",
    )
    add_set_arg(
        p,
        "--gpu: also pass --set KEY=VALUE to every main.py run, repeatable (e.g. train.compile=true "
        "--set train.compile_mode=reduce-overhead: the loop with CUDA graphs against the eager bare step)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if not args.steps_compare and (args.data_dir is None or args.work_dir is None):
        p.error("--data-dir and --work-dir are needed (by every mode but --steps-compare)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        result = quick(args)
    elif args.steps_compare:
        result = step_compare(args)
    elif args.loader:
        result = {f"augment {a}": loader_alone(args, args.workers, a) for a in (True, False)}
        for name, r in result.items():
            print(f"loader alone, {name}: {r['img_s']:.0f} img/s from {r['workers']} workers", flush=True)
    else:
        result = worker_sweep(args) if args.sweep_workers else gpu(args)
    _save(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
