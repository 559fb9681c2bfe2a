"""Near-duplicate images: fingerprints, the pHash pair search, the pixel check and the capped merge.

Why a module of its own: the fold builder (``foldkit.folds``) only needs "which rows belong together";
how copies are found and when a link is trusted is a policy with its own measurements
(docs/DESIGN-notes.md, "Near-duplicate policy"). In short:

* identical decoded pixels always join, even across two regex keys (a certain leak; logged by name);
* pHashes within ``hamming`` bits are only candidates; one joins when the 16x16 grey thumbnails
  correlate at least ``near_dup_min_corr``;
* checked links merge strongest first (a union-find), never between two groups that both hold a regex
  key (the names are the authority on identity) and never into more than ``near_dup_max_group`` images
  without a key (no unbounded chains); refused links are counted and logged with example name pairs.

One decode per image gives the pHash, the pixel hash and the thumbnail, in one parallel pass.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from foldkit.data import DataError, to_rgb
from foldkit.io import listed

logger = logging.getLogger("foldkit.neardup")
#: Side of the grey thumbnail of the pixel check: 256 bytes an image (82 MB at 320,000 images). On the
#: synthetic faces, JPEG q60 + noise copies correlate >= 0.993 at 16 px, distinct aligned faces <= 0.982.
THUMB_SIDE = 16
# Near-duplicate search warns when one hash-chunk bucket is this large: its cost grows with its square.
_GIANT_BUCKET = 20_000
_N_EXAMPLES = 3  # example name pairs shown in logs and errors


# --------------------------------------------------------------------------------------------------
# Graph helpers (also the regex groups of foldkit.folds use them)
# --------------------------------------------------------------------------------------------------


def star_edges(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each row with code >= 0 to the first row of its code (a star per code)."""
    rows = np.flatnonzero(codes >= 0)
    _, first = np.unique(codes[rows], return_index=True)
    anchor = rows[first]  # anchor[c]: first row of code c (codes come from pd.factorize: 0..C-1)
    return rows, anchor[codes[rows]]


def graph_components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected component per row of the undirected graph with ``edges`` (numbered by first row)."""
    a = np.concatenate([np.empty(0, np.int64), *(e[0] for e in edges)])
    b = np.concatenate([np.empty(0, np.int64), *(e[1] for e in edges)])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


# --------------------------------------------------------------------------------------------------
# Image fingerprints and the pHash pair search
# --------------------------------------------------------------------------------------------------


#: A grey 16x16 thumbnail whose values span at most this many levels (of 0..255) is a blank image (a
#: black or grey failed crop, JPEG noise and all: the box downscale averages the noise away), not a
#: face: the synthetic faces darkened to a tenth of their brightness still span more (a test checks both).
BLANK_RANGE = 3


class Fingerprints(NamedTuple):
    """What the near-duplicate policy needs of each image, computed in one parallel pass over the files."""

    phash: np.ndarray  # uint64 64-bit perceptual hash: finds candidate pairs fast, but is fuzzy
    pixels: np.ndarray  # uint64 hash of the decoded RGB array: equal means a certain duplicate
    thumbs: np.ndarray  # (n, THUMB_SIDE**2) uint8 grey thumbnails: the pixel check of candidates


def _fingerprint_one(path: str) -> tuple[tuple[int, int, bytes] | None, str | None]:
    """Fingerprint of one image, or the error; module-level so worker processes can run it."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = to_rgb(im)  # the store's own decoding (16-bit grey scaled, not clipped to white)
        rgb = Image.fromarray(arr)
        pixels = hashlib.blake2b(repr(arr.shape).encode() + arr.tobytes(), digest_size=8).digest()
        grey = rgb.convert("L")
        phash = int(str(imagehash.phash(grey, hash_size=8)), 16)
        thumb = grey.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX).tobytes()
        return (phash, int.from_bytes(pixels, "little"), thumb), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's "bad file"
        return None, f"{path}: cannot read image for hashing ({exc})"


def fingerprint_images(paths: Sequence[str], workers: int | None = None) -> Fingerprints:
    """pHash, pixel hash and thumbnail of every path, in parallel processes with a progress bar."""
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(paths), desc="fingerprint", unit="img", disable=len(paths) < 1000)
    results: list[tuple[tuple[int, int, bytes] | None, str | None]] = []
    if workers == 1 or len(paths) < 256:
        for path in paths:
            results.append(_fingerprint_one(path))
            bar.update()
    else:
        with multiprocessing.Pool(workers) as pool:
            for res in pool.imap(_fingerprint_one, paths, chunksize=64):
                results.append(res)
                bar.update()
    bar.close()
    errors = [err for _, err in results if err is not None]
    if errors:
        raise DataError(errors)
    fps = [fp for fp, _ in results if fp is not None]
    thumbs = np.frombuffer(b"".join(t for _, _, t in fps), dtype=np.uint8).reshape(len(fps), THUMB_SIDE**2)
    return Fingerprints(
        np.array([p for p, _, _ in fps], dtype=np.uint64),
        np.array([x for _, x, _ in fps], dtype=np.uint64),
        thumbs,
    )


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
    """Distinct index pairs ``(a, b)``, ``a < b``, of ``hashes`` within ``hamming`` bits, each pair once.

    All-pairs comparison is O(n^2) (5e10 pairs for 320,000 images). Multi-index hashing instead: cut
    the 64 bits into hamming+1 chunks; two hashes within distance d differ in at most d chunks, so by
    pigeonhole they agree exactly on at least one. Only hashes sharing a chunk value (a bucket) are
    compared. Within a sorted bucket, row i is compared with row i+t for t = 1, 2, ... in vectorised
    passes, so the cost is the number of in-bucket pairs, not a Python loop per pair. A pair that agrees
    on several chunks is kept only in the first of them, so counts are counts of distinct pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    chunks = _chunks(hamming + 1)
    found_a: list[np.ndarray] = [np.empty(0, np.int64)]
    found_b: list[np.ndarray] = [np.empty(0, np.int64)]
    for c, (shift, width) in enumerate(chunks if n > 1 else []):
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
            xor = sorted_hashes[pos] ^ sorted_hashes[pos + t]
            close = _popcount(xor) <= hamming
            pos, xor = pos[close], xor[close]
            first = np.ones(len(pos), dtype=bool)
            for s, w in chunks[:c]:  # found already by an earlier chunk it also agrees on
                first &= ((xor >> np.uint64(s)) & np.uint64((1 << w) - 1)) != 0
            found_a.append(order[pos[first]])
            found_b.append(order[pos[first] + t])
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    return np.minimum(a, b), np.maximum(a, b)


def thumb_corr(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """Correlation (NCC) of the thumbnails of each pair ``(a[i], b[i])``; 0 where one is flat.

    Computed per candidate pair in vectorised chunks, from thumbnails made once per image.
    """
    out = np.zeros(len(a), dtype=np.float32)
    for s in range(0, len(a), chunk):
        x = thumbs[a[s : s + chunk]].astype(np.float32)
        y = thumbs[b[s : s + chunk]].astype(np.float32)
        x -= x.mean(axis=1, keepdims=True)
        y -= y.mean(axis=1, keepdims=True)
        den = np.sqrt(np.einsum("ij,ij->i", x, x) * np.einsum("ij,ij->i", y, y))
        num = np.einsum("ij,ij->i", x, y)
        out[s : s + chunk] = np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)
    return out


# --------------------------------------------------------------------------------------------------
# The near-duplicate policy
# --------------------------------------------------------------------------------------------------


@dataclass
class LinkReport:
    """What the duplicate links did, kept to log it and to explain a group that is too large."""

    pixel_codes: np.ndarray  # identical-pixel set of each row (equal code: identical decoded pixels)
    exact_bridges: list[tuple[int, int]] = field(default_factory=list)  # joined two regex keys anyway
    candidates: int = 0  # distinct pHash pairs within `hamming` bits
    checked: int = 0  # candidates still in two groups after the certain links: pixel-checked
    passed: int = 0  # candidates whose thumbnails correlate at least near_dup_min_corr
    joined: list[tuple[int, int, float]] = field(default_factory=list)  # fuzzy links that merged groups
    bridges: list[tuple[int, int, float]] = field(default_factory=list)  # refused: two regex groups
    capped: list[tuple[int, int, float]] = field(default_factory=list)  # refused: over the size cap
    blank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # near-blank rows: not linked

    @property
    def exact_copies(self) -> int:
        """Images whose pixels equal those of an earlier image."""
        return len(self.pixel_codes) - len(np.unique(self.pixel_codes))


def _pixel_sets(fp: Fingerprints) -> tuple[np.ndarray, np.ndarray]:
    """Identical-pixel set of each row, and the rows of near-blank images (grey thumbnail range at
    most ``BLANK_RANGE``). Each blank image is a set of its own, and ``link_groups`` leaves them out of
    the pHash search too: identical or near-identical black crops (failed face detections) say nothing
    about identity, and joined they merged unrelated subjects into one group (or one too large)."""
    codes = pd.factorize(fp.pixels)[0]
    if len(codes):
        span = fp.thumbs.max(axis=1).astype(np.int16) - fp.thumbs.min(axis=1).astype(np.int16)
        blank = np.flatnonzero(span <= BLANK_RANGE)
    else:
        blank = np.zeros(0, np.int64)
    if len(blank) > 1:
        codes = codes.copy()
        codes[blank] = codes.max() + 1 + np.arange(len(blank))
        codes = pd.factorize(codes)[0]  # 0..sets-1 again
    return codes, blank


def _exact_bridges(pixel_codes: np.ndarray, key_codes: np.ndarray) -> list[tuple[int, int]]:
    """One ``(row, row)`` pair per extra regex key inside an identical-pixel set (a copy under two ids)."""
    rows = np.flatnonzero(key_codes >= 0)
    firsts = pd.DataFrame({"pix": pixel_codes[rows], "key": key_codes[rows], "row": rows})
    firsts = firsts.drop_duplicates(["pix", "key"])
    anchor = firsts.groupby("pix")["row"].transform("first")
    extra = firsts["row"] != anchor
    return list(zip(anchor[extra].tolist(), firsts["row"][extra].tolist(), strict=True))


def _merge_fuzzy(
    comp: np.ndarray,
    key_codes: np.ndarray,
    links: tuple[np.ndarray, np.ndarray, np.ndarray],
    max_group: int,
    report: LinkReport,
) -> np.ndarray:
    """Union-find over the certain components, taking pixel-checked links strongest first.

    A link is refused (and recorded) when both sides hold a regex key (it would merge two identities)
    or when the images without a key it brings together would exceed ``max_group`` (no chaining).
    Those are counted on both sides, a subject's too: look-alikes attached to a subject one by one
    would otherwise chain without bound through it.
    """
    a, b, corr = links
    parent = list(range(int(comp.max(initial=-1)) + 1))
    size = np.bincount(comp, minlength=len(parent)).tolist()
    loose = np.bincount(comp[key_codes < 0], minlength=len(parent)).tolist()  # images without a key
    has_key = (np.bincount(comp[key_codes >= 0], minlength=len(parent)) > 0).tolist()

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in np.lexsort((b, a, -corr)).tolist():
        ra, rb = find(int(comp[a[i]])), find(int(comp[b[i]]))
        if ra == rb:
            continue
        link = (int(a[i]), int(b[i]), float(corr[i]))
        if has_key[ra] and has_key[rb]:
            report.bridges.append(link)
            continue
        if loose[ra] + loose[rb] > max_group:
            report.capped.append(link)
            continue
        if size[ra] < size[rb]:
            ra, rb = rb, ra
        parent[rb] = ra
        size[ra] += size[rb]
        loose[ra] += loose[rb]
        has_key[ra] = has_key[ra] or has_key[rb]
        report.joined.append(link)
    roots = np.array([find(c) for c in range(len(parent))], dtype=np.int64)
    return roots[comp]


def link_groups(
    key_codes: np.ndarray, fp: Fingerprints, hamming: int, min_corr: float, max_group: int
) -> tuple[np.ndarray, LinkReport]:
    """Component per row under the near-duplicate policy (docs/DESIGN-notes.md), and what it did.

    ``key_codes``: regex key code per row (-1: none). Certain links first (same regex key, identical
    pixels), as connected components; then pHash candidates between different components, pixel-checked
    in one vectorised pass, and merged by ``_merge_fuzzy`` under its two refusals.
    """
    n = len(key_codes)
    pixel_codes, blank = _pixel_sets(fp)
    report = LinkReport(pixel_codes, _exact_bridges(pixel_codes, key_codes), blank=blank)
    comp = graph_components(n, [star_edges(key_codes), star_edges(pixel_codes)])
    reps = np.unique(pixel_codes, return_index=True)[1]  # one row per identical-pixel set
    reps = np.setdiff1d(reps, blank)  # a near-blank image is linked to nothing, fuzzily neither
    ua, ub = near_dup_pairs(fp.phash[reps], hamming)
    a, b = reps[ua], reps[ub]
    report.candidates = len(a)
    apart = comp[a] != comp[b]
    a, b = a[apart], b[apart]
    report.checked = len(a)
    corr = thumb_corr(fp.thumbs, a, b)
    ok = corr >= np.float32(min_corr)
    report.passed = int(ok.sum())
    comp = _merge_fuzzy(comp, key_codes, (a[ok], b[ok], corr[ok]), max_group, report)
    return pd.factorize(comp)[0], report


def pair_text(names: np.ndarray, keys: np.ndarray | None, pairs: Sequence[tuple], sep: str = "~") -> str:
    """A few ``a ~ b (S1 / S2, r=0.9950)`` examples of links, and how many more there are."""
    shown = []
    for pair in pairs[:_N_EXAMPLES]:
        a, b = pair[0], pair[1]
        extra = [f"{keys[a] or '-'} / {keys[b] or '-'}"] if keys is not None else []
        extra += [f"r={pair[2]:.4f}"] if len(pair) > 2 else []
        shown.append(f"{names[a]} {sep} {names[b]}" + (f" ({', '.join(extra)})" if extra else ""))
    more = f" and {len(pairs) - _N_EXAMPLES} more" if len(pairs) > _N_EXAMPLES else ""
    return "; ".join(shown) + more


def log_links(
    report: LinkReport, names: np.ndarray, keys: np.ndarray | None, hamming: int, min_corr: float, cap: int
) -> None:
    """Log what the duplicate links did (distinct pairs), with example name pairs for every refused kind."""
    logger.info("near-dup: %d images are pixel-identical copies of another", report.exact_copies)
    if len(report.blank):
        logger.warning(
            "near-dup: %d near-blank image(s) (failed crops?) are linked to nothing, identical or not: %s",
            len(report.blank), ", ".join(listed(names[report.blank].tolist(), 5)),
        )  # fmt: skip
    if report.exact_bridges:  # a copy filed under two subjects: a leak fixed by merging, or a blank crop
        logger.warning(
            "near-dup: %d pixel-identical copies join two regex groups, which are merged (a copy under "
            "another subject's id, or blank/failed crops that look alike): %s",
            len(report.exact_bridges), pair_text(names, keys, report.exact_bridges, "="),
        )  # fmt: skip
    logger.info(
        "near-dup: %d distinct pHash pairs within %d bits; %d of them in two groups were pixel-checked, "
        "%d pass (thumbnail r >= %.3g), %d joined groups",
        report.candidates, hamming, report.checked, report.passed, min_corr, len(report.joined),
    )  # fmt: skip
    if report.bridges:
        logger.warning(
            "near-dup: %d pixel-checked links would bridge two regex groups and were NOT merged "
            "(the regex says they are different subjects): %s",
            len(report.bridges), pair_text(names, keys, report.bridges),
        )  # fmt: skip
    if report.capped:
        logger.warning(
            "near-dup: %d links refused: they would make a group of over %d images without a regex key "
            "(near_dup_max_group): %s",
            len(report.capped), cap, pair_text(names, keys, report.capped),
        )  # fmt: skip
