"""The synthetic shapes dataset (`vfnet data synth`): the embedded default training data.

Square RGB images of `size` px with 1-6 filled shapes of 4 classes (circle, square, triangle,
cross; COCO category ids 1-4). Class is told by shape only: colours are random vivid hues, sizes
span size/32 .. size/4 px (8-64 px at 256) with aspect ratios in [0.78, 1.28], placed wholly
inside the image with limited overlap (at most 30% of the smaller box). Backgrounds are dull,
smoothly varying colour with stripes; pixel noise covers everything. Boxes are the tight bounds
of the drawn pixels ([x, y, w, h], right/bottom edges exclusive), `area` the drawn pixel count.

Everything is drawn from `numpy.random.default_rng((seed, split, index))` per image, so the same
seed gives byte-identical PNG and json files.
"""
from __future__ import annotations

import colorsys
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vfnet.core.atomic import atomic_write, write_text
from vfnet.core.config import DataConfig
from vfnet.core.errors import ArgumentError

log = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "cross")
_MAX_OVERLAP = 0.3  # intersection / smaller box area
_MIN_CONTRAST = 150.0  # L1 RGB distance between a shape's colour and the background under it


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3]: a dull base colour, a smooth low-frequency field and stripes."""
    base = rng.uniform(60, 190) + rng.uniform(-20, 20, size=3)
    coarse = np.clip(128 + rng.normal(0, 30, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32) - 128
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    stripes = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    return base + smooth + stripes[..., None]


def _shape_mask(kind: str, w: int, h: int, flip: bool) -> Image.Image:
    """A w x h binary mask ('L', 255 inside) of one shape filling its box."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif kind == "square":
        draw.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif kind == "triangle":
        apex, base = (0, h - 1) if not flip else (h - 1, 0)
        draw.polygon([((w - 1) / 2, apex), (w - 1, base), (0, base)], fill=255)
    else:  # cross: a plus sign, arms a third of the box thick
        draw.rectangle([0, round(h / 3), w - 1, round(2 * h / 3) - 1], fill=255)
        draw.rectangle([round(w / 3), 0, round(2 * w / 3) - 1, h - 1], fill=255)
    return mask


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = box
    for px, py, pw, ph in placed:
        iw = min(x + w, px + pw) - max(x, px)
        ih = min(y + h, py + ph) - max(y, py)
        if iw > 0 and ih > 0 and iw * ih > _MAX_OVERLAP * min(w * h, pw * ph):
            return True
    return False


def _vivid_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A saturated colour far (L1) from the mean background colour `under` [3]."""
    colour = under
    for _ in range(20):
        rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.6, 1), rng.uniform(0.5, 1))
        colour = np.asarray(rgb, np.float32) * 255
        if np.abs(colour - under).sum() >= _MIN_CONTRAST:
            break
    return colour


def render_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image and its objects as dicts with `bbox` [x, y, w, h], `category_id`, `area`."""
    canvas = _background(rng, size)
    lo, hi = max(6, size // 32), max(6, size // 4)
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(1, 7))):
        label = int(rng.integers(len(CLASSES)))
        side, aspect = rng.uniform(lo, hi), np.exp(rng.uniform(-0.25, 0.25))
        w = int(np.clip(round(side * aspect), lo, hi))
        h = int(np.clip(round(side / aspect), lo, hi))
        flip = bool(rng.integers(2))
        for _ in range(30):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if not _overlaps((x, y, w, h), placed):
                break
        else:
            continue
        mask = np.asarray(_shape_mask(CLASSES[label], w, h, flip)) > 0
        region = canvas[y:y + h, x:x + w]
        region[mask] = _vivid_colour(rng, region[mask].mean(axis=0))
        rows, cols = np.nonzero(mask)
        placed.append((x, y, w, h))
        objects.append({
            "bbox": [float(x + cols.min()), float(y + rows.min()),
                     float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)],
            "category_id": label + 1,
            "area": float(mask.sum()),
        })
    canvas += rng.normal(0, 6, size=canvas.shape).astype(np.float32)
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8)), objects


def synthesize(out_dir: str | Path, *, images: int = 512, size: int = 256, seed: int = 0) -> dict[str, int]:
    """Write `out_dir/images/{train,val}/NNNNNN.png` and `out_dir/annotations/{train,val}.json`
    (`images` training images, max(1, images // 4) validation images, `size` x `size` px).
    The json files are written last, each atomically. Returns image and box counts per split."""
    if images < 1:
        raise ArgumentError(f"images must be >= 1, got {images}")
    if size < 32:
        raise ArgumentError(f"size must be >= 32 px, got {size}")
    if seed < 0:
        raise ArgumentError(f"seed must be >= 0, got {seed}")
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    stats: dict[str, int] = {}
    for split_index, (split, count) in enumerate((("train", images), ("val", max(1, images // 4)))):
        image_dir = out_dir / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        entries, annotations = [], []
        for i in tqdm(range(count), desc=f"synth {split}", unit="img",
                       disable=not sys.stderr.isatty()):
            image, objects = render_image(np.random.default_rng((seed, split_index, i)), size)
            name = f"{i + 1:06d}.png"
            with atomic_write(image_dir / name) as fh:
                image.save(fh, format="PNG")
            entries.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
        data = {
            "info": {"description": "vfnet synthetic shapes", "images": images, "size": size, "seed": seed},
            "images": entries, "annotations": annotations, "categories": categories,
        }
        text = json.dumps(data, separators=(",", ":"))
        write_text(out_dir / "annotations" / f"{split}.json", text)
        stats[f"{split}_images"], stats[f"{split}_boxes"] = count, len(annotations)
    log.info("synthesized shapes data in %s: %s", out_dir, stats)
    return stats


def ensure_synth(data_cfg: DataConfig) -> bool:
    """Generate the shapes data at `data.synth_dir` unless it is there with the same
    images/size/seed; True when it was (re)generated."""
    root = Path(data_cfg.synth_dir)
    want = {"images": data_cfg.synth_images, "size": data_cfg.synth_size, "seed": data_cfg.synth_seed}
    try:
        if (root / "annotations" / "val.json").is_file():
            info = json.loads((root / "annotations" / "train.json").read_text()).get("info", {})
            if all(info.get(k) == v for k, v in want.items()):
                return False
    except (OSError, ValueError, AttributeError):
        pass  # incomplete or foreign files: regenerate
    (root / "annotations" / "val.json").unlink(missing_ok=True)  # written last: marks completion
    synthesize(root, **want)
    return True
