"""foldkit: a K-fold ensemble toolkit for image classification competitions.

Built first for deepfake face detection (112x112 face crops, real=0 / fake=1, scored by F1).
"""

from pathlib import Path

__version__ = "0.1.0"

#: Root of the project checkout. The default ``--work-dir`` for every command, so that artifacts land
#: in ``folds/ models/ oof/ submissions/`` beside ``main.py`` and never in the caller's current folder.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
