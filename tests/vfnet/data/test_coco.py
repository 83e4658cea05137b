import logging

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vfnet.data import Batch, CocoDetection, DatasetError, Sample, collate
from vfnet.data.transforms import Transform


def box(image_id, cat, bbox, **extra):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, **extra}


def test_labels_boxes_crowd_and_degenerate(tmp_path, make_coco, make_rgb, caplog):
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    ann, images = make_coco(tmp_path, [("a.png", make_rgb(40, 30)), ("b.png", make_rgb(20, 20))], [
        box(1, 7, [1, 2, 10, 5]),
        box(1, 3, [30, 20, 20, 20]),  # partly outside: clipped to x2=40, y2=30
        box(1, 3, [5, 5, 10, 10], iscrowd=1),  # crowd: not a target
        box(1, 7, [5, 5, 0.5, 10]),  # narrower than 1 px
        box(1, 7, [41, 5, 5, 5]),  # wholly outside
        box(1, 3, [-10, -10, 5, 5]),  # wholly outside
    ], cats)
    with caplog.at_level(logging.WARNING, logger="vfnet.data"):
        ds = CocoDetection(ann, images)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 3 degenerate boxes" in warnings[0].getMessage()
    assert ds.cat_ids == [3, 7] and ds.class_names == ["three", "seven"]
    assert len(ds) == 2
    s = ds[0]
    assert isinstance(s, Sample)
    torch.testing.assert_close(s.boxes, torch.tensor([[1.0, 2.0, 11.0, 7.0], [30.0, 20.0, 40.0, 30.0]]))
    assert s.labels.dtype == torch.int64 and s.labels.tolist() == [1, 0]
    assert s.image.shape == (3, 30, 40) and s.image.dtype == torch.float32
    assert s.orig_size == (30, 40) and s.scale == (1.0, 1.0) and s.image_id == 1
    empty = ds[1]  # image without boxes is kept
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert len(ds.coco.getAnnIds()) == 6  # the pycocotools index holds every annotation


def test_transform_applied_with_scale(tmp_path, make_coco, make_rgb):
    ann, images = make_coco(tmp_path, [("a.png", make_rgb(40, 20))], [box(1, 1, [4, 2, 6, 10])])
    s = CocoDetection(ann, images, Transform(scales=[(80, 80)]))[0]
    assert s.image.shape == (3, 40, 80) and s.scale == (2.0, 2.0) and s.orig_size == (20, 40)
    torch.testing.assert_close(s.boxes, torch.tensor([[8.0, 4.0, 20.0, 24.0]]))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_images_converted(tmp_path, make_coco, mode):
    rgb = Image.new("RGB", (8, 6), (90, 90, 90))
    image = rgb.convert("P", palette=Image.ADAPTIVE) if mode == "P" else rgb.convert(mode)
    name = "a.jpg" if mode == "CMYK" else "a.png"
    ann, images = make_coco(tmp_path, [(name, image)], [])
    s = CocoDetection(ann, images)[0]
    assert s.image.shape == (3, 6, 8)
    assert torch.allclose(s.image, torch.full_like(s.image, 90.0), atol=3)


def test_pixel_limit_travels_with_the_dataset_into_spawned_workers(tmp_path, make_coco, make_rgb):
    """The limit is the dataset's, not a process setting a spawned loader worker would miss."""
    ann, images = make_coco(tmp_path, [("a.png", make_rgb(40, 30))], [])
    loader = DataLoader(CocoDetection(ann, images, max_image_pixels=1000), num_workers=1,
                        multiprocessing_context="spawn", collate_fn=collate)
    with pytest.raises(DatasetError, match=r"image too large \(1200 pixels; data.max_image_pixels = 1000\)"):
        next(iter(loader))
    assert CocoDetection(ann, images, max_image_pixels=1200)[0].orig_size == (30, 40)


@pytest.mark.parametrize("content, match", [
    (None, "annotation file not found"),
    ("{not json", "not valid JSON"),
    ('{"images": [], "annotations": []}', "missing or invalid key 'categories'"),
    ('{"images": {}, "annotations": [], "categories": []}', "missing or invalid key 'images'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_annotation_file(tmp_path, content, match):
    path = tmp_path / "ann.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=match) as err:
        CocoDetection(path, tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("ann, match", [
    (box(1, 9, [0, 0, 2, 2], id=5), "annotation 5: unknown category id 9"),
    (box(4, 1, [0, 0, 2, 2], id=6), "annotation 6: unknown image id 4"),
    (box(1, 1, [0, 0, 2], id=7), "annotation 7: field 'bbox' must be 4 finite numbers"),
    ({"image_id": 1, "bbox": [0, 0, 2, 2], "id": 8}, "annotation 8: missing field 'category_id'"),
])
def test_bad_annotation_entry(tmp_path, make_coco, make_rgb, ann, match):
    path, images = make_coco(tmp_path, [("a.png", make_rgb(8, 8))], [ann])
    with pytest.raises(DatasetError, match=match) as err:
        CocoDetection(path, images)
    assert str(path) in str(err.value)


def test_missing_image_fails_fast_at_construction(tmp_path, make_coco, make_rgb):
    ann, images = make_coco(tmp_path, [("a.png", make_rgb(8, 8)), ("gone.png", None)], [])
    with pytest.raises(DatasetError, match="gone.png: image file not found"):
        CocoDetection(ann, images)
    with pytest.raises(DatasetError, match="image directory not found"):
        CocoDetection(ann, tmp_path / "nowhere")


def test_missing_corrupt_or_resized_image_fails_on_load(tmp_path, make_coco, make_rgb):
    ann, images = make_coco(tmp_path, [("a.png", make_rgb(8, 8)), ("b.png", make_rgb(8, 8)),
                                       ("c.png", make_rgb(8, 8))], [])
    ds = CocoDetection(ann, images)
    (images / "a.png").unlink()
    (images / "b.png").write_bytes(b"not a png at all")
    make_rgb(9, 8).save(images / "c.png")
    with pytest.raises(DatasetError, match=r"a\.png: image file not found"):
        ds[0]
    with pytest.raises(DatasetError, match=r"b\.png: cannot read image"):
        ds[1]
    with pytest.raises(DatasetError, match=r"c\.png: image is 9x8 but the annotations say 8x8"):
        ds[2]


def sample(h, w, n, value=1.0, image_id=0):
    return Sample(image=torch.full((3, h, w), value), boxes=torch.ones(n, 4), labels=torch.zeros(n, dtype=torch.int64),
                  image_id=image_id, orig_size=(2 * h, 2 * w), scale=(0.5, 0.5))


def test_collate_pads_to_divisor():
    batch = collate([sample(20, 30, 2, 1.0, 11), sample(33, 10, 0, 2.0, 12)], size_divisor=32)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 64, 32)
    assert torch.all(batch.images[0, :, :20, :30] == 1) and torch.all(batch.images[0, :, 20:] == 0)
    assert torch.all(batch.images[0, :, :, 30:] == 0)
    assert torch.all(batch.images[1, :, :33, :10] == 2) and batch.images[1, :, 33:].abs().sum() == 0
    assert batch.image_sizes.tolist() == [[20, 30], [33, 10]] and batch.image_sizes.dtype == torch.int64
    assert batch.orig_sizes.tolist() == [[40, 60], [66, 20]]
    assert batch.scales.dtype == torch.float32 and batch.scales.tolist() == [[0.5, 0.5]] * 2
    assert [b.shape for b in batch.boxes] == [(2, 4), (0, 4)] and batch.image_ids == [11, 12]
    assert batch.padded_sizes == [(32, 32), (64, 32)]  # each image's own extent, rounded up
    assert collate([sample(32, 64, 1)], size_divisor=32).images.shape == (1, 3, 32, 64)
    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images) and len(moved.labels) == 2
    assert moved.padded_sizes == batch.padded_sizes
    with pytest.raises(ValueError, match="samples is empty"):
        collate([])
    with pytest.raises(ValueError, match="size_divisor"):
        collate([sample(4, 4, 0)], size_divisor=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_batch_pin_memory():
    pinned = collate([sample(4, 4, 1)]).pin_memory()
    assert pinned.images.is_pinned() and pinned.boxes[0].is_pinned()


@pytest.mark.parametrize("area, expected", [
    (12.5, 12.5),  # the file's own area
    (0, 0.0),
    (10 ** 400, 50.0),  # an integer too large for a float: w * h (found by the reader fuzzing)
    (1e308 * 10, 50.0),  # inf
    (-3, 50.0), ("12", 50.0), (True, 50.0), (None, 50.0),
], ids=["float", "zero", "int_past_float", "inf", "negative", "string", "bool", "null"])
def test_evaluation_area_is_the_files_when_usable_else_w_times_h(tmp_path, make_coco, make_rgb, area, expected):
    annotation = box(1, 7, [1, 2, 10, 5])
    annotation["area"] = area
    ann, images = make_coco(tmp_path, [("a.png", make_rgb(40, 30))], [annotation], [{"id": 7, "name": "seven"}])
    index = CocoDetection(ann, images).coco
    assert index.anns[1]["area"] == expected and isinstance(index.anns[1]["area"], float)
