"""The decoded-image store: every image decoded once into a uint8 memmap, reused by every run.

    python -m foldkit.store --data-dir data --work-dir . --img-size 112

Decoding a PNG costs more than augmenting it, and a K-fold ensemble reads every image
``folds x backbones x epochs`` times. The store decodes each image once, in parallel, into
``<work-dir>/store/<split>-<H>x<W>/images.u8``: a raw ``(N, H, W, 3)`` uint8 array that workers read
through ``np.memmap`` (the page cache shares it between processes, nothing is copied up front).

Files of one store (written to temporary names, then moved into place; ``store.json`` last)::

    images.u8     N*H*W*3 bytes, row i = the i-th path of index.csv, RGB
    index.csv     path (relative to the data folder), one per row
    store.json    n, height, width, key, build time

The ``key`` hashes every image's path (in order) with its size and modification time, plus the
store's pixel size: an added, removed, renamed or rewritten image, or another size rebuilds the store;
anything else (a changed label, which the pixels do not depend on; ``chmod``; a copy keeping mtimes)
reuses it. Images of another size than the store's are resized on the way in (area when shrinking,
linear when enlarging, as the device-side resize does).

One build at a time: a build holds ``<store>/.lock`` (``flock``), a second run waits for it and then
reuses its result. A process keeps reading the very file it opened (its memory map) even if another
run rebuilds the store meanwhile (the data changed); a worker that has to map the file anew (spawn
start method) and finds another file there stops with an error instead of reading shifted rows.

A truncated, empty or undecodable image, or one with an absurd size, stops the build with every such
file named with its label-file line (exit status 2), before any training starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from foldkit.cli import HelpFormatter, add_path_args, run, setup_logging
from foldkit.data import DataError, files_hash, label_file, read_test, read_trainval, to_rgb
from foldkit.io import FoldkitError, atomic_path, atomic_write_text, try_flock

log = logging.getLogger("foldkit.store")  # not __name__: "__main__" under python -m

STORE_VERSION = 2  # 2: the key leaves the label files out
#: A side longer than this is not a face crop: a corrupt header or a wrong file in the folder.
MAX_SIDE = 4096
#: Label given to a test image that cannot be decoded (``data.on_bad_image: skip``): "real", the
#: cautious answer when F1 is scored on the fake class.
BAD_IMAGE_LABEL = 0
_CHUNK = 256  # images per worker task: small enough for a smooth progress bar, large enough to amortise IPC
_SKIP_HINT = (
    "(to go on without them: main.py --set data.on_bad_image=skip leaves them out of training, and "
    "python -m foldkit.store --on-bad-image skip records them in the store; "
    "ensemble.py --on-bad-image skip, or main.py --mode test --on-bad-image skip, predicts test ones 0, "
    "the fallback)"
)


def resolve_workers(workers: int | None) -> int:
    """``None`` means one process per CPU core this process may use (loader workers, store build)."""
    if workers is not None:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def opencv_for_workers() -> None:
    """Run OpenCV sequentially, in this process and in the worker processes it forks next (DataLoader
    workers, the store pool). The workers already fill the cores; OpenCV's own pool would add one
    thread per core in every worker (256 threads for 16 workers on 16 cores), all competing with the
    thread that launches the GPU's work. Albumentations' performance guide gives the same rule. Set
    here, before the fork, not inside each worker: reconfiguring OpenCV's thread pool in a forked
    child deadlocked once here (docs/DESIGN-notes.md). Results do not change, only threads."""
    cv2.setNumThreads(0)


def opencv_in_worker(*_: object) -> None:
    """DataLoader ``worker_init_fn``: a worker started by spawn or forkserver (macOS; Linux from
    Python 3.14) did not inherit ``opencv_for_workers``' setting and gets it here, in a fresh
    process where that is safe. A forked worker inherited it (one thread) and is left alone."""
    if cv2.getNumThreads() > 1:
        cv2.setNumThreads(0)


def store_dir(work_dir: Path, split: str, size: tuple[int, int]) -> Path:
    """``<work-dir>/store/<split>-<H>x<W>``: one store per split group and pixel size."""
    return Path(work_dir) / "store" / f"{split}-{size[0]}x{size[1]}"


# --------------------------------------------------------------------------------------------------
# Decoding one image (also the file-based path when the store is off)
# --------------------------------------------------------------------------------------------------


def decode_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Fully decode one image as HxWx3 uint8 RGB; raise ``ValueError`` saying what is wrong with it.

    ``Image.load()`` forces the whole file to be read, so a truncated PNG fails here (PIL's
    LOAD_TRUNCATED_IMAGES stays off) instead of silently yielding a half-grey face.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
            if max(w, h) > MAX_SIDE or min(w, h) < 1:
                raise ValueError(f"absurd image size {w}x{h} (a side over {MAX_SIDE} px)")
            im.load()
            return to_rgb(im)
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's ways of saying "bad file"
        raise ValueError(f"cannot decode image: {exc}") from exc


def fit_size(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` at ``size`` (H, W): area averaging when shrinking, linear when enlarging."""
    h, w = image.shape[:2]
    if (h, w) == tuple(size):
        return image
    shrink = size[0] * size[1] < h * w
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (size[1], size[0]), interpolation=interp)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(data_path: str | None, root: str, size: tuple[int, int]) -> None:
    """``data_path`` None: decode only (the full check when there is no store)."""
    fd = None if data_path is None else os.open(data_path, os.O_WRONLY)
    _worker_state.update(fd=fd, root=root, size=size)


def _decode_rows(task: tuple[int, list[str]]) -> list[tuple[int, str]]:
    """Decode a chunk of images and write each at its row's offset; return ``(row, problem)`` pairs.

    ``os.pwrite`` rather than a writable memmap: the worker holds one image at a time, so memory stays
    flat however large the store is.
    """
    start, paths = task
    size = _worker_state["size"]
    row_bytes = size[0] * size[1] * 3
    problems = []
    for offset, rel in enumerate(paths):
        try:
            image = np.ascontiguousarray(fit_size(decode_image(Path(_worker_state["root"]) / rel), size))
        except ValueError as exc:
            problems.append((start + offset, str(exc)))
            continue
        if _worker_state["fd"] is not None:
            os.pwrite(_worker_state["fd"], image.tobytes(), (start + offset) * row_bytes)
    return problems


def _fill(
    data_path: Path | None,
    data_dir: Path,
    paths: Sequence[str],
    size: tuple[int, int],
    workers: int,
    desc: str,
) -> list[tuple[int, str]]:
    """Decode ``paths`` into the preallocated file at ``data_path`` (None: decode only) with
    ``workers`` processes; the ``(row, problem)`` of every image that could not be decoded."""
    tasks = [(i, list(paths[i : i + _CHUNK])) for i in range(0, len(paths), _CHUNK)]
    init = (None if data_path is None else str(data_path), str(data_dir), size)
    problems: list[tuple[int, str]] = []
    bar = tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True, disable=len(paths) < 2000)
    if workers <= 1 or len(tasks) == 1:
        _init_worker(*init)
        try:
            for task in tasks:
                problems += _decode_rows(task)
                bar.update(len(task[1]))
        finally:
            if (fd := _worker_state.pop("fd")) is not None:
                os.close(fd)
    else:
        opencv_for_workers()
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, init) as pool:
            for task, found in zip(tasks, pool.imap(_decode_rows, tasks), strict=True):
                problems += found
                bar.update(len(task[1]))
    bar.close()
    return problems


def label_lines(data_dir: Path, phase: str) -> dict[str, int]:
    """Name -> line number in the split's label file (for error messages only)."""
    path = label_file(data_dir, phase)
    lines: dict[str, int] = {}
    if path.is_file():
        for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):  # as data.py
            fields = raw.split()
            if fields:
                lines.setdefault(fields[0], lineno)
    return lines


def describe_bad(data_dir: Path, index: pd.DataFrame, problems: Sequence[tuple[int, str]]) -> list[str]:
    """``data/train/x.png (train/train_label.txt:12): problem`` for each bad row."""
    lines = {phase: label_lines(data_dir, phase) for phase in index["source"].unique()}
    out = []
    for row, problem in problems:
        name, rel, phase = index["name"].iat[row], index["path"].iat[row], index["source"].iat[row]
        where = (
            f"{label_file(data_dir, phase)}:{lines[phase][name]}"
            if name in lines[phase]
            else f"found in the folder: no line in {label_file(data_dir, phase)}"
        )
        out.append(f"{Path(data_dir) / rel} ({where}): {problem}")
    return out


def store_key(data_dir: Path, index: pd.DataFrame, size: tuple[int, int]) -> str:
    """``files_hash`` of the images in index order, salted with the store's version and pixel size.
    The label files are left out: the store holds pixels, and a relabel must not re-decode 400,000
    images."""
    return files_hash(
        data_dir, index["path"].tolist(), f"foldkit-store-v{STORE_VERSION} {size[0]}x{size[1]}\n"
    )


def native_size(data_dir: Path, index: pd.DataFrame, sample: int = 200) -> tuple[int, int]:
    """The most common (H, W) among up to ``sample`` evenly spaced images (headers only)."""
    rows = np.unique(np.linspace(0, len(index) - 1, min(sample, len(index))).round().astype(np.int64))
    sizes: dict[tuple[int, int], int] = {}
    for rel in index["path"].to_numpy()[rows]:
        try:
            with Image.open(Path(data_dir) / rel) as im:
                w, h = im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # the build names it with its label-file line
        if 0 < max(w, h) <= MAX_SIDE:
            sizes[(h, w)] = sizes.get((h, w), 0) + 1
    if not sizes:
        raise FoldkitError(f"none of {len(rows)} sampled images under {data_dir} could be opened")
    return max(sizes, key=lambda s: (sizes[s], s))


@dataclass
class Store:
    """An opened store: its folder, metadata, the row of each image path, and its images mapped.

    ``images`` is the memory map of the ``images.u8`` file validated at opening and ``ident`` that
    file's (device, inode): every source of this store reads that very file, so a rebuild by another
    run (``os.replace``: a new inode; the old one lives on while mapped) cannot shift its rows.
    """

    path: Path
    meta: dict
    paths: list[str]
    images: np.ndarray = field(repr=False)
    ident: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.meta["n"], self.meta["height"], self.meta["width"], 3)

    @property
    def size(self) -> tuple[int, int]:
        return (self.meta["height"], self.meta["width"])

    @property
    def bad(self) -> set[str]:
        """Paths that could not be decoded (only with ``on_bad_image: skip``; their rows are black)."""
        return set(self.meta.get("bad", {}))

    def rows_of(self, paths: Sequence[str]) -> np.ndarray:
        """Store rows of ``paths`` (relative to the data folder); every path must be in the store."""
        where = {p: i for i, p in enumerate(self.paths)}
        missing = [p for p in paths if p not in where]
        if missing:
            raise FoldkitError(f"{len(missing)} images are not in the store {self.path} (e.g. {missing[0]})")
        return np.fromiter((where[p] for p in paths), dtype=np.int64, count=len(paths))

    def source(self, paths: Sequence[str]) -> StoreSource:
        """A source reading ``paths`` (in that order) from this store."""
        return StoreSource(self.path / "images.u8", self.shape, self.rows_of(paths), self.ident, self.images)


def _map(data_path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, int]]:
    """Memory-map ``data_path`` read-only; with the (device, inode) of the file actually mapped."""
    with open(data_path, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_size != int(np.prod(shape)):
            raise ValueError(f"{data_path}: {st.st_size} bytes, expected {int(np.prod(shape))}")
        return np.memmap(fh, dtype=np.uint8, mode="r", shape=shape), (st.st_dev, st.st_ino)


def _open(folder: Path) -> Store | None:
    """The store in ``folder`` if it is complete, else None. ``store.json`` is read before and after
    the index and the images: a build that replaced them in between changes it (or removes it)."""
    try:
        text = (folder / "store.json").read_text(encoding="utf-8")
        meta = json.loads(text)
        paths = pd.read_csv(folder / "index.csv", dtype={"path": str}, na_filter=False)["path"].tolist()
        if meta.get("n") != len(paths):
            return None
        images, ident = _map(folder / "images.u8", (len(paths), meta["height"], meta["width"], 3))
        if (folder / "store.json").read_text(encoding="utf-8") != text:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Store(folder, meta, paths, images, ident)


def _current(folder: Path, key: str, index: pd.DataFrame) -> Store | None:
    """The store in ``folder`` if it holds exactly ``index``'s images as they are now (``key``)."""
    store = _open(folder)
    if store is not None and store.meta.get("key") == key and store.paths == index["path"].tolist():
        return store
    return None


#: Without ``flock`` (Windows) a temporary file this long untouched belongs to no live build.
_ABANDONED_S = 600


@contextlib.contextmanager
def _build_lock(folder: Path, wait: bool = True) -> Iterator[bool | None]:
    """Hold ``<folder>/.lock`` (``flock``; the kernel drops it when the holder dies, even by SIGKILL):
    yields True once held; with ``wait=False`` yields False at once if another process holds it.
    Where ``fcntl`` is missing (Windows) nothing is locked: yields None.

    A failed build removes the lock file (``_remove_empty``) while others may wait on it: a lock won
    on a file no longer at ``.lock`` is no lock (a third run would lock the new file and build
    beside it), so the holder then tries again on the file that is there now."""
    try:
        import fcntl
    except ImportError:
        yield None
        return
    announced, tries = False, 0
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fh = open(folder / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 (closed by the with below)
        except (FileNotFoundError, FileExistsError) as exc:  # a failed build removed the folder meanwhile
            tries += 1
            if tries > 100:  # not a race: e.g. a file where the folder should be
                raise FoldkitError(f"cannot use {folder} for the image store: {exc}") from exc
            continue
        with fh:
            held = try_flock(fh, f"image store {folder}")
            if held is None:  # a file system without flock: as without fcntl
                yield None
                return
            if held is False:
                if not wait:
                    yield False
                    return
                if not announced:
                    log.info("waiting for another run that is building the image store %s", folder)
                    announced = True
                fcntl.flock(fh, fcntl.LOCK_EX)
            if _same_file(fh, folder / ".lock"):
                yield True  # the lock goes with the file's close
                return


def _same_file(fh: object, path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path`` (not removed, not replaced)."""
    try:
        here, there = os.fstat(fh.fileno()), os.stat(path)  # type: ignore[attr-defined]
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def ensure_store(
    data_dir: Path,
    work_dir: Path,
    index: pd.DataFrame,
    split: str,
    size: tuple[int, int] | None = None,
    workers: int | None = None,
    on_bad_image: str = "error",
) -> Store:
    """Open the store of ``index``'s images if it is current, else (re)build it; see the module doc."""
    size = tuple(size) if size else native_size(data_dir, index)
    folder = store_dir(work_dir, split, size)
    key = store_key(data_dir, index, size)
    store = _current(folder, key, index)
    if store is None:
        with _build_lock(folder) as locked:
            store = _current(folder, key, index)  # built by the run this one waited for?
            if store is None:
                reason = (
                    "none yet"
                    if not (folder / "index.csv").exists()
                    else "the data changed since it was built"
                )
                log.info(
                    "building the image store %s (%s): %d images at %dx%d", folder, reason, len(index), *size
                )
                try:
                    return _build(data_dir, folder, index, size, key, workers, on_bad_image, locked)
                except FoldkitError:  # bad images, a full disk: no output
                    _remove_empty(folder)
                    raise
    log.info("reusing the image store %s (%d images)", folder, store.meta["n"])
    with contextlib.suppress(OSError), _build_lock(folder, wait=False) as held:  # OSError: read-only
        if held is not False:  # no build runs: a temporary file here was left by one that was killed
            _remove_leftovers(folder, held)
    _refuse_recorded_bad(data_dir, index, store, on_bad_image)
    return store


def _refuse_recorded_bad(data_dir: Path, index: pd.DataFrame, store: Store, on_bad_image: str) -> None:
    """A store built with ``skip`` recorded its bad images; reused under ``error`` they must stop the
    run as a fresh build would, not be skipped because an earlier run was told to skip them."""
    if on_bad_image == "skip" or not store.bad:
        return
    recorded = store.meta["bad"]
    rows = [(i, f"{recorded[p]} (recorded when the store was built with skip)")
            for i, p in enumerate(store.paths) if p in recorded]  # fmt: skip
    raise DataError(describe_bad(data_dir, index, rows), _SKIP_HINT)


def _remove_leftovers(folder: Path, locked: bool | None) -> None:
    """Delete the temporary files of a build that was killed (SIGKILL, a lost machine): the images one
    is as large as the store (14 GiB at full size) and nothing else would ever remove it. Holding the
    build lock (``locked``), every one is dead: a build in progress holds the lock. Without ``flock``
    (None) only files untouched for ``_ABANDONED_S`` are (a build writes continuously)."""
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if locked or time.time() - tmp.stat().st_mtime > _ABANDONED_S:
                log.info("removing %s, left by a build that did not finish", tmp)
                tmp.unlink()


def _remove_empty(folder: Path) -> None:
    """After a failed build (bad images) only the lock is left: remove it and the folders it leaves
    empty, so bad input leaves no output. Done holding the lock; a run waiting on it then finds no
    store and tries (and fails) the same way."""
    if {p.name for p in folder.iterdir()} <= {".lock"}:
        with contextlib.suppress(OSError):
            (folder / ".lock").unlink(missing_ok=True)
            folder.rmdir()
            folder.parent.rmdir()


def _check_space(folder: Path, n_bytes: int) -> None:
    """Refuse a build the disk cannot hold, before decoding for minutes and failing at the end."""
    free = shutil.disk_usage(folder).free
    if free < n_bytes:
        raise FoldkitError(
            f"the image store needs {n_bytes / 2**30:.2f} GiB in {folder}, but only {free / 2**30:.2f} GiB "
            "are free: free some space, use a --work-dir on a larger disk, or set data.cache=false (images "
            "are then decoded on every read: slower)"
        )


def _build(
    data_dir: Path,
    folder: Path,
    index: pd.DataFrame,
    size: tuple[int, int],
    key: str,
    workers: int | None,
    on_bad_image: str,
    locked: bool | None = True,
) -> Store:
    """Decode everything into a temporary file, then move the files into place (store.json last).
    Called holding the build lock. The old files go first: they are invalid from here on (a process
    reading them keeps its map), and a failed or full-disk build must not leave them, or need 3x."""
    folder.mkdir(parents=True, exist_ok=True)  # a failed build before may have removed it (_remove_empty)
    (folder / "store.json").unlink(missing_ok=True)  # a half-replaced store must never look current
    for old in ("images.u8", "index.csv"):
        (folder / old).unlink(missing_ok=True)
    _remove_leftovers(folder, locked)
    n_bytes = len(index) * size[0] * size[1] * 3
    _check_space(folder, n_bytes)
    workers = max(1, resolve_workers(workers or None))  # 0, like None: every core
    start = time.perf_counter()
    with atomic_path(folder / "images.u8") as tmp:
        with open(tmp, "wb") as fh:
            fh.truncate(n_bytes)  # sparse until written
        problems = _fill(tmp, data_dir, index["path"].tolist(), size, workers, f"store {folder.name}")
        if problems and on_bad_image != "skip":
            raise DataError(describe_bad(data_dir, index, problems), _SKIP_HINT)
        atomic_write_text(folder / "index.csv", index[["path"]].to_csv(index=False, lineterminator="\n"))
    seconds = time.perf_counter() - start
    paths = index["path"].to_numpy()
    bad = {str(paths[row]): problem for row, problem in problems}
    for line in describe_bad(data_dir, index, problems)[:20]:
        log.warning("skipping unreadable image %s", line)
    meta = {
        "version": STORE_VERSION,
        "n": len(index),
        "height": size[0],
        "width": size[1],
        "key": key,
        "bad": bad,
        "build_seconds": round(seconds, 2),
        "images_per_second": round(len(index) / max(seconds, 1e-9), 1),
    }
    atomic_write_text(folder / "store.json", json.dumps(meta, indent=2) + "\n")
    log.info("built %s in %.1f s (%.0f images/s)", folder, seconds, meta["images_per_second"])
    images, ident = _map(folder / "images.u8", (len(index), size[0], size[1], 3))
    return Store(folder, meta, index["path"].tolist(), images, ident)


# --------------------------------------------------------------------------------------------------
# Sources: what a Dataset reads images from
# --------------------------------------------------------------------------------------------------


class StoreSource:
    """Rows of a store, read through the memory map its ``Store`` opened.

    The map is dropped when pickled (a pickled memmap becomes a full in-memory copy), so a worker
    started with spawn or forkserver maps the file itself, and refuses it unless it is the file the
    store was opened with (``ident``): after a rebuild by another run its rows would be other images.
    Forked workers inherit the map.
    """

    def __init__(
        self,
        data_path: Path,
        shape: tuple[int, ...],
        rows: np.ndarray,
        ident: tuple[int, int] | None = None,
        images: np.ndarray | None = None,
    ) -> None:
        self.data_path, self.shape, self.rows = Path(data_path), tuple(shape), np.asarray(rows)
        self.ident, self._images = ident, images

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.shape[1], self.shape[2], 3)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            try:
                images, ident = _map(self.data_path, self.shape)
            except (OSError, ValueError) as exc:
                images, ident = None, (exc,)
            if self.ident is not None and ident != self.ident:
                raise FoldkitError(
                    f"{self.data_path} is not the image store this run opened: another run rebuilt or "
                    "removed it meanwhile (the data changed?), and its rows would be other images. Run "
                    "the command again: it rebuilds or reuses the store for the data as it is now."
                )
            self._images = images
        return self._images

    def read(self, i: int) -> np.ndarray:
        """Image ``i`` as a writable HxWx3 uint8 array (a copy: augmentations may work in place)."""
        return np.array(self.images[self.rows[i]])

    def read_many(self, idx: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Images ``idx`` as one (B, H, W, 3) array, gathered in one call (into ``out`` if given)."""
        return np.take(self.images, self.rows[np.asarray(idx)], axis=0, out=out)


class FileSource:
    """Image files decoded on every read (``data.cache: false``): the same pixels the store holds,
    black for the ``bad`` paths the up-front check could not decode (as the store's rows are)."""

    def __init__(
        self, data_dir: Path, paths: Sequence[str], size: tuple[int, int], bad: set[str] | None = None
    ) -> None:
        self.data_dir, self.paths, self.size = Path(data_dir), list(paths), tuple(size)
        self.bad = set(bad or ())

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size[0], self.size[1], 3)

    def read(self, i: int) -> np.ndarray:
        if self.paths[i] in self.bad:
            return np.zeros(self.image_shape, dtype=np.uint8)
        path = self.data_dir / self.paths[i]
        try:
            return fit_size(decode_image(path), self.size)
        except ValueError as exc:
            raise FoldkitError(f"{path}: {exc}") from exc

    def read_many(self, idx: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        return np.stack([self.read(int(i)) for i in idx], out=out)


class FileSet:
    """The image files themselves at one size (``data.cache: false``); quacks like ``Store.source``.
    ``bad``: the paths the up-front check could not decode (``on_bad_image: skip``)."""

    def __init__(self, data_dir: Path, size: tuple[int, int], bad: set[str] | None = None) -> None:
        self.data_dir, self.size, self.bad = Path(data_dir), tuple(size), set(bad or ())

    def source(self, paths: Sequence[str]) -> FileSource:
        return FileSource(self.data_dir, paths, self.size, self.bad)


def open_images(
    data_dir: Path,
    work_dir: Path,
    index: pd.DataFrame,
    split: str,
    cache: bool,
    size: tuple[int, int] | None = None,
    workers: int | None = None,
    on_bad_image: str = "error",
) -> Store | FileSet:
    """The images of ``index``: its store (built or reused) when ``cache``, else the files after a
    full decode check. Either way an unreadable image is found here, before any training."""
    if cache:
        return ensure_store(data_dir, work_dir, index, split, size, workers, on_bad_image)
    size = tuple(size) if size else native_size(data_dir, index)
    return FileSet(data_dir, size, check_images(data_dir, index, size, workers, on_bad_image))


def check_images(
    data_dir: Path, index: pd.DataFrame, size: tuple[int, int], workers: int | None, on_bad_image: str
) -> set[str]:
    """Decode every image once, in parallel, writing nothing (the store's build without a store):
    ``DataError`` naming each bad file with its label-file line, or with ``skip`` their paths."""
    workers = max(1, resolve_workers(workers or None))  # 0, like None: every core
    problems = _fill(None, data_dir, index["path"].tolist(), size, workers, "check images")
    if problems and on_bad_image != "skip":
        raise DataError(describe_bad(data_dir, index, problems), _SKIP_HINT)
    for line in describe_bad(data_dir, index, problems)[:20]:
        log.warning("skipping unreadable image %s", line)
    return {str(index["path"].iat[row]) for row, _ in problems}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m foldkit.store",
        description="Decode every train, validate and test image once into the uint8 memmap store.",
        formatter_class=HelpFormatter,
    )
    add_path_args(parser)
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="side the store keeps images at (default: their native size, the store main.py reads "
        "unless data.store_size is set; this is not the model's input size, which the GPU resizes to)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: one per core)"
    )
    parser.add_argument(
        "--on-bad-image",
        choices=("error", "skip"),
        default="error",
        help="stop on an unreadable image, or skip it",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = _parse_args(argv)
    setup_logging(args.verbose)
    size = (args.img_size, args.img_size) if args.img_size else None
    splits = [("trainval", read_trainval(args.data_dir))]
    if (args.data_dir / "test").is_dir():
        splits.append(("test", read_test(args.data_dir)))
    for split, index in splits:
        if size and size != (native := native_size(args.data_dir, index)):
            log.warning(
                "%s: building a %dx%d store; main.py reads the one at the images' native size %dx%d "
                "unless its config sets data.store_size=%d (the model's input size is data.img_size)",
                split, *size, *native, size[0],
            )  # fmt: skip
        start = time.perf_counter()
        store = ensure_store(
            args.data_dir, args.work_dir, index, split, size, args.workers, args.on_bad_image
        )
        seconds = time.perf_counter() - start
        n, h, w, _ = store.shape
        gib = n * h * w * 3 / 2**30
        print(
            f"{split}: {n} images at {h}x{w}, {gib:.2f} GiB, {n / max(seconds, 1e-9):.0f} images/s "
            f"({seconds:.1f} s), bad {len(store.bad)}: {store.path}"
        )
    try:
        import resource  # Unix only: on Windows the store still builds, without this line
    except ImportError:
        return 0
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(f"peak memory of one process: {peak / 1024:.0f} MiB")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    return run(_main, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
