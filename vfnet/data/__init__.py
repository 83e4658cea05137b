"""Detection data: COCO json and Parquet datasets, transforms, loaders, synthetic shapes, VOC and YOLO import.

`DatasetError` is raised for bad data files; its message names the file and the field at fault.
"""
from __future__ import annotations


class DatasetError(Exception):
    """A data file (annotations, image, shard) is missing, unreadable or malformed."""


# Defined before the submodules are imported: they raise it.
from vfnet.data.coco import Batch, CocoDetection, Sample, collate  # noqa: E402
from vfnet.data.loader import build_train_loader, build_val_loader  # noqa: E402
from vfnet.data.parquet import ParquetDetection, decode_row, pack  # noqa: E402
from vfnet.data.transforms import Transform, build_transform  # noqa: E402

__all__ = [
    "Batch", "CocoDetection", "DatasetError", "ParquetDetection", "Sample", "Transform",
    "build_train_loader", "build_transform", "build_val_loader", "collate", "decode_row", "pack",
]
