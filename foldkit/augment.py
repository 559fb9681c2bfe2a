"""The CPU augmentations, built from the config (a named factory, as in the DFDC 1st-place code).

They run in the loader's workers on uint8 images at their stored size and return uint8; resizing to
the network's input and normalising with the backbone's own mean/std happen on the device, in
``foldkit.device_transforms``, for training and evaluation alike (eval has no CPU transform at all).
"""

from __future__ import annotations

import albumentations as A
import cv2

from foldkit.config import AugmentConfig


def train_transform(aug: AugmentConfig, seed: int) -> A.Compose:
    """Flips, affine, colour, blur/downscale/JPEG/noise and coarse dropout on uint8 at the stored size.

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
    return A.Compose(ops, seed=seed)
