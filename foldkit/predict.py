"""Inference with test-time augmentation (ttach), shared by OOF prediction and test inference.

One code path for both, so the probabilities the blend is fitted on (OOF) are produced exactly the
way the test probabilities it is applied to are.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import ttach
from torch import nn
from tqdm.auto import tqdm

from foldkit.config import RunConfig, canonical_tta, from_dict
from foldkit.dataset import ImageDataset, ImageSource, make_loader
from foldkit.device_transforms import DeviceLoader, DeviceTransform
from foldkit.distributed import gather_by_index, is_main, shard
from foldkit.io import FoldkitError
from foldkit.models import create_model, load_weights
from foldkit.store import FileSource, native_size

log = logging.getLogger(__name__)


def parse_tta(text: str) -> list[str]:
    """``hflip`` or ``hflip,vflip`` from the command line -> checked TTA names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    tta_transforms(names)  # raises on unknown names, before any work
    return names


def tta_transforms(names: Sequence[str]) -> ttach.Compose | None:
    """ttach transforms for the config's TTA names; None when no TTA (``none`` or empty). Built from
    ``canonical_tta``'s spelling (which also refuses unknown names), so lists it calls equal build
    equal transforms."""
    names = canonical_tta(names)
    if names == ["none"]:
        return None
    if names == ["d4"]:
        return ttach.aliases.d4_transform()
    make = {
        "hflip": ttach.HorizontalFlip,
        "vflip": ttach.VerticalFlip,
        "rot90": lambda: ttach.Rotate90(angles=[0, 90, 180, 270]),
    }
    return ttach.Compose([make[n]() for n in names])


class _Probability(nn.Module):
    """Sigmoid on the model's logit, so ttach averages probabilities rather than logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x).float())


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Mixed precision on CUDA when asked; a no-op elsewhere."""
    if dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    loader: DeviceLoader,
    device: torch.device,
    tta: Sequence[str] = (),
    amp_dtype: torch.dtype | None = None,
    desc: str = "predict",
) -> np.ndarray:
    """Probabilities of class 1 for every item of ``loader``'s dataset, in dataset order.

    Results stay on the device until the end: one host sync per pass, not one per batch. Under DDP
    each rank predicts its shard and every rank returns the whole, gathered by image index.
    """
    net: nn.Module = _Probability(model)
    transforms = tta_transforms(tta)
    if transforms is not None:
        net = ttach.ClassificationTTAWrapper(net, transforms, merge_mode="mean")
    model.eval()
    probs, indices = [], []
    # None: no bar where the output is not a terminal (a job log, a redirected run); never off rank 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if is_main() else True)
    for images, _, idx in bar:
        with autocast(device, amp_dtype):
            probs.append(net(images).float().reshape(-1))
        indices.append(idx)
    idx_all = torch.cat(indices).numpy() if probs else np.zeros(0, dtype=np.int64)
    local = torch.cat(probs).cpu().numpy() if probs else np.zeros(0)
    out = gather_by_index(idx_all, local, len(loader.dataset), desc)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        why = (
            "fp16 overflows past 65,504: predict on the CPU (--device cpu), or train with --set "
            "train.amp=none, or bf16 on a GPU that has it natively"
            if amp_dtype == torch.float16
            else "diverged training? try a lower train.lr or train.grad_clip"
        )
        raise FoldkitError(f"{desc}: the model produced NaN/inf for {bad} of {len(out)} images ({why})")
    return out


def eval_loader(
    source: ImageSource,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    workers: int | None,
    device: torch.device,
    channels_last: bool | None = None,
    prefetch_factor: int = 4,
) -> DeviceLoader:
    """The one evaluation data path (validation, OOF, test): ordered uint8 batches, no CPU transform,
    resized and normalised on the device. Never shuffled; under DDP sharded by rank."""
    ds = ImageDataset(source, [-1] * len(source))
    loader = make_loader(
        ds, batch_size, False, workers, 0, device.type == "cuda", False, prefetch_factor, shard()
    )  # under DDP: this rank's batches, no padding (predict_probs gathers them)
    cl = device.type == "cuda" if channels_last is None else channels_last
    return DeviceLoader(loader, DeviceTransform(size, mean, std, device, cl), device)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a foldkit checkpoint safely (tensors and plain values only). ``mmap``: map the tensors
    instead of reading them (torch's zip format only), for a look at the settings of a large file."""
    path = Path(path)
    if not path.is_file():
        raise FoldkitError(f"checkpoint not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a raw pickle
        raise FoldkitError(
            f"{path}: not a torch checkpoint (it starts with {head!r}); foldkit's are the best.pt / "
            "last.pt files under models/<exp>/<backbone>/fold<k>/, or a copy of one"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler met a global it will not run
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise FoldkitError(
            f"{path}: refused, not loaded: it holds a pickled Python object{what} that could run code "
            "when loaded. foldkit checkpoints hold only tensors and plain values; load only files "
            "foldkit wrote, or that you trust and convert yourself."
        ) from None
    except Exception as exc:
        raise FoldkitError(
            f"{path}: cannot be loaded as a checkpoint ({type(exc).__name__}: {exc}); a truncated copy? "
            "foldkit's are the best.pt / last.pt files under models/<exp>/<backbone>/fold<k>/"
        ) from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise FoldkitError(f"{path}: not a foldkit checkpoint (needs 'model' and 'config' entries)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device) -> tuple[nn.Module, RunConfig]:
    """Rebuild the network a checkpoint was trained with and load its (validated) weights."""
    cfg = from_dict(ckpt["config"], "checkpoint config: ")
    model = create_model(cfg, ckpt["backbone"], pretrained=False)
    load_weights(model, ckpt["model"])
    model.to(device)
    if cfg.train.channels_last:  # the layout it was trained and validated in
        model = model.to(memory_format=torch.channels_last)
    return model, cfg


def predict_checkpoint(
    ckpt: dict[str, Any],
    data_dir: str | Path | None,
    paths: Sequence[str] | None,
    tta: Sequence[str],
    batch_size: int,
    workers: int | None,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "predict",
    source: ImageSource | None = None,
) -> np.ndarray:
    """Probabilities from a loaded checkpoint, with TTA, for ``source`` (a store's rows) or, without
    one, the image files ``paths`` under ``data_dir`` decoded at the size the checkpoint trained on."""
    model, cfg = model_from_checkpoint(ckpt, device)
    if source is None:
        if data_dir is None or paths is None:
            raise ValueError("predict_checkpoint needs a source, or data_dir and paths")
        size = ckpt.get("store_size") or native_size(Path(data_dir), pd.DataFrame({"path": list(paths)}))
        source = FileSource(Path(data_dir), paths, tuple(size))
    loader = eval_loader(
        source, cfg.data.img_size, ckpt["mean"], ckpt["std"], batch_size, workers, device,
        cfg.train.channels_last, cfg.data.prefetch_factor,
    )  # fmt: skip
    # Rounded to the precision the CSVs store, so a fresh prediction and a cached one are the same
    # numbers and can never fall on different sides of the threshold.
    return np.round(predict_probs(model, loader, device, tta, amp_dtype, desc), 8)


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, used to tell whether a cached prediction is still valid. Memoised on
    (path, size, mtime) because the ensemble step asks for each checkpoint's hash more than once."""
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()
