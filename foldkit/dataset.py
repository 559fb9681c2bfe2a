"""torch Dataset, batch sampler and DataLoader: uint8 batches whose order and augmentations are a
pure function of (seed, epoch, batch number).

The sampler hands each batch its own seed, and the dataset seeds the augmentation pipeline once per
batch from it. So a batch's pixels do not depend on which worker made it, on how many workers there
are, or on whether they persist across epochs; a resumed run can start at any epoch or batch and
see exactly the batches an uninterrupted run would have seen. (Seeding per batch, not per image:
reseeding albumentations costs about 0.2 ms, as much as augmenting a 112 px face.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from foldkit.store import opencv_for_workers, opencv_in_worker, resolve_workers

Item = tuple[torch.Tensor, torch.Tensor, int]  # one image: (uint8 HxWx3, float32 label, index)


class ImageSource(Protocol):
    """Where a dataset reads HxWx3 uint8 images from (``foldkit.store.StoreSource`` or ``FileSource``)."""

    @property
    def image_shape(self) -> tuple[int, int, int]: ...
    def __len__(self) -> int: ...
    def read(self, i: int) -> np.ndarray: ...
    def read_many(self, idx: Sequence[int], out: np.ndarray | None = None) -> np.ndarray: ...


class Batch(tuple):
    """``(uint8 images (B, H, W, 3), float32 labels (B,), int64 indices (B,))``, made whole by the
    dataset itself: one array write per image instead of a list of tensors stacked by collate."""


def _empty_images(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The batch's uint8 tensor; in a worker, in shared memory so it reaches the main process without
    another copy (what torch's default_collate does for its stacked output)."""
    out = torch.empty((n, *shape), dtype=torch.uint8)
    return out.share_memory_() if torch.utils.data.get_worker_info() is not None else out


def collate(batch: Batch) -> Batch:
    """The DataLoader's collate_fn: batches leave ``ImageDataset.__getitems__`` already whole."""
    return batch


class ImageDataset(Dataset):
    """Images of a source with 0/1 labels (-1 marks unlabeled test rows), optionally augmented.

    A batch is a ``Batch`` of uint8 HxWx3 images, labels and indices; the index ties every prediction
    back to its image name, whatever order a loader uses. Resizing and normalisation happen on the
    device (``foldkit.device_transforms``), never here.
    """

    def __init__(
        self, source: ImageSource, labels: Sequence[int], transform: A.Compose | None = None
    ) -> None:
        self.source = source
        self.labels = np.asarray(labels, dtype=np.float32)
        self.transform = transform
        if len(self.labels) != len(source):
            raise ValueError(f"{len(source)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        images, labels, idx = self.__getitems__([key])
        return images[0], labels[0], int(idx[0])

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> Batch:
        """A whole batch; keys are ``(index, batch seed)`` from ``EpochBatchSampler``, or plain indices."""
        pairs = [k if isinstance(k, tuple) else (int(k), 0) for k in keys]
        idx = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
        if self.transform is None:
            images = _empty_images(len(idx), self.source.image_shape)
            self.source.read_many(idx, out=images.numpy())
        else:
            self.transform.set_random_seed(pairs[0][1])
            first = self.transform(image=self.source.read(int(idx[0])))["image"]
            images = _empty_images(len(idx), first.shape)
            view = images.numpy()
            view[0] = first
            for j in range(1, len(idx)):
                view[j] = self.transform(image=self.source.read(int(idx[j])))["image"]
        return Batch((images, torch.from_numpy(self.labels[idx]), torch.from_numpy(idx)))


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, batch seed)``; shuffled per epoch from ``(seed, epoch)`` when asked.

    ``set_epoch(epoch, start_batch)`` selects the epoch (as DistributedSampler does) and where in it to
    begin, so a run resumed mid-epoch continues with the very next batch.

    Under DDP (``world_size`` > 1) every rank computes the same global sequence of batches and rank
    ``r`` takes batches ``r, r + W, r + 2W, ...`` of it, each with its own seed: one optimizer step of
    W ranks trains the W consecutive batches a single process would train one by one, with the same
    pixels, so augmentation stays a pure function of (seed, epoch, batch). Why not torch's
    ``DistributedSampler``: it shards single indices (per-batch seeds and whole batches are this
    sampler's job) and pads the last round by repeating indices, which would count images twice in
    the gathered predictions and in ``train_images``.

    The end of an epoch: with ``drop_last`` (training) the images after the last full round of W
    batches are split across the ranks into one last batch each, sizes differing by at most one (DDP
    needs the same number of steps on every rank), so every image is trained on once per epoch; when
    that would leave a rank a batch of fewer than 2 images (BatchNorm cannot train on one), they are
    left out of that epoch instead (fewer than 2W, a different random few each epoch). A single
    process keeps its old rule: the last partial batch is dropped. Without ``drop_last`` (evaluation)
    the ranks take their batches of the ordered sequence with no padding, so the counts may differ by
    one batch and the gathered predictions hold every image exactly once.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _global_batches(self) -> int:
        """Batches of the whole (single-process) sequence: what the per-batch seeds are drawn for."""
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest > 0)

    def _tail(self) -> int:
        """Images each rank gets in the split last round under DDP training (0: no such batch)."""
        rest = self.n % (self.batch_size * self.world_size)
        return rest // self.world_size if rest // self.world_size >= 2 else 0

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        if self.world_size == 1:
            return full if self.drop_last else full + (rest > 0)
        if not self.drop_last:  # evaluation: every rank-th batch of the ordered sequence
            return len(range(self.rank, self._global_batches(), self.world_size))
        return self.n // (self.batch_size * self.world_size) + (self._tail() > 0)

    def _slices(self) -> list[tuple[int, int, int]]:
        """(start, stop, global batch number) of this rank's batches in the epoch's order."""
        b, w = self.batch_size, self.world_size
        if w == 1 or not self.drop_last:
            total = len(self) if w == 1 else self._global_batches()
            return [(g * b, min(self.n, (g + 1) * b), g) for g in range(self.rank, total, w)]
        rounds = self.n // (b * w)
        mine = [j * w + self.rank for j in range(rounds)]  # global batch numbers of this rank
        out = [(g * b, (g + 1) * b, g) for g in mine]
        if self._tail():  # the last round: the rest split evenly (np.array_split's sizes)
            start, rest = rounds * w * b, self.n - rounds * w * b
            sizes = [rest // w + (r < rest % w) for r in range(w)]
            lo = start + sum(sizes[: self.rank])
            out.append((lo, lo + sizes[self.rank], rounds * w + self.rank))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        n_seeds = max(1, self._global_batches(), (self.n // self.batch_size + 1) * self.world_size)
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(n_seeds)
        for lo, hi, g in self._slices()[self.start_batch :]:
            yield [(int(i), int(seeds[g])) for i in order[lo:hi]]


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool,
    workers: int | None,
    seed: int,
    pin: bool = False,
    drop_last: bool = False,
    prefetch_factor: int = 4,
    shard: tuple[int, int] = (0, 1),
) -> DataLoader:
    """A DataLoader of uint8 batches whose order and augmentations depend only on ``seed`` and the
    sampler's epoch. Eval loaders pass ``shuffle=False`` so predictions come back in index order.

    ``shard``: (rank, world size) under DDP, this process's share of the batches
    (``EpochBatchSampler``). Workers persist across epochs (no re-spawn per epoch or per validation
    pass) and run OpenCV single-threaded (``opencv_for_workers``, set before they fork).

    Each loader has its own generator, seeded with ``seed``: a new iterator draws its workers' base
    seed from it, not from the global torch RNG, which is dropout's stream. Otherwise how often an
    iterator is made (every validation pass without workers, once with persistent ones, once more
    after a resume) would shift dropout, and a resumed run or another ``data.workers`` would train
    other weights. The batches themselves never depend on it (``EpochBatchSampler`` seeds them).
    """
    workers = resolve_workers(workers)
    if workers > 0:
        opencv_for_workers()
    rank, world = shard
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last, rank, world)
    if len(sampler) == 0 and world == 1:  # fewer images than one batch: keep the partial batch
        sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        collate_fn=collate,
        worker_init_fn=opencv_in_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
