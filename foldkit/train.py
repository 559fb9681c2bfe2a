"""Train one backbone on one fold: ``fit_fold`` leaves checkpoints, logs and the fold's OOF file.

Per epoch: AdamW + cosine schedule with warmup (timm), optional EMA of weights (validated and saved
when on), AMP on CUDA, channels_last, gradient clipping and accumulation, early stopping on the
chosen metric. After the last epoch the best checkpoint predicts the holdout with the config's TTA
through ``foldkit.predict``, the same path test inference uses.

Crash-safe: ``last.pt`` is rewritten (atomically) after every epoch and, with ``save_every``, every N
batches; a re-run continues from it and ends with the OOF an uninterrupted run would have written
(what it holds and the checks before reuse: ``foldkit.resume``). A finished fold is skipped.

Under torchrun the same loop runs in every process with DistributedDataParallel: the loaders shard by
rank, predictions are gathered by image index, and only rank 0 writes (``foldkit.distributed``).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import random
import signal
import time
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm.optim
import timm.scheduler
import torch
from torch import nn
from tqdm.auto import tqdm

from foldkit import __version__, distributed
from foldkit.augment import train_transform
from foldkit.blend import best_threshold
from foldkit.config import FOLD_KEYS, RunConfig, save_config, to_dict
from foldkit.data import read_trainval
from foldkit.dataset import ImageDataset, make_loader
from foldkit.device_transforms import DeviceLoader, DeviceTransform
from foldkit.ema import CachedEma
from foldkit.io import FoldkitError, atomic_path, atomic_write_text, listed
from foldkit.models import count_params, create_model, data_stats
from foldkit.predict import (
    autocast,
    eval_loader,
    file_sha256,
    load_checkpoint,
    predict_checkpoint,
    predict_probs,
)
from foldkit.report import metrics
from foldkit.resume import (
    Progress,
    best_to_restore,
    check_compatible,
    config_changes,
    finished_oof,
    fold_lock,
    is_resumable,
    module_state,
    restore_trainer,
    resume_changes,
    set_rng_state,
    trainer_state,
)
from foldkit.store import FileSet, Store, open_images

log = logging.getLogger(__name__)

_SYNC_EVERY = 25  # batches between host reads of the running loss (progress bar cadence)
_OVERFLOW_STOP = 25  # fp16 batches overflowing in a row that stop the fold: nothing is being learnt
# Test hook: SIGKILL this process right after the given optimizer step (and any save due at it), so
# the resume tests kill a real run at an exact point. Never set outside tests.
_KILL_ENV = "FOLDKIT_TEST_KILL_AT_STEP"


@dataclass
class RunPaths:
    """Where one (experiment, backbone, fold) run leaves its artifacts."""

    model_dir: Path
    oof_dir: Path
    fold: int

    @classmethod
    def of(cls, work_dir: Path, exp: str, backbone: str, fold: int) -> RunPaths:
        safe = backbone.replace("/", "_")
        return cls(work_dir / "models" / exp / safe / f"fold{fold}", work_dir / "oof" / exp / safe, fold)

    @property
    def oof_csv(self) -> Path:
        return self.oof_dir / f"fold{self.fold}.csv"

    @property
    def oof_meta(self) -> Path:
        return self.oof_dir / f"fold{self.fold}.json"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FoldkitError(f"device '{name}' was asked for but CUDA is not available here (use --device cpu)")
    return device


def amp_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU runs it natively (no loss scaling needed), else fp16; never on CPU."""
    if device.type != "cuda" or cfg.train.amp == "none":
        return None
    if cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32`` (no autocast): what a run computes in, for logs and checkpoints."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 tensor cores (compute capability 8.0 on: Ampere, Ada, Hopper; ROCm).

    Why not ``torch.cuda.is_bf16_supported()``: by default it also says yes where bf16 is only
    emulated (T4, V100, P100: the GPUs of Kaggle's and Colab's notebooks; pytorch/pytorch#148322),
    which computes in fp32 without tensor cores: slower than fp16 with loss scaling, which they have."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def run_seed(seed: int, backbone: str, fold: int) -> int:
    """The training seed of one (backbone, fold) run, derived from the config's base ``seed``.

    Why: with one seed for every run, all backbones and folds saw the same batch order and the same
    augmentation stream, so the ensemble's members were less diverse than they could be. The mix is
    numpy's ``SeedSequence`` over [seed, crc32(backbone), fold]: stable across processes and
    machines (Python's ``hash`` of a string is salted per process), so a run is still reproducible.
    """
    entropy = [int(seed), zlib.crc32(backbone.encode("utf-8")), int(fold)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def epoch_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Validation loss, AUC (NaN on a one-class holdout), F1 at 0.5 and the best F1 with its
    threshold: the report's own metrics, so the training log and the OOF report agree."""
    m = metrics(y, p)
    auc = float("nan") if m["auc"] is None else m["auc"]
    return {
        "val_loss": m["logloss"],
        "auc": auc,
        "f1_05": m["f1_05"],
        "best_f1": m["best_f1"],
        "threshold": m["best_threshold"],
    }


def _score(metrics: dict[str, float], metric: str) -> float:
    """Higher is better for every selection metric."""
    if metric in ("loss", "last"):  # last keeps every epoch anyway; its score is logged as val_loss
        return -metrics["val_loss"]
    return {"f1": metrics["best_f1"], "auc": metrics["auc"]}[metric]


def _pos_weight(cfg: RunConfig, labels: np.ndarray) -> float:
    pw = cfg.train.pos_weight
    if pw == "balanced":
        return float((labels == 0).sum() / max(1, (labels == 1).sum()))
    return 1.0 if pw is None else float(pw)


def _loaders(
    cfg: RunConfig,
    images: Store | FileSet,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    seed: int,
) -> tuple[DeviceLoader, DeviceLoader]:
    """Train loader seeded with ``seed`` (the run's own, ``run_seed``: shuffled, augmented on the CPU
    in uint8) and the eval loader (ordered), both resized and normalised on the device. Built once
    per fit: their workers persist."""
    dc, pin = cfg.data, device.type == "cuda"
    train_ds = ImageDataset(
        images.source(train_df.path.tolist()), train_df.label, train_transform(cfg.augment, seed)
    )
    # its own generator (make_loader): dropout's random stream never feeds a worker seed
    train_dl = make_loader(
        train_ds, cfg.train.batch_size, True, dc.workers, seed, pin, True, dc.prefetch_factor,
        distributed.shard(),
    )  # fmt: skip
    cl = cfg.train.channels_last
    to_device = DeviceTransform(dc.img_size, mean, std, device, cl)
    val_dl = eval_loader(
        images.source(val_df.path.tolist()), dc.img_size, mean, std, cfg.train.batch_size * 2,
        dc.workers, device, cl, dc.prefetch_factor,
    )  # fmt: skip
    return DeviceLoader(train_dl, to_device, device), val_dl


class _LossTally:
    """An epoch's running training loss, summed on the device and read back (a host sync) only at
    the progress bar's cadence: a per-step ``.item()`` would stall the GPU queue.

    Under fp16 a batch's loss can overflow (inf/NaN) where nothing else is harmed: GradScaler skips
    that optimizer step and lowers its scale. Stopping the fold there would stop it for good, since a
    resume replays the same batch. So under fp16 such a batch is left out of the sum and counted;
    ``_OVERFLOW_STOP`` overflowed batches in a row are a diverged run and stop the fold, and so does
    a BatchNorm whose running statistics took the overflow (``check_weights``). In bf16 and fp32 a
    NaN/inf loss always stops it."""

    def __init__(
        self, device: torch.device, progress: Progress, carried: bool, streak: torch.Tensor | None
    ) -> None:
        """``streak``: the trainer's count of fp16 batches overflowed in a row (None: not fp16)."""
        # under DDP rank 0 carries the resumed part of the epoch; every rank adds its own batches
        self.total = torch.tensor(progress.loss_sum if carried else 0.0, dtype=torch.float32, device=device)
        self.seen = progress.seen if carried else 0
        # overflowed images before the resume: kept whatever this run's precision (auto resolves per GPU)
        self.carried_dropped = progress.dropped if carried else 0
        zero = functools.partial(torch.zeros, (), dtype=torch.float32, device=device)
        self.dropped = zero() if streak is not None else None  # this pass's overflowed images
        self.streak = streak  # overflowed batches in a row, up to the last one, across epochs
        self.last_read = (progress.seen, progress.dropped)  # (images, overflowed), summed over ranks

    def add(self, loss: torch.Tensor, n: int) -> None:
        loss = loss.detach()
        if self.dropped is None or self.streak is None:
            self.total += loss * n
        else:
            bad = ~torch.isfinite(loss)
            self.total += torch.where(bad, 0.0, loss * n)
            self.dropped += bad * n
            self.streak.add_(1).mul_(bad)
        self.seen += n


@dataclass
class _Trainer:
    """The mutable state of one fit: model, EMA, optimiser, schedule, scaler."""

    cfg: RunConfig
    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: CachedEma | None
    scaler: torch.amp.GradScaler
    step: int = 0
    label: str = ""  # "<backbone> fold <k>", for error messages
    kill_at: int | None = None  # test hook (_KILL_ENV)
    ddp: nn.Module | None = None  # ``model`` inside DistributedDataParallel under torchrun
    # fp16: batches whose loss overflowed in a row, carried across epochs (see _LossTally)
    overflow_streak: torch.Tensor | None = None

    @property
    def net(self) -> nn.Module:
        """The module a training step runs: the DDP wrapper (it averages the gradients) or ``model``."""
        return self.ddp if self.ddp is not None else self.model

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def ema_decay(self) -> float:
        """The EMA decay used at the latest optimizer step, NaN without EMA.

        Why: ``ModelEmaV3(use_warmup=True)`` ramps the decay up as 1 - (1 + step)^(-2/3), capped at
        ``train.ema_decay``; a short run never reaches e.g. 0.9995, so the configured value alone
        misstates how much the validated weights average. history.csv and the log show this one.
        """
        if self.ema is None:
            return math.nan
        return float(self.ema.get_decay(self.step))

    def train_epoch(
        self,
        loader: DeviceLoader,
        progress: Progress,
        save: Callable[[Progress], None] | None = None,
        save_every: int | None = None,
    ) -> tuple[float, float, int]:
        """Train epoch ``progress.epoch`` from batch ``progress.batch`` on; returns (mean loss of the
        whole epoch, images per second of this pass, images trained on in the whole epoch), each over
        all ranks under DDP (the saved ``progress.loss_sum``/``seen`` are such sums: rank 0 carries them).

        The running loss stays on the device and is read back (and checked for NaN/inf) only every
        ``_SYNC_EVERY`` batches and at the end: a per-step ``.item()`` would stall the GPU queue. With
        ``save_every``, ``save`` gets the partial epoch's progress at the first optimizer step at or
        after every ``save_every`` batches: never mid-accumulation, whose summed gradients no
        checkpoint holds.
        """
        tc, epoch, first = self.cfg.train, progress.epoch, progress.batch
        ls = tc.label_smoothing
        self.model.train()
        loader.batch_sampler.set_epoch(epoch, first)
        n_batches = len(loader) if tc.max_train_batches is None else min(len(loader), tc.max_train_batches)
        carried = distributed.is_main()
        if self.scaler.is_enabled() and self.overflow_streak is None:
            self.overflow_streak = torch.zeros((), dtype=torch.float32, device=self.device)
        tally = _LossTally(self.device, progress, carried, self.overflow_streak)
        fresh, good, start = 0, self.step, time.perf_counter()
        next_save = (first // save_every + 1) * save_every if save and save_every else None
        bar = tqdm(
            loader, total=n_batches, initial=first, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
            disable=None if carried else True,  # None: no bar where the output is not a terminal
        )  # fmt: skip
        for i, (images, labels, _) in enumerate(bar, start=first):
            if i >= n_batches:
                break
            # host-bound on a fast GPU: every kernel launch counts, so no-op arithmetic is skipped
            targets = labels * (1 - ls) + 0.5 * ls if ls else labels
            stepped = (i + 1) % tc.accum_steps == 0 or i + 1 == n_batches
            # batches in this accumulation group: fewer in a last partial group, whose step then
            # gets the mean gradient of its own batches, as large as a full group's
            group = min(tc.accum_steps, n_batches - i // tc.accum_steps * tc.accum_steps)
            # DDP: average the gradients once per optimizer step, not on every accumulated batch
            with self.ddp.no_sync() if self.ddp is not None and not stepped else nullcontext():
                loss = self.forward_backward(images, targets, group)
            if stepped:
                self._optimizer_step()
            tally.add(loss, len(images))
            fresh += len(images)
            if (i + 1) % _SYNC_EVERY == 0 or i + 1 == n_batches:
                (loss_sum, seen_all, dropped), good = self._checked_sums(tally, epoch, good), self.step
                bar.set_postfix(
                    loss=f"{loss_sum / max(1, seen_all - dropped):.4f}",
                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                    img_s=f"{fresh * distributed.world_size() / max(1e-9, time.perf_counter() - start):.0f}",
                )
            if next_save is not None and stepped and next_save <= i + 1 < n_batches:
                (loss_sum, seen_all, dropped), good = self._checked_sums(tally, epoch, good), self.step
                self.check_weights(epoch)
                save(replace(progress, batch=i + 1, loss_sum=loss_sum, seen=seen_all, dropped=dropped))
                next_save = ((i + 1) // save_every + 1) * save_every
            if stepped and self.step == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        loss_sum, seen_all, dropped, _ = self._sums(tally)  # syncs, so the rate below counts finished work
        self.check_weights(epoch)
        fresh_all = seen_all - progress.seen  # rank 0 carried the resumed part; every rank added its own
        rate = fresh_all / max(1e-9, time.perf_counter() - start)
        counted = seen_all - dropped  # under fp16, the images whose loss did not overflow
        return loss_sum / counted if counted else math.nan, rate, seen_all

    def forward_backward(self, images: torch.Tensor, targets: torch.Tensor, group: int = 1) -> torch.Tensor:
        """One batch's forward under autocast and its scaled backward; returns the loss. ``group``:
        the batches accumulated into one optimizer step, each adding its share of their mean
        gradient. The one place a training step computes its loss: the epoch loop, the warm-up and
        the benchmarks' bare steps all call it."""
        with autocast(self.device, self.dtype):
            loss = self.criterion(self.net(images).float().reshape(-1), targets)
        self.scaler.scale(loss / group if group > 1 else loss).backward()
        return loss

    def _sums(self, tally: _LossTally) -> tuple[float, int, int, bool]:
        """(loss sum, images, overflowed images, whether ``_OVERFLOW_STOP`` batches overflowed in a
        row) so far, summed over the ranks under DDP (where one rank's streak stops them all);
        reading them syncs."""
        if distributed.world_size() == 1:
            if tally.dropped is None or tally.streak is None:
                return float(tally.total.item()), tally.seen, tally.carried_dropped, False
            read = torch.stack([tally.total, tally.dropped, tally.streak]).cpu()
            dropped_all = tally.carried_dropped + int(read[1])
            return float(read[0]), tally.seen, dropped_all, float(read[2]) >= _OVERFLOW_STOP
        zero = torch.zeros((), device=self.device)
        dropped = zero if tally.dropped is None else tally.dropped
        long = zero if tally.streak is None else (tally.streak >= _OVERFLOW_STOP).float()
        seen = torch.tensor(float(tally.seen), dtype=torch.float64, device=self.device)
        dropped = dropped + tally.carried_dropped
        parts = [t.to(self.device, torch.float64) for t in (tally.total, seen, dropped, long)]
        summed = distributed.all_sum(torch.stack(parts)).cpu()
        return float(summed[0]), int(summed[1]), int(summed[2]), bool(summed[3] > 0)

    def _checked_sums(self, tally: _LossTally, epoch: int, good: int) -> tuple[float, int, int]:
        """Read the running loss back (a host sync; under DDP summed over the ranks, so all of them
        stop together); stop the fold on NaN/inf, or under fp16 on a diverged run (see
        ``_LossTally``). The bad step lies after ``good``, the step of the last good read."""
        value, seen, dropped, diverged = self._sums(tally)
        new_seen, new_dropped = seen - tally.last_read[0], dropped - tally.last_read[1]
        tally.last_read = (seen, dropped)
        if not math.isfinite(value) or diverged:
            overflowed = f"overflowed (inf/NaN) in {_OVERFLOW_STOP} batches in a row"
            what = overflowed if diverged else f"became {value}"
            raise FoldkitError(
                f"{self.label}: the training loss {what} in epoch {epoch}, between optimizer steps "
                f"{good + 1} and {self.step}. Training stopped; the checkpoints saved before are kept "
                f"as they were. {self.way_out()}"
            )
        if new_dropped:
            log.warning(
                "%s: the fp16 loss overflowed on %d of %d images in epoch %d, between optimizer steps %d "
                "and %d; the loss scaler skipped those steps, and the epoch's loss leaves them out",
                self.label, new_dropped, new_seen, epoch, good + 1, self.step,
            )  # fmt: skip
            self.check_weights(epoch)  # a BatchNorm that took the overflow keeps inf/NaN statistics
        return value, seen, dropped

    def check_weights(self, epoch: int) -> None:
        """Refuse to go on (and so to save) with NaN/inf weights or running statistics: a finite loss
        can still be followed by an update that breaks the weights (an overflowing gradient), and an
        fp16 forward overflow that the loss scaler skipped leaves a BatchNorm's statistics inf/NaN."""
        tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        floats = {k: t.detach() for k, t in tensors.items() if t.is_floating_point()}
        if bool(torch.stack([t.isfinite().all() for t in floats.values()]).all()):
            return
        bad = [k for k, t in floats.items() if not bool(t.isfinite().all())]
        raise FoldkitError(
            f"{self.label}: the weights became NaN/inf in epoch {epoch}, by optimizer step {self.step} "
            f"({', '.join(listed(bad, 3))}). Training stopped; the checkpoints saved before are kept "
            f"as they were. {self.way_out()}"
        )

    def way_out(self) -> str:
        """What to try after a NaN/inf: fp16 overflows past 65,504, so leave it for bf16 where the GPU
        has it natively, else for fp32 (emulated bf16 would be fp32's speed at bf16's precision)."""
        hint = "Try a lower train.lr or train.grad_clip"
        if self.dtype != torch.float16:
            return hint + "."
        if native_bf16(self.device):
            return hint + ", or --set train.amp=bf16 (fp16 overflows past 65,504; bf16 does not)."
        return hint + ", or --set train.amp=none (fp16 overflows past 65,504; this GPU has no native bf16)."

    def _apply_gradients(self) -> None:
        """Clip, step the optimizer and the scaler, clear the gradients: the update itself."""
        if self.cfg.train.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self) -> None:
        self._apply_gradients()
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)


def _make_trainer(
    cfg: RunConfig,
    model: nn.Module,
    device: torch.device,
    steps_per_epoch: int,
    pos_weight: float,
    label: str = "",
) -> _Trainer:
    tc = cfg.train
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # fused: one kernel for the whole update instead of a chain of multi-tensor ops (CUDA only)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = timm.optim.create_optimizer_v2(
        model, "adamw", lr=tc.lr, weight_decay=tc.weight_decay, **fused
    )
    # train_epoch also steps on a partial final accumulation, hence ceil, not floor
    updates = max(1, math.ceil(steps_per_epoch / tc.accum_steps))
    warmup = min(int(updates * tc.warmup_epochs), updates * tc.epochs - 1)
    scheduler = timm.scheduler.CosineLRScheduler(  # warmup_prefix: reach the peak lr, then decay
        optimizer,
        t_initial=max(1, updates * tc.epochs - warmup),
        lr_min=tc.min_lr,
        warmup_t=warmup,
        warmup_lr_init=tc.lr * 0.01,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    ema = CachedEma(model, decay=tc.ema_decay, use_warmup=True) if tc.ema else None
    if tc.compile:
        model = torch.compile(model, mode=tc.compile_mode)
    dtype = amp_dtype(cfg, device)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # under DDP only rank 0 dies (after its save at that step); torchrun then stops the others
    kill_at = int(os.environ[_KILL_ENV]) if os.environ.get(_KILL_ENV) and distributed.is_main() else None
    return _Trainer(
        cfg, model, device, dtype, criterion, optimizer, scheduler, ema, scaler, 0, label, kill_at
    )


def _snapshot(trainer: _Trainer) -> dict[str, Any]:
    """Copies of everything a training step changes: weights and buffers, EMA, optimizer, scaler."""
    clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731
    return {
        "model": clone(trainer.model.state_dict()),
        "ema": clone(trainer.ema.module.state_dict()) if trainer.ema is not None else None,
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scaler": trainer.scaler.state_dict(),
    }


def _restore(trainer: _Trainer, saved: dict[str, Any]) -> None:
    trainer.model.load_state_dict(saved["model"])
    if trainer.ema is not None:
        trainer.ema.module.load_state_dict(saved["ema"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"]:
        trainer.scaler.load_state_dict(saved["scaler"])
    trainer.optimizer.zero_grad(set_to_none=True)


def warm_up(trainer: _Trainer, steps: int = 2) -> float:
    """``steps`` full training steps (forward, backward, clipping, optimizer, EMA) on a dummy batch,
    with everything they change restored after; returns their seconds.

    With ``cudnn.benchmark`` the first step of every new shape searches for the fastest kernels and
    CUDA loads kernels lazily; the optimizer allocates its state and the caching allocator grows on
    the first update. About 20-30 s for an EfficientNet at batch 128 on an H200, which would otherwise
    land in epoch 1 and make its images/s meaningless. The cost is the same; it is just logged apart
    from the epochs. The RNG streams are forked, so dropout draws here shift nothing: a run and its
    resumed continuation see the same random numbers.
    """
    cfg, model, device = trainer.cfg, trainer.model, trainer.device
    start = time.perf_counter()
    saved = _snapshot(trainer)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    size, batch = cfg.data.img_size, cfg.train.batch_size
    x = torch.zeros(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.zeros(batch, device=device)
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(steps):
            trainer.forward_backward(x, y)
            trainer._apply_gradients()
            if trainer.ema is not None:
                trainer.ema.update(model, step=trainer.step + 1)
    _restore(trainer, saved)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically; only rank 0 writes under DDP (the others hold the same state)."""
    if not distributed.is_main():
        return
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _save_last(trainer: _Trainer, path: Path, payload: dict[str, Any], progress: Progress) -> None:
    """``last.pt``: the eval weights (usable like best.pt) plus everything a resume needs."""
    if not distributed.is_main():
        return
    state = {**payload, "model": module_state(trainer.eval_model()), **trainer_state(trainer, progress)}
    _save_checkpoint(path, state)


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    if not distributed.is_main():
        return
    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))


def _attach_log(model_dir: Path, append: bool = False) -> logging.Handler:
    """Copy the foldkit log of this run into its folder (``train.log``). ``append`` when resuming: the
    run continues the interrupted one, whose epochs are logged nowhere else; a fresh run starts anew."""
    handler = logging.FileHandler(model_dir / "train.log", mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("foldkit").addHandler(handler)
    return handler


def open_trainval_images(
    cfg: RunConfig, data_dir: Path, work_dir: Path, index: pd.DataFrame | None = None
) -> Store | FileSet:
    """Every train + validate image, decoded once: the store (built or reused), or with
    ``data.cache: false`` a full decode check. Unreadable images stop here (exit 2, each named with
    its label-file line) or, with ``data.on_bad_image: skip``, are listed in ``.bad``. Call it before
    any CUDA work: the build forks decoding processes. ``index``: the train+validate index when the
    caller has read it already (``read_trainval`` otherwise)."""
    workers = None if cfg.data.workers is None else max(1, cfg.data.workers)
    index = read_trainval(Path(data_dir)) if index is None else index
    return open_images(
        data_dir,
        work_dir,
        index,
        "trainval",
        cfg.data.cache,
        _store_size(cfg),
        workers,
        cfg.data.on_bad_image,
    )


def _store_size(cfg: RunConfig) -> tuple[int, int] | None:
    """The size the uint8 pipeline keeps images at: ``data.store_size``, or None for their native size."""
    return None if cfg.data.store_size is None else (cfg.data.store_size, cfg.data.store_size)


def fit_fold(
    cfg: RunConfig,
    backbone: str,
    fold: int,
    folds_df: pd.DataFrame,
    folds_hash: str,
    data_dir: Path,
    work_dir: Path,
    exp: str,
    resume: bool = True,
    force: bool = False,
    save_every: int | None = None,
    images: Store | FileSet | None = None,
) -> dict[str, Any]:
    """Train ``backbone`` on folds != ``fold``, select on fold ``fold``, write the fold's OOF file.

    A fold whose OOF files match its ``best.pt`` and today's settings is skipped (``force``: trained
    again from scratch); an unfinished one continues from its ``last.pt`` when ``resume``.
    ``save_every``: also save ``last.pt`` every that many training batches (long epochs).
    Returns a summary: best epoch, score, and the paths written.
    """
    paths = RunPaths.of(work_dir, exp, backbone, fold)
    paths.model_dir.mkdir(parents=True, exist_ok=True)
    task = FoldTask(cfg, backbone, fold, folds_df, folds_hash, Path(data_dir), Path(work_dir), paths)
    with fold_lock(paths.model_dir, task.label) if distributed.is_main() else nullcontext():
        return _fit_fold(task, resume, force, save_every, images)


@dataclass(frozen=True)
class FoldTask:
    """One (backbone, fold) run and where it reads and writes: what the steps of ``fit_fold`` share."""

    cfg: RunConfig
    backbone: str
    fold: int
    folds_df: pd.DataFrame
    folds_hash: str
    data_dir: Path
    work_dir: Path
    paths: RunPaths

    @property
    def label(self) -> str:
        return f"{self.backbone} fold {self.fold}"


def fold_states(
    cfg: RunConfig,
    backbones: list[str],
    folds: list[int],
    folds_hash: str,
    work_dir: Path,
    exp: str,
    world_size: int,
    resume: bool = True,
) -> tuple[dict[tuple[str, int], list[str]], dict[tuple[str, int], list[str]]]:
    """Two maps (backbone, fold) -> the settings that differ from ``cfg``: for every fold finished on
    these folds (an empty list: current, ``fit_fold`` skips it; else it refuses it), and, with
    ``resume``, for every unfinished one holding a ``last.pt`` with resume state (empty: it resumes).

    Read once, before anything trains: ``main.py`` refuses every conflict at once, so ``--fold all``
    with a changed setting does not train some folds with it and then stop at one made with the old
    ones (``fit_fold`` refuses such a fold again, for direct callers), and ``--devices`` leaves the
    finished jobs out instead of starting a process to say so. The checkpoints are memory-mapped:
    only their small pickled part is read."""
    config, finished, unfinished = to_dict(cfg), {}, {}
    for fold in folds:
        for backbone in backbones:
            key, paths = (backbone, fold), RunPaths.of(work_dir, exp, backbone, fold)
            done = finished_oof(paths.oof_csv, paths.oof_meta, paths.model_dir / "best.pt")
            if done is not None:  # finished on other folds: retrained by fit_fold, with a warning
                if done.get("folds_hash") == folds_hash:
                    finished[key] = _changed_settings(done, config)
                continue
            last = paths.model_dir / "last.pt"
            if not (resume and last.is_file()):
                continue
            ckpt = load_checkpoint(last, mmap=True)
            if is_resumable(ckpt):
                unfinished[key] = resume_changes(ckpt, config, folds_hash, backbone, fold, world_size)
    return finished, unfinished


def _changed_settings(done: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The settings a finished fold (its OOF sidecar ``done``) had other values of. The fold settings
    are judged by the folds hash they produce instead (``FOLD_KEYS``)."""
    return config_changes(done.get("config", {}), config, FOLD_KEYS)


def _fit_fold(
    task: FoldTask, resume: bool, force: bool, save_every: int | None, images: Store | FileSet | None
) -> dict[str, Any]:
    """``fit_fold`` while it holds the fold's lock (on rank 0 under DDP)."""
    backbone, fold, folds_hash, paths = task.backbone, task.fold, task.folds_hash, task.paths
    config, label = to_dict(task.cfg), task.label
    done = None if force else finished_oof(paths.oof_csv, paths.oof_meta, paths.model_dir / "best.pt")
    saved = paths.model_dir / "config.yaml"
    if done is not None and not _retrain_reasons(done, config, folds_hash, saved, label):
        log.info("%s: finished (its OOF matches best.pt): skipped; --force trains it again", label)
        best = load_checkpoint(paths.model_dir / "best.pt")
        return _summary(backbone, fold, done["best_epoch"], best["score"], paths, skipped=True)
    ckpt = (
        _resumable(paths, config, folds_hash, backbone, fold)
        if resume and done is None and not force
        else None
    )
    distributed.barrier()  # every rank has read the old files before rank 0 removes or rewrites them
    if distributed.is_main():
        # A retrain makes the old OOF of this fold stale the moment a new best.pt appears: remove it
        # first, so an interrupted run leaves a missing fold (named by ensemble.py), never a wrong one.
        paths.oof_csv.unlink(missing_ok=True)
        paths.oof_meta.unlink(missing_ok=True)
        if ckpt is None:  # a run started over must not be resumed as the one it replaces
            (paths.model_dir / "last.pt").unlink(missing_ok=True)
    handler = _attach_log(paths.model_dir, append=ckpt is not None) if distributed.is_main() else None
    try:
        if ckpt is not None and distributed.is_main():
            _restore_best(ckpt, paths, label)
        best_epoch, best_score = _train_fold(task, ckpt, save_every, images)
    finally:
        if handler is not None:
            logging.getLogger("foldkit").removeHandler(handler)
            handler.close()
    return _summary(backbone, fold, best_epoch, best_score, paths)


def _restore_best(last: dict[str, Any], paths: RunPaths, label: str) -> None:
    """Write ``best.pt`` from ``last.pt`` where a kill came between the two saves of a best epoch."""
    restored = best_to_restore(last, paths.model_dir / "best.pt")
    if restored is not None:
        _save_checkpoint(paths.model_dir / "best.pt", restored)
        log.warning(
            "%s: best.pt restored from last.pt (epoch %d, the best epoch it records): the run had "
            "stopped before best.pt was saved",
            label, restored["epoch"],
        )  # fmt: skip


def _retrain_reasons(
    done: dict[str, Any], config: dict[str, Any], folds_hash: str, saved: Path, label: str
) -> list[str]:
    """Why a finished fold (its OOF sidecar ``done``) no longer matches this run. Other settings stop
    the run (exit 2), as they do for an unfinished fold: a finished fold is hours of GPU time, and a
    changed value on the command line must not replace it unasked (``--force`` does). Other folds
    (rebuilt on purpose: ``--refold``, or new data) make its OOF meaningless, so it is trained again,
    with a warning. Returns the reasons to retrain (empty: skip the fold)."""
    changed = _changed_settings(done, config)
    if changed:
        raise FoldkitError(
            f"{label} is finished with other settings ({'; '.join(changed)}). Pass --force to train it "
            "again (its best.pt and OOF file are replaced), train the new settings under another --exp "
            f"or --work-dir to keep both, or run with its saved settings: --config {saved}"
        )
    if done.get("folds_hash") == folds_hash:
        return []
    old = str(done.get("folds_hash"))[:12]
    log.warning(
        "%s: finished on other folds (folds hash %s -> %s): training it again, replacing its best.pt "
        "and OOF file", label, old, folds_hash[:12],
    )  # fmt: skip
    return [f"folds hash {old} -> {folds_hash[:12]}"]


def _summary(
    backbone: str, fold: int, best_epoch: int, score: float, paths: RunPaths, skipped: bool = False
) -> dict[str, Any]:
    return {
        "backbone": backbone,
        "fold": fold,
        "best_epoch": best_epoch,
        "score": float(score),
        "model_dir": str(paths.model_dir),
        "oof": str(paths.oof_csv),
        "skipped": skipped,
    }


def _resumable(
    paths: RunPaths, config: dict[str, Any], folds_hash: str, backbone: str, fold: int
) -> dict[str, Any] | None:
    """The unfinished run's ``last.pt`` to continue from, or None to start afresh; refuses one made
    with other settings (``foldkit.resume.check_compatible``)."""
    last = paths.model_dir / "last.pt"
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last)
    if not is_resumable(ckpt):
        log.warning("%s holds no resume state (an older foldkit wrote it): training from scratch", last)
        return None
    check_compatible(last, resume_changes(ckpt, config, folds_hash, backbone, fold, distributed.world_size()))
    return ckpt


def _train_fold(
    task: FoldTask, ckpt: dict[str, Any] | None, save_every: int | None, images: Store | FileSet | None
) -> tuple[int, float]:
    """Build data, model and trainer (restored from ``ckpt`` when resuming), run the epochs, write the
    OOF; returns (best epoch, best score)."""
    cfg, backbone, fold, folds_df, paths = task.cfg, task.backbone, task.fold, task.folds_df, task.paths
    folds_hash, data_dir, work_dir = task.folds_hash, task.data_dir, task.work_dir
    seed = run_seed(cfg.seed, backbone, fold)
    seed_everything(seed, cfg.deterministic)
    ctx = distributed.current()
    device = ctx.device if ctx is not None else resolve_device(cfg.device)
    if distributed.is_main():
        save_config(cfg, paths.model_dir / "config.yaml")
    train_df, val_df = folds_df[folds_df.fold != fold], folds_df[folds_df.fold == fold]
    if images is None:  # main.py opens them once, before the folds; direct callers get them here
        images = open_trainval_images(cfg, data_dir, work_dir)
    label = task.label
    train_df, val_df = _drop_bad(images, train_df, val_df, label)
    _check_train_size(train_df, label, folds_df)
    _warn_dropped(len(train_df), cfg.train.batch_size, label)
    model = create_model(cfg, backbone)
    mean, std = data_stats(model)
    model.to(device)
    train_dl, val_dl = _loaders(cfg, images, train_df, val_df, mean, std, device, seed)
    steps = min(len(train_dl), cfg.train.max_train_batches or len(train_dl))
    pos_weight = _pos_weight(cfg, train_df.label.to_numpy())
    trainer = _make_trainer(cfg, model, device, steps, pos_weight, label)
    progress = Progress() if ckpt is None else restore_trainer(trainer, ckpt)
    trainer.ddp = distributed.wrap_model(trainer.model, cfg.train.sync_bn)
    if trainer.ddp is not None:
        trainer.model = trainer.ddp.module  # SyncBatchNorm may have replaced a root module
        _log_ddp(cfg, label, len(train_df), steps)
    log.info(
        "%s: %d train / %d val images, %d params, device %s, precision %s, run seed %d (base seed %d)",
        label, len(train_df), len(val_df), count_params(model), device, precision_name(trainer.dtype), seed,
        cfg.seed,
    )  # fmt: skip
    if ckpt is not None:
        _log_resume(ckpt, trainer, progress, paths.model_dir / "last.pt", seed)
    base = {
        "backbone": backbone,
        "fold": fold,
        "config": to_dict(cfg),
        "folds_hash": folds_hash,
        "mean": list(mean),
        "std": list(std),
        "metric": cfg.train.metric,
        "store_size": list(images.size),
        "foldkit_version": __version__,
        "run_seed": seed,
        "world_size": distributed.world_size(),
        "precision": precision_name(trainer.dtype),  # what amp resolved to on this GPU
    }
    try:
        if device.type == "cuda":
            train_dl.start_workers()  # they fork and prefetch while the GPU warms up
            val_dl.start_workers()
            log.info("warm-up (cuDNN autotuning, CUDA kernel loading): %.1f s", warm_up(trainer))
        if ckpt is not None:  # last: after every set-up step that draws random numbers
            set_rng_state(ckpt["rng"])
        best_epoch, best_score = _epochs(trainer, train_dl, val_dl, val_df, paths, base, progress, save_every)
        distributed.barrier()  # rank 0 has written best.pt, which every rank predicts the OOF with
        write_oof(cfg, paths, val_df, images, folds_hash, device, trainer.dtype)
    except (torch.OutOfMemoryError, ValueError) as exc:
        raise _training_error(exc, cfg, label) from None
    return best_epoch, best_score


def _log_resume(ckpt: dict[str, Any], trainer: _Trainer, progress: Progress, last: Path, seed: int) -> None:
    """Say where a fold resumes, and what differs from the run it continues that the settings do not
    show: the run seed a newer foldkit derives, and the precision ``amp: auto`` resolves to on this
    GPU (bf16 on an A100, fp16 on a T4)."""
    label, saved_seed = trainer.label, ckpt.get("run_seed", trainer.cfg.seed)
    if saved_seed != seed:
        log.warning(
            "%s: %s was trained with seed %s, this foldkit derives run seed %d: the rest of the run "
            "sees another batch order and augmentation stream (--no-resume starts it over)",
            label, last, saved_seed, seed,
        )  # fmt: skip
    saved, now = ckpt.get("precision"), precision_name(trainer.dtype)
    if saved is not None and saved != now:
        log.warning(
            "%s: %s was trained in %s, the rest of the run trains in %s (train.amp %s on this device)",
            label, last, saved, now, trainer.cfg.train.amp,
        )  # fmt: skip
    log.info(
        "%s: resuming from %s at epoch %d, batch %d (optimizer step %d)",
        label, last, progress.epoch, progress.batch, trainer.step,
    )  # fmt: skip


def _log_ddp(cfg: RunConfig, label: str, n_train: int, steps: int) -> None:
    """Say how a DDP run splits the work, and that the learning rate is the config's as it is."""
    tc, world = cfg.train, distributed.world_size()
    log.info(
        "%s: DDP over %d processes: batch %d per process, global batch %d x accum_steps %d = %d images "
        "per optimizer step, %d steps per epoch over %d training images; lr %g as configured (not "
        "scaled with the global batch), sync_bn %s",
        label, world, tc.batch_size, tc.batch_size * world, tc.accum_steps,
        tc.batch_size * world * tc.accum_steps, math.ceil(steps / tc.accum_steps), n_train, tc.lr, tc.sync_bn,
    )  # fmt: skip


def _drop_bad(
    images: Store | FileSet, train_df: pd.DataFrame, val_df: pd.DataFrame, label: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave out the images the store could not decode (``data.on_bad_image: skip`` records them and
    stores black rows; without a store, the up-front check records them in ``FileSet.bad``): no
    model should learn from a blank face or be scored on one. Their OOF rows are then missing in
    every model alike."""
    bad = images.bad
    drop_train, drop_val = train_df.path.isin(bad), val_df.path.isin(bad)
    names = [*train_df.name[drop_train], *val_df.name[drop_val]]
    if names:
        log.warning(
            "%s: leaving out %d unreadable image(s) (%d train, %d validation): %s",
            label, len(names), int(drop_train.sum()), int(drop_val.sum()), ", ".join(listed(names, 5)),
        )  # fmt: skip
    return train_df[~drop_train], val_df[~drop_val]


def _check_train_size(train_df: pd.DataFrame, label: str, folds_df: pd.DataFrame) -> None:
    """Refuse a training split too small to train (tiny data, most of it unreadable, or folds that
    leave one image outside this fold) with a clear error: BatchNorm cannot train on one image, and
    torch would stop with a bare "Expected more than 1 value per channel" traceback. Under torchrun
    each of W ranks needs a batch of 2 (``EpochBatchSampler``), so fewer than 2W images would give
    every rank an epoch of no steps; every rank sees the same split, so all of them stop alike."""
    world = distributed.world_size()
    if len(train_df) >= 2 * world:
        return
    ranks = f" ({world} processes need 2 each)" if world > 1 else ""
    raise FoldkitError(
        f"{label}: only {len(train_df)} training image(s) outside this fold ({len(folds_df)} images in "
        f"the folds, after any unreadable ones were left out), and training needs at least {2 * world}"
        f"{ranks}: use more train/validate images or fewer folds (data.k)"
        + (" or fewer processes." if world > 1 else ".")
    )


def _warn_dropped(n_train: int, batch: int, label: str) -> None:
    """Say when the last partial batch, dropped every epoch (another one each epoch), is a large share
    of a small training split: 200 images at batch 128 train on 128 per epoch. Single process only
    (under torchrun ``_log_ddp`` says how the images are split)."""
    # a split smaller than one batch keeps its one partial batch (EpochBatchSampler)
    dropped = n_train % batch if distributed.world_size() == 1 and n_train >= batch else 0
    if dropped > 0.1 * n_train:
        log.warning(
            "%s: batch %d leaves out %d of the %d training images every epoch (the last partial batch; "
            "others each epoch): a smaller --batch trains on more of them",
            label, batch, dropped, n_train,
        )  # fmt: skip


def _training_error(exc: Exception, cfg: RunConfig, label: str) -> Exception:
    """What a user can do about a failed step: out of GPU memory, or BatchNorm given one value per
    channel (a batch of one image where the last BatchNorm layer sees 1x1 pixels: the batch size
    that trains depends on the model and image size, so it is not refused up front). Any other
    error is returned unchanged."""
    if isinstance(exc, torch.OutOfMemoryError):
        return FoldkitError(_oom_message(cfg, label))
    if "Expected more than 1 value per channel" in str(exc):
        return FoldkitError(
            f"{label}: BatchNorm got one value per channel ({exc}): train.batch_size "
            f"{cfg.train.batch_size} is too small for this model at img_size {cfg.data.img_size}; use at "
            "least 2 (with little memory, a small --batch and train.accum_steps)"
        )
    return exc


def _oom_message(cfg: RunConfig, label: str) -> str:
    """What to change when the GPU runs out of memory: the batch, keeping its effective size."""
    tc = cfg.train
    half = max(1, tc.batch_size // 2)
    return (
        f"{label}: CUDA out of memory at batch size {tc.batch_size} (img_size {cfg.data.img_size}, "
        f"accum_steps {tc.accum_steps}). Pass a smaller --batch, e.g. --batch {half} "
        f"--set train.accum_steps={tc.accum_steps * 2} to keep the effective batch of "
        f"{tc.batch_size * tc.accum_steps}. The checkpoints saved so far are kept; the run resumes from "
        "last.pt only with the same settings (--no-resume starts the fold over)."
    )


def _patience_spent(cfg: RunConfig, progress: Progress) -> bool:
    return cfg.train.patience is not None and progress.stale >= cfg.train.patience


def _epochs(
    trainer: _Trainer,
    train_dl: DeviceLoader,
    val_dl: DeviceLoader,
    val_df: pd.DataFrame,
    paths: RunPaths,
    base: dict,
    progress: Progress,
    save_every: int | None = None,
) -> tuple[int, float]:
    """The epoch loop from ``progress`` on: train, validate, log, checkpoint (best and last), stop
    early; returns the best epoch and its score. A resumed run that had already stopped trains
    nothing and returns the saved best."""
    cfg = trainer.cfg
    y_val = val_df.label.to_numpy().astype(np.float64)
    last = paths.model_dir / "last.pt"

    def save_partial(p: Progress) -> None:
        _save_last(trainer, last, {**base, "epoch": p.epoch}, p)

    while progress.epoch <= cfg.train.epochs and not _patience_spent(cfg, progress):
        epoch = progress.epoch
        train_loss, rate, train_images = trainer.train_epoch(train_dl, progress, save_partial, save_every)
        distributed.broadcast_state(trainer.eval_model())  # every rank predicts with rank 0's weights
        probs = predict_probs(
            trainer.eval_model(), val_dl, trainer.device, (), trainer.dtype, desc="validate"
        )
        m = epoch_metrics(y_val, probs)
        lr, ema_decay = trainer.optimizer.param_groups[0]["lr"], trainer.ema_decay()
        progress.history.append(
            {"epoch": epoch, "train_loss": train_loss, **m, "lr": lr, "ema_decay": ema_decay, "img_s": rate,
             "world_size": distributed.world_size(), "train_images": train_images}
        )  # fmt: skip
        _write_history(paths.model_dir / "history.csv", progress.history)
        _log_epoch(base, epoch, cfg.train.epochs, train_loss, m, rate, ema_decay)
        score = _score(m, cfg.train.metric)
        score = -np.inf if np.isnan(score) else score  # e.g. AUC on a one-class holdout
        payload = {**base, "epoch": epoch, "score": score, "threshold": m["threshold"], "val": m}
        # epoch 1 is always saved; metric "last" keeps every newer epoch (its score: -val_loss, for the log)
        improved = score > progress.best_score or progress.best_epoch < 0 or cfg.train.metric == "last"
        if improved:
            progress.best_score, progress.best_epoch, progress.stale = score, epoch, 0
        else:
            progress.stale += 1
        progress = replace(progress, epoch=epoch + 1, batch=0, loss_sum=0.0, seen=0, dropped=0)
        # last.pt first: a kill before best.pt is written is mended from it (resume.best_to_restore)
        _save_last(trainer, last, payload, progress)
        if improved:
            _save_checkpoint(
                paths.model_dir / "best.pt", {**payload, "model": module_state(trainer.eval_model())}
            )
        if _patience_spent(cfg, progress):
            log.info(
                "%s: early stop after epoch %d (best epoch %d)", trainer.label, epoch, progress.best_epoch
            )
    return progress.best_epoch, float(progress.best_score)


def _log_epoch(
    base: dict,
    epoch: int,
    epochs: int,
    train_loss: float,
    m: dict[str, float],
    rate: float,
    ema_decay: float = math.nan,
) -> None:
    """One line per epoch; with EMA it names the decay actually in effect (see ``ema_decay``)."""
    ema = "" if math.isnan(ema_decay) else f"  ema_decay {ema_decay:.6f}"
    log.info(
        "%s fold %d epoch %d/%d: train_loss %.4f val_loss %.4f auc %.4f f1@0.5 %.4f best_f1 %.4f @ %.3f"
        "  %.0f img/s%s",
        base["backbone"], base["fold"], epoch, epochs, train_loss, m["val_loss"], m["auc"], m["f1_05"],
        m["best_f1"], m["threshold"], rate, ema,
    )  # fmt: skip


def write_oof(
    cfg: RunConfig,
    paths: RunPaths,
    val_df: pd.DataFrame,
    images: Store | FileSet,
    folds_hash: str,
    device: torch.device,
    dtype: torch.dtype | None,
) -> Path:
    """Predict the holdout with the best checkpoint and the config's TTA; write ``fold<k>.csv`` and its
    sidecar ``fold<k>.json`` (folds hash, TTA, checkpoint hash, config).

    The checkpoint's ``threshold`` is re-tuned on these TTA predictions and saved back, so the seed's
    single-checkpoint test mode (which predicts with the same TTA) applies a matching threshold.
    """
    best = paths.model_dir / "best.pt"
    ckpt = load_checkpoint(best)
    probs = predict_checkpoint(
        ckpt,
        None,
        None,
        cfg.tta,
        cfg.train.batch_size * 2,
        cfg.data.workers,
        device,
        dtype,
        desc=f"oof fold {paths.fold}",
        source=images.source(val_df.path.tolist()),
    )
    threshold, f1 = best_threshold(val_df.label.to_numpy().astype(int), probs)
    if not distributed.is_main():  # every rank predicted its shard; rank 0 writes the gathered whole
        return paths.oof_csv
    ckpt.update(threshold=float(threshold), threshold_tta=list(cfg.tta), oof_f1=float(f1))
    _save_checkpoint(best, ckpt)
    oof = pd.DataFrame(
        {"name": val_df.name.to_numpy(), "label": val_df.label.to_numpy(), "fold": paths.fold, "prob": probs}
    )
    meta = {
        "backbone": ckpt["backbone"],
        "fold": paths.fold,
        "n": len(oof),
        "folds_hash": folds_hash,
        "tta": list(cfg.tta),
        "checkpoint": str(best),
        "checkpoint_sha256": file_sha256(best),
        "best_epoch": ckpt["epoch"],
        "threshold": float(threshold),
        "run_seed": ckpt.get("run_seed"),
        "config": ckpt["config"],
    }
    atomic_write_text(paths.oof_meta, json.dumps(meta, indent=2))  # sidecar first: a csv never lacks one
    atomic_write_text(paths.oof_csv, oof.to_csv(index=False, float_format="%.8f"))
    return paths.oof_csv
