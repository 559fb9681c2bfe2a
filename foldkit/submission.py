"""Write and validate ``name label`` prediction files (the competition's submission format)."""

from __future__ import annotations

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


def write_submission(
    path: str | Path, names: Sequence[str], labels: np.ndarray, expected: Sequence[str]
) -> Path:
    """Validate, write ``name label`` lines atomically, then read the file back and check it again.

    ``expected`` must come from the test label file itself (``label_file_names``), never from the
    list the predictions were made for: checked against itself, a dropped or reordered name passes.
    The read-back catches what the writing did (a name with a space, a lost line); a file that fails
    it is removed, so no invalid submission is left behind. Nothing is written when ``names`` is
    already invalid.
    """
    check_submission(names, labels, expected)
    text = "".join(f"{n} {int(v)}\n" for n, v in zip(names, labels, strict=True))
    out = atomic_write_text(path, text)
    try:
        back = read_submission(out)
        check_submission(back.name.tolist(), back.label.to_numpy(), expected)
    except (FoldkitError, ValueError) as exc:
        Path(out).unlink(missing_ok=True)
        raise FoldkitError(f"{out}: the written submission does not read back as valid: {exc}") from exc
    return out


def label_file_names(data_dir: str | Path) -> list[str]:
    """The test names in the test label file's order, read afresh: what a submission is checked against."""
    return read_test(Path(data_dir)).name.tolist()


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read a ``name label`` file back (for checks and tests)."""
    return pd.read_csv(
        path,
        sep=" ",
        header=None,
        names=["name", "label"],
        dtype={"name": str, "label": int},
        keep_default_na=False,  # an image named NA or null is a name, not a missing value
    )
