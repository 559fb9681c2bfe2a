"""torch Dataset and DataLoader construction, seeded end to end.

Kept apart from ``foldkit.data`` (the label-file index) so that the coming memmap image store only
has to provide another ``loader`` callable: the Dataset and the seeding stay as they are.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from foldkit.augment import to_chw
from foldkit.data import load_rgb


class ImageDataset(Dataset):
    """Images by path (relative to ``data_dir``) with 0/1 labels; -1 marks unlabeled test rows.

    Returns ``(image CHW float32, label float32, index)``: the index lets every prediction be tied
    back to its image name, whatever order a loader uses.
    """

    def __init__(
        self,
        data_dir: str | Path,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: A.Compose,
        loader: Callable[[Path], np.ndarray] = load_rgb,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.loader(self.data_dir / self.paths[i])
        image = self.transform(image=image)["image"]
        return torch.from_numpy(to_chw(image)), torch.tensor(self.labels[i]), i


def _seed_worker(worker_id: int) -> None:
    """Give each worker its own stream: torch derives ``initial_seed`` from the loader's seeded
    generator, differently per worker and per epoch; albumentations 2.x does not reseed itself."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "transform"):
        info.dataset.transform.set_random_seed(seed)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    pin: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order and augmentations depend only on ``seed``. Eval loaders pass
    ``shuffle=False`` so predictions come back in index order."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=pin,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
    )
