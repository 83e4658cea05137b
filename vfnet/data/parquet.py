"""Parquet shards of a COCO dataset (`vfnet data pack`) and the dataset that reads them back.

One row per image (docs/design.md §4): `image_id` int64, `file_name` string, `width`/`height` int32,
`image` binary (the encoded file bytes, unchanged), `boxes` list<list<double>> ([x, y, w, h]
pixels, already clipped, crowd and degenerate boxes removed as in `CocoDetection`), `labels`
list<int64> (contiguous). The schema metadata key `vfnet.categories` holds the categories as JSON
`[{"id": ..., "name": ...}, ...]` in label order. Shards are `part-NNNNN.parquet`, written with
page checksums (CRC32) that `ParquetDetection` verifies: a flipped bit in the data is an error,
not a silently different image id or box.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import Dataset
from tqdm import tqdm

from vfnet.core.atomic import atomic_write
from vfnet.core.errors import ArgumentError, DatasetError, one_line
from vfnet.data.coco import (
    DEFAULT_MAX_IMAGE_PIXELS,
    CocoDetection,
    ImageRecord,
    Sample,
    decode_image,
    make_sample,
    read_image_size,
)
from vfnet.data.transforms import Transform

log = logging.getLogger(__name__)

CATEGORIES_KEY = b"vfnet.categories"
SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image", pa.binary()),
    ("boxes", pa.list_(pa.list_(pa.float64()))),
    ("labels", pa.list_(pa.int64())),
])
_META_COLUMNS = [name for name in SCHEMA.names if name != "image"]


def pack(ann_file: str | Path, images_dir: str | Path, out_dir: str | Path, *,
         rows_per_shard: int = 256, row_group_size: int = 16,
         max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[Path]:
    """Write a COCO json dataset as Parquet shards of `rows_per_shard` images into `out_dir`
    (earlier `part-*.parquet` there are replaced). Small row groups keep random access cheap.
    Returns the shard paths. DatasetError for bad annotations or unreadable images, or images of
    more than `max_image_pixels` pixels."""
    if rows_per_shard < 1 or row_group_size < 1:
        raise ArgumentError(f"rows_per_shard and row_group_size must be >= 1, got "
                         f"{rows_per_shard}, {row_group_size}")
    dataset = CocoDetection(ann_file, images_dir, max_image_pixels=max_image_pixels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("part-*.parquet"):
        stale.unlink()
    categories = [{"id": c, "name": n} for c, n in zip(dataset.cat_ids, dataset.class_names)]
    schema = SCHEMA.with_metadata({CATEGORIES_KEY: json.dumps(categories).encode()})
    records = dataset.records
    shards = []
    with tqdm(total=len(records), desc=f"pack {out_dir.name}", unit="img",
              disable=not sys.stderr.isatty()) as bar:
        for start in range(0, max(len(records), 1), rows_per_shard):
            chunk = records[start:start + rows_per_shard]
            columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
            for r in chunk:
                path = dataset.images_dir / r.file_name
                columns["image"].append(_read_checked(path, r, max_image_pixels))
                columns["image_id"].append(r.image_id)
                columns["file_name"].append(r.file_name)
                columns["width"].append(r.width)
                columns["height"].append(r.height)
                columns["boxes"].append(r.boxes.tolist())
                columns["labels"].append(r.labels.tolist())
                bar.update()
            shard = out_dir / f"part-{len(shards):05d}.parquet"
            with atomic_write(shard) as fh:
                pq.write_table(pa.table(columns, schema=schema), fh, row_group_size=row_group_size,
                               write_page_checksum=True)
            shards.append(shard)
    log.info("packed %d images of %s into %d shards in %s", len(records), ann_file, len(shards), out_dir)
    return shards


def _read_checked(path: Path, record: ImageRecord, max_pixels: int) -> bytes:
    """The file's bytes, after checking that its header decodes to the annotated size."""
    size = read_image_size(path, max_pixels)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read image: {exc.strerror or exc}") from None
    if size != (record.width, record.height):
        raise DatasetError(f"{path}: image is {size[0]}x{size[1]} but the annotations say "
                           f"{record.width}x{record.height}")
    return data


def record_from_row(row: dict[str, Any]) -> ImageRecord:
    """The targets of one shard row (as a dict of Python or NumPy values); DatasetError when a
    value is missing (null) or malformed."""
    name = f"row image_id={row.get('image_id')!r}"
    try:
        boxes = [np.asarray(b, dtype=np.float64) for b in row["boxes"]]
        record = ImageRecord(
            image_id=int(row["image_id"]),
            file_name=str(row["file_name"]),
            width=int(row["width"]),
            height=int(row["height"]),
            boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            labels=np.asarray(row["labels"], dtype=np.int64).reshape(-1),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{name}: malformed targets: {one_line(exc)}") from None
    if not np.isfinite(record.boxes).all():
        raise DatasetError(f"{name}: boxes are not all finite")
    if len(record.labels) != len(record.boxes):
        raise DatasetError(f"{name}: {len(record.boxes)} boxes but {len(record.labels)} labels")
    return record


def _check_labels(record: ImageRecord, num_classes: int, name: str) -> None:
    if record.labels.size and not (0 <= record.labels.min() and record.labels.max() < num_classes):
        raise DatasetError(f"{name}: labels {record.labels.tolist()[:20]} outside 0..{num_classes - 1}")


def decode_row(row: dict[str, Any], transform: Transform, cat_ids: list[int],
               rng: np.random.Generator | None = None, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Sample:
    """A `Sample` from one shard row (e.g. read by a Ray worker); a pure function of its arguments
    (and `rng`). `cat_ids` (label -> COCO id) checks the labels' range; an image of more than
    `max_image_pixels` pixels is a DatasetError."""
    record = record_from_row(row)
    name = f"row image_id={record.image_id} ({record.file_name})"
    _check_labels(record, len(cat_ids), name)
    return make_sample(decode_image(bytes(row["image"]), name, max_image_pixels), record, transform, rng, name)


def read_categories(shard: str | Path, filesystem: Any = None) -> tuple[list[int], list[str]]:
    """(cat_ids, class_names) stored in a shard's schema metadata, after checking that the
    shard is a readable Parquet file with the columns of `SCHEMA`; DatasetError otherwise.
    `filesystem`: a `pyarrow.fs` file system holding `shard` (default: the local disk)."""
    try:
        schema = pq.read_schema(shard, filesystem=filesystem)
    except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: e.g. a name not UTF-8
        raise DatasetError(f"{shard}: not a readable Parquet file: {one_line(exc)}") from None
    for expected in SCHEMA:
        index = schema.get_field_index(expected.name)
        if index < 0 or not schema.field(index).type.equals(expected.type):
            found = "missing" if index < 0 else f"of type {schema.field(index).type}"
            raise DatasetError(f"{shard}: not a vfnet shard: column {expected.name!r} is {found} "
                               f"(expected {expected.type})")
    try:
        cats = json.loads((schema.metadata or {})[CATEGORIES_KEY])
        if not isinstance(cats, list) or not all(
                isinstance(c, dict) and type(c.get("id")) is int and isinstance(c.get("name"), str) for c in cats):
            raise ValueError("not a list of {id, name}")
        return [c["id"] for c in cats], [c["name"] for c in cats]
    except (KeyError, ValueError, RecursionError):
        raise DatasetError(f"{shard}: schema metadata {CATEGORIES_KEY.decode()!r} missing or invalid") from None


class ParquetDetection(Dataset):
    """The shards written by `pack`, as a dataset of `Sample`s equal to `CocoDetection`'s.

    Targets are read at construction; image bytes are read per item (one small row group); an
    image of more than `max_image_pixels` pixels is a DatasetError when its item is loaded."""

    def __init__(self, shard_dir: str | Path, transform: Transform | None = None, *,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.shard_dir = Path(shard_dir)
        self.max_image_pixels = max_image_pixels
        self.transform = transform if transform is not None else Transform()
        self.files = sorted(self.shard_dir.glob("*.parquet"))
        if not self.files:
            raise DatasetError(f"{self.shard_dir}: no .parquet shards found")
        self.cat_ids, self.class_names = read_categories(self.files[0])
        self.records: list[ImageRecord] = []
        self._where: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        for f_idx, path in enumerate(self.files):
            if read_categories(path) != (self.cat_ids, self.class_names):
                raise DatasetError(f"{path}: categories differ from those of {self.files[0]}")
            try:
                pf = pq.ParquetFile(path, page_checksum_verification=True)
                groups = [pf.read_row_group(rg, columns=_META_COLUMNS).to_pylist()
                          for rg in range(pf.num_row_groups)]
            except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: e.g. a name not UTF-8
                raise DatasetError(f"{path}: cannot read shard: {one_line(exc)}") from None
            for rg, rows in enumerate(groups):
                for i, row in enumerate(rows):
                    try:
                        record = record_from_row(row)
                        _check_labels(record, len(self.cat_ids), f"row image_id={record.image_id}")
                    except DatasetError as exc:
                        raise DatasetError(f"{path}: row group {rg} row {i}: {exc}") from None
                    self.records.append(record)
                    self._where.append((f_idx, rg, i))
        self._cache: tuple[tuple[int, int], pa.ChunkedArray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index, self.transform)

    def sample(self, index: int, transform: Transform, rng: np.random.Generator | None = None) -> Sample:
        """Item `index` through `transform` with random choices drawn from `rng`."""
        f_idx, rg, row = self._where[index]
        if self._cache is None or self._cache[0] != (f_idx, rg):
            try:
                shard = pq.ParquetFile(self.files[f_idx], page_checksum_verification=True)
                column = shard.read_row_group(rg, columns=["image"])["image"]
            except (OSError, ValueError, pa.ArrowException) as exc:  # ValueError: e.g. a name not UTF-8
                raise DatasetError(f"{self.files[f_idx]}: cannot read row group {rg}: {one_line(exc)}") from None
            self._cache = ((f_idx, rg), column)
        record = self.records[index]
        name = f"{self.files[f_idx]}: image_id={record.image_id} ({record.file_name})"
        image = decode_image(self._cache[1][row].as_py(), name, self.max_image_pixels)
        return make_sample(image, record, transform, rng, name)
