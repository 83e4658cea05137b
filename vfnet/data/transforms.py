"""Image + box transforms: keep-ratio resize, random horizontal flip, normalisation.

A `Transform` maps an RGB image (PIL image or uint8 array [H, W, 3]) and its boxes (float
[n, 4], x1 y1 x2 y2 in pixels, continuous edge coordinates: a box covering pixel columns 0..9
has x1 = 0, x2 = 10) to a normalised float32 tensor [3, h, w], the boxes in the resized image
and the per-axis scale (sx, sy) = resized / original size.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vfnet.core.config import DataConfig


@dataclass
class Transformed:
    """The output of a `Transform`."""

    image: torch.Tensor  # float32 [3, h, w], normalised
    boxes: torch.Tensor  # float32 [n, 4] xyxy pixels of the resized image
    scale: tuple[float, float]  # (sx, sy) = resized width / original width, height / height


def rescale_size(width: int, height: int, long_side: int, short_side: int) -> tuple[int, int]:
    """Keep-ratio size fitting (long_side, short_side): the largest scale with the long side
    <= long_side and the short side <= short_side. Returns (new_width, new_height), >= 1 px."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    scale = min(long_side / max(width, height), short_side / min(width, height))
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror xyxy boxes [n, 4] horizontally in an image `width` pixels wide."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


@dataclass
class Transform:
    """Resize (one [long, short] of `scales`, sampled per image; or, with `scale_range` = (a, b),
    a [long, short] drawn per image with long uniform in the integers between a's and b's long
    sides and short likewise, both ends included: mmdetection's `RandomResize` with two scales and
    keep_ratio), flip with `flip_prob`, normalise with `mean`/`std` (RGB, 0-255 scale). Empty
    `scales` and no `scale_range` = keep the input size."""

    scales: list[tuple[int, int]] = field(default_factory=list)
    scale_range: tuple[tuple[int, int], tuple[int, int]] | None = None
    flip_prob: float = 0.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")
        for s in self.scales:
            if len(s) != 2 or min(s) <= 0:
                raise ValueError(f"scales must be positive [long, short] pairs, got {s}")
        if self.scale_range is not None:
            if len(self.scale_range) != 2 or any(len(s) != 2 or min(s) <= 0 for s in self.scale_range):
                raise ValueError(f"scale_range must be two positive [long, short] pairs, got {self.scale_range}")
            if self.scales:
                raise ValueError("scales and scale_range are exclusive")

    def __call__(
        self, image: Image.Image | np.ndarray, boxes: np.ndarray | torch.Tensor,
        rng: np.random.Generator | None = None,
    ) -> Transformed:
        """`rng` drives the scale choice and the flip (a fresh unseeded one when None)."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        if image.mode != "RGB":
            raise ValueError(f"image must be RGB, got mode {image.mode}")
        boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
        if rng is None and (len(self.scales) > 1 or self.scale_range is not None or self.flip_prob > 0):
            rng = np.random.default_rng(random.getrandbits(64))
        width, height = image.size
        sx = sy = 1.0
        if self.scales or self.scale_range is not None:
            long_side, short_side = self.sample_scale(rng)
            new_w, new_h = rescale_size(width, height, long_side, short_side)
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.BILINEAR)
            sx, sy = new_w / width, new_h / height
            boxes_t = boxes_t * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        if self.flip_prob > 0 and rng.random() < self.flip_prob:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes_t = flip_boxes(boxes_t, image.size[0])
        pixels = np.asarray(image, dtype=np.float32)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return Transformed(tensor, boxes_t, (sx, sy))

    def sample_scale(self, rng: np.random.Generator | None) -> tuple[int, int]:
        """The [long, short] bound of one image (see the class docstring)."""
        if self.scale_range is not None:
            (l0, s0), (l1, s1) = self.scale_range
            return (int(rng.integers(min(l0, l1), max(l0, l1) + 1)),
                    int(rng.integers(min(s0, s1), max(s0, s1) + 1)))
        pick = int(rng.integers(len(self.scales))) if len(self.scales) > 1 else 0
        return self.scales[pick]


def build_transform(data_cfg: DataConfig, train: bool) -> Transform:
    """The training transform (multi-scale when `data.multiscale` or `data.scale_range` is set,
    random flip) or the evaluation one (`data.img_scale`, no flip)."""
    if train and data_cfg.scale_range:
        (a, b) = data_cfg.scale_range
        return Transform(scale_range=((int(a[0]), int(a[1])), (int(b[0]), int(b[1]))),
                         flip_prob=data_cfg.flip_prob, mean=tuple(data_cfg.mean), std=tuple(data_cfg.std))
    scales = data_cfg.multiscale if train and data_cfg.multiscale else [data_cfg.img_scale]
    return Transform(
        scales=[(int(s[0]), int(s[1])) for s in scales],
        flip_prob=data_cfg.flip_prob if train else 0.0,
        mean=tuple(data_cfg.mean),
        std=tuple(data_cfg.std),
    )
