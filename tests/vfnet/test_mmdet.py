"""mmdetection checkpoints: the name map against mmdetection's own VFNet, conversion, safe
reading, refusals, and fine-tuning from a converted checkpoint (`model.init_from`)."""
import collections
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from vfnet.api import class_info, load_model
from vfnet.cli import main
from vfnet.core.checkpoint import CheckpointError, load_checkpoint
from vfnet.core.config import Config
from vfnet.interop.mmdet import describe_model, from_mmdet_name, infer_config, read_untrusted, to_mmdet_name
from vfnet.model import VFNet
from vfnet.train.engine import train
from vfnet.train.transfer import init_from

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
BCCD = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd"
COCO_NAMES = tuple(f"thing{i}" for i in range(80))


def reference_keys(name: str) -> dict[str, tuple[int, ...]]:
    """mmdetection's VFNet tensor names and shapes of one zoo architecture (tools/mmdet_vfnet_keys.py)."""
    keys = {}
    for line in (DATA / f"mmdet_vfnet_{name}_keys.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.split(",") if s)
    return keys


def model_cfg(depth=18, num_classes=80, channels=32, stacked_convs=1) -> Config:
    cfg = Config()
    cfg.model.depth, cfg.model.num_classes = depth, num_classes
    cfg.model.fpn_channels = cfg.model.head_channels = channels
    cfg.model.stacked_convs = stacked_convs
    cfg.model.kernels = "torch"
    return cfg


# key list -> (model.* settings of that architecture, what `describe_model` calls it)
ZOO = {
    "r50": ({"depth": 50}, "VFNet R-50"),
    "r101": ({"depth": 101}, "VFNet R-101"),
    "r50_dcn": ({"depth": 50, "dcn": True}, "VFNet R-50 DCN (c3, c4, c5, head)"),
    "r101_dcn": ({"depth": 101, "dcn": True}, "VFNet R-101 DCN (c3, c4, c5, head)"),
    "x101_32x4d": ({"depth": 101, "groups": 32, "base_width": 4}, "VFNet X-101-32x4d"),
    "x101_32x4d_dcn": ({"depth": 101, "groups": 32, "base_width": 4, "dcn": True},
                       "VFNet X-101-32x4d DCN (c3, c4, c5, head)"),
    "x101_64x4d": ({"depth": 101, "groups": 64, "base_width": 4}, "VFNet X-101-64x4d"),
    "x101_64x4d_dcn": ({"depth": 101, "groups": 64, "base_width": 4, "dcn": True},
                       "VFNet X-101-64x4d DCN (c3, c4, c5, head)"),
    "r2_101": ({"depth": 101, "backbone": "res2net", "base_width": 26}, "VFNet R2-101 26w x 4s"),
    "r2_101_dcn": ({"depth": 101, "backbone": "res2net", "base_width": 26, "dcn": True},
                   "VFNet R2-101 26w x 4s DCN (c3, c4, c5, head)"),
}


def zoo_cfg(name: str) -> Config:
    settings, _ = ZOO[name]
    cfg = model_cfg(settings["depth"], 80, 256, 3)
    for key in ("backbone", "groups", "base_width"):
        if key in settings:
            setattr(cfg.model, key, settings[key])
    if settings.get("dcn"):
        cfg.model.stage_with_dcn, cfg.model.dcn_on_last_conv = [False, True, True, True], True
    return cfg


@pytest.mark.parametrize("name", sorted(ZOO))
def test_map_covers_every_tensor_of_mmdetections_vfnet(name):
    theirs = reference_keys(name)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VFNet.from_config(zoo_cfg(name)).state_dict().items()}
    mapped = {}
    for name, shape in theirs.items():
        our_name = from_mmdet_name(name)
        assert our_name is not None, name
        assert to_mmdet_name(our_name) == name
        mapped[our_name] = shape
    assert mapped == ours  # every tensor, same shapes, nothing left over on either side


@pytest.mark.parametrize("name", sorted(ZOO))
def test_the_architecture_is_read_off_mmdetections_tensors(name):
    weights = {k: torch.empty(shape, device="meta") for k, shape in reference_keys(name).items()}
    cfg = infer_config(weights, f"{name}.pth")
    expected = zoo_cfg(name)
    for key in ("backbone", "depth", "groups", "base_width", "scales", "stage_with_dcn", "dcn_on_last_conv",
                "num_classes", "fpn_channels", "head_channels", "stacked_convs"):
        assert getattr(cfg.model, key) == getattr(expected.model, key), key
    assert describe_model(cfg) == ZOO[name][1]


@pytest.mark.parametrize("depth", [18, 50])
def test_our_names_to_mmdet_and_back_is_the_identity(depth):
    with torch.device("meta"):
        names = list(VFNet.from_config(model_cfg(depth)).state_dict())
    theirs = [to_mmdet_name(n) for n in names]
    assert len(set(theirs)) == len(names)
    assert [from_mmdet_name(n) for n in theirs] == names


# ---------------------------------------------------------------------------------------------
# Converting


@pytest.fixture(scope="module")
def source():
    """A 'COCO-trained' mmdetection VFNet R-18 (random weights): model and mmdetection tensors."""
    torch.manual_seed(0)
    model = VFNet.from_config(model_cfg())
    return model, {to_mmdet_name(k): v.clone() for k, v in model.state_dict().items()}


def write_mmdet(path, weights, version=3, prefix=""):
    """An mmdetection-style checkpoint with the non-tensor objects such files carry."""
    state = collections.OrderedDict((prefix + k, v) for k, v in weights.items())
    if version == 2:
        obj = {"meta": {"mmdet_version": "2.6.0", "CLASSES": COCO_NAMES, "config": "model = dict(...)"},
               "state_dict": state}
        torch.save(obj, path, _use_new_zipfile_serialization=False)  # 2020-era files
        return path
    # mmengine's HistoryBuffer, from a module that is gone when the file is read
    module = types.ModuleType("fake_mmengine_logging")
    buffer_cls = type("HistoryBuffer", (), {"__module__": module.__name__})
    module.HistoryBuffer = buffer_cls
    sys.modules[module.__name__] = module
    buffer = buffer_cls()
    buffer.log = np.arange(4.0)
    obj = {"meta": {"dataset_meta": {"classes": COCO_NAMES, "palette": [(1, 2, 3)]}, "seed": np.int64(7)},
           "state_dict": state, "message_hub": {"log_scalars": {"loss": buffer}}}
    try:
        torch.save(obj, path)
    finally:
        del sys.modules[module.__name__]
    return path


@pytest.mark.parametrize("version, prefix", [(3, ""), (2, ""), (3, "module.")])
def test_convert_writes_a_checkpoint_eval_and_predict_load(source, tmp_path, capsys, version, prefix):
    model, weights = source
    src = write_mmdet(tmp_path / "vfnet.pth", weights, version, prefix)
    assert main(["convert", "mmdet", str(src), str(tmp_path / "vfnet.pt")]) == 0
    assert "R-18, 80 classes, 80 class names" in capsys.readouterr().out
    loaded, cfg, _ = load_model(tmp_path / "vfnet.pt", device=torch.device("cpu"))
    assert (cfg.model.depth, cfg.model.num_classes, cfg.model.stacked_convs) == (18, 80, 1)
    assert cfg.model.fpn_channels == cfg.model.head_channels == 32
    assert cfg.model.class_names == list(COCO_NAMES) and class_info(cfg)[1] == list(COCO_NAMES)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert load_checkpoint(tmp_path / "vfnet.pt")["iteration"] == 0


def bad_weights(weights, case):
    w = dict(weights)
    if case == "dcn_groups":  # 2 deform groups
        w["bbox_head.cls_convs.0.conv.conv_offset.weight"] = torch.zeros(54, 32, 3, 3)
    elif case == "dcn_place":
        w["bbox_head.vfnet_reg_conv.conv.conv_offset.weight"] = torch.zeros(27, 32, 3, 3)
    elif case == "dcn_one_tower":
        w["bbox_head.cls_convs.0.conv.conv_offset.weight"] = torch.zeros(27, 32, 3, 3)
        w["bbox_head.cls_convs.0.conv.conv_offset.bias"] = torch.zeros(27)
    elif case == "dcn_basic":  # DCN in a ResNet-18
        w["backbone.layer3.0.conv2.conv_offset.weight"] = torch.zeros(27, 256, 3, 3)
    elif case == "unknown":
        w["bbox_head.centerness.weight"] = torch.zeros(1, 32, 3, 3)
    elif case == "missing":
        del w["bbox_head.vfnet_reg_refine.bias"]
    elif case == "shape":
        w["neck.fpn_convs.4.conv.weight"] = torch.zeros(32, 32, 1, 1)
    elif case == "width":  # a head width GroupNorm 32 cannot split
        w["bbox_head.cls_convs.0.conv.weight"] = torch.zeros(48, 32, 3, 3)
    return w


@pytest.mark.parametrize("case, message", [
    ("dcn_groups", "one deform group (27 offset channels) are supported: "
                   "bbox_head.cls_convs.0.conv.conv_offset.weight has shape (54, 32, 3, 3)"),
    ("dcn_place", "(DCN) at this place is not supported: bbox_head.vfnet_reg_conv.conv.conv_offset.weight"),
    ("dcn_one_tower", "tensor bbox_head.reg_convs.0.conv.conv_offset.weight is missing"),
    ("dcn_basic", "model.depth = 18 is invalid"),
    ("unknown", "tensor bbox_head.centerness.weight has no counterpart"),
    ("missing", "tensor bbox_head.vfnet_reg_refine.bias is missing"),
    ("shape", "tensor neck.fpn_convs.4.conv.weight has shape (32, 32, 1, 1), expected (32, 32, 3, 3)"),
    ("width", "model.head_channels = 48 is invalid"),
])
def test_bad_mmdet_checkpoints_give_one_line(source, tmp_path, capsys, case, message):
    src = write_mmdet(tmp_path / "bad.pth", bad_weights(source[1], case))
    assert main(["convert", "mmdet", str(src), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(src) in err
    assert not (tmp_path / "out.pt").exists()


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > pwned.txt",))


def test_files_that_are_not_checkpoints_or_run_code_are_refused(source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for version in (2, 3):  # cut in half: a legacy pickle stream and a zip without its end
        data = write_mmdet(tmp_path / "whole.pth", source[1], version).read_bytes()
        (tmp_path / f"truncated{version}.pth").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _RunsCode()}, tmp_path / "evil.pth")
    torch.save({"nothing": 1}, tmp_path / "empty.pth")
    for name, message in (("missing.pth", "checkpoint not found"), ("garbage.pth", "not a readable checkpoint"),
                          ("truncated2.pth", "not a readable checkpoint"),
                          ("truncated3.pth", "not a readable checkpoint"),
                          ("evil.pth", "refused to load"), ("empty.pth", "not an mmdetection checkpoint")):
        assert main(["convert", "mmdet", str(tmp_path / name), str(tmp_path / "out.pt")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "pwned.txt").exists()


def test_read_untrusted_keeps_the_data_and_stands_in_for_foreign_classes(source, tmp_path):
    obj = read_untrusted(write_mmdet(tmp_path / "a.pth", {"w": torch.arange(3)}))
    assert torch.equal(obj["state_dict"]["w"], torch.arange(3))
    assert obj["meta"]["dataset_meta"]["classes"] == COCO_NAMES
    assert type(obj["message_hub"]["log_scalars"]["loss"]).__name__ == "HistoryBuffer"


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a converted checkpoint


def test_init_from_keeps_mismatched_tensors_and_logs_them(source, tmp_path, caplog):
    model, weights = source
    src = write_mmdet(tmp_path / "coco.pth", weights)
    torch.manual_seed(1)
    target = VFNet.from_config(model_cfg(num_classes=3))
    fresh_cls = target.head.cls.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="vfnet.train.transfer"):
        skipped = init_from(target, src)
    assert sorted(s.split(":")[0] for s in skipped) == ["head.cls.bias", "head.cls.weight"]
    assert all("keeps its initialisation" in s for s in skipped)
    assert sum("init_from skipped head.cls" in r.message for r in caplog.records) == 2
    assert torch.equal(target.head.cls.weight, fresh_cls)
    for name, value in target.state_dict().items():
        if not name.startswith("head.cls."):
            assert torch.equal(value, model.state_dict()[name]), name
    with caplog.at_level(logging.INFO, logger="vfnet.train.transfer"):
        init_from(VFNet.from_config(model_cfg(depth=50, num_classes=3, channels=64)), src)
    assert any(r.levelname == "WARNING" and "match the checkpoint" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match="neither a vfnet nor"):
        torch.save({"a": torch.ones(1)}, tmp_path / "other.pt")
        init_from(target, tmp_path / "other.pt")


def subset(ann: Path, count: int, out: Path) -> Path:
    data = json.loads(ann.read_text())
    data["images"] = data["images"][:count]
    keep = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    out.write_text(json.dumps(data))
    return out


@pytest.mark.skipif(not BCCD.is_dir(), reason="needs the shared BCCD data")
def test_bccd_fine_tune_from_a_converted_checkpoint(source, tmp_path, caplog):
    _, weights = source
    assert main(["convert", "mmdet", str(write_mmdet(tmp_path / "coco.pth", weights)),
                 str(tmp_path / "coco.pt")]) == 0
    cfg = model_cfg(num_classes=3)
    cfg.model.init_from = str(tmp_path / "coco.pt")
    cfg.model.frozen_stages = 4
    cfg.data.train_ann = str(subset(BCCD / "annotations" / "trainval.json", 4, tmp_path / "train.json"))
    cfg.data.val_ann = str(subset(BCCD / "annotations" / "test.json", 2, tmp_path / "val.json"))
    cfg.data.train_images = cfg.data.val_images = str(BCCD / "images")
    cfg.data.img_scale, cfg.data.num_workers = [160, 120], 0
    cfg.train.device, cfg.train.amp = "cpu", False
    cfg.train.batch_size, cfg.train.max_iters, cfg.train.warmup_iters, cfg.train.log_interval = 2, 2, 1, 1
    with caplog.at_level(logging.INFO, logger="vfnet.train.transfer"):
        metrics = train(cfg, tmp_path / "run")
    assert metrics["iterations"] == 2
    assert any("init_from" in r.message and "2 skipped" in r.message for r in caplog.records)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["iter"] == 1  # a fresh schedule, not a resume
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    _, cfg_out, _ = load_model(tmp_path / "run" / "checkpoints" / "last.pt", device=torch.device("cpu"))
    assert cfg_out.model.class_names == ["Platelets", "RBC", "WBC"]


# ---------------------------------------------------------------------------------------------
# The other zoo architectures, small: converting, and fine-tuning into another class count


SMALL_ZOO = {
    "res2net_dcn": ({"backbone": "res2net", "depth": 50, "base_width": 4, "scales": 3, "dcn": True},
                    "VFNet R2-50 4w x 3s DCN (c3, c4, c5, head)"),
    "resnext_dcn": ({"backbone": "resnet", "depth": 50, "groups": 4, "base_width": 4, "dcn": True},
                    "VFNet X-50-4x4d DCN (c3, c4, c5, head)"),
    "resnext": ({"backbone": "resnet", "depth": 50, "groups": 2, "base_width": 8}, "VFNet X-50-2x8d"),
}


def small_cfg(name: str, num_classes: int = 80) -> Config:
    settings, _ = SMALL_ZOO[name]
    cfg = model_cfg(settings["depth"], num_classes, 64, 2)  # GroupNorm 32 needs > 1 value at P7 of 64 px
    for key in ("backbone", "groups", "base_width", "scales"):
        if key in settings:
            setattr(cfg.model, key, settings[key])
    if settings.get("dcn"):
        cfg.model.stage_with_dcn, cfg.model.dcn_on_last_conv = [False, True, True, True], True
    return cfg


@pytest.mark.parametrize("name", sorted(SMALL_ZOO))
def test_zoo_architectures_convert_and_fine_tune(name, tmp_path, capsys):
    torch.manual_seed(0)
    model = VFNet.from_config(small_cfg(name))
    with torch.no_grad():  # offsets that move the samples
        for key, value in model.state_dict().items():
            if "conv_offset" in key:
                value.normal_(std=0.1)
    weights = {to_mmdet_name(k): v.clone() for k, v in model.state_dict().items()}
    src = write_mmdet(tmp_path / "zoo.pth", weights, version=2)
    assert main(["convert", "mmdet", str(src), str(tmp_path / "zoo.pt")]) == 0
    assert f"{SMALL_ZOO[name][1]}, 80 classes" in capsys.readouterr().out
    loaded, cfg, _ = load_model(tmp_path / "zoo.pt", device=torch.device("cpu"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(images).cls_scores, loaded.eval()(images).cls_scores):
            torch.testing.assert_close(a, b)
    target = VFNet.from_config(small_cfg(name, num_classes=3))
    skipped = init_from(target, src)
    assert sorted(s.split(":")[0] for s in skipped) == ["head.cls.bias", "head.cls.weight"]
    target.train()
    outputs = target(images)
    losses = target.loss(outputs, [torch.tensor([[8.0, 8.0, 40.0, 50.0]])], [torch.tensor([1])])
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
    offsets = [p for k, p in target.named_parameters() if "conv_offset" in k]
    assert offsets and all(p.grad is not None for p in offsets) or "dcn" not in name
