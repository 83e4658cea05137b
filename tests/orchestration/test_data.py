"""orchestration.data: the packed-shard cache, epoch lengths, and Ray Data rows -> Batches."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orchestration import data as odata
from vfnet.data import DatasetError
from vfnet.data.synth import CLASSES

pytestmark = pytest.mark.ray


def test_content_key_tracks_annotations_and_images(synth_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(synth_dir, root)
    ann, images = root / "annotations" / "train.json", root / "images" / "train"
    key = odata.content_key(ann, images)
    assert key == odata.content_key(ann, images)
    first = sorted(images.iterdir())[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    touched = odata.content_key(ann, images)
    assert touched != key
    ann.write_text(ann.read_text() + " ")
    assert odata.content_key(ann, images) not in (key, touched)
    with pytest.raises(DatasetError, match="missing.json"):
        odata.content_key(root / "missing.json", images)


def test_prepare_train_shards_packs_once(tiny_config, tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config()
    cache = tmp_path / "cache"
    entry = odata.prepare_train_shards(cfg.data, cache)
    assert Path(entry.directory).parent == cache and odata.count_rows(entry) == 16
    assert odata.shard_categories(entry) == ([1, 2, 3, 4], list(CLASSES))
    assert [p.name for p in cache.iterdir()] == [Path(entry.directory).name]  # no temporary left behind

    def no_pack(*args, **kwargs):
        raise AssertionError("packed again although nothing changed")

    monkeypatch.setattr(odata, "pack", no_pack)
    assert odata.prepare_train_shards(cfg.data, cache) == entry
    # data.train_parquet wins: the shards are used where they are
    cfg.data.train_parquet = entry.directory
    assert odata.prepare_train_shards(cfg.data, tmp_path / "unused") == entry
    cfg.data.train_parquet = str(tmp_path)
    with pytest.raises(DatasetError, match="no part-"):
        odata.prepare_train_shards(cfg.data, cache)


def test_iters_per_epoch() -> None:
    assert odata.iters_per_epoch(8, 1, 2) == 4
    assert odata.iters_per_epoch(11, 2, 2) == 2  # 5 rows a worker, the last odd one dropped
    assert odata.iters_per_epoch(8, 3, 2) == 1
    with pytest.raises(DatasetError, match="fewer than one step"):
        odata.iters_per_epoch(3, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        odata.iters_per_epoch(8, 0, 2)


def test_shard_batches(tiny_config, tmp_path: Path, ray_session) -> None:
    cfg = tiny_config()
    shards = odata.prepare_train_shards(cfg.data, tmp_path)
    dataset = odata.read_train_dataset(shards)
    batches = odata.ShardBatches(dataset.iterator(), cfg, odata.shard_categories(shards)[0], rank=0)
    epoch = list(batches(0, 0))
    assert len(epoch) == odata.iters_per_epoch(16, 1, 2) == 8
    ids = [i for b in epoch for i in b.image_ids]
    assert len(set(ids)) == len(ids) == 16  # every image once
    for batch in epoch:
        assert batch.images.shape == (2, 3, 64, 64)
        assert all(len(b) == len(lab) and (lab.numel() == 0 or lab.max() < 4)
                   for b, lab in zip(batch.boxes, batch.labels))
    assert len(list(batches(1, 7))) == 1  # resuming at batch 7 of 8


def test_failed_pack_leaves_no_cache_entry(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(**{"data.train_images": str(tmp_path / "no_images")})
    (tmp_path / "no_images").mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError):
        odata.prepare_train_shards(cfg.data, cache)
    assert not cache.exists() or not any(cache.iterdir())
