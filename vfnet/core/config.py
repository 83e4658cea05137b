"""Configuration: dataclasses, TOML loading, `--set key=value` overrides and validation.

A config is a TOML file with the sections below; every key is optional and defaults to the
reference VFNet R-50 1x COCO settings (docs/design.md §3). Relative paths are resolved against the
current working directory. The shipped configs are package data (`vfnet/configs/NAME.toml`),
named by `--config NAME`; `vfnet train` with no `--config` uses `DEFAULT_CONFIG_NAME` (shapes_tiny).

Errors (unknown section or key, wrong value type, out-of-range value, unreadable file) raise
`vfnet.core.errors.ConfigError` (a `UserError`), whose message names the file and the key at fault.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from vfnet.core.errors import ConfigError
from vfnet.core.optional import require

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the shipped configs, installed with the package
DEFAULT_CONFIG_NAME = "shapes_tiny"


@dataclass
class ModelConfig:
    """The detector: backbone, FPN, head, and which kernels it runs."""

    backbone: str = "resnet"  # "resnet" (ResNeXt with groups > 1) or "res2net" (v1d)
    depth: int = 50  # 18, 34, 50 or 101 (ResNeXt, Res2Net, DCN: 50 or 101)
    groups: int = 1  # ResNeXt cardinality (X-101-64x4d: 64); 1 = ResNet
    base_width: int = 64  # bottleneck width per group for 64 channels (ResNet 64, X-101-64x4d 4, Res2Net 26)
    base_channels: int = 64  # ResNet stem and first-stage width, doubled per stage (mmdetection's base_channels)
    scales: int = 4  # Res2Net scales (R2-101 26w x 4s: 4)
    stage_with_dcn: list[bool] = field(default_factory=lambda: [False] * 4)  # DCNv2 3x3 convs per stage 1-4
    dcn_on_last_conv: bool = False  # the last conv of both head towers as DCNv2
    num_classes: int = 80
    pretrained: str = ""  # path to a torchvision-format ImageNet state dict; "" = random init
    init_from: str = ""  # vfnet or mmdetection checkpoint to start training from (not a resume)
    class_names: list[str] = field(default_factory=list)  # in label order; [] = from the training set
    frozen_stages: int = 1  # 0 = nothing frozen, 1 = stem + stage 1 frozen, ...
    norm_eval: bool = True  # backbone BatchNorm statistics frozen (eval mode)
    fpn_channels: int = 256
    head_channels: int = 256
    stacked_convs: int = 3  # conv-GN-ReLU layers per head tower
    gn_groups: int = 32
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    reg_denoms: list[float] = field(default_factory=lambda: [64.0, 128.0, 256.0, 512.0, 1024.0])
    gradient_mul: float = 0.1  # scale of the star conv's gradient to the initial boxes
    kernels: str = "triton"  # "triton" (Triton kernels where they run) or "torch" (references)
    channels_last: bool = False  # NHWC activations and conv weights (cuDNN's own layout on GPUs)


@dataclass
class AssignConfig:
    """ATSS target assignment."""

    topk: int = 9  # candidates per level and gt
    anchor_scale: float = 8.0  # anchor side = anchor_scale * stride


@dataclass
class LossConfig:
    """VFNet loss: varifocal loss + GIoU on the initial and the refined boxes."""

    alpha: float = 0.75
    gamma: float = 2.0
    iou_weighted: bool = True
    cls_weight: float = 1.0
    init_weight: float = 1.5
    refine_weight: float = 2.0


@dataclass
class InferConfig:
    """Inference: score threshold, top-k, NMS."""

    nms_pre: int = 1000  # top (point, class) pairs per level above score_thr; <= 0: all of them
    score_thr: float = 0.05  # candidates need a score strictly above this
    min_bbox_size: float = 0.0  # drop boxes not wider and higher than this (original px); < 0: keep all
    nms_iou: float = 0.6
    max_per_img: int = 100


@dataclass
class DataConfig:
    """Data sets and the input pipeline."""

    train_ann: str = "data/coco/annotations/instances_train2017.json"
    train_images: str = "data/coco/train2017"
    val_ann: str = "data/coco/annotations/instances_val2017.json"
    val_images: str = "data/coco/val2017"
    train_parquet: str = ""  # directory of `vfnet data pack` shards; "" = read json + images
    synth: bool = False  # generate the synthetic shapes data set at `synth_dir` if missing
    synth_dir: str = "data/shapes"
    synth_images: int = 512  # training images (the val split has a quarter as many)
    synth_size: int = 256  # side of a synthetic image, pixels
    synth_seed: int = 0
    img_scale: list[int] = field(default_factory=lambda: [1333, 800])  # max long, max short side
    multiscale: list[list[int]] = field(default_factory=list)  # [[long, short], ...] sampled per image
    scale_range: list[list[int]] = field(default_factory=list)  # [[long, short], [long, short]]: each side
    # drawn per image uniformly between the two (integers, both ends included); [] = off
    flip_prob: float = 0.5
    size_divisor: int = 32
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # RGB, 0-255 scale
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    num_workers: int = 2  # DataLoader worker processes
    max_image_pixels: int = 1 << 27  # refuse larger images (width x height, from the header)


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and evaluation during training."""

    batch_size: int = 2  # images per worker and step
    epochs: int = 12
    max_iters: int = 0  # > 0: train this many iterations instead of `epochs`
    lr: float = 0.01  # for `base_batch_size` images; scaled linearly to the global batch
    base_batch_size: int = 16
    optimizer: str = "sgd"  # "sgd" (with `momentum`) or "adamw" (betas 0.9, 0.999; decoupled weight decay)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_mult: float = 2.0
    bias_decay_mult: float = 0.0
    warmup_iters: int = 500
    warmup_ratio: float = 0.1
    schedule: str = "step"  # "step" or "cosine"
    lr_steps: list[float] = field(default_factory=lambda: [8.0, 11.0])  # in epochs (step schedule)
    lr_gamma: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    amp: bool = True  # bf16 autocast on CUDA
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    seed: int = 0
    log_interval: int = 20
    checkpoint_interval: int = 0  # iterations between checkpoints; 0 = once per epoch
    eval_interval: int = 0  # iterations between evaluations; 0 = only at the end
    keep_checkpoints: int = 3  # per-epoch checkpoints kept (last.pt is always kept)
    tensorboard: bool = True  # TensorBoard event files in WORKDIR/tensorboard (rank 0)
    max_failures: int = 3  # Ray Train: restarts after a worker failure
    num_workers: str = ""  # Ray Train: "N" or "MIN-MAX" (elastic); --num-workers overrides it


@dataclass
class TuneConfig:
    """Ray Tune sweep: the search space, the search algorithm (`orchestration.search`) and ASHA.

    `space` maps a dotted config key to a distribution: {type = "uniform" | "loguniform",
    low, high} or {type = "choice", values = [...]}.
    """

    space: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "loss.alpha": {"type": "uniform", "low": 0.25, "high": 1.0},
            "loss.gamma": {"type": "uniform", "low": 1.0, "high": 3.0},
            "loss.init_weight": {"type": "uniform", "low": 0.75, "high": 3.0},
            "loss.refine_weight": {"type": "uniform", "low": 1.0, "high": 4.0},
            "train.lr": {"type": "loguniform", "low": 0.0025, "high": 0.04},
        }
    )
    metric: str = "bbox_mAP"
    search: str = "random"  # "random" (+ ASHA), "tpe" (Optuna TPE + ASHA), "pbt" (population-based training)
    perturbation_interval: int = 2  # PBT: evaluations between exploit/explore steps
    pbt_synch: bool = False  # PBT: perturb only once every trial has reached the interval (Ray's `synch`)
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2


@dataclass
class Config:
    """A whole run's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        tomli_w = require("tomli_w", "writing a config as TOML")
        return tomli_w.dumps(self.to_dict())

    def get(self, key: str) -> Any:
        """The value at a dotted key, e.g. `cfg.get("train.lr")`."""
        section, name = _split_key(key)
        return getattr(getattr(self, section), name)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, validation


def shipped_configs() -> list[str]:
    """The names of the shipped configs (`--config NAME`), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def config_path(config: str | Path | None) -> Path:
    """The file a `--config` value names: a TOML file that exists, else a shipped config by name
    (with or without `.toml`); the default shipped config for None. ConfigError otherwise."""
    if config is None:
        return CONFIG_DIR / f"{DEFAULT_CONFIG_NAME}.toml"
    path = Path(config)
    if path.is_file():
        return path
    if path.name != str(config):  # a path, not a name
        raise ConfigError(f"config file not found: {path}")
    shipped = CONFIG_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if not shipped.is_file():
        raise ConfigError(f"config file not found: {path} (nor a shipped config: {', '.join(shipped_configs())})")
    return shipped


def config_name(config: str | Path | None) -> str:
    """The name of a `--config` value (its file's stem; `DEFAULT_CONFIG_NAME` for None): the
    default work dir (`vfnet train`) and run name (Ray Train) of a command line."""
    return Path(config).stem if config is not None else DEFAULT_CONFIG_NAME


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (see `config_path`: a file or a shipped config's name; the default
    when `path` is None), apply `key=value` overrides, validate, and return it. Raises
    ConfigError naming the file/key/value at fault."""
    path = config_path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except ValueError as exc:  # TOMLDecodeError, UnicodeDecodeError, an integer too long to read
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    cfg = config_from_dict(raw, source=str(path))
    return apply_overrides(cfg, overrides or [])


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a validated Config from nested dicts (as read from TOML)."""
    cfg = Config()
    for section, values in raw.items():
        if section not in _sections():
            raise ConfigError(f"{source}: unknown config section [{section}]{_hint(section, _sections())}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, source)
    validate(cfg, source)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings (value in TOML syntax; bare words are strings)."""
    cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in _sections()})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = (part.strip() for part in item.split("=", 1))
        _set(cfg, key, _parse_value(text), f"--set {key}")
    validate(cfg, "--set")
    return cfg


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key in place, with type checking (used by sweeps)."""
    _set(cfg, key, value, key)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as TOML (atomically)."""
    from vfnet.core.atomic import write_text

    write_text(path, cfg.to_toml())


def validate(cfg: Config, source: str = "config") -> None:
    """Check value ranges and choices; raise ConfigError naming the key."""
    checks: list[tuple[str, bool, str]] = [
        ("model.backbone", cfg.model.backbone in ("resnet", "res2net"), "'resnet' or 'res2net'"),
        ("model.depth", cfg.model.depth in (18, 34, 50, 101), "one of 18, 34, 50, 101"),
        ("model.depth", cfg.model.depth in (50, 101) or (
            cfg.model.backbone == "resnet" and cfg.model.groups == 1 and cfg.model.base_width == 64
            and not any(cfg.model.stage_with_dcn)),
         "50 or 101 for Res2Net, ResNeXt (model.groups > 1), model.base_width != 64 and DCN"),
        ("model.groups", cfg.model.groups >= 1 and (cfg.model.groups == 1 or cfg.model.backbone == "resnet"),
         ">= 1 (1 for Res2Net)"),
        ("model.base_width", cfg.model.base_width >= 1, ">= 1"),
        ("model.base_channels", cfg.model.base_channels == 64 or (
            cfg.model.base_channels >= 1 and cfg.model.backbone == "resnet" and cfg.model.groups == 1
            and not cfg.model.pretrained), ">= 1; 64 for Res2Net, ResNeXt and ImageNet weights (model.pretrained)"),
        ("model.scales", cfg.model.scales >= 2, ">= 2"),
        ("model.stage_with_dcn", len(cfg.model.stage_with_dcn) == 4, "4 flags (stages 1-4)"),
        ("model.num_classes", cfg.model.num_classes >= 1, ">= 1"),
        ("model.class_names", len(cfg.model.class_names) in (0, cfg.model.num_classes),
         "empty or one name per class (model.num_classes)"),
        ("model.frozen_stages", 0 <= cfg.model.frozen_stages <= 4, "in 0..4"),
        ("model.kernels", cfg.model.kernels in ("triton", "torch"), "'triton' or 'torch'"),
        ("model.strides", len(cfg.model.strides) == 5 and all(s > 0 for s in cfg.model.strides),
         "5 positive strides (P3-P7)"),
        ("model.reg_denoms", len(cfg.model.reg_denoms) == len(cfg.model.strides),
         "one per stride"),
        ("model.stacked_convs", cfg.model.stacked_convs >= 1, ">= 1"),
        ("model.fpn_channels", cfg.model.fpn_channels >= 1, ">= 1"),
        ("model.gn_groups", cfg.model.gn_groups >= 1, ">= 1"),
        ("model.head_channels", cfg.model.gn_groups >= 1 and cfg.model.head_channels >= 1
         and cfg.model.head_channels % cfg.model.gn_groups == 0, "a positive multiple of model.gn_groups"),
        ("assign.topk", cfg.assign.topk >= 1, ">= 1"),
        ("loss.gamma", cfg.loss.gamma >= 0, ">= 0"),
        ("loss.alpha", cfg.loss.alpha >= 0, ">= 0"),
        ("infer.score_thr", 0 <= cfg.infer.score_thr < 1, "in [0, 1)"),
        ("infer.nms_iou", 0 < cfg.infer.nms_iou <= 1, "in (0, 1]"),
        ("data.img_scale", len(cfg.data.img_scale) == 2 and min(cfg.data.img_scale) > 0,
         "[max_long_side, max_short_side], positive"),
        ("data.multiscale", all(len(s) == 2 and min(s) > 0 for s in cfg.data.multiscale),
         "a list of [long, short] pairs"),
        ("data.scale_range", cfg.data.scale_range == [] or (
            len(cfg.data.scale_range) == 2 and all(len(s) == 2 and min(s) > 0 for s in cfg.data.scale_range)
            and not cfg.data.multiscale),
         "[] or two positive [long, short] pairs (not with data.multiscale)"),
        ("data.flip_prob", 0 <= cfg.data.flip_prob <= 1, "in [0, 1]"),
        ("data.size_divisor", cfg.data.size_divisor >= 1, ">= 1"),
        ("data.num_workers", cfg.data.num_workers >= 0, ">= 0"),
        ("data.max_image_pixels", cfg.data.max_image_pixels >= 1, ">= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, ">= 1"),
        ("train.epochs", cfg.train.epochs >= 1 or cfg.train.max_iters > 0, ">= 1"),
        ("train.max_iters", cfg.train.max_iters >= 0, ">= 0"),
        ("train.lr", cfg.train.lr > 0, "> 0"),
        ("train.optimizer", cfg.train.optimizer in ("sgd", "adamw"), "'sgd' or 'adamw'"),
        ("train.schedule", cfg.train.schedule in ("step", "cosine"), "'step' or 'cosine'"),
        ("train.warmup_ratio", 0 < cfg.train.warmup_ratio <= 1, "in (0, 1]"),
        ("train.grad_clip", cfg.train.grad_clip >= 0, ">= 0"),
        ("train.checkpoint_interval", cfg.train.checkpoint_interval >= 0, ">= 0"),
        ("train.eval_interval", cfg.train.eval_interval >= 0, ">= 0"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, ">= 1"),
        ("train.max_failures", cfg.train.max_failures >= -1, ">= -1 (-1 = unlimited)"),
        ("tune.search", cfg.tune.search in ("random", "tpe", "pbt"), "'random', 'tpe' or 'pbt'"),
        ("tune.perturbation_interval", cfg.tune.perturbation_interval >= 1, ">= 1"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{source}: {key} = {cfg.get(key)!r} is invalid: expected {expected}")
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"{source}: train.device = {device!r}: expected auto, cpu, cuda or cuda:N")


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _split_key(key: str) -> tuple[str, str]:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in _sections():
        raise ConfigError(f"unknown config key {key!r}{_hint(key, _all_keys())}")
    return parts[0], parts[1]


def _all_keys() -> list[str]:
    cfg = Config()
    return [f"{s}.{f.name}" for s in _sections() for f in dataclasses.fields(getattr(cfg, s))]


def _hint(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _set(cfg: Config, key: str, value: Any, source: str) -> None:
    section_name, name = _split_key(key)
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise ConfigError(f"{source}: unknown config key {key!r}{_hint(key, _all_keys())}")
    hint = typing.get_type_hints(type(section))[name]
    setattr(section, name, _coerce(value, hint, f"{source}: {key}"))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint (int/float/bool/str, list[...], dict[...])."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {_preview(value)}")
        (inner,) = typing.get_args(hint)
        return [_coerce(v, inner, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {_preview(value)}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_preview(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < 1 << 63:
            raise ConfigError(f"{where} must be a 64-bit integer, got {_preview(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_preview(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {_preview(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_preview(value)}")
        return value
    raise TypeError(f"unsupported config type {hint}")  # a programming error, not user input


def _preview(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer with too many digits to print
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_value(text: str) -> Any:
    """Parse a `--set` value as TOML (`3`, `0.5`, `true`, `[1, 2]`, `"s"`); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError and the like: a bare word
        return text
