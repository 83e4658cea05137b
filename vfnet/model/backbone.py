"""ResNet-18/34/50/101 backbone ("pytorch" style: in bottlenecks the stride sits on the 3x3 conv).

Module names follow torchvision's ResNet, so a torchvision ImageNet state dict loads directly.
`frozen_stages` = n freezes the stem and stages 1..n (no gradients, BatchNorm in eval mode);
`norm_eval` keeps every BatchNorm's running statistics frozen (eval mode) while training, with the
affine parameters of the unfrozen stages still trained.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vfnet.core.errors import CheckpointError

log = logging.getLogger(__name__)

# depth -> (block type, blocks per stage)
_ARCHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


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
    """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) conv-BN layers with a residual connection."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
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


class ResNet(nn.Module):
    """ResNet trunk returning the stage 2-4 features C3, C4, C5 (strides 8, 16, 32).

    forward(x [B, 3, H, W]) -> [C3 [B, c, H/8, W/8], C4 [.., H/16, ..], C5 [.., H/32, ..]] with
    c = 128, 256, 512 (ResNet-18/34) or 512, 1024, 2048 (ResNet-50/101); see `out_channels`.
    """

    def __init__(self, depth: int, *, frozen_stages: int = 1, norm_eval: bool = True):
        super().__init__()
        if depth not in _ARCHS:
            raise ValueError(f"depth must be one of {sorted(_ARCHS)}, got {depth}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        kind, blocks = _ARCHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for index, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            channels = 64 * 2**index
            layers = []
            for i in range(count):
                downsample = None
                block_stride = stride if i == 0 else 1
                if i == 0 and (block_stride != 1 or in_channels != channels * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, channels * block.expansion, 1, block_stride, bias=False),
                        nn.BatchNorm2d(channels * block.expansion),
                    )
                layers.append(block(in_channels, channels, block_stride, downsample))
                in_channels = channels * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
        self.out_channels = [64 * block.expansion * 2**i for i in (1, 2, 3)]
        self._init_weights()
        self.train()  # apply frozen_stages and norm_eval from the start

    def _init_weights(self) -> None:
        """Kaiming-normal convs (fan_out), unit BN; the last BN of every residual branch starts at
        0, so each block starts as the identity (the reference ResNet's zero_init_residual)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_norm().weight)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages == 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Set the mode; frozen stages stay in eval mode, and with norm_eval so do all BNs."""
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

    def load_torchvision_state_dict(self, path: str | Path) -> None:
        """Load torchvision-format ImageNet weights (`conv1.weight`, `layer1.0.bn1.running_mean`,
        ...) from a local file saved with torch.save; `fc.*` entries are ignored. A dict nested
        under "state_dict" or "model" is accepted. Raises CheckpointError naming the file when it is
        missing, unreadable, or its keys/shapes do not match this depth."""
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
        # Older torchvision files lack BatchNorm's num_batches_tracked (unused in eval mode).
        missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: keys do not match a torchvision ResNet of this depth: "
                f"missing {_preview(missing)}, unexpected {_preview(unexpected)}"
            )
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                 for k in state if state[k].shape != own[k].shape]
        if wrong:
            raise CheckpointError(f"{path}: tensor shapes do not match this depth: {_preview(wrong)}")
        self.load_state_dict(state, strict=False)
        log.info("loaded pretrained backbone weights from %s", path)


def _preview(items: list[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return f"[{shown}{', ...' if len(items) > count else ''}] ({len(items)})"
