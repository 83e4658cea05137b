"""ResNet-18/34/50/101 and ResNeXt-50/101 backbones ("pytorch" style: in bottlenecks the stride
sits on the 3x3 conv), optionally with DCNv2 3x3 convs in chosen stages.

Module names follow torchvision's ResNet (and mmdetection's ResNet/ResNeXt, which use the same
ones), so a torchvision ImageNet state dict loads directly. ResNeXt is the bottleneck ResNet with
`groups` > 1: the 3x3 conv of a stage with `c` channels is `c * base_width // 64 * groups` wide
and grouped (torchvision's `resnext101_32x8d` is groups 32, base_width 8; mmdetection's
X-101-64x4d groups 64, base_width 4). `stage_with_dcn[i]` makes every 3x3 conv of stage i + 1 a
`vfnet.model.dcn.ModulatedDeformConv` (mmcv's `DCNv2` layout: `conv2.weight`,
`conv2.conv_offset.*`), strided ones included (mmdetection's `fallback_on_stride=False`).
`frozen_stages` = n freezes the stem and stages 1..n (no gradients, BatchNorm in eval mode);
`norm_eval` keeps every BatchNorm's running statistics frozen (eval mode) while training, with the
affine parameters of the unfrozen stages still trained. Res2Net is in `vfnet.model.res2net`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kernels.ops import DeformConv2dOp
from vfnet.core.errors import CheckpointError
from vfnet.model.dcn import ModulatedDeformConv

log = logging.getLogger(__name__)

# depth -> (block type, blocks per stage)
_ARCHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
            deform_conv: DeformConv2dOp | None = None) -> nn.Module:
    """A 3x3 conv (padding 1, no bias); a DCNv2 layer running `deform_conv` when one is given."""
    if deform_conv is None:
        return nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)
    return ModulatedDeformConv(in_channels, out_channels, 3, deform_conv, stride=stride, padding=1, groups=groups)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided; grouped for ResNeXt; DCNv2 with `deform_conv`) -> 1x1 (channels x 4)
    conv-BN layers with a residual connection. The inner width is channels * base_width // 64 * groups."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, downsample: nn.Module | None, *,
                 groups: int = 1, base_width: int = 64, deform_conv: DeformConv2dOp | None = None):
        super().__init__()
        width = channels * base_width // 64 * groups
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, deform_conv)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class Backbone(nn.Module):
    """What the ResNet family shares: stage freezing, `norm_eval`, the initialisation and loading
    ImageNet weights. Subclasses build `layer1`..`layer4` and a stem (`_stem_modules`), set
    `out_channels`, then call `_finish()`."""

    frozen_stages: int
    norm_eval: bool

    def _stem_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _finish(self) -> None:
        self._init_weights()
        self.train()  # apply frozen_stages and norm_eval from the start

    def _init_weights(self) -> None:
        """Kaiming-normal convs (fan_out), unit BN; the last BN of every residual branch starts at
        0, so each block starts as the identity (the reference ResNet's zero_init_residual). A DCN
        layer keeps its own start (weight uniform in +-1/sqrt(fan_in), offset branch at 0: no
        offsets, mask 0.5), as mmdetection 3.3.0's DCN ResNet ends up after `init_weights`."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if hasattr(m, "last_norm"):
                nn.init.zeros_(m.last_norm().weight)
            if isinstance(m, ModulatedDeformConv):
                m.reset_parameters()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages == 0:
            return []
        return self._stem_modules() + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> Backbone:
        """Set the mode; frozen stages stay in eval mode, and with norm_eval so do all BNs."""
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def load_torchvision_state_dict(self, path: str | Path) -> None:
        """Load ImageNet weights with this backbone's names (torchvision's for ResNet/ResNeXt:
        `conv1.weight`, `layer1.0.bn1.running_mean`, ...; mmdetection's for Res2Net) from a local
        file saved with torch.save; `fc.*` entries are ignored, and a DCN layer's `conv_offset`
        may be absent (it keeps its zero start). A dict nested under "state_dict" or "model" is
        accepted. Raises CheckpointError naming the file when it is missing, unreadable, or its
        keys/shapes do not match this backbone."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"pretrained weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt files
            raise CheckpointError(f"{path}: cannot read pretrained weights: {exc}") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        # Older torchvision files lack BatchNorm's num_batches_tracked (unused in eval mode);
        # ImageNet files have no DCN offset branches.
        missing = sorted(k for k in set(own) - set(state)
                         if not k.endswith("num_batches_tracked") and ".conv_offset." not in k)
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: keys do not match a {self.describe()}: "
                f"missing {_preview(missing)}, unexpected {_preview(unexpected)}"
            )
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                 for k in state if state[k].shape != own[k].shape]
        if wrong:
            raise CheckpointError(f"{path}: tensor shapes do not match a {self.describe()}: {_preview(wrong)}")
        self.load_state_dict(state, strict=False)
        log.info("loaded pretrained backbone weights from %s", path)

    def describe(self) -> str:
        return type(self).__name__


class ResNet(Backbone):
    """ResNet (ResNeXt with `groups` > 1) trunk returning the stage 2-4 features C3, C4, C5
    (strides 8, 16, 32).

    forward(x [B, 3, H, W]) -> [C3 [B, c, H/8, W/8], C4 [.., H/16, ..], C5 [.., H/32, ..]] with
    c = 128, 256, 512 (ResNet-18/34) or 512, 1024, 2048 (bottleneck depths); see `out_channels`.
    `base_channels` (mmdetection's name, default 64) is the stem's and the first stage's width;
    each later stage doubles it, so 32 halves every width (a quarter of the arithmetic) and
    every C3-C5 channel count. Only ResNet (groups 1): ResNeXt's widths are defined for 64.
    `stage_with_dcn` (4 flags) and `deform_conv` (the DCNv2 op, needed when any flag is set):
    see the module docstring.
    """

    def __init__(self, depth: int, *, frozen_stages: int = 1, norm_eval: bool = True, groups: int = 1,
                 base_width: int = 64, base_channels: int = 64,
                 stage_with_dcn: Sequence[bool] = (False, False, False, False),
                 deform_conv: DeformConv2dOp | None = None):
        super().__init__()
        if depth not in _ARCHS:
            raise ValueError(f"depth must be one of {sorted(_ARCHS)}, got {depth}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        kind, blocks = _ARCHS[depth]
        stage_with_dcn = _check_dcn(stage_with_dcn, deform_conv)
        if kind == "basic" and (groups != 1 or base_width != 64 or any(stage_with_dcn)):
            raise ValueError(f"ResNet-{depth} (basic blocks) has no groups, base_width or DCN")
        if groups < 1 or base_width < 1:
            raise ValueError(f"groups and base_width must be >= 1, got {groups}, {base_width}")
        if base_channels < 1 or (base_channels != 64 and groups != 1):
            raise ValueError(f"base_channels must be >= 1 (64 for ResNeXt), got {base_channels}")
        self.depth, self.groups, self.base_width, self.base_channels = depth, groups, base_width, base_channels
        self.stage_with_dcn = stage_with_dcn
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.conv1 = nn.Conv2d(3, base_channels, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = base_channels
        for index, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            channels = base_channels * 2**index
            extra = {}
            if kind == "bottleneck":
                extra = {"groups": groups, "base_width": base_width,
                         "deform_conv": deform_conv if stage_with_dcn[index] else None}
            block = BasicBlock if kind == "basic" else Bottleneck
            layers = []
            for i in range(count):
                downsample = None
                block_stride = stride if i == 0 else 1
                if i == 0 and (block_stride != 1 or in_channels != channels * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, channels * block.expansion, 1, block_stride, bias=False),
                        nn.BatchNorm2d(channels * block.expansion),
                    )
                layers.append(block(in_channels, channels, block_stride, downsample, **extra))
                in_channels = channels * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
        expansion = 1 if kind == "basic" else 4
        self.out_channels = [base_channels * expansion * 2**i for i in (1, 2, 3)]
        self._finish()

    def _stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1]

    def describe(self) -> str:
        name = f"ResNeXt-{self.depth} {self.groups}x{self.base_width}d" if self.groups > 1 else f"ResNet-{self.depth}"
        if self.base_channels != 64:
            name += f" ({self.base_channels} base channels)"
        return name + (" (DCN)" if any(self.stage_with_dcn) else "")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def _check_dcn(stage_with_dcn: Sequence[bool], deform_conv: DeformConv2dOp | None) -> tuple[bool, ...]:
    flags = tuple(bool(f) for f in stage_with_dcn)
    if len(flags) != 4:
        raise ValueError(f"stage_with_dcn needs 4 flags (stages 1-4), got {list(stage_with_dcn)}")
    if any(flags) and deform_conv is None:
        raise ValueError("stage_with_dcn is set but no deform_conv op was given")
    return flags


def _preview(items: list[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return f"[{shown}{', ...' if len(items) > count else ''}] ({len(items)})"
