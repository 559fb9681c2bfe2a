"""Write and validate ``name label`` prediction files (the competition's submission format)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from foldkit.data import read_test
from foldkit.io import FoldkitError, atomic_write_text


def check_submission(names: Sequence[str], labels: np.ndarray, expected: Sequence[str]) -> None:
    """The submission must list exactly the test label file's names, in its order, each once, 0/1."""
    names, expected = list(names), list(expected)
    if len(names) != len(expected):
        raise FoldkitError(f"submission has {len(names)} rows but the test set has {len(expected)}")
    if len(set(names)) != len(names):
        raise FoldkitError("submission lists a name twice")
    mismatch = next((i for i, (a, b) in enumerate(zip(names, expected, strict=True)) if a != b), None)
    if mismatch is not None:
        raise FoldkitError(
            f"submission row {mismatch + 1}: {names[mismatch]!r}, expected {expected[mismatch]!r}"
        )
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1)).all():
        raise FoldkitError("submission labels must be 0 or 1")


def submission_text(names: Sequence[str], labels: np.ndarray, expected: Sequence[str]) -> str:
    """The ``name label`` lines, validated and read back as a reader would before anything is written.

    ``expected`` must come from the test label file itself (``label_file_names``), never from the
    list the predictions were made for: checked against itself, a dropped or reordered name passes.
    The read-back catches what the formatting would do to a name (a space, a quote, a lost line).
    """
    check_submission(names, labels, expected)
    text = "".join(f"{n} {int(v)}\n" for n, v in zip(names, labels, strict=True))
    try:
        back = read_submission(io.StringIO(text))
        check_submission(back.name.tolist(), back.label.to_numpy(), expected)
    except (FoldkitError, ValueError) as exc:
        raise FoldkitError(f"the submission would not read back as valid: {exc}") from exc
    return text


def write_submission(
    path: str | Path, names: Sequence[str], labels: np.ndarray, expected: Sequence[str]
) -> Path:
    """Validate (``submission_text``), then write ``name label`` lines atomically: an invalid
    submission writes nothing and leaves a previous file as it was."""
    return atomic_write_text(path, submission_text(names, labels, expected))


def label_file_names(data_dir: str | Path) -> list[str]:
    """The test names in the test label file's order, read afresh: what a submission is checked against.
    Quiet: the run has said how it read the test folder already."""
    return read_test(Path(data_dir), quiet=True).name.tolist()


def read_submission(path: str | Path | io.StringIO) -> pd.DataFrame:
    """Read a ``name label`` file back (for checks and tests). No quoting: the format has none, so a
    name that starts with ``"`` is read as written."""
    return pd.read_csv(
        path,
        sep=" ",
        header=None,
        names=["name", "label"],
        dtype={"name": str, "label": int},
        keep_default_na=False,  # an image named NA or null is a name, not a missing value
        quoting=csv.QUOTE_NONE,
    )
