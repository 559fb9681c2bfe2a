"""K-fold assignment of train+validate, leak-free by group, written once and reused by every model.

CLI::

    python -m foldkit.folds --data-dir D --work-dir W --k 5 --seed 42 --group-regex 'S\\d+' \\
        [--near-dup] [--hamming 6] [--workers N] [--force]

``--data-dir`` defaults to ``data``, ``--work-dir`` to the project root. Writes
``<work-dir>/folds/folds.csv`` (columns ``name,path,label,source,group,fold``) and
``<work-dir>/folds/folds.json`` (settings, ``data_hash`` of the index, ``hash`` of folds.csv, which every
later artifact records). The same settings on the same data give byte-identical files. On bad input the
problems go to stderr, the exit status is 2 and nothing is written.

Groups keep related images in one fold, so a model is never validated on a face it trained on:

* no grouping: every image is its own group;
* ``--group-regex``: the first match of the regex in the file name (e.g. a subject id ``S\\d+``);
* ``--near-dup``: images whose 64-bit perceptual hashes differ in at most ``--hamming`` bits.

Groups combine as connected components of a graph whose edges are "same regex key" and "near-duplicate".
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from tqdm import tqdm

from foldkit.cli import add_path_args, run, setup_logging
from foldkit.data import INDEX_COLUMNS, DataError, read_trainval, survey_images
from foldkit.io import FoldkitError, atomic_write_text

logger = logging.getLogger(__name__)

FOLD_COLUMNS = [*INDEX_COLUMNS, "group", "fold"]
#: Settings recorded in folds.json; a change in any of them means the folds must be rebuilt.
SETTING_KEYS = ("k", "seed", "group_regex", "near_dup", "hamming")

# sklearn's StratifiedGroupKFold assigns groups one at a time in Python (~0.15 ms per group, so 320,000
# groups take most of a minute). Above this many groups, small single-label groups are packed into
# bundles first (see _bundle_groups); bundling only ever adds constraints, so it cannot cause a leak.
_MAX_SGKF_GROUPS = 10_000
# Near-duplicate search warns when one hash-chunk bucket is this large: its cost grows with its square.
_GIANT_BUCKET = 20_000


def folds_dir(work_dir: Path) -> Path:
    """``<work-dir>/folds``: where folds.csv and folds.json live."""
    return Path(work_dir) / "folds"


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------


def _regex_keys(names: pd.Series, group_regex: str) -> np.ndarray:
    """First regex match in each name (object array, ``None`` where there is no or an empty match)."""
    try:
        pattern = re.compile(group_regex)
    except re.error as exc:
        raise FoldkitError(f"--group-regex {group_regex!r} is not a valid regular expression: {exc}") from exc
    keys = np.array([m.group(0) if (m := pattern.search(n)) else None for n in names.tolist()], dtype=object)
    keys[keys == ""] = None  # an empty match (e.g. 'S\d*') would lump unrelated names into one group
    unmatched = np.flatnonzero(pd.isna(keys))
    if len(unmatched):
        logger.warning(
            "%d of %d names do not match --group-regex %r; each of them is its own group (e.g. %s)",
            len(unmatched), len(keys), group_regex, names.iloc[unmatched[0]],
        )  # fmt: skip
    return keys


def _star_edges(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each row with code >= 0 to the first row of its code (a star per code)."""
    rows = np.flatnonzero(codes >= 0)
    _, first = np.unique(codes[rows], return_index=True)
    anchor = rows[first]  # anchor[c]: first row of code c (codes come from pd.factorize: 0..C-1)
    return rows, anchor[codes[rows]]


def _phash_one(path: str) -> tuple[int | None, str | None]:
    """64-bit perceptual hash of one image, or the error; module-level so worker processes can run it."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(str(imagehash.phash(im, hash_size=8)), 16), None
    except (OSError, ValueError) as exc:
        return None, f"{path}: cannot read image for hashing ({exc})"


def phash_images(paths: Sequence[str], workers: int | None = None) -> np.ndarray:
    """Perceptual hashes (uint64) of ``paths``, in parallel processes with a progress bar."""
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(paths), desc="phash", unit="img", disable=len(paths) < 1000)
    results: list[tuple[int | None, str | None]] = []
    if workers == 1 or len(paths) < 256:
        for path in paths:
            results.append(_phash_one(path))
            bar.update()
    else:
        with multiprocessing.Pool(workers) as pool:
            for res in pool.imap(_phash_one, paths, chunksize=64):
                results.append(res)
                bar.update()
    bar.close()
    errors = [err for _, err in results if err is not None]
    if errors:
        raise DataError(errors)
    return np.array([h for h, _ in results], dtype=np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64; ``np.bitwise_count`` needs numpy >= 2, else a byte lookup table."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(-1, 8).sum(axis=1)


def _chunks(n_chunks: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of ``n_chunks`` near-equal bit fields covering 64 bits."""
    widths = [64 // n_chunks + (i < 64 % n_chunks) for i in range(n_chunks)]
    shifts = np.concatenate(([0], np.cumsum(widths)[:-1]))
    return [(int(s), w) for s, w in zip(shifts, widths, strict=True)]


def near_dup_pairs(hashes: np.ndarray, hamming: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(a, b)`` of ``hashes`` within ``hamming`` bits of each other (a pair may repeat).

    All-pairs comparison is O(n^2) (5e10 pairs for 320,000 images). Multi-index hashing instead: cut
    the 64 bits into hamming+1 chunks; two hashes within distance d differ in at most d chunks, so by
    pigeonhole they agree exactly on at least one. Only hashes sharing a chunk value (a bucket) are
    compared. Within a sorted bucket, row i is compared with row i+t for t = 1, 2, ... in vectorised
    passes, so the cost is the number of in-bucket pairs, not a Python loop per pair.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    found_a: list[np.ndarray] = [np.empty(0, np.int64)]
    found_b: list[np.ndarray] = [np.empty(0, np.int64)]
    for shift, width in _chunks(hamming + 1) if n > 1 else []:
        key = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[order])) + 1
        sizes = np.diff(np.concatenate(([0], bounds, [n])))
        if sizes.max() > _GIANT_BUCKET:
            logger.warning(
                "near-dup search: %d hashes share bits %d-%d; comparing all %.1e pairs in that bucket "
                "(slow; many low-detail images?)", sizes.max(), shift, shift + width - 1,
                sizes.max() ** 2 / 2,
            )  # fmt: skip
        remaining = np.repeat(np.cumsum(sizes), sizes) - np.arange(n) - 1  # later rows in own bucket
        by_rem = np.argsort(-remaining, kind="stable")
        neg_rem = -remaining[by_rem]  # ascending
        sorted_hashes = hashes[order]
        for t in range(1, int(-neg_rem[0]) + 1):
            pos = by_rem[: np.searchsorted(neg_rem, -t, side="right")]  # rows with >= t later rows
            close = _popcount(sorted_hashes[pos] ^ sorted_hashes[pos + t]) <= hamming
            found_a.append(order[pos[close]])
            found_b.append(order[pos[close] + t])
    return np.concatenate(found_a), np.concatenate(found_b)


def _near_dup_edges(hashes: np.ndarray, hamming: int) -> tuple[np.ndarray, np.ndarray]:
    """Graph edges between rows whose hashes are within ``hamming`` bits.

    Identical hashes are joined first (a star per value), so the pair search runs on unique values
    only; a face saved many times then cannot blow up a bucket.
    """
    codes, uniques = pd.factorize(hashes)
    rows, anchors = _star_edges(codes)
    ua, ub = near_dup_pairs(np.asarray(uniques, dtype=np.uint64), hamming)
    first = np.unique(codes, return_index=True)[1]  # first row holding each unique hash
    logger.info(
        "near-dup: %d exact duplicate images, %d near pairs within %d bits",
        len(codes) - len(uniques), len(ua), hamming,
    )  # fmt: skip
    return np.concatenate([rows, first[ua]]), np.concatenate([anchors, first[ub]])


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
    hamming: int = 6,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(component number, group id)`` per row: connected components of regex and near-dup edges."""
    n = len(index)
    if not group_regex and not near_dup:
        return np.arange(n), np.array([f"g{i}" for i in range(n)], dtype=object)
    edges_a: list[np.ndarray] = []
    edges_b: list[np.ndarray] = []
    keys = None
    if group_regex:
        keys = _regex_keys(index["name"], group_regex)
        a, b = _star_edges(pd.factorize(keys)[0])  # unmatched names (None) get code -1: no edge
        edges_a.append(a)
        edges_b.append(b)
    if near_dup:
        hashes = phash_images([str(Path(data_dir) / p) for p in index["path"]], workers)
        a, b = _near_dup_edges(hashes, hamming)
        edges_a.append(a)
        edges_b.append(b)
    a, b = np.concatenate(edges_a), np.concatenate(edges_b)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, components = connected_components(graph, directed=False)
    return components, _group_ids(components, keys)


# --------------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------------


def _bundle_groups(labels: np.ndarray, components: np.ndarray, seed: int) -> np.ndarray:
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
    target = max(int(np.ceil(size[pure >= 0].sum() / budget)), 1)
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
        groups = components if n_groups <= _MAX_SGKF_GROUPS else _bundle_groups(labels, components, seed)
    folds = np.full(n, -1, dtype=np.int64)
    try:
        for fold, (_, test) in enumerate(splitter.split(np.zeros((n, 1)), labels, groups)):
            folds[test] = fold
    except ValueError as exc:
        raise FoldkitError(f"cannot make {k} folds from {n} images in {n_groups} groups: {exc}") from exc
    return folds


def _check_settings(index: pd.DataFrame, k: int, hamming: int) -> None:
    """Reject settings and indexes that cannot give valid folds, before any slow work."""
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise FoldkitError(f"the index lacks columns {missing}; expected {INDEX_COLUMNS}")
    if k < 2:
        raise FoldkitError(f"--k must be at least 2, got {k}")
    if not 0 <= hamming < 32:
        raise FoldkitError(f"--hamming must be in 0..31 (bits of a 64-bit hash), got {hamming}")
    bad = ~index["label"].isin([0, 1])
    if bad.any():
        raise FoldkitError(
            f"{int(bad.sum())} rows have a label other than 0/1 (e.g. {index['name'][bad].iloc[0]})"
        )


def make_folds(
    index: pd.DataFrame,
    data_dir: Path,
    k: int = 5,
    seed: int = 42,
    group_regex: str | None = None,
    near_dup: bool = False,
    hamming: int = 6,
    workers: int | None = None,
) -> pd.DataFrame:
    """The index plus ``group`` and ``fold``: stratified by label, every group inside one fold."""
    _check_settings(index, k, hamming)
    df = index[INDEX_COLUMNS].reset_index(drop=True)
    df = df.assign(label=df["label"].astype(np.int64))
    components, ids = build_groups(df, data_dir, group_regex, near_dup, hamming, workers)
    df["group"] = pd.Series(ids, dtype=str)
    df["fold"] = _assign_folds(df["label"].to_numpy(), components, k, seed)
    sizes = np.bincount(components)
    logger.info(
        "%d groups for %d images (%d with more than one image, largest %d)",
        len(sizes), len(df), int((sizes > 1).sum()), int(sizes.max(initial=0)),
    )  # fmt: skip
    if sizes.max(initial=0) > len(df) / k / 2:
        logger.warning(
            "the largest group holds %d images, over half a fold; folds may be uneven", sizes.max()
        )
    assert_no_leak(df)
    return df


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


def write_folds(df: pd.DataFrame, work_dir: Path, meta: dict) -> dict:
    """Check for leaks, then atomically write folds.csv and folds.json; return the json's content.

    No timestamps or paths outside the data folder go in, so the same input gives the same bytes.
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
    full.update(n=len(df), data_hash=index_hash(df), hash=_sha256(text.encode("utf-8")))
    out = folds_dir(work_dir)
    atomic_write_text(out / "folds.csv", text)  # csv first: a stale json then fails the hash check
    atomic_write_text(out / "folds.json", json.dumps(full, indent=2) + "\n")
    return full


def _read_verified(work_dir: Path) -> tuple[bytes, dict]:
    """folds.csv bytes and folds.json, checked against each other (a half-finished write fails here)."""
    csv_path, json_path = folds_dir(work_dir) / "folds.csv", folds_dir(work_dir) / "folds.json"
    for path in (json_path, csv_path):
        if not path.is_file():
            raise FoldkitError(
                f"{path} not found; make folds first: python -m foldkit.folds --work-dir {work_dir}"
            )
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FoldkitError(f"{json_path} is unreadable ({exc}); rebuild with --force") from exc
    raw = csv_path.read_bytes()
    if not isinstance(meta, dict) or meta.get("hash") != _sha256(raw):
        raise FoldkitError(f"{csv_path} does not match the hash in {json_path}; rebuild with --force")
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
        return str(exc).split(";")[0]
    keys = [key for key in SETTING_KEYS if key != "hamming" or settings["near_dup"]]
    changed = [
        f"{key} {meta.get(key)!r} -> {settings[key]!r}" for key in keys if meta.get(key) != settings[key]
    ]
    if changed:
        return "settings changed: " + ", ".join(changed)
    if meta.get("data_hash") != data_hash:
        return "the data changed since the folds were made (train/validate names, files or labels)"
    return None


def ensure_folds(
    data_dir: Path,
    work_dir: Path,
    k: int = 5,
    seed: int = 42,
    group_regex: str | None = None,
    near_dup: bool = False,
    hamming: int = 6,
    *,
    force: bool = False,
    workers: int | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Reuse folds made with the same settings on the same data, else rebuild and write them.

    Every model of the ensemble must see the same folds, so they are made once and only remade when
    the settings or the data index change.
    """
    settings = {
        "k": k,
        "seed": seed,
        "group_regex": group_regex or None,
        "near_dup": near_dup,
        "hamming": hamming,
    }
    index = read_trainval(Path(data_dir))
    reason = "--force" if force else _stale_reason(Path(work_dir), settings, index_hash(index))
    if reason is None:
        df, meta = load_folds(Path(work_dir))
        logger.info(
            "reusing %s: same settings and data (folds hash %s)", folds_dir(work_dir), meta["hash"][:12]
        )
        return df, meta
    logger.info("building folds in %s: %s", folds_dir(work_dir), reason)
    survey_images(Path(data_dir), index)
    df = make_folds(index, Path(data_dir), workers=workers, **settings)
    meta = write_folds(df, Path(work_dir), settings)
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


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m foldkit.folds", description=__doc__.split("\n")[0])
    add_path_args(parser)
    parser.add_argument("--k", type=int, default=5, help="number of folds")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--group-regex", default=None, help=r"group key: first match in the name, e.g. 'S\d+'"
    )
    parser.add_argument("--near-dup", action="store_true", help="also group near-duplicate images (phash)")
    parser.add_argument("--hamming", type=int, default=6, help="max differing phash bits of near-duplicates")
    parser.add_argument("--workers", type=int, default=None, help="hashing processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folds are up to date")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = _parse_args(argv)
    setup_logging(args.verbose)
    df, meta = ensure_folds(
        args.data_dir, args.work_dir, k=args.k, seed=args.seed, group_regex=args.group_regex,
        near_dup=args.near_dup, hamming=args.hamming, force=args.force, workers=args.workers,
    )  # fmt: skip
    print(format_fold_table(df))
    print(f"folds: {folds_dir(args.work_dir) / 'folds.csv'} (hash {meta['hash']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, with nothing written)."""
    return run(_main, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
