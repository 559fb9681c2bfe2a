"""Shared fixtures: a tiny synthetic data set and one tiny trained experiment, built once per session.

Kept tiny (32 px, ~40 images, timm's ``test_*`` models, one epoch) so the whole suite stays far
under CI's budget on 2 cores; tests that modify artifacts work on a copy (``trained_copy``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub in tests: this machine is offline

import logging
import shutil
from pathlib import Path

import pytest

from foldkit.cli import run
from foldkit.synthetic import generate

TRAIN_ARGS = [  # the backbones are pinned here, so the demo config may pick its own pair
    "--config", "configs/demo.yaml", "--backbones", "test_efficientnet,test_convnext", "--fold", "all",
    "--epochs", "1", "--img-size", "32", "--batch", "16",
    "--set", "data.k=2", "--set", "train.warmup_epochs=0",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _foldkit_logger():
    """For every test: let caplog see ``foldkit`` records and undo any console handler a CLI call installs."""
    logger = logging.getLogger("foldkit")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logger.propagate = True
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 train + 10 validate + 12 test synthetic 32 px images in the seed's layout."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, n_train=30, n_validate=10, n_test=12, seed=3, size=32, workers=1)
    return out


def train_tiny(data_dir: Path, work_dir: Path, *extra: str) -> int:
    """Run ``main.py`` in-process on the tiny data; returns its exit status."""
    import main

    return run(main.main, [*TRAIN_ARGS, "--data-dir", str(data_dir), "--work-dir", str(work_dir), *extra])


@pytest.fixture(scope="session")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work dir after ``main.py`` trained both demo backbones on both folds (read-only use)."""
    work = tmp_path_factory.mktemp("work")
    assert train_tiny(tiny_data, work) == 0
    return work


@pytest.fixture
def trained_copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of ``trained`` that a test may change."""
    dst = tmp_path / "work"
    shutil.copytree(trained, dst)
    return dst
