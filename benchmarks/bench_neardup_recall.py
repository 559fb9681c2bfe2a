"""Which edited copies the near-duplicate policy catches: recall per kind of edit.

Why: ``data.near_dup`` keeps an image and its copies in one fold. A copy counts as caught when its
64-bit pHash is within ``--hamming`` bits of the original's (a candidate) and their 16x16 grey
thumbnails correlate at least ``--min-corr`` (foldkit.neardup, the same fingerprint code). Re-saves,
resizes and mild colour changes are caught; this measures how far that goes for re-crops shifted by
a few pixels, the other common near-duplicate in face-crop data. Run on any folder of images in the
seed's layout (e.g. ``python -m foldkit.synthetic --out /tmp/syn --n-train 200 --n-validate 10``):

    .venv/bin/python benchmarks/bench_neardup_recall.py --data-dir /tmp/syn --n 200
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# Run as a script from anywhere, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from foldkit.neardup import _fingerprint_one, _popcount


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _shift(im: Image.Image, d: int) -> Image.Image:
    """Translated d px right and down, edges replicated: a re-crop of the same frame."""
    a = np.asarray(im)
    return Image.fromarray(np.pad(a, ((d, 0), (d, 0), (0, 0)), mode="edge")[: a.shape[0], : a.shape[1]])


def _recrop(im: Image.Image, d: int) -> Image.Image:
    """The crop box moved in by d px on every side, resized back."""
    w, h = im.size
    return im.crop((d, d, w - d, h - d)).resize((w, h), Image.Resampling.BICUBIC)


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize 96": lambda im: im.resize((96, 96), Image.Resampling.BICUBIC),
    "resize 224": lambda im: im.resize((224, 224), Image.Resampling.BICUBIC),
    "JPEG q90": lambda im: _jpeg(im, 90),
    "JPEG q50": lambda im: _jpeg(im, 50),
    "brightness +10%": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "contrast +10%": lambda im: ImageEnhance.Contrast(im).enhance(1.1),
    "shift 1 px": lambda im: _shift(im, 1),
    "shift 2 px": lambda im: _shift(im, 2),
    "shift 3 px": lambda im: _shift(im, 3),
    "re-crop 2 px": lambda im: _recrop(im, 2),
    "JPEG q75 + shift 2 px": lambda im: _jpeg(_shift(im, 2), 75),
    "horizontal flip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
}


def _fingerprint(im: Image.Image, scratch: Path) -> tuple[int, int, bytes]:
    im.save(scratch, "PNG")
    fp, problem = _fingerprint_one(str(scratch))
    if fp is None:
        raise RuntimeError(problem)
    return fp


def _corr(x: bytes, y: bytes) -> float:
    a, b = (np.frombuffer(t, np.uint8).astype(np.float64) for t in (x, y))
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--n", type=int, default=200, help="originals (the first train images by name)")
    p.add_argument("--hamming", type=int, default=6)
    p.add_argument("--min-corr", type=float, default=0.99)
    args = p.parse_args()
    files = sorted(f for f in (args.data_dir / "train").iterdir() if f.suffix in (".png", ".jpg"))[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "copy.png"
        originals = [(Image.open(f).convert("RGB"), _fingerprint_one(str(f))[0]) for f in files]
        print(f"{len(files)} originals from {args.data_dir}; candidate: <= {args.hamming} bits, "
              f"caught: a candidate with r >= {args.min_corr}")  # fmt: skip
        print(f"{'edit':24s} {'candidate':>9s} {'caught':>7s} {'median r':>9s}")
        for name, edit in EDITS.items():
            bits, corr = [], []
            for im, fp in originals:
                copy = _fingerprint(edit(im), scratch)
                bits.append(int(_popcount(np.array([fp[0] ^ copy[0]], np.uint64))[0]))
                corr.append(_corr(fp[2], copy[2]))
            cand, ok = np.array(bits) <= args.hamming, np.array(corr) >= args.min_corr
            print(f"{name:24s} {cand.mean():9.1%} {(cand & ok).mean():7.1%} {np.median(corr):9.4f}")


if __name__ == "__main__":
    main()
