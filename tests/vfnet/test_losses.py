import pytest
import torch

from kernels import Ops
from kernels.reference import varifocal_loss_dense_reference
from vfnet.core.config import LossConfig
from vfnet.model.assign import Targets
from vfnet.model.losses import VFNetLoss, flatten_levels, reduce_mean

TORCH, TRITON = Ops.from_name("torch"), Ops.from_name("triton")

C = 3


def make_case(gen, batch=2, points=40, positives=(5, 0)):
    pts = torch.rand(points, 2, generator=gen) * 100
    labels = torch.full((batch, points), C)
    boxes = torch.zeros(batch, points, 4)
    for b, n in enumerate(positives):
        idx = torch.randperm(points, generator=gen)[:n]
        labels[b, idx] = torch.randint(0, C, (n,), generator=gen)
        lt = pts[idx] - torch.rand(n, 2, generator=gen) * 20 - 1
        rb = pts[idx] + torch.rand(n, 2, generator=gen) * 20 + 1
        boxes[b, idx] = torch.cat([lt, rb], dim=1)
    targets = Targets(labels=labels, boxes=boxes, positive=labels < C)
    logits = torch.randn(batch, points, C, generator=gen).requires_grad_()
    init = (torch.rand(batch, points, 4, generator=gen) * 20 + 0.5).requires_grad_()
    refine = (torch.rand(batch, points, 4, generator=gen) * 20 + 0.5).requires_grad_()
    return logits, init, refine, pts, targets


def giou_by_hand(a, b):
    """Straight-line GIoU of single boxes (xyxy lists)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (enclose - union) / enclose


def expected_losses(logits, init, refine, pts, targets, cfg):
    """The reference head's recipe with explicit positive indexing and per-point Python loops."""
    pos = targets.positive.reshape(-1).nonzero().flatten().tolist()
    flat_pts = pts.repeat(logits.shape[0], 1)
    gts = targets.boxes.reshape(-1, 4)
    out = {}
    dense = torch.zeros(logits.shape[0] * logits.shape[1], C, dtype=torch.float64)
    for name, dist, weight in (("loss_bbox_init", init, cfg.init_weight),
                               ("loss_bbox_refine", refine, cfg.refine_weight)):
        d = dist.detach().reshape(-1, 4).double()
        total, norm = 0.0, 0.0
        for i in pos:
            x, y = flat_pts[i].tolist()
            box = [x - d[i, 0].item(), y - d[i, 1].item(), x + d[i, 2].item(), y + d[i, 3].item()]
            iou, giou = giou_by_hand(box, gts[i].double().tolist())
            total += max(iou, 1e-6) * (1 - giou)
            norm += max(iou, 1e-6)
            if name == "loss_bbox_refine":
                dense[i, targets.labels.reshape(-1)[i]] = max(iou, 1e-6)
        out[name] = weight * total / max(norm, 1.0)
    vfl = varifocal_loss_dense_reference(logits.detach().reshape(-1, C).double(), dense, reduction="sum")
    out["loss_cls"] = cfg.cls_weight * vfl.item() / max(len(pos), 1)
    return out


@pytest.mark.parametrize("positives", [(5, 0), (30, 12)])
def test_matches_reference_recipe(seeded, positives):
    cfg = LossConfig()
    case = make_case(seeded, positives=positives)
    losses = VFNetLoss(cfg, TORCH.varifocal_loss)(*case)
    expected = expected_losses(*case, cfg)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-4), name
    assert losses["num_pos"].item() == sum(positives)


def test_weights_and_alpha_gamma_pass_through(seeded):
    case = make_case(seeded, positives=(6, 3))
    base = VFNetLoss(LossConfig(), TORCH.varifocal_loss)(*case)
    cfg = LossConfig(init_weight=3.0, refine_weight=1.0, cls_weight=0.5)
    scaled = VFNetLoss(cfg, TORCH.varifocal_loss)(*case)
    assert scaled["loss_bbox_init"].item() == pytest.approx(2 * base["loss_bbox_init"].item(), rel=1e-6)
    assert scaled["loss_bbox_refine"].item() == pytest.approx(base["loss_bbox_refine"].item() / 2, rel=1e-6)
    assert scaled["loss_cls"].item() == pytest.approx(base["loss_cls"].item() / 2, rel=1e-6)
    other = VFNetLoss(LossConfig(alpha=0.25, gamma=1.0), TORCH.varifocal_loss)(*case)
    assert other["loss_cls"].item() != pytest.approx(base["loss_cls"].item(), rel=1e-3)


def test_no_positives_gives_zero_box_losses_with_gradients(seeded):
    logits, init, refine, pts, targets = make_case(seeded, positives=(0, 0))
    with torch.no_grad():  # extreme predictions at background points must not poison anything
        init[0, 0] = float("inf")
        refine[1, 3] = 1e30
    losses = VFNetLoss(LossConfig(), TORCH.varifocal_loss)(logits, init, refine, pts, targets)
    assert losses["num_pos"].item() == 0
    assert losses["loss_bbox_init"].item() == 0 and losses["loss_bbox_refine"].item() == 0
    assert losses["loss_cls"].item() > 0
    total = losses["loss_cls"] + losses["loss_bbox_init"] + losses["loss_bbox_refine"]
    total.backward()
    assert init.grad is not None and refine.grad is not None
    assert torch.equal(init.grad, torch.zeros_like(init)) and torch.equal(refine.grad, torch.zeros_like(refine))
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_gradients_flow_at_positives(seeded):
    logits, init, refine, pts, targets = make_case(seeded, positives=(4, 2))
    losses = VFNetLoss(LossConfig(), TORCH.varifocal_loss)(logits, init, refine, pts, targets)
    sum(v for k, v in losses.items() if k != "num_pos").backward()
    moved = init.grad.abs().sum(-1) > 0
    assert torch.equal(moved, targets.positive)
    assert torch.equal(refine.grad.abs().sum(-1) > 0, targets.positive)


def test_kernel_vfl_path_matches_reference(seeded):
    case = make_case(seeded, positives=(7, 2))
    ref = VFNetLoss(LossConfig(), TORCH.varifocal_loss)(*case)
    ker = VFNetLoss(LossConfig(), TRITON.varifocal_loss)(*case)  # Triton interpreter on CPU
    for name in ("loss_cls", "loss_bbox_init", "loss_bbox_refine"):
        assert ker[name].item() == pytest.approx(ref[name].item(), rel=1e-5)


def test_bad_shapes_and_helpers(seeded):
    logits, init, refine, pts, targets = make_case(seeded)
    with pytest.raises(ValueError, match="bbox_refine"):
        VFNetLoss(LossConfig(), TORCH.varifocal_loss)(logits, init, refine[:, :-1], pts, targets)
    value = torch.tensor(3.0)
    assert reduce_mean(value) is value  # no process group: a no-op
    maps = [torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2), torch.zeros(2, 3, 1, 1)]
    flat = flatten_levels(maps)
    assert flat.shape == (2, 5, 3) and flat[1, 1].tolist() == maps[0][1, :, 0, 1].tolist()
