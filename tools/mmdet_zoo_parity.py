"""Numerical parity of zoo models with mmdetection's own VFNet, random weights, float64.

Two checks, each in its own environment, run from the repository root (not in CI):

    # 1. the DCN stand-in of the mmdetection side against torchvision's compiled deform_conv2d
    #    (an environment with torch and torchvision; mmdetection not needed)
    python tools/mmdet_zoo_parity.py --stand-in
    # 2. zoo models against mmdetection 3.3.0 (the environment of tools/mmdet_vfnet_keys.py;
    #    also run by `tools/check_against_mmdet.py --zoo NAME ...`)
    python tools/mmdet_zoo_parity.py --zoo x101_64x4d_dcn r2_101_dcn [--size 160 224] [--seed 0]

1. `--stand-in`: mmcv-lite has no compiled ops, so the mmdetection side's DCNv2 layers and star
   conv run `mmdet_vfnet_keys.grid_sample_dcn` (bilinear sampling with `F.grid_sample`). Here it
   is compared with `torchvision.ops.deform_conv2d` on random float64 inputs (strides, paddings,
   dilations, groups, deform groups, offsets reaching past the border, whole-number offsets,
   maps 1 cell high or wide). Prints the largest absolute difference.
2. `--zoo`: for each named architecture (`mmdet_vfnet_keys.MODELS`), mmdetection's model is built
   from its shipped config, given random weights (BatchNorm statistics, DCN offset convs and all),
   converted (`vfnet.interop.mmdet.infer_config` / `to_our_state`) into ours (`kernels="torch"`:
   the PyTorch references), both cast to float64 and run on the same batch of 2 images
   (random pixels, random gt boxes; sizes H x W, multiples of 32). Compared: the head outputs of
   every level (cls logits, initial and refined boxes), the three losses (mmdetection's
   `VFNetHead.loss_by_feat`), the gradient of their sum for every trainable tensor (matched by
   name), and the detections before NMS (`predict_by_feat(rescale=True, with_nms=False)` against
   `VFNet.detections` with NMS replaced by "keep everything": NMS needs mmcv's compiled ops). For
   each: max |ours - mmdetection| and that over max |mmdetection| (the worst tensor for
   gradients). Our model computes a few steps in float32 whatever the input dtype (the `Scale`
   multipliers, the post-processing's scores and boxes), so the float64 runs differ at float32
   rounding there.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmdet_vfnet_keys import MODELS, grid_sample_dcn  # noqa: E402

# b, cin, cout, h, w, k, stride, padding, dilation, groups, dg
STAND_IN_CASES = [
    (2, 8, 6, 9, 11, 3, 1, 1, 1, 1, 1),
    (2, 8, 6, 10, 9, 3, 2, 1, 1, 2, 1),
    (1, 8, 4, 12, 10, 3, 1, 2, 2, 4, 2),
    (2, 16, 8, 7, 8, 3, 1, 1, 1, 4, 4),
    (1, 6, 6, 5, 6, 1, 1, 0, 1, 1, 3),
    (2, 4, 5, 1, 7, 3, 1, 1, 1, 1, 1),  # 1-cell-high and 1-cell-wide maps (P7 of a small image)
    (1, 4, 3, 6, 1, 3, 1, 1, 1, 1, 2),
    (1, 4, 3, 1, 1, 3, 1, 1, 1, 1, 1),
]


def check_stand_in(seed: int) -> float:
    """Max |grid_sample_dcn - torchvision deform_conv2d| over the cases, float64."""
    from torchvision.ops import deform_conv2d

    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b, cin, cout, h, w, k, stride, padding, dilation, groups, dg in STAND_IN_CASES:
        ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        x = torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64)
        offset = (torch.rand(b, 2 * dg * k * k, ho, wo, generator=gen, dtype=torch.float64) * 2 - 1) * 4
        offset[:, ::3] = offset[:, ::3].round()  # whole numbers: samples on cells and on the border
        mask = torch.rand(b, dg * k * k, ho, wo, generator=gen, dtype=torch.float64)
        weight = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=torch.float64)
        bias = torch.randn(cout, generator=gen, dtype=torch.float64)
        want = deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)
        got = grid_sample_dcn(x, offset, mask, weight, bias, stride, padding, dilation, groups)
        diff = float((got - want).abs().max())
        worst = max(worst, diff)
        print(f"stand-in {b}x{cin}x{h}x{w} k{k} s{stride} p{padding} d{dilation} g{groups} dg{dg}: "
              f"max |diff| {diff:.2e} (max |out| {float(want.abs().max()):.2e})")
    print(f"stand-in vs torchvision {torch.__version__}: max abs difference {worst:.2e} (float64)")
    return worst


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights for every floating tensor: He-normal convs, BatchNorm statistics and
    affine around 1 except each bottleneck's last BatchNorm scale (0.05-0.15, so the 100-layer
    residual stack stays well conditioned: with all scales near 1 its activations and gradients
    grow to ~1e4 and ~1e9 and float64 rounding is amplified to ~1e-4 relative by the head), small
    DCN offset convs (offsets of a few tenths of a cell)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, v in model.state_dict().items():
            if not v.dtype.is_floating_point:
                continue
            if name.endswith(".bn3.weight"):  # each residual branch's last BatchNorm: small (a tame network)
                v.copy_(torch.rand(v.shape, generator=gen) * 0.1 + 0.05)
            elif "running_var" in name or (name.endswith("weight") and v.ndim == 1):
                v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
            elif "conv_offset" in name:
                v.copy_(torch.randn(v.shape, generator=gen) * 0.05)
            elif v.ndim == 0:
                v.fill_(1.0)
            else:
                std = 0.05 if v.ndim == 1 else (2.0 / v[0].numel()) ** 0.5
                v.copy_(torch.randn(v.shape, generator=gen) * std)


def _float64(grid_priors):
    def wrapped(*args, **kwargs):
        return [p.double() for p in grid_priors(*args, **kwargs)]
    return wrapped


def _diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.double(), want.double()
    abs_diff = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    return abs_diff, abs_diff / scale if scale else abs_diff


def _report(rows: list[tuple[str, float, float]]) -> None:
    for what, a, r in rows:
        print(f"  {what:<28} max abs {a:.2e}  rel {r:.2e}")


def check_zoo(name: str, size: tuple[int, int], seed: int, float64_scale: bool = False
              ) -> list[tuple[str, float, float]]:
    from check_against_mmdet import random_boxes
    from mmdet_vfnet_keys import build
    from mmengine.structures import InstanceData

    import vfnet.model.detector as detector
    from vfnet.interop.mmdet import infer_config, to_our_state
    from vfnet.model import VFNet
    from vfnet.model.head import Scale

    torch.manual_seed(seed)
    ref = build(MODELS[name])
    randomise(ref, seed)
    weights = dict(ref.state_dict())
    cfg = infer_config(weights, name)
    cfg.model.kernels = "torch"
    cfg.infer.max_per_img = 1 << 30
    cfg.infer.nms_pre = 1 << 30  # no per-level top-k (float32 ties at its boundary): every pair above score_thr
    ours = VFNet.from_config(cfg)
    if float64_scale:
        for scale in ours.head.modules():
            if isinstance(scale, Scale):
                scale.forward = types.MethodType(lambda self, x: x * self.scale.to(x.dtype), scale)
    ours.load_state_dict(to_our_state(weights, name))
    ref.bbox_head.test_cfg.nms_pre = 1 << 30
    ref.double().train()
    for generator in (ref.bbox_head.atss_prior_generator, ref.bbox_head.fcos_prior_generator):
        generator.grid_priors = _float64(generator.grid_priors)  # float32 by default: ATSS anchors, points
    ours.double().train()
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    batch = 2
    x = torch.randn(batch, 3, h, w, generator=gen, dtype=torch.float64)
    gts = [random_boxes(h, w, gen) for _ in range(batch)]
    while any(len(b) == 0 for b, _ in gts):
        gts = [random_boxes(h, w, gen) for _ in range(batch)]
    gts = [(b.double(), lab) for b, lab in gts]
    metas = [{"img_shape": (h, w), "pad_shape": (h, w), "batch_input_shape": (h, w), "scale_factor": (1.0, 1.0)}
             for _ in range(batch)]
    rows = []

    t0 = time.time()
    ref_head = ref.bbox_head(ref.extract_feat(x))
    ref_losses = ref.bbox_head.loss_by_feat(*ref_head, [InstanceData(bboxes=b, labels=lab) for b, lab in gts],
                                            metas)
    sum(ref_losses.values()).backward()
    t_ref = time.time() - t0
    t0 = time.time()
    out = ours(x)
    losses = ours.loss(out, [b for b, _ in gts], [lab for _, lab in gts], [(h, w)] * batch)
    (losses["loss_cls"] + losses["loss_bbox_init"] + losses["loss_bbox_refine"]).backward()
    t_ours = time.time() - t0

    for i, (field, ref_field) in enumerate((("cls_scores", "cls logits"), ("bbox_init", "bbox init"),
                                             ("bbox_refine", "bbox refine"))):
        per_level = [_diff(o, r) for o, r in zip(getattr(out, field), ref_head[i])]
        rows.append((f"head {ref_field} (5 levels)", max(a for a, _ in per_level), max(r for _, r in per_level)))
    for ours_key, ref_key in (("loss_cls", "loss_cls"), ("loss_bbox_init", "loss_bbox"),
                              ("loss_bbox_refine", "loss_bbox_rf")):
        rows.append((f"loss {ours_key}", *_diff(losses[ours_key].detach(), ref_losses[ref_key].detach())))

    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    our_grads = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    mapped = to_our_state(ref_grads, name)
    if set(mapped) != set(our_grads):
        raise SystemExit(f"{name}: the trainable tensors differ: {sorted(set(mapped) ^ set(our_grads))[:5]}")
    grad_rows = {k: _diff(our_grads[k], mapped[k]) for k in mapped}
    worst_abs = max(a for a, _ in grad_rows.values())
    worst_key = max(grad_rows, key=lambda k: grad_rows[k][1])
    rows.append((f"grads ({len(mapped)} tensors) abs", worst_abs, worst_abs / max(
        float(g.abs().max()) for g in mapped.values())))
    rows.append(("grads worst tensor rel", *grad_rows[worst_key]))
    print(f"  worst gradient (relative): {worst_key}")

    saved = detector.batched_nms
    detector.batched_nms = lambda boxes, scores, labels, thr: torch.arange(len(scores))  # keep all
    try:
        ref.eval()
        ours.eval()
        with torch.no_grad():
            dets_ref = ref.bbox_head.predict_by_feat(ref_head[0], ref_head[2], batch_img_metas=metas, rescale=True,
                                                     with_nms=False)
            dets = ours.detections(out, torch.tensor([[h, w]] * batch), torch.ones(batch, 2))
    finally:
        detector.batched_nms = saved
    # per label: each box against mmdetection's nearest in (box, 1000 x score), and the sorted
    # scores against each other (ours rounds scores to float32, so the order of nearly equal
    # scores may differ)
    box_abs = score_abs = box_scale = score_scale = 0.0
    count = 0
    for r, o in zip(dets_ref, dets):
        for label in torch.cat([r.labels, o["labels"]]).unique():
            want_boxes, want_scores = r.bboxes[r.labels == label].double(), r.scores[r.labels == label].double()
            got_boxes = o["boxes"][o["labels"] == label].double()
            got_scores = o["scores"][o["labels"] == label].double()
            if len(want_boxes) != len(got_boxes):
                raise SystemExit(f"{name}: label {int(label)}: {len(got_boxes)} pre-NMS candidates, "
                                 f"mmdetection {len(want_boxes)}")
            # nearest in (box, 1000 x score): boxes clipped to the whole image coincide
            nearest = torch.cdist(torch.cat([want_boxes, 1e3 * want_scores[:, None]], 1),
                                  torch.cat([got_boxes, 1e3 * got_scores[:, None]], 1), p=float("inf")).min(dim=1)
            box_abs = max(box_abs, float((got_boxes[nearest.indices] - want_boxes).abs().max()))
            score_abs = max(score_abs, float((got_scores.sort().values - want_scores.sort().values).abs().max()))
            box_scale = max(box_scale, float(want_boxes.abs().max()))
            score_scale = max(score_scale, float(want_scores.max()))
            count += len(want_boxes)
    rows.append((f"det boxes ({count} cand.)", box_abs, box_abs / box_scale))
    rows.append(("det scores", score_abs, score_abs / score_scale))
    print(f"{name}: {ours.backbone.describe()}, input {batch}x3x{h}x{w} float64, "
          f"{sum(len(b) for b, _ in gts)} gt boxes, {int(losses['num_pos'])} positives; "
          f"forward+loss+backward {t_ref:.0f} s (mmdetection), {t_ours:.0f} s (ours)")
    _report(rows)
    return rows


def run_zoo(names: list[str], size: tuple[int, int], seed: int, float64_scale: bool = False) -> int:
    """Check each architecture; 1 if a relative difference is above 1e-5 (float32 rounding in
    the float32 steps is ~1e-7), else 0."""
    from mmdet_vfnet_keys import install_shim_if_needed

    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown architecture {', '.join(unknown)}: one of {', '.join(MODELS)}")
    install_shim_if_needed()
    bad = 0
    for name in names:
        bad += any(r > 1e-5 for _, _, r in check_zoo(name, size, seed, float64_scale))
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stand-in", action="store_true", help="grid_sample_dcn vs torchvision (needs torchvision)")
    parser.add_argument("--zoo", nargs="*", default=[], choices=sorted(MODELS), metavar="NAME")
    parser.add_argument("--size", nargs=2, type=int, default=[160, 224], metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64-scale", action="store_true",
                        help="run our head's Scale multipliers in the input dtype (they are float32 by design)")
    args = parser.parse_args()
    if args.size[0] % 32 or args.size[1] % 32 or min(args.size) < 129:
        parser.error("--size: multiples of 32, at least 129 (every level at least 2 cells a side)")
    status = 0
    if args.stand_in:
        status |= check_stand_in(args.seed) > 1e-12
    if args.zoo:
        status |= run_zoo(args.zoo, tuple(args.size), args.seed, args.float64_scale)
    return status


if __name__ == "__main__":
    sys.exit(main())
