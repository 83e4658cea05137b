"""Fixtures for the data tests: a tiny synthesized shapes set and a COCO-file writer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vfnet.data.synth import synthesize


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """12 train / 3 val synthetic images of 64 px (read-only for tests)."""
    root = tmp_path_factory.mktemp("shapes")
    synthesize(root, images=12, size=64, seed=3)
    return root


def write_coco(root: Path, images: list[tuple[str, Image.Image | None]], annotations: list[dict[str, Any]],
               categories: list[dict[str, Any]] | None = None) -> tuple[Path, Path]:
    """Write `images` (name, PIL image; None = listed but not written) and a COCO json under
    `root`; image ids are 1.. in order. Returns (ann_file, images_dir)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, img) in enumerate(images, start=1):
        size = img.size if img is not None else (32, 24)
        if img is not None:
            img.save(image_dir / name)
        entries.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
    for i, ann in enumerate(annotations, start=1):
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
    data = {"images": entries, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, image_dir


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def make_coco():
    """`write_coco` as a fixture (test modules cannot import this conftest by name)."""
    return write_coco


@pytest.fixture
def make_rgb():
    """`rgb` as a fixture."""
    return rgb
