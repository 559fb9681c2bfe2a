"""K-fold assignment of train+validate, leak-free by group, written once and reused by every model.

CLI::

    python -m foldkit.folds [--config configs/default.yaml] [--data-dir D] [--work-dir W] [--k 5]
        [--seed 42] [--group-regex 'S\\d+'] [--allow-unmatched] [--near-dup | --no-near-dup]
        [--hamming 6] [--near-dup-min-corr 0.99] [--near-dup-max-group 16] [--set data.KEY=VALUE]
        [--workers N] [--force]

The config's ``data:`` section supplies every fold setting (the same keys ``main.py`` reads, so
``main.py`` reuses these folds instead of rebuilding them); ``--set`` and then explicit flags override
it. ``--data-dir`` defaults to ``data``, ``--work-dir`` to the project root. Writes
``<work-dir>/folds/folds.csv`` (columns ``name,path,label,source,group,fold``) and
``<work-dir>/folds/folds.json`` (settings, ``data_hash`` of the index, and with near_dup of the image
files too, ``hash`` of folds.csv, which every later artifact records). The same settings on the same
data give a byte-identical folds.csv. On bad input the problems go to stderr, the exit status is 2 and
nothing is written.

Groups keep related images in one fold, so a model is never validated on a face it trained on:

* no grouping: every image is its own group;
* ``group_regex``: the first match of the regex in the file name (a subject id ``S\\d+``); it must
  match at least 90% of the names unless ``allow_unmatched`` (then the rest are groups of their own);
* ``near_dup`` (the near-duplicate policy of docs/DESIGN-notes.md, implemented in ``foldkit.neardup``):
  images with identical decoded pixels always join; images whose 64-bit pHashes differ in at most
  ``hamming`` bits are only candidates, joined when their 16x16 grey thumbnails correlate at least
  ``near_dup_min_corr``, never when that would join two regex groups (such links are counted and logged
  instead), and never into a group of more than ``near_dup_max_group`` images without a regex key.

A group larger than n/(2k) images, or fewer groups than folds, is an error that names its cause.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from foldkit import PROJECT_ROOT
from foldkit.cli import add_path_args, add_set_arg, run, setup_logging
from foldkit.config import MAX_HAMMING, DataConfig, load_config, parse_override
from foldkit.data import INDEX_COLUMNS, files_hash, read_trainval, survey_images
from foldkit.io import FoldkitError, atomic_write_text, listed, read_json_artifact
from foldkit.neardup import (
    LinkReport,
    fingerprint_images,  # looked up here at call time: tests and the benchmark substitute it
    graph_components,
    link_groups,
    log_links,
    pair_text,
    star_edges,
)

logger = logging.getLogger("foldkit.folds")  # not __name__: under -m that is "__main__"

FOLD_COLUMNS = [*INDEX_COLUMNS, "group", "fold"]
#: Settings recorded in folds.json; a change in any of them means the folds must be rebuilt.
SETTING_KEYS = ("k", "seed", "group_regex", "near_dup", "hamming", "near_dup_min_corr", "near_dup_max_group")
#: Settings that only matter with ``near_dup`` on (a change in them alone does not rebuild without it).
NEAR_DUP_KEYS = ("hamming", "near_dup_min_corr", "near_dup_max_group")
#: A group regex must match at least this share of the names (unless allow_unmatched): names it misses
#: carry no subject id, so their groups would not keep a subject in one fold.
MIN_REGEX_COVERAGE = 0.9
DEFAULT_CONFIG = "configs/default.yaml"
_DATA_DEFAULTS = DataConfig()

# sklearn's StratifiedGroupKFold assigns groups one at a time in Python (~0.15 ms per group, so 320,000
# groups take most of a minute). Above this many groups, small single-label groups are packed into
# bundles first (see _bundle_groups); bundling only ever adds constraints, so it cannot cause a leak.
_MAX_SGKF_GROUPS = 10_000

# Named as --set forms: main.py and python -m foldkit.folds both take them (only the latter has the
# flags such as --group-regex).
_REGEX_OPTIONS = (
    "a finer group regex (--set data.group_regex=...), fewer folds (--set data.k=N), "
    "or no regex groups (--set data.group_regex=null)"
)
_EXACT_OPTIONS = "remove or rename the duplicated files, or no duplicate grouping (--set data.near_dup=false)"
_FUZZY_OPTIONS = (
    "a stricter pixel check (--set data.near_dup_min_corr=...), a smaller cap "
    "(--set data.near_dup_max_group=...), fewer pHash bits (--set data.hamming=N), "
    "or no duplicate grouping (--set data.near_dup=false)"
)


# the two commands that rebuild the folds (folds made anew retrain every model trained on the old ones)
_REBUILD = "rebuild them with main.py --refold or python -m foldkit.folds --force"


def folds_dir(work_dir: Path) -> Path:
    """``<work-dir>/folds``: where folds.csv and folds.json live."""
    return Path(work_dir) / "folds"


def fold_settings(data: DataConfig) -> dict:
    """``ensure_folds`` keyword arguments from a config's ``data`` section (main.py and the CLI share it)."""
    return {
        "k": data.k,
        "seed": data.fold_seed,
        "group_regex": data.group_regex or None,
        "near_dup": data.near_dup,
        "hamming": data.hamming,
        "near_dup_min_corr": data.near_dup_min_corr,
        "near_dup_max_group": data.near_dup_max_group,
        "allow_unmatched": data.allow_unmatched,
    }


def settings_changes(old: dict, new: dict) -> list[str]:
    """``"key old -> new"`` for every recorded setting that differs (near-dup keys only with near_dup)."""
    keys = [key for key in SETTING_KEYS if key not in NEAR_DUP_KEYS or new["near_dup"]]
    return [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in keys if old.get(key) != new[key]]


# --------------------------------------------------------------------------------------------------
# Groups: regex keys, near-duplicate links (foldkit.neardup), and the guard rails on their sizes
# --------------------------------------------------------------------------------------------------


def check_group_regex(names: pd.Series, data: DataConfig, work_dir: Path, refold: bool = False) -> None:
    """The group regex's coverage check on the names alone, for callers that would otherwise decode
    every image (the store) before making the folds tells them the regex does not fit. Skipped when
    the folds on disk were made with these settings on these very names and ``refold`` is off: they
    are reused then, and may have been made with ``python -m foldkit.folds --allow-unmatched``. New
    data is checked, so a regex that misses its names stops the run before the store decodes it."""
    settings = fold_settings(data)
    if not settings["group_regex"]:
        return
    if not refold:
        try:
            csv, meta = _read_verified(Path(work_dir))
        except FoldkitError:
            csv, meta = b"", None
        if meta is not None and not settings_changes(meta, settings):
            made_on = pd.read_csv(io.BytesIO(csv), usecols=["name"], dtype=str, keep_default_na=False).name
            if len(made_on) == len(names) and set(made_on) == set(names):
                return
    _regex_keys(names, settings["group_regex"], data.allow_unmatched)


def _regex_keys(names: pd.Series, group_regex: str, allow_unmatched: bool = False) -> np.ndarray:
    """First regex match in each name (object array, ``None`` where there is no or an empty match).

    A regex that misses most names is a mistake, not a grouping (md5 names carry no subject): below
    ``MIN_REGEX_COVERAGE`` it is an error unless ``allow_unmatched``.
    """
    try:
        pattern = re.compile(group_regex)
    except re.error as exc:
        raise FoldkitError(f"group_regex '{group_regex}' is not a valid regular expression: {exc}") from exc
    keys = np.array([m.group(0) if (m := pattern.search(n)) else None for n in names.tolist()], dtype=object)
    keys[keys == ""] = None  # an empty match (e.g. 'S\d*') would lump unrelated names into one group
    unmatched = np.flatnonzero(pd.isna(keys))
    if not len(unmatched):
        return keys
    n, example = len(keys), names.iloc[unmatched[0]]
    share = 1 - len(unmatched) / n
    if share < MIN_REGEX_COVERAGE and not allow_unmatched:
        raise FoldkitError(
            f"group_regex '{group_regex}' matches only {n - len(unmatched)} of {n} names ({share:.1%}, "
            f"under {MIN_REGEX_COVERAGE:.0%}; e.g. not {example!r}): names it misses carry no subject id, "
            "so grouping by it would not keep a subject in one fold. Options: no regex groups "
            "(--set data.group_regex=null, or group_regex: null in the config's data section), a regex "
            "that fits these names (--set data.group_regex=...), or keep the unmatched names as groups "
            "of their own (--set data.allow_unmatched=true)"
        )
    logger.warning(
        "%d of %d names do not match group_regex '%s'; each of them is its own group (e.g. %s)",
        len(unmatched), n, group_regex, example,
    )  # fmt: skip
    return keys


class Groups(NamedTuple):
    """The grouping of the rows of an index, and how it came about."""

    components: np.ndarray  # component number per row (0..G-1)
    ids: np.ndarray  # readable group id per row
    keys: np.ndarray | None  # regex key per row (None: unmatched), None without a regex
    links: LinkReport | None  # what the duplicate links did, None without near_dup


def _group_ids(components: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
    """Stable, readable id per row: the regex key if its component has exactly one, else ``g<first row>``.

    Built from row positions and names only, so the same index and settings give the same ids.
    """
    first = pd.Series(np.arange(len(components))).groupby(components).transform("min").to_numpy()
    generated = np.array([f"g{i}" for i in first], dtype=object)
    if keys is None:
        return generated
    by_comp = pd.Series(keys, dtype=object).groupby(components)
    n_keys = by_comp.transform("nunique").to_numpy()
    ids = np.where(n_keys == 1, by_comp.transform("first").to_numpy(), generated)
    # A regex key that looks like a generated id (say "g12") could give two groups one name.
    if len(set(ids)) != len(np.unique(components)):
        logger.warning("regex keys collide with generated group ids; naming every group g<first row>")
        return generated
    return ids


def build_groups(
    index: pd.DataFrame,
    data_dir: Path,
    group_regex: str | None = None,
    near_dup: bool = False,
    hamming: int = _DATA_DEFAULTS.hamming,
    near_dup_min_corr: float = _DATA_DEFAULTS.near_dup_min_corr,
    near_dup_max_group: int = _DATA_DEFAULTS.near_dup_max_group,
    *,
    allow_unmatched: bool = False,
    workers: int | None = None,
) -> Groups:
    """Groups of the rows: regex keys, then (with ``near_dup``) duplicate links under the policy."""
    n = len(index)
    keys = _regex_keys(index["name"], group_regex, allow_unmatched) if group_regex else None
    key_codes = pd.factorize(keys)[0] if keys is not None else np.full(n, -1, dtype=np.int64)
    if not near_dup:
        components = graph_components(n, [star_edges(key_codes)])
        return Groups(components, _group_ids(components, keys), keys, None)
    fp = fingerprint_images([str(Path(data_dir) / p) for p in index["path"]], workers)
    components, report = link_groups(key_codes, fp, hamming, near_dup_min_corr, near_dup_max_group)
    log_links(report, index["name"].to_numpy(), keys, hamming, near_dup_min_corr, near_dup_max_group)
    return Groups(components, _group_ids(components, keys), keys, report)


def _explain_group(c: int, groups: Groups, names: np.ndarray, limit: float) -> tuple[str, str]:
    """``(cause, options)`` of component ``c``: which rule made it this large, and what would change it."""
    rows = np.flatnonzero(groups.components == c)
    keys = pd.Series(groups.keys[rows] if groups.keys is not None else [None] * len(rows), dtype=object)
    counts = keys.dropna().value_counts()
    report = groups.links
    if len(counts) == 1 and (counts.iloc[0] > limit or counts.iloc[0] == len(rows)):
        return f"regex key {counts.index[0]!r} holds {counts.iloc[0]} images", _REGEX_OPTIONS
    if len(counts) > 1:  # only identical-pixel copies may join two regex keys
        inside = [p for p in (report.exact_bridges if report else []) if groups.components[p[0]] == c]
        return (
            f"identical-pixel copies join {len(counts)} regex keys ({', '.join(counts.index[:5])}"
            f"{', ...' if len(counts) > 5 else ''}) into it, e.g. "
            + pair_text(names, groups.keys, inside, "="),
            _EXACT_OPTIONS,
        )
    fuzzy = [p for p in (report.joined if report else []) if groups.components[p[0]] == c]
    codes = report.pixel_codes[rows] if report else np.arange(len(rows))
    dup = pd.Series(rows).groupby(codes).agg(list)
    exact = [(r[0], r[1]) for r in dup if len(r) > 1]
    start = f"regex key {counts.index[0]!r} ({counts.iloc[0]} images) and " if len(counts) else ""
    cause = (
        f"{start}{len(rows) - int(counts.sum())} images without a regex key joined by near-duplicate "
        f"links ({len(exact)} identical-pixel sets, {len(fuzzy)} pixel-checked links), e.g. "
        + pair_text(names, groups.keys, exact + fuzzy)
    )
    return cause, _FUZZY_OPTIONS if fuzzy else _EXACT_OPTIONS


def check_groups(groups: Groups, names: np.ndarray, k: int) -> None:
    """Raise ``FoldkitError`` when the groups cannot give ``k`` balanced folds, naming the cause.

    A group over n/(2k) images fills over half a fold on its own, so fold sizes and fake ratios drift;
    such a group is nearly always a grouping mistake (a chain of false links, a too-coarse key).
    """
    n = len(groups.components)
    if n < k:
        raise FoldkitError(f"cannot make {k} folds from {n} images; use fewer folds (--k / --set data.k=N)")
    sizes = np.bincount(groups.components)
    big, limit = int(np.argmax(sizes)), max(n / (2 * k), 1.0)
    if len(sizes) < k:
        cause, options = _explain_group(big, groups, names, limit)
        fewer = "" if "fewer folds" in options else "fewer folds (--k / --set data.k=N), "
        raise FoldkitError(
            f"cannot make {k} folds from {n} images in {len(sizes)} groups (fewer groups than folds); "
            f"the largest group holds {sizes[big]} images: {cause}. Options: {fewer}{options}"
        )
    if sizes[big] > limit:
        cause, options = _explain_group(big, groups, names, limit)
        raise FoldkitError(
            f"the largest group holds {sizes[big]} of {n} images ({sizes[big] / n:.0%}), over n/(2k) = "
            f"{limit:.1f} for k={k}, so the folds could not be balanced: {cause}. Options: {options}"
        )


# --------------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------------


def _bundle_groups(labels: np.ndarray, components: np.ndarray, seed: int, n_splits: int) -> np.ndarray:
    """Pack small single-label groups into random bundles so StratifiedGroupKFold sees few groups.

    A bundle only ever forces more rows into one fold, so groups stay whole; bundles are single-label,
    so stratification still works. Mixed-label groups and large groups are kept as they are.
    """
    size = np.bincount(components)
    fakes = np.bincount(components, weights=labels == 1).astype(np.int64)
    pure = np.where(fakes == 0, 0, np.where(fakes == size, 1, -1))
    n_kept = int((pure < 0).sum())
    if n_kept > _MAX_SGKF_GROUPS:
        logger.warning("%d groups hold both real and fake images; assigning folds will be slow", n_kept)
    budget = max((_MAX_SGKF_GROUPS - n_kept) // 2, 1)  # halved: groups above target also stay whole
    # A bundle is placed whole, so it must stay small against a fold: at most 1/25 of the n/(2k)
    # group limit. Without that cap, ~10,000 mixed groups left a budget of 1 bundle per label, and one
    # fold took every real-only group, another every fake-only one (fake ratios 100% / 0%). More
    # groups than _MAX_SGKF_GROUPS then only cost time (~3 s per 20,000 groups).
    cap = max(len(components) // (50 * n_splits), 1)
    target = max(min(int(np.ceil(size[pure >= 0].sum() / budget)), cap), 1)
    rng = np.random.default_rng(seed)
    bundle = np.arange(len(size))
    next_id = len(size)
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero((pure == label) & (size < target)))
        if len(members):
            start = np.cumsum(size[members]) - size[members]
            bundle[members] = next_id + start // target
            next_id += int(start[-1] // target) + 1
    return bundle[components]


def _assign_folds(labels: np.ndarray, components: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number per row, stratified by label and never splitting a component."""
    n = len(labels)
    n_groups = len(np.unique(components))
    if n_groups == n:
        # Every image its own group: StratifiedKFold is exact and vectorised. (StratifiedGroupKFold
        # would give the same guarantee but loops in Python per group: ~45 s for 320,000 singletons.)
        splitter: StratifiedKFold | StratifiedGroupKFold = StratifiedKFold(k, shuffle=True, random_state=seed)
        groups = None
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        groups = components if n_groups <= _MAX_SGKF_GROUPS else _bundle_groups(labels, components, seed, k)
    folds = np.full(n, -1, dtype=np.int64)
    try:
        for fold, (_, test) in enumerate(splitter.split(np.zeros((n, 1)), labels, groups)):
            folds[test] = fold
    except ValueError as exc:
        raise FoldkitError(f"cannot make {k} folds from {n} images in {n_groups} groups: {exc}") from exc
    return folds


def _check_settings(
    index: pd.DataFrame, k: int, hamming: int, near_dup_min_corr: float, near_dup_max_group: int
) -> None:
    """Reject settings and indexes that cannot give valid folds, before any slow work.

    The ranges are the config's (foldkit.config.validate), so a config that loads is always accepted.
    """
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise FoldkitError(f"the index lacks columns {missing}; expected {INDEX_COLUMNS}")
    if k < 2:
        raise FoldkitError(f"--k must be at least 2, got {k}")
    if not 0 <= hamming <= MAX_HAMMING:
        raise FoldkitError(f"--hamming must be in 0..{MAX_HAMMING} (bits of a 64-bit hash), got {hamming}")
    if not 0 < near_dup_min_corr <= 1:
        raise FoldkitError(f"--near-dup-min-corr must be in (0, 1], got {near_dup_min_corr}")
    if near_dup_max_group < 1:
        raise FoldkitError(f"--near-dup-max-group must be at least 1, got {near_dup_max_group}")
    bad = ~index["label"].isin([0, 1])
    if bad.any():
        raise FoldkitError(
            f"{int(bad.sum())} rows have a label other than 0/1 (e.g. {index['name'][bad].iloc[0]})"
        )


def _log_balance(df: pd.DataFrame, k: int) -> None:
    """Log fold shares and fake ratios against the whole; warn past 2 points (uneven group sizes)."""
    share = df["fold"].value_counts(normalize=True).sort_index()
    ratio = df.groupby("fold")["label"].mean()
    whole = df["label"].mean()
    size_dev, ratio_dev = (share - 1 / k).abs().max(), (ratio - whole).abs().max()
    log = logger.warning if max(size_dev, ratio_dev) > 0.02 else logger.info
    log(
        "folds hold %s of the images (even: %.1f%%), fake ratios %s (whole %.1f%%)%s",
        ", ".join(f"{x:.1%}" for x in share), 100 / k, ", ".join(f"{x:.1%}" for x in ratio), 100 * whole,
        "; over 2 points off: a few large groups?" if log is logger.warning else "",
    )  # fmt: skip


def make_folds(
    index: pd.DataFrame,
    data_dir: Path,
    k: int = 5,
    seed: int = 42,
    group_regex: str | None = None,
    near_dup: bool = False,
    hamming: int = _DATA_DEFAULTS.hamming,
    near_dup_min_corr: float = _DATA_DEFAULTS.near_dup_min_corr,
    near_dup_max_group: int = _DATA_DEFAULTS.near_dup_max_group,
    *,
    allow_unmatched: bool = False,
    workers: int | None = None,
) -> pd.DataFrame:
    """The index plus ``group`` and ``fold``: stratified by label, every group inside one fold."""
    _check_settings(index, k, hamming, near_dup_min_corr, near_dup_max_group)
    df = index[INDEX_COLUMNS].reset_index(drop=True)
    df = df.assign(label=df["label"].astype(np.int64))
    groups = build_groups(
        df, data_dir, group_regex, near_dup, hamming, near_dup_min_corr, near_dup_max_group,
        allow_unmatched=allow_unmatched, workers=workers,
    )  # fmt: skip
    sizes = np.bincount(groups.components)
    logger.info(
        "%d groups for %d images (%d with more than one image, largest %d)",
        len(sizes), len(df), int((sizes > 1).sum()), int(sizes.max(initial=0)),
    )  # fmt: skip
    check_groups(groups, df["name"].to_numpy(), k)
    df["group"] = pd.Series(groups.ids, dtype=str)
    df["fold"] = _assign_folds(df["label"].to_numpy(), groups.components, k, seed)
    _log_balance(df, k)
    if groups.links is not None:
        _warn_label_conflicts(df, groups.links.pixel_codes)
        _warn_split_copies(df, groups.links.capped)
    _check_both_labels(df, k)
    assert_no_leak(df)
    return df


def _warn_split_copies(df: pd.DataFrame, capped: list[tuple[int, int, float]]) -> None:
    """Say how many near-duplicates the size cap left in two folds (possible leaks), after the folds
    are known: the cap's own log line counts refused links, not whether their ends were split."""
    fold, names = df["fold"].to_numpy(), df["name"].to_numpy()
    split = [(a, b, r) for a, b, r in capped if fold[a] != fold[b]]
    if split:
        apart = len({i for a, b, _ in split for i in (a, b)})
        pairs = [f"{names[a]} ~ {names[b]} (folds {fold[a]} / {fold[b]})" for a, b, _ in split]
        logger.warning(
            "near-dup: %d near-duplicate pairs refused by the size cap ended in different folds (%d images, "
            "possible leaks): %s. A larger data.near_dup_max_group keeps such sets whole",
            len(split), apart, "; ".join(listed(pairs, 3)),
        )  # fmt: skip


def _warn_label_conflicts(df: pd.DataFrame, pixel_codes: np.ndarray) -> None:
    """Pixel-identical images labelled both real and fake: almost always a label error (or a blank
    crop in both classes). They share a group and a fold, so nothing leaks; the labels need a look."""
    labels = df["label"].to_numpy()
    both = pd.Series(labels).groupby(pixel_codes).nunique() > 1
    if not both.any():
        return
    names, shown = df["name"].to_numpy(), []
    for code in both.index[both][:5]:
        rows = np.flatnonzero(pixel_codes == code)
        real, fake = rows[labels[rows] == 0][0], rows[labels[rows] == 1][0]
        shown.append(f"{names[real]} (0) = {names[fake]} (1)")
    logger.warning(
        "%d set(s) of pixel-identical images carry both labels (a label error?): %s%s",
        int(both.sum()), "; ".join(shown), " ..." if both.sum() > 5 else "",
    )  # fmt: skip


def _check_both_labels(df: pd.DataFrame, k: int) -> None:
    """Every fold must hold real and fake images: a fold without one of them has no F1, no AUC and no
    threshold to validate, and its model's OOF rows mislead the blend. Caught here, not epochs later."""
    counts = pd.crosstab(df["fold"], df["label"]).reindex(index=range(k), columns=[0, 1], fill_value=0)
    empty = [(fold, label) for fold in range(k) for label in (0, 1) if counts.loc[fold, label] == 0]
    if empty:
        what = {0: "real (0)", 1: "fake (1)"}
        shown = ", ".join(listed([f"fold {f} holds no {what[lab]} image" for f, lab in empty], 5))
        totals = f"{int((df.label == 0).sum())} real and {int((df.label == 1).sum())} fake images in all"
        raise FoldkitError(
            f"{shown} ({totals}, {k} folds): every fold needs both to "
            "score a model and tune its threshold. Options: fewer folds (--k / --set data.k=N), or more "
            "images of the missing class (check the label files)"
        )


def assert_no_leak(df: pd.DataFrame) -> None:
    """Raise ``FoldkitError`` if a group sits in two folds (a model would validate on its training faces)."""
    if df["fold"].isna().any() or (df["fold"] < 0).any():
        raise FoldkitError("some rows have no fold")
    n_folds = df.groupby("group", sort=True)["fold"].nunique()
    leaking = n_folds.index[n_folds > 1]
    if len(leaking):
        folds_of = df[df["group"].isin(leaking[:5])].groupby("group")["fold"].unique()
        shown = [f"group {g!r} is in folds {', '.join(map(str, sorted(folds_of[g])))}" for g in leaking[:5]]
        more = f"\n... and {len(leaking) - 5} more" if len(leaking) > 5 else ""
        raise FoldkitError(
            f"fold leak: {len(leaking)} group(s) span several folds:\n" + "\n".join(shown) + more
        )


# --------------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_hash(index: pd.DataFrame) -> str:
    """sha256 of ``name,path,label,source`` of every row: tells whether the data changed since."""
    cols = index[INDEX_COLUMNS].astype({"label": np.int64})
    return _sha256(cols.to_csv(index=False, lineterminator="\n").encode("utf-8"))


def data_hash(index: pd.DataFrame, data_dir: Path, near_dup: bool) -> str:
    """What the folds of ``index`` depend on: its rows, and with ``near_dup`` the image files too (their
    pixels decide the groups: a file replaced under its old name must rebuild the folds, or two copies
    could stay in two folds). Files are judged by ``files_hash`` (stat only, no decoding)."""
    if not near_dup:
        return index_hash(index)
    return _sha256(f"{index_hash(index)}\n{files_hash(data_dir, index['path'].tolist())}".encode())


def write_folds(df: pd.DataFrame, work_dir: Path, meta: dict, made_from: str | None = None) -> dict:
    """Check for leaks, then atomically write folds.csv and folds.json; return the json's content.

    No timestamps or paths outside the data folder go in folds.csv, so the same input gives the same
    bytes (and folds hash). ``made_from``: the ``data_hash`` to record (default: the rows' own).
    """
    missing = [c for c in FOLD_COLUMNS if c not in df.columns]
    if missing:
        raise FoldkitError(f"cannot write folds: columns {missing} are missing")
    absent = [key for key in SETTING_KEYS if key not in meta]
    if absent:
        raise FoldkitError(f"cannot write folds: settings {absent} are missing")
    assert_no_leak(df)
    text = df[FOLD_COLUMNS].to_csv(index=False, lineterminator="\n")
    full = {key: meta[key] for key in SETTING_KEYS}
    full.update(n=len(df), data_hash=made_from or index_hash(df), hash=_sha256(text.encode("utf-8")))
    out = folds_dir(work_dir)
    atomic_write_text(out / "folds.csv", text)  # csv first: a stale json then fails the hash check
    atomic_write_text(out / "folds.json", json.dumps(full, indent=2) + "\n")
    return full


def _read_verified(work_dir: Path) -> tuple[bytes, dict]:
    """folds.csv bytes and folds.json, checked against each other (a half-finished write fails here)."""
    csv_path, json_path = folds_dir(work_dir) / "folds.csv", folds_dir(work_dir) / "folds.json"
    for path in (json_path, csv_path):
        if not path.is_file():
            # The callers do not know the config: name the commands that build folds with one, and
            # say that the same config and data must be used (else main.py rebuilds them anyway).
            raise FoldkitError(
                f"{path} not found; make folds first, with the config and data you train with: "
                f"python main.py --config CONFIG --data-dir DATA --work-dir {work_dir} --fold ... "
                f"(builds them before training), or python -m foldkit.folds --config CONFIG "
                f"--data-dir DATA --work-dir {work_dir}"
            )
    meta = read_json_artifact(json_path, _REBUILD)
    raw = csv_path.read_bytes()
    if meta.get("hash") != _sha256(raw):
        raise FoldkitError(f"{csv_path} does not match the hash in {json_path}; {_REBUILD}")
    return raw, meta


def load_folds(work_dir: Path) -> tuple[pd.DataFrame, dict]:
    """The folds table and its folds.json, verified to belong together."""
    raw, meta = _read_verified(work_dir)
    text_cols = {"name": str, "path": str, "source": str, "group": str}
    df = pd.read_csv(
        io.BytesIO(raw), dtype={**text_cols, "label": np.int64, "fold": np.int64}, na_filter=False
    )
    if list(df.columns) != FOLD_COLUMNS:
        raise FoldkitError(
            f"{folds_dir(work_dir) / 'folds.csv'} has columns {list(df.columns)}, not {FOLD_COLUMNS}"
        )
    return df, meta


def folds_hash(work_dir: Path) -> str:
    """Hash of the current folds.csv; every later artifact records it to prove which folds it used."""
    return _read_verified(work_dir)[1]["hash"]


def _stale_reason(work_dir: Path, settings: dict, data_hash: str) -> str | None:
    """Why the folds on disk cannot be reused, or ``None`` if they can."""
    try:
        _, meta = _read_verified(work_dir)
    except FoldkitError as exc:
        return "no usable folds yet: " + str(exc).split(";")[0]
    changed = settings_changes(meta, settings)
    if changed:
        return "settings changed: " + ", ".join(changed)
    if meta.get("data_hash") != data_hash:
        return "the data changed since the folds were made (train/validate names, files or labels)"
    return None


def guard_refold(work_dir: Path, settings: dict, refold: bool, flag: str = "--refold") -> None:
    """Refuse to silently rebuild folds with other settings while trained OOF files depend on them
    (they would all become unusable); ``refold`` (``flag``) or another ``--work-dir`` says it is meant.
    ``main.py`` and ``python -m foldkit.folds`` both call it before building anything."""
    meta_path = folds_dir(work_dir) / "folds.json"
    if refold or not meta_path.is_file():
        return
    old = read_json_artifact(
        meta_path,
        f"rebuild the folds with {flag} (the same data and fold settings give the same folds, so the "
        "OOF files made on them stay usable)",
    )
    changed = settings_changes(old, settings)
    if not changed:
        return
    users = sorted({p.parent.parent.name for p in _sidecars_on(Path(work_dir), old.get("hash"), flag)})
    if users:
        raise FoldkitError(
            f"{meta_path} was made with other fold settings ({'; '.join(changed)}) and experiment(s) "
            f"{', '.join(users)} were trained on it; rebuilding would make their OOF files unusable. "
            f"Pass {flag} to rebuild anyway, use another --work-dir, or go back to the settings it "
            "was made with."
        )


def _sidecars_on(work_dir: Path, folds_hash: object, flag: str) -> list[Path]:
    """The OOF sidecars (``oof/<exp>/<backbone>/fold<k>.json``) made on the folds ``folds_hash``."""
    found = []
    for path in sorted((work_dir / "oof").glob("*/*/fold*.json")):
        recover = (
            f"delete it and {path.with_suffix('.csv').name} beside it (training that fold makes them "
            f"again), or pass {flag} to rebuild the folds anyway"
        )
        if read_json_artifact(path, recover).get("folds_hash") == folds_hash:
            found.append(path)
    return found


def ensure_folds(
    data_dir: Path,
    work_dir: Path,
    k: int = 5,
    seed: int = 42,
    group_regex: str | None = None,
    near_dup: bool = False,
    hamming: int = _DATA_DEFAULTS.hamming,
    near_dup_min_corr: float = _DATA_DEFAULTS.near_dup_min_corr,
    near_dup_max_group: int = _DATA_DEFAULTS.near_dup_max_group,
    *,
    allow_unmatched: bool = False,
    force: bool = False,
    workers: int | None = None,
    exclude: Collection[str] = (),
    index: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Reuse folds made with the same settings on the same data, else rebuild and write them.

    Every model of the ensemble must see the same folds, so they are made once and only remade when
    the settings or the data index change. ``allow_unmatched`` is not a setting of the folds (it only
    permits a regex that misses many names), so it never forces a rebuild. ``exclude``: image paths
    left out of the folds (unreadable ones under ``on_bad_image: skip``); the data hash covers them.
    ``index``: the train+validate index when the caller has read it already.
    """
    settings = {
        "k": k,
        "seed": seed,
        "group_regex": group_regex or None,
        "near_dup": near_dup,
        "hamming": hamming,
        "near_dup_min_corr": near_dup_min_corr,
        "near_dup_max_group": near_dup_max_group,
    }
    index = read_trainval(Path(data_dir)) if index is None else index
    if len(exclude):
        index = index[~index["path"].isin(set(exclude))].reset_index(drop=True)
        logger.info("leaving %d unreadable image(s) out of the folds", len(exclude))
    made_from = data_hash(index, Path(data_dir), near_dup)
    reason = "--force" if force else _stale_reason(Path(work_dir), settings, made_from)
    if reason is None:
        df, meta = load_folds(Path(work_dir))
        logger.info(
            "reusing the folds in %s: same settings and data (folds hash %s)",
            folds_dir(work_dir), meta["hash"][:12],
        )  # fmt: skip
        return df, meta
    logger.info("rebuilding the folds in %s: %s", folds_dir(work_dir), reason)
    survey_images(Path(data_dir), index)
    df = make_folds(index, Path(data_dir), workers=workers, allow_unmatched=allow_unmatched, **settings)
    meta = write_folds(df, Path(work_dir), settings, made_from)
    logger.info("wrote %s (folds hash %s)", folds_dir(work_dir) / "folds.csv", meta["hash"][:12])
    return df, meta


def fold_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per-fold counts (n, fakes, fake ratio, n per source, groups) plus a total row."""
    by_fold = df.groupby("fold")
    table = pd.DataFrame({"n": by_fold.size(), "fakes": by_fold["label"].sum()})
    per_source = pd.crosstab(df["fold"], df["source"]).reindex(columns=list(dict.fromkeys(df["source"])))
    table = table.join(per_source.add_prefix("n_")).join(by_fold["group"].nunique().rename("groups"))
    total = table.sum().to_frame("total").T
    total["groups"] = df["group"].nunique()
    table = pd.concat([table, total.astype(table.dtypes.to_dict())])
    table.insert(2, "fake_ratio", (table["fakes"] / table["n"]).round(4))
    table.index.name = "fold"
    return table


def format_fold_table(df: pd.DataFrame) -> str:
    """The per-fold table as text, for the terminal."""
    return fold_table(df).reset_index().to_string(index=False, float_format=lambda x: f"{x:.4f}")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

#: CLI flags that override a key of the config's ``data:`` section.
_FLAG_KEYS = {
    "k": "data.k",
    "seed": "data.fold_seed",
    "group_regex": "data.group_regex",
    "allow_unmatched": "data.allow_unmatched",
    "near_dup": "data.near_dup",
    "hamming": "data.hamming",
    "near_dup_min_corr": "data.near_dup_min_corr",
    "near_dup_max_group": "data.near_dup_max_group",
}


def resolve_config_path(text: str) -> Path:
    """A relative config path is looked up in the current folder, then in the project (as main.py does)."""
    path = Path(text)
    if path.is_file() or path.is_absolute():
        return path
    return PROJECT_ROOT / path if (PROJECT_ROOT / path).is_file() else path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append each default, unless the help already states it (the fold flags name their config's value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def build_parser(config: str = DEFAULT_CONFIG) -> argparse.ArgumentParser:
    """Every option with a help line and its default; fold settings default to ``config``'s data section."""
    d = load_config(resolve_config_path(config)).data
    p = argparse.ArgumentParser(
        prog="python -m foldkit.folds", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="YAML config whose data: section gives the fold settings (relative: cwd, then project); "
        "give it the file main.py is given, and main.py reuses these folds",
    )
    add_path_args(p)
    add_set_arg(
        p,
        "override a config key, repeatable, e.g. --set data.group_regex=null; the flags below win over it "
        "(default: none)",
    )
    for flag, kind, value, text in (
        ("--k", int, d.k, "number of folds"),
        ("--seed", int, d.fold_seed, "seed of the split (data.fold_seed)"),
        ("--group-regex", str, d.group_regex, "group key: first match in the name; '' or null: none"),
        ("--allow-unmatched", bool, d.allow_unmatched, "accept a group regex matching under 90% of names"),
        ("--near-dup", bool, d.near_dup, "group copies: same pixels, pixel-checked pHash near-duplicates"),
        ("--hamming", int, d.hamming, f"pHash candidates: max differing bits, 0..{MAX_HAMMING}"),
        ("--near-dup-min-corr", float, d.near_dup_min_corr, "pixel check: min thumbnail correlation"),
        ("--near-dup-max-group", int, d.near_dup_max_group, "max group near-dup links build without a key"),
    ):
        shown = "null" if value is None else f"'{value}'" if isinstance(value, str) else value
        help_text = f"{text} (default: {shown} from {config})".replace("%", "%%")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(flag, type=kind, help=help_text)
    p.add_argument("--workers", type=int, help="fingerprinting processes (default: all CPU cores)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folds are up to date")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse twice: ``--config`` first, so the help and the defaults show that config's values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_CONFIG)
    config = pre.parse_known_args(argv)[0].config
    return build_parser(config).parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> dict:
    """``ensure_folds`` keywords: the config's data section < ``--set`` < explicit flags."""
    overrides = [parse_override(text) for text in args.overrides]
    for dest, key in _FLAG_KEYS.items():
        value = getattr(args, dest)
        if dest == "group_regex" and value is not None and value.strip().lower() in ("", "null", "none"):
            overrides.append((key, None))
        elif value is not None:
            overrides.append((key, value))
    return fold_settings(load_config(resolve_config_path(args.config), overrides).data)


def _main(argv: Sequence[str] | None) -> int:
    args = _parse_args(argv)
    setup_logging(args.verbose)
    settings = settings_from_args(args)
    logger.info(
        "fold settings (%s, then --set and flags): %s",
        args.config, ", ".join(f"{key}={value!r}" for key, value in settings.items()),
    )  # fmt: skip
    guard_refold(args.work_dir, settings, args.force, "--force")
    df, meta = ensure_folds(args.data_dir, args.work_dir, **settings, force=args.force, workers=args.workers)
    print(format_fold_table(df))
    print(f"folds: {folds_dir(args.work_dir) / 'folds.csv'} (hash {meta['hash']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, with nothing written)."""
    return run(_main, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
