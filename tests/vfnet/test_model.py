import dataclasses
import math

import pytest
import torch
from torch import nn

import kernels.reference
from kernels import Ops
from vfnet.core.config import AssignConfig, Config, InferConfig, LossConfig
from vfnet.core.errors import CheckpointError
from vfnet.model import VFNet
from vfnet.model.backbone import ResNet
from vfnet.model.fpn import FPN
from vfnet.model.head import HeadOutputs, VFNetHead
from vfnet.model.losses import VFNetLoss

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**model) -> Config:
    cfg = Config()
    cfg.model.depth = 18
    cfg.model.num_classes = NUM_CLASSES
    cfg.model.fpn_channels = 32
    cfg.model.head_channels = 32
    cfg.model.gn_groups = 8
    cfg.model.kernels = "torch"
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def gts():
    boxes = [torch.tensor([[8.0, 10.0, 50.0, 40.0], [30.0, 28.0, 60.0, 62.0]]), torch.tensor([[4.0, 4.0, 28.0, 36.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    return boxes, labels


# ---------------------------------------------------------------------------------------------
# Head


def test_head_shapes_init_and_star_conv_wiring():
    torch.manual_seed(0)
    calls = []
    real = kernels.reference.star_deform_conv2d_pair_reference

    def spy(x_cls, x_reg, bbox, w_cls, w_reg, stride, *, gradient_mul):
        result = real(x_cls, x_reg, bbox, w_cls, w_reg, stride, gradient_mul=gradient_mul)
        calls.append((x_cls, x_reg, bbox, w_cls, w_reg, stride, gradient_mul, result))
        return result

    model = VFNet.from_config(small_cfg(), ops=dataclasses.replace(Ops.from_name("torch"), star_pair=spy))
    images = torch.randn(2, 3, 96, 64)
    out = model(images)
    assert isinstance(out, HeadOutputs)
    head = model.head
    features = model.neck(model.backbone(images))
    sizes = [(12, 8), (6, 4), (3, 2), (2, 1), (1, 1)]
    for level, (h, w) in enumerate(sizes):
        assert out.cls_scores[level].shape == (2, NUM_CLASSES, h, w)
        assert out.bbox_init[level].shape == out.bbox_refine[level].shape == (2, 4, h, w)
        assert out.bbox_init[level].dtype == out.bbox_refine[level].dtype == torch.float32
        x_cls, x_reg, bbox, w_cls, w_reg, stride, gradient_mul, (cls_star, reg_star) = calls[level]
        # the star conv runs on both towers' outputs, with the initial box and this level's stride
        assert torch.allclose(x_cls, head.cls_convs(features[level]))
        assert torch.allclose(x_reg, head.reg_convs(features[level]))
        assert bbox is out.bbox_init[level] and stride == [8, 16, 32, 64, 128][level]
        assert gradient_mul == 0.1 and w_cls is head.star_cls_weight and w_reg is head.star_reg_weight
        denom = [64.0, 128.0, 256.0, 512.0, 1024.0][level]
        init = torch.exp(head.scales[level].scale * head.reg_init(head.reg_init_conv(x_reg))) * denom
        assert torch.allclose(out.bbox_init[level], init, rtol=1e-5)
        factor = torch.exp(head.scales_refine[level].scale * head.reg_refine(torch.relu(reg_star)))
        assert torch.allclose(out.bbox_refine[level], factor * init, rtol=1e-5)
        assert torch.allclose(out.cls_scores[level], head.cls(torch.relu(cls_star)), atol=1e-6)
    # probabilities start at the 0.01 prior
    assert model.head.cls.bias.detach().allclose(torch.full((NUM_CLASSES,), -math.log(99)))
    assert torch.sigmoid(out.cls_scores[0]).mean().item() == pytest.approx(0.01, rel=0.1)
    assert all(s.scale.item() == 1.0 for s in list(model.head.scales) + list(model.head.scales_refine))
    convs = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.std().item() == pytest.approx(0.01, rel=0.2) for m in convs if m.weight.numel() > 1000)
    assert all(m.bias is None for m in model.head.cls_convs.modules() if isinstance(m, nn.Conv2d))


def test_refined_box_uses_the_detached_initial_box():
    torch.manual_seed(0)
    model = VFNet.from_config(small_cfg(gradient_mul=0.0))  # no gradient through the star points either
    out = model(torch.randn(1, 3, 64, 64))
    out.bbox_refine[0].sum().backward(retain_graph=True)
    grad = model.head.reg_init.weight.grad
    assert grad is None or not grad.any()
    assert model.head.reg_refine.weight.grad.abs().sum() > 0
    out.bbox_init[0].sum().backward()
    assert model.head.reg_init.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Backbone


def test_backbone_channels_frozen_stages_and_norm_eval():
    for depth, channels in ((18, [128, 256, 512]), (50, [512, 1024, 2048])):
        net = ResNet(depth)
        feats = net(torch.randn(1, 3, 64, 64))
        assert [f.shape[1] for f in feats] == channels == net.out_channels
        assert [f.shape[-1] for f in feats] == [8, 4, 2]
    net = ResNet(18, frozen_stages=1, norm_eval=True).train()
    frozen = [net.conv1, net.bn1, net.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())  # BN affine params included
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    before = net.layer2[0].bn1.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(net.layer2[0].bn1.running_mean, before)  # statistics frozen

    net = ResNet(18, frozen_stages=2, norm_eval=False).train()
    assert not any(p.requires_grad for p in net.layer2.parameters())
    assert not net.layer2[0].bn1.training and not net.bn1.training
    assert net.layer3[0].bn1.training and all(p.requires_grad for p in net.layer3.parameters())
    net(torch.randn(2, 3, 64, 64))
    assert not torch.equal(net.layer3[0].bn1.running_mean, torch.zeros(256))
    net = ResNet(18, frozen_stages=0, norm_eval=False).train()
    assert net.bn1.training and all(p.requires_grad for p in net.parameters())
    # the detector's train() keeps the frozen-BN backbone in eval mode
    model = VFNet.from_config(small_cfg()).train()
    assert model.training and not model.backbone.layer3[0].bn1.training


def torchvision_state(depth: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = ResNet(depth).state_dict()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return state


def test_pretrained_loading(tmp_path):
    state = torchvision_state(18, seed=1)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    net = ResNet(18)
    net.load_torchvision_state_dict(path)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    # from the config, through the detector; a dict nested under "state_dict" also loads
    torch.save({"state_dict": state}, tmp_path / "nested.pth")
    model = VFNet.from_config(small_cfg(pretrained=str(tmp_path / "nested.pth")))
    assert torch.equal(model.backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])


def test_pretrained_errors(tmp_path):
    net = ResNet(18)
    with pytest.raises(CheckpointError, match="missing.pth"):
        net.load_torchvision_state_dict(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        net.load_torchvision_state_dict(corrupt)
    truncated = tmp_path / "truncated.pth"
    torch.save(torchvision_state(18, 2), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        net.load_torchvision_state_dict(truncated)
    renamed = tmp_path / "renamed.pth"  # e.g. a detector checkpoint's "backbone." prefix
    torch.save({f"backbone.{k}": v for k, v in torchvision_state(18, 3).items()}, renamed)
    with pytest.raises(CheckpointError, match="renamed.pth.*missing"):
        net.load_torchvision_state_dict(renamed)
    deeper = tmp_path / "resnet34.pth"
    torch.save(torchvision_state(34, 4), deeper)
    with pytest.raises(CheckpointError, match="resnet34.pth.*unexpected.*layer1.2"):
        net.load_torchvision_state_dict(deeper)
    wrong = torchvision_state(18, 5)
    wrong["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    torch.save(wrong, tmp_path / "shapes.pth")
    with pytest.raises(CheckpointError, match="shapes.pth.*layer2.0.conv1.weight"):
        net.load_torchvision_state_dict(tmp_path / "shapes.pth")
    before = net.layer1[0].conv1.weight.clone()
    assert torch.equal(net.layer1[0].conv1.weight, before)  # failed loads change nothing


# ---------------------------------------------------------------------------------------------
# Detector: losses, predict, kernels switch, overfitting


def test_loss_keys_and_no_positive_batch():
    torch.manual_seed(0)
    model = VFNet.from_config(small_cfg())
    images = torch.randn(2, 3, 64, 64)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)] * 2
    losses = model.loss(model(images), *empty)
    assert set(losses) == {"loss_cls", "loss_bbox_init", "loss_bbox_refine", "num_pos"}
    assert losses["num_pos"].item() == 0 and not losses["num_pos"].requires_grad
    assert losses["loss_bbox_init"].item() == 0 and losses["loss_bbox_refine"].item() == 0
    (losses["loss_cls"] + losses["loss_bbox_init"] + losses["loss_bbox_refine"]).backward()
    assert model.head.cls.weight.grad.abs().sum() > 0
    assert model.head.reg_init.weight.grad is not None  # box branch attached, zero gradient
    losses = model.loss(model(images), *gts())
    assert losses["num_pos"].item() > 0 and losses["loss_bbox_init"].item() > 0


def test_model_from_parts_uses_its_own_settings_and_no_config():
    """A VFNet built by hand from its parts, without a config: the same tensors under the same names
    as `from_config` (same seed, same order of initialisation), and the assign and infer settings it
    was given, not the config's; the padded sizes come with the call."""
    ops = Ops.from_name("torch")
    torch.manual_seed(0)
    backbone = ResNet(18)
    neck = FPN(backbone.out_channels, 32)
    head = VFNetHead(NUM_CLASSES, 32, ops.star_pair, channels=32, gn_groups=8)
    model = VFNet(backbone, neck, head, VFNetLoss(LossConfig(), ops.varifocal_loss),
                  assign=AssignConfig(topk=1), infer=InferConfig(max_per_img=2))
    torch.manual_seed(0)
    configured = VFNet.from_config(small_cfg())
    assert model.cfg is None and model.kernels == "" and configured.kernels == "torch"
    state, configured_state = model.state_dict(), configured.state_dict()
    assert list(state) == list(configured_state)
    assert all(torch.equal(state[k], configured_state[k]) for k in state)

    images = torch.randn(2, 3, 64, 96)
    padded = [(64, 96), (64, 64)]
    with torch.no_grad():
        ours = model.loss(model(images), *gts(), padded)["num_pos"].item()
        theirs = configured.loss(configured(images), *gts(), padded)["num_pos"].item()
        model.head.cls.bias.fill_(3.0)  # every score ~0.95: plenty of candidates
        configured.head.cls.bias.fill_(3.0)
    assert 0 < ours < theirs  # topk 1 candidate per level and gt instead of 9
    sizes, scales = torch.tensor([[64, 96], [50, 70]]), torch.ones(2, 2)
    assert [len(r["scores"]) for r in model.eval().predict(images, sizes, scales)] == [2, 2]
    assert all(len(r["scores"]) > 2 for r in configured.eval().predict(images, sizes, scales))


def test_predict_shapes_rescaling_and_empty():
    torch.manual_seed(0)
    cfg = small_cfg()
    cfg.infer.max_per_img = 7
    model = VFNet.from_config(cfg).eval()
    images = torch.randn(2, 3, 64, 96)
    sizes = torch.tensor([[64, 96], [50, 70]])
    scales = torch.tensor([[0.5, 0.5], [2.0, 2.0]])
    with torch.no_grad():
        model.head.cls.bias.fill_(3.0)  # every score ~0.95: plenty of candidates
    results = model.predict(images, sizes, scales)
    assert len(results) == 2
    for result, (h, w), (sx, sy) in zip(results, sizes.tolist(), scales.tolist()):
        assert 0 < len(result["boxes"]) <= 7
        assert result["boxes"].shape == (len(result["scores"]), 4) and result["labels"].dtype == torch.long
        assert (result["boxes"][:, 0::2] <= w / sx + 1e-4).all() and (result["boxes"][:, 1::2] <= h / sy + 1e-4).all()
        assert (result["boxes"] >= 0).all() and (result["scores"] > 0.05).all()
        assert torch.all(result["scores"][:-1] >= result["scores"][1:])
        assert ((result["labels"] >= 0) & (result["labels"] < NUM_CLASSES)).all()
    with torch.no_grad():
        model.head.cls.bias.fill_(-20.0)  # nothing above the threshold
    for result in model.predict(images, sizes, scales):
        assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,) and result["labels"].shape == (0,)
    with pytest.raises(ValueError, match="scales"):
        model.predict(images, sizes, scales[:1])


def test_triton_and_torch_kernels_give_the_same_losses():
    torch.manual_seed(0)
    models = []
    for kernels_name in ("torch", "triton"):
        cfg = small_cfg(head_channels=16, fpn_channels=16, gn_groups=4, kernels=kernels_name)
        cfg.assign.anchor_scale = 2.0  # positives on a 32 px image
        models.append(VFNet.from_config(cfg))
    torch_model, triton_model = models
    triton_model.load_state_dict(torch_model.state_dict())
    images = torch.randn(1, 3, 32, 32)  # tiny: the Triton kernels run in the interpreter
    boxes, labels = [torch.tensor([[2.0, 3.0, 20.0, 30.0], [12.0, 8.0, 31.0, 22.0]])], [torch.tensor([2, 0])]
    results = []
    for model in (torch_model, triton_model):
        losses = model.loss(model(images), boxes, labels)
        total = losses["loss_cls"] + losses["loss_bbox_init"] + losses["loss_bbox_refine"]
        total.backward()
        results.append((losses, model.head.star_cls_weight.grad.clone(), model.head.reg_init.weight.grad.clone()))
    (ref, ref_gw, ref_gi), (ker, ker_gw, ker_gi) = results
    assert ref["num_pos"].item() == ker["num_pos"].item() > 0
    for name in ("loss_cls", "loss_bbox_init", "loss_bbox_refine"):
        assert ker[name].item() == pytest.approx(ref[name].item(), rel=1e-4), name
    assert torch.allclose(ker_gw, ref_gw, rtol=1e-3, atol=1e-6)
    assert torch.allclose(ker_gi, ref_gi, rtol=1e-3, atol=1e-6)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = VFNet.from_config(small_cfg(frozen_stages=4)).train()  # frozen backbone: fast, FPN + head learn
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(2, 3, 64, 64)
    boxes, labels = gts()
    history = []
    for _ in range(20):
        losses = model.loss(model(images), boxes, labels)
        total = losses["loss_cls"] + losses["loss_bbox_init"] + losses["loss_bbox_refine"]
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.7 * history[0], history


@pytest.mark.gpu
def test_cuda_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    model = VFNet.from_config(small_cfg(kernels="triton")).cuda()
    images = torch.randn(2, 3, 128, 96, device="cuda")
    boxes, labels = gts()
    boxes, labels = [b.cuda() for b in boxes], [lab.cuda() for lab in labels]
    reference = model.loss(model(images), boxes, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images)
        losses = model.loss(out, boxes, labels)
    assert all(b.dtype == torch.float32 for b in out.bbox_init + out.bbox_refine)
    assert losses["num_pos"].item() == reference["num_pos"].item() > 0
    for name in ("loss_cls", "loss_bbox_init", "loss_bbox_refine"):  # bf16 has ~3 significant digits
        assert losses[name].item() == pytest.approx(reference[name].item(), rel=0.05, abs=1e-3), name
    sum(v for k, v in losses.items() if k != "num_pos").backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    results = model.predict(images, torch.tensor([[128, 96]] * 2), torch.ones(2, 2))
    assert all(r["boxes"].device.type == "cuda" for r in results)


def _losses_and_grads(model, images, boxes, labels):
    losses = model.loss(model(images), boxes, labels)
    sum(v for k, v in losses.items() if k != "num_pos").backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("kernels_name", ["torch", "triton"])
def test_channels_last_model_computes_the_same_function(kernels_name):
    """model.channels_last stores the conv weights NHWC and runs the images NHWC: the same losses
    and gradients as the default layout (float64: agreement to rounding), and the state dict
    moves between the two layouts."""
    torch.manual_seed(0)
    cfg = small_cfg(head_channels=16, fpn_channels=16, gn_groups=4, kernels=kernels_name)
    cfg.assign.anchor_scale = 2.0  # positives on a 32 px image (Triton: interpreter-sized)
    dense = VFNet.from_config(cfg).double()
    cfg.model.channels_last = True
    nhwc = VFNet.from_config(cfg).double()
    nhwc.load_state_dict(dense.state_dict())
    assert nhwc.head.cls_convs[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not dense.head.cls_convs[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    boxes, labels = [torch.tensor([[2.0, 3.0, 20.0, 30.0], [12.0, 8.0, 31.0, 22.0]])], [torch.tensor([2, 0])]
    features = nhwc.backbone(images.contiguous(memory_format=torch.channels_last))
    assert features[-1].is_contiguous(memory_format=torch.channels_last)
    (ref, ref_grads), (got, got_grads) = (_losses_and_grads(m, images, boxes, labels) for m in (dense, nhwc))
    assert got["num_pos"].item() == ref["num_pos"].item() > 0
    for name in ("loss_cls", "loss_bbox_init", "loss_bbox_refine"):
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == ref_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-11, msg=name)
    round_trip = VFNet.from_config(small_cfg(head_channels=16, fpn_channels=16, gn_groups=4))
    round_trip.load_state_dict(nhwc.state_dict())
    assert all(torch.equal(a, b.float()) for a, b in
               zip(round_trip.state_dict().values(), nhwc.state_dict().values()) if a.is_floating_point())
