"""Training data for Ray Train: the Parquet shards of `vfnet data pack`, read with Ray Data.

The driver resolves the shards (`prepare_train_shards`: `data.train_parquet` when set, else the
COCO json + images packed once into a cache directory keyed by their content) and hands
`ray.data.read_parquet` of them to the `TorchTrainer` (`datasets={"train": ...}`). Ray splits the
stream between the workers (an equal number of rows each); every worker turns its rows into
`Sample`s with `vfnet.data.parquet.decode_row` and collates them into `Batch`es
(`ShardBatches`). Only the Parquet files need to be readable by the Ray Data tasks, so the images
need not sit on every node's disk; the COCO json stays the evaluation ground truth (rank 0).
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
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


def count_rows(shards: Shards) -> int:
    """Images in the shards, from the Parquet footers (no data read)."""
    total = 0
    for path in shards.files():
        read_categories(path, shards.fs)  # a readable shard with the vfnet columns
        try:
            total += pq.ParquetFile(path, filesystem=shards.fs).metadata.num_rows
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DatasetError(f"{path}: not a readable Parquet file: {one_line(exc)}") from None
    return total


def shard_categories(shards: Shards) -> tuple[list[int], list[str]]:
    """(cat_ids, class_names) by contiguous label (cat_ids[label] the COCO category id), from the
    first shard's schema metadata."""
    return read_categories(shards.files()[0], shards.fs)


def iters_per_epoch(num_rows: int, world_size: int, batch_size: int) -> int:
    """Steps per epoch when `num_rows` images are split equally between `world_size` workers
    (Ray Data's equal streaming split drops the remainder) and each drops its last partial batch."""
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size and batch_size must be >= 1, got {world_size}, {batch_size}")
    steps = (num_rows // world_size) // batch_size
    if steps < 1:
        raise DatasetError(f"the training set has {num_rows} images, fewer than one step needs "
                         f"(train.batch_size {batch_size} x {world_size} workers)")
    return steps


def read_train_dataset(shards: Shards) -> Any:
    """A `ray.data.Dataset` of the shards' rows (lazy; read by Ray Data tasks, which get the
    file system pickled)."""
    import ray.data

    return ray.data.read_parquet(shards.files(), filesystem=shards.fs)


class ShardBatches:
    """`TrainData.batches` for one Ray Train worker: `(epoch, start_batch) -> Batch`es.

    `shard` is the worker's `ray.train.get_dataset_shard(...)` iterator. Each call starts a new
    pass over the shard (all workers start their passes together, as the engine's lock-step
    loop does); rows are shuffled within a local buffer (seeded by seed, epoch and rank), and
    the first `start_batch` batches are skipped without decoding them, so a resumed epoch has the
    right length. Which rows reach which worker is decided by Ray Data's streaming split and is
    not reproducible between runs: a resumed epoch continues with equally many batches, not
    with exactly the images the failed attempt had not seen yet."""

    def __init__(self, shard: Any, cfg: Config, cat_ids: list[int], rank: int) -> None:
        self.shard = shard
        self.cfg = cfg
        self.cat_ids = list(cat_ids)
        self.rank = rank
        self.transform = build_transform(cfg.data, train=True)

    def __call__(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        batch_size = self.cfg.train.batch_size
        seed = self.cfg.train.seed & ((1 << 63) - 1)
        tables = self.shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=max(8 * batch_size, 32),
            local_shuffle_seed=(seed * 1_000_003 + epoch * 1_009 + self.rank) % (2**31),
        )
        for index, table in enumerate(tables):
            if index < start_batch:
                continue
            rng = np.random.default_rng((seed, epoch, self.rank, index))
            samples = [decode_row(row, self.transform, self.cat_ids, rng,
                                  max_image_pixels=self.cfg.data.max_image_pixels) for row in table.to_pylist()]
            yield collate(samples, size_divisor=self.cfg.data.size_divisor)
