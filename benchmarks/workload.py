"""The detector workload shared by `benchmarks.train_throughput`, `benchmarks.inference` and
`benchmarks.profile_step`: the model configs, one model per provider with the same weights, a
synthetic batch already on the device, and the training step (`vfnet.train.step.train_step`,
the engine's own).

Providers: `triton` (`model.kernels = "triton"`: the Triton star conv and varifocal loss) and
`torch` (`model.kernels = "torch"`: the PyTorch reference loss, and for the star conv
`benchmarks.harness.torchvision_star_pair` where torchvision loads, else the PyTorch reference
star conv).

Sizes: full = VFNet R-50 + FPN, 80 classes, 1333x800 padded to 1344x800 (W x H); small (CPU smoke
runs) = ResNet-18, 32 channels, 3 classes, 128x128.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import torch

from benchmarks import harness
from kernels import Ops
from kernels.dispatch import interpreter_enabled
from vfnet.core.config import Config, config_name, load_config
from vfnet.core.errors import ConfigError
from vfnet.data import Batch
from vfnet.model import VFNet
from vfnet.train import step as vfnet_step
from vfnet.train.optim import build_optimizer

log = logging.getLogger(__name__)

PROVIDERS = ("triton", "torch")
FULL_SIZE = (800, 1344)  # (H, W): 1333x800 padded to a multiple of 32
SMALL_SIZE = (128, 128)
BOXES_PER_IMAGE = 7  # COCO train2017 averages 7.3 objects per image


def bench_config(small: bool) -> Config:
    """The reference VFNet R-50 config (docs/design.md §3), or a tiny ResNet-18 one for CPU runs."""
    cfg = Config()
    if small:
        cfg.model.depth = 18
        cfg.model.num_classes = 3
        cfg.model.fpn_channels = cfg.model.head_channels = 32
        cfg.model.gn_groups = 8
        cfg.model.stacked_convs = 2
    return cfg


def bench_configs(args: argparse.Namespace, small: bool) -> list[tuple[str | None, Config]]:
    """(label, config) per `--config` given (a shipped config's name or a TOML path; its model,
    assign, loss and infer sections are used, `model.pretrained` and `model.init_from` cleared:
    random weights), else [(None, `bench_config(small)`)]. The label names the rows' shape."""
    if not args.config:
        return [(None, bench_config(small))]
    configs = []
    for name in args.config:
        try:
            cfg = load_config(name)
        except ConfigError as exc:
            raise SystemExit(f"--config: {exc}") from None
        cfg.model.pretrained = cfg.model.init_from = ""
        configs.append((config_name(name), cfg))
    return configs


def default_providers(device: torch.device) -> list[str]:
    """Both providers on CUDA; on the CPU `torch`, plus `triton` when TRITON_INTERPRET=1 (the
    kernels then run through the interpreter: slow, and only a smoke test)."""
    if device.type == "cuda" or interpreter_enabled():
        return list(PROVIDERS)
    return ["torch"]


CHANNELS_LAST = {"off": (False,), "on": (True,), "both": (False, True)}


def model_label(provider: str, channels_last: bool) -> str:
    """The provider column of a row: e.g. "triton", or "triton_cl" for a channels-last model."""
    return provider + ("_cl" if channels_last else "")


def build_models(cfg: Config, providers: list[str], device: torch.device, *,
                 seed: int = 0, layouts: tuple[bool, ...] = (False,)) -> dict[str, VFNet]:
    """One VFNet per provider and layout (`layouts`: `model.channels_last` values), keyed by
    `model_label`, all with the weights of the first (seeded) one, on `device`."""
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise ValueError(f"providers must be among {PROVIDERS}, got {unknown}")
    torch.manual_seed(seed)
    state = None
    models = {}
    for provider, channels_last in ((p, cl) for p in providers for cl in layouts):
        provider_cfg = copy.deepcopy(cfg)
        provider_cfg.model.kernels = provider
        provider_cfg.model.channels_last = channels_last
        ops = Ops.from_name(provider)
        if provider == "torch":
            star_pair = harness.torchvision_star_pair()
            if star_pair is None:
                log.warning("the torch provider's star conv is the PyTorch reference")
            else:
                ops = dataclasses.replace(ops, star_pair=star_pair)
        model = VFNet.from_config(provider_cfg, ops=ops)
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        models[model_label(provider, channels_last)] = model.to(device)
    return models


def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int, device: torch.device, *,
                    boxes_per_image: int = BOXES_PER_IMAGE, seed: int = 0) -> Batch:
    """`batch` random images of `size` (H, W) with `boxes_per_image` random boxes each, built
    once on `device` (the data pipeline is measured separately by `benchmarks.dataloader`): a
    `vfnet.data.Batch` as the engine's step sees it after `Batch.to(device)`.

    images [B, 3, H, W] ~ N(0, 1) (normalised pixels); boxes[i] [n, 4] xyxy pixels inside the
    image, sides 16 px to half the image; labels[i] [n] int64; image_sizes, orig_sizes [B, 2]
    (h, w) = `size` and padded_sizes the same on the host; scales [B, 2] (sx, sy) = 1; image ids
    0..B-1.
    """
    if batch < 1 or boxes_per_image < 1:
        raise ValueError(f"batch and boxes_per_image must be >= 1, got {batch}, {boxes_per_image}")
    h, w = size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, h, w, generator=gen)
    extent = torch.tensor([w, h], dtype=torch.float32)
    boxes, labels = [], []
    for _ in range(batch):
        side = (16 + torch.rand(boxes_per_image, 2, generator=gen) * (extent / 2 - 16)).clamp(max=extent)
        corner = torch.rand(boxes_per_image, 2, generator=gen) * (extent - side)
        boxes.append(torch.cat([corner, corner + side], dim=1).to(device))
        labels.append(torch.randint(0, num_classes, (boxes_per_image,), generator=gen).to(device))
    sizes = torch.tensor([[h, w]] * batch, dtype=torch.int64, device=device)
    return Batch(
        images=images.to(device),
        boxes=boxes,
        labels=labels,
        image_sizes=sizes,
        scales=torch.ones(batch, 2, device=device),
        orig_sizes=sizes.clone(),
        image_ids=list(range(batch)),
        padded_sizes=[(h, w)] * batch,
    )


def use_amp(device: torch.device) -> bool:
    """bf16 autocast on CUDA (as training does), float32 on the CPU."""
    return device.type == "cuda"


def train_step(model: VFNet, data: Batch) -> Callable[[], None]:
    """A closure running `vfnet.train.step.train_step` on `data` (on the model's device) with `model`'s training config
    (bf16 autocast on CUDA with `train.amp`, `train.grad_clip`) and its optimiser (`train.optimizer`,
    SGD by default) over the reference parameter groups; it leaves the step statistics on the
    device, as the engine does.

    The optimiser's learning rate is 0: it runs exactly the same kernels (momentum or moments,
    weight decay, update), but the weights stay put, so every timed step does the same data-dependent work and
    random data cannot make the run diverge.
    """
    model.train()
    train_cfg = copy.deepcopy(model.cfg.train)
    train_cfg.batch_size = data.images.shape[0]
    optimizer = build_optimizer(model, train_cfg)
    for group in optimizer.param_groups:
        group["lr"] = 0.0

    def step() -> None:
        vfnet_step.train_step(model, data, optimizer, amp=train_cfg.amp, grad_clip=train_cfg.grad_clip)

    return step


def batch_rows(script: str, provider: str, mode: str, dtype: str, shape: str, batch: int,
               fn: Callable[[], object], device: torch.device, warmup: int,
               reps: int) -> Iterator[harness.Row]:
    """Time `fn` (one call handles `batch` images) with `harness.time_ms`: yields `ms` and
    `img_per_s` rows, and on CUDA `peak_mem_mb`, each also logged."""
    ms = harness.time_ms(fn, device, warmup=warmup, reps=reps)
    rate = harness.rate_quantiles(batch, ms)
    log.info("%-6s %s %s: %9.1f ms %8.2f img/s", provider, mode, shape, ms[0], rate[0])
    yield harness.Row(script, provider, mode, dtype, shape, "ms", "ms", *ms)
    yield harness.Row(script, provider, mode, dtype, shape, "img_per_s", "images/s", *rate)
    if device.type == "cuda":
        peak = harness.peak_memory_mb(fn, device)
        log.info("%-6s %s %s: %8.0f MB peak", provider, mode, shape, peak)
        yield harness.Row(script, provider, mode, dtype, shape, "peak_mem_mb", "MB", peak, peak, peak)


def raise_class_scores(model: VFNet, classes: int, score: float = 0.3) -> None:
    """Set the class-logit bias of the first `classes` classes to logit(`score`).

    A randomly initialised head scores every point about 0.01 (its prior), below the 0.05
    inference threshold, so NMS would see no candidate at all. With this, each image sends
    every top-`nms_pre` point of `classes` classes to NMS (about 3,300 per class at 1333x800):
    more than a trained model's typical load, so the measured latency is an upper bound.
    """
    if not 0 <= classes <= model.head.num_classes:
        raise ValueError(f"classes must be in [0, {model.head.num_classes}], got {classes}")
    with torch.no_grad():
        model.head.cls.bias[:classes] = math.log(score / (1 - score))


# ---------------------------------------------------------------------------------------------
# Command-line options and logging shared by the detector benchmarks


def add_common_args(parser: argparse.ArgumentParser, script: str, default_batches: str) -> None:
    """Options the detector benchmarks share (sizes, providers, timing, output)."""
    harness.add_size_args(parser, small="ResNet-18, 32 channels, 128x128", full="VFNet R-50, 1333x800")
    parser.add_argument("--batches", type=harness.positive_int, nargs="+",
                        help=f"batch sizes (default {default_batches})")
    parser.add_argument("--size", type=harness.positive_int, nargs=2, metavar=("H", "W"),
                        help="input size, a multiple of 32 (default 800 1344, or 128 128 small)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS,
                        help="default: both on CUDA; torch on CPU (+ triton under TRITON_INTERPRET=1)")
    parser.add_argument("--config", action="append", metavar="NAME",
                        help="a shipped config or TOML path to measure instead of the reference "
                             "R-50 (random weights; repeat it to measure several side by side)")
    parser.add_argument("--channels-last", choices=sorted(CHANNELS_LAST), default="off",
                        help="model.channels_last: off (default), on, or both side by side "
                             "(rows of channels-last models have provider <name>_cl)")
    harness.add_timing_args(parser, default=harness.STEP_TIMING, quick=(1, 3))
    harness.add_output_args(parser, script)


def resolve_args(args: argparse.Namespace, device: torch.device, full_batches: list[int],
            small_batches: list[int]) -> tuple[bool, tuple[int, int], list[int], list[str], int, int]:
    """(small, size, batches, providers, warmup, reps) from the parsed options and the device."""
    small = harness.is_small(args, device)
    size = tuple(args.size) if args.size else (SMALL_SIZE if small else FULL_SIZE)
    if size[0] % 32 or size[1] % 32:
        raise SystemExit(f"--size must be multiples of 32 (the padded input), got {size}")
    batches = args.batches or (small_batches if small else full_batches)
    providers = args.providers or default_providers(device)
    return small, size, batches, providers, *harness.timing(args, small, device)


def shape_label(cfg: Config, batch: int, size: tuple[int, int], label: str | None = None) -> str:
    """E.g. "R50 B8 800x1344" (depth, batch, H x W), or with `label` (a config's name) first."""
    return f"{label or f'R{cfg.model.depth}'} B{batch} {size[0]}x{size[1]}"


def log_speedups(rows: list[harness.Row], metric: str = "img_per_s") -> None:
    """Log each model's `metric` over the contiguous torch provider's, for each shape."""
    values = {(r.provider, r.shape): r.p50 for r in rows if r.metric == metric}
    for (provider, shape), value in sorted(values.items()):
        if provider != "torch" and ("torch", shape) in values:
            log.info("%s: %s %.2f / torch %.2f %s = %.2fx", shape, provider, value,
                     values[("torch", shape)], metric, value / values[("torch", shape)])
