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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vfnet.core.config import DataConfig
from vfnet.core.errors import DatasetError, one_line
from vfnet.core.optional import require
from vfnet.data.transforms import Transform

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
    # B x (h, w) Python ints: each image's own padded extent (image_sizes rounded up to the size
    # divisor), for the ATSS assignment (`VFNet.loss`), read on the host without a device
    # synchronisation; empty in a Batch built without them
    padded_sizes: list[tuple[int, int]] = field(default_factory=list)

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
        padded_sizes=[(-(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor) for h, w in sizes],
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
    except OSError as exc:
        raise DatasetError(f"{ann_file}: cannot read annotation file: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number with too many digits
        raise DatasetError(f"{ann_file}: not valid JSON: {one_line(exc)[:300]}") from None
    except RecursionError:
        raise DatasetError(f"{ann_file}: not COCO json: nested too deeply to read") from None
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
        raise DatasetError(f"{where}: field {key!r} has invalid value {_preview(value)}")
    return value


_MAX_SIZE = 1 << 20  # image sides above a million pixels are not real images


def _size(entry: dict[str, Any], key: str, where: str) -> int:
    value = _field(entry, key, int, where)
    if not 1 <= value <= _MAX_SIZE:
        raise DatasetError(f"{where}: field {key!r} must be an image side in pixels (1..{_MAX_SIZE}), "
                           f"got {value!r}")
    return value


def _finite_float(v: Any) -> float | None:
    """A JSON number (not a bool) as a finite float; None for anything else, an integer too
    large for a float (10**400) included."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _bbox(ann: dict[str, Any], where: str) -> tuple[float, float, float, float]:
    """An annotation's bbox [x, y, w, h] as 4 finite floats; DatasetError otherwise."""
    bbox = _field(ann, "bbox", list, where)
    values = [_finite_float(v) for v in bbox] if len(bbox) == 4 else []
    if len(values) != 4 or None in values:
        raise DatasetError(f"{where}: field 'bbox' must be 4 finite numbers, got {_preview(bbox)}")
    return values[0], values[1], values[2], values[3]


def _crowd(ann: dict[str, Any], where: str) -> bool:
    value = ann.get("iscrowd", 0)
    if value not in (0, 1) or isinstance(value, float):
        raise DatasetError(f"{where}: field 'iscrowd' must be 0 or 1, got {_preview(value)}")
    return bool(value)


def _preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
            "width": _size(img, "width", where),
            "height": _size(img, "height", where),
            "boxes": [],
            "labels": [],
        }

    dropped = 0
    for i, ann in enumerate(data["annotations"]):
        aid = ann.get("id") if isinstance(ann, dict) else None
        named = isinstance(aid, int) and not isinstance(aid, bool)
        where = f"{source}: annotation {aid}" if named else f"{source}: annotations[{i}]"
        iid = _field(ann, "image_id", int, where)
        cid = _field(ann, "category_id", int, where)
        if iid not in images:
            raise DatasetError(f"{where}: unknown image id {iid}")
        if cid not in label_of:
            raise DatasetError(f"{where}: unknown category id {cid}")
        x, y, w, h = _bbox(ann, where)
        if _crowd(ann, where):
            continue
        img = images[iid]
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


DEFAULT_MAX_IMAGE_PIXELS = DataConfig.max_image_pixels  # 2^27 = 134 MP (e.g. 11585 x 11585)


@contextlib.contextmanager
def open_image(source: Path | bytes, name: str | Path,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """`PIL.Image.open` of a file or encoded bytes, refused when larger than `max_pixels`
    (width x height, from the header, before any pixel is decoded; `data.max_image_pixels`).
    Whatever PIL raises on bad bytes (a missing file, an unknown or truncated format, a
    decompression bomb, an unsupported mode) becomes a DatasetError naming `name`, also when it
    happens inside the block (e.g. `img.load()`)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL refuses above twice its own limit: never below ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            img = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
        with img:
            width, height = img.size
            if width < 1 or height < 1:
                raise DatasetError(f"{name}: image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise DatasetError(_too_large(name, max_pixels, width * height))
            yield img
    except (FileNotFoundError, IsADirectoryError):
        raise DatasetError(f"{name}: image file not found") from None
    except Image.DecompressionBombError as exc:
        raise DatasetError(_too_large(name, max_pixels, None, exc)) from None
    except (DatasetError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise ~10 exception types on bad bytes
        raise DatasetError(f"{name}: cannot read image: {type(exc).__name__}: {one_line(exc)}") from None


def _too_large(name: str | Path, max_pixels: int, pixels: int | None, exc: Exception | None = None) -> str:
    size = f"{pixels} pixels" if pixels is not None else one_line(exc)
    return (f"{name}: image too large ({size}; data.max_image_pixels = {max_pixels}): "
            "raise data.max_image_pixels to read it")


def read_image_size(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels;
    DatasetError naming the file when missing, unreadable or above `max_pixels`."""
    with open_image(path, path, max_pixels) as img:
        return img.size


def decode_image(source: Path | bytes, name: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file or encoded bytes as RGB (grayscale, palette, RGBA, CMYK converted;
    16-bit grayscale mapped 0..65535 -> 0..255, 32-bit int or float grayscale by its own
    min..max); DatasetError naming `name` when missing, unreadable or above `max_pixels`."""
    with open_image(source, name, max_pixels) as img:
        img.load()
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode.startswith("I;16"):  # PIL would clip to 0..255: map the 16-bit range instead
            img = Image.fromarray((np.asarray(img, dtype=np.uint32) // 257).astype(np.uint8))
        elif img.mode in ("I", "F"):  # 32-bit int or float: no fixed range, use the image's own
            img = Image.fromarray(_to_uint8(np.asarray(img)))
        return img.convert("RGB") if img.mode != "RGB" else img.copy()


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """A 32-bit int or float single-channel image scaled to 0..255 by its own min..max."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return scaled.astype(np.uint8)


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


def evaluation_dataset(data: dict[str, Any]) -> dict[str, Any]:
    """The ground truth as pycocotools needs it, from a COCO dict that `parse_coco` accepted:
    images (id, file_name, width, height), categories (id, name) and every annotation with its
    position from 1 as `id`, `bbox` as 4 floats, `iscrowd` 0/1 and `area` (w * h unless the file
    gives a finite non-negative number)."""
    annotations = []
    for i, ann in enumerate(data["annotations"]):
        bbox = _bbox(ann, "")
        area = _finite_float(ann.get("area"))
        if area is None or area < 0:
            area = bbox[2] * bbox[3]
        annotations.append({"id": i + 1, "image_id": ann["image_id"], "category_id": ann["category_id"],
                            "bbox": list(bbox), "area": area, "iscrowd": int(_crowd(ann, ""))})
    return {
        "images": [{k: img[k] for k in ("id", "file_name", "width", "height")} for img in data["images"]],
        "categories": [{"id": c["id"], "name": c["name"]} for c in data["categories"]],
        "annotations": annotations,
    }


class CocoDetection(Dataset):
    """A COCO json annotation file plus its image directory; items are `Sample`s.

    `check_files` stats every image at construction so a wrong directory fails at once; a
    missing or unreadable image otherwise raises DatasetError when its item is loaded, as does
    an image of more than `max_image_pixels` pixels (an attribute, so the limit goes with the
    dataset into loader worker processes however they are started)."""

    def __init__(self, ann_file: str | Path, images_dir: str | Path, transform: Transform | None = None, *,
                 check_files: bool = True, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.ann_file = Path(ann_file)
        self.max_image_pixels = max_image_pixels
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
        coco.dataset = evaluation_dataset(self._data)
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
        return make_sample(decode_image(path, path, self.max_image_pixels), record, transform, rng, path)
