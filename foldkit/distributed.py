"""torchrun DistributedDataParallel plumbing: one fold trained by several processes, on one machine or many.

    torchrun --nproc_per_node=2 main.py --fold 0                        # two GPUs (or CPU processes)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
        --rdzv_backend=c10d --rdzv_endpoint=host0:29500 main.py --fold 0  # and node_rank=1 on host1

Everything here is torch's own machinery (``torch.distributed``, ``DistributedDataParallel``,
``SyncBatchNorm``); foldkit adds what its contracts need on top:

- the device of a rank (``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo) and a collective timeout, so
  a rank that waits on a dead peer fails with an error instead of hanging forever;
- ``gather_by_index``: every rank predicts its shard of the holdout (``EpochBatchSampler`` shards
  without padding), the predictions are gathered by image index and each index must arrive exactly
  once, so an OOF file can never hold a duplicate or miss a row;
- ``broadcast_state``: rank 0's weights and BatchNorm statistics to every rank before each
  evaluation (DDP keeps parameters equal, but each rank's running statistics follow its own batches),
  so every gathered prediction comes from the weights rank 0 saves as ``best.pt``;
- ``is_main``: only rank 0 writes artifacts and logs.

Without torchrun (``WORLD_SIZE`` unset or 1) every function is a no-op for a single process, so
``train.py`` calls them unconditionally.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from foldkit.io import FoldkitError

log = logging.getLogger(__name__)

# Test hook: the rank named here raises a FoldkitError right after wrapping its model, so a test can
# check that a failure on one rank ends the whole run. Never set outside tests.
_FAIL_ENV = "FOLDKIT_TEST_FAIL_RANK"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


_CTX: DistContext | None = None


def launched() -> bool:
    """Started by torchrun (or any launcher setting the env:// variables) with more than one process."""
    return env_world_size() > 1


def env_world_size() -> int:
    """The number of processes from the environment (1 outside torchrun), usable before ``init``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """The global rank from the environment, usable before ``init`` (e.g. to quiet logging early)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of one rank for the config's ``device``: ``cuda:LOCAL_RANK`` for auto/cuda on a
    CUDA machine, the CPU for ``cpu`` or auto without CUDA. A fixed ``cuda:N`` would put every rank
    on one GPU, so it is refused."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise FoldkitError(
            f"device {name!r} under torchrun: each process uses cuda:LOCAL_RANK (or the CPU); pass "
            "--device cuda, auto or cpu, and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if not torch.cuda.is_available():
        raise FoldkitError(f"device {name!r} was asked for but CUDA is not available here (use --device cpu)")
    if local_rank >= torch.cuda.device_count():
        raise FoldkitError(
            f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible, so "
            f"--nproc_per_node must be at most {torch.cuda.device_count()}"
        )
    return torch.device("cuda", local_rank)


def init(device_name: str, timeout_s: float) -> DistContext:
    """Join the process group (NCCL on CUDA, gloo on the CPU) with a collective timeout of
    ``timeout_s``; returns and remembers this rank's context. Ranks wait here for each other, so rank
    0 builds the shared folds and image store before calling it."""
    global _CTX
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    _CTX = DistContext(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)
    log.info(
        "distributed: %d processes (%s), rank %d on %s, collective timeout %.0f s",
        _CTX.world_size, backend, _CTX.rank, device, timeout_s,
    )  # fmt: skip
    return _CTX


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    global _CTX
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = None


def current() -> DistContext | None:
    """The context of a distributed run, None for a single process."""
    return _CTX


def world_size() -> int:
    return _CTX.world_size if _CTX is not None else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes artifacts, logs and progress bars."""
    return _CTX is None or _CTX.rank == 0


def shard() -> tuple[int, int]:
    """(rank, world size) for ``make_loader``; (0, 1) for a single process."""
    return (_CTX.rank, _CTX.world_size) if _CTX is not None else (0, 1)


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others read)."""
    if _CTX is not None:
        dist.barrier()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all ranks, as a new tensor; ``value`` itself for a single process."""
    if _CTX is None:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_by_index(idx: np.ndarray, values: np.ndarray, n: int, desc: str) -> np.ndarray:
    """Place ``values`` (predictions of the images ``idx``) into an array of ``n``, gathered from every
    rank, on every rank (all of them need the metrics: early stopping must agree).

    Each index must arrive exactly once across the ranks: a duplicate (padding) or a gap stops the
    run here rather than writing a wrong OOF file. Unfilled slots of a single process stay NaN, for
    the caller's own check.
    """
    out = np.full(n, np.nan, dtype=np.float64)
    if _CTX is None:
        out[idx] = values
        return out
    parts: list[tuple[np.ndarray, np.ndarray] | None] = [None] * _CTX.world_size
    dist.all_gather_object(parts, (np.asarray(idx, dtype=np.int64), np.asarray(values, dtype=np.float64)))
    all_idx = np.concatenate([p[0] for p in parts])
    counts = np.bincount(all_idx, minlength=n) if len(all_idx) else np.zeros(n, dtype=np.int64)
    if len(counts) != n or (counts != 1).any():
        missing, repeated = int((counts[:n] == 0).sum()), int((counts > 1).sum())
        raise FoldkitError(
            f"{desc}: the {_CTX.world_size} ranks predicted {len(all_idx)} rows for {n} images "
            f"({missing} missing, {repeated} more than once); the shards must cover each image once"
        )
    out[all_idx] = np.concatenate([p[1] for p in parts])
    return out


def wrap_model(model: nn.Module, sync_bn: bool) -> nn.Module | None:
    """``model`` inside DistributedDataParallel (None for a single process): the module that trains.

    With ``sync_bn`` its BatchNorm layers become SyncBatchNorm first (statistics over the global
    batch; it keeps the same parameters, so the optimizer built on them stays valid). torch's
    SyncBatchNorm trains on GPUs only, so on the CPU it is an error rather than a crash mid-epoch.
    """
    if _CTX is None:
        if sync_bn:
            log.info("train.sync_bn: a single process has nothing to synchronise; plain BatchNorm")
        return None
    if sync_bn:
        if _CTX.device.type != "cuda":
            raise FoldkitError(
                "train.sync_bn needs CUDA: torch's SyncBatchNorm trains on GPUs only "
                "(--set train.sync_bn=false on the CPU)"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [_CTX.device.index] if _CTX.device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids)
    if os.environ.get(_FAIL_ENV) == str(_CTX.rank):
        raise FoldkitError(f"failing on purpose ({_FAIL_ENV}={_CTX.rank})")
    return wrapped


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers into ``module`` on every rank (in place)."""
    if _CTX is None:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)
