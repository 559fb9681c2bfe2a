"""foldkit: a K-fold ensemble toolkit for image classification competitions.

Built first for deepfake face detection (112x112 face crops, real=0 / fake=1, scored by F1).

Importing the package also sets up two process-wide quiet defaults, before any module of it imports a
third-party library (every entry point imports ``foldkit`` first):

* ``NO_ALBUMENTATIONS_UPDATE=1``: albumentations otherwise checks the internet for a newer version on
  every import (in every DataLoader worker too), which stalls or prints on offline machines. Set in
  ``os.environ`` so worker and child processes inherit it; a value the user set wins.
* timm's "Cosine annealing scheduler will have no effect" warning is dropped: it fires on every
  one-epoch run (smoke tests, the demo's quick checks) and says nothing the user can act on.
"""

import logging
import os
from pathlib import Path

__version__ = "0.1.0"

#: Root of the project checkout. The default ``--work-dir`` for every command, so that artifacts land
#: in ``folds/ models/ oof/ submissions/`` beside ``main.py`` and never in the caller's current folder.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class _DropMessages(logging.Filter):
    """Drop log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_QUIET = _DropMessages("Cosine annealing scheduler will have no effect")
for _name in ("timm.scheduler.cosine_lr", "timm.scheduler.poly_lr"):  # a logger filter, not warnings:
    logging.getLogger(_name).addFilter(_QUIET)  # timm logs this one through `logging`
