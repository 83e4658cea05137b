"""mmdetection VFNet checkpoints: safe reading, tensor names, and conversion to vfnet checkpoints.

mmdetection 2.x (the official VarifocalNet repository, `meta.CLASSES`) and 3.x (`meta.dataset_meta.
classes`) checkpoints hold `state_dict` with the same tensor names for every VFNet of the zoo
(R-50, R-101, X-101-32x4d, X-101-64x4d, R2-101, each with and without DCN): `backbone.*` (the same
names as ours: torchvision's ResNet names, mmdetection's Res2Net names, a DCNv2 layer's
`conv_offset.*`), `neck.lateral_convs.i.conv.*`, `neck.fpn_convs.i.conv.*` (3 and 4 are P6 and P7)
and `bbox_head.*` (with `dcn_on_last_conv`, `bbox_head.{cls,reg}_convs.<last>.conv.conv_offset.*`).
`to_mmdet_name` / `from_mmdet_name` map every one of them to ours and back (tested against the
names and shapes listed from mmdetection's own models by `tools/mmdet_vfnet_keys.py`).
`infer_config` reads the architecture off the tensors: the backbone kind (a `stem.*` is Res2Net;
a grouped `conv2` is ResNeXt), depth, groups, base width, scales, which stages have DCN and
whether the head's last convs are DCN.

Reading never runs code from the file: it is `torch.load(weights_only=True)`. The non-tensor
objects an mmdetection checkpoint pickles besides the weights (numpy arrays in `meta`, mmengine's
`HistoryBuffer` in `message_hub`, ...) are not allowed by that loader; each such class name is
given an inert stand-in (`Opaque`, which only stores its arguments) so the rest of the file can be
read. Names from modules torch blocks outright (`os`, `subprocess`, ...) still fail the load.
"""
from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from vfnet.core.checkpoint import FORMAT, atomic_torch_save, state_digest
from vfnet.core.config import Config, validate
from vfnet.core.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# (our name, mmdetection's name); {field}s match the patterns in _FIELDS and carry over.
_RULES = [
    ("backbone.{rest}", "backbone.{rest}"),
    ("neck.lateral.{level}.{param}", "neck.lateral_convs.{level}.conv.{param}"),
    ("neck.output.{level}.{param}", "neck.fpn_convs.{level}.conv.{param}"),
    ("neck.p6.{param}", "neck.fpn_convs.3.conv.{param}"),
    ("neck.p7.{param}", "neck.fpn_convs.4.conv.{param}"),
    ("head.{tower}_convs.{i}.0.weight", "bbox_head.{tower}_convs.{i}.conv.weight"),
    ("head.{tower}_convs.{i}.0.conv_offset.{param}", "bbox_head.{tower}_convs.{i}.conv.conv_offset.{param}"),
    ("head.{tower}_convs.{i}.1.{param}", "bbox_head.{tower}_convs.{i}.gn.{param}"),
    ("head.reg_init_conv.0.weight", "bbox_head.vfnet_reg_conv.conv.weight"),
    ("head.reg_init_conv.1.{param}", "bbox_head.vfnet_reg_conv.gn.{param}"),
    ("head.reg_init.{param}", "bbox_head.vfnet_reg.{param}"),
    ("head.scales.{i}.scale", "bbox_head.scales.{i}.scale"),
    ("head.star_reg_weight", "bbox_head.vfnet_reg_refine_dconv.weight"),
    ("head.reg_refine.{param}", "bbox_head.vfnet_reg_refine.{param}"),
    ("head.scales_refine.{i}.scale", "bbox_head.scales_refine.{i}.scale"),
    ("head.star_cls_weight", "bbox_head.vfnet_cls_dconv.weight"),
    ("head.cls.{param}", "bbox_head.vfnet_cls.{param}"),
]
_FIELDS = {"rest": r"[\w.]+", "level": r"[0-2]", "param": r"weight|bias", "tower": r"cls|reg", "i": r"\d+"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for n, p in enumerate(parts))
    return re.compile(regex + r"\Z")


_OURS = [(_compile(ours), mmdet) for ours, mmdet in _RULES]
_THEIRS = [(_compile(mmdet), ours) for ours, mmdet in _RULES]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


def to_mmdet_name(name: str) -> str:
    """Our state-dict name -> mmdetection's VFNet name (KeyError for a name with no counterpart)."""
    mapped = _translate(name, _OURS)
    if mapped is None:
        raise KeyError(name)
    return mapped


def from_mmdet_name(name: str) -> str | None:
    """mmdetection's VFNet state-dict name -> ours, or None when we have no such tensor."""
    return _translate(name, _THEIRS)


# ---------------------------------------------------------------------------------------------
# Reading


class Opaque:
    """Stand-in for a class a checkpoint pickles besides its tensors: stores what it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_MAX_STAND_INS = 200


def read_untrusted(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` with an `Opaque` stand-in for every non-tensor class
    the file names (see the module docstring). Raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    names: list[str] = []
    for _ in range(_MAX_STAND_INS):
        try:
            if not names and zipfile.is_zipfile(path):  # a zip file lists them up front
                names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            stand_ins = [(type(n.rsplit(".", 1)[-1], (Opaque,), {}), n) for n in names]
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # a legacy (non-zip) file names them one at a time
            match = _UNSUPPORTED_GLOBAL.search(str(exc))
            if match is not None and match.group(1) not in names:
                names.append(match.group(1))
                continue
            refusal = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
            if refusal:
                raise CheckpointError(f"{path}: refused to load: {refusal[0]}") from None
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {_first_line(exc)}") \
                from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.load's parsers raise ~10 types on bad bytes
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): "
                                  f"{type(exc).__name__}: {_first_line(exc)}") from None
    raise CheckpointError(f"{path}: refused to load: more than {_MAX_STAND_INS} non-tensor classes")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def mmdet_weights(obj: Any, path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors (mmdetection names, a `module.` prefix dropped) and class names (empty when
    the checkpoint has none) of a loaded mmdetection checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an mmdetection checkpoint (a {type(obj).__name__}, not a dict)")
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not an mmdetection checkpoint (no state_dict of tensors)")
    weights = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    dataset_meta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    classes = dataset_meta.get("classes", meta.get("CLASSES", ()))
    if isinstance(classes, str):
        classes = (classes,)
    names = [c for c in classes if isinstance(c, str)] if isinstance(classes, (list, tuple)) else []
    return weights, names


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds -> our config


_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34,
           ("bottleneck", (3, 4, 6, 3)): 50, ("bottleneck", (3, 4, 23, 3)): 101}
_OFFSET = re.compile(r"(backbone\.layer\d+\.\d+\.(?:conv2|convs\.\d+)|bbox_head\.(?:cls|reg)_convs\.\d+\.conv)"
                     r"\.conv_offset\.weight\Z")


def refuse_unsupported(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """One line naming the first tensor of a model we cannot represent: a DCN layer with other
    than one deform group or a 3x3 kernel, or a DCN conv in the head other than the towers' last."""
    last = max((int(m.group(1)) for k in weights if (m := re.match(r"bbox_head\.cls_convs\.(\d+)\.", k))),
               default=-1)
    for name, value in weights.items():
        if "conv_offset" not in name:
            continue
        if _OFFSET.match(name) is None and not name.endswith(".conv_offset.bias"):
            raise CheckpointError(f"{path}: a deformable convolution (DCN) at this place is not supported: {name}")
        if name.endswith(".weight") and (value.ndim != 4 or value.shape[0] != 27 or value.shape[2:] != (3, 3)):
            raise CheckpointError(f"{path}: only 3x3 DCNv2 layers with one deform group (27 offset channels) "
                                  f"are supported: {name} has shape {tuple(value.shape)}")
        head = re.match(r"bbox_head\.(?:cls|reg)_convs\.(\d+)\.", name)
        if head and int(head.group(1)) != last:
            raise CheckpointError(f"{path}: DCN on a head conv other than the last of its tower is not "
                                  f"supported: {name}")


def _blocks(weights: dict[str, torch.Tensor]) -> tuple[int, ...]:
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in weights if (m := re.match(rf"backbone\.layer{stage}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    return tuple(blocks)


def _backbone(weights: dict[str, torch.Tensor], path: str | Path) -> dict[str, Any]:
    """The `model.*` backbone keys the tensors describe (CheckpointError naming a tensor otherwise)."""
    blocks = _blocks(weights)

    def shape(name: str) -> tuple[int, ...]:
        if name not in weights:
            raise CheckpointError(f"{path}: not an mmdetection VFNet checkpoint (no {name})")
        return tuple(weights[name].shape)

    dcn = [any(re.match(rf"backbone\.layer{s}\.\d+\.(conv2|convs\.\d+)\.conv_offset\.", k) for k in weights)
           for s in range(1, 5)]
    if "backbone.stem.0.weight" in weights:  # Res2Net v1d
        depth = _DEPTHS.get(("bottleneck", blocks))
        if depth not in (50, 101):
            raise CheckpointError(f"{path}: Res2Net backbone with {blocks} blocks per stage is not Res2Net-50/101")
        convs = {int(m.group(1)) for k in weights if (m := re.match(r"backbone\.layer1\.0\.convs\.(\d+)\.", k))}
        base_width = shape("backbone.layer1.0.bns.0.weight")[0]  # the width of stage 1 (64 channels)
        return {"backbone": "res2net", "depth": depth, "scales": len(convs) + 1, "base_width": base_width,
                "groups": 1, "stage_with_dcn": dcn}
    kind = "bottleneck" if "backbone.layer1.0.conv3.weight" in weights else "basic"
    depth = _DEPTHS.get((kind, blocks))
    if depth is None:
        raise CheckpointError(f"{path}: backbone with {kind} blocks {blocks} per stage is not "
                              "ResNet-18/34/50/101")
    groups, base_width = 1, 64
    if kind == "bottleneck":
        name = "backbone.layer1.0.conv2.weight"
        out, per_group = shape(name)[:2]
        if per_group < 1 or out % per_group:
            raise CheckpointError(f"{path}: tensor {name} has shape {shape(name)}: not a (grouped) 3x3 conv")
        groups = out // per_group
        base_width = out // groups  # stage 1 has 64 channels: width = base_width * groups
    return {"backbone": "resnet", "depth": depth, "groups": groups, "base_width": base_width,
            "stage_with_dcn": dcn}


def infer_config(weights: dict[str, torch.Tensor], path: str | Path) -> Config:
    """The reference VFNet config with the architecture (backbone kind, depth, groups, widths,
    DCN stages, head DCN), classes and widths read off mmdetection tensors."""
    refuse_unsupported(weights, path)
    for needed in ("bbox_head.vfnet_cls.weight", "neck.lateral_convs.0.conv.weight",
                   "bbox_head.cls_convs.0.conv.weight"):
        if needed not in weights:
            raise CheckpointError(f"{path}: not an mmdetection VFNet checkpoint (no {needed})")
        if weights[needed].ndim != 4:
            raise CheckpointError(f"{path}: tensor {needed} has shape {tuple(weights[needed].shape)}, "
                                  "expected a conv weight [out, in, kh, kw]")
    cfg = Config()
    for key, value in _backbone(weights, path).items():
        setattr(cfg.model, key, value)
    cfg.model.num_classes = int(weights["bbox_head.vfnet_cls.weight"].shape[0])
    cfg.model.fpn_channels = int(weights["neck.lateral_convs.0.conv.weight"].shape[0])
    cfg.model.head_channels = int(weights["bbox_head.cls_convs.0.conv.weight"].shape[0])
    cfg.model.stacked_convs = len({k.split(".")[2] for k in weights if k.startswith("bbox_head.cls_convs.")})
    cfg.model.dcn_on_last_conv = any(re.match(r"bbox_head\.cls_convs\.\d+\.conv\.conv_offset\.", k) for k in weights)
    try:
        validate(cfg, source=f"{path} (inferred config)")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return cfg


def to_our_state(weights: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """mmdetection tensors -> our names (CheckpointError naming the first tensor we have no place
    for)."""
    refuse_unsupported(weights, path)
    state = {}
    for name, value in weights.items():
        ours = from_mmdet_name(name)
        if ours is None:
            raise CheckpointError(f"{path}: tensor {name} has no counterpart in vfnet's VFNet")
        state[ours] = value
    return state


def is_mmdet_checkpoint(obj: Any) -> bool:
    """True for a loaded mmdetection checkpoint (or bare state dict), False for a vfnet one."""
    if not isinstance(obj, dict) or ("format" in obj and "config" in obj):
        return False
    state = obj.get("state_dict", obj)
    return isinstance(state, dict) and any(str(k).startswith(("bbox_head.", "module.bbox_head.")) for k in state)


def convert(src: str | Path, dst: str | Path) -> Config:
    """Write the vfnet checkpoint of the mmdetection VFNet checkpoint `src` to `dst` (atomically):
    our tensor names, iteration 0, the inferred config with the class names. Every tensor of the
    model must be in `src` with its shape. Returns the config."""
    from vfnet.model import VFNet

    obj = read_untrusted(src)
    weights, names = mmdet_weights(obj, src)
    cfg = infer_config(weights, src)
    if names and len(names) != cfg.model.num_classes:
        log.warning("%s: %d class names for %d classes: names dropped", src, len(names), cfg.model.num_classes)
        names = []
    cfg.model.class_names = names
    cfg.model.pretrained = ""
    state = to_our_state(weights, src)
    model = VFNet.from_config(cfg)
    expected = model.state_dict()
    for name, value in expected.items():
        if name not in state:
            raise CheckpointError(f"{src}: tensor {to_mmdet_name(name)} is missing")
        if state[name].shape != value.shape:
            raise CheckpointError(f"{src}: tensor {to_mmdet_name(name)} has shape {tuple(state[name].shape)}, "
                                  f"expected {tuple(value.shape)}")
    for name in state:
        if name not in expected:
            raise CheckpointError(f"{src}: tensor {to_mmdet_name(name)} has no counterpart in vfnet's "
                                  f"{describe_model(cfg)}")
    model.load_state_dict(state)
    out = {
        "format": FORMAT, "model": model.state_dict(), "optimizer": {}, "iteration": 0, "epoch": 0,
        "config": cfg.to_toml(), "source": f"mmdetection checkpoint {Path(src).name}",
    }
    out["sha256"] = state_digest(out)
    atomic_torch_save(out, dst)
    return cfg


def describe_model(cfg: Config) -> str:
    """The architecture in the zoo's words: "VFNet R-50", "VFNet X-101-64x4d DCN (c3-c5, head)", ..."""
    m = cfg.model
    if m.backbone == "res2net":
        name = f"R2-{m.depth} {m.base_width}w x {m.scales}s"
    elif m.groups > 1:
        name = f"X-{m.depth}-{m.groups}x{m.base_width}d"
    else:
        name = f"R-{m.depth}" + (f" base_width {m.base_width}" if m.base_width != 64 else "")
    stages = [f"c{i + 2}" for i, on in enumerate(m.stage_with_dcn) if on]
    dcn = stages + (["head"] if m.dcn_on_last_conv else [])
    return f"VFNet {name}" + (f" DCN ({', '.join(dcn)})" if dcn else "")


def describe(cfg: Config) -> str:
    """One line: what `convert` inferred."""
    m = cfg.model
    names = f"{len(m.class_names)} class names" if m.class_names else "no class names"
    return f"{describe_model(cfg)}, {m.num_classes} classes, {names}"
