"""The zoo's backbones and DCN parts: ResNeXt, Res2Net v1d, DCNv2 layers in the backbone and the
head, their configuration, and the 2x multi-scale resize range."""
import numpy as np
import pytest
import torch
from torch import nn

from kernels.ops import Ops
from vfnet.core.config import Config, load_config, shipped_configs
from vfnet.core.errors import CheckpointError, ConfigError
from vfnet.data.transforms import Transform, build_transform
from vfnet.model import VFNet
from vfnet.model.backbone import ResNet
from vfnet.model.dcn import ModulatedDeformConv
from vfnet.model.detector import build_backbone
from vfnet.model.head import VFNetHead
from vfnet.model.res2net import Res2Net

pytestmark = pytest.mark.usefixtures("one_thread")

TORCH = Ops.from_name("torch")
DCN = TORCH.deform_conv2d


def test_dcn_layer_layout_and_zero_offsets_give_half_the_plain_conv():
    torch.manual_seed(0)
    layer = ModulatedDeformConv(8, 6, 3, DCN, stride=2, padding=1, groups=2)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "weight": (6, 4, 3, 3), "conv_offset.weight": (27, 8, 3, 3), "conv_offset.bias": (27,)}
    assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()
    bound = 1 / (8 * 9) ** 0.5
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > bound / 2
    x = torch.randn(2, 8, 9, 11)
    plain = nn.functional.conv2d(x, layer.weight, None, 2, 1, 1, 2)
    torch.testing.assert_close(layer(x), 0.5 * plain, atol=1e-5, rtol=1e-5)  # mask = sigmoid(0)


def test_dcn_layer_follows_its_offsets():
    """A whole-cell offset of +1 column on every tap is the plain conv of the input shifted left
    (but at column 0, where the shifted input's padding is a real column for the DCN)."""
    torch.manual_seed(0)
    layer = ModulatedDeformConv(3, 4, 3, DCN, padding=1)
    with torch.no_grad():
        layer.conv_offset.bias[1:18:2] = 1.0  # dx of each tap (channels 2k+1)
        layer.conv_offset.bias[18:] = 30.0  # mask ~ 1
    x = torch.randn(1, 3, 6, 7)
    shifted = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], -1)
    expected = nn.functional.conv2d(shifted, layer.weight, None, 1, 1)
    torch.testing.assert_close(layer(x)[..., 1:], expected[..., 1:], atol=1e-5, rtol=1e-5)


def test_resnext_blocks_are_grouped_and_as_wide_as_the_reference():
    net = ResNet(50, groups=32, base_width=4)
    assert net.layer1[0].conv2.groups == 32 and tuple(net.layer1[0].conv2.weight.shape) == (128, 4, 3, 3)
    assert tuple(net.layer4[0].conv2.weight.shape) == (1024, 32, 3, 3)
    assert tuple(net.layer4[0].conv3.weight.shape) == (2048, 1024, 1, 1)
    outs = net.eval()(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(512, 8, 12), (1024, 4, 6), (2048, 2, 3)]
    with pytest.raises(ValueError, match="basic blocks"):
        ResNet(18, groups=2)


def test_dcn_stages_include_strided_convs_and_start_as_half_their_weights():
    torch.manual_seed(0)
    dcn = ResNet(50, stage_with_dcn=[False, True, False, True], deform_conv=DCN).eval()
    assert isinstance(dcn.layer2[0].conv2, ModulatedDeformConv) and dcn.layer2[0].conv2.stride == 2
    assert isinstance(dcn.layer4[2].conv2, ModulatedDeformConv)
    assert isinstance(dcn.layer1[0].conv2, nn.Conv2d) and isinstance(dcn.layer3[0].conv2, nn.Conv2d)
    with torch.no_grad():
        for m in dcn.modules():  # make the residual branches matter
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
    plain = ResNet(50).eval()
    state = {k: v for k, v in dcn.state_dict().items() if ".conv_offset." not in k}
    for k in state:
        if k.startswith(("layer2.", "layer4.")) and k.endswith("conv2.weight"):
            state[k] = state[k] * 0.5
    plain.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(dcn(x), plain(x)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no deform_conv"):
        ResNet(50, stage_with_dcn=[False, True, True, True])


def reference_bottle2neck(block, x):
    """The Res2Net block written out for scales = 3 (the module docstring's equations)."""
    out = torch.relu(block.bn1(block.conv1(x)))
    x1, x2, x3 = torch.split(out, block.width, 1)
    y1 = torch.relu(block.bns[0](block.convs[0](x1)))
    y2 = torch.relu(block.bns[1](block.convs[1](x2 if block.first else x2 + y1)))
    y3 = x3 if block.pool is None else block.pool(x3)
    identity = x if block.downsample is None else block.downsample(x)
    return torch.relu(block.bn3(block.conv3(torch.cat([y1, y2, y3], 1))) + identity)


def test_res2net_v1d_structure_and_blocks():
    torch.manual_seed(0)
    net = Res2Net(50, scales=3, base_width=8).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_()
    names = net.state_dict()
    assert "stem.7.running_var" in names and "conv1.weight" not in names
    assert tuple(names["layer1.0.convs.1.weight"].shape) == (8, 8, 3, 3)
    assert "layer2.0.downsample.1.weight" in names and "layer2.0.downsample.0.weight" not in names
    assert isinstance(net.layer2[0].downsample[0], nn.AvgPool2d) and net.layer2[0].downsample[0].ceil_mode
    assert net.layer2[0].pool is not None and net.layer1[0].pool is None and net.layer2[1].pool is None
    x = torch.randn(1, 64, 17, 15)
    y = torch.randn(1, 256, 17, 15)
    torch.testing.assert_close(net.layer1[1](y), reference_bottle2neck(net.layer1[1], y))
    torch.testing.assert_close(net.layer2[0](y), reference_bottle2neck(net.layer2[0], y))
    torch.testing.assert_close(net.layer1[0](x), reference_bottle2neck(net.layer1[0], x))
    outs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(512, 8, 12), (1024, 4, 6), (2048, 2, 3)]


def test_res2net_freezes_its_deep_stem_and_takes_dcn():
    net = Res2Net(50, scales=2, base_width=4, frozen_stages=1, stage_with_dcn=[False, False, True, True],
                  deform_conv=DCN).train()
    assert not any(p.requires_grad for p in net.stem.parameters())
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())
    assert isinstance(net.layer3[0].convs[0], ModulatedDeformConv) and isinstance(net.layer2[0].convs[0], nn.Conv2d)
    assert not net.stem[1].training  # norm_eval


def test_head_dcn_on_last_conv():
    torch.manual_seed(0)
    head = VFNetHead(5, 32, TORCH.star_pair, channels=32, stacked_convs=2, gn_groups=8, dcn_on_last_conv=True,
                     deform_conv=DCN)
    names = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    for tower in ("cls", "reg"):
        assert names[f"{tower}_convs.1.0.conv_offset.weight"] == (27, 32, 3, 3)
        assert f"{tower}_convs.0.0.conv_offset.weight" not in names
        assert isinstance(getattr(head, f"{tower}_convs")[1][1], nn.GroupNorm)
    assert not head.cls_convs[1][0].conv_offset.weight.any()
    assert head.cls_convs[1][0].weight.abs().max() > 0.03  # uniform +-1/sqrt(288), not normal(0.01)
    outs = head([torch.randn(1, 32, 8 >> i or 1, 8 >> i or 1) for i in range(5)])
    assert outs.cls_scores[0].shape == (1, 5, 8, 8)
    with pytest.raises(ValueError, match="needs a deform_conv"):
        VFNetHead(5, 32, TORCH.star_pair, channels=32, gn_groups=8, dcn_on_last_conv=True)


def test_from_config_builds_each_backbone_kind():
    cfg = Config()
    cfg.model.kernels = "torch"
    cfg.model.backbone, cfg.model.depth, cfg.model.base_width, cfg.model.scales = "res2net", 50, 26, 4
    cfg.model.stage_with_dcn = [False, True, True, True]
    with torch.device("meta"):
        net = build_backbone(cfg.model, TORCH)
    assert isinstance(net, Res2Net) and net.describe() == "Res2Net-50 26w x 4s (DCN)"
    assert net.layer2[0].convs[0].deform_conv is TORCH.deform_conv2d
    cfg.model.backbone, cfg.model.groups, cfg.model.base_width = "resnet", 64, 4
    with torch.device("meta"):
        assert build_backbone(cfg.model, TORCH).describe() == "ResNeXt-50 64x4d (DCN)"


def test_base_channels_scales_every_resnet_width():
    """mmdetection's base_channels: the stem and stage 1 are that wide, each later stage doubles it."""
    net = ResNet(18, base_channels=32, frozen_stages=0)
    assert net.conv1.out_channels == 32 and net.layer1[0].conv1.out_channels == 32
    assert net.out_channels == [64, 128, 256] and net.describe() == "ResNet-18 (32 base channels)"
    assert [c.shape[1] for c in net(torch.randn(1, 3, 64, 64))] == net.out_channels
    assert ResNet(50, base_channels=16, frozen_stages=0).out_channels == [128, 256, 512]
    with pytest.raises(ValueError, match="64 for ResNeXt"):
        ResNet(50, groups=32, base_width=4, base_channels=32)
    assert load_config("shapes_tiny", ["model.base_channels=32"]).model.base_channels == 32
    for other in (["model.backbone='res2net'", "model.depth=50"], ["model.pretrained='r18.pth'"]):
        with pytest.raises(ConfigError, match="model.base_channels = 32 is invalid"):
            load_config("shapes_tiny", ["model.base_channels=32", *other])


@pytest.mark.parametrize("key, value, message", [
    ("model.stage_with_dcn", "[false, true, true, true]", "model.depth = 18 is invalid"),
    ("model.groups", "4", "model.depth = 18 is invalid"),
    ("model.backbone", "res2net", "model.depth = 18 is invalid"),
    ("model.backbone", "resnest", "model.backbone = 'resnest' is invalid"),
    ("model.base_channels", "0", "model.base_channels = 0 is invalid"),
    ("model.stage_with_dcn", "[false]", "model.stage_with_dcn = [False] is invalid"),
    ("data.scale_range", "[[1333, 480]]", "data.scale_range"),
])
def test_invalid_backbone_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("shapes_tiny", [f"{key}={value}"])


def test_scale_range_draws_each_side_uniformly_per_image():
    t = Transform(scale_range=((1333, 480), (1333, 960)))
    rng = np.random.default_rng(0)
    shorts = [t.sample_scale(rng) for _ in range(4000)]
    assert {long for long, _ in shorts} == {1333}
    values = np.array([s for _, s in shorts])
    assert values.min() == 480 and values.max() == 960 and len(set(values)) > 400
    out = t(np.zeros((100, 100, 3), np.uint8), np.array([[0, 0, 100, 100]]), np.random.default_rng(1))
    side = out.image.shape[1]
    assert 480 <= side <= 960 and out.image.shape[2] == side and out.scale == (side / 100, side / 100)
    cfg = Config()
    cfg.data.scale_range = [[1333, 480], [1333, 960]]
    assert build_transform(cfg.data, train=True).scale_range == ((1333, 480), (1333, 960))
    assert build_transform(cfg.data, train=False).scales == [(1333, 800)]


def test_dcn_backbone_loads_imagenet_weights_without_offsets(tmp_path):
    plain = ResNet(50)
    torch.save(plain.state_dict(), tmp_path / "r50.pth")
    dcn = ResNet(50, stage_with_dcn=[False, True, True, True], deform_conv=DCN)
    dcn.load_torchvision_state_dict(tmp_path / "r50.pth")
    assert torch.equal(dcn.layer3[0].conv2.weight, plain.layer3[0].conv2.weight)
    assert not dcn.layer3[0].conv2.conv_offset.weight.any()
    with pytest.raises(CheckpointError, match="ResNeXt-50 32x4d"):
        ResNet(50, groups=32, base_width=4).load_torchvision_state_dict(tmp_path / "r50.pth")


ZOO = {  # shipped config -> (backbone, depth, groups, base_width, DCN in c3-c5 and the head)
    "vfnet_r50_fpn_ms-2x_coco": ("resnet", 50, 1, 64, False),
    "vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco": ("resnet", 50, 1, 64, True),
    "vfnet_r101_fpn_1x_coco": ("resnet", 101, 1, 64, False),
    "vfnet_r101_fpn_2x_coco": ("resnet", 101, 1, 64, False),
    "vfnet_r101_fpn_ms-2x_coco": ("resnet", 101, 1, 64, False),
    "vfnet_r101-mdconv-c3-c5_fpn_ms-2x_coco": ("resnet", 101, 1, 64, True),
    "vfnet_x101-32x4d_fpn_ms-2x_coco": ("resnet", 101, 32, 4, False),
    "vfnet_x101-32x4d-mdconv-c3-c5_fpn_ms-2x_coco": ("resnet", 101, 32, 4, True),
    "vfnet_x101-64x4d_fpn_ms-2x_coco": ("resnet", 101, 64, 4, False),
    "vfnet_x101-64x4d-mdconv-c3-c5_fpn_ms-2x_coco": ("resnet", 101, 64, 4, True),
    "vfnet_res2net-101_fpn_ms-2x_coco": ("res2net", 101, 1, 26, False),
    "vfnet_res2net101-mdconv-c3-c5_fpn_ms-2x_coco": ("res2net", 101, 1, 26, True),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_configs_build_the_reference_models(name):
    assert name in shipped_configs()
    cfg = load_config(name)
    backbone, depth, groups, base_width, dcn = ZOO[name]
    m = cfg.model
    assert (m.backbone, m.depth, m.groups, m.base_width) == (backbone, depth, groups, base_width)
    assert m.stage_with_dcn == [False, dcn, dcn, dcn] and m.dcn_on_last_conv == dcn
    assert (m.frozen_stages, m.norm_eval, m.scales) == (1, True, 4)
    two_x = "2x" in name
    assert cfg.train.epochs == (24 if two_x else 12)
    assert cfg.train.lr_steps == ([16.0, 22.0] if two_x else [8.0, 11.0])
    assert cfg.data.scale_range == ([[1333, 480], [1333, 960]] if "ms-2x" in name else [])
    assert cfg.data.img_scale == [1333, 800]
    assert cfg.model.pretrained.startswith("data/pretrained/")
    cfg.model.pretrained = ""  # not shipped
    with torch.device("meta"):
        VFNet.from_config(cfg)
