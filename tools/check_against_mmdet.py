"""Compare our ATSS targets and inference candidates with mmdetection's own VFNet head.

Run outside CI, in the environment of `tools/mmdet_vfnet_keys.py` (mmdetection 3.3.0, mmengine,
mmcv-lite; the same `mmcv.ops` shim: the head is built, never run forward), from the repository
root:

    python tools/check_against_mmdet.py [--batches 40] [--seed 0]

1. Targets: random batches of 2-4 images of different sizes (boxes touching the borders, images
   without boxes, half the images with whole-pixel boxes, so centre distances tie), the labels
   and (l, t, r, b) box targets of mmdetection's `VFNetHead.get_targets` (with each image's
   `pad_shape`) against `vfnet.model.assign.atss_assign`.
2. Inference: random head outputs (half with integer logits, so scores tie) through
   `VFNetHead.predict_by_feat(rescale=True, with_nms=False)` against `VFNet.detections` with NMS
   replaced by "keep everything": the candidates after the threshold, the per-level top-k,
   decoding, clipping, rescaling and `min_bbox_size` (NMS itself needs mmcv's compiled ops).

3. Zoo models (`--zoo NAME ...`, e.g. `--zoo x101_64x4d_dcn r2_101_dcn`; `--batches 0` skips 1
   and 2): mmdetection's own model of each named architecture against ours, random weights,
   float64: head outputs, losses, gradients and pre-NMS detections (`tools/mmdet_zoo_parity.py`,
   which also checks the mmdetection side's DCN stand-in against torchvision: `--stand-in`).

Prints the counts and the number of mismatches (0 expected); exits 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmdet_vfnet_keys import install_shim_if_needed  # noqa: E402

STRIDES = [8, 16, 32, 64, 128]
DIVISOR = 32


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def mmdet_head(num_classes: int, **test_cfg: float):
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / "vfnet" / "vfnet_r50_fpn_1x_coco.py"))
    head = cfg.model.bbox_head
    head.update(train_cfg=cfg.model.train_cfg, test_cfg=cfg.model.test_cfg, num_classes=num_classes)
    head.test_cfg.update(test_cfg)
    return MODELS.build(head).eval()


def random_boxes(h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(torch.randint(0, 8, (1,), generator=gen))
    x1, y1 = torch.rand(n, generator=gen) * (w - 2), torch.rand(n, generator=gen) * (h - 2)
    x2 = x1 + 1 + torch.rand(n, generator=gen) * (w - x1 - 1)
    y2 = y1 + 1 + torch.rand(n, generator=gen) * (h - y1 - 1)
    boxes = torch.stack([x1, y1, x2, y2], 1)
    if torch.rand(1, generator=gen) < 0.5:
        boxes = boxes.round()
    border = torch.randint(0, 6, (n,), generator=gen)
    for side, value in ((0, 0.0), (1, 0.0), (2, float(w)), (3, float(h))):
        boxes[border == side, side] = value
    return boxes, torch.randint(0, 7, (n,), generator=gen)


def check_targets(batches: int, gen: torch.Generator) -> int:
    from mmengine.structures import InstanceData

    from vfnet.model.assign import atss_assign, pad_gts
    from vfnet.model.detector import level_points

    head = mmdet_head(7)
    mismatches = positives = 0
    for _ in range(batches):
        num = int(torch.randint(2, 5, (1,), generator=gen))
        sizes = [tuple(torch.randint(40, 420, (2,), generator=gen).tolist()) for _ in range(num)]
        pads = [(ceil_div(h, DIVISOR) * DIVISOR, ceil_div(w, DIVISOR) * DIVISOR) for h, w in sizes]
        height, width = max(p[0] for p in pads), max(p[1] for p in pads)
        gts = [random_boxes(h, w, gen) for h, w in sizes]
        shapes = [(ceil_div(height, s), ceil_div(width, s)) for s in STRIDES]
        metas = [{"img_shape": s, "pad_shape": p, "batch_input_shape": (height, width)} for s, p in zip(sizes, pads)]
        priors = head.fcos_prior_generator.grid_priors([torch.Size(s) for s in shapes], torch.float32, "cpu")
        labels, _, targets, _ = head.get_targets(
            [torch.zeros(num, 7, h, w) for h, w in shapes], priors,
            [InstanceData(bboxes=b, labels=lab) for b, lab in gts], metas)
        ref_labels = torch.cat([lab.reshape(num, -1) for lab in labels], 1)
        ref_targets = torch.cat([t.reshape(num, -1, 4) for t in targets], 1)

        points = [level_points(s, stride, torch.device("cpu")) for s, stride in zip(shapes, STRIDES)]
        boxes, gt_labels, valid = pad_gts([b for b, _ in gts], [lab for _, lab in gts], torch.device("cpu"))
        ours = atss_assign(points, STRIDES, boxes, gt_labels, valid, 7, level_shapes=shapes, padded_sizes=pads)
        flat = torch.cat(points)
        our_targets = torch.cat([flat - ours.boxes[..., :2], ours.boxes[..., 2:] - flat], -1)
        pos = ours.positive
        mismatches += int((ref_labels != ours.labels).sum())
        mismatches += int((~torch.isclose(ref_targets[pos], our_targets[pos], atol=1e-4)).any(-1).sum())
        positives += int(pos.sum())
    print(f"targets: {batches} batches, {positives} positives, {mismatches} mismatches")
    return mismatches


def check_inference(batches: int, gen: torch.Generator) -> int:
    import vfnet.model.detector as detector
    from vfnet.core.config import Config
    from vfnet.model import VFNet
    from vfnet.model.head import HeadOutputs

    detector.batched_nms = lambda boxes, scores, labels, thr: torch.arange(len(scores))  # keep all
    num_classes, mismatches, candidates = 20, 0, 0
    for nms_pre, score_thr, min_size in ((1000, 0.05, 0.0), (50, 0.01, 0.0), (30, 0.2, 3.0), (100, 0.0, -1.0)):
        head = mmdet_head(num_classes, nms_pre=nms_pre, score_thr=score_thr, min_bbox_size=min_size)
        cfg = Config()
        cfg.model.depth, cfg.model.num_classes, cfg.model.kernels = 18, num_classes, "torch"
        cfg.model.fpn_channels = cfg.model.head_channels = 32
        cfg.infer.nms_pre, cfg.infer.score_thr, cfg.infer.min_bbox_size = nms_pre, score_thr, min_size
        cfg.infer.max_per_img = 1 << 30
        ours = VFNet.from_config(cfg).eval()
        for trial in range(batches // 4):
            sizes = [tuple(torch.randint(60, 400, (2,), generator=gen).tolist()) for _ in range(3)]
            height = max(ceil_div(h, DIVISOR) * DIVISOR for h, _ in sizes)
            width = max(ceil_div(w, DIVISOR) * DIVISOR for _, w in sizes)
            shapes = [(ceil_div(height, s), ceil_div(width, s)) for s in STRIDES]
            logits = [torch.randn(3, num_classes, h, w, generator=gen) * 2 - 3 for h, w in shapes]
            if trial % 2:
                logits = [x.round() for x in logits]
            dists = [torch.rand(3, 4, h, w, generator=gen) * 3 * s * (torch.rand(3, 4, h, w, generator=gen) > 0.1)
                     for (h, w), s in zip(shapes, STRIDES)]
            scales = [(float(torch.rand(1, generator=gen)) + 0.5, float(torch.rand(1, generator=gen)) + 0.5)
                      for _ in range(3)]
            metas = [{"img_shape": s, "scale_factor": f, "pad_shape": s, "batch_input_shape": (height, width)}
                     for s, f in zip(sizes, scales)]
            with torch.no_grad():
                ref = head.predict_by_feat(logits, dists, batch_img_metas=metas, rescale=True, with_nms=False)
                got = ours.detections(HeadOutputs(logits, dists, dists), torch.tensor(sizes), torch.tensor(scales))
            for r, o in zip(ref, got):
                candidates += len(r.scores)
                same = (len(r.scores) == len(o["scores"]) and torch.equal(r.labels, o["labels"])
                        and torch.equal(r.scores, o["scores"])
                        and torch.allclose(r.bboxes, o["boxes"], rtol=1e-6, atol=1e-4))
                mismatches += not same
    print(f"inference: {batches} batches x 3 images, {candidates} candidates, {mismatches} images differ")
    return mismatches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoo", nargs="*", default=[], metavar="NAME",
                        help="zoo architectures to compare with mmdetection's models (tools/mmdet_zoo_parity.py)")
    parser.add_argument("--size", nargs=2, type=int, default=[160, 224], metavar=("H", "W"),
                        help="input size of the --zoo check")
    args = parser.parse_args()
    install_shim_if_needed()
    gen = torch.Generator().manual_seed(args.seed)
    status = 0
    if args.batches:
        status = 1 if check_targets(args.batches, gen) + check_inference(args.batches, gen) else 0
    if args.zoo:
        from mmdet_zoo_parity import run_zoo

        status |= run_zoo(args.zoo, tuple(args.size), args.seed)
    return status


if __name__ == "__main__":
    sys.exit(main())
