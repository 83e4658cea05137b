"""orchestration.data: the packed-shard cache, epoch lengths, and the epoch order each worker
reads its rows in (no Ray needed: the order and the reading are plain functions of the shards)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orchestration import data as odata
from vfnet.data import DatasetError
from vfnet.data.parquet import pack
from vfnet.data.synth import CLASSES


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
    assert Path(entry.directory).parent == cache and sum(g.rows for g in odata.row_groups(entry)) == 16
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
    assert odata.iters_per_epoch(11, 2, 2) == 2  # global batch 4: the last 3 rows are not used that epoch
    assert odata.iters_per_epoch(8, 3, 2) == 1
    with pytest.raises(DatasetError, match="fewer than one step"):
        odata.iters_per_epoch(3, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        odata.iters_per_epoch(8, 0, 2)


@pytest.fixture
def small_groups(synth_dir: Path, tmp_path: Path) -> odata.Shards:
    """The 16 training images in 3 shards of up to 6 rows, row groups of up to 4 (7 groups)."""
    pack(synth_dir / "annotations" / "train.json", synth_dir / "images" / "train", tmp_path / "shards",
         rows_per_shard=6, row_group_size=4)
    return odata.shards_at(tmp_path / "shards")


def test_epoch_order_visits_every_row_once_group_by_group() -> None:
    sizes = [4, 2, 4, 1, 3]
    order = odata.epoch_order(sizes, seed=7, epoch=0)
    assert sorted(map(tuple, order.tolist())) == [(g, r) for g, n in enumerate(sizes) for r in range(n)]
    groups = [g for g, _ in order.tolist()]
    assert [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]] == list(dict.fromkeys(groups))
    assert (odata.epoch_order(sizes, seed=7, epoch=0) == order).all()  # a function of (seed, epoch)
    assert not (odata.epoch_order(sizes, seed=7, epoch=1) == order).all()
    assert not (odata.epoch_order(sizes, seed=8, epoch=0) == order).all()
    assert odata.epoch_order([], seed=0, epoch=0).shape == (0, 2)


def test_shard_batches_read_one_epoch(tiny_config, small_groups: odata.Shards) -> None:
    cfg = tiny_config()
    groups = odata.row_groups(small_groups)
    assert [g.rows for g in groups] == [4, 2, 4, 2, 4]  # shards of 6, 6, 4 rows in groups of <= 4
    cat_ids = odata.shard_categories(small_groups)[0]
    batches = odata.ShardBatches(small_groups, groups, cfg, cat_ids, rank=0, world_size=1, global_batch=2)
    epoch = list(batches(0, 0))
    assert len(epoch) == batches.iters_per_epoch == odata.iters_per_epoch(16, 1, 2) == 8
    ids = [i for b in epoch for i in b.image_ids]
    assert len(set(ids)) == len(ids) == 16  # every image once
    for batch in epoch:
        assert batch.images.shape == (2, 3, 64, 64)
        assert all(len(b) == len(lab) and (lab.numel() == 0 or lab.max() < 4)
                   for b, lab in zip(batch.boxes, batch.labels))
    (resumed,) = batches(0, 7)  # resuming at batch 7 of 8: the same images, augmented the same way
    assert resumed.image_ids == epoch[7].image_ids and (resumed.images == epoch[7].images).all()
    assert [i for b in batches(1, 0) for i in b.image_ids] != ids  # another order next epoch
    with pytest.raises(ValueError, match="cannot split"):
        odata.ShardBatches(small_groups, groups, cfg, cat_ids, rank=0, world_size=3, global_batch=4)


def test_a_resized_epoch_sees_every_image_once(tiny_config, small_groups: odata.Shards) -> None:
    """4 workers for the first half of an epoch, 2 for the rest (an elastic run that shrank and
    resumed at iteration 2): the epoch's 16 images each once, and each iteration's images those a
    single worker would have had."""
    cfg = tiny_config()
    groups = odata.row_groups(small_groups)
    cat_ids = odata.shard_categories(small_groups)[0]

    def ranks(world_size: int, start: int) -> list[list]:
        return [list(odata.ShardBatches(small_groups, groups, cfg, cat_ids, rank=r, world_size=world_size,
                                        global_batch=4)(3, start)) for r in range(world_size)]

    four, two, one = ranks(4, 0), ranks(2, 2), ranks(1, 0)
    seen = [[i for r in four for i in r[it].image_ids] for it in (0, 1)]
    seen += [[i for r in two for i in r[it].image_ids] for it in (0, 1)]
    assert seen == [batch.image_ids for batch in one[0]]
    assert sorted(i for ids in seen for i in ids) == sorted(set(i for ids in seen for i in ids))
    assert len({i for ids in seen for i in ids}) == 16
    assert all(len(r) == 4 for r in four) and all(len(r) == 2 for r in two)


def test_failed_pack_leaves_no_cache_entry(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(**{"data.train_images": str(tmp_path / "no_images")})
    (tmp_path / "no_images").mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError):
        odata.prepare_train_shards(cfg.data, cache)
    assert not cache.exists() or not any(cache.iterdir())
