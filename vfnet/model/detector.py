"""VFNet from its parts (backbone, neck, head, loss) with ATSS targets and inference; `VFNet.from_config`
builds the configured backbone (ResNet, ResNeXt or Res2Net, DCN stages) + FPN + VFNet head."""
from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from kernels.ops import Ops
from vfnet.core.config import AssignConfig, Config, InferConfig, ModelConfig
from vfnet.model.assign import atss_assign, pad_gts
from vfnet.model.backbone import Backbone, ResNet
from vfnet.model.boxes import batched_nms, distance_to_box
from vfnet.model.fpn import FPN
from vfnet.model.head import HeadOutputs, VFNetHead
from vfnet.model.losses import VFNetLoss, flatten_levels
from vfnet.model.postprocess import large_enough, top_pairs
from vfnet.model.res2net import Res2Net


def build_backbone(m: ModelConfig, ops: Ops) -> Backbone:
    """The backbone `m` configures (`model.backbone`, `depth`, `groups`, `base_width`, `base_channels`, `scales`,
    `stage_with_dcn`, `frozen_stages`, `norm_eval`); DCN layers run `ops.deform_conv2d`."""
    common = {"frozen_stages": m.frozen_stages, "norm_eval": m.norm_eval,
              "stage_with_dcn": m.stage_with_dcn, "deform_conv": ops.deform_conv2d}
    if m.backbone == "res2net":
        return Res2Net(m.depth, scales=m.scales, base_width=m.base_width, **common)
    return ResNet(m.depth, groups=m.groups, base_width=m.base_width, base_channels=m.base_channels, **common)


def level_points(shape: tuple[int, int], stride: int, device: torch.device) -> torch.Tensor:
    """Point coordinates of one level: [H*W, 2] (x, y) = (j * stride, i * stride), row-major."""
    h, w = shape
    ys = torch.arange(h, dtype=torch.float32, device=device) * stride
    xs = torch.arange(w, dtype=torch.float32, device=device) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


class VFNet(nn.Module):
    """The VarifocalNet detector from its parts; `VFNet.from_config(cfg)` builds the configured one.

    backbone: images [B, 3, H, W] -> feature maps (ResNet: C3..C5); neck: those maps -> the
    pyramid P3..P7 [B, F, H_l, W_l] (FPN); head: the pyramid -> `HeadOutputs`, with the attributes
    `strides` (pixels per cell of each level), `num_classes` and `star_pair` (the star-conv op,
    `VFNetHead`); loss: the loss terms from head outputs, points and ATSS targets (`VFNetLoss`);
    assign: the ATSS settings (`topk`, `anchor_scale`); infer: the post-processing settings.
    `kernels` names the op set the head and the loss run (`kernels.Ops.name`; "" = unnamed).
    `channels_last`: the conv weights are stored, and the images enter the backbone, in
    channels-last (NHWC) memory, so every activation after them is NHWC too (cuDNN's own layout:
    no layout transposes around each conv on a GPU; see docs/model.md for what it measured).
    `config` is the config the model was built from (None when built by hand), kept for its users
    (`vfnet.api.Detector`'s preprocessing, the export's normalisation and padding); the model
    reads none of it: image and padded sizes come with each call.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        head: VFNetHead,
        loss: VFNetLoss,
        *,
        assign: AssignConfig | None = None,
        infer: InferConfig | None = None,
        kernels: str = "",
        channels_last: bool = False,
        config: Config | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.loss_fn = loss
        self.assign = assign if assign is not None else AssignConfig()
        self.infer = infer if infer is not None else InferConfig()
        self.kernels = kernels
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.cfg = config

    @classmethod
    def from_config(cls, cfg: Config, ops: Ops | None = None) -> VFNet:
        """The detector configured by `cfg.model`, `cfg.assign`, `cfg.loss`, `cfg.infer`.

        `ops` are the star-conv pair and the varifocal loss the head and the loss run; by default
        `Ops.from_name(cfg.model.kernels)` ("triton": the `kernels` ops, "torch": their PyTorch
        references; see `kernels.ops`; DCN layers run its `deform_conv2d`). With `cfg.model.pretrained`
        set, the backbone loads that ImageNet state dict (`Backbone.load_torchvision_state_dict`).
        The model holds `cfg.infer` itself (not a copy), so a later change to it applies to `predict`.
        """
        m = cfg.model
        ops = ops or Ops.from_name(m.kernels)
        backbone = build_backbone(m, ops)
        if m.pretrained:
            backbone.load_torchvision_state_dict(m.pretrained)
        neck = FPN(backbone.out_channels, m.fpn_channels)  # before the head: the random init's order
        head = VFNetHead(
            m.num_classes,
            m.fpn_channels,
            ops.star_pair,
            channels=m.head_channels,
            stacked_convs=m.stacked_convs,
            gn_groups=m.gn_groups,
            strides=m.strides,
            reg_denoms=m.reg_denoms,
            gradient_mul=m.gradient_mul,
            dcn_on_last_conv=m.dcn_on_last_conv,
            deform_conv=ops.deform_conv2d,
        )
        return cls(
            backbone, neck, head, VFNetLoss(cfg.loss, ops.varifocal_loss),
            assign=cfg.assign, infer=cfg.infer, kernels=ops.name, channels_last=m.channels_last,
            config=cfg,
        )

    def forward(self, images: torch.Tensor) -> HeadOutputs:
        """images [B, 3, H, W] normalised -> per-level head outputs."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # Profiler ranges (benchmarks.profile_step groups the step's time by them); each costs a
        # few microseconds when no profiler runs.
        with record_function("vfnet.backbone"):
            features = self.backbone(images)
        with record_function("vfnet.fpn"):
            features = self.neck(features)
        with record_function("vfnet.head"):
            return self.head(features)

    def points(self, outputs: HeadOutputs) -> list[torch.Tensor]:
        """Per-level point coordinates [H_l*W_l, 2] matching `outputs`."""
        return [
            level_points(tuple(s.shape[-2:]), stride, s.device)
            for s, stride in zip(outputs.cls_scores, self.head.strides)
        ]

    def loss(
        self,
        outputs: HeadOutputs,
        gt_boxes: list[torch.Tensor],
        gt_labels: list[torch.Tensor],
        padded_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses for a batch.

        gt_boxes[i] [n_i, 4] xyxy in input pixels, gt_labels[i] [n_i] int 0..C-1; padded_sizes
        [B, 2] (h, w) in pixels of each image's own padded extent (its resized size rounded up to
        the size divisor: `Batch.padded_sizes`), read on the host (a CPU tensor also does; a CUDA
        tensor is copied back, a synchronisation): only points inside it are ATSS candidates for
        the image's gts (None: every image fills the batch). Returns `loss_cls`,
        `loss_bbox_init`, `loss_bbox_refine` (weighted; the total is their sum) and `num_pos`
        (detached).
        """
        batch = outputs.cls_scores[0].shape[0]
        if len(gt_boxes) != batch:
            raise ValueError(f"gt_boxes has {len(gt_boxes)} images but the batch has {batch}")
        padded = None
        if padded_sizes is not None:
            padded = padded_sizes.tolist() if isinstance(padded_sizes, torch.Tensor) else padded_sizes
            if len(padded) != batch or any(len(s) != 2 for s in padded):
                raise ValueError(f"padded_sizes must be [{batch}, 2], got {padded}")
        with record_function("vfnet.model.assign"):
            points = self.points(outputs)
            boxes, labels, valid = pad_gts(gt_boxes, gt_labels, points[0].device)
            targets = atss_assign(
                points, self.head.strides, boxes, labels, valid, self.head.num_classes,
                level_shapes=[tuple(s.shape[-2:]) for s in outputs.cls_scores], padded_sizes=padded,
                topk=self.assign.topk, anchor_scale=self.assign.anchor_scale,
            )
        with record_function("vfnet.loss"):
            return self.loss_fn(
                flatten_levels(outputs.cls_scores),
                flatten_levels(outputs.bbox_init),
                flatten_levels(outputs.bbox_refine),
                torch.cat(points),
                targets,
            )

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, image_sizes: torch.Tensor, scales: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """Detect objects (call `eval()` first).

        images [B, 3, H, W]; image_sizes [B, 2] (h, w) of the resized, unpadded images; scales
        [B, 2] (sx, sy) = resized / original. Returns per image a dict with `boxes` [k, 4] xyxy in
        original-image pixels, `scores` [k], `labels` [k] int64 (k <= infer.max_per_img).
        """
        batch = images.shape[0]
        for name, value in (("image_sizes", image_sizes), ("scales", scales)):
            if value.shape != (batch, 2):
                raise ValueError(f"{name} must be [{batch}, 2], got {tuple(value.shape)}")
        outputs = self(images)
        return self.detections(outputs, image_sizes, scales)

    def detections(
        self, outputs: HeadOutputs, image_sizes: torch.Tensor, scales: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """Post-process head outputs into per-image detections (see `predict`; the rules are in
        `vfnet.model.postprocess`). Image by image, as the reference: its scores are computed on the
        image's own [P_l, C] layout, so they equal the reference's bit for bit."""
        infer = self.infer
        device = outputs.cls_scores[0].device
        image_sizes = image_sizes.to(device)
        scales = scales.to(device=device, dtype=torch.float32)
        level_points = self.points(outputs)
        results = []
        for b in range(image_sizes.shape[0]):
            boxes, scores, labels = [], [], []
            for logits, refine, points in zip(outputs.cls_scores, outputs.bbox_refine, level_points):
                probs = logits[b].permute(1, 2, 0).reshape(-1, logits.shape[1]).float().sigmoid()
                values, point, label = top_pairs(probs, infer.score_thr, infer.nms_pre)
                distances = refine[b].permute(1, 2, 0).reshape(-1, 4).float()[point]
                boxes.append(distance_to_box(points[point], distances, image_sizes[b]))
                scores.append(values)
                labels.append(label)
            boxes_b = torch.cat(boxes) / scales[b].repeat(2)
            keep = large_enough(boxes_b, infer.min_bbox_size)
            results.append(self._nms(boxes_b[keep], torch.cat(scores)[keep], torch.cat(labels)[keep]))
        return results

    def _nms(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Candidates of one image (boxes [K, 4], scores [K], labels [K]) -> class-wise NMS'd
        detections, at most `infer.max_per_img`, by decreasing score."""
        keep = batched_nms(boxes, scores, labels, self.infer.nms_iou)[: self.infer.max_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
