"""The data index: which images exist, where they live, and their labels.

Layout read here (one label file per split, lines ``<name> <label>``, label 0 = real, 1 = fake)::

    <data-dir>/train/train_label.txt        required, labels required (0/1)
    <data-dir>/validate/validate_label.txt  required, labels required (0/1)
    <data-dir>/test/test_label.txt          optional; names only or names + a dummy label (ignored)

Every problem in the label files is collected before anything is raised, so one run shows the user
all of them (up to 20) as ``path/to/file.txt:LINE: problem (offending text)``. Nothing here resizes
or caches pixels; ``load_rgb`` decodes one image on demand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np
import pandas as pd
from PIL import Image

from foldkit.io import FoldkitError, listed

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
PHASES = ("train", "validate", "test")
INDEX_COLUMNS = ["name", "path", "label", "source"]
#: Label of test rows: the test split's labels are unknown (a second column there is a dummy).
NO_LABEL = -1

_MAX_TEXT = 80


class DataError(FoldkitError):
    """Bad or missing input data; lists every problem found (up to 20) so one run shows them all."""

    def __init__(self, problems: Sequence[str], hint: str | None = None) -> None:
        self.problems = list(problems)
        lines = [f"the data has {len(self.problems)} problem(s):", *listed(self.problems)]
        super().__init__("\n".join(lines + ([hint] if hint else [])))


def files_hash(data_dir: Path, paths: Sequence[str], salt: str = "") -> str:
    """sha256 of ``salt`` and every file's path, size and modification time, in order (a missing file
    as missing): it changes when a file is added, removed, renamed or rewritten. One ``stat`` per
    file, no reading. Not the status-change time: ``chmod -R``, ``cp -a``, ``rsync -a`` or ``tar x``
    change it on every file and would re-decode the store and redo the near-dup pass for nothing; the
    price is that a file replaced by one of the very same size under its old mtime goes unnoticed
    (``touch`` it)."""
    h = hashlib.sha256(salt.encode())
    root = Path(data_dir)
    for rel in paths:
        try:
            st = os.stat(root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()


def label_file(data_dir: Path, phase: str) -> Path:
    """Where the label file of ``phase`` lives (``<data-dir>/train/train_label.txt``)."""
    return Path(data_dir) / phase / f"{phase}_label.txt"


# --------------------------------------------------------------------------------------------------
# Reading the label files
# --------------------------------------------------------------------------------------------------


@dataclass
class _Folder:
    """One listing per directory, so resolving 240,000 names costs no per-name ``stat`` call."""

    root: Path
    _listings: dict[str, tuple[set[str], dict[str, dict[str, str]]]] = field(default_factory=dict)

    def _listing(self, subdir: str) -> tuple[set[str], dict[str, dict[str, str]]]:
        if subdir not in self._listings:
            files: set[str] = set()
            by_stem: dict[str, dict[str, str]] = {}
            try:
                with os.scandir(self.root / subdir) as it:
                    for entry in it:
                        if entry.is_file():
                            files.add(entry.name)
                            stem, dot, ext = entry.name.rpartition(".")
                            if dot and stem and f".{ext.lower()}" in IMAGE_EXTS:
                                by_stem.setdefault(stem, {})[f".{ext.lower()}"] = entry.name
            except (FileNotFoundError, NotADirectoryError):
                pass
            self._listings[subdir] = (files, by_stem)
        return self._listings[subdir]

    def resolve(self, rel: str) -> str | None:
        """The listed name itself if it exists, else the same stem with another image extension.

        The real data's label sample lists ``.jpg`` names while its folder holds ``.png`` files.
        """
        subdir, _, base = rel.rpartition("/")
        files, by_stem = self._listing(subdir)
        if base in files:
            return rel
        stem, dot, ext = base.rpartition(".")  # not os.path.splitext: this runs once per listed name
        if not dot or not stem or f".{ext.lower()}" not in IMAGE_EXTS:
            stem = base
        candidates = by_stem.get(stem)
        for image_ext in IMAGE_EXTS if candidates else ():
            if image_ext in candidates:
                return f"{subdir}/{candidates[image_ext]}" if subdir else candidates[image_ext]
        return None


def _safe_relative(name: str) -> tuple[str | None, str | None]:
    """``(relative posix path, None)`` for a name inside its folder, else ``(None, problem)``."""
    if "/" not in name and "\\" not in name:  # the common case: a bare file name
        if name in (".", ".."):
            return None, "name escapes the data folder"
        return name, None
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return None, "absolute path; names must be relative to the split folder"
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts or not parts:
        return None, "name escapes the data folder ('..' component)"
    return "/".join(parts), None


def _natural_key(name: str) -> tuple[list[int | str], str]:
    """Sort key putting ``2.png`` before ``10.png``; hand-written because natsort is not a dependency."""
    parts = re.split(r"(\d+)", name)
    return [int(p) if i % 2 else p.lower() for i, p in enumerate(parts)], name


@dataclass
class _Split:
    """A parsed split plus the label-file line of each row, kept for cross-file error messages."""

    df: pd.DataFrame
    lines: list[int]
    label_path: Path


def _index_frame(names: list[str], paths: list[str], labels: list[int], phase: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": pd.Series(names, dtype=str),
            "path": pd.Series(paths, dtype=str),
            "label": np.asarray(labels, dtype=np.int64),
            "source": phase,
        },
        columns=INDEX_COLUMNS,
    )


def _spaced_name(fields: list[str]) -> str | None:
    """The image name a line meant when that name contains spaces (``my face.png 1``), else None.

    Fields are split on whitespace, so such a line reads as a wrong label or too many fields; the
    name ending in an image extension once its words are joined tells the real cause apart.
    """
    if os.path.splitext(fields[0])[1].lower() in IMAGE_EXTS:
        return None  # the first field is a whole image name: extra fields are another problem
    for words in (fields, fields[:-1]):
        joined = " ".join(words)
        if len(words) > 1 and os.path.splitext(joined)[1].lower() in IMAGE_EXTS:
            return joined
    return None


def _looks_like_header(fields: list[str]) -> bool:
    """``image label``, ``filename``: no image extension, and no number where the label goes (a name
    without an extension is valid, ``img001 2`` is a data line with a bad label)."""
    no_ext = os.path.splitext(fields[0])[1].lower() not in IMAGE_EXTS
    return no_ext and (len(fields) < 2 or not fields[1].lstrip("+-").isdigit())


def _parse_line(fields: list[str], labelled: bool) -> tuple[str, int, str | None]:
    """``(name, label, problem)`` of one non-blank line; test labels are always ``NO_LABEL``."""
    spaced = _spaced_name(fields) if len(fields) > 1 else None
    if spaced is not None:
        return spaced, NO_LABEL, f"names cannot contain spaces: rename '{spaced}' (file and line)"
    if len(fields) > 2:
        return fields[0], NO_LABEL, f"expected 'name [label]', got {len(fields)} fields"
    if not labelled:
        return fields[0], NO_LABEL, None
    if len(fields) == 1:
        return fields[0], NO_LABEL, "missing label (expected 'name 0' or 'name 1')"
    if fields[1] not in ("0", "1"):
        return fields[0], NO_LABEL, "label must be 0 (real) or 1 (fake)"
    return fields[0], int(fields[1]), None


def _locate(
    name: str, folder: _Folder, seen_name: dict[str, int], seen_path: dict[str, int]
) -> tuple[str | None, str | None]:
    """``(problem, None)`` or ``(None, resolved path relative to the split folder)`` for one name."""
    rel, problem = _safe_relative(name)
    if rel is None:
        return problem, None
    if name in seen_name:
        return f"duplicate name, first listed on line {seen_name[name]}", None
    resolved = folder.resolve(rel)
    if resolved is None:
        return f"image not found in {folder.root} (also tried {'/'.join(IMAGE_EXTS)})", None
    if resolved in seen_path:
        return (
            f"resolves to the same file as line {seen_path[resolved]} ({folder.root.name}/{resolved})",
            None,
        )
    return None, resolved


def _parse_split(data_dir: Path, phase: str, problems: list[str]) -> _Split | None:
    """Parse one label file, appending every problem to ``problems``; ``None`` if it is unusable."""
    path = label_file(data_dir, phase)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        problems.append(f"{path}: label file not found (expected the {phase} labels here)")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read label file ({exc})")
        return None
    folder = _Folder(Path(data_dir) / phase)
    labelled = phase != "test"
    names: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    seen_name: dict[str, int] = {}
    seen_path: dict[str, int] = {}
    # split("\n"), not splitlines(): that also breaks at U+2028, \x0c, \x1c-\x1e and \x85, which can
    # sit inside a name, and every later line number would then differ from an editor's or grep -n's
    # (read_text has already turned \r\n and \r into \n)
    first = True  # the first non-blank line: where a header would be
    for lineno, raw in enumerate(text.split("\n"), start=1):
        fields = raw.split()
        if not fields:
            continue
        name, label, problem = _parse_line(fields, labelled)
        resolved = None
        if problem is None:
            problem, resolved = _locate(name, folder, seen_name, seen_path)
        if problem is not None and first and _looks_like_header(fields):
            problem += "; if this is a header line, delete it: label files have none"
        first = False
        if problem is not None or resolved is None:
            problems.append(f"{path}:{lineno}: {problem} ({raw.strip()[:_MAX_TEXT]})")
            continue
        seen_name[name] = seen_path[resolved] = lineno
        names.append(name)
        paths.append(f"{phase}/{resolved}")
        labels.append(label)
        lines.append(lineno)
    if not seen_name and not any(p.startswith(f"{path}:") for p in problems):
        problems.append(f"{path}:1: empty label file (no names listed)")
        return None
    return _Split(_index_frame(names, paths, labels, phase), lines, path)


def _list_test_folder(data_dir: Path, problems: list[str], quiet: bool = False) -> _Split | None:
    """Index the test folder's images in natural order when it has no label file (``quiet``: without
    saying so, for a second read of it)."""
    folder = Path(data_dir) / "test"
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS]
    except (FileNotFoundError, NotADirectoryError):
        here = (Path(data_dir) / "train").is_dir()  # the data folder is right; only test/ is missing
        problems.append(
            f"{folder}: test folder not found (and no {label_file(data_dir, 'test')}); "
            + (
                f"put the test images in {folder}/"
                if here
                else "pass --data-dir DIR, the folder holding train/ validate/ test/ and their label files"
            )
        )
        return None
    if not names:
        problems.append(f"{folder}: no images ({'/'.join(IMAGE_EXTS)}) and no test_label.txt")
        return None
    spaced = sorted(n for n in names if any(c.isspace() for c in n))
    problems += [
        f"{folder / n}: names cannot contain spaces (a submission line is `name label`): rename it"
        for n in spaced[:20]
    ]
    if spaced:
        return None
    names.sort(key=_natural_key)
    if not quiet:
        logger.info("no %s; indexing the %d images in %s", label_file(data_dir, "test"), len(names), folder)
    df = _index_frame(names, [f"test/{n}" for n in names], [NO_LABEL] * len(names), "test")
    return _Split(df, list(range(1, len(names) + 1)), folder)


def read_split(data_dir: Path, phase: str, quiet: bool = False) -> pd.DataFrame:
    """Index one split: columns ``name, path, label, source`` in label-file order.

    ``path`` is the resolved file relative to ``data_dir`` (posix), so artifacts stay valid when the
    data folder moves. Raises ``DataError`` listing every problem in the file. ``quiet``: no info
    line for a test folder listed without a label file (a run that reads it twice says so once).
    """
    if phase not in PHASES:
        raise FoldkitError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    problems: list[str] = []
    if phase == "test" and not label_file(data_dir, phase).exists():
        split = _list_test_folder(data_dir, problems, quiet)
    else:
        split = _parse_split(Path(data_dir), phase, problems)
    if problems or split is None:
        raise DataError(problems)
    return split.df


def read_trainval(data_dir: Path) -> pd.DataFrame:
    """Train rows then validate rows (index reset), checked together so a name is in only one file.

    Both files are parsed before raising, so the user sees the problems of both in one run.
    """
    problems: list[str] = []
    train = _parse_split(Path(data_dir), "train", problems)
    validate = _parse_split(Path(data_dir), "validate", problems)
    if train is not None and validate is not None:
        train_lines = dict(zip(train.df["name"].tolist(), train.lines, strict=True))
        for name, lineno in zip(validate.df["name"].tolist(), validate.lines, strict=True):
            if name in train_lines:
                problems.append(
                    f"{validate.label_path}:{lineno}: name also listed in {train.label_path} "
                    f"line {train_lines[name]} ({name})"
                )
    if problems or train is None or validate is None:
        raise DataError(problems)
    return pd.concat([train.df, validate.df], ignore_index=True)


def read_test(data_dir: Path, quiet: bool = False) -> pd.DataFrame:
    """The test split (labels ``-1``); from test_label.txt, else the folder's images in natural order."""
    return read_split(Path(data_dir), "test", quiet)


def warn_test_overlap(trainval: pd.DataFrame, test: pd.DataFrame, examples: int = 3) -> list[str]:
    """Test names also listed in train or validate, with one warning naming how many and a few.

    Not an error: a shared name may be a naming scheme's coincidence. But the same image in both would
    be predicted by models that trained on it (and a split mix-up shows this way), so the user hears
    of it before training rather than after the leaderboard.
    """
    shared = test.loc[test["name"].isin(set(trainval["name"])), "name"].tolist()
    if shared:
        logger.warning(
            "%d of %d test names also appear in train/validate (e.g. %s): the same image in both "
            "would be predicted by models trained on it; check the split",
            len(shared), len(test), ", ".join(shared[:examples]),
        )  # fmt: skip
    return shared


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one image as an HxWx3 uint8 RGB array (grey, RGBA and palette images are converted).

    No resizing here: the caller decides how to bring odd-sized crops to the model's input size.
    """
    with Image.open(path) as im:
        return to_rgb(im)


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image as HxWx3 uint8 RGB. Grey, palette, RGBA and CMYK go through PIL's ``convert``;
    wide grey (16-bit ``I;16``, 32-bit ``I``, float ``F``) is scaled to 8 bits here, because PIL's
    own conversion clips it: a 16-bit face would come out almost all white."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
    if im.mode.startswith("I") or im.mode == "F":
        grey = np.asarray(im, dtype=np.float64)
        top = 255.0  # 8-bit values stored wide (or floats already in 0..255)
        if im.mode.startswith("I;16") or grey.max() > 255:
            top = 65535.0
        elif im.mode == "F" and grey.max() <= 1.0:
            top = 1.0
        grey = np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    rgb = im.convert("RGB") if im.mode != "RGB" else im
    return np.array(rgb, dtype=np.uint8)


def _sample_rows(n: int, max_check: int) -> np.ndarray:
    """All rows, or ``max_check`` evenly spaced ones (deterministic, covers train and validate)."""
    if n <= max_check:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_check).round().astype(np.int64))


def survey_images(
    data_dir: Path, df: pd.DataFrame, expected: tuple[int, int] | None = None, max_check: int = 2000
) -> dict:
    """Read image headers (no pixels) to tell the user once if images are not ``expected`` RGB.

    ``expected`` is (height, width); None: the most common size checked, the one the image store
    keeps (``foldkit.store.native_size``), so uniform 32 px images are not reported as odd. Odd
    sizes and modes are fine (they are converted on load); an image that cannot be opened at all
    raises ``DataError`` now instead of crashing a training run.
    """
    rows = _sample_rows(len(df), max_check)
    paths = df["path"].to_numpy()[rows]
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    odd: list[tuple[str, str, str]] = []
    unreadable: list[str] = []
    for rel in paths:
        try:
            with Image.open(Path(data_dir) / rel) as im:  # lazy: reads the header only
                (w, h), mode = im.size, im.mode
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            unreadable.append(f"{Path(data_dir) / rel}: cannot open image ({exc})")
            continue
        sizes[f"{w}x{h}"] += 1
        modes[mode] += 1
        odd.append((rel, f"{w}x{h}", mode))
    if unreadable:
        raise DataError(unreadable)
    if expected is None and sizes:
        w, h = map(int, sizes.most_common(1)[0][0].split("x"))
        expected = (h, w)
    want = f"{expected[1]}x{expected[0]}" if expected else ""
    odd = [o for o in odd if o[1] != want or o[2] != "RGB"]
    if odd:
        rel, size, mode = odd[0]
        logger.info(
            "%d of %d checked images are not %dx%d RGB (e.g. %s: %s %s); they are converted on load",
            len(odd), len(paths), expected[1], expected[0], rel, size, mode,
        )  # fmt: skip
    return {"checked": len(paths), "mismatched": len(odd), "sizes": dict(sizes), "modes": dict(modes)}
