import pytest
import torch

from vfnet.core.config import Config
from vfnet.core.errors import DatasetError
from vfnet.data import build_train_loader, build_val_loader
from vfnet.data.loader import train_indices


def shapes_config(root, **train):
    cfg = Config()
    cfg.data.train_ann = str(root / "annotations/train.json")
    cfg.data.train_images = str(root / "images/train")
    cfg.data.val_ann = str(root / "annotations/val.json")
    cfg.data.val_images = str(root / "images/val")
    cfg.data.img_scale = [96, 96]
    cfg.data.multiscale = [[96, 96], [64, 64]]
    cfg.data.num_workers = 0
    cfg.train.batch_size = 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_train_indices_order_shards_and_skipping():
    a = train_indices(23, 2, seed=5, epoch=1)
    assert a == train_indices(23, 2, seed=5, epoch=1)
    assert a != train_indices(23, 2, seed=5, epoch=2) and a != train_indices(23, 2, seed=6, epoch=1)
    assert len(a) == 22 and len(set(a)) == 22  # drop_last: 11 whole batches
    shards = [train_indices(23, 2, seed=5, epoch=1, rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 6 for s in shards)  # 23 // (2 * 3) = 3 steps of 2 per rank
    assert set().union(*map(set, shards)) == set(a[:18]) and sum(map(len, shards)) == 18
    assert train_indices(23, 2, seed=5, epoch=1, start_batch=4) == a[8:]
    assert train_indices(23, 2, seed=5, epoch=1, start_batch=11) == []
    assert train_indices(23, 2, seed=-1, epoch=0)  # negative seeds are fine
    with pytest.raises(DatasetError, match="fewer than one step"):
        train_indices(3, 2, seed=0, epoch=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        train_indices(10, 2, seed=0, epoch=0, rank=2, world_size=2)


def batches(loader):
    return [(b.image_ids, b.images, b.boxes) for b in loader]


def test_train_loader_deterministic_and_resumes_exactly(shapes):
    cfg = shapes_config(shapes, seed=7)
    full = batches(build_train_loader(cfg, epoch=1))
    assert len(full) == 6 and all(len(ids) == 2 for ids, _, _ in full)
    assert {s for b in full for s in b[0]} == set(range(1, 13))
    assert {tuple(im.shape[-2:]) for _, im, _ in full} <= {(64, 64), (96, 96)}
    resumed = batches(build_train_loader(cfg, epoch=1, start_batch=4))
    assert len(resumed) == 2
    for (ids, images, boxes), (rids, rimages, rboxes) in zip(full[4:], resumed):
        assert ids == rids and torch.equal(images, rimages)
        assert all(torch.equal(x, y) for x, y in zip(boxes, rboxes))
    assert [b[0] for b in batches(build_train_loader(cfg, epoch=2))] != [b[0] for b in full]


def test_worker_processes_give_the_same_batches(shapes):
    cfg = shapes_config(shapes, seed=7)
    serial = batches(build_train_loader(cfg, epoch=0))
    cfg.data.num_workers = 2
    parallel = batches(build_train_loader(cfg, epoch=0))
    assert [b[0] for b in serial] == [b[0] for b in parallel]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(serial, parallel))


def test_rank_shards_are_disjoint(shapes):
    cfg = shapes_config(shapes, seed=1)
    ids = [[i for b in build_train_loader(cfg, epoch=0, rank=r, world_size=2) for i in b.image_ids]
           for r in range(2)]
    assert len(ids[0]) == len(ids[1]) == 6 and not set(ids[0]) & set(ids[1])


def test_val_loader_in_file_order(shapes):
    loader, dataset = build_val_loader(shapes_config(shapes))
    assert dataset.cat_ids == [1, 2, 3, 4] and len(dataset.coco.getImgIds()) == 3
    got = [b for b in loader]
    assert [i for b in got for i in b.image_ids] == [1, 2, 3]
    assert got[0].images.shape == (2, 3, 96, 96) and got[0].scales.tolist() == [[1.5, 1.5]] * 2


def test_loaders_generate_synthetic_data_when_asked(tmp_path):
    cfg = shapes_config(tmp_path / "gen")
    cfg.data.synth, cfg.data.synth_dir, cfg.data.synth_images, cfg.data.synth_size = True, str(tmp_path / "gen"), 4, 32
    loader, dataset = build_val_loader(cfg)
    assert len(dataset) == 1
    assert len(list(build_train_loader(cfg, epoch=0))) == 2


def test_loaders_apply_the_configs_pixel_limit(shapes):
    cfg = shapes_config(shapes)
    cfg.data.max_image_pixels = 4000  # the images are 64 x 64
    too_large = r"image too large \(4096 pixels; data.max_image_pixels = 4000\)"
    with pytest.raises(DatasetError, match=too_large):
        next(iter(build_train_loader(cfg, epoch=0)))
    with pytest.raises(DatasetError, match=too_large):
        next(iter(build_val_loader(cfg)[0]))
    with pytest.raises(DatasetError, match=too_large):
        next(iter(build_val_loader(cfg, cfg.data.train_ann, cfg.data.train_images)[0]))
    with pytest.raises(ValueError, match="go together"):
        build_val_loader(cfg, cfg.data.val_ann)
