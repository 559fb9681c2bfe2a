"""Synthetic deepfake face crops laid out exactly like the real competition data.

The demo, the tests and the benchmarks need a data set with the real folder layout, the real file-name
pattern (subject ids that fold grouping keys on) and a real, learnable real-vs-fake signal, without
shipping or downloading any faces. This module draws one procedurally::

    python -m foldkit.synthetic --out D --n-train N --n-validate N --n-test N --seed S \\
        [--hashed-names] [--size 112] [--n-subjects K] [--workers W] [--fake-ratio 0.5] [--truth T]

which writes::

    D/train/<name>.png       D/train/train_label.txt        lines "name label" (0 real, 1 fake)
    D/validate/<name>.png    D/validate/validate_label.txt  same
    D/test/<name>.png        D/test/test_label.txt          names only, one per line
    T (only with --truth)    the test labels, "name label" lines in test_label.txt order, kept apart
                             from the data so a submission can be scored without leaking them

Names look like the real ``19071022_S001_L1_E01_C10_cropped.jpg`` but end in ``.png``:
``{19070000 + running index:08d}_S{subject:03d}_L{light}_E{expression:02d}_C{camera:02d}_cropped.png``;
the running index counts across all splits so every name is unique, and L/E/C are the lighting sector,
expression and camera (yaw) the image was drawn with. ``--hashed-names`` replaces each name by the md5 of
that descriptive name (32 hex characters + ``.png``), like the anonymised real test sets.

Content: faces of many subjects, each with fixed identity parameters (face shape and size, skin tone,
eye spacing and colour, nose, mouth, hair colour and style), drawn per image with a random pose (shift,
rotation, scale, yaw), lighting (direction, strength, brightness, tint), expression (smile, open mouth,
eye openness, gaze), background (colours, gradient, texture, stripes), camera noise and a JPEG round trip
at a random quality (the PNG stores the decoded JPEG). Train and validate share subjects ``S001..S{K}``
(many images per subject, so folds must be grouped by ``S\\d+``); test subjects are DISJOINT
(``S{K+1}..``), so test scores measure generalisation to unseen identities.

Exactly ``round(n * fake_ratio)`` images of each split are fakes (label 1; ``--fake-ratio``, default
0.5, ties round down so 0.5 gives ``n // 2`` and the default output stays what it always was), made like
face swaps: a donor subject's inner face (eyes, brows, nose, mouth and the skin around them) is rendered
with the target image's pose and expression, blurred by resampling (downscale then upscale, which also
wipes out the camera grain), colour-corrected only partly (a residual tone mismatch) and pasted with a
soft elliptical mask that leaves a faint halo along its border. A per-fake hardness sets the resampling
factor, the residual colour mismatch, the halo and the mask softness: most fakes are visible, a tail is
subtle. The cues are local (a blend seam, a blur / grain / tone discontinuity at a pose-dependent
place), which a small CNN learns at 64 px (F1 ~0.96 after 6 epochs on 3000 images) while a linear model
on raw pixels only catches a slight brightening of swapped skin (F1 ~0.6).

Every image is seeded from ``(seed, split, index)`` and every identity from ``(seed, subject)``, so the
same arguments give byte-identical files whatever the worker count.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from foldkit.cli import HelpFormatter
from foldkit.io import FoldkitError, atomic_write_text

logger = logging.getLogger("foldkit.synthetic")  # not __name__: "__main__" under python -m

SPLITS: tuple[str, ...] = ("train", "validate", "test")
DATE_BASE = 19070000
#: Below this many images generation stays in-process (a pool costs more than it saves).
MIN_IMAGES_FOR_POOL = 256
_TAG_SUBJECT = 100
_TAG_PLAN = 200

_SKIN_LIGHT = np.array([0.96, 0.80, 0.68], np.float32)
_SKIN_DARK = np.array([0.38, 0.25, 0.18], np.float32)
_HAIR = np.array(
    [
        [0.08, 0.06, 0.05],
        [0.30, 0.19, 0.10],
        [0.55, 0.38, 0.20],
        [0.85, 0.70, 0.42],
        [0.55, 0.22, 0.10],
        [0.62, 0.62, 0.62],
    ],
    np.float32,
)
_IRIS = np.array([[0.30, 0.18, 0.08], [0.20, 0.35, 0.60], [0.25, 0.45, 0.25], [0.45, 0.45, 0.48]], np.float32)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Fixed appearance of one subject; every image of that subject is drawn from these."""

    face_w: float
    face_h: float
    face_pow: float
    skin: np.ndarray
    eye_dx: float
    eye_y: float
    eye_rx: float
    eye_ry: float
    iris_r: float
    iris: np.ndarray
    brow_th: float
    brow_arch: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_th: float
    lip: np.ndarray
    hair: np.ndarray
    hair_top: float
    hair_side: float
    hair_len: float
    hairline: float
    clothes: np.ndarray


@dataclasses.dataclass(frozen=True)
class Look:
    """Per-image variation: pose, lighting, expression, background and camera."""

    tx: float
    ty: float
    rot: float
    scale: float
    yaw: float
    light_angle: float
    light_strength: float
    brightness: float
    tint: np.ndarray
    smile: float
    mouth_open: float
    eye_open: float
    gaze: float
    bg1: np.ndarray
    bg2: np.ndarray
    bg_angle: float
    texture: np.ndarray
    stripe_amp: float
    stripe_freq: float
    stripe_angle: float
    noise: float
    quality: int
    light_code: int
    expr_code: int
    cam_code: int


class Job(NamedTuple):
    """One image to render and where to write it (picklable, so it can go to a worker)."""

    path: str
    seed: int
    split_id: int
    index: int
    subject: int
    donor: int
    label: int
    size: int


@functools.lru_cache(maxsize=4096)
def make_identity(seed: int, subject: int) -> Identity:
    """Draw the fixed parameters of ``subject``; cached because every image of a subject reuses them."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SUBJECT, subject]))
    u = rng.uniform
    tone = u(0.0, 1.0)
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * tone + rng.normal(0, 0.025, 3).astype(np.float32)
    face_w, face_h = u(0.40, 0.54), u(0.54, 0.68)
    return Identity(
        face_w=face_w,
        face_h=face_h,
        face_pow=u(1.8, 2.7),
        skin=np.clip(skin, 0.05, 1.0),
        eye_dx=u(0.15, 0.22),
        eye_y=u(-0.16, -0.06),
        eye_rx=u(0.06, 0.085),
        eye_ry=u(0.028, 0.042),
        iris_r=u(0.022, 0.032),
        iris=_IRIS[rng.integers(len(_IRIS))] * u(0.8, 1.2),
        brow_th=u(0.010, 0.022),
        brow_arch=u(0.0, 0.03),
        nose_y=u(0.08, 0.16),
        nose_w=u(0.035, 0.06),
        mouth_y=u(0.27, 0.36),
        mouth_w=u(0.09, 0.15),
        lip_th=u(0.014, 0.026),
        lip=np.clip(skin * np.array([0.95, 0.6, 0.6], np.float32) * u(0.8, 1.0), 0, 1).astype(np.float32),
        hair=_HAIR[rng.integers(len(_HAIR))] * u(0.8, 1.15),
        hair_top=u(0.03, 0.22),
        hair_side=u(0.0, 0.12),
        hair_len=u(-0.3, 0.9),
        hairline=u(0.45, 0.85),
        clothes=rng.uniform(0.1, 0.9, 3).astype(np.float32),
    )


def make_look(rng: np.random.Generator) -> Look:
    """Draw one image's pose, lighting, expression, background and camera from ``rng``."""
    u = rng.uniform
    light_code, expr_code = int(rng.integers(1, 4)), int(rng.integers(1, 9))
    cam_code = int(rng.integers(1, 11))
    k = int(rng.integers(3, 10))
    return Look(
        tx=u(-0.10, 0.10),
        ty=u(-0.08, 0.10),
        rot=u(-0.2, 0.2),
        scale=u(1.3, 1.6),
        yaw=(cam_code - 5.5) / 4.5 * 0.06 + u(-0.02, 0.02),
        light_angle=light_code * 2.0944 + u(-0.8, 0.8),
        light_strength=u(0.0, 0.45),
        brightness=u(0.75, 1.15),
        tint=(1.0 + rng.normal(0, 0.04, 3)).astype(np.float32),
        smile=(expr_code - 3) * 0.012 + u(-0.01, 0.01),
        mouth_open=max(0.0, u(-0.02, 0.035)),
        eye_open=u(0.35, 1.15),
        gaze=u(-0.02, 0.02),
        bg1=rng.uniform(0.05, 0.95, 3).astype(np.float32),
        bg2=rng.uniform(0.05, 0.95, 3).astype(np.float32),
        bg_angle=u(0, 2 * math.pi),
        texture=rng.normal(0, u(0.0, 0.12), (k, k)).astype(np.float32),
        stripe_amp=u(0.0, 0.08) * (rng.random() < 0.4),
        stripe_freq=u(4, 30),
        stripe_angle=u(0, math.pi),
        noise=u(0.012, 0.03),
        quality=int(rng.integers(70, 96)),
        light_code=light_code,
        expr_code=expr_code,
        cam_code=cam_code,
    )


def _dist(
    u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float, p: float = 2.0
) -> np.ndarray:
    """Normalised (super-)ellipse distance: 1 on the outline, <1 inside."""
    du, dv = np.abs(u - cx) / rx, np.abs(v - cy) / ry
    if p == 2.0:
        return np.sqrt(du * du + dv * dv)
    return (du**p + dv**p) ** (1.0 / p)


def _alpha(d: np.ndarray, r: float, px: float) -> np.ndarray:
    """Anti-aliased coverage of the shape whose normalised distance is ``d`` (about one pixel of ramp)."""
    return np.clip(0.5 - (d - 1.0) * (r / px), 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | float) -> None:
    """Alpha-composite ``colour`` (an RGB triple or a per-pixel image) over ``img`` in place.

    Only the bounding box of the non-zero alpha is touched: most shapes are small, and this is the hot loop.
    """
    hit = alpha > 0.0
    rows = np.flatnonzero(hit.any(axis=1))
    if rows.size == 0:
        return
    cols = np.flatnonzero(hit.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    if isinstance(colour, np.ndarray) and colour.ndim == 3:
        colour = colour[box]
    sub = img[box]
    sub += alpha[box][..., None] * (colour - sub)


def _coords(size: int, look: Look) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Image coordinates x, y in [-1, 1] and face-canonical u, v under the image's pose; and pixel size."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    x, y = np.meshgrid(t, t)
    c, s = math.cos(look.rot), math.sin(look.rot)
    xs, ys = (x - look.tx) / look.scale, (y - look.ty) / look.scale
    return x, y, c * xs + s * ys, -s * xs + c * ys, 2.0 / size / look.scale


def _background(x: np.ndarray, y: np.ndarray, look: Look) -> np.ndarray:
    """Two-colour gradient plus low-frequency texture and optional stripes."""
    size = x.shape[0]
    g = 0.5 + 0.5 * (math.cos(look.bg_angle) * x + math.sin(look.bg_angle) * y)
    img = look.bg1 + (look.bg2 - look.bg1) * g[..., None]
    tex = np.asarray(Image.fromarray(look.texture, "F").resize((size, size), Image.Resampling.BICUBIC))
    if look.stripe_amp > 0.0:
        ca, sa = math.cos(look.stripe_angle), math.sin(look.stripe_angle)
        tex = tex + look.stripe_amp * np.sin(look.stripe_freq * (ca * x + sa * y))
    return (img + tex[..., None]).astype(np.float32)


def _head(img: np.ndarray, u: np.ndarray, v: np.ndarray, px: float, idt: Identity, look: Look) -> None:
    """Paint clothes, neck, back hair, ears, the shaded face and the front hair."""
    fw, fh = idt.face_w, idt.face_h
    _paint(img, _alpha(_dist(u, v, 0.0, fh * 2.3, fw * 2.6, fh * 1.0), fh, px), idt.clothes)
    _paint(img, _alpha(_dist(u, v, 0.0, fh * 1.2, fw * 0.55, fh * 0.8, 6.0), fw * 0.55, px), idt.skin * 0.8)
    hair_d = _dist(u, v, 0.0, -fh * 0.15, fw * (1.12 + idt.hair_side), fh * (1.0 + idt.hair_top))
    hair = idt.hair * (1.0 + 0.08 * np.sin(u * 90.0 + 6.0 * v)[..., None])  # strands
    hair_a = _alpha(hair_d, fw, px) * np.clip(0.5 - (v - fh * idt.hair_len) / px, 0.0, 1.0)
    _paint(img, hair_a, hair)
    for side in (-1.0, 1.0):
        ear = _dist(u, v, side * fw * 0.98 + look.yaw * 0.3, idt.eye_y + 0.06, 0.06, 0.11)
        _paint(img, _alpha(ear, 0.06, px), idt.skin * 0.88)
    fu = u - look.yaw * 0.3
    d = _dist(fu, v, 0.0, 0.03, fw, fh, idt.face_pow)
    ca = math.cos(look.light_angle) * look.light_strength
    sa = math.sin(look.light_angle) * look.light_strength
    nz = np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))
    lambert = (nz + ca * fu / fw + sa * (v - 0.03) / fh) / math.sqrt(1 + ca * ca + sa * sa)
    shade = np.clip(0.72 + 0.28 * lambert, 0.4, 1.1)
    _paint(img, _alpha(d, fw, px), idt.skin * shade[..., None])
    line = -fh * idt.hairline + 0.25 * fh * (fu / fw) ** 2
    front = _alpha(hair_d, fw, px) * np.clip(0.5 - (v - line) / px, 0.0, 1.0)
    _paint(img, front, hair)


class _Canvas(NamedTuple):
    """An image being drawn with its face-canonical coordinates, so shapes can work on small windows."""

    img: np.ndarray
    u: np.ndarray
    v: np.ndarray
    px: float
    look: Look

    def win(self, cx: float, cy: float, r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of (img, u, v) over the pixels within canonical radius ``r`` of (cx, cy), plus a margin.

        Painting small features on their window instead of the whole image is most of the speed budget.
        """
        lk, size = self.look, self.img.shape[0]
        c, s = math.cos(lk.rot), math.sin(lk.rot)
        x, y = lk.tx + lk.scale * (c * cx - s * cy), lk.ty + lk.scale * (s * cx + c * cy)
        half = (lk.scale * r + 6.0 / size) * size / 2
        col, row = (x + 1.0) * size / 2, (y + 1.0) * size / 2
        box = (
            slice(max(0, math.floor(row - half)), max(0, math.ceil(row + half))),
            slice(max(0, math.floor(col - half)), max(0, math.ceil(col + half))),
        )
        return self.img[box], self.u[box], self.v[box]


def _eyes(cv: _Canvas, idt: Identity) -> None:
    """Brows, eye whites, irises and pupils; eye openness and gaze come from the image's expression."""
    look, px = cv.look, cv.px
    for side in (-1.0, 1.0):
        cx = side * idt.eye_dx
        img, u, v = cv.win(cx + look.yaw, idt.eye_y - 0.04, 0.1 + idt.brow_arch + 0.04)
        fu = u - look.yaw
        bv = v - (idt.eye_y - 0.075) + idt.brow_arch * (1.0 - ((fu - cx) / 0.09) ** 2)
        _paint(img, _alpha(_dist(fu, bv, cx, 0.0, 0.09, idt.brow_th), idt.brow_th, px), idt.hair * 0.7)
        ry = max(idt.eye_ry * look.eye_open, 0.3 * px)
        white_d = _dist(fu, v, cx, idt.eye_y, idt.eye_rx, ry)
        _paint(img, _alpha(white_d, ry, px) * 0.9, idt.skin * 0.45)
        white = _alpha(white_d, ry, px) * np.clip(1.6 - white_d, 0.0, 1.0) * 1.6
        _paint(img, np.clip(white, 0.0, 1.0), np.array([0.93, 0.91, 0.88], np.float32))
        iris_d = _dist(fu, v, cx + look.gaze, idt.eye_y, idt.iris_r, idt.iris_r)
        inside = _alpha(white_d * 1.05, ry, px)
        _paint(img, _alpha(iris_d, idt.iris_r, px) * inside, idt.iris)
        _paint(img, _alpha(iris_d * 2.2, idt.iris_r, px) * inside, 0.03)


def _nose_and_mouth(cv: _Canvas, idt: Identity) -> None:
    """Nostrils, a bridge shadow on the side away from the light, the tip highlight, and the lips."""
    look, px = cv.look, cv.px
    img, u, v = cv.win(look.yaw, (idt.eye_y + idt.nose_y) / 2, (idt.nose_y - idt.eye_y) / 2 + idt.nose_w)
    fu = u - look.yaw
    for side in (-1.0, 1.0):
        nostril = _dist(fu, v, side * idt.nose_w * 0.55, idt.nose_y, idt.nose_w * 0.35, idt.nose_w * 0.2)
        _paint(img, _alpha(nostril, idt.nose_w * 0.2, px) * 0.8, idt.skin * 0.45)
    shadow_side = -1.0 if math.cos(look.light_angle) > 0 else 1.0
    bridge = _dist(
        fu,
        v,
        shadow_side * idt.nose_w * 0.6,
        (idt.eye_y + idt.nose_y) / 2,
        idt.nose_w * 0.25,
        (idt.nose_y - idt.eye_y) / 2,
    )
    _paint(img, _alpha(bridge, idt.nose_w * 0.25, px) * 0.5, idt.skin * 0.75)
    tip = _dist(fu, v, 0.0, idt.nose_y - 0.02, idt.nose_w * 0.6, idt.nose_w * 0.5)
    _paint(img, _alpha(tip, idt.nose_w * 0.5, px) * 0.35, np.minimum(idt.skin * 1.15, 1.0))
    gap = look.mouth_open / 2
    img, u, v = cv.win(look.yaw, idt.mouth_y, idt.mouth_w + abs(look.smile) + gap + 2 * idt.lip_th)
    fu = u - look.yaw
    mv = v - idt.mouth_y + look.smile * (fu / idt.mouth_w) ** 2
    _paint(
        img,
        _alpha(_dist(fu, mv, 0.0, 0.0, idt.mouth_w * 0.85, gap + 0.4 * px), gap + px, px),
        np.array([0.25, 0.05, 0.06], np.float32),
    )
    for off, th in ((-(gap + idt.lip_th * 0.4), idt.lip_th * 0.8), (gap + idt.lip_th * 0.5, idt.lip_th)):
        _paint(img, _alpha(_dist(fu, mv, 0.0, off, idt.mouth_w, th), th, px), idt.lip)


def render(idt: Identity, look: Look, size: int, hair_from: Identity | None = None) -> np.ndarray:
    """Draw one face (float32 RGB, about [0, 1], no noise) under ``look``.

    ``hair_from`` draws the head (outline, hair, clothes) of another identity with ``idt``'s skin and
    inner face: that is how a swap donor is warped onto the target's head.
    """
    x, y, u, v, px = _coords(size, look)
    img = _background(x, y, look)
    head = (
        idt
        if hair_from is None
        else dataclasses.replace(
            hair_from, skin=idt.skin, eye_y=idt.eye_y, nose_y=idt.nose_y, mouth_y=idt.mouth_y
        )
    )
    _head(img, u, v, px, head, look)
    canvas = _Canvas(img, u, v, px, look)
    _eyes(canvas, idt)
    _nose_and_mouth(canvas, idt)
    light = look.brightness * (
        1.0 + look.light_strength * 0.5 * (math.cos(look.light_angle) * x + math.sin(look.light_angle) * y)
    )
    return img * light[..., None] * look.tint


def _resample(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Downscale by ``factor`` and back up (a swap pipeline's resize blur), returning float32."""
    size = img.shape[0]
    small = max(4, round(size * factor))
    modes = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.BOX)
    pil = Image.fromarray(_to_uint8(img)).resize((small, small), modes[int(rng.integers(3))])
    up = pil.resize((size, size), modes[int(rng.integers(2))])
    return np.asarray(up, np.float32) / 255.0


def _swap_mask(
    size: int, look: Look, idt: Identity, rng: np.random.Generator, softness: float
) -> tuple[np.ndarray, np.ndarray]:
    """Soft elliptical mask over the inner face (brows to chin-top) under the image's pose, and its seam.

    The seam is a band along the mask border where blending leaves a faint halo.
    """
    _, _, u, v, px = _coords(size, look)
    cy = (idt.eye_y - 0.08 + idt.mouth_y + 0.05) / 2 + rng.uniform(-0.02, 0.02)
    ry = (idt.mouth_y + 0.05 - (idt.eye_y - 0.08)) / 2 * rng.uniform(1.0, 1.15)
    rx = idt.face_w * rng.uniform(0.72, 0.9)
    d = _dist(u - look.yaw * 0.6, v, 0.0, cy, rx, ry)
    ramp = max(softness, px) / min(rx, ry)
    t = np.clip((1.0 - d) / ramp + 0.5, 0.0, 1.0)
    seam = np.exp(-(((d - 1.0) * min(rx, ry) / rng.uniform(0.02, 0.05)) ** 2))
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32), seam.astype(np.float32)


def face_swap(
    target: np.ndarray,
    donor: np.ndarray,
    mask: np.ndarray,
    seam: np.ndarray,
    hardness: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Blend ``donor`` into ``target`` under ``mask`` with resampling blur, a residual tone mismatch and a
    darker halo along ``seam``.

    ``hardness`` in [0, 1]: 0 gives a strong blur, mismatch and halo; 1 a nearly seamless paste.
    """
    donor = _resample(donor, min(0.95, rng.uniform(0.25, 0.45) + 0.55 * hardness), rng)
    m = mask[..., None]
    w = float(mask.sum()) + 1e-6
    diff = ((target - donor) * m).sum(axis=(0, 1)) / w
    correction = float(np.clip(0.98 * hardness + rng.uniform(-0.05, 0.05), 0.0, 1.0))
    gain = 1.0 + rng.normal(0.0, 0.16 * (1.0 - hardness) + 0.005, 3)
    # Generators tend to render the swapped skin slightly brighter: a weak cue even a linear model sees.
    bias = rng.uniform(0.015, 0.045) * (1.0 - 0.6 * hardness)
    pasted = (donor + correction * diff) * gain.astype(np.float32) + bias
    halo = seam[..., None] * np.float32(-rng.uniform(0.03, 0.10) * (1.0 - hardness))
    return target + m * (pasted - target) + halo


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """Quantise a float image in [0, 1] to 8 bits (rounded, so the bytes are reproducible)."""
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> Image.Image:
    """Round-trip through JPEG so every image carries compression artefacts, as real crops do."""
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(img)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def image_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    """The generator for one image: a function of (seed, split, index) only, never of the worker."""
    return np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))


def camera_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Sensor noise: fine per-pixel noise plus 2-pixel grain (demosaicing correlates real noise).

    The grain survives downscaling to 64 px, so a resampled (noise-free) pasted face stays detectable.
    """
    half = (size + 1) // 2
    grain = rng.standard_normal((half, half, 3), dtype=np.float32).repeat(2, axis=0).repeat(2, axis=1)
    fine = rng.standard_normal((size, size, 3), dtype=np.float32)
    return (fine + grain[:size, :size]) * np.float32(sigma)


def render_job(job: Job) -> tuple[Image.Image, Look]:
    """Render the image ``job`` describes: a real face, or a face swap when ``job.label`` is 1."""
    rng = image_rng(job.seed, job.split_id, job.index)
    look = make_look(rng)
    idt = make_identity(job.seed, job.subject)
    img = render(idt, look, job.size)
    img += camera_noise(rng, job.size, look.noise)
    if job.label == 1:
        hardness = float(rng.uniform(0.0, 1.0)) ** 1.5  # mostly visible fakes, a tail of subtle ones
        donor_look = dataclasses.replace(
            look,
            tx=look.tx + rng.normal(0, 0.01),
            ty=look.ty + rng.normal(0, 0.01),
            rot=look.rot + rng.normal(0, 0.02),
            scale=look.scale * (1 + rng.normal(0, 0.015)),
            light_angle=look.light_angle + rng.normal(0, 0.4 * (1 - hardness)),
        )
        donor = render(make_identity(job.seed, job.donor), donor_look, job.size, hair_from=idt)
        donor += camera_noise(rng, job.size, look.noise * rng.uniform(0.5, 1.5))  # another camera
        softness = (0.01 + 0.09 * hardness) * rng.uniform(0.7, 1.3)
        mask, seam = _swap_mask(job.size, look, idt, rng, softness)
        img = face_swap(img, donor, mask, seam, hardness, rng)
    return _jpeg(img, look.quality), look


def _render_chunk(jobs: Sequence[Job]) -> int:
    """Worker entry point: render and save a chunk of images; returns how many were written."""
    for job in jobs:
        pil, _ = render_job(job)
        pil.save(job.path, format="PNG", compress_level=1)
    return len(jobs)


def descriptive_name(global_index: int, subject: int, look: Look) -> str:
    """The real data's name pattern; the running index in the date field makes it unique."""
    return (
        f"{DATE_BASE + global_index:08d}_S{subject:03d}_L{look.light_code}_E{look.expr_code:02d}"
        f"_C{look.cam_code:02d}_cropped.png"
    )


def hashed_name(name: str) -> str:
    """Anonymised name: md5 of the descriptive name, 32 hex characters."""
    return hashlib.md5(name.encode("utf-8")).hexdigest() + ".png"


def _subject_pools(
    n_train: int, n_validate: int, n_test: int, n_subjects: int | None
) -> tuple[list[int], list[int]]:
    """Subject ids for train+validate (shared) and for test (disjoint, ids continue after them)."""
    n_tv = n_train + n_validate
    k = n_subjects if n_subjects is not None else int(np.clip(round(math.sqrt(max(n_tv, 1))), 4, 300))
    if k < 2:
        raise FoldkitError("n_subjects must be at least 2 (a face swap needs a donor)")
    k_test = max(2, min(k, round(k * n_test / n_tv))) if n_tv else k
    if k + k_test > 999:
        raise FoldkitError(f"{k} + {k_test} subjects do not fit the 3-digit S field; lower --n-subjects")
    return list(range(1, k + 1)), list(range(k + 1, k + k_test + 1))


def n_fakes(n: int, fake_ratio: float) -> int:
    """Fakes in a split of ``n``: the integer nearest ``n * fake_ratio``, ties down.

    Ties go down (not to even, as ``round`` does) so that 0.5 gives ``n // 2`` for odd ``n`` too, which is
    what every earlier version wrote; a default run must stay byte-identical.
    """
    return min(n, max(0, math.ceil(n * fake_ratio - 0.5)))


def check_fake_ratio(fake_ratio: float) -> None:
    """A split needs both classes to be learnable and scorable, so the ratio must lie strictly in (0, 1)."""
    if not 0.0 < fake_ratio < 1.0:  # also refuses NaN
        raise FoldkitError(f"--fake-ratio {fake_ratio}: the share of fakes must be > 0 and < 1")


def check_truth_path(out: Path, truth: Path) -> None:
    """The truth file holds the hidden test labels: inside a split folder it would sit beside the data that
    loaders read, and it must not replace a label file, so it has to live outside ``out/<split>/``."""
    truth = truth.resolve()
    for split in SPLITS:
        if truth.is_relative_to((out / split).resolve()):
            raise FoldkitError(
                f"--truth {truth}: keep the test labels outside the data folders ({out / split})"
            )


def plan_split(
    out: Path,
    split_id: int,
    n: int,
    offset: int,
    pool: list[int],
    seed: int,
    size: int,
    hashed: bool,
    fake_ratio: float = 0.5,
) -> tuple[list[Job], list[str]]:
    """Assign subjects (balanced), labels (exactly ``n_fakes(n, fake_ratio)``), donors and names of a split.

    Labels and subjects come from a permutation, not the index, so names leak nothing about the label. The
    fakes are the first ``n_fakes`` of one permutation of ``n`` whatever the ratio, so the random stream
    (hence donors, names and every image) does not depend on the ratio and 0.5 reproduces older outputs.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_PLAN, split_id]))
    k = len(pool)
    subj_idx = rng.permutation(np.arange(n) % k)
    labels = np.zeros(n, dtype=np.int64)
    labels[rng.permutation(n)[: n_fakes(n, fake_ratio)]] = 1
    donor_idx = (subj_idx + 1 + rng.integers(0, k - 1, n)) % k
    folder = out / SPLITS[split_id]
    jobs, names = [], []
    for i in range(n):
        look = make_look(image_rng(seed, split_id, i))  # only for the L/E/C fields of the name
        subject = pool[subj_idx[i]]
        name = descriptive_name(offset + i, subject, look)
        name = hashed_name(name) if hashed else name
        names.append(name)
        donor = pool[donor_idx[i]] if labels[i] else -1
        jobs.append(Job(str(folder / name), seed, split_id, i, subject, donor, int(labels[i]), size))
    return jobs, names


def _run_jobs(jobs: list[Job], workers: int) -> None:
    """Render all jobs with a progress bar, in a process pool when that pays off."""
    chunk = max(8, min(64, len(jobs) // (max(workers, 1) * 8) or 1))
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    with tqdm(total=len(jobs), desc="synthetic", unit="img", disable=None) as bar:
        if workers > 1 and len(jobs) >= MIN_IMAGES_FOR_POOL:
            with multiprocessing.Pool(workers) as pool:
                for done in pool.imap_unordered(_render_chunk, chunks):
                    bar.update(done)
        else:
            for c in chunks:
                bar.update(_render_chunk(c))


def _label_text(names: Iterable[str], labels: Iterable[int] | None) -> str:
    """The label file's text: ``name label`` lines, or bare names for the test split (no labels)."""
    if labels is None:
        return "".join(f"{name}\n" for name in names)
    return "".join(f"{name} {label}\n" for name, label in zip(names, labels, strict=True))


def _warn_stale(folder: Path, names: list[str]) -> None:
    """Warn about images left by an earlier run: loaders that glob the folder would pick them up."""
    stale = {p.name for p in folder.glob("*.png")} - set(names)
    if stale:
        logger.warning("%s holds %d images its label file does not list (earlier run?)", folder, len(stale))


def generate(
    out: Path,
    n_train: int,
    n_validate: int,
    n_test: int,
    seed: int = 0,
    size: int = 112,
    hashed_names: bool = False,
    n_subjects: int | None = None,
    workers: int | None = None,
    fake_ratio: float = 0.5,
    truth: Path | None = None,
) -> dict[str, int]:
    """Write the synthetic data set under ``out`` (layout in the module docstring); return counts per split.

    Existing files of the same name are overwritten; other files in the split folders are left alone.
    ``truth``, when given, receives the test labels (``name label``, test label file order), written last
    like the label files so a crash never leaves a truth file that disagrees with the images.
    """
    counts = dict(zip(SPLITS, (n_train, n_validate, n_test), strict=True))
    if min(n_train, n_validate) < 1 or n_test < 0 or size < 16:
        raise FoldkitError(  # foldkit.data refuses an empty train or validate label file
            "n_train and n_validate must be >= 1, n_test >= 0 and size >= 16"
        )
    check_fake_ratio(fake_ratio)
    out = Path(out)
    if truth is not None:
        check_truth_path(out, Path(truth))
    tv_pool, test_pool = _subject_pools(n_train, n_validate, n_test, n_subjects)
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    all_jobs: list[Job] = []
    label_files: list[tuple[Path, str]] = []
    offset = 0
    for split_id, split in enumerate(SPLITS):
        n = counts[split]
        pool = test_pool if split == "test" else tv_pool
        (out / split).mkdir(parents=True, exist_ok=True)
        jobs, names = plan_split(out, split_id, n, offset, pool, seed, size, hashed_names, fake_ratio)
        labels = [j.label for j in jobs]
        label_files.append(
            (out / split / f"{split}_label.txt", _label_text(names, None if split == "test" else labels))
        )
        if split == "test" and truth is not None:
            label_files.append((Path(truth), _label_text(names, labels)))
        _warn_stale(out / split, names)
        all_jobs += jobs
        offset += n
    logger.info(
        "generating %s images of %dpx into %s (%d train/validate + %d test subjects, %d workers)",
        counts,
        size,
        out,
        len(tv_pool),
        len(test_pool),
        workers,
    )
    _run_jobs(all_jobs, workers)
    for path, text in label_files:
        atomic_write_text(path, text)
    return counts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The CLI in the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m foldkit.synthetic",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (gets train/ validate/ test/)")
    p.add_argument(
        "--n-train", type=int, required=True, help="train images, --fake-ratio of them fakes (>= 1)"
    )
    p.add_argument("--n-validate", type=int, required=True, help="validate images (>= 1)")
    p.add_argument("--n-test", type=int, required=True, help="test images, of unseen subjects (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes")
    p.add_argument("--hashed-names", action="store_true", help="md5 names like anonymised test sets")
    p.add_argument("--size", type=int, default=112, help="image side in pixels")
    p.add_argument(
        "--n-subjects", type=int, default=None, help="train/validate identities (default: about sqrt(n))"
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    p.add_argument(
        "--fake-ratio",
        type=float,
        default=0.5,
        help="share of fakes in every split, 0 < R < 1; exactly round(n*R) per split (ties down)",
    )
    p.add_argument(
        "--truth",
        type=Path,
        default=None,
        help="also write the test labels ('name label', test label file order) to this file, outside the "
        "data folders, to score a submission (default: not written; test_label.txt keeps names only)",
    )
    return p.parse_args(argv)


def check_counts(args: argparse.Namespace) -> None:
    """Every split of the command-line data set needs an image: foldkit.data refuses an empty label
    file, so a zero here would only surface later, in main.py or ensemble.py."""
    counts = {"--n-train": args.n_train, "--n-validate": args.n_validate, "--n-test": args.n_test}
    bad = [f"{flag} {n}" for flag, n in counts.items() if n < 1]
    if bad:
        raise FoldkitError(
            f"{', '.join(bad)}: every split needs at least 1 image (empty label files are refused)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints a one-line summary."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_counts(args)
        counts = generate(
            args.out,
            args.n_train,
            args.n_validate,
            args.n_test,
            seed=args.seed,
            size=args.size,
            hashed_names=args.hashed_names,
            n_subjects=args.n_subjects,
            workers=args.workers,
            fake_ratio=args.fake_ratio,
            truth=args.truth,
        )
    except FoldkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} images to {args.out} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
