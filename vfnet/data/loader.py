"""Training and validation DataLoaders.

The training order of an epoch is a permutation drawn from (train.seed, epoch); random
augmentation choices of item i are drawn from (train.seed, epoch, i). Both are independent of
worker processes and of where a run was interrupted, so a run resumed at (epoch, start_batch)
sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vfnet.core.config import Config, DataConfig
from vfnet.core.errors import DatasetError
from vfnet.data.coco import CocoDetection, Sample, collate
from vfnet.data.parquet import ParquetDetection
from vfnet.data.synth import ensure_synth
from vfnet.data.transforms import Transform, build_transform

_SEED_MASK = (1 << 64) - 1  # SeedSequence wants non-negative entropy


class EpochDataset(Dataset):
    """`base` items through `transform`, with per-item random state from (seed, epoch, index)."""

    def __init__(self, base: CocoDetection | ParquetDetection, transform: Transform, seed: int, epoch: int) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed & _SEED_MASK, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return self.base.sample(index, self.transform, rng)


def train_indices(num_images: int, batch_size: int, seed: int, epoch: int, *,
                  rank: int = 0, world_size: int = 1, start_batch: int = 0) -> list[int]:
    """The dataset indices rank `rank` reads in `epoch`, in order, batch after batch.

    A permutation from (seed, epoch) is cut to a whole number of global steps (drop_last) and
    dealt round-robin to the ranks; the first `start_batch` batches are skipped."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if batch_size < 1 or start_batch < 0 or epoch < 0:
        raise ValueError(f"batch_size must be >= 1, start_batch and epoch >= 0; got "
                         f"{batch_size}, {start_batch}, {epoch}")
    per_step = batch_size * world_size
    steps = num_images // per_step
    if steps == 0:
        raise DatasetError(f"the training set has {num_images} images, fewer than one step needs "
                         f"(train.batch_size {batch_size} x {world_size} workers)")
    order = np.random.default_rng((seed & _SEED_MASK, epoch)).permutation(num_images)
    mine = order[: steps * per_step][rank::world_size]
    return mine[start_batch * batch_size:].tolist()


@functools.lru_cache(maxsize=2)
def _cached_train_base(parquet: str, ann: str, images: str, max_pixels: int,
                       stamp: float) -> CocoDetection | ParquetDetection:
    del stamp  # part of the cache key only: a rewritten file is read again
    if parquet:
        return ParquetDetection(parquet, max_image_pixels=max_pixels)
    return CocoDetection(ann, images, max_image_pixels=max_pixels)


def train_dataset(data_cfg: DataConfig) -> CocoDetection | ParquetDetection:
    """The training set without transform (from `data.train_parquet` when set, else json +
    images; `data.max_image_pixels` its pixel limit); cached per process, so building a loader
    per epoch reads the annotations once."""
    if data_cfg.synth:
        ensure_synth(data_cfg)
    source = Path(data_cfg.train_parquet or data_cfg.train_ann)
    stamp = source.stat().st_mtime if source.exists() else 0.0
    return _cached_train_base(data_cfg.train_parquet, data_cfg.train_ann, data_cfg.train_images,
                              data_cfg.max_image_pixels, stamp)


def _worker_init(worker_id: int) -> None:
    del worker_id
    torch.set_num_threads(1)  # the main process owns the cores for compute


def _pin(cfg: Config) -> bool:
    return torch.cuda.is_available() and cfg.train.device != "cpu"


def build_train_loader(cfg: Config, epoch: int, *, rank: int = 0, world_size: int = 1,
                       start_batch: int = 0) -> DataLoader:
    """This rank's training batches of `epoch` (see `train_indices`), collated into `Batch`es
    by `cfg.data.num_workers` worker processes; pinned when training on CUDA."""
    base = train_dataset(cfg.data)
    indices = train_indices(len(base), cfg.train.batch_size, cfg.train.seed, epoch,
                            rank=rank, world_size=world_size, start_batch=start_batch)
    return DataLoader(
        EpochDataset(base, build_transform(cfg.data, train=True), cfg.train.seed, epoch),
        batch_size=cfg.train.batch_size,
        sampler=indices,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        collate_fn=functools.partial(collate, size_divisor=cfg.data.size_divisor),
        pin_memory=_pin(cfg),
        worker_init_fn=_worker_init,
    )


def build_val_loader(cfg: Config, ann_file: str | Path | None = None,
                     images_dir: str | Path | None = None) -> tuple[DataLoader, CocoDetection]:
    """Validation batches in file order (no flip, `data.img_scale`), and the dataset (its
    `.coco` and `.cat_ids` are what evaluation needs): `data.val_ann` and `data.val_images`
    (the synthetic set generated first when `data.synth`), or `ann_file` and `images_dir` when
    given (both or neither)."""
    if (ann_file is None) != (images_dir is None):
        raise ValueError("build_val_loader: ann_file and images_dir go together")
    if ann_file is None:
        if cfg.data.synth:
            ensure_synth(cfg.data)
        ann_file, images_dir = cfg.data.val_ann, cfg.data.val_images
    dataset = CocoDetection(ann_file, images_dir, build_transform(cfg.data, train=False),
                            max_image_pixels=cfg.data.max_image_pixels)
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        collate_fn=functools.partial(collate, size_divisor=cfg.data.size_divisor),
        pin_memory=_pin(cfg),
        worker_init_fn=_worker_init,
    )
    return loader, dataset
