import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vfnet.core.config import Config
from vfnet.data import CocoDetection, DatasetError, ParquetDetection, build_train_loader, decode_row, pack
from vfnet.data.parquet import SCHEMA
from vfnet.data.transforms import Transform


def same(a, b):
    return (a.image_id == b.image_id and a.orig_size == b.orig_size and a.scale == b.scale
            and torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels))


@pytest.fixture(scope="module")
def packed(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    shards = pack(shapes / "annotations/train.json", shapes / "images/train", out, rows_per_shard=5, row_group_size=2)
    return out, shards


def test_shards_schema_and_rows(shapes, packed):
    out, shards = packed
    assert [s.name for s in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == SCHEMA and table.num_rows == 12
    cats = json.loads(table.schema.metadata[b"vfnet.categories"])
    assert cats == [{"id": i + 1, "name": n} for i, n in enumerate(["circle", "square", "triangle", "cross"])]
    coco = CocoDetection(shapes / "annotations/train.json", shapes / "images/train")
    for row, record in zip(table.to_pylist(), coco.records):
        assert (row["image_id"], row["file_name"], row["width"], row["height"]) == \
            (record.image_id, record.file_name, 64, 64)
        assert row["image"] == (shapes / "images/train" / record.file_name).read_bytes()
        assert row["boxes"] == record.boxes.tolist() and row["labels"] == record.labels.tolist()


def test_round_trip_equals_json_dataset(shapes, packed):
    out, _ = packed
    t = Transform(scales=[(96, 96), (48, 48)], flip_prob=0.5, mean=(120.0, 110.0, 100.0), std=(50.0, 60.0, 70.0))
    coco = CocoDetection(shapes / "annotations/train.json", shapes / "images/train")
    shards = ParquetDetection(out)
    assert len(shards) == len(coco) == 12 and shards.cat_ids == coco.cat_ids and shards.class_names == coco.class_names
    rows = pq.read_table(out).to_pylist()
    for i in [0, 7, 3, 11, 4]:
        expected = coco.sample(i, t, np.random.default_rng(i))
        assert same(shards.sample(i, t, np.random.default_rng(i)), expected)
        assert same(decode_row(rows[i], t, coco.cat_ids, np.random.default_rng(i)), expected)
    assert same(shards[5], coco[5])  # __getitem__ with the default (identity) transform


def test_train_loader_reads_shards(shapes, packed):
    cfg = Config()
    cfg.data.train_ann = str(shapes / "annotations/train.json")
    cfg.data.train_images = str(shapes / "images/train")
    cfg.data.img_scale, cfg.data.num_workers, cfg.train.batch_size = [64, 64], 0, 3
    from_json = list(build_train_loader(cfg, epoch=3))
    cfg.data.train_parquet = str(packed[0])
    from_shards = list(build_train_loader(cfg, epoch=3))
    assert len(from_json) == len(from_shards) == 4
    for a, b in zip(from_json, from_shards):
        assert a.image_ids == b.image_ids and torch.equal(a.images, b.images)
        assert all(torch.equal(x, y) for x, y in zip(a.boxes + a.labels, b.boxes + b.labels))


def test_crowd_and_degenerate_boxes_filtered(tmp_path, make_coco, make_rgb):
    ann, images = make_coco(tmp_path, [("a.png", make_rgb(16, 8))], [
        {"image_id": 1, "category_id": 2, "bbox": [1, 1, 4, 4]},
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 1},
        {"image_id": 1, "category_id": 1, "bbox": [20, 1, 4, 4]},
    ])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-00007.parquet").write_bytes(b"stale")
    shards = pack(ann, images, tmp_path / "out")
    assert [s.name for s in sorted((tmp_path / "out").iterdir())] == ["part-00000.parquet"] == [s.name for s in shards]
    (row,) = pq.read_table(shards[0]).to_pylist()
    assert row["boxes"] == [[1.0, 1.0, 4.0, 4.0]] and row["labels"] == [1]


def test_bad_shards_and_rows(tmp_path, packed):
    with pytest.raises(DatasetError, match="no .parquet shards"):
        ParquetDetection(tmp_path)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(DatasetError, match=r"plain\.parquet: not a vfnet shard: column 'image_id' is missing"):
        ParquetDetection(tmp_path)
    (tmp_path / "plain.parquet").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"plain\.parquet: not a readable Parquet file"):
        ParquetDetection(tmp_path)
    row = pq.read_table(packed[1][0]).to_pylist()[0]
    with pytest.raises(DatasetError, match="outside 0..1"):
        decode_row({**row, "labels": [3] * len(row["labels"])}, Transform(), [1, 2])
    with pytest.raises(DatasetError, match="cannot read image"):
        decode_row({**row, "image": b"junk"}, Transform(), [1, 2, 3, 4])


def test_pixel_limit_of_pack_shards_and_rows(shapes, packed, tmp_path):
    too_large = r"image too large \(4096 pixels; data.max_image_pixels = 4000\)"  # 64 x 64 images
    with pytest.raises(DatasetError, match=too_large):
        pack(shapes / "annotations/train.json", shapes / "images/train", tmp_path, max_image_pixels=4000)
    dataset = ParquetDetection(packed[0], max_image_pixels=4000)
    with pytest.raises(DatasetError, match=too_large):
        dataset[0]
    row = pq.read_table(packed[1][0]).slice(0, 1).to_pylist()[0]
    with pytest.raises(DatasetError, match=too_large):
        decode_row(row, Transform(), dataset.cat_ids, max_image_pixels=4000)
