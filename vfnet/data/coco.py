"""COCO-format detection data: the json dataset, the `Sample`/`Batch` formats and `collate`.

Boxes are read as COCO [x, y, w, h] (pixels, continuous edge coordinates), clipped to the image
and kept as xywh per image; a `Sample` holds them as xyxy in the resized image. Category ids map
to contiguous labels 0..C-1 in increasing id order (`cat_ids[label]` is the COCO id). Crowd boxes
(`iscrowd` = 1) are not targets; boxes narrower or shorter than 1 px after clipping to the image
(which includes boxes wholly outside it) are dropped with one counted warning per dataset.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vfnet.data.transforms import Transform
from vfnet.errors import DatasetError
from vfnet.optional import require

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One transformed image and its targets."""

    image: torch.Tensor  # float32 [3, h, w], normalised, after resize and flip
    boxes: torch.Tensor  # float32 [n, 4] x1 y1 x2 y2, pixels of the resized image
    labels: torch.Tensor  # int64 [n], contiguous 0..C-1
    image_id: int  # the COCO image id
    orig_size: tuple[int, int]  # (H0, W0) of the original image, pixels
    scale: tuple[float, float]  # (sx, sy) = resized / original


@dataclass
class Batch:
    """A padded batch of samples (see `collate`)."""

    images: torch.Tensor  # float32 [B, 3, Hp, Wp], zero-padded bottom/right
    boxes: list[torch.Tensor]  # B x float32 [n_i, 4] xyxy, resized-image pixels
    labels: list[torch.Tensor]  # B x int64 [n_i]
    image_sizes: torch.Tensor  # int64 [B, 2] (h, w) resized, unpadded
    scales: torch.Tensor  # float32 [B, 2] (sx, sy)
    orig_sizes: torch.Tensor  # int64 [B, 2] (H0, W0)
    image_ids: list[int]

    def __len__(self) -> int:
        return len(self.image_ids)

    def _map(self, fn) -> Batch:
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = fn(value)
            elif f.name in ("boxes", "labels"):
                value = [fn(v) for v in value]
            values[f.name] = value
        return Batch(**values)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory (called by DataLoader(pin_memory=True))."""
        return self._map(lambda t: t.pin_memory())


def collate(samples: list[Sample], size_divisor: int = 32) -> Batch:
    """Stack samples into a `Batch`, zero-padding images bottom/right to a common size that is
    a multiple of `size_divisor`."""
    if not samples:
        raise ValueError("collate: samples is empty")
    if size_divisor < 1:
        raise ValueError(f"collate: size_divisor must be >= 1, got {size_divisor}")
    sizes = [tuple(s.image.shape[1:]) for s in samples]
    pad_h = math.ceil(max(h for h, _ in sizes) / size_divisor) * size_divisor
    pad_w = math.ceil(max(w for _, w in sizes) / size_divisor) * size_divisor
    images = samples[0].image.new_zeros((len(samples), 3, pad_h, pad_w))
    for i, (s, (h, w)) in enumerate(zip(samples, sizes)):
        images[i, :, :h, :w] = s.image
    return Batch(
        images=images,
        boxes=[s.boxes for s in samples],
        labels=[s.labels for s in samples],
        image_sizes=torch.tensor(sizes, dtype=torch.int64),
        scales=torch.tensor([s.scale for s in samples], dtype=torch.float32),
        orig_sizes=torch.tensor([s.orig_size for s in samples], dtype=torch.int64),
        image_ids=[int(s.image_id) for s in samples],
    )


@dataclass
class ImageRecord:
    """One image's entry and its training targets."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # float64 [n, 4] x y w h, clipped to the image
    labels: np.ndarray  # int64 [n] contiguous


def read_json(ann_file: str | Path) -> dict[str, Any]:
    """Read a COCO annotation file; DatasetError when missing, unreadable or not COCO-shaped."""
    ann_file = Path(ann_file)
    try:
        with ann_file.open("rb") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DatasetError(f"{ann_file}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{ann_file}: cannot read annotation file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{ann_file}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing or invalid key {key!r} (expected a list)")
    return data


def _field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DatasetError(f"{where}: field {key!r} has invalid value {value!r}")
    return value


def parse_coco(data: dict[str, Any], source: str | Path) -> tuple[list[ImageRecord], list[int], list[str]]:
    """Turn a COCO dict into per-image records (file order), `cat_ids` and class names.

    Raises DatasetError naming `source` and the entry at fault (duplicate ids, an annotation
    with an unknown category or image id, a malformed bbox)."""
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        cid = _field(cat, "id", int, f"{source}: categories[{i}]")
        if cid in cats:
            raise DatasetError(f"{source}: duplicate category id {cid}")
        cats[cid] = str(_field(cat, "name", str, f"{source}: category {cid}"))
    cat_ids = sorted(cats)
    label_of = {cid: label for label, cid in enumerate(cat_ids)}

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        where = f"{source}: images[{i}]"
        iid = _field(img, "id", int, where)
        if iid in images:
            raise DatasetError(f"{source}: duplicate image id {iid}")
        images[iid] = {
            "file_name": _field(img, "file_name", str, where),
            "width": _field(img, "width", int, where),
            "height": _field(img, "height", int, where),
            "boxes": [],
            "labels": [],
        }

    dropped = 0
    for i, ann in enumerate(data["annotations"]):
        aid = ann.get("id", f"[{i}]") if isinstance(ann, dict) else f"[{i}]"
        where = f"{source}: annotation {aid}"
        iid = _field(ann, "image_id", int, where)
        cid = _field(ann, "category_id", int, where)
        if iid not in images:
            raise DatasetError(f"{where}: unknown image id {iid}")
        if cid not in label_of:
            raise DatasetError(f"{where}: unknown category id {cid}")
        if ann.get("iscrowd", 0):
            continue
        bbox = _field(ann, "bbox", list, where)
        if len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
        ):
            raise DatasetError(f"{where}: field 'bbox' must be 4 finite numbers, got {bbox!r}")
        img = images[iid]
        x, y, w, h = (float(v) for v in bbox)
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
        if x2 - x1 < 1.0 or y2 - y1 < 1.0:
            dropped += 1
            continue
        img["boxes"].append((x1, y1, x2 - x1, y2 - y1))
        img["labels"].append(label_of[cid])
    if dropped:
        log.warning("%s: dropped %d degenerate boxes (w or h < 1 px after clipping to the image)",
                    source, dropped)

    records = [
        ImageRecord(
            image_id=iid, file_name=img["file_name"], width=img["width"], height=img["height"],
            boxes=np.asarray(img["boxes"], dtype=np.float64).reshape(-1, 4),
            labels=np.asarray(img["labels"], dtype=np.int64),
        )
        for iid, img in images.items()
    ]
    return records, cat_ids, [cats[c] for c in cat_ids]


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels;
    DatasetError naming the file when missing or unreadable."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for corrupt files
        raise DatasetError(f"{path}: cannot read image: {exc}") from None


def decode_image(source: Path | bytes, name: str | Path) -> Image.Image:
    """Open an image file or encoded bytes as RGB (grayscale, palette, RGBA, CMYK converted);
    DatasetError naming `name` when missing or unreadable."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except FileNotFoundError:
        raise DatasetError(f"{name}: image file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for corrupt files
        raise DatasetError(f"{name}: cannot read image: {exc}") from None


def make_sample(image: Image.Image, record: ImageRecord, transform: Transform,
                rng: np.random.Generator | None = None, name: str | Path = "") -> Sample:
    """Apply `transform` to a decoded RGB image and its record's targets."""
    if image.size != (record.width, record.height):
        raise DatasetError(
            f"{name or record.file_name}: image is {image.size[0]}x{image.size[1]} but the "
            f"annotations say {record.width}x{record.height}"
        )
    b = record.boxes
    xyxy = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
    out = transform(image, xyxy, rng)
    return Sample(
        image=out.image, boxes=out.boxes, labels=torch.from_numpy(record.labels.copy()),
        image_id=record.image_id, orig_size=(record.height, record.width), scale=out.scale,
    )


class CocoDetection(Dataset):
    """A COCO json annotation file plus its image directory; items are `Sample`s.

    `check_files` stats every image at construction so a wrong directory fails at once; a
    missing or unreadable image otherwise raises DatasetError when its item is loaded."""

    def __init__(self, ann_file: str | Path, images_dir: str | Path,
                 transform: Transform | None = None, *, check_files: bool = True) -> None:
        self.ann_file = Path(ann_file)
        self.images_dir = Path(images_dir)
        self.transform = transform if transform is not None else Transform()
        data = read_json(self.ann_file)
        self.records, self.cat_ids, self.class_names = parse_coco(data, self.ann_file)
        if check_files:
            if not self.images_dir.is_dir():
                raise DatasetError(f"{self.images_dir}: image directory not found")
            missing = [r.file_name for r in self.records if not (self.images_dir / r.file_name).is_file()]
            if missing:
                raise DatasetError(
                    f"{self.images_dir / missing[0]}: image file not found "
                    f"({len(missing)} of {len(self.records)} images of {self.ann_file} missing)"
                )
        self._data = data

    @functools.cached_property
    def coco(self) -> Any:
        """The pycocotools `COCO` index of the annotations (built on first use: only evaluation
        needs it, and pycocotools)."""
        coco = require("pycocotools.coco", "COCO evaluation").COCO()
        coco.dataset = self._data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index, self.transform)

    def sample(self, index: int, transform: Transform, rng: np.random.Generator | None = None) -> Sample:
        """Item `index` through `transform` with random choices drawn from `rng`."""
        record = self.records[index]
        path = self.images_dir / record.file_name
        return make_sample(decode_image(path, path), record, transform, rng, path)
