"""albumentations pipelines built from the config.

Named factories (as in the DFDC 1st-place code) so train and eval can never drift apart: both end in
the same resize + normalise with the backbone's own mean/std (from timm's data config).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from foldkit.config import AugmentConfig


def _finish(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> list[A.BasicTransform]:
    # Area averaging when shrinking keeps fine blending artefacts instead of aliasing them away;
    # linear when enlarging (112 -> 224 for ImageNet-scale backbones), where INTER_AREA would only
    # replicate pixels.
    return [
        A.Resize(size, size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
    ]


def train_transform(
    aug: AugmentConfig, size: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int
) -> A.Compose:
    """Flips, affine, colour, blur/downscale/JPEG/noise and coarse dropout, then resize + normalise.

    Why these: face-swap detectors that won DFDC leaned on exactly this artefact-robust set, so the
    model learns blending seams rather than one codec's or camera's signature.
    """
    q_lo, q_hi = aug.jpeg_quality
    ops: list[A.BasicTransform] = [
        A.HorizontalFlip(p=aug.hflip),
        A.Affine(
            scale=(1 - aug.scale, 1 + aug.scale),
            translate_percent=(-0.05, 0.05),
            rotate=(-aug.rotate, aug.rotate),
            border_mode=cv2.BORDER_REFLECT_101,
            p=aug.affine,
        ),
        A.OneOf(
            [
                A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2),
                A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10),
            ],
            p=aug.color,
        ),
        A.ToGray(p=aug.to_gray),
        A.GaussianBlur(blur_limit=(3, 5), p=aug.blur),
        A.Downscale(scale_range=(0.5, 0.9), p=aug.downscale),
        A.ImageCompression(quality_range=(q_lo, q_hi), p=aug.jpeg),
        A.GaussNoise(std_range=(0.01, 0.05), p=aug.noise),
        A.CoarseDropout(
            num_holes_range=(1, max(1, aug.dropout_holes)),
            hole_height_range=(0.05, 0.2),
            hole_width_range=(0.05, 0.2),
            fill=0,
            p=aug.dropout,
        ),
    ]
    return A.Compose(ops + _finish(size, mean, std), seed=seed)


def eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> A.Compose:
    """Resize + normalise only: deterministic, shared by validation, OOF and test inference."""
    return A.Compose(_finish(size, mean, std), seed=0)


def to_chw(image: np.ndarray) -> np.ndarray:
    """HWC float32 -> contiguous CHW, the layout torch expects."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))
