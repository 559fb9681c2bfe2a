"""Resume state: what a resumable ``last.pt`` holds beyond the weights, and the checks before reuse.

A run killed at any point continues from its last save and ends with the OOF an uninterrupted run
would have written. That needs everything that shapes the rest of the run: weights (raw and EMA),
optimizer, schedule, AMP scaler, step, the epoch and batch reached, the running loss of a partial
epoch, the best score and early-stopping counter, the history rows so far, and the python, numpy and
torch RNG states (dropout, drop path). The data order needs nothing: ``EpochBatchSampler`` makes every
batch a pure function of (seed, epoch, batch number).

Everything is stored as tensors and plain python values, so ``torch.load(weights_only=True)`` reads
it back and a checkpoint can never run code. ``train.py`` owns the loop and calls in here; this
module imports nothing of it (no cycle).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from foldkit.config import HARMLESS_KEYS, RunConfig, flatten, to_dict
from foldkit.io import FoldkitError, try_flock
from foldkit.predict import file_sha256, load_checkpoint

log = logging.getLogger(__name__)

_COMPILE_PREFIX = "_orig_mod."  # what torch.compile's OptimizedModule puts before every key


@dataclass
class Progress:
    """Where the epoch loop stands: the epoch to run (or in progress) and the batches done in it."""

    epoch: int = 1
    batch: int = 0  # batches of ``epoch`` already trained (0: the epoch has not started)
    loss_sum: float = 0.0  # sum of loss * batch size over those batches (history's train_loss)
    seen: int = 0  # images in those batches
    dropped: int = 0  # of those, images of fp16 batches whose loss overflowed (left out of loss_sum)
    best_score: float = -math.inf
    best_epoch: int = -1
    stale: int = 0  # epochs since the best one (early stopping)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (numpy scalars would make the checkpoint unloadable with weights_only)."""
        out = asdict(self)
        out["history"] = [{k: _plain(v) for k, v in row.items()} for row in self.history]
        out["best_score"], out["loss_sum"] = float(self.best_score), float(self.loss_sum)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


class TrainerLike(Protocol):
    """The parts of ``foldkit.train._Trainer`` that make up its resumable state."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Any
    step: int


# -- module weights, with or without torch.compile ------------------------------------------------


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state dict, keys without torch.compile's ``_orig_mod.`` prefix, so
    a checkpoint loads the same whether the model that wrote or reads it was compiled or not."""
    return {k.removeprefix(_COMPILE_PREFIX): v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (keys with or without the compile prefix) into ``module``, compiled or not: a
    compiled module is loaded through the original it wraps, which shares its parameters."""
    target = getattr(module, "_orig_mod", module)
    target.load_state_dict({k.removeprefix(_COMPILE_PREFIX): v for k, v in state.items()})


# -- RNG states as plain values --------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """python, numpy and torch (CPU and every CUDA device) RNG states, as lists, ints and tensors."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Undo ``rng_state``. CUDA states are restored only onto as many devices as were saved."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- what goes into and out of last.pt -------------------------------------------------------------


def trainer_state(trainer: TrainerLike, progress: Progress) -> dict[str, Any]:
    """The resumable part of ``last.pt`` (the caller adds the eval weights and run identity)."""
    return {
        "raw_model": module_state(trainer.model),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "step": trainer.step,
        **({"ema": module_state(trainer.ema.module)} if trainer.ema is not None else {}),
        "progress": progress.to_dict(),
        "rng": rng_state(),
    }


def restore_trainer(trainer: TrainerLike, ckpt: dict[str, Any]) -> Progress:
    """Load a ``trainer_state`` into a freshly built trainer; returns the saved progress. The RNG
    states are not set here: the caller sets them (``set_rng_state``) right before training resumes,
    after any set-up that draws random numbers."""
    load_module_state(trainer.model, ckpt["raw_model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.step = int(ckpt["step"])
    if trainer.ema is not None:
        if "ema" not in ckpt:
            raise FoldkitError("the checkpoint has no EMA weights but train.ema is on")
        load_module_state(trainer.ema.module, ckpt["ema"])
    return Progress.from_dict(ckpt["progress"])


def is_resumable(ckpt: dict[str, Any]) -> bool:
    """Written by a foldkit that saves resume state (older ``last.pt`` files lack it)."""
    return {"progress", "rng", "raw_model", "optimizer", "scheduler", "step"} <= set(ckpt)


# what trainer_state adds to last.pt; without them last.pt holds what best.pt holds
_RESUME_KEYS = frozenset({"raw_model", "optimizer", "scheduler", "scaler", "step", "ema", "progress", "rng"})


def best_to_restore(last: dict[str, Any], best: Path) -> dict[str, Any] | None:
    """The ``best.pt`` to write before resuming from ``last``, or None when ``best`` is right.

    An epoch that scores best saves ``last.pt`` first (naming it the best epoch), then ``best.pt``. A
    run killed between the two leaves a ``best.pt`` of an older epoch, or none: the resumed run would
    not train that epoch again, and its OOF would come from the older one. ``last.pt`` holds the same
    eval weights and metadata, so ``best.pt`` is restored from it. (The other order lost more: a
    ``best.pt`` from an epoch that ``last.pt`` did not know of, trained again on resume, and on a
    non-deterministic GPU into other weights than the ones kept.)"""
    best_epoch = last["progress"]["best_epoch"]
    if "score" not in last or best_epoch != last.get("epoch"):
        return None  # saved mid-epoch, or the best epoch is older: its best.pt was complete before
    try:
        if load_checkpoint(best, mmap=True).get("epoch") == best_epoch:
            return None
    except FoldkitError:  # missing or unreadable: last.pt holds what it should
        pass
    return {k: v for k, v in last.items() if k not in _RESUME_KEYS}


# -- compatibility ----------------------------------------------------------------------------------


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """``key old -> new`` for every config key that differs, harmless keys (and ``ignore``) left out.
    A key the saved config lacks (added by a later foldkit, e.g. ``train.sync_bn``) counts as its
    code default, so a new setting left at its default does not make finished folds look stale."""
    defaults = flatten(to_dict(RunConfig(pretrained=False)))
    old, new = flatten(saved), flatten(current)
    old |= {k: defaults[k] for k in new.keys() - old.keys() if k in defaults}
    keys = sorted((set(old) | set(new)) - HARMLESS_KEYS - ignore)
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def resume_changes(
    ckpt: dict[str, Any],
    config: dict[str, Any],
    folds_hash: str,
    backbone: str,
    fold: int,
    world_size: int = 1,
) -> list[str]:
    """Why an unfinished run's ``last.pt`` (``ckpt``) cannot be continued with ``config``: every setting,
    the folds, the run and the number of DDP processes that differ (empty: it can). The process count
    counts as a setting: it decides the batches of every step and the length of the schedule."""
    changes = config_changes(ckpt.get("config", {}), config)
    if ckpt.get("world_size", 1) != world_size:
        old = ckpt.get("world_size", 1)
        changes.append(f"processes (torchrun --nproc_per_node x nodes) {old} -> {world_size}")
    if ckpt.get("folds_hash") != folds_hash:
        changes.append(f"folds hash {str(ckpt.get('folds_hash'))[:12]} -> {folds_hash[:12]}")
    if (ckpt.get("backbone"), ckpt.get("fold")) != (backbone, fold):
        changes.append(f"run {ckpt.get('backbone')} fold {ckpt.get('fold')} -> {backbone} fold {fold}")
    return changes


def check_compatible(path: Path, changes: list[str]) -> None:
    """Refuse to continue the run of ``path`` (its ``resume_changes``): the result would belong to
    neither run."""
    if changes:
        raise FoldkitError(
            f"{path} is an unfinished run with other settings ({'; '.join(changes)}); resuming would mix "
            "two runs. Pass --no-resume to train this fold from scratch (its checkpoints are replaced), "
            "or run with the saved settings to continue it."
        )


@contextlib.contextmanager
def fold_lock(model_dir: Path, label: str) -> Iterator[None]:
    """Only one run trains a fold at a time: two (a rerun beside a job still running, two terminals)
    would write one best.pt, last.pt and OOF file in turn, each resuming the other's checkpoints.

    An advisory ``flock`` on ``<model_dir>/.lock`` (the pid written in it, for the message): the
    kernel releases it when the process ends, SIGKILL included, so a crash never leaves a stale lock
    to delete by hand. Where ``fcntl`` is missing (Windows) nothing is locked.
    """
    try:
        import fcntl  # noqa: F401  (only whether it exists: try_flock uses it)
    except ImportError:
        yield
        return
    with open(model_dir / ".lock", "a+", encoding="utf-8") as fh:
        held = try_flock(fh, f"{label}: {model_dir / '.lock'}")
        if held is False:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise FoldkitError(
                f"{label}: another run (pid {holder}) is training this fold in {model_dir}; wait for it "
                "to end, or stop it, then run the command again (it resumes or skips the fold)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield  # the lock goes with the file's close


def finished_oof(oof_csv: Path, oof_meta: Path, best: Path) -> dict[str, Any] | None:
    """The OOF sidecar when the fold's OOF csv and json exist and were made from this very ``best.pt``
    (content hash), i.e. the run that wrote them finished; else None. Whether that run had today's
    settings is the caller's question (``config_changes`` on the sidecar's config)."""
    if not (oof_csv.is_file() and oof_meta.is_file() and best.is_file()):
        return None
    try:
        meta = json.loads(oof_meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("checkpoint_sha256") == file_sha256(best) else None
