import json
import logging

import numpy as np
import pytest

from vfnet.core.config import DataConfig
from vfnet.core.errors import ArgumentError
from vfnet.data import CocoDetection
from vfnet.data.synth import CLASSES, _shape_mask, ensure_synth, synthesize


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path, shapes):
    synthesize(tmp_path / "again", images=12, size=64, seed=3)
    synthesize(tmp_path / "other", images=12, size=64, seed=4)
    first = files(shapes)
    assert len(first) == 12 + 3 + 2
    assert files(tmp_path / "again") == first
    other = files(tmp_path / "other")
    assert other.keys() == first.keys() and other != first


def test_splits_categories_and_boxes(shapes, caplog):
    for split, count in (("train", 12), ("val", 3)):
        data = json.loads((shapes / "annotations" / f"{split}.json").read_text())
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
        assert [c["name"] for c in data["categories"]] == list(CLASSES)
        assert [im["id"] for im in data["images"]] == list(range(1, count + 1))
        assert all(im["width"] == im["height"] == 64 for im in data["images"])
        assert data["annotations"] and {a["image_id"] for a in data["annotations"]} <= set(range(1, count + 1))
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert 6 <= max(w, h) <= 16 and 0 < a["area"] <= w * h and a["iscrowd"] == 0
        with caplog.at_level(logging.WARNING):
            ds = CocoDetection(shapes / "annotations" / f"{split}.json", shapes / "images" / split)
        assert len(ds) == count and not caplog.records  # no degenerate boxes
    assert {a["category_id"] for a in json.loads((shapes / "annotations/train.json").read_text())["annotations"]} \
        == {1, 2, 3, 4}


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("w, h", [(6, 6), (13, 9), (40, 52)])
def test_shapes_fill_their_box_exactly(kind, w, h):
    """The tight box of the drawn pixels is the box the shape was drawn in."""
    for flip in (False, True):
        mask = np.asarray(_shape_mask(kind, w, h, flip)) > 0
        rows, cols = np.nonzero(mask)
        assert (rows.min(), cols.min(), rows.max(), cols.max()) == (0, 0, h - 1, w - 1)


def test_validation_split_size_and_bad_arguments(tmp_path):
    stats = synthesize(tmp_path, images=2, size=32, seed=0)
    assert stats["train_images"] == 2 and stats["val_images"] == 1
    for kwargs, match in (({"images": 0}, "images"), ({"size": 16}, "size"), ({"seed": -1}, "seed")):
        args = {"images": 2, "size": 32, "seed": 0, **kwargs}
        with pytest.raises(ArgumentError, match=match):
            synthesize(tmp_path, **args)


def test_ensure_synth_generates_once_and_on_change(tmp_path):
    cfg = DataConfig(synth=True, synth_dir=str(tmp_path / "s"), synth_images=4, synth_size=32, synth_seed=1)
    assert ensure_synth(cfg) is True
    assert ensure_synth(cfg) is False
    cfg.synth_images = 5
    assert ensure_synth(cfg) is True
    data = json.loads((tmp_path / "s" / "annotations" / "train.json").read_text())
    assert len(data["images"]) == 5
