"""Training data for Ray Train: the Parquet shards of `vfnet data pack`, read by row group.

The driver resolves the shards (`prepare_train_shards`: `data.train_parquet` when set, else the
COCO json + images packed once into a cache directory keyed by their content) and lists their
row groups from the Parquet footers (`row_groups`). Every worker then reads the rows it needs
straight from the shards' file system (local disk or object store), so the images need not sit
on every node's disk; the COCO json stays the evaluation ground truth (rank 0).

Which images an iteration trains on is a pure function of the seed, the epoch and the iteration,
whatever the number of workers (`epoch_order`, `ShardBatches`): the epoch's order of the rows,
then iteration j takes positions j x G .. (j + 1) x G - 1 of it (G = the global batch) and rank
r of W workers its G / W consecutive positions. A run that resumes at iteration i, after a
restart or a resize of an elastic run, trains on exactly the images of the epoch not seen before
i: nothing is skipped or repeated but the iterations since the last registered checkpoint.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestration.storage import RunStorage
from vfnet.core.atomic import write_text
from vfnet.core.config import Config, DataConfig
from vfnet.core.errors import DatasetError, one_line
from vfnet.data.coco import Batch, collate
from vfnet.data.parquet import decode_row, pack, read_categories
from vfnet.data.transforms import build_transform

log = logging.getLogger(__name__)

SHARD_GLOB = "part-*.parquet"
_COMPLETE = "_COMPLETE"  # written last into a cache entry: its shards are all there


@dataclass(frozen=True)
class Shards:
    """A directory of packed shards in a `pyarrow.fs` file system (local disk or object store)."""

    fs: Any
    directory: str

    def files(self) -> list[str]:
        """The `part-*.parquet` shards, sorted; DatasetError if there are none."""
        selector = pafs.FileSelector(self.directory, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{self.directory}: cannot list the shards: {one_line(exc)}") from None
        shards = sorted(i.path for i in infos if i.type == pafs.FileType.File
                        and fnmatch.fnmatch(i.base_name, SHARD_GLOB))
        if not shards:
            raise DatasetError(f"{self.directory}: no {SHARD_GLOB} shards (data.train_parquet)")
        return shards


def shards_at(location: str | Path) -> Shards:
    """The shards at a local directory or a URI (`data.train_parquet`)."""
    storage = RunStorage.parse(location)
    return Shards(storage.fs, storage.root)


def content_key(ann_file: str | Path, images_dir: str | Path) -> str:
    """A key that changes when the annotation file or any file of the image directory changes:
    sha256 of the annotation bytes, the image directory's resolved path and the (name, size,
    mtime) of every entry in it; 16 hex digits."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    digest = hashlib.sha256()
    try:
        digest.update(ann_file.read_bytes())
    except OSError as exc:
        raise DatasetError(f"{ann_file}: cannot read the annotation file: {exc}") from None
    digest.update(str(images_dir.resolve()).encode())
    try:
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(images_dir))
    except OSError as exc:
        raise DatasetError(f"{images_dir}: cannot list the image directory: {exc}") from None
    for name, size, mtime in entries:
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def prepare_train_shards(data_cfg: DataConfig, cache: RunStorage | str | Path) -> Shards:
    """The training shards: `data.train_parquet` when set (a directory or a URI), else
    `cache/<content key>/` holding `data.train_ann` + `data.train_images` packed (done once;
    later calls with unchanged files reuse it). The entry is complete once its `_COMPLETE`
    marker exists: on a local disk the entry is built in a temporary directory and renamed into
    place, on an object store the shards are packed locally, uploaded, and the marker written
    last, so an interrupted pack never looks complete."""
    if data_cfg.train_parquet:
        shards = shards_at(data_cfg.train_parquet)
        shards.files()
        return shards
    cache = cache if isinstance(cache, RunStorage) else RunStorage.parse(cache)
    key = content_key(data_cfg.train_ann, data_cfg.train_images)
    entry = cache.path(key)
    if cache.exists(f"{entry}/{_COMPLETE}"):
        log.info("reusing packed training shards %s", cache.display(entry))
        return Shards(cache.fs, entry)
    marker = f"{Path(data_cfg.train_ann).resolve()}\n"
    if cache.is_local:
        _pack_local(data_cfg, Path(cache.root), key, marker)
    else:
        with tempfile.TemporaryDirectory(prefix="vfnet-pack-") as tmp:
            pack(data_cfg.train_ann, data_cfg.train_images, Path(tmp), max_image_pixels=data_cfg.max_image_pixels)
            cache.upload(Path(tmp), entry)
        cache.write_text(f"{entry}/{_COMPLETE}", marker)
    log.info("packed %s into %s", data_cfg.train_ann, cache.display(entry))
    return Shards(cache.fs, entry)


def _pack_local(data_cfg: DataConfig, cache_dir: Path, key: str, marker: str) -> None:
    entry = cache_dir / key
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pack(data_cfg.train_ann, data_cfg.train_images, tmp, max_image_pixels=data_cfg.max_image_pixels)
        write_text(tmp / _COMPLETE, marker)
        shutil.rmtree(entry, ignore_errors=True)  # a leftover without _COMPLETE
        try:
            tmp.rename(entry)
        except OSError:  # another process finished the same entry first
            if not (entry / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def iters_per_epoch(num_rows: int, world_size: int, batch_size: int) -> int:
    """Iterations per epoch when each iteration takes `world_size` x `batch_size` images (the
    global batch) of the `num_rows`; the rest of the epoch's order is not used that epoch."""
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size and batch_size must be >= 1, got {world_size}, {batch_size}")
    steps = num_rows // (world_size * batch_size)
    if steps < 1:
        raise DatasetError(f"the training set has {num_rows} images, fewer than one step needs "
                         f"(train.batch_size {batch_size} x {world_size} workers)")
    return steps


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of the shards: `rows` images at row group `index` of `file`."""

    file: str
    index: int
    rows: int


def row_groups(shards: Shards) -> list[RowGroup]:
    """Every row group of the shards, in file order, from the Parquet footers (no data read);
    DatasetError for a shard that is not a readable vfnet shard."""
    groups = []
    for path in shards.files():
        read_categories(path, shards.fs)  # a readable shard with the vfnet columns
        try:
            meta = pq.ParquetFile(path, filesystem=shards.fs).metadata
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DatasetError(f"{path}: not a readable Parquet file: {one_line(exc)}") from None
        groups.extend(RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    return groups


def shard_categories(shards: Shards) -> tuple[list[int], list[str]]:
    """(cat_ids, class_names) of the shards (label -> COCO category id and name), from the
    first shard's schema metadata."""
    return read_categories(shards.files()[0], shards.fs)


def epoch_order(group_rows: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """The order in which `epoch` visits the rows: [N, 2] int64 (row group, row in the group),
    N = sum(group_rows). The row groups come in a random order and the rows of each in a random
    order (both drawn from (seed, epoch)), so that consecutive positions share row groups and a
    worker reads each of its row groups about once (a uniform shuffle of all rows would read a
    whole row group, 16 images with `vfnet data pack`'s default, per image)."""
    rng = np.random.default_rng((seed & ((1 << 63) - 1), epoch))
    parts = []
    for group in rng.permutation(len(group_rows)):
        rows = rng.permutation(group_rows[group])
        parts.append(np.stack([np.full_like(rows, group), rows], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)


class ShardBatches:
    """`TrainData.batches` for rank `rank` of `world_size` workers: `(epoch, start_batch) -> Batch`es.

    Iteration j of an epoch is positions j x G .. (j + 1) x G - 1 of `epoch_order` (G =
    `global_batch`, the same at every worker-group size) and this rank takes its G / W of them:
    positions j x G + rank x G / W onwards. A call yields iterations `start_batch` ..
    `iters_per_epoch` - 1 (the rows // G), so a resumed epoch continues with exactly the images the
    epoch has not had yet, at any worker-group size. Each image's augmentation is drawn from
    (seed, epoch, position): the same whichever worker reads it. Rows are read from the shards'
    file system one row group at a time (the last two are kept)."""

    def __init__(self, shards: Shards, groups: Sequence[RowGroup], cfg: Config, cat_ids: list[int], *,
                 rank: int, world_size: int, global_batch: int) -> None:
        if not 0 <= rank < world_size or global_batch % world_size:
            raise ValueError(f"rank {rank} of {world_size} workers cannot split a global batch of {global_batch}")
        self.shards, self.groups, self.cfg, self.cat_ids = shards, list(groups), cfg, list(cat_ids)
        self.rank, self.global_batch, self.share = rank, global_batch, global_batch // world_size
        self.iters_per_epoch = iters_per_epoch(sum(g.rows for g in self.groups), world_size, self.share)
        self.transform = build_transform(cfg.data, train=True)
        self._cache: dict[int, list[dict[str, Any]]] = {}

    def __call__(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        order = epoch_order([g.rows for g in self.groups], self.cfg.train.seed, epoch)
        seed = self.cfg.train.seed & ((1 << 63) - 1)
        for iteration in range(start_batch, self.iters_per_epoch):
            start = iteration * self.global_batch + self.rank * self.share
            samples = [decode_row(self._row(int(group), int(row)), self.transform, self.cat_ids,
                                  np.random.default_rng((seed, epoch, position)),
                                  max_image_pixels=self.cfg.data.max_image_pixels)
                       for position, (group, row) in enumerate(order[start:start + self.share], start)]
            yield collate(samples, size_divisor=self.cfg.data.size_divisor)

    def _row(self, group: int, row: int) -> dict[str, Any]:
        if group not in self._cache:
            where = self.groups[group]
            try:
                table = pq.ParquetFile(where.file, filesystem=self.shards.fs).read_row_group(where.index)
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise DatasetError(f"{where.file}: cannot read row group {where.index}: {one_line(exc)}") from None
            if len(self._cache) >= 2:
                del self._cache[next(iter(self._cache))]
            self._cache[group] = table.to_pylist()
        return self._cache[group][row]
