import numpy as np
import pytest
import torch
from PIL import Image

from vfnet.core.config import DataConfig
from vfnet.data.transforms import Transform, build_transform, flip_boxes, rescale_size


@pytest.mark.parametrize("size, limits, expected", [
    ((640, 480), (1333, 800), (1067, 800)),  # short side binds: scale 800/480
    ((480, 640), (1333, 800), (800, 1067)),  # portrait: same scale
    ((1000, 100), (1333, 800), (1333, 133)),  # long side binds: scale 1.333
    ((256, 256), (128, 128), (128, 128)),
])
def test_rescale_size_fits_long_and_short_limits(size, limits, expected):
    assert rescale_size(*size, *limits) == expected


def test_resize_scales_image_and_boxes():
    image = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40
    out = Transform(scales=[(80, 80)])(image, np.array([[4.0, 2.0, 10.0, 12.0]]))
    assert out.image.shape == (3, 40, 80)
    assert out.scale == (2.0, 2.0)
    torch.testing.assert_close(out.boxes, torch.tensor([[8.0, 4.0, 20.0, 24.0]]))


def test_flip_mirrors_image_and_boxes():
    image = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    boxes = np.array([[2.0, 3.0, 10.0, 8.0], [0.0, 0.0, 40.0, 20.0]])
    plain = Transform()(image, boxes)
    flipped = Transform(flip_prob=1.0)(image, boxes)
    assert torch.equal(flipped.image, torch.flip(plain.image, dims=[2]))
    torch.testing.assert_close(flipped.boxes, torch.tensor([[30.0, 3.0, 38.0, 8.0], [0.0, 0.0, 40.0, 20.0]]))
    torch.testing.assert_close(flip_boxes(flipped.boxes, 40), plain.boxes)


def test_normalise_per_channel():
    image = np.full((4, 5, 3), 100, np.uint8)
    out = Transform(mean=(100.0, 50.0, 0.0), std=(1.0, 2.0, 4.0))(image, np.zeros((0, 4)))
    assert out.image.dtype == torch.float32
    assert out.boxes.shape == (0, 4)
    for channel, value in enumerate((0.0, 25.0, 25.0)):
        assert torch.all(out.image[channel] == value)


def test_multiscale_samples_each_scale_deterministically():
    t = Transform(scales=[(64, 64), (32, 32)], flip_prob=0.5)
    image = Image.new("RGB", (16, 16))
    sizes = [t(image, np.zeros((0, 4)), np.random.default_rng(i)).image.shape[1] for i in range(20)]
    assert set(sizes) == {32, 64}
    again = [t(image, np.zeros((0, 4)), np.random.default_rng(i)).image.shape[1] for i in range(20)]
    assert sizes == again


def test_build_transform_train_and_eval():
    cfg = DataConfig(img_scale=[100, 50], multiscale=[[80, 40], [60, 30]], flip_prob=0.25)
    train, val = build_transform(cfg, train=True), build_transform(cfg, train=False)
    assert train.scales == [(80, 40), (60, 30)] and train.flip_prob == 0.25
    assert val.scales == [(100, 50)] and val.flip_prob == 0.0
    assert val.mean == tuple(cfg.mean) and val.std == tuple(cfg.std)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="flip_prob"):
        Transform(flip_prob=2.0)
    with pytest.raises(ValueError, match="std"):
        Transform(std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="scales"):
        Transform(scales=[(0, 10)])
    with pytest.raises(ValueError, match="RGB"):
        Transform()(Image.new("L", (4, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="uint8"):
        Transform()(np.zeros((4, 4, 3), np.float32), np.zeros((0, 4)))
