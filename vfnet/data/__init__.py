"""Detection data: COCO json and Parquet datasets, transforms, loaders, synthetic shapes, VOC and YOLO import.

`DatasetError` (`vfnet.core.errors`) is raised for bad data files; its message names the file and the field at fault.
"""
from __future__ import annotations

from vfnet.core.errors import DatasetError
from vfnet.data.coco import Batch, CocoDetection, Sample, collate
from vfnet.data.loader import build_train_loader, build_val_loader
from vfnet.data.parquet import ParquetDetection, decode_row, pack
from vfnet.data.transforms import Transform, build_transform

__all__ = [
    "Batch", "CocoDetection", "DatasetError", "ParquetDetection", "Sample", "Transform",
    "build_train_loader", "build_transform", "build_val_loader", "collate", "decode_row", "pack",
]
